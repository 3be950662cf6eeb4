//! The engine: `up`, `down`, `plan`, `status` and `drift` of a project.
//! Every run goes lock → observe → plan → apply: it takes the deploy lock
//! (kept with the state, [`crate::state::lock`]), observes what runs under
//! its labels, plans against `state.json` ([`plan`]), and applies the plan
//! over the dependency graph (`apply.rs`, `schedule.rs`), saving state after
//! every step. See docs/architecture.md.

mod apply;
pub mod drift;
mod health;
mod hooks;
mod live;
pub mod plan;
mod report;
mod run;
mod schedule;
mod status;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info_span, Instrument, Span};

use crate::config::{Config, ConfigError};
use crate::error::ErrorCode;
use crate::graph::{Dag, GraphError};
use crate::provider::process::ProcessProvider;
use crate::provider::{Instance, Provider, ProviderError, Scope};
use crate::state::lock::{self, DeployLock};
use crate::state::{self, StateError, Store};
use crate::trace::{self, Masker, RunMeta, RunTrace, Settings};
use plan::{Plan, PlanError, PlanOptions};
pub use report::{Event, EventSink, Phase, Report, ServiceResult, StepError};
use run::Run;
pub use status::{status_of, status_rows, status_with, watcher_of, StatusRow};
use watch::handover::Command as Handover;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    State(StateError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("the plan deletes volume(s) {0}, which destroys their data; re-run with --force to allow it")]
    NeedsForce(String),
    #[error("cannot save the plan: {0}")]
    SavePlan(std::io::Error),
    #[error("{0}")]
    Failed(String),
    #[error("interrupted: no new services were started; state is saved (run `nanokit up` again to finish)")]
    Cancelled,
    #[error("interrupted: the stops in progress finished, the services not reached still run; state is saved (run `nanokit down` again to finish)")]
    DownCancelled,
}

impl From<StateError> for EngineError {
    /// A deploy lock that cannot be taken is a lock error, as a file lock
    /// is everywhere; an interrupted wait for it cancels the run.
    fn from(e: StateError) -> Self {
        match e {
            StateError::Lock(e) => EngineError::Lock(e),
            StateError::Interrupted => EngineError::Cancelled,
            e => EngineError::State(e),
        }
    }
}

impl ErrorCode for EngineError {
    fn code(&self) -> &'static str {
        match self {
            EngineError::Config(e) => e.code(),
            EngineError::Graph(e) => e.code(),
            EngineError::Plan(e) => e.code(),
            EngineError::State(e) => e.code(),
            EngineError::Provider(e) => e.code(),
            EngineError::Lock(e) => e.code(),
            EngineError::NeedsForce(_) => "ENKFORCE",
            EngineError::SavePlan(_) => "ENKFAILED",
            EngineError::Failed(_) => "ENKFAILED",
            EngineError::Cancelled | EngineError::DownCancelled => "ENKCANCELLED",
        }
    }
}

/// Options of `up` / `down`.
#[derive(Clone)]
pub struct RunOptions {
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
    /// `up`: replace these services' running instances even when nothing
    /// changed ([`restart`]).
    pub restart: Vec<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
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
            restart: Vec::new(),
        }
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
            crate::provider::docker::DockerProvider::new(config, scope(config))?,
        )),
    }
}

/// The lineage a state that was lost (never written) takes: the one its
/// instances were labelled with, so that their config hashes compare equal
/// and they are adopted rather than duplicated.
fn labelled_lineage(observed: &[Instance]) -> Option<String> {
    observed
        .iter()
        .filter_map(|i| i.lineage.clone())
        .find(|l| !l.is_empty())
}

/// Computes the plan against state and the live world (no lock, no change).
pub async fn make_plan(
    config: &Config,
    provider: &dyn Provider,
    opts: &PlanOptions,
) -> Result<Plan, EngineError> {
    let dag = Dag::build(config)?;
    let mut state = state::load(config).await?;
    let observed = provider.observe(&scope(config)).await?;
    if state.serial == 0 {
        // No state yet: salt with the lineage the first state will have, as
        // `up` does (the one its instances carry when the state was lost,
        // else the one reserved for it), so this plan is the one `up` makes.
        match labelled_lineage(&observed) {
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

/// `nanokit plan`: the plan of `up` against state and the live world (no
/// lock, no change), saved to `.nanokit/plans/latest.json`.
pub async fn plan_and_save(
    config: &Config,
    opts: &PlanOptions,
) -> Result<(Plan, PathBuf), EngineError> {
    let provider = provider_for(config)?;
    let plan = make_plan(config, provider.as_ref(), opts).await?;
    let path = save_plan(config, &plan).await?;
    Ok((plan, path))
}

/// Saves `plan` to `.nanokit/plans/latest.json` (0600, secrets masked;
/// encrypted with the state's key under `infra.state_encryption`).
pub async fn save_plan(config: &Config, plan: &Plan) -> Result<PathBuf, EngineError> {
    let path = config.plan_file();
    let mut bytes =
        serde_json::to_vec_pretty(&config.masker().to_json(plan)).expect("plan serializes");
    bytes.push(b'\n');
    let codec = state::crypt::Codec::of(config.state_encryption.as_ref());
    let head = state::crypt::Head {
        serial: 0,
        lineage: "plan".into(),
        epoch: 0,
    };
    let bytes = codec.seal(&bytes, &head).await?;
    crate::sys::private::write(&path, &bytes).map_err(EngineError::SavePlan)?;
    Ok(path)
}

/// Takes the deploy lock and opens the state, wherever it lives. When the
/// lock was taken over from a run that died holding it, first lets the
/// runtime finish what that run had asked of it ([`Provider::settle`]), so
/// that what it creates late is seen now.
async fn begin(
    config: &Config,
    provider: &dyn Provider,
    opts: &RunOptions,
    what: &str,
    pending: &lock::Pending,
) -> Result<(DeployLock, Store), EngineError> {
    let label = format!("nanokit {what} ({} / {})", config.name, config.env);
    let (lock, store) = pending
        .lock(config, &label, opts.lock_timeout, &opts.cancel)
        .await?;
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

/// A run that found the deploy lock held (`locked`): handed to the watcher
/// that holds it, when one leads this project from this host
/// ([`watch::handover`]); else `locked`.
async fn hand_over(
    config: &Config,
    command: Handover,
    opts: &RunOptions,
    locked: EngineError,
) -> Result<Report, EngineError> {
    match watch::handover::leader(config) {
        Some(w) => {
            let span = info_span!("handover", nanokit.watcher.pid = w.leader.pid);
            watch::handover::hand_over(config, command, opts, &w)
                .instrument(span)
                .await
        }
        None => Err(locked),
    }
}

/// Releases the deploy lock whatever `r` is (a failure to release is only
/// logged: the lock then expires or is cleared with `infra unlock`).
async fn finish<T>(lock: DeployLock, r: Result<T, EngineError>) -> Result<T, EngineError> {
    if let Err(e) = lock.release().await {
        tracing::warn!("cannot release the deploy lock: {e}");
    }
    r
}

/// Brings the world to `config`: plan, then execute.
pub async fn up(
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    opts: RunOptions,
) -> Result<Report, EngineError> {
    up_as(config, provider, opts, Handover::Up).await
}

/// `up`, handed to a leading watcher as `command` (an `up`, or a
/// `restart` of `opts.restart`).
async fn up_as(
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    opts: RunOptions,
    command: Handover,
) -> Result<Report, EngineError> {
    let dag = info_span!("graph").in_scope(|| Dag::build(&config))?;
    let scope = scope(&config);
    let pending = lock::prepare(&config)
        .instrument(info_span!("state.open"))
        .await?;
    // The world is observed before the lock is taken when the lock may prove
    // that nobody held it since `prepare` (then nobody deployed meanwhile):
    // the lock is then held for planning and applying alone. When it does
    // not prove it, the world is observed again under the lock.
    let ahead = match pending.may_prove_undisturbed() {
        true => Some(
            provider
                .observe(&scope)
                .instrument(info_span!("observe"))
                .await,
        ),
        false => None,
    };
    let locked = begin(
        &config,
        provider.as_ref(),
        &opts,
        command.as_str(),
        &pending,
    )
    .instrument(info_span!("deploy_lock"))
    .await;
    let (lock, store) = match locked {
        Err(e) if e.code() == "ENKLOCKED" => return hand_over(&config, command, &opts, e).await,
        r => r?,
    };
    let observed = ahead
        .and_then(Result::ok)
        .filter(|_| pending.undisturbed(&lock));
    // A lost deploy lease (broken by `infra unlock`, taken over, expired)
    // stops the run like Ctrl-C: nothing new starts.
    let watch_lost = cancel_on_loss(&lock, &opts);
    let r = up_locked(config, provider, opts, dag, store, scope, observed).await;
    drop(watch_lost);
    finish(lock, r).await
}

async fn up_locked(
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    opts: RunOptions,
    dag: Dag,
    mut store: Store,
    scope: Scope,
    observed: Option<Vec<Instance>>,
) -> Result<Report, EngineError> {
    let plan_span = info_span!("plan");
    let observed = match observed {
        Some(o) => o,
        None => {
            provider
                .observe(&scope)
                .instrument(plan_span.clone())
                .await?
        }
    };
    if store.state().serial == 0 {
        let found = labelled_lineage(&observed);
        if let Some(l) = found.filter(|l| *l != store.state().lineage) {
            store.update(|s| s.lineage = l).await?;
        }
    }
    let lineage = store.state().lineage.clone();
    let targets = PlanOptions {
        targets: opts.targets.clone(),
        restart: opts.restart.clone(),
    };
    let plan =
        plan_span.in_scope(|| plan::plan(&config, &dag, store.state(), &observed, &targets))?;
    drop(plan_span);
    let blocked = plan.blocked(opts.force);
    if !blocked.is_empty() {
        return Err(EngineError::NeedsForce(blocked.join(", ")));
    }
    let run = Arc::new(Run::new(
        config,
        provider,
        store,
        opts.clone(),
        scope,
        lineage,
    ));
    let results = apply::up(&run, &plan).await?;
    if let Some(e) = run.take_stale() {
        return Err(e.into());
    }
    drop(run);
    if opts.cancel.is_cancelled() {
        return Err(EngineError::Cancelled);
    }
    Ok(Report { plan, results })
}

/// Restarts `services`: an `up` of them (and of what they depend on, which
/// is left as it is when in place) that replaces their running instances
/// as an update would (`recreate` or `rolling`), with hooks and health
/// gates. Their dependents keep running. While a watcher leads, it is
/// handed to the watcher, which does the same.
pub async fn restart(
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    services: Vec<String>,
    mut opts: RunOptions,
) -> Result<Report, EngineError> {
    opts.targets = services.clone();
    opts.restart = services;
    up_as(config, provider, opts, Handover::Restart).await
}

/// Stops and removes every service in state (or `targets` and their
/// dependents), dependents first.
pub async fn down(
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    opts: RunOptions,
) -> Result<Report, EngineError> {
    let locked = async {
        let pending = lock::prepare(&config).await?;
        begin(&config, provider.as_ref(), &opts, "down", &pending).await
    };
    let (lock, store) = match locked.instrument(info_span!("deploy_lock")).await {
        Err(e) if e.code() == "ENKLOCKED" => {
            return hand_over(&config, Handover::Down, &opts, e).await
        }
        r => r?,
    };
    let watch_lost = cancel_on_loss(&lock, &opts);
    let r = down_locked(config, provider, opts, store).await;
    drop(watch_lost);
    finish(lock, r).await
}

async fn down_locked(
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    opts: RunOptions,
    store: Store,
) -> Result<Report, EngineError> {
    let store = Arc::new(tokio::sync::Mutex::new(store));
    down_shared(config, provider, opts, store).await
}

/// `down` on a state whose deploy lock the caller holds (and keeps).
async fn down_shared(
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    opts: RunOptions,
    store: Arc<tokio::sync::Mutex<Store>>,
) -> Result<Report, EngineError> {
    let scope = scope(&config);
    let observed = provider
        .observe(&scope)
        .instrument(info_span!("observe"))
        .await?;
    let (plan, lineage) = {
        let s = store.lock().await;
        let state = s.state();
        let plan = plan::down_plan(&config, state, &observed, &opts.targets, opts.volumes)?;
        (plan, state.lineage.clone())
    };
    let run = Arc::new(Run::shared(
        config,
        provider,
        store,
        opts.clone(),
        scope,
        lineage,
    ));
    let results = apply::down(&run, &plan, opts.targets.is_empty()).await?;
    if let Some(e) = run.take_stale() {
        return Err(e.into());
    }
    drop(run);
    if opts.cancel.is_cancelled() {
        return Err(EngineError::DownCancelled);
    }
    Ok(Report { plan, results })
}

/// A lost deploy lease (broken by `infra unlock`, taken over, expired)
/// stops the run like Ctrl-C: nothing new starts. Watched until dropped.
fn cancel_on_loss(lock: &DeployLock, opts: &RunOptions) -> AbortOnDrop {
    let (lost, cancel) = (lock.lost_token(), opts.cancel.clone());
    AbortOnDrop(tokio::spawn(async move {
        lost.cancelled().await;
        cancel.cancel();
    }))
}

/// Aborts a background task when dropped (every exit path of a run).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Loads the configuration with `load` inside a `config.load` span, adds
/// its secrets to the run's masker, and notes the project and provider on
/// the run's root span (the current span).
pub fn load_config<E: std::fmt::Display>(
    load: impl FnOnce() -> Result<Config, E>,
) -> Result<Config, E> {
    let root = Span::current();
    let span = info_span!("config.load");
    let r = span.in_scope(load);
    match &r {
        Ok(c) => {
            trace::add_run_secrets(&c.masker());
            trace::set(&root, "nanokit.project", c.name.clone());
            trace::set(&root, "nanokit.provider", c.provider.as_str());
            trace::set(&span, "nanokit.services", c.services.len() as i64);
        }
        Err(e) => trace::fail(&span, &e.to_string()),
    }
    r
}

/// A whole traced run, as the CLI and the JS API make it: records a trace
/// (local file, OTLP when configured), loads the configuration with `load`,
/// makes its provider, then runs `run` (`up` or `down`). Also returns the
/// configuration's masker, for what the caller prints or returns.
pub async fn traced<L, F, Fut>(
    meta: RunMeta,
    settings: Settings,
    load: L,
    run: F,
) -> (Result<Report, EngineError>, Option<RunTrace>, Masker)
where
    L: FnOnce() -> Result<Config, ConfigError>,
    F: FnOnce(Arc<Config>, Arc<dyn Provider>) -> Fut,
    Fut: std::future::Future<Output = Result<Report, EngineError>>,
{
    let mask = std::sync::Mutex::new(Masker::default());
    let (r, t) = trace::record_run(meta, settings, async {
        let cfg = load_config(load)?;
        *mask.lock().unwrap_or_else(|e| e.into_inner()) = cfg.masker();
        let provider = provider_for(&cfg)?;
        run(Arc::new(cfg), provider).await
    })
    .await;
    let mask = mask.into_inner().unwrap_or_else(|e| e.into_inner());
    (r, t, mask)
}

/// What a traced run does.
#[derive(Debug, Clone)]
pub enum Command {
    Up,
    Down,
    /// Restart these services ([`restart`]).
    Restart(Vec<String>),
}

impl Command {
    /// Its name in the trace (`nanokit up`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Up => "up",
            Command::Down => "down",
            Command::Restart(_) => "restart",
        }
    }
}

/// Loads the configuration of a run.
pub type Load<'a> = Box<dyn FnOnce() -> Result<Config, ConfigError> + Send + 'a>;

/// [`traced`] of one [`Command`]: the one instance of the whole traced run
/// that the CLI's commands and the hub share (each distinct closure given
/// to `traced` is a copy of the run in the binary).
pub async fn run_traced(
    file: PathBuf,
    env: String,
    settings: Settings,
    load: Load<'_>,
    command: Command,
    opts: RunOptions,
) -> (Result<Report, EngineError>, Option<RunTrace>, Masker) {
    let meta = RunMeta {
        command: command.name(),
        file,
        env,
    };
    // Boxed, as the run is big and its callers many.
    Box::pin(traced(meta, settings, load, |cfg, provider| async move {
        match command {
            Command::Up => up(cfg, provider, opts).await,
            Command::Down => down(cfg, provider, opts).await,
            Command::Restart(services) => restart(cfg, provider, services, opts).await,
        }
    }))
    .await
}
