//! What a running `nanokit watch` says about itself and the services it
//! keeps up (contract B): `<config dir>/.nanokit/watch/status.json`, kept
//! current by the watcher, and the events it appends to `events.jsonl`.
//! This is the one place that knows the format; until the watcher's own
//! serde types land, fields are read by name, leniently (camelCase or
//! snake_case, times as RFC 3339 or milliseconds), so a format still
//! settling shows what it can and never breaks the page.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::config::Config;

/// The directory of the watcher's files beside `config`.
pub(super) fn dir(config: &Config) -> PathBuf {
    config.work_dir().join("watch")
}

/// How much of the end of `events.jsonl` is read for recent events.
const EVENTS_TAIL_BYTES: u64 = 64 * 1024;
/// How many recent events are kept (all services).
const RECENT: usize = 50;

/// The watcher's status as last written, and its recent events.
#[derive(Debug, Clone)]
pub(super) struct WatchStatus {
    raw: Map<String, Value>,
    /// The watcher process still runs (on this host), or may (elsewhere).
    running: bool,
    events: Vec<Value>,
}

/// The value of the first of `keys` present in `obj` (not null).
fn get<'a>(obj: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    keys.iter()
        .filter_map(|k| obj.get(*k))
        .find(|v| !v.is_null())
}

/// A time as milliseconds since the epoch: a number (milliseconds, or
/// seconds when small) or an RFC 3339 string.
fn time_ms(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => {
            let x = n.as_f64()?;
            Some(if x < 1e11 { x * 1000.0 } else { x } as i64)
        }
        Value::String(s) => humantime::parse_rfc3339_weak(s)
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_millis() as i64),
        _ => None,
    }
}

fn read_json(path: &Path) -> Option<Map<String, Value>> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// The last [`RECENT`] events of `events.jsonl` (each a JSON object).
fn recent_events(path: &Path) -> Vec<Value> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(EVENTS_TAIL_BYTES);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return Vec::new();
    }
    let mut text = String::new();
    let mut bytes = Vec::new();
    if f.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    text.push_str(&String::from_utf8_lossy(&bytes));
    let mut lines: Vec<&str> = text.lines().collect();
    if from > 0 && !lines.is_empty() {
        lines.remove(0); // cut in the middle
    }
    let mut out: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .collect();
    let skip = out.len().saturating_sub(RECENT);
    out.drain(..skip);
    out
}

impl WatchStatus {
    /// The watcher's status for `config`'s environment, if a watcher ever
    /// wrote one there.
    pub(super) fn read(config: &Config) -> Option<WatchStatus> {
        let dir = dir(config);
        let raw = read_json(&dir.join(format!("status.{}.json", config.env)))
            .or_else(|| read_json(&dir.join("status.json")))?;
        if let Some(env) = get(&raw, &["env", "environment"]).and_then(Value::as_str) {
            if env != config.env {
                return None;
            }
        }
        let leader = get(&raw, &["leader"]).and_then(Value::as_object);
        let field = |keys: &[&str]| {
            leader
                .and_then(|l| get(l, keys))
                .or_else(|| get(&raw, keys))
                .cloned()
        };
        let pid = field(&["pid"]).and_then(|v| v.as_u64()).map(|p| p as u32);
        let host = field(&["host", "hostname"]);
        let here = crate::sys::host::this_host();
        let same_host = host
            .as_ref()
            .and_then(Value::as_str)
            .is_none_or(|h| h == here.hostname);
        let stopped = get(&raw, &["stoppedAt", "stopped_at", "stopped"])
            .is_some_and(|v| v.as_bool() != Some(false));
        let running = !stopped
            && match pid {
                Some(pid) if same_host => crate::sys::host::process_alive(pid, None),
                Some(_) => true,
                None => false,
            };
        let events = recent_events(&dir.join("events.jsonl"));
        Some(WatchStatus {
            raw,
            running,
            events,
        })
    }

    /// Whether a watcher runs for this environment now.
    pub(super) fn running(&self) -> bool {
        self.running
    }

    fn leader_field(&self, keys: &[&str]) -> Option<&Value> {
        get(&self.raw, &["leader"])
            .and_then(Value::as_object)
            .and_then(|l| get(l, keys))
            .or_else(|| get(&self.raw, keys))
    }

    /// The watcher itself: leader, epoch, last pass, next full check.
    pub(super) fn summary(&self) -> Value {
        let last = get(&self.raw, &["lastPass", "last_pass"]).cloned();
        let last = last.map(|l| match &l {
            Value::Object(m) => json!({
                "atMs": get(m, &["at", "time", "finishedAt", "finished_at", "endedAt"]).and_then(time_ms),
                "outcome": get(m, &["outcome", "result"]),
                "run": get(m, &["run", "runId", "run_id", "trace"]),
            }),
            other => other.clone(),
        });
        json!({
            "running": self.running,
            "holder": self.leader_field(&["holder", "id"]),
            "pid": self.leader_field(&["pid"]),
            "host": self.leader_field(&["host", "hostname"]),
            "epoch": self.leader_field(&["epoch"]),
            "startedAtMs": self.leader_field(&["startedAt", "started_at", "since"]).and_then(time_ms),
            "lastPass": last,
            "nextCheckAtMs": get(&self.raw, &["nextFullCheck", "next_full_check", "nextCheckAt", "next_check_at", "nextCheck"]).and_then(time_ms),
            "events": self.events,
        })
    }

    /// What the watcher says of one service: restarts, the last exit, the
    /// next restart while backing off, its policy and health, and its
    /// recent events.
    pub(super) fn service(&self, name: &str) -> Option<Value> {
        let services = get(&self.raw, &["services"])?;
        let s = match services {
            Value::Object(m) => m.get(name)?.as_object()?,
            Value::Array(a) => a
                .iter()
                .filter_map(Value::as_object)
                .find(|s| get(s, &["name", "service"]).and_then(Value::as_str) == Some(name))?,
            _ => return None,
        };
        let recent: Vec<&Value> = self
            .events
            .iter()
            .filter(|e| {
                e.get("service").and_then(Value::as_str) == Some(name)
                    || e.get("services")
                        .and_then(Value::as_array)
                        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(name)))
            })
            .collect();
        let recent = &recent[recent.len().saturating_sub(5)..];
        Some(json!({
            "restarts": get(s, &["restarts", "restartCount", "restart_count"]),
            "lastExit": get(s, &["lastExit", "last_exit", "lastExitCode", "last_exit_code", "lastExitReason", "last_exit_reason"]),
            "nextRestartAtMs": get(s, &["nextAttempt", "next_attempt", "nextAttemptAt", "next_attempt_at", "nextRestartAt", "next_restart_at"]).and_then(time_ms),
            "policy": get(s, &["policy", "restartPolicy", "restart_policy"]),
            "health": get(s, &["health"]),
            "recent": recent,
        }))
    }
}
