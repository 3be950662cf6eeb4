//! The watcher as other processes see it (`nanokit status`, the hub): the
//! one definition of its status file and event log, and how to read and
//! write them.
//!
//! Under `<config dir>/.nanokit/watch/`, per environment as state files are
//! (`status.json` and `events.jsonl` for the default environment,
//! `status.<env>.json` and `events.<env>.jsonl` for others):
//! - the status, rewritten atomically (0600) by the leading watcher after
//!   each change: who leads (holder, pid, host, epoch), the last pass, the
//!   next full check, and per service its restart policy, restarts, last
//!   exit and next attempt;
//! - the event log: each [`WatchEvent`] as one JSON line, appended by the
//!   leader; past [`EVENTS_CAP`] bytes it moves to `events.jsonl.1` (one old
//!   generation kept). A reader may watch the folder with inotify.
//!
//! JSON is camelCase; an event carries its kind in `type`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::provider::{Exit, ExitKind};

/// Format version of the status file.
pub const STATUS_VERSION: u32 = 1;

/// Size of the event log past which it is rotated.
pub const EVENTS_CAP: u64 = 1 << 20;

/// `<config dir>/.nanokit/watch`.
pub fn dir(work_dir: &Path) -> PathBuf {
    work_dir.join("watch")
}

/// `name.ext` for the default environment, `name.<env>.ext` for others.
fn per_env(work_dir: &Path, env: &str, name: &str, ext: &str) -> PathBuf {
    let file = if env == crate::config::DEFAULT_ENV {
        format!("{name}.{ext}")
    } else {
        format!("{name}.{env}.{ext}")
    };
    dir(work_dir).join(file)
}

/// The status file of `env`'s watcher (`work_dir`: `<config dir>/.nanokit`).
pub fn status_path(work_dir: &Path, env: &str) -> PathBuf {
    per_env(work_dir, env, "status", "json")
}

/// The event log of `env`'s watcher.
pub fn events_path(work_dir: &Path, env: &str) -> PathBuf {
    per_env(work_dir, env, "events", "jsonl")
}

/// The watcher's status (`status.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchStatus {
    pub version: u32,
    pub project: String,
    pub env: String,
    /// The nanokit.yml it watches.
    pub file: String,
    /// `leader` while it leads; `stopped` once it stopped and released the
    /// lease (a standby never writes this file).
    pub role: Role,
    /// The watcher that writes this file (the leader).
    pub leader: Leader,
    /// When this watcher process started (RFC 3339).
    pub started_at: String,
    /// The full drift check's period.
    pub interval_ms: u64,
    /// The last pass that had something to do.
    #[serde(default)]
    pub last_pass: Option<PassSummary>,
    /// When the last full check ran (with or without changes).
    #[serde(default)]
    pub last_check: Option<String>,
    /// When the next full check is due.
    #[serde(default)]
    pub next_full_check: Option<String>,
    /// Passes with something to do since this watcher led.
    pub passes: u64,
    /// Every service of the configuration.
    pub services: BTreeMap<String, ServiceWatch>,
    pub updated_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    Leader,
    Stopped,
}

/// Who leads, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Leader {
    /// The deploy lock's holder label (`nanokit watch (<project> / <env>)`).
    pub holder: String,
    pub pid: u32,
    /// The process's start time (clock ticks since boot), so a reused pid
    /// is not taken for the watcher.
    #[serde(default)]
    pub pid_start: Option<u64>,
    pub host: String,
    /// Pids are only comparable where this equals the reader's.
    pub host_id: String,
    /// The lease's fencing epoch: greater after every takeover.
    pub epoch: u64,
    pub since: String,
}

/// One pass that had something to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PassSummary {
    /// Its number within this leadership (1: the initial `up`).
    pub pass: u64,
    pub reason: PassReason,
    pub started_at: String,
    pub finished_at: String,
    pub outcome: PassOutcome,
    /// Services started, restarted, updated or deleted.
    #[serde(default)]
    pub changed: Vec<String>,
    /// Services that failed or were skipped.
    #[serde(default)]
    pub failed: Vec<String>,
    /// Its trace (`nanokit timeline <run>`), when tracing is on.
    #[serde(default)]
    pub run: Option<String>,
    #[serde(default)]
    pub trace_id: Option<String>,
}

/// Why a pass ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PassReason {
    /// The `up` a watcher starts with (also after taking over).
    Initial,
    /// A restart came due (an exit, a removal, a failed health check).
    Restart,
    /// nanokit.yml or its `.env` changed.
    Config,
    /// The periodic full check found drift.
    FullCheck,
    /// `nanokit up` / `down` handed to the watcher.
    Request,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PassOutcome {
    /// Every service it touched came up (or went).
    Ok,
    /// Some service failed or was skipped (it is retried per its policy).
    Failed,
    /// Cut short: the watcher was stopped, or lost the lease.
    Cancelled,
}

/// One service as the watcher keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceWatch {
    /// `always`, `on-failure`, `on-failure:3`, `unless-stopped`, `no`.
    pub policy: String,
    /// Restarts made by this watcher.
    pub restarts: u32,
    #[serde(default)]
    pub last_exit: Option<LastExit>,
    /// While backing off: when the next attempt is due.
    #[serde(default)]
    pub next_attempt: Option<String>,
    /// The delay before that attempt.
    #[serde(default)]
    pub backoff_ms: Option<u64>,
    pub health: Health,
    /// Why it is not restarted (policy `no`, `on-failure` given up, stopped
    /// by a user), when it is not.
    #[serde(default)]
    pub held: Option<String>,
    /// Its instances (provider ids).
    #[serde(default)]
    pub instances: Vec<String>,
}

/// The last exit of a service, and when it was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastExit {
    pub at: String,
    #[serde(flatten)]
    pub exit: Exit,
    /// How it reads (`exited with code 137 (SIGKILL)`).
    pub text: String,
}

/// A service's health as the watcher last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Health {
    /// Running and healthy.
    Healthy,
    /// Being (re)started.
    Starting,
    /// Running, with failed health checks counted.
    Unhealthy,
    /// Not running; restarting when `nextAttempt` comes.
    BackingOff,
    /// Not running, and not restarted (see `held`).
    Down,
    /// Not known yet.
    Unknown,
}

/// One thing the watcher saw or did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum WatchEvent {
    /// This watcher waits for the lease (another one leads).
    Standby { holder: Option<String> },
    /// It took the lease and leads (the record's `epoch` is the new one).
    LeadershipAcquired { holder: String },
    /// It lost the lease (taken over, cleared) and stopped acting (the
    /// record's `epoch` is the one it lost).
    LeadershipLost { reason: String },
    /// A pass began.
    PassStarted {
        pass: u64,
        reason: PassReason,
        /// The services it was started for (empty: everything that drifted).
        services: Vec<String>,
        /// The handed-over request it runs, if any (see `Request`).
        request: Option<String>,
        trace_id: Option<String>,
    },
    /// A pass ended.
    PassFinished {
        pass: u64,
        outcome: PassOutcome,
        changed: Vec<String>,
        failed: Vec<String>,
        run: Option<String>,
        trace_id: Option<String>,
        trace_file: Option<String>,
        elapsed_ms: u64,
    },
    /// One service's progress inside a pass (the steps `up` reports).
    Progress {
        service: String,
        phase: String,
        elapsed_ms: u64,
        message: Option<String>,
    },
    /// An instance died, exited, was stopped or removed.
    ServiceExited {
        service: String,
        instance: String,
        exit: Exit,
        text: String,
    },
    /// A restart is due at `dueAt`, after `delayMs`.
    RestartScheduled {
        service: String,
        /// The attempt's number since the service last stayed healthy.
        attempt: u32,
        delay_ms: u64,
        due_at: String,
    },
    /// A service was restarted and is healthy again.
    Restarted {
        service: String,
        attempt: u32,
        instances: Vec<String>,
    },
    /// A restart failed (the next one is scheduled per the policy).
    RestartFailed {
        service: String,
        attempt: u32,
        error: String,
    },
    /// The service is not restarted.
    Held { service: String, reason: String },
    /// The service stayed healthy long enough: its next restart is
    /// immediate again.
    BackoffReset { service: String },
    /// A running service failed its health check.
    HealthFailed {
        service: String,
        instance: String,
        /// Failures in a row; at `retries` it is restarted.
        failures: u32,
        retries: u32,
        output: String,
    },
    /// Services restarted because a dependency they declare
    /// `restart: true` on was restarted.
    DependentsReleased {
        service: String,
        dependents: Vec<String>,
    },
    /// What a full check found (before restoring it per the policies).
    DriftFound { items: Vec<Drift> },
    /// nanokit.yml or `.env` changed and was read again (an invalid file
    /// is reported and the last good configuration kept).
    ConfigReloaded { error: Option<String> },
    /// A `nanokit up` / `down` handed to the watcher.
    Request {
        id: String,
        command: String,
        services: Vec<String>,
    },
    /// Something went wrong that the watcher retries (the runtime cannot
    /// be reached, its event stream broke).
    Problem { message: String },
    /// The watcher stopped (the lease is released; services keep running).
    Stopped { reason: String },
}

/// One finding of a full check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Drift {
    pub service: String,
    pub detail: String,
}

/// One line of the event log, and what `onEvent` receives. (No event has a
/// field of the same name as these.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    /// Grows by one per event of this watcher process.
    pub seq: u64,
    pub at: String,
    /// The watcher that wrote it, and its epoch then.
    pub pid: u32,
    pub epoch: u64,
    #[serde(flatten)]
    pub event: WatchEvent,
}

/// A delay as people read it: `at once`, `in 450 ms`, `in 27.7 s`.
fn delay_text(ms: u64) -> String {
    match ms {
        0 => "at once".into(),
        1..=999 => format!("in {ms} ms"),
        1000..=119_999 => format!("in {:.1} s", ms as f64 / 1000.0),
        _ => format!("in {} min", ms / 60_000),
    }
}

fn indent(s: &str) -> String {
    s.trim_end()
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A serde enum's name (`backingOff`).
fn name_of<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

impl WatchEvent {
    /// The service the event is about, if one (what a line of it starts
    /// with).
    pub fn service(&self) -> Option<&str> {
        match self {
            WatchEvent::Progress { service, .. }
            | WatchEvent::ServiceExited { service, .. }
            | WatchEvent::RestartScheduled { service, .. }
            | WatchEvent::Restarted { service, .. }
            | WatchEvent::RestartFailed { service, .. }
            | WatchEvent::Held { service, .. }
            | WatchEvent::BackoffReset { service }
            | WatchEvent::HealthFailed { service, .. } => Some(service),
            _ => None,
        }
    }
}

impl EventRecord {
    /// What the event says, without its time or its service (see
    /// [`WatchEvent::service`]), as the CLI prints it and the hub lists a
    /// service's recent events (Nomad's "restarting in 27.7 s").
    pub fn text(&self) -> String {
        match &self.event {
            WatchEvent::Standby { holder } => format!(
                "standby: waiting for the lease ({})",
                holder.as_deref().unwrap_or("held")
            ),
            WatchEvent::LeadershipAcquired { holder } => {
                format!("leading (epoch {}) as {holder}", self.epoch)
            }
            WatchEvent::LeadershipLost { reason } => {
                format!("no longer leading (epoch {}): {reason}", self.epoch)
            }
            WatchEvent::PassStarted {
                pass,
                reason,
                services,
                ..
            } => {
                let reason = name_of(reason);
                if services.is_empty() {
                    format!("pass {pass} ({reason})")
                } else {
                    format!("pass {pass} ({reason}: {})", services.join(", "))
                }
            }
            WatchEvent::PassFinished {
                pass,
                outcome,
                changed,
                failed,
                run,
                elapsed_ms,
                ..
            } => {
                let mut s = format!(
                    "pass {pass} {} in {:.1}s",
                    name_of(outcome),
                    *elapsed_ms as f64 / 1000.0
                );
                if !changed.is_empty() {
                    s.push_str(&format!("; changed: {}", changed.join(", ")));
                }
                if !failed.is_empty() {
                    s.push_str(&format!("; failed: {}", failed.join(", ")));
                }
                if let Some(run) = run {
                    s.push_str(&format!(" (nanokit timeline {run})"));
                }
                s
            }
            WatchEvent::Progress { phase, message, .. } => match message {
                Some(m) if phase == "failed" => format!("{phase}\n{}", indent(m)),
                Some(m) => format!("{phase} {m}"),
                None => phase.clone(),
            },
            WatchEvent::ServiceExited { instance, text, .. } if instance.is_empty() => text.clone(),
            WatchEvent::ServiceExited { instance, text, .. } => format!("{instance} {text}"),
            WatchEvent::RestartScheduled {
                attempt, delay_ms, ..
            } => format!("restarting {} (attempt {attempt})", delay_text(*delay_ms)),
            WatchEvent::Restarted { attempt, .. } => format!("restarted (attempt {attempt})"),
            WatchEvent::RestartFailed { attempt, error, .. } => {
                format!("restart (attempt {attempt}) failed\n{}", indent(error))
            }
            WatchEvent::Held { reason, .. } => format!("not restarted: {reason}"),
            WatchEvent::BackoffReset { .. } => {
                "healthy for 10 s; its next restart is immediate again".into()
            }
            WatchEvent::HealthFailed {
                failures,
                retries,
                output,
                ..
            } => format!(
                "health check failed ({failures}/{retries})\n{}",
                indent(output)
            ),
            WatchEvent::DependentsReleased {
                service,
                dependents,
            } => format!(
                "restarting {} after {service} (depends_on.{service}.restart)",
                dependents.join(", ")
            ),
            WatchEvent::DriftFound { items } => format!(
                "drift: {}",
                items
                    .iter()
                    .map(|i| format!("{} ({})", i.service, i.detail))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            WatchEvent::ConfigReloaded { error: None } => "configuration read again".into(),
            WatchEvent::ConfigReloaded { error: Some(e) } => format!(
                "the configuration has an error; keeping the last good one:\n{}",
                indent(e)
            ),
            WatchEvent::Request {
                command, services, ..
            } => {
                let names: String = services.iter().map(|s| format!(" {s}")).collect();
                format!("`nanokit {command}{names}` handed over")
            }
            WatchEvent::Problem { message } => message.clone(),
            WatchEvent::Stopped { reason } => reason.clone(),
        }
    }
}

/// Reads the status of `env`'s watcher, if one ever wrote it.
pub fn read_status(work_dir: &Path, env: &str) -> std::io::Result<Option<WatchStatus>> {
    match std::fs::read(status_path(work_dir, env)) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl WatchStatus {
    /// Whether the watcher that wrote this still runs and leads: its role
    /// says so and, on this host, its process is alive (from another host
    /// that cannot be told: the lease decides).
    pub fn running(&self) -> bool {
        if self.role != Role::Leader {
            return false;
        }
        let me = crate::sys::host::this_host();
        self.leader.host_id != me.id
            || crate::sys::host::process_alive(self.leader.pid, self.leader.pid_start)
    }
}

/// Marks the status at `path` stopped when watcher `pid` wrote it (a
/// watcher stopped at once, without its last write).
pub fn mark_stopped(path: &Path, pid: u32) {
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    let Ok(mut s) = serde_json::from_slice::<WatchStatus>(&bytes) else {
        return;
    };
    if s.leader.pid == pid && s.role == Role::Leader {
        s.role = Role::Stopped;
        s.next_full_check = None;
        s.updated_at = crate::state::now();
        let _ = write_status(path, &s);
    }
}

/// Writes the status atomically (0600).
pub fn write_status(path: &Path, status: &WatchStatus) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    crate::sys::private::write(path, &bytes)
}

/// The event log, appended one line per event and rotated past
/// [`EVENTS_CAP`]. Keeps one descriptor open.
pub struct EventLog {
    path: PathBuf,
    file: Option<std::fs::File>,
    size: u64,
}

impl EventLog {
    pub fn new(path: PathBuf) -> EventLog {
        EventLog {
            path,
            file: None,
            size: 0,
        }
    }

    /// Appends `record` (errors are logged: the log is informational).
    pub fn append(&mut self, record: &EventRecord) {
        if let Err(e) = self.try_append(record) {
            tracing::warn!(
                "cannot write the watcher's event log {}: {e}",
                self.path.display()
            );
            self.file = None;
        }
    }

    fn try_append(&mut self, record: &EventRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if self.file.is_none() {
            let f = crate::sys::private::open_append(&self.path)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        if self.size + line.len() as u64 > EVENTS_CAP {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.path, PathBuf::from(old))?;
            self.file = Some(crate::sys::private::open_append(&self.path)?);
            self.size = 0;
        }
        let f = self.file.as_mut().expect("opened above");
        // One write per line: readers never see half a line from it.
        f.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }
}

/// The rotated generation of the event log at `path`.
fn rotated(path: &Path) -> PathBuf {
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    PathBuf::from(old)
}

/// Reads the event log (the rotated part first), skipping lines that do
/// not parse (a newer writer's events).
pub fn read_events(path: &Path) -> Vec<EventRecord> {
    let mut out = Vec::new();
    for p in [rotated(path), path.to_path_buf()] {
        if let Ok(text) = std::fs::read_to_string(&p) {
            out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
    }
    out
}

/// The last `n` events of the log, oldest first, reading only its end (at
/// most 64 KiB of each generation), for readers that poll it.
pub fn read_recent_events(path: &Path, n: usize) -> Vec<EventRecord> {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 64 * 1024;
    let tail = |p: &Path| -> Vec<EventRecord> {
        let Ok(mut f) = std::fs::File::open(p) else {
            return Vec::new();
        };
        let from = f.metadata().map_or(0, |m| m.len()).saturating_sub(TAIL);
        let mut bytes = Vec::new();
        if f.seek(SeekFrom::Start(from)).is_err() || f.read_to_end(&mut bytes).is_err() {
            return Vec::new();
        }
        let text = String::from_utf8_lossy(&bytes);
        // Started inside a line: the first is cut.
        let skip = usize::from(from > 0);
        text.lines()
            .skip(skip)
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let mut out = tail(path);
    if out.len() < n {
        let mut older = tail(&rotated(path));
        older.append(&mut out);
        out = older;
    }
    out.drain(..out.len().saturating_sub(n));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_camel_case_with_a_type_tag_and_read_back() {
        let ev = EventRecord {
            seq: 3,
            at: "2026-01-01T00:00:00.000Z".into(),
            pid: 42,
            epoch: 7,
            event: WatchEvent::RestartScheduled {
                service: "api".into(),
                attempt: 2,
                delay_ms: 100,
                due_at: "2026-01-01T00:00:00.100Z".into(),
            },
        };
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["type"], "restartScheduled");
        assert_eq!(json["delayMs"], 100);
        assert_eq!(json["epoch"], 7);
        let back: EventRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, ev);
        assert_eq!(ev.event.service(), Some("api"));
        assert_eq!(ev.text(), "restarting in 100 ms (attempt 2)");
        assert_eq!(delay_text(0), "at once");
        assert_eq!(delay_text(27_700), "in 27.7 s");
        assert_eq!(delay_text(180_000), "in 3 min");
        let exit = WatchEvent::ServiceExited {
            service: "api".into(),
            instance: "1@2".into(),
            exit: Exit::code(137),
            text: Exit::code(137).to_string(),
        };
        let json = serde_json::to_value(&exit).unwrap();
        assert_eq!(json["exit"]["kind"], "exited");
        assert_eq!(json["exit"]["signal"], "SIGKILL");
        assert_eq!(json["text"], "exited with code 137 (SIGKILL)");
    }

    #[test]
    fn the_log_rotates_past_its_cap_and_reads_back_in_order() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(".nanokit/watch/events.jsonl");
        let mut log = EventLog::new(path.clone());
        let big = "x".repeat(10_000);
        let n = 2 * EVENTS_CAP / 10_000 + 20;
        for seq in 0..n {
            log.append(&EventRecord {
                seq,
                at: String::new(),
                pid: 1,
                epoch: 1,
                event: WatchEvent::Stopped {
                    reason: big.clone(),
                },
            });
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= EVENTS_CAP);
        let recent: Vec<u64> = read_recent_events(&path, 3).iter().map(|r| r.seq).collect();
        assert_eq!(recent, [n - 3, n - 2, n - 1]);
        let all = read_events(&path);
        assert!(all.len() < n as usize, "the oldest generation is dropped");
        let seqs: Vec<u64> = all.iter().map(|r| r.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        assert_eq!(*seqs.last().unwrap(), n - 1);
    }

    #[test]
    fn paths_follow_the_state_files_naming() {
        let w = Path::new("/p/.nanokit");
        assert_eq!(status_path(w, "local"), w.join("watch/status.json"));
        assert_eq!(events_path(w, "prod"), w.join("watch/events.prod.jsonl"));
    }
}
