//! ExecutionEngine: runs a plan with tokio.
//!
//! Each service starts as soon as every service it depends on is healthy (no
//! waiting for a whole layer), under a concurrency limit. Per service:
//! host `prestart` → `provisioning.install` → provider create/start of each
//! replica → `prestart_container` in it → health check → host `poststart`.
//! Provisioning comes before the start because what it installs (into the
//! service's directory or shared volume) is what the instance runs: started
//! first, it would race the install or crash without it.
//! A changed service is replaced by `recreate` (stop the old instances, then
//! start new ones) or `rolling` (per replica: start the new one, wait until
//! it is healthy, then stop an old one; a new replica that fails leaves the
//! old ones running).
//! Down, in reverse dependency order: `prestop` in the instance → stop →
//! `poststop` on the host. A failing step fails that service and skips its
//! dependents; independent branches go on. Cancelling (Ctrl-C) starts
//! nothing new; state is saved after every step, so a kill loses nothing
//! already done.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::instrument::WithSubscriber;
use tracing::{info_span, Instrument, Span};

use crate::config::{Config, Hook, Service};
use crate::error::ErrorCode;
use crate::graph::{Dag, GraphError};
use crate::plan::{self, ActionKind, Plan, PlanError, PlanOptions};
use crate::provider::process::ProcessProvider;
use crate::provider::{self, InstanceSpec, Probe, Provider, ProviderError, Scope};
use crate::state::{self, Resource, StateError, Status, Store};
use crate::trace::{self, Masker};

/// Where a lifecycle hook runs.
#[derive(Clone, Copy)]
enum HookSite<'a> {
    /// On the host, in the project directory.
    Host,
    /// Inside the instance with this provider id.
    Instance(&'a str),
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Lock(#[from] crate::foundation::LockFailure),
    #[error("the plan deletes volume(s) {0}, which destroys their data; re-run with --force to allow it")]
    NeedsForce(String),
    #[error("{0}")]
    Failed(String),
    #[error("interrupted: no new services were started; state is saved (run `nanokit up` again to finish)")]
    Cancelled,
}

impl ErrorCode for ExecError {
    fn code(&self) -> &'static str {
        match self {
            ExecError::Config(e) => e.code(),
            ExecError::Graph(e) => e.code(),
            ExecError::Plan(e) => e.code(),
            ExecError::State(e) => e.code(),
            ExecError::Provider(e) => e.code(),
            ExecError::Lock(e) => e.code(),
            ExecError::NeedsForce(_) => "ENKFORCE",
            ExecError::Failed(_) => "ENKFAILED",
            ExecError::Cancelled => "ENKCANCELLED",
        }
    }
}

/// Progress of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Waiting,
    Stopping,
    Stopped,
    Starting,
    Hook,
    Provisioning,
    Health,
    Healthy,
    Unchanged,
    Failed,
    Skipped,
    Deleted,
    Cancelled,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Starting => "starting",
            Phase::Hook => "hook",
            Phase::Provisioning => "provisioning",
            Phase::Health => "health",
            Phase::Healthy => "healthy",
            Phase::Unchanged => "unchanged",
            Phase::Failed => "failed",
            Phase::Skipped => "skipped",
            Phase::Deleted => "deleted",
            Phase::Cancelled => "cancelled",
        }
    }
}

/// A progress event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub service: String,
    pub phase: Phase,
    /// Milliseconds since this service's work began.
    pub elapsed_ms: u64,
    pub message: Option<String>,
}

pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// Options of `up` / `down`.
#[derive(Clone)]
pub struct ExecOptions {
    pub concurrency: usize,
    pub force: bool,
    pub targets: Vec<String>,
    /// Wait this long for the deploy lock (none: fail at once if held).
    pub lock_timeout: Option<Duration>,
    pub stop_grace: Duration,
    pub hook_timeout: Duration,
    /// Cap on waiting for a port / running check.
    pub health_timeout: Duration,
    pub events: Option<EventSink>,
    pub cancel: CancellationToken,
    /// `down`: also delete named volumes.
    pub volumes: bool,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            concurrency: 8,
            force: false,
            targets: Vec::new(),
            lock_timeout: None,
            stop_grace: Duration::from_secs(10),
            hook_timeout: Duration::from_secs(300),
            health_timeout: Duration::from_secs(60),
            events: None,
            cancel: CancellationToken::new(),
            volumes: false,
        }
    }
}

/// How one service ended.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceResult {
    pub service: String,
    pub action: ActionKind,
    pub outcome: Phase,
    pub error: Option<String>,
    pub elapsed_ms: u64,
}

/// The result of `up` / `down`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub plan: Plan,
    pub results: Vec<ServiceResult>,
}

impl Report {
    pub fn failures(&self) -> Vec<&ServiceResult> {
        self.results
            .iter()
            .filter(|r| matches!(r.outcome, Phase::Failed | Phase::Skipped | Phase::Cancelled))
            .collect()
    }

    /// One line per failed, skipped or cancelled service (`api failed: …`);
    /// None when every service came through.
    pub fn failure_summary(&self) -> Option<String> {
        let f = self.failures();
        (!f.is_empty()).then(|| {
            f.iter()
                .map(|f| {
                    format!(
                        "{} {}: {}",
                        f.service,
                        f.outcome.as_str(),
                        f.error.as_deref().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
    }
}

/// The scope (labels) of a config's instances.
pub fn scope(config: &Config) -> Scope {
    use sha2::{Digest, Sha256};
    // The same remote state from any working directory is one scope.
    let id = match state::Location::of(config) {
        state::Location::File(p) => p.to_string_lossy().into_owned(),
        remote => remote.display(),
    };
    Scope {
        project: config.name.clone(),
        env: config.env.clone(),
        state_id: hex::encode(&Sha256::digest(id.as_bytes())[..8]),
    }
}

/// The provider a config asks for.
pub fn provider_for(config: &Config) -> Result<Arc<dyn Provider>, ProviderError> {
    match config.provider {
        crate::config::ProviderKind::Process => Ok(Arc::new(ProcessProvider::new(
            config.work_dir().join("logs").join(&config.env),
            config.work_dir().join("volumes").join(&config.env),
        ))),
        crate::config::ProviderKind::Docker => Ok(Arc::new(
            crate::provider::docker::DockerProvider::new(config)?,
        )),
    }
}

/// Computes the plan against state and the live world (no lock, no change).
pub async fn make_plan(
    config: &Config,
    provider: &dyn Provider,
    opts: &PlanOptions,
) -> Result<Plan, ExecError> {
    let dag = Dag::build(config)?;
    let mut state = state::load(config).await?;
    let observed = provider.observe(&scope(config)).await?;
    if state.serial == 0 {
        // No state yet: salt with the lineage the first state will have, as
        // `up` does (the one its instances carry when the state was lost,
        // else the one reserved for it), so this plan is the one `up` makes.
        match observed
            .iter()
            .filter_map(|i| i.lineage.clone())
            .find(|l| !l.is_empty())
        {
            Some(l) => state.lineage = l,
            None => match state::reserved_lineage(&config.state_file) {
                Ok(l) => state.lineage = l,
                Err(e) => tracing::warn!(
                    "cannot reserve the state lineage beside {}: {e}",
                    config.state_file.display()
                ),
            },
        }
    }
    Ok(plan::plan(config, &dag, &state, &observed, opts)?)
}

/// Saves `plan` to `.nanokit/plans/latest.json` (0600, secrets masked).
pub fn save_plan(config: &Config, plan: &Plan) -> std::io::Result<PathBuf> {
    let path = config.plan_file();
    let mut bytes =
        serde_json::to_vec_pretty(&config.masker().to_json(plan)).expect("plan serializes");
    bytes.push(b'\n');
    crate::sys::private::write(&path, &bytes)?;
    Ok(path)
}

struct Run {
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    store: tokio::sync::Mutex<Store>,
    opts: ExecOptions,
    scope: Scope,
    /// The state's lineage, labelled on every instance.
    lineage: String,
    /// The config's secrets, masked in every event, log line, recorded
    /// error and span this run writes.
    mask: Masker,
}

impl Run {
    fn new(
        config: Arc<Config>,
        provider: Arc<dyn Provider>,
        store: Store,
        opts: ExecOptions,
        scope: Scope,
        lineage: String,
    ) -> Run {
        Run {
            mask: config.masker(),
            config,
            provider,
            store: tokio::sync::Mutex::new(store),
            opts,
            scope,
            lineage,
        }
    }

    fn emit(&self, service: &str, phase: Phase, started: Instant, message: Option<String>) {
        if let Some(sink) = &self.opts.events {
            sink(&Event {
                service: service.to_string(),
                phase,
                elapsed_ms: started.elapsed().as_millis() as u64,
                message: message.map(|m| self.mask.mask(&m)),
            });
        }
    }

    async fn save(&self, f: impl FnOnce(&mut state::State)) -> Result<(), String> {
        self.store
            .lock()
            .await
            .update(f)
            .await
            .map_err(|e| e.to_string())
    }

    async fn set_status(
        &self,
        name: &str,
        status: Status,
        error: Option<String>,
    ) -> Result<(), String> {
        self.save(|s| {
            if let Some(r) = s.resources.get_mut(name) {
                r.status = status;
                r.error = error;
                r.updated_at = state::now();
            }
        })
        .await
    }

    fn spec(&self, svc: &Service, hash: &str, replica: u32) -> InstanceSpec {
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

    /// Runs lifecycle hooks (`sh -c`, in order, stopping at the first
    /// failure): on the host in the project directory with the service's env,
    /// or inside the instance through the provider.
    async fn hooks(
        &self,
        site: HookSite<'_>,
        svc: &Service,
        spec: &InstanceSpec,
        hook: Hook,
        started: Instant,
    ) -> Result<(), String> {
        let which = hook.name();
        for (i, cmd) in svc.hooks.of(hook).iter().enumerate() {
            self.emit(
                &svc.name,
                Phase::Hook,
                started,
                Some(format!("{which}: {cmd}")),
            );
            let span = info_span!(
                "hook",
                otel.name = which,
                nanokit.service = %svc.name,
                nanokit.hook = which,
                nanokit.hook_index = i,
                nanokit.site = if matches!(site, HookSite::Host) { "host" } else { "instance" },
            );
            trace::set(&span, "nanokit.command", self.mask.mask(cmd));
            trace::step_masked(span, &self.mask, async {
                let argv = vec!["sh".to_string(), "-c".to_string(), cmd.clone()];
                let out = match site {
                    HookSite::Host => {
                        let mut env = spec.env.clone();
                        env.extend(provider::command_labels(&spec.labels));
                        trace::propagate(&mut env);
                        provider::process::run_command(
                            &argv,
                            &self.config.dir,
                            &env,
                            self.opts.hook_timeout,
                        )
                        .await
                    }
                    HookSite::Instance(id) => {
                        let mut spec = spec.clone();
                        trace::propagate(&mut spec.env);
                        self.provider
                            .exec(id, &spec, &argv, self.opts.hook_timeout)
                            .await
                    }
                }
                .map_err(|e| format!("hook {which} `{cmd}`: {e}"))?;
                append_log(
                    &spec.log_file,
                    &self
                        .mask
                        .mask(&format!("--- hook {which}: {cmd} ---\n{}", out.output)),
                );
                if !out.success() {
                    return Err(format!(
                        "hook {which} `{cmd}` failed ({}):\n{}",
                        exit_text(&out),
                        indent(&tail(&out.output, 20))
                    ));
                }
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// [`Self::wait_healthy`] in a `health` span.
    async fn health(
        &self,
        id: &str,
        svc: &Service,
        spec: &InstanceSpec,
        started: Instant,
    ) -> Result<(), String> {
        let span = info_span!(
            "health",
            nanokit.service = %svc.name,
            nanokit.instance = id,
            nanokit.replica = spec.replica,
            nanokit.replicas = spec.replicas,
        );
        trace::step_masked(span, &self.mask, self.wait_healthy(id, svc, spec, started)).await
    }

    /// Waits until healthy; the error carries the last probe output.
    async fn wait_healthy(
        &self,
        id: &str,
        svc: &Service,
        spec: &InstanceSpec,
        started: Instant,
    ) -> Result<(), String> {
        self.emit(&svc.name, Phase::Health, started, None);
        let t0 = Instant::now();
        let native = self.provider.native_healthcheck();
        // With a runtime-evaluated check the runtime counts retries; we only
        // poll its verdict, often, until this cap.
        let native_cap = svc.healthcheck.as_ref().filter(|_| native).map(|h| {
            h.start_period + (h.interval + h.timeout) * (h.retries + 1) + Duration::from_secs(10)
        });
        let (probe, interval, timeout, retries, start_period) =
            match (&svc.healthcheck, svc.port.or(svc.expose)) {
                (Some(h), _) if native => (
                    Probe::Command(h.test.clone()),
                    Duration::from_millis(100),
                    h.timeout,
                    u32::MAX,
                    Duration::ZERO,
                ),
                (Some(h), _) => (
                    Probe::Command(h.test.clone()),
                    h.interval,
                    h.timeout,
                    h.retries,
                    h.start_period,
                ),
                (None, Some(p)) => (
                    Probe::Port(p),
                    Duration::from_millis(50),
                    Duration::from_secs(1),
                    u32::MAX,
                    Duration::ZERO,
                ),
                (None, None) => (
                    Probe::Running,
                    Duration::from_millis(100),
                    Duration::from_secs(1),
                    1,
                    Duration::from_millis(200),
                ),
            };
        let mut failures = 0u32;
        let mut last = String::new();
        loop {
            if self.opts.cancel.is_cancelled() {
                return Err("cancelled".into());
            }
            if !self
                .provider
                .inspect(id)
                .await
                .ok()
                .flatten()
                .is_some_and(|i| i.running)
            {
                let logs = self.provider.logs(&svc.name, 20).await.unwrap_or_default();
                return Err(format!(
                    "the instance exited while starting; last log lines:\n{}",
                    indent(&logs)
                ));
            }
            let in_grace = t0.elapsed() < start_period;
            if !(matches!(probe, Probe::Running) && in_grace) {
                let r = self
                    .provider
                    .probe(id, spec, &probe, timeout)
                    .await
                    .map_err(|e| e.to_string())?;
                if r.ok {
                    return Ok(());
                }
                last = r.output;
                if r.fatal {
                    return Err(format!(
                        "health check `{}` reported unhealthy after {:.1}s; last probe output:\n{}",
                        match &probe {
                            Probe::Command(argv) => argv.join(" "),
                            _ => String::new(),
                        },
                        t0.elapsed().as_secs_f64(),
                        indent(&tail(&last, 20))
                    ));
                }
                if !in_grace {
                    failures += 1;
                }
            }
            let capped = (matches!(probe, Probe::Port(_))
                && t0.elapsed() >= self.opts.health_timeout)
                || native_cap.is_some_and(|c| t0.elapsed() >= c);
            if failures >= retries || capped {
                let what = match &probe {
                    Probe::Command(argv) => format!("health check `{}`", argv.join(" ")),
                    Probe::Port(p) => format!("port {p} check"),
                    Probe::Running => "running check".into(),
                };
                return Err(format!(
                    "{what} failed after {failures} attempt(s) in {:.1}s; last probe output:\n{}",
                    t0.elapsed().as_secs_f64(),
                    indent(&tail(&last, 20))
                ));
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.opts.cancel.cancelled() => return Err("cancelled".into()),
            }
        }
    }

    /// Stops one instance: prestop in it (failure is reported, the stop goes on), stop.
    async fn stop_instance(
        &self,
        name: &str,
        id: &str,
        svc: Option<&Service>,
        started: Instant,
    ) -> Result<(), String> {
        self.emit(name, Phase::Stopping, started, Some(id.to_string()));
        if let Some(svc) = svc {
            if !svc.hooks.prestop.is_empty()
                && self
                    .provider
                    .inspect(id)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|i| i.running)
            {
                let spec = self.spec(svc, "", 1);
                if let Err(e) = self
                    .hooks(HookSite::Instance(id), svc, &spec, Hook::Prestop, started)
                    .await
                {
                    self.emit(name, Phase::Hook, started, Some(format!("warning: {e}")));
                }
            }
        }
        let span = info_span!("stop", nanokit.service = %name, nanokit.instance = id);
        trace::step(span, async {
            self.provider
                .stop(id, self.opts.stop_grace)
                .await
                .map_err(|e| format!("stopping {id}: {e}"))
        })
        .await
    }

    /// Deletes named volume `name` (and its data) and forgets it.
    async fn delete_volume(&self, name: &str) -> Result<(), ExecError> {
        let id = self
            .store
            .lock()
            .await
            .state()
            .volumes
            .get(name)
            .map(|r| r.provider_id.clone());
        if let Some(id) = id {
            self.provider.delete_volume(&id).await?;
        }
        self.save(|s| {
            s.volumes.remove(name);
        })
        .await
        .map_err(ExecError::Failed)
    }

    /// Stops instances `ids` of service `name` together (with `svc`'s stop
    /// hooks when given: replicas each wait out their own grace period at
    /// the same time, not one after another) and drops from state each one
    /// that is gone. Every stop is attempted; the first error is returned.
    async fn retire(
        &self,
        name: &str,
        ids: &[String],
        svc: Option<&Service>,
        started: Instant,
    ) -> Result<(), String> {
        let stops = futures::future::join_all(
            ids.iter()
                .map(|id| self.stop_instance(name, id, svc, started)),
        )
        .await;
        let mut first_error = None;
        for (id, r) in ids.iter().zip(stops) {
            match r {
                Ok(()) => self.save_ids(name, |ids| ids.retain(|x| x != id)).await?,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Records `f` applied to the service's instance ids.
    async fn save_ids(&self, name: &str, f: impl FnOnce(&mut Vec<String>)) -> Result<(), String> {
        self.save(|s| {
            if let Some(r) = s.resources.get_mut(name) {
                let mut ids = r.ids();
                f(&mut ids);
                r.set_ids(ids);
                r.updated_at = state::now();
            }
        })
        .await
    }

    /// Creates and starts replica `replica`, records it, runs the
    /// instance-side prestart in it.
    async fn start_replica(
        &self,
        svc: &Service,
        hash: &str,
        replica: u32,
        started: Instant,
    ) -> Result<(String, InstanceSpec), String> {
        let spec = self.spec(svc, hash, replica);
        let create = info_span!(
            "create",
            nanokit.service = %svc.name,
            nanokit.provider = self.provider.name(),
            nanokit.replica = replica,
            nanokit.replicas = svc.instances.max(1),
        );
        let inst = trace::step(create.clone(), async {
            self.provider.create(&spec).await.map_err(|e| e.to_string())
        })
        .await?;
        trace::set(&create, "nanokit.instance", inst.id.clone());
        self.save(|s| {
            if let Some(r) = s.resources.get_mut(&svc.name) {
                let mut ids = r.ids();
                ids.push(inst.id.clone());
                r.set_ids(ids);
                if r.status == Status::Creating {
                    r.status = Status::Starting;
                }
                r.updated_at = state::now();
            }
        })
        .await?;
        self.hooks(
            HookSite::Instance(&inst.id),
            svc,
            &spec,
            Hook::PrestartContainer,
            started,
        )
        .await?;
        Ok((inst.id, spec))
    }

    /// The whole up lifecycle of one service.
    async fn up_service(&self, action: &plan::Action, started: Instant) -> Result<Phase, String> {
        let name = &action.service;
        let svc = &self.config.services[name];
        let hash = action.config_hash.clone().unwrap_or_default();
        trace::set(&Span::current(), "nanokit.action", action.action.as_str());
        if action.action == ActionKind::Noop {
            self.emit(name, Phase::Unchanged, started, None);
            return Ok(Phase::Unchanged);
        }
        let want = svc.instances.max(1) as usize;
        let spec = self.spec(svc, &hash, 1);
        // The recorded instances being replaced get their stop hooks;
        // orphans (and stopped or foreign instances) are just removed.
        let recorded = self
            .store
            .lock()
            .await
            .state()
            .resources
            .get(name)
            .map(|r| r.ids())
            .unwrap_or_default();
        let mut old = Vec::new();
        for id in &action.stop {
            let running = recorded.contains(id)
                && self
                    .provider
                    .inspect(id)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|i| i.running);
            if running {
                old.push(id.clone());
            } else {
                self.retire(name, std::slice::from_ref(id), None, started)
                    .await?;
            }
        }
        let rolling = svc.update_strategy == crate::config::UpdateStrategy::Rolling
            && !old.is_empty()
            && action.keep.is_empty();
        if !rolling {
            self.retire(name, &old, Some(svc), started).await?;
            if !old.is_empty() {
                self.hooks(HookSite::Host, svc, &spec, Hook::Poststop, started)
                    .await?;
            }
        }
        let creating = want.saturating_sub(action.keep.len());
        self.emit(name, Phase::Starting, started, None);
        if creating > 0 {
            self.hooks(HookSite::Host, svc, &spec, Hook::Prestart, started)
                .await?;
        }
        if self.opts.cancel.is_cancelled() {
            return Err("cancelled".into());
        }
        let now = state::now();
        let mut ids = action.keep.clone();
        if rolling {
            ids.extend(old.iter().cloned());
        }
        self.save(|s| {
            let created_at = s
                .resources
                .get(name)
                .map_or(now.clone(), |r| r.created_at.clone());
            let mut r = Resource {
                provider: self.provider.name().to_string(),
                provider_id: None,
                instances: Vec::new(),
                config_hash: hash.clone(),
                fields: action.fields.clone(),
                depends_on: action.depends_on.clone(),
                status: if creating > 0 {
                    Status::Creating
                } else {
                    Status::Starting
                },
                error: None,
                created_at,
                updated_at: now.clone(),
            };
            r.set_ids(ids);
            s.resources.insert(name.clone(), r);
        })
        .await?;
        for m in &spec.mounts {
            std::fs::create_dir_all(&m.0).map_err(|e| format!("volume {}: {e}", m.0.display()))?;
        }
        if let (Some(install), true) = (&svc.install, creating > 0) {
            self.set_status(name, Status::Provisioning, None).await?;
            self.emit(name, Phase::Provisioning, started, Some(install.clone()));
            let span = info_span!("provisioning", nanokit.service = %name);
            let r = trace::step_masked(span.clone(), &self.mask, async {
                self.provider
                    .provision(&spec, install, &svc.manifests, &self.opts.cancel)
                    .await
                    .map_err(|e| format!("provisioning `{install}` failed: {e}"))
            })
            .await?;
            trace::set(&span, "nanokit.provision.ran", r.ran);
            if !r.ran {
                self.emit(
                    name,
                    Phase::Provisioning,
                    started,
                    Some("already installed".into()),
                );
            }
            self.set_status(name, Status::Starting, None).await?;
        }
        // Replica numbers not taken by the instances that stay.
        let mut used = Vec::new();
        for id in &action.keep {
            if let Ok(Some(i)) = self.provider.inspect(id).await {
                used.push(i.replica);
            }
        }
        let slots: Vec<u32> = (1..).filter(|n| !used.contains(n)).take(creating).collect();
        if rolling {
            // One replica at a time: the new one healthy before an old one goes.
            let mut old = old.into_iter();
            for slot in slots {
                if self.opts.cancel.is_cancelled() {
                    return Err("cancelled".into());
                }
                let (id, rspec) = self.start_replica(svc, &hash, slot, started).await?;
                if let Err(e) = self.health(&id, svc, &rspec, started).await {
                    // Keep serving from the old instances.
                    let _ = self.stop_instance(name, &id, None, started).await;
                    self.save_ids(name, |ids| ids.retain(|x| x != &id)).await?;
                    return Err(format!(
                        "rolling update: the new replica failed, the old instance(s) keep running: {e}"
                    ));
                }
                if let Some(o) = old.next() {
                    self.retire(name, &[o], Some(svc), started).await?;
                }
            }
            let rest: Vec<String> = old.collect();
            self.retire(name, &rest, Some(svc), started).await?;
            self.hooks(HookSite::Host, svc, &spec, Hook::Poststop, started)
                .await?;
        } else {
            let created = futures::future::join_all(
                slots
                    .iter()
                    .map(|slot| self.start_replica(svc, &hash, *slot, started)),
            )
            .await;
            let mut all = Vec::new();
            for id in &action.keep {
                // Instances that stay: their replica number is not known here.
                let mut kept = spec.clone();
                kept.replica = 0;
                all.push((id.clone(), kept));
            }
            for r in created {
                all.push(r?);
            }
            let waits = futures::future::join_all(
                all.iter()
                    .map(|(id, rspec)| self.health(id, svc, rspec, started)),
            )
            .await;
            for w in waits {
                w?;
            }
        }
        if creating > 0 {
            self.hooks(HookSite::Host, svc, &spec, Hook::Poststart, started)
                .await?;
        }
        self.set_status(name, Status::Healthy, None).await?;
        self.emit(name, Phase::Healthy, started, None);
        Ok(Phase::Healthy)
    }

    /// Deletes one service: stop its instances, poststop, drop from state.
    async fn delete_service(
        &self,
        action: &plan::Action,
        started: Instant,
    ) -> Result<Phase, String> {
        let name = &action.service;
        let svc = self.config.services.get(name);
        trace::set(&Span::current(), "nanokit.action", action.action.as_str());
        self.set_status(name, Status::Stopping, None).await?;
        self.retire(name, &action.stop, svc, started).await?;
        if let Some(svc) = svc {
            let spec = self.spec(svc, "", 1);
            self.hooks(HookSite::Host, svc, &spec, Hook::Poststop, started)
                .await?;
        }
        self.save(|s| {
            s.resources.remove(name);
        })
        .await?;
        self.emit(name, Phase::Deleted, started, None);
        Ok(Phase::Deleted)
    }
}

fn exit_text(out: &provider::ExecOutput) -> String {
    if out.timed_out {
        "timed out".into()
    } else {
        match out.code {
            Some(c) => format!("exit code {c}"),
            None => "killed by a signal".into(),
        }
    }
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Appends `text` (already masked) to a log under `.nanokit/logs` (0600).
fn append_log(path: &std::path::Path, text: &str) {
    use std::io::Write;
    if let Ok(mut f) = crate::sys::private::open_append(path) {
        let _ = f.write_all(text.as_bytes());
        if !text.ends_with('\n') {
            let _ = f.write_all(b"\n");
        }
    }
}

/// Aborts a background task when dropped (every exit path of a run).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Clone, PartialEq)]
enum Done {
    Pending,
    Ok,
    NotOk(String),
}

/// Runs `work` for every node, each after the nodes in its `waits` ended
/// well, at most `limit` at a time. A node whose wait failed is skipped.
async fn schedule<F, Fut>(
    nodes: Vec<(String, Vec<String>)>,
    limit: usize,
    cancel: CancellationToken,
    on_skip: impl Fn(&str, String) + Send + Sync + 'static,
    work: F,
) -> Vec<(String, Result<Phase, String>, u64)>
where
    F: Fn(String, Instant) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Phase, String>> + Send + 'static,
{
    let mut senders = HashMap::new();
    let mut receivers = HashMap::new();
    for (n, _) in &nodes {
        let (tx, rx) = watch::channel(Done::Pending);
        senders.insert(n.clone(), tx);
        receivers.insert(n.clone(), rx);
    }
    let sem = Arc::new(Semaphore::new(limit.max(1)));
    let work = Arc::new(work);
    let on_skip = Arc::new(on_skip);
    let mut set = tokio::task::JoinSet::new();
    for (name, waits) in nodes {
        let tx = senders.remove(&name).expect("sender");
        let rxs: Vec<(String, watch::Receiver<Done>)> = waits
            .iter()
            .filter_map(|w| receivers.get(w).map(|r| (w.clone(), r.clone())))
            .collect();
        let sem = sem.clone();
        let work = work.clone();
        let on_skip = on_skip.clone();
        let cancel = cancel.clone();
        let span = info_span!("service", nanokit.service = %name);
        let task = async move {
            let deps = rxs
                .iter()
                .map(|(d, _)| d.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let wait = async {
                for (dep, mut rx) in rxs {
                    let v = rx
                        .wait_for(|d| *d != Done::Pending)
                        .await
                        .map(|d| d.clone());
                    if let Ok(Done::NotOk(_)) | Err(_) = v {
                        return Some(dep);
                    }
                }
                None
            };
            let failed_dep = if deps.is_empty() {
                wait.await
            } else {
                let s =
                    info_span!("dependencies", nanokit.service = %name, nanokit.waits_for = %deps);
                wait.instrument(s).await
            };
            if let Some(dep) = failed_dep {
                let why = format!("skipped: `{dep}` did not come up");
                trace::set(&Span::current(), "nanokit.outcome", "skipped");
                trace::set(&Span::current(), "nanokit.skip_reason", why.clone());
                on_skip(&name, why.clone());
                let _ = tx.send(Done::NotOk(why.clone()));
                return (name, Err(format!("skip:{why}")), 0);
            }
            let _permit = match sem.try_acquire() {
                Ok(p) => p,
                Err(_) => sem
                    .acquire()
                    .instrument(info_span!("concurrency", nanokit.service = %name))
                    .await
                    .expect("semaphore"),
            };
            if cancel.is_cancelled() {
                trace::set(&Span::current(), "nanokit.outcome", "cancelled");
                let _ = tx.send(Done::NotOk("cancelled".into()));
                return (name, Err("cancelled".into()), 0);
            }
            let started_work = Instant::now();
            let r = work(name.clone(), started_work).await;
            match &r {
                Ok(p) => trace::set(&Span::current(), "nanokit.outcome", p.as_str()),
                Err(e) if e == "cancelled" => {
                    trace::set(&Span::current(), "nanokit.outcome", "cancelled")
                }
                Err(e) => {
                    trace::set(&Span::current(), "nanokit.outcome", "failed");
                    trace::fail(&Span::current(), e);
                }
            }
            let _ = tx.send(match &r {
                Ok(_) => Done::Ok,
                Err(e) => Done::NotOk(e.clone()),
            });
            (name, r, started_work.elapsed().as_millis() as u64)
        };
        // Awaited inside, so the span is dropped while the run's subscriber
        // is the default (a span's parent is released through the default).
        set.spawn(async move { task.instrument(span).await }.with_current_subscriber());
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out
}

/// Deletes the services of `actions`, each once every service that depends
/// on it is gone (dependents first), at most `limit` at a time. A failure is
/// recorded in state and reported; what depended on it is skipped.
async fn delete_services(
    run: &Arc<Run>,
    actions: Vec<plan::Action>,
    limit: usize,
) -> Vec<(String, Result<Phase, String>, u64)> {
    let nodes = actions
        .iter()
        .map(|a| {
            let waits = actions
                .iter()
                .filter(|b| b.depends_on.contains(&a.service))
                .map(|b| b.service.clone())
                .collect();
            (a.service.clone(), waits)
        })
        .collect();
    run_actions(
        run,
        nodes,
        actions,
        limit,
        CancellationToken::new(),
        |run, action, started| async move { run.delete_service(&action, started).await },
    )
    .await
}

/// Runs `step` for each action as soon as the actions it waits for
/// (`nodes`: action → what it waits for) are done, at most `limit` at once.
/// A failure is recorded in state and reported, and what waits for it is
/// skipped; a cancelled step is reported as such.
async fn run_actions<F, Fut>(
    run: &Arc<Run>,
    nodes: Vec<(String, Vec<String>)>,
    actions: Vec<plan::Action>,
    limit: usize,
    cancel: CancellationToken,
    step: F,
) -> Vec<(String, Result<Phase, String>, u64)>
where
    F: Fn(Arc<Run>, plan::Action, Instant) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Phase, String>> + Send + 'static,
{
    let by_name: HashMap<String, plan::Action> = actions
        .into_iter()
        .map(|a| (a.service.clone(), a))
        .collect();
    let (r2, r3) = (run.clone(), run.clone());
    schedule(
        nodes,
        limit,
        cancel,
        move |name, why| r3.emit(name, Phase::Skipped, Instant::now(), Some(why)),
        move |name, started| {
            let run = r2.clone();
            let work = step(run.clone(), by_name[&name].clone(), started);
            async move {
                // Errors quote commands and their output: masked before they
                // are recorded in state, sent as events or reported.
                let r = work.await.map_err(|e| run.mask.mask(&e));
                if let Err(e) = &r {
                    let cancelled = e == "cancelled";
                    if !cancelled {
                        let _ = run.set_status(&name, Status::Failed, Some(e.clone())).await;
                    }
                    let phase = if cancelled {
                        Phase::Cancelled
                    } else {
                        Phase::Failed
                    };
                    run.emit(&name, phase, started, Some(e.clone()));
                }
                r
            }
        },
    )
    .await
}

fn to_result(action: ActionKind, name: String, r: Result<Phase, String>, ms: u64) -> ServiceResult {
    let (outcome, error) = match r {
        Ok(p) => (p, None),
        Err(e) if e == "cancelled" => (Phase::Cancelled, None),
        Err(e) => match e.strip_prefix("skip:") {
            Some(why) => (Phase::Skipped, Some(why.to_string())),
            None => (Phase::Failed, Some(e)),
        },
    };
    ServiceResult {
        service: name,
        action,
        outcome,
        error,
        elapsed_ms: ms,
    }
}

/// Takes the deploy lock and opens the state, wherever it lives. When the
/// lock was taken over from a run that died holding it, first lets the
/// runtime finish what that run had asked of it ([`Provider::settle`]), so
/// that what it creates late is seen now.
async fn begin(
    config: &Config,
    provider: &dyn Provider,
    opts: &ExecOptions,
    what: &str,
) -> Result<(crate::foundation::DeployLock, Store), ExecError> {
    let (lock, store) = lock_and_open(config, opts, what).await?;
    if lock.recovered() {
        let settled = provider
            .settle(&scope(config))
            .instrument(info_span!("settle"))
            .await;
        if let Err(e) = settled {
            let _ = lock.release().await;
            return Err(e.into());
        }
    }
    Ok((lock, store))
}

async fn lock_and_open(
    config: &Config,
    opts: &ExecOptions,
    what: &str,
) -> Result<(crate::foundation::DeployLock, Store), ExecError> {
    let label = format!("nanokit {what} ({} / {})", config.name, config.env);
    let (lock, mut store) = match state::Location::of(config) {
        state::Location::File(path) => {
            // The lock file is one of the project's private files (0600).
            let lock_path = state::lock_path(&path);
            if let Err(e) = crate::sys::private::touch(&lock_path) {
                tracing::debug!("cannot prepare {}: {e}", lock_path.display());
            }
            let lock = crate::foundation::acquire_deploy_lock(
                &state::lock_path(&path),
                &label,
                opts.lock_timeout,
                &opts.cancel,
            )
            .await?;
            match Store::open(&path, &config.name, &config.env) {
                Ok(store) => (lock, store),
                Err(e) => {
                    let _ = lock.release().await;
                    return Err(e.into());
                }
            }
        }
        state::Location::Postgres { url, workspace } => {
            let location = crate::kv::pg::redact_url(&url);
            let db = state::connect(&url).await?;
            let holder = crate::foundation::run_holder();
            let info = crate::foundation::run_info(&label);
            let lock = tokio::select! {
                r = crate::foundation::acquire_remote_deploy_lock(
                    db.clone(), &location, &workspace, &holder, &info, opts.lock_timeout,
                ) => r?,
                _ = opts.cancel.cancelled() => return Err(ExecError::Cancelled),
            };
            match Store::open_remote(db, &url, &workspace, &config.name, &config.env, &holder).await
            {
                Ok(store) => (lock, store),
                Err(e) => {
                    let _ = lock.release().await;
                    return Err(e.into());
                }
            }
        }
    };
    // A state never written takes the lineage a plan made before it used.
    store.take_reserved_lineage(&config.state_file);
    Ok((lock, store))
}

/// Releases the deploy lock whatever `r` is (a failure to release is only
/// logged: the lock then expires or is cleared with `infra unlock`).
async fn finish<T>(
    lock: crate::foundation::DeployLock,
    r: Result<T, ExecError>,
) -> Result<T, ExecError> {
    if let Err(e) = lock.release().await {
        tracing::warn!("cannot release the deploy lock: {e}");
    }
    r
}

/// Brings the world to `config`: plan, then execute.
pub async fn up(
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    opts: ExecOptions,
) -> Result<Report, ExecError> {
    let dag = info_span!("graph").in_scope(|| Dag::build(&config))?;
    let (lock, store) = begin(&config, provider.as_ref(), &opts, "up")
        .instrument(info_span!("deploy_lock"))
        .await?;
    // A lost deploy lease (broken by `infra unlock`, taken over, expired)
    // stops the run like Ctrl-C: nothing new starts.
    let watch_lost = {
        let (lost, cancel) = (lock.lost_token(), opts.cancel.clone());
        AbortOnDrop(tokio::spawn(async move {
            lost.cancelled().await;
            cancel.cancel();
        }))
    };
    let r = up_locked(config, provider, opts, dag, store).await;
    drop(watch_lost);
    finish(lock, r).await
}

async fn up_locked(
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    opts: ExecOptions,
    dag: Dag,
    mut store: Store,
) -> Result<Report, ExecError> {
    let scope = scope(&config);
    let plan_span = info_span!("plan");
    let observed = provider
        .observe(&scope)
        .instrument(plan_span.clone())
        .await?;
    // A state that was lost (a fresh one, never written) takes the lineage
    // its instances were labelled with, so their config hashes compare
    // equal and they are adopted rather than duplicated.
    if store.state().serial == 0 {
        let found = observed
            .iter()
            .filter_map(|i| i.lineage.clone())
            .find(|l| !l.is_empty());
        if let Some(l) = found.filter(|l| *l != store.state().lineage) {
            store.update(|s| s.lineage = l).await?;
        }
    }
    let lineage = store.state().lineage.clone();
    let plan = plan_span.in_scope(|| {
        plan::plan(
            &config,
            &dag,
            store.state(),
            &observed,
            &PlanOptions {
                targets: opts.targets.clone(),
            },
        )
    })?;
    drop(plan_span);
    let blocked = plan.blocked(opts.force);
    if !blocked.is_empty() {
        return Err(ExecError::NeedsForce(blocked.join(", ")));
    }
    let run = Arc::new(Run::new(
        config.clone(),
        provider.clone(),
        store,
        opts.clone(),
        scope,
        lineage,
    ));
    // Volumes first: services mount them.
    for v in plan
        .volumes
        .iter()
        .filter(|v| v.action == ActionKind::Create)
    {
        let id = provider.create_volume(&v.volume).await?;
        run.save(|s| {
            s.volumes.insert(
                v.volume.clone(),
                state::VolumeRecord {
                    provider_id: id,
                    created_at: state::now(),
                },
            );
        })
        .await
        .map_err(ExecError::Failed)?;
    }
    let mut results = Vec::new();
    // Deletes: dependents first.
    let deletes: Vec<plan::Action> = plan
        .actions
        .iter()
        .filter(|a| a.action == ActionKind::Delete)
        .cloned()
        .collect();
    if !deletes.is_empty() {
        for (n, r, ms) in delete_services(&run, deletes, opts.concurrency).await {
            results.push(to_result(ActionKind::Delete, n, r, ms));
        }
    }
    // Creates / updates / noops in dependency order.
    let ups: Vec<plan::Action> = plan
        .actions
        .iter()
        .filter(|a| a.action != ActionKind::Delete)
        .cloned()
        .collect();
    let kinds: HashMap<String, ActionKind> =
        ups.iter().map(|a| (a.service.clone(), a.action)).collect();
    let in_plan: std::collections::HashSet<String> =
        ups.iter().map(|a| a.service.clone()).collect();
    for a in &ups {
        if a.action != ActionKind::Noop {
            let deps: Vec<&str> = a
                .depends_on
                .iter()
                .map(String::as_str)
                .filter(|d| in_plan.contains(*d))
                .collect();
            let msg = (!deps.is_empty()).then(|| format!("waiting for {}", deps.join(", ")));
            run.emit(&a.service, Phase::Waiting, Instant::now(), msg);
        }
    }
    let nodes = ups
        .iter()
        .map(|a| {
            (
                a.service.clone(),
                a.depends_on
                    .iter()
                    .filter(|d| in_plan.contains(*d))
                    .cloned()
                    .collect(),
            )
        })
        .collect();
    let out = run_actions(
        &run,
        nodes,
        ups,
        opts.concurrency,
        opts.cancel.clone(),
        |run, action, started| async move { run.up_service(&action, started).await },
    )
    .await;
    for (n, r, ms) in out {
        results.push(to_result(kinds[&n], n, r, ms));
    }
    // Refresh recorded dependencies of unchanged services (one write).
    let stale_deps: Vec<(String, Vec<String>)> = {
        let store = run.store.lock().await;
        plan.actions
            .iter()
            .filter(|a| a.action == ActionKind::Noop)
            .filter(|a| {
                store
                    .state()
                    .resources
                    .get(&a.service)
                    .is_some_and(|r| r.depends_on != a.depends_on)
            })
            .map(|a| (a.service.clone(), a.depends_on.clone()))
            .collect()
    };
    if !stale_deps.is_empty() {
        run.save(|s| {
            for (n, d) in stale_deps {
                if let Some(r) = s.resources.get_mut(&n) {
                    r.depends_on = d;
                }
            }
        })
        .await
        .map_err(ExecError::Failed)?;
    }
    // Volume deletes (only reached with --force).
    for v in plan
        .volumes
        .iter()
        .filter(|v| v.action == ActionKind::Delete)
    {
        run.delete_volume(&v.volume).await?;
    }
    results.sort_by_key(|r| plan.actions.iter().position(|a| a.service == r.service));
    drop(run);
    if opts.cancel.is_cancelled() {
        return Err(ExecError::Cancelled);
    }
    Ok(Report { plan, results })
}

/// Stops and removes every service in state (or `targets` and their
/// dependents), dependents first.
pub async fn down(
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    opts: ExecOptions,
) -> Result<Report, ExecError> {
    let (lock, store) = begin(&config, provider.as_ref(), &opts, "down")
        .instrument(info_span!("deploy_lock"))
        .await?;
    let r = down_locked(config, provider, opts, store).await;
    finish(lock, r).await
}

async fn down_locked(
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    opts: ExecOptions,
    store: Store,
) -> Result<Report, ExecError> {
    let scope = scope(&config);
    let observed = provider
        .observe(&scope)
        .instrument(info_span!("observe"))
        .await?;
    let state = store.state().clone();
    let lineage = state.lineage.clone();
    let mut names: std::collections::BTreeSet<String> = state.resources.keys().cloned().collect();
    names.extend(observed.iter().map(|i| i.service.clone()));
    if !opts.targets.is_empty() {
        for t in &opts.targets {
            if !names.contains(t) {
                return Err(ExecError::Plan(PlanError::UnknownTarget(t.clone())));
            }
        }
        // The targets and everything that depends on them.
        let dag = Dag::from_edges(state.resources.iter().map(|(n, r)| {
            (
                n.as_str(),
                r.depends_on.iter().map(String::as_str).collect(),
            )
        }));
        let mut keep = std::collections::BTreeSet::new();
        let mut stack = opts.targets.clone();
        while let Some(n) = stack.pop() {
            if keep.insert(n.clone()) {
                stack.extend(dag.dependents(&n));
            }
        }
        names.retain(|n| keep.contains(n));
    }
    let actions: Vec<plan::Action> = names
        .iter()
        .map(|n| {
            let rec = state.resources.get(n);
            let mut stop: Vec<String> = observed
                .iter()
                .filter(|i| &i.service == n)
                .map(|i| i.id.clone())
                .collect();
            for id in rec.map(|r| r.ids()).unwrap_or_default() {
                if !stop.contains(&id) {
                    stop.push(id);
                }
            }
            plan::Action {
                service: n.clone(),
                action: ActionKind::Delete,
                reasons: vec!["down".into()],
                config_hash: None,
                fields: BTreeMap::new(),
                depends_on: rec.map(|r| r.depends_on.clone()).unwrap_or_default(),
                stop,
                keep: Vec::new(),
            }
        })
        .collect();
    let mut volumes = Vec::new();
    if opts.volumes && opts.targets.is_empty() {
        for v in state.volumes.keys() {
            volumes.push(plan::VolumeAction {
                volume: v.clone(),
                action: ActionKind::Delete,
                needs_force: false,
            });
        }
    }
    let plan = Plan {
        project: config.name.clone(),
        env: config.env.clone(),
        created_at: state::now(),
        lineage: state.lineage.clone(),
        state_serial: state.serial,
        actions: actions.clone(),
        volumes,
    };
    let run = Arc::new(Run::new(
        config.clone(),
        provider.clone(),
        store,
        opts.clone(),
        scope,
        lineage,
    ));
    let out = delete_services(&run, actions, opts.concurrency).await;
    let mut results: Vec<ServiceResult> = out
        .into_iter()
        .map(|(n, r, ms)| to_result(ActionKind::Delete, n, r, ms))
        .collect();
    for v in &plan.volumes {
        run.delete_volume(&v.volume).await?;
    }
    if opts.targets.is_empty() && results.iter().all(|r| r.error.is_none()) {
        if let Err(e) = provider.down_complete(&run.scope).await {
            tracing::warn!(error = %e, "down: cleaning up after the last instance");
        }
    }
    results.sort_by_key(|r| {
        std::cmp::Reverse(plan.actions.iter().position(|a| a.service == r.service))
    });
    drop(run);
    Ok(Report { plan, results })
}
