//! What a running `nanokit watch` says about itself and the services it
//! keeps up, as the page shows it: read through the engine's own types and
//! readers (`engine::watch::status`, contract B), never a second copy of
//! the format. Times become milliseconds since the epoch; each recent
//! event carries the line the engine words for it, as Nomad's task events
//! read ("restarting in 27.7 s (attempt 3)").

use serde::Serialize;
use serde_json::Value;

use super::view::value;
use crate::config::Config;
use crate::engine;
use crate::engine::watch::status::{
    self, EventRecord, Health, PassOutcome, PassReason, PassSummary, Role, ServiceWatch,
    WatchEvent, WatchStatus,
};
use crate::provider::ExitKind;

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

/// Whether `e` concerns `name` (as the service, a dependent it released,
/// a drift found in it, or a request or pass naming it).
fn concerns(e: &WatchEvent, name: &str) -> bool {
    let named = |v: &[String]| v.iter().any(|s| s == name);
    match e {
        WatchEvent::DependentsReleased {
            service,
            dependents,
        } => service == name || named(dependents),
        WatchEvent::DriftFound { items } => items.iter().any(|d| d.service == name),
        WatchEvent::Request { services, .. } => named(services),
        // Its own progress lines are many and the status shows the phase.
        WatchEvent::Progress { .. } => false,
        e => e.service() == Some(name),
    }
}

/// An event as the page gets it: its record (type, fields, seq, epoch),
/// with its time in milliseconds and its line.
fn event_json(r: &EventRecord) -> Value {
    let mut v = value(r);
    if let Value::Object(m) = &mut v {
        m.insert("atMs".into(), ms(&r.at).into());
        m.insert("text".into(), r.text().into());
    }
    v
}

/// The watcher as the page shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Summary<'a> {
    running: bool,
    role: Role,
    holder: &'a str,
    pid: u32,
    host: &'a str,
    epoch: u64,
    started_at_ms: Option<i64>,
    leads_since_ms: Option<i64>,
    interval_ms: u64,
    passes: u64,
    last_pass: Option<Pass<'a>>,
    last_check_at_ms: Option<i64>,
    next_check_at_ms: Option<i64>,
    updated_at_ms: Option<i64>,
    events: Vec<Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Pass<'a> {
    pass: u64,
    reason: PassReason,
    at_ms: Option<i64>,
    outcome: PassOutcome,
    changed: &'a [String],
    failed: &'a [String],
    run: Option<&'a str>,
}

impl<'a> Pass<'a> {
    fn of(p: &'a PassSummary) -> Pass<'a> {
        Pass {
            pass: p.pass,
            reason: p.reason,
            at_ms: ms(&p.finished_at),
            outcome: p.outcome,
            changed: &p.changed,
            failed: &p.failed,
            run: p.run.as_deref(),
        }
    }
}

/// What the watcher says of one service.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceView<'a> {
    restarts: u32,
    last_exit: Option<ExitView<'a>>,
    next_restart_at_ms: Option<i64>,
    backoff_ms: Option<u64>,
    policy: &'a str,
    health: Health,
    held: Option<&'a str>,
    instances: &'a [String],
    recent: Vec<Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExitView<'a> {
    at_ms: Option<i64>,
    kind: ExitKind,
    code: Option<i32>,
    signal: Option<&'a str>,
    text: &'a str,
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
        value(Summary {
            running: self.running,
            role: s.role,
            holder: &s.leader.holder,
            pid: s.leader.pid,
            host: &s.leader.host,
            epoch: s.leader.epoch,
            started_at_ms: ms(&s.started_at),
            leads_since_ms: ms(&s.leader.since),
            interval_ms: s.interval_ms,
            passes: s.passes,
            last_pass: s.last_pass.as_ref().map(Pass::of),
            last_check_at_ms: s.last_check.as_deref().and_then(ms),
            next_check_at_ms: s.next_full_check.as_deref().and_then(ms),
            updated_at_ms: ms(&s.updated_at),
            events: self.events.iter().map(event_json).collect(),
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
        Some(value(ServiceView {
            restarts: s.restarts,
            last_exit: s.last_exit.as_ref().map(|e| ExitView {
                at_ms: ms(&e.at),
                kind: e.exit.kind,
                code: e.exit.code,
                signal: e.exit.signal.as_deref(),
                text: &e.text,
            }),
            next_restart_at_ms: s.next_attempt.as_deref().and_then(ms),
            backoff_ms: s.backoff_ms,
            policy: &s.policy,
            health: s.health,
            held: s.held.as_deref(),
            instances: &s.instances,
            recent: recent.iter().map(|r| event_json(r)).collect(),
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
}
