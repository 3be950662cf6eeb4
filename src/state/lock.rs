//! The deploy lock, kept with the state it guards: a lease file beside
//! `state.json` (the lease lock of [`crate::lock`]) or a row beside the
//! remote state in PostgreSQL, renewed in the background. One run holds it
//! at a time; a run that finds its lease lost is told through
//! [`DeployLock::lost_token`] and starts nothing new.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::remote::InfraStateStore;
use super::{StateError, Store};
use crate::config::Config;
use crate::kv::KvError;
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

/// A held deploy lock (a lease file, or a row in the remote state
/// database), renewed in the background.
#[derive(Debug)]
pub struct DeployLock {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    File(Lease),
    Remote(RemoteLock),
}

/// How long a remote deploy lock lives without renewal; renewed every third
/// of it. `NANOKIT_DEPLOY_LOCK_TTL` (seconds) overrides it.
pub const REMOTE_LOCK_TTL: Duration = Duration::from_secs(60);

fn remote_ttl() -> Duration {
    std::env::var("NANOKIT_DEPLOY_LOCK_TTL")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 1.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(REMOTE_LOCK_TTL)
}

struct RemoteLock {
    db: Arc<InfraStateStore>,
    location: String,
    workspace: String,
    holder: String,
    lost: CancellationToken,
    renewer: Option<tokio::task::JoinHandle<()>>,
    /// Taken over from a holder whose lock had expired.
    took_over: bool,
}

impl std::fmt::Debug for RemoteLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteLock")
            .field("location", &self.location)
            .field("workspace", &self.workspace)
            .field("holder", &self.holder)
            .finish()
    }
}

impl Drop for RemoteLock {
    fn drop(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
            // Not released through `release` (a panic, a dropped future):
            // release it in the background if a runtime is still there; else
            // it expires after its TTL.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (db, ws, holder) =
                    (self.db.clone(), self.workspace.clone(), self.holder.clone());
                rt.spawn(async move {
                    let _ = db.unlock(&ws, &holder).await;
                });
            }
        }
    }
}

/// A holder id unique to this run: `host:pid:random`.
pub fn run_holder() -> String {
    let me = lock::this_host();
    let token = uuid::Uuid::new_v4().simple().to_string();
    format!("{}:{}:{}", me.hostname, me.pid, &token[..12])
}

/// What `nanokit infra unlock` shows about a run: host, pid, working
/// directory and command.
pub fn run_info(what: &str) -> String {
    let me = lock::this_host();
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|_| "?".into());
    let mut argv: String = std::env::args().collect::<Vec<_>>().join(" ");
    if argv.len() > 300 {
        let mut end = 300;
        while !argv.is_char_boundary(end) {
            end -= 1;
        }
        argv.truncate(end);
        argv.push('…');
    }
    format!(
        "{what}; host {}, pid {}, cwd {cwd}, command `{argv}`",
        me.hostname, me.pid
    )
}

/// Takes the deploy lock of `workspace` in the remote state database,
/// waiting up to `timeout` (none: fail at once with `ENKLOCKED` naming the
/// holder). It is renewed every third of its TTL; when a renewal finds it
/// gone (cleared by `nanokit infra unlock`, expired and taken) the lock's
/// [`lost_token`](DeployLock::lost_token) fires.
pub async fn acquire_remote_deploy_lock(
    db: Arc<InfraStateStore>,
    location: &str,
    workspace: &str,
    holder: &str,
    info: &str,
    timeout: Option<Duration>,
) -> Result<DeployLock, StateError> {
    let ttl = remote_ttl();
    let remote_err = |source| StateError::Remote {
        location: location.to_string(),
        source,
    };
    let took_over = match db
        .lock(
            workspace,
            holder,
            info,
            ttl.as_secs_f64(),
            timeout.unwrap_or(Duration::ZERO),
        )
        .await
    {
        Ok(taken) => taken.took_over,
        Err(KvError::Locked {
            holder,
            expires_at_ms,
            ..
        }) => {
            return Err(StateError::Locked {
                location: location.to_string(),
                workspace: workspace.to_string(),
                holder,
                expires_at_ms,
            })
        }
        Err(e) => return Err(remote_err(e)),
    };
    if took_over {
        tracing::warn!("took over the deploy lock of {workspace}: its holder's lock had expired (did that run die?)");
    }
    let lost = CancellationToken::new();
    let renewer = {
        let (db, ws, holder, lost) = (
            db.clone(),
            workspace.to_string(),
            holder.to_string(),
            lost.clone(),
        );
        tokio::spawn(async move {
            let every = ttl / 3;
            let mut last_ok = Instant::now();
            loop {
                tokio::time::sleep(every).await;
                match db.renew(&ws, &holder, ttl.as_secs_f64()).await {
                    Ok(true) => last_ok = Instant::now(),
                    Ok(false) => {
                        tracing::warn!("the deploy lock of {ws} was cleared (`nanokit infra unlock`) or expired: stopping, nothing new starts");
                        lost.cancel();
                        return;
                    }
                    Err(e) => {
                        tracing::warn!("cannot renew the deploy lock of {ws}: {e}");
                        // Past this point another run may already have it.
                        if last_ok.elapsed() + every >= ttl {
                            lost.cancel();
                            return;
                        }
                    }
                }
            }
        })
    };
    Ok(DeployLock {
        inner: Inner::Remote(RemoteLock {
            db,
            location: location.to_string(),
            workspace: workspace.to_string(),
            holder: holder.to_string(),
            lost,
            renewer: Some(renewer),
            took_over,
        }),
    })
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
    Ok(DeployLock {
        inner: Inner::File(lease),
    })
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
    /// Whether the lock was taken over from a run that died holding it: the
    /// runtime may still be finishing requests that run sent.
    pub fn recovered(&self) -> bool {
        match &self.inner {
            Inner::File(l) => l.took_over(),
            Inner::Remote(r) => r.took_over,
        }
    }

    /// Whether the lease was lost (broken by `infra unlock` or taken over).
    pub fn is_lost(&self) -> bool {
        match &self.inner {
            Inner::File(l) => l.is_lost(),
            Inner::Remote(r) => r.lost.is_cancelled(),
        }
    }

    /// Cancelled when the lease is found lost.
    pub fn lost_token(&self) -> CancellationToken {
        match &self.inner {
            Inner::File(l) => l.lost_token(),
            Inner::Remote(r) => r.lost.clone(),
        }
    }

    /// Releases the lock (a remote one only if this run still holds it).
    pub async fn release(self) -> Result<(), StateError> {
        match self.inner {
            Inner::File(l) => Ok(l.release()?),
            Inner::Remote(mut r) => {
                if let Some(t) = r.renewer.take() {
                    t.abort();
                }
                if r.lost.is_cancelled() {
                    return Ok(()); // not ours any more
                }
                let location = r.location.clone();
                r.db.unlock(&r.workspace, &r.holder)
                    .await
                    .map(|_| ())
                    .map_err(|source| StateError::Remote { location, source })
            }
        }
    }
}

/// Takes the deploy lock of `config`'s state (waiting up to `timeout`, none:
/// fail at once if held) and opens the state under it, wherever it lives.
/// `label` says who holds it (`nanokit infra unlock` shows it).
pub async fn lock_state(
    config: &Config,
    label: &str,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
) -> Result<(DeployLock, Store), StateError> {
    let (lock, mut store) = match super::Location::of(config) {
        super::Location::File(path) => {
            // The lock file is one of the project's private files (0600).
            let lock_path = super::lock_path(&path);
            if let Err(e) = crate::sys::private::touch(&lock_path) {
                tracing::debug!("cannot prepare {}: {e}", lock_path.display());
            }
            let lock =
                acquire_deploy_lock(&super::lock_path(&path), label, timeout, cancel).await?;
            match Store::open(&path, &config.name, &config.env) {
                Ok(store) => (lock, store),
                Err(e) => {
                    let _ = lock.release().await;
                    return Err(e);
                }
            }
        }
        super::Location::Postgres { url, workspace } => {
            let location = crate::kv::pg::redact_url(&url);
            let db = super::connect(&url).await?;
            let holder = run_holder();
            let info = run_info(label);
            let lock = tokio::select! {
                r = acquire_remote_deploy_lock(
                    db.clone(), &location, &workspace, &holder, &info, timeout,
                ) => r?,
                _ = cancel.cancelled() => return Err(StateError::Interrupted),
            };
            match Store::open_remote(db, &url, &workspace, &config.name, &config.env, &holder).await
            {
                Ok(store) => (lock, store),
                Err(e) => {
                    let _ = lock.release().await;
                    return Err(e);
                }
            }
        }
    };
    // A state never written takes the lineage a plan made before it used.
    store.take_reserved_lineage(&config.state_file);
    Ok((lock, store))
}
