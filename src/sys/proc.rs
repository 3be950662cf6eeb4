//! `/proc` parsing and signals (Linux): to process groups, and through a
//! pidfd to a process checked to be in a container. Without `/proc` (other
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

    /// Process `pid` (of this stat) has wholly exited: dead, or a zombie
    /// with no other thread left. A killed process's leader thread turns
    /// zombie first; its other threads exit after it and, the last one,
    /// free its memory and close its files (its sockets) only then.
    pub fn wholly_exited(&self, pid: u32) -> bool {
        self.state == 'X'
            || (self.state == 'Z'
                && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(true, |d| d.count() <= 1))
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

/// The members of process group `pgid` that have not wholly exited (see
/// [`Stat::wholly_exited`]), with their start times.
pub fn group_members(pgid: u32) -> Vec<(u32, u64)> {
    pids()
        .into_iter()
        .filter_map(|p| {
            let s = stat(p)?;
            (s.pgrp == pgid as i32 && !s.wholly_exited(p)).then_some((p, s.start_time))
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

/// The command line of `pid`, its arguments joined by spaces (None when it
/// is gone or has none: a kernel thread).
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!args.is_empty()).then(|| args.join(" "))
}

/// The working directory of `pid`.
pub fn cwd(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// Whether the working directory of `pid` is the directory with device and
/// inode `dir`, or beneath it. Judged by identity, walking `..` up from the
/// working directory itself, not by the text of a path: a directory reached
/// through a symlink or a relative path is still found.
pub fn cwd_within(pid: u32, dir: (u64, u64)) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mut path = std::path::PathBuf::from(format!("/proc/{pid}/cwd"));
    let mut last = None;
    for _ in 0..256 {
        let Ok(m) = std::fs::metadata(&path) else {
            return false;
        };
        let id = (m.dev(), m.ino());
        if id == dir {
            return true;
        }
        // `..` of the root is the root itself.
        if last == Some(id) {
            return false;
        }
        last = Some(id);
        path.push("..");
    }
    false
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

/// Whether group `pgid` has any process left, zombies included (a signal
/// 0 to the group: no walk of /proc). Only "no such process" says no: a
/// group of another user's processes (EPERM) exists.
pub fn group_exists(pgid: u32) -> bool {
    pid(pgid).is_some_and(|p| {
        rustix::process::test_kill_process_group(p) != Err(rustix::io::Errno::SRCH)
    })
}

/// Waits until none of `pids` is a live (non-zombie) process, at most `limit`.
pub fn wait_gone(pids: &[u32], limit: Duration) {
    let deadline = Instant::now() + limit;
    while pids.iter().any(|&p| start_time(p).is_some()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A process held through a pidfd: a signal sent through it reaches the
/// process it was opened on, never a later one that reuses the pid.
#[derive(Debug)]
pub struct Held {
    fd: std::os::fd::OwnedFd,
    pid: u32,
    start_time: u64,
}

impl Held {
    /// Holds `pid` if it runs and is in a control group whose path names
    /// `container` (checked after opening, so the check is about the process
    /// held). None when it is not visible from here (nanokit in another pid
    /// namespace or on another host), gone, or elsewhere.
    pub fn in_container(pid: u32, container: &str) -> Option<Held> {
        if container.len() < 12 {
            return None;
        }
        let held = Held::open(pid)?;
        cgroup(pid).contains(container).then_some(held)
    }

    /// Holds `pid` if it runs and started at `start_time` (clock ticks
    /// since boot): the very process an id `pid@start_time` names.
    pub fn of(pid: u32, start_time: u64) -> Option<Held> {
        Held::open(pid).filter(|h| h.start_time == start_time)
    }

    /// Holds `pid` if it runs.
    fn open(pid: u32) -> Option<Held> {
        let flags = rustix::process::PidfdFlags::empty();
        let fd = rustix::process::pidfd_open(self::pid(pid)?, flags).ok()?;
        let start_time = start_time(pid)?;
        Some(Held {
            fd,
            pid,
            start_time,
        })
    }

    /// Sends `signal` to the held process (an error when it may not be
    /// signalled from here, e.g. another user's, or when it is gone).
    pub fn signal(&self, signal: rustix::process::Signal) -> std::io::Result<()> {
        rustix::process::pidfd_send_signal(&self.fd, signal).map_err(Into::into)
    }

    /// How the held process ended (exit code, or the signal that ended
    /// it), when it has and is a child of this process not reaped yet: read
    /// without reaping it (`waitid` with `WNOWAIT`), so its reaper still
    /// reaps it. None otherwise.
    pub fn ended(&self) -> Option<(Option<i32>, Option<i32>)> {
        use rustix::process::{waitid, WaitId, WaitIdOptions};
        use std::os::fd::AsFd;
        let opts = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT | WaitIdOptions::NOHANG;
        let status = waitid(WaitId::PidFd(self.fd.as_fd()), opts).ok()??;
        Some((status.exit_status(), status.terminating_signal()))
    }

    /// Whether the held process has exited (a zombie has).
    pub fn gone(&self) -> bool {
        start_time(self.pid) != Some(self.start_time)
    }

    /// Resolves once the held process has exited: when its pidfd turns
    /// readable, which the kernel does at the exit. (Needs a tokio runtime
    /// with I/O enabled, as every runtime of nanokit's is.) Where the fd
    /// cannot be watched, `/proc` is looked at every 10 ms instead.
    pub async fn exited(&self) {
        use tokio::io::{unix::AsyncFd, Interest};
        // SAFETY: the AsyncFd owns the duplicate fd, which stays open and
        // the same until the AsyncFd is dropped.
        let watched =
            self.fd.try_clone().ok().and_then(|fd| {
                unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.ok()
            });
        if let Some(fd) = watched {
            if fd.readable().await.is_ok() {
                return;
            }
        }
        while !self.gone() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The signal Docker names `name` (`SIGTERM`, `TERM`, `15`), if it is one
/// of the standard ones (real-time signals such as `SIGRTMIN+3` are not).
pub fn signal_named(name: &str) -> Option<rustix::process::Signal> {
    let name = name.trim();
    let raw = match name.parse::<i32>() {
        Ok(n) => n,
        Err(_) => {
            let bare = name.strip_prefix("SIG").unwrap_or(name);
            SIGNALS
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(bare))?
                .1
        }
    };
    rustix::process::Signal::from_named_raw(raw)
}

/// The name of standard signal `raw` (`SIGKILL` for 9), if it is one.
pub fn signal_name(raw: i32) -> Option<String> {
    SIGNALS
        .iter()
        .find(|(_, n)| *n == raw)
        .map(|(name, _)| format!("SIG{name}"))
}

const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("IOT", libc::SIGIOT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::process::Signal;

    #[test]
    fn signals_are_named_as_docker_names_them() {
        for name in ["SIGTERM", "TERM", "term", "15"] {
            assert_eq!(signal_named(name), Some(Signal::TERM), "{name}");
        }
        assert_eq!(signal_named("SIGUSR1"), Some(Signal::USR1));
        assert_eq!(signal_named("SIGKILL"), Some(Signal::KILL));
        for name in ["SIGRTMIN+3", "SIGNOPE", "0", "99", ""] {
            assert_eq!(signal_named(name), None, "{name}");
        }
        assert_eq!(signal_name(9).as_deref(), Some("SIGKILL"));
        assert_eq!(signal_name(6).as_deref(), Some("SIGABRT"));
        assert_eq!(signal_name(99), None);
    }

    #[test]
    fn a_process_outside_the_containers_group_is_not_held() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let held = Held::in_container(child.id(), "0123456789abcdef0123");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(held.is_none(), "held outside the container's group");
        assert!(Held::in_container(std::process::id(), "short").is_none());
    }

    #[tokio::test]
    async fn exited_resolves_at_the_exit_and_not_before() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let held = Held::open(child.id()).expect("held");
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), held.exited())
            .await
            .expect("exited within 10 s");
        assert!(held.gone(), "resolved while the process runs");
        assert!(started.elapsed() >= Duration::from_millis(250));
        child.wait().unwrap();
    }
}
