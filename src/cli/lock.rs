//! `nanokit lock …`

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;

use super::{confirm, exit, parse_duration, print_json, CliResult, OutputFormat};
use crate::lock::{self, LockStatus};

#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Show who holds a lock: host, pid, label, age, heartbeat, and whether it is stale
    ///
    /// Exits 0 whether or not the lock is held; with --output json, prints
    /// null when it is not.
    Inspect {
        /// The lock file (e.g. <repo>/.locks/<alias>.lock or <dir>/.nk-install-lock)
        path: PathBuf,
        /// Stale period to judge by when the holder's record does not state one
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        stale: Duration,
        #[arg(long, short, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Remove a lock whoever holds it (manual intervention)
    ///
    /// The holder learns that its lease was lost at its next heartbeat. Only
    /// do this when the holder is gone for good or stuck: work it is doing
    /// may then overlap with the next holder's.
    Break {
        path: PathBuf,
        /// Do not ask for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

pub(super) fn describe(status: &LockStatus) -> String {
    let mut out = String::new();
    match &status.info {
        Some(info) => {
            out.push_str(&format!("held by   {}\n", info.describe()));
            out.push_str(&format!(
                "host      {}{}\n",
                info.hostname,
                if status.same_host { " (this host)" } else { "" }
            ));
            out.push_str(&format!("pid       {}\n", info.pid));
            if let Some(label) = &info.holder {
                out.push_str(&format!("label     {label}\n"));
            }
            out.push_str(&format!("token     {}\n", info.token));
        }
        None => {
            out.push_str("held by   (record unreadable: being written, or not a nanokit lock)\n")
        }
    }
    out.push_str(&format!(
        "heartbeat {:.1} s ago (by this host's clock)\n",
        status.heartbeat_age_ms as f64 / 1000.0
    ));
    let state = match (status.holder_alive, status.stale) {
        (Some(false), _) => {
            "STALE: the holder process is gone; the next contender takes it over at once"
        }
        (_, true) => "STALE: no heartbeat within the stale period; a waiter will take it over",
        (Some(true), false) => "live: the holder process is running and renewing",
        (None, false) => "live: renewing (holder on another host)",
    };
    out.push_str(&format!("state     {state}\n"));
    out.push_str(&format!("waiters   {}\n", status.waiters));
    out
}

pub async fn run(cmd: LockCommand) -> CliResult {
    match cmd {
        LockCommand::Inspect {
            path,
            stale,
            output,
        } => {
            let status = lock::inspect(&path, stale)?;
            match output {
                OutputFormat::Json => print_json(&status),
                OutputFormat::Text => match &status {
                    Some(s) => out!("{}\n{}", path.display(), describe(s)),
                    None => outln!("{}: not held", path.display()),
                },
            }
            Ok(exit::OK)
        }
        LockCommand::Break { path, yes } => {
            let Some(status) = lock::inspect(&path, lock::DEFAULT_STALE)? else {
                outln!("{}: not held; nothing to do", path.display());
                return Ok(exit::OK);
            };
            if !yes {
                errout!("{}\n{}", path.display(), describe(&status));
                confirm("Break this lock?").await?;
            }
            match lock::break_lock(&path)? {
                Some(info) => {
                    outln!("broke {} (was held by {})", path.display(), info.describe())
                }
                None => outln!("{}: released meanwhile; nothing to do", path.display()),
            }
            Ok(exit::OK)
        }
    }
}
