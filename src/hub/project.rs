//! One environment of a project as the hub shows it: its configuration,
//! provider, and a state reader that keeps the backend open and reads a
//! local state file again only when it changed.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::HubOptions;
use crate::config::Config;
use crate::provider::Provider;
use crate::state;

/// One environment of the project.
pub(super) struct Project {
    pub env: String,
    pub config: Arc<Config>,
    pub provider: Arc<dyn Provider>,
    pub state: StateReader,
}

/// The state as the liveness poll reads it: the backend kept open (one
/// PostgreSQL connection, not one per look), and a local file read again
/// only when it changed.
pub(super) struct StateReader {
    location: state::Location,
    backend: tokio::sync::OnceCell<Arc<dyn state::Backend>>,
    cached: Mutex<Option<(FileStamp, Arc<state::State>)>>,
}

/// What identifies a version of a local file.
type FileStamp = Option<(u64, i64, i64, u64)>;

fn stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
}

impl StateReader {
    fn new(config: &Config) -> StateReader {
        StateReader {
            location: state::Location::of(config),
            backend: tokio::sync::OnceCell::new(),
            cached: Mutex::new(None),
        }
    }

    /// The state of `config` now.
    pub(super) async fn read(
        &self,
        config: &Config,
    ) -> Result<Arc<state::State>, state::StateError> {
        let file = match &self.location {
            state::Location::File(p) => Some(stamp(p)),
            _ => None,
        };
        if let Some(now) = &file {
            let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((seen, st)) = cached.as_ref().filter(|(seen, _)| seen == now) {
                let _ = seen;
                return Ok(st.clone());
            }
        }
        let backend = self
            .backend
            .get_or_try_init(|| state::open(&self.location))
            .await?
            .clone();
        let st = Arc::new(
            state::Store::open(backend, &config.name, &config.env)
                .await?
                .into_state(),
        );
        if let Some(now) = file {
            *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some((now, st.clone()));
        }
        Ok(st)
    }
}

impl Project {
    pub(super) fn load(opts: &HubOptions, env: &str) -> Result<Project, super::HubError> {
        let config = super::load(opts, env)?;
        let provider = crate::engine::provider_for(&config)?;
        Ok(Project {
            env: env.to_string(),
            state: StateReader::new(&config),
            config: Arc::new(config),
            provider,
        })
    }
}
