//! Lease lock files: one primitive for per-package install locks, the global
//! provisioning lock, the deploy lock beside `state.json`, and named locks.
//!
//! # Protocol
//!
//! * The lock file is **persistent**: blank (empty or spaces) means free, a
//!   holder's record ([`LockInfo`], JSON, padded with spaces) means held.
//!   Creating and unlinking inodes, and growing and shrinking files, are the
//!   expensive parts of a file lock (tens of µs on ext4), so acquisitions
//!   overwrite the content in place and never do either after the first.
//! * Every transition is a **compare-and-swap of the content under a brief
//!   kernel lock** (`flock`) on that same file, held for a few syscalls and
//!   released by the kernel if its owner dies: acquire writes our record only
//!   if the file is empty; takeover replaces a record only if the file is
//!   still exactly as judged stale or dead: the same observation *and* the
//!   same bytes (a read outside the section can be torn by a concurrent
//!   write, so what was judged may never have been a whole record); renewal and release act only if
//!   the record is still ours. Two contenders can never both win, and a
//!   holder learns at its next renewal that its lease was taken.
//! * **Heartbeat**: while held, a background thread touches the file's mtime
//!   several times per stale period.
//! * **Stale** is judged by *observed progress*: a waiter records the file's
//!   mtime and size and starts its own monotonic clock; when nothing changed
//!   for `stale` of *its* time, the lease is stale. Clocks of other hosts are
//!   never compared with ours, so clock skew cannot break it. A holder on this
//!   host whose process is gone (or whose pid now belongs to another process)
//!   is judged dead at once.
//! * Within one process the kernel-lock sections are also serialised by a
//!   process-local mutex: on NFS, `flock` is emulated with POSIX locks, which
//!   belong to the process rather than to the open file.
//! * A process keeps its lock files open between acquisitions (a small
//!   cache), and every section first checks that the path still names the
//!   open file: a lock file deleted or replaced by hand is reopened, never
//!   locked through a stale descriptor. Reads do not update the access time
//!   (`O_NOATIME` where allowed): on ext4 that is an inode write per read.
//! * **Co-tenants** (see [`crate::sys::beneath`]): the lock file itself, and for
//!   locks inside a shared repository every directory beneath the repo root,
//!   is opened with `O_NOFOLLOW` relative to its parent's descriptor, with
//!   `O_NONBLOCK`, and checked with `fstat` (a regular file with one link)
//!   before it is read or written. A symlink, FIFO, device or hard link there
//!   is refused (`ENKFOREIGN`), never written through and never blocked on.
//!   Writes only ever go to a descriptor opened that way.

mod heartbeat;

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsString};
use std::fs::{self, File, Metadata};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::{ErrorCode, IoError};
use crate::sys;
use crate::sys::beneath::{self, Access, Dir};
use crate::sys::host;
pub use crate::sys::host::{this_host, HostIdentity};

/// Default stale period: a lease not renewed for this long may be taken over.
pub const DEFAULT_STALE: Duration = Duration::from_secs(30);

/// How long release and renewal wait for another process's kernel-lock
/// section. Sections last a few syscalls, so this is generous.
const GUARD_WAIT: Duration = Duration::from_secs(5);

/// Errors of the lock primitive.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock is held by someone else (and the wait, if any, timed out).
    #[error(
        "lock {} is held by {holder}; gave up after {} ms (if that holder is gone for good, `nanokit lock break {}` clears it)",
        path.display(), waited.as_millis(), path.display()
    )]
    Locked {
        path: PathBuf,
        holder: String,
        waited: Duration,
    },
    /// The lease was taken over or broken while we held it.
    #[error(
        "the lease on {} was lost: the lock was broken or taken over while held (was this process paused for longer than the stale period?); work done under it may have overlapped with another holder",
        path.display()
    )]
    Lost { path: PathBuf },
    /// Waiting was cancelled through an abort signal.
    #[error("waiting for lock {} was aborted", path.display())]
    Aborted { path: PathBuf },
    /// The lock path cannot be used.
    #[error("invalid lock path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    /// A lock option has a value that cannot work.
    #[error("invalid {option}: {reason}")]
    InvalidOption {
        option: &'static str,
        reason: &'static str,
    },
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl ErrorCode for LockError {
    fn code(&self) -> &'static str {
        match self {
            LockError::Locked { .. } => "ENKLOCKED",
            LockError::Lost { .. } => "ENKLOCKLOST",
            LockError::Aborted { .. } => "ENKABORTED",
            LockError::InvalidPath { .. } | LockError::InvalidOption { .. } => "ENKSPEC",
            LockError::Io(e) => beneath::io_code(&e.source),
        }
    }
}

/// [`crate::error::io_err`] for this module's error type.
fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LockError + 'a {
    crate::error::io_err(op, path)
}

/// How to take a lock.
#[derive(Debug, Clone)]
pub struct LockOptions {
    /// A lease not renewed for this long (as observed by the waiter) is stale.
    pub stale: Duration,
    /// Give up with [`LockError::Locked`] after waiting this long; `None` waits
    /// forever, `Some(ZERO)` tries once.
    pub timeout: Option<Duration>,
    /// A label shown to others who find the lock held.
    pub holder: Option<String>,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            stale: DEFAULT_STALE,
            timeout: None,
            holder: None,
        }
    }
}

/// The record a holder writes into its lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockInfo {
    /// Unique per acquisition.
    pub token: String,
    /// See [`HostIdentity::id`]; pids are only compared when this matches ours.
    pub host_id: String,
    pub hostname: String,
    pub pid: u32,
    /// Start time of `pid` (clock ticks since boot), to detect pid reuse.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// The label the holder gave.
    #[serde(default)]
    pub holder: Option<String>,
    /// Wall-clock acquisition time (ms since the epoch), for display only.
    pub acquired_at_ms: u64,
    /// The holder's stale period, for display.
    #[serde(default)]
    pub stale_ms: u64,
}

impl LockInfo {
    /// A one-line description of the holder for messages.
    pub fn describe(&self) -> String {
        let label = self
            .holder
            .as_deref()
            .map(|h| format!("'{h}' "))
            .unwrap_or_default();
        let age = now_ms().saturating_sub(self.acquired_at_ms);
        format!(
            "{label}(pid {} on {}, acquired {} ago)",
            self.pid,
            self.hostname,
            human_ms(age)
        )
    }
}

fn human_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=119_999 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} min", ms / 60_000),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Identity of one lock file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(m: &Metadata) -> Self {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }

    /// The identity of the file at `path`, asking for nothing else (see
    /// [`sys::fs::stat`]: the lock's own writes stay cheap).
    fn at(path: &CStr) -> io::Result<FileId> {
        let s = sys::fs::stat(path, sys::fs::StatFields::ID)?;
        Ok(FileId {
            dev: s.dev,
            ino: s.ino,
        })
    }
}

/// What a waiter saw of a lock file: any change is progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Observation {
    id: FileId,
    mtime: (i64, i64),
    size: u64,
}

impl Observation {
    fn of(m: &Metadata) -> Self {
        Observation {
            id: FileId::of(m),
            mtime: (m.mtime(), m.mtime_nsec()),
            size: m.len(),
        }
    }
}

fn validate(path: &Path) -> Result<(), LockError> {
    let bad = |reason| LockError::InvalidPath {
        path: path.to_string_lossy().into_owned(),
        reason,
    };
    let s = path.as_os_str().as_encoded_bytes();
    if s.is_empty() {
        return Err(bad("the path is empty"));
    }
    if s.contains(&0) {
        return Err(bad("the path contains a NUL byte"));
    }
    if path.file_name().is_none() || s.ends_with(b"/") {
        return Err(bad("the path must name a file, not a directory"));
    }
    Ok(())
}

/// A lock file's path, and how many of its last components lock users make
/// (and so co-tenants may have replaced): those are opened one at a time
/// without following symlinks; the rest is the caller's choice, followed.
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    path: &'a Path,
    /// At least 1: the lock file itself.
    owned: usize,
}

impl<'a> Target<'a> {
    /// A user's lock path: only its last component is never followed.
    fn user(path: &'a Path) -> Target<'a> {
        Target { path, owned: 1 }
    }

    /// The directory holding the lock file, reached from the trusted part
    /// without following anything, and the file's name. With `create`,
    /// missing directories are made.
    fn parent(&self, create: bool) -> io::Result<(Dir, &'a std::ffi::OsStr)> {
        let name = self.path.file_name().expect("validated: names a file");
        let root = self
            .path
            .ancestors()
            .nth(self.owned)
            .expect("validated: the path has this many components");
        let mut dir = Dir::root(root, create)?;
        let rel = self.path.strip_prefix(root).expect("an ancestor");
        if let Some(middle) = rel.parent().filter(|m| !m.as_os_str().is_empty()) {
            dir = dir.dirs(middle, create)?;
        }
        Ok((dir, name))
    }

    /// Opens the lock file (see [`Dir::open_file`]).
    fn open(&self, access: Access) -> io::Result<File> {
        let (dir, name) = self.parent(matches!(access, Access::ReadWriteCreate(_)))?;
        dir.open_file(name, access, NOATIME)
    }
}

/// The brief kernel lock on an open lock file, released on drop. Every read
/// that decides a write, and that write, happen inside one section.
struct Section<'f> {
    file: &'f File,
    _local: MutexGuard<'f, ()>,
}

impl<'f> Section<'f> {
    /// Enters the section, waiting up to `wait` for another process's
    /// (brief) one; `None` if it stayed busy.
    fn enter(
        path: &Path,
        lock_file: &'f LockFile,
        wait: Duration,
    ) -> Result<Option<Section<'f>>, LockError> {
        let local = lock_file.local.lock().unwrap_or_else(|e| e.into_inner());
        let file = &lock_file.file;
        let mut start = None;
        loop {
            // SAFETY: flock on a valid descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(Section {
                    file,
                    _local: local,
                }));
            }
            let err = io::Error::last_os_error();
            if !matches!(err.raw_os_error(), Some(libc::EWOULDBLOCK | libc::EINTR)) {
                return Err(io_err("lock", path)(err));
            }
            if start.get_or_insert_with(Instant::now).elapsed() >= wait {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Drop for Section<'_> {
    fn drop(&mut self) {
        // SAFETY: unlocking our own descriptor.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// `O_NOATIME`: only the file's owner (or a privileged process) may use it.
#[cfg(any(target_os = "linux", target_os = "android"))]
const NOATIME: rustix::fs::OFlags = rustix::fs::OFlags::NOATIME;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const NOATIME: rustix::fs::OFlags = rustix::fs::OFlags::empty();

/// An open lock file and the identity it had when opened. This process
/// uses one per path (see [`OpenFiles`]), and `local` serialises its
/// sections: on NFS, `flock` is emulated with POSIX locks, which do not
/// exclude threads of one process (and closing any descriptor of the file
/// would drop them, another reason for one descriptor per file).
struct LockFile {
    file: File,
    id: FileId,
    /// The path it was opened at, for the identity checks.
    c_path: CString,
    local: Mutex<()>,
}

impl LockFile {
    /// Opens (creating if needed, with its directories) the lock file,
    /// refusing anything but a regular file of its own (see [`Target`]).
    fn open(target: Target<'_>) -> Result<LockFile, LockError> {
        let path = target.path;
        let file = target
            .open(Access::ReadWriteCreate(0o644))
            .map_err(io_err("open the lock file", path))?;
        let id = FileId::of(&file.metadata().map_err(io_err("stat", path))?);
        Ok(LockFile {
            file,
            id,
            c_path: sys::fs::c_path(path).map_err(io_err("open", path))?,
            local: Mutex::new(()),
        })
    }

    /// Whether `path` still names this file (it was not deleted, or replaced
    /// by hand, since it was opened).
    fn is_at(&self, path: &Path) -> Result<bool, LockError> {
        match FileId::at(&self.c_path) {
            Ok(id) => Ok(id == self.id),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("stat", path)(e)),
        }
    }

    /// Whether this file is still linked: not deleted, nor replaced by a
    /// rename over it. Cheaper than [`LockFile::is_at`] (no path walk), but
    /// blind to the file, or a directory above it, being renamed away.
    fn is_linked(&self, path: &Path) -> Result<bool, LockError> {
        match sys::fs::stat_file(&self.file, sys::fs::StatFields::LINKS) {
            Ok(s) => Ok(s.links > 0),
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => Ok(false),
            Err(e) => Err(io_err("stat", path)(e)),
        }
    }
}

/// This process's open lock files, reused across acquisitions: opening and
/// closing cost more than the rest of an uncontended acquire + release. The
/// caller checks [`LockFile::is_at`] inside its section before trusting one.
/// Keyed by the path's bytes (hashing a `Path` goes component by component).
struct OpenFiles(Mutex<HashMap<OsString, Arc<LockFile>>>);

/// Files beyond this many that no lease uses are closed.
const OPEN_FILES_KEPT: usize = 64;

static OPEN_FILES: std::sync::LazyLock<OpenFiles> =
    std::sync::LazyLock::new(|| OpenFiles(Mutex::default()));

impl OpenFiles {
    fn get(&self, target: Target<'_>) -> Result<Arc<LockFile>, LockError> {
        let path = target.path;
        if let Some(f) = self.lock().get(path.as_os_str()) {
            return Ok(f.clone());
        }
        let file = Arc::new(LockFile::open(target)?);
        let mut files = self.lock();
        if files.len() >= OPEN_FILES_KEPT {
            files.retain(|_, f| Arc::strong_count(f) > 1);
        }
        files.insert(path.as_os_str().to_owned(), file.clone());
        Ok(file)
    }

    /// Drops `file` from the cache (it no longer is the file at `path`).
    fn forget(&self, path: &Path, file: &Arc<LockFile>) {
        let mut files = self.lock();
        if files
            .get(path.as_os_str())
            .is_some_and(|f| Arc::ptr_eq(f, file))
        {
            files.remove(path.as_os_str());
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<OsString, Arc<LockFile>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether lock file content means "free".
fn is_free(content: &[u8]) -> bool {
    // Without an early exit, so that it vectorises: a released record is a
    // few hundred spaces, looked at on every acquisition.
    content
        .iter()
        .fold(true, |free, &b| free & matches!(b, b' ' | b'\n'))
}

/// Writes `record` over `old` content, padded with spaces to the old length
/// (JSON allows trailing whitespace), so the file never shrinks.
fn overwrite(file: &File, record: &[u8], old_len: usize) -> io::Result<()> {
    if record.len() >= old_len {
        return file.write_all_at(record, 0);
    }
    let mut padded = Vec::with_capacity(old_len);
    padded.extend_from_slice(record);
    padded.resize(old_len, b' ');
    file.write_all_at(&padded, 0)
}

/// The whole content of an open lock file (at most 64 KiB).
fn read_content(file: &File) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    // Records are a few hundred bytes; a larger buffer only costs zeroing.
    let mut chunk = [0u8; 1024];
    loop {
        let n = file.read_at(&mut chunk, buf.len() as u64)?;
        buf.extend_from_slice(&chunk[..n]);
        // A short read of a regular file is its end: one pread for a record.
        if n < chunk.len() || buf.len() > 64 * 1024 {
            return Ok(buf);
        }
    }
}

/// How [`Held::is_ours`] checks that its file is still the lock file.
#[derive(Clone, Copy)]
enum Identity {
    /// The path names it ([`LockFile::is_at`]).
    Path,
    /// It is still linked ([`LockFile::is_linked`]).
    Linked,
}

/// State of a held lease, shared with the heartbeat thread.
pub(crate) struct Held {
    path: PathBuf,
    info: LockInfo,
    /// Exactly what we wrote: the lease is ours while the file holds it.
    record: Vec<u8>,
    file: Arc<LockFile>,
    stale: Duration,
    lost: CancellationToken,
    released: AtomicBool,
    /// Acquired by taking over a dead or stale holder's lease.
    took_over: bool,
}

impl Held {
    /// Renews the lease; returns false (and marks it lost) if it is no longer ours.
    fn renew(&self) -> bool {
        if self.released.load(Ordering::Acquire) {
            return true;
        }
        let result = (|| -> Result<Option<bool>, LockError> {
            let Some(_section) = Section::enter(&self.path, &self.file, GUARD_WAIT)? else {
                return Ok(None);
            };
            if self.is_ours(Identity::Path)?.is_none() {
                return Ok(Some(false));
            }
            // SAFETY: futimens with NULL sets both times to now on our own fd.
            unsafe { libc::futimens(self.file.file.as_raw_fd(), std::ptr::null()) };
            Ok(Some(true))
        })();
        match result {
            Ok(Some(true)) => true,
            Ok(Some(false)) => {
                tracing::warn!(path = %self.path.display(), "lease lost: the lock was taken over or broken");
                self.lost.cancel();
                false
            }
            Ok(None) | Err(_) => {
                // Could not check this time (a stuck section, a transient NFS
                // error): keep trying; a waiter judges us stale if it persists.
                tracing::warn!(path = %self.path.display(), error = ?result.err(), "lease renewal skipped");
                true
            }
        }
    }

    /// Inside a section: our file is still the lock file (it was not
    /// deleted or replaced by hand, as judged by `identity`) and still holds
    /// our record. Returns the file's length when it is ours.
    fn is_ours(&self, identity: Identity) -> Result<Option<usize>, LockError> {
        let current = match identity {
            Identity::Path => self.file.is_at(&self.path)?,
            Identity::Linked => self.file.is_linked(&self.path)?,
        };
        if !current {
            return Ok(None);
        }
        let content = read_content(&self.file.file).map_err(io_err("read", &self.path))?;
        let ours = content.get(..self.record.len()) == Some(&self.record[..])
            && is_free(&content[self.record.len()..]);
        Ok(ours.then_some(content.len()))
    }

    fn release(&self) -> Result<(), LockError> {
        if self.released.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        heartbeat::unregister(self);
        let section = Section::enter(&self.path, &self.file, GUARD_WAIT)?.ok_or_else(|| {
            io_err("lock", &self.path)(io::Error::new(
                io::ErrorKind::TimedOut,
                "the lock file stayed locked by another process (is one stopped?)",
            ))
        })?;
        // Only reporting depends on this check, not exclusion: whatever we
        // write to a file that is no longer the lock file, nobody trusts it
        // (every acquisition checks the path first). So the cheaper one.
        let len = self.is_ours(Identity::Linked)?;
        let ours = len.is_some();
        if let Some(len) = len {
            overwrite(&self.file.file, b"", len).map_err(io_err("release the lock", &self.path))?;
        }
        drop(section);
        if !ours || self.lost.is_cancelled() {
            self.lost.cancel();
            return Err(LockError::Lost {
                path: self.path.clone(),
            });
        }
        Ok(())
    }
}

/// A held lock. Released by [`Lease::release`] or on drop.
pub struct Lease {
    held: Arc<Held>,
    owned: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("path", &self.held.path)
            .field("token", &self.held.info.token)
            .finish()
    }
}

impl Lease {
    fn new(
        path: &Path,
        info: LockInfo,
        record: Vec<u8>,
        file: Arc<LockFile>,
        stale: Duration,
        took_over: bool,
    ) -> Lease {
        let held = Arc::new(Held {
            path: path.to_path_buf(),
            info,
            record,
            file,
            stale,
            lost: CancellationToken::new(),
            released: AtomicBool::new(false),
            took_over,
        });
        heartbeat::register(held.clone());
        Lease { held, owned: true }
    }

    /// The unique token of this acquisition.
    pub fn token(&self) -> &str {
        &self.held.info.token
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.held.path
    }

    /// The record written into the lock file.
    pub fn info(&self) -> &LockInfo {
        &self.held.info
    }

    /// Whether this lease was taken over from a holder that died or went
    /// stale (whose work may have been left half-done).
    pub fn took_over(&self) -> bool {
        self.held.took_over
    }

    /// Whether the lease has been found taken over or broken.
    pub fn is_lost(&self) -> bool {
        self.held.lost.is_cancelled()
    }

    /// A token cancelled when the lease is found lost, for `select!`.
    pub fn lost_token(&self) -> CancellationToken {
        self.held.lost.clone()
    }

    /// Releases the lock. Fails with [`LockError::Lost`] if the lease had been
    /// lost in the meantime (the lock is then left to its new owner).
    pub fn release(mut self) -> Result<(), LockError> {
        self.owned = false;
        self.held.release()
    }

    /// Gives up ownership without releasing: the lease stays held (and
    /// renewed) until [`release_all`] or the process exits. For handles whose
    /// owner disappears without releasing (a garbage-collected JS object).
    pub fn detach(mut self) {
        self.owned = false;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = self.held.release() {
                tracing::warn!(error = %e, "releasing a dropped lease");
            }
        }
    }
}

/// Releases every lease this process still holds (at process exit).
pub fn release_all() {
    for held in heartbeat::all() {
        let _ = held.release();
    }
}

/// Makes the holder's record for a new acquisition.
fn new_info(opts: &LockOptions) -> LockInfo {
    let host = this_host();
    LockInfo {
        token: format!("{:032x}", fastrand::u128(..)),
        host_id: host.id.clone(),
        hostname: host.hostname.clone(),
        pid: host.pid,
        pid_start: host.pid_start,
        holder: opts.holder.clone(),
        acquired_at_ms: now_ms(),
        stale_ms: opts.stale.as_millis() as u64,
    }
}

enum Attempt {
    Acquired(Lease),
    /// Someone holds it (or the record changed since it was judged).
    Held,
    /// Another process is inside its brief section right now.
    Busy,
}

/// What a waiter judged stale or dead, and why: a takeover replaces exactly
/// this, or nothing.
#[derive(Clone, Copy)]
struct Judged<'j> {
    seen: &'j Observation,
    /// The bytes the judgement was made on.
    content: &'j [u8],
    why: &'j str,
}

/// One compare-and-swap, inside the kernel-lock section: writes our record if
/// the lock is free, or, given `replace`, if the file is still exactly as
/// observed and read when its holder was judged stale or dead.
fn attempt(
    target: Target<'_>,
    opts: &LockOptions,
    replace: Option<Judged<'_>>,
) -> Result<Attempt, LockError> {
    let path = target.path;
    // A cached file that the path no longer names (deleted or replaced by
    // hand; on NFS, a stale file handle) is reopened; give up for this round
    // if that keeps happening.
    for _ in 0..3 {
        let lock_file = OPEN_FILES.get(target)?;
        let section = match Section::enter(path, &lock_file, Duration::from_millis(20)) {
            Ok(Some(section)) => section,
            Ok(None) => return Ok(Attempt::Busy),
            Err(e) if is_stale_handle(&e) => {
                OPEN_FILES.forget(path, &lock_file);
                continue;
            }
            Err(e) => return Err(e),
        };
        match lock_file.is_at(path) {
            Ok(true) => return swap(path, opts, replace, &lock_file, section),
            Ok(false) => {}
            Err(e) if is_stale_handle(&e) => {}
            Err(e) => return Err(e),
        }
        drop(section);
        OPEN_FILES.forget(path, &lock_file);
    }
    Ok(Attempt::Busy)
}

/// NFS's answer for a file deleted on the server while we had it open.
fn is_stale_handle(e: &LockError) -> bool {
    matches!(e, LockError::Io(e) if e.source.raw_os_error() == Some(libc::ESTALE))
}

/// The compare-and-swap of [`attempt`], inside its section.
fn swap(
    path: &Path,
    opts: &LockOptions,
    replace: Option<Judged<'_>>,
    lock_file: &Arc<LockFile>,
    section: Section<'_>,
) -> Result<Attempt, LockError> {
    let file = &lock_file.file;
    let content = read_content(file).map_err(io_err("read", path))?;
    let free = is_free(&content);
    if !free {
        let Some(Judged {
            seen,
            content: judged,
            why,
        }) = replace
        else {
            return Ok(Attempt::Held);
        };
        // Both checks: the observation alone misses a torn read (the stat
        // already showing the new write, the bytes still half the old
        // record, a dead pid in them), the bytes alone an ABA.
        let now = Observation::of(&file.metadata().map_err(io_err("stat", path))?);
        if now != *seen || content != judged {
            return Ok(Attempt::Held);
        }
        let old = serde_json::from_slice::<LockInfo>(&content).ok();
        tracing::warn!(
            path = %path.display(),
            holder = %old.as_ref().map(LockInfo::describe).unwrap_or_else(|| "unknown".into()),
            "taking over a {why} lock"
        );
    }
    let info = new_info(opts);
    let record = serde_json::to_vec(&info).expect("a lock record serialises");
    if let Err(e) = overwrite(file, &record, content.len()) {
        if free {
            let _ = overwrite(file, b"", content.len().max(record.len()));
        }
        return Err(io_err("write", path)(e));
    }
    drop(section);
    Ok(Attempt::Acquired(Lease::new(
        path,
        info,
        record,
        lock_file.clone(),
        opts.stale,
        !free,
    )))
}

/// Reads the lock's record together with the observation of the file it came
/// from (one open descriptor). `Err(NotFound)` if there is no lock file;
/// anything but a regular file there is refused without blocking on it.
/// `free` is true when the content is blank.
fn read_record(target: Target<'_>) -> io::Result<Record> {
    let file = target.open(Access::Read)?;
    let obs = Observation::of(&file.metadata()?);
    let content = read_content(&file)?;
    Ok(Record {
        obs,
        free: is_free(&content),
        info: serde_json::from_slice(&content).ok(),
        content,
    })
}

struct Record {
    obs: Observation,
    free: bool,
    info: Option<LockInfo>,
    content: Vec<u8>,
}

/// What a waiter should do next.
enum Step {
    Acquired(Lease),
    Wait(Duration),
}

/// The state of one contender: what it saw of the lock and since when.
struct Waiter<'a> {
    target: Target<'a>,
    path: &'a Path,
    opts: &'a LockOptions,
    seen: Option<Observation>,
    since: Instant,
    info: Option<LockInfo>,
    /// The bytes `info` was parsed from.
    content: Vec<u8>,
    polls: u32,
}

impl<'a> Waiter<'a> {
    fn new(target: Target<'a>, opts: &'a LockOptions) -> Self {
        Waiter {
            target,
            path: target.path,
            opts,
            seen: None,
            since: Instant::now(),
            info: None,
            content: Vec::new(),
            polls: 0,
        }
    }

    /// One round: acquire if free, take over if stale or dead, else say how
    /// long to wait before the next round.
    fn step(&mut self) -> Result<Step, LockError> {
        // The first round tries before looking: uncontended, that is the
        // whole acquisition.
        if self.polls == 0 {
            if let Attempt::Acquired(lease) = attempt(self.target, self.opts, None)? {
                return Ok(Step::Acquired(lease));
            }
        }
        // A release seen or a takeover lets us go again at once, a few times.
        for _ in 0..4 {
            // Not following a link there (the record read below refuses it).
            let m = match fs::symlink_metadata(self.path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err("stat", self.path)(e)),
                Ok(m) => Some(m),
            };
            let changed = match &m {
                None => true,
                Some(m) => self.seen != Some(Observation::of(m)) || self.info.is_none(),
            };
            if changed {
                // Something changed (or the record was not readable yet):
                // progress. Take the record and its observation together.
                let record = match read_record(self.target) {
                    Ok(r) => Some(r),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => return Err(io_err("read", self.path)(e)),
                };
                if record.as_ref().is_none_or(|r| r.free) {
                    self.seen = None;
                    self.info = None;
                    match attempt(self.target, self.opts, None)? {
                        Attempt::Acquired(lease) => return Ok(Step::Acquired(lease)),
                        Attempt::Held => continue,
                        Attempt::Busy => break,
                    }
                }
                let record = record.expect("checked above");
                if self.seen != Some(record.obs) {
                    self.since = Instant::now();
                }
                self.seen = Some(record.obs);
                self.info = record.info;
                self.content = record.content;
            }
            let obs = self.seen.expect("observed above");
            let here = this_host();
            let dead = self
                .info
                .as_ref()
                .is_some_and(|i| i.host_id == here.id && !host::process_alive(i.pid, i.pid_start));
            let stale = self.since.elapsed() >= self.opts.stale;
            if !dead && !stale {
                break;
            }
            let why = if dead { "dead holder's" } else { "stale" };
            let judged = Judged {
                seen: &obs,
                content: &self.content,
                why,
            };
            match attempt(self.target, self.opts, Some(judged))? {
                Attempt::Acquired(lease) => return Ok(Step::Acquired(lease)),
                Attempt::Held => {
                    // Not what was judged: read the record again next time
                    // (keeping `since` if the observation is unchanged).
                    self.info = None;
                    break;
                }
                Attempt::Busy => break,
            }
        }
        self.polls += 1;
        // Fast first polls, then every ~20 ms with jitter so that waiters do
        // not move in lockstep: a release is noticed within tens of ms.
        let base = match self.polls {
            1 => 1,
            2 => 2,
            3 => 5,
            4 => 10,
            _ => 20,
        };
        Ok(Step::Wait(Duration::from_micros(
            base * 1000 + fastrand::u64(0..base * 250),
        )))
    }

    fn describe_holder(&self) -> String {
        match &self.info {
            Some(info) => info.describe(),
            None => "an unknown holder".into(),
        }
    }
}

/// Takes the lock if it is free now (or its holder on this host is dead).
/// Never waits; a lock held by another host cannot be judged stale in one look.
pub fn try_acquire(path: &Path, opts: &LockOptions) -> Result<Option<Lease>, LockError> {
    validate(path)?;
    match Waiter::new(Target::user(path), opts).step()? {
        Step::Acquired(lease) => Ok(Some(lease)),
        Step::Wait(_) => Ok(None),
    }
}

/// Waits for the lock (up to `opts.timeout`) and takes it.
pub async fn acquire(
    path: &Path,
    opts: &LockOptions,
    cancel: &CancellationToken,
) -> Result<Lease, LockError> {
    acquire_unless(path, opts, cancel, || false)
        .await
        .map(|lease| lease.expect("acquire_unless without a done condition returns a lease"))
}

/// Like [`acquire`], but gives up without error (`Ok(None)`) as soon as `done`
/// returns true, checked before every attempt: waiters for work that another
/// process is doing stop waiting the moment that work is complete.
pub async fn acquire_unless(
    path: &Path,
    opts: &LockOptions,
    cancel: &CancellationToken,
    done: impl FnMut() -> bool,
) -> Result<Option<Lease>, LockError> {
    validate(path)?;
    wait_for(Target::user(path), opts, cancel, done).await
}

/// A lock file at `root/rel` inside a directory shared with co-tenants:
/// `root` is the caller's choice (followed as given); every component of
/// `rel` (plain names only) is opened without following symlinks, so a
/// directory beneath `root` replaced by a link is refused (`ENKFOREIGN`).
fn target_in(root: &Path, rel: &Path) -> Result<(PathBuf, usize), LockError> {
    let bad = |reason| LockError::InvalidPath {
        path: rel.to_string_lossy().into_owned(),
        reason,
    };
    let mut owned = 0;
    for c in rel.components() {
        match c {
            std::path::Component::Normal(_) => owned += 1,
            _ => return Err(bad("the path inside the directory must be plain names")),
        }
    }
    if owned == 0 {
        return Err(bad("the path is empty"));
    }
    let path = root.join(rel);
    validate(&path)?;
    Ok((path, owned))
}

/// [`acquire`] of the lock file `root/rel` (see [`target_in`]).
pub async fn acquire_in(
    root: &Path,
    rel: &Path,
    opts: &LockOptions,
    cancel: &CancellationToken,
) -> Result<Lease, LockError> {
    acquire_unless_in(root, rel, opts, cancel, || false)
        .await
        .map(|lease| lease.expect("acquire_unless without a done condition returns a lease"))
}

/// [`acquire_unless`] of the lock file `root/rel` (see [`target_in`]).
pub async fn acquire_unless_in(
    root: &Path,
    rel: &Path,
    opts: &LockOptions,
    cancel: &CancellationToken,
    done: impl FnMut() -> bool,
) -> Result<Option<Lease>, LockError> {
    let (path, owned) = target_in(root, rel)?;
    wait_for(Target { path: &path, owned }, opts, cancel, done).await
}

#[tracing::instrument(name = "lock.wait", level = "info", skip_all, fields(nanokit.lock = %target.path.display()))]
async fn wait_for(
    target: Target<'_>,
    opts: &LockOptions,
    cancel: &CancellationToken,
    mut done: impl FnMut() -> bool,
) -> Result<Option<Lease>, LockError> {
    let path = target.path;
    let start = Instant::now();
    let deadline = opts.timeout.map(|t| start + t);
    let mut waiter = Waiter::new(target, opts);
    loop {
        if cancel.is_cancelled() {
            return Err(LockError::Aborted {
                path: path.to_path_buf(),
            });
        }
        if done() {
            return Ok(None);
        }
        let mut wait = match waiter.step()? {
            Step::Acquired(lease) => return Ok(Some(lease)),
            Step::Wait(wait) => wait,
        };
        if let Some(deadline) = deadline {
            let now = Instant::now();
            if now >= deadline {
                return Err(LockError::Locked {
                    path: path.to_path_buf(),
                    holder: waiter.describe_holder(),
                    waited: start.elapsed(),
                });
            }
            wait = wait.min(deadline - now);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => {
                return Err(LockError::Aborted { path: path.to_path_buf() });
            }
        }
    }
}

/// What `inspect` tells about a lock.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LockStatus {
    pub path: PathBuf,
    /// The holder's record; `None` if it cannot be read (being written, or foreign).
    pub info: Option<LockInfo>,
    /// Wall-clock time since the last heartbeat (display only: another host's
    /// clock may differ from ours).
    pub heartbeat_age_ms: u64,
    /// Whether the holder runs on this host (same boot and pid namespace).
    pub same_host: bool,
    /// For a holder on this host: whether its process is still alive.
    pub holder_alive: Option<bool>,
    /// The holder is dead, or its heartbeat is older than its stale period.
    pub stale: bool,
}

/// Describes the lock at `path`, or `None` if it is not held. `stale` is used
/// when the holder's record does not state its own stale period.
pub fn inspect(path: &Path, stale: Duration) -> Result<Option<LockStatus>, LockError> {
    validate(path)?;
    inspect_target(Target::user(path), stale)
}

/// [`inspect`] of the lock file `root/rel` (see [`target_in`]).
pub fn inspect_in(
    root: &Path,
    rel: &Path,
    stale: Duration,
) -> Result<Option<LockStatus>, LockError> {
    let (path, owned) = target_in(root, rel)?;
    inspect_target(Target { path: &path, owned }, stale)
}

fn inspect_target(target: Target<'_>, stale: Duration) -> Result<Option<LockStatus>, LockError> {
    let path = target.path;
    let Record {
        obs, free, info, ..
    } = match read_record(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", path)(e)),
        Ok(r) => r,
    };
    if free {
        return Ok(None);
    }
    let mtime = UNIX_EPOCH
        + Duration::new(
            obs.mtime.0.max(0) as u64,
            obs.mtime.1.clamp(0, 999_999_999) as u32,
        );
    let heartbeat_age_ms = SystemTime::now()
        .duration_since(mtime)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let same_host = info.as_ref().is_some_and(|i| i.host_id == this_host().id);
    let holder_alive = info
        .as_ref()
        .filter(|_| same_host)
        .map(|i| host::process_alive(i.pid, i.pid_start));
    let stale_ms = info
        .as_ref()
        .map(|i| i.stale_ms)
        .filter(|&s| s > 0)
        .unwrap_or(stale.as_millis() as u64);
    Ok(Some(LockStatus {
        path: path.to_path_buf(),
        stale: holder_alive == Some(false) || heartbeat_age_ms > stale_ms,
        info,
        heartbeat_age_ms,
        same_host,
        holder_alive,
    }))
}

/// Clears the lock at `path` whoever holds it (manual intervention). Returns
/// the record of the holder that was removed, `None` if it was not held. The
/// holder learns of it at its next renewal ([`LockError::Lost`]).
pub fn break_lock(path: &Path) -> Result<Option<LockInfo>, LockError> {
    validate(path)?;
    let target = Target::user(path);
    // Not held if there is no lock file (and none is made to find out);
    // anything but a regular file there is refused.
    let exists = match target.parent(false) {
        Ok((dir, name)) => dir.has_file(name),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    };
    if !exists.map_err(io_err("stat", path))? {
        return Ok(None);
    }
    // The same descriptor as this process's acquisitions (see `LockFile`).
    let lock_file = OPEN_FILES.get(target)?;
    let _section = Section::enter(path, &lock_file, GUARD_WAIT)?.ok_or_else(|| {
        io_err("lock", path)(io::Error::new(
            io::ErrorKind::TimedOut,
            "the lock file stayed locked by another process (is one stopped?)",
        ))
    })?;
    if !lock_file.is_at(path)? {
        // Replaced or deleted meanwhile: the next call looks at the new file.
        OPEN_FILES.forget(path, &lock_file);
        return Err(io_err("lock", path)(io::Error::new(
            io::ErrorKind::Interrupted,
            "the lock file was replaced while breaking it; try again",
        )));
    }
    let file = &lock_file.file;
    let content = read_content(file).map_err(io_err("read", path))?;
    if is_free(&content) {
        return Ok(None);
    }
    overwrite(file, b"", content.len()).map_err(io_err("clear the lock", path))?;
    Ok(Some(serde_json::from_slice(&content).unwrap_or_else(
        |_| LockInfo {
            token: String::new(),
            host_id: String::new(),
            hostname: "unknown".into(),
            pid: 0,
            pid_start: None,
            holder: None,
            acquired_at_ms: 0,
            stale_ms: 0,
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(host_id: &str, pid: u32, token: char) -> Vec<u8> {
        let mut info = new_info(&LockOptions::default());
        info.host_id = host_id.into();
        info.pid = pid;
        info.pid_start = None;
        info.token = std::iter::repeat_n(token, 32).collect();
        info.acquired_at_ms = 1;
        serde_json::to_vec(&info).unwrap()
    }

    /// A torn read outside the section can yield a dead holder's pid while
    /// the stat already shows a live holder's write: the takeover must
    /// compare the bytes it judged, not only the observation.
    #[test]
    fn takeover_replaces_only_the_bytes_that_were_judged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.lock");
        let target = Target::user(&path);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let here = this_host().id.clone();

        // The judged bytes: a dead holder's record on this host.
        let judged = record(&here, dead, 'd');
        fs::write(&path, &judged).unwrap();
        let seen = read_record(target).unwrap();
        assert!(!host::process_alive(seen.info.as_ref().unwrap().pid, None));

        // A live holder's record of the same length, at the same mtime: the
        // same observation, other bytes.
        let live = record(&here, std::process::id(), 'l');
        assert_eq!(live.len(), judged.len());
        let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&live, 0).unwrap();
        let mtime = UNIX_EPOCH + Duration::new(seen.obs.mtime.0 as u64, seen.obs.mtime.1 as u32);
        file.set_times(fs::FileTimes::new().set_modified(mtime))
            .unwrap();
        drop(file);
        assert_eq!(
            read_record(target).unwrap().obs,
            seen.obs,
            "the same observation"
        );

        let opts = LockOptions::default();
        let replace = |content: &[u8]| {
            attempt(
                target,
                &opts,
                Some(Judged {
                    seen: &seen.obs,
                    content,
                    why: "dead holder's",
                }),
            )
            .unwrap()
        };
        assert!(
            matches!(replace(&judged), Attempt::Held),
            "took over bytes it never judged"
        );
        assert_eq!(fs::read(&path).unwrap(), live, "the live record is intact");

        // Judged on what is there, the same call takes it over.
        match replace(&live) {
            Attempt::Acquired(lease) => lease.release().unwrap(),
            _ => panic!("a takeover of exactly what was judged must succeed"),
        }
    }
}
