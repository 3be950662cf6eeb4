//! The one place where the reconciliation engine meets the foundation's
//! primitives: the deploy lock (lease lock) and atomic provisioning.
//!
//! INTERIM: until `crate::lock` and `crate::repo` land on main, this file
//! holds a minimal stand-in with the same shape (create-exclusive lock file
//! naming its holder; dead holders on this host are taken over). Switching
//! to the real primitives is an edit of this file only.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::ErrorCode;

/// Who holds a lock, for messages and `infra unlock`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    pub label: String,
    pub acquired_at: String,
    /// The holder is known dead (same host, pid gone or reused).
    #[serde(default)]
    pub dead: bool,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {} on {}, since {}){}",
            self.label,
            self.pid,
            self.host,
            self.acquired_at,
            if self.dead { ", holder is dead" } else { "" }
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockFailure {
    #[error("the deploy lock {path} is held by {holder}; wait for it to finish, retry with --lock-timeout <secs>, or clear a stale lock with `nanokit infra unlock`")]
    Locked { path: PathBuf, holder: Holder },
    #[error("deploy lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("interrupted while waiting for the deploy lock {path}")]
    Cancelled { path: PathBuf },
}

impl ErrorCode for LockFailure {
    fn code(&self) -> &'static str {
        match self {
            LockFailure::Locked { .. } => "ENKLOCKED",
            LockFailure::Io { .. } => "ENKIO",
            LockFailure::Cancelled { .. } => "ENKCANCELLED",
        }
    }
}

/// A held deploy lock; released on `release` or drop.
#[derive(Debug)]
pub struct DeployLock {
    path: PathBuf,
    token: String,
    released: bool,
}

#[derive(Serialize, Deserialize)]
struct LockFile {
    host: String,
    pid: u32,
    start_time: u64,
    label: String,
    acquired_at: String,
    token: String,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn read_holder(path: &Path) -> Option<(LockFile, Holder)> {
    let bytes = std::fs::read(path).ok()?;
    let f: LockFile = serde_json::from_slice(&bytes).ok()?;
    let dead = f.host == hostname()
        && crate::provider::process::proc_start_time(f.pid) != Some(f.start_time);
    let holder = Holder {
        host: f.host.clone(),
        pid: f.pid,
        label: f.label.clone(),
        acquired_at: f.acquired_at.clone(),
        dead,
    };
    Some((f, holder))
}

fn try_once(path: &Path, label: &str) -> Result<Result<DeployLock, Holder>, LockFailure> {
    let io = |source| LockFailure::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let pid = std::process::id();
    let token = uuid::Uuid::new_v4().to_string();
    let body = LockFile {
        host: hostname(),
        pid,
        start_time: crate::provider::process::proc_start_time(pid).unwrap_or(0),
        label: label.to_string(),
        acquired_at: crate::state::now(),
        token: token.clone(),
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(&serde_json::to_vec(&body).expect("json"))
                .map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(Ok(DeployLock {
                path: path.to_path_buf(),
                token,
                released: false,
            }))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match read_holder(path) {
            Some((_, h)) if h.dead => {
                // Take over atomically: rename the dead lock aside first.
                let aside = path.with_extension(format!("dead.{}", uuid::Uuid::new_v4().simple()));
                if std::fs::rename(path, &aside).is_ok() {
                    let _ = std::fs::remove_file(&aside);
                }
                try_once(path, label)
            }
            Some((_, h)) => Ok(Err(h)),
            None => Ok(Err(Holder {
                host: "?".into(),
                pid: 0,
                label: "unreadable lock file".into(),
                acquired_at: "?".into(),
                dead: false,
            })),
        },
        Err(e) => Err(io(e)),
    }
}

/// Takes the deploy lock at `path`, waiting up to `timeout` (none: fail at
/// once) for a live holder.
pub async fn acquire_deploy_lock(
    path: &Path,
    label: &str,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
) -> Result<DeployLock, LockFailure> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    loop {
        match try_once(path, label)? {
            Ok(lock) => return Ok(lock),
            Err(holder) => {
                let expired = deadline.is_none_or(|d| tokio::time::Instant::now() >= d);
                if expired {
                    return Err(LockFailure::Locked {
                        path: path.to_path_buf(),
                        holder,
                    });
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = cancel.cancelled() => return Err(LockFailure::Cancelled { path: path.to_path_buf() }),
                }
            }
        }
    }
}

/// Who holds the lock at `path`, if anyone.
pub fn inspect_deploy_lock(path: &Path) -> Result<Option<Holder>, LockFailure> {
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(read_holder(path).map(|(_, h)| h).unwrap_or(Holder {
        host: "?".into(),
        pid: 0,
        label: "unreadable lock file".into(),
        acquired_at: "?".into(),
        dead: false,
    })))
}

/// Removes the lock at `path`, returning who held it.
pub fn break_deploy_lock(path: &Path) -> Result<Option<Holder>, LockFailure> {
    let holder = inspect_deploy_lock(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => Ok(holder),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LockFailure::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl DeployLock {
    /// Whether the lease was lost (broken by `infra unlock` or taken over).
    pub fn is_lost(&self) -> bool {
        read_holder(&self.path).is_none_or(|(f, _)| f.token != self.token)
    }

    pub fn release(mut self) -> Result<(), LockFailure> {
        self.released = true;
        if !self.is_lost() {
            std::fs::remove_file(&self.path).map_err(|source| LockFailure::Io {
                path: self.path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

impl Drop for DeployLock {
    fn drop(&mut self) {
        if !self.released && !self.is_lost() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Result of a provisioning run.
#[derive(Debug, Clone)]
pub struct Provisioned {
    /// False when the sentinel showed the same install already done.
    pub ran: bool,
}

/// Runs `command` (argv) in `dir` once per distinct (command, manifests)
/// content: replicas and re-runs sharing `dir` skip when the sentinel matches.
pub async fn provision(
    dir: &Path,
    command: &[String],
    manifests: &[PathBuf],
    env: &[(String, String)],
) -> Result<Provisioned, String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for a in command {
        h.update(a.as_bytes());
        h.update([0]);
    }
    for m in manifests {
        h.update(std::fs::read(m).unwrap_or_default());
        h.update([0]);
    }
    let hash = hex::encode(h.finalize());
    let sentinel = dir.join(".nk-installed");
    if std::fs::read_to_string(&sentinel).is_ok_and(|s| s.trim() == hash) {
        return Ok(Provisioned { ran: false });
    }
    let lock_path = dir.join(".nk-install-lock");
    let cancel = CancellationToken::new();
    let lock = acquire_deploy_lock(
        &lock_path,
        "provisioning",
        Some(Duration::from_secs(600)),
        &cancel,
    )
    .await
    .map_err(|e| e.to_string())?;
    if std::fs::read_to_string(&sentinel).is_ok_and(|s| s.trim() == hash) {
        let _ = lock.release();
        return Ok(Provisioned { ran: false });
    }
    let out = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run `{}`: {e}", command.join(" ")))?;
    if !out.status.success() {
        let _ = lock.release();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        return Err(format!(
            "exited with {}: {}",
            out.status,
            crate::exec::tail(&text, 20)
        ));
    }
    crate::fsutil::atomic_write(&sentinel, format!("{hash}\n").as_bytes(), 0o644)
        .map_err(|e| format!("cannot write sentinel: {e}"))?;
    let _ = lock.release();
    Ok(Provisioned { ran: true })
}
