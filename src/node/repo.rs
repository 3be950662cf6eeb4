//! JS bindings of package repository coordination (`crate::repo`).

use std::path::{Path, PathBuf};
use std::sync::{LazyLock, RwLock};

use napi::bindgen_prelude::PromiseRaw;
use napi::{Env, Result};
use napi_derive::napi;

use super::lock::lock_options;
use super::{cancel_token, duration_ms, js_err, AbortHandle};
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
            },
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
}

impl From<InstallOutcome> for InstallResult {
    fn from(o: InstallOutcome) -> Self {
        InstallResult {
            installed: o.installed,
            waited_ms: duration_ms(o.waited),
            duration_ms: duration_ms(o.duration),
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
            Ok(Begin::Started(txn)) => Ok(InstallTransaction {
                staging_dir: Some(txn.staging_dir().to_string_lossy().into_owned()),
                txn: Some(txn),
                already: None,
            }),
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
