//! Running a command on the host: an argv with its environment, in its own
//! process group, killed (the whole group) at a timeout, when it is dropped,
//! and when this process dies (Linux). Output is captured through an unlinked
//! temporary file, never a pipe, so a straggler holding it open cannot block
//! the caller.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Seek};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::process::Signal;

use super::proc;

/// Output of a command (on the host, or in an instance).
#[derive(Debug, Clone)]
pub struct ExecOutput {
    /// Exit code; `None` when killed by a signal or the timeout.
    pub code: Option<i32>,
    pub timed_out: bool,
    pub output: String,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// `exit code 3`, `killed by a signal`, `timed out`.
    pub fn exit_text(&self) -> String {
        if self.timed_out {
            "timed out".into()
        } else {
            match self.code {
                Some(c) => format!("exit code {c}"),
                None => "killed by a signal".into(),
            }
        }
    }
}

/// Why a command could not be run to its end.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run `{command}` in {dir}: {source}")]
    Spawn {
        command: String,
        dir: String,
        source: io::Error,
    },
    #[error("waiting for `{command}`: {source}")]
    Wait { command: String, source: io::Error },
    #[error("cannot capture the output of `{command}`: {source}")]
    Capture { command: String, source: io::Error },
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A file for a child's output: created in the temporary directory and
/// unlinked at once, so only the descriptors keep it.
pub fn capture_file() -> io::Result<fs::File> {
    let path = std::env::temp_dir().join(format!(
        ".nanokit-output-{}-{:016x}.log",
        std::process::id(),
        fastrand::u64(..)
    ));
    let file = fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    let _ = fs::remove_file(&path);
    Ok(file)
}

/// Everything written to a [`capture_file`].
pub fn read_capture(mut file: fs::File) -> String {
    let mut bytes = Vec::new();
    let _ = file.rewind().and_then(|_| file.read_to_end(&mut bytes));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs `argv` in `dir` with `env` (over this process's environment), its
/// output captured; the whole group is killed at `timeout`, or when the
/// leader exits (no background child of the command is left behind).
pub async fn run(
    argv: &[String],
    dir: &Path,
    env: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<ExecOutput, CommandError> {
    let command = argv.join(" ");
    let capture = |source| CommandError::Capture {
        command: command.clone(),
        source,
    };
    let file = capture_file().map_err(capture)?;
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .current_dir(dir)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(file.try_clone().map_err(capture)?)
        .stderr(file.try_clone().map_err(capture)?);
    let mut child = GroupChild::spawn(cmd).map_err(|source| CommandError::Spawn {
        command: command.clone(),
        dir: dir.display().to_string(),
        source,
    })?;
    let wait = |source| CommandError::Wait {
        command: command.clone(),
        source,
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => {
            let status = status.map_err(wait)?;
            Ok(ExecOutput {
                code: status.code(),
                timed_out: false,
                output: read_capture(file),
            })
        }
        Err(_) => {
            child.kill();
            let _ = child.wait().await;
            Ok(ExecOutput {
                code: None,
                timed_out: true,
                output: format!("timed out after {}", humantime::format_duration(timeout)),
            })
        }
    }
}

struct GroupState {
    /// The leader has been reaped: its pid (and group id) may be reused.
    reaped: bool,
}

/// A child running in its own process group, forked by (and reaped on) a
/// dedicated thread that lives exactly as long as the child.
pub struct GroupChild {
    pid: u32,
    state: Arc<Mutex<GroupState>>,
    done: Option<tokio::sync::oneshot::Receiver<io::Result<ExitStatus>>>,
    thread: Option<JoinHandle<()>>,
}

impl GroupChild {
    /// Spawns `cmd` as the leader of a new process group, with
    /// `PR_SET_PDEATHSIG(SIGKILL)` (Linux).
    pub fn spawn(mut cmd: std::process::Command) -> io::Result<GroupChild> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        #[cfg(target_os = "linux")]
        {
            let parent = std::process::id() as i32;
            // SAFETY: the closure runs between fork and exec and only makes
            // async-signal-safe system calls (prctl, getppid); no allocation.
            unsafe {
                cmd.pre_exec(move || {
                    rustix::process::set_parent_process_death_signal(Some(
                        rustix::process::Signal::KILL,
                    ))?;
                    // We may have died between fork and prctl: then the death
                    // signal will never come; do not run orphaned.
                    if rustix::process::getppid().map(|p| p.as_raw_pid()) != Some(parent) {
                        return Err(io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
        let state = Arc::new(Mutex::new(GroupState { reaped: false }));
        let (spawned_tx, spawned_rx) = std::sync::mpsc::channel::<io::Result<u32>>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name("nanokit-child".into())
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = spawned_tx.send(Err(e));
                        return;
                    }
                };
                let pid = child.id();
                let _ = spawned_tx.send(Ok(pid));
                // Wait for the leader's exit without reaping it: while it is
                // a zombie its pid, and so the group id, cannot be reused.
                if let Some(p) = proc::pid(pid) {
                    use rustix::process::{waitid, WaitId, WaitIdOptions};
                    while let Err(rustix::io::Errno::INTR) = waitid(
                        WaitId::Pid(p),
                        WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
                    ) {}
                }
                let mut state = thread_state.lock().unwrap_or_else(|e| e.into_inner());
                // Stragglers (scripts the command started) die with it.
                proc::kill_group(pid, Signal::KILL);
                let status = child.wait();
                state.reaped = true;
                drop(state);
                let _ = done_tx.send(status);
            })?;
        match spawned_rx.recv() {
            Ok(Ok(pid)) => Ok(GroupChild {
                pid,
                state,
                done: Some(done_rx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(io::Error::other("the child's thread ended early")),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills the whole group (if the leader has not been reaped yet).
    pub fn kill(&self) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.reaped {
            proc::kill_group(self.pid, Signal::KILL);
        }
    }

    /// Waits for the leader to exit (the rest of the group is killed then).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let done = self
            .done
            .as_mut()
            .ok_or_else(|| io::Error::other("already waited"))?;
        let status = done
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the child's thread ended early")));
        self.done = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        status
    }
}

impl Drop for GroupChild {
    /// Not waited for (cancelled, aborted, or an error on the way): kill the
    /// group and wait, briefly, until its processes are gone, so that the
    /// caller can remove their working directory.
    fn drop(&mut self) {
        if self.done.is_none() {
            return;
        }
        self.kill();
        let members: Vec<u32> = proc::group_members(self.pid)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        proc::wait_gone(&members, Duration::from_secs(5));
        let mut members = members;
        members.push(self.pid);
        proc::wait_gone(&members, Duration::from_secs(5));
        // The thread reaps the leader and ends on its own.
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_dropped_child_takes_its_group_with_it() {
        let mut cmd = std::process::Command::new("sh");
        // The shell starts a grandchild in the same group, then waits.
        cmd.args(["-c", "sleep 30 & wait"]);
        let child = GroupChild::spawn(cmd).unwrap();
        let pgid = child.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        while proc::group_members(pgid).len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            proc::group_members(pgid).len(),
            2,
            "sh and sleep run in the group"
        );
        drop(child);
        assert!(
            proc::group_members(pgid).is_empty(),
            "the whole group is gone"
        );
    }

    #[tokio::test]
    async fn stragglers_die_when_the_leader_exits() {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "sleep 30 & echo started"]);
        cmd.stdout(std::process::Stdio::null());
        let mut child = GroupChild::spawn(cmd).unwrap();
        let pgid = child.pid();
        assert!(child.wait().await.unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !proc::group_members(pgid).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            proc::group_members(pgid).is_empty(),
            "the background sleep was killed"
        );
    }

    #[tokio::test]
    async fn run_captures_both_streams_and_cuts_the_group_at_the_timeout() {
        let env = BTreeMap::new();
        let argv = |s: &str| vec!["sh".to_string(), "-c".to_string(), s.to_string()];
        let out = run(
            &argv("echo out; echo err >&2; exit 3"),
            Path::new("."),
            &env,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.output, "out\nerr\n");
        assert_eq!(out.exit_text(), "exit code 3");
        let t0 = Instant::now();
        let out = run(
            &argv("sleep 30 & sleep 30"),
            Path::new("."),
            &env,
            Duration::from_millis(200),
        )
        .await
        .unwrap();
        assert!(out.timed_out && out.code.is_none(), "{out:?}");
        assert!(t0.elapsed() < Duration::from_secs(20), "cut at the timeout");
    }
}
