//! Fast point reads for the embedded backend: reuse one SQLite read
//! transaction across consecutive `get`s while nobody has committed since.
//!
//! Starting and ending a WAL read transaction costs two `fcntl` calls on the
//! `-shm` file (about 2.5 µs of the 3 µs of a `get`). Between commits the
//! database does not change, so a read transaction that is still at the
//! newest commit answers exactly like a fresh one. Every commit in WAL mode
//! rewrites the WAL-index header at the start of the `-shm` file before the
//! committing call returns (a checkpoint that restarts the WAL changes its
//! salts), so comparing those 48 bytes with the copy taken when the
//! transaction began tells whether it is still the newest: if they are
//! equal, the open transaction is reused; otherwise it is ended and a fresh
//! one begun. A write that returned before the comparison is therefore
//! always seen.
//!
//! An idle open read transaction would keep other processes' checkpoints
//! from resetting the WAL, so a background thread ends any snapshot unused
//! for [`IDLE`]; every other operation of the store ends it first too.

use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// A snapshot unused this long is ended by the reaper thread.
pub const IDLE: Duration = Duration::from_millis(2);

const HEADER_BYTES: usize = 48;

/// A read-only shared mapping of the WAL-index header in `<db>-shm`.
pub struct ShmHeader {
    ptr: *const u8,
    len: usize,
}

// The mapping is read-only and only read with volatile loads.
unsafe impl Send for ShmHeader {}
unsafe impl Sync for ShmHeader {}

impl ShmHeader {
    /// Maps the header of `shm_path`; `None` when the file is missing or too
    /// small (the caller then always uses fresh transactions).
    pub fn map(shm_path: &std::path::Path) -> Option<ShmHeader> {
        use std::os::unix::io::AsRawFd;
        let f = std::fs::File::open(shm_path).ok()?;
        let size = f.metadata().ok()?.len();
        // SQLite grows -shm in 32 KiB regions; the header is the first 136 bytes.
        if size < 4096 {
            return None;
        }
        let len = 4096;
        // SAFETY: a fresh read-only shared mapping of an open file; the file
        // is only ever grown or unlinked while our connection is open (it is
        // truncated only by the first connection to open the database, and
        // ours stays open for as long as this mapping lives).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(ShmHeader {
            ptr: ptr as *const u8,
            len,
        })
    }

    /// The current first copy of the WAL-index header.
    pub fn read(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: i < HEADER_BYTES <= len, inside the live mapping.
            *b = unsafe { std::ptr::read_volatile(self.ptr.add(i)) };
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        out
    }
}

impl Drop for ShmHeader {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

/// An open read transaction and the header it was taken at.
pub struct Snapshot {
    pub header: [u8; HEADER_BYTES],
    pub last_used: Instant,
}

/// Something holding snapshots that the reaper can end.
pub trait Reapable: Send + Sync {
    /// Ends the snapshot if unused since `idle`; returns whether one is still
    /// open.
    fn reap(&self, idle: Duration) -> bool;
}

struct Reaper {
    stores: Mutex<(Vec<Weak<dyn Reapable>>, bool)>,
    wake: Condvar,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| {
        std::thread::Builder::new()
            .name("nanokit-kv-reaper".into())
            .spawn(reaper_loop)
            .expect("cannot start the nanokit state reaper thread");
        Reaper {
            stores: Mutex::new((Vec::new(), false)),
            wake: Condvar::new(),
        }
    })
}

fn reaper_loop() {
    let r = reaper();
    loop {
        // Sleep until some snapshot is open.
        {
            let mut g = r.stores.lock().unwrap_or_else(|p| p.into_inner());
            while !g.1 {
                g = r.wake.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.1 = false;
        }
        loop {
            std::thread::sleep(IDLE);
            let stores: Vec<Arc<dyn Reapable>> = {
                let mut g = r.stores.lock().unwrap_or_else(|p| p.into_inner());
                g.0.retain(|w| w.strong_count() > 0);
                g.0.iter().filter_map(Weak::upgrade).collect()
            };
            let mut any_open = false;
            for s in stores {
                any_open |= s.reap(IDLE);
            }
            if !any_open {
                break;
            }
        }
    }
}

/// Registers a store with the reaper (once, at open).
pub fn register(store: Weak<dyn Reapable>) {
    let r = reaper();
    let mut g = r.stores.lock().unwrap_or_else(|p| p.into_inner());
    g.0.push(store);
}

/// Tells the reaper that a snapshot was opened.
pub fn opened() {
    let r = reaper();
    let mut g = r.stores.lock().unwrap_or_else(|p| p.into_inner());
    if !g.1 {
        g.1 = true;
        r.wake.notify_one();
    }
}
