//! `/proc` parsing and process-group signals (Linux). Without `/proc` (other
//! systems, which are not supported) every lookup finds nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Fields of `/proc/<pid>/stat` after the command name.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    /// `R`, `S`, `Z` (zombie), `X` (dead), …
    pub state: char,
    /// Process group id.
    pub pgrp: i32,
    /// Start time in clock ticks since boot (field 22).
    pub start_time: u64,
}

impl Stat {
    /// A zombie or a dead process: it no longer runs.
    pub fn gone(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
    }
}

/// `/proc/<pid>/stat`, if the process exists.
#[cfg(target_os = "linux")]
pub fn stat(pid: u32) -> Option<Stat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: f.first()?.chars().next()?,
        pgrp: f.get(2)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

#[cfg(not(target_os = "linux"))]
pub fn stat(_pid: u32) -> Option<Stat> {
    None
}

/// Start time of `pid` (clock ticks since boot), if it exists and runs (not
/// a zombie).
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).filter(|s| !s.gone()).map(|s| s.start_time)
}

/// The variables of `/proc/<pid>/environ` whose names start with `prefix`.
#[cfg(target_os = "linux")]
pub fn environ(pid: u32, prefix: &str) -> Option<BTreeMap<String, String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(
        bytes
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let s = std::str::from_utf8(kv).ok()?;
                let (k, v) = s.split_once('=')?;
                k.starts_with(prefix)
                    .then(|| (k.to_string(), v.to_string()))
            })
            .collect(),
    )
}

#[cfg(not(target_os = "linux"))]
pub fn environ(_pid: u32, _prefix: &str) -> Option<BTreeMap<String, String>> {
    None
}

/// Every pid in `/proc`.
#[cfg(target_os = "linux")]
pub fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(not(target_os = "linux"))]
pub fn pids() -> Vec<u32> {
    Vec::new()
}

/// The running members of process group `pgid`, with their start times.
pub fn group_members(pgid: u32) -> Vec<(u32, u64)> {
    pids()
        .into_iter()
        .filter_map(|p| {
            let s = stat(p)?;
            (s.pgrp == pgid as i32 && !s.gone()).then_some((p, s.start_time))
        })
        .collect()
}

/// `/proc/<pid>/cgroup` (empty when gone): the control groups `pid` is in,
/// which name the container of a containerised process.
pub fn cgroup(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

/// `pid` and all its descendants (through every thread's `children`).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", tree[i]));
        for task in tasks.into_iter().flatten().flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            tree.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    tree
}

/// The working directory of `pid`.
pub fn cwd(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// `raw` as a process id to signal: never 0 or 1 (`kill(0)` / `kill(-1)`
/// mean "our own group" / "everyone"), nor beyond the kernel's range.
pub fn pid(raw: u32) -> Option<rustix::process::Pid> {
    (raw > 1 && raw <= i32::MAX as u32)
        .then(|| rustix::process::Pid::from_raw(raw as i32))
        .flatten()
}

/// Sends `signal` to process `pid`.
pub fn kill(pid: u32, signal: rustix::process::Signal) {
    if let Some(p) = self::pid(pid) {
        let _ = rustix::process::kill_process(p, signal);
    }
}

/// Sends `signal` to every process of group `pgid`.
pub fn kill_group(pgid: u32, signal: rustix::process::Signal) {
    if let Some(p) = pid(pgid) {
        let _ = rustix::process::kill_process_group(p, signal);
    }
}

/// Waits until none of `pids` is a live (non-zombie) process, at most `limit`.
pub fn wait_gone(pids: &[u32], limit: Duration) {
    let deadline = Instant::now() + limit;
    while pids.iter().any(|&p| start_time(p).is_some()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}
