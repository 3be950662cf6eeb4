//! Remote state: `state.json` and its deploy lock kept in PostgreSQL, so
//! that several machines (or working directories) deploying one project can
//! never overwrite each other's state. Keyed by a *workspace*
//! (`<project>/<env>`):
//! - `nanokit_infra_state` holds the document (the exact text the engine
//!   wrote), its `serial` and `lineage`; a write is a compare-and-swap on
//!   serial and lineage, so a stale writer gets `ENKSTATESTALE` instead of
//!   silently losing the other's update.
//! - `nanokit_infra_lock` holds one deploy-lock row per workspace: holder,
//!   description and an expiry by the database's clock. A second run fails
//!   fast (or waits) with `ENKLOCKED` naming the holder; `force_unlock` is
//!   `nanokit infra unlock`.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::kv::{backoff, timeout_ms, validate_holder, validate_key, KvError, Result};
use crate::pg::{connect, redact_url};

const SCHEMA: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(7234561002);
CREATE TABLE IF NOT EXISTS nanokit_infra_state (
    workspace text PRIMARY KEY,
    lineage text NOT NULL,
    serial bigint NOT NULL,
    document text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS nanokit_infra_lock (
    workspace text PRIMARY KEY,
    holder text NOT NULL,
    info text NOT NULL DEFAULT '',
    acquired_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
COMMIT;
";

/// Largest state document accepted (64 MiB).
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024 * 1024;

/// One stored state document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDoc {
    pub serial: i64,
    pub lineage: String,
    /// The exact text the engine stored (its `state.json`).
    pub document: String,
    pub updated_at_ms: i64,
    pub updated_by: String,
}

/// The deploy lock of a workspace, as shown by `nanokit infra unlock`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LockRow {
    pub holder: String,
    pub info: String,
    pub acquired_at_ms: i64,
    pub expires_at_ms: i64,
}

/// A deploy lock taken by [`InfraStateStore::lock`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockTaken {
    pub holder: String,
    pub expires_at_ms: i64,
    /// It was taken from another holder whose lock had expired: a run that
    /// died (or stopped renewing) holding it, whose requests to the runtime
    /// may still be landing.
    pub took_over: bool,
}

/// The remote infra state in one PostgreSQL database.
pub struct InfraStateStore {
    client: Client,
    location: String,
}

impl InfraStateStore {
    /// Connects and creates the tables when missing.
    pub async fn connect(url: &str) -> Result<InfraStateStore> {
        let client = connect(url).await?;
        let store = InfraStateStore {
            client,
            location: redact_url(url),
        };
        store
            .client
            .batch_execute(SCHEMA)
            .await
            .map_err(|e| store.m(e))?;
        store
            .client
            .batch_execute(
                "SELECT workspace, lineage, serial, document, updated_at, updated_by FROM nanokit_infra_state LIMIT 0;
                 SELECT workspace, holder, info, acquired_at, expires_at FROM nanokit_infra_lock LIMIT 0;",
            )
            .await
            .map_err(|e| store.m(e))?;
        Ok(store)
    }

    fn m(&self, e: tokio_postgres::Error) -> KvError {
        crate::pg::map_err(&self.location, e).into()
    }

    /// The current document of `workspace`, or `None` before the first write.
    pub async fn read(&self, workspace: &str) -> Result<Option<StateDoc>> {
        validate_key("workspace", workspace)?;
        let row = self
            .client
            .query_opt(
                "SELECT serial, lineage, document, (extract(epoch from updated_at)*1000)::bigint, updated_by
                 FROM nanokit_infra_state WHERE workspace = $1",
                &[&workspace],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(row.map(|r| StateDoc {
            serial: r.get(0),
            lineage: r.get(1),
            document: r.get(2),
            updated_at_ms: r.get(3),
            updated_by: r.get(4),
        }))
    }

    /// Stores `document` with `new_serial` if the stored state still has
    /// `expected_serial` and `lineage` (`None`: only if there is no state
    /// yet). Otherwise nothing is written and the error says what is there:
    /// `ENKSTATESTALE` (someone wrote in between: re-read, re-plan) or
    /// `ENKSTATELINEAGE` (a different state history).
    pub async fn compare_and_swap(
        &self,
        workspace: &str,
        expected_serial: Option<i64>,
        lineage: &str,
        new_serial: i64,
        document: &str,
        writer: &str,
    ) -> Result<()> {
        validate_key("workspace", workspace)?;
        validate_key("lineage", lineage)?;
        if document.len() > MAX_DOCUMENT_BYTES || document.contains('\0') {
            return Err(KvError::Key(format!(
                "state document must be at most {MAX_DOCUMENT_BYTES} bytes without NUL"
            )));
        }
        if let Some(expected) = expected_serial {
            if new_serial <= expected {
                return Err(KvError::Invalid(format!(
                    "the new serial ({new_serial}) must be greater than the expected one ({expected})"
                )));
            }
        }
        let n = match expected_serial {
            None => self
                .client
                .execute(
                    "INSERT INTO nanokit_infra_state (workspace, lineage, serial, document, updated_at, updated_by)
                     VALUES ($1, $2, $3, $4, now(), $5) ON CONFLICT (workspace) DO NOTHING",
                    &[&workspace, &lineage, &new_serial, &document, &writer],
                )
                .await
                .map_err(|e| self.m(e))?,
            Some(expected) => self
                .client
                .execute(
                    "UPDATE nanokit_infra_state
                     SET serial = $4, document = $5, updated_at = now(), updated_by = $6
                     WHERE workspace = $1 AND serial = $2 AND lineage = $3",
                    &[&workspace, &expected, &lineage, &new_serial, &document, &writer],
                )
                .await
                .map_err(|e| self.m(e))?,
        };
        if n == 1 {
            return Ok(());
        }
        let current = self.read(workspace).await?;
        Err(match current {
            Some(cur) if cur.lineage != lineage => KvError::LineageMismatch {
                workspace: workspace.to_string(),
                expected: lineage.to_string(),
                actual: cur.lineage,
            },
            cur => KvError::StaleState {
                workspace: workspace.to_string(),
                expected: expected_serial,
                actual: cur.as_ref().map(|c| c.serial),
                writer: cur.map(|c| c.updated_by).unwrap_or_default(),
            },
        })
    }

    /// Acquires (or, for the same holder, renews) the deploy lock of
    /// `workspace` for `timeout_secs`, waiting up to `wait`; else
    /// `ENKLOCKED` naming the holder. `info` describes the run (host, pid,
    /// working directory, command) for `nanokit infra unlock`.
    pub async fn lock(
        &self,
        workspace: &str,
        holder: &str,
        info: &str,
        timeout_secs: f64,
        wait: Duration,
    ) -> Result<LockTaken> {
        validate_key("workspace", workspace)?;
        validate_holder(holder)?;
        let timeout = timeout_ms(timeout_secs)?;
        let deadline = Instant::now() + wait;
        let mut attempt = 0;
        loop {
            let row = self
                .client
                .query_opt(
                    // `prev` is the row as this statement's snapshot saw it;
                    // xmax is not 0 on a row the upsert updated rather than
                    // inserted. Both together: an expired lock of another
                    // holder was taken over (a released one is deleted).
                    "WITH prev AS (SELECT holder FROM nanokit_infra_lock WHERE workspace = $1)
                     INSERT INTO nanokit_infra_lock AS l (workspace, holder, info, acquired_at, expires_at)
                     VALUES ($1, $2, $3, now(), now() + $4::bigint * interval '1 millisecond')
                     ON CONFLICT (workspace) DO UPDATE
                     SET holder = EXCLUDED.holder, info = EXCLUDED.info,
                         acquired_at = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now()
                                            THEN l.acquired_at ELSE EXCLUDED.acquired_at END,
                         expires_at = EXCLUDED.expires_at
                     WHERE l.expires_at <= now() OR l.holder = EXCLUDED.holder
                     RETURNING (extract(epoch from expires_at)*1000)::bigint,
                               NOT (l.xmax = 0) AND coalesce((SELECT holder FROM prev) <> $2, false)",
                    &[&workspace, &holder, &info, &timeout],
                )
                .await
                .map_err(|e| self.m(e))?;
            if let Some(r) = row {
                return Ok(LockTaken {
                    holder: holder.to_string(),
                    expires_at_ms: r.get(0),
                    took_over: r.get(1),
                });
            }
            let Some(current) = self.lock_info(workspace).await? else {
                continue; // released in between: try again at once
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(KvError::Locked {
                    name: workspace.to_string(),
                    holder: if current.info.is_empty() {
                        current.holder
                    } else {
                        format!("{} ({})", current.holder, current.info)
                    },
                    expires_at_ms: current.expires_at_ms,
                });
            }
            tokio::time::sleep(backoff(attempt, Duration::from_millis(50)).min(deadline - now))
                .await;
            attempt += 1;
        }
    }

    /// Extends the live deploy lock `holder` holds by `timeout_secs` from
    /// now. Unlike calling [`lock`](Self::lock) again, this never takes a
    /// lock that expired or was cleared with `nanokit infra unlock`: it
    /// returns `false` then (the lock is lost).
    pub async fn renew(&self, workspace: &str, holder: &str, timeout_secs: f64) -> Result<bool> {
        validate_key("workspace", workspace)?;
        let timeout = timeout_ms(timeout_secs)?;
        let n = self
            .client
            .execute(
                "UPDATE nanokit_infra_lock
                 SET expires_at = now() + $3::bigint * interval '1 millisecond'
                 WHERE workspace = $1 AND holder = $2 AND expires_at > now()",
                &[&workspace, &holder, &timeout],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(n == 1)
    }

    /// Releases the deploy lock held by `holder` (`ENKNOTHOLDER` otherwise).
    pub async fn unlock(&self, workspace: &str, holder: &str) -> Result<()> {
        validate_key("workspace", workspace)?;
        let n = self
            .client
            .execute(
                "DELETE FROM nanokit_infra_lock WHERE workspace = $1 AND holder = $2",
                &[&workspace, &holder],
            )
            .await
            .map_err(|e| self.m(e))?;
        if n == 1 {
            return Ok(());
        }
        Err(KvError::NotHolder {
            name: workspace.to_string(),
            holder: holder.to_string(),
            current: self.lock_info(workspace).await?.map(|l| l.holder),
        })
    }

    /// The live deploy lock of `workspace`, if any.
    pub async fn lock_info(&self, workspace: &str) -> Result<Option<LockRow>> {
        validate_key("workspace", workspace)?;
        let row = self
            .client
            .query_opt(
                "SELECT holder, info, (extract(epoch from acquired_at)*1000)::bigint,
                        (extract(epoch from expires_at)*1000)::bigint
                 FROM nanokit_infra_lock WHERE workspace = $1 AND expires_at > now()",
                &[&workspace],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(row.map(|r| LockRow {
            holder: r.get(0),
            info: r.get(1),
            acquired_at_ms: r.get(2),
            expires_at_ms: r.get(3),
        }))
    }

    /// Removes the deploy lock whoever holds it (`nanokit infra unlock`);
    /// returns the lock it removed, if it was live.
    pub async fn force_unlock(&self, workspace: &str) -> Result<Option<LockRow>> {
        validate_key("workspace", workspace)?;
        let row = self
            .client
            .query_opt(
                "DELETE FROM nanokit_infra_lock WHERE workspace = $1
                 RETURNING holder, info, (extract(epoch from acquired_at)*1000)::bigint,
                           (extract(epoch from expires_at)*1000)::bigint, expires_at > now()",
                &[&workspace],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(row.filter(|r| r.get::<_, bool>(4)).map(|r| LockRow {
            holder: r.get(0),
            info: r.get(1),
            acquired_at_ms: r.get(2),
            expires_at_ms: r.get(3),
        }))
    }
}
