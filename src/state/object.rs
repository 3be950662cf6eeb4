//! The state in a store of objects with conditional writes (S3 and
//! S3-compatible stores, GCS, Vault/OpenBao KV v2): one protocol over an
//! [`ObjectStore`], so the three differ only in how they read and write one
//! object.
//!
//! - The state is one object; a write is conditional on the version read
//!   (ETag `If-Match`, `ifGenerationMatch`, KV `cas`), or on the object
//!   being absent.
//! - The deploy lock is the object `<key>.nklock`, holding a
//!   [`LockRecord`]: the holder (host, pid, user, command, run id), the
//!   epoch, the TTL and the time of the last renewal. It is created only if
//!   absent; renewed by a conditional write on its own version; taken over
//!   by a conditional write on the version that was judged stale, so two
//!   takers cannot both win; released by the holder only, by a conditional
//!   write of a free record that keeps the epoch (the object is never
//!   deleted, so epochs keep growing). A write whose answer was lost and was
//!   retried (a 412 against one's own lock or state) is recognised by the
//!   run id, or by the bytes, not left behind.
//! - The holder that released a lock remembers the free record's version
//!   (in the user's cache directory: one checksummed slot overwritten in
//!   place, so that a torn write is never taken for a record's version):
//!   its next acquisition is one conditional write on that version, falling
//!   back to reading the lock when someone else wrote it since. (No ABA:
//!   every record has a new epoch or release time.)
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

    /// Deletes `key` (the probe's scratch object, a revision), whatever its
    /// version.
    async fn delete(&self, key: &str) -> Result<(), StateError>;

    /// The keys under `prefix` (a "folder": it ends with `/`), relative to
    /// it.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StateError>;
}

/// What the deploy-lock object holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// `None`: free (released, or cleared by `infra unlock`).
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
    /// The run that released it last (recognises one's own release whose
    /// answer was lost).
    #[serde(default)]
    pub released_by: Option<String>,
}

impl LockRecord {
    fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a lock record serialises")
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
    lock_key: String,
    held: tokio::sync::Mutex<Option<Held>>,
}

impl ObjectBackend {
    pub fn new(store: Box<dyn ObjectStore>) -> ObjectBackend {
        let key = store.key().to_string();
        ObjectBackend {
            lock_key: format!("{key}.nklock"),
            key,
            store,
            held: tokio::sync::Mutex::new(None),
        }
    }

    fn history_prefix(&self) -> String {
        format!("{}.history/", self.key)
    }

    fn lock_location(&self) -> String {
        format!("{} (lock {})", self.store.describe(), self.lock_key)
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

    /// Where this user's process remembers the version of the free lock
    /// record it wrote last (see the module header).
    fn cache_file(&self) -> Option<std::path::PathBuf> {
        use sha2::{Digest, Sha256};
        let id =
            Sha256::digest(format!("{}\n{}", self.store.probe_key(), self.lock_key).as_bytes());
        Some(cache_dir()?.join(hex::encode(&id[..16])))
    }

    fn remember_free(&self, version: &Version, record: &LockRecord) {
        let Some(path) = self.cache_file() else {
            return;
        };
        let payload = serde_json::json!({"version": version.0, "record": record}).to_string();
        // Too long for the slot (a host name of hundreds of characters):
        // not remembered, the next acquisition reads the lock first.
        let Some(slot) = cache_slot(&payload) else {
            return;
        };
        if let Err(e) = write_in_place(&path, &slot) {
            tracing::debug!(
                "cannot remember the lock's version in {}: {e}",
                path.display()
            );
        }
    }

    fn remembered_free(&self) -> Option<(Version, LockRecord)> {
        #[derive(Deserialize)]
        struct Remembered {
            version: String,
            record: LockRecord,
        }
        let bytes = read_own(&self.cache_file()?)?;
        let r: Remembered = serde_json::from_slice(cache_payload(&bytes)?).ok()?;
        r.record
            .holder
            .is_none()
            .then_some((Version(r.version), r.record))
    }

    /// Reads the state object: one request, a `state.get` span.
    async fn get_state(&self) -> Result<Option<Object>, StateError> {
        tracing::Instrument::instrument(self.store.get(&self.key), tracing::info_span!("state.get"))
            .await
    }

    /// Writes the lock object if `cond` holds: one request, a
    /// `state.lock.put` span in the run's trace (what a lock round trip
    /// costs in requests shows there).
    async fn put_lock(
        &self,
        record: &LockRecord,
        cond: Cond<'_>,
    ) -> Result<Option<Version>, StateError> {
        let bytes = record.bytes();
        tracing::Instrument::instrument(
            self.store.put(&self.lock_key, &bytes, cond),
            tracing::info_span!("state.lock.put"),
        )
        .await
    }

    /// Reads the lock object: one request, a `state.lock.get` span.
    async fn read_lock(&self) -> Result<Option<(Option<LockRecord>, Version)>, StateError> {
        let got = tracing::Instrument::instrument(
            self.store.get(&self.lock_key),
            tracing::info_span!("state.lock.get"),
        );
        Ok(got.await?.map(|o| {
            (
                serde_json::from_slice::<LockRecord>(&o.bytes).ok(),
                o.version,
            )
        }))
    }
}

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
        Ok(self.get_state().await?.map(|o| Stored {
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

    async fn lock(&self, req: &LockRequest<'_>) -> Result<Grant, StateError> {
        self.check_preconditions().await?;
        let deadline = Instant::now() + req.wait;
        let mine = &req.holder.run_id;
        // The free record this user released last, if nobody wrote since:
        // one write.
        if let Some((version, free)) = self.remembered_free() {
            let new = self.record_for(req.holder, free.epoch + 1, req.ttl);
            if let Some(v) = self.put_lock(&new, Cond::Matches(&version)).await? {
                let epoch = new.epoch;
                *self.held.lock().await = Some(Held {
                    record: new,
                    version: v,
                });
                return Ok(Grant {
                    epoch,
                    took_over: false,
                    lost: None,
                });
            }
        }
        // What this waiter saw of someone else's lock, and since when.
        let mut seen: Option<(Version, Instant)> = None;
        let mut attempt = 0;
        loop {
            if req.cancel.is_cancelled() {
                return Err(StateError::Interrupted);
            }
            let lock = self.read_lock().await?;
            // A lock object keeps the highest epoch; without one (never
            // locked, or deleted by hand) the state's is the floor.
            let floor = match &lock {
                None => self.stored_epoch().await?,
                Some(_) => 0,
            };
            let (cond_version, record) = match &lock {
                None => (None, None),
                Some((rec, v)) => (Some(v.clone()), rec.clone()),
            };
            // Ours already: a write of ours whose answer was lost.
            if let (Some(r), Some(v)) = (&record, &cond_version) {
                if r.holder.as_ref().is_some_and(|h| &h.run_id == mine) {
                    *self.held.lock().await = Some(Held {
                        record: r.clone(),
                        version: v.clone(),
                    });
                    return Ok(Grant {
                        epoch: r.epoch,
                        took_over: false,
                        lost: None,
                    });
                }
            }
            let free = lock.is_none() || record.as_ref().is_some_and(|r| r.holder.is_none());
            let stale = !free && {
                let v = cond_version.clone().expect("held: the object exists");
                let dead = record.as_ref().is_some_and(LockRecord::holder_dead);
                // A record that cannot be read: judged by the default TTL.
                let ttl = record.as_ref().map_or(super::lock::REMOTE_LOCK_TTL, |r| {
                    Duration::from_millis(r.ttl_ms)
                });
                let since = match &seen {
                    Some((sv, at)) if *sv == v => *at,
                    _ => {
                        let now = Instant::now();
                        seen = Some((v, now));
                        now
                    }
                };
                dead || since.elapsed() >= ttl
            };
            if free || stale {
                let prev_epoch = record.as_ref().map_or(0, |r| r.epoch);
                let new = self.record_for(req.holder, prev_epoch.max(floor) + 1, req.ttl);
                let cond = match &cond_version {
                    Some(v) => Cond::Matches(v),
                    None => Cond::Absent,
                };
                if let Some(version) = self.put_lock(&new, cond).await? {
                    let epoch = new.epoch;
                    *self.held.lock().await = Some(Held {
                        record: new,
                        version,
                    });
                    return Ok(Grant {
                        epoch,
                        took_over: stale,
                        lost: None,
                    });
                }
                // Someone else changed it first (or our own write landed
                // with its answer lost): look again at once.
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                let holder = match record.as_ref().and_then(LockRecord::view) {
                    Some(v) => v.to_string(),
                    None => "an unknown holder (the lock object cannot be read)".into(),
                };
                return Err(StateError::Locked {
                    location: self.lock_location(),
                    holder,
                });
            }
            let pause = crate::kv::backoff(attempt, Duration::from_millis(250)).min(deadline - now);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = req.cancel.cancelled() => return Err(StateError::Interrupted),
            }
            attempt += 1;
        }
    }

    async fn renew(&self, ttl: Duration) -> Result<bool, StateError> {
        let mut held = self.held.lock().await;
        let Some(h) = held.as_mut() else {
            return Ok(false);
        };
        let mut record = h.record.clone();
        record.renewed_at_ms = now_ms();
        record.ttl_ms = ttl.as_millis() as u64;
        if let Some(v) = self.put_lock(&record, Cond::Matches(&h.version)).await? {
            *h = Held { record, version: v };
            return Ok(true);
        }
        // Refused: still ours (a retried renewal that had landed), or lost.
        match self.read_lock().await? {
            Some((Some(r), v)) if r.holder == h.record.holder && r.epoch == h.record.epoch => {
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
        let Some(mut h) = self.held.lock().await.take() else {
            return Ok(());
        };
        let run_id = h
            .record
            .holder
            .as_ref()
            .map(|x| x.run_id.clone())
            .unwrap_or_default();
        for _ in 0..5 {
            let mut free = h.record.clone();
            free.holder = None;
            free.released_by = Some(run_id.clone());
            free.renewed_at_ms = now_ms();
            if let Some(v) = self.put_lock(&free, Cond::Matches(&h.version)).await? {
                self.remember_free(&v, &free);
                return Ok(());
            }
            match self.read_lock().await? {
                // Our release landed; its answer was lost.
                Some((Some(r), _))
                    if r.holder.is_none() && r.released_by.as_deref() == Some(&run_id) =>
                {
                    return Ok(())
                }
                // Still ours under another version (a renewal that landed
                // late): release that one.
                Some((Some(r), v))
                    if r.holder.as_ref().is_some_and(|x| x.run_id == run_id)
                        && r.epoch == h.record.epoch =>
                {
                    h = Held {
                        record: r,
                        version: v,
                    };
                }
                _ => {
                    return Err(StateError::LockLost {
                        location: self.lock_location(),
                    })
                }
            }
        }
        Err(StateError::LockLost {
            location: self.lock_location(),
        })
    }

    async fn lock_info(&self) -> Result<Option<LockView>, StateError> {
        Ok(match self.read_lock().await? {
            Some((Some(r), _)) => r.view(),
            Some((None, _)) => Some(LockView {
                run_id: String::new(),
                description: format!(
                    "an unknown holder (the lock object {} cannot be read)",
                    self.lock_key
                ),
                epoch: 0,
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
            let Some((record, version)) = self.read_lock().await? else {
                return Ok(None);
            };
            let view = match &record {
                Some(r) if r.holder.is_none() => return Ok(None),
                Some(r) => r.view(),
                None => None,
            };
            let epoch = match &record {
                Some(r) => r.epoch,
                None => self.stored_epoch().await?,
            };
            let free = LockRecord {
                holder: None,
                epoch,
                host_id: String::new(),
                pid_start: None,
                ttl_ms: 0,
                acquired_at_ms: record.as_ref().map_or(0, |r| r.acquired_at_ms),
                renewed_at_ms: now_ms(),
                released_by: Some("nanokit infra unlock".into()),
            };
            if self
                .put_lock(&free, Cond::Matches(&version))
                .await?
                .is_some()
            {
                return Ok(view);
            }
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
