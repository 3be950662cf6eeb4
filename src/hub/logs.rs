//! Service logs for the page: the last lines of one service's log or of
//! every service's, then the lines they add (a server-sent event stream),
//! and a search through whole logs. The log is what `nanokit logs` prints
//! (`.nanokit/logs/<env>/<service>.log`: a process's output, hook output);
//! for the Docker provider, the container's own output is added from the
//! daemon. Every line is masked before it is sent or matched, so a search
//! cannot find a secret. A stopped service's log is still there: the page
//! shows its last lines.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde::Serialize;
use tokio::sync::mpsc;

use super::live::Live;
use super::project::Project;
use super::query::Query;
use super::respond::{error, event_stream, json_bytes, sse, Body};
use crate::config::ProviderKind;
use crate::trace::Masker;

/// Lines sent first, per service.
const TAIL_LINES: usize = 500;
/// Bytes read from the end of a log for its first lines.
const TAIL_BYTES: u64 = 256 * 1024;
/// A longer line is cut.
const MAX_LINE: usize = 8 * 1024;
/// Matches a search returns at most, and how much of each log it reads.
const SEARCH_MAX: usize = 1000;
const SEARCH_BYTES: u64 = 32 * 1024 * 1024;
/// Lines per event.
const BATCH: usize = 500;
/// Logs are looked at this often when no change was notified (a shared
/// file system; the Docker daemon's output).
const POLL: Duration = Duration::from_secs(1);

/// The services whose logs `q` asks for (`service`, or every one when it
/// is empty or `*`), and their log files.
fn files(p: &Project, service: &str) -> Result<Vec<(String, PathBuf)>, Box<Response<Body>>> {
    let cfg = &p.config;
    let dir = cfg.work_dir().join("logs").join(&cfg.env);
    if service.is_empty() || service == "*" {
        let mut names: Vec<String> = cfg.services.keys().cloned().collect();
        // Logs of services no longer configured are still shown.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.filter_map(|e| e.ok()) {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(s) = n.strip_suffix(".log") {
                    if !names.iter().any(|x| x == s) {
                        names.push(s.to_string());
                    }
                }
            }
        }
        return Ok(names
            .into_iter()
            .map(|n| {
                let f = cfg.log_file(&n);
                (n, f)
            })
            .collect());
    }
    let known = cfg.services.contains_key(service) || cfg.log_file(service).is_file();
    if !known || service.contains('/') || service.starts_with('.') {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "ENKNOLOGS",
            &format!("no service `{service}` in environment `{}`", cfg.env),
        )));
    }
    Ok(vec![(service.to_string(), cfg.log_file(service))])
}

fn cut(line: &str) -> String {
    if line.len() <= MAX_LINE {
        return line.to_string();
    }
    let mut end = MAX_LINE;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

/// The end of the file at `path`: its last `lines` lines, and its size
/// and identity (to follow it from there).
fn tail(path: &Path, lines: usize) -> (Vec<String>, u64, u64) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (Vec::new(), 0, 0);
    };
    let meta = f.metadata().ok();
    let len = meta.as_ref().map_or(0, |m| m.len());
    let ino = meta.as_ref().map_or(0, |m| m.ino());
    let from = len.saturating_sub(TAIL_BYTES);
    let mut bytes = Vec::new();
    if f.seek(SeekFrom::Start(from)).is_ok() {
        let _ = f.take(len - from).read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut all: Vec<&str> = text.lines().collect();
    if from > 0 && !all.is_empty() {
        all.remove(0);
    }
    let start = all.len().saturating_sub(lines);
    (
        all[start..].iter().map(|l| cut(l)).collect(),
        from + bytes.len() as u64,
        ino,
    )
}

/// One log file being followed.
struct Follower {
    service: String,
    path: PathBuf,
    pos: u64,
    ino: u64,
    partial: Vec<u8>,
}

impl Follower {
    /// The complete lines added since the last look (from the start again
    /// when the file was replaced or truncated: rotated).
    fn read(&mut self) -> Vec<String> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let Ok(meta) = f.metadata() else {
            return Vec::new();
        };
        if meta.ino() != self.ino || meta.len() < self.pos {
            self.ino = meta.ino();
            self.pos = 0;
            self.partial.clear();
        }
        if meta.len() == self.pos {
            return Vec::new();
        }
        let mut bytes = Vec::new();
        if f.seek(SeekFrom::Start(self.pos)).is_err()
            || f.take(4 * 1024 * 1024).read_to_end(&mut bytes).is_err()
        {
            return Vec::new();
        }
        self.pos += bytes.len() as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(last_nl) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let rest = self.partial.split_off(last_nl + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        String::from_utf8_lossy(&done).lines().map(cut).collect()
    }
}

/// A container's output as the daemon keeps it, followed by asking for its
/// last lines and sending those after the ones already sent.
struct Container {
    service: String,
    seen: Vec<String>,
}

impl Container {
    fn new_lines(&mut self, tail: Vec<String>) -> Vec<String> {
        // Where the lines already sent end in the new tail: the last place
        // the last few of them (3, else 2, else 1) appear.
        let mut at = if self.seen.is_empty() { Some(0) } else { None };
        for k in (1..=self.seen.len().min(3)).rev() {
            let end = &self.seen[self.seen.len() - k..];
            at = (k..=tail.len()).rev().find(|&i| tail[i - k..i] == *end);
            if at.is_some() {
                break;
            }
        }
        let fresh: Vec<String> = match at {
            Some(i) => tail[i..].to_vec(),
            None => tail.clone(),
        };
        self.seen.extend(fresh.iter().cloned());
        let drop = self.seen.len().saturating_sub(200);
        self.seen.drain(..drop);
        fresh
    }
}

async fn container_tail(p: &Project, service: &str, lines: usize) -> Vec<String> {
    match p.provider.logs(service, lines).await {
        Ok(t) => t.lines().map(cut).collect(),
        Err(_) => Vec::new(),
    }
}

/// Lines of logs: `[service, line]` each, masked.
#[derive(Serialize)]
struct Lines<'a> {
    first: bool,
    lines: Vec<(&'a str, String)>,
}

fn lines_event(masker: &Masker, lines: Vec<(String, String)>, first: bool) -> Vec<Bytes> {
    lines
        .chunks(BATCH)
        .map(|c| {
            let lines = c
                .iter()
                .map(|(s, t)| (s.as_str(), masker.mask(t)))
                .collect();
            lines_json(&Lines { first, lines })
        })
        .collect()
}

fn lines_json(l: &Lines) -> Bytes {
    sse(
        "lines",
        None,
        &serde_json::to_vec(l).expect("JSON serialises"),
    )
}

/// `GET /api/logs?env=&service=`: the log stream.
pub(super) fn stream(live: &Live, q: &Query) -> Response<Body> {
    let (p, files) = match target(live, q) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let live = live.clone();
    super::spawn(async move {
        let docker = p.config.provider == ProviderKind::Docker;
        let mut first = Vec::new();
        let mut followers = Vec::new();
        let mut containers = Vec::new();
        for (svc, path) in &files {
            let (lines, pos, ino) = tail(path, TAIL_LINES);
            first.extend(lines.into_iter().map(|l| (svc.clone(), l)));
            followers.push(Follower {
                service: svc.clone(),
                path: path.clone(),
                pos,
                ino,
                partial: Vec::new(),
            });
            if docker {
                let mut c = Container {
                    service: svc.clone(),
                    seen: Vec::new(),
                };
                let lines = c.new_lines(container_tail(&p, svc, TAIL_LINES).await);
                first.extend(lines.into_iter().map(|l| (svc.clone(), l)));
                containers.push(c);
            }
        }
        let masker = live.masker();
        let mut events = lines_event(&masker, first, true);
        if events.is_empty() {
            events.push(lines_json(&Lines {
                first: true,
                lines: Vec::new(),
            }));
        }
        for e in events {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        let mut changed = live.logs_changed();
        let stop = live.stop().clone();
        loop {
            let polled = tokio::select! {
                r = changed.changed() => { if r.is_err() { return; } false }
                _ = tokio::time::sleep(POLL) => true,
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
            };
            let mut out = Vec::new();
            for f in followers.iter_mut() {
                let svc = f.service.clone();
                out.extend(f.read().into_iter().map(|l| (svc.clone(), l)));
            }
            if polled {
                for c in containers.iter_mut() {
                    let tail = container_tail(&p, &c.service, 200).await;
                    let svc = c.service.clone();
                    out.extend(c.new_lines(tail).into_iter().map(|l| (svc.clone(), l)));
                }
            }
            for e in lines_event(&live.masker(), out, false) {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
        }
    });
    event_stream(rx)
}

/// The environment (`env`, default the first) and the logs (`service`)
/// that `q` asks for.
fn target(live: &Live, q: &Query) -> Result<LogTarget, Box<Response<Body>>> {
    let p = project(live, q)?;
    let f = files(&p, q.get("service").map_or("", String::as_str))?;
    Ok((p, f))
}

type LogTarget = (std::sync::Arc<Project>, Vec<(String, PathBuf)>);

fn project(live: &Live, q: &Query) -> Result<std::sync::Arc<Project>, Box<Response<Body>>> {
    let env = q.get("env").cloned().unwrap_or_default();
    let found = if env.is_empty() {
        live.projects().into_iter().next()
    } else {
        live.project(&env)
    };
    found.ok_or_else(|| {
        Box::new(error(
            StatusCode::NOT_FOUND,
            "ENKHUBREQUEST",
            &format!("environment `{env}` is not shown by this hub"),
        ))
    })
}

/// `GET /api/logs/search?env=&service=&q=`: lines of whole logs that
/// contain `q` (case-insensitive), after masking.
pub(super) async fn search(live: &Live, q: &Query) -> Response<Body> {
    let (p, files) = match target(live, q) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let needle = q
        .get("q")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_default();
    if needle.is_empty() || needle.len() > 500 {
        return error(
            StatusCode::BAD_REQUEST,
            "ENKHUBREQUEST",
            "give a search text (q) of 1 to 500 characters",
        );
    }
    let masker = live.masker();
    let docker = p.config.provider == ProviderKind::Docker;
    let mut matches = Vec::new();
    let mut truncated = false;
    'files: for (svc, path) in &files {
        let (mut lines, _, _) = tail(path, usize::MAX);
        if std::fs::metadata(path).is_ok_and(|m| m.len() > TAIL_BYTES) {
            lines = read_lines(path, SEARCH_BYTES);
        }
        if docker {
            lines.extend(container_tail(&p, svc, 100_000).await);
        }
        for line in lines {
            let masked = masker.mask(&line);
            // find, not contains: its searcher is in the binary once;
            // contains adds a vectorised one inline.
            if masked.to_lowercase().find(needle.as_str()).is_some() {
                if matches.len() >= SEARCH_MAX {
                    truncated = true;
                    break 'files;
                }
                matches.push((svc.as_str(), masked));
            }
        }
    }
    #[derive(Serialize)]
    struct Matches<'a> {
        matches: Vec<(&'a str, String)>,
        truncated: bool,
    }
    let m = Matches { matches, truncated };
    json_bytes(
        StatusCode::OK,
        serde_json::to_vec(&m).expect("JSON serialises"),
    )
}

/// The lines of the last `max` bytes of the file.
fn read_lines(path: &Path, max: u64) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(max);
    let mut bytes = Vec::new();
    if f.seek(SeekFrom::Start(from)).is_err() || f.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<String> = text.lines().map(cut).collect();
    if from > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_lines_already_sent_are_not_sent_again() {
        let mut c = Container {
            service: "s".into(),
            seen: Vec::new(),
        };
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(c.new_lines(v(&["a", "b", "c"])), v(&["a", "b", "c"]));
        assert_eq!(c.new_lines(v(&["b", "c", "d", "e"])), v(&["d", "e"]));
        assert!(c.new_lines(v(&["c", "d", "e"])).is_empty());
        // The same line again is new when it comes after what was seen.
        assert_eq!(c.new_lines(v(&["d", "e", "e"])), v(&["e"]));
    }

    #[test]
    fn a_follower_sends_complete_lines_once_and_starts_over_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.log");
        std::fs::write(&path, "old\n").unwrap();
        let (lines, pos, ino) = tail(&path, 10);
        assert_eq!(lines, ["old"]);
        let mut f = Follower {
            service: "s".into(),
            path: path.clone(),
            pos,
            ino,
            partial: Vec::new(),
        };
        use std::io::Write;
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        w.write_all(b"one\ntw").unwrap();
        assert_eq!(f.read(), ["one"]);
        w.write_all(b"o\n").unwrap();
        assert_eq!(f.read(), ["two"]);
        assert!(f.read().is_empty());
        std::fs::rename(&path, dir.path().join("s.log.1")).unwrap();
        std::fs::write(&path, "fresh\n").unwrap();
        assert_eq!(f.read(), ["fresh"]);
    }
}
