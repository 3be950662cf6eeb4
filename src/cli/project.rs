//! What every project command takes: which project (`-f`, `-e`), loading
//! it (warnings printed, secrets registered with the masker), a number of
//! seconds from the command line, and an engine error's exit.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{CliError, CliResult};
use crate::config::{self, Config, LoadOptions};
use crate::engine::EngineError;
use crate::trace::mask;

/// Which project: the file and the environment.
#[derive(Debug, Args, Clone)]
pub struct Project {
    /// Path to the nanokit.yml
    #[arg(
        short = 'f',
        long = "file",
        default_value = "nanokit.yml",
        env = "NANOKIT_FILE"
    )]
    pub file: PathBuf,
    /// Environment whose `environments.<env>` block is merged over the globals
    #[arg(short = 'e', long = "env", default_value = config::DEFAULT_ENV, env = "NANOKIT_ENV")]
    pub env: String,
}

/// A number of seconds from the command line: 0 or more, fractions allowed;
/// `inf` (or anything past about 30 years) is about 30 years.
pub(super) fn seconds(arg: &str) -> Result<Duration, String> {
    let v: f64 = arg
        .parse()
        .map_err(|_| format!("`{arg}` is not a number of seconds"))?;
    if v.is_nan() || v < 0.0 {
        return Err(format!("`{arg}`: the number of seconds must be 0 or more"));
    }
    Ok(Duration::from_secs_f64(v.min(1e9)))
}

/// Loads the configuration, prints its warnings, and registers its secrets
/// with the process-wide masker: everything these commands print (stdout,
/// stderr, `NANOKIT_LOG` lines, errors) is masked with it.
pub(super) fn load(project: &Project) -> Result<Config, config::ConfigError> {
    let cfg = config::load(&LoadOptions {
        file: project.file.clone(),
        env: project.env.clone(),
        vars: None,
    })?;
    mask::register(&cfg.masker());
    for w in &cfg.warnings {
        errln!("warning: {w}");
    }
    Ok(cfg)
}

/// An engine error; a cancelled run (Ctrl-C, lost deploy lease) exits 130.
pub(super) fn engine_exit(e: EngineError) -> CliResult {
    let cancelled = matches!(e, EngineError::Cancelled | EngineError::DownCancelled);
    let err = CliError::from(e);
    Err(if cancelled { err.with_exit(130) } else { err })
}
