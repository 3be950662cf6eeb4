//! The holder's record: what a lock file holds, how it is read, and how it
//! is written over the old content without ever shrinking the file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::file::{Observation, Target};
use super::LockOptions;
use crate::sys::beneath::Access;
use crate::sys::host::this_host;

/// The record a holder writes into its lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockInfo {
    /// Unique per acquisition.
    pub token: String,
    /// See [`HostIdentity::id`](crate::sys::host::HostIdentity::id); pids are only compared when this matches ours.
    pub host_id: String,
    pub hostname: String,
    pub pid: u32,
    /// Start time of `pid` (clock ticks since boot), to detect pid reuse.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// The label the holder gave.
    #[serde(default)]
    pub holder: Option<String>,
    /// Wall-clock acquisition time (ms since the epoch), for display only.
    pub acquired_at_ms: u64,
    /// The holder's stale period, for display.
    #[serde(default)]
    pub stale_ms: u64,
}

impl LockInfo {
    /// A one-line description of the holder for messages.
    pub fn describe(&self) -> String {
        let label = self
            .holder
            .as_deref()
            .map(|h| format!("'{h}' "))
            .unwrap_or_default();
        let age = now_ms().saturating_sub(self.acquired_at_ms);
        format!(
            "{label}(pid {} on {}, acquired {} ago)",
            self.pid,
            self.hostname,
            human_ms(age)
        )
    }
}

fn human_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=119_999 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} min", ms / 60_000),
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Makes the holder's record for a new acquisition.
pub(super) fn new_info(opts: &LockOptions) -> LockInfo {
    let host = this_host();
    LockInfo {
        token: format!("{:032x}", fastrand::u128(..)),
        host_id: host.id.clone(),
        hostname: host.hostname.clone(),
        pid: host.pid,
        pid_start: host.pid_start,
        holder: opts.holder.clone(),
        acquired_at_ms: now_ms(),
        stale_ms: opts.stale.as_millis() as u64,
    }
}

/// Whether lock file content means "free".
pub(super) fn is_free(content: &[u8]) -> bool {
    // Without an early exit, so that it vectorises: a released record is a
    // few hundred spaces, looked at on every acquisition.
    content
        .iter()
        .fold(true, |free, &b| free & matches!(b, b' ' | b'\n'))
}

/// Writes `record` over `old` content, padded with spaces to the old length
/// (JSON allows trailing whitespace), so the file never shrinks.
pub(super) fn overwrite(file: &File, record: &[u8], old_len: usize) -> io::Result<()> {
    if record.len() >= old_len {
        return file.write_all_at(record, 0);
    }
    let mut padded = Vec::with_capacity(old_len);
    padded.extend_from_slice(record);
    padded.resize(old_len, b' ');
    file.write_all_at(&padded, 0)
}

/// The whole content of an open lock file (at most 64 KiB).
pub(super) fn read_content(file: &File) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    // Records are a few hundred bytes; a larger buffer only costs zeroing.
    let mut chunk = [0u8; 1024];
    loop {
        let n = file.read_at(&mut chunk, buf.len() as u64)?;
        buf.extend_from_slice(&chunk[..n]);
        // A short read of a regular file is its end: one pread for a record.
        if n < chunk.len() || buf.len() > 64 * 1024 {
            return Ok(buf);
        }
    }
}

/// Reads the lock's record together with the observation of the file it came
/// from (one open descriptor). `Err(NotFound)` if there is no lock file;
/// anything but a regular file there is refused without blocking on it.
/// `free` is true when the content is blank.
pub(super) fn read_record(target: Target<'_>) -> io::Result<Record> {
    let file = target.open(Access::Read)?;
    let obs = Observation::of(&file.metadata()?);
    let content = read_content(&file)?;
    Ok(Record {
        obs,
        free: is_free(&content),
        info: serde_json::from_slice(&content).ok(),
        content,
    })
}

pub(super) struct Record {
    pub(super) obs: Observation,
    pub(super) free: bool,
    pub(super) info: Option<LockInfo>,
    pub(super) content: Vec<u8>,
}
