//! The state in PostgreSQL, so that several machines (or working
//! directories) deploying one project share it. Keyed by a *workspace*
//! (`<project>/<env>`):
//! - `nanokit_infra_state` holds the document (the exact text the engine
//!   wrote), its `serial`, `lineage` and `epoch`; a write is one `UPDATE`
//!   that compares the serial read (the version) and refuses an epoch lower
//!   than the stored one, so a stale writer gets `ENKSTATESTALE` instead of
//!   silently losing the other's update.
//! - `nanokit_infra_history` keeps the last revisions of each workspace.
//! - `nanokit_infra_lock` holds one deploy-lock row per workspace: holder,
//!   description, epoch and an expiry by the database's clock. The row is
//!   never deleted: a release or `infra unlock` empties its holder and keeps
//!   its epoch, and every acquisition takes `max(row, state) + 1`.
//!
//! Connections are made by [`crate::pg::connect`], as every PostgreSQL
//! connection of nanokit is.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_postgres::Client;

use super::backend::{Backend, Grant, LockRequest, LockView, Stored, Version, WriteMeta};

fn serial_of(serial: u64) -> i64 {
    serial.min(i64::MAX as u64) as i64
}
use super::StateError;
use crate::pg::{self, redact_url};

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
CREATE TABLE IF NOT EXISTS nanokit_infra_history (
    workspace text NOT NULL,
    serial bigint NOT NULL,
    document text NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, serial)
);
CREATE TABLE IF NOT EXISTS nanokit_infra_lock (
    workspace text PRIMARY KEY,
    holder text NOT NULL,
    info text NOT NULL DEFAULT '',
    acquired_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
DO $$
BEGIN
    -- Tables made by an older nanokit get the epoch columns (looked up
    -- first: ALTER TABLE would lock the table on every connection).
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'nanokit_infra_state'::regclass AND attname = 'epoch') THEN
        ALTER TABLE nanokit_infra_state ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'nanokit_infra_lock'::regclass AND attname = 'epoch') THEN
        ALTER TABLE nanokit_infra_lock ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'nanokit_infra_lock'::regclass AND attname = 'taken_from') THEN
        ALTER TABLE nanokit_infra_lock ADD COLUMN taken_from text NOT NULL DEFAULT '';
    END IF;
END $$;
COMMIT;
";

/// Largest state document accepted (64 MiB).
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024 * 1024;

/// The remote state of one workspace in one PostgreSQL database.
pub struct PostgresBackend {
    client: Client,
    location: String,
    workspace: String,
    /// The lock this handle holds: run id and epoch.
    held: Mutex<Option<(String, i64)>>,
}

fn ms(d: Duration) -> i64 {
    d.as_millis().clamp(1, i64::MAX as u128) as i64
}

impl PostgresBackend {
    /// Connects and creates the tables when missing.
    pub async fn connect(url: &str, workspace: &str) -> Result<PostgresBackend, StateError> {
        if workspace.is_empty() || workspace.len() > 1024 || workspace.contains('\0') {
            return Err(StateError::Url {
                url: redact_url(url),
                detail: format!("the workspace {workspace:?} is not a usable key"),
            });
        }
        let client = pg::connect(url).await?;
        let b = PostgresBackend {
            client,
            location: format!("{} (workspace {workspace})", redact_url(url)),
            workspace: workspace.to_string(),
            held: Mutex::new(None),
        };
        let loc = redact_url(url);
        b.client
            .batch_execute(SCHEMA)
            .await
            .map_err(|e| pg::map_err(&loc, e))?;
        // A foreign table of the same name fails here.
        b.client
            .batch_execute(
                "SELECT workspace, lineage, serial, document, updated_at, updated_by, epoch FROM nanokit_infra_state LIMIT 0;
                 SELECT workspace, holder, info, acquired_at, expires_at, epoch, taken_from FROM nanokit_infra_lock LIMIT 0;
                 SELECT workspace, serial, document, written_at FROM nanokit_infra_history LIMIT 0;",
            )
            .await
            .map_err(|e| pg::map_err(&loc, e))?;
        Ok(b)
    }

    fn m(&self, e: tokio_postgres::Error) -> StateError {
        StateError::Pg(pg::map_err(&self.location, e))
    }

    fn held(&self) -> Option<(String, i64)> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The live lock row, if any.
    async fn live_lock(&self) -> Result<Option<LockView>, StateError> {
        let row = self
            .client
            .query_opt(
                "SELECT holder, info, (extract(epoch from acquired_at)*1000)::bigint,
                        (extract(epoch from expires_at)*1000)::bigint, epoch
                 FROM nanokit_infra_lock WHERE workspace = $1 AND holder <> '' AND expires_at > now()",
                &[&self.workspace],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(row.map(|r| view(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))))
    }
}

fn view(holder: String, info: String, acquired: i64, expires: i64, epoch: i64) -> LockView {
    LockView {
        description: if info.is_empty() {
            holder.clone()
        } else {
            format!("{holder} ({info})")
        },
        run_id: holder,
        epoch: epoch.max(0) as u64,
        acquired_at_ms: Some(acquired),
        expires_at_ms: Some(expires),
        stale: false,
    }
}

#[async_trait]
impl Backend for PostgresBackend {
    fn location(&self) -> String {
        self.location.clone()
    }

    async fn read(&self) -> Result<Option<Stored>, StateError> {
        let row = self
            .client
            .query_opt(
                "SELECT serial, lineage, document FROM nanokit_infra_state WHERE workspace = $1",
                &[&self.workspace],
            )
            .await
            .map_err(|e| self.m(e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (serial, lineage, document): (i64, String, String) =
            (row.get(0), row.get(1), row.get(2));
        // The row and its document must agree.
        #[derive(serde::Deserialize)]
        struct Head {
            serial: i64,
            lineage: String,
        }
        let head: Head =
            serde_json::from_str(&document).map_err(|e| StateError::RemoteCorrupt {
                location: self.location.clone(),
                detail: format!("its document is not a nanokit state ({e})"),
            })?;
        if head.serial != serial || head.lineage != lineage {
            return Err(StateError::RemoteCorrupt {
                location: self.location.clone(),
                detail: format!(
                    "its row has serial {serial} / lineage {lineage} but its document {} / {}",
                    head.serial, head.lineage
                ),
            });
        }
        Ok(Some(Stored {
            bytes: document.into_bytes(),
            version: Version(serial.to_string()),
        }))
    }

    async fn write(
        &self,
        bytes: &[u8],
        expected: Option<&Version>,
        meta: &WriteMeta<'_>,
    ) -> Result<Version, StateError> {
        let document = std::str::from_utf8(bytes)
            .ok()
            .filter(|d| d.len() <= MAX_DOCUMENT_BYTES && !d.contains('\0'))
            .ok_or_else(|| StateError::Write {
                location: self.location.clone(),
                detail: format!(
                    "a state document must be UTF-8 of at most {MAX_DOCUMENT_BYTES} bytes without NUL"
                ),
            })?;
        let serial = meta.serial as i64;
        let epoch = meta.epoch as i64;
        let expected = match expected {
            Some(v) => Some(v.0.parse::<i64>().map_err(|_| StateError::Write {
                location: self.location.clone(),
                detail: format!("{:?} is not a serial", v.0),
            })?),
            None => None,
        };
        let n = match expected {
            None => self
                .client
                .execute(
                    "INSERT INTO nanokit_infra_state (workspace, lineage, serial, document, updated_at, updated_by, epoch)
                     VALUES ($1, $2, $3, $4, now(), $5, $6) ON CONFLICT (workspace) DO NOTHING",
                    &[&self.workspace, &meta.lineage, &serial, &document, &meta.writer, &epoch],
                )
                .await
                .map_err(|e| self.m(e))?,
            Some(expected) => self
                .client
                .execute(
                    "UPDATE nanokit_infra_state
                     SET serial = $4, document = $5, updated_at = now(), updated_by = $6, epoch = $7,
                         lineage = $3
                     WHERE workspace = $1 AND serial = $2 AND epoch <= $7",
                    &[&self.workspace, &expected, &meta.lineage, &serial, &document, &meta.writer, &epoch],
                )
                .await
                .map_err(|e| self.m(e))?,
        };
        if n == 1 {
            return Ok(Version(serial.to_string()));
        }
        // Say why, from what is there.
        let row = self
            .client
            .query_opt(
                "SELECT serial, lineage, epoch, updated_by FROM nanokit_infra_state WHERE workspace = $1",
                &[&self.workspace],
            )
            .await
            .map_err(|e| self.m(e))?;
        let location = self.location.clone();
        Err(match row {
            Some(r) if r.get::<_, i64>(2) > epoch => StateError::Fenced {
                location,
                epoch: meta.epoch,
                highest: r.get::<_, i64>(2) as u64,
            },
            found => StateError::Conflict {
                location,
                detail: format!(
                    "expected serial {}, found {}",
                    expected.map_or("none (new state)".to_string(), |s| s.to_string()),
                    match found {
                        Some(r) => format!(
                            "{} written by {:?}",
                            r.get::<_, i64>(0),
                            r.get::<_, String>(3)
                        ),
                        None => "none".into(),
                    }
                ),
            },
        })
    }

    async fn lock(&self, req: &LockRequest<'_>) -> Result<Grant, StateError> {
        let deadline = Instant::now() + req.wait;
        let ttl = ms(req.ttl);
        let run_id = &req.holder.run_id;
        let info = req.holder.describe();
        let mut attempt = 0;
        loop {
            if req.cancel.is_cancelled() {
                return Err(StateError::Interrupted);
            }
            let row = self
                .client
                .query_opt(
                    // On conflict, `l` is the row as it is once locked (after
                    // a release in flight commits, not as this statement's
                    // snapshot saw it): a holder there, whose lock expired,
                    // means a takeover, recorded in `taken_from`. The new
                    // epoch is above the row's and the state's.
                    "WITH st AS (SELECT epoch FROM nanokit_infra_state WHERE workspace = $1)
                     INSERT INTO nanokit_infra_lock AS l
                         (workspace, holder, info, acquired_at, expires_at, epoch, taken_from)
                     VALUES ($1, $2, $3, now(), now() + $4::bigint * interval '1 millisecond',
                             coalesce((SELECT epoch FROM st), 0) + 1, '')
                     ON CONFLICT (workspace) DO UPDATE
                     SET holder = EXCLUDED.holder, info = EXCLUDED.info, acquired_at = now(),
                         expires_at = EXCLUDED.expires_at,
                         epoch = greatest(l.epoch, coalesce((SELECT epoch FROM st), 0)) + 1,
                         taken_from = l.holder
                     WHERE l.holder = '' OR l.expires_at <= now()
                     RETURNING epoch, taken_from <> ''",
                    &[&self.workspace, run_id, &info, &ttl],
                )
                .await
                .map_err(|e| self.m(e))?;
            if let Some(r) = row {
                let epoch: i64 = r.get(0);
                *self.held.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((run_id.clone(), epoch));
                return Ok(Grant {
                    epoch: epoch as u64,
                    took_over: r.get(1),
                    lost: None,
                });
            }
            let Some(current) = self.live_lock().await? else {
                continue; // released in between: try again at once
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(StateError::Locked {
                    location: self.location.clone(),
                    holder: current.to_string(),
                });
            }
            let pause = crate::kv::backoff(attempt, Duration::from_millis(50)).min(deadline - now);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = req.cancel.cancelled() => return Err(StateError::Interrupted),
            }
            attempt += 1;
        }
    }

    async fn renew(&self, ttl: Duration) -> Result<bool, StateError> {
        let Some((run_id, epoch)) = self.held() else {
            return Ok(false);
        };
        let n = self
            .client
            .execute(
                "UPDATE nanokit_infra_lock
                 SET expires_at = now() + $4::bigint * interval '1 millisecond'
                 WHERE workspace = $1 AND holder = $2 AND epoch = $3 AND expires_at > now()",
                &[&self.workspace, &run_id, &epoch, &ms(ttl)],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(n == 1)
    }

    async fn unlock(&self) -> Result<(), StateError> {
        let Some((run_id, epoch)) = self.held.lock().unwrap_or_else(|e| e.into_inner()).take()
        else {
            return Ok(());
        };
        let n = self
            .client
            .execute(
                "UPDATE nanokit_infra_lock SET holder = '', info = '', expires_at = now()
                 WHERE workspace = $1 AND holder = $2 AND epoch = $3",
                &[&self.workspace, &run_id, &epoch],
            )
            .await
            .map_err(|e| self.m(e))?;
        if n == 1 {
            Ok(())
        } else {
            Err(StateError::LockLost {
                location: self.location.clone(),
            })
        }
    }

    async fn lock_info(&self) -> Result<Option<LockView>, StateError> {
        self.live_lock().await
    }

    async fn put_revision(&self, serial: u64, bytes: &[u8]) -> Result<(), StateError> {
        let document = std::str::from_utf8(bytes).map_err(|_| StateError::Write {
            location: self.location.clone(),
            detail: "a state document must be UTF-8".into(),
        })?;
        self.client
            .execute(
                "INSERT INTO nanokit_infra_history (workspace, serial, document) VALUES ($1, $2, $3)
                 ON CONFLICT (workspace, serial) DO UPDATE SET document = EXCLUDED.document, written_at = now()",
                &[&self.workspace, &serial_of(serial), &document],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(())
    }

    async fn get_revision(&self, serial: u64) -> Result<Option<Vec<u8>>, StateError> {
        let row = self
            .client
            .query_opt(
                "SELECT document FROM nanokit_infra_history WHERE workspace = $1 AND serial = $2",
                &[&self.workspace, &serial_of(serial)],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(row.map(|r| r.get::<_, String>(0).into_bytes()))
    }

    async fn list_revisions(&self) -> Result<Vec<u64>, StateError> {
        let rows = self
            .client
            .query(
                "SELECT serial FROM nanokit_infra_history WHERE workspace = $1 ORDER BY serial",
                &[&self.workspace],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, i64>(0).max(0) as u64)
            .collect())
    }

    async fn delete_revision(&self, serial: u64) -> Result<(), StateError> {
        self.client
            .execute(
                "DELETE FROM nanokit_infra_history WHERE workspace = $1 AND serial = $2",
                &[&self.workspace, &serial_of(serial)],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(())
    }

    async fn force_unlock(&self) -> Result<Option<LockView>, StateError> {
        let row = self
            .client
            .query_opt(
                "WITH old AS (SELECT holder, info, acquired_at, expires_at, epoch
                              FROM nanokit_infra_lock WHERE workspace = $1 AND holder <> '' FOR UPDATE)
                 UPDATE nanokit_infra_lock l SET holder = '', info = '', expires_at = now()
                 FROM old WHERE l.workspace = $1
                 RETURNING old.holder, old.info, (extract(epoch from old.acquired_at)*1000)::bigint,
                           (extract(epoch from old.expires_at)*1000)::bigint, old.epoch,
                           old.expires_at > now()",
                &[&self.workspace],
            )
            .await
            .map_err(|e| self.m(e))?;
        Ok(row
            .filter(|r| r.get::<_, bool>(5))
            .map(|r| view(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))))
    }
}
