//! A `nanokit up` / `down` / `restart` while a watcher leads is handed to the watcher
//! instead of racing it: the run finds the deploy lock held by a live
//! watcher of the same project and environment on this host, writes its
//! request to `.nanokit/watch/requests/`, and waits for the watcher's
//! answer (the same report it would have made), following its progress
//! through the event log. The watcher serves requests one at a time,
//! between passes: an `up` restores and restarts what it names even when a
//! policy held it; a `restart` replaces the running instances of what it
//! names as `engine::restart` does (their dependents keep running); a
//! `down` stops what it names, and the watcher keeps it down until an `up`
//! or `restart` of it. A watcher on another host (a PostgreSQL
//! state) cannot be reached this way: there the run fails at once naming
//! the holder, as with any held deploy lock.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::status::{self, WatchEvent, WatchStatus};
use crate::config::Config;
use crate::engine::report::{Event, Phase, Report};
use crate::engine::{EngineError, RunOptions};

/// What is asked of the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Up,
    Down,
    /// Replace the running instances of the request's services.
    Restart,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Up => "up",
            Command::Down => "down",
            Command::Restart => "restart",
        }
    }
}

/// One request (`<env>-<id>.req.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub id: String,
    pub env: String,
    pub command: Command,
    /// Only these services (none: all).
    pub services: Vec<String>,
    /// `up --force`: volume deletions allowed.
    pub force: bool,
    /// `down --volumes`.
    pub volumes: bool,
    /// Who asked (for the watcher's log).
    pub pid: u32,
    pub at: String,
}

/// The watcher's answer (`<env>-<id>.done.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    pub id: String,
    pub report: Option<Report>,
    pub error: Option<String>,
}

/// Where requests and answers are.
pub fn requests_dir(config: &Config) -> PathBuf {
    status::dir(&config.work_dir()).join("requests")
}

fn request_path(dir: &Path, env: &str, id: &str) -> PathBuf {
    dir.join(format!("{env}-{id}.req.json"))
}

fn answer_path(dir: &Path, env: &str, id: &str) -> PathBuf {
    dir.join(format!("{env}-{id}.done.json"))
}

/// The watcher leading `config`'s project and environment from this host,
/// if one runs.
pub fn leader(config: &Config) -> Option<WatchStatus> {
    let s = status::read_status(&config.work_dir(), &config.env).ok()??;
    let here = crate::sys::host::this_host();
    (s.project == config.name && s.leader.host_id == here.id && s.running()).then_some(s)
}

/// The requests waiting for `config`'s environment, oldest first; each is
/// taken (its file removed). Unreadable ones are answered with an error.
pub(super) fn take(config: &Config) -> Vec<Request> {
    let dir = requests_dir(config);
    let prefix = format!("{}-", config.env);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix) && n.ends_with(".req.json")
        })
        .map(|e| {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    found.sort();
    let mut out = Vec::new();
    for (_, path) in found {
        let read = std::fs::read(&path);
        let _ = std::fs::remove_file(&path);
        match read
            .ok()
            .and_then(|b| serde_json::from_slice::<Request>(&b).ok())
        {
            Some(r) if r.env == config.env => out.push(r),
            _ => tracing::warn!("ignored an unreadable watch request {}", path.display()),
        }
    }
    out
}

/// Answers `req` with `result`.
pub(super) fn answer(config: &Config, req: &Request, result: Result<Report, String>) {
    let (report, error) = match result {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(config.masker().mask(&e))),
    };
    let a = Answer {
        id: req.id.clone(),
        report,
        error,
    };
    let path = answer_path(&requests_dir(config), &config.env, &req.id);
    let bytes = serde_json::to_vec(&config.masker().to_json(&a)).expect("answer serializes");
    if let Err(e) = crate::sys::private::write(&path, &bytes) {
        tracing::warn!("cannot answer the watch request {}: {e}", path.display());
    }
}

/// Hands `command` (with `opts`' targets, force, volumes) to the watcher
/// `leader` and waits for its answer, passing on the progress events of
/// its work to `opts.events`. Cancelling stops the wait, not the work.
pub async fn hand_over(
    config: &Config,
    command: Command,
    opts: &RunOptions,
    leader: &WatchStatus,
) -> Result<Report, EngineError> {
    let dir = requests_dir(config);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let req = Request {
        id: id.clone(),
        env: config.env.clone(),
        command,
        services: opts.targets.clone(),
        force: opts.force,
        volumes: opts.volumes,
        pid: std::process::id(),
        at: crate::state::now(),
    };
    let events = status::events_path(&config.work_dir(), &config.env);
    let mut tail = Tail::new(&events);
    let bytes = serde_json::to_vec(&req).expect("request serializes");
    let io = |e: std::io::Error| {
        EngineError::Failed(format!(
            "a watcher (pid {}) leads this project; cannot hand it the request in {}: {e}",
            leader.leader.pid,
            dir.display()
        ))
    };
    crate::sys::private::write(&request_path(&dir, &config.env, &id), &bytes).map_err(io)?;
    if let Some(sink) = &opts.events {
        sink(&Event {
            service: String::new(),
            phase: Phase::Waiting,
            elapsed_ms: 0,
            message: Some(format!(
                "handed to the watcher (pid {} on {}), which leads this project",
                leader.leader.pid, leader.leader.host
            )),
        });
    }
    let answer = answer_path(&dir, &config.env, &id);
    let mut alive_check = Instant::now();
    loop {
        if let Ok(b) = std::fs::read(&answer) {
            let _ = std::fs::remove_file(&answer);
            tail.forward(&id, opts);
            let a: Answer = serde_json::from_slice(&b).map_err(|e| {
                EngineError::Failed(format!("the watcher's answer cannot be read: {e}"))
            })?;
            return match (a.report, a.error) {
                (Some(r), _) => Ok(r),
                (None, e) => Err(EngineError::Failed(format!(
                    "the watcher (pid {}) could not do it: {}",
                    leader.leader.pid,
                    e.unwrap_or_default()
                ))),
            };
        }
        tail.forward(&id, opts);
        if alive_check.elapsed() >= Duration::from_millis(500) {
            alive_check = Instant::now();
            if !leader.running() {
                let _ = std::fs::remove_file(request_path(&dir, &config.env, &id));
                return Err(EngineError::Failed(format!(
                    "the watcher (pid {}) that leads this project exited before answering; run the command again",
                    leader.leader.pid
                )));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = opts.cancel.cancelled() => return Err(EngineError::Cancelled),
        }
    }
}

/// Follows the watcher's event log from where it ended when created.
struct Tail {
    path: PathBuf,
    at: u64,
    partial: String,
    ours: bool,
}

impl Tail {
    fn new(path: &Path) -> Tail {
        Tail {
            path: path.to_path_buf(),
            at: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            partial: String::new(),
            ours: false,
        }
    }

    /// Passes on the progress events that follow request `id`'s start.
    fn forward(&mut self, id: &str, opts: &RunOptions) {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.at {
            self.at = 0; // rotated
        }
        if f.seek(SeekFrom::Start(self.at)).is_err() {
            return;
        }
        let mut text = String::new();
        if f.read_to_string(&mut text).is_err() {
            return;
        }
        self.at += text.len() as u64;
        self.partial.push_str(&text);
        let Some(end) = self.partial.rfind('\n') else {
            return;
        };
        let lines: String = self.partial.drain(..=end).collect();
        for line in lines.lines() {
            let Ok(r) = serde_json::from_str::<status::EventRecord>(line) else {
                continue;
            };
            match r.event {
                WatchEvent::Request { id: rid, .. } => self.ours = rid == id,
                WatchEvent::Progress {
                    service,
                    phase,
                    elapsed_ms,
                    message,
                } if self.ours => {
                    let Some(sink) = &opts.events else { continue };
                    let Ok(phase) = serde_json::from_value::<Phase>(phase.into()) else {
                        continue;
                    };
                    sink(&Event {
                        service,
                        phase,
                        elapsed_ms,
                        message,
                    });
                }
                _ => {}
            }
        }
    }
}
