//! Lease lock files: one primitive for per-package install locks, the global
//! provisioning lock, the deploy lock beside `state.json`, and users' own
//! lock paths (JS `acquireLock`, `nanokit lock`).
//!
//! Guarantees, across processes and hosts sharing the directory: every change
//! of holder is one compare-and-swap, so two contenders never both win; a
//! holder that dies (seen at once on its own host) or stops renewing for the
//! stale period loses the lock to one waiter, and learns at its next renewal
//! that it lost it; nothing is written through a link, FIFO, device or hard
//! link planted at the lock path.
//!
//! See docs/lock-protocol.md for the protocol and why.

mod file;
mod heartbeat;
mod lease;
mod record;
#[cfg(test)]
mod tests;
mod wait;
mod waiters;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::error::{ErrorCode, IoError};
use crate::sys::beneath;
use crate::sys::host;
pub use crate::sys::host::{this_host, HostIdentity};
pub use lease::{release_all, Lease};
pub use record::LockInfo;

use file::{Section, Target, OPEN_FILES};
use record::{is_free, overwrite, read_content, read_record, Record};
use wait::{wait_for, Step, Waiter};

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

/// [`acquire`] of the lock file `root/rel` (see `target_in`).
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

/// [`acquire_unless`] of the lock file `root/rel` (see `target_in`).
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
    /// How many processes (or tasks) are waiting for it now.
    pub waiters: usize,
}

/// Describes the lock at `path`, or `None` if it is not held. `stale` is used
/// when the holder's record does not state its own stale period.
pub fn inspect(path: &Path, stale: Duration) -> Result<Option<LockStatus>, LockError> {
    validate(path)?;
    inspect_target(Target::user(path), stale)
}

/// [`inspect`] of the lock file `root/rel` (see `target_in`).
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
        waiters: waiters::count(target),
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
