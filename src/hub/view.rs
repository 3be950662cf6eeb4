//! The sections of the page, as JSON: each built from the engine, repo, kv
//! and trace API (what `status`, `drift`, `timeline`, `repo status`,
//! `infra unlock` and `state` show), with times as milliseconds since the
//! epoch so the page can show ages without being sent a new view every
//! second. An error becomes part of its section, never of the others.
//!
//! Each object is a `Serialize` struct made a JSON value once ([`value`]):
//! its fields are written by serde's code for their types, shared by every
//! view, instead of by code inlined field by field (docs/hub.md#size).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use super::project::Project;
use super::watch::Watcher;
use crate::engine;
use crate::error::ErrorCode;
use crate::graph::Dag;
use crate::trace::{file, timeline, TraceFile};

/// How many runs the list shows.
const MAX_RUNS: usize = 200;
/// How many keys of one agent the state view shows.
const MAX_KEYS: usize = 1000;
/// How much of one value it shows.
const MAX_VALUE_CHARS: usize = 2000;

/// A view as a JSON value (null if it cannot be one: a path that is not
/// UTF-8). Written as JSON text and read back: serde's writer code for
/// each field type is in the binary already, its code to build values
/// field by field is not (docs/hub.md#size).
pub(super) fn value(v: impl Serialize) -> Value {
    parse(serde_json::to_vec(&v).ok().as_deref())
}

/// JSON text as a value (null if it is not JSON).
#[inline(never)]
pub(super) fn parse(json: Option<&[u8]>) -> Value {
    json.and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default()
}

/// An error as the page shows it: `{ code, message }`.
#[derive(Debug, Serialize)]
pub(super) struct ErrorView {
    pub code: &'static str,
    pub message: String,
}

impl ErrorView {
    pub(super) fn of(e: &(impl ErrorCode + std::fmt::Display)) -> ErrorView {
        ErrorView::new(e.code(), e)
    }

    fn new(code: &'static str, message: &dyn std::fmt::Display) -> ErrorView {
        ErrorView {
            code,
            message: message.to_string(),
        }
    }
}

/// What could not be shown of an environment: `{ env, error }`.
#[derive(Serialize)]
pub(super) struct EnvError<'a> {
    pub env: &'a str,
    pub error: ErrorView,
}

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 → milliseconds since the epoch.
fn rfc3339_ms(s: &str) -> Option<i64> {
    humantime::parse_rfc3339_weak(s)
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as i64)
}

/// Whether a status row counts as up: healthy and every instance running.
fn up(row: &engine::StatusRow) -> bool {
    row.alive && row.status == "healthy"
}

/// One environment's services: each with its status row, what it waits
/// on, what the watcher says of it and the phase of a hub action running
/// on it; the dependency graph as layers.
pub(super) async fn services(
    p: &Project,
    watch: Option<&Watcher>,
    phases: &BTreeMap<String, Value>,
    runs: Option<&Value>,
) -> Value {
    let cfg = &p.config;
    let layers = Dag::build(cfg).map(|d| d.layers()).unwrap_or_default();
    let rows = match p.state.read(cfg).await {
        Ok(st) => engine::status_rows(cfg, p.provider.as_ref(), &st).await,
        Err(e) => Err(e.into()),
    };
    let (rows, error) = match rows {
        Ok(rows) => (rows, None),
        Err(e) => (Vec::new(), Some(ErrorView::of(&e))),
    };
    let by_name: HashMap<&str, &engine::StatusRow> =
        rows.iter().map(|r| (r.service.as_str(), r)).collect();
    let mut names: Vec<&str> = layers.iter().flatten().map(String::as_str).collect();
    for r in &rows {
        if !names.contains(&r.service.as_str()) {
            names.push(&r.service);
        }
    }
    let services: Vec<ServiceView> = names
        .iter()
        .map(|name| {
            let row = by_name.get(name).copied();
            let svc = cfg.services.get(*name);
            let depends_on: Vec<String> = svc
                .map(|s| s.dep_names().map(str::to_string).collect())
                .unwrap_or_default();
            let is_up = row.is_some_and(up);
            let phase = phases.get(*name);
            let waiting_on: Vec<String> = if is_up && phase.is_none() {
                Vec::new()
            } else {
                depends_on
                    .iter()
                    .filter(|d| !by_name.get(d.as_str()).copied().is_some_and(up))
                    .cloned()
                    .collect()
            };
            ServiceView {
                name,
                in_config: svc.is_some(),
                deployed: row.is_some(),
                status: row.map_or("not deployed", |r| r.status.as_str()),
                alive: row.is_some_and(|r| r.alive),
                running: row.map_or(0, |r| r.running),
                instances: row.map_or(&[], |r| r.instances.as_slice()),
                pid: row.and_then(|r| r.pid),
                port: svc.and_then(|s| s.port),
                image: svc.and_then(|s| s.image.as_deref()),
                since_ms: row.and_then(|r| rfc3339_ms(&r.updated_at)),
                error: row.and_then(|r| r.error.as_deref()),
                depends_on,
                waiting_on,
                phase,
                watch: watch.and_then(|w| w.service(name)),
                last_run: runs.and_then(|r| last_run_of(r, &p.env, name)),
            }
        })
        .collect();
    value(EnvServices {
        env: &p.env,
        project: &cfg.name,
        provider: cfg.provider.as_str(),
        layers: &layers,
        services,
        watch: watch.map(Watcher::summary),
        error,
    })
}

/// One environment's services.
#[derive(Serialize)]
struct EnvServices<'a> {
    env: &'a str,
    project: &'a str,
    provider: &'static str,
    layers: &'a [Vec<String>],
    services: Vec<ServiceView<'a>>,
    watch: Option<Value>,
    error: Option<ErrorView>,
}

/// One service: its status row, configuration, what it waits on, what
/// the watcher says of it, a hub action's progress, its last run.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceView<'a> {
    name: &'a str,
    in_config: bool,
    deployed: bool,
    status: &'a str,
    alive: bool,
    running: usize,
    instances: &'a [String],
    pid: Option<u32>,
    port: Option<u16>,
    image: Option<&'a str>,
    since_ms: Option<i64>,
    error: Option<&'a str>,
    depends_on: Vec<String>,
    waiting_on: Vec<String>,
    phase: Option<&'a Value>,
    watch: Option<Value>,
    last_run: Option<LastRun<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LastRun<'a> {
    run: Option<&'a Value>,
    command: Option<&'a Value>,
    started_at_ms: Option<&'a Value>,
    error: &'a Value,
}

/// The newest run of `env` that touched `service`: its name, when, and the
/// error the service failed with in it (null when it went well).
fn last_run_of<'a>(runs: &'a Value, env: &str, service: &str) -> Option<LastRun<'a>> {
    runs.get("runs")?.as_array()?.iter().find_map(|r| {
        if r.get("env")?.as_str()? != env {
            return None;
        }
        Some(LastRun {
            run: r.get("run"),
            command: r.get("command"),
            started_at_ms: r.get("startedAtMs"),
            error: r.get("services")?.get(service)?,
        })
    })
}

/// The runs recorded beside `file` (traces of `up`, `down`, `restart` and
/// watch passes), newest first. `cache` keeps each file's summary by
/// modification time.
pub(super) fn runs(file: &Path, cache: &mut HashMap<PathBuf, (SystemTime, Value)>) -> Value {
    let dir = crate::trace::traces_dir(file);
    let mut paths = file::list(&dir);
    paths.reverse();
    paths.truncate(MAX_RUNS);
    let mut keep = HashMap::new();
    let mut list = Vec::new();
    for p in paths {
        let Ok(mtime) = std::fs::metadata(&p).and_then(|m| m.modified()) else {
            continue;
        };
        let summary = match cache.remove(&p) {
            Some((t, v)) if t == mtime => v,
            _ => match TraceFile::read(&p) {
                Ok(t) => run_summary(&t),
                Err(error) => value(Unreadable {
                    run: p.file_stem().map(|s| s.to_string_lossy()),
                    error,
                }),
            },
        };
        list.push(summary.clone());
        keep.insert(p, (mtime, summary));
    }
    *cache = keep;
    value(Runs {
        dir: &dir,
        runs: list,
    })
}

#[derive(Serialize)]
struct Runs<'a> {
    dir: &'a Path,
    runs: Vec<Value>,
}

/// A trace file that cannot be read.
#[derive(Serialize)]
struct Unreadable<'a> {
    run: Option<std::borrow::Cow<'a, str>>,
    error: String,
}

/// Each service a run touched, with the error it failed with (null when
/// it went well).
fn run_services(t: &TraceFile) -> BTreeMap<String, Option<String>> {
    let mut out: BTreeMap<String, Option<String>> = BTreeMap::new();
    for s in &t.spans {
        let Some(svc) = timeline::service_of(t, s) else {
            continue;
        };
        let entry = out.entry(svc).or_default();
        if s.failed() && s.name != "service" && entry.is_none() {
            let msg = s
                .attr("error")
                .or(s.status_message.as_deref())
                .unwrap_or("failed");
            *entry = Some(format!("{}: {msg}", timeline::label(t, s)));
        }
    }
    out
}

fn run_summary(t: &TraceFile) -> Value {
    value(RunSummary {
        services: run_services(t),
        run: &t.run,
        command: &t.command,
        env: &t.env,
        project: t.project.as_deref(),
        started_at_ms: t.start_unix_nano / 1_000_000,
        duration_ms: t.end_unix_nano.saturating_sub(t.start_unix_nano) as f64 / 1e6,
        outcome: &t.outcome,
        error: t.error.as_deref().map(|e| e.lines().next().unwrap_or("")),
        trace_id: &t.trace_id,
        spans: t.spans.len(),
    })
}

/// A run in the list.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RunSummary<'a> {
    services: BTreeMap<String, Option<String>>,
    run: &'a str,
    command: &'a str,
    env: &'a str,
    project: Option<&'a str>,
    started_at_ms: u64,
    duration_ms: f64,
    outcome: &'a str,
    error: Option<&'a str>,
    trace_id: &'a str,
    spans: usize,
}

/// One run as the timeline page draws it: the trace, each span's label,
/// the critical path and the slowest steps. `run` must be a run's exact
/// name (never a path).
pub(super) fn run_detail(file: &Path, run: &str) -> Option<Value> {
    if run.is_empty() || run.contains('/') || run.starts_with('.') {
        return None;
    }
    let dir = crate::trace::traces_dir(file);
    let path = file::list(&dir)
        .into_iter()
        .find(|p| p.file_stem().is_some_and(|s| s == run))?;
    let t = TraceFile::read(&path).ok()?;
    // The trace as its file has it (read again as a value rather than
    // written anew: the binary writes traces pretty, not compact).
    let trace = parse(std::fs::read(&path).ok().as_deref());
    Some(run_json(&t, trace))
}

fn run_json(t: &TraceFile, trace: Value) -> Value {
    let mut labels = BTreeMap::new();
    for s in &t.spans {
        labels.insert(s.span_id.as_str(), timeline::label(t, s));
    }
    let critical: Vec<&str> = timeline::critical_path(t)
        .iter()
        .map(|s| s.span_id.as_str())
        .collect();
    let slowest = timeline::slowest(t, 10)
        .into_iter()
        .map(|s| Slow {
            span_id: &s.span_id,
            label: timeline::label(t, s),
            duration_ms: s.duration_ms(),
            failed: s.failed(),
            critical: critical.contains(&s.span_id.as_str()),
        })
        .collect();
    value(RunDetail {
        trace,
        labels,
        critical,
        slowest,
    })
}

/// A run as its timeline draws it.
#[derive(Serialize)]
struct RunDetail<'a> {
    trace: Value,
    labels: BTreeMap<&'a str, String>,
    critical: Vec<&'a str>,
    slowest: Vec<Slow<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Slow<'a> {
    span_id: &'a str,
    label: String,
    duration_ms: f64,
    failed: bool,
    critical: bool,
}

/// The deploy lock of each environment and, for each `--repo` directory,
/// what is installed, what is being installed (holder, waiters) and what
/// interrupted installs left.
pub(super) async fn locks(projects: &[std::sync::Arc<Project>], repos: &[PathBuf]) -> Value {
    let mut deploy = Vec::new();
    for p in projects {
        deploy.push(match crate::state::lock::inspect(&p.config).await {
            Ok((location, held)) => value(DeployLock {
                env: &p.env,
                location,
                describe: held.as_ref().map(|h| h.to_string()),
                held,
            }),
            Err(e) => value(EnvError {
                env: &p.env,
                error: ErrorView::of(&e),
            }),
        });
    }
    let repos: Vec<Value> = repos.iter().map(|r| repo(r)).collect();
    value(Locks { deploy, repos })
}

#[derive(Serialize)]
struct Locks {
    deploy: Vec<Value>,
    repos: Vec<Value>,
}

/// An environment's deploy lock.
#[derive(Serialize)]
struct DeployLock<'a> {
    env: &'a str,
    location: String,
    held: Option<crate::state::LockView>,
    describe: Option<String>,
}

fn repo(dir: &Path) -> Value {
    let status = match crate::repo::status(dir) {
        Ok(s) => s,
        Err(e) => {
            return value(RepoError {
                dir,
                error: ErrorView::of(&e),
            })
        }
    };
    let now = now_ms();
    let installing = status
        .locks
        .iter()
        .map(|l| {
            let info = l.info.as_ref();
            Installing {
                lock: l.path.file_name().map(|n| n.to_string_lossy()),
                package: l
                    .path
                    .file_stem()
                    .map(|s| s.to_string_lossy().replace('+', "/"))
                    .unwrap_or_default(),
                holder: info.map(|i| i.describe()),
                label: info.and_then(|i| i.holder.as_deref()),
                pid: info.map(|i| i.pid),
                host: info.map(|i| i.hostname.as_str()),
                same_host: l.same_host,
                holder_alive: l.holder_alive,
                stale: l.stale,
                acquired_at_ms: info.map(|i| i.acquired_at_ms),
                heartbeat_at_ms: now - l.heartbeat_age_ms as i64,
                waiters: l.waiters,
            }
        })
        .collect();
    // Written as `nanokit repo status --output json` writes it: one
    // instance of that code in the binary.
    let status = parse(serde_json::to_vec_pretty(&status).ok().as_deref());
    value(RepoView {
        dir,
        installing,
        status,
    })
}

/// A `--repo` directory: `repo status`, and each install in progress.
#[derive(Serialize)]
struct RepoView<'a> {
    dir: &'a Path,
    installing: Vec<Installing<'a>>,
    status: Value,
}

#[derive(Serialize)]
struct RepoError<'a> {
    dir: &'a Path,
    error: ErrorView,
}

/// An install in progress: its lock, holder and waiters.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Installing<'a> {
    lock: Option<std::borrow::Cow<'a, str>>,
    package: String,
    holder: Option<String>,
    label: Option<&'a str>,
    pid: Option<u32>,
    host: Option<&'a str>,
    same_host: bool,
    holder_alive: Option<bool>,
    stale: bool,
    acquired_at_ms: Option<u64>,
    heartbeat_at_ms: i64,
    waiters: usize,
}

/// The key/value state: each agent's keys (up to [`MAX_KEYS`]) and held
/// named locks.
pub(super) async fn state(opts: &crate::kv::OpenOptions) -> Value {
    let backend = if opts.resolved_url().is_some() {
        "postgres"
    } else {
        "embedded"
    };
    let location = match opts.resolved_url() {
        Some(u) => crate::pg::redact_url(&u),
        None => opts
            .resolved_state_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
    };
    let agents = match crate::kv::agents(opts).await {
        Ok(a) => a,
        Err(e) => {
            return value(StateView {
                backend,
                location,
                agents: Vec::new(),
                error: Some(ErrorView::of(&e)),
            })
        }
    };
    let mut out = Vec::new();
    for agent in agents {
        let o = crate::kv::OpenOptions {
            agent: Some(agent.clone()),
            ..opts.clone()
        };
        let r = async {
            let store = crate::kv::Store::open(&o).await?;
            let keys = store.list("").await?;
            let locks = store.locks().await?;
            Ok::<_, crate::kv::KvError>((keys, locks))
        }
        .await;
        out.push(match r {
            Ok((keys, locks)) => {
                let key_count = keys.len();
                let keys = keys
                    .into_iter()
                    .take(MAX_KEYS)
                    .map(|e| {
                        let text = e.value.display_text();
                        let cut = text.chars().count() > MAX_VALUE_CHARS;
                        KeyView {
                            key: e.key,
                            value: if cut {
                                text.chars().take(MAX_VALUE_CHARS).collect::<String>() + "…"
                            } else {
                                text
                            },
                            json: matches!(e.value, crate::kv::Value::Json(_)),
                            updated_at_ms: e.updated_at_ms,
                        }
                    })
                    .collect();
                value(AgentView {
                    agent: &agent,
                    keys,
                    key_count,
                    locks,
                })
            }
            Err(e) => value(AgentError {
                agent: &agent,
                error: ErrorView::of(&e),
            }),
        });
    }
    value(StateView {
        backend,
        location,
        agents: out,
        error: None,
    })
}

/// The key/value state.
#[derive(Serialize)]
struct StateView {
    backend: &'static str,
    location: String,
    agents: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorView>,
}

/// One agent's keys and named locks.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AgentView<'a> {
    agent: &'a str,
    keys: Vec<KeyView>,
    key_count: usize,
    locks: Vec<crate::kv::HeldLock>,
}

#[derive(Serialize)]
struct AgentError<'a> {
    agent: &'a str,
    error: ErrorView,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyView {
    key: String,
    value: String,
    json: bool,
    updated_at_ms: i64,
}

/// One environment's drift report.
pub(super) async fn drift(p: &Project) -> Value {
    match engine::drift::detect(&p.config, p.provider.as_ref()).await {
        Ok(r) => value(Drift {
            env: &p.env,
            drifted: r.drifted,
            items: r.items,
        }),
        Err(e) => value(EnvError {
            env: &p.env,
            error: ErrorView::of(&e),
        }),
    }
}

#[derive(Serialize)]
struct Drift<'a> {
    env: &'a str,
    drifted: bool,
    items: Vec<engine::drift::DriftItem>,
}
