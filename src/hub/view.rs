//! The sections of the page, as JSON: each built from the engine, repo, kv
//! and trace API (what `status`, `drift`, `timeline`, `repo status`,
//! `infra unlock` and `state` show), with times as milliseconds since the
//! epoch so the page can show ages without being sent a new view every
//! second. An error becomes part of its section, never of the others.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

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

pub(super) fn error_json<E: ErrorCode + std::fmt::Display>(e: &E) -> Value {
    json!({ "code": e.code(), "message": e.to_string() })
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
        Ok(st) => super::boxed(engine::status_rows(cfg, p.provider.as_ref(), &st)).await,
        Err(e) => Err(e.into()),
    };
    let (rows, error) = match rows {
        Ok(rows) => (rows, Value::Null),
        Err(e) => (Vec::new(), error_json(&e)),
    };
    let by_name: HashMap<&str, &engine::StatusRow> =
        rows.iter().map(|r| (r.service.as_str(), r)).collect();
    let mut names: Vec<&str> = layers.iter().flatten().map(String::as_str).collect();
    for r in &rows {
        if !names.contains(&r.service.as_str()) {
            names.push(&r.service);
        }
    }
    let list: Vec<Value> = names
        .iter()
        .map(|name| {
            let row = by_name.get(name).copied();
            let svc = cfg.services.get(*name);
            let deps: Vec<String> = svc
                .map(|s| s.dep_names().map(str::to_string).collect())
                .unwrap_or_default();
            let is_up = row.is_some_and(up);
            let phase = phases.get(*name);
            let waiting_on: Vec<&String> = if is_up && phase.is_none() {
                Vec::new()
            } else {
                deps.iter()
                    .filter(|d| !by_name.get(d.as_str()).copied().is_some_and(up))
                    .collect()
            };
            let w = watch.and_then(|w| w.service(name));
            let last_run = runs.and_then(|r| last_run_of(r, &p.env, name));
            json!({
                "name": name,
                "inConfig": svc.is_some(),
                "deployed": row.is_some(),
                "status": row.map_or("not deployed", |r| r.status.as_str()),
                "alive": row.is_some_and(|r| r.alive),
                "running": row.map_or(0, |r| r.running),
                "instances": row.map(|r| r.instances.clone()).unwrap_or_default(),
                "pid": row.and_then(|r| r.pid),
                "port": svc.and_then(|s| s.port),
                "image": svc.and_then(|s| s.image.clone()),
                "sinceMs": row.and_then(|r| rfc3339_ms(&r.updated_at)),
                "error": row.and_then(|r| r.error.clone()),
                "dependsOn": deps,
                "waitingOn": waiting_on,
                "phase": phase,
                "watch": w,
                "lastRun": last_run,
            })
        })
        .collect();
    json!({
        "env": p.env,
        "project": cfg.name,
        "provider": cfg.provider.as_str(),
        "layers": layers,
        "services": list,
        "watch": watch.map(Watcher::summary),
        "error": error,
    })
}

/// The newest run of `env` that touched `service`: its name, when, and the
/// error the service failed with in it (null when it went well).
fn last_run_of(runs: &Value, env: &str, service: &str) -> Option<Value> {
    runs.get("runs")?.as_array()?.iter().find_map(|r| {
        if r.get("env")?.as_str()? != env {
            return None;
        }
        let error = r.get("services")?.get(service)?;
        Some(json!({ "run": r.get("run"), "command": r.get("command"), "startedAtMs": r.get("startedAtMs"), "error": error }))
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
                Err(e) => json!({
                    "run": p.file_stem().map(|s| s.to_string_lossy().into_owned()),
                    "error": e,
                }),
            },
        };
        list.push(summary.clone());
        keep.insert(p, (mtime, summary));
    }
    *cache = keep;
    json!({ "dir": dir, "runs": list })
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
    json!({
        "services": run_services(t),
        "run": t.run,
        "command": t.command,
        "env": t.env,
        "project": t.project,
        "startedAtMs": t.start_unix_nano / 1_000_000,
        "durationMs": t.end_unix_nano.saturating_sub(t.start_unix_nano) as f64 / 1e6,
        "outcome": t.outcome,
        "error": t.error.as_deref().map(|e| e.lines().next().unwrap_or("").to_string()),
        "traceId": t.trace_id,
        "spans": t.spans.len(),
    })
}

/// One run as the timeline page draws it: the trace, each span's label,
/// the critical path and the slowest steps. `run` must be a run's exact
/// name (never a path).
pub(super) fn run_detail(file: &Path, run: &str) -> Option<TraceFile> {
    if run.is_empty() || run.contains('/') || run.starts_with('.') {
        return None;
    }
    let dir = crate::trace::traces_dir(file);
    let path = file::list(&dir)
        .into_iter()
        .find(|p| p.file_stem().is_some_and(|s| s == run))?;
    TraceFile::read(&path).ok()
}

pub(super) fn run_json(t: &TraceFile) -> Value {
    let mut labels = serde_json::Map::new();
    for s in &t.spans {
        labels.insert(s.span_id.clone(), timeline::label(t, s).into());
    }
    let critical: Vec<&str> = timeline::critical_path(t)
        .iter()
        .map(|s| s.span_id.as_str())
        .collect();
    let slowest: Vec<Value> = timeline::slowest(t, 10)
        .iter()
        .map(|s| {
            json!({
                "spanId": s.span_id,
                "label": timeline::label(t, s),
                "durationMs": s.duration_ms(),
                "failed": s.failed(),
                "critical": critical.contains(&s.span_id.as_str()),
            })
        })
        .collect();
    json!({
        "trace": t,
        "labels": labels,
        "critical": critical,
        "slowest": slowest,
    })
}

/// The deploy lock of each environment and, for each `--repo` directory,
/// what is installed, what is being installed (holder, waiters) and what
/// interrupted installs left.
pub(super) async fn locks(projects: &[std::sync::Arc<Project>], repos: &[PathBuf]) -> Value {
    let mut deploy = Vec::new();
    for p in projects {
        deploy.push(
            match super::boxed(crate::state::lock::inspect(&p.config)).await {
                Ok((location, held)) => json!({
                    "env": p.env,
                    "location": location,
                    "held": held,
                    "describe": held.as_ref().map(|h| h.to_string()),
                }),
                Err(e) => json!({ "env": p.env, "error": error_json(&e) }),
            },
        );
    }
    let repos: Vec<Value> = repos.iter().map(|r| repo(r)).collect();
    json!({ "deploy": deploy, "repos": repos })
}

fn repo(dir: &Path) -> Value {
    let status = match crate::repo::status(dir) {
        Ok(s) => s,
        Err(e) => return json!({ "dir": dir, "error": error_json(&e) }),
    };
    let now = now_ms();
    let installing: Vec<Value> = status
        .locks
        .iter()
        .map(|l| {
            let key = l
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().replace('+', "/"))
                .unwrap_or_default();
            json!({
                "lock": l.path.file_name().map(|n| n.to_string_lossy().into_owned()),
                "package": key,
                "holder": l.info.as_ref().map(|i| i.describe()),
                "label": l.info.as_ref().and_then(|i| i.holder.clone()),
                "pid": l.info.as_ref().map(|i| i.pid),
                "host": l.info.as_ref().map(|i| i.hostname.clone()),
                "sameHost": l.same_host,
                "holderAlive": l.holder_alive,
                "stale": l.stale,
                "acquiredAtMs": l.info.as_ref().map(|i| i.acquired_at_ms),
                "heartbeatAtMs": now - l.heartbeat_age_ms as i64,
                "waiters": l.waiters,
            })
        })
        .collect();
    json!({
        "dir": dir,
        "installing": installing,
        "status": status,
    })
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
    let agents = match super::boxed(crate::kv::agents(opts)).await {
        Ok(a) => a,
        Err(e) => {
            return json!({ "backend": backend, "location": location, "agents": [], "error": error_json(&e) })
        }
    };
    let mut out = Vec::new();
    for agent in agents {
        let o = crate::kv::OpenOptions {
            agent: Some(agent.clone()),
            ..opts.clone()
        };
        let r = super::boxed(async {
            let store = crate::kv::Store::open(&o).await?;
            let keys = store.list("").await?;
            let locks = store.locks().await?;
            Ok::<_, crate::kv::KvError>((keys, locks))
        })
        .await;
        out.push(match r {
            Ok((keys, locks)) => {
                let count = keys.len();
                let keys: Vec<Value> = keys
                    .into_iter()
                    .take(MAX_KEYS)
                    .map(|e| {
                        let text = e.value.display_text();
                        let cut = text.chars().count() > MAX_VALUE_CHARS;
                        json!({
                            "key": e.key,
                            "value": if cut { text.chars().take(MAX_VALUE_CHARS).collect::<String>() + "…" } else { text },
                            "json": matches!(e.value, crate::kv::Value::Json(_)),
                            "updatedAtMs": e.updated_at_ms,
                        })
                    })
                    .collect();
                json!({ "agent": agent, "keys": keys, "keyCount": count, "locks": locks })
            }
            Err(e) => json!({ "agent": agent, "error": error_json(&e) }),
        });
    }
    json!({ "backend": backend, "location": location, "agents": out })
}

/// One environment's drift report.
pub(super) async fn drift(p: &Project) -> Value {
    match engine::drift::detect(&p.config, p.provider.as_ref()).await {
        Ok(r) => json!({ "env": p.env, "drifted": r.drifted, "items": r.items }),
        Err(e) => json!({ "env": p.env, "error": error_json(&e) }),
    }
}
