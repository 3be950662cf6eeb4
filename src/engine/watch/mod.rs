//! `nanokit watch`: keeps the world at nanokit.yml.
//!
//! One watcher leads: it holds the deploy lock as a lease (renewed in the
//! background) for as long as it watches; another waits as a standby and
//! takes over when the lease is freed, its holder died (at once on the same
//! host) or it expired. Every state write carries the lease's epoch, so a
//! leader that was paused past its lease cannot overwrite its successor's
//! state: its write is refused and it turns standby.
//!
//! The leader makes an initial `up`, then runs passes when told to, never
//! by sleeping in a loop ([`sources`]): an instance ended (a pidfd per
//! process, Docker's event stream filtered by labels), a health check
//! failed, nanokit.yml or `.env` changed, a `nanokit up`/`down` was handed
//! to it ([`handover`]), SIGHUP (the CLI), and a full drift check every
//! `interval` as the safety net (which also applies an edit of nanokit.yml
//! or `.env` no file event told of). A pass observes and plans as `up` does and applies only what
//! drifted and is due ([`select`]): configuration changes at once, runtime
//! losses per the service's restart policy and backoff ([`policy`]), with
//! the hooks and health gates of `up`; each pass with something to do
//! writes one trace (the last `keep_traces` are kept). Its status and
//! events are written for other processes ([`status`]).
//!
//! Stopping (SIGTERM, `stop()`) lets the current step finish (a step is cut
//! at its own timeout), releases the lease and leaves services running.

pub mod handover;
mod policy;
mod select;
mod sources;
pub mod status;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Mutex as AsyncMutex;
use tokio_util::sync::CancellationToken;

use super::plan::{self, ActionKind, PlanOptions};
use super::report::{Event, Phase, Report};
use super::run::Run;
use super::{apply, scope, EngineError, RunOptions};
use crate::config::{Config, ConfigError, ProviderKind};
use crate::graph::Dag;
use crate::provider::{Exit, ExitKind, Happening, Provider, Scope};
use crate::state::lock::DeployLock;
use crate::state::{self, Store};
use crate::trace;
use policy::{Decision, Tracker};
use select::{drift_of, select, Drift};
use sources::{Files, Input, Watched, Watches};
use status::{
    EventLog, EventRecord, Health, LastExit, Leader, PassOutcome, PassReason, PassSummary, Role,
    ServiceWatch, WatchEvent, WatchStatus,
};

/// How long nanokit.yml must stay unchanged before it is read again.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// How soon a restart that a pass could not take up is tried again.
const PASS_RETRY: Duration = Duration::from_secs(1);

/// How often the sizes of process logs are looked at.
const LOG_CHECK: Duration = Duration::from_secs(10);

/// The longest wait that still ends (about 30 years).
const FOREVER: Duration = Duration::from_secs(1_000_000_000);

/// What a watcher is told about its events.
pub type WatchSink = Arc<dyn Fn(&EventRecord) + Send + Sync>;

/// How to watch.
#[derive(Clone)]
pub struct WatchOptions {
    /// Loads the configuration; called again when nanokit.yml or its
    /// `.env` changes (an error then keeps the last good one).
    pub load: Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>,
    /// The full drift check's period.
    pub interval: Duration,
    /// How many pass traces to keep.
    pub keep_traces: usize,
    /// Process logs past this size are rotated.
    pub log_max: u64,
    /// The steps of each pass (`up`'s options); `cancel` stops the watcher
    /// gracefully, `events` is not used (see `on_event`).
    pub run: RunOptions,
    /// Told of everything the watcher sees and does.
    pub on_event: Option<WatchSink>,
    /// How passes are traced (`command` is `watch`).
    pub trace: trace::Settings,
    /// Stops at once: the pass in progress is dropped where it is (state
    /// stays consistent: every write is atomic), the lease released.
    pub kill: CancellationToken,
    /// Notified: nanokit.yml is read again and applied at once, as an edit
    /// the file watcher saw would be (the CLI's SIGHUP).
    pub reload: Arc<tokio::sync::Notify>,
}

impl WatchOptions {
    pub fn new(load: Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>) -> Self {
        WatchOptions {
            load,
            interval: Duration::from_secs(30),
            keep_traces: 50,
            log_max: 10 << 20,
            run: RunOptions::default(),
            on_event: None,
            trace: trace::Settings::default(),
            kill: CancellationToken::new(),
            reload: Arc::new(tokio::sync::Notify::new()),
        }
    }
}

/// How a watcher ended.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchEnd {
    /// Passes with something to do, over all its leaderships.
    pub passes: u64,
    /// Times it took the lease.
    pub leaderships: u32,
    pub reason: String,
}

/// Watches until `opts.run.cancel` is cancelled: standby until it holds
/// the lease, then leads (an initial `up`, then passes) until it stops or
/// loses the lease, and so on.
pub async fn watch(opts: WatchOptions) -> Result<WatchEnd, EngineError> {
    let config = (opts.load)()?;
    let kill = opts.kill.clone();
    let mut w = Watcher::new(opts, config)?;
    w.read = w.files_read();
    let mut leaderships = 0;
    let run = watch_until_stopped(&mut w, &mut leaderships);
    let killed = tokio::select! {
        r = run => {
            r?;
            false
        }
        _ = kill.cancelled() => true,
    };
    if killed {
        // The loop was dropped where it was: release the lease it held and
        // say it stopped.
        if let Some(lock) = w.lock.take() {
            if let Err(e) = lock.release().await {
                tracing::warn!("cannot release the deploy lock: {e}");
            }
        }
        let (path, _) = w.paths();
        status::mark_stopped(&path, std::process::id());
    }
    w.emit(WatchEvent::Stopped {
        reason: if killed {
            "stopped at once: the lease is released; services keep running".into()
        } else {
            "stopped: the lease is released; services keep running".into()
        },
    });
    Ok(WatchEnd {
        passes: w.total_passes,
        leaderships,
        reason: if killed { "killed" } else { "stopped" }.into(),
    })
}

async fn watch_until_stopped(w: &mut Watcher, leaderships: &mut u32) -> Result<(), EngineError> {
    loop {
        let (lock, store) = match w.acquire().await {
            Ok(held) => held,
            Err(EngineError::Cancelled) => break,
            Err(e) => return Err(e),
        };
        *leaderships += 1;
        match w.lead(lock, store).await {
            Led::Stopped => break,
            Led::Lost(why) => {
                w.emit(WatchEvent::LeadershipLost { reason: why });
                w.emitter().stop_leading();
            }
        }
    }
    Ok(())
}

/// How a leadership ended.
enum Led {
    Stopped,
    Lost(String),
}

/// What a pass is for.
#[derive(Debug, Clone)]
struct Ask {
    reason: PassReason,
    /// Restore every runtime loss now (the initial `up`, a user's `up`),
    /// except services a user stopped; or only these (with targets).
    restore_all: bool,
    targets: Vec<String>,
    /// Restarts that came due.
    due: BTreeSet<String>,
    request: Option<String>,
    /// Also apply volume deletions (a user's `up --force`).
    force: bool,
    /// Replace the running instances of these (a user's `restart`).
    restart: Vec<String>,
}

impl Ask {
    fn new(reason: PassReason) -> Ask {
        Ask {
            reason,
            restore_all: false,
            targets: Vec::new(),
            due: BTreeSet::new(),
            request: None,
            force: false,
            restart: Vec::new(),
        }
    }
}

/// How a pass went, for its caller.
struct Passed {
    /// A state write was refused: another watcher leads now.
    stale: bool,
    report: Option<Report>,
    error: Option<String>,
}

/// Events to the log and the caller's sink.
struct Emitter {
    seq: u64,
    epoch: u64,
    log: Option<EventLog>,
    sink: Option<WatchSink>,
    mask: crate::trace::Masker,
}

impl Emitter {
    fn emit(&mut self, mut event: WatchEvent) {
        // The other events' texts are masked where they are made.
        if let WatchEvent::Problem { message } = &mut event {
            *message = self.mask.mask(message);
        }
        self.seq += 1;
        let record = EventRecord {
            seq: self.seq,
            at: state::now(),
            pid: std::process::id(),
            epoch: self.epoch,
            event,
        };
        if let Some(log) = &mut self.log {
            log.append(&record);
        }
        if let Some(sink) = &self.sink {
            sink(&record);
        }
    }

    fn stop_leading(&mut self) {
        self.log = None;
    }
}

struct Watcher {
    opts: WatchOptions,
    stop: CancellationToken,
    config: Arc<Config>,
    dag: Dag,
    provider: Arc<dyn Provider>,
    scope: Scope,
    label: String,
    emitter: Arc<Mutex<Emitter>>,
    trackers: BTreeMap<String, Tracker>,
    started_at: String,
    leader_since: String,
    total_passes: u64,
    passes: u64,
    last_pass: Option<PassSummary>,
    last_check: Option<String>,
    next_full: Instant,
    /// Instances whose end was taken into account.
    dead: HashSet<String>,
    /// Instances a user asked the runtime to stop or kill.
    killed: HashSet<String>,
    /// Running services to replace at their restart (why).
    replace: BTreeMap<String, String>,
    store: Option<Arc<AsyncMutex<Store>>>,
    /// The last status written (not written again unchanged).
    written: Option<WatchStatus>,
    /// While leading: the lease.
    lock: Option<DeployLock>,
    /// While leading: the per-instance watches and where they report.
    watches: Watches,
    inputs: Option<sources::Sender>,
    /// What nanokit.yml and `.env` held when last read (a hash).
    read: u64,
}

impl Watcher {
    fn new(opts: WatchOptions, config: Config) -> Result<Watcher, EngineError> {
        let dag = Dag::build(&config)?;
        let provider = super::provider_for(&config)?;
        let scope = scope(&config);
        let label = format!("nanokit watch ({} / {})", config.name, config.env);
        let emitter = Emitter {
            seq: 0,
            epoch: 0,
            log: None,
            sink: opts.on_event.clone(),
            mask: config.masker(),
        };
        Ok(Watcher {
            stop: opts.run.cancel.clone(),
            config: Arc::new(config),
            dag,
            provider,
            scope,
            label,
            emitter: Arc::new(Mutex::new(emitter)),
            trackers: BTreeMap::new(),
            started_at: state::now(),
            leader_since: String::new(),
            total_passes: 0,
            passes: 0,
            last_pass: None,
            last_check: None,
            next_full: Instant::now(),
            dead: HashSet::new(),
            killed: HashSet::new(),
            replace: BTreeMap::new(),
            store: None,
            written: None,
            lock: None,
            watches: Watches::default(),
            inputs: None,
            read: 0,
            opts,
        })
    }

    /// A hash of what nanokit.yml and its `.env` hold now (through
    /// symbolic links: a Kubernetes ConfigMap's file is one).
    fn files_read(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let file = self.config.file_abs();
        let env = file.parent().map(|d| d.join(".env"));
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::fs::read(&file).ok().hash(&mut h);
        env.and_then(|e| std::fs::read(e).ok()).hash(&mut h);
        h.finish()
    }

    fn emitter(&self) -> std::sync::MutexGuard<'_, Emitter> {
        self.emitter.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: WatchEvent) {
        self.emitter().emit(event);
    }

    /// Waits for the lease (saying who holds it meanwhile) and opens the
    /// state under it. `Cancelled` when stopped while waiting.
    async fn acquire(&mut self) -> Result<(DeployLock, Store), EngineError> {
        use crate::error::ErrorCode;
        let config = self.config.clone();
        let lock =
            |timeout| crate::state::lock::lock_state(&config, &self.label, timeout, &self.stop);
        let held = match lock(None).await.map_err(EngineError::from) {
            Err(held_by) if held_by.code() == "ENKLOCKED" => {
                self.standby(held_by.to_string());
                lock(Some(FOREVER)).await?
            }
            r => r?,
        };
        if held.0.recovered() {
            let _ = self.provider.settle(&self.scope).await;
        }
        Ok(held)
    }

    fn standby(&self, held_by: String) {
        self.emit(WatchEvent::Standby {
            holder: Some(held_by),
        });
    }

    fn paths(&self) -> (PathBuf, PathBuf) {
        let work = self.config.work_dir();
        (
            status::status_path(&work, &self.config.env),
            status::events_path(&work, &self.config.env),
        )
    }

    /// Leads until stopped or the lease is lost.
    async fn lead(&mut self, lock: DeployLock, store: Store) -> Led {
        let epoch = lock.epoch();
        let lost = lock.lost_token();
        {
            let (_, events) = self.paths();
            let mut e = self.emitter();
            e.epoch = epoch;
            e.log = Some(EventLog::new(events));
        }
        self.emit(WatchEvent::LeadershipAcquired {
            holder: self.label.clone(),
        });
        self.store = Some(Arc::new(AsyncMutex::new(store)));
        self.leader_since = state::now();
        self.passes = 0;
        self.dead.clear();
        self.killed.clear();
        self.replace.clear();
        self.trackers.clear();
        self.sync_trackers();
        self.carry_over();
        // Readers know who leads from now on (also during the initial pass).
        self.written = None;
        self.write_status(epoch, Role::Leader).await;
        // Kept beside the loop, not in it: a watcher stopped at once drops
        // the loop and still releases the lease (`watch`).
        self.lock = Some(lock);
        let led = self.lead_locked(epoch, &lost).await;
        let lock = self.lock.take().expect("the lease is kept while leading");
        // Stopped or lost: the sources end with this scope's tasks.
        match &led {
            Led::Stopped => {
                self.write_status(epoch, Role::Stopped).await;
                if let Err(e) = lock.release().await {
                    tracing::warn!("cannot release the deploy lock: {e}");
                }
            }
            Led::Lost(_) => drop(lock),
        }
        self.store = None;
        led
    }

    async fn lead_locked(&mut self, epoch: u64, lost: &CancellationToken) -> Led {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Input>(256);
        self.inputs = Some(tx.clone());
        self.watches = Watches::default();
        let requests = handover::requests_dir(&self.config);
        let _ = crate::sys::private::dir(&requests);
        let files = match Files::start(&self.config.file_abs(), &requests) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("cannot watch nanokit.yml for changes ({e}): they are applied at the next full check");
                None
            }
        };
        let never = Arc::new(tokio::sync::Notify::new());
        let (config_changed, requested) = match &files {
            Some(f) => (f.config.clone(), f.requests.clone()),
            None => (never.clone(), never.clone()),
        };
        let reload = self.opts.reload.clone();
        let mut stream = self.connect(&tx).await;
        let mut stream_retry: Option<(Instant, Duration)> = None;
        let mut config_at: Option<Instant> = None;
        let mut next_log = Instant::now() + LOG_CHECK;
        self.next_full = Instant::now() + self.opts.interval;
        let mut initial = Ask::new(PassReason::Initial);
        initial.restore_all = true;
        if self.pass(initial, epoch).await.stale {
            return Led::Lost(stale_reason(epoch));
        }
        // Requests that came while it was not leading.
        let mut serve_requests = true;
        loop {
            if self.stop.is_cancelled() {
                return Led::Stopped;
            }
            if lost.is_cancelled() {
                return Led::Lost("the lease was lost (cleared with `nanokit infra unlock`, or taken over after it expired)".into());
            }
            self.sync_watches().await;
            self.write_status(epoch, Role::Leader).await;
            if serve_requests {
                serve_requests = false;
                if self.serve_requests(epoch).await {
                    return Led::Lost(stale_reason(epoch));
                }
                continue;
            }
            let now = Instant::now();
            let mut deadline = self.next_full.min(next_log);
            for t in self.trackers.values() {
                for at in [t.due, t.reset_due()].into_iter().flatten() {
                    deadline = deadline.min(at);
                }
            }
            if let Some(at) = config_at {
                deadline = deadline.min(at);
            }
            if let Some((at, _)) = stream_retry {
                deadline = deadline.min(at);
            }
            tokio::select! {
                _ = self.stop.cancelled() => return Led::Stopped,
                _ = lost.cancelled() => continue,
                input = rx.recv() => {
                    if let Some(i) = input {
                        self.on_input(i, &mut stream, &mut stream_retry).await;
                        while let Ok(i) = rx.try_recv() {
                            self.on_input(i, &mut stream, &mut stream_retry).await;
                        }
                    }
                }
                _ = config_changed.notified() => config_at = Some(Instant::now() + DEBOUNCE),
                _ = reload.notified() => config_at = Some(Instant::now()),
                _ = requested.notified() => serve_requests = true,
                _ = tokio::time::sleep_until(deadline.max(now).into()) => {}
            }
            let now = Instant::now();
            if let Some((at, delay)) = stream_retry {
                if at <= now {
                    stream = self.connect(&tx).await;
                    stream_retry = if stream.is_some() {
                        // Events were missed meanwhile.
                        self.next_full = now;
                        None
                    } else {
                        let next = (delay * 2).min(Duration::from_secs(30));
                        Some((now + next, next))
                    };
                }
            }
            let mut stale = false;
            if config_at.is_some_and(|at| at <= now) {
                config_at = None;
                if self.reload() {
                    stale |= self.pass(Ask::new(PassReason::Config), epoch).await.stale;
                }
            }
            for (name, t) in self.trackers.iter_mut() {
                if t.settle_healthy(now) {
                    let service = name.clone();
                    self.emitter
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .emit(WatchEvent::BackoffReset { service });
                }
            }
            let due: BTreeSet<String> = self
                .trackers
                .iter()
                .filter(|(_, t)| t.due.is_some_and(|at| at <= now))
                .map(|(n, _)| n.clone())
                .collect();
            if !stale && !due.is_empty() {
                let mut ask = Ask::new(PassReason::Restart);
                ask.due = due.clone();
                stale |= self.pass(ask, epoch).await.stale;
                // A pass that could not take up a due restart (its state
                // write failed, say) tries again in a second, not at once:
                // a due time left in the past would run pass after pass.
                let retry = Instant::now() + PASS_RETRY;
                for (_, t) in self.trackers.iter_mut().filter(|(s, _)| due.contains(*s)) {
                    if t.due.is_some_and(|at| at <= now) {
                        t.due = Some(retry);
                    }
                }
            }
            if !stale && self.next_full <= now {
                self.next_full = now + self.opts.interval;
                // Edits no file event told of (a file behind a symbolic link
                // swapped elsewhere, as a ConfigMap's; NFS, from another
                // host): applied now.
                if config_at.is_none() && self.files_read() != self.read && self.reload() {
                    stale |= self.pass(Ask::new(PassReason::Config), epoch).await.stale;
                }
                stale |= self
                    .pass(Ask::new(PassReason::FullCheck), epoch)
                    .await
                    .stale;
            }
            if next_log <= now {
                next_log = now + LOG_CHECK;
                self.cap_logs();
            }
            if stale {
                return Led::Lost(stale_reason(epoch));
            }
        }
    }

    /// Subscribes to the runtime's event stream, if it has one.
    async fn connect(&self, tx: &sources::Sender) -> Option<crate::engine::AbortOnDrop> {
        match self.provider.events(&self.scope).await {
            Ok(Some(stream)) => Some(sources::forward(stream, tx.clone())),
            Ok(None) => None,
            Err(e) => {
                self.emit(WatchEvent::Problem {
                    message: format!("cannot follow the runtime's events ({e}); retrying"),
                });
                None
            }
        }
    }

    /// A tracker for every configured service, with its current policy.
    fn sync_trackers(&mut self) {
        for svc in self.config.services.values() {
            let t = self
                .trackers
                .entry(svc.name.clone())
                .or_insert_with(|| Tracker::new(svc.restart, svc.restart_backoff_max));
            t.policy = svc.restart;
            t.max_delay = svc.restart_backoff_max;
        }
    }

    /// Takes over what the previous watcher of this project wrote: restart
    /// counts, last exits, and the services a user stopped under
    /// `unless-stopped` (which stay stopped, as Docker keeps them across a
    /// daemon restart).
    fn carry_over(&mut self) {
        let Ok(Some(old)) = status::read_status(&self.config.work_dir(), &self.config.env) else {
            return;
        };
        if old.project != self.config.name {
            return;
        }
        for (name, s) in old.services {
            let Some(t) = self.trackers.get_mut(&name) else {
                continue;
            };
            t.restarts = s.restarts;
            t.last_exit = s.last_exit.as_ref().map(|e| (e.exit.clone(), e.at.clone()));
            let by_user = s
                .last_exit
                .as_ref()
                .is_some_and(|e| matches!(e.exit.kind, ExitKind::Stopped | ExitKind::Removed));
            if let (Some(why), true, crate::config::RestartPolicy::UnlessStopped) =
                (s.held, by_user, t.policy)
            {
                t.hold(why);
            }
        }
    }

    /// Reads the configuration again; false (and an event) when it is
    /// invalid: the last good one stays.
    fn reload(&mut self) -> bool {
        self.read = self.files_read();
        let loaded = (self.opts.load)()
            .map_err(|e| e.to_string())
            .and_then(|c| Dag::build(&c).map(|d| (c, d)).map_err(|e| e.to_string()));
        match loaded {
            Err(e) => {
                let error = self.config.masker().mask(&e);
                self.emit(WatchEvent::ConfigReloaded { error: Some(error) });
                false
            }
            Ok((config, dag)) => {
                if config.provider != self.config.provider
                    || config.volumes.len() != self.config.volumes.len()
                {
                    match super::provider_for(&config) {
                        Ok(p) => self.provider = p,
                        Err(e) => {
                            self.emit(WatchEvent::ConfigReloaded {
                                error: Some(e.to_string()),
                            });
                            return false;
                        }
                    }
                }
                self.emitter().mask = config.masker();
                self.config = Arc::new(config);
                self.dag = dag;
                self.sync_trackers();
                self.emit(WatchEvent::ConfigReloaded { error: None });
                true
            }
        }
    }

    /// The service of recorded instance `id`, if it is one.
    async fn service_of(&self, id: &str) -> Option<String> {
        let store = self.store.as_ref()?.lock().await;
        store
            .state()
            .resources
            .iter()
            .find(|(_, r)| r.ids().iter().any(|i| i == id))
            .map(|(n, _)| n.clone())
    }

    async fn on_input(
        &mut self,
        input: Input,
        stream: &mut Option<crate::engine::AbortOnDrop>,
        retry: &mut Option<(Instant, Duration)>,
    ) {
        match input {
            Input::Exited { id, exit } => {
                if let Some(service) = self.service_of(&id).await {
                    self.death(&service, &id, exit);
                }
            }
            Input::Runtime(ev) => {
                if self.service_of(&ev.id).await.as_deref() != Some(ev.service.as_str()) {
                    // Not (or no longer) an instance of ours: our own stops,
                    // removals and replaced instances.
                    self.killed.remove(&ev.id);
                    return;
                }
                match ev.what {
                    Happening::Killed => {
                        self.killed.insert(ev.id);
                    }
                    Happening::Died(mut exit) => {
                        if self.killed.remove(&ev.id) {
                            exit.kind = ExitKind::Stopped;
                        }
                        self.death(&ev.service, &ev.id, exit);
                    }
                    Happening::Stopped => {
                        self.death(&ev.service, &ev.id, Exit::new(ExitKind::Stopped))
                    }
                    Happening::Removed => {
                        self.death(&ev.service, &ev.id, Exit::new(ExitKind::Removed))
                    }
                    Happening::Health { healthy: false } => {
                        self.replace.insert(
                            ev.service.clone(),
                            "the runtime's health check failed".into(),
                        );
                        self.death(&ev.service, &ev.id, Exit::new(ExitKind::Unhealthy))
                    }
                    Happening::Health { healthy: true } => {}
                }
            }
            Input::StreamLost(why) => {
                *stream = None;
                self.emit(WatchEvent::Problem {
                    message: format!("lost the runtime's event stream ({why}); reconnecting"),
                });
                *retry = Some((
                    Instant::now() + Duration::from_secs(1),
                    Duration::from_secs(1),
                ));
            }
            Input::Probe {
                service,
                id,
                ok,
                output,
                retries,
            } => {
                if self.service_of(&id).await.as_deref() != Some(service.as_str())
                    || self.dead.contains(&id)
                {
                    return;
                }
                let Some(t) = self.trackers.get_mut(&service) else {
                    return;
                };
                if ok {
                    t.probe_failures = 0;
                    return;
                }
                t.probe_failures += 1;
                let failures = t.probe_failures;
                let output = self.config.masker().mask(&output);
                self.emit(WatchEvent::HealthFailed {
                    service: service.clone(),
                    instance: id.clone(),
                    failures,
                    retries,
                    output,
                });
                if failures >= retries {
                    self.replace.insert(
                        service.clone(),
                        format!("its health check failed {failures} time(s) in a row"),
                    );
                    self.death(&service, &id, Exit::new(ExitKind::Unhealthy));
                }
            }
        }
    }

    /// Instance `id` of `service` ended with `exit` (once per instance):
    /// restart per the policy, or hold.
    fn death(&mut self, service: &str, id: &str, exit: Exit) {
        tracing::debug!(service, instance = id, "ended: {exit}");
        if !self.dead.insert(id.to_string()) {
            // Told again (a `stop` after the `die`): only what a user did
            // can change the verdict, and only before the restart.
            return;
        }
        self.emit(WatchEvent::ServiceExited {
            service: service.to_string(),
            instance: id.to_string(),
            text: exit.to_string(),
            exit: exit.clone(),
        });
        self.decide(service, &exit);
    }

    /// Judges a death of `service` by its policy; schedules or holds.
    fn decide(&mut self, service: &str, exit: &Exit) {
        let now = Instant::now();
        let Some(t) = self.trackers.get_mut(service) else {
            return;
        };
        let decision = t.on_death(exit, now);
        let event = match decision {
            Decision::Restart { attempt, delay } => WatchEvent::RestartScheduled {
                service: service.to_string(),
                attempt,
                delay_ms: delay.as_millis() as u64,
                due_at: wall(now + delay),
            },
            Decision::Hold(reason) => {
                self.replace.remove(service);
                WatchEvent::Held {
                    service: service.to_string(),
                    reason,
                }
            }
        };
        self.emit(event);
    }

    /// One pass: observe, plan, take what is due, apply it traced.
    async fn pass(&mut self, ask: Ask, epoch: u64) -> Passed {
        let nothing = Passed {
            stale: false,
            report: None,
            error: None,
        };
        let Some(store) = self.store.clone() else {
            return nothing;
        };
        tracing::debug!(reason = ?ask.reason, due = ?ask.due, "pass");
        // A restart looks at the recorded instances only; other passes at
        // everything under the scope's labels (orphans too).
        let observing = if ask.reason == PassReason::Restart {
            let ids: Vec<String> = store
                .lock()
                .await
                .state()
                .resources
                .values()
                .flat_map(|r| r.ids())
                .collect();
            self.provider.observe_recorded(&self.scope, &ids).await
        } else {
            self.provider.observe(&self.scope).await
        };
        let observed = match observing {
            // What an event said ended is not running, whatever a lagging
            // list says (Docker's reports a container killed a moment ago
            // as running).
            Ok(mut o) => {
                for i in o.iter_mut().filter(|i| self.dead.contains(&i.id)) {
                    i.running = false;
                }
                o
            }
            Err(e) => {
                // The runtime is away: look again soon.
                self.emit(WatchEvent::Problem {
                    message: format!("cannot observe the services ({e}); trying again in 1 s"),
                });
                let retry = Instant::now() + PASS_RETRY;
                for s in &ask.due {
                    if let Some(t) = self.trackers.get_mut(s) {
                        t.due = Some(retry);
                    }
                }
                self.next_full = self.next_full.min(retry);
                return Passed {
                    error: Some(e.to_string()),
                    ..nothing
                };
            }
        };
        let (state, lineage) = {
            let mut s = store.lock().await;
            if s.state().serial == 0 {
                if let Some(l) =
                    super::labelled_lineage(&observed).filter(|l| *l != s.state().lineage)
                {
                    if let Err(e) = s.update(|st| st.lineage = l).await {
                        return Passed {
                            stale: is_stale(&e),
                            report: None,
                            error: Some(e.to_string()),
                        };
                    }
                }
            }
            (s.state().clone(), s.state().lineage.clone())
        };
        let targets = PlanOptions {
            targets: ask.targets.clone(),
            restart: ask.restart.clone(),
        };
        let mut full = match plan::plan(&self.config, &self.dag, &state, &observed, &targets) {
            Ok(p) => p,
            Err(e) => {
                return Passed {
                    error: Some(e.to_string()),
                    ..nothing
                }
            }
        };
        // What a policy holds stays as it is, even when the configuration
        // would create it (after `nanokit down`, it has no record), unless
        // a user's `up` names it.
        full.actions.retain(|a| {
            a.action == ActionKind::Delete
                || ask.targets.contains(&a.service)
                || self
                    .trackers
                    .get(&a.service)
                    .is_none_or(|t| t.held.is_none())
        });
        let now = Instant::now();
        let mut take = BTreeSet::new();
        let mut found = Vec::new();
        for a in full.actions.iter().filter(|a| a.action != ActionKind::Noop) {
            if drift_of(a, &state) != Drift::Runtime {
                continue;
            }
            let name = &a.service;
            let t = self.trackers.get(name);
            let held = t.is_some_and(|t| t.held.is_some());
            let wanted = ask.restore_all && (!held || ask.targets.contains(name));
            if wanted || ask.due.contains(name) {
                take.insert(name.clone());
            } else if t.is_some_and(|t| t.held.is_none() && t.due.is_none()) {
                found.push(a.clone());
            }
        }
        // Losses no event told of: judged as deaths now.
        if !found.is_empty() {
            let items = found
                .iter()
                .map(|a| status::Drift {
                    service: a.service.clone(),
                    detail: a.reasons.join("; "),
                })
                .collect();
            self.emit(WatchEvent::DriftFound { items });
            for a in &found {
                for id in state
                    .resources
                    .get(&a.service)
                    .map(|r| r.ids())
                    .unwrap_or_default()
                {
                    self.dead.insert(id);
                }
                let exit = Exit::new(ExitKind::Gone);
                self.emit(WatchEvent::ServiceExited {
                    service: a.service.clone(),
                    instance: String::new(),
                    text: exit.to_string(),
                    exit: exit.clone(),
                });
                self.decide(&a.service, &exit);
                if self.trackers[&a.service].due.is_some_and(|d| d <= now) {
                    take.insert(a.service.clone());
                }
            }
        }
        let replace_now: BTreeMap<String, String> = self
            .replace
            .iter()
            .filter(|(s, _)| take.contains(*s) || ask.due.contains(*s))
            .map(|(s, w)| (s.clone(), w.clone()))
            .collect();
        let sel = select(&full, &state, &self.config, &take, &replace_now, ask.force);
        for s in take.iter().chain(ask.due.iter()) {
            if let Some(t) = self.trackers.get_mut(s) {
                t.restarting();
            }
            self.replace.remove(s);
        }
        if ask.reason == PassReason::FullCheck {
            self.last_check = Some(state::now());
        }
        // What runs unchanged is healthy.
        for a in full.actions.iter().filter(|a| a.action == ActionKind::Noop) {
            if sel.plan.actions.iter().any(|b| b.service == a.service) {
                continue;
            }
            if let Some(t) = self.trackers.get_mut(&a.service) {
                if t.healthy_since.is_none() && t.due.is_none() && t.held.is_none() {
                    t.on_healthy(now);
                }
            }
        }
        if sel.is_empty() {
            // Nothing to do: no trace. The initial pass and a request still
            // say they are done.
            if matches!(ask.reason, PassReason::Initial | PassReason::Request) {
                self.passes += 1;
                let number = self.passes;
                self.emit(WatchEvent::PassStarted {
                    pass: number,
                    reason: ask.reason,
                    services: ask.targets.clone(),
                    request: ask.request.clone(),
                    trace_id: None,
                });
                // Told in the status as any pass is (with no run: nothing
                // was done, so no trace was written).
                let at = state::now();
                self.last_pass = Some(PassSummary {
                    pass: number,
                    reason: ask.reason,
                    started_at: at.clone(),
                    finished_at: at,
                    outcome: PassOutcome::Ok,
                    changed: Vec::new(),
                    failed: Vec::new(),
                    run: None,
                    trace_id: None,
                });
                self.sync_watches().await;
                self.write_status(epoch, Role::Leader).await;
                self.emit(WatchEvent::PassFinished {
                    pass: number,
                    outcome: PassOutcome::Ok,
                    changed: Vec::new(),
                    failed: Vec::new(),
                    run: None,
                    trace_id: None,
                    trace_file: None,
                    elapsed_ms: 0,
                });
                return Passed {
                    report: Some(Report {
                        plan: sel.plan,
                        results: Vec::new(),
                    }),
                    ..nothing
                };
            }
            return nothing;
        }
        let restarted: BTreeSet<String> = sel
            .restored
            .iter()
            .chain(sel.replaced.keys())
            .filter(|s| state.resources.contains_key(*s) && ask.reason != PassReason::Initial)
            .cloned()
            .collect();
        for s in &restarted {
            if let Some(t) = self.trackers.get_mut(s) {
                t.restarts += 1;
            }
        }
        for (service, dependents) in &sel.released {
            self.emit(WatchEvent::DependentsReleased {
                service: service.clone(),
                dependents: dependents.clone(),
            });
        }
        self.passes += 1;
        self.total_passes += 1;
        let number = self.passes;
        let started = state::now();
        let t0 = Instant::now();
        let run = Arc::new(Run::shared(
            self.config.clone(),
            self.provider.clone(),
            store.clone(),
            self.run_options(),
            self.scope.clone(),
            lineage,
        ));
        let services: Vec<String> = if ask.due.is_empty() {
            ask.targets.clone()
        } else {
            ask.due.iter().cloned().collect()
        };
        let meta = trace::RunMeta {
            command: "watch",
            file: self.config.file_abs(),
            env: self.config.env.clone(),
        };
        let applied = {
            let (emitter, plan, full) = (self.emitter.clone(), sel.plan.clone(), full.clone());
            let (reason, request) = (ask.reason, ask.request.clone());
            let run = run.clone();
            async move {
                emitter
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .emit(WatchEvent::PassStarted {
                        pass: number,
                        reason,
                        services,
                        request,
                        trace_id: trace::traceparent()
                            .and_then(|t| t.split('-').nth(1).map(str::to_string)),
                    });
                let results = apply::up(&run, &plan).await?;
                apply::refresh_dependencies(&run, &full).await?;
                Ok::<_, EngineError>(Report { plan, results })
            }
        };
        let (out, tr) = trace::record_run(meta, self.opts.trace.clone(), applied).await;
        let stale = out.as_ref().err().is_some_and(engine_stale) || run_stale(&run);
        let mut changed = Vec::new();
        let mut failed = Vec::new();
        if let Ok(report) = &out {
            for r in &report.results {
                match r.outcome {
                    Phase::Healthy | Phase::Deleted => changed.push(r.service.clone()),
                    Phase::Failed | Phase::Skipped => failed.push(r.service.clone()),
                    _ => {}
                }
            }
            let ids: BTreeMap<String, Vec<String>> = store
                .lock()
                .await
                .state()
                .resources
                .iter()
                .map(|(n, r)| (n.clone(), r.ids()))
                .collect();
            self.settle_results(report, &restarted, &ids, now);
        }
        let outcome = match &out {
            _ if stale || self.stop.is_cancelled() => PassOutcome::Cancelled,
            Ok(r) if r.failures().is_empty() => PassOutcome::Ok,
            _ => PassOutcome::Failed,
        };
        if let Some(f) = tr.as_ref().and_then(|t| t.file.as_ref()) {
            if let Some(dir) = f.parent() {
                crate::trace::file::prune(dir, "watch", self.opts.keep_traces.max(1));
            }
        }
        self.last_pass = Some(PassSummary {
            pass: number,
            reason: ask.reason,
            started_at: started,
            finished_at: state::now(),
            outcome,
            changed: changed.clone(),
            failed: failed.clone(),
            run: tr.as_ref().map(|t| t.run.clone()),
            trace_id: tr.as_ref().map(|t| t.trace_id.clone()),
        });
        // Once it is told finished, its instances are watched and the
        // status file shows it.
        self.sync_watches().await;
        self.write_status(epoch, Role::Leader).await;
        self.emit(WatchEvent::PassFinished {
            pass: number,
            outcome,
            changed,
            failed,
            run: tr.as_ref().map(|t| t.run.clone()),
            trace_id: tr.as_ref().map(|t| t.trace_id.clone()),
            trace_file: tr
                .as_ref()
                .and_then(|t| t.file.as_ref())
                .map(|f| f.display().to_string()),
            elapsed_ms: t0.elapsed().as_millis() as u64,
        });
        let error = out.as_ref().err().map(|e| e.to_string());
        Passed {
            stale,
            report: out.ok(),
            error,
        }
    }

    /// What each service of a pass came to: healthy ones are settled;
    /// failed or skipped ones are judged by their policy again.
    fn settle_results(
        &mut self,
        report: &Report,
        restarted: &BTreeSet<String>,
        ids: &BTreeMap<String, Vec<String>>,
        now: Instant,
    ) {
        for r in &report.results {
            let name = &r.service;
            match r.outcome {
                Phase::Healthy => {
                    let runtime = restarted.contains(name);
                    if let Some(t) = self.trackers.get_mut(name) {
                        if !runtime {
                            t.reset();
                        }
                        t.on_healthy(now);
                        if runtime {
                            let attempt = t.streak;
                            let instances = report
                                .plan
                                .actions
                                .iter()
                                .find(|a| &a.service == name)
                                .map(|_| ids.get(name).cloned().unwrap_or_default())
                                .unwrap_or_default();
                            self.emit(WatchEvent::Restarted {
                                service: name.clone(),
                                attempt,
                                instances,
                            });
                        }
                    }
                }
                Phase::Deleted if !self.config.services.contains_key(name) => {
                    self.trackers.remove(name);
                }
                Phase::Failed | Phase::Skipped => {
                    if restarted.contains(name) {
                        let attempt = self.trackers.get(name).map_or(0, |t| t.streak);
                        self.emit(WatchEvent::RestartFailed {
                            service: name.clone(),
                            attempt,
                            error: r.error.clone().unwrap_or_default(),
                        });
                    }
                    self.decide(name, &Exit::new(ExitKind::Failed));
                }
                _ => {}
            }
        }
    }

    fn run_options(&self) -> RunOptions {
        let emitter = self.emitter.clone();
        let progress: super::EventSink = Arc::new(move |e: &Event| {
            if matches!(e.phase, Phase::Unchanged | Phase::Waiting) {
                return;
            }
            emitter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .emit(WatchEvent::Progress {
                    service: e.service.clone(),
                    phase: e.phase.as_str().into(),
                    elapsed_ms: e.elapsed_ms,
                    message: e.message.clone(),
                });
        });
        RunOptions {
            events: Some(progress),
            cancel: self.stop.child_token(),
            lock_timeout: None,
            targets: Vec::new(),
            ..self.opts.run.clone()
        }
    }

    /// Watches each recorded instance (its exit; its health, where the
    /// runtime does not check it).
    async fn sync_watches(&mut self) {
        let (Some(store), Some(tx)) = (self.store.clone(), self.inputs.clone()) else {
            return;
        };
        let recorded: Vec<(String, Vec<String>)> = store
            .lock()
            .await
            .state()
            .resources
            .iter()
            .map(|(n, r)| (n.clone(), r.ids()))
            .collect();
        // What is no longer recorded is forgotten.
        let known: HashSet<&String> = recorded.iter().flat_map(|(_, ids)| ids).collect();
        self.dead.retain(|id| known.contains(id));
        self.killed.retain(|id| known.contains(id));
        let probing = !self.provider.reports_health();
        let spec_run = Run::shared(
            self.config.clone(),
            self.provider.clone(),
            store.clone(),
            RunOptions::default(),
            self.scope.clone(),
            String::new(),
        );
        let mut now = Vec::new();
        for (service, ids) in recorded {
            let svc = self.config.services.get(&service);
            let healthy = self
                .trackers
                .get(&service)
                .is_some_and(|t| t.healthy_since.is_some());
            for id in ids {
                if self.dead.contains(&id) {
                    continue;
                }
                let probe = match (svc, probing && healthy) {
                    (Some(svc), true) => svc
                        .healthcheck
                        .clone()
                        .map(|h| (spec_run.spec(svc, "", 1), h)),
                    _ => None,
                };
                now.push(Watched {
                    service: service.clone(),
                    id,
                    probe,
                });
            }
        }
        self.watches.sync(&self.provider, now, &tx);
    }

    /// Rotates process logs past their cap.
    fn cap_logs(&self) {
        if self.config.provider != ProviderKind::Process {
            return;
        }
        for name in self.config.services.keys() {
            let log = self.config.log_file(name);
            if let Err(e) = sources::cap_log(&log, self.opts.log_max) {
                tracing::warn!("cannot rotate {}: {e}", log.display());
            }
        }
    }

    /// Serves the `nanokit up` / `restart` / `down` requests handed to this
    /// watcher; true when a state write was refused (it leads no more).
    async fn serve_requests(&mut self, epoch: u64) -> bool {
        for req in handover::take(&self.config) {
            self.emit(WatchEvent::Request {
                id: req.id.clone(),
                command: req.command.as_str().into(),
                services: req.services.clone(),
            });
            let (result, stale) = match req.command {
                handover::Command::Up | handover::Command::Restart => {
                    for t in self.trackers.iter_mut() {
                        if req.services.is_empty() || req.services.contains(t.0) {
                            t.1.reset();
                        }
                    }
                    let mut ask = Ask::new(PassReason::Request);
                    ask.restore_all = true;
                    ask.targets = req.services.clone();
                    ask.request = Some(req.id.clone());
                    ask.force = req.force;
                    if req.command == handover::Command::Restart {
                        // As `engine::restart`: an up of them that replaces
                        // their running instances.
                        ask.restart = req.services.clone();
                    }
                    let p = self.pass(ask, epoch).await;
                    let r = match (p.report, p.error) {
                        (Some(r), _) => Ok(r),
                        (None, Some(e)) => Err(e),
                        (None, None) => Err("nothing was done".into()),
                    };
                    (r, p.stale)
                }
                handover::Command::Down => self.down(&req).await,
            };
            handover::answer(&self.config, &req, result);
            if stale {
                return true;
            }
        }
        false
    }

    /// A handed-over `down`: the services go, and stay down (held) until a
    /// `nanokit up` of them.
    async fn down(&mut self, req: &handover::Request) -> (Result<Report, String>, bool) {
        let Some(store) = self.store.clone() else {
            return (Err("not leading".into()), false);
        };
        let mut opts = self.run_options();
        opts.targets = req.services.clone();
        opts.volumes = req.volumes;
        let r = super::down_shared(self.config.clone(), self.provider.clone(), opts, store).await;
        let stale = r.as_ref().err().is_some_and(engine_stale);
        if let Ok(report) = &r {
            for res in &report.results {
                if res.outcome == Phase::Deleted {
                    let why = "stopped by `nanokit down` (until `nanokit up`)".to_string();
                    if let Some(t) = self.trackers.get_mut(&res.service) {
                        t.last_exit = Some((Exit::new(ExitKind::Stopped), state::now()));
                        t.hold(why.clone());
                        t.healthy_since = None;
                        self.replace.remove(&res.service);
                        self.emit(WatchEvent::Held {
                            service: res.service.clone(),
                            reason: why,
                        });
                    }
                }
            }
        }
        (r.map_err(|e| e.to_string()), stale)
    }

    /// Writes the status file when it changed.
    async fn write_status(&mut self, epoch: u64, role: Role) {
        let Some(store) = &self.store else { return };
        let me = crate::sys::host::this_host();
        let recorded: BTreeMap<String, Vec<String>> = store
            .lock()
            .await
            .state()
            .resources
            .iter()
            .map(|(n, r)| (n.clone(), r.ids()))
            .collect();
        let services = self
            .trackers
            .iter()
            .map(|(name, t)| {
                let health = if t.held.is_some() {
                    Health::Down
                } else if t.due.is_some() {
                    Health::BackingOff
                } else if t.healthy_since.is_some() {
                    if t.probe_failures > 0 {
                        Health::Unhealthy
                    } else {
                        Health::Healthy
                    }
                } else if recorded.contains_key(name) {
                    Health::Starting
                } else {
                    Health::Unknown
                };
                let sw = ServiceWatch {
                    policy: t.policy.to_string(),
                    restarts: t.restarts,
                    last_exit: t.last_exit.clone().map(|(exit, at)| LastExit {
                        at,
                        text: exit.to_string(),
                        exit,
                    }),
                    next_attempt: t.due.map(wall),
                    backoff_ms: t.delay.map(|d| d.as_millis() as u64),
                    health,
                    held: t.held.clone(),
                    instances: recorded.get(name).cloned().unwrap_or_default(),
                };
                (name.clone(), sw)
            })
            .collect();
        let mut status = WatchStatus {
            version: status::STATUS_VERSION,
            project: self.config.name.clone(),
            env: self.config.env.clone(),
            file: self.config.file_abs().display().to_string(),
            role,
            leader: Leader {
                holder: self.label.clone(),
                pid: me.pid,
                pid_start: me.pid_start,
                host: me.hostname.clone(),
                host_id: me.id.clone(),
                epoch,
                since: self.leader_since.clone(),
            },
            started_at: self.started_at.clone(),
            interval_ms: self.opts.interval.as_millis() as u64,
            last_pass: self.last_pass.clone(),
            last_check: self.last_check.clone(),
            next_full_check: (role == Role::Leader).then(|| wall(self.next_full)),
            passes: self.passes,
            services,
            updated_at: String::new(),
        };
        if let Some(old) = &self.written {
            let mut same = old.clone();
            same.updated_at = String::new();
            if same == status {
                return;
            }
        }
        status.updated_at = state::now();
        let (path, _) = self.paths();
        if let Err(e) = status::write_status(&path, &status) {
            tracing::warn!("cannot write the watcher's status {}: {e}", path.display());
        }
        status.updated_at = String::new();
        self.written = Some(status);
    }
}

/// Wall-clock time of monotonic instant `at`, for display.
fn wall(at: Instant) -> String {
    let now = Instant::now();
    let t = if at >= now {
        SystemTime::now() + (at - now)
    } else {
        SystemTime::now() - (now - at)
    };
    humantime::format_rfc3339_millis(t).to_string()
}

fn stale_reason(epoch: u64) -> String {
    format!("a state write of epoch {epoch} was refused: another watcher took over the lease")
}

/// Whether `e` is a state write refused because another holder took over.
fn is_stale(e: &crate::state::StateError) -> bool {
    e.is_stale()
}

fn engine_stale(e: &EngineError) -> bool {
    matches!(e, EngineError::State(s) if s.is_stale())
}

/// Whether a save of `run` was refused as stale (it then started nothing
/// new: see `Run::save`).
fn run_stale(run: &Run) -> bool {
    run.take_stale().is_some()
}
