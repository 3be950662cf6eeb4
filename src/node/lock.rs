//! JS bindings of the lease lock primitive (`crate::lock`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{LazyLock, Mutex};

use napi::bindgen_prelude::PromiseRaw;
use napi::{Env, Result};
use napi_derive::napi;

use super::{cancel_token, js_err, ms, AbortHandle};
use crate::lock::{self, Lease, LockInfo, LockStatus};

/// Engine lock options from the JS ones (`staleMs`, `timeoutMs`, `holder`).
/// A stale period that is not a positive number would let any waiter take
/// over at its first look: `ENKSPEC`. (`timeoutMs`: 0 tries once, `Infinity`
/// waits as long as it takes.)
pub(crate) fn lock_options(
    stale_ms: Option<f64>,
    timeout_ms: Option<f64>,
    holder: Option<String>,
) -> std::result::Result<lock::LockOptions, lock::LockError> {
    let stale = match stale_ms {
        None => lock::DEFAULT_STALE,
        Some(v) if v > 0.0 => ms(v),
        Some(_) => {
            return Err(lock::LockError::InvalidOption {
                option: "staleMs",
                reason: "it must be a positive number of milliseconds",
            })
        }
    };
    Ok(lock::LockOptions {
        stale,
        timeout: timeout_ms.map(ms),
        holder,
    })
}

/// The leases held through JS, by token. JS holds only the token (a string
/// is far cheaper to hand across than a native object with a finalizer).
/// A handle that JS drops without releasing keeps its lease until the
/// process exits: never released at an unpredictable garbage-collection.
static LEASES: LazyLock<Mutex<HashMap<String, Lease>>> = LazyLock::new(Default::default);

fn leases() -> std::sync::MutexGuard<'static, HashMap<String, Lease>> {
    LEASES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps `lease` for JS; returns its token.
fn hold(lease: Lease) -> String {
    let token = lease.token().to_string();
    leases().insert(token.clone(), lease);
    token
}

/// Waits for the lock at `path` and takes it; resolves to the lease's token.
#[napi]
pub fn acquire_lock<'env>(
    env: &'env Env,
    path: String,
    stale_ms: Option<f64>,
    timeout_ms: Option<f64>,
    holder: Option<String>,
    abort: Option<&AbortHandle>,
) -> Result<PromiseRaw<'env, String>> {
    crate::trace::init_global(false);
    let opts = lock_options(stale_ms, timeout_ms, holder).map_err(js_err)?;
    let cancel = cancel_token(abort);
    env.spawn_future(async move {
        lock::acquire(Path::new(&path), &opts, &cancel)
            .await
            .map(hold)
            .map_err(js_err)
    })
}

/// Takes the lock if it is free now (or its holder on this host is dead) and
/// returns the lease's token; `None` otherwise. Never waits
/// (`tryAcquireLock`, see `raw.rs`).
pub(super) fn try_acquire(
    path: &str,
    stale_ms: Option<f64>,
    holder: Option<String>,
) -> std::result::Result<Option<String>, lock::LockError> {
    let opts = lock_options(stale_ms, None, holder)?;
    lock::try_acquire(Path::new(path), &opts).map(|l| l.map(hold))
}

/// Releases the lease `token`: `Lost` if it had been lost; an unknown
/// (already released) token does nothing (`releaseLock`, see `raw.rs`).
pub(super) fn release(token: &str) -> std::result::Result<(), lock::LockError> {
    let lease = leases().remove(token);
    match lease {
        Some(lease) => lease.release(),
        None => Ok(()),
    }
}

/// Whether the lease `token` was found taken over or broken while held.
#[napi]
pub fn lock_lost(token: String) -> bool {
    leases().get(&token).is_some_and(Lease::is_lost)
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
    /// How many are waiting for it now.
    pub waiters: u32,
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
            waiters: s.waiters as u32,
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
