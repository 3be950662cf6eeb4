//! JS bindings of the lease lock primitive (`crate::lock`).

use std::path::Path;

use napi::bindgen_prelude::PromiseRaw;
use napi::{Env, Result};
use napi_derive::napi;
use tokio_util::sync::CancellationToken;

use super::{cancel_token, js_err, ms, AbortHandle};
use crate::lock::{self, Lease, LockInfo, LockStatus};

/// Options of `acquireLock` / `tryAcquireLock` / `withLock`.
#[napi(object)]
#[derive(Default)]
pub struct LockOptions {
    /// A lease not renewed for this long (as observed by the waiter) may be
    /// taken over. Default 30000.
    pub stale_ms: Option<f64>,
    /// Give up with `ENKLOCKED` after this long. Default: wait forever.
    pub timeout_ms: Option<f64>,
    /// A label shown to others who find the lock held.
    pub holder: Option<String>,
}

impl LockOptions {
    pub(crate) fn to_engine(&self) -> lock::LockOptions {
        lock::LockOptions {
            stale: self.stale_ms.map(ms).unwrap_or(lock::DEFAULT_STALE),
            timeout: self.timeout_ms.map(ms),
            holder: self.holder.clone(),
        }
    }
}

/// A held lock. Release it with `release()`; if it is never released it stays
/// held until the process exits.
#[napi]
pub struct LockHandle {
    lease: Option<Lease>,
    token: String,
    path: String,
    lost: CancellationToken,
}

impl LockHandle {
    fn new(lease: Lease) -> Self {
        LockHandle {
            token: lease.token().to_string(),
            path: lease.path().to_string_lossy().into_owned(),
            lost: lease.lost_token(),
            lease: Some(lease),
        }
    }
}

#[napi]
impl LockHandle {
    /// Unique token of this acquisition.
    #[napi(getter)]
    pub fn token(&self) -> String {
        self.token.clone()
    }

    /// The lock file's path.
    #[napi(getter)]
    pub fn path(&self) -> String {
        self.path.clone()
    }

    /// True once the lease was found taken over or broken.
    #[napi(getter)]
    pub fn lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// True once `release()` was called.
    #[napi(getter)]
    pub fn released(&self) -> bool {
        self.lease.is_none()
    }

    /// Releases the lock. Throws `ENKLOCKLOST` if the lease had been lost.
    /// Calling it again does nothing.
    #[napi]
    pub fn release(&mut self) -> Result<()> {
        match self.lease.take() {
            Some(lease) => lease.release().map_err(js_err),
            None => Ok(()),
        }
    }
}

impl Drop for LockHandle {
    fn drop(&mut self) {
        // Garbage-collected while held: keep the lock until process exit
        // rather than releasing it at an unpredictable moment.
        if let Some(lease) = self.lease.take() {
            lease.detach();
        }
    }
}

/// Waits for the lock at `path` and takes it.
#[napi]
pub fn acquire_lock<'env>(
    env: &'env Env,
    path: String,
    options: Option<LockOptions>,
    abort: Option<&AbortHandle>,
) -> Result<PromiseRaw<'env, LockHandle>> {
    crate::trace::init_global(false);
    let opts = options.unwrap_or_default().to_engine();
    let cancel = cancel_token(abort);
    env.spawn_future(async move {
        lock::acquire(Path::new(&path), &opts, &cancel)
            .await
            .map(LockHandle::new)
            .map_err(js_err)
    })
}

/// Takes the lock if it is free now (or its holder on this host is dead);
/// returns null otherwise. Never waits.
#[napi]
pub fn try_acquire_lock(path: String, options: Option<LockOptions>) -> Result<Option<LockHandle>> {
    let opts = options.unwrap_or_default().to_engine();
    lock::try_acquire(Path::new(&path), &opts)
        .map(|l| l.map(LockHandle::new))
        .map_err(js_err)
}

/// Who holds a lock.
#[napi(object)]
pub struct LockHolder {
    pub token: String,
    pub hostname: String,
    pub host_id: String,
    pub pid: u32,
    pub label: Option<String>,
    /// Wall-clock acquisition time, ms since the epoch.
    pub acquired_at: f64,
    pub stale_ms: f64,
}

impl From<LockInfo> for LockHolder {
    fn from(i: LockInfo) -> Self {
        LockHolder {
            token: i.token,
            hostname: i.hostname,
            host_id: i.host_id,
            pid: i.pid,
            label: i.holder,
            acquired_at: i.acquired_at_ms as f64,
            stale_ms: i.stale_ms as f64,
        }
    }
}

/// What `inspectLock` tells about a held lock.
#[napi(object)]
pub struct LockInspection {
    pub path: String,
    /// The holder's record (null if unreadable).
    pub holder: Option<LockHolder>,
    /// Wall-clock ms since the last heartbeat (display only).
    pub heartbeat_age_ms: f64,
    /// The holder runs on this host (same boot and pid namespace).
    pub same_host: bool,
    /// For a holder on this host: whether its process is alive.
    pub holder_alive: Option<bool>,
    /// The holder is dead or its heartbeat is older than its stale period.
    pub stale: bool,
}

impl From<LockStatus> for LockInspection {
    fn from(s: LockStatus) -> Self {
        LockInspection {
            path: s.path.to_string_lossy().into_owned(),
            holder: s.info.map(Into::into),
            heartbeat_age_ms: s.heartbeat_age_ms as f64,
            same_host: s.same_host,
            holder_alive: s.holder_alive,
            stale: s.stale,
        }
    }
}

/// Describes the lock at `path`, or null if it is not held.
#[napi]
pub fn inspect_lock(path: String) -> Result<Option<LockInspection>> {
    lock::inspect(Path::new(&path), lock::DEFAULT_STALE)
        .map(|s| s.map(Into::into))
        .map_err(js_err)
}

/// Removes the lock at `path` whoever holds it; returns the removed holder,
/// or null if it was not held. For manual intervention.
#[napi]
pub fn break_lock(path: String) -> Result<Option<LockHolder>> {
    lock::break_lock(Path::new(&path))
        .map(|i| i.map(Into::into))
        .map_err(js_err)
}
