//! `nanokit watch`: the reconciliation loop in the foreground, each event
//! printed (a line on stderr, or JSON lines on stdout).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::project::{engine_exit, load, seconds, Project};
use super::{exit, CliResult, OutputFormat as Output};
use crate::engine::watch::status::EventRecord;
use crate::engine::watch::{self, WatchOptions};
use crate::trace::mask;

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub project: Project,
    /// Period of the full drift check, the safety net for what no event reports (`30s`, `5m`)
    #[arg(long, default_value = "30s", value_parser = super::parse_duration)]
    pub interval: Duration,
    /// How many pass traces to keep in .nanokit/traces (older ones are deleted)
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_traces: u32,
    /// Rotate a process service's log to <service>.log.1 past this many MiB
    #[arg(long, value_name = "MIB", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub log_max_mb: u64,
    /// Start at most this many services at once in a pass
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Seconds between SIGTERM and SIGKILL when stopping a service
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = seconds)]
    pub stop_grace: Duration,
    /// `text`: a line per event on stderr; `json`: each event as a JSON line on stdout
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

pub async fn run(args: WatchArgs) -> CliResult {
    let token = tokio_util::sync::CancellationToken::new();
    let notice = "stopping: finishing the step in progress, then releasing the lease; services keep running (signal again to quit at once)…";
    let _signals =
        crate::sys::signal::install_on(&[libc::SIGINT, libc::SIGTERM], token.clone(), notice);
    let project = args.project.clone();
    let first = AtomicBool::new(true);
    let load = Arc::new(move || {
        if first.swap(false, Ordering::SeqCst) {
            load(&project)
        } else {
            // Reloads: the same checks, warnings said once.
            let cfg = crate::config::load(&crate::config::LoadOptions {
                file: project.file.clone(),
                env: project.env.clone(),
                vars: None,
            })?;
            mask::register(&cfg.masker());
            Ok(cfg)
        }
    });
    let mut opts = WatchOptions::new(load);
    opts.interval = args.interval.max(Duration::from_millis(100));
    opts.keep_traces = args.keep_traces as usize;
    opts.log_max = args.log_max_mb << 20;
    opts.run.concurrency = args.concurrency.max(1);
    opts.run.stop_grace = args.stop_grace;
    opts.run.cancel = token;
    opts.trace = crate::trace::Settings {
        log_to_stderr: true,
        ..Default::default()
    };
    // SIGHUP: read nanokit.yml again now (a daemon's reload; systemd's
    // `ExecReload`), whether or not the file watcher saw an edit.
    let reload = opts.reload.clone();
    let hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => Some(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                reload.notify_one();
            }
        })),
        Err(e) => {
            errln!("warning: cannot catch SIGHUP ({e}): a hangup ends the watcher");
            None
        }
    };
    let json = args.output == Output::Json;
    opts.on_event = Some(Arc::new(move |r: &EventRecord| {
        if json {
            outln!(
                "{}",
                serde_json::to_string(&mask::registered().to_json(r)).expect("event serializes")
            );
        } else {
            errln!("{}", mask::registered().mask(&describe(r)));
        }
    }));
    let ended = watch::watch(opts).await;
    if let Some(h) = hangups {
        h.abort();
    }
    match ended {
        Ok(_) => Ok(exit::OK),
        Err(e) => engine_exit(e),
    }
}

/// One event as a line: `12:00:01.234 api: restarting in 100 ms (attempt 2)`.
pub fn describe(r: &EventRecord) -> String {
    let time =
        r.at.split_once('T')
            .map_or(r.at.as_str(), |(_, t)| t.trim_end_matches('Z'));
    match r.event.service() {
        Some(service) => format!("{time} {service}: {}", r.text()),
        None => format!("{time} {}", r.text()),
    }
}
