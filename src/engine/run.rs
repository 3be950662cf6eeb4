//! One run's context: the configuration, provider, state store, options,
//! labels and secret masker that every step of a run reads and records
//! through. State is saved through it after every step.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::report::{Event, Phase};
use super::RunOptions;
use crate::config::{Config, Service};
use crate::provider::{self, InstanceSpec, Provider, Scope};
use crate::state::{self, StateError, Status, Store};
use crate::trace::Masker;

/// Health probes one run has in flight at most (each a process or a Docker
/// exec): see [`super::health`].
pub(super) const PROBES_IN_FLIGHT: usize = 8;

/// One run's context: what every step of it reads and records.
pub(super) struct Run {
    pub(super) config: Arc<Config>,
    pub(super) provider: Arc<dyn Provider>,
    /// Shared with the caller that keeps it between runs (the watcher).
    pub(super) store: Arc<tokio::sync::Mutex<Store>>,
    pub(super) opts: RunOptions,
    pub(super) scope: Scope,
    /// The state's lineage, labelled on every instance.
    pub(super) lineage: String,
    /// The config's secrets, masked in every event, log line, recorded
    /// error and span this run writes.
    pub(super) mask: Masker,
    /// Health probes in flight ([`PROBES_IN_FLIGHT`] at most).
    pub(super) probes: tokio::sync::Semaphore,
    /// When set (by `down`), stopped instances are listed here (service,
    /// id) and removed together at the end, instead of each right after
    /// its stop: what waits for a stop (the services it depends on) need
    /// not wait for the removal too.
    pub(super) removals: std::sync::Mutex<Option<Vec<(String, String)>>>,
    /// The first `ENKSTATESTALE` a save got: another run holds the state
    /// now, so this one starts nothing new and ends with this error.
    stale: std::sync::Mutex<Option<StateError>>,
    /// The instances whose exit the run watches ([`super::live`]).
    pub(super) exits: Exits,
}

impl Run {
    pub(super) fn new(
        config: Arc<Config>,
        provider: Arc<dyn Provider>,
        store: Store,
        opts: RunOptions,
        scope: Scope,
        lineage: String,
    ) -> Run {
        let store = Arc::new(tokio::sync::Mutex::new(store));
        Run::shared(config, provider, store, opts, scope, lineage)
    }

    /// A run on a store its caller keeps too.
    pub(super) fn shared(
        config: Arc<Config>,
        provider: Arc<dyn Provider>,
        store: Arc<tokio::sync::Mutex<Store>>,
        opts: RunOptions,
        scope: Scope,
        lineage: String,
    ) -> Run {
        Run {
            mask: config.masker(),
            config,
            provider,
            store,
            opts,
            scope,
            lineage,
            probes: tokio::sync::Semaphore::new(PROBES_IN_FLIGHT),
            removals: std::sync::Mutex::new(None),
            stale: std::sync::Mutex::new(None),
            exits: Default::default(),
        }
    }

    /// Lists stopped instance `id` of `service` for removal at the end of
    /// the run, when the run defers removals; false when it does not.
    pub(super) fn defer_removal(&self, service: &str, id: &str) -> bool {
        let mut removals = self.removals.lock().unwrap_or_else(|e| e.into_inner());
        match removals.as_mut() {
            Some(list) => {
                list.push((service.to_string(), id.to_string()));
                true
            }
            None => false,
        }
    }

    pub(super) fn emit(
        &self,
        service: &str,
        phase: Phase,
        started: Instant,
        message: Option<String>,
    ) {
        if let Some(sink) = &self.opts.events {
            sink(&Event {
                service: service.to_string(),
                phase,
                elapsed_ms: started.elapsed().as_millis() as u64,
                message: message.map(|m| self.mask.mask(&m)),
            });
        }
    }

    /// Saves the state after `f`. A save refused as stale (another run took
    /// the state over) cancels the run: nothing new starts, and the run
    /// ends with that error ([`Run::take_stale`]).
    pub(super) async fn save(&self, f: impl FnOnce(&mut state::State)) -> Result<(), StateError> {
        let r = self.store.lock().await.update(f).await;
        if let Some(copy) = r.as_ref().err().and_then(StateError::stale_copy) {
            let mut stale = self.stale.lock().unwrap_or_else(|e| e.into_inner());
            if stale.is_none() {
                tracing::warn!("{copy}");
                *stale = Some(copy);
            }
            self.opts.cancel.cancel();
        }
        r
    }

    /// The `ENKSTATESTALE` error a save got, if any.
    pub(super) fn take_stale(&self) -> Option<StateError> {
        self.stale.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    pub(super) async fn set_status(
        &self,
        name: &str,
        status: Status,
        error: Option<String>,
    ) -> Result<(), StateError> {
        self.save(|s| {
            if let Some(r) = s.resources.get_mut(name) {
                r.status = status;
                r.error = error;
                r.updated_at = state::now();
            }
        })
        .await
    }

    /// Whether instance `id` exists and runs (an error looking counts as no).
    pub(super) async fn is_running(&self, id: &str) -> bool {
        self.provider
            .inspect(id)
            .await
            .ok()
            .flatten()
            .is_some_and(|i| i.running)
    }

    pub(super) fn spec(&self, svc: &Service, hash: &str, replica: u32) -> InstanceSpec {
        let mut labels = BTreeMap::new();
        labels.insert(provider::LABEL_LINEAGE.into(), self.lineage.clone());
        labels.insert(provider::LABEL_REPLICA.into(), replica.to_string());
        labels.insert(provider::LABEL_PROJECT.into(), self.scope.project.clone());
        labels.insert(provider::LABEL_ENV.into(), self.scope.env.clone());
        labels.insert(provider::LABEL_STATE_ID.into(), self.scope.state_id.clone());
        labels.insert(provider::LABEL_SERVICE.into(), svc.name.clone());
        labels.insert(provider::LABEL_HASH.into(), hash.to_string());
        let mut env = svc.env.clone();
        let mut mounts = Vec::new();
        let mut volumes = Vec::new();
        for m in &svc.volumes {
            if m.named {
                volumes.push((m.source.clone(), m.target.clone()));
                env.insert(
                    format!(
                        "NK_VOLUME_{}",
                        m.source.to_ascii_uppercase().replace('-', "_")
                    ),
                    self.provider
                        .volume_path(&m.source)
                        .to_string_lossy()
                        .into_owned(),
                );
            } else {
                mounts.push((self.config.dir.join(&m.source), m.target.clone()));
            }
        }
        if let Some(p) = svc.port {
            env.entry("PORT".into()).or_insert_with(|| p.to_string());
        }
        InstanceSpec {
            service: svc.name.clone(),
            config_hash: hash.to_string(),
            image: svc.image.clone(),
            command: svc.start.clone(),
            dir: svc.path.clone(),
            env,
            labels,
            log_file: self.config.log_file(&svc.name),
            port: svc.port,
            mounts,
            volumes,
            expose: svc.expose,
            path_given: svc.path_given,
            replica,
            replicas: svc.instances.max(1),
            healthcheck: svc.healthcheck.clone(),
            cpu: svc.cpu,
            memory: svc.memory,
            install_image: svc.install_image.clone(),
        }
    }
}

// The instances a run watches (engine/live.rs watches them and reads
// their exits).

/// The exit of one watched instance: fires once, when it no longer runs.
#[derive(Clone)]
pub(super) struct Exit(pub(super) tokio_util::sync::CancellationToken);

impl Exit {
    /// Whether the instance is known to have exited.
    pub(super) fn happened(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves when the instance exits.
    pub(super) async fn wait(&self) {
        self.0.cancelled().await
    }
}

pub(super) struct Watched {
    pub(super) service: String,
    pub(super) exit: Exit,
    pub(super) task: tokio::task::AbortHandle,
}

/// The instances a run watches, by id.
#[derive(Default)]
pub(super) struct Exits(std::sync::Mutex<std::collections::HashMap<String, Watched>>);

impl Exits {
    pub(super) fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Watched>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Exits {
    fn drop(&mut self) {
        for w in self.lock().values() {
            w.task.abort();
        }
    }
}
