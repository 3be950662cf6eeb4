//! The one error type of the key/value state module.

use crate::error::ErrorCode;
use crate::pg::PgError;
pub use crate::pg::TlsFailure;

/// Everything that can go wrong in the key/value state store. Each variant
/// has a stable code (see [`ErrorCode`]) and a message that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// A key or lock name that is empty, too long or contains NUL, or a value
    /// that is empty or too large. Nothing was written.
    #[error("{0}")]
    Key(String),

    /// An agent (namespace) name that is empty, too long, or holds path
    /// characters.
    #[error("invalid agent name {agent:?}: {reason}; use letters, digits, '.', '_' and '-' (at most 64, not starting with '.')")]
    Agent { agent: String, reason: String },

    /// Another argument is invalid (holder, timeout, wait, delta, options).
    #[error("{0}")]
    Invalid(String),

    /// The lock is held by someone else (after waiting, when asked to wait).
    #[error("lock {name:?} is held by {holder:?} (expires at {}); wait longer, or clear a stale lock with `nanokit state unlock {name} --force`", fmt_ms(*.expires_at_ms))]
    Locked {
        name: String,
        holder: String,
        expires_at_ms: i64,
    },

    /// `unlock` by someone who does not hold the lock.
    #[error("lock {name:?} is not held by {holder:?}{}; only the holder can unlock it (or use `nanokit state unlock {name} --force`)", match .current { Some(h) => format!(" (it is held by {h:?})"), None => " (it is not locked)".to_string() })]
    NotHolder {
        name: String,
        holder: String,
        current: Option<String>,
    },

    /// `increment` on a value that is not an integer, or an overflow.
    #[error("{0}")]
    NotInteger(String),

    /// The state database is corrupt or is not a nanokit state database.
    /// It is never reset automatically.
    #[error("state database {location} is corrupt or not a nanokit state database ({detail}); nanokit will not reset it: move it aside or restore it from a backup")]
    Corrupt { location: String, detail: String },

    /// The state database cannot be reached (server down, refused, timed out,
    /// or locked by another process for too long).
    #[error("state database {location} is unavailable: {detail}")]
    Unavailable { location: String, detail: String },

    /// TLS with the PostgreSQL server failed, or the server demanded TLS
    /// that was not used, or a certificate file cannot be used; the
    /// [`TlsFailure`] says which (and gives the code).
    #[error("state database {location}: {detail}")]
    Tls {
        location: String,
        failure: TlsFailure,
        detail: String,
    },

    /// A state URL that nanokit cannot use.
    #[error("invalid state URL: {0}; expected postgres://user:password@host:port/database")]
    BadUrl(String),

    /// An operation the backend cannot do (e.g. a synchronous call on
    /// PostgreSQL).
    #[error("{0}")]
    Unsupported(String),

    /// A compare-and-swap of the remote infra state found another serial:
    /// someone else wrote the state in between.
    #[error("state of {workspace:?} changed underneath: expected serial {}, found {}{}; nothing was written: re-read the state and plan again", .expected.map(|s| s.to_string()).unwrap_or_else(|| "none (new state)".into()), .actual.map(|s| s.to_string()).unwrap_or_else(|| "none".into()), if .writer.is_empty() { String::new() } else { format!(" written by {:?}", .writer) })]
    StaleState {
        workspace: String,
        expected: Option<i64>,
        actual: Option<i64>,
        writer: String,
    },

    /// The remote infra state has another lineage (a different history).
    #[error("state of {workspace:?} has lineage {actual:?}, not {expected:?}: it is a different state history; nothing was written")]
    LineageMismatch {
        workspace: String,
        expected: String,
        actual: String,
    },

    /// Any other database or file-system failure.
    #[error("state database {location}: {detail}")]
    Backend { location: String, detail: String },
}

impl ErrorCode for KvError {
    fn code(&self) -> &'static str {
        match self {
            KvError::Key(_) => "ENKKEY",
            KvError::Agent { .. } => "ENKAGENT",
            KvError::Invalid(_) => "ENKARG",
            KvError::Locked { .. } => "ENKLOCKED",
            KvError::NotHolder { .. } => "ENKNOTHOLDER",
            KvError::NotInteger(_) => "ENKNOTINTEGER",
            KvError::Corrupt { .. } => "ENKSTATECORRUPT",
            KvError::Unavailable { .. } => "ENKSTATEUNAVAILABLE",
            KvError::Tls { failure, .. } => failure.code(),
            KvError::BadUrl(_) => "ENKSTATEURL",
            KvError::Unsupported(_) => "ENKUNSUPPORTED",
            KvError::StaleState { .. } => "ENKSTATESTALE",
            KvError::LineageMismatch { .. } => "ENKSTATELINEAGE",
            KvError::Backend { .. } => "ENKSTATE",
        }
    }
}

impl From<PgError> for KvError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::BadUrl(detail) => KvError::BadUrl(detail),
            PgError::Unavailable { location, detail } => KvError::Unavailable { location, detail },
            PgError::Tls {
                location,
                failure,
                detail,
            } => KvError::Tls {
                location,
                failure,
                detail,
            },
            PgError::Corrupt { location, detail } => KvError::Corrupt { location, detail },
            PgError::Server { location, detail } => KvError::Backend { location, detail },
        }
    }
}

/// Formats milliseconds since the Unix epoch as an RFC 3339 UTC timestamp
/// (for display only).
pub fn fmt_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_epoch_millis() {
        assert_eq!(fmt_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(fmt_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(fmt_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
