//! `nanokit repo …` and `nanokit provision`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use super::{exit, lock::describe, parse_duration, print_json, CliError, CliResult, OutputFormat};
use crate::lock::LockOptions;
use crate::repo::{
    self, InstallOptions, InstallOutcome, NpmOptions, ProvisionOptions, RepoError, StagingEntry,
};

#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Show installed packages, held locks and their holders, and leftovers of interrupted installs
    Status {
        /// The package repository directory
        repo_dir: PathBuf,
        /// Show versions unused for this long as gc candidates
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        older_than: Duration,
        #[arg(long, short, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Remove what nobody needs: store files no package links to, staging trees of dead installers, and (with --older-than) versions not used for that long
    ///
    /// A version is removed under its package lock (a version being installed
    /// is left alone): its sentinel first (workers then see it as not
    /// installed and install it again on their next use), then one rename
    /// takes it out of node_modules, then its package.json entry goes, then
    /// its files are deleted. A worker's use is recorded when it asks whether
    /// a package is installed (at most hourly per process) and at install.
    #[command(
        after_help = "Examples:\n  nanokit repo gc /shared/repo --dry-run\n  nanokit repo gc /shared/repo --older-than 30d --yes"
    )]
    Gc {
        repo_dir: PathBuf,
        /// Also remove versions not used for this long (e.g. 30d)
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// Only say what would be removed
        #[arg(long)]
        dry_run: bool,
        /// Do not ask before removing versions
        #[arg(long, short)]
        yes: bool,
        #[arg(long, short, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Take over a repo populated by plain `npm install` of aliases (OpenFn's runtime) or by the PR #1416 lock, without reinstalling
    ///
    /// Each package listed in package.json is checked (its package.json names
    /// the alias's name and version, its entry point exists, its dependencies
    /// resolve, and npm's node_modules/.package-lock.json or a PR #1416
    /// sentinel records its install as finished). Then its files move into
    /// the store (read-only links, same bytes) and nanokit's sentinel is
    /// written. npm never runs. What does not verify is listed and left to
    /// the next install.
    Adopt {
        repo_dir: PathBuf,
        #[arg(long, short, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Install packages (name@version) exactly once across all processes sharing the repository
    ///
    /// Each package is installed with npm into a private staging directory and
    /// published into <repo>/node_modules/<name>_<version> with one rename, so
    /// it is visible only when complete. If another process is installing it,
    /// this waits and then skips. Different packages install in parallel.
    Install {
        repo_dir: PathBuf,
        /// Package specifiers, e.g. @openfn/language-http@7.2.0
        #[arg(required = true)]
        specs: Vec<String>,
        /// The npm executable
        #[arg(long, default_value = "npm", env = "NANOKIT_NPM")]
        npm: PathBuf,
        /// Extra argument for `npm install` (repeatable), e.g. --npm-arg=--registry=http://…
        #[arg(long = "npm-arg", allow_hyphen_values = true)]
        npm_args: Vec<String>,
        /// Give up waiting for another installer after this long
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// Take over a lock whose heartbeat stopped for this long
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        stale: Duration,
        /// npm runs per package at most, retrying transient failures (ECONNRESET, ETIMEDOUT, EAI_AGAIN, HTTP 5xx and 429)
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        attempts: u32,
        /// No retry starts whose backoff would end later than this after the first attempt
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        retry_budget: Duration,
        /// At most this many installers at once in this repo on this host, across processes (default: the number of cores)
        #[arg(long, env = "NANOKIT_MAX_CONCURRENT_INSTALLS", value_parser = clap::value_parser!(u32).range(1..))]
        max_concurrent_installs: Option<u32>,
        #[arg(long, short, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

/// `nanokit provision`
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  nanokit provision --dir /data/app --manifest package.json --manifest package-lock.json -- npm ci"
)]
pub struct ProvisionArgs {
    /// The shared directory (holds .nk-install-lock and .nk-installed-<hash>)
    #[arg(long)]
    dir: PathBuf,
    /// A file whose content decides whether to install again (repeatable)
    #[arg(long = "manifest")]
    manifests: Vec<PathBuf>,
    /// Working directory of the command (default: --dir)
    #[arg(long)]
    cwd: Option<PathBuf>,
    /// Give up waiting for another installer after this long
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Take over a lock whose heartbeat stopped for this long
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    stale: Duration,
    #[arg(long, short, value_enum, default_value_t)]
    output: OutputFormat,
    /// The install command and its arguments (run without a shell)
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn when(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub async fn run(cmd: RepoCommand) -> CliResult {
    match cmd {
        RepoCommand::Status {
            repo_dir,
            older_than,
            output,
        } => status(&repo_dir, older_than, output),
        RepoCommand::Gc {
            repo_dir,
            older_than,
            dry_run,
            yes,
            output,
        } => gc(&repo_dir, older_than, dry_run, yes, output).await,
        RepoCommand::Adopt { repo_dir, output } => adopt(&repo_dir, output).await,
        RepoCommand::Install {
            repo_dir,
            specs,
            npm,
            npm_args,
            timeout,
            stale,
            attempts,
            retry_budget,
            max_concurrent_installs,
            output,
        } => {
            let opts = InstallOptions {
                lock: LockOptions {
                    stale,
                    timeout,
                    holder: Some(format!("nanokit repo install (pid {})", std::process::id())),
                },
                npm: NpmOptions {
                    npm,
                    extra_args: npm_args,
                    retry: repo::RetryOptions {
                        attempts,
                        budget: retry_budget,
                        ..Default::default()
                    },
                },
                max_concurrent: max_concurrent_installs.map(|n| n as usize),
            };
            install(&repo_dir, &specs, &opts, output).await
        }
    }
}

/// `nanokit repo status`: installed packages, held locks, leftovers and
/// staging directories, one section each.
fn status(repo_dir: &Path, older_than: Duration, output: OutputFormat) -> CliResult {
    let status = repo::status_with(repo_dir, older_than)?;
    if output == OutputFormat::Json {
        print_json(&status);
        return Ok(exit::OK);
    }
    outln!("repository {}", status.dir.display());
    outln!("\ninstalled ({})", status.installed.len());
    for p in &status.installed {
        outln!(
            "  {:<48} {}{}",
            p.specifier,
            when(p.installed_at_ms),
            if p.verified {
                ""
            } else {
                "  MODIFIED: package.json differs from the install"
            }
        );
    }
    outln!("\nlocks held ({})", status.locks.len());
    for l in &status.locks {
        outln!("  {}", l.path.display());
        for line in describe(l).lines() {
            outln!("    {line}");
        }
    }
    outln!(
        "\npackages without a sentinel, no install in progress ({})",
        status.leftovers.len()
    );
    for p in &status.leftovers {
        outln!("  {}", p.display());
    }
    if !status.leftovers.is_empty() {
        outln!("  (an interrupted install: replaced by the next install of that package; or put there by another tool: `nanokit repo adopt` takes it over)");
    }
    outln!("\nstaging directories ({})", status.staging.len());
    for s in &status.staging {
        print_staging(s);
    }
    print_store(&status);
    Ok(exit::OK)
}

/// Bytes for people: `12.3 MB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The store and gc sections of `repo status`.
fn print_store(status: &repo::RepoStatus) {
    match &status.store {
        None => outln!("\nstore: none yet (made by the first install)"),
        Some(s) => {
            outln!(
                "\nstore: {} files, {}",
                s.usage.files,
                human_bytes(s.usage.bytes)
            );
            outln!(
                "  packages: {} as separate copies, {} on disk: sharing ratio {:.2}",
                human_bytes(s.package_bytes),
                human_bytes(s.disk_bytes),
                s.sharing_ratio
            );
        }
    }
    let gc = &status.gc;
    outln!("\ngc candidates (`nanokit repo gc`)");
    outln!(
        "  store files no package links to: {} ({})",
        gc.store_files,
        human_bytes(gc.store_bytes)
    );
    outln!("  orphaned staging trees: {}", gc.orphaned_staging.len());
    outln!(
        "  versions unused for {}: {}{}",
        humantime::format_duration(Duration::from_millis(gc.older_than_ms)),
        gc.unused.len(),
        if gc.unused.is_empty() {
            String::new()
        } else {
            format!(
                " ({}; removed only with --older-than)",
                gc.unused.join(", ")
            )
        }
    );
}

/// One staging directory of `repo status`: its path, then who owns it.
fn print_staging(s: &StagingEntry) {
    outln!("  {}", s.path.display());
    if s.trash {
        outln!("    trash of an earlier attempt, being removed");
    } else if let Some(o) = &s.owner {
        let alive = match s.owner_alive {
            Some(true) => "alive",
            Some(false) => "dead",
            None => "on another host",
        };
        let installer = match (o.installer_pid, s.installer_running) {
            (Some(p), Some(true)) => format!(", installer pid {p} running"),
            (Some(p), Some(false)) => format!(", installer pid {p} gone"),
            (Some(p), None) => format!(", installer pid {p}"),
            (None, _) => String::new(),
        };
        outln!(
            "    owner pid {} on {} ({alive}){installer}",
            o.pid,
            o.hostname
        );
    } else {
        outln!("    no owner record");
    }
    if s.orphaned {
        outln!("    orphaned: removed by the next install of any package");
    }
}

/// `nanokit repo gc`: asks before removing versions (unless `--yes` or a
/// dry run), then reports what was removed.
async fn gc(
    repo_dir: &Path,
    older_than: Option<Duration>,
    dry_run: bool,
    yes: bool,
    output: OutputFormat,
) -> CliResult {
    if older_than.is_some() && !dry_run && !yes {
        let plan = repo::gc(
            repo_dir,
            &repo::GcOptions {
                older_than,
                dry_run: true,
            },
        )
        .await?;
        if !plan.removed.is_empty() {
            let question = format!(
                "remove {} version(s) not used for {} from {} ({})?",
                plan.removed.len(),
                humantime::format_duration(older_than.unwrap_or_default()),
                repo_dir.display(),
                plan.removed.join(", ")
            );
            super::confirm(&question).await?;
        }
    }
    let report = repo::gc(
        repo_dir,
        &repo::GcOptions {
            older_than,
            dry_run,
        },
    )
    .await?;
    if output == OutputFormat::Json {
        print_json(&report);
        return Ok(exit::OK);
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    outln!(
        "{verb}: {} version(s){}",
        report.removed.len(),
        if report.removed.is_empty() {
            String::new()
        } else {
            format!(" ({})", report.removed.join(", "))
        }
    );
    for k in &report.kept {
        outln!("kept {}: {}", k.specifier, k.reason);
    }
    outln!(
        "{verb}: {} staging tree(s) of finished or dead installs",
        report.staging.len()
    );
    outln!(
        "{verb}: {} store file(s) no package links to ({})",
        report.store.files,
        human_bytes(report.store.bytes)
    );
    if older_than.is_none() {
        outln!("(versions are removed only with --older-than, e.g. --older-than 30d)");
    }
    Ok(exit::OK)
}

/// `nanokit repo adopt`.
async fn adopt(repo_dir: &Path, output: OutputFormat) -> CliResult {
    let report = repo::adopt(repo_dir).await?;
    if output == OutputFormat::Json {
        print_json(&report);
        return Ok(exit::OK);
    }
    outln!(
        "adopted {} package(s){}",
        report.adopted.len(),
        if report.adopted.is_empty() {
            String::new()
        } else {
            format!(": {}", report.adopted.join(", "))
        }
    );
    if !report.already.is_empty() {
        outln!("already nanokit's: {}", report.already.join(", "));
    }
    for s in &report.skipped {
        outln!("skipped {}: {}", s.alias, s.reason);
    }
    if !report.skipped.is_empty() {
        outln!("(skipped packages are installed again by nanokit on first use)");
    }
    Ok(exit::OK)
}

/// `nanokit repo install`: every specifier is validated before any install
/// starts; then all install in parallel and each result is reported.
async fn install(
    repo_dir: &Path,
    specs: &[String],
    opts: &InstallOptions,
    output: OutputFormat,
) -> CliResult {
    // Validate every specifier before installing any.
    for s in specs {
        repo::PackageSpec::parse(s).map_err(repo::RepoError::from)?;
    }
    let cancel = CancellationToken::new();
    let jobs = specs.iter().map(|s| {
        let cancel = &cancel;
        async move { (s, repo::install(repo_dir, s, opts, cancel).await) }
    });
    let results = futures::future::join_all(jobs).await;
    report_installs(results, output)
}

/// Prints one line (text) or one object (JSON) per install. With any failure
/// the exit status is 1; in JSON mode the first error is also returned, so
/// it is printed as the command's error.
fn report_installs(
    results: Vec<(&String, Result<InstallOutcome, RepoError>)>,
    output: OutputFormat,
) -> CliResult {
    let mut failed = None;
    let mut json = Vec::new();
    for (spec, r) in results {
        match r {
            Ok(o) => {
                if output == OutputFormat::Text {
                    let what = if o.installed {
                        "installed"
                    } else {
                        "already installed"
                    };
                    outln!(
                        "{spec}: {what} ({} ms, waited {} ms)",
                        o.duration.as_millis(),
                        o.waited.as_millis()
                    );
                }
                json.push(serde_json::json!({"specifier": spec, "installed": o.installed,
                    "waitedMs": o.waited.as_millis() as u64, "durationMs": o.duration.as_millis() as u64}));
            }
            Err(e) => {
                json.push(serde_json::json!({"specifier": spec, "error": e.to_string()}));
                if output == OutputFormat::Text {
                    errln!("error[{}]: {e}", crate::error::ErrorCode::code(&e));
                }
                failed.get_or_insert(CliError::from(e));
            }
        }
    }
    if output == OutputFormat::Json {
        print_json(&json);
    }
    match failed {
        Some(e) if output == OutputFormat::Json => Err(e),
        Some(_) => Ok(exit::ERROR),
        None => Ok(exit::OK),
    }
}

pub async fn provision(args: ProvisionArgs) -> CliResult {
    let opts = ProvisionOptions {
        lock: LockOptions {
            stale: args.stale,
            timeout: args.timeout,
            holder: Some(format!("nanokit provision (pid {})", std::process::id())),
        },
        cwd: args.cwd,
        capture: false,
    };
    let o = repo::provision(
        &args.dir,
        &args.command,
        &args.manifests,
        &opts,
        &CancellationToken::new(),
    )
    .await?;
    match args.output {
        OutputFormat::Json => print_json(&o),
        OutputFormat::Text if o.ran => outln!(
            "provisioned {} (hash {}) in {} ms",
            args.dir.display(),
            o.hash,
            o.duration.as_millis()
        ),
        OutputFormat::Text => outln!(
            "already provisioned {} (hash {}); skipped{}",
            args.dir.display(),
            o.hash,
            if o.waited > Duration::from_millis(1) {
                format!(
                    " after waiting {} ms for another installer",
                    o.waited.as_millis()
                )
            } else {
                String::new()
            }
        ),
    }
    Ok(exit::OK)
}
