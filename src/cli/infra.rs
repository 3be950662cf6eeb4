//! Reconciliation commands: validate, graph, plan, up, down, status, logs,
//! drift, infra unlock.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

pub(super) use super::project::{engine_exit, load, seconds, Project};
use super::{exit, CliError, CliResult, OutputFormat as Output};
use crate::engine::plan::PlanOptions;
use crate::engine::{self, Command, EngineError, Event, EventSink, Phase, Report, RunOptions};
use crate::graph::Dag;
use crate::state;
use crate::sys::command::tail;
use crate::trace::mask;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    Text,
    Dot,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Start at most this many services at once
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Wait up to this many seconds for the deploy lock instead of failing at once (`inf`: as long as it takes)
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    pub lock_timeout: Option<Duration>,
    /// Seconds between SIGTERM and SIGKILL when stopping a service
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = seconds)]
    pub stop_grace: Duration,
}

#[derive(Debug, Subcommand)]
pub enum InfraCommand {
    /// Check a nanokit.yml: syntax, types, interpolation, dependencies. Prints warnings for keys nanokit ignores.
    Validate {
        #[command(flatten)]
        project: Project,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show the dependency graph by layers (or Graphviz with --format dot)
    Graph {
        #[command(flatten)]
        project: Project,
        #[arg(long, value_enum, default_value_t = GraphFormat::Text)]
        format: GraphFormat,
    },
    /// Show what `up` would do (+ create, ~ update with the fields that changed, - delete); saved to .nanokit/plans/latest.json
    Plan {
        #[command(flatten)]
        project: Project,
        /// Plan only these services and what they depend on
        services: Vec<String>,
        /// Exit 0 when there is nothing to do, 2 when there are changes, 1 on error
        #[arg(long)]
        detailed_exitcode: bool,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Bring services up: start each as soon as its dependencies are healthy, with lifecycle hooks
    /// (`deploy` is the same command: the name Nanokit's docs use for `up`).
    /// With service names, reconcile only those and what they depend on.
    ///
    /// State: `infra.state` in nanokit.yml names a file (default .nanokit/state.json) or a
    /// PostgreSQL database (`postgres://…` / `postgresql://…`). When `infra.state` is not set and
    /// NANOKIT_STATE_URL is, the state lives in that database. `infra.state` always wins over
    /// NANOKIT_STATE_URL. In PostgreSQL the state is keyed by `<project>/<env>`. Every write is a
    /// compare-and-swap on the version read, and carries the deploy lock's epoch: a run whose lock
    /// was taken over gets ENKSTATESTALE instead of overwriting. The deploy lock lives with the
    /// state (renewed while the run lasts; a second run fails with ENKLOCKED naming the holder, or
    /// waits with --lock-timeout; `nanokit infra unlock` clears a stale one).
    #[command(visible_alias = "deploy")]
    Up {
        #[command(flatten)]
        project: Project,
        services: Vec<String>,
        #[command(flatten)]
        run: RunArgs,
        /// Allow deleting volumes that are no longer in the configuration (their data is lost)
        #[arg(long)]
        force: bool,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Stop and remove services, dependents first (prestop → stop → poststop)
    Down {
        #[command(flatten)]
        project: Project,
        /// Only these services (and the services that depend on them)
        services: Vec<String>,
        #[command(flatten)]
        run: RunArgs,
        /// Also delete named volumes and their data
        #[arg(long)]
        volumes: bool,
        /// Do not ask first (`down` asks when run from a terminal, and before deleting volumes)
        #[arg(long, short = 'y')]
        yes: bool,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Restart services: replace their running instances as an update would (prestop, stop,
    /// then a new instance with its hooks and health check; `rolling` one replica at a time).
    /// What they depend on is left as it is when in place; what depends on them keeps running.
    /// While a `nanokit watch` leads the project, the restart is handed to it.
    Restart {
        #[command(flatten)]
        project: Project,
        #[arg(required = true)]
        services: Vec<String>,
        #[command(flatten)]
        run: RunArgs,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Keep the services at nanokit.yml: an initial `up`, then restore what dies, restart what
    /// fails its health check, apply changes of nanokit.yml, until SIGINT/SIGTERM.
    ///
    /// Passes are driven by events, not by polling: an instance's exit (a pidfd per process;
    /// Docker's event stream, filtered by the project's labels), a failed health check (nanokit
    /// probes processes at their check's interval; Docker's own verdict for containers),
    /// nanokit.yml or .env changed (applied as `up` would), and a full drift check every
    /// --interval as the safety net (it also applies edits no file event told of: a file behind
    /// a symbolic link, as a ConfigMap's; NFS). A pass restores only what drifted, in dependency order, with
    /// hooks and health gates as `up`, and writes one trace (a pass with nothing to do writes
    /// none; the last --keep-traces are kept).
    ///
    /// Per service, `restart: always | on-failure[:N] | unless-stopped | no` (default always)
    /// decides; restarts back off: the first at once, then 100 ms doubling up to
    /// `restart_backoff_max` (60 s), reset once it stayed healthy 10 s. A service restarted by
    /// the watcher also restarts, once it is healthy again, the dependents that declare
    /// `depends_on: {<service>: {restart: true}}`.
    ///
    /// One watcher leads: it holds the deploy lock as a lease; a second `watch` waits as a standby
    /// and takes over when the first stops, dies (at once on this host) or lets its lease expire.
    /// Every state write carries the lease's epoch, and a write of an older epoch is refused, so a
    /// paused leader that wakes up cannot overwrite its successor's state. While a watcher leads,
    /// `nanokit up` / `down` on this host are handed to it and report its result.
    ///
    /// SIGTERM / SIGINT: the step in progress finishes, the lease is released, services keep
    /// running; a second signal quits at once. SIGHUP: nanokit.yml and .env are read again and
    /// applied at once.
    /// Status: `nanokit status`; events: .nanokit/watch/events.jsonl.
    Watch(super::watch::WatchArgs),
    /// Show each service's recorded status and whether its process is alive, and the watcher
    /// (who leads, its epoch, last pass, next full check; per service its restarts, last exit
    /// and next attempt)
    Status {
        #[command(flatten)]
        project: Project,
        /// Only the watcher's status (JSON: its status file, with `running`; null when none)
        #[arg(long)]
        watcher: bool,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print a service's log (.nanokit/logs/<env>/<service>.log)
    Logs {
        #[command(flatten)]
        project: Project,
        service: String,
        /// Number of lines from the end
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
        /// Keep printing new lines
        #[arg(long, short = 'F')]
        follow: bool,
    },
    /// Compare state with the running world; exit 0 when in sync, 2 on drift
    Drift {
        #[command(flatten)]
        project: Project,
        /// Bring the world back to the configuration (runs `up`)
        #[arg(long)]
        restore: bool,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Deploy-state maintenance
    Infra {
        #[command(subcommand)]
        command: InfraSub,
    },
}

#[derive(Debug, Subcommand)]
pub enum InfraSub {
    /// Show who holds the deploy lock and clear it (asks unless --yes)
    Unlock {
        #[command(flatten)]
        project: Project,
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// The state itself: its history, reading and replacing it, moving it to another store
    ///
    /// Every store keeps the last `infra.state_history` (default 20) revisions of the state beside
    /// it. With `infra.state_encryption`, the state, its revisions and saved plans are stored
    /// encrypted, and these commands decrypt with the configured key (ENKSTATEKEY without it).
    State {
        #[command(subcommand)]
        command: StateSub,
    },
}

#[derive(Debug, Subcommand)]
pub enum StateSub {
    /// List the kept revisions, newest first: serial, time, who wrote it (host, pid, user, what
    /// run), the command line, and what changed from the revision before (+added ~changed -removed)
    History {
        #[command(flatten)]
        project: Project,
        /// Show at most this many
        #[arg(short = 'n', long, default_value_t = 20)]
        limit: usize,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print one kept revision (see `history`) as JSON
    Show {
        #[command(flatten)]
        project: Project,
        serial: u64,
    },
    /// Print the current state as JSON on stdout (decrypted), e.g. to keep a copy or to edit and push
    Pull {
        #[command(flatten)]
        project: Project,
    },
    /// Replace the state with the one in FILE (as `pull` prints it), under the deploy lock.
    ///
    /// Refused when its lineage is not the stored state's (another history), when its serial is
    /// older, or equal with other content; pushing the state `pull` printed is a no-op. --force
    /// writes it anyway, with the stored serial + 1.
    Push {
        #[command(flatten)]
        project: Project,
        /// The state to push (a file as `pull` prints it)
        #[arg(value_name = "FILE")]
        state_file: PathBuf,
        /// Replace the state whatever its lineage and serial
        #[arg(long)]
        force: bool,
    },
    /// Move the state to another store: a file path or a postgres://, s3://, gs://, vault:// URL.
    ///
    /// Under the deploy locks of both, copies the state (same lineage and serial) and its kept
    /// revisions, then marks the source migrated: a later run against it fails naming where the
    /// state went (ENKSTATEMIGRATED). Until that last step the source stays the state; a migration
    /// stopped half way says so on the next run and can be run again. Then set `infra.state` to
    /// the new store. Asks unless --yes.
    Migrate {
        #[command(flatten)]
        project: Project,
        /// Where the state goes
        #[arg(long)]
        to: String,
        /// Replace a state the destination already holds
        #[arg(long)]
        force: bool,
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// Prints `value` as pretty JSON on stdout, secrets masked.
fn json<T: serde::Serialize>(value: &T) {
    super::print_json(&mask::registered().to_json(value));
}

/// `text` with the loaded configurations' secrets masked.
fn masked(text: &str) -> String {
    mask::registered().mask(text)
}

fn run_opts(run: &RunArgs, events: Option<EventSink>, cancel: CancellationToken) -> RunOptions {
    RunOptions {
        concurrency: run.concurrency.max(1),
        lock_timeout: run.lock_timeout,
        stop_grace: run.stop_grace,
        events,
        cancel,
        ..RunOptions::default()
    }
}

/// Plain progress lines: `[ 1.2s] api          healthy`.
fn progress_printer() -> EventSink {
    let t0 = Instant::now();
    let tty = std::io::stderr().is_terminal();
    Arc::new(move |e: &Event| {
        let (pre, post) = if tty {
            match e.phase {
                Phase::Healthy | Phase::Deleted | Phase::Stopped => ("\x1b[32m", "\x1b[0m"),
                Phase::Failed => ("\x1b[31m", "\x1b[0m"),
                Phase::Skipped | Phase::Cancelled => ("\x1b[33m", "\x1b[0m"),
                _ => ("", ""),
            }
        } else {
            ("", "")
        };
        let mut line = format!(
            "[{:>6.1}s] {:<20} {pre}{:<12}{post}",
            t0.elapsed().as_secs_f64(),
            e.service,
            e.phase.as_str()
        );
        if matches!(e.phase, Phase::Healthy | Phase::Deleted | Phase::Failed) {
            line.push_str(&format!(" ({:.1}s)", e.elapsed_ms as f64 / 1000.0));
        }
        if let Some(m) = &e.message {
            if e.phase == Phase::Failed {
                line.push('\n');
                line.push_str(
                    &m.lines()
                        .map(|l| format!("    {l}"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
            } else {
                line.push_str(&format!(" {m}"));
            }
        }
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    })
}

/// A token cancelled by Ctrl-C while the returned guard lives.
fn ctrl_c_token() -> (CancellationToken, crate::sys::signal::Guard) {
    let token = CancellationToken::new();
    let notice = "interrupted: finishing the steps in progress, starting nothing new (Ctrl-C again to quit at once)…";
    let guard = crate::sys::signal::install(token.clone(), notice);
    (token, guard)
}

/// Runs an `up` / `down` as a recorded trace (local file, OTLP export when
/// configured), then says where the trace is and how the run went
/// (`verb`: 2 services … `up` / `restored`).
async fn traced(
    project: &Project,
    output: Output,
    verb: &str,
    load: engine::Load<'_>,
    command: engine::Command,
    opts: RunOptions,
) -> CliResult {
    let settings = crate::trace::Settings {
        log_to_stderr: true,
        ..Default::default()
    };
    let (r, tr, _) = engine::run_traced(
        project.file.clone(),
        project.env.clone(),
        settings,
        load,
        command,
        opts,
    )
    .await;
    print_trace(tr.as_ref());
    match r {
        Ok(report) => report_exit(&report, output, verb),
        Err(e) => engine_exit(e),
    }
}

fn print_trace(t: Option<&crate::trace::RunTrace>) {
    if let Some(t) = t {
        if let Some(f) = &t.file {
            errln!(
                "trace {}: {} (see `nanokit timeline {}`)",
                t.trace_id,
                masked(&f.display().to_string()),
                t.run
            );
        }
    }
}

fn report_exit(report: &Report, output: Output, verb: &str) -> CliResult {
    if output == Output::Json {
        json(report);
    }
    let failures = report.failures();
    if failures.is_empty() {
        if output == Output::Text {
            let changed = report
                .results
                .iter()
                .filter(|r| r.outcome != Phase::Unchanged)
                .count();
            errln!(
                "{verb}: {} service(s), {changed} changed.",
                report.results.len()
            );
        }
        Ok(exit::OK)
    } else {
        for f in &failures {
            errln!(
                "error[ENKFAILED]: {} {}: {}",
                f.service,
                f.outcome.as_str(),
                masked(f.error.as_deref().unwrap_or(""))
            );
        }
        Ok(exit::ERROR)
    }
}

/// Runs one reconciliation command. Its error, printed by the caller, is
/// masked like everything else the command prints.
pub async fn run(cmd: InfraCommand) -> CliResult {
    run_command(cmd).await.map_err(|mut e| {
        e.message = masked(&e.message);
        e
    })
}

async fn run_command(cmd: InfraCommand) -> CliResult {
    match cmd {
        InfraCommand::Validate { project, output } => validate(&project, output),
        InfraCommand::Graph { project, format } => graph(&project, format),
        InfraCommand::Plan {
            project,
            services,
            detailed_exitcode,
            output,
        } => plan(&project, services, detailed_exitcode, output).await,
        InfraCommand::Up {
            project,
            services,
            run,
            force,
            output,
        } => {
            let (cancel, _sigint) = ctrl_c_token();
            let mut opts = run_opts(&run, Some(progress_printer()), cancel);
            opts.force = force;
            opts.targets = services;
            let load = || load(&project);
            traced(&project, output, "up", Box::new(load), Command::Up, opts).await
        }
        InfraCommand::Down {
            project,
            services,
            run,
            volumes,
            yes,
            output,
        } => {
            if !yes {
                let which = if services.is_empty() {
                    "every service".to_string()
                } else {
                    format!("{} and what depends on them", services.join(", "))
                };
                let what = format!(
                    "Stop and remove {which} of {} (env {})",
                    super::hint::quote(&project.file.display().to_string()),
                    project.env
                );
                if volumes {
                    super::confirm(&format!(
                        "{what}, and delete all named volumes and their data?"
                    ))
                    .await?;
                } else if std::io::stdin().is_terminal() {
                    // From a terminal only: a script's `down` does not ask.
                    super::confirm(&format!("{what}?")).await?;
                }
            }
            let (cancel, _sigint) = ctrl_c_token();
            let mut opts = run_opts(&run, Some(progress_printer()), cancel);
            opts.targets = services;
            opts.volumes = volumes;
            let load = || load(&project);
            traced(
                &project,
                output,
                "down",
                Box::new(load),
                Command::Down,
                opts,
            )
            .await
        }
        InfraCommand::Restart {
            project,
            services,
            run,
            output,
        } => {
            let (cancel, _sigint) = ctrl_c_token();
            let opts = run_opts(&run, Some(progress_printer()), cancel);
            let load = || load(&project);
            let restart = Command::Restart(services);
            traced(&project, output, "restart", Box::new(load), restart, opts).await
        }
        InfraCommand::Watch(args) => super::watch::run(args).await,
        InfraCommand::Status {
            project,
            watcher,
            output,
        } => status(&project, watcher, output).await,
        InfraCommand::Logs {
            project,
            service,
            lines,
            follow,
        } => logs(&project, &service, lines, follow).await,
        InfraCommand::Drift {
            project,
            restore,
            output,
        } => drift(&project, restore, output).await,
        InfraCommand::Infra {
            command: InfraSub::Unlock { project, yes },
        } => unlock(&project, yes).await,
        InfraCommand::Infra {
            command: InfraSub::State { command },
        } => state_command(command).await,
    }
}

fn validate(project: &Project, output: Output) -> CliResult {
    let cfg = load(project)?;
    let dag = Dag::build(&cfg)?;
    if output == Output::Json {
        json(&serde_json::json!({
            "valid": true,
            "project": cfg.name,
            "env": cfg.env,
            "provider": cfg.provider,
            "services": dag.order(),
            "disabled": cfg.disabled,
            "warnings": cfg.warnings,
        }));
    } else {
        outln!(
            "{} is valid: project `{}`, environment `{}`, {} service(s), provider {}",
            project.file.display(),
            cfg.name,
            cfg.env,
            cfg.services.len(),
            cfg.provider.as_str()
        );
    }
    Ok(exit::OK)
}

fn graph(project: &Project, format: GraphFormat) -> CliResult {
    let cfg = load(project)?;
    let d = Dag::build(&cfg)?;
    match format {
        GraphFormat::Dot => out!("{}", d.to_dot(&cfg.name)),
        GraphFormat::Text => out!("{d}"),
    }
    Ok(exit::OK)
}

async fn plan(
    project: &Project,
    services: Vec<String>,
    detailed_exitcode: bool,
    output: Output,
) -> CliResult {
    let r = async {
        let cfg = load(project)?;
        engine::plan_and_save(
            &cfg,
            &PlanOptions {
                targets: services,
                ..PlanOptions::default()
            },
        )
        .await
    }
    .await;
    let (plan, path) = match r {
        Ok(r) => r,
        Err(e) => return engine_exit(e),
    };
    if output == Output::Json {
        json(&plan);
    } else {
        out!("{}", masked(&plan.render()));
        if !plan.blocked(false).is_empty() {
            outln!(
                "{}",
                super::hint::complete("Deleting volumes needs `nanokit up --force`.")
            );
        }
        errln!("Saved to {}", masked(&path.display().to_string()));
    }
    if detailed_exitcode && plan.has_changes() {
        Ok(exit::CHANGES)
    } else {
        Ok(exit::OK)
    }
}

async fn status(project: &Project, watcher_only: bool, output: Output) -> CliResult {
    if watcher_only {
        let cfg = load(project)?;
        let w = engine::watcher_of(&cfg);
        if output == Output::Json {
            let v = w.map(|(s, running)| {
                let mut v = serde_json::to_value(s).expect("status serialises");
                v["running"] = running.into();
                v
            });
            json(&v);
        } else {
            outln!("{}", watcher_line(w.as_ref()));
        }
        return Ok(exit::OK);
    }
    let r = async {
        let cfg = load(project)?;
        let rows = engine::status_of(&cfg).await?;
        Ok::<_, EngineError>((rows, engine::watcher_of(&cfg)))
    }
    .await;
    let (rows, watcher) = match r {
        Ok(r) => r,
        Err(e) => return engine_exit(e),
    };
    if output == Output::Json {
        json(&rows);
        return Ok(exit::OK);
    }
    if watcher.is_some() {
        outln!("{}", watcher_line(watcher.as_ref()));
    }
    if rows.is_empty() {
        outln!(
            "{}",
            super::hint::complete("Nothing deployed (run `nanokit up`).")
        );
        return Ok(exit::OK);
    }
    let watched = watcher.is_some();
    let mut head = format!(
        "{:<20} {:<13} {:<8} {:<8} {:<7}",
        "SERVICE", "STATUS", "RUNNING", "PID", "PORT"
    );
    if watched {
        head.push_str(&format!(
            " {:<9} {:<30} {:<13}",
            "RESTARTS", "LAST EXIT", "NEXT ATTEMPT"
        ));
    }
    outln!("{head} UPDATED");
    for r in &rows {
        let mut line = format!(
            "{:<20} {:<13} {:<8} {:<8} {:<7}",
            r.service,
            r.status,
            format!("{}/{}", r.running, r.instances.len()),
            r.pid.map_or("-".into(), |p| p.to_string()),
            r.port.map_or("-".into(), |p| p.to_string()),
        );
        if watched {
            let w = r.watch.as_ref();
            line.push_str(&format!(
                " {:<9} {:<30} {:<13}",
                w.map_or("-".into(), |w| w.restarts.to_string()),
                w.and_then(|w| w.last_exit.as_ref())
                    .map_or("-".into(), |e| e.text.clone()),
                w.and_then(|w| w.next_attempt.as_deref())
                    .and_then(|t| t
                        .split_once('T')
                        .map(|x| x.1.trim_end_matches('Z').to_string()))
                    .unwrap_or_else(|| "-".into()),
            ));
        }
        outln!("{line} {}", r.updated_at);
        if let Some(held) = r.watch.as_ref().and_then(|w| w.held.as_ref()) {
            outln!("    not restarted: {held}");
        }
        if let Some(e) = &r.error {
            // Masked again: a state written by an older nanokit may hold an
            // unmasked error.
            outln!("    {}", masked(e.lines().next().unwrap_or("")));
        }
    }
    Ok(exit::OK)
}

/// `Watcher: pid 12 on host, leading since …, epoch 3; last pass …; next
/// full check …`.
fn watcher_line(w: Option<&(engine::watch::status::WatchStatus, bool)>) -> String {
    let Some((s, running)) = w else {
        return "Watcher: none has led this project.".into();
    };
    let l = &s.leader;
    if !running {
        return format!(
            "Watcher: none running (the last one, pid {} on {}, {} at {}).",
            l.pid,
            l.host,
            if s.role == engine::watch::status::Role::Stopped {
                "stopped"
            } else {
                "died"
            },
            s.updated_at
        );
    }
    let mut line = format!(
        "Watcher: pid {} on {}, leading since {} (epoch {}, holder '{}')",
        l.pid, l.host, l.since, l.epoch, l.holder
    );
    match &s.last_pass {
        Some(p) => line.push_str(&format!(
            "; last pass {} ({}) {} at {}{}",
            p.pass,
            serde_json::to_value(p.reason)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            serde_json::to_value(p.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            p.finished_at,
            p.run
                .as_ref()
                .map(|r| format!(", trace {r}"))
                .unwrap_or_default()
        )),
        None => line.push_str("; no pass yet"),
    }
    if let Some(n) = &s.next_full_check {
        line.push_str(&format!("; next full check at {n}"));
    }
    line.push('.');
    line
}

async fn logs(project: &Project, service: &str, lines: usize, follow: bool) -> CliResult {
    let cfg = load(project)?;
    let path = cfg.log_file(service);
    if !path.exists() {
        return Err(CliError::new(
            "ENKNOLOGS",
            format!(
                "no logs for `{service}` in environment `{}` ({} does not exist)",
                cfg.env,
                path.display()
            ),
        ));
    }
    let text = std::fs::read(&path).unwrap_or_default();
    // The service's own output is in the log as it wrote it: masked here,
    // when it is shown.
    outln!("{}", masked(&tail(&String::from_utf8_lossy(&text), lines)));
    if !follow {
        return Ok(exit::OK);
    }
    let (cancel, _sigint) = ctrl_c_token();
    let mut pos = text.len() as u64;
    while !cancel.is_cancelled() && !super::out::closed() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(bytes) = std::fs::read(&path) {
            if (bytes.len() as u64) > pos {
                out!(
                    "{}",
                    masked(&String::from_utf8_lossy(&bytes[pos as usize..]))
                );
                pos = bytes.len() as u64;
            } else if (bytes.len() as u64) < pos {
                pos = 0;
            }
        }
    }
    Ok(exit::OK)
}

async fn drift(project: &Project, restore: bool, output: Output) -> CliResult {
    let cfg = load(project)?;
    let provider = engine::provider_for(&cfg)?;
    let report = match engine::drift::detect(&cfg, provider.as_ref()).await {
        Ok(r) => r,
        Err(e) => return engine_exit(e),
    };
    if output == Output::Json {
        json(&report);
    } else if !report.drifted {
        outln!("No drift: every recorded service is running with its configuration.");
    } else {
        for i in &report.items {
            outln!(
                "{:<20} {:<15} {}",
                i.service,
                serde_json::to_value(i.kind)
                    .expect("kind")
                    .as_str()
                    .unwrap_or(""),
                super::hint::complete(&masked(&i.detail))
            );
        }
    }
    if !report.drifted {
        return Ok(exit::OK);
    }
    if !restore {
        return Ok(exit::CHANGES);
    }
    let (cancel, _sigint) = ctrl_c_token();
    let opts = RunOptions {
        events: Some(progress_printer()),
        cancel,
        ..RunOptions::default()
    };
    let load = Box::new(|| Ok(cfg));
    traced(project, Output::Text, "restored", load, Command::Up, opts).await
}

/// `nanokit infra unlock`: show who holds the deploy lock, ask, clear it
/// (through the state's backend, wherever it lives).
async fn unlock(project: &Project, yes: bool) -> CliResult {
    let cfg = load(project)?;
    let (location, held) = state::lock::inspect(&cfg).await?;
    let Some(held) = held else {
        outln!("The deploy lock of {location} is not held.");
        return Ok(exit::OK);
    };
    outln!("The deploy lock of {location} is held by {held}.");
    if !yes {
        super::confirm("Clear it? Only do this when that run is really gone.").await?;
    }
    state::lock::force_unlock(&cfg).await?;
    outln!("Cleared. The holder, if still running, will find its lock lost and stop; its state writes are refused once another run takes the lock.");
    Ok(exit::OK)
}

/// `nanokit infra state …`.
async fn state_command(cmd: StateSub) -> CliResult {
    use crate::state::manage;
    match cmd {
        StateSub::History {
            project,
            limit,
            output,
        } => {
            let cfg = load(&project)?;
            let revisions = manage::history(&cfg, limit).await?;
            if output == Output::Json {
                json(&revisions);
                return Ok(exit::OK);
            }
            if revisions.is_empty() {
                outln!("No revision is kept (nothing written yet, or infra.state_history is 0).");
                return Ok(exit::OK);
            }
            outln!(
                "{:<7} {:<25} {:<40} CHANGES / COMMAND",
                "SERIAL",
                "WRITTEN",
                "BY"
            );
            for r in &revisions {
                outln!(
                    "{:<7} {:<25} {:<40} {}",
                    r.serial,
                    r.at.as_deref().unwrap_or("-"),
                    r.holder.as_deref().unwrap_or("-"),
                    masked(
                        r.changes
                            .as_deref()
                            .unwrap_or("(revision before it not kept)")
                    )
                );
                if let Some(c) = r.command.as_deref().filter(|c| !c.is_empty()) {
                    outln!("{:<74} `{}`", "", masked(c));
                }
            }
            Ok(exit::OK)
        }
        StateSub::Show { project, serial } => {
            let cfg = load(&project)?;
            json(&manage::show(&cfg, serial).await?);
            Ok(exit::OK)
        }
        StateSub::Pull { project } => {
            let cfg = load(&project)?;
            match manage::pull(&cfg).await? {
                Some(st) => {
                    // As stored (unmasked): a pull is meant to be pushed back.
                    super::print_json(&st);
                    Ok(exit::OK)
                }
                None => Err(CliError::new(
                    "ENKSTATE",
                    format!(
                        "no state is stored at {} yet (run `nanokit up` first)",
                        state::Location::of(&cfg).display()
                    ),
                )),
            }
        }
        StateSub::Push {
            project,
            state_file,
            force,
        } => {
            let cfg = load(&project)?;
            let bytes = std::fs::read(&state_file).map_err(|e| {
                CliError::new(
                    "ENKIO",
                    format!("cannot read {}: {e}", state_file.display()),
                )
            })?;
            let (cancel, _sigint) = ctrl_c_token();
            match manage::push(&cfg, &bytes, force, &cancel).await? {
                manage::Pushed::Unchanged { serial } => {
                    errln!(
                        "The stored state is already this one (serial {serial}): nothing written."
                    )
                }
                manage::Pushed::Written { serial } => errln!(
                    "Pushed: the state at {} is now serial {serial}.",
                    state::Location::of(&cfg).display()
                ),
            }
            Ok(exit::OK)
        }
        StateSub::Migrate {
            project,
            to,
            force,
            yes,
        } => {
            let cfg = load(&project)?;
            let dest = manage::destination(&cfg, &to)?.display();
            if !yes {
                super::confirm(&format!(
                    "Move the state from {} to {dest}?",
                    state::Location::of(&cfg).display()
                ))
                .await?;
            }
            let (cancel, _sigint) = ctrl_c_token();
            let m = manage::migrate(&cfg, &to, force, &cancel).await?;
            errln!(
                "Migrated the state (lineage {}, serial {}, {} revision(s)) from {} to {}. Set `infra.state` to it: the old store now refuses runs.",
                m.lineage, m.serial, m.revisions, m.from, m.to
            );
            Ok(exit::OK)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_accept_fractions_and_inf_and_refuse_the_rest() {
        assert_eq!(seconds("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(seconds("0"), Ok(Duration::ZERO));
        assert_eq!(seconds("inf"), Ok(Duration::from_secs(1_000_000_000)));
        for bad in ["-1", "nan", "soon", ""] {
            assert!(seconds(bad).is_err(), "{bad}");
        }
    }
}
