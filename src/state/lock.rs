//! The deploy lock, kept with the state it guards by its [`Backend`]: one
//! run holds it at a time, renewed in the background; a lock not renewed
//! within its TTL is taken over by one waiter. Every acquisition has an
//! **epoch** ([`DeployLock::epoch`]) greater than any before it, which every
//! state write of the run carries: once a successor has written (or taken
//! the lock over), a write of the older epoch is refused with
//! `ENKSTATESTALE`. A run that finds its lock lost is told through
//! [`DeployLock::lost_token`] and starts nothing new.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::{info_span, Instrument};

use super::backend::{Backend, Holder, LockRequest, LockView};
use super::{Location, StateError, Store};
use crate::config::Config;

/// How long a remote deploy lock lives without renewal; renewed every third
/// of it. `NANOKIT_DEPLOY_LOCK_TTL` (seconds) overrides it (and the file
/// lock's stale period).
pub const REMOTE_LOCK_TTL: Duration = Duration::from_secs(60);

/// The deploy lock's TTL at `location`.
pub fn ttl(location: &Location) -> Duration {
    std::env::var("NANOKIT_DEPLOY_LOCK_TTL")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.2)
        .map(Duration::from_secs_f64)
        .unwrap_or(match location {
            Location::File(_) => crate::lock::DEFAULT_STALE,
            _ => REMOTE_LOCK_TTL,
        })
}

/// A held deploy lock, renewed in the background until released.
pub struct DeployLock {
    backend: Arc<dyn Backend>,
    epoch: u64,
    took_over: bool,
    lost: CancellationToken,
    renewer: Option<tokio::task::JoinHandle<()>>,
    released: bool,
}

impl std::fmt::Debug for DeployLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployLock")
            .field("location", &self.backend.location())
            .field("epoch", &self.epoch)
            .field("took_over", &self.took_over)
            .finish()
    }
}

impl Drop for DeployLock {
    fn drop(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        if !self.released {
            // Not released through `release` (a panic, a dropped future):
            // release it in the background if a runtime is still there; else
            // it expires after its TTL.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let backend = self.backend.clone();
                rt.spawn(async move {
                    let _ = backend.unlock().await;
                });
            }
        }
    }
}

/// Takes the deploy lock of `backend` for `holder`, waiting up to `timeout`
/// (none: fail at once with `ENKLOCKED` naming the holder). It is renewed
/// every third of `ttl`; when a renewal finds it gone (cleared by
/// `nanokit infra unlock`, expired and taken over) its
/// [`lost_token`](DeployLock::lost_token) fires.
pub async fn acquire(
    backend: Arc<dyn Backend>,
    holder: &Holder,
    ttl: Duration,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
) -> Result<DeployLock, StateError> {
    let grant = backend
        .lock(&LockRequest {
            holder,
            ttl,
            wait: timeout.unwrap_or(Duration::ZERO),
            cancel,
        })
        .instrument(info_span!("state.lock"))
        .await?;
    if grant.took_over {
        tracing::warn!(
            "took over the deploy lock of {} (epoch {}): its holder's lock had expired (did that run die?)",
            backend.location(),
            grant.epoch
        );
    }
    let (lost, renewer) = match grant.lost {
        // The backend watches its lock itself.
        Some(token) => (token, None),
        None => {
            let lost = CancellationToken::new();
            let renewer = {
                let (backend, lost) = (backend.clone(), lost.clone());
                tokio::spawn(async move {
                    let every = ttl / 3;
                    let mut last_ok = Instant::now();
                    loop {
                        tokio::time::sleep(every).await;
                        match backend.renew(ttl).await {
                            Ok(true) => last_ok = Instant::now(),
                            Ok(false) => {
                                tracing::warn!("the deploy lock of {} was cleared (`nanokit infra unlock`) or expired: stopping, nothing new starts", backend.location());
                                lost.cancel();
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(
                                    "cannot renew the deploy lock of {}: {e}",
                                    backend.location()
                                );
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
            (lost, Some(renewer))
        }
    };
    Ok(DeployLock {
        backend,
        epoch: grant.epoch,
        took_over: grant.took_over,
        lost,
        renewer,
        released: false,
    })
}

impl DeployLock {
    /// The fencing token of this acquisition: greater than the epoch of
    /// every earlier acquisition and of every stored write. Every state
    /// write of this run carries it.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the lock was taken over from a run that died holding it: the
    /// runtime may still be finishing requests that run sent.
    pub fn recovered(&self) -> bool {
        self.took_over
    }

    /// Whether the lock was found lost (cleared by `infra unlock`, or
    /// expired and taken over).
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Cancelled when the lock is found lost.
    pub fn lost_token(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Releases the lock (only if this run still holds it: a lock lost in
    /// the meantime is left to its new holder, and the error says so).
    pub async fn release(mut self) -> Result<(), StateError> {
        self.released = true;
        if let Some(t) = self.renewer.take() {
            t.abort();
        }
        self.backend
            .unlock()
            .instrument(info_span!("state.unlock"))
            .await
    }
}

/// Takes the deploy lock of `config`'s state (waiting up to `timeout`, none:
/// fail at once if held) and opens the state under it, wherever it lives;
/// the store writes with the lock's epoch. `label` says what the run does
/// (`nanokit infra unlock` shows it). After a takeover the state is written
/// once at once, so that the stale holder's next write is refused even if
/// this run writes nothing else.
pub async fn lock_state(
    config: &Config,
    label: &str,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
) -> Result<(DeployLock, Store), StateError> {
    prepare(config)
        .await?
        .lock(config, label, timeout, cancel)
        .await
}

/// The deploy lock of a state, its store opened but the lock not yet asked
/// for: what a run may do between [`prepare`] and [`Pending::lock`] is as
/// good as done under the lock when [`Pending::undisturbed`] says so.
pub struct Pending {
    backend: Arc<dyn Backend>,
    location: Location,
    /// The epoch this user had last released when prepared.
    released: Option<u64>,
}

/// Opens `config`'s state store for its deploy lock.
pub async fn prepare(config: &Config) -> Result<Pending, StateError> {
    let location = Location::of(config);
    let backend = super::open(&location).await?;
    let released = backend.last_release();
    Ok(Pending {
        backend,
        location,
        released,
    })
}

impl Pending {
    /// Whether a lock taken next may prove that nobody held it since
    /// [`prepare`] (this user released the last epoch): only then is work
    /// done ahead of the lock worth doing.
    pub fn may_prove_undisturbed(&self) -> bool {
        self.released.is_some()
    }

    /// Whether nobody held `lock` between [`prepare`] and its grant: its
    /// epoch is the next after the one this user had released by then
    /// (epochs only grow, one per acquisition). What the run saw of the
    /// world in that time is then what it would see under the lock, but
    /// for changes no deploy made (drift), which it may meet at any time.
    pub fn undisturbed(&self, lock: &DeployLock) -> bool {
        !lock.took_over && self.released.is_some_and(|e| lock.epoch == e + 1)
    }

    /// Takes the lock and opens the state under it, as [`lock_state`].
    pub async fn lock(
        &self,
        config: &Config,
        label: &str,
        timeout: Option<Duration>,
        cancel: &CancellationToken,
    ) -> Result<(DeployLock, Store), StateError> {
        let backend = self.backend.clone();
        let holder = Holder::this_run(label);
        let lock = tokio::select! {
            r = async {
                if let Some(e) = self.released {
                    backend.read_ahead(e).await;
                }
                acquire(backend.clone(), &holder, ttl(&self.location), timeout, cancel).await
            } => r?,
            _ = cancel.cancelled() => return Err(StateError::Interrupted),
        };
        let opened = async {
            let opts = super::StoreOptions::of(config);
            let mut store = Store::open_with(backend, &config.name, &config.env, opts).await?;
            store.fence(lock.epoch(), &holder)?;
            if lock.recovered() && store.state().serial > 0 {
                store.update(|_| {}).await?;
            }
            Ok::<_, StateError>(store)
        }
        .await;
        match opened {
            Ok(mut store) => {
                // A state never written takes the lineage a plan made before it used.
                store.take_reserved_lineage(&config.state_file);
                Ok((lock, store))
            }
            Err(e) => {
                let _ = lock.release().await;
                Err(e)
            }
        }
    }
}

/// Who holds the deploy lock of `config`'s state, and where that is.
/// Boxed, as `force_unlock`: one instance for `infra unlock` and the hub.
pub fn inspect(config: &Config) -> BoxFuture<'_, Result<(String, Option<LockView>), StateError>> {
    Box::pin(async move {
        let backend = super::open(&Location::of(config)).await?;
        Ok((backend.location(), backend.lock_info().await?))
    })
}

/// Clears the deploy lock of `config`'s state whoever holds it
/// (`nanokit infra unlock`); the holder finds its lock lost at its next
/// renewal, and its writes are refused. Returns the lock it cleared.
pub fn force_unlock(config: &Config) -> BoxFuture<'_, Result<Option<LockView>, StateError>> {
    Box::pin(async move {
        let backend = super::open(&Location::of(config)).await?;
        backend.force_unlock().await
    })
}
