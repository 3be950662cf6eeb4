//! The state in a local file: `state.json`, written atomically (temp file,
//! fsync, rename; mode 0600). Its version is the file's identity (device
//! and inode); the file of the version a run holds stays open, so its inode
//! cannot be reused and an equal identity really is the same version.
//!
//! The deploy lock is a lease file beside it (`state.json.lock`, the lease
//! lock of [`crate::lock`]); its epochs are counted in `state.json.epoch`,
//! bumped under the lease. A write made under the lock is fenced by it: the
//! check that the run still holds the lease, the compare of the version and
//! the rename happen inside one section of the lock file, which every
//! takeover and `infra unlock` also enters. A writer paused between its check
//! and its rename therefore holds off its successor's takeover until it
//! resumes (or dies) instead of overwriting its successor's state: the only
//! residual effect is on liveness, for the few system calls of that section.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::backend::{
    revision_name, revision_serial, Backend, Grant, LockRequest, LockView, Stored, Version,
    WriteMeta,
};
use super::StateError;
use crate::lock::{self, Lease, LockError, LockOptions};
use crate::sys::fs::Staged;
use crate::sys::private;

/// The deploy lock path beside `state_file`.
pub fn lock_path(state_file: &Path) -> PathBuf {
    suffixed(state_file, ".lock")
}

/// Where the epochs of the deploy lock beside `state_file` are counted.
pub fn epoch_path(state_file: &Path) -> PathBuf {
    suffixed(state_file, ".epoch")
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes the epoch counter (replaced atomically, 0600). Not synced: after a
/// crash the counter may be older, but the epoch of every write is in the
/// state file (synced), which bounds the next epoch from below too.
fn write_counter(path: &Path, epoch: u64) -> io::Result<()> {
    let tmp = suffixed(path, &format!(".{}.tmp", std::process::id()));
    let written = write_private(&tmp, format!("{epoch}\n").as_bytes())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The folder of the kept revisions of `state_file`.
pub fn history_dir(state_file: &Path) -> PathBuf {
    suffixed(state_file, ".history")
}

/// The content of the state file at `path`, `None` if there is none.
pub fn read_file(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::Read {
            location: path.display().to_string(),
            detail: e.to_string(),
        }),
    }
}

fn version_of(m: &std::fs::Metadata) -> Version {
    Version(format!("{}:{}", m.dev(), m.ino()))
}

/// The state file of one run, and the deploy lease it holds.
pub struct FileBackend {
    path: PathBuf,
    /// The file of the version last read or written, kept open (see the
    /// module header).
    held: Mutex<Option<File>>,
    lease: Mutex<Option<Lease>>,
}

impl FileBackend {
    pub fn new(path: &Path) -> FileBackend {
        FileBackend {
            path: path.to_path_buf(),
            held: Mutex::new(None),
            lease: Mutex::new(None),
        }
    }

    fn location_str(&self) -> String {
        self.path.display().to_string()
    }

    fn write_err(&self, e: impl std::fmt::Display) -> StateError {
        StateError::Write {
            location: self.location_str(),
            detail: e.to_string(),
        }
    }

    /// The highest epoch handed out at this state (0 when none).
    fn counted_epoch(&self) -> u64 {
        std::fs::read_to_string(epoch_path(&self.path))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The epoch recorded in the state file (0 when none or unreadable).
    fn stored_epoch(&self) -> u64 {
        #[derive(serde::Deserialize)]
        struct Head {
            #[serde(default)]
            epoch: u64,
        }
        std::fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Head>(&b).ok())
            .map_or(0, |h| h.epoch)
    }

    /// The compare of the version and the rename (inside the lease's
    /// section when there is one).
    fn commit(&self, staged: &mut Staged, expected: Option<&Version>) -> Result<File, StateError> {
        let current = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => Some(version_of(&m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.write_err(e)),
        };
        pause_for_test();
        if current.as_ref() != expected {
            return Err(StateError::Conflict {
                location: self.location_str(),
                detail: match (expected, current) {
                    (None, Some(_)) => "a state was written since this run found none".into(),
                    (Some(_), None) => "the state file was removed since this run read it".into(),
                    _ => "the state file was replaced since this run read it".into(),
                },
            });
        }
        staged.commit_keep().map_err(|e| self.write_err(e))
    }

    fn fenced_error(&self, epoch: u64) -> StateError {
        StateError::Fenced {
            location: self.location_str(),
            epoch,
            highest: self.counted_epoch().max(self.stored_epoch()),
        }
    }
}

#[async_trait]
impl Backend for FileBackend {
    fn location(&self) -> String {
        self.location_str()
    }

    async fn read(&self) -> Result<Option<Stored>, StateError> {
        let err = |e: io::Error| StateError::Read {
            location: self.location_str(),
            detail: e.to_string(),
        };
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                *self.held.lock().unwrap_or_else(|e| e.into_inner()) = None;
                return Ok(None);
            }
            Err(e) => return Err(err(e)),
        };
        let version = version_of(&f.metadata().map_err(err)?);
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map_err(err)?;
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
        Ok(Some(Stored { bytes, version }))
    }

    async fn write(
        &self,
        bytes: &[u8],
        expected: Option<&Version>,
        meta: &WriteMeta<'_>,
    ) -> Result<Version, StateError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            private::dir(dir).map_err(|e| self.write_err(e))?;
        }
        let mut staged =
            Staged::new(&self.path, bytes, private::FILE_MODE).map_err(|e| self.write_err(e))?;
        let written = {
            let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner());
            match lease.as_ref() {
                Some(l) => match l.fenced(|| self.commit(&mut staged, expected)) {
                    Ok(r) => r?,
                    Err(LockError::Lost { .. }) => return Err(self.fenced_error(meta.epoch)),
                    Err(e) => return Err(e.into()),
                },
                None => self.commit(&mut staged, expected)?,
            }
        };
        let version = version_of(&written.metadata().map_err(|e| self.write_err(e))?);
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(written);
        Ok(version)
    }

    async fn lock(&self, req: &LockRequest<'_>) -> Result<Grant, StateError> {
        let lock_path = lock_path(&self.path);
        // The lock file is one of the project's private files (0600).
        if let Err(e) = private::touch(&lock_path) {
            tracing::debug!("cannot prepare {}: {e}", lock_path.display());
        }
        let h = req.holder;
        let opts = LockOptions {
            stale: req.ttl,
            timeout: Some(req.wait),
            holder: Some(format!(
                "{} [run {}]; cwd {}, command `{}`",
                h.label, h.run_id, h.cwd, h.command
            )),
        };
        let lease = match lock::acquire(&lock_path, &opts, req.cancel).await {
            Ok(l) => l,
            Err(LockError::Aborted { .. }) => return Err(StateError::Interrupted),
            Err(LockError::Locked { holder, .. }) => {
                return Err(StateError::Locked {
                    location: format!("{} ({})", self.location_str(), lock_path.display()),
                    holder,
                })
            }
            Err(e) => return Err(e.into()),
        };
        // Only this lease's holder writes the state or the counter now (a
        // former holder's writes are fenced), so the state's epoch read
        // here cannot grow before the counter is bumped.
        let floor = self.stored_epoch();
        let epoch_file = epoch_path(&self.path);
        let bumped = lease.fenced(|| {
            let epoch = self.counted_epoch().max(floor) + 1;
            write_counter(&epoch_file, epoch).map(|()| epoch)
        });
        let epoch = match bumped {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                let _ = lease.release();
                return Err(self.write_err(format!(
                    "cannot count the deploy lock's epoch in {}: {e}",
                    epoch_file.display()
                )));
            }
            Err(e) => {
                let _ = lease.release();
                return Err(e.into());
            }
        };
        let grant = Grant {
            epoch,
            took_over: lease.took_over(),
            lost: Some(lease.lost_token()),
        };
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
        Ok(grant)
    }

    async fn renew(&self, _ttl: Duration) -> Result<bool, StateError> {
        // The lease's own heartbeat renews it.
        Ok(self
            .lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|l| !l.is_lost()))
    }

    async fn unlock(&self) -> Result<(), StateError> {
        let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner()).take();
        match lease {
            Some(l) => Ok(l.release()?),
            None => Ok(()),
        }
    }

    async fn lock_info(&self) -> Result<Option<LockView>, StateError> {
        let path = lock_path(&self.path);
        let status = lock::inspect(&path, lock::DEFAULT_STALE)?;
        Ok(status.map(|s| LockView {
            run_id: String::new(),
            description: match &s.info {
                Some(i) => format!(
                    "{}, last heartbeat {} ms ago",
                    i.describe(),
                    s.heartbeat_age_ms
                ),
                None => "an unknown holder (the lock record cannot be read)".into(),
            },
            epoch: self.counted_epoch(),
            acquired_at_ms: s.info.as_ref().map(|i| i.acquired_at_ms as i64),
            expires_at_ms: None,
            stale: s.stale,
        }))
    }

    async fn force_unlock(&self) -> Result<Option<LockView>, StateError> {
        let held = self.lock_info().await?;
        lock::break_lock(&lock_path(&self.path))?;
        Ok(held)
    }

    async fn put_revision(&self, serial: u64, bytes: &[u8]) -> Result<(), StateError> {
        let dir = history_dir(&self.path);
        private::dir(&dir).map_err(|e| self.write_err(e))?;
        // Replaced atomically; not synced (history is a record, the state
        // file the truth).
        let path = dir.join(revision_name(serial));
        let tmp = suffixed(&path, &format!(".{}.tmp", std::process::id()));
        write_private(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                self.write_err(e)
            })
    }

    async fn get_revision(&self, serial: u64) -> Result<Option<Vec<u8>>, StateError> {
        read_file(&history_dir(&self.path).join(revision_name(serial)))
    }

    async fn list_revisions(&self) -> Result<Vec<u64>, StateError> {
        let dir = history_dir(&self.path);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(StateError::Read {
                    location: dir.display().to_string(),
                    detail: e.to_string(),
                })
            }
        };
        let mut serials: Vec<u64> = entries
            .flatten()
            .filter_map(|e| revision_serial(&e.file_name().to_string_lossy()))
            .collect();
        serials.sort_unstable();
        Ok(serials)
    }

    async fn delete_revision(&self, serial: u64) -> Result<(), StateError> {
        match std::fs::remove_file(history_dir(&self.path).join(revision_name(serial))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(self.write_err(e)),
            _ => Ok(()),
        }
    }
}

/// Writes `bytes` to a new 0600 file at `path` (not synced).
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(private::FILE_MODE)
        .open(path)?
        .write_all(bytes)
}

/// For the test of a writer stopped between its check and its rename
/// (tests/state_backends.rs): when `NANOKIT_TEST_STOP_IN_COMMIT` names a
/// file that exists, the file is removed and this process stops itself
/// (SIGSTOP) there, inside the lease's section.
fn pause_for_test() {
    static AT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    if let Some(p) =
        AT.get_or_init(|| std::env::var_os("NANOKIT_TEST_STOP_IN_COMMIT").map(PathBuf::from))
    {
        if std::fs::remove_file(p).is_ok() {
            // SAFETY: raising a signal in our own process.
            unsafe { libc::raise(libc::SIGSTOP) };
        }
    }
}
