//! What a running `nanokit watch` says about itself and the services it
//! keeps up, as the page gets it: its status and recent events read through
//! the engine's own types and readers (`engine::watch::status`, contract B),
//! never a second copy of the format, and sent as the watcher writes them.
//! Each event carries the line the engine words for it, as Nomad's task
//! events read ("restarting in 27.7 s (attempt 3)"); the page picks each
//! service's own.

use serde::Serialize;
use serde_json::Value;

use super::json::{parse, value};
use crate::config::Config;
use crate::engine;
use crate::engine::watch::status::{self, EventRecord, WatchStatus};

/// How many recent events are kept (all services).
const RECENT: usize = 50;

/// An event as the page gets it: its record (type, fields, seq, epoch,
/// time) and its line.
fn event_json(r: &EventRecord) -> Value {
    let mut v = value(r);
    if let Value::Object(m) = &mut v {
        m.insert("text".into(), r.text().into());
    }
    v
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

    /// `{ running, status, events }`: whether it runs, its status as it
    /// writes it (`status.json`: leader, epoch, last pass, next full check,
    /// each service's restarts, last exit, next attempt, health), and its
    /// recent events.
    pub(super) fn json(&self) -> Value {
        #[derive(Serialize)]
        struct Json {
            running: bool,
            status: Value,
            events: Vec<Value>,
        }
        // Written as the watcher writes it: one instance of that code.
        let status = parse(serde_json::to_vec_pretty(&self.status).ok().as_deref());
        value(Json {
            running: self.running,
            status,
            events: self.events.iter().map(event_json).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::watch::status::{
        EventLog, Exit, Health, LastExit, Leader, PassOutcome, PassReason, PassSummary, Role,
        ServiceWatch, WatchEvent,
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

    /// The hub reads what the watcher writes, through the watcher's types,
    /// and sends it as written, each event with its line.
    #[test]
    fn sends_the_watchers_status_and_recent_events_as_written() {
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
        let j = w.json();
        assert_eq!(j["running"], true);
        let s = &j["status"];
        assert_eq!(s["leader"]["epoch"], 7);
        assert_eq!(s["lastPass"]["run"], "r1");
        assert_eq!(s["lastPass"]["outcome"], "ok");
        assert_eq!(s["nextFullCheck"], "2026-01-02T03:04:37Z");
        let api = &s["services"]["api"];
        assert_eq!(api["restarts"], 1);
        assert_eq!(api["lastExit"]["text"], "exited with code 137 (SIGKILL)");
        assert_eq!(api["lastExit"]["signal"], "SIGKILL");
        assert_eq!(api["health"], "backingOff");
        assert_eq!(api["nextAttempt"], "2026-01-02T03:04:34.700Z");
        let events = j["events"].as_array().unwrap();
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(events[0]["type"], "serviceExited");
        assert_eq!(events[0]["service"], "api");
        assert_eq!(events[1]["text"], "restarting in 27.7 s (attempt 3)");
        assert_eq!(events[1]["at"], "2026-01-02T03:04:06Z");
        assert_eq!(events[2]["service"], "db");
        st.role = Role::Stopped;
        status::write_status(&status::status_path(&work, &cfg.env), &st).unwrap();
        assert!(!Watcher::read(&cfg).unwrap().running());
    }
}
