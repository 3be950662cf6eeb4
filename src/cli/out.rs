//! What commands print. A reader that goes away (`nanokit … | head`) ends
//! the output, never the command: the rest of stdout is dropped, the command
//! finishes what it was doing and exits with its own code. Any other failure
//! to write stdout (a full disk) is reported once the command is done, as
//! `ENKOUTPUT`. A command that only prints (`logs --follow`) stops once its
//! reader is gone. Nothing here panics.

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;

use super::CliError;

/// Set by the first failed write: what went wrong (kind and message).
static FAILED: Mutex<Option<(io::ErrorKind, String)>> = Mutex::new(None);

fn failed() -> std::sync::MutexGuard<'static, Option<(io::ErrorKind, String)>> {
    FAILED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes `args` to stdout, or nothing once a write has failed.
pub fn stdout(args: fmt::Arguments<'_>) {
    let mut failed = failed();
    if failed.is_some() {
        return;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        *failed = Some((e.kind(), e.to_string()));
    }
}

/// Whether stdout has failed (its reader went away): a command that only
/// prints, such as `logs --follow`, stops then.
pub fn closed() -> bool {
    failed().is_some()
}

/// Writes `args` to stderr, each hint in it a command that works as
/// printed ([`super::hint::complete`]); a stderr nobody reads is ignored.
pub fn stderr(args: fmt::Arguments<'_>) {
    let text = super::hint::complete(&args.to_string());
    let _ = io::stderr().lock().write_all(text.as_bytes());
}

/// After the command: the error to report when stdout failed other than
/// by its reader going away.
pub fn finish() -> Option<CliError> {
    match failed().take() {
        Some((io::ErrorKind::BrokenPipe, _)) | None => None,
        Some((_, message)) => Some(CliError::new(
            "ENKOUTPUT",
            format!("writing to stdout failed: {message}; the output is incomplete"),
        )),
    }
}

/// `println!` to stdout that does not panic (see the module).
macro_rules! outln {
    () => { $crate::cli::out::stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::out::stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` to stdout that does not panic.
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::out::stdout(format_args!($($arg)*)) };
}

/// `eprintln!` that does not panic.
macro_rules! errln {
    () => { $crate::cli::out::stderr(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::out::stderr(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprint!` that does not panic.
macro_rules! errout {
    ($($arg:tt)*) => { $crate::cli::out::stderr(format_args!($($arg)*)) };
}
