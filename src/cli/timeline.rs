//! `nanokit timeline [run]`: renders a run's trace as an HTML page and
//! prints the slowest steps.
//!
//! Trace files are masked when written; what this command shows and writes
//! is masked again with the secrets of the run's configuration (when it
//! still loads), so a trace written by an older nanokit shows none either.

use std::path::PathBuf;

use clap::Args;

use super::{exit, print_json, CliError, CliResult, OutputFormat};
use crate::config::{self, LoadOptions};
use crate::trace::{self, file, mask, timeline, TraceFile};

#[derive(Debug, Args)]
pub struct TimelineArgs {
    /// The run: its name (or a prefix of it), a trace id prefix, or a path to
    /// a trace file. Default: the latest run
    pub run: Option<String>,
    /// The nanokit.yml whose .nanokit/traces to look in
    #[arg(
        short = 'f',
        long = "file",
        default_value = "nanokit.yml",
        env = "NANOKIT_FILE"
    )]
    pub file: PathBuf,
    /// Where to write the HTML page (default: beside the trace, <run>.html)
    #[arg(long, short = 'o', value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// How many of the slowest steps to print
    #[arg(long, default_value_t = 8)]
    pub top: usize,
    /// List the recorded runs instead
    #[arg(long)]
    pub list: bool,
    /// `json` prints the trace itself (or the list of runs)
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

fn err(message: String) -> CliError {
    CliError::new("ENKTRACE", message)
}

/// The secrets of the nanokit.yml at `file` for `env` (none when it does not
/// load), with those already registered.
fn masker(file: &std::path::Path, env: &str) -> mask::Masker {
    let loaded = config::load(&LoadOptions {
        file: file.to_path_buf(),
        env: env.to_string(),
        vars: None,
    });
    if let Ok(cfg) = loaded {
        mask::register(&cfg.masker());
    }
    mask::registered()
}

pub fn run(args: TimelineArgs) -> CliResult {
    let r = run_masked(args);
    r.map_err(|mut e| {
        e.message = mask::registered().mask(&e.message);
        e
    })
}

fn run_masked(args: TimelineArgs) -> CliResult {
    let dir = trace::traces_dir(&args.file);
    if args.list {
        let mut maskers = std::collections::HashMap::new();
        let runs: Vec<serde_json::Value> = file::list(&dir)
            .iter()
            .filter_map(|p| TraceFile::read(p).ok())
            .map(|t| {
                let m = maskers
                    .entry(t.env.clone())
                    .or_insert_with(|| masker(&args.file, &t.env));
                m.masked(&t)
            })
            .map(|t| {
                serde_json::json!({
                    "run": t.run,
                    "command": t.command,
                    "project": t.project,
                    "env": t.env,
                    "started_at": t.started_at,
                    "duration_ms": (t.end_unix_nano.saturating_sub(t.start_unix_nano)) as f64 / 1e6,
                    "outcome": t.outcome,
                    "trace_id": t.trace_id,
                })
            })
            .collect();
        if args.output == OutputFormat::Json {
            print_json(&runs);
        } else if runs.is_empty() {
            outln!("No traces in {} yet.", dir.display());
        } else {
            for r in &runs {
                outln!(
                    "{}  {:<6} {:>9.2}s  {}",
                    r["run"].as_str().unwrap_or(""),
                    r["outcome"].as_str().unwrap_or(""),
                    r["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0,
                    r["trace_id"].as_str().unwrap_or("")
                );
            }
        }
        return Ok(exit::OK);
    }
    let path = file::find(&dir, args.run.as_deref()).map_err(err)?;
    let t = TraceFile::read(&path).map_err(err)?;
    let t = masker(&args.file, &t.env).masked(&t);
    if args.output == OutputFormat::Json {
        print_json(&t);
        return Ok(exit::OK);
    }
    let out = args.out.unwrap_or_else(|| path.with_extension("html"));
    // 0600 in a 0700 folder (private under .nanokit/traces).
    crate::sys::private::write(&out, timeline::html(&t).as_bytes())
        .map_err(|e| err(format!("cannot write {}: {e}", out.display())))?;
    out!("{}", timeline::summary(&t, args.top));
    outln!("Timeline: {}", out.display());
    Ok(exit::OK)
}
