//! Lease lock files: one primitive for per-package install locks, the global
//! provisioning lock, the deploy lock beside `state.json`, and named locks.
//!
//! # Protocol
//!
//! * **Acquire** creates the lock file exclusively (`O_CREAT|O_EXCL`, atomic
//!   locally and on NFS v3+), so exactly one contender wins, and writes the
//!   holder's record ([`LockInfo`]) into it.
//! * **Heartbeat**: while held, a background thread touches the lock file's
//!   mtime through the holder's own file descriptor, several times per stale
//!   period.
//! * **Stale** is judged by *observed progress*: a waiter records the lock
//!   file's identity and mtime and starts its own monotonic clock; when nothing
//!   changed for `stale` of *its* time, the lease is stale. Clocks of other
//!   hosts are never compared with ours, so clock skew cannot break it.
//!   A holder on this host whose process is gone (or whose pid now belongs to
//!   another process) is judged dead at once.
//! * **Every removal** of a lock file (release, takeover, break) and every
//!   renewal happens under a short kernel lock (`flock`) on a companion
//!   `<path>.guard` file, after re-checking that the file is still the one
//!   observed. So a takeover can only remove the very lease it judged stale,
//!   never a fresh one that replaced it: two contenders can never both win,
//!   and a holder that renews learns at once if its lease was taken.
//!   The guard is held for microseconds and released by the kernel if its
//!   owner dies. Guard files are never deleted.

mod heartbeat;
pub mod host;

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::ErrorCode;
pub use host::{this_host, HostIdentity};

/// Default stale period: a lease not renewed for this long may be taken over.
pub const DEFAULT_STALE: Duration = Duration::from_secs(30);

/// How long release and renewal wait for the guard before giving up. The
/// guard is only ever held for a few syscalls, so this is generous.
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
    /// A filesystem operation failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ErrorCode for LockError {
    fn code(&self) -> &'static str {
        match self {
            LockError::Locked { .. } => "ENKLOCKED",
            LockError::Lost { .. } => "ENKLOCKLOST",
            LockError::Aborted { .. } => "ENKABORTED",
            LockError::InvalidPath { .. } => "ENKSPEC",
            LockError::Io { .. } => "ENKIO",
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LockError + 'a {
    move |source| LockError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
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

/// Identity of one lock file (a new acquisition is a new inode).
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

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
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

/// The kernel lock that serialises removals and renewals of one lock file.
struct Guard {
    _file: File,
}

impl Guard {
    fn open(lock: &Path) -> Result<File, LockError> {
        let path = with_suffix(lock, ".guard");
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(io_err("open the lock guard", &path))
    }

    /// Takes the guard if it is free right now.
    fn try_lock(lock: &Path) -> Result<Option<Guard>, LockError> {
        let file = Self::open(lock)?;
        // SAFETY: flock on a valid, owned descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(Guard { _file: file }));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) || err.raw_os_error() == Some(libc::EINTR)
        {
            Ok(None)
        } else {
            Err(io_err("lock the guard of", lock)(err))
        }
    }

    /// Takes the guard, waiting up to `wait` for its (brief) holder.
    fn lock(lock: &Path, wait: Duration) -> Result<Guard, LockError> {
        let start = Instant::now();
        loop {
            if let Some(g) = Self::try_lock(lock)? {
                return Ok(g);
            }
            if start.elapsed() >= wait {
                return Err(io_err("lock the guard of", lock)(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the guard stayed held (is a holder process stopped?)",
                )));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

/// State of a held lease, shared with the heartbeat thread.
pub(crate) struct Held {
    path: PathBuf,
    info: LockInfo,
    file: File,
    id: FileId,
    stale: Duration,
    lost: CancellationToken,
    released: AtomicBool,
}

impl Held {
    /// Renews the lease; returns false (and marks it lost) if it is no longer ours.
    fn renew(&self) -> bool {
        if self.released.load(Ordering::Acquire) {
            return true;
        }
        let result = (|| -> Result<bool, LockError> {
            let _guard = Guard::lock(&self.path, GUARD_WAIT)?;
            match fs::metadata(&self.path) {
                Ok(m) if FileId::of(&m) == self.id => {
                    // SAFETY: futimens with NULL sets both times to now on our own fd.
                    unsafe { libc::futimens(self.file.as_raw_fd(), std::ptr::null()) };
                    Ok(true)
                }
                _ => Ok(false),
            }
        })();
        match result {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(path = %self.path.display(), "lease lost: the lock file was taken over or removed");
                self.lost.cancel();
                false
            }
            Err(e) => {
                // Could not check this time (e.g. a transient NFS error): keep
                // trying; a waiter will judge us stale if this persists.
                tracing::warn!(path = %self.path.display(), error = %e, "lease renewal failed");
                true
            }
        }
    }

    fn release(&self) -> Result<(), LockError> {
        if self.released.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        heartbeat::unregister(self);
        let guard = Guard::lock(&self.path, GUARD_WAIT)?;
        let ours = matches!(fs::metadata(&self.path), Ok(m) if FileId::of(&m) == self.id);
        if ours {
            fs::remove_file(&self.path).map_err(io_err("remove the lock", &self.path))?;
        }
        drop(guard);
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
    fn new(path: &Path, info: LockInfo, file: File, stale: Duration) -> Result<Lease, LockError> {
        let id = FileId::of(&file.metadata().map_err(io_err("stat the lock", path))?);
        let held = Arc::new(Held {
            path: path.to_path_buf(),
            info,
            file,
            id,
            stale,
            lost: CancellationToken::new(),
            released: AtomicBool::new(false),
        });
        heartbeat::register(held.clone());
        Ok(Lease { held, owned: true })
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

    /// Whether the lease has been found taken over or broken.
    pub fn is_lost(&self) -> bool {
        self.held.lost.is_cancelled()
    }

    /// A token cancelled when the lease is found lost, for `select!`.
    pub fn lost_token(&self) -> CancellationToken {
        self.held.lost.clone()
    }

    /// Releases the lock. Fails with [`LockError::Lost`] if the lease had been
    /// lost in the meantime (the lock file is then left to its new owner).
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
        token: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
        host_id: host.id.clone(),
        hostname: host.hostname.clone(),
        pid: host.pid,
        pid_start: host.pid_start,
        holder: opts.holder.clone(),
        acquired_at_ms: now_ms(),
        stale_ms: opts.stale.as_millis() as u64,
    }
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// One attempt to create the lock file. `Ok(None)` if it already exists.
///
/// The file is created with `O_CREAT|O_EXCL` (atomic on local filesystems and
/// on NFS v3 and later) and the record written with one `write`. A reader can
/// see the file before the record is in it; it then treats the holder as
/// unknown (never as dead) and reads again at its next poll.
fn attempt_create(path: &Path, opts: &LockOptions) -> Result<Option<Lease>, LockError> {
    let mut file = match create_new(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir).map_err(io_err("create the lock directory", dir))?;
            }
            match create_new(path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
                Err(e) => return Err(io_err("create", path)(e)),
            }
        }
        Err(e) => return Err(io_err("create", path)(e)),
    };
    let info = new_info(opts);
    let record = serde_json::to_vec(&info).expect("a lock record serialises");
    if let Err(e) = file.write_all(&record) {
        // Give the half-made lock back; nobody else can have removed it yet
        // except through the guard, so check it is still ours.
        let ours = file.metadata().ok().map(|m| FileId::of(&m));
        if let Ok(_guard) = Guard::lock(path, GUARD_WAIT) {
            if fs::metadata(path).ok().map(|m| FileId::of(&m)) == ours {
                let _ = fs::remove_file(path);
            }
        }
        return Err(io_err("write", path)(e));
    }
    Lease::new(path, info, file, opts.stale).map(Some)
}

fn read_info(path: &Path) -> Option<LockInfo> {
    let mut buf = Vec::with_capacity(512);
    File::open(path)
        .ok()?
        .take(64 * 1024)
        .read_to_end(&mut buf)
        .ok()?;
    serde_json::from_slice(&buf).ok()
}

enum Takeover {
    /// The stale file was removed (by us) or was already gone.
    Cleared,
    /// The file changed since we judged it: it is alive after all.
    Changed,
    /// Someone else is in the middle of a removal or renewal.
    Busy,
}

/// Removes the lock file if and only if it is still exactly what we observed.
fn take_over(
    path: &Path,
    seen: &Observation,
    why: &str,
    info: Option<&LockInfo>,
) -> Result<Takeover, LockError> {
    let Some(_guard) = Guard::try_lock(path)? else {
        return Ok(Takeover::Busy);
    };
    match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Takeover::Cleared),
        Err(e) => Err(io_err("stat", path)(e)),
        Ok(m) if Observation::of(&m) == *seen => match fs::remove_file(path) {
            Ok(()) => {
                tracing::warn!(
                    path = %path.display(),
                    holder = %info.map(LockInfo::describe).unwrap_or_else(|| "unknown".into()),
                    "taking over a {why} lock"
                );
                Ok(Takeover::Cleared)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Takeover::Cleared),
            Err(e) => Err(io_err("remove the stale lock", path)(e)),
        },
        Ok(_) => Ok(Takeover::Changed),
    }
}

/// What a waiter should do next.
enum Step {
    Acquired(Lease),
    Wait(Duration),
}

/// The state of one contender: what it saw of the lock and since when.
struct Waiter<'a> {
    path: &'a Path,
    opts: &'a LockOptions,
    seen: Option<Observation>,
    since: Instant,
    info: Option<LockInfo>,
    polls: u32,
}

impl<'a> Waiter<'a> {
    fn new(path: &'a Path, opts: &'a LockOptions) -> Self {
        Waiter {
            path,
            opts,
            seen: None,
            since: Instant::now(),
            info: None,
            polls: 0,
        }
    }

    /// One round: acquire if free, take over if stale or dead, else say how
    /// long to wait before the next round.
    fn step(&mut self) -> Result<Step, LockError> {
        // The first round tries to create before looking: uncontended, that
        // is the whole acquisition.
        if self.polls == 0 {
            if let Some(lease) = attempt_create(self.path, self.opts)? {
                return Ok(Step::Acquired(lease));
            }
        }
        // A vanished or taken-over lock lets us retry at once, a few times.
        for _ in 0..4 {
            let m = match fs::metadata(self.path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if let Some(lease) = attempt_create(self.path, self.opts)? {
                        return Ok(Step::Acquired(lease));
                    }
                    continue;
                }
                Err(e) => return Err(io_err("stat", self.path)(e)),
                Ok(m) => m,
            };
            let obs = Observation::of(&m);
            if self.seen != Some(obs) {
                if self.seen.map(|s| s.id) != Some(obs.id) || self.info.is_none() {
                    self.info = read_info(self.path);
                }
                self.seen = Some(obs);
                self.since = Instant::now();
            } else if self.info.is_none() {
                self.info = read_info(self.path);
            }
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
            match take_over(self.path, &obs, why, self.info.as_ref())? {
                Takeover::Cleared => {
                    self.seen = None;
                    self.info = None;
                }
                Takeover::Changed | Takeover::Busy => break,
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
    match Waiter::new(path, opts).step()? {
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
    mut done: impl FnMut() -> bool,
) -> Result<Option<Lease>, LockError> {
    validate(path)?;
    let start = Instant::now();
    let deadline = opts.timeout.map(|t| start + t);
    let mut waiter = Waiter::new(path, opts);
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
    let m = match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("stat", path)(e)),
        Ok(m) => m,
    };
    let info = read_info(path);
    let heartbeat_age_ms = m
        .modified()
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
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

/// Removes the lock at `path` whoever holds it (manual intervention). Returns
/// the record of the holder that was removed, `None` if it was not held. The
/// holder learns of it at its next renewal ([`LockError::Lost`]).
pub fn break_lock(path: &Path) -> Result<Option<LockInfo>, LockError> {
    validate(path)?;
    let _guard = Guard::lock(path, GUARD_WAIT)?;
    let info = read_info(path);
    match fs::remove_file(path) {
        Ok(()) => Ok(Some(info.unwrap_or_else(|| LockInfo {
            token: String::new(),
            host_id: String::new(),
            hostname: "unknown".into(),
            pid: 0,
            pid_start: None,
            holder: None,
            acquired_at_ms: 0,
            stale_ms: 0,
        }))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("remove the lock", path)(e)),
    }
}

/// Whether `name` is a lock's bookkeeping file (guard or temporary record)
/// rather than a lock, for listings.
pub fn is_bookkeeping_file(name: &str) -> bool {
    name.ends_with(".guard") || name.ends_with(".tmp")
}
