//! What a running `nanokit watch` says about itself and the services it
//! keeps up, as the page shows it: read through the engine's own types and
//! readers (`engine::watch::status`, contract B), never a second copy of
//! the format. Times become milliseconds since the epoch; each recent
//! event gets a line that reads as Nomad's task events do ("restart
//! scheduled in 0.4 s (attempt 2)").

use serde_json::{json, Value};

use crate::config::Config;
use crate::engine;
use crate::engine::watch::status::{
    self, EventRecord, PassSummary, ServiceWatch, WatchEvent, WatchStatus,
};

/// How many recent events are kept (all services).
const RECENT: usize = 50;
/// How many of them a service's row shows.
const RECENT_PER_SERVICE: usize = 5;

/// RFC 3339 → milliseconds since the epoch.
fn ms(s: &str) -> Option<i64> {
    humantime::parse_rfc3339_weak(s)
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as i64)
}

/// A delay as people read it: `450 ms`, `27.7 s`, `2 min`.
fn delay(ms: u64) -> String {
    match ms {
        0 => "at once".into(),
        1..=999 => format!("in {ms} ms"),
        1000..=119_999 => format!("in {:.1} s", ms as f64 / 1000.0),
        _ => format!("in {} min", ms / 60_000),
    }
}

/// The service an event is about, if one.
fn service_of(e: &WatchEvent) -> Option<&str> {
    match e {
        WatchEvent::Progress { service, .. }
        | WatchEvent::ServiceExited { service, .. }
        | WatchEvent::RestartScheduled { service, .. }
        | WatchEvent::Restarted { service, .. }
        | WatchEvent::RestartFailed { service, .. }
        | WatchEvent::Held { service, .. }
        | WatchEvent::BackoffReset { service }
        | WatchEvent::HealthFailed { service, .. }
        | WatchEvent::DependentsReleased { service, .. } => Some(service),
        _ => None,
    }
}

/// Whether `e` concerns `name` (as the service, a dependent it released,
/// a drift found in it, or a request or pass naming it).
fn concerns(e: &WatchEvent, name: &str) -> bool {
    let named = |v: &[String]| v.iter().any(|s| s == name);
    match e {
        WatchEvent::DependentsReleased { dependents, .. } if named(dependents) => true,
        WatchEvent::DriftFound { items } => items.iter().any(|d| d.service == name),
        WatchEvent::Request { services, .. } => named(services),
        // Its own progress lines are many and the status shows the phase.
        WatchEvent::Progress { .. } => false,
        e => service_of(e) == Some(name),
    }
}

/// One line for `e`, as the page shows it.
fn text(e: &WatchEvent) -> String {
    match e {
        WatchEvent::Standby { holder } => match holder {
            Some(h) => format!("standby: {h} leads"),
            None => "standby".into(),
        },
        WatchEvent::LeadershipAcquired { .. } => "leads (took the deploy lease)".into(),
        WatchEvent::LeadershipLost { reason } => format!("lost the lead: {reason}"),
        WatchEvent::PassStarted {
            pass,
            reason,
            services,
            ..
        } => {
            let why = serde_json::to_value(reason).unwrap_or_default();
            let what = if services.is_empty() {
                String::new()
            } else {
                format!(" for {}", services.join(", "))
            };
            format!("pass {pass} started ({}){what}", why.as_str().unwrap_or(""))
        }
        WatchEvent::PassFinished {
            pass,
            outcome,
            changed,
            failed,
            elapsed_ms,
            ..
        } => {
            let outcome = serde_json::to_value(outcome).unwrap_or_default();
            let mut s = format!(
                "pass {pass} {} in {elapsed_ms} ms",
                outcome.as_str().unwrap_or("")
            );
            if !changed.is_empty() {
                s += &format!("; changed {}", changed.join(", "));
            }
            if !failed.is_empty() {
                s += &format!("; failed {}", failed.join(", "));
            }
            s
        }
        WatchEvent::Progress { phase, message, .. } => match message {
            Some(m) => format!("{phase}: {m}"),
            None => phase.clone(),
        },
        WatchEvent::ServiceExited { text, .. } => format!("terminated: {text}"),
        WatchEvent::RestartScheduled {
            attempt, delay_ms, ..
        } => format!("restarting {} (attempt {attempt})", delay(*delay_ms)),
        WatchEvent::Restarted {
            attempt, instances, ..
        } => format!(
            "restarted (attempt {attempt}){}",
            if instances.is_empty() {
                String::new()
            } else {
                format!(": {}", instances.join(", "))
            }
        ),
        WatchEvent::RestartFailed { attempt, error, .. } => {
            format!("restart failed (attempt {attempt}): {error}")
        }
        WatchEvent::Held { reason, .. } => format!("not restarted: {reason}"),
        WatchEvent::BackoffReset { .. } => "stayed healthy: the next restart is immediate".into(),
        WatchEvent::HealthFailed {
            failures,
            retries,
            output,
            ..
        } => format!("health check failed ({failures}/{retries}): {output}"),
        WatchEvent::DependentsReleased {
            service,
            dependents,
        } => format!("restarts {} after {service}", dependents.join(", ")),
        WatchEvent::DriftFound { items } => format!(
            "drift: {}",
            items
                .iter()
                .map(|d| format!("{} ({})", d.service, d.detail))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        WatchEvent::ConfigReloaded { error } => match error {
            Some(e) => format!("configuration invalid, the last good one kept: {e}"),
            None => "configuration reloaded".into(),
        },
        WatchEvent::Request {
            command, services, ..
        } => {
            let names: String = services.iter().map(|s| format!(" {s}")).collect();
            format!("`nanokit {command}{names}` handed over")
        }
        WatchEvent::Problem { message } => message.clone(),
        WatchEvent::Stopped { reason } => format!("stopped: {reason}"),
    }
}

/// An event as the page gets it: its record (type, fields, seq, epoch),
/// with its time in milliseconds and its line.
fn event_json(r: &EventRecord) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let Value::Object(m) = &mut v {
        m.insert("atMs".into(), json!(ms(&r.at)));
        m.insert("text".into(), json!(text(&r.event)));
    }
    v
}

fn pass_json(p: &PassSummary) -> Value {
    json!({
        "pass": p.pass,
        "reason": p.reason,
        "atMs": ms(&p.finished_at),
        "outcome": p.outcome,
        "changed": p.changed,
        "failed": p.failed,
        "run": p.run,
    })
}

/// The watcher's status as last written, and its recent events.
#[derive(Debug, Clone)]
pub(super) struct Watcher {
    status: WatchStatus,
    /// It still runs (on this host), or may (elsewhere).
    running: bool,
    events: Vec<EventRecord>,
}

impl Watcher {
    /// The watcher of `config`'s environment, if one ever wrote its status.
    pub(super) fn read(config: &Config) -> Option<Watcher> {
        let (status, running) = engine::watcher_of(config)?;
        let events = status::read_recent_events(
            &status::events_path(&config.work_dir(), &config.env),
            RECENT,
        );
        Some(Watcher {
            status,
            running,
            events,
        })
    }

    /// Whether a watcher runs for this environment now.
    pub(super) fn running(&self) -> bool {
        self.running
    }

    /// The watcher itself: leader, epoch, last pass, next full check, and
    /// its recent events.
    pub(super) fn summary(&self) -> Value {
        let s = &self.status;
        json!({
            "running": self.running,
            "role": s.role,
            "holder": s.leader.holder,
            "pid": s.leader.pid,
            "host": s.leader.host,
            "epoch": s.leader.epoch,
            "startedAtMs": ms(&s.started_at),
            "leadsSinceMs": ms(&s.leader.since),
            "intervalMs": s.interval_ms,
            "passes": s.passes,
            "lastPass": s.last_pass.as_ref().map(pass_json),
            "lastCheckAtMs": s.last_check.as_deref().and_then(ms),
            "nextCheckAtMs": s.next_full_check.as_deref().and_then(ms),
            "updatedAtMs": ms(&s.updated_at),
            "events": self.events.iter().map(event_json).collect::<Vec<_>>(),
        })
    }

    /// What the watcher says of one service: restarts, the last exit, the
    /// next restart while backing off, its policy and health, why it is
    /// held, and its recent events.
    pub(super) fn service(&self, name: &str) -> Option<Value> {
        let s: &ServiceWatch = self.status.services.get(name)?;
        let mine: Vec<&EventRecord> = self
            .events
            .iter()
            .filter(|r| concerns(&r.event, name))
            .collect();
        let recent = &mine[mine.len().saturating_sub(RECENT_PER_SERVICE)..];
        Some(json!({
            "restarts": s.restarts,
            "lastExit": s.last_exit.as_ref().map(|e| json!({
                "atMs": ms(&e.at),
                "kind": e.exit.kind,
                "code": e.exit.code,
                "signal": e.exit.signal,
                "text": e.text,
            })),
            "nextRestartAtMs": s.next_attempt.as_deref().and_then(ms),
            "backoffMs": s.backoff_ms,
            "policy": s.policy,
            "health": s.health,
            "held": s.held,
            "instances": s.instances,
            "recent": recent.iter().map(|r| event_json(r)).collect::<Vec<_>>(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::watch::status::{
        EventLog, Exit, Health, LastExit, Leader, PassOutcome, PassReason, Role,
    };

    fn record(seq: u64, event: WatchEvent) -> EventRecord {
        EventRecord {
            seq,
            at: "2026-01-02T03:04:06Z".into(),
            pid: 1,
            epoch: 7,
            event,
        }
    }

    /// The hub reads what the watcher writes, through the watcher's types.
    #[test]
    fn shows_the_watchers_status_and_each_services_recent_events() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("nanokit.yml"),
            "name: p\nservices:\n  api:\n    start: \"exec sleep 1\"\n  db:\n    start: \"exec sleep 1\"\n",
        )
        .unwrap();
        let cfg = crate::config::load(&crate::config::LoadOptions::new(
            dir.path().join("nanokit.yml"),
        ))
        .unwrap();
        assert!(Watcher::read(&cfg).is_none(), "no watcher ever ran");
        let work = cfg.work_dir();
        std::fs::create_dir_all(status::dir(&work)).unwrap();
        let kill = Exit {
            signal: Some("SIGKILL".into()),
            ..Exit::code(137)
        };
        let mut st = WatchStatus {
            version: status::STATUS_VERSION,
            project: "p".into(),
            env: cfg.env.clone(),
            file: "nanokit.yml".into(),
            role: Role::Leader,
            leader: Leader {
                holder: "nanokit watch (p / local)".into(),
                pid: 1,
                pid_start: None,
                host: "h".into(),
                host_id: "elsewhere".into(),
                epoch: 7,
                since: "2026-01-02T03:04:05Z".into(),
            },
            started_at: "2026-01-02T03:04:05Z".into(),
            interval_ms: 30_000,
            last_pass: Some(PassSummary {
                pass: 2,
                reason: PassReason::Restart,
                started_at: "2026-01-02T03:04:06Z".into(),
                finished_at: "2026-01-02T03:04:07Z".into(),
                outcome: PassOutcome::Ok,
                changed: vec!["api".into()],
                failed: Vec::new(),
                run: Some("r1".into()),
                trace_id: None,
            }),
            last_check: None,
            next_full_check: Some("2026-01-02T03:04:37Z".into()),
            passes: 2,
            services: [(
                "api".to_string(),
                ServiceWatch {
                    policy: "always".into(),
                    restarts: 1,
                    last_exit: Some(LastExit {
                        at: "2026-01-02T03:04:06Z".into(),
                        text: kill.to_string(),
                        exit: kill.clone(),
                    }),
                    next_attempt: Some("2026-01-02T03:04:34.700Z".into()),
                    backoff_ms: Some(27_700),
                    health: Health::BackingOff,
                    held: None,
                    instances: vec!["5@6".into()],
                },
            )]
            .into(),
            updated_at: "2026-01-02T03:04:07Z".into(),
        };
        status::write_status(&status::status_path(&work, &cfg.env), &st).unwrap();
        let mut log = EventLog::new(status::events_path(&work, &cfg.env));
        log.append(&record(
            1,
            WatchEvent::ServiceExited {
                service: "api".into(),
                instance: "5@6".into(),
                text: kill.to_string(),
                exit: kill,
            },
        ));
        log.append(&record(
            2,
            WatchEvent::RestartScheduled {
                service: "api".into(),
                attempt: 3,
                delay_ms: 27_700,
                due_at: "2026-01-02T03:04:34.700Z".into(),
            },
        ));
        log.append(&record(
            3,
            WatchEvent::Held {
                service: "db".into(),
                reason: "policy no".into(),
            },
        ));
        let w = Watcher::read(&cfg).expect("a status");
        assert!(
            w.running(),
            "a leader on another host runs as far as we can tell"
        );
        let s = w.summary();
        assert_eq!(s["epoch"], 7);
        assert_eq!(s["lastPass"]["run"], "r1");
        assert_eq!(s["lastPass"]["outcome"], "ok");
        assert_eq!(s["lastPass"]["atMs"], 1767323047000i64);
        assert_eq!(s["nextCheckAtMs"], 1767323077000i64);
        assert_eq!(s["events"].as_array().unwrap().len(), 3);
        let api = w.service("api").unwrap();
        assert_eq!(api["restarts"], 1);
        assert_eq!(api["lastExit"]["text"], "exited with code 137 (SIGKILL)");
        assert_eq!(api["lastExit"]["signal"], "SIGKILL");
        assert_eq!(api["health"], "backingOff");
        assert_eq!(api["nextRestartAtMs"], 1767323074700i64);
        let recent = api["recent"].as_array().unwrap();
        assert_eq!(recent.len(), 2, "db's event is not api's: {recent:?}");
        assert_eq!(recent[0]["type"], "serviceExited");
        assert_eq!(
            recent[1]["text"], "restarting in 27.7 s (attempt 3)",
            "{recent:?}"
        );
        assert_eq!(recent[1]["atMs"], 1767323046000i64);
        assert!(w.service("db").is_none(), "not in the status");
        st.role = Role::Stopped;
        status::write_status(&status::status_path(&work, &cfg.env), &st).unwrap();
        assert!(!Watcher::read(&cfg).unwrap().running());
    }

    #[test]
    fn delays_read_as_people_say_them() {
        assert_eq!(delay(0), "at once");
        assert_eq!(delay(400), "in 400 ms");
        assert_eq!(delay(27_700), "in 27.7 s");
        assert_eq!(delay(180_000), "in 3 min");
    }
}
