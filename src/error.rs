//! Conventions shared by every module's error type.
//!
//! Each module owns one `thiserror` enum. Every error that can reach a user
//! (JS or CLI) also implements [`ErrorCode`], giving it a stable code such as
//! `ENKLOCKED` that callers can match on.

/// A stable, documented error code (`ENK…`) for an error.
pub trait ErrorCode {
    /// The stable code, e.g. `ENKLOCKED`.
    fn code(&self) -> &'static str;
}

/// A filesystem operation that failed, with what was being done and where.
/// Every module's error enum wraps it as its `Io` variant (code `ENKIO`).
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}: {source}", path.display())]
pub struct IoError {
    pub op: &'static str,
    pub path: std::path::PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// `map_err(io_err("read", &path))`: wraps an `io::Error` with its context
/// into any error type that has an `Io` variant.
pub fn io_err<'a, E: From<IoError>>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> E + 'a {
    move |source| {
        E::from(IoError {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}
