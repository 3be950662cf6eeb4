//! The `nanokit` command line, parsed with clap. `bin/nanokit.js` hands argv
//! to the native `cli()`, which calls [`run`].

pub mod state;

use clap::{Parser, Subcommand};

/// Process exit codes used by every command.
pub mod exit {
    /// Success (and "no changes" for commands with detailed exit codes).
    pub const OK: i32 = 0;
    /// An error: bad input, a failed operation.
    pub const ERROR: i32 = 1;
    /// Success with changes present (`plan --detailed-exitcode`, `drift`).
    pub const CHANGES: i32 = 2;
}

#[derive(Debug, Parser)]
#[command(
    name = "nanokit",
    version,
    about = "Race-free shared package repositories, service reconciliation, and shared state with named locks",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Shared key/value state with named locks (embedded SQLite or PostgreSQL).
    State(state::StateArgs),
}

/// Parses `args` (without the program name) and runs the command. Returns
/// the process exit code; errors are printed to stderr without debug noise.
pub async fn run(args: Vec<String>) -> i32 {
    let cli = match Cli::try_parse_from(std::iter::once("nanokit".to_string()).chain(args)) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::ERROR
            } else {
                exit::OK
            };
            let _ = e.print();
            return code;
        }
    };
    match cli.command {
        Command::State(args) => state::run(args).await,
    }
}
