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
