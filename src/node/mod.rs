//! Node-API glue: every `#[napi]` item lives here, converting between JS
//! values and the engine's Rust types. No engine logic belongs in this module.
//!
//! Errors cross into JS as `Error`s whose message starts with the stable code
//! (`ENKLOCKED: …`); `errors.js` moves it to `err.code` for the public API.

#[cfg(feature = "hub")]
mod hub;
mod infra;
mod kv;
mod lock;
mod raw;
mod repo;

use std::fmt::Display;
use std::time::Duration;

use napi_derive::napi;
use tokio_util::sync::CancellationToken;

use crate::error::ErrorCode;

/// Converts an engine error into a JS error whose message starts with its
/// code (promise rejections can only carry napi's fixed status).
pub(crate) fn js_err<E: ErrorCode + Display>(e: E) -> napi::Error {
    napi::Error::from_reason(format!("{}: {e}", e.code()))
}

/// For synchronous calls: the code is also `err.code` natively.
pub(crate) fn js_err_sync<E: ErrorCode + Display>(e: E) -> napi::Error<String> {
    napi::Error::new(e.code().to_string(), format!("{}: {e}", e.code()))
}

/// A JS number of milliseconds as a duration: negative and NaN are zero,
/// and anything from 10^12 ms (about 32 years) up to `Infinity` is that long,
/// so that "forever" works and no deadline overflows.
pub(crate) fn ms(v: f64) -> Duration {
    const MAX_MS: f64 = 1e12;
    if v.is_nan() || v <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(v.min(MAX_MS) / 1000.0)
}

pub(crate) fn duration_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Cancels a pending native operation; `nanokit.js` connects it to an
/// `AbortSignal`.
#[napi]
pub struct AbortHandle {
    token: CancellationToken,
}

#[napi]
impl AbortHandle {
    #[napi(constructor)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        AbortHandle {
            token: CancellationToken::new(),
        }
    }

    /// Aborts the operations this handle was passed to.
    #[napi]
    pub fn abort(&self) {
        self.token.cancel();
    }
}

pub(crate) fn cancel_token(abort: Option<&AbortHandle>) -> CancellationToken {
    abort.map(|a| a.token.clone()).unwrap_or_default()
}

/// Exports the spans still buffered for OTLP (install, lock waits; `up` and
/// `down` flush their own). Resolves when delivered or given up on; never
/// rejects. Nothing to do unless `OTEL_EXPORTER_OTLP_*ENDPOINT` is set.
#[napi]
pub async fn flush_traces() {
    let _ = tokio::task::spawn_blocking(crate::trace::flush_global).await;
}

/// Runs the `nanokit` command line with `args` (argv without node and the
/// script) and resolves to the process exit code. `name` is how the shell
/// would start the command again (`nanokit`, `npx nkapp`, `node
/// bin/nanokit.js`), which the commands it prints as hints use; its last
/// word names the program in `--help`, `--version` and usage errors:
/// `nkapp` for the alias, `nanokit` otherwise.
#[napi]
pub async fn cli(args: Vec<String>, name: Option<String>) -> i32 {
    crate::cli::run_as(name.as_deref().unwrap_or(crate::cli::NAME), args).await
}
