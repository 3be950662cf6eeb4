//! `nanokit timeline [run]`: renders a run's trace as an HTML page and
//! prints the slowest steps.

use std::path::PathBuf;

use clap::Args;

use super::{exit, print_json, CliError, CliResult, OutputFormat};
use crate::trace::{self, file, timeline, TraceFile};

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

pub fn run(args: TimelineArgs) -> CliResult {
    let dir = trace::traces_dir(&args.file);
    if args.list {
        let runs: Vec<serde_json::Value> = file::list(&dir)
            .iter()
            .filter_map(|p| TraceFile::read(p).ok())
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
            println!("No traces in {} yet.", dir.display());
        } else {
            for r in &runs {
                println!(
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
    if args.output == OutputFormat::Json {
        print_json(&t);
        return Ok(exit::OK);
    }
    let out = args.out.unwrap_or_else(|| path.with_extension("html"));
    if let Some(d) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)
            .map_err(|e| err(format!("cannot create {}: {e}", d.display())))?;
    }
    crate::fsutil::atomic_write(&out, timeline::html(&t).as_bytes(), 0o600)
        .map_err(|e| err(format!("cannot write {}: {e}", out.display())))?;
    print!("{}", timeline::summary(&t, args.top));
    println!("Timeline: {}", out.display());
    Ok(exit::OK)
}
