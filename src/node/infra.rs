//! JS bindings of the reconciliation engine: `loadConfig`, `plan`, `up`,
//! `down`, `status`, `drift`. Promise-returning, typed results, coded errors
//! (`ENKCONFIG: …`, `ENKCYCLE: …`), progress through an event callback.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{Result, Status};
use napi_derive::napi;

use super::{cancel_token, js_err, ms, AbortHandle};
use crate::config::{self, Config, LoadOptions};
use crate::engine::plan::PlanOptions;
use crate::engine::{self, EngineError, Event, EventSink, Report, RunOptions};
use crate::graph::Dag;
use crate::trace::Masker;

/// Which project and how to run it.
#[napi(object)]
#[derive(Default, Clone)]
pub struct InfraOptions {
    /// Path to nanokit.yml. Default `nanokit.yml` in the working directory.
    pub file: Option<String>,
    /// Environment (`environments.<env>`). Default `local`.
    pub env: Option<String>,
    /// Variables for `${VAR}` instead of `process.env`.
    pub vars: Option<HashMap<String, String>>,
    /// Only these services (and what they depend on; for `down`, what depends on them).
    pub services: Option<Vec<String>>,
    /// Start at most this many services at once. Default 8.
    pub concurrency: Option<u32>,
    /// Allow deleting volumes no longer in the configuration (`up`).
    pub force: Option<bool>,
    /// Wait this long for the deploy lock (ms); default: fail at once if held.
    pub lock_timeout_ms: Option<f64>,
    /// SIGTERM → SIGKILL grace period (ms). Default 10000.
    pub stop_grace_ms: Option<f64>,
    /// `down`: also delete named volumes.
    pub volumes: Option<bool>,
    /// `watch`: the full drift check's period (ms). Default 30000.
    pub interval_ms: Option<f64>,
    /// `watch`: how many pass traces to keep. Default 50.
    pub keep_traces: Option<u32>,
    /// `watch`: rotate a process service's log past this many bytes.
    /// Default 10 MiB.
    pub log_max_bytes: Option<f64>,
}

impl InfraOptions {
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            file: PathBuf::from(self.file.clone().unwrap_or_else(|| "nanokit.yml".into())),
            env: self
                .env
                .clone()
                .unwrap_or_else(|| config::DEFAULT_ENV.into()),
            vars: self.vars.clone(),
        }
    }

    fn load(&self) -> Result<Config> {
        config::load(&self.load_options()).map_err(js_err)
    }

    /// Runs an `up` / `down` as a recorded trace (`.nanokit/traces`, OTLP
    /// when configured): config load, provider, then `run`. Also returns
    /// the config's secrets, to mask the result with.
    async fn traced<F, Fut>(
        &self,
        command: &'static str,
        run: F,
    ) -> (
        std::result::Result<Report, EngineError>,
        Option<crate::trace::RunTrace>,
        Masker,
    )
    where
        F: FnOnce(Arc<Config>, Arc<dyn crate::provider::Provider>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Report, EngineError>>,
    {
        let load = self.load_options();
        let meta = crate::trace::RunMeta {
            command,
            file: load.file.clone(),
            env: load.env.clone(),
        };
        let settings = crate::trace::Settings::default();
        engine::traced(meta, settings, || config::load(&load), run).await
    }

    fn run_options(
        &self,
        events: Option<EventSink>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> RunOptions {
        RunOptions {
            concurrency: self.concurrency.unwrap_or(8).max(1) as usize,
            force: self.force.unwrap_or(false),
            targets: self.services.clone().unwrap_or_default(),
            lock_timeout: self.lock_timeout_ms.map(ms),
            stop_grace: self
                .stop_grace_ms
                .map(ms)
                .unwrap_or(Duration::from_secs(10)),
            volumes: self.volumes.unwrap_or(false),
            events,
            cancel,
            ..RunOptions::default()
        }
    }
}

#[napi(object)]
pub struct ServiceInfo {
    pub name: String,
    pub start: Option<String>,
    pub image: Option<String>,
    pub port: Option<u32>,
    pub path: String,
    pub depends_on: Vec<String>,
    /// Names of the env variables (values are never returned: they may be secrets).
    pub env_keys: Vec<String>,
    pub has_healthcheck: bool,
    pub instances: u32,
}

#[napi(object)]
pub struct ConfigInfo {
    pub name: String,
    pub env: String,
    pub file: String,
    pub provider: String,
    pub state_file: String,
    pub services: Vec<ServiceInfo>,
    /// Services disabled in this environment (`instances: 0`).
    pub disabled: Vec<String>,
    pub volumes: Vec<String>,
    /// Start order (dependencies first).
    pub order: Vec<String>,
    pub layers: Vec<Vec<String>>,
    /// `file:line:col: message` for each unknown or unsupported key.
    pub warnings: Vec<String>,
}

/// Loads, interpolates, merges and validates a nanokit.yml, and checks its
/// dependency graph. Rejects with `ENKCONFIG`, `ENKDEP` or `ENKCYCLE`.
#[napi]
pub async fn load_config(options: Option<InfraOptions>) -> Result<ConfigInfo> {
    let o = options.unwrap_or_default();
    let cfg = o.load()?;
    let dag = Dag::build(&cfg).map_err(js_err)?;
    let m = cfg.masker();
    Ok(ConfigInfo {
        name: cfg.name.clone(),
        env: cfg.env.clone(),
        file: cfg.file.to_string_lossy().into_owned(),
        provider: cfg.provider.as_str().into(),
        state_file: cfg.state_file.to_string_lossy().into_owned(),
        services: dag
            .order()
            .iter()
            .map(|n| {
                let s = &cfg.services[n];
                ServiceInfo {
                    name: s.name.clone(),
                    start: s.start.as_deref().map(|c| m.mask(c)),
                    image: s.image.clone(),
                    port: s.port.map(u32::from),
                    path: m.mask(&s.path.to_string_lossy()),
                    depends_on: s.dep_names().map(str::to_string).collect(),
                    env_keys: s.env.keys().cloned().collect(),
                    has_healthcheck: s.healthcheck.is_some(),
                    instances: s.instances,
                }
            })
            .collect(),
        disabled: cfg.disabled.clone(),
        volumes: cfg.volumes.keys().cloned().collect(),
        order: dag.order().to_vec(),
        layers: dag.layers(),
        warnings: cfg.warnings.iter().map(|w| w.to_string()).collect(),
    })
}

#[napi(object)]
pub struct PlanAction {
    pub service: String,
    /// `create`, `update`, `delete` or `noop`.
    pub action: String,
    /// Why: `new service`, `env.TOKEN changed`, …
    pub reasons: Vec<String>,
    pub config_hash: Option<String>,
    pub depends_on: Vec<String>,
}

#[napi(object)]
pub struct PlanVolume {
    pub volume: String,
    pub action: String,
    pub needs_force: bool,
}

#[napi(object)]
pub struct PlanResult {
    pub project: String,
    pub env: String,
    pub has_changes: bool,
    pub actions: Vec<PlanAction>,
    pub volumes: Vec<PlanVolume>,
    /// The plan as `nanokit plan` prints it.
    pub text: String,
    /// Where it was saved (`.nanokit/plans/latest.json`).
    pub saved_to: String,
}

fn plan_result(p: &engine::plan::Plan, saved_to: String, m: &Masker) -> PlanResult {
    PlanResult {
        project: p.project.clone(),
        env: p.env.clone(),
        has_changes: p.has_changes(),
        actions: p
            .actions
            .iter()
            .map(|a| PlanAction {
                service: a.service.clone(),
                action: a.action.as_str().into(),
                reasons: a.reasons.iter().map(|r| m.mask(r)).collect(),
                config_hash: a.config_hash.clone(),
                depends_on: a.depends_on.clone(),
            })
            .collect(),
        volumes: p
            .volumes
            .iter()
            .map(|v| PlanVolume {
                volume: v.volume.clone(),
                action: v.action.as_str().into(),
                needs_force: v.needs_force,
            })
            .collect(),
        text: m.mask(&p.render()),
        saved_to,
    }
}

/// Computes what `up` would do and saves it to `.nanokit/plans/latest.json`.
#[napi]
pub async fn plan(options: Option<InfraOptions>) -> Result<PlanResult> {
    let o = options.unwrap_or_default();
    let cfg = o.load()?;
    let m = cfg.masker();
    let targets = PlanOptions {
        targets: o.services.clone().unwrap_or_default(),
        ..PlanOptions::default()
    };
    let (p, saved) = engine::plan_and_save(&cfg, &targets)
        .await
        .map_err(|e| masked_err(e, &m))?;
    Ok(plan_result(&p, m.mask(&saved.to_string_lossy()), &m))
}

/// A progress event of `up` / `down`.
#[napi(object)]
#[derive(Clone)]
pub struct InfraEvent {
    pub service: String,
    /// waiting, starting, hook, provisioning, health, healthy, unchanged,
    /// failed, skipped, stopping, deleted, cancelled.
    pub phase: String,
    pub elapsed_ms: f64,
    pub message: Option<String>,
}

#[napi(object)]
pub struct ServiceOutcome {
    pub service: String,
    pub action: String,
    /// healthy, unchanged, deleted, failed, skipped, cancelled.
    pub outcome: String,
    pub error: Option<String>,
    pub elapsed_ms: f64,
}

#[napi(object)]
pub struct RunResult {
    pub plan: PlanResult,
    pub services: Vec<ServiceOutcome>,
    /// The run's trace id (W3C, 32 hex digits); also on rejections as
    /// `err.traceId`. None when tracing is off (`NANOKIT_TRACE=off`).
    pub trace_id: Option<String>,
    /// The run's name (`nanokit timeline <run>`).
    pub run: Option<String>,
    /// The local trace file (`.nanokit/traces/<run>.json`).
    pub trace_file: Option<String>,
}

type EventFn = ThreadsafeFunction<InfraEvent, (), InfraEvent, Status, false>;

fn sink(f: Option<EventFn>) -> Option<EventSink> {
    let f = Arc::new(f?);
    Some(Arc::new(move |e: &Event| {
        f.call(
            InfraEvent {
                service: e.service.clone(),
                phase: e.phase.as_str().into(),
                elapsed_ms: e.elapsed_ms as f64,
                message: e.message.clone(),
            },
            ThreadsafeFunctionCallMode::NonBlocking,
        );
    }))
}

/// `ENK…: message` plus the run's trace, which `errors.js` moves to
/// `err.traceId` / `err.traceFile`.
fn run_err<E: crate::error::ErrorCode + std::fmt::Display>(
    e: E,
    t: Option<&crate::trace::RunTrace>,
    m: &Masker,
) -> napi::Error {
    let mut msg = m.mask(&format!("{}: {e}", e.code()));
    if let Some(t) = t {
        msg.push_str(&format!("\n[trace {}", t.trace_id));
        if let Some(f) = &t.file {
            msg.push_str(&format!(" {}", f.display()));
        }
        msg.push(']');
    }
    napi::Error::from_reason(msg)
}

/// [`js_err`], masked.
fn masked_err<E: crate::error::ErrorCode + std::fmt::Display>(e: E, m: &Masker) -> napi::Error {
    napi::Error::from_reason(m.mask(&format!("{}: {e}", e.code())))
}

fn run_result(
    r: std::result::Result<Report, EngineError>,
    t: Option<crate::trace::RunTrace>,
    m: Masker,
) -> Result<RunResult> {
    let r = r.map_err(|e| run_err(e, t.as_ref(), &m))?;
    if let Some(msg) = r.failure_summary() {
        return Err(run_err(EngineError::Failed(msg), t.as_ref(), &m));
    }
    Ok(RunResult {
        trace_id: t.as_ref().map(|t| t.trace_id.clone()),
        run: t.as_ref().map(|t| t.run.clone()),
        trace_file: t
            .as_ref()
            .and_then(|t| t.file.as_ref())
            .map(|f| f.to_string_lossy().into_owned()),
        plan: plan_result(&r.plan, String::new(), &m),
        services: r
            .results
            .iter()
            .map(|s| ServiceOutcome {
                service: s.service.clone(),
                action: s.action.as_str().into(),
                outcome: s.outcome.as_str().into(),
                error: s.error.as_deref().map(|e| m.mask(e)),
                elapsed_ms: s.elapsed_ms as f64,
            })
            .collect(),
    })
}

/// Brings services up (each as soon as its dependencies are healthy).
/// Rejects with `ENKFAILED` naming each failed or skipped service,
/// `ENKLOCKED` when another run holds the deploy lock, `ENKFORCE` when
/// volumes would be deleted without `force`.
#[napi(
    ts_args_type = "options?: InfraOptions, onEvent?: (event: InfraEvent) => void, abort?: AbortHandle"
)]
pub async fn up(
    options: Option<InfraOptions>,
    on_event: Option<EventFn>,
    abort: Option<&AbortHandle>,
) -> Result<RunResult> {
    let o = options.unwrap_or_default();
    let cancel = cancel_token(abort);
    let opts = o.run_options(sink(on_event), cancel);
    let (r, t, m) = o
        .traced("up", |cfg, provider| engine::up(cfg, provider, opts))
        .await;
    run_result(r, t, m)
}

/// Stops and removes services, dependents first.
#[napi(ts_args_type = "options?: InfraOptions, onEvent?: (event: InfraEvent) => void")]
pub async fn down(options: Option<InfraOptions>, on_event: Option<EventFn>) -> Result<RunResult> {
    let o = options.unwrap_or_default();
    let opts = o.run_options(sink(on_event), Default::default());
    let (r, t, m) = o
        .traced("down", |cfg, provider| engine::down(cfg, provider, opts))
        .await;
    run_result(r, t, m)
}

/// How `watch` ended.
#[napi(object)]
pub struct WatchResult {
    /// Passes with something to do.
    pub passes: f64,
    /// Times it took the lease.
    pub leaderships: u32,
    /// `stopped`, or `killed` after a second `stop()`.
    pub reason: String,
}

type WatchEventFn = ThreadsafeFunction<serde_json::Value, (), serde_json::Value, Status, false>;

/// Tells the `watch` it is passed to to read nanokit.yml and `.env` again
/// now and apply them (the CLI's SIGHUP): a `configReloaded` event, then a
/// pass if anything changed.
#[napi]
pub struct ReloadHandle {
    notify: Arc<tokio::sync::Notify>,
}

#[napi]
impl ReloadHandle {
    #[napi(constructor)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        ReloadHandle {
            notify: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Asks for a reload; asks made before the watcher looks are one.
    #[napi]
    pub fn reload(&self) {
        self.notify.notify_one();
    }
}

/// Keeps the services at nanokit.yml until `stop` is aborted (gracefully:
/// the step in progress finishes, the lease is released, services keep
/// running) or `kill` is (at once); `reload` reads the configuration again.
/// Each event (a line of the watcher's event log, see
/// `engine::watch::status`) goes to `onEvent`.
#[napi(
    ts_args_type = "options?: InfraOptions, onEvent?: (event: any) => void, stop?: AbortHandle, kill?: AbortHandle, reload?: ReloadHandle"
)]
pub async fn watch(
    options: Option<InfraOptions>,
    on_event: Option<WatchEventFn>,
    stop: Option<&AbortHandle>,
    kill: Option<&AbortHandle>,
    reload: Option<&ReloadHandle>,
) -> Result<WatchResult> {
    let o = options.unwrap_or_default();
    let kill = cancel_token(kill);
    let load = o.load_options();
    let mut w = engine::watch::WatchOptions::new(Arc::new(move || config::load(&load)));
    if let Some(i) = o.interval_ms {
        w.interval = ms(i).max(Duration::from_millis(100));
    }
    if let Some(k) = o.keep_traces {
        w.keep_traces = k.max(1) as usize;
    }
    if let Some(m) = o.log_max_bytes {
        w.log_max = m.max(1.0) as u64;
    }
    w.run = o.run_options(None, cancel_token(stop));
    if let Some(f) = on_event {
        let f = Arc::new(f);
        w.on_event = Some(Arc::new(move |r| {
            if let Ok(v) = serde_json::to_value(r) {
                f.call(v, ThreadsafeFunctionCallMode::NonBlocking);
            }
        }));
    }
    w.kill = kill;
    if let Some(r) = reload {
        w.reload = r.notify.clone();
    }
    let masker = o.load().map(|c| c.masker()).unwrap_or_default();
    let end = engine::watch::watch(w)
        .await
        .map_err(|e| masked_err(e, &masker))?;
    Ok(WatchResult {
        passes: end.passes as f64,
        leaderships: end.leaderships,
        reason: end.reason,
    })
}

/// The watcher of the project (its status file, with `running`), or null
/// when none ever led it.
#[napi]
pub async fn watch_status(options: Option<InfraOptions>) -> Result<Option<serde_json::Value>> {
    let o = options.unwrap_or_default();
    let cfg = o.load()?;
    Ok(engine::watcher_of(&cfg).map(|(s, running)| {
        let mut v = serde_json::to_value(s).unwrap_or_default();
        v["running"] = running.into();
        v
    }))
}

#[napi(object)]
pub struct ServiceStatus {
    pub service: String,
    /// Recorded status (`healthy`, `failed`, …); `dead` when none of its
    /// instances is running, `degraded` when only some are.
    pub status: String,
    /// Whether every recorded instance is running.
    pub alive: bool,
    pub pid: Option<u32>,
    pub port: Option<u32>,
    /// The first instance's provider id.
    pub provider_id: Option<String>,
    /// Every recorded instance's provider id (replicas).
    pub instances: Vec<String>,
    /// How many of `instances` are running.
    pub running: u32,
    pub updated_at: String,
    pub error: Option<String>,
    /// What the watcher keeps about it: `{ policy, restarts, lastExit,
    /// nextAttempt, backoffMs, health, held, instances }`.
    pub watch: Option<serde_json::Value>,
}

/// Each recorded service's status and whether its process is alive.
#[napi]
pub async fn status(options: Option<InfraOptions>) -> Result<Vec<ServiceStatus>> {
    let o = options.unwrap_or_default();
    let cfg = o.load()?;
    let m = cfg.masker();
    let rows = engine::status_of(&cfg)
        .await
        .map_err(|e| masked_err(e, &m))?;
    Ok(rows
        .into_iter()
        .map(|r| ServiceStatus {
            service: r.service,
            status: r.status,
            alive: r.alive,
            pid: r.pid,
            port: r.port.map(u32::from),
            provider_id: r.provider_id,
            instances: r.instances,
            running: r.running as u32,
            updated_at: r.updated_at,
            error: r.error.as_deref().map(|e| m.mask(e)),
            watch: r.watch.and_then(|w| serde_json::to_value(w).ok()),
        })
        .collect())
}

#[napi(object)]
pub struct DriftItem {
    pub service: String,
    /// gone, pid_reused, config_changed, not_deployed, not_healthy, unmanaged.
    pub kind: String,
    pub detail: String,
}

#[napi(object)]
pub struct DriftResult {
    pub drifted: bool,
    pub items: Vec<DriftItem>,
}

/// Compares state with the running world.
#[napi]
pub async fn drift(options: Option<InfraOptions>) -> Result<DriftResult> {
    let o = options.unwrap_or_default();
    let cfg = o.load()?;
    let m = cfg.masker();
    let provider = engine::provider_for(&cfg).map_err(js_err)?;
    let r = engine::drift::detect(&cfg, provider.as_ref())
        .await
        .map_err(|e| masked_err(e, &m))?;
    Ok(DriftResult {
        drifted: r.drifted,
        items: r
            .items
            .into_iter()
            .map(|i| DriftItem {
                service: i.service,
                kind: serde_json::to_value(i.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                detail: m.mask(&i.detail),
            })
            .collect(),
    })
}
