//! The local-process provider: each service's `start` runs as `sh -c` in its
//! own process group (outside nanokit's terminal job: a Ctrl-C or hangup of
//! that job does not reach it, and it outlives the command that started
//! it), spawned without forking nanokit, with its env and
//! the labels exported as environment variables, logging to
//! `.nanokit/logs/<env>/<service>.log`.
//!
//! An instance id is `<pid>@<start time>` (start time in clock ticks since
//! boot, from `/proc/<pid>/stat`), so a pid reused by another process is
//! never mistaken for ours. Instances are also found by their labels, read
//! from `/proc/<pid>/environ`. Stop sends SIGTERM to the group, then SIGKILL
//! after the grace period, then sweeps any member left in the group, and
//! returns only once every member has wholly exited (no thread left), so the
//! next instance finds its port and files free.
//!
//! Linux only: without `/proc` (other systems, which are not supported) no
//! instance can be found or verified, so every service looks stopped.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use rustix::process::Signal;

use super::*;
use crate::sys::command::{self, tail, ExecOutput};
use crate::sys::proc;

/// `pid@start` → (pid, start).
pub fn parse_id(id: &str) -> Option<(u32, u64)> {
    let (p, s) = id.split_once('@')?;
    Some((p.parse().ok()?, s.parse().ok()?))
}

/// Whether the process named by `id` still runs (same pid *and* start time).
pub fn id_alive(id: &str) -> bool {
    parse_id(id).is_some_and(|(pid, st)| proc::start_time(pid) == Some(st))
}

/// The labels of process `pid` (its `NK_` environment variables).
fn labels(pid: u32) -> Option<BTreeMap<String, String>> {
    proc::environ(pid, "NK_")
}

/// The labels of process `pid` started at `start`, read once per process:
/// they were set when it was spawned, and a pid with its start time names
/// one process only. Reading `/proc/<pid>/environ` reads the process's
/// memory; a restart pass looks at every recorded process.
mod known_labels {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Mutex;

    type Labels = BTreeMap<String, String>;
    /// Processes remembered at most (they are forgotten as they end).
    const CAP: usize = 4096;
    static KNOWN: Mutex<Option<HashMap<(u32, u64), Labels>>> = Mutex::new(None);

    fn with<T>(f: impl FnOnce(&mut HashMap<(u32, u64), Labels>) -> T) -> T {
        let mut k = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
        f(k.get_or_insert_with(HashMap::new))
    }

    /// Its labels (None: it is gone, or has none).
    pub(super) fn of(pid: u32, start: u64) -> Option<Labels> {
        if let Some(l) = with(|k| k.get(&(pid, start)).cloned()) {
            return Some(l);
        }
        let labels = super::labels(pid).filter(|l| !l.is_empty())?;
        with(|k| {
            if k.len() >= CAP {
                k.clear();
            }
            k.insert((pid, start), labels.clone());
        });
        Some(labels)
    }

    /// It has ended.
    pub(super) fn forget(pid: u32, start: u64) {
        with(|k| k.remove(&(pid, start)));
    }
}

/// The local-process provider.
#[derive(Debug, Clone)]
pub struct ProcessProvider {
    log_dir: PathBuf,
    volume_dir: PathBuf,
}

impl ProcessProvider {
    /// `log_dir`: `.nanokit/logs/<env>`; `volume_dir`: `.nanokit/volumes/<env>`.
    pub fn new(log_dir: PathBuf, volume_dir: PathBuf) -> Self {
        ProcessProvider {
            log_dir,
            volume_dir,
        }
    }

    fn instance(pid: u32, start: u64, env: &BTreeMap<String, String>) -> Instance {
        Instance {
            id: format!("{pid}@{start}"),
            service: env.get(LABEL_SERVICE).cloned().unwrap_or_default(),
            config_hash: env.get(LABEL_HASH).cloned().unwrap_or_default(),
            running: true,
            pid: Some(pid),
            replica: env
                .get(LABEL_REPLICA)
                .and_then(|r| r.parse().ok())
                .unwrap_or(1),
            lineage: env.get(LABEL_LINEAGE).cloned(),
        }
    }
}

#[async_trait]
impl Provider for ProcessProvider {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn observe(&self, scope: &Scope) -> Result<Vec<Instance>, ProviderError> {
        let scope = scope.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for pid in proc::pids() {
                // Only group leaders are instances; their children share labels.
                let Some(st) = proc::stat(pid) else { continue };
                if st.pgrp != pid as i32 || st.state == 'Z' {
                    continue;
                }
                let Some(env) = known_labels::of(pid, st.start_time) else {
                    continue;
                };
                if env.get(LABEL_STATE_ID) == Some(&scope.state_id)
                    && env.get(LABEL_ENV) == Some(&scope.env)
                {
                    out.push(Self::instance(pid, st.start_time, &env));
                }
            }
            out.sort_by(|a, b| a.service.cmp(&b.service).then(a.id.cmp(&b.id)));
            out
        })
        .await
        .map_err(|e| ProviderError::Io(e.to_string()))
    }

    /// Each recorded process, looked at by its pid (a few reads, not a
    /// walk of every process).
    async fn observe_recorded(
        &self,
        _scope: &Scope,
        ids: &[String],
    ) -> Result<Vec<Instance>, ProviderError> {
        let mut out = Vec::new();
        for id in ids {
            if let Some(i) = self.inspect(id).await? {
                out.push(i);
            }
        }
        Ok(out)
    }

    async fn inspect(&self, id: &str) -> Result<Option<Instance>, ProviderError> {
        let Some((pid, start)) = parse_id(id) else {
            return Ok(None);
        };
        if proc::start_time(pid) != Some(start) {
            known_labels::forget(pid, start);
            return Ok(None);
        }
        let env = known_labels::of(pid, start).unwrap_or_default();
        Ok(Some(Self::instance(pid, start, &env)))
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProviderError> {
        let command = spec.command.clone().ok_or_else(|| {
            ProviderError::Failed(format!("service `{}` has no start command", spec.service))
        })?;
        let io = |what: &str, e: std::io::Error| ProviderError::Io(format!("{what}: {e}"));
        for (name, _) in &spec.volumes {
            let dir = self.volume_path(name);
            crate::sys::private::dir(&dir)
                .map_err(|e| io(&format!("cannot create volume {}", dir.display()), e))?;
        }
        // 0600 in a 0700 folder: the service's output may quote secrets.
        let mut log = crate::sys::private::open_append(&spec.log_file)
            .map_err(|e| io(&format!("cannot open log {}", spec.log_file.display()), e))?;
        // One write: appends from other writers never land inside the line.
        let _ = log.write_all(
            format!(
                "--- nanokit: starting `{}` at {} ---\n",
                spec.service,
                humantime::format_rfc3339_millis(std::time::SystemTime::now())
            )
            .as_bytes(),
        );
        let err_log = log.try_clone().map_err(|e| io("log", e))?;
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(&command)
            .current_dir(&spec.dir)
            .envs(&spec.env)
            .envs(&spec.labels)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log);
        // Its own process group, set by posix_spawn (std's path when no
        // pre_exec hook is given): a restart does not wait for a fork of
        // this process, which may be a large Node process.
        cmd.process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            io(
                &format!("cannot start `{}` in {}", spec.service, spec.dir.display()),
                e,
            )
        })?;
        let pid = child.id();
        tracing::debug!(service = %spec.service, pid, "started");
        // Not reaped yet, so its start time can be read even if it exited.
        let started = proc::stat(pid).map(|s| s.start_time);
        if let Some(start) = started {
            reaped::expect(pid, start);
        }
        // Reap it when it exits, so it never lingers as a zombie of ours,
        // and keep how it ended for `exited`.
        std::thread::spawn(move || {
            let status = child.wait();
            if let Some(start) = started {
                reaped::record(pid, start, status.ok());
            }
        });
        let start = started.ok_or_else(|| {
            // Gone before we could even read its start time: say why, as the
            // engine does for an instance that dies while starting.
            let log = std::fs::read_to_string(&spec.log_file).unwrap_or_default();
            ProviderError::Failed(format!(
                "the instance exited while starting; last log lines (of {}):\n{}",
                spec.log_file.display(),
                tail(&log, 20)
            ))
        })?;
        Ok(Instance {
            id: format!("{pid}@{start}"),
            service: spec.service.clone(),
            config_hash: spec.config_hash.clone(),
            running: true,
            pid: Some(pid),
            replica: spec.replica,
            lineage: spec.labels.get(LABEL_LINEAGE).cloned(),
        })
    }

    async fn exec(
        &self,
        _id: &str,
        spec: &InstanceSpec,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, ProviderError> {
        let mut env = spec.env.clone();
        env.extend(command_labels(&spec.labels));
        Ok(command::run(argv, &spec.dir, &env, timeout).await?)
    }

    async fn probe(
        &self,
        id: &str,
        spec: &InstanceSpec,
        probe: &Probe,
        timeout: Duration,
    ) -> Result<ProbeResult, ProviderError> {
        match probe {
            Probe::Running => Ok(ProbeResult {
                ok: id_alive(id),
                output: String::new(),
                fatal: false,
            }),
            Probe::Port(port) => {
                let port = *port;
                tokio::task::spawn_blocking(move || {
                    let addr = SocketAddr::from(([127, 0, 0, 1], port));
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(_) => ProbeResult {
                            ok: true,
                            output: String::new(),
                            fatal: false,
                        },
                        Err(e) => ProbeResult {
                            ok: false,
                            output: format!("127.0.0.1:{port}: {e}"),
                            fatal: false,
                        },
                    }
                })
                .await
                .map_err(|e| ProviderError::Io(e.to_string()))
            }
            Probe::Command(argv) => {
                let out = self.exec(id, spec, argv, timeout).await?;
                Ok(ProbeResult::of_command(out))
            }
        }
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), ProviderError> {
        let Some((pid, start)) = parse_id(id) else {
            return Ok(());
        };
        let alive = || proc::start_time(pid) == Some(start);
        if alive() {
            proc::kill_group(pid, Signal::TERM);
            let deadline = tokio::time::Instant::now() + grace;
            while alive() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if alive() {
                proc::kill_group(pid, Signal::KILL);
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while alive() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if alive() {
                return Err(ProviderError::Failed(format!(
                    "process {pid} did not exit after SIGKILL"
                )));
            }
        }
        // An empty group (the usual case: the leader took its children with
        // it, or they were gone already) needs no walk of /proc.
        if !proc::group_exists(pid) {
            return Ok(());
        }
        // Sweep members left in the group (children that ignored SIGTERM or
        // outlived their leader). Only members started after the leader can
        // belong to it.
        let members = || {
            proc::group_members(pid)
                .into_iter()
                .filter(|&(_, started)| started >= start)
                .collect::<Vec<_>>()
        };
        for (member, _) in members() {
            proc::kill(member, Signal::KILL);
        }
        // Stopped means all of it is gone: a member still exiting (the
        // leader `sh` dies first, its `node` a few ms later) still holds
        // what the next instance needs, its port first.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = members();
            if left.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProviderError::Failed(format!(
                    "process {} of group {pid} did not exit after SIGKILL",
                    left[0].0
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// At the exit of the process the id names, as the kernel reports it
    /// through a pidfd (at once when it is gone already).
    async fn exited(&self, id: &str) {
        if let Some(held) = parse_id(id).and_then(|(pid, start)| proc::Held::of(pid, start)) {
            held.exited().await;
        }
    }

    fn ports_bound_here(&self) -> bool {
        true
    }

    async fn logs(&self, service: &str, lines: usize) -> Result<String, ProviderError> {
        let path = self.log_dir.join(format!("{service}.log"));
        match std::fs::read(&path) {
            Ok(b) => Ok(tail(&String::from_utf8_lossy(&b), lines)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ProviderError::Failed(format!(
                    "no logs for `{service}` yet ({} does not exist)",
                    path.display()
                )))
            }
            Err(e) => Err(ProviderError::Io(format!("{}: {e}", path.display()))),
        }
    }

    async fn create_volume(&self, name: &str) -> Result<String, ProviderError> {
        let p = self.volume_path(name);
        crate::sys::private::dir(&p)
            .map_err(|e| ProviderError::Io(format!("{}: {e}", p.display())))?;
        Ok(p.to_string_lossy().into_owned())
    }

    async fn delete_volume(&self, id: &str) -> Result<(), ProviderError> {
        match std::fs::remove_dir_all(id) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProviderError::Io(format!("{id}: {e}"))),
        }
    }

    fn volume_path(&self, name: &str) -> PathBuf {
        self.volume_dir.join(name)
    }

    fn reused_pid(&self, id: &str) -> Option<u32> {
        // Not one of ours (observe did not find it): whoever runs it now.
        parse_id(id).and_then(|(pid, _)| proc::start_time(pid).map(|_| pid))
    }

    /// Through a pidfd on the process (adopted from another run when it is
    /// not this process's child): its exit is known the moment the kernel
    /// has it (at once when it is gone already). The exit code is known
    /// for this process's own children.
    fn ended(&self, id: &str) -> Option<futures::future::BoxFuture<'static, Exit>> {
        let (pid, start) = parse_id(id)?;
        let held = proc::Held::of(pid, start);
        Some(Box::pin(async move {
            // Gone already: it ended before anyone looked.
            if let Some(held) = held {
                held.exited().await;
                // A child of ours not reaped yet: its status at once.
                if let Some(ended) = held.ended() {
                    return reaped::exit_of(ended);
                }
            }
            reaped::wait(pid, start).await
        }))
    }
}

/// How this process's children ended, as their reapers saw them, for
/// [`ProcessProvider::exited`]: kept from the exit until it is asked for
/// (the last few at most).
mod reaped {
    use std::collections::{HashSet, VecDeque};
    use std::os::unix::process::ExitStatusExt;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::{proc, Exit, ExitKind};

    /// Exits kept: a reader comes within milliseconds of the exit.
    const KEPT: usize = 64;

    #[derive(Default)]
    struct Children {
        /// Running (or not yet reaped) children: (pid, start time).
        running: HashSet<(u32, u64)>,
        /// How the last ones ended.
        ended: VecDeque<((u32, u64), Option<std::process::ExitStatus>)>,
    }

    static CHILDREN: Mutex<Option<Children>> = Mutex::new(None);
    static RECORDED: tokio::sync::Notify = tokio::sync::Notify::const_new();

    fn with<T>(f: impl FnOnce(&mut Children) -> T) -> T {
        let mut c = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
        f(c.get_or_insert_with(Default::default))
    }

    /// Child `pid` started at `start` runs and has a reaper.
    pub(super) fn expect(pid: u32, start: u64) {
        with(|c| c.running.insert((pid, start)));
    }

    /// Its reaper reaped it (None: the wait failed).
    pub(super) fn record(pid: u32, start: u64, status: Option<std::process::ExitStatus>) {
        with(|c| {
            c.running.remove(&(pid, start));
            if c.ended.len() == KEPT {
                c.ended.pop_front();
            }
            c.ended.push_back(((pid, start), status));
        });
        RECORDED.notify_waiters();
    }

    /// How it ended, once reaped (and forgets it); Err while still a
    /// child not reaped yet; Ok(None) when it is not a child of ours.
    fn take(pid: u32, start: u64) -> Result<Option<Exit>, ()> {
        with(|c| {
            if let Some(at) = c.ended.iter().position(|e| e.0 == (pid, start)) {
                let status = c.ended.remove(at).and_then(|e| e.1);
                return Ok(status.map(status_exit));
            }
            if c.running.contains(&(pid, start)) {
                Err(())
            } else {
                Ok(None)
            }
        })
    }

    fn status_exit(status: std::process::ExitStatus) -> Exit {
        exit_of((status.code(), status.signal()))
    }

    /// An exit from its code, or the signal that ended it.
    pub(super) fn exit_of(ended: (Option<i32>, Option<i32>)) -> Exit {
        match ended {
            (Some(code), _) => Exit::code(code),
            (None, Some(sig)) => Exit {
                kind: ExitKind::Exited,
                code: None,
                signal: proc::signal_name(sig),
            },
            _ => Exit::new(ExitKind::Exited),
        }
    }

    /// How process `pid` (started at `start`, now exited) ended: for a
    /// child of this process, its status once its reaper (waiting on it
    /// right then) has it; for another's, the code is not known.
    pub(super) async fn wait(pid: u32, start: u64) -> Exit {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let recorded = RECORDED.notified();
            tokio::pin!(recorded);
            recorded.as_mut().enable();
            match take(pid, start) {
                Ok(exit) => return exit.unwrap_or(Exit::new(ExitKind::Exited)),
                Err(()) => {
                    if tokio::time::timeout_at(deadline, recorded).await.is_err() {
                        return Exit::new(ExitKind::Exited);
                    }
                }
            }
        }
    }
}
