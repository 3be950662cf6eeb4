//! `state.json`: the source of truth of what nanokit created.
//!
//! Written atomically (temp file + fsync + rename, mode 0600) after every
//! resource step, with a serial that grows on every write and a lineage id
//! fixed at creation. The deploy lock lives beside it (`state.json.lock`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;

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
    #[error("state {path} belongs to project `{found}`, not `{expected}`; use another `infra.state` path")]
    Project {
        path: PathBuf,
        found: String,
        expected: String,
    },
}

impl ErrorCode for StateError {
    fn code(&self) -> &'static str {
        "ENKSTATE"
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
    /// The provider's id (process: `<pid>@<start time>`).
    pub provider_id: Option<String>,
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

/// The state of one run, saved after every change.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    state: State,
}

impl Store {
    pub fn open(path: &Path, project: &str, env: &str) -> Result<Store, StateError> {
        Ok(Store {
            path: path.to_path_buf(),
            state: read(path, project, env)?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Applies `f` and writes the state atomically (serial + 1).
    pub fn update<R>(&mut self, f: impl FnOnce(&mut State) -> R) -> Result<R, StateError> {
        let r = f(&mut self.state);
        self.state.serial += 1;
        self.save()?;
        Ok(r)
    }

    fn save(&self) -> Result<(), StateError> {
        let err = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut bytes = serde_json::to_vec_pretty(&self.state).expect("state serializes");
        bytes.push(b'\n');
        crate::fsutil::atomic_write(&self.path, &bytes, 0o600).map_err(err)
    }
}

/// The deploy lock path beside `state_file`.
pub fn lock_path(state_file: &Path) -> PathBuf {
    let mut s = state_file.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}
