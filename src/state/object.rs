//! The state in a store of objects with conditional writes (S3 and
//! S3-compatible stores, GCS, Vault/OpenBao KV v2): one protocol over an
//! [`ObjectStore`], so the three differ only in how they read and write one
//! object.
//!
//! - The state is one object; a write is conditional on the version read
//!   (ETag `If-Match`, `ifGenerationMatch`, KV `cas`), or on the object
//!   being absent.
//! - The deploy lock is a folder of objects, one per epoch:
//!   `<key>.nklock/<epoch>` (20 digits) holds a [`LockRecord`] (the holder:
//!   host, pid, user, command, run id; the epoch, the TTL, the time of the
//!   last renewal), and `<key>.nklock/<epoch>.released` says it was
//!   released. Epoch `e + 1` is taken by creating its object only if
//!   absent, once `e` is released (or marked taken over, or cleared by `infra
//!   unlock`), so two contenders never hold one epoch and epochs only grow.
//!   The object is renewed by a conditional write on its own version; a
//!   stale one is marked taken over by a conditional write on the version
//!   that was judged stale (two takers cannot both win) before the next
//!   epoch is created. Only creations are written with no data (S3 keeps a
//!   small record in the object's metadata, which costs the store less than
//!   a data write): every later write of an object has data of its own, so
//!   a version names one write. A create or release whose answer was lost
//!   and was retried (a 412 against one's own object) is recognised by the
//!   run id.
//! - The holder that released a lock remembers its epoch (in the user's
//!   cache directory: one checksummed slot overwritten in place, so that a
//!   torn write is never used) for [`REMEMBER_RELEASE`]: its next
//!   acquisition is one create of the next epoch, falling back to listing
//!   the folder when someone else took it since. It reads the state just
//!   before that create ([`Backend::read_ahead`]); the create's success
//!   proves nobody held the lock, so nobody wrote, since the release, and
//!   the read is the run's. Otherwise the read is dropped and the state read
//!   again under the lock.
//! - The objects of epochs before the last two are deleted once taken more
//!   than [`COLLECT_AFTER`] ago (every [`COLLECT_EVERY`]th release): a
//!   remembered epoch is younger than that, so the next epoch's object, if
//!   it was ever created, is still there to refuse a second create.
//! - A lock is stale when its object has not changed for its TTL as this
//!   process's monotonic clock measures it (observed progress: no
//!   comparison with the holder's clock), or at once when its holder is a
//!   dead process on this host.
//! - A store that ignores preconditions is refused (`ENKSTATEBACKEND`): at
//!   first use two conditional writes that must fail are made to a scratch
//!   object. A store that passed is remembered per endpoint and bucket (or
//!   mount) for [`PROBE_TTL`], in a checksummed slot beside the lock
//!   versions, so later processes skip the probe; a slot that is torn,
//!   expired, dated in the future, for another store, or that another user
//!   could have written (not owned by this user, or writable by group or
//!   others) is not trusted: the store is probed again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::backend::{
    revision_name, revision_serial, Backend, Grant, Holder, LockRequest, LockView, Stored, Version,
    WriteMeta,
};
use super::StateError;
use crate::sys::host;

/// One object and its version.
#[derive(Debug, Clone)]
pub struct Object {
    pub bytes: Vec<u8>,
    pub version: Version,
}

/// The precondition of a write.
#[derive(Debug, Clone, Copy)]
pub enum Cond<'a> {
    /// Only if there is no such object.
    Absent,
    /// Only if the object's version is still this one.
    Matches(&'a Version),
    /// Whatever is there (history revisions, which nobody else writes).
    Any,
}

/// What S3, GCS and Vault KV v2 have in common: read an object with its
/// version, write it only if a precondition holds.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// The store and object, for messages: `s3://bucket/key (endpoint)`.
    fn describe(&self) -> String;

    /// What the precondition probe is cached by: endpoint and bucket (or
    /// mount).
    fn probe_key(&self) -> String;

    /// The state object's key (from the URL).
    fn key(&self) -> &str;

    /// The object `key`, `None` when there is none.
    async fn get(&self, key: &str) -> Result<Option<Object>, StateError>;

    /// Writes `bytes` to `key` if `cond` holds: the new version, or `None`
    /// when the store refused the write for its precondition.
    async fn put(
        &self,
        key: &str,
        bytes: &[u8],
        cond: Cond<'_>,
    ) -> Result<Option<Version>, StateError>;

    /// Creates `key` holding `bytes` (a small record) only if there is no
    /// such object: the new version, or `None` when there is one. The
    /// version is used for conditions only while the object is as created
    /// (a key created once, never created again while it matters).
    async fn create_small(&self, key: &str, bytes: &[u8]) -> Result<Option<Version>, StateError> {
        self.put(key, bytes, Cond::Absent).await
    }

    /// Deletes `key` (the probe's scratch object, a revision), whatever its
    /// version.
    async fn delete(&self, key: &str) -> Result<(), StateError>;

    /// The keys under `prefix` (a "folder": it ends with `/`), relative to
    /// it.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StateError>;
}

/// What an epoch's lock object (and its release marker) holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// `None`: free (released, taken over, or cleared by `infra unlock`).
    pub holder: Option<Holder>,
    pub epoch: u64,
    /// The holder's host identity and process start time, to see a dead
    /// holder on this host at once.
    #[serde(default)]
    pub host_id: String,
    #[serde(default)]
    pub pid_start: Option<u64>,
    pub ttl_ms: u64,
    /// Wall-clock times of the holder, for display only.
    pub acquired_at_ms: i64,
    pub renewed_at_ms: i64,
    /// The run that released it (recognises one's own release whose answer
    /// was lost), or who took it over or cleared it.
    #[serde(default)]
    pub released_by: Option<String>,
}

impl LockRecord {
    fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a lock record serialises")
    }

    fn view(&self) -> Option<LockView> {
        let h = self.holder.as_ref()?;
        Some(LockView {
            run_id: h.run_id.clone(),
            description: h.describe(),
            epoch: self.epoch,
            acquired_at_ms: Some(self.acquired_at_ms),
            expires_at_ms: Some(self.renewed_at_ms.saturating_add(self.ttl_ms as i64)),
            stale: self.holder_dead(),
        })
    }

    /// The holder is a process of this host that is gone.
    fn holder_dead(&self) -> bool {
        let me = host::this_host();
        match &self.holder {
            Some(h) => self.host_id == me.id && !host::process_alive(h.pid, self.pid_start),
            None => false,
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What one look at the lock's folder found (see `ObjectBackend::look`).
enum Look {
    /// This epoch is free to take.
    Free(u64),
    /// The previous epoch was stale and is marked taken over: take this one.
    TakenOver(u64),
    /// Held by this run already (its create's answer was lost).
    Ours(Grant),
    /// Held by someone else (the record, if it could be read).
    Held(Option<Box<LockRecord>>),
    /// Changed while being looked at.
    Changed,
}

/// A state read ahead of the lock (see [`Backend::read_ahead`]).
enum Ahead {
    None,
    /// Read after this user's release of epoch `released` was remembered.
    Read {
        released: u64,
        state: Option<Object>,
    },
    /// Proven current by the lock just taken: the next read's.
    Current(Option<Object>),
}

/// The lock this handle holds.
#[derive(Debug, Clone)]
struct Held {
    record: LockRecord,
    version: Version,
}

/// Stores whose preconditions were probed in this process: the result.
static PROBED: std::sync::LazyLock<Mutex<HashMap<String, Result<(), String>>>> =
    std::sync::LazyLock::new(Default::default);

/// The state (and its lock) at `key` in an [`ObjectStore`].
pub struct ObjectBackend {
    store: Box<dyn ObjectStore>,
    key: String,
    /// The lock's folder, `<key>.nklock/`.
    lock_dir: String,
    held: tokio::sync::Mutex<Option<Held>>,
    ahead: tokio::sync::Mutex<Ahead>,
}

impl ObjectBackend {
    pub fn new(store: Box<dyn ObjectStore>) -> ObjectBackend {
        let key = store.key().to_string();
        ObjectBackend {
            lock_dir: format!("{key}.nklock/"),
            key,
            store,
            held: tokio::sync::Mutex::new(None),
            ahead: tokio::sync::Mutex::new(Ahead::None),
        }
    }

    fn history_prefix(&self) -> String {
        format!("{}.history/", self.key)
    }

    fn lock_location(&self) -> String {
        format!("{} (lock {})", self.store.describe(), self.lock_dir)
    }

    fn epoch_key(&self, epoch: u64) -> String {
        format!("{}{epoch:020}", self.lock_dir)
    }

    fn released_key(&self, epoch: u64) -> String {
        format!("{}{epoch:020}.released", self.lock_dir)
    }

    /// Refuses a store that ignores preconditions: probed once per process
    /// and store, and a pass remembered on disk for [`PROBE_TTL`].
    pub async fn check_preconditions(&self) -> Result<(), StateError> {
        let cache_key = self.store.probe_key();
        let cached = PROBED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&cache_key)
            .cloned();
        let result = match cached {
            Some(r) => r,
            None => {
                let r = if self.remembered_probe(&cache_key) {
                    Ok(())
                } else {
                    let r = tracing::Instrument::instrument(
                        self.probe(),
                        tracing::info_span!("state.probe"),
                    )
                    .await?;
                    if r.is_ok() {
                        self.remember_probe(&cache_key);
                    }
                    r
                };
                PROBED
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(cache_key, r.clone());
                r
            }
        };
        result.map_err(|detail| StateError::Backend {
            location: self.store.describe(),
            detail,
        })
    }

    /// Where a passed probe of the store `probe_key` is remembered.
    fn probe_file(probe_key: &str) -> Option<std::path::PathBuf> {
        use sha2::{Digest, Sha256};
        let id = Sha256::digest(format!("probe\n{probe_key}").as_bytes());
        Some(cache_dir()?.join(format!("probe-{}", hex::encode(&id[..16]))))
    }

    /// The store `probe_key` passed the probe less than [`PROBE_TTL`] ago,
    /// by a slot this user wrote.
    fn remembered_probe(&self, probe_key: &str) -> bool {
        #[derive(Deserialize)]
        struct Passed {
            store: String,
            passed_at_ms: i64,
        }
        let Some(bytes) = Self::probe_file(probe_key).and_then(|p| read_own(&p)) else {
            return false;
        };
        let Some(p) = cache_payload(&bytes).and_then(|b| serde_json::from_slice::<Passed>(b).ok())
        else {
            return false;
        };
        let age = now_ms() - p.passed_at_ms;
        p.store == probe_key && (0..PROBE_TTL.as_millis() as i64).contains(&age)
    }

    fn remember_probe(&self, probe_key: &str) {
        let Some(path) = Self::probe_file(probe_key) else {
            return;
        };
        let payload = serde_json::json!({"store": probe_key, "passed_at_ms": now_ms()}).to_string();
        let Some(slot) = cache_slot(&payload) else {
            return;
        };
        if let Err(e) = write_in_place(&path, &slot) {
            tracing::debug!("cannot remember the probe in {}: {e}", path.display());
        }
    }

    /// Two conditional writes that must fail, to a scratch object: `Err`
    /// says how the store misbehaved.
    async fn probe(&self) -> Result<Result<(), String>, StateError> {
        let scratch = format!(
            "{}.nkprobe-{}",
            self.key,
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let s = &self.store;
        let verdict = async {
            let Some(v1) = s.put(&scratch, b"nanokit probe 1\n", Cond::Absent).await? else {
                return Ok(Err(format!(
                    "it refused to create the new object {scratch} as if it existed; check the bucket and path"
                )));
            };
            if s.put(&scratch, b"nanokit probe 2\n", Cond::Absent).await?.is_some() {
                return Ok(Err(
                    "it ignores preconditions: a write only-if-absent (If-None-Match: *, ifGenerationMatch=0, cas=0) over an existing object was accepted, so it cannot keep a deploy lock or refuse a stale write; use a store that enforces them (AWS S3, SeaweedFS, MinIO, GCS, Vault KV v2)".to_string(),
                ));
            }
            let Some(_v2) = s
                .put(&scratch, b"nanokit probe 3\n", Cond::Matches(&v1))
                .await?
            else {
                return Ok(Err(format!(
                    "it refused a write conditional on the version it had just returned ({}); it cannot be used",
                    v1.0
                )));
            };
            if s
                .put(&scratch, b"nanokit probe 4\n", Cond::Matches(&v1))
                .await?
                .is_some()
            {
                return Ok(Err(
                    "it ignores preconditions: a write conditional on an outdated version (If-Match, ifGenerationMatch, cas) was accepted, so it cannot refuse a stale write; use a store that enforces them (AWS S3, SeaweedFS, MinIO, GCS, Vault KV v2)".to_string(),
                ));
            }
            Ok::<_, StateError>(Ok(()))
        }
        .await;
        if let Err(e) = s.delete(&scratch).await {
            tracing::debug!("cannot delete the probe object {scratch}: {e}");
        }
        verdict
    }

    /// The epoch recorded in the stored state (0 when none or unreadable).
    async fn stored_epoch(&self) -> Result<u64, StateError> {
        #[derive(Deserialize)]
        struct Head {
            #[serde(default)]
            epoch: u64,
        }
        Ok(self
            .get_state()
            .await?
            .and_then(|o| serde_json::from_slice::<Head>(&o.bytes).ok())
            .map_or(0, |h| h.epoch))
    }

    fn record_for(&self, holder: &Holder, epoch: u64, ttl: Duration) -> LockRecord {
        let me = host::this_host();
        let now = now_ms();
        LockRecord {
            holder: Some(holder.clone()),
            epoch,
            host_id: me.id.clone(),
            pid_start: me.pid_start,
            ttl_ms: ttl.as_millis() as u64,
            acquired_at_ms: now,
            renewed_at_ms: now,
            released_by: None,
        }
    }

    /// Where this user's process remembers the epoch it released last (see
    /// the module header).
    fn cache_file(&self) -> Option<std::path::PathBuf> {
        use sha2::{Digest, Sha256};
        let id = Sha256::digest(
            format!("epochs\n{}\n{}", self.store.probe_key(), self.lock_dir).as_bytes(),
        );
        Some(cache_dir()?.join(hex::encode(&id[..16])))
    }

    fn remember_release(&self, epoch: u64) {
        let Some(path) = self.cache_file() else {
            return;
        };
        let payload = serde_json::json!({
            "lock": format!("{} {}", self.store.probe_key(), self.lock_dir),
            "released": epoch,
            "at_ms": now_ms(),
        })
        .to_string();
        // Too long for the slot (a path of hundreds of characters): not
        // remembered, the next acquisition lists the folder first.
        let Some(slot) = cache_slot(&payload) else {
            return;
        };
        if let Err(e) = write_in_place(&path, &slot) {
            tracing::debug!(
                "cannot remember the lock's epoch in {}: {e}",
                path.display()
            );
        }
    }

    /// The epoch this user released last, if that was less than
    /// [`REMEMBER_RELEASE`] ago.
    fn remembered_release(&self) -> Option<u64> {
        #[derive(Deserialize)]
        struct Remembered {
            lock: String,
            released: u64,
            at_ms: i64,
        }
        let bytes = read_own(&self.cache_file()?)?;
        let r: Remembered = serde_json::from_slice(cache_payload(&bytes)?).ok()?;
        let age = now_ms() - r.at_ms;
        (r.lock == format!("{} {}", self.store.probe_key(), self.lock_dir)
            && (0..REMEMBER_RELEASE.as_millis() as i64).contains(&age))
        .then_some(r.released)
    }

    /// Reads the state object: one request, a `state.get` span.
    async fn get_state(&self) -> Result<Option<Object>, StateError> {
        tracing::Instrument::instrument(self.store.get(&self.key), tracing::info_span!("state.get"))
            .await
    }

    /// Writes a lock record to `key` if `cond` holds: one request, a
    /// `state.lock.put` span in the run's trace (what a lock round trip
    /// costs in requests shows there).
    async fn put_record(
        &self,
        key: &str,
        record: &LockRecord,
        cond: Cond<'_>,
    ) -> Result<Option<Version>, StateError> {
        let bytes = record.bytes();
        tracing::Instrument::instrument(
            self.store.put(key, &bytes, cond),
            tracing::info_span!("state.lock.put"),
        )
        .await
    }

    /// Creates `key` holding `record` if there is no such object: one
    /// request, a `state.lock.put` span.
    async fn create_record(
        &self,
        key: &str,
        record: &LockRecord,
    ) -> Result<Option<Version>, StateError> {
        let bytes = record.bytes();
        tracing::Instrument::instrument(
            self.store.create_small(key, &bytes),
            tracing::info_span!("state.lock.put"),
        )
        .await
    }

    /// Reads a lock record: one request, a `state.lock.get` span.
    async fn read_record(
        &self,
        key: &str,
    ) -> Result<Option<(Option<LockRecord>, Version)>, StateError> {
        let got = tracing::Instrument::instrument(
            self.store.get(key),
            tracing::info_span!("state.lock.get"),
        );
        Ok(got.await?.map(|o| {
            (
                serde_json::from_slice::<LockRecord>(&o.bytes).ok(),
                o.version,
            )
        }))
    }

    /// The epochs in the lock's folder, each with whether its object and
    /// its release marker are there: one listing, a `state.lock.list` span.
    async fn epochs(&self) -> Result<std::collections::BTreeMap<u64, (bool, bool)>, StateError> {
        let names = tracing::Instrument::instrument(
            self.store.list(&self.lock_dir),
            tracing::info_span!("state.lock.list"),
        )
        .await?;
        let mut epochs = std::collections::BTreeMap::new();
        for name in names {
            let (digits, released) = match name.strip_suffix(".released") {
                Some(d) => (d, true),
                None => (name.as_str(), false),
            };
            if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(epoch) = digits.parse::<u64>() else {
                continue;
            };
            let e: &mut (bool, bool) = epochs.entry(epoch).or_default();
            if released {
                e.1 = true;
            } else {
                e.0 = true;
            }
        }
        Ok(epochs)
    }

    /// The highest epoch of the lock and whether it was released.
    async fn latest(&self) -> Result<Option<(u64, bool)>, StateError> {
        Ok(self
            .epochs()
            .await?
            .last_key_value()
            .map(|(e, (_, released))| (*e, *released)))
    }

    /// One look at the lock's folder by a contender: which epoch to take
    /// (a stale one marked taken over first), or who holds it. `seen` is
    /// what this contender saw held before, and since when.
    async fn look(
        &self,
        req: &LockRequest<'_>,
        seen: &mut Option<(u64, Version, Instant)>,
    ) -> Result<Look, StateError> {
        let epoch = match self.latest().await? {
            // Never locked (or the folder deleted by hand): the state's
            // epoch is the floor.
            None => return Ok(Look::Free(self.stored_epoch().await? + 1)),
            Some((epoch, true)) => return Ok(Look::Free(epoch + 1)),
            Some((epoch, false)) => epoch,
        };
        let key = self.epoch_key(epoch);
        // Gone since the listing (deleted by hand): free.
        let Some((record, version)) = self.read_record(&key).await? else {
            return Ok(Look::Free(epoch + 1));
        };
        let holder = record.as_ref().and_then(|r| r.holder.as_ref());
        // Ours already: a create of ours whose answer was lost.
        if let (Some(r), Some(_)) = (&record, holder.filter(|h| h.run_id == req.holder.run_id)) {
            *self.held.lock().await = Some(Held {
                record: r.clone(),
                version,
            });
            return Ok(Look::Ours(Grant {
                epoch,
                took_over: false,
                lost: None,
            }));
        }
        // Taken over or cleared; the next epoch not taken yet.
        if record.is_some() && holder.is_none() {
            return Ok(Look::Free(epoch + 1));
        }
        let dead = record.as_ref().is_some_and(LockRecord::holder_dead);
        // A record that cannot be read: judged by the default TTL.
        let ttl = record.as_ref().map_or(super::lock::REMOTE_LOCK_TTL, |r| {
            Duration::from_millis(r.ttl_ms)
        });
        let since = match seen {
            Some((e, v, at)) if *e == epoch && *v == version => *at,
            _ => {
                let now = Instant::now();
                *seen = Some((epoch, version.clone(), now));
                now
            }
        };
        if !dead && since.elapsed() < ttl {
            return Ok(Look::Held(record.map(Box::new)));
        }
        // Released after the listing (a holder releases, then exits): free,
        // not stale.
        if self.read_record(&self.released_key(epoch)).await?.is_some() {
            return Ok(Look::Free(epoch + 1));
        }
        // Marked taken over on the version judged stale: its holder's
        // renewal fails from now on, and one taker wins.
        let mut marker = record.unwrap_or_else(|| self.record_for(req.holder, epoch, req.ttl));
        marker.holder = None;
        marker.released_by = Some(format!("taken over by {}", req.holder.run_id));
        marker.renewed_at_ms = now_ms();
        Ok(
            match self
                .put_record(&key, &marker, Cond::Matches(&version))
                .await?
            {
                Some(_) => Look::TakenOver(epoch + 1),
                None => Look::Changed,
            },
        )
    }

    /// Takes `epoch` by creating its object: the grant, or `None` when
    /// someone created it first.
    async fn take(
        &self,
        req: &LockRequest<'_>,
        epoch: u64,
        took_over: bool,
    ) -> Result<Option<Grant>, StateError> {
        let record = self.record_for(req.holder, epoch, req.ttl);
        let Some(version) = self.create_record(&self.epoch_key(epoch), &record).await? else {
            return Ok(None);
        };
        *self.held.lock().await = Some(Held { record, version });
        Ok(Some(Grant {
            epoch,
            took_over,
            lost: None,
        }))
    }

    /// Deletes the objects of epochs before `current - 1` taken more than
    /// [`COLLECT_AFTER`] ago (at most [`COLLECT_EVERY`] × 2 of them, oldest
    /// first), best effort.
    async fn collect(&self, current: u64) {
        let r = async {
            let epochs = self.epochs().await?;
            let cutoff = now_ms() - COLLECT_AFTER.as_millis() as i64;
            for (&epoch, &(object, marker)) in epochs
                .range(..current.saturating_sub(1))
                .take(2 * COLLECT_EVERY as usize)
            {
                // When it was taken (released, for a marker left alone).
                let key = if object {
                    self.epoch_key(epoch)
                } else {
                    self.released_key(epoch)
                };
                let at = match self.read_record(&key).await? {
                    Some((Some(r), _)) => r.acquired_at_ms,
                    Some((None, _)) | None => i64::MIN,
                };
                if at > cutoff {
                    break;
                }
                if marker {
                    self.store.delete(&self.released_key(epoch)).await?;
                }
                if object {
                    self.store.delete(&self.epoch_key(epoch)).await?;
                }
            }
            Ok::<_, StateError>(())
        };
        if let Err(e) =
            tracing::Instrument::instrument(r, tracing::info_span!("state.lock.collect")).await
        {
            tracing::debug!("cannot delete the lock's old epochs: {e}");
        }
    }
}

/// How long the epoch a user released is used for a one-write acquisition.
pub const REMEMBER_RELEASE: Duration = Duration::from_secs(3600);

/// How old an epoch's objects must be (besides not being one of the last
/// two) before they are deleted: far longer than [`REMEMBER_RELEASE`], and
/// than any clock skew between hosts.
pub const COLLECT_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The old epochs are collected at every release of an epoch that is a
/// multiple of this.
pub const COLLECT_EVERY: u64 = 16;

/// How long a store that passed the precondition probe is trusted without
/// probing it again.
pub const PROBE_TTL: Duration = Duration::from_secs(24 * 3600);

/// This user's folder of remembered lock versions and probes:
/// `$XDG_CACHE_HOME/nanokit/state-locks` or `~/.cache/nanokit/state-locks`.
fn cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("nanokit").join("state-locks"))
}

/// `meta` is of a regular file that only this user could have
/// written: owned by this user, not writable by group or others.
fn trusted(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    meta.is_file() && meta.uid() == rustix::process::geteuid().as_raw() && meta.mode() & 0o022 == 0
}

/// The bytes of the slot at `path`, if this user could be its only writer
/// (see [`trusted`]; a symbolic link is not followed).
fn read_own(path: &std::path::Path) -> Option<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    if !trusted(&f.metadata().ok()?) {
        tracing::debug!(
            "{} is not trusted (another user could have written it): ignored",
            path.display()
        );
        return None;
    }
    let mut bytes = Vec::with_capacity(CACHE_SLOT);
    f.take(4 * CACHE_SLOT as u64).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The size of the remembered-lock file: one slot, overwritten in place.
const CACHE_SLOT: usize = 1024;

/// `payload` as the remembered-lock file holds it: its SHA-256, a space,
/// the payload, padded with spaces to [`CACHE_SLOT`] bytes (`None` when it
/// does not fit).
fn cache_slot(payload: &str) -> Option<Vec<u8>> {
    use sha2::{Digest, Sha256};
    let mut slot = hex::encode(Sha256::digest(payload.as_bytes())).into_bytes();
    slot.push(b' ');
    slot.extend_from_slice(payload.as_bytes());
    if slot.len() > CACHE_SLOT {
        return None;
    }
    slot.resize(CACHE_SLOT, b' ');
    Some(slot)
}

/// The payload of a remembered-lock file, if it is whole (a write torn by a
/// concurrent one, or by a crash, fails its checksum). A file without a
/// checksum (written by an older nanokit, replaced whole) is taken as is.
fn cache_payload(bytes: &[u8]) -> Option<&[u8]> {
    use sha2::{Digest, Sha256};
    let text = bytes.trim_ascii_end();
    if text.first() == Some(&b'{') {
        return Some(text);
    }
    let (sum, payload) = text.split_at(text.iter().position(|b| *b == b' ')?);
    let payload = &payload[1..];
    (hex::encode(Sha256::digest(payload)).as_bytes() == sum).then_some(payload)
}

/// Overwrites the file at `path` with `slot` in place, creating it if
/// needed: no truncation and no rename, which on ext4 (auto_da_alloc) start
/// a writeback of the data and cost a few hundred µs.
fn write_in_place(path: &std::path::Path, slot: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
    };
    let mut f = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
            }
            open()?
        }
        r => r?,
    };
    // A file that is not this user's alone (planted, or left writable by
    // a wide umask) would be ignored at every read: replaced.
    if !trusted(&f.metadata()?) {
        drop(f);
        std::fs::remove_file(path)?;
        f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
    }
    f.write_all(slot)?;
    // A longer file (never written by this format) would keep a tail that
    // fails the checksum at every read.
    if f.metadata()?.len() > slot.len() as u64 {
        f.set_len(slot.len() as u64)?;
    }
    Ok(())
}

#[async_trait]
impl Backend for ObjectBackend {
    fn location(&self) -> String {
        self.store.describe()
    }

    async fn read(&self) -> Result<Option<Stored>, StateError> {
        let ahead = {
            let mut ahead = self.ahead.lock().await;
            match std::mem::replace(&mut *ahead, Ahead::None) {
                Ahead::Current(state) => Some(state),
                other => {
                    *ahead = other;
                    None
                }
            }
        };
        let state = match ahead {
            Some(state) => state,
            None => self.get_state().await?,
        };
        Ok(state.map(|o| Stored {
            bytes: o.bytes,
            version: o.version,
        }))
    }

    async fn write(
        &self,
        bytes: &[u8],
        expected: Option<&Version>,
        _meta: &WriteMeta<'_>,
    ) -> Result<Version, StateError> {
        self.check_preconditions().await?;
        // A state read ahead is no longer current once this handle writes.
        *self.ahead.lock().await = Ahead::None;
        let cond = match expected {
            Some(v) => Cond::Matches(v),
            None => Cond::Absent,
        };
        match self.store.put(&self.key, bytes, cond).await? {
            Some(v) => Ok(v),
            None => Err(StateError::Conflict {
                location: self.store.describe(),
                detail: match expected {
                    Some(_) => "its version is no longer the one this run read".into(),
                    None => "a state was written since this run found none".into(),
                },
            }),
        }
    }

    fn last_release(&self) -> Option<u64> {
        self.remembered_release()
    }

    /// The state, read after this user's release of epoch `released`: if
    /// [`Backend::lock`] then creates the next epoch, nobody held the lock
    /// (so nobody wrote) between that release and the lock, and this read
    /// is current. The lock's requests then find the connection open, as
    /// Terraform's do after its listing of workspaces.
    async fn read_ahead(&self, released: u64) {
        match self.get_state().await {
            Ok(state) => *self.ahead.lock().await = Ahead::Read { released, state },
            Err(e) => tracing::debug!("cannot read the state ahead of the lock: {e}"),
        }
    }

    async fn lock(&self, req: &LockRequest<'_>) -> Result<Grant, StateError> {
        self.check_preconditions().await?;
        let deadline = Instant::now() + req.wait;
        // The epoch this user released last (the one a read ahead followed),
        // if nobody took the next one since: one write.
        let (remembered, ahead) =
            match std::mem::replace(&mut *self.ahead.lock().await, Ahead::None) {
                Ahead::Read { released, state } => (Some(released), Some(state)),
                _ => (self.remembered_release(), None),
            };
        if let Some(last) = remembered {
            if let Some(grant) = self.take(req, last + 1, false).await? {
                if let Some(state) = ahead {
                    *self.ahead.lock().await = Ahead::Current(state);
                }
                return Ok(grant);
            }
        }
        // What this waiter saw of someone else's lock, and since when.
        let mut seen: Option<(u64, Version, Instant)> = None;
        let mut attempt = 0;
        loop {
            if req.cancel.is_cancelled() {
                return Err(StateError::Interrupted);
            }
            let (next, took_over) = match self.look(req, &mut seen).await? {
                Look::Free(epoch) => (epoch, false),
                Look::TakenOver(epoch) => (epoch, true),
                Look::Ours(grant) => return Ok(grant),
                // Someone else changed it first: look again at once.
                Look::Changed => continue,
                Look::Held(record) => {
                    let now = Instant::now();
                    if now >= deadline {
                        let holder = match record.as_deref().and_then(LockRecord::view) {
                            Some(v) => v.to_string(),
                            None => "an unknown holder (the lock object cannot be read)".into(),
                        };
                        return Err(StateError::Locked {
                            location: self.lock_location(),
                            holder,
                        });
                    }
                    let pause =
                        crate::kv::backoff(attempt, Duration::from_millis(250)).min(deadline - now);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = req.cancel.cancelled() => return Err(StateError::Interrupted),
                    }
                    attempt += 1;
                    continue;
                }
            };
            if let Some(grant) = self.take(req, next, took_over).await? {
                return Ok(grant);
            }
            // Someone else took that epoch first (or our own create landed
            // with its answer lost): look again at once.
        }
    }

    async fn renew(&self, ttl: Duration) -> Result<bool, StateError> {
        let mut held = self.held.lock().await;
        let Some(h) = held.as_mut() else {
            return Ok(false);
        };
        let key = self.epoch_key(h.record.epoch);
        let mut record = h.record.clone();
        record.renewed_at_ms = now_ms();
        record.ttl_ms = ttl.as_millis() as u64;
        if let Some(v) = self
            .put_record(&key, &record, Cond::Matches(&h.version))
            .await?
        {
            *h = Held { record, version: v };
            return Ok(true);
        }
        // Refused: still ours (a retried renewal that had landed), or lost.
        match self.read_record(&key).await? {
            Some((Some(r), v)) if r.holder == h.record.holder => {
                *h = Held {
                    record: r,
                    version: v,
                };
                Ok(true)
            }
            _ => {
                *held = None;
                Ok(false)
            }
        }
    }

    async fn unlock(&self) -> Result<(), StateError> {
        let Some(h) = self.held.lock().await.take() else {
            return Ok(());
        };
        let run_id = h
            .record
            .holder
            .as_ref()
            .map(|x| x.run_id.clone())
            .unwrap_or_default();
        let epoch = h.record.epoch;
        let mut free = h.record;
        free.holder = None;
        free.released_by = Some(run_id.clone());
        free.renewed_at_ms = now_ms();
        let key = self.released_key(epoch);
        if self.create_record(&key, &free).await?.is_none() {
            match self.read_record(&key).await? {
                // Our release landed; its answer was lost.
                Some((Some(r), _)) if r.released_by.as_deref() == Some(run_id.as_str()) => {}
                // Released by `infra unlock`.
                _ => {
                    return Err(StateError::LockLost {
                        location: self.lock_location(),
                    })
                }
            }
        }
        self.remember_release(epoch);
        if epoch % COLLECT_EVERY == 0 {
            self.collect(epoch).await;
        }
        Ok(())
    }

    async fn lock_info(&self) -> Result<Option<LockView>, StateError> {
        let Some((epoch, false)) = self.latest().await? else {
            return Ok(None);
        };
        Ok(match self.read_record(&self.epoch_key(epoch)).await? {
            Some((Some(r), _)) => r.view(),
            Some((None, _)) => Some(LockView {
                run_id: String::new(),
                description: format!(
                    "an unknown holder (the lock object {} cannot be read)",
                    self.epoch_key(epoch)
                ),
                epoch,
                acquired_at_ms: None,
                expires_at_ms: None,
                stale: false,
            }),
            None => None,
        })
    }

    async fn put_revision(&self, serial: u64, bytes: &[u8]) -> Result<(), StateError> {
        let key = format!("{}{}", self.history_prefix(), revision_name(serial));
        self.store.put(&key, bytes, Cond::Any).await.map(|_| ())
    }

    async fn get_revision(&self, serial: u64) -> Result<Option<Vec<u8>>, StateError> {
        let key = format!("{}{}", self.history_prefix(), revision_name(serial));
        Ok(self.store.get(&key).await?.map(|o| o.bytes))
    }

    async fn list_revisions(&self) -> Result<Vec<u64>, StateError> {
        let mut serials: Vec<u64> = self
            .store
            .list(&self.history_prefix())
            .await?
            .iter()
            .filter_map(|n| revision_serial(n))
            .collect();
        serials.sort_unstable();
        Ok(serials)
    }

    async fn delete_revision(&self, serial: u64) -> Result<(), StateError> {
        let key = format!("{}{}", self.history_prefix(), revision_name(serial));
        self.store.delete(&key).await
    }

    async fn force_unlock(&self) -> Result<Option<LockView>, StateError> {
        self.check_preconditions().await?;
        for _ in 0..10 {
            let Some((epoch, false)) = self.latest().await? else {
                return Ok(None);
            };
            let key = self.epoch_key(epoch);
            let read = self.read_record(&key).await?;
            let view = match &read {
                Some((Some(r), _)) => r.view(),
                _ => None,
            };
            let cleared = LockRecord {
                holder: None,
                epoch,
                host_id: String::new(),
                pid_start: None,
                ttl_ms: 0,
                acquired_at_ms: match &read {
                    Some((Some(r), _)) => r.acquired_at_ms,
                    _ => now_ms(),
                },
                renewed_at_ms: now_ms(),
                released_by: Some("nanokit infra unlock".into()),
            };
            // Held (or unreadable): marked cleared on the version read, so
            // that its holder's renewal fails.
            if let Some((record, version)) = &read {
                if record.as_ref().is_none_or(|r| r.holder.is_some())
                    && self
                        .put_record(&key, &cleared, Cond::Matches(version))
                        .await?
                        .is_none()
                {
                    continue;
                }
            }
            // Released, so that the holder's release fails (ENKLOCKLOST);
            // already released by it meanwhile: as well.
            self.create_record(&self.released_key(epoch), &cleared)
                .await?;
            return Ok(view);
        }
        Err(StateError::Unavailable {
            location: self.lock_location(),
            detail: "the lock kept changing while it was being cleared; try again".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the in-memory store runs after a listing.
    type Hook = Box<dyn FnOnce(&Mem) + Send>;

    /// A store in memory that keeps its preconditions, counting requests.
    struct Mem {
        id: String,
        key: String,
        objects: Mutex<std::collections::BTreeMap<String, (Vec<u8>, u64)>>,
        writes: std::sync::atomic::AtomicU64,
        requests: std::sync::atomic::AtomicUsize,
        /// Runs once, just after the next listing (what another process
        /// does between a listing and the reads after it).
        after_list: Mutex<Option<Hook>>,
    }

    impl Mem {
        fn backend(test: &str) -> (ObjectBackend, std::sync::Arc<Mem>) {
            let mem = std::sync::Arc::new(Mem {
                id: format!("{test}-{}", uuid::Uuid::new_v4().simple()),
                key: "p/state.json".into(),
                objects: Mutex::default(),
                writes: Default::default(),
                requests: Default::default(),
                after_list: Mutex::default(),
            });
            (ObjectBackend::new(Box::new(mem.clone())), mem)
        }

        fn requests(&self) -> usize {
            self.requests.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn keys(&self) -> Vec<String> {
            self.objects.lock().unwrap().keys().cloned().collect()
        }

        /// Writes a record as epoch `epoch` taken (and released) `age` ago.
        fn plant(&self, lock_dir: &str, epoch: u64, age: Duration) {
            let at = now_ms() - age.as_millis() as i64;
            let record = LockRecord {
                holder: None,
                epoch,
                host_id: String::new(),
                pid_start: None,
                ttl_ms: 1000,
                acquired_at_ms: at,
                renewed_at_ms: at,
                released_by: Some("r".into()),
            };
            let mut objects = self.objects.lock().unwrap();
            for key in [
                format!("{lock_dir}{epoch:020}"),
                format!("{lock_dir}{epoch:020}.released"),
            ] {
                objects.insert(key, (record.bytes(), 1));
            }
        }
    }

    #[async_trait]
    impl ObjectStore for std::sync::Arc<Mem> {
        fn describe(&self) -> String {
            format!("mem://{}", self.id)
        }
        fn probe_key(&self) -> String {
            format!("mem {}", self.id)
        }
        fn key(&self) -> &str {
            &self.key
        }
        async fn get(&self, key: &str) -> Result<Option<Object>, StateError> {
            self.requests
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(self.objects.lock().unwrap().get(key).map(|(b, v)| Object {
                bytes: b.clone(),
                version: Version(v.to_string()),
            }))
        }
        async fn put(
            &self,
            key: &str,
            bytes: &[u8],
            cond: Cond<'_>,
        ) -> Result<Option<Version>, StateError> {
            self.requests
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut objects = self.objects.lock().unwrap();
            let now = objects.get(key).map(|(_, v)| v.to_string());
            let ok = match cond {
                Cond::Absent => now.is_none(),
                Cond::Matches(v) => now.as_deref() == Some(v.0.as_str()),
                Cond::Any => true,
            };
            if !ok {
                return Ok(None);
            }
            let v = self
                .writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                + 2;
            objects.insert(key.to_string(), (bytes.to_vec(), v));
            Ok(Some(Version(v.to_string())))
        }
        async fn delete(&self, key: &str) -> Result<(), StateError> {
            self.requests
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.objects.lock().unwrap().remove(key);
            Ok(())
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, StateError> {
            self.requests
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let names = self
                .objects
                .lock()
                .unwrap()
                .keys()
                .filter_map(|k| k.strip_prefix(prefix).map(str::to_string))
                .collect();
            let hook = self.after_list.lock().unwrap().take();
            if let Some(hook) = hook {
                hook(self);
            }
            Ok(names)
        }
    }

    fn request<'a>(
        holder: &'a Holder,
        cancel: &'a tokio_util::sync::CancellationToken,
    ) -> LockRequest<'a> {
        LockRequest {
            holder,
            ttl: Duration::from_secs(60),
            wait: Duration::ZERO,
            cancel,
        }
    }

    /// Once a user released epoch `e`, its next acquisition is one create
    /// of `e + 1`; when someone else took `e + 1` since, that create fails
    /// and the lock is seen held, never taken twice.
    #[tokio::test]
    async fn a_remembered_release_takes_the_next_epoch_in_one_write() {
        let cancel = tokio_util::sync::CancellationToken::new();
        let (a, mem) = Mem::backend("remembered");
        let ha = Holder::this_run("a");
        let first = a.lock(&request(&ha, &cancel)).await.unwrap();
        a.unlock().await.unwrap();
        let before = mem.requests();
        let second = a.lock(&request(&ha, &cancel)).await.unwrap();
        assert_eq!(mem.requests() - before, 1, "one create");
        assert_eq!(second.epoch, first.epoch + 1);
        a.unlock().await.unwrap();
        // Someone else (another user: nothing remembered) takes the next.
        let b = ObjectBackend::new(Box::new(mem.clone()));
        let hb = Holder::this_run("b");
        let taken = b.lock(&request(&hb, &cancel)).await.unwrap();
        assert!(!taken.took_over);
        let err = a.lock(&request(&ha, &cancel)).await.unwrap_err();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        assert_eq!(taken.epoch, second.epoch + 1);
    }

    /// A holder releases (its marker) and exits just after a waiter listed
    /// the folder: the waiter then reads the epoch's record, whose holder is
    /// a dead process of this host, yet the epoch was released, not
    /// abandoned: taken as free, without a takeover (whose state write
    /// would be one write too many).
    #[tokio::test]
    async fn a_release_seen_late_is_not_taken_for_a_dead_holder() {
        let cancel = tokio_util::sync::CancellationToken::new();
        let (w, mem) = Mem::backend("late-release");
        let dir = w.lock_dir.clone();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let me = host::this_host();
        let mut holder = Holder::this_run("x");
        holder.pid = gone;
        let record = LockRecord {
            holder: Some(holder),
            epoch: 7,
            host_id: me.id.clone(),
            pid_start: Some(1),
            ttl_ms: 60_000,
            acquired_at_ms: now_ms(),
            renewed_at_ms: now_ms(),
            released_by: None,
        };
        assert!(record.holder_dead());
        let key = format!("{dir}{:020}", 7);
        mem.objects
            .lock()
            .unwrap()
            .insert(key.clone(), (record.bytes(), 1));
        let mut released = record.clone();
        released.holder = None;
        released.released_by = Some("x".into());
        let marker = (format!("{key}.released"), released.bytes());
        *mem.after_list.lock().unwrap() = Some(Box::new(move |m: &Mem| {
            m.objects.lock().unwrap().insert(marker.0, (marker.1, 1));
        }));
        let hw = Holder::this_run("w");
        let g = w.lock(&request(&hw, &cancel)).await.unwrap();
        assert!(!g.took_over, "a released epoch taken over");
        assert_eq!(g.epoch, 8);
        assert_eq!(
            mem.objects.lock().unwrap()[&key].0,
            record.bytes(),
            "marked taken over"
        );
    }

    /// A state read ahead of the lock is what the next read returns only
    /// when the lock was the next epoch after this user's release (nobody
    /// held it, so nobody wrote, in between); when someone else took the
    /// lock and wrote meanwhile, the read after the lock sees that write.
    #[tokio::test]
    async fn a_state_read_ahead_is_used_only_when_nobody_held_the_lock_since() {
        let cancel = tokio_util::sync::CancellationToken::new();
        let (a, mem) = Mem::backend("ahead");
        let ha = Holder::this_run("a");
        let meta = WriteMeta {
            serial: 1,
            lineage: "l",
            epoch: 0,
            writer: "w",
        };
        a.lock(&request(&ha, &cancel)).await.unwrap();
        a.write(b"state 1", None, &meta).await.unwrap();
        a.unlock().await.unwrap();

        a.read_ahead(a.last_release().unwrap()).await;
        let before = mem.requests();
        a.lock(&request(&ha, &cancel)).await.unwrap();
        let got = a.read().await.unwrap().expect("a state");
        assert_eq!(got.bytes, b"state 1");
        assert_eq!(
            mem.requests() - before,
            1,
            "the create alone: no second read"
        );
        a.unlock().await.unwrap();

        // Read ahead; then b takes the lock, writes and releases first.
        a.read_ahead(a.last_release().unwrap()).await;
        let b = ObjectBackend::new(Box::new(mem.clone()));
        let hb = Holder::this_run("b");
        b.lock(&request(&hb, &cancel)).await.unwrap();
        let v = b.read().await.unwrap().expect("a state").version;
        b.write(b"state 2", Some(&v), &meta).await.unwrap();
        b.unlock().await.unwrap();
        a.lock(&request(&ha, &cancel)).await.unwrap();
        let got = a.read().await.unwrap().expect("a state");
        assert_eq!(got.bytes, b"state 2", "the read ahead was stale");
        a.unlock().await.unwrap();
    }

    /// Collecting deletes the objects of epochs taken more than a day ago,
    /// oldest first and a bounded number at a time, never the last two
    /// epochs nor a younger one (a remembered epoch's successor must still
    /// be there to refuse a second create).
    #[tokio::test]
    async fn old_epochs_are_collected_but_not_the_last_two_nor_young_ones() {
        let day = Duration::from_secs(24 * 3600);
        let (b, mem) = Mem::backend("collect");
        let dir = b.lock_dir.clone();
        let epochs = |mem: &Mem| -> Vec<u64> {
            let mut e: Vec<u64> = mem
                .keys()
                .iter()
                .filter_map(|k| k.strip_prefix(&dir)?.get(..20)?.parse().ok())
                .collect();
            e.dedup();
            e
        };
        for e in 1..=20 {
            mem.plant(&dir, e, 2 * day);
        }
        for e in 21..=24 {
            mem.plant(&dir, e, Duration::from_secs(60));
        }
        b.collect(24).await;
        assert_eq!(
            epochs(&mem),
            (21..=24).collect::<Vec<_>>(),
            "young ones kept"
        );
        assert_eq!(mem.keys().len(), 8, "with their release markers");

        let (b, mem) = Mem::backend("collect-all-old");
        for e in 1..=40 {
            mem.plant(&dir, e, 2 * day);
        }
        b.collect(40).await;
        assert_eq!(epochs(&mem), (33..=40).collect::<Vec<_>>(), "32 at a time");
        b.collect(40).await;
        assert_eq!(epochs(&mem), vec![39, 40], "the last two kept");
    }

    fn payload(version: &str, epoch: u64) -> String {
        format!(r#"{{"version":"{version}","record":{{"holder":null,"epoch":{epoch}}}}}"#)
    }

    #[test]
    fn a_remembered_lock_reads_back_whole() {
        let p = payload("\"etag-1\"", 7);
        let slot = cache_slot(&p).unwrap();
        assert_eq!(slot.len(), CACHE_SLOT);
        assert_eq!(cache_payload(&slot), Some(p.as_bytes()));
    }

    /// Two writes of the slot torn into each other (a concurrent write, a
    /// crash): the version of one with the epoch of the other would let the
    /// next acquisition reuse an epoch; the checksum refuses the mix.
    #[test]
    fn a_torn_remembered_lock_is_not_used() {
        let a = cache_slot(&payload("\"aaaaaaaaaaaaaaaaaaaaaaaa\"", 9)).unwrap();
        let b = cache_slot(&payload("\"bbbbbbbbbbbbbbbbbbbbbbbb\"", 3)).unwrap();
        for cut in [1, 40, 64, 65, 80, 110, 500] {
            let mut torn = b[..cut].to_vec();
            torn.extend_from_slice(&a[cut..]);
            if torn == a || torn == b {
                continue; // the same bytes on one side of the cut
            }
            assert_eq!(cache_payload(&torn), None, "cut at {cut}");
        }
        assert_eq!(cache_payload(b"not a slot at all"), None);
        assert_eq!(cache_payload(b""), None);
    }

    #[test]
    fn a_remembered_lock_of_an_older_nanokit_is_read() {
        let p = payload("\"etag\"", 2);
        assert_eq!(cache_payload(p.as_bytes()), Some(p.as_bytes()));
    }

    #[test]
    fn a_payload_too_large_for_the_slot_is_not_slotted() {
        assert!(cache_slot(&"x".repeat(CACHE_SLOT)).is_none());
    }

    /// A slot is read only if this user alone could have written it: not
    /// through a symbolic link, not writable by group or others, not
    /// another user's; writing replaces such a file with one of mode 0600.
    #[test]
    fn only_a_slot_of_this_user_alone_is_read() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot");
        let slot = cache_slot(&payload("\"v\"", 1)).unwrap();
        write_in_place(&path, &slot).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(read_own(&path).as_deref(), Some(&slot[..]));
        for wide in [0o666, 0o620, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wide)).unwrap();
            assert_eq!(read_own(&path), None, "mode {wide:o}");
            write_in_place(&path, &slot).unwrap();
            assert_eq!(mode(&path), 0o600);
            assert!(read_own(&path).is_some());
        }
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(read_own(&link), None, "read through a symbolic link");
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            assert_eq!(read_own(&path), None, "another user's slot");
            write_in_place(&path, &slot).unwrap();
            assert!(read_own(&path).is_some());
        }
    }

    /// Written in place over a file of another length (an older nanokit's,
    /// longer or shorter), the slot is what the file holds.
    #[test]
    fn written_in_place_over_any_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("lock");
        let p = payload("\"v1\"", 1);
        write_in_place(&path, &cache_slot(&p).unwrap()).unwrap();
        assert_eq!(
            cache_payload(&std::fs::read(&path).unwrap()),
            Some(p.as_bytes())
        );
        for old in ["{}".to_string(), "y".repeat(3 * CACHE_SLOT)] {
            std::fs::write(&path, old).unwrap();
            let p = payload("\"v2\"", 2);
            write_in_place(&path, &cache_slot(&p).unwrap()).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes.len(), CACHE_SLOT);
            assert_eq!(cache_payload(&bytes), Some(p.as_bytes()));
        }
    }
}
