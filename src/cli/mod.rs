//! The `nanokit` command line, parsed with clap. `bin/nanokit.js` hands argv
//! to the native `cli()`, which calls [`run_as`]; the standalone binary
//! (`src/bin/nanokit.rs`, also installed as `nkapp`) calls it too, so both
//! print the same output and return the same exit codes.

#[macro_use]
mod out;

pub(crate) mod hint;
pub use hint::quote as shell_word;
#[cfg(feature = "hub")]
mod hub;
mod infra;
mod lock;
mod project;
mod repo;
mod state;
mod timeline;
mod watch;

use std::fmt::Display;
use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::error::ErrorCode;

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
    long_about = "Race-free shared package repositories, service reconciliation, and shared state with named locks.\n\n\
        Set NANOKIT_LOG=debug to see what nanokit is doing.",
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
    /// Inspect or break lease lock files
    #[command(subcommand)]
    Lock(lock::LockCommand),
    /// Shared package repositories: status, and installs coordinated across processes
    #[command(subcommand)]
    Repo(repo::RepoCommand),
    /// Run an install command once per manifest hash in a shared directory
    Provision(repo::ProvisionArgs),
    /// Shared key/value state with named locks (embedded SQLite or PostgreSQL)
    State(state::StateArgs),
    /// Render a run's trace (.nanokit/traces/RUN.json) as an HTML timeline and print its slowest steps
    Timeline(timeline::TimelineArgs),
    /// Serve a live dashboard of services, runs, logs, locks, the shared repo and state on 127.0.0.1
    #[cfg(feature = "hub")]
    Hub(hub::HubArgs),
}

/// How listing commands print.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text
    #[default]
    #[value(alias = "table")]
    Text,
    /// JSON on stdout, for scripts
    Json,
}

/// A command's failure: the message, its stable code, and the exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: &'static str,
    pub message: String,
    /// The process exit code (default [`exit::ERROR`]).
    pub exit: i32,
}

impl<E: ErrorCode + Display> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError::new(e.code(), e.to_string())
    }
}

impl CliError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
            exit: exit::ERROR,
        }
    }

    /// The same error, exiting with `code`.
    pub fn with_exit(mut self, code: i32) -> Self {
        self.exit = code;
        self
    }
}

/// What a command returns: its exit code, or an error to print.
pub type CliResult = Result<i32, CliError>;

/// Parses a duration such as `500ms`, `30s` or `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 2m)"))
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("output serialises")
    );
}

/// Asks `question` on the terminal; without a terminal, refuses and says how
/// to proceed. Destructive commands call this unless `--yes` was given.
pub async fn confirm(question: &str) -> Result<(), CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::new(
            "ENKCONFIRM",
            format!("{question} Refusing without a terminal to ask on; pass --yes to confirm."),
        ));
    }
    let question = question.to_string();
    let answer = tokio::task::spawn_blocking(move || {
        errout!("{question} [y/N] ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        line
    })
    .await
    .unwrap_or_default();
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        Err(CliError::new(
            "ENKCONFIRM",
            "not confirmed; nothing was changed",
        ))
    }
}

/// Parses `args` (without the program name) and runs the command. Returns
/// the process exit code; errors are printed to stderr as
/// `error[CODE]: message`, without debug noise.
pub async fn run(args: Vec<String>) -> i32 {
    run_as(NAME, args).await
}

/// The command's own name; [`ALIAS`] is the same command under Nanokit's name.
pub const NAME: &str = "nanokit";
/// `nkapp`: an alias of `nanokit` (the name Nanokit's docs use).
pub const ALIAS: &str = "nkapp";

/// Like [`run`], started as `program`: how the shell would start this
/// command again (`nanokit`, `npx nkapp`, `./target/release/nanokit`),
/// which the hints it prints use. `--help`, `--version` and usage errors
/// name the program by its last word's file name (`nanokit` or its alias
/// `nkapp`; anything else is shown as `nanokit`).
pub async fn run_as(program: &str, args: Vec<String>) -> i32 {
    let base = program.rsplit(['/', ' ']).next().unwrap_or_default();
    let name = if base == ALIAS { ALIAS } else { NAME };
    let mut cmd = <Cli as clap::CommandFactory>::command()
        .name(name)
        .bin_name(name);
    // Who holds a deploy lock or wrote the state shows this command line.
    crate::state::backend::set_command_line(
        std::iter::once(name.to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" "),
    );
    let parsed = cmd
        .try_get_matches_from_mut(std::iter::once(name.to_string()).chain(args))
        .and_then(|m| {
            hint::record(program, &m);
            <Cli as clap::FromArgMatches>::from_arg_matches(&m).map_err(|e| e.format(&mut cmd))
        });
    let cli = match parsed {
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
    // NANOKIT_LOG logging, and OTLP export of spans outside `up`/`down`
    // runs when the OTEL_EXPORTER_OTLP_* variables ask for it.
    crate::trace::init_global(true);
    let result = match cli.command {
        Command::Infra(cmd) => infra::run(cmd).await,
        Command::Lock(cmd) => lock::run(cmd).await,
        Command::Repo(cmd) => repo::run(cmd).await,
        Command::Provision(args) => repo::provision(args).await,
        Command::State(args) => state::run(args).await,
        Command::Timeline(args) => timeline::run(args),
        #[cfg(feature = "hub")]
        Command::Hub(args) => hub::run(args).await,
    };
    // The export's flush blocks: on a thread of its own, and only when
    // there is an export (no thread for every command).
    if crate::trace::exporting_global() {
        let _ = tokio::task::spawn_blocking(crate::trace::flush_global).await;
    }
    let result = match out::finish() {
        Some(e) if result.is_ok() => Err(e),
        _ => result,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            errln!("error[{}]: {}", e.code, e.message);
            e.exit
        }
    }
}
