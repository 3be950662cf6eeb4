//! Shared package repositories: each package installed exactly once, safely,
//! by many processes on many hosts sharing one directory.
//!
//! Layout (what OpenFn's runtime reads, plus nanokit's bookkeeping):
//!
//! ```text
//! <repo>/package.json                      dependencies: { "<alias>": "npm:<name>@<version>" }
//! <repo>/node_modules/<alias>/             the package, complete or absent
//! <repo>/.locks/<key>.lock                 per-package lease lock
//! <repo>/.locks/.package-json.lock         short repo-wide lock for package.json
//! <repo>/.sentinels/<key>.done             written last: the install is complete
//! <repo>/.staging/<key>.<token>/           private install directory of one attempt
//! ```
//!
//! An install runs in its private staging directory (so two installs never
//! share an npm tree), is published into `node_modules` with one `rename`,
//! then recorded in `package.json` (atomic write under the repo-wide lock), and
//! only then is the sentinel written. "Installed" means: the sentinel exists
//! and the package's own `package.json` is the one it describes. A crash at any
//! instant therefore leaves either nothing or a complete install visible.
//!
//! Co-tenants: the repo root is the caller's choice; everything nanokit
//! creates, opens, renames or removes beneath it is reached relative to the
//! root's descriptor without following symlinks ([`crate::sys::beneath`]). A link,
//! FIFO or device planted at `.locks`, `.sentinels`, `.staging`,
//! `node_modules`, `package.json` or any file inside them is refused
//! (`ENKFOREIGN`), never written through or blocked on.

mod installer;
mod provision;
mod spec;

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::error::{ErrorCode, IoError};
use crate::lock::{self, Lease, LockError, LockOptions, LockStatus};
use crate::sys;
use crate::sys::beneath::{self, Access, Dir};

pub use installer::{OwnerRecord, StagingEntry};
pub use provision::{provision, provision_with, InstallRun, ProvisionOptions, ProvisionOutcome};
pub use spec::{PackageSpec, SpecError};

/// Errors of repository operations.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("invalid repository directory {shown}: {reason}; pass the path of the shared repository directory")]
    RepoDir { shown: String, reason: String },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("installing {spec} failed: {message}")]
    InstallFailed { spec: String, message: String },
    #[error("{} is not valid JSON ({message}); fix or remove it (nanokit will not overwrite it)", path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error("{0}")]
    Provision(String),
}

impl ErrorCode for RepoError {
    fn code(&self) -> &'static str {
        match self {
            RepoError::Spec(_) | RepoError::RepoDir { .. } => "ENKSPEC",
            RepoError::Lock(e) => e.code(),
            RepoError::Io(e) => beneath::io_code(&e.source),
            RepoError::InstallFailed { .. } => "ENKINSTALL",
            RepoError::Corrupt { .. } => "ENKREPO",
            RepoError::Provision(_) => "ENKPROVISION",
        }
    }
}

/// [`crate::error::io_err`] for this module's error type.
pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> RepoError + 'a {
    crate::error::io_err(op, path)
}

/// Longest repository path accepted (Linux `PATH_MAX` minus the NUL).
const MAX_REPO_DIR: usize = 4095;

/// Refuses a repository path that cannot name a directory: empty, with a
/// NUL byte, or longer than `PATH_MAX` (`ENKSPEC`).
pub fn validate_repo_dir(dir: &Path) -> Result<(), RepoError> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = dir.as_os_str().as_bytes();
    let shown = {
        let s = dir.to_string_lossy();
        if s.chars().count() > 80 {
            format!(
                "{:?}… ({} bytes)",
                s.chars().take(60).collect::<String>(),
                bytes.len()
            )
        } else {
            format!("{s:?}")
        }
    };
    let reason = if bytes.is_empty() {
        "it is empty"
    } else if bytes.contains(&0) {
        "it contains a NUL byte"
    } else if bytes.len() > MAX_REPO_DIR {
        "it is longer than PATH_MAX (4095 bytes)"
    } else {
        return Ok(());
    };
    Err(RepoError::RepoDir {
        shown,
        reason: reason.into(),
    })
}

/// The sentinel's record of a complete install.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sentinel {
    pub specifier: String,
    pub alias: String,
    /// `sha256:<hex>` of the installed package's `package.json`.
    pub hash: String,
    /// Size of that `package.json`.
    pub package_json_size: u64,
    pub installed_at_ms: u64,
}

/// Paths of one package repository.
#[derive(Debug, Clone)]
pub struct Repo {
    dir: PathBuf,
}

impl Repo {
    pub fn new(dir: impl Into<PathBuf>) -> Repo {
        Repo { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn package_dir(&self, spec: &PackageSpec) -> PathBuf {
        self.dir.join("node_modules").join(spec.alias())
    }

    pub fn lock_path(&self, spec: &PackageSpec) -> PathBuf {
        self.dir.join(Repo::lock_rel(spec))
    }

    /// [`Repo::lock_path`] relative to the repo root.
    fn lock_rel(spec: &PackageSpec) -> PathBuf {
        Path::new(".locks").join(format!("{}.lock", spec.file_key()))
    }

    /// The state of the package lock of the file key `key` (see
    /// [`PackageSpec::file_key`]).
    fn lock_of_key(&self, key: &str) -> Result<Option<LockStatus>, LockError> {
        let rel = Path::new(".locks").join(format!("{key}.lock"));
        lock::inspect_in(&self.dir, &rel, lock::DEFAULT_STALE)
    }

    fn sentinel_name(spec: &PackageSpec) -> String {
        format!("{}.done", spec.file_key())
    }

    /// The repo root, opened as given (its path is the caller's choice);
    /// created if missing and `create`.
    fn root(&self, create: bool) -> Result<Dir, RepoError> {
        Dir::root(&self.dir, create).map_err(io_err("open the repository", &self.dir))
    }

    pub fn sentinel_path(&self, spec: &PackageSpec) -> PathBuf {
        self.dir
            .join(".sentinels")
            .join(format!("{}.done", spec.file_key()))
    }

    fn staging_root(&self) -> PathBuf {
        self.dir.join(".staging")
    }

    fn manifest_lock_rel() -> &'static Path {
        Path::new(".locks/.package-json.lock")
    }

    /// Whether `spec` is completely installed. Lock-free, two `stat`s: the
    /// sentinel exists and carries the modification time of the package's
    /// own `package.json` as installed (set when the sentinel is written), and
    /// that `package.json` still has it. A missing, replaced or rewritten
    /// package therefore reads as not installed. `repo status` additionally
    /// verifies the content hash recorded in the sentinel.
    pub fn is_installed(&self, spec: &PackageSpec) -> bool {
        InstallProbe::of(self, spec).installed()
    }
}

/// The two files that tell whether one package is installed, ready to be
/// looked at again and again: [`Repo::is_installed`] without parsing the
/// specifier or joining paths each time (which costs about as much as one of
/// its two stats). A worker asks about the same few packages over and over.
#[derive(Debug)]
pub struct InstallProbe {
    /// The sentinel and the package's own `package.json`; `None` when the
    /// repo path cannot name a file (it contains a NUL byte).
    files: Option<(CString, CString)>,
}

impl InstallProbe {
    pub fn new(repo_dir: &Path, specifier: &str) -> Result<InstallProbe, RepoError> {
        validate_repo_dir(repo_dir)?;
        let spec = PackageSpec::parse(specifier)?;
        Ok(InstallProbe::of(&Repo::new(repo_dir), &spec))
    }

    fn of(repo: &Repo, spec: &PackageSpec) -> InstallProbe {
        let sentinel = sys::fs::c_path(&repo.sentinel_path(spec));
        let package_json = sys::fs::c_path(&repo.package_dir(spec).join("package.json"));
        InstallProbe {
            files: sentinel.ok().zip(package_json.ok()),
        }
    }

    /// Whether the package is completely installed now (see
    /// [`Repo::is_installed`]). Lock-free; two stats.
    pub fn installed(&self) -> bool {
        use sys::fs::StatFields;
        let Some((sentinel, package_json)) = &self.files else {
            return false;
        };
        let Ok(sentinel) = sys::fs::stat(sentinel, StatFields::SIZE.and(StatFields::MTIME)) else {
            return false;
        };
        let Ok(pkg) = sys::fs::stat(package_json, StatFields::MTIME) else {
            return false;
        };
        sentinel.size > 0 && sentinel.mtime == pkg.mtime
    }
}

/// How nanokit's own installer runs npm.
#[derive(Debug, Clone)]
pub struct NpmOptions {
    /// The npm executable (default `npm`, found on `PATH`).
    pub npm: PathBuf,
    /// Extra arguments appended to `npm install` (e.g. `--registry=…`).
    pub extra_args: Vec<String>,
}

impl Default for NpmOptions {
    fn default() -> Self {
        NpmOptions {
            npm: PathBuf::from("npm"),
            extra_args: Vec::new(),
        }
    }
}

/// Options of [`install`] and [`begin_install`].
#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    pub lock: LockOptions,
    pub npm: NpmOptions,
}

/// The result of an install call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstallOutcome {
    /// True if this call installed the package; false if it was already
    /// installed (possibly by another process while we waited).
    pub installed: bool,
    /// Time spent waiting for another process's install.
    pub waited: Duration,
    /// Time of the whole call.
    pub duration: Duration,
}

/// The outcome of [`begin_install`]: nothing to do, or an open transaction.
pub enum Begin {
    AlreadyInstalled(InstallOutcome),
    Started(InstallTxn),
}

/// An install in progress: the package lock is held and a private staging
/// directory is ready. Install into [`InstallTxn::staging_dir`] (so that the
/// package ends up in `<staging>/node_modules/<alias>`), then [`commit`].
/// Dropping it without committing aborts it.
///
/// [`commit`]: InstallTxn::commit
pub struct InstallTxn {
    repo: Repo,
    spec: PackageSpec,
    lease: Option<Lease>,
    staging: PathBuf,
    start: Instant,
    waited: Duration,
    /// Removal of earlier attempts' leftovers, running meanwhile.
    sweeper: Option<installer::Sweeper>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Takes the package's lock and prepares a staging directory, unless the
/// package is (or, while waiting, becomes) installed.
#[tracing::instrument(name = "repo.begin_install", level = "info", skip_all, fields(nanokit.package = %spec, nanokit.repo = %repo_dir.display()))]
pub async fn begin_install(
    repo_dir: &Path,
    spec: &PackageSpec,
    opts: &InstallOptions,
    cancel: &CancellationToken,
) -> Result<Begin, RepoError> {
    let start = Instant::now();
    validate_repo_dir(repo_dir)?;
    let repo = Repo::new(repo_dir);
    let done = |waited| {
        Ok(Begin::AlreadyInstalled(InstallOutcome {
            installed: false,
            waited,
            duration: start.elapsed(),
        }))
    };
    if repo.is_installed(spec) {
        return done(Duration::ZERO);
    }
    let mut lock_opts = opts.lock.clone();
    lock_opts
        .holder
        .get_or_insert_with(|| format!("install {spec}"));
    let lease =
        lock::acquire_unless_in(&repo.dir, &Repo::lock_rel(spec), &lock_opts, cancel, || {
            repo.is_installed(spec)
        })
        .await?;
    let waited = start.elapsed();
    let Some(lease) = lease else {
        return done(waited);
    };
    if repo.is_installed(spec) {
        lease.release()?;
        return done(waited);
    }
    // We hold the package lock: anything left by an earlier attempt at this
    // package is dead, and so is any attempt at another package whose owner
    // died. Move it all aside and remove it in the background: a leftover
    // never fails this install.
    let key = spec.file_key();
    let root = repo.root(true)?;
    // Refuse a planted `.staging` link before anything looks inside it.
    let staging_root = root
        .dir(".staging", true)
        .map_err(io_err("create the staging directory", &repo.staging_root()))?;
    let lock_of_key = |k: &str| repo.lock_of_key(k);
    let sweeper = installer::sweep(&staging_root, &lock_of_key);
    let sentinel = repo.sentinel_path(spec);
    match root.dir(".sentinels", false) {
        Ok(dir) => {
            dir.remove_file(Repo::sentinel_name(spec))
                .map_err(io_err("remove the old sentinel", &sentinel))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove the old sentinel", &sentinel)(e)),
    }
    let staging_name = format!("{key}.{}", lease.token());
    let staging_dir = staging_root
        .dir(&staging_name, true)
        .map_err(io_err("create the staging directory", &repo.staging_root()))?;
    let staging = staging_dir.path().to_path_buf();
    let txn = InstallTxn {
        repo,
        spec: spec.clone(),
        lease: Some(lease),
        staging,
        start,
        waited,
        sweeper: Some(sweeper),
    };
    // From here on, dropping `txn` on an error removes the staging directory.
    let token = txn.lease.as_ref().expect("held").token().to_string();
    OwnerRecord::ours(&token)
        .write(&staging_dir)
        .map_err(io_err("write", &txn.staging.join(installer::OWNER_FILE)))?;
    staging_dir
        .atomic_write(
            "package.json",
            br#"{"name":"nanokit-staging","private":true}"#,
            0o644,
            None,
        )
        .map_err(io_err("write", &txn.staging.join("package.json")))?;
    Ok(Begin::Started(txn))
}

impl InstallTxn {
    /// Where the installer must install: it must produce
    /// `<staging>/node_modules/<alias>`.
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }

    pub fn spec(&self) -> &PackageSpec {
        &self.spec
    }

    /// The staging directory's name inside `.staging`.
    fn staging_name(&self) -> &OsStr {
        self.staging.file_name().expect("staging has a name")
    }

    /// This attempt's directory, reached from the repo root's descriptor
    /// (never through a link).
    fn open_staging(&self) -> io::Result<Dir> {
        Dir::root(&self.repo.dir, false)?
            .dir(".staging", false)?
            .dir(self.staging_name(), false)
    }

    /// Runs nanokit's npm installer into the staging directory.
    #[tracing::instrument(name = "npm install", level = "info", skip_all, fields(nanokit.package = %self.spec))]
    pub async fn run_npm(&self, npm: &NpmOptions) -> Result<(), RepoError> {
        let failed = |message: String| RepoError::InstallFailed {
            spec: self.spec.to_string(),
            message,
        };
        // npm's messages go to a file in the staging directory, not a pipe:
        // nothing can block on a pipe held open by a straggler.
        const LOG: &str = ".nanokit-installer.log";
        let log_path = self.staging.join(LOG);
        let staging = self
            .open_staging()
            .map_err(io_err("open the staging directory", &self.staging))?;
        let log = staging
            .open_file(LOG, Access::CreateNew(0o644), rustix::fs::OFlags::empty())
            .map_err(io_err("create", &log_path))?;
        let mut cmd = std::process::Command::new(&npm.npm);
        cmd.arg("install")
            .arg(self.spec.npm_install_arg())
            .args(["--no-audit", "--no-fund", "--no-package-lock", "--no-save"])
            .args(["--loglevel", "error"])
            .args(&npm.extra_args)
            .current_dir(&self.staging)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        tracing::info!(spec = %self.spec, staging = %self.staging.display(), "running npm install");
        // Own process group, killed with us (and when this future is dropped).
        let mut child = crate::sys::command::GroupChild::spawn(cmd)
            .map_err(|e| failed(format!("could not run {}: {e}", npm.npm.display())))?;
        if let Some(token) = self.lease.as_ref().map(|l| l.token().to_string()) {
            let mut record = OwnerRecord::ours(&token);
            record.installer_pid = Some(child.pid());
            record.installer_start = crate::sys::host::process_start_time(child.pid());
            if let Err(e) = record.write(&staging) {
                tracing::warn!(error = %e, "cannot record the installer's pid");
            }
        }
        let status = child
            .wait()
            .await
            .map_err(|e| failed(format!("waiting for {}: {e}", npm.npm.display())))?;
        if !status.success() {
            let stderr = staging.read_file(LOG).unwrap_or_default();
            let stderr = String::from_utf8_lossy(&stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(failed(format!(
                "{} install exited with {status}: {}",
                npm.npm.display(),
                tail.join("\n")
            )));
        }
        Ok(())
    }

    /// Publishes the staged package, records it in the repo's `package.json`,
    /// writes the sentinel, and releases the lock.
    #[tracing::instrument(name = "repo.publish", level = "info", skip_all, fields(nanokit.package = %self.spec))]
    pub async fn commit(mut self) -> Result<InstallOutcome, RepoError> {
        // On any error below, dropping `self` aborts: the staging directory
        // is removed and the lock released; no sentinel is written.
        if self.lease.as_ref().is_none_or(Lease::is_lost) {
            return Err(LockError::Lost {
                path: self.repo.lock_path(&self.spec),
            }
            .into());
        }
        let alias = self.spec.alias();
        let (scope, leaf) = match alias.split_once('/') {
            Some((scope, leaf)) => (Some(scope), leaf),
            None => (None, alias.as_str()),
        };
        // Everything below is reached from the repo root's descriptor, never
        // through a link: a `.staging` or `node_modules` replaced by one is
        // refused, not followed.
        let root = self.repo.root(false)?;
        let staging_name = self.staging_name();
        let staging_root = root
            .dir(".staging", false)
            .map_err(io_err("open the staging directory", &self.staging))?;
        let staging = staging_root
            .dir(staging_name, false)
            .map_err(io_err("open the staging directory", &self.staging))?;
        let not_produced = || RepoError::InstallFailed {
            spec: self.spec.to_string(),
            message: format!(
                "the installer did not produce {}",
                Path::new("node_modules")
                    .join(&alias)
                    .join("package.json")
                    .display()
            ),
        };
        let open_staged = |name: &str, parent: &Dir| match parent.dir(name, false) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_produced()),
            r => r.map_err(io_err("open", &parent.join(name))),
        };
        let staged_nm = open_staged("node_modules", &staging)?;
        let staged_scope = scope.map(|s| open_staged(s, &staged_nm)).transpose()?;
        let staged_parent = staged_scope.as_ref().unwrap_or(&staged_nm);
        let staged = open_staged(leaf, staged_parent)?;
        if !staged
            .has_file("package.json")
            .map_err(io_err("open", &staged.join("package.json")))?
        {
            return Err(not_produced());
        }
        fold_hoisted(&staged_nm, &staged, &alias)?;

        // Publish: one rename makes the complete package visible.
        let target = self.repo.package_dir(&self.spec);
        let create = |parent: &Dir, name: &str| {
            parent
                .dir(name, true)
                .map_err(io_err("create", &parent.join(name)))
        };
        let nm = create(&root, "node_modules")?;
        let nm_scope = scope.map(|s| create(&nm, s)).transpose()?;
        let target_parent = nm_scope.as_ref().unwrap_or(&nm);
        if target_parent
            .file_type(leaf)
            .map_err(io_err("stat", &target))?
            .is_some()
        {
            target_parent
                .rename(leaf, &staging, ".replaced")
                .map_err(io_err("move aside the incomplete", &target))?;
        }
        staged_parent
            .rename(leaf, target_parent, leaf)
            .map_err(io_err("publish the package to", &target))?;
        installer::test_pause("publish").await;

        self.record_dependency(&root).await?;
        installer::test_pause("manifest").await;

        // `staged` is the published directory now (a descriptor follows
        // the directory it names through the rename).
        let pkg_json_path = target.join("package.json");
        let (pkg_json, pkg_mtime) = staged
            .open_file("package.json", Access::Read, rustix::fs::OFlags::empty())
            .and_then(|mut f| {
                use std::io::Read;
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)?;
                Ok((bytes, f.metadata()?.modified()?))
            })
            .map_err(io_err("read", &pkg_json_path))?;
        let sentinel = Sentinel {
            specifier: self.spec.to_string(),
            alias,
            hash: format!("sha256:{}", hex::encode(Sha256::digest(&pkg_json))),
            package_json_size: pkg_json.len() as u64,
            installed_at_ms: now_ms(),
        };
        let path = self.repo.sentinel_path(&self.spec);
        // The sentinel carries the package.json's mtime (`is_installed`
        // compares the two with two stats), set before it is renamed into
        // place: it appears complete.
        create(&root, ".sentinels")?
            .atomic_write(
                Repo::sentinel_name(&self.spec),
                &serde_json::to_vec_pretty(&sentinel).expect("sentinel serialises"),
                0o644,
                Some(pkg_mtime),
            )
            .map_err(io_err("write the sentinel", &path))?;
        // Complete and visible from here on: a kill now leaves an installed
        // package and this attempt's staging tree (swept by the next install).
        installer::test_pause("sentinel").await;

        installer::remove_tree(&staging_root, staging_name);
        let lease = self
            .lease
            .take()
            .expect("an open transaction holds its lease");
        if let Err(e) = lease.release() {
            // The install is complete and recorded; only say what happened.
            tracing::warn!(error = %e, spec = %self.spec, "the package lock was lost before release");
        }
        // Earlier attempts' leftovers are gone (or logged) when we return.
        if let Some(sweeper) = self.sweeper.take() {
            sweeper.finish().await;
        }
        Ok(InstallOutcome {
            installed: true,
            waited: self.waited,
            duration: self.start.elapsed(),
        })
    }

    /// Adds the dependency entry to `<repo>/package.json`, atomically, under
    /// the short repo-wide lock.
    async fn record_dependency(&self, root: &Dir) -> Result<(), RepoError> {
        let opts = LockOptions {
            holder: Some(format!("record {}", self.spec)),
            timeout: Some(Duration::from_secs(120)),
            ..LockOptions::default()
        };
        let lease = lock::acquire_in(
            &self.repo.dir,
            Repo::manifest_lock_rel(),
            &opts,
            &CancellationToken::new(),
        )
        .await?;
        let path = self.repo.dir.join("package.json");
        let mut manifest: serde_json::Map<String, serde_json::Value> =
            match root.read_file("package.json") {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| RepoError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                })?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let mut m = serde_json::Map::new();
                    m.insert("name".into(), "nanokit-repo".into());
                    m.insert("private".into(), true.into());
                    m
                }
                Err(e) => return Err(io_err("read", &path)(e)),
            };
        let deps = manifest
            .entry("dependencies")
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        let Some(deps) = deps.as_object_mut() else {
            return Err(RepoError::Corrupt {
                path,
                message: "\"dependencies\" is not an object".into(),
            });
        };
        deps.insert(
            self.spec.alias(),
            format!("npm:{}@{}", self.spec.name, self.spec.version).into(),
        );
        let mut bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        bytes.push(b'\n');
        root.atomic_write("package.json", &bytes, 0o644, None)
            .map_err(io_err("write", &path))?;
        lease.release()?;
        Ok(())
    }

    /// Gives up: removes the staging directory and releases the lock.
    pub fn abort(mut self) {
        self.abort_in_place();
    }

    fn abort_in_place(&mut self) {
        if let Some(lease) = self.lease.take() {
            match Dir::root(&self.repo.dir, false).and_then(|r| r.dir(".staging", false)) {
                Ok(root) => installer::remove_tree(&root, self.staging_name()),
                Err(e) => {
                    tracing::warn!(error = %e, staging = %self.staging.display(), "cannot open the staging directory to remove it; the next install sweeps it")
                }
            }
            let _ = lease.release();
        }
    }
}

impl Drop for InstallTxn {
    fn drop(&mut self) {
        self.abort_in_place();
    }
}

/// Moves packages npm hoisted next to `alias` in the staging `node_modules`
/// into the package's own `node_modules`, so the published directory is
/// self-contained (Node resolves them from there). Never overwrites, and
/// never follows a link to a directory (npm makes none of these).
fn fold_hoisted(node_modules: &Dir, package: &Dir, alias: &str) -> Result<(), RepoError> {
    let alias_scope = alias.split_once('/').map(|(scope, _)| scope);
    let list = |dir: &Dir| dir.entries().map_err(io_err("list", dir.path()));
    let mut moves: Vec<(Option<OsString>, OsString)> = Vec::new();
    for name in list(node_modules)? {
        let text = name.to_string_lossy();
        if text.starts_with('.') {
            continue;
        }
        if text.starts_with('@') {
            let scope_dir = node_modules
                .dir(&name, false)
                .map_err(io_err("open", &node_modules.join(&name)))?;
            for inner in list(&scope_dir)? {
                let full = format!("{text}/{}", inner.to_string_lossy());
                if full != alias {
                    moves.push((Some(name.clone()), inner));
                }
            }
        } else if text != alias && Some(text.as_ref()) != alias_scope {
            moves.push((None, name));
        }
    }
    if moves.is_empty() {
        return Ok(());
    }
    let open = |parent: &Dir, name: &OsStr, create: bool| {
        parent
            .dir(name, create)
            .map_err(io_err("open", &parent.join(name)))
    };
    let package_nm = open(package, OsStr::new("node_modules"), true)?;
    for (scope, name) in moves {
        let (from_scope, to_scope);
        let (from, to) = match &scope {
            Some(scope) => {
                from_scope = open(node_modules, scope, false)?;
                to_scope = open(&package_nm, scope, true)?;
                (&from_scope, &to_scope)
            }
            None => (node_modules, &package_nm),
        };
        let dest = to.join(&name);
        if to
            .file_type(&name)
            .map_err(io_err("stat", &dest))?
            .is_some()
        {
            continue;
        }
        from.rename(&name, to, &name)
            .map_err(io_err("move a dependency into", &dest))?;
    }
    Ok(())
}

/// Installs `spec` into the repo with nanokit's npm installer, exactly once
/// across all processes sharing `repo_dir`.
#[tracing::instrument(name = "repo.install", level = "info", skip_all, fields(nanokit.package = specifier, nanokit.repo = %repo_dir.display()))]
pub async fn install(
    repo_dir: &Path,
    specifier: &str,
    opts: &InstallOptions,
    cancel: &CancellationToken,
) -> Result<InstallOutcome, RepoError> {
    let spec = PackageSpec::parse(specifier)?;
    match begin_install(repo_dir, &spec, opts, cancel).await? {
        Begin::AlreadyInstalled(outcome) => Ok(outcome),
        Begin::Started(txn) => {
            tokio::select! {
                r = txn.run_npm(&opts.npm) => r?,
                _ = cancel.cancelled() => {
                    return Err(LockError::Aborted { path: txn.repo.lock_path(&spec) }.into());
                }
            }
            txn.commit().await
        }
    }
}

/// One installed package as `repo status` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstalledPackage {
    pub alias: String,
    pub specifier: String,
    pub hash: String,
    pub installed_at_ms: u64,
    /// The package's `package.json` still matches the sentinel's hash.
    pub verified: bool,
}

/// What `repo status` shows.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RepoStatus {
    pub dir: PathBuf,
    pub installed: Vec<InstalledPackage>,
    pub locks: Vec<LockStatus>,
    /// Staging directories and unrecorded packages left by interrupted
    /// installs (cleaned up by the next install of that package).
    pub leftovers: Vec<PathBuf>,
    /// Every staging directory with its owner (pid, alive or not) and whether
    /// it is orphaned (removed by the next install of any package).
    pub staging: Vec<StagingEntry>,
}

/// Lists installed packages, held locks and leftovers of interrupted installs.
pub fn status(repo_dir: &Path) -> Result<RepoStatus, RepoError> {
    let repo = Repo::new(repo_dir);
    if !repo_dir.is_dir() {
        return Err(io_err("open the repository", repo_dir)(io::Error::from(
            io::ErrorKind::NotFound,
        )));
    }
    // Read only through the root's descriptor, never following a link and
    // never blocking on a FIFO (see `beneath`).
    let root = repo.root(false)?;
    let mut installed = Vec::new();
    let mut sentinel_aliases = BTreeMap::new();
    for path in list_in(&root, Path::new(".sentinels"))? {
        let name = path.file_name().unwrap_or_default();
        let Ok(sentinel) = read_in(&root, &Path::new(".sentinels").join(name))
            .ok()
            .and_then(|b| serde_json::from_slice::<Sentinel>(&b).ok())
            .ok_or(())
        else {
            continue;
        };
        let pkg_json = Path::new("node_modules")
            .join(&sentinel.alias)
            .join("package.json");
        let verified = read_in(&root, &pkg_json)
            .map(|b| format!("sha256:{}", hex::encode(Sha256::digest(&b))) == sentinel.hash)
            .unwrap_or(false);
        sentinel_aliases.insert(sentinel.alias.clone(), ());
        installed.push(InstalledPackage {
            alias: sentinel.alias,
            specifier: sentinel.specifier,
            hash: sentinel.hash,
            installed_at_ms: sentinel.installed_at_ms,
            verified,
        });
    }
    installed.sort_by(|a, b| a.alias.cmp(&b.alias));
    let mut locks = Vec::new();
    for path in list_in(&root, Path::new(".locks"))? {
        let name = path.file_name().unwrap_or_default();
        if !name.to_string_lossy().ends_with(".lock") {
            continue;
        }
        let rel = Path::new(".locks").join(name);
        if let Some(status) = lock::inspect_in(&repo.dir, &rel, lock::DEFAULT_STALE)? {
            locks.push(status);
        }
    }
    let lock_of_key = |k: &str| repo.lock_of_key(k);
    let staging = match root.dir(".staging", false) {
        Ok(dir) => installer::list(&dir, &lock_of_key),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err("list", &repo.staging_root())(e)),
    };
    let mut leftovers = list_in(&root, Path::new(".staging"))?;
    // Packages in node_modules without a sentinel: published by an install
    // that was interrupted before it completed.
    for path in list_in(&root, Path::new("node_modules"))? {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let candidates: Vec<(String, PathBuf)> = if name.starts_with('@') {
            list_in(&root, &Path::new("node_modules").join(&name))?
                .into_iter()
                .map(|p| {
                    let inner = p
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    (format!("{name}/{inner}"), p)
                })
                .collect()
        } else {
            vec![(name, path)]
        };
        for (alias, path) in candidates {
            if alias.contains('_')
                && !alias.starts_with('.')
                && !sentinel_aliases.contains_key(&alias)
            {
                leftovers.push(path);
            }
        }
    }
    Ok(RepoStatus {
        dir: repo.dir,
        installed,
        locks,
        leftovers,
        staging,
    })
}

/// The entries of the directory `rel` beneath the root (none if it does not
/// exist), as paths; a link or non-directory at `rel` is refused.
fn list_in(root: &Dir, rel: &Path) -> Result<Vec<PathBuf>, RepoError> {
    let path = root.join(rel);
    match root.dirs(rel, false) {
        Ok(dir) => Ok(dir
            .entries()
            .map_err(io_err("list", &path))?
            .into_iter()
            .map(|name| dir.join(name))
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err("list", &path)(e)),
    }
}

/// The regular file `rel` beneath the root, read without following links
/// or blocking (see [`Dir::read_file`]).
fn read_in(root: &Dir, rel: &Path) -> io::Result<Vec<u8>> {
    let name = rel
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => root.dirs(parent, false)?.read_file(name),
        None => root.read_file(name),
    }
}
