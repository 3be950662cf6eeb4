//! `state.json`: the source of truth of what nanokit created.
//!
//! Written atomically (temp file + fsync + rename, mode 0600) after every
//! resource step, with a serial that grows on every write and a lineage id
//! fixed at creation. The deploy lock lives beside it (`state.json.lock`,
//! [`lock`]).
//!
//! The same state can instead live in PostgreSQL ([`Location::Postgres`],
//! see [`remote`]): every write is then a compare-and-swap
//! on the serial and lineage the run holds, so two machines or working
//! directories can never overwrite each other's state.

pub mod lock;
pub mod remote;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::ErrorCode;
use crate::kv::KvError;
use remote::InfraStateStore;

pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state {path} is not valid ({source}); restore it from backup or move it away to start over")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("state {path} was written by a newer nanokit (version {version}); upgrade nanokit")]
    Version { path: PathBuf, version: u32 },
    #[error("cannot write state {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Waiting for the deploy lock was interrupted (Ctrl-C).
    #[error("interrupted while waiting for the deploy lock")]
    Interrupted,
    /// The deploy lock file could not be taken or released.
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("state {path} belongs to project `{found}`, not `{expected}`; use another `infra.state` path")]
    Project {
        path: PathBuf,
        found: String,
        expected: String,
    },
    /// The remote state database refused or failed (ENKSTATESTALE,
    /// ENKSTATELINEAGE, ENKSTATEUNAVAILABLE, …: the inner code).
    #[error("remote state {location}: {source}")]
    Remote { location: String, source: KvError },
    /// The stored remote document does not match its own row.
    #[error("remote state {location} is inconsistent: {detail}; nanokit will not overwrite it")]
    RemoteCorrupt { location: String, detail: String },
    /// The remote deploy lock is held by another run.
    #[error("the deploy lock of {workspace:?} in {location} is held by {holder} (expires at {}); wait for it with `--lock-timeout SECS`, or, if that run is gone, clear it with `nanokit infra unlock`", crate::kv::error::fmt_ms(*.expires_at_ms))]
    Locked {
        location: String,
        workspace: String,
        holder: String,
        expires_at_ms: i64,
    },
}

impl ErrorCode for StateError {
    fn code(&self) -> &'static str {
        match self {
            StateError::Remote { source, .. } => source.code(),
            StateError::RemoteCorrupt { .. } => "ENKSTATECORRUPT",
            StateError::Locked { .. } => "ENKLOCKED",
            StateError::Lock(e) => e.code(),
            StateError::Interrupted => "ENKCANCELLED",
            _ => "ENKSTATE",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Recorded before the provider is asked to create it.
    Creating,
    /// The instance runs; hooks, provisioning or health pending.
    Starting,
    Provisioning,
    Healthy,
    Failed,
    Stopping,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Starting => "starting",
            Status::Provisioning => "provisioning",
            Status::Healthy => "healthy",
            Status::Failed => "failed",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
        }
    }
}

/// One service instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Resource {
    pub provider: String,
    /// The provider's id (process: `<pid>@<start time>`) of the first
    /// instance (kept for readers of older states; see [`Resource::ids`]).
    pub provider_id: Option<String>,
    /// Every instance's provider id, when the service runs several replicas
    /// (or is mid rolling update). Empty in states written before replicas:
    /// `provider_id` is then the only instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<String>,
    pub config_hash: String,
    /// Per-field hashes, so a plan can say which fields changed.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    pub status: Status,
    #[serde(default)]
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl Resource {
    /// The provider ids of all recorded instances.
    pub fn ids(&self) -> Vec<String> {
        if self.instances.is_empty() {
            self.provider_id.iter().cloned().collect()
        } else {
            self.instances.clone()
        }
    }

    /// Records `ids` as the service's instances.
    pub fn set_ids(&mut self, ids: Vec<String>) {
        self.provider_id = ids.first().cloned();
        self.instances = if ids.len() > 1 { ids } else { Vec::new() };
    }
}

/// A named volume nanokit created.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeRecord {
    pub provider_id: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub version: u32,
    pub serial: u64,
    pub lineage: String,
    pub project: String,
    pub env: String,
    #[serde(default)]
    pub resources: BTreeMap<String, Resource>,
    #[serde(default)]
    pub volumes: BTreeMap<String, VolumeRecord>,
}

impl State {
    pub fn new(project: &str, env: &str) -> State {
        State {
            version: STATE_VERSION,
            serial: 0,
            lineage: uuid::Uuid::new_v4().to_string(),
            project: project.to_string(),
            env: env.to_string(),
            resources: BTreeMap::new(),
            volumes: BTreeMap::new(),
        }
    }
}

/// Where the lineage of a state that does not exist yet is reserved:
/// `<state file>.lineage` (for a remote state, beside the local default
/// state file).
pub fn lineage_file(state_file: &Path) -> PathBuf {
    let mut s = state_file.as_os_str().to_owned();
    s.push(".lineage");
    PathBuf::from(s)
}

/// The lineage the first state written at `state_file` will have. A `plan`
/// made before any state exists salts its hashes with it, so that the
/// first `up` (which takes the same lineage) agrees with that plan; the
/// reservation is removed once that state is written. Created once (0600),
/// atomically: concurrent callers all get the same lineage.
pub fn reserved_lineage(state_file: &Path) -> std::io::Result<String> {
    let path = lineage_file(state_file);
    let valid = |s: &str| uuid::Uuid::parse_str(s.trim()).is_ok();
    match std::fs::read_to_string(&path) {
        Ok(s) if valid(&s) => return Ok(s.trim().to_string()),
        Ok(_) => {
            // Unreadable: replace it.
            let _ = std::fs::remove_file(&path);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let fresh = uuid::Uuid::new_v4().to_string();
    let tmp = {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
        PathBuf::from(s)
    };
    crate::sys::private::write(&tmp, format!("{fresh}\n").as_bytes())?;
    // A hard link creates the name only if it is free, with the whole content.
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(fresh),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let s = std::fs::read_to_string(&path)?;
            if valid(&s) {
                Ok(s.trim().to_string())
            } else {
                Err(std::io::Error::other(format!(
                    "{} does not hold a lineage id",
                    path.display()
                )))
            }
        }
        Err(e) => Err(e),
    }
}

/// RFC 3339 wall-clock time, for display only.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Reads the state at `path`, or a fresh one when there is none.
pub fn read(path: &Path, project: &str, env: &str) -> Result<State, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::new(project, env)),
        Err(source) => {
            return Err(StateError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let state: State = serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    if state.version > STATE_VERSION {
        return Err(StateError::Version {
            path: path.to_path_buf(),
            version: state.version,
        });
    }
    if state.project != project {
        return Err(StateError::Project {
            path: path.to_path_buf(),
            found: state.project,
            expected: project.to_string(),
        });
    }
    Ok(state)
}

/// Where a project's state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local `state.json`.
    File(PathBuf),
    /// A PostgreSQL database (the URL may hold a password: never print it,
    /// use [`Location::display`]).
    Postgres { url: String, workspace: String },
}

impl Location {
    /// Where `config`'s state lives: `infra.state` when it is a
    /// `postgres://` URL, else `NANOKIT_STATE_URL` when `infra.state` is not
    /// set, else the file.
    pub fn of(config: &Config) -> Location {
        match &config.state_url {
            Some(url) => Location::Postgres {
                url: url.clone(),
                workspace: workspace(&config.name, &config.env),
            },
            None => Location::File(config.state_file.clone()),
        }
    }

    /// For messages: the file, or the URL without its password and the
    /// workspace.
    pub fn display(&self) -> String {
        match self {
            Location::File(p) => p.display().to_string(),
            Location::Postgres { url, workspace } => {
                format!("{} (workspace {workspace})", crate::kv::pg::redact_url(url))
            }
        }
    }
}

/// The remote workspace key of a project and environment.
pub fn workspace(project: &str, env: &str) -> String {
    format!("{project}/{env}")
}

/// Connects to a remote state.
pub async fn connect(url: &str) -> Result<Arc<InfraStateStore>, StateError> {
    InfraStateStore::connect(url)
        .await
        .map(Arc::new)
        .map_err(|source| StateError::Remote {
            location: crate::kv::pg::redact_url(url),
            source,
        })
}

/// Reads `config`'s state wherever it lives (a fresh one when there is none).
pub async fn load(config: &Config) -> Result<State, StateError> {
    match Location::of(config) {
        Location::File(p) => read(&p, &config.name, &config.env),
        Location::Postgres { url, workspace } => {
            let db = connect(&url).await?;
            Ok(
                read_remote(&db, &url, &workspace, &config.name, &config.env)
                    .await?
                    .0,
            )
        }
    }
}

/// Reads the remote state of `workspace`: the state and the serial stored in
/// its row (`None` before the first write).
async fn read_remote(
    db: &InfraStateStore,
    url: &str,
    workspace: &str,
    project: &str,
    env: &str,
) -> Result<(State, Option<i64>), StateError> {
    let location = crate::kv::pg::redact_url(url);
    let doc = db
        .read(workspace)
        .await
        .map_err(|source| StateError::Remote {
            location: location.clone(),
            source,
        })?;
    let Some(doc) = doc else {
        return Ok((State::new(project, env), None));
    };
    let state: State =
        serde_json::from_str(&doc.document).map_err(|e| StateError::RemoteCorrupt {
            location: location.clone(),
            detail: format!("the document of workspace {workspace:?} is not a nanokit state ({e})"),
        })?;
    if state.version > STATE_VERSION {
        return Err(StateError::Version {
            path: PathBuf::from(&location),
            version: state.version,
        });
    }
    if state.serial as i64 != doc.serial || state.lineage != doc.lineage {
        return Err(StateError::RemoteCorrupt {
            location,
            detail: format!(
                "workspace {workspace:?} has serial {} / lineage {} in its row but {} / {} in its document",
                doc.serial, doc.lineage, state.serial, state.lineage
            ),
        });
    }
    if state.project != project {
        return Err(StateError::Project {
            path: PathBuf::from(format!("{location} (workspace {workspace})")),
            found: state.project,
            expected: project.to_string(),
        });
    }
    Ok((state, Some(doc.serial)))
}

#[derive(Debug)]
enum Backend {
    File(PathBuf),
    Remote {
        db: Arc<InfraStateStore>,
        location: String,
        workspace: String,
        /// Recorded as the writer of every document.
        writer: String,
        /// The serial in the database row, as far as this run knows.
        stored: Option<i64>,
    },
}

impl std::fmt::Debug for InfraStateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InfraStateStore")
    }
}

/// The state of one run, saved after every change.
#[derive(Debug)]
pub struct Store {
    backend: Backend,
    state: State,
    /// The lineage reservation this (not yet written) state took, removed
    /// once the state is written.
    reservation: Option<PathBuf>,
}

impl Store {
    /// The local file at `path`.
    pub fn open(path: &Path, project: &str, env: &str) -> Result<Store, StateError> {
        Ok(Store {
            backend: Backend::File(path.to_path_buf()),
            state: read(path, project, env)?,
            reservation: None,
        })
    }

    /// The remote state of `workspace` in `db` (connected to `url`); every
    /// write is recorded as made by `writer`.
    pub async fn open_remote(
        db: Arc<InfraStateStore>,
        url: &str,
        workspace: &str,
        project: &str,
        env: &str,
        writer: &str,
    ) -> Result<Store, StateError> {
        let (state, stored) = read_remote(&db, url, workspace, project, env).await?;
        Ok(Store {
            backend: Backend::Remote {
                db,
                location: crate::kv::pg::redact_url(url),
                workspace: workspace.to_string(),
                writer: writer.to_string(),
                stored,
            },
            state,
            reservation: None,
        })
    }

    /// A state that was never written takes the lineage reserved for it
    /// beside `state_file` (see [`reserved_lineage`]); a written one keeps
    /// its own. The reservation is removed once the state is written.
    pub fn take_reserved_lineage(&mut self, state_file: &Path) {
        if self.state.serial != 0 {
            return;
        }
        match reserved_lineage(state_file) {
            Ok(l) => {
                self.state.lineage = l;
                self.reservation = Some(lineage_file(state_file));
            }
            Err(e) => tracing::warn!(
                "cannot reserve the state lineage beside {}: {e}",
                state_file.display()
            ),
        }
    }

    /// Where the state lives, for messages.
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::File(p) => p.display().to_string(),
            Backend::Remote {
                location,
                workspace,
                ..
            } => format!("{location} (workspace {workspace})"),
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Applies `f` and writes the state (serial + 1): atomically to the
    /// file, or as a compare-and-swap on the serial and lineage this run
    /// holds. A failed write leaves the stored state as it was, and (for the
    /// remote state) every later write of this run fails too.
    pub async fn update<R>(&mut self, f: impl FnOnce(&mut State) -> R) -> Result<R, StateError> {
        let r = f(&mut self.state);
        self.state.serial += 1;
        self.save().await?;
        if let Some(p) = self.reservation.take() {
            let _ = std::fs::remove_file(p);
        }
        Ok(r)
    }

    async fn save(&mut self) -> Result<(), StateError> {
        let mut bytes = serde_json::to_vec_pretty(&self.state).expect("state serializes");
        bytes.push(b'\n');
        match &mut self.backend {
            Backend::File(path) => {
                let err = |source| StateError::Write {
                    path: path.clone(),
                    source,
                };
                crate::sys::private::write(path, &bytes).map_err(err)
            }
            Backend::Remote {
                db,
                location,
                workspace,
                writer,
                stored,
            } => {
                let text = String::from_utf8(bytes).expect("JSON is UTF-8");
                let serial = self.state.serial as i64;
                db.compare_and_swap(
                    workspace,
                    *stored,
                    &self.state.lineage,
                    serial,
                    &text,
                    writer,
                )
                .await
                .map_err(|source| StateError::Remote {
                    location: location.clone(),
                    source,
                })?;
                *stored = Some(serial);
                Ok(())
            }
        }
    }
}

/// The deploy lock path beside `state_file`.
pub fn lock_path(state_file: &Path) -> PathBuf {
    let mut s = state_file.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}
