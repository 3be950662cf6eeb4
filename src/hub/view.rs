//! The sections of the page, as JSON: each built from the engine, repo, kv
//! and trace API (what `status`, `drift`, `timeline`, `repo status`,
//! `infra unlock` and `state` show), with times as milliseconds since the
//! epoch so the page can show ages without being sent a new view every
//! second. An error becomes part of its section, never of the others.
//!
//! Each object is a `Serialize` struct made a JSON value once ([`value`]):
//! its fields are written by serde's code for their types, shared by every
//! view, instead of by code inlined field by field (docs/hub.md#size).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use super::json::{parse, value};
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

/// One environment's services as `nanokit status --output json` gives
/// them (its rows, but for what the watcher keeps), with the configured services and their dependency
/// graph as layers, the progress of hub actions on them, and the watcher's
/// status and events as it writes them. The page puts them together
/// (what each waits on, its last run, a watcher's recent events per
/// service): one general form, not a view shaped field by field here.
pub(super) async fn services(
    p: &Project,
    watch: Option<&Watcher>,
    phases: &BTreeMap<String, Value>,
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
    let config = cfg
        .services
        .iter()
        .map(|(name, s)| Configured {
            name,
            depends_on: s.dep_names().collect(),
            port: s.port,
            image: s.image.as_deref(),
        })
        .collect();
    value(EnvServices {
        env: &p.env,
        project: &cfg.name,
        provider: cfg.provider.as_str(),
        layers: &layers,
        config,
        rows: rows.iter().map(Row::of).collect(),
        phases,
        watch: watch.map(Watcher::json),
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
    config: Vec<Configured<'a>>,
    rows: Vec<Row<'a>>,
    phases: &'a BTreeMap<String, Value>,
    watch: Option<Value>,
    error: Option<ErrorView>,
}

/// A row of `nanokit status`, as its JSON names the fields, without what
/// the watcher keeps of the service (the watcher's own status has it).
#[derive(Serialize)]
struct Row<'a> {
    service: &'a str,
    status: &'a str,
    alive: bool,
    pid: Option<u32>,
    instances: &'a [String],
    running: usize,
    updated_at: &'a str,
    error: Option<&'a str>,
}

impl<'a> Row<'a> {
    fn of(r: &'a engine::StatusRow) -> Row<'a> {
        Row {
            service: &r.service,
            status: &r.status,
            alive: r.alive,
            pid: r.pid,
            instances: &r.instances,
            running: r.running,
            updated_at: &r.updated_at,
            error: r.error.as_deref(),
        }
    }
}

/// A service of the configuration.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Configured<'a> {
    name: &'a str,
    depends_on: Vec<&'a str>,
    port: Option<u16>,
    image: Option<&'a str>,
}

/// The runs recorded beside `file` (traces of `up`, `down`, `restart` and
/// watch passes), newest first. `cache` keeps each file's summary by
/// modification time.
pub(super) fn runs(file: &Path, cache: &mut Vec<(PathBuf, SystemTime, Value)>) -> Value {
    let dir = crate::trace::traces_dir(file);
    let mut paths = file::list(&dir);
    paths.reverse();
    paths.truncate(MAX_RUNS);
    let mut keep = Vec::new();
    let mut list = Vec::new();
    for p in paths {
        let Ok(mtime) = std::fs::metadata(&p).and_then(|m| m.modified()) else {
            continue;
        };
        // At most MAX_RUNS entries: looked up by a walk.
        let cached = cache.iter().position(|(c, t, _)| *c == p && *t == mtime);
        let summary = match cached {
            Some(i) => cache.swap_remove(i).2,
            None => match TraceFile::read(&p) {
                Ok(t) => run_summary(&t),
                Err(error) => value(Unreadable {
                    run: p.file_stem().map(|s| s.to_string_lossy()),
                    error,
                }),
            },
        };
        list.push(summary.clone());
        keep.push((p, mtime, summary));
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
fn run_services(t: &TraceFile) -> Pairs<String, Option<String>> {
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for s in &t.spans {
        let Some(svc) = timeline::service_of(t, s) else {
            continue;
        };
        let i = match out.iter().position(|(n, _)| *n == svc) {
            Some(i) => i,
            None => {
                out.push((svc, None));
                out.len() - 1
            }
        };
        let entry = &mut out[i].1;
        if s.failed() && s.name != "service" && entry.is_none() {
            let msg = s
                .attr("error")
                .or(s.status_message.as_deref())
                .unwrap_or("failed");
            *entry = Some(format!("{}: {msg}", timeline::label(t, s)));
        }
    }
    Pairs(out)
}

/// Pairs written as a JSON object, in their order (kept in a list rather
/// than a map: a map's code for each key and value type is larger).
struct Pairs<K, V>(Vec<(K, V)>);

impl<K: Serialize, V: Serialize> Serialize for Pairs<K, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
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
    services: Pairs<String, Option<String>>,
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
    let labels = t
        .spans
        .iter()
        .map(|s| (s.span_id.as_str(), timeline::label(t, s)))
        .collect::<Vec<_>>();
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
        labels: Pairs(labels),
        critical,
        slowest,
    })
}

/// A run as its timeline draws it.
#[derive(Serialize)]
struct RunDetail<'a> {
    trace: Value,
    labels: Pairs<&'a str, String>,
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
    // Each lock's holder in the words of `nanokit lock status` (the rest
    // of each lock is in `status.locks`; the page puts them together).
    let holders: Vec<Option<String>> = status
        .locks
        .iter()
        .map(|l| l.info.as_ref().map(|i| i.describe()))
        .collect();
    // Written as `nanokit repo status --output json` writes it: one
    // instance of that code in the binary.
    let status = parse(serde_json::to_vec_pretty(&status).ok().as_deref());
    value(RepoView {
        dir,
        holders,
        status,
    })
}

/// A `--repo` directory: `repo status`, and the holder of each lock.
#[derive(Serialize)]
struct RepoView<'a> {
    dir: &'a Path,
    holders: Vec<Option<String>>,
    status: Value,
}

#[derive(Serialize)]
struct RepoError<'a> {
    dir: &'a Path,
    error: ErrorView,
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
                        let mut text = e.value.display_text();
                        if let Some((end, _)) = text.char_indices().nth(MAX_VALUE_CHARS) {
                            text.truncate(end);
                            text.push('…');
                        }
                        KeyView {
                            key: e.key,
                            value: text,
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
