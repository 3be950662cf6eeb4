//! JS binding of the key/value state store (`openState()`).
//!
//! Every method returns a Promise; the embedded backend also has `…Sync`
//! twins that run on the calling thread (a `getSync` is a few microseconds).
//! Errors carry a stable code: as `err.code` for the sync calls and as the
//! `ENK…: ` prefix of the message for rejected promises (napi-rs rejects with
//! a fixed status); `kv-wrapper.js` normalises both to `err.code`.

use napi::bindgen_prelude::*;
use napi_derive::napi;

use super::{js_err, js_err_sync};
use crate::kv::{self, Entry, KvError, OpenOptions, Store, Value};

/// Options of `openState()`.
#[napi(object)]
#[derive(Default)]
pub struct OpenStateOptions {
    /// Namespace (default `local`): letters, digits, `.`, `_`, `-`.
    pub agent: Option<String>,
    /// Directory of the embedded databases (default `NANOKIT_STATE_DIR`, then
    /// `~/.nanokit/state`).
    pub state_dir: Option<String>,
    /// `postgres://…` to use PostgreSQL (default `NANOKIT_STATE_URL`); an
    /// empty string forces the embedded backend.
    pub url: Option<String>,
}

impl From<OpenStateOptions> for OpenOptions {
    fn from(o: OpenStateOptions) -> OpenOptions {
        OpenOptions {
            agent: o.agent,
            state_dir: o.state_dir.map(Into::into),
            url: o.url,
        }
    }
}

/// Options of `lock()`.
#[napi(object)]
#[derive(Default)]
pub struct StateLockOptions {
    /// How long to wait for the current holder, in ms (default 0: fail at
    /// once with `ENKLOCKED`).
    pub wait_ms: Option<f64>,
}

/// A lock just acquired.
#[napi(object)]
pub struct LockAcquired {
    pub name: String,
    pub holder: String,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_at: f64,
}

/// The state of a lock.
#[napi(object)]
pub struct LockState {
    pub locked: bool,
    pub holder: Option<String>,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_at: Option<f64>,
}

/// One key of `list()`.
#[napi(object)]
pub struct StateEntry {
    pub key: String,
    pub value: serde_json::Value,
    /// Last write, milliseconds since the Unix epoch.
    pub updated_at: f64,
}

/// Counts of `stats()`.
#[napi(object)]
pub struct StateStats {
    /// `embedded` or `postgres`.
    pub backend: String,
    pub agent: String,
    /// The database file, or the server URL without its password.
    pub location: String,
    pub keys: i64,
    pub value_bytes: i64,
    /// Locks currently held.
    pub locks: i64,
    pub file_bytes: Option<i64>,
}

fn entry(e: Entry) -> StateEntry {
    StateEntry {
        key: e.key,
        value: e.value.into_json(),
        updated_at: e.updated_at_ms as f64,
    }
}

fn stats(s: kv::Stats) -> StateStats {
    StateStats {
        backend: s.backend,
        agent: s.agent,
        location: s.location,
        keys: s.keys,
        value_bytes: s.value_bytes,
        locks: s.locks,
        file_bytes: s.file_bytes,
    }
}

fn lock_state(i: kv::LockInfo) -> LockState {
    LockState {
        locked: i.locked,
        holder: i.holder,
        expires_at: i.expires_at_ms.map(|v| v as f64),
    }
}

fn acquired(a: kv::Acquired) -> LockAcquired {
    LockAcquired {
        name: a.name,
        holder: a.holder,
        expires_at: a.expires_at_ms as f64,
    }
}

fn delta(d: Option<f64>) -> kv::Result<i64> {
    let d = d.unwrap_or(1.0);
    if !d.is_finite() || d.fract() != 0.0 || d.abs() > 9_007_199_254_740_991.0 {
        return Err(KvError::Invalid(format!(
            "increment delta must be a safe integer, got {d}"
        )));
    }
    Ok(d as i64)
}

fn wait(o: &Option<StateLockOptions>) -> kv::Result<std::time::Duration> {
    kv::wait_duration(o.as_ref().and_then(|o| o.wait_ms).unwrap_or(0.0))
}

/// Opens the state store: PostgreSQL when `url` (or `NANOKIT_STATE_URL`) is
/// set, else the embedded database of `agent`.
#[napi]
pub async fn open_state(options: Option<OpenStateOptions>) -> Result<StateStore> {
    let opts: OpenOptions = options.unwrap_or_default().into();
    let inner = Store::open(&opts).await.map_err(js_err)?;
    Ok(StateStore { inner })
}

/// Opens the embedded state store synchronously (PostgreSQL needs
/// `openState()`).
#[napi]
pub fn open_state_sync(options: Option<OpenStateOptions>) -> Result<StateStore, String> {
    let opts: OpenOptions = options.unwrap_or_default().into();
    if opts.resolved_url().is_some() {
        return Err(js_err_sync(KvError::Unsupported(
            "openStateSync() opens the embedded backend only; use `await openState()` for PostgreSQL"
                .into(),
        )));
    }
    let inner = Store::open_embedded(&opts).map_err(js_err_sync)?;
    Ok(StateStore { inner })
}

/// A key/value state store with named locks (see `openState()`).
#[napi]
pub struct StateStore {
    inner: Store,
}

impl StateStore {
    fn sync(&self) -> std::result::Result<&kv::sqlite::SqliteStore, Error<String>> {
        self.inner.embedded().map(|s| &**s).ok_or_else(|| {
            js_err_sync(KvError::Unsupported(
                "synchronous calls work on the embedded backend only; use the Promise methods with PostgreSQL".into(),
            ))
        })
    }
}

#[napi]
impl StateStore {
    /// `embedded` or `postgres`.
    #[napi(getter)]
    pub fn backend(&self) -> String {
        self.inner.backend().to_string()
    }

    /// The namespace of this store.
    #[napi(getter)]
    pub fn agent(&self) -> String {
        self.inner.agent().to_string()
    }

    /// Stores a string, or any other JSON value. Keys are 1 to 1024 bytes,
    /// values at most 1 MiB.
    #[napi(ts_args_type = "key: string, value: unknown")]
    pub async fn set(&self, key: String, value: serde_json::Value) -> Result<()> {
        self.inner
            .set(&key, &Value::from_json(value))
            .await
            .map_err(js_err)
    }

    /// The value of `key`, or `null`.
    #[napi(ts_return_type = "Promise<unknown>")]
    pub async fn get(&self, key: String) -> Result<Option<serde_json::Value>> {
        Ok(self
            .inner
            .get(&key)
            .await
            .map_err(js_err)?
            .map(Value::into_json))
    }

    #[napi]
    pub async fn exists(&self, key: String) -> Result<bool> {
        self.inner.exists(&key).await.map_err(js_err)
    }

    /// Deletes `key`; resolves to whether it existed.
    #[napi]
    pub async fn delete(&self, key: String) -> Result<bool> {
        self.inner.delete(&key).await.map_err(js_err)
    }

    /// Keys starting with `prefix` (all when omitted), sorted.
    #[napi]
    pub async fn list(&self, prefix: Option<String>) -> Result<Vec<StateEntry>> {
        let v = self
            .inner
            .list(prefix.as_deref().unwrap_or(""))
            .await
            .map_err(js_err)?;
        Ok(v.into_iter().map(entry).collect())
    }

    /// Atomically adds `delta` (default 1) to the integer at `key` (missing
    /// = 0); resolves to the new value.
    #[napi]
    pub async fn increment(&self, key: String, delta: Option<f64>) -> Result<i64> {
        let d = self::delta(delta).map_err(js_err)?;
        self.inner
            .increment_within(&key, d, Some(kv::JS_SAFE_INTEGER))
            .await
            .map_err(js_err)
    }

    /// Acquires the lock `name` for `holder` for `timeoutSeconds`, waiting up
    /// to `options.waitMs`; rejects with `ENKLOCKED` naming the holder.
    #[napi]
    pub async fn lock(
        &self,
        name: String,
        holder: String,
        timeout_seconds: f64,
        options: Option<StateLockOptions>,
    ) -> Result<LockAcquired> {
        let w = wait(&options).map_err(js_err)?;
        self.inner
            .lock(&name, &holder, timeout_seconds, w)
            .await
            .map(acquired)
            .map_err(js_err)
    }

    /// Releases `name`; only its holder may (`ENKNOTHOLDER` otherwise).
    #[napi]
    pub async fn unlock(&self, name: String, holder: String) -> Result<()> {
        self.inner.unlock(&name, &holder).await.map_err(js_err)
    }

    /// Removes the lock `name` whoever holds it; resolves to the holder it
    /// had (or `null`).
    #[napi]
    pub async fn force_unlock(&self, name: String) -> Result<Option<String>> {
        self.inner.force_unlock(&name).await.map_err(js_err)
    }

    #[napi]
    pub async fn is_locked(&self, name: String) -> Result<LockState> {
        self.inner
            .is_locked(&name)
            .await
            .map(lock_state)
            .map_err(js_err)
    }

    /// Deletes every key of this agent (locks are kept); resolves to how many.
    #[napi]
    pub async fn clear(&self) -> Result<i64> {
        self.inner.clear().await.map(|n| n as i64).map_err(js_err)
    }

    #[napi]
    pub async fn stats(&self) -> Result<StateStats> {
        self.inner.stats().await.map(stats).map_err(js_err)
    }

    // ---- synchronous twins (embedded backend only) ----

    #[napi(ts_args_type = "key: string, value: unknown")]
    pub fn set_sync(&self, key: String, value: serde_json::Value) -> Result<(), String> {
        self.sync()?
            .set(&key, &Value::from_json(value))
            .map_err(js_err_sync)
    }

    #[napi(ts_return_type = "unknown")]
    pub fn get_sync(
        &self,
        key: String,
    ) -> Result<Option<Either<String, serde_json::Value>>, String> {
        // Text values go straight to a JS string (the hot path).
        Ok(self
            .sync()?
            .get(&key)
            .map_err(js_err_sync)?
            .map(|v| match v {
                Value::Text(s) => Either::A(s),
                Value::Json(j) => Either::B(j),
            }))
    }

    #[napi]
    pub fn exists_sync(&self, key: String) -> Result<bool, String> {
        self.sync()?.exists(&key).map_err(js_err_sync)
    }

    #[napi]
    pub fn delete_sync(&self, key: String) -> Result<bool, String> {
        self.sync()?.delete(&key).map_err(js_err_sync)
    }

    #[napi]
    pub fn list_sync(&self, prefix: Option<String>) -> Result<Vec<StateEntry>, String> {
        let v = self
            .sync()?
            .list(prefix.as_deref().unwrap_or(""))
            .map_err(js_err_sync)?;
        Ok(v.into_iter().map(entry).collect())
    }

    #[napi]
    pub fn increment_sync(&self, key: String, delta: Option<f64>) -> Result<i64, String> {
        let d = self::delta(delta).map_err(js_err_sync)?;
        self.sync()?
            .increment_within(&key, d, Some(kv::JS_SAFE_INTEGER))
            .map_err(js_err_sync)
    }

    /// Like `lock()`, blocking the thread while it waits (keep `waitMs`
    /// small on the main thread).
    #[napi]
    pub fn lock_sync(
        &self,
        name: String,
        holder: String,
        timeout_seconds: f64,
        options: Option<StateLockOptions>,
    ) -> Result<LockAcquired, String> {
        let w = wait(&options).map_err(js_err_sync)?;
        self.sync()?
            .lock(&name, &holder, timeout_seconds, w)
            .map(acquired)
            .map_err(js_err_sync)
    }

    #[napi]
    pub fn unlock_sync(&self, name: String, holder: String) -> Result<(), String> {
        self.sync()?.unlock(&name, &holder).map_err(js_err_sync)
    }

    #[napi]
    pub fn is_locked_sync(&self, name: String) -> Result<LockState, String> {
        self.sync()?
            .is_locked(&name)
            .map(lock_state)
            .map_err(js_err_sync)
    }

    #[napi]
    pub fn clear_sync(&self) -> Result<i64, String> {
        self.sync()?.clear().map(|n| n as i64).map_err(js_err_sync)
    }

    #[napi]
    pub fn stats_sync(&self) -> Result<StateStats, String> {
        self.sync()?.stats().map(stats).map_err(js_err_sync)
    }
}
