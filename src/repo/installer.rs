//! Installer processes and what they leave behind.
//!
//! Guarantees:
//! * An installer nanokit starts (npm, a `provision` command) runs as a
//!   [`GroupChild`](crate::sys::command::GroupChild): its whole process group
//!   dies with it, with its handle, and with this process.
//! * Every staging directory records its owner (host, pid and start time) and
//!   the installer's process group (pid and start time) in
//!   [`OWNER_FILE`]. The next installer of *any* package on the same host
//!   kills a still-running group whose owner is dead (start times rule out
//!   reused pids) and removes the tree.
//! * Leftovers never fail an install: they are renamed to a unique trash name
//!   and removed by a background thread; errors are logged, never returned.
//!   Trash whose remover died is picked up by the next sweep.
//! * Listing, owner records, the trash rename and the removal go through the
//!   `.staging` [`Dir`] (descriptor-relative, never following a link): a
//!   link planted in `.staging` or inside a tree is moved or removed as
//!   itself, and nothing outside the repo is read, renamed or removed. Only
//!   the installer itself is handed a path (its working directory).

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::lock::{LockError, LockStatus};
use crate::sys::beneath::Dir;
use crate::sys::host::{self, this_host};
use crate::sys::proc;

/// The state of the package lock of a staging key (the key of
/// `<key>.<token>`), as [`crate::lock::inspect`] reports it.
pub type LockOfKey<'a> = &'a dyn Fn(&str) -> Result<Option<LockStatus>, LockError>;

/// The owner record inside each staging directory.
pub const OWNER_FILE: &str = ".nanokit-owner.json";
/// Prefix of trash names under `.staging` (hidden, so never a package key).
const TRASH_PREFIX: &str = ".trash.";
/// Trash of another host is taken over only when untouched this long.
const FOREIGN_TRASH_AGE: Duration = Duration::from_secs(600);

/// Who owns a staging directory, and which installer runs in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerRecord {
    /// See [`host::HostIdentity::id`]; pids are judged only on the same host.
    pub host_id: String,
    pub hostname: String,
    /// The nanokit process that owns the attempt, and its start time.
    pub pid: u32,
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// The lock token of the attempt (also the directory's suffix).
    pub token: String,
    /// The installer's pid (= its process group id) once nanokit started one.
    #[serde(default)]
    pub installer_pid: Option<u32>,
    #[serde(default)]
    pub installer_start: Option<u64>,
    pub created_at_ms: u64,
}

impl OwnerRecord {
    /// A record for this process and lock `token`.
    pub fn ours(token: &str) -> OwnerRecord {
        let here = this_host();
        OwnerRecord {
            host_id: here.id.clone(),
            hostname: here.hostname.clone(),
            pid: here.pid,
            pid_start: here.pid_start,
            token: token.to_string(),
            installer_pid: None,
            installer_start: None,
            created_at_ms: super::now_ms(),
        }
    }

    /// The record in the staging directory `staging` (none if missing,
    /// unreadable, not a regular file, or not a record).
    pub fn read(staging: &Dir) -> Option<OwnerRecord> {
        let bytes = staging.read_file(OWNER_FILE).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes (or replaces) the record in `staging`, atomically.
    pub fn write(&self, staging: &Dir) -> io::Result<()> {
        let bytes = serde_json::to_vec(self).expect("owner record serialises");
        staging.replace_file(OWNER_FILE, &bytes, 0o644)
    }

    fn same_host(&self) -> bool {
        self.host_id == this_host().id
    }

    /// For an owner on this host: whether it is still alive.
    pub fn owner_alive(&self) -> Option<bool> {
        self.same_host()
            .then(|| host::process_alive(self.pid, self.pid_start))
    }

    /// For an installer on this host: whether any process of its group runs
    /// (in the staging directory `staging`).
    pub fn installer_running(&self, staging: &Dir) -> Option<bool> {
        let pid = self.installer_pid?;
        let id = identity(staging)?;
        self.same_host()
            .then(|| !orphan_members(pid, self.installer_start, id).is_empty())
    }
}

// ---- Installer processes ---------------------------------------------------

/// The live processes of an orphaned installer group: the whole group when
/// its leader is still the process recorded (same start time); otherwise
/// only members started after the recorded leader whose working directory is
/// inside the staging directory `staging` (device and inode; a group id
/// reused by a stranger is left alone).
fn orphan_members(pgid: u32, leader_start: Option<u64>, staging: (u64, u64)) -> Vec<u32> {
    let members = proc::group_members(pgid);
    let leader_is_ours = leader_start.is_some()
        && host::process_alive(pgid, leader_start)
        && proc::pid(pgid).is_some();
    members
        .into_iter()
        .filter(|&(pid, start)| {
            leader_is_ours
                || (leader_start.is_some_and(|s| start >= s) && proc::cwd_within(pid, staging))
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// Device and inode of an open directory.
fn identity(dir: &Dir) -> Option<(u64, u64)> {
    rustix::fs::fstat(dir).ok().map(|st| (st.st_dev, st.st_ino))
}

/// Kills what still runs of the installer recorded in `staging` (its owner
/// must be dead) and waits, briefly, until it is gone.
fn kill_orphan(record: &OwnerRecord, staging: &Dir) {
    let Some(pgid) = record.installer_pid else {
        return;
    };
    let Some(id) = identity(staging) else {
        return;
    };
    let members = orphan_members(pgid, record.installer_start, id);
    if members.is_empty() {
        return;
    }
    tracing::warn!(pgid, owner = record.pid, staging = %staging.path().display(), count = members.len(),
        "killing the installer of a dead owner");
    for pid in &members {
        proc::kill(*pid, rustix::process::Signal::KILL);
    }
    proc::wait_gone(&members, Duration::from_secs(5));
}

// ---- Leftovers -------------------------------------------------------------

/// One entry of `<repo>/.staging`, as `repo status` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StagingEntry {
    pub path: PathBuf,
    /// The owner record, if the directory has a readable one.
    pub owner: Option<OwnerRecord>,
    /// For an owner on this host: whether it is alive.
    pub owner_alive: Option<bool>,
    /// For an installer nanokit started on this host: whether it still runs.
    pub installer_running: Option<bool>,
    /// Left by an attempt that is over (its owner is dead or no longer holds
    /// the package lock); the next install of any package removes it.
    pub orphaned: bool,
    /// Trash being removed (or to be removed by the next install).
    pub trash: bool,
}

/// The key and token of a staging directory name `<key>.<token>`.
fn split_staging_name(name: &str) -> Option<(&str, &str)> {
    if name.starts_with('.') {
        return None;
    }
    let (key, token) = name.rsplit_once('.')?;
    (!key.is_empty() && !token.is_empty()).then_some((key, token))
}

/// Whether the attempt that made `staging` is over. `lock_of_key` names the
/// package lock of a staging key.
fn orphaned(
    staging: &Path,
    key: &str,
    token: &str,
    record: Option<&OwnerRecord>,
    lock_of_key: LockOfKey<'_>,
) -> bool {
    if record.is_some_and(|r| r.owner_alive() == Some(false)) {
        return true;
    }
    // A staging directory exists only while its attempt holds the package
    // lock with the token it is named after.
    match lock_of_key(key) {
        Ok(None) => true,
        Ok(Some(status)) => status.info.is_some_and(|i| i.token != token),
        Err(e) => {
            tracing::debug!(error = %e, staging = %staging.display(), "cannot judge a staging directory");
            false
        }
    }
}

/// `(host id, pid, start)` of a trash name `.trash.<host>.<pid>.<start>.<rand>`.
fn trash_owner(name: &str) -> Option<(&str, u32, Option<u64>)> {
    let mut parts = name.strip_prefix(TRASH_PREFIX)?.split('.');
    let host = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok();
    Some((host, pid, start))
}

fn trash_claimable(root: &Dir, name: &OsStr) -> bool {
    match trash_owner(&name.to_string_lossy()) {
        Some((h, pid, start)) if h == this_host().id => !host::process_alive(pid, start),
        _ => root.stat(name).ok().flatten().is_some_and(|st| {
            let mtime = SystemTime::UNIX_EPOCH
                + Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec as u32);
            SystemTime::now()
                .duration_since(mtime)
                .is_ok_and(|age| age > FOREIGN_TRASH_AGE)
        }),
    }
}

/// A unique trash name under `.staging` owned by this process.
pub(crate) fn trash_name() -> String {
    let here = this_host();
    format!(
        "{TRASH_PREFIX}{}.{}.{}.{:016x}",
        here.id,
        here.pid,
        here.pid_start.unwrap_or(0),
        fastrand::u64(..)
    )
}

/// The staging directory `name` of `root`, if it is one (not a link).
fn open_staging(root: &Dir, name: &OsStr) -> Option<Dir> {
    root.dir(name, false).ok()
}

/// Lists `root` (the repo's `.staging`).
pub fn list(root: &Dir, lock_of_key: LockOfKey<'_>) -> Vec<StagingEntry> {
    let Ok(entries) = root.entries() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for os_name in entries {
        let name = os_name.to_string_lossy().into_owned();
        let path = root.join(&os_name);
        if name.starts_with(TRASH_PREFIX) {
            out.push(StagingEntry {
                path,
                owner: None,
                owner_alive: None,
                installer_running: None,
                orphaned: true,
                trash: true,
            });
            continue;
        }
        let Some((key, token)) = split_staging_name(&name) else {
            continue;
        };
        let dir = open_staging(root, &os_name);
        let record = dir.as_ref().and_then(OwnerRecord::read);
        out.push(StagingEntry {
            orphaned: orphaned(&path, key, token, record.as_ref(), lock_of_key),
            owner_alive: record.as_ref().and_then(OwnerRecord::owner_alive),
            installer_running: record
                .as_ref()
                .zip(dir.as_ref())
                .and_then(|(r, d)| r.installer_running(d)),
            owner: record,
            path,
            trash: false,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Background removal of trash; [`Sweeper::finish`] waits for it.
pub struct Sweeper(Option<JoinHandle<()>>);

impl Sweeper {
    pub fn none() -> Sweeper {
        Sweeper(None)
    }

    /// Waits until the trash this sweep claimed is removed (or given up on).
    pub async fn finish(mut self) {
        if let Some(t) = self.0.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Makes every finished attempt's staging directory under `root` (of any
/// package) trash: kills a still-running installer of a dead owner on this
/// host, renames the directory to a unique trash name, and removes the trash
/// (also trash abandoned by a dead remover) on a background thread. Never
/// fails: what cannot be done now is logged and left for the next sweep.
pub fn sweep(root: &Dir, lock_of_key: LockOfKey<'_>) -> Sweeper {
    let Ok(entries) = root.entries() else {
        return Sweeper::none();
    };
    let mut trash: Vec<OsString> = Vec::new();
    for os_name in entries {
        let name = os_name.to_string_lossy().into_owned();
        let path = root.join(&os_name);
        let claim = if name.starts_with(TRASH_PREFIX) {
            trash_claimable(root, &os_name)
        } else if let Some((key, token)) = split_staging_name(&name) {
            let dir = open_staging(root, &os_name);
            let record = dir.as_ref().and_then(OwnerRecord::read);
            let over = orphaned(&path, key, token, record.as_ref(), lock_of_key);
            if over {
                if let Some((r, d)) = record
                    .as_ref()
                    .filter(|r| r.owner_alive() == Some(false))
                    .zip(dir.as_ref())
                {
                    kill_orphan(r, d);
                }
            }
            over
        } else {
            false
        };
        if !claim {
            continue;
        }
        let to = OsString::from(trash_name());
        match root.rename(&os_name, root, &to) {
            Ok(()) => trash.push(to),
            // Someone else claimed it first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot move a leftover aside; the next install retries")
            }
        }
    }
    if trash.is_empty() {
        return Sweeper::none();
    }
    let root = match root.try_clone() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the leftover remover; the next install retries");
            return Sweeper::none();
        }
    };
    let thread = std::thread::Builder::new()
        .name("nanokit-sweep".into())
        .spawn(move || {
            for name in trash {
                remove_tree(&root, &name);
            }
        });
    match thread {
        Ok(t) => Sweeper(Some(t)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the leftover remover; the next install retries");
            Sweeper::none()
        }
    }
}

/// Removes the tree `name` of `parent` without following any link (see
/// [`Dir::remove_tree`]), retrying a few times (a dying process may still
/// add a file); logs and gives up after that.
pub fn remove_tree(parent: &Dir, name: &OsStr) {
    let mut delay = Duration::from_millis(20);
    for attempt in 1..=6 {
        match parent.remove_tree(name) {
            Ok(_) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if attempt == 6 => {
                tracing::warn!(error = %e, path = %parent.join(name).display(), "cannot remove a leftover; the next install retries");
            }
            Err(_) => {
                std::thread::sleep(delay);
                delay *= 2;
            }
        }
    }
}

// ---- Test hooks ------------------------------------------------------------

/// A point of the install that the test suite can see and stop at (for the
/// test suite only; costs an environment lookup or two per point):
/// * `NANOKIT_TEST_TRACE` (any value): print `NANOKIT_TEST_AT <point> <pid>`
///   on stderr at every point;
/// * `NANOKIT_TEST_PAUSE_AT=<point>[,<point>…]`: at those points print
///   `NANOKIT_TEST_PAUSED <point> <pid>` and pause, so that a test can
///   SIGKILL the process exactly there, or let it go on by creating the
///   file `<point>` in `NANOKIT_TEST_RESUME_DIR` (without that variable the
///   pause lasts an hour).
///
/// The points: `manifest-lock-wait` (the repo-wide `package.json` lock is
/// held by someone else), `manifest-read` (`package.json` read, not yet
/// written), and after each commit step `publish`, `manifest`, `sentinel`.
pub async fn test_point(point: &str) {
    let pid = std::process::id();
    if std::env::var_os("NANOKIT_TEST_TRACE").is_some() {
        eprintln!("NANOKIT_TEST_AT {point} {pid}");
    }
    let Some(pause) = std::env::var_os("NANOKIT_TEST_PAUSE_AT") else {
        return;
    };
    if !pause.to_string_lossy().split(',').any(|p| p == point) {
        return;
    }
    eprintln!("NANOKIT_TEST_PAUSED {point} {pid}");
    let until = std::time::Instant::now() + Duration::from_secs(3600);
    let resume = std::env::var_os("NANOKIT_TEST_RESUME_DIR").map(|d| Path::new(&d).join(point));
    while std::time::Instant::now() < until {
        if resume.as_ref().is_some_and(|f| f.exists()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_and_trash_names() {
        assert_eq!(
            split_staging_name("@s+x_1.0.0.abc"),
            Some(("@s+x_1.0.0", "abc"))
        );
        assert_eq!(split_staging_name(".trash.x"), None);
        assert_eq!(split_staging_name("nodot"), None);
        let name = trash_name();
        let (h, pid, start) = trash_owner(&name).unwrap();
        assert_eq!(h, this_host().id);
        assert_eq!(pid, std::process::id());
        assert_eq!(start, this_host().pid_start);
    }
}
