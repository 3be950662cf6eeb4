//! A held lease: renewal (from the heartbeat thread) and release, each a
//! check that the file still holds exactly our record, and what a holder
//! learns when it does not.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::file::{LockFile, Section};
use super::record::{is_free, overwrite, read_content, LockInfo};
use super::{heartbeat, io_err, LockError, GUARD_WAIT};

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
    pub(super) stale: Duration,
    lost: CancellationToken,
    released: AtomicBool,
    /// Acquired by taking over a dead or stale holder's lease.
    took_over: bool,
}

impl Held {
    /// Renews the lease; returns false (and marks it lost) if it is no longer ours.
    pub(super) fn renew(&self) -> bool {
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
    pub(super) fn new(
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

    /// Runs `f` only while this lease is held, atomically with every change
    /// of holder: inside the lock file's brief section (which every
    /// acquisition, takeover, release and break also enters), after checking
    /// that the file still holds this lease's record. When it does not, `f`
    /// is not run and the lease is marked lost ([`LockError::Lost`]).
    ///
    /// A process stopped inside `f` holds off every takeover until it
    /// resumes (or dies: the kernel drops its lock), so `f` must be a few
    /// system calls, not a wait.
    pub fn fenced<T>(&self, f: impl FnOnce() -> T) -> Result<T, LockError> {
        let held = &self.held;
        let lost = || LockError::Lost {
            path: held.path.clone(),
        };
        if held.released.load(Ordering::Acquire) {
            return Err(lost());
        }
        let _section = Section::enter(&held.path, &held.file, GUARD_WAIT)?.ok_or_else(|| {
            io_err("lock", &held.path)(io::Error::new(
                io::ErrorKind::TimedOut,
                "the lock file stayed locked by another process (is one stopped?)",
            ))
        })?;
        if held.is_ours(Identity::Path)?.is_none() {
            held.lost.cancel();
            return Err(lost());
        }
        Ok(f())
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
        held.release();
    }
}

impl heartbeat::Renewed for Held {
    fn renew(&self) -> bool {
        Held::renew(self)
    }

    fn stale(&self) -> Duration {
        self.stale
    }

    fn release(&self) {
        let _ = Held::release(self);
    }
}
