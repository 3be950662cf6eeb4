//! The contender's side: one compare-and-swap attempt (acquire a free lock,
//! or take over exactly what was judged stale or dead), and the waiter that
//! judges staleness by observed progress on its own clock.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::file::{LockFile, Observation, Section, Target, OPEN_FILES};
use super::record::{is_free, new_info, overwrite, read_content, read_record, LockInfo};
use super::{io_err, Lease, LockError, LockOptions};
use crate::sys::host::{self, this_host};

pub(super) enum Attempt {
    Acquired(Lease),
    /// Someone holds it (or the record changed since it was judged).
    Held,
    /// Another process is inside its brief section right now.
    Busy,
}

/// What a waiter judged stale or dead, and why: a takeover replaces exactly
/// this, or nothing.
#[derive(Clone, Copy)]
pub(super) struct Judged<'j> {
    pub(super) seen: &'j Observation,
    /// The bytes the judgement was made on.
    pub(super) content: &'j [u8],
    pub(super) why: &'j str,
}

/// One compare-and-swap, inside the kernel-lock section: writes our record if
/// the lock is free, or, given `replace`, if the file is still exactly as
/// observed and read when its holder was judged stale or dead.
pub(super) fn attempt(
    target: Target<'_>,
    opts: &LockOptions,
    replace: Option<Judged<'_>>,
) -> Result<Attempt, LockError> {
    let path = target.path;
    // A cached file that the path no longer names (deleted or replaced by
    // hand; on NFS, a stale file handle) is reopened; give up for this round
    // if that keeps happening.
    for _ in 0..3 {
        let lock_file = OPEN_FILES.get(target)?;
        let section = match Section::enter(path, &lock_file, Duration::from_millis(20)) {
            Ok(Some(section)) => section,
            Ok(None) => return Ok(Attempt::Busy),
            Err(e) if is_stale_handle(&e) => {
                OPEN_FILES.forget(path, &lock_file);
                continue;
            }
            Err(e) => return Err(e),
        };
        match lock_file.is_at(path) {
            Ok(true) => return swap(path, opts, replace, &lock_file, section),
            Ok(false) => {}
            Err(e) if is_stale_handle(&e) => {}
            Err(e) => return Err(e),
        }
        drop(section);
        OPEN_FILES.forget(path, &lock_file);
    }
    Ok(Attempt::Busy)
}

/// NFS's answer for a file deleted on the server while we had it open.
fn is_stale_handle(e: &LockError) -> bool {
    matches!(e, LockError::Io(e) if e.source.raw_os_error() == Some(libc::ESTALE))
}

/// The compare-and-swap of [`attempt`], inside its section.
fn swap(
    path: &Path,
    opts: &LockOptions,
    replace: Option<Judged<'_>>,
    lock_file: &Arc<LockFile>,
    section: Section<'_>,
) -> Result<Attempt, LockError> {
    let file = &lock_file.file;
    let content = read_content(file).map_err(io_err("read", path))?;
    let free = is_free(&content);
    if !free {
        let Some(Judged {
            seen,
            content: judged,
            why,
        }) = replace
        else {
            return Ok(Attempt::Held);
        };
        // Both checks: the observation alone misses a torn read (the stat
        // already showing the new write, the bytes still half the old
        // record, a dead pid in them), the bytes alone an ABA.
        let now = Observation::of(&file.metadata().map_err(io_err("stat", path))?);
        if now != *seen || content != judged {
            return Ok(Attempt::Held);
        }
        let old = serde_json::from_slice::<LockInfo>(&content).ok();
        tracing::warn!(
            path = %path.display(),
            holder = %old.as_ref().map(LockInfo::describe).unwrap_or_else(|| "unknown".into()),
            "taking over a {why} lock"
        );
    }
    let info = new_info(opts);
    let record = serde_json::to_vec(&info).expect("a lock record serialises");
    if let Err(e) = overwrite(file, &record, content.len()) {
        if free {
            let _ = overwrite(file, b"", content.len().max(record.len()));
        }
        return Err(io_err("write", path)(e));
    }
    drop(section);
    Ok(Attempt::Acquired(Lease::new(
        path,
        info,
        record,
        lock_file.clone(),
        opts.stale,
        !free,
    )))
}

/// What a waiter should do next.
pub(super) enum Step {
    Acquired(Lease),
    Wait(Duration),
}

/// The state of one contender: what it saw of the lock and since when.
pub(super) struct Waiter<'a> {
    target: Target<'a>,
    path: &'a Path,
    opts: &'a LockOptions,
    seen: Option<Observation>,
    since: Instant,
    info: Option<LockInfo>,
    /// The bytes `info` was parsed from.
    content: Vec<u8>,
    polls: u32,
}

impl<'a> Waiter<'a> {
    pub(super) fn new(target: Target<'a>, opts: &'a LockOptions) -> Self {
        Waiter {
            target,
            path: target.path,
            opts,
            seen: None,
            since: Instant::now(),
            info: None,
            content: Vec::new(),
            polls: 0,
        }
    }

    /// One round: acquire if free, take over if stale or dead, else say how
    /// long to wait before the next round.
    pub(super) fn step(&mut self) -> Result<Step, LockError> {
        // The first round tries before looking: uncontended, that is the
        // whole acquisition.
        if self.polls == 0 {
            if let Attempt::Acquired(lease) = attempt(self.target, self.opts, None)? {
                return Ok(Step::Acquired(lease));
            }
        }
        // A release seen or a takeover lets us go again at once, a few times.
        for _ in 0..4 {
            // Not following a link there (the record read below refuses it).
            let m = match fs::symlink_metadata(self.path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err("stat", self.path)(e)),
                Ok(m) => Some(m),
            };
            let changed = match &m {
                None => true,
                Some(m) => self.seen != Some(Observation::of(m)) || self.info.is_none(),
            };
            if changed {
                // Something changed (or the record was not readable yet):
                // progress. Take the record and its observation together.
                let record = match read_record(self.target) {
                    Ok(r) => Some(r),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => return Err(io_err("read", self.path)(e)),
                };
                if record.as_ref().is_none_or(|r| r.free) {
                    self.seen = None;
                    self.info = None;
                    match attempt(self.target, self.opts, None)? {
                        Attempt::Acquired(lease) => return Ok(Step::Acquired(lease)),
                        Attempt::Held => continue,
                        Attempt::Busy => break,
                    }
                }
                let record = record.expect("checked above");
                if self.seen != Some(record.obs) {
                    self.since = Instant::now();
                }
                self.seen = Some(record.obs);
                self.info = record.info;
                self.content = record.content;
            }
            let obs = self.seen.expect("observed above");
            let here = this_host();
            let dead = self
                .info
                .as_ref()
                .is_some_and(|i| i.host_id == here.id && !host::process_alive(i.pid, i.pid_start));
            let stale = self.since.elapsed() >= self.opts.stale;
            if !dead && !stale {
                break;
            }
            let why = if dead { "dead holder's" } else { "stale" };
            let judged = Judged {
                seen: &obs,
                content: &self.content,
                why,
            };
            match attempt(self.target, self.opts, Some(judged))? {
                Attempt::Acquired(lease) => return Ok(Step::Acquired(lease)),
                Attempt::Held => {
                    // Not what was judged: read the record again next time
                    // (keeping `since` if the observation is unchanged).
                    self.info = None;
                    break;
                }
                Attempt::Busy => break,
            }
        }
        self.polls += 1;
        // Fast first polls, then every ~20 ms with jitter so that waiters do
        // not move in lockstep: a release is noticed within tens of ms.
        let base = match self.polls {
            1 => 1,
            2 => 2,
            3 => 5,
            4 => 10,
            _ => 20,
        };
        Ok(Step::Wait(Duration::from_micros(
            base * 1000 + fastrand::u64(0..base * 250),
        )))
    }

    fn describe_holder(&self) -> String {
        match &self.info {
            Some(info) => info.describe(),
            None => "an unknown holder".into(),
        }
    }
}

#[tracing::instrument(name = "lock.wait", level = "info", skip_all, fields(nanokit.lock = %target.path.display()))]
pub(super) async fn wait_for(
    target: Target<'_>,
    opts: &LockOptions,
    cancel: &CancellationToken,
    mut done: impl FnMut() -> bool,
) -> Result<Option<Lease>, LockError> {
    let path = target.path;
    let start = Instant::now();
    let deadline = opts.timeout.map(|t| start + t);
    let mut waiter = Waiter::new(target, opts);
    // Taken once this contender really waits; dropped when it stops.
    let mut registered = None;
    loop {
        if cancel.is_cancelled() {
            return Err(LockError::Aborted {
                path: path.to_path_buf(),
            });
        }
        if done() {
            return Ok(None);
        }
        let mut wait = match waiter.step()? {
            Step::Acquired(lease) => return Ok(Some(lease)),
            Step::Wait(wait) => wait,
        };
        if let Some(deadline) = deadline {
            let now = Instant::now();
            if now >= deadline {
                return Err(LockError::Locked {
                    path: path.to_path_buf(),
                    holder: waiter.describe_holder(),
                    waited: start.elapsed(),
                });
            }
            wait = wait.min(deadline - now);
        }
        if registered.is_none() {
            registered = Some(super::waiters::register(target));
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => {
                return Err(LockError::Aborted { path: path.to_path_buf() });
            }
        }
    }
}
