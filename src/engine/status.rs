//! `status`: each recorded service with whether its instances run.

use serde::Serialize;

use super::watch::status::{ServiceWatch, WatchStatus};
use super::{provider_for, EngineError};
use crate::config::Config;
use crate::provider::Provider;
use crate::state;

/// One row of `status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusRow {
    pub service: String,
    /// Recorded status; `dead` when none of its recorded instances is
    /// running, `degraded` when only some are.
    pub status: String,
    /// Whether every recorded instance is running.
    pub alive: bool,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    /// The first instance's provider id.
    pub provider_id: Option<String>,
    /// Every recorded instance's provider id (replicas).
    pub instances: Vec<String>,
    /// How many of `instances` are running.
    pub running: usize,
    pub updated_at: String,
    pub error: Option<String>,
    /// What the watcher keeps about it (restarts, last exit, next
    /// attempt), when a watcher leads or led this project.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch: Option<ServiceWatch>,
}

/// The watcher of `cfg`'s project and environment as its status file
/// tells, and whether it still runs (None: no watcher ever led it).
pub fn watcher_of(cfg: &Config) -> Option<(WatchStatus, bool)> {
    let s = super::watch::status::read_status(&cfg.work_dir(), &cfg.env).ok()??;
    let running = s.running();
    Some((s, running))
}

/// Status rows of every recorded service.
pub async fn status_of(cfg: &Config) -> Result<Vec<StatusRow>, EngineError> {
    status_with(cfg, provider_for(cfg)?.as_ref()).await
}

/// [`status_of`] through a provider the caller keeps.
pub async fn status_with(
    cfg: &Config,
    provider: &dyn Provider,
) -> Result<Vec<StatusRow>, EngineError> {
    status_rows(cfg, provider, &state::load(cfg).await?).await
}

/// The status rows of `st`, a state the caller read (the hub keeps its
/// backend open and reads the state only when it changed). Boxed: one
/// instance in the binary for `status` and the hub.
pub fn status_rows<'a>(
    cfg: &'a Config,
    provider: &'a dyn Provider,
    st: &'a state::State,
) -> futures::future::BoxFuture<'a, Result<Vec<StatusRow>, EngineError>> {
    Box::pin(status_rows_inner(cfg, provider, st))
}

async fn status_rows_inner(
    cfg: &Config,
    provider: &dyn Provider,
    st: &state::State,
) -> Result<Vec<StatusRow>, EngineError> {
    let watcher = watcher_of(cfg).map(|w| w.0);
    let mut rows = Vec::new();
    for (name, r) in &st.resources {
        let ids = r.ids();
        let mut live = Vec::new();
        for id in &ids {
            if let Some(i) = provider.inspect(id).await?.filter(|i| i.running) {
                live.push(i);
            }
        }
        let stopped = r.status == state::Status::Stopped;
        rows.push(StatusRow {
            service: name.clone(),
            status: if live.is_empty() && !stopped {
                "dead".into()
            } else if live.len() < ids.len() && !stopped {
                "degraded".into()
            } else {
                r.status.as_str().into()
            },
            alive: !ids.is_empty() && live.len() == ids.len(),
            pid: live.first().and_then(|i| i.pid),
            port: cfg.services.get(name).and_then(|s| s.port),
            provider_id: r.provider_id.clone(),
            running: live.len(),
            instances: ids,
            updated_at: r.updated_at.clone(),
            error: r.error.clone(),
            watch: watcher.as_ref().and_then(|w| w.services.get(name).cloned()),
        });
    }
    // Services the watcher keeps down that have no record (`nanokit down`).
    for (name, w) in watcher.iter().flat_map(|w| &w.services) {
        if w.held.is_some() && !st.resources.contains_key(name) {
            rows.push(StatusRow {
                service: name.clone(),
                status: state::Status::Stopped.as_str().into(),
                alive: false,
                pid: None,
                port: cfg.services.get(name).and_then(|s| s.port),
                provider_id: None,
                instances: Vec::new(),
                running: 0,
                updated_at: w.last_exit.as_ref().map_or(String::new(), |e| e.at.clone()),
                error: None,
                watch: Some(w.clone()),
            });
        }
    }
    Ok(rows)
}
