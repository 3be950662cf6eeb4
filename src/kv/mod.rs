//! Small shared key/value state with named locks (`nanokit state …`, JS
//! `openState()`).
//!
//! Two backends with the same API and semantics:
//! - **embedded** ([`sqlite::SqliteStore`]): one SQLite file per agent under
//!   the state directory (`NANOKIT_STATE_DIR`, default `~/.nanokit/state`), in
//!   WAL mode, safe for many processes on one machine. Lock expiry compares
//!   integer milliseconds since the Unix epoch.
//! - **postgres** (`pg::PgStore`): tables in an existing PostgreSQL database
//!   (`NANOKIT_STATE_URL=postgres://…`), safe across machines; lock expiry is
//!   decided by the database's clock (`now()`).
//!
//! Every agent (`--agent`, default `local`) is its own namespace of keys and
//! locks.

pub(crate) mod error;
pub(crate) mod pg;
mod snapshot;
pub mod sqlite;

use futures::future::BoxFuture;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use error::{KvError, TlsFailure};

/// Result of every state operation.
pub type Result<T, E = KvError> = std::result::Result<T, E>;

/// Largest key or lock name, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value (its text, or its JSON text), in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Largest agent name, in bytes.
pub const MAX_AGENT_BYTES: usize = 64;
/// The agent used when none is given.
pub const DEFAULT_AGENT: &str = "local";
/// Longest lock timeout accepted, in seconds (about 31 years).
pub const MAX_LOCK_TIMEOUT_SECS: f64 = 1e9;

/// A stored value: a plain string, or any JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string, stored and returned as is.
    Text(String),
    /// A JSON value (never a JSON string: those are stored as [`Value::Text`]).
    Json(serde_json::Value),
}

impl Value {
    /// A value from JSON; a JSON string becomes [`Value::Text`].
    pub fn from_json(v: serde_json::Value) -> Value {
        match v {
            serde_json::Value::String(s) => Value::Text(s),
            other => Value::Json(other),
        }
    }

    /// The value as JSON (a text value is a JSON string).
    pub fn into_json(self) -> serde_json::Value {
        match self {
            Value::Text(s) => serde_json::Value::String(s),
            Value::Json(v) => v,
        }
    }

    /// The value for display: text as is, JSON as compact JSON text.
    pub fn display_text(&self) -> String {
        match self {
            Value::Text(s) => s.clone(),
            Value::Json(v) => v.to_string(),
        }
    }

    /// `(kind, text)` as stored: kind 0 = text, 1 = JSON.
    pub(crate) fn encode(&self) -> Result<(i16, String)> {
        let (kind, text) = match self {
            Value::Text(s) => (0, s.clone()),
            Value::Json(serde_json::Value::String(s)) => (0, s.clone()),
            Value::Json(v) => (1, v.to_string()),
        };
        if text.is_empty() {
            return Err(KvError::Key(
                "value is empty; store a non-empty string or JSON value (use delete to remove a key)"
                    .into(),
            ));
        }
        if text.len() > MAX_VALUE_BYTES {
            return Err(KvError::Key(format!(
                "value is {} bytes, more than the limit of {MAX_VALUE_BYTES} bytes (1 MiB); store large data in a file and keep its path here",
                text.len()
            )));
        }
        if kind == 0 && text.contains('\0') {
            return Err(KvError::Key(
                "value contains a NUL character, which the state store cannot hold".into(),
            ));
        }
        Ok((kind, text))
    }

    /// Decodes a stored `(kind, text)`.
    pub(crate) fn decode(kind: i64, text: String, location: &str) -> Result<Value> {
        match kind {
            0 => Ok(Value::Text(text)),
            1 => serde_json::from_str(&text)
                .map(Value::Json)
                .map_err(|e| KvError::Corrupt {
                    location: location.to_string(),
                    detail: format!("a stored JSON value does not parse: {e}"),
                }),
            k => Err(KvError::Corrupt {
                location: location.to_string(),
                detail: format!("unknown value kind {k}"),
            }),
        }
    }

    /// The integer a stored value holds, for `increment`: a JSON integer or
    /// a string of one (either kind).
    pub(crate) fn parse_integer(text: &str) -> Option<i64> {
        text.trim().parse::<i64>().ok()
    }
}

/// The largest integer a JavaScript number holds exactly (2^53 − 1,
/// `Number.MAX_SAFE_INTEGER`): the bound of increments made from JS.
pub const JS_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// The error for an increment whose result would leave `-bound..=bound`.
pub(crate) fn out_of_bound(key: &str, delta: i64, bound: i64) -> KvError {
    let what = if bound == JS_SAFE_INTEGER {
        " (Number.MAX_SAFE_INTEGER, the largest integer a JavaScript number holds exactly)"
    } else {
        ""
    };
    KvError::NotInteger(format!(
        "cannot increment {key:?} by {delta}: the result would be beyond \u{b1}{bound}{what}; nothing was changed (keep the counter within that range, or count from Rust or the CLI, which go to \u{b1}(2^63 - 1))"
    ))
}

/// One key with its value, from [`Store::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub value: Value,
    /// Last write, milliseconds since the Unix epoch.
    pub updated_at_ms: i64,
}

/// The state of one named lock, from [`Store::is_locked`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LockInfo {
    pub locked: bool,
    pub holder: Option<String>,
    /// When the lock expires, milliseconds since the Unix epoch.
    pub expires_at_ms: Option<i64>,
}

impl LockInfo {
    pub(crate) fn unlocked() -> LockInfo {
        LockInfo {
            locked: false,
            holder: None,
            expires_at_ms: None,
        }
    }
}

/// A named lock held now, from [`Store::locks`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldLock {
    pub name: String,
    pub holder: String,
    /// Milliseconds since the Unix epoch.
    pub acquired_at_ms: i64,
    pub expires_at_ms: i64,
}

/// A successfully acquired lock, from [`Store::lock`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Acquired {
    pub name: String,
    pub holder: String,
    pub expires_at_ms: i64,
}

/// Counts about one agent's namespace, from [`Store::stats`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// `embedded` or `postgres`.
    pub backend: String,
    pub agent: String,
    /// The database file, or the server URL without its password.
    pub location: String,
    pub keys: i64,
    /// Total bytes of stored value text.
    pub value_bytes: i64,
    /// Locks currently held (not expired).
    pub locks: i64,
    /// Size of the database file (and its WAL), embedded only.
    pub file_bytes: Option<i64>,
}

/// Where a store lives. Unset fields fall back to the environment
/// (`NANOKIT_STATE_URL`, `NANOKIT_STATE_DIR`) and then to the defaults.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Namespace; default `local`.
    pub agent: Option<String>,
    /// Directory of the embedded databases.
    pub state_dir: Option<PathBuf>,
    /// `postgres://…` URL: use the PostgreSQL backend.
    pub url: Option<String>,
}

impl OpenOptions {
    /// The agent name, validated.
    pub fn agent(&self) -> Result<String> {
        let agent = self.agent.as_deref().unwrap_or(DEFAULT_AGENT);
        validate_agent(agent)?;
        Ok(agent.to_string())
    }

    /// The PostgreSQL URL to use, if any (option, then `NANOKIT_STATE_URL`).
    pub fn resolved_url(&self) -> Option<String> {
        match &self.url {
            Some(u) if !u.trim().is_empty() => Some(u.trim().to_string()),
            Some(_) => None,
            None => std::env::var("NANOKIT_STATE_URL")
                .ok()
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty()),
        }
    }

    /// The embedded state directory (option, `NANOKIT_STATE_DIR`, then
    /// `~/.nanokit/state`).
    pub fn resolved_state_dir(&self) -> Result<PathBuf> {
        if let Some(d) = &self.state_dir {
            return Ok(d.clone());
        }
        if let Some(d) = std::env::var_os("NANOKIT_STATE_DIR").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(d));
        }
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
                KvError::Invalid(
                    "cannot find the state directory: HOME is not set; set NANOKIT_STATE_DIR"
                        .into(),
                )
            })?;
        Ok(Path::new(&home).join(".nanokit").join("state"))
    }
}

/// The agents that have state where `opts` points: embedded, each valid
/// `<agent>.db` in the state directory (nothing is created); PostgreSQL,
/// each agent with keys or locks in the database. Boxed, as the store
/// calls `nanokit state` and the hub share: one instance in the binary.
pub fn agents(opts: &OpenOptions) -> BoxFuture<'_, Result<Vec<String>>> {
    Box::pin(agents_inner(opts))
}

async fn agents_inner(opts: &OpenOptions) -> Result<Vec<String>> {
    if opts.resolved_url().is_some() {
        return match Store::open(opts).await? {
            Store::Postgres(s) => s.agents().await,
            Store::Embedded(_) => Ok(Vec::new()),
        };
    }
    let dir = opts.resolved_state_dir()?;
    let mut agents: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    let agent = name.strip_suffix(".db")?.to_string();
                    validate_agent(&agent).ok().map(|_| agent)
                })
                .collect()
        })
        .unwrap_or_default();
    agents.sort();
    Ok(agents)
}

/// Checks an agent name: 1–64 bytes of `[A-Za-z0-9._-]`, not starting with
/// `.` (so no `..`, no hidden files, no path separators).
pub fn validate_agent(agent: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(KvError::Agent {
            agent: agent.chars().take(80).collect(),
            reason: reason.to_string(),
        })
    };
    if agent.is_empty() {
        return bad("it is empty");
    }
    if agent.len() > MAX_AGENT_BYTES {
        return bad("it is longer than 64 bytes");
    }
    if agent.starts_with('.') {
        return bad("it starts with '.'");
    }
    if let Some(c) = agent
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!("it contains {c:?}"));
    }
    Ok(())
}

/// Checks a key (or lock name): 1–1024 bytes, no NUL.
pub fn validate_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(KvError::Key(format!("{what} is empty")));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KvError::Key(format!(
            "{what} is {} bytes, more than the limit of {MAX_KEY_BYTES} bytes (1 KiB)",
            key.len()
        )));
    }
    if key.contains('\0') {
        return Err(KvError::Key(format!("{what} contains a NUL character")));
    }
    Ok(())
}

/// Checks a lock holder: 1–1024 bytes, no NUL.
pub fn validate_holder(holder: &str) -> Result<()> {
    if holder.is_empty() || holder.len() > MAX_KEY_BYTES || holder.contains('\0') {
        return Err(KvError::Invalid(
            "lock holder must be 1 to 1024 bytes without NUL (e.g. a hostname, worker id or pid)"
                .into(),
        ));
    }
    Ok(())
}

/// Converts a lock timeout in seconds to whole milliseconds (at least 1).
pub fn timeout_ms(timeout_secs: f64) -> Result<i64> {
    if !timeout_secs.is_finite() || timeout_secs <= 0.0 || timeout_secs > MAX_LOCK_TIMEOUT_SECS {
        return Err(KvError::Invalid(format!(
            "lock timeout must be a number of seconds above 0 and at most {MAX_LOCK_TIMEOUT_SECS}, got {timeout_secs}"
        )));
    }
    Ok(((timeout_secs * 1000.0).ceil() as i64).max(1))
}

/// Converts a wait in milliseconds (`waitMs`) to a duration.
pub fn wait_duration(wait_ms: f64) -> Result<Duration> {
    if !wait_ms.is_finite() || !(0.0..=1e12).contains(&wait_ms) {
        return Err(KvError::Invalid(format!(
            "waitMs must be a number of milliseconds of at least 0, got {wait_ms}"
        )));
    }
    Ok(Duration::from_micros((wait_ms * 1000.0) as u64))
}

/// Milliseconds since the Unix epoch by this machine's wall clock.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The poll interval of a lock waiter after `attempt` failed tries: starts at
/// 1 ms and doubles up to `cap` so that waiters notice a release promptly.
pub(crate) fn backoff(attempt: u32, cap: Duration) -> Duration {
    let d = Duration::from_micros(500u64 << attempt.min(12));
    d.min(cap)
}

/// A state store on one of the two backends. Cloning is cheap (shared).
#[derive(Clone)]
pub enum Store {
    Embedded(Arc<sqlite::SqliteStore>),
    Postgres(Arc<pg::PgStore>),
}

async fn blocking<T, F>(s: &Arc<sqlite::SqliteStore>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&sqlite::SqliteStore) -> Result<T> + Send + 'static,
{
    let s = Arc::clone(s);
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| KvError::Backend {
                location: "embedded".into(),
                detail: format!("state task failed: {e}"),
            })?,
        Err(_) => f(&s),
    }
}

impl Store {
    /// Opens the store described by `opts`: PostgreSQL when a URL is given
    /// (or `NANOKIT_STATE_URL` is set), else the embedded file of the agent.
    /// Boxed: one instance of the opening in the binary, however many
    /// futures await it.
    pub fn open(opts: &OpenOptions) -> futures::future::BoxFuture<'_, Result<Store>> {
        Box::pin(Store::open_inner(opts))
    }

    async fn open_inner(opts: &OpenOptions) -> Result<Store> {
        let agent = opts.agent()?;
        if let Some(url) = opts.resolved_url() {
            return Ok(Store::Postgres(Arc::new(
                pg::PgStore::connect(&url, &agent).await?,
            )));
        }
        let dir = opts.resolved_state_dir()?;
        let store = tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(&dir, &agent))
            .await
            .map_err(|e| KvError::Backend {
                location: "embedded".into(),
                detail: format!("open task failed: {e}"),
            })??;
        Ok(Store::Embedded(Arc::new(store)))
    }

    /// Opens the embedded store synchronously (no PostgreSQL).
    pub fn open_embedded(opts: &OpenOptions) -> Result<Store> {
        let agent = opts.agent()?;
        let dir = opts.resolved_state_dir()?;
        Ok(Store::Embedded(Arc::new(sqlite::SqliteStore::open(
            &dir, &agent,
        )?)))
    }

    /// `embedded` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Postgres(_) => "postgres",
        }
    }

    /// The agent (namespace) of this store.
    pub fn agent(&self) -> &str {
        match self {
            Store::Embedded(s) => s.agent(),
            Store::Postgres(s) => s.agent(),
        }
    }

    /// The embedded store, for synchronous calls.
    pub fn embedded(&self) -> Option<&Arc<sqlite::SqliteStore>> {
        match self {
            Store::Embedded(s) => Some(s),
            Store::Postgres(_) => None,
        }
    }

    pub async fn set(&self, key: &str, value: &Value) -> Result<()> {
        match self {
            Store::Embedded(s) => {
                let (key, value) = (key.to_string(), value.clone());
                blocking(s, move |s| s.set(&key, &value)).await
            }
            Store::Postgres(s) => s.set(key, value).await,
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Value>> {
        match self {
            Store::Embedded(s) => {
                let key = key.to_string();
                blocking(s, move |s| s.get(&key)).await
            }
            Store::Postgres(s) => s.get(key).await,
        }
    }

    /// The value with its last-write time.
    pub async fn get_entry(&self, key: &str) -> Result<Option<Entry>> {
        match self {
            Store::Embedded(s) => {
                let key = key.to_string();
                blocking(s, move |s| s.get_entry(&key)).await
            }
            Store::Postgres(s) => s.get_entry(key).await,
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self {
            Store::Embedded(s) => {
                let key = key.to_string();
                blocking(s, move |s| s.exists(&key)).await
            }
            Store::Postgres(s) => s.exists(key).await,
        }
    }

    /// Deletes a key; `true` when it existed.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        match self {
            Store::Embedded(s) => {
                let key = key.to_string();
                blocking(s, move |s| s.delete(&key)).await
            }
            Store::Postgres(s) => s.delete(key).await,
        }
    }

    /// Every key starting with `prefix` (all keys for `""`), sorted by key
    /// (byte order).
    pub fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Entry>>> {
        Box::pin(async move {
            match self {
                Store::Embedded(s) => {
                    let prefix = prefix.to_string();
                    blocking(s, move |s| s.list(&prefix)).await
                }
                Store::Postgres(s) => s.list(prefix).await,
            }
        })
    }

    /// Atomically adds `delta` to the integer at `key` (missing = 0) and
    /// returns the new value.
    pub async fn increment(&self, key: &str, delta: i64) -> Result<i64> {
        self.increment_within(key, delta, None).await
    }

    /// Like [`Store::increment`], but a result outside `-bound..=bound` is
    /// refused (`ENKNOTINTEGER`, nothing written). JavaScript passes
    /// [`JS_SAFE_INTEGER`], so a counter never comes back inexact.
    pub async fn increment_within(&self, key: &str, delta: i64, bound: Option<i64>) -> Result<i64> {
        match self {
            Store::Embedded(s) => {
                let key = key.to_string();
                blocking(s, move |s| s.increment_within(&key, delta, bound)).await
            }
            Store::Postgres(s) => s.increment_within(key, delta, bound).await,
        }
    }

    /// Acquires the lock `name` for `holder` for `timeout_secs`, waiting up to
    /// `wait` for the current holder to release it; else `ENKLOCKED` naming
    /// the holder. The same holder acquiring again renews the lock.
    pub async fn lock(
        &self,
        name: &str,
        holder: &str,
        timeout_secs: f64,
        wait: Duration,
    ) -> Result<Acquired> {
        match self {
            Store::Embedded(s) => {
                let (name, holder) = (name.to_string(), holder.to_string());
                blocking(s, move |s| s.lock(&name, &holder, timeout_secs, wait)).await
            }
            Store::Postgres(s) => s.lock(name, holder, timeout_secs, wait).await,
        }
    }

    /// Releases the lock `name` held by `holder`; `ENKNOTHOLDER` otherwise.
    pub async fn unlock(&self, name: &str, holder: &str) -> Result<()> {
        match self {
            Store::Embedded(s) => {
                let (name, holder) = (name.to_string(), holder.to_string());
                blocking(s, move |s| s.unlock(&name, &holder)).await
            }
            Store::Postgres(s) => s.unlock(name, holder).await,
        }
    }

    /// Removes the lock `name` whoever holds it; returns the holder it had.
    pub fn force_unlock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            match self {
                Store::Embedded(s) => {
                    let name = name.to_string();
                    blocking(s, move |s| s.force_unlock(&name)).await
                }
                Store::Postgres(s) => s.force_unlock(name).await,
            }
        })
    }

    pub async fn is_locked(&self, name: &str) -> Result<LockInfo> {
        match self {
            Store::Embedded(s) => {
                let name = name.to_string();
                blocking(s, move |s| s.is_locked(&name)).await
            }
            Store::Postgres(s) => s.is_locked(name).await,
        }
    }

    /// Runs `f` while holding the lock and releases it afterwards, whatever
    /// `f` returns (put a `Result` in `T` for fallible work).
    pub async fn with_lock<T, F, Fut>(
        &self,
        name: &str,
        holder: &str,
        timeout_secs: f64,
        wait: Duration,
        f: F,
    ) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        self.lock(name, holder, timeout_secs, wait).await?;
        let out = f().await;
        self.unlock(name, holder).await?;
        Ok(out)
    }

    /// Deletes every key of this agent (locks are kept); returns how many.
    pub async fn clear(&self) -> Result<u64> {
        match self {
            Store::Embedded(s) => blocking(s, move |s| s.clear()).await,
            Store::Postgres(s) => s.clear().await,
        }
    }

    /// Every named lock held now (not expired).
    pub fn locks(&self) -> BoxFuture<'_, Result<Vec<HeldLock>>> {
        Box::pin(async move {
            match self {
                Store::Embedded(s) => blocking(s, move |s| s.locks()).await,
                Store::Postgres(s) => s.locks().await,
            }
        })
    }

    pub async fn stats(&self) -> Result<Stats> {
        match self {
            Store::Embedded(s) => blocking(s, move |s| s.stats()).await,
            Store::Postgres(s) => s.stats().await,
        }
    }
}
