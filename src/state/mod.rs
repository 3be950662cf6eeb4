//! `state.json`: the source of truth of what nanokit created.
//!
//! One document per project and environment, with a serial that grows on
//! every write, a lineage id fixed at creation and the epoch of the deploy
//! lock that wrote it last. Where it is kept is a [`Backend`]: a local file
//! ([`file`]) or PostgreSQL ([`postgres`]). Every write is a compare-and-swap
//! on the version the run read, fenced by the run's deploy-lock epoch
//! ([`lock`]): a stale writer gets `ENKSTATESTALE` instead of overwriting.

pub mod backend;
pub mod crypt;
pub mod file;
pub mod gcs;
mod http;
pub mod lock;
pub mod manage;
pub mod object;
pub mod postgres;
pub mod s3;
mod url;
pub mod vault;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use backend::{Backend, Grant, Holder, LockView, Version, WriteMeta};
pub use file::lock_path;

use crate::config::Config;
use crate::error::ErrorCode;
use crate::pg::PgError;

pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state {location}: {detail}")]
    Read { location: String, detail: String },
    #[error("state {location} is not valid ({detail}); restore it from backup or move it away to start over")]
    Corrupt { location: String, detail: String },
    #[error(
        "state {location} was written by a newer nanokit (version {version}); upgrade nanokit"
    )]
    Version { location: String, version: u32 },
    #[error("cannot write state {location}: {detail}")]
    Write { location: String, detail: String },
    /// Waiting for the deploy lock was interrupted (Ctrl-C).
    #[error("interrupted while waiting for the deploy lock")]
    Interrupted,
    /// The deploy lock file could not be taken or released.
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("state {location} belongs to project `{found}`, not `{expected}`; use another `infra.state`")]
    Project {
        location: String,
        found: String,
        expected: String,
    },
    /// A compare-and-swap found another version: someone wrote the state
    /// since this run read it (`ENKSTATESTALE`).
    #[error("state {location} changed underneath: {detail}; nothing was written: re-read the state and plan again")]
    Conflict { location: String, detail: String },
    /// The write carries a deploy-lock epoch lower than the highest the
    /// state has seen: another run took the deploy lock over
    /// (`ENKSTATESTALE`). Whoever gets it must stop acting.
    #[error("state {location} refused a write of deploy-lock epoch {epoch}: it has seen epoch {highest}, so another run took the deploy lock over; nothing was written and this run must stop (its lock is lost)")]
    Fenced {
        location: String,
        epoch: u64,
        highest: u64,
    },
    /// The stored state has another lineage (a different history).
    #[error("state {location} has lineage {actual:?}, not {expected:?}: it is a different state history; nothing was written")]
    Lineage {
        location: String,
        expected: String,
        actual: String,
    },
    /// The deploy lock is held by another run.
    #[error("the deploy lock of {location} is held by {holder}; wait for it with `--lock-timeout SECS`, or, if that run is gone, clear it with `nanokit infra unlock`")]
    Locked { location: String, holder: String },
    /// The deploy lock this run held was cleared or taken over before it
    /// released it.
    #[error("the deploy lock of {location} was lost before this run released it: cleared with `nanokit infra unlock`, or expired and taken over")]
    LockLost { location: String },
    /// The PostgreSQL server refused or failed (its own code: ENKTLS…,
    /// ENKSTATEUNAVAILABLE, ENKSTATEURL, …).
    #[error("remote state {0}")]
    Pg(#[from] PgError),
    /// The store cannot be reached.
    #[error("state {location} is unavailable: {detail}")]
    Unavailable { location: String, detail: String },
    /// The stored remote document does not match its own record.
    #[error("remote state {location} is inconsistent: {detail}; nanokit will not overwrite it")]
    RemoteCorrupt { location: String, detail: String },
    /// The store refused our credentials, or there are none.
    #[error("state store {location} refused access: {detail}")]
    Auth { location: String, detail: String },
    /// `infra state push` / `migrate` refused to replace a state.
    #[error("{location}: {detail}; nothing was written")]
    Refused { location: String, detail: String },
    /// The state's encryption key is missing or wrong (`ENKSTATEKEY`).
    #[error("state encryption: {detail}; nothing was written")]
    Key { detail: String },
    /// The state was moved to another backend (`infra state migrate`).
    #[error("the state of {location} was migrated to {to}: set `infra.state` to {to} (nothing was done here)")]
    Migrated { location: String, to: String },
    /// An `infra.state` URL nanokit cannot use.
    #[error("invalid state URL {url}: {detail}")]
    Url { url: String, detail: String },
    /// The store cannot keep a state safely (it ignores preconditions, or
    /// refuses what the protocol needs).
    #[error("state store {location} cannot be used: {detail}")]
    Backend { location: String, detail: String },
}

impl ErrorCode for StateError {
    fn code(&self) -> &'static str {
        match self {
            StateError::Pg(e) => e.code(),
            StateError::RemoteCorrupt { .. } => "ENKSTATECORRUPT",
            StateError::Locked { .. } => "ENKLOCKED",
            StateError::Lock(e) => e.code(),
            StateError::Interrupted => "ENKCANCELLED",
            StateError::Conflict { .. } | StateError::Fenced { .. } => "ENKSTATESTALE",
            StateError::Lineage { .. } => "ENKSTATELINEAGE",
            StateError::LockLost { .. } => "ENKLOCKLOST",
            StateError::Unavailable { .. } => "ENKSTATEUNAVAILABLE",
            StateError::Url { .. } => "ENKSTATEURL",
            StateError::Backend { .. } => "ENKSTATEBACKEND",
            StateError::Auth { .. } => "ENKSTATEAUTH",
            StateError::Key { .. } => "ENKSTATEKEY",
            StateError::Refused { .. } => "ENKSTATEREFUSED",
            StateError::Migrated { .. } => "ENKSTATEMIGRATED",
            _ => "ENKSTATE",
        }
    }
}

impl StateError {
    /// Whether this run lost the state to another writer (`ENKSTATESTALE`):
    /// it must stop acting.
    pub fn is_stale(&self) -> bool {
        matches!(
            self,
            StateError::Conflict { .. } | StateError::Fenced { .. }
        )
    }

    /// A copy of an `ENKSTATESTALE` error (to keep it while the step that
    /// got it fails with it).
    pub fn stale_copy(&self) -> Option<StateError> {
        match self {
            StateError::Conflict { location, detail } => Some(StateError::Conflict {
                location: location.clone(),
                detail: detail.clone(),
            }),
            StateError::Fenced {
                location,
                epoch,
                highest,
            } => Some(StateError::Fenced {
                location: location.clone(),
                epoch: *epoch,
                highest: *highest,
            }),
            _ => None,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
    /// The deploy-lock epoch of the last write (the highest this state has
    /// seen): a write made under a lower one is refused (`ENKSTATESTALE`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    pub project: String,
    pub env: String,
    #[serde(default)]
    pub resources: BTreeMap<String, Resource>,
    #[serde(default)]
    pub volumes: BTreeMap<String, VolumeRecord>,
    /// Who wrote this version, for `infra state history`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written: Option<Written>,
    /// The state moved to this store (`infra state migrate`): this copy is
    /// no longer the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated_to: Option<String>,
    /// A migration to this store began and has not finished: this copy is
    /// still the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrating_to: Option<String>,
    /// This copy came from that store (`infra state migrate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated_from: Option<String>,
}

/// Who wrote a version of the state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Written {
    /// RFC 3339.
    pub at: String,
    pub run: String,
    pub host: String,
    pub pid: u32,
    #[serde(default)]
    pub user: String,
    /// What the run does (`nanokit up (p / env)`).
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub command: String,
}

impl State {
    pub fn new(project: &str, env: &str) -> State {
        State {
            version: STATE_VERSION,
            serial: 0,
            lineage: uuid::Uuid::new_v4().to_string(),
            epoch: 0,
            project: project.to_string(),
            env: env.to_string(),
            resources: BTreeMap::new(),
            volumes: BTreeMap::new(),
            written: None,
            migrated_to: None,
            migrating_to: None,
            migrated_from: None,
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

/// The state in `bytes`, stored at `location`, checked to be one nanokit
/// can read and to belong to `project`.
pub fn decode(bytes: &[u8], location: &str, project: &str) -> Result<State, StateError> {
    let state: State = serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
        location: location.to_string(),
        detail: e.to_string(),
    })?;
    if state.version > STATE_VERSION {
        return Err(StateError::Version {
            location: location.to_string(),
            version: state.version,
        });
    }
    if state.project != project {
        return Err(StateError::Project {
            location: location.to_string(),
            found: state.project,
            expected: project.to_string(),
        });
    }
    Ok(state)
}

/// The bytes a state is stored as.
pub fn encode(state: &State) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(state).expect("state serializes");
    bytes.push(b'\n');
    bytes
}

/// Reads the state file at `path`, or a fresh state when there is none.
pub fn read(path: &Path, project: &str, env: &str) -> Result<State, StateError> {
    match file::read_file(path)? {
        Some(bytes) => decode(&bytes, &path.display().to_string(), project),
        None => Ok(State::new(project, env)),
    }
}

/// Where a project's state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local `state.json`.
    File(PathBuf),
    /// A PostgreSQL database (the URL may hold a password: never print it,
    /// use [`Location::display`]), keyed by `<project>/<env>`.
    Postgres { url: String, workspace: String },
    /// Another store named by its URL (`s3://`, `gs://`, `vault://`).
    Url(String),
}

impl Location {
    /// Where `config`'s state lives: `infra.state` when it is a URL, else
    /// `NANOKIT_STATE_URL` when `infra.state` is not set, else the file.
    pub fn of(config: &Config) -> Location {
        match &config.state_url {
            Some(url) if crate::config::is_postgres_url(url) => Location::Postgres {
                url: url.clone(),
                workspace: workspace(&config.name, &config.env),
            },
            Some(url) => Location::Url(url.clone()),
            None => Location::File(config.state_file.clone()),
        }
    }

    /// For messages: the file, or the URL without its password (and the
    /// workspace).
    pub fn display(&self) -> String {
        match self {
            Location::File(p) => p.display().to_string(),
            Location::Postgres { url, workspace } => {
                format!("{} (workspace {workspace})", crate::pg::redact_url(url))
            }
            Location::Url(url) => crate::pg::redact_url(url),
        }
    }
}

/// The remote workspace key of a project and environment.
pub fn workspace(project: &str, env: &str) -> String {
    format!("{project}/{env}")
}

/// Opens the backend of `location` (connecting to it when it is remote).
/// Boxed: one instance of the opening in the binary, however many futures
/// await it.
pub fn open(
    location: &Location,
) -> futures::future::BoxFuture<'_, Result<Arc<dyn Backend>, StateError>> {
    Box::pin(open_inner(location))
}

async fn open_inner(location: &Location) -> Result<Arc<dyn Backend>, StateError> {
    match location {
        Location::File(p) => Ok(Arc::new(file::FileBackend::new(p))),
        Location::Postgres { url, workspace } => Ok(Arc::new(
            postgres::PostgresBackend::connect(url, workspace).await?,
        )),
        Location::Url(url) => {
            let store: Box<dyn object::ObjectStore> = match crate::config::url_scheme(url) {
                Some("s3") => Box::new(s3::S3::open(url)?),
                Some("gs") => Box::new(gcs::Gcs::open(url)?),
                Some("vault") => Box::new(vault::Vault::open(url)?),
                _ => {
                    return Err(StateError::Url {
                        url: crate::pg::redact_url(url),
                        detail: "not a kind of state store nanokit knows (postgres://, s3://, gs://, vault://)".into(),
                    })
                }
            };
            Ok(Arc::new(object::ObjectBackend::new(store)))
        }
    }
}

/// How a store keeps `config`'s state: sealed (`infra.state_encryption`),
/// with `infra.state_history` revisions.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub codec: crypt::Codec,
    pub history: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            codec: crypt::Codec::plain(),
            history: crate::config::DEFAULT_STATE_HISTORY,
        }
    }
}

impl StoreOptions {
    pub fn of(config: &Config) -> StoreOptions {
        StoreOptions {
            codec: crypt::Codec::of(config.state_encryption.as_ref()),
            history: config.state_history,
        }
    }
}

/// Reads `config`'s state wherever it lives (a fresh one when there is none).
pub async fn load(config: &Config) -> Result<State, StateError> {
    let backend = open(&Location::of(config)).await?;
    Ok(
        Store::open_with(backend, &config.name, &config.env, StoreOptions::of(config))
            .await?
            .state,
    )
}

/// The state of one run, saved after every change.
pub struct Store {
    backend: Arc<dyn Backend>,
    state: State,
    /// The stored version this run holds (`None`: nothing stored yet).
    version: Option<Version>,
    /// The deploy-lock epoch this run writes with (`None`: no lock).
    epoch: Option<u64>,
    /// Recorded as the writer of every write.
    writer: Holder,
    opts: StoreOptions,
    /// The lineage reservation this (not yet written) state took, removed
    /// once the state is written.
    reservation: Option<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.backend.location())
            .field("serial", &self.state.serial)
            .field("epoch", &self.epoch)
            .finish()
    }
}

/// The state in `stored` (opened with `codec`), from `location`, of
/// `project`.
pub async fn decode_stored(
    stored: &[u8],
    codec: &crypt::Codec,
    location: &str,
    project: &str,
) -> Result<State, StateError> {
    decode(&codec.open(stored).await?, location, project)
}

impl Store {
    /// Reads the state of `backend` (a fresh one when there is none), in
    /// the clear, with the default history. See [`Store::open_with`].
    pub async fn open(
        backend: Arc<dyn Backend>,
        project: &str,
        env: &str,
    ) -> Result<Store, StateError> {
        Store::open_with(backend, project, env, StoreOptions::default()).await
    }

    /// Reads the state of `backend` (a fresh one when there is none). Its
    /// writes are fenced by nothing but the version until
    /// [`Store::fence`] gives it a lock's epoch. A state migrated away is
    /// `ENKSTATEMIGRATED`. Boxed: one instance for the engine's runs,
    /// `state` and the hub.
    pub fn open_with<'a>(
        backend: Arc<dyn Backend>,
        project: &'a str,
        env: &'a str,
        opts: StoreOptions,
    ) -> futures::future::BoxFuture<'a, Result<Store, StateError>> {
        Box::pin(Store::open_with_inner(backend, project, env, opts))
    }

    async fn open_with_inner(
        backend: Arc<dyn Backend>,
        project: &str,
        env: &str,
        opts: StoreOptions,
    ) -> Result<Store, StateError> {
        let store = Store::open_any(backend, project, env, opts).await?;
        if let Some(to) = &store.state.migrated_to {
            return Err(StateError::Migrated {
                location: store.location(),
                to: to.clone(),
            });
        }
        if let Some(to) = &store.state.migrating_to {
            tracing::warn!(
                "a migration of this state to {to} was interrupted: the state at {} is still the state (run `nanokit infra state migrate --to {to}` again to finish it)",
                store.location()
            );
        }
        Ok(store)
    }

    /// [`Store::open_with`], also of a state migrated away (migration).
    pub async fn open_any(
        backend: Arc<dyn Backend>,
        project: &str,
        env: &str,
        opts: StoreOptions,
    ) -> Result<Store, StateError> {
        let (state, version) = match backend.read().await? {
            Some(stored) => (
                decode_stored(&stored.bytes, &opts.codec, &backend.location(), project).await?,
                Some(stored.version),
            ),
            None => (State::new(project, env), None),
        };
        Ok(Store {
            backend,
            state,
            version,
            epoch: None,
            writer: Holder::this_run("unlocked write"),
            opts,
            reservation: None,
        })
    }

    /// From now on every write carries `epoch` (the deploy lock's) and is
    /// recorded as made by `writer`. A state that has seen a higher epoch
    /// already is `ENKSTATESTALE` at once.
    pub fn fence(&mut self, epoch: u64, writer: &Holder) -> Result<(), StateError> {
        self.epoch = Some(epoch);
        self.writer = writer.clone();
        self.check_epoch(epoch)
    }

    fn check_epoch(&self, epoch: u64) -> Result<(), StateError> {
        if self.state.epoch > epoch {
            return Err(StateError::Fenced {
                location: self.location(),
                epoch,
                highest: self.state.epoch,
            });
        }
        Ok(())
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
        self.backend.location()
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The state read, for a reader done with the store.
    pub fn into_state(self) -> State {
        self.state
    }

    /// Whether a state is stored (a fresh one is not, until written).
    pub fn is_stored(&self) -> bool {
        self.version.is_some()
    }

    /// The deploy-lock epoch this run writes with.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// Applies `f` and writes the state (serial + 1) as a compare-and-swap
    /// on the version this run holds, carrying its epoch. A failed write
    /// leaves the stored state as it was; after `ENKSTATESTALE` every later
    /// write of this run fails too. A note of an interrupted migration is
    /// cleared: this state is the state.
    pub async fn update<R>(&mut self, f: impl FnOnce(&mut State) -> R) -> Result<R, StateError> {
        let r = f(&mut self.state);
        self.state.serial += 1;
        self.state.migrating_to = None;
        self.write_current().await?;
        Ok(r)
    }

    /// Writes `state` as it is (its serial, lineage and markers), in place
    /// of the stored one (push, migrate).
    pub async fn replace(&mut self, state: State) -> Result<(), StateError> {
        self.state = state;
        self.write_current().await
    }

    async fn write_current(&mut self) -> Result<(), StateError> {
        if let Some(epoch) = self.epoch {
            self.check_epoch(epoch)?;
            self.state.epoch = epoch;
        }
        let w = &self.writer;
        self.state.written = Some(Written {
            at: now(),
            run: w.run_id.clone(),
            host: w.host.clone(),
            pid: w.pid,
            user: w.user.clone(),
            label: w.label.clone(),
            command: w.command.clone(),
        });
        self.save().await?;
        if let Some(p) = self.reservation.take() {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    async fn save(&mut self) -> Result<(), StateError> {
        let head = crypt::Head {
            serial: self.state.serial,
            lineage: self.state.lineage.clone(),
            epoch: self.state.epoch,
        };
        let bytes = self.opts.codec.seal(&encode(&self.state), &head).await?;
        let meta = WriteMeta {
            serial: self.state.serial,
            lineage: &self.state.lineage,
            epoch: self.epoch.unwrap_or(0),
            writer: &self.writer.run_id,
        };
        let err = match self
            .backend
            .write(&bytes, self.version.as_ref(), &meta)
            .await
        {
            Ok(v) => {
                self.version = Some(v);
                self.keep_revision(&bytes).await;
                return Ok(());
            }
            Err(e @ StateError::Conflict { .. }) => e,
            Err(e) => return Err(e),
        };
        // Lost the compare-and-swap: say why, from what is there now.
        let Ok(Some(now)) = self.backend.read().await else {
            return Err(err);
        };
        if now.bytes == bytes {
            // Our own write, which landed although its answer was lost (a
            // retried request): not a conflict.
            self.version = Some(now.version);
            self.keep_revision(&bytes).await;
            return Ok(());
        }
        let found = match self.opts.codec.open(&now.bytes).await {
            Ok(plain) => serde_json::from_slice::<State>(&plain).ok(),
            Err(_) => None,
        };
        let Some(found) = found else {
            return Err(err);
        };
        let location = self.location();
        if found.lineage != self.state.lineage {
            return Err(StateError::Lineage {
                location,
                expected: self.state.lineage.clone(),
                actual: found.lineage,
            });
        }
        match self.epoch {
            Some(epoch) if found.epoch > epoch => Err(StateError::Fenced {
                location,
                epoch,
                highest: found.epoch,
            }),
            _ => Err(err),
        }
    }

    /// Keeps the written bytes as the revision of their serial, and forgets
    /// the one that falls out of the history (best effort: the state is
    /// written; a history that cannot be is only a warning).
    async fn keep_revision(&self, bytes: &[u8]) {
        let keep = self.opts.history as u64;
        if keep == 0 {
            return;
        }
        let serial = self.state.serial;
        if let Err(e) = self.backend.put_revision(serial, bytes).await {
            tracing::warn!("cannot keep revision {serial} of the state's history: {e}");
            return;
        }
        if serial > keep {
            if let Err(e) = self.backend.delete_revision(serial - keep).await {
                tracing::debug!(
                    "cannot forget revision {} of the history: {e}",
                    serial - keep
                );
            }
        }
    }
}
