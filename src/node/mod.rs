//! Node-API glue: every `#[napi]` item lives here, converting between JS
//! values and the engine's Rust types. No engine logic belongs in this module.

mod kv;

use napi_derive::napi;

/// Runs the `nanokit` command line with `args` (argv without node and the
/// script) and resolves to the process exit code.
#[napi]
pub async fn cli(args: Vec<String>) -> i32 {
    crate::cli::run(args).await
}
