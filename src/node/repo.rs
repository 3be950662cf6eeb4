//! JS bindings of package repository coordination (`crate::repo`).

use std::path::{Path, PathBuf};
use std::sync::{LazyLock, RwLock};

use napi::bindgen_prelude::PromiseRaw;
use napi::{Env, Result};
use napi_derive::napi;

use super::lock::lock_options;
use super::{cancel_token, duration_ms, js_err, ms, AbortHandle};
use crate::repo::{self, Begin, InstallOutcome, InstallTxn, NpmOptions, PackageSpec};

/// Options of `install` / `beginInstall`.
#[napi(object)]
#[derive(Default)]
pub struct InstallOptions {
    /// Stale period of the package lock (ms). Default 30000.
    pub stale_ms: Option<f64>,
    /// Give up waiting for another installer after this long (`ENKLOCKED`).
    pub timeout_ms: Option<f64>,
    /// Label shown to others while we install.
    pub holder: Option<String>,
    /// The npm executable. Default `npm` on PATH.
    pub npm_path: Option<String>,
    /// Extra arguments for `npm install`.
    pub npm_args: Option<Vec<String>>,
    /// npm runs at most, retrying transient failures (ECONNRESET, ETIMEDOUT,
    /// EAI_AGAIN, HTTP 5xx and 429) with exponential backoff and jitter.
    /// Default 3.
    pub retries: Option<u32>,
    /// No retry starts whose backoff would end later than this (ms) after
    /// the first attempt. Default 30000.
    pub retry_budget_ms: Option<f64>,
    /// The backoff before the first retry (ms), doubled for each next one
    /// (±50 % jitter). Default 1000.
    pub retry_delay_ms: Option<f64>,
    /// At most this many installers at once per repo and host, across
    /// processes. Default: the number of cores.
    pub max_concurrent_installs: Option<u32>,
}

impl InstallOptions {
    fn to_engine(&self) -> Result<repo::InstallOptions> {
        Ok(repo::InstallOptions {
            lock: lock_options(self.stale_ms, self.timeout_ms, self.holder.clone())
                .map_err(js_err)?,
            npm: NpmOptions {
                npm: self
                    .npm_path
                    .as_ref()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("npm")),
                extra_args: self.npm_args.clone().unwrap_or_default(),
                retry: {
                    let d = repo::RetryOptions::default();
                    repo::RetryOptions {
                        attempts: self.retries.unwrap_or(d.attempts).max(1),
                        budget: self.retry_budget_ms.map_or(d.budget, ms),
                        first_delay: self.retry_delay_ms.map_or(d.first_delay, ms),
                    }
                },
            },
            max_concurrent: self.max_concurrent_installs.map(|n| n.max(1) as usize),
        })
    }
}

/// The result of an install call.
#[napi(object)]
pub struct InstallResult {
    /// True if this call installed it; false if it already was installed
    /// (possibly by another process while this one waited).
    pub installed: bool,
    /// Time spent waiting for another process's install (ms).
    pub waited_ms: f64,
    /// Time of the whole call (ms).
    pub duration_ms: f64,
    /// How many times nanokit's installer ran (npm, or its direct installer
    /// where the package needs nothing more; 0 when this call did not
    /// install, or a custom installer did).
    pub attempts: u32,
}

impl From<InstallOutcome> for InstallResult {
    fn from(o: InstallOutcome) -> Self {
        InstallResult {
            installed: o.installed,
            waited_ms: duration_ms(o.waited),
            duration_ms: duration_ms(o.duration),
            attempts: o.attempts,
        }
    }
}

/// Install probes made for JS, by id (see [`repo::InstallProbe`]). JS keeps
/// the id of each (repo, specifier) it asked about (`probe` in nanokit.js),
/// so a repeated question crosses into Rust with one number and costs two
/// stats.
static PROBES: LazyLock<RwLock<Vec<repo::InstallProbe>>> = LazyLock::new(Default::default);

/// A new install probe for `specifier` (`name@version`) in `repoDir`; its id
/// is for `probeInstalled`. Throws `ENKSPEC` for a malformed specifier.
#[napi]
pub fn install_probe(repo_dir: String, specifier: String) -> Result<u32> {
    let probe = repo::InstallProbe::new(Path::new(&repo_dir), &specifier).map_err(js_err)?;
    let mut probes = PROBES.write().unwrap_or_else(|e| e.into_inner());
    probes.push(probe);
    Ok(probes.len() as u32 - 1)
}

/// Whether the package of install probe `id` is completely installed now
/// (`probeInstalled`, see `raw.rs`). Lock-free and synchronous.
pub(super) fn probe_installed(id: u32) -> bool {
    PROBES
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(id as usize)
        .is_some_and(repo::InstallProbe::installed_for_use)
}

/// Installs `specifier` into `repoDir` with nanokit's npm installer, exactly
/// once across all processes sharing the directory.
#[napi(js_name = "installNative")]
pub fn install<'env>(
    env: &'env Env,
    repo_dir: String,
    specifier: String,
    options: Option<InstallOptions>,
    abort: Option<&AbortHandle>,
) -> Result<PromiseRaw<'env, InstallResult>> {
    crate::trace::init_global(false);
    let opts = options.unwrap_or_default().to_engine()?;
    let cancel = cancel_token(abort);
    env.spawn_future(async move {
        repo::install(Path::new(&repo_dir), &specifier, &opts, &cancel)
            .await
            .map(Into::into)
            .map_err(js_err)
    })
}

/// An install in progress (package lock held, staging directory ready), or
/// the news that there is nothing to install.
#[napi]
pub struct InstallTransaction {
    txn: Option<InstallTxn>,
    already: Option<InstallOutcome>,
    staging_dir: Option<String>,
}

#[napi]
impl InstallTransaction {
    /// True if the package was (or became, while waiting) installed: nothing to do.
    #[napi(getter)]
    pub fn already_installed(&self) -> bool {
        self.already.is_some()
    }

    /// The outcome when already installed.
    #[napi(getter)]
    pub fn result(&self) -> Option<InstallResult> {
        self.already.map(Into::into)
    }

    /// Where to install: the installer must produce
    /// `<stagingDir>/node_modules/<name>_<version>`.
    #[napi(getter)]
    pub fn staging_dir(&self) -> Option<String> {
        self.staging_dir.clone()
    }

    /// Publishes the staged package, records it, writes the sentinel and
    /// releases the lock.
    #[napi]
    pub fn commit<'env>(&mut self, env: &'env Env) -> Result<PromiseRaw<'env, InstallResult>> {
        let txn = self.txn.take();
        env.spawn_future(async move {
            let txn = txn.ok_or_else(|| {
                napi::Error::from_reason("ENKINSTALL: this install transaction is already finished")
            })?;
            txn.commit().await.map(Into::into).map_err(js_err)
        })
    }

    /// Gives up: removes the staging directory and releases the lock.
    #[napi]
    pub fn abort(&mut self) {
        if let Some(txn) = self.txn.take() {
            txn.abort();
        }
    }
}

/// Takes the package's lock and prepares a staging directory, unless the
/// package is (or, while waiting, becomes) installed. For callers that bring
/// their own installer.
#[napi]
pub fn begin_install<'env>(
    env: &'env Env,
    repo_dir: String,
    specifier: String,
    options: Option<InstallOptions>,
    abort: Option<&AbortHandle>,
) -> Result<PromiseRaw<'env, InstallTransaction>> {
    crate::trace::init_global(false);
    let opts = options.unwrap_or_default().to_engine()?;
    let cancel = cancel_token(abort);
    let spec = PackageSpec::parse(&specifier).map_err(|e| js_err(repo::RepoError::from(e)))?;
    env.spawn_future(async move {
        match repo::begin_install(Path::new(&repo_dir), &spec, &opts, &cancel).await {
            Ok(Begin::AlreadyInstalled(o)) => Ok(InstallTransaction {
                txn: None,
                already: Some(o),
                staging_dir: None,
            }),
            // The caller's installer runs within an installer slot too.
            Ok(Begin::Started(mut txn)) => {
                txn.hold_slot(opts.max_concurrent(), &cancel)
                    .await
                    .map_err(js_err)?;
                Ok(InstallTransaction {
                    staging_dir: Some(txn.staging_dir().to_string_lossy().into_owned()),
                    txn: Some(txn),
                    already: None,
                })
            }
            Err(e) => Err(js_err(e)),
        }
    })
}

/// Options of `provision`.
#[napi(object)]
pub struct ProvisionOptions {
    /// The install command as an argument vector (no shell).
    pub command: Vec<String>,
    /// Files whose contents decide whether to install again.
    pub manifests: Option<Vec<String>>,
    /// Working directory of the command (default: the provisioned directory).
    pub cwd: Option<String>,
    pub stale_ms: Option<f64>,
    pub timeout_ms: Option<f64>,
    pub holder: Option<String>,
    /// Capture the command's output into the result instead of inheriting
    /// stdout/stderr. Default true.
    pub capture: Option<bool>,
}

/// What `provision` did.
#[napi(object)]
pub struct ProvisionResult {
    /// True if this call ran the command; false if it was already done.
    pub ran: bool,
    /// The manifest hash; the sentinel is `.nk-installed-<hash>`.
    pub hash: String,
    pub waited_ms: f64,
    pub duration_ms: f64,
    /// The command's output, when captured and run.
    pub output: Option<String>,
}

/// Runs `command` in `dir` once per manifest hash, under the global lock
/// `<dir>/.nk-install-lock` and the sentinel `<dir>/.nk-installed-<hash>`.
#[napi(js_name = "provisionNative")]
pub fn provision<'env>(
    env: &'env Env,
    dir: String,
    options: ProvisionOptions,
    abort: Option<&AbortHandle>,
) -> Result<PromiseRaw<'env, ProvisionResult>> {
    crate::trace::init_global(false);
    let opts = repo::ProvisionOptions {
        lock: lock_options(options.stale_ms, options.timeout_ms, options.holder.clone())
            .map_err(js_err)?,
        cwd: options.cwd.map(PathBuf::from),
        capture: options.capture.unwrap_or(true),
    };
    let manifests: Vec<PathBuf> = options
        .manifests
        .unwrap_or_default()
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let command = options.command;
    let cancel = cancel_token(abort);
    env.spawn_future(async move {
        repo::provision(Path::new(&dir), &command, &manifests, &opts, &cancel)
            .await
            .map(|o| ProvisionResult {
                ran: o.ran,
                hash: o.hash,
                waited_ms: duration_ms(o.waited),
                duration_ms: duration_ms(o.duration),
                output: o.output,
            })
            .map_err(js_err)
    })
}

/// What `repo status` shows (JSON; see `RepoStatus` in nanokit.d.ts).
/// Versions unused for `olderThanMs` (default 30 days) are gc candidates.
#[napi(js_name = "repoStatus")]
pub fn repo_status<'env>(
    env: &'env Env,
    repo_dir: String,
    older_than_ms: Option<f64>,
) -> Result<PromiseRaw<'env, serde_json::Value>> {
    env.spawn_future(async move {
        tokio::task::spawn_blocking(move || {
            let older = older_than_ms.map_or(repo::DEFAULT_UNUSED, ms);
            repo::status_with(Path::new(&repo_dir), older)
                .map(|s| serde_json::to_value(s).expect("status serialises"))
                .map_err(js_err)
        })
        .await
        .map_err(|e| napi::Error::from_reason(e.to_string()))?
    })
}

/// Options of `repo.gc`.
#[napi(object)]
#[derive(Default)]
pub struct GcOptions {
    /// Also remove installed versions not used for this long (ms).
    pub older_than_ms: Option<f64>,
    /// Report only; remove nothing.
    pub dry_run: Option<bool>,
}

/// `repo gc` (JSON report; see `GcReport` in nanokit.d.ts).
#[napi(js_name = "repoGc")]
pub fn repo_gc<'env>(
    env: &'env Env,
    repo_dir: String,
    options: Option<GcOptions>,
) -> Result<PromiseRaw<'env, serde_json::Value>> {
    let options = options.unwrap_or_default();
    let opts = repo::GcOptions {
        older_than: options.older_than_ms.map(ms),
        dry_run: options.dry_run.unwrap_or(false),
    };
    env.spawn_future(async move {
        repo::gc(Path::new(&repo_dir), &opts)
            .await
            .map(|r| serde_json::to_value(r).expect("report serialises"))
            .map_err(js_err)
    })
}

/// `repo adopt` (JSON report; see `AdoptReport` in nanokit.d.ts).
#[napi(js_name = "repoAdopt")]
pub fn repo_adopt(env: &Env, repo_dir: String) -> Result<PromiseRaw<'_, serde_json::Value>> {
    env.spawn_future(async move {
        repo::adopt(Path::new(&repo_dir))
            .await
            .map(|r| serde_json::to_value(r).expect("report serialises"))
            .map_err(js_err)
    })
}
