//! The one place where the reconciliation engine meets the foundation's
//! primitives: the deploy lock (the lease lock of `crate::lock`) and atomic
//! provisioning (`crate::repo::provision`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::lock::{self, Lease, LockError, LockOptions};

/// Who holds a lock, for messages and `infra unlock`.
#[derive(Debug, Clone, Serialize)]
pub struct Holder {
    pub description: String,
    pub pid: u32,
    pub hostname: String,
    pub label: Option<String>,
    pub heartbeat_age_ms: u64,
    /// Dead holder on this host, or heartbeat older than its stale period.
    pub stale: bool,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, last heartbeat {} ms ago{}",
            self.description,
            self.heartbeat_age_ms,
            if self.stale {
                " (stale: the holder is dead or stopped renewing)"
            } else {
                ""
            }
        )
    }
}

pub type LockFailure = LockError;

/// A held deploy lock (a lease, renewed in the background).
#[derive(Debug)]
pub struct DeployLock {
    lease: Lease,
}

/// Takes the deploy lock at `path`, waiting up to `timeout` (none: fail at
/// once, naming the holder, if it is held).
pub async fn acquire_deploy_lock(
    path: &Path,
    label: &str,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
) -> Result<DeployLock, LockError> {
    let opts = LockOptions {
        timeout: Some(timeout.unwrap_or(Duration::ZERO)),
        holder: Some(label.to_string()),
        ..LockOptions::default()
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(crate::error::io_err::<LockError>("create", dir))?;
    }
    let lease = lock::acquire(path, &opts, cancel).await?;
    Ok(DeployLock { lease })
}

/// Who holds the lock at `path`, if anyone.
pub fn inspect_deploy_lock(path: &Path) -> Result<Option<Holder>, LockError> {
    Ok(
        lock::inspect(path, lock::DEFAULT_STALE)?.map(|s| match &s.info {
            Some(i) => Holder {
                description: i.describe(),
                pid: i.pid,
                hostname: i.hostname.clone(),
                label: i.holder.clone(),
                heartbeat_age_ms: s.heartbeat_age_ms,
                stale: s.stale,
            },
            None => Holder {
                description: "an unknown holder (the lock record cannot be read)".into(),
                pid: 0,
                hostname: "?".into(),
                label: None,
                heartbeat_age_ms: s.heartbeat_age_ms,
                stale: s.stale,
            },
        }),
    )
}

/// Removes the lock at `path`, returning who held it.
pub fn break_deploy_lock(path: &Path) -> Result<Option<String>, LockError> {
    Ok(lock::break_lock(path)?.map(|i| i.describe()))
}

impl DeployLock {
    /// Whether the lease was lost (broken by `infra unlock` or taken over).
    pub fn is_lost(&self) -> bool {
        self.lease.is_lost()
    }

    /// Cancelled when the lease is found lost.
    pub fn lost_token(&self) -> CancellationToken {
        self.lease.lost_token()
    }

    pub fn release(self) -> Result<(), LockError> {
        self.lease.release()
    }
}

/// Result of a provisioning run.
#[derive(Debug, Clone)]
pub struct Provisioned {
    /// False when the sentinel showed the same install already done.
    pub ran: bool,
}

/// Runs `command` (argv) in `dir` once per distinct (command, manifests)
/// content, under the global provisioning lock: replicas and re-runs sharing
/// `dir` skip when the sentinel matches.
pub async fn provision(
    dir: &Path,
    command: &[String],
    manifests: &[PathBuf],
    cancel: &CancellationToken,
) -> Result<Provisioned, String> {
    let opts = crate::repo::ProvisionOptions {
        capture: true,
        ..Default::default()
    };
    match crate::repo::provision(dir, command, manifests, &opts, cancel).await {
        Ok(o) => Ok(Provisioned { ran: o.ran }),
        Err(e) => Err(e.to_string()),
    }
}
