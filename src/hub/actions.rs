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
use serde::Serialize;
use serde_json::Value;

use super::json::value;
use super::live::Live;
use super::respond::{error, json_response, Body};
use super::view::ErrorView;
use crate::engine::{self, Event, Report, RunOptions};
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

/// What an action that ran answers.
#[derive(Default, Serialize)]
struct Answer<'a> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    /// The holder of the lock cleared.
    #[serde(skip_serializing_if = "Option::is_none")]
    cleared: Option<String>,
    /// Each service of an `up`, `down`, `restart` or `restore`.
    #[serde(skip_serializing_if = "Option::is_none")]
    results: Option<Vec<ServiceOutcome<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace: Option<TraceRef<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceOutcome<'a> {
    service: &'a str,
    outcome: &'static str,
    error: Option<&'a str>,
    elapsed_ms: u64,
}

/// The run an action recorded.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TraceRef<'a> {
    run: &'a str,
    trace_id: &'a str,
}

impl<'a> TraceRef<'a> {
    fn of(t: &'a RunTrace) -> TraceRef<'a> {
        TraceRef {
            run: &t.run,
            trace_id: &t.trace_id,
        }
    }
}

/// A service's progress in an action, as the engine reports it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Progress<'a> {
    phase: &'static str,
    message: Option<&'a str>,
    elapsed_ms: u64,
}

/// Done: `{ ok: true, message }`.
fn done(message: String) -> (StatusCode, Value) {
    let a = Answer {
        ok: true,
        message: Some(message),
        ..Answer::default()
    };
    (StatusCode::OK, value(a))
}

/// Refused, nothing done: `{ code, message }`.
fn refused(code: &'static str, message: String) -> (StatusCode, Value) {
    (StatusCode::BAD_REQUEST, value(ErrorView { code, message }))
}

fn bad(message: String) -> (StatusCode, Value) {
    refused("ENKHUBREQUEST", message)
}

fn not_confirmed(what: &str) -> (StatusCode, Value) {
    refused(
        "ENKCONFIRM",
        format!("{what} must be confirmed; nothing was changed"),
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
            &format!("no action `{name}` (up, down, restart, restore, unlock)"),
        );
    }
    if live.project(&env).is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "ENKHUBREQUEST",
            &format!("environment `{env}` is not shown by this hub"),
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
        "restart" if services.len() != 1 => bad("restart takes one `service`".into()),
        _ => traced(live, id, name, &env, services).await,
    };
    live.masker().mask_json(&mut result);
    live.action_done(id);
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
    let opts = live.opts();
    let command: &'static str = match name {
        "down" => "down",
        "restart" => "restart",
        _ => "up",
    };
    if name == "restore" {
        // As `drift --restore`: nothing to do when nothing drifted.
        let Some(p) = live.project(env) else {
            return bad("unknown environment".into());
        };
        match engine::drift::detect(&p.config, p.provider.as_ref()).await {
            Ok(r) if !r.drifted => {
                return done(
                    "No drift: every recorded service is running with its configuration.".into(),
                )
            }
            Ok(_) => {}
            Err(e) => return failure(ErrorView::of(&e), None),
        }
    }
    let sink = {
        let live = live.clone();
        Arc::new(move |e: &Event| {
            live.action_progress(
                id,
                &e.service,
                value(Progress {
                    phase: e.phase.as_str(),
                    message: e.message.as_deref(),
                    elapsed_ms: e.elapsed_ms,
                }),
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
    let load = Box::new(|| super::load(opts, env));
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
        Err(e) => failure(ErrorView::of(&e), trace.as_ref()),
    }
}

fn report_result(report: &Report, trace: Option<&RunTrace>) -> (StatusCode, Value) {
    let results = report
        .results
        .iter()
        .map(|r| ServiceOutcome {
            service: &r.service,
            outcome: r.outcome.as_str(),
            error: r.error.as_deref(),
            elapsed_ms: r.elapsed_ms,
        })
        .collect();
    let message = report.failure_summary();
    let (status, code) = match message {
        None => (StatusCode::OK, None),
        Some(_) => (StatusCode::UNPROCESSABLE_ENTITY, Some("ENKFAILED")),
    };
    let a = Answer {
        ok: message.is_none(),
        code,
        message,
        results: Some(results),
        trace: trace.map(TraceRef::of),
        ..Answer::default()
    };
    (status, value(a))
}

/// Failed with `e` (after recording `trace`, if it ran).
fn failure(e: ErrorView, trace: Option<&RunTrace>) -> (StatusCode, Value) {
    let a = Answer {
        ok: false,
        code: Some(e.code),
        message: Some(e.message),
        trace: trace.map(TraceRef::of),
        ..Answer::default()
    };
    (status_of(e.code), value(a))
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
                return bad("unknown environment".into());
            };
            let (location, held) = match crate::state::lock::inspect(&p.config).await {
                Ok(v) => v,
                Err(e) => return failure(ErrorView::of(&e), None),
            };
            if held.is_none() {
                return done(format!("The deploy lock of {location} is not held."));
            }
            if !confirmed {
                return not_confirmed("clearing the deploy lock");
            }
            match crate::state::lock::force_unlock(&p.config).await {
                Ok(cleared) => cleared_answer(
                    cleared.map(|c| c.to_string()),
                    "Cleared. The holder, if still running, will find its lock lost and stop; its state writes are refused once another run takes the lock.".into(),
                ),
                Err(e) => failure(ErrorView::of(&e), None),
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
                Err(e) => return failure(ErrorView::of(&e), None),
            };
            if !listed || lock.contains('/') {
                return done(format!("{lock}: not held; nothing to do"));
            }
            if !confirmed {
                return not_confirmed("breaking a repository lock");
            }
            let path = dir.join(".locks").join(&lock);
            match crate::lock::break_lock(&path) {
                Ok(Some(info)) => {
                    let holder = info.describe();
                    let message = format!("broke {} (was held by {holder})", path.display());
                    cleared_answer(Some(holder), message)
                }
                Ok(None) => done(format!(
                    "{}: released meanwhile; nothing to do",
                    path.display()
                )),
                Err(e) => failure(ErrorView::of(&e), None),
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
            let r = async {
                let store = crate::kv::Store::open(&opts).await?;
                store.force_unlock(&name).await
            }
            .await;
            match r {
                Ok(Some(holder)) => {
                    let message = format!("unlocked {name} (was held by {holder})");
                    cleared_answer(Some(holder), message)
                }
                Ok(None) => done(format!("{name} was not locked")),
                Err(e) => failure(ErrorView::of(&e), None),
            }
        }
        _ => bad("unlock needs `kind`: deploy, repo or state".into()),
    }
}

/// A lock cleared: `{ ok: true, cleared: <its holder>, message }`.
fn cleared_answer(cleared: Option<String>, message: String) -> (StatusCode, Value) {
    let a = Answer {
        ok: true,
        cleared,
        message: Some(message),
        ..Answer::default()
    };
    (StatusCode::OK, value(a))
}
