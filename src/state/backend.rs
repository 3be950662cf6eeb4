//! The one seam between the engine's state and where it is kept: every
//! backend (a local file, PostgreSQL, …) stores one document with a
//! version, writes it only if the version is still the one read, and keeps
//! a deploy lock with an expiry and an epoch beside it.
//!
//! What every implementation guarantees:
//! - [`Backend::write`] is a compare-and-swap on the version: a write made
//!   on an older version changes nothing and fails (`ENKSTATESTALE`);
//! - [`Backend::lock`] hands out an epoch strictly greater than every epoch
//!   handed out before and every epoch the stored state carries, and the
//!   epoch survives release and `infra unlock`;
//! - a lock is renewed and released only by its holder; a lock not renewed
//!   within its TTL is taken over by exactly one contender;
//! - revisions (the history) are kept by serial beside the state.
//!
//! A backend value is one run's handle on one state: it remembers the lock
//! it took, so that its writes can be fenced by it.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::StateError;

/// A backend's version of the stored document: an ETag, a generation, a
/// KV version, a serial, a file identity. Opaque to everyone but the
/// backend that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version(pub String);

/// The stored document and its version.
#[derive(Debug, Clone)]
pub struct Stored {
    pub bytes: Vec<u8>,
    pub version: Version,
}

/// What a write records besides the bytes (backends with columns keep them
/// apart; the bytes hold them too).
#[derive(Debug, Clone, Copy)]
pub struct WriteMeta<'a> {
    pub serial: u64,
    pub lineage: &'a str,
    /// The writer's deploy-lock epoch (0: written without a lock).
    pub epoch: u64,
    /// The writer's run id.
    pub writer: &'a str,
}

/// Who holds (or asks for) a deploy lock: what `nanokit infra unlock` and
/// `ENKLOCKED` show, and the run id that recognises a holder's own lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Unique to one run: `host:pid:random`.
    pub run_id: String,
    pub host: String,
    pub pid: u32,
    #[serde(default)]
    pub user: String,
    /// What the run does (`nanokit up (project / env)`).
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub cwd: String,
    /// The command line (at most 300 characters).
    #[serde(default)]
    pub command: String,
}

impl Holder {
    /// This process, doing `label`, with a fresh run id.
    pub fn this_run(label: &str) -> Holder {
        let me = crate::lock::this_host();
        let token = uuid::Uuid::new_v4().simple().to_string();
        let cwd = std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|_| "?".into());
        let mut command = COMMAND_LINE
            .get()
            .cloned()
            .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
        if command.len() > 300 {
            let mut end = 300;
            while !command.is_char_boundary(end) {
                end -= 1;
            }
            command.truncate(end);
            command.push('…');
        }
        Holder {
            run_id: format!("{}:{}:{}", me.hostname, me.pid, &token[..12]),
            host: me.hostname.clone(),
            pid: me.pid,
            user: std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .unwrap_or_default(),
            label: label.to_string(),
            cwd,
            command,
        }
    }

    /// One line for messages: `nanokit up (p / local); host h, pid 1, cwd /x, command `…``.
    pub fn describe(&self) -> String {
        let user = if self.user.is_empty() {
            String::new()
        } else {
            format!("user {}, ", self.user)
        };
        format!(
            "{}; host {}, pid {}, {user}cwd {}, command `{}`",
            self.label, self.host, self.pid, self.cwd, self.command
        )
    }
}

static COMMAND_LINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The command line a holder shows, when the process runs one command
/// (the CLI) rather than its own argv (the JS API, tests: the process's).
pub fn set_command_line(line: String) {
    let _ = COMMAND_LINE.set(line);
}

/// A request for the deploy lock.
#[derive(Debug, Clone, Copy)]
pub struct LockRequest<'a> {
    pub holder: &'a Holder,
    /// How long the lock lives without renewal.
    pub ttl: Duration,
    /// How long to wait for a lock another run holds (zero: fail at once
    /// with `ENKLOCKED`).
    pub wait: Duration,
    pub cancel: &'a CancellationToken,
}

/// A deploy lock taken by [`Backend::lock`].
#[derive(Debug, Clone)]
pub struct Grant {
    /// The fencing token of this acquisition.
    pub epoch: u64,
    /// Taken over from a holder whose lock had expired (a run that died or
    /// stopped renewing, whose requests may still be landing).
    pub took_over: bool,
    /// Fired by the backend itself when it finds the lock lost (the file
    /// lease's heartbeat); other backends learn it from [`Backend::renew`].
    pub lost: Option<CancellationToken>,
}

/// A deploy lock as seen by anyone (`nanokit infra unlock`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LockView {
    /// The holder's run id (empty when unknown).
    pub run_id: String,
    /// Who holds it, in words.
    pub description: String,
    pub epoch: u64,
    /// Wall-clock times for display (ms since the Unix epoch), when known.
    pub acquired_at_ms: Option<i64>,
    pub expires_at_ms: Option<i64>,
    /// The holder is dead, or stopped renewing.
    pub stale: bool,
}

impl std::fmt::Display for LockView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::kv::error::fmt_ms;
        f.write_str(&self.description)?;
        if !self.run_id.is_empty() && !self.description.contains(&self.run_id) {
            write!(f, " [run {}]", self.run_id)?;
        }
        write!(f, ", epoch {}", self.epoch)?;
        if let Some(a) = self.acquired_at_ms {
            write!(f, ", since {}", fmt_ms(a))?;
        }
        if let Some(e) = self.expires_at_ms {
            write!(f, ", expiring at {} unless renewed", fmt_ms(e))?;
        }
        if self.stale {
            f.write_str(" (stale: the holder is dead or stopped renewing)")?;
        }
        Ok(())
    }
}

/// Where a project's state is kept. See the module header for what every
/// implementation guarantees.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Where the state is, for messages (never with a password).
    fn location(&self) -> String;

    /// The stored document and its version; `None` before the first write.
    async fn read(&self) -> Result<Option<Stored>, StateError>;

    /// Stores `bytes` if the stored version is still `expected` (`None`:
    /// only if nothing is stored), fenced by this handle's lock when it
    /// holds one. Returns the new version. A lost race is `ENKSTATESTALE`
    /// and writes nothing.
    async fn write(
        &self,
        bytes: &[u8],
        expected: Option<&Version>,
        meta: &WriteMeta<'_>,
    ) -> Result<Version, StateError>;

    /// Reads the state ahead of [`Backend::lock`], after this user released
    /// epoch `released` (as [`Backend::last_release`] said before): when
    /// the lock then takes the next epoch, nobody held it, so nobody wrote,
    /// since, and the first [`Backend::read`] returns this read. Does
    /// nothing by default.
    async fn read_ahead(&self, _released: u64) {}

    /// The epoch this user last released here, as remembered (the object
    /// stores; `None` elsewhere). Epochs only grow, one per acquisition, so
    /// a lock granted next with the epoch after it proves that nobody held
    /// the lock between this call and the grant (see
    /// [`lock::Pending`](super::lock::Pending)).
    fn last_release(&self) -> Option<u64> {
        None
    }

    /// Takes the deploy lock (waiting up to `req.wait`), with a new epoch.
    async fn lock(&self, req: &LockRequest<'_>) -> Result<Grant, StateError>;

    /// Extends the lock this handle holds by `ttl`; `false` when it is no
    /// longer held (taken over, cleared).
    async fn renew(&self, ttl: Duration) -> Result<bool, StateError>;

    /// Releases the lock this handle holds (only if it still does).
    async fn unlock(&self) -> Result<(), StateError>;

    /// Who holds the deploy lock, if anyone.
    async fn lock_info(&self) -> Result<Option<LockView>, StateError>;

    /// Clears the deploy lock whoever holds it (`nanokit infra unlock`);
    /// the epoch is kept. Returns the lock it cleared.
    async fn force_unlock(&self) -> Result<Option<LockView>, StateError>;

    /// History: keeps `bytes` as the revision of `serial` (written after
    /// the state write of that serial succeeded; overwrites a revision of
    /// the same serial).
    async fn put_revision(&self, serial: u64, bytes: &[u8]) -> Result<(), StateError>;

    /// The kept revision of `serial`, if any.
    async fn get_revision(&self, serial: u64) -> Result<Option<Vec<u8>>, StateError>;

    /// The serials of the kept revisions, in increasing order.
    async fn list_revisions(&self) -> Result<Vec<u64>, StateError>;

    /// Forgets the revision of `serial` (nothing if there is none).
    async fn delete_revision(&self, serial: u64) -> Result<(), StateError>;
}

/// The name of the revision of `serial` in a store of named objects.
pub fn revision_name(serial: u64) -> String {
    format!("{serial:020}.json")
}

/// The serial of a revision named by [`revision_name`].
pub fn revision_serial(name: &str) -> Option<u64> {
    name.strip_suffix(".json")?.parse().ok()
}
