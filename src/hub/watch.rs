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
        let per_env = |name: &str, ext: &str| {
            if config.env == crate::config::DEFAULT_ENV {
                dir.join(format!("{name}.{ext}"))
            } else {
                dir.join(format!("{name}.{}.{ext}", config.env))
            }
        };
        let raw = read_json(&per_env("status", "json"))?;
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
        let pid_start = field(&["pidStart", "pid_start"]).and_then(|v| v.as_u64());
        let here = crate::sys::host::this_host();
        let same_host = match field(&["hostId", "host_id"]) {
            Some(id) => id.as_str() == Some(here.id.as_str()),
            None => field(&["host", "hostname"])
                .as_ref()
                .and_then(Value::as_str)
                .is_none_or(|h| h == here.hostname),
        };
        let stopped = get(&raw, &["role"]).and_then(Value::as_str) == Some("stopped");
        let running = !stopped
            && match pid {
                Some(pid) if same_host => crate::sys::host::process_alive(pid, pid_start),
                Some(_) => true,
                None => false,
            };
        let events = recent_events(&per_env("events", "jsonl"));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The watcher's status as its serde module writes it (contract B).
    const STATUS: &str = r#"{
      "version": 1, "project": "p", "env": "local", "file": "nanokit.yml", "role": "leader",
      "leader": { "holder": "nanokit watch (p / local)", "pid": 1, "pidStart": null, "host": "h",
                  "hostId": "elsewhere", "epoch": 7, "since": "2026-01-02T03:04:05Z" },
      "startedAt": "2026-01-02T03:04:05Z", "intervalMs": 30000,
      "lastPass": { "pass": 2, "reason": "restart", "startedAt": "2026-01-02T03:04:06Z",
                    "finishedAt": "2026-01-02T03:04:07Z", "outcome": "ok", "changed": ["api"],
                    "failed": [], "run": "r1", "traceId": "t" },
      "nextFullCheck": "2026-01-02T03:04:37Z", "passes": 2,
      "services": { "api": { "policy": "always", "restarts": 1,
          "lastExit": { "at": "2026-01-02T03:04:06Z", "kind": "exited", "signal": 9, "text": "exited with code 137 (SIGKILL)" },
          "nextAttempt": null, "health": "healthy", "instances": ["5@6"] } },
      "updatedAt": "2026-01-02T03:04:07Z" }"#;

    #[test]
    fn reads_the_watchers_status_and_recent_events() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("nanokit.yml"),
            "name: p\nservices:\n  api:\n    start: \"exec sleep 1\"\n",
        )
        .unwrap();
        let cfg = crate::config::load(&crate::config::LoadOptions::new(
            dir.path().join("nanokit.yml"),
        ))
        .unwrap();
        assert!(WatchStatus::read(&cfg).is_none(), "no watcher ever ran");
        std::fs::create_dir_all(super::dir(&cfg)).unwrap();
        std::fs::write(super::dir(&cfg).join("status.json"), STATUS).unwrap();
        std::fs::write(
            super::dir(&cfg).join("events.jsonl"),
            "{\"seq\":1,\"at\":\"2026-01-02T03:04:06Z\",\"pid\":1,\"epoch\":7,\"type\":\"serviceExited\",\"service\":\"api\",\"text\":\"exited\"}\nnot json\n{\"seq\":2,\"type\":\"restarted\",\"service\":\"api\",\"attempt\":1}\n",
        )
        .unwrap();
        let w = WatchStatus::read(&cfg).expect("a status");
        assert!(
            w.running(),
            "a leader on another host runs as far as we can tell"
        );
        let s = w.summary();
        assert_eq!(s["epoch"], 7);
        assert_eq!(s["lastPass"]["run"], "r1");
        assert_eq!(s["lastPass"]["atMs"], 1767323047000i64);
        assert_eq!(s["nextCheckAtMs"], 1767323077000i64);
        let api = w.service("api").unwrap();
        assert_eq!(api["restarts"], 1);
        assert_eq!(api["lastExit"]["text"], "exited with code 137 (SIGKILL)");
        assert_eq!(api["health"], "healthy");
        assert_eq!(api["recent"].as_array().unwrap().len(), 2);
        assert!(w.service("db").is_none());
        let stopped = STATUS.replace("\"role\": \"leader\"", "\"role\": \"stopped\"");
        std::fs::write(super::dir(&cfg).join("status.json"), stopped).unwrap();
        assert!(!WatchStatus::read(&cfg).unwrap().running());
    }
}
