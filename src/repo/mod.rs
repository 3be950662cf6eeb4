//! Shared package repositories: each package installed exactly once, safely,
//! by many processes on many hosts sharing one directory.
//!
//! Guarantees: an install is staged privately and published with one rename;
//! its sentinel is written last, so a crash at any instant leaves either
//! nothing or a complete install visible; nothing is created, written or
//! removed through a link, FIFO or device a co-tenant planted beneath the
//! repo root (`ENKFOREIGN`).
//!
//! See docs/repo-protocol.md for the protocol and why.

mod adopt;
mod direct;
mod gc;
mod installer;
mod npm;
mod options;
mod provision;
mod publish;
mod spec;
mod status;
mod store;

use std::ffi::{CString, OsStr};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::{ErrorCode, IoError};
use crate::lock::{self, Lease, LockError, LockOptions, LockStatus};
use crate::sys;
use crate::sys::beneath::{self, Dir};

pub use adopt::{adopt, AdoptReport, Skipped};
pub use gc::{gc, GcOptions, GcReport, Kept};
pub use installer::{OwnerRecord, StagingEntry};
pub use options::{NpmOptions, RetryOptions};
pub use provision::{provision, provision_with, InstallRun, ProvisionOptions, ProvisionOutcome};
pub use spec::{PackageSpec, SpecError};
pub use status::{
    status, status_with, GcCandidates, InstalledPackage, RepoStatus, StoreStatus, DEFAULT_UNUSED,
};
pub use store::{Interned, StoreUsage, Usage};

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

    /// Takes the package lock of `spec` if it is free now (or its holder on
    /// this host is dead), without waiting; else says who holds it.
    async fn lock_now(
        &self,
        spec: &PackageSpec,
        holder: &str,
    ) -> Result<Result<Lease, String>, RepoError> {
        let opts = LockOptions {
            timeout: Some(Duration::ZERO),
            holder: Some(holder.to_string()),
            ..LockOptions::default()
        };
        let cancel = CancellationToken::new();
        match lock::acquire_in(&self.dir, &Repo::lock_rel(spec), &opts, &cancel).await {
            Ok(lease) => Ok(Ok(lease)),
            Err(LockError::Locked { holder, .. }) => Ok(Err(holder)),
            Err(e) => Err(e.into()),
        }
    }

    /// The state of the package lock of the file key `key` (see
    /// [`PackageSpec::file_key`]).
    fn lock_of_key(&self, key: &str) -> Result<Option<LockStatus>, LockError> {
        let rel = Path::new(".locks").join(format!("{key}.lock"));
        lock::inspect_in(&self.dir, &rel, lock::DEFAULT_STALE)
    }

    /// `.used/<key>`: its modification time is the package's last use.
    const USED: &'static str = ".used";

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
    repo_dir: PathBuf,
    key: String,
    /// When this probe last recorded a use ([`since_start_ms`] + 1; 0: never).
    last_use: AtomicU64,
}

/// A use is recorded at most this often per probe (and process).
const USE_EVERY: Duration = Duration::from_secs(3600);

/// Milliseconds since this process first asked (monotonic).
fn since_start_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
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
            repo_dir: repo.dir.clone(),
            key: spec.file_key(),
            last_use: AtomicU64::new(0),
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

    /// [`InstallProbe::installed`] for a worker about to use the package:
    /// when it is installed, its last use (for `repo gc --older-than`) is
    /// recorded, at most once an hour per probe, off the usual path.
    pub fn installed_for_use(&self) -> bool {
        let installed = self.installed();
        if installed {
            let now = since_start_ms() + 1;
            let last = self.last_use.load(Ordering::Relaxed);
            if (last == 0 || now - last >= USE_EVERY.as_millis() as u64)
                && self
                    .last_use
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                if let Err(e) = record_use(&self.repo_dir, &self.key) {
                    tracing::debug!(error = %e, key = %self.key, "cannot record a package's use");
                }
            }
        }
        installed
    }
}

/// Sets the modification time of `<repo>/.used/<key>` to now (creating it),
/// reached from the root's descriptor (a link there is touched as itself).
fn record_use(repo_dir: &Path, key: &str) -> io::Result<()> {
    use rustix::fs::{Timespec, Timestamps, UTIME_NOW, UTIME_OMIT};
    let used = Dir::root(repo_dir, false)?.dir(Repo::USED, true)?;
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_NOW,
        },
    };
    match rustix::fs::utimensat(&used, key, &times, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
        Err(rustix::io::Errno::NOENT) => used.replace_file(key, b"", 0o644),
        r => r.map_err(Into::into),
    }
}

/// When the package of file key `key` was last used (ms since the epoch):
/// the time of `.used/<key>`, else `installed_at_ms`.
fn last_used_ms(root: &Dir, key: &str, installed_at_ms: u64) -> u64 {
    root.dir(Repo::USED, false)
        .ok()
        .and_then(|d| d.stat(key).ok().flatten())
        .filter(|st| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
        })
        .map(|st| st.st_mtime.max(0) as u64 * 1000 + st.st_mtime_nsec / 1_000_000)
        .unwrap_or(installed_at_ms)
}

/// Options of [`install`] and [`begin_install`].
#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    pub lock: LockOptions,
    pub npm: NpmOptions,
    /// At most this many installers at once per repo and host, across
    /// processes (default: this host's cores; see [`npm::installer_slot`]).
    pub max_concurrent: Option<usize>,
}

impl InstallOptions {
    /// The bound on concurrent installers in force.
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
            .unwrap_or_else(npm::default_max_concurrent)
    }
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
    /// How many times nanokit's installer ran (npm, or its direct installer
    /// where the package needs nothing more; 0 when this call did not
    /// install, or a custom installer did).
    pub attempts: u32,
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
    /// One of the repo's installer slots on this host, while installing.
    slot: Option<Lease>,
    /// npm runs so far.
    attempts: u32,
    /// The staged tree was built from the store by links (nothing to intern).
    replayed: bool,
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
            attempts: 0,
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
        slot: None,
        attempts: 0,
        replayed: false,
    };
    // From here on, dropping `txn` on an error removes the staging directory.
    let token = txn.lease.as_ref().expect("held").token().to_string();
    OwnerRecord::ours(&token)
        .write(&staging_dir)
        .map_err(io_err("write", &txn.staging.join(installer::OWNER_FILE)))?;
    staging_dir
        .replace_file(
            "package.json",
            br#"{"name":"nanokit-staging","private":true}"#,
            0o644,
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

    /// Creates `<staging>/node_modules/<alias>` (and its scope directory),
    /// reached from the repo root's descriptor.
    fn create_staged_package(&self) -> io::Result<Dir> {
        let alias = self.spec.alias();
        let mut parent = self.open_staging()?.dir("node_modules", true)?;
        let leaf = match alias.split_once('/') {
            Some((scope, leaf)) => {
                parent = parent.dir(scope, true)?;
                leaf
            }
            None => alias.as_str(),
        };
        parent.dir(leaf, true)
    }

    /// Builds the package in the staging directory from the store by links
    /// alone, from the record of its tree made when this version was
    /// installed before, when every file of it is still in the store (each
    /// checked against its hash). False (and a clean staging directory)
    /// when there is no record or a file is missing: install it then.
    pub fn replay_recorded(&mut self) -> Result<bool, RepoError> {
        let root = self.repo.root(false)?;
        let key = self.spec.file_key();
        let Some(record) = store::Store::read_record(&root, &key) else {
            return Ok(false);
        };
        let store_path = self.repo.dir.join(store::STORE_DIR);
        let replayed = (|| {
            let store = store::Store::open(&root, false)?;
            store.replay(&record, &self.create_staged_package()?)
        })();
        match replayed {
            Ok(true) => {
                self.replayed = true;
                return Ok(true);
            }
            Err(e) if beneath::is_foreign(&e) => {
                return Err(io_err("build the package from the store", &store_path)(e))
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, spec = %self.spec, "cannot build the package from the store; installing it");
            }
        }
        store::Store::remove_record(&root, &key);
        self.clean_staging()?;
        Ok(false)
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
        Begin::Started(mut txn) => {
            // Its files all still in the store (reinstalled after a wipe, or
            // a crash before its sentinel): links alone, no npm.
            if !txn.replay_recorded()? {
                let lock_path = txn.repo.lock_path(&spec);
                let max = opts.max_concurrent();
                tokio::select! {
                    r = txn.run_npm(&opts.npm, max, cancel) => txn.attempts = r?,
                    _ = cancel.cancelled() => {
                        return Err(LockError::Aborted { path: lock_path }.into());
                    }
                }
            }
            txn.commit().await
        }
    }
}
