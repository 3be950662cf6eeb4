//! The `nanokit` command line, parsed with clap. `bin/nanokit.js` hands argv
//! to the native `cli()`, which calls [`run`].

use clap::{Parser, Subcommand};

pub mod infra;

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
    #[command(flatten)]
    Infra(infra::InfraCommand),
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
    init_tracing();
    match cli.command {
        Command::Infra(cmd) => infra::run(cmd).await,
    }
}

/// `NANOKIT_LOG=debug` turns logs up; they go to stderr.
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("NANOKIT_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
