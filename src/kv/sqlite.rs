//! The embedded backend: one SQLite database per agent, in WAL mode.
//!
//! Many processes may open the same file. Reads run in autocommit; every
//! read-modify-write (increment, lock, unlock) runs in a `BEGIN IMMEDIATE`
//! transaction, which takes the database's write lock before reading, so two
//! processes can never both read the old value. Contention waits in a busy
//! handler (short sleeps, up to [`BUSY_TIMEOUT`]). Lock expiry compares
//! integer milliseconds since the Unix epoch.

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, ErrorCode as SqlCode, OpenFlags, OptionalExtension};

use super::snapshot::{self, Reapable, ShmHeader, Snapshot};
use super::{
    backoff, now_ms, timeout_ms, validate_agent, validate_holder, validate_key, Acquired, Entry,
    HeldLock, KvError, LockInfo, Result, Stats, Value,
};

/// `PRAGMA application_id` of a nanokit state database ("NKSV").
pub const APPLICATION_ID: i32 = 0x4E4B_5356;
/// Schema version (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i32 = 1;
/// How long a call waits for another process's write transaction.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY NOT NULL,
    kind INTEGER NOT NULL,
    value TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY NOT NULL,
    holder TEXT NOT NULL,
    acquired_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
";

/// The connection and the read transaction `get` may keep open.
struct ConnState {
    conn: Connection,
    snap: Option<Snapshot>,
}

impl ConnState {
    fn end_snapshot(&mut self) {
        if self.snap.take().is_some() && self.conn.execute_batch("COMMIT").is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

struct Shared {
    conn: Mutex<ConnState>,
    shm: OnceLockShm,
}

type OnceLockShm = std::sync::OnceLock<Option<ShmHeader>>;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Reapable for Shared {
    fn reap(&self, idle: Duration) -> bool {
        match self.conn.try_lock() {
            Ok(mut g) => {
                if g.snap
                    .as_ref()
                    .is_some_and(|s| s.last_used.elapsed() >= idle)
                {
                    g.end_snapshot();
                }
                g.snap.is_some()
            }
            Err(_) => true,
        }
    }
}

/// The connection with no read snapshot open (every operation but `get`).
struct ConnGuard<'a>(MutexGuard<'a, ConnState>);

impl std::ops::Deref for ConnGuard<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.0.conn
    }
}

impl std::ops::DerefMut for ConnGuard<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.0.conn
    }
}

/// The embedded state store of one agent.
pub struct SqliteStore {
    shared: Arc<Shared>,
    path: PathBuf,
    location: String,
    agent: String,
}

/// Busy handler: sleep a little and retry, for about [`BUSY_TIMEOUT`].
fn busy_handler(attempt: i32) -> bool {
    // 50 µs, 100 µs, … capped at 2 ms: about 15,000 tries ≈ 30 s.
    let attempt = attempt.max(0) as u32;
    if attempt > 15_000 {
        return false;
    }
    std::thread::sleep(Duration::from_micros(
        (50u64 * (attempt as u64 + 1)).min(2000),
    ));
    true
}

fn map_err(location: &str, e: rusqlite::Error) -> KvError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e {
        match f.code {
            SqlCode::NotADatabase | SqlCode::DatabaseCorrupt => {
                return KvError::Corrupt {
                    location: location.to_string(),
                    detail: e.to_string(),
                }
            }
            SqlCode::DatabaseBusy | SqlCode::DatabaseLocked => {
                return KvError::Unavailable {
                    location: location.to_string(),
                    detail: format!(
                        "another process kept it locked for more than {} s ({e})",
                        BUSY_TIMEOUT.as_secs()
                    ),
                }
            }
            SqlCode::CannotOpen | SqlCode::PermissionDenied | SqlCode::ReadOnly => {
                return KvError::Unavailable {
                    location: location.to_string(),
                    detail: e.to_string(),
                }
            }
            _ => {}
        }
    }
    KvError::Backend {
        location: location.to_string(),
        detail: e.to_string(),
    }
}

impl SqliteStore {
    /// Opens (creating when missing) `<dir>/<agent>.db`. A file that is not
    /// a nanokit state database is reported as `ENKSTATECORRUPT` and left
    /// untouched.
    pub fn open(dir: &Path, agent: &str) -> Result<SqliteStore> {
        validate_agent(agent)?;
        let path = dir.join(format!("{agent}.db"));
        let location = path.display().to_string();
        let io_err = |what: &str, e: std::io::Error| KvError::Unavailable {
            location: location.clone(),
            detail: format!("{what}: {e}"),
        };
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(|e| io_err("cannot create the state directory", e))?;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
        // Create the file ourselves so that it is private (0600); SQLite gives
        // its -wal and -shm files the same permissions.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_err("cannot open the database file", e))?;
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(|e| map_err(&location, e))?;
        conn.busy_handler(Some(busy_handler))
            .map_err(|e| map_err(&location, e))?;
        let store = SqliteStore {
            shared: Arc::new(Shared {
                conn: Mutex::new(ConnState { conn, snap: None }),
                shm: OnceLockShm::new(),
            }),
            path,
            location,
            agent: agent.to_string(),
        };
        store.init()?;
        let shared: Arc<dyn Reapable> = store.shared.clone();
        snapshot::register(Arc::downgrade(&shared));
        Ok(store)
    }

    fn init(&self) -> Result<()> {
        let mut conn = self.conn();
        let loc = self.location.clone();
        let m = |e| map_err(&loc, e);
        // The header check: a foreign file fails here with NotADatabase.
        // Both reads in one read transaction: another process creating the
        // schema right now must be seen either not at all or completely.
        let (app_id, tables) = {
            let tx = conn.transaction().map_err(m)?;
            let app_id: i32 = tx
                .query_row("PRAGMA application_id", [], |r| r.get(0))
                .map_err(m)?;
            let tables: i64 = tx
                .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                .map_err(m)?;
            tx.commit().map_err(m)?;
            (app_id, tables)
        };
        if app_id != 0 && app_id != APPLICATION_ID {
            return Err(KvError::Corrupt {
                location: loc.clone(),
                detail: format!(
                    "it is an SQLite database of another application (application_id {app_id:#x})"
                ),
            });
        }
        // Check before the first write (the switch to WAL writes the header),
        // so that a foreign database is left byte for byte as it was.
        if app_id == 0 && tables != 0 {
            return Err(KvError::Corrupt {
                location: loc.clone(),
                detail: "it is an SQLite database with tables that nanokit did not create".into(),
            });
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(m)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(KvError::Backend {
                location: loc.clone(),
                detail: format!("cannot switch to WAL mode (journal_mode is {mode})"),
            });
        }
        conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=OFF;")
            .map_err(m)?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(m)?;
        let app_id: i32 = tx
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(m)?;
        let version: i32 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(m)?;
        if app_id == 0 {
            let tables: i64 = tx
                .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                .map_err(m)?;
            if tables != 0 {
                return Err(KvError::Corrupt {
                    location: loc.clone(),
                    detail: "it is an SQLite database with tables that nanokit did not create"
                        .into(),
                });
            }
            tx.execute_batch(SCHEMA).map_err(m)?;
            tx.execute_batch(&format!(
                "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
            ))
            .map_err(m)?;
        } else if version > SCHEMA_VERSION {
            return Err(KvError::Corrupt {
                location: loc.clone(),
                detail: format!(
                    "it was written by a newer nanokit (schema {version}, this one knows {SCHEMA_VERSION}); upgrade nanokit"
                ),
            });
        } else {
            // Ours: check the tables are really there.
            let tables: i64 = tx
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('kv', 'locks')",
                    [],
                    |r| r.get(0),
                )
                .map_err(m)?;
            if tables != 2 {
                return Err(KvError::Corrupt {
                    location: loc.clone(),
                    detail: "its kv or locks table is missing".into(),
                });
            }
        }
        tx.commit().map_err(m)?;
        Ok(())
    }

    fn conn(&self) -> ConnGuard<'_> {
        let mut g = self.shared.lock();
        g.end_snapshot();
        ConnGuard(g)
    }

    /// The mapped WAL-index header (mapped on first use, after the database
    /// is in WAL mode).
    fn shm(&self) -> Option<&ShmHeader> {
        self.shared
            .shm
            .get_or_init(|| {
                let mut p = self.path.clone().into_os_string();
                p.push("-shm");
                ShmHeader::map(Path::new(&p))
            })
            .as_ref()
    }

    fn m(&self) -> impl Fn(rusqlite::Error) -> KvError + '_ {
        move |e| map_err(&self.location, e)
    }

    /// Whether `get` currently keeps a read transaction open (see
    /// `snapshot`); for tests and diagnostics.
    pub fn has_open_snapshot(&self) -> bool {
        self.shared.lock().snap.is_some()
    }

    /// The agent (namespace) of this store.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn set(&self, key: &str, value: &Value) -> Result<()> {
        validate_key("key", key)?;
        let (kind, text) = value.encode()?;
        let conn = self.conn();
        conn.prepare_cached(
            "INSERT INTO kv (key, kind, value, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (key) DO UPDATE SET kind = excluded.kind, value = excluded.value, updated_at = excluded.updated_at",
        )
        .and_then(|mut st| st.execute(params![key, kind, text, now_ms()]))
        .map_err(self.m())?;
        Ok(())
    }

    pub fn get(&self, key: &str) -> Result<Option<Value>> {
        validate_key("key", key)?;
        let Some(shm) = self.shm() else {
            return self.get_fresh(key);
        };
        let mut g = self.shared.lock();
        let before = shm.read();
        let reuse = g.snap.as_ref().is_some_and(|s| s.header == before);
        if !reuse {
            g.end_snapshot();
            g.conn.execute_batch("BEGIN").map_err(self.m())?;
        }
        let row = g
            .conn
            .prepare_cached("SELECT kind, value FROM kv WHERE key = ?1")
            .and_then(|mut st| {
                st.query_row([key], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                    .optional()
            });
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                if g.snap.is_none() {
                    let _ = g.conn.execute_batch("ROLLBACK");
                }
                g.end_snapshot();
                return Err(self.m()(e));
            }
        };
        if reuse {
            if let Some(s) = g.snap.as_mut() {
                s.last_used = Instant::now();
            }
        } else if shm.read() == before {
            // Nobody committed while the transaction began: it is at the
            // newest commit and may serve the next gets.
            g.snap = Some(Snapshot {
                header: before,
                last_used: Instant::now(),
            });
            snapshot::opened();
        } else {
            let _ = g.conn.execute_batch("COMMIT");
        }
        drop(g);
        row.map(|(kind, text)| Value::decode(kind, text, &self.location))
            .transpose()
    }

    /// `get` in its own read transaction.
    fn get_fresh(&self, key: &str) -> Result<Option<Value>> {
        let conn = self.conn();
        let row = conn
            .prepare_cached("SELECT kind, value FROM kv WHERE key = ?1")
            .and_then(|mut st| {
                st.query_row([key], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                    .optional()
            })
            .map_err(self.m())?;
        drop(conn);
        row.map(|(kind, text)| Value::decode(kind, text, &self.location))
            .transpose()
    }

    pub fn get_entry(&self, key: &str) -> Result<Option<Entry>> {
        validate_key("key", key)?;
        let conn = self.conn();
        let row = conn
            .prepare_cached("SELECT kind, value, updated_at FROM kv WHERE key = ?1")
            .and_then(|mut st| {
                st.query_row([key], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .optional()
            })
            .map_err(self.m())?;
        drop(conn);
        row.map(|(kind, text, updated_at_ms)| {
            Ok(Entry {
                key: key.to_string(),
                value: Value::decode(kind, text, &self.location)?,
                updated_at_ms,
            })
        })
        .transpose()
    }

    pub fn exists(&self, key: &str) -> Result<bool> {
        validate_key("key", key)?;
        let conn = self.conn();
        conn.prepare_cached("SELECT 1 FROM kv WHERE key = ?1")
            .and_then(|mut st| st.exists([key]))
            .map_err(self.m())
    }

    pub fn delete(&self, key: &str) -> Result<bool> {
        validate_key("key", key)?;
        let conn = self.conn();
        let n = conn
            .prepare_cached("DELETE FROM kv WHERE key = ?1")
            .and_then(|mut st| st.execute([key]))
            .map_err(self.m())?;
        Ok(n > 0)
    }

    pub fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        if prefix.len() > super::MAX_KEY_BYTES || prefix.contains('\0') {
            validate_key("prefix", prefix)?;
        }
        let conn = self.conn();
        let rows = conn
            .prepare_cached(
                "SELECT key, kind, value, updated_at FROM kv
                 WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key",
            )
            .and_then(|mut st| {
                st.query_map([prefix], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(self.m())?;
        drop(conn);
        rows.into_iter()
            .map(|(key, kind, text, updated_at_ms)| {
                Ok(Entry {
                    key,
                    value: Value::decode(kind, text, &self.location)?,
                    updated_at_ms,
                })
            })
            .collect()
    }

    pub fn increment(&self, key: &str, delta: i64) -> Result<i64> {
        self.increment_within(key, delta, None)
    }

    /// `increment`, refusing (before writing) a result beyond `±bound`.
    pub fn increment_within(&self, key: &str, delta: i64, bound: Option<i64>) -> Result<i64> {
        validate_key("key", key)?;
        let mut conn = self.conn();
        let m = self.m();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&m)?;
        let current = tx
            .prepare_cached("SELECT kind, value FROM kv WHERE key = ?1")
            .and_then(|mut st| {
                st.query_row([key], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                    .optional()
            })
            .map_err(&m)?;
        let base = match &current {
            None => 0,
            Some((_, text)) => Value::parse_integer(text).ok_or_else(|| {
                KvError::NotInteger(format!(
                    "cannot increment {key:?}: its value is not an integer ({})",
                    text.chars().take(60).collect::<String>()
                ))
            })?,
        };
        let next = base.checked_add(delta).ok_or_else(|| {
            KvError::NotInteger(format!(
                "cannot increment {key:?} by {delta}: the result overflows a 64-bit integer"
            ))
        })?;
        if let Some(bound) = bound {
            if !(-bound..=bound).contains(&next) {
                return Err(super::out_of_bound(key, delta, bound));
            }
        }
        tx.prepare_cached(
            "INSERT INTO kv (key, kind, value, updated_at) VALUES (?1, 1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET kind = 1, value = excluded.value, updated_at = excluded.updated_at",
        )
        .and_then(|mut st| st.execute(params![key, next.to_string(), now_ms()]))
        .map_err(&m)?;
        tx.commit().map_err(&m)?;
        Ok(next)
    }

    /// One attempt: `Ok(Ok(acquired))`, or `Ok(Err((holder, expires_at)))`
    /// when someone else holds it.
    pub fn try_lock(
        &self,
        name: &str,
        holder: &str,
        timeout: i64,
    ) -> Result<std::result::Result<Acquired, (String, i64)>> {
        let mut conn = self.conn();
        let m = self.m();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&m)?;
        let now = now_ms();
        let current = lock_row(&tx, name).map_err(&m)?;
        if let Some((h, expires_at)) = current {
            if expires_at > now && h != holder {
                return Ok(Err((h, expires_at)));
            }
        }
        let expires_at = now.saturating_add(timeout);
        tx.prepare_cached(
            "INSERT INTO locks (name, holder, acquired_at, expires_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                 acquired_at = excluded.acquired_at, expires_at = excluded.expires_at",
        )
        .and_then(|mut st| st.execute(params![name, holder, now, expires_at]))
        .map_err(&m)?;
        tx.commit().map_err(&m)?;
        Ok(Ok(Acquired {
            name: name.to_string(),
            holder: holder.to_string(),
            expires_at_ms: expires_at,
        }))
    }

    /// Acquires `name` for `holder`, waiting up to `wait`; see
    /// [`super::Store::lock`].
    pub fn lock(
        &self,
        name: &str,
        holder: &str,
        timeout_secs: f64,
        wait: Duration,
    ) -> Result<Acquired> {
        validate_key("lock name", name)?;
        validate_holder(holder)?;
        let timeout = timeout_ms(timeout_secs)?;
        let deadline = Instant::now() + wait;
        let mut attempt = 0;
        loop {
            match self.try_lock(name, holder, timeout)? {
                Ok(acquired) => return Ok(acquired),
                Err((current, expires_at_ms)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(KvError::Locked {
                            name: name.to_string(),
                            holder: current,
                            expires_at_ms,
                        });
                    }
                    let pause = backoff(attempt, Duration::from_millis(10)).min(deadline - now);
                    std::thread::sleep(pause);
                    attempt += 1;
                }
            }
        }
    }

    pub fn unlock(&self, name: &str, holder: &str) -> Result<()> {
        validate_key("lock name", name)?;
        validate_holder(holder)?;
        let mut conn = self.conn();
        let m = self.m();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&m)?;
        let current = lock_row(&tx, name).map_err(&m)?;
        match current {
            // Ours, even if expired: nobody else took it since, so releasing
            // it is correct.
            Some((h, _)) if h == holder => {
                tx.prepare_cached("DELETE FROM locks WHERE name = ?1")
                    .and_then(|mut st| st.execute([name]))
                    .map_err(&m)?;
                tx.commit().map_err(&m)?;
                Ok(())
            }
            Some((h, expires_at)) if expires_at > now_ms() => Err(KvError::NotHolder {
                name: name.to_string(),
                holder: holder.to_string(),
                current: Some(h),
            }),
            _ => Err(KvError::NotHolder {
                name: name.to_string(),
                holder: holder.to_string(),
                current: None,
            }),
        }
    }

    pub fn force_unlock(&self, name: &str) -> Result<Option<String>> {
        validate_key("lock name", name)?;
        let conn = self.conn();
        conn.prepare_cached("DELETE FROM locks WHERE name = ?1 RETURNING holder, expires_at")
            .and_then(|mut st| {
                st.query_row([name], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()
            })
            .map(|row| row.filter(|(_, e)| *e > now_ms()).map(|(h, _)| h))
            .map_err(self.m())
    }

    pub fn is_locked(&self, name: &str) -> Result<LockInfo> {
        validate_key("lock name", name)?;
        let conn = self.conn();
        let row = conn
            .prepare_cached(
                "SELECT holder, expires_at FROM locks WHERE name = ?1 AND expires_at > ?2",
            )
            .and_then(|mut st| {
                st.query_row(params![name, now_ms()], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()
            })
            .map_err(self.m())?;
        Ok(match row {
            Some((holder, expires_at)) => LockInfo {
                locked: true,
                holder: Some(holder),
                expires_at_ms: Some(expires_at),
            },
            None => LockInfo::unlocked(),
        })
    }

    /// Every named lock held now (not expired), by name.
    pub fn locks(&self) -> Result<Vec<HeldLock>> {
        let conn = self.conn();
        conn.prepare_cached(
            "SELECT name, holder, acquired_at, expires_at FROM locks
             WHERE expires_at > ?1 ORDER BY name",
        )
        .and_then(|mut st| {
            st.query_map([now_ms()], |r| {
                Ok(HeldLock {
                    name: r.get(0)?,
                    holder: r.get(1)?,
                    acquired_at_ms: r.get(2)?,
                    expires_at_ms: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(self.m())
    }

    /// Deletes every key (locks are kept) and purges expired lock rows.
    pub fn clear(&self) -> Result<u64> {
        let mut conn = self.conn();
        let m = self.m();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&m)?;
        let n = tx.execute("DELETE FROM kv", []).map_err(&m)?;
        tx.execute("DELETE FROM locks WHERE expires_at <= ?1", [now_ms()])
            .map_err(&m)?;
        tx.commit().map_err(&m)?;
        Ok(n as u64)
    }

    pub fn stats(&self) -> Result<Stats> {
        let conn = self.conn();
        let (keys, value_bytes): (i64, i64) = conn
            .query_row(
                "SELECT count(*), coalesce(sum(length(CAST(value AS BLOB))), 0) FROM kv",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.m())?;
        let locks: i64 = conn
            .query_row(
                "SELECT count(*) FROM locks WHERE expires_at > ?1",
                [now_ms()],
                |r| r.get(0),
            )
            .map_err(self.m())?;
        drop(conn);
        let size = |p: &Path| fs::metadata(p).map(|m| m.len() as i64).unwrap_or(0);
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        Ok(Stats {
            backend: "embedded".into(),
            agent: self.agent.clone(),
            location: self.location.clone(),
            keys,
            value_bytes,
            locks,
            file_bytes: Some(size(&self.path) + size(Path::new(&wal))),
        })
    }
}

/// The holder and expiry (ms) of lock `name`, expired or not.
fn lock_row(tx: &rusqlite::Transaction<'_>, name: &str) -> rusqlite::Result<Option<(String, i64)>> {
    tx.prepare_cached("SELECT holder, expires_at FROM locks WHERE name = ?1")
        .and_then(|mut st| {
            st.query_row([name], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .optional()
        })
}
