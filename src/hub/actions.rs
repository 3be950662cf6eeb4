//! The hub's actions, each the engine (or lock, kv) call the CLI makes:
//!
//! | action | body | as the CLI |
//! |---|---|---|
//! | `up` | `env`, `services?` | `nanokit up [svc…]` |
//! | `down` | `env`, `services?`, `confirm` | `nanokit down [svc…]` |
//! | `restart` | `env`, `service` | `nanokit restart <svc>` |
//! | `restore` | `env` | `nanokit drift --restore` |
//! | `unlock` | `kind: deploy`, `env`, `confirm` | `nanokit infra unlock --yes` |
//! | | `kind: repo`, `repo`, `lock`, `confirm` | `nanokit lock break <repo>/.locks/<lock> --yes` |
//! | | `kind: state`, `agent`, `name`, `confirm` | `nanokit state unlock <name> --force --yes` |
//!
//! Runs are traced as the CLI's are, and fail with the same codes (a held
//! deploy lock is `ENKLOCKED` naming its holder). What must be confirmed is
//! refused without `confirm: true` (`ENKCONFIRM`, nothing done).

use std::sync::Arc;

use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use super::live::Live;
use super::respond::{error, json_response, Body};
use crate::engine::{self, Event, Report, RunOptions};
use crate::error::ErrorCode;
use crate::trace::{RunTrace, Settings};

fn status_of(code: &str) -> StatusCode {
    match code {
        "ENKLOCKED" => StatusCode::CONFLICT,
        "ENKCONFIRM" | "ENKTARGET" | "ENKCONFIG" | "ENKCYCLE" | "ENKDEP" | "ENKFORCE"
        | "ENKHUBREQUEST" => StatusCode::BAD_REQUEST,
        "ENKFAILED" => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn bad(message: impl Into<String>) -> (StatusCode, Value) {
    (
        StatusCode::BAD_REQUEST,
        json!({ "code": "ENKHUBREQUEST", "message": message.into() }),
    )
}

fn not_confirmed(what: &str) -> (StatusCode, Value) {
    (
        StatusCode::BAD_REQUEST,
        json!({ "code": "ENKCONFIRM", "message": format!("{what} must be confirmed; nothing was changed") }),
    )
}

/// Runs action `name` with `body`; answers with its result (or refusal).
pub(super) async fn run(live: &Live, name: &str, body: Value) -> Response<Body> {
    let env = body
        .get("env")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| live.projects().first().map(|p| p.env.clone()))
        .unwrap_or_default();
    if !matches!(name, "up" | "down" | "restart" | "restore" | "unlock") {
        return error(
            StatusCode::NOT_FOUND,
            "ENKHUBREQUEST",
            format!("no action `{name}` (up, down, restart, restore, unlock)"),
        );
    }
    if live.project(&env).is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "ENKHUBREQUEST",
            format!("environment `{env}` is not shown by this hub"),
        );
    }
    let confirmed = body.get("confirm").and_then(Value::as_bool) == Some(true);
    let services = match name {
        "restart" => body
            .get("service")
            .and_then(Value::as_str)
            .map(|s| vec![s.to_string()])
            .unwrap_or_default(),
        _ => strings(body.get("services").unwrap_or(&Value::Null)),
    };
    let id = live.action_started(name, &env, &services);
    let (status, mut result) = match name {
        "unlock" => unlock(live, &env, &body, confirmed).await,
        "down" if !confirmed => not_confirmed("`down`"),
        "restart" if services.len() != 1 => bad("restart takes one `service`"),
        _ => traced(live, id, name, &env, services).await,
    };
    live.masker().mask_json(&mut result);
    live.action_done(id, result.clone());
    json_response(status, &result)
}

/// An `up`, `down`, `restart` or `restore` as the CLI runs it: a recorded
/// trace, the configuration loaded afresh, progress shown on the page.
async fn traced(
    live: &Live,
    id: u64,
    name: &str,
    env: &str,
    services: Vec<String>,
) -> (StatusCode, Value) {
    let opts = live.opts().clone();
    let command: &'static str = match name {
        "down" => "down",
        "restart" => "restart",
        _ => "up",
    };
    if name == "restore" {
        // As `drift --restore`: nothing to do when nothing drifted.
        let Some(p) = live.project(env) else {
            return bad("unknown environment");
        };
        match engine::drift::detect(&p.config, p.provider.as_ref()).await {
            Ok(r) if !r.drifted => {
                return (
                    StatusCode::OK,
                    json!({ "ok": true, "message": "No drift: every recorded service is running with its configuration." }),
                )
            }
            Ok(_) => {}
            Err(e) => return failure(&e, None),
        }
    }
    let sink = {
        let live = live.clone();
        Arc::new(move |e: &Event| {
            live.action_progress(
                id,
                &e.service,
                json!({ "phase": e.phase.as_str(), "message": e.message, "elapsedMs": e.elapsed_ms }),
            )
        })
    };
    let run_opts = RunOptions {
        targets: services.clone(),
        events: Some(sink),
        ..RunOptions::default()
    };
    let command = match command {
        "down" => engine::Command::Down,
        "restart" => engine::Command::Restart(services),
        _ => engine::Command::Up,
    };
    let load = Box::new(|| super::load(&opts, env));
    let (r, trace, _) = engine::run_traced(
        opts.file.clone(),
        env.to_string(),
        Settings::default(),
        load,
        command,
        run_opts,
    )
    .await;
    match r {
        Ok(report) => report_result(&report, trace.as_ref()),
        Err(e) => failure(&e, trace.as_ref()),
    }
}

fn trace_json(t: Option<&RunTrace>) -> Value {
    match t {
        Some(t) => json!({ "run": t.run, "traceId": t.trace_id }),
        None => Value::Null,
    }
}

fn report_result(report: &Report, trace: Option<&RunTrace>) -> (StatusCode, Value) {
    let results: Vec<Value> = report
        .results
        .iter()
        .map(|r| json!({ "service": r.service, "outcome": r.outcome.as_str(), "error": r.error, "elapsedMs": r.elapsed_ms }))
        .collect();
    let Some(message) = report.failure_summary() else {
        return (
            StatusCode::OK,
            json!({ "ok": true, "results": results, "trace": trace_json(trace) }),
        );
    };
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({ "ok": false, "code": "ENKFAILED", "message": message, "results": results, "trace": trace_json(trace) }),
    )
}

fn failure<E: ErrorCode + std::fmt::Display>(
    e: &E,
    trace: Option<&RunTrace>,
) -> (StatusCode, Value) {
    (
        status_of(e.code()),
        json!({ "ok": false, "code": e.code(), "message": e.to_string(), "trace": trace_json(trace) }),
    )
}

/// Clears a lock: the deploy lock of an environment, a lock of a `--repo`
/// directory (one `repo status` lists), or a named lock of the state.
async fn unlock(live: &Live, env: &str, body: &Value, confirmed: bool) -> (StatusCode, Value) {
    let kind = body.get("kind").and_then(Value::as_str).unwrap_or("");
    let field = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    match kind {
        "deploy" => {
            // As `nanokit infra unlock --yes`.
            let Some(p) = live.project(env) else {
                return bad("unknown environment");
            };
            let (location, held) = match super::boxed(crate::state::lock::inspect(&p.config)).await
            {
                Ok(v) => v,
                Err(e) => return failure(&e, None),
            };
            if held.is_none() {
                return (
                    StatusCode::OK,
                    json!({ "ok": true, "message": format!("The deploy lock of {location} is not held.") }),
                );
            }
            if !confirmed {
                return not_confirmed("clearing the deploy lock");
            }
            match super::boxed(crate::state::lock::force_unlock(&p.config)).await {
                Ok(cleared) => (
                    StatusCode::OK,
                    json!({ "ok": true, "cleared": cleared.map(|c| c.to_string()), "message": "Cleared. The holder, if still running, will find its lock lost and stop; its state writes are refused once another run takes the lock." }),
                ),
                Err(e) => failure(&e, None),
            }
        }
        "repo" => {
            let (repo, lock) = (field("repo"), field("lock"));
            let Some(dir) = live
                .opts()
                .repos
                .iter()
                .find(|r| r.to_string_lossy() == repo)
            else {
                return bad(format!("`{repo}` is not a --repo directory of this hub"));
            };
            // Only a lock `repo status` lists: never a path from the page.
            let listed = match crate::repo::status(dir) {
                Ok(s) => s.locks.iter().any(|l| {
                    l.path
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy() == lock)
                }),
                Err(e) => return failure(&e, None),
            };
            if !listed || lock.contains('/') {
                return (
                    StatusCode::OK,
                    json!({ "ok": true, "message": format!("{lock}: not held; nothing to do") }),
                );
            }
            if !confirmed {
                return not_confirmed("breaking a repository lock");
            }
            let path = dir.join(".locks").join(&lock);
            match crate::lock::break_lock(&path) {
                Ok(Some(info)) => (
                    StatusCode::OK,
                    json!({ "ok": true, "cleared": info.describe(), "message": format!("broke {} (was held by {})", path.display(), info.describe()) }),
                ),
                Ok(None) => (
                    StatusCode::OK,
                    json!({ "ok": true, "message": format!("{}: released meanwhile; nothing to do", path.display()) }),
                ),
                Err(e) => failure(&e, None),
            }
        }
        "state" => {
            let (agent, name) = (field("agent"), field("name"));
            if !confirmed {
                return not_confirmed("clearing a named lock");
            }
            let opts = crate::kv::OpenOptions {
                agent: Some(agent),
                ..live.opts().state.clone()
            };
            let r = super::boxed(async {
                let store = crate::kv::Store::open(&opts).await?;
                store.force_unlock(&name).await
            })
            .await;
            match r {
                Ok(prev) => (
                    StatusCode::OK,
                    json!({ "ok": true, "cleared": prev, "message": match &prev {
                        Some(h) => format!("unlocked {name} (was held by {h})"),
                        None => format!("{name} was not locked"),
                    } }),
                ),
                Err(e) => failure(&e, None),
            }
        }
        _ => bad("unlock needs `kind`: deploy, repo or state"),
    }
}
