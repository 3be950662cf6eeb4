//! A `nanokit watch` process under test: its events (`--output json`)
//! read as they come, waited for one by one (never slept for).

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a wait for an event may take before the test fails (a guard
/// against hangs, not a timing assertion).
pub const PATIENCE: Duration = Duration::from_secs(90);

pub struct Watcher {
    child: Child,
    events: Receiver<Value>,
    /// Every event read so far, in order.
    pub seen: Vec<Value>,
    pub pid: u32,
}

impl Watcher {
    /// `nanokit watch -f <file> --output json <args>`, with `envs`.
    pub fn start(file: &Path, args: &[&str], envs: &[(&str, &str)]) -> Watcher {
        Self::spawn(file, args, envs, false)
    }

    /// Like [`Watcher::start`], in a process group of its own, as a shell
    /// runs a job: what a terminal's Ctrl-C or hangup signals is that
    /// group ([`Watcher::signal_group`]).
    pub fn start_as_job(file: &Path, args: &[&str], envs: &[(&str, &str)]) -> Watcher {
        Self::spawn(file, args, envs, true)
    }

    fn spawn(file: &Path, args: &[&str], envs: &[(&str, &str)], job: bool) -> Watcher {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nanokit"));
        if job {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        cmd.arg("watch")
            .arg("-f")
            .arg(file)
            .args(["--output", "json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start nanokit watch");
        let out = child.stdout.take().unwrap();
        let (tx, events) = channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                    Err(_) => eprintln!("watch stdout: {line}"),
                }
            }
        });
        let pid = child.id();
        Watcher {
            child,
            events,
            seen: Vec::new(),
            pid,
        }
    }

    /// Waits for the next event matching `pred` (read after the events
    /// already taken) and returns it.
    pub fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let by = Instant::now() + PATIENCE;
        loop {
            let left = by.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "no event {what} within {PATIENCE:?}; last events:\n{}",
                    self.recent()
                ),
            }
        }
    }

    /// Waits for the next event of `kind` (about `service`, when given).
    pub fn until_event(&mut self, kind: &str, service: Option<&str>) -> Value {
        let what = format!("{kind} {}", service.unwrap_or(""));
        self.until(&what, |e| {
            e["type"] == kind && service.is_none_or(|s| e["service"] == s)
        })
    }

    /// Takes every event already read from the watcher, without waiting.
    pub fn drain(&mut self) {
        while let Ok(v) = self.events.try_recv() {
            self.seen.push(v);
        }
    }

    /// The events taken so far that match `pred`.
    pub fn taken(&self, pred: impl Fn(&Value) -> bool) -> Vec<&Value> {
        self.seen.iter().filter(|e| pred(e)).collect()
    }

    pub fn recent(&self) -> String {
        let from = self.seen.len().saturating_sub(40);
        self.seen[from..]
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid as i32, sig);
        }
    }

    /// Sends `sig` to the watcher's whole process group (started with
    /// [`Watcher::start_as_job`]), as a terminal does to its foreground job.
    pub fn signal_group(&self, sig: i32) {
        unsafe {
            libc::kill(-(self.pid as i32), sig);
        }
    }

    /// Waits until the watcher took up a signal it caught: its handler ran
    /// and gave `sig` back its default action (`SigCgt` in
    /// /proc/<pid>/status no longer has it). Two signals sent back to back
    /// would otherwise be merged by the kernel while the first is pending.
    pub fn wait_signal_taken(&self, sig: i32) {
        let by = Instant::now() + PATIENCE;
        let bit = 1u64 << (sig - 1);
        loop {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
            let caught = status
                .lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok());
            match caught {
                Some(m) if m & bit != 0 => {}
                _ => return,
            }
            assert!(
                Instant::now() < by,
                "nanokit watch did not take up signal {sig}\n{}",
                self.recent()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the process to exit (bounded by [`PATIENCE`]).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let by = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // The rest of its output.
                while let Ok(v) = self.events.recv_timeout(Duration::from_secs(1)) {
                    self.seen.push(v);
                }
                return st;
            }
            assert!(
                Instant::now() < by,
                "nanokit watch did not exit\n{}",
                self.recent()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pid of `service`'s (first) instance as state.json records it.
pub fn recorded_pid(state_file: &Path, service: &str) -> Option<u32> {
    let v: Value = serde_json::from_slice(&std::fs::read(state_file).ok()?).ok()?;
    let id = v["resources"][service]["provider_id"].as_str()?;
    id.split('@').next()?.parse().ok()
}

/// Whether process `pid` runs (not a zombie).
pub fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .map(|x| x.1.trim_start())
        .unwrap_or("");
    !stat.is_empty() && !state.starts_with('Z')
}
