//! The PostgreSQL backend: the same API and semantics as the embedded one,
//! in two tables shared by every agent (the agent is part of the key).
//!
//! Every operation is one SQL statement, so it is atomic on its own:
//! `increment` and `lock` are `INSERT … ON CONFLICT DO UPDATE`, which
//! PostgreSQL serialises per row. Lock expiry is decided by the database's
//! clock (`now()`), so machines with skewed clocks still agree.
//!
//! Connections are made by [`crate::pg::connect`], as every PostgreSQL
//! connection of nanokit is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

pub use crate::pg::redact_url;

use super::{
    backoff, timeout_ms, validate_agent, validate_holder, validate_key, Acquired, Entry, HeldLock,
    KvError, LockInfo, Result, Stats, Value,
};

const SCHEMA: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(7234561001);
CREATE TABLE IF NOT EXISTS nanokit_kv (
    agent text NOT NULL,
    key text NOT NULL,
    kind smallint NOT NULL,
    value text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent, key)
);
CREATE TABLE IF NOT EXISTS nanokit_kv_locks (
    agent text NOT NULL,
    name text NOT NULL,
    holder text NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (agent, name)
);
COMMIT;
";

/// A connected PostgreSQL store of one agent.
pub struct PgStore {
    /// Replaced by a new connection when the old one was lost (the call that
    /// saw it lost fails with ENKSTATEUNAVAILABLE; the next one reconnects).
    client: std::sync::Mutex<Arc<Client>>,
    /// Set when a call saw the connection fail; the next call reconnects.
    broken: std::sync::atomic::AtomicBool,
    url: String,
    agent: String,
    location: String,
}

const EPOCH_MS: &str = "(extract(epoch from {})*1000)::bigint";

fn epoch_ms(col: &str) -> String {
    EPOCH_MS.replace("{}", col)
}

impl PgStore {
    /// Connects, creates the tables when missing, and checks their shape.
    pub async fn connect(url: &str, agent: &str) -> Result<PgStore> {
        validate_agent(agent)?;
        let client = crate::pg::connect(url).await?;
        let store = PgStore {
            client: std::sync::Mutex::new(Arc::new(client)),
            broken: std::sync::atomic::AtomicBool::new(false),
            url: url.to_string(),
            agent: agent.to_string(),
            location: redact_url(url),
        };
        store
            .client()
            .await?
            .batch_execute(SCHEMA)
            .await
            .map_err(|e| store.m(e))?;
        // A foreign table of the same name fails here.
        store
            .client()
            .await?
            .batch_execute(
                "SELECT agent, key, kind, value, updated_at FROM nanokit_kv LIMIT 0;
                 SELECT agent, name, holder, acquired_at, expires_at FROM nanokit_kv_locks LIMIT 0;",
            )
            .await
            .map_err(|e| store.m(e))?;
        Ok(store)
    }

    fn m(&self, e: tokio_postgres::Error) -> KvError {
        let err = KvError::from(crate::pg::map_err(&self.location, e));
        if matches!(err, KvError::Unavailable { .. }) {
            self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        err
    }

    /// The live connection, reconnecting when the previous one was lost.
    async fn client(&self) -> Result<Arc<Client>> {
        let current = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !current.is_closed() && !self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(current);
        }
        self.broken
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let fresh = Arc::new(crate::pg::connect(&self.url).await?);
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&fresh);
        Ok(fresh)
    }

    pub fn agent(&self) -> &str {
        &self.agent
    }

    pub async fn set(&self, key: &str, value: &Value) -> Result<()> {
        validate_key("key", key)?;
        let (kind, text) = value.encode()?;
        self.client().await?
            .execute(
                "INSERT INTO nanokit_kv (agent, key, kind, value, updated_at) VALUES ($1, $2, $3, $4, now())
                 ON CONFLICT (agent, key) DO UPDATE SET kind = EXCLUDED.kind, value = EXCLUDED.value, updated_at = now()",
                &[&self.agent, &key, &kind, &text],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Option<Value>> {
        Ok(self.get_entry(key).await?.map(|e| e.value))
    }

    pub async fn get_entry(&self, key: &str) -> Result<Option<Entry>> {
        validate_key("key", key)?;
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT kind, value, {} FROM nanokit_kv WHERE agent = $1 AND key = $2",
                    epoch_ms("updated_at")
                ),
                &[&self.agent, &key],
            )
            .await
            .map_err(|e| self.m(e))?;
        row.map(|r| {
            Ok(Entry {
                key: key.to_string(),
                value: Value::decode(r.get::<_, i16>(0) as i64, r.get(1), &self.location)?,
                updated_at_ms: r.get(2),
            })
        })
        .transpose()
    }

    pub async fn exists(&self, key: &str) -> Result<bool> {
        validate_key("key", key)?;
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT 1 FROM nanokit_kv WHERE agent = $1 AND key = $2",
                &[&self.agent, &key],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(row.is_some())
    }

    pub async fn delete(&self, key: &str) -> Result<bool> {
        validate_key("key", key)?;
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM nanokit_kv WHERE agent = $1 AND key = $2",
                &[&self.agent, &key],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(n > 0)
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        if prefix.len() > super::MAX_KEY_BYTES || prefix.contains('\0') {
            validate_key("prefix", prefix)?;
        }
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT key, kind, value, {} FROM nanokit_kv
                     WHERE agent = $1 AND left(key, length($2)) = $2 ORDER BY key COLLATE \"C\"",
                    epoch_ms("updated_at")
                ),
                &[&self.agent, &prefix],
            )
            .await
            .map_err(|e| self.m(e))?;
        rows.into_iter()
            .map(|r| {
                Ok(Entry {
                    key: r.get(0),
                    value: Value::decode(r.get::<_, i16>(1) as i64, r.get(2), &self.location)?,
                    updated_at_ms: r.get(3),
                })
            })
            .collect()
    }

    pub async fn increment(&self, key: &str, delta: i64) -> Result<i64> {
        self.increment_within(key, delta, None).await
    }

    /// `increment`, refusing (in the same statement) a result beyond `±bound`.
    pub async fn increment_within(&self, key: &str, delta: i64, bound: Option<i64>) -> Result<i64> {
        validate_key("key", key)?;
        // One statement: the row lock of ON CONFLICT serialises concurrent
        // increments. A non-integer value fails the cast (22P02), an overflow
        // fails the addition (22003), and a result beyond the bound becomes
        // NULL, which the NOT NULL column refuses (23502): nothing is written.
        let res = self
            .client()
            .await?
            .query_one(
                "INSERT INTO nanokit_kv AS t (agent, key, kind, value, updated_at)
                 VALUES ($1, $2, 1,
                         CASE WHEN $4::bigint IS NULL OR $3::bigint BETWEEN -$4::bigint AND $4::bigint
                              THEN $3::bigint::text END,
                         now())
                 ON CONFLICT (agent, key) DO UPDATE
                 SET kind = 1,
                     value = CASE WHEN $4::bigint IS NULL
                                       OR trim(t.value)::bigint + $3::bigint BETWEEN -$4::bigint AND $4::bigint
                                  THEN (trim(t.value)::bigint + $3::bigint)::text END,
                     updated_at = now()
                 RETURNING value::bigint",
                &[&self.agent, &key, &delta, &bound],
            )
            .await;
        match res {
            Ok(row) => Ok(row.get(0)),
            Err(e) => match e.code() {
                Some(c) if *c == SqlState::NOT_NULL_VIOLATION && bound.is_some() => {
                    Err(super::out_of_bound(key, delta, bound.unwrap_or_default()))
                }
                Some(c) if *c == SqlState::INVALID_TEXT_REPRESENTATION => Err(KvError::NotInteger(
                    format!("cannot increment {key:?}: its value is not an integer"),
                )),
                Some(c) if *c == SqlState::NUMERIC_VALUE_OUT_OF_RANGE => {
                    Err(KvError::NotInteger(format!(
                        "cannot increment {key:?} by {delta}: the result overflows a 64-bit integer"
                    )))
                }
                _ => Err(self.m(e)),
            },
        }
    }

    /// One attempt: acquired, or the current holder and expiry.
    pub async fn try_lock(
        &self,
        name: &str,
        holder: &str,
        timeout: i64,
    ) -> Result<std::result::Result<Acquired, (String, i64)>> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "INSERT INTO nanokit_kv_locks AS l (agent, name, holder, acquired_at, expires_at)
                     VALUES ($1, $2, $3, now(), now() + $4::bigint * interval '1 millisecond')
                     ON CONFLICT (agent, name) DO UPDATE
                     SET holder = EXCLUDED.holder, acquired_at = EXCLUDED.acquired_at, expires_at = EXCLUDED.expires_at
                     WHERE l.expires_at <= now() OR l.holder = EXCLUDED.holder
                     RETURNING {}",
                    epoch_ms("expires_at")
                ),
                &[&self.agent, &name, &holder, &timeout],
            )
            .await
            .map_err(|e| self.m(e))?;
        if let Some(row) = row {
            return Ok(Ok(Acquired {
                name: name.to_string(),
                holder: holder.to_string(),
                expires_at_ms: row.get(0),
            }));
        }
        let info = self.is_locked(name).await?;
        match (info.holder, info.expires_at_ms) {
            (Some(h), Some(e)) => Ok(Err((h, e))),
            // Released or expired in between: report as free-but-lost-race so
            // the caller tries again at once.
            _ => Ok(Err((String::new(), 0))),
        }
    }

    pub async fn lock(
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
            match self.try_lock(name, holder, timeout).await? {
                Ok(acquired) => return Ok(acquired),
                Err((current, _)) if current.is_empty() => continue,
                Err((current, expires_at_ms)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(KvError::Locked {
                            name: name.to_string(),
                            holder: current,
                            expires_at_ms,
                        });
                    }
                    let pause = backoff(attempt, Duration::from_millis(20)).min(deadline - now);
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
            }
        }
    }

    pub async fn unlock(&self, name: &str, holder: &str) -> Result<()> {
        validate_key("lock name", name)?;
        validate_holder(holder)?;
        // Ours, even if expired: nobody took it since, so releasing is right.
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM nanokit_kv_locks WHERE agent = $1 AND name = $2 AND holder = $3",
                &[&self.agent, &name, &holder],
            )
            .await
            .map_err(|e| self.m(e))?;
        if n > 0 {
            return Ok(());
        }
        let info = self.is_locked(name).await?;
        Err(KvError::NotHolder {
            name: name.to_string(),
            holder: holder.to_string(),
            current: info.holder,
        })
    }

    pub async fn force_unlock(&self, name: &str) -> Result<Option<String>> {
        validate_key("lock name", name)?;
        let row = self
            .client()
            .await?
            .query_opt(
                "DELETE FROM nanokit_kv_locks WHERE agent = $1 AND name = $2
                 RETURNING holder, expires_at > now()",
                &[&self.agent, &name],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(row.and_then(|r| {
            if r.get::<_, bool>(1) {
                Some(r.get(0))
            } else {
                None
            }
        }))
    }

    pub async fn is_locked(&self, name: &str) -> Result<LockInfo> {
        validate_key("lock name", name)?;
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT holder, {} FROM nanokit_kv_locks
                     WHERE agent = $1 AND name = $2 AND expires_at > now()",
                    epoch_ms("expires_at")
                ),
                &[&self.agent, &name],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(match row {
            Some(r) => LockInfo {
                locked: true,
                holder: Some(r.get(0)),
                expires_at_ms: Some(r.get(1)),
            },
            None => LockInfo::unlocked(),
        })
    }

    /// Every named lock held now (not expired, by the database's clock).
    pub async fn locks(&self) -> Result<Vec<HeldLock>> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT name, holder, {}, {} FROM nanokit_kv_locks
                     WHERE agent = $1 AND expires_at > now() ORDER BY name",
                    epoch_ms("acquired_at"),
                    epoch_ms("expires_at")
                ),
                &[&self.agent],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(rows
            .iter()
            .map(|r| HeldLock {
                name: r.get(0),
                holder: r.get(1),
                acquired_at_ms: r.get(2),
                expires_at_ms: r.get(3),
            })
            .collect())
    }

    /// The agents that have keys or locks in this database.
    pub async fn agents(&self) -> Result<Vec<String>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT agent FROM nanokit_kv UNION SELECT agent FROM nanokit_kv_locks ORDER BY 1",
                &[],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn clear(&self) -> Result<u64> {
        let n = self
            .client()
            .await?
            .execute("DELETE FROM nanokit_kv WHERE agent = $1", &[&self.agent])
            .await
            .map_err(|e| self.m(e))?;
        self.client()
            .await?
            .execute(
                "DELETE FROM nanokit_kv_locks WHERE agent = $1 AND expires_at <= now()",
                &[&self.agent],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(n)
    }

    pub async fn stats(&self) -> Result<Stats> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT (SELECT count(*) FROM nanokit_kv WHERE agent = $1),
                        (SELECT coalesce(sum(octet_length(value)), 0)::bigint FROM nanokit_kv WHERE agent = $1),
                        (SELECT count(*) FROM nanokit_kv_locks WHERE agent = $1 AND expires_at > now())",
                &[&self.agent],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(Stats {
            backend: "postgres".into(),
            agent: self.agent.clone(),
            location: self.location.clone(),
            keys: row.get(0),
            value_bytes: row.get(1),
            locks: row.get(2),
            file_bytes: None,
        })
    }
}
