//! The live view: sections recomputed when what they show may have changed
//! and published as versioned snapshots that every open page follows.
//!
//! What makes a section be recomputed: a change notification in the
//! directories it is read from (state, deploy lock, traces, the watcher's
//! status, repositories, the key/value files), an action of the hub, a page
//! connecting, and a poll while at least one page is open: liveness of the
//! services every 400 ms (every second when a watcher keeps each
//! environment and reports deaths itself), the rest every few seconds (what
//! another host changes on a shared file system is not notified). While no
//! page is open the loop sleeps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::project::Project;
use super::view;
use super::watch::Watcher;
use super::HubOptions;
use crate::sys::notify::DirWatch;
use crate::trace::Masker;

pub(super) const SERVICES: u32 = 1;
pub(super) const LOCKS: u32 = 1 << 1;
pub(super) const RUNS: u32 = 1 << 2;
pub(super) const STATE: u32 = 1 << 3;
pub(super) const DRIFT: u32 = 1 << 4;
pub(super) const META: u32 = 1 << 5;
pub(super) const ACTIVITY: u32 = 1 << 6;
/// The configuration's directory changed: reload it if the file did.
const CONFIG: u32 = 1 << 7;
/// A service log changed (log streams follow it).
const LOGS: u32 = 1 << 8;
pub(super) const ALL: u32 = SERVICES | LOCKS | RUNS | STATE | DRIFT | META | ACTIVITY;

/// Liveness poll while a page is open: a change shows within 500 ms. (The
/// poll's cost is the provider's `inspect` of each instance: for a process,
/// reading its `/proc` stat and environment; at 250 ms, 20 services cost
/// 0.53 % of a core, at 400 ms about a third of a percent.)
const POLL: Duration = Duration::from_millis(400);
/// … and when a watcher keeps every environment.
const POLL_WATCHED: Duration = Duration::from_secs(1);
/// The other sections' polls (changes on a shared file system made
/// elsewhere, holders that died, expiries).
const POLL_LOCKS: Duration = Duration::from_secs(2);
const POLL_STATE: Duration = Duration::from_secs(3);
const POLL_RUNS: Duration = Duration::from_secs(5);
const POLL_DRIFT: Duration = Duration::from_secs(10);
/// Change notifications closer together than this are handled together.
const DEBOUNCE: Duration = Duration::from_millis(10);

/// A published view: every section, and a version that grows with each
/// change.
#[derive(Debug, Clone, Default)]
pub(super) struct Snapshot {
    pub version: u64,
    /// Each section by name (a handful: looked up by a walk).
    pub sections: Vec<(&'static str, Arc<Value>)>,
}

impl Snapshot {
    pub(super) fn get(&self, name: &str) -> Option<&Arc<Value>> {
        self.sections
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    fn set(&mut self, name: &'static str, value: Arc<Value>) {
        match self.sections.iter_mut().find(|(n, _)| *n == name) {
            Some(s) => s.1 = value,
            None => self.sections.push((name, value)),
        }
    }
}

/// One hub action in progress.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Running {
    id: u64,
    action: String,
    env: String,
    services: Vec<String>,
    started_at_ms: i64,
    /// Service → its last progress event.
    phases: BTreeMap<String, Value>,
}

/// Actions of the hub running now, with each service's progress (how one
/// ended is the answer to its POST).
#[derive(Default, Serialize)]
pub(super) struct Activity {
    #[serde(skip)]
    next_id: u64,
    running: Vec<Running>,
}

impl Activity {
    /// The progress of each service of `env` in the actions running.
    pub(super) fn phases(&self, env: &str) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        for r in self.running.iter().filter(|r| r.env == env) {
            for (svc, p) in &r.phases {
                out.insert(svc.clone(), p.clone());
            }
        }
        out
    }
}

/// The hub itself: the project it shows, and why the configuration could
/// not be loaded again (the last good one stays shown).
#[derive(Serialize)]
struct Meta<'a> {
    project: Option<&'a str>,
    errors: &'a [Value],
}

struct Shared {
    opts: HubOptions,
    envs: Vec<String>,
    projects: RwLock<Vec<Arc<Project>>>,
    masker: RwLock<Masker>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    dirty: AtomicU32,
    /// Requests made ([`Live::request`]), and the last one a finished round
    /// included.
    asked: AtomicU64,
    served: watch::Sender<u64>,
    kick: Notify,
    activity: Mutex<Activity>,
    logs: watch::Sender<u64>,
    /// Configuration reload failures, shown on the page.
    errors: Mutex<Vec<Value>>,
    stop: CancellationToken,
}

/// The live view, shared by the server's handlers.
#[derive(Clone)]
pub(super) struct Live {
    shared: Arc<Shared>,
}

impl Live {
    /// Loads each environment and starts the loop that keeps the view.
    pub(super) fn start(
        opts: HubOptions,
        envs: Vec<String>,
        stop: CancellationToken,
    ) -> Result<Live, super::HubError> {
        let projects = envs
            .iter()
            .map(|e| Project::load(&opts, e).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let masker = merged_masker(&projects);
        let watcher = DirWatch::new().map_err(super::HubError::Watch)?;
        let shared = Arc::new(Shared {
            opts,
            envs,
            projects: RwLock::new(projects),
            masker: RwLock::new(masker),
            snapshot: watch::Sender::new(Arc::new(Snapshot::default())),
            dirty: AtomicU32::new(ALL),
            asked: AtomicU64::new(0),
            served: watch::Sender::new(0),
            kick: Notify::new(),
            activity: Mutex::new(Activity::default()),
            logs: watch::Sender::new(0),
            errors: Mutex::new(Vec::new()),
            stop,
        });
        super::spawn(run(shared.clone(), watcher));
        Ok(Live { shared })
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared.snapshot.subscribe()
    }

    /// Asks for `groups` to be recomputed now; returns the request's
    /// number, which [`Live::served`] reaches once a round included it.
    pub(super) fn request(&self, groups: u32) -> u64 {
        // The groups before the number: a round that reads the number
        // then takes the groups sees them.
        self.shared.dirty.fetch_or(groups, Ordering::SeqCst);
        let n = self.shared.asked.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.kick.notify_one();
        n
    }

    /// The last request a finished round included.
    pub(super) fn served(&self) -> watch::Receiver<u64> {
        self.shared.served.subscribe()
    }

    pub(super) fn projects(&self) -> Vec<Arc<Project>> {
        self.shared
            .projects
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn project(&self, env: &str) -> Option<Arc<Project>> {
        self.projects().into_iter().find(|p| p.env == env)
    }

    pub(super) fn masker(&self) -> Masker {
        self.shared
            .masker
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn opts(&self) -> &HubOptions {
        &self.shared.opts
    }

    pub(super) fn stop(&self) -> &CancellationToken {
        &self.shared.stop
    }

    /// Bumped whenever a service log may have grown.
    pub(super) fn logs_changed(&self) -> watch::Receiver<u64> {
        self.shared.logs.subscribe()
    }

    /// Records the start of an action; returns its id.
    pub(super) fn action_started(&self, action: &str, env: &str, services: &[String]) -> u64 {
        let mut a = self.activity();
        a.next_id += 1;
        let id = a.next_id;
        a.running.push(Running {
            id,
            action: action.to_string(),
            env: env.to_string(),
            services: services.to_vec(),
            started_at_ms: view::now_ms(),
            phases: BTreeMap::new(),
        });
        drop(a);
        self.request(ACTIVITY | SERVICES);
        id
    }

    /// Records a progress event of action `id`.
    pub(super) fn action_progress(&self, id: u64, service: &str, event: Value) {
        let mut a = self.activity();
        if let Some(r) = a.running.iter_mut().find(|r| r.id == id) {
            r.phases.insert(service.to_string(), event);
        }
        drop(a);
        self.request(ACTIVITY | SERVICES);
    }

    /// Records that action `id` ended.
    pub(super) fn action_done(&self, id: u64) {
        self.activity().running.retain(|r| r.id != id);
        self.request(ALL);
    }

    fn activity(&self) -> std::sync::MutexGuard<'_, Activity> {
        self.shared
            .activity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

fn merged_masker(projects: &[Arc<Project>]) -> Masker {
    projects
        .iter()
        .fold(Masker::default(), |m, p| m.merged(&p.config.masker()))
}

/// Directories to watch and the sections each feeds.
fn watch_plan(shared: &Shared) -> Vec<(PathBuf, u32)> {
    let projects = shared.projects.read().unwrap_or_else(|e| e.into_inner());
    let mut plan: Vec<(PathBuf, u32)> = Vec::new();
    let mut add = |p: PathBuf, g: u32| match plan.iter_mut().find(|(d, _)| *d == p) {
        Some((_, groups)) => *groups |= g,
        None => plan.push((p, g)),
    };
    for p in projects.iter() {
        let cfg = &p.config;
        add(cfg.dir.clone(), CONFIG);
        add(cfg.work_dir(), SERVICES | LOCKS | DRIFT);
        if let Some(state_dir) = cfg.state_file.parent() {
            add(state_dir.to_path_buf(), SERVICES | LOCKS | DRIFT);
        }
        add(crate::trace::traces_dir(&cfg.file), RUNS);
        add(crate::engine::watch::status::dir(&cfg.work_dir()), SERVICES);
        add(cfg.work_dir().join("logs").join(&cfg.env), LOGS);
    }
    for r in &shared.opts.repos {
        for sub in ["", ".locks", ".staging", ".sentinels", "node_modules"] {
            add(
                if sub.is_empty() {
                    r.clone()
                } else {
                    r.join(sub)
                },
                LOCKS,
            );
        }
    }
    if shared.opts.state.resolved_url().is_none() {
        if let Ok(d) = shared.opts.state.resolved_state_dir() {
            add(d, STATE);
        }
    }
    plan
}

/// The loop that keeps the view (see the module's header).
async fn run(shared: Arc<Shared>, mut dirs: DirWatch) {
    let mut plan: Vec<(PathBuf, u32)> = Vec::new();
    let mut plan_checked = Instant::now() - Duration::from_secs(60);
    let mut runs_cache = Vec::new();
    let mut config_seen = config_mtimes(&shared);
    let mut watched = false;
    let now = Instant::now();
    let mut due: [(u32, Duration, Instant); 4] = [
        (LOCKS, POLL_LOCKS, now),
        (STATE, POLL_STATE, now),
        (RUNS, POLL_RUNS, now),
        (DRIFT, POLL_DRIFT, now),
    ];
    let mut next_poll = now;
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        if shared.snapshot.receiver_count() == 0 {
            // Nobody looks: sleep until a page connects.
            tokio::select! {
                _ = shared.kick.notified() => {}
                _ = shared.stop.cancelled() => return,
            }
            continue;
        }
        if plan_checked.elapsed() >= Duration::from_secs(1) {
            plan = watch_plan(&shared);
            for (d, _) in &plan {
                let _ = dirs.add(d);
            }
            plan_checked = Instant::now();
        }
        let mut asked = shared.asked.load(Ordering::SeqCst);
        let mut groups = shared.dirty.swap(0, Ordering::SeqCst);
        if groups == 0 {
            let wake = tokio::time::Instant::from_std(
                due.iter().map(|d| d.2).fold(next_poll, Instant::min),
            );
            tokio::select! {
                _ = shared.stop.cancelled() => return,
                _ = shared.kick.notified() => {}
                _ = tokio::time::sleep_until(wake) => {}
                changed = dirs.changed() => {
                    let mut changed = changed.unwrap_or_default();
                    tokio::time::sleep(DEBOUNCE).await;
                    if let Ok(Ok(more)) = tokio::time::timeout(Duration::ZERO, dirs.changed()).await {
                        changed.extend(more);
                    }
                    for d in changed {
                        groups |= plan.iter().filter(|(p, _)| *p == d).fold(0, |g, (_, x)| g | x);
                    }
                }
            }
            asked = shared.asked.load(Ordering::SeqCst);
            groups |= shared.dirty.swap(0, Ordering::SeqCst);
        }
        let now = Instant::now();
        if now >= next_poll {
            groups |= SERVICES;
        }
        for d in due.iter_mut() {
            if now >= d.2 {
                groups |= d.0;
            }
        }
        if groups & LOGS != 0 {
            shared.logs.send_modify(|n| *n += 1);
        }
        if groups & CONFIG != 0 {
            let seen = config_mtimes(&shared);
            if seen != config_seen {
                config_seen = seen;
                reload(&shared);
                groups |= ALL;
            }
        }
        if groups & SERVICES != 0 {
            next_poll = now + if watched { POLL_WATCHED } else { POLL };
        }
        for d in due.iter_mut() {
            if groups & d.0 != 0 {
                d.2 = now + d.1;
            }
        }
        if groups & ALL != 0 {
            let (services_changed, all_watched) = recompute(&shared, groups, &mut runs_cache).await;
            watched = all_watched.unwrap_or(watched);
            if services_changed && groups & DRIFT == 0 {
                // What died or came back is drift too: next round.
                shared.dirty.fetch_or(DRIFT, Ordering::SeqCst);
            }
        }
        shared.served.send_if_modified(|s| {
            let newer = asked > *s;
            *s = (*s).max(asked);
            newer
        });
    }
}

/// Modification times of each environment's nanokit.yml and `.env`.
fn config_mtimes(shared: &Shared) -> Vec<Option<SystemTime>> {
    let file = &shared.opts.file;
    let dir = file.parent().unwrap_or(Path::new("."));
    [file.clone(), dir.join(".env")]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Loads every environment again; on failure keeps the last good one and
/// shows why.
fn reload(shared: &Shared) {
    let mut errors = Vec::new();
    let old = shared
        .projects
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let projects: Vec<Arc<Project>> = shared
        .envs
        .iter()
        .map(|env| match Project::load(&shared.opts, env) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                errors.push(super::json::value(view::EnvError {
                    env,
                    error: view::ErrorView::of(&e),
                }));
                old.iter()
                    .find(|p| p.env == *env)
                    .cloned()
                    .expect("every environment loaded at start")
            }
        })
        .collect();
    *shared.masker.write().unwrap_or_else(|e| e.into_inner()) = merged_masker(&projects);
    *shared.projects.write().unwrap_or_else(|e| e.into_inner()) = projects;
    *shared.errors.lock().unwrap_or_else(|e| e.into_inner()) = errors;
}

/// Recomputes `groups` and publishes what changed. Returns whether the
/// services changed and, when they were recomputed, whether a watcher
/// keeps every environment.
async fn recompute(
    shared: &Shared,
    groups: u32,
    runs_cache: &mut Vec<(PathBuf, SystemTime, Value)>,
) -> (bool, Option<bool>) {
    let projects = shared
        .projects
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let on = |g: u32| groups & g != 0;
    let runs = if on(RUNS) {
        projects
            .first()
            .map(|p| view::runs(&p.config.file, runs_cache))
    } else {
        None
    };
    // One after the other: each is quick (drift, the slowest, is a walk of
    // /proc or one call to the daemon), and a join would be a larger binary.
    let services = if !on(SERVICES) {
        None
    } else {
        let mut envs = Vec::new();
        let mut all_watched = true;
        for p in &projects {
            let w = Watcher::read(&p.config);
            all_watched &= w.as_ref().is_some_and(Watcher::running);
            let phases = shared
                .activity
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .phases(&p.env);
            envs.push(view::services(p, w.as_ref(), &phases).await);
        }
        Some((Value::Array(envs), all_watched))
    };
    let locks = if on(LOCKS) {
        Some(view::locks(&projects, &shared.opts.repos).await)
    } else {
        None
    };
    let state = if on(STATE) {
        Some(view::state(&shared.opts.state).await)
    } else {
        None
    };
    let drift = if on(DRIFT) {
        let mut out = Vec::new();
        for p in &projects {
            out.push(view::drift(p).await);
        }
        Some(Value::Array(out))
    } else {
        None
    };
    let mut sections: Vec<(&'static str, Value)> = Vec::new();
    let all_watched = services.as_ref().map(|s| s.1);
    if let Some((s, _)) = services {
        sections.push(("services", s));
    }
    if let Some(v) = locks {
        sections.push(("locks", v));
    }
    if let Some(v) = state {
        sections.push(("state", v));
    }
    if let Some(v) = drift {
        sections.push(("drift", v));
    }
    if let Some(v) = runs {
        sections.push(("runs", v));
    }
    if on(ACTIVITY) {
        let a = super::json::value(&*shared.activity.lock().unwrap_or_else(|e| e.into_inner()));
        sections.push(("activity", a));
    }
    if on(META) {
        let errors = shared.errors.lock().unwrap_or_else(|e| e.into_inner());
        let meta = super::json::value(Meta {
            project: projects.first().map(|p| p.config.name.as_str()),
            errors: &errors,
        });
        drop(errors);
        sections.push(("meta", meta));
    }
    let masker = shared
        .masker
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut services_changed = false;
    shared.snapshot.send_if_modified(|snap| {
        let mut next = (**snap).clone();
        let mut changed = false;
        for (name, mut value) in sections {
            masker.mask_json(&mut value);
            if next.get(name).is_some_and(|v| **v == value) {
                continue;
            }
            services_changed |= name == "services";
            next.set(name, Arc::new(value));
            changed = true;
        }
        if changed {
            next.version += 1;
            *snap = Arc::new(next);
        }
        changed
    });
    (services_changed, all_watched)
}
