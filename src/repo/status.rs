//! `repo status`: what is installed (and whether it still verifies, and when
//! it was last used), which locks are held, what interrupted installs left
//! behind, what the store holds and shares, and what `repo gc` would remove.
//! Read-only, through the root's descriptor.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::installer::{self, StagingEntry};
use super::store::{self, Store, StoreUsage, STORE_DIR};
use super::{io_err, PackageSpec, Repo, RepoError, Sentinel};
use crate::lock::{self, LockStatus};
use crate::sys::beneath::Dir;

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
    /// Its last use (ms since the epoch): a worker asked whether it is
    /// installed (recorded at most hourly per process), or it was installed.
    pub last_used_ms: u64,
}

/// The content-addressed store as `repo status` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreStatus {
    /// Files and bytes in `.store`, and those no package links to.
    #[serde(flatten)]
    pub usage: StoreUsage,
    /// Bytes of every file of every published package, each counted as if
    /// it were a copy of its own.
    pub package_bytes: u64,
    /// What those files take on disk (each file counted once).
    pub disk_bytes: u64,
    /// `packageBytes / diskBytes`: how many packages share each byte on
    /// average (1 when nothing is shared; 0 when nothing is installed).
    pub sharing_ratio: f64,
}

/// What `repo gc` would remove now.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GcCandidates {
    /// Store files no package links to.
    pub store_files: u64,
    pub store_bytes: u64,
    /// Staging trees of installs that are over (dead owner, lock passed on).
    pub orphaned_staging: Vec<PathBuf>,
    /// Installed versions not used for `older_than_ms` (as `repo gc
    /// --older-than` would judge them).
    pub unused: Vec<String>,
    pub older_than_ms: u64,
}

/// What `repo status` shows.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RepoStatus {
    pub dir: PathBuf,
    pub installed: Vec<InstalledPackage>,
    pub locks: Vec<LockStatus>,
    /// Packages in `node_modules` without a sentinel and with no install in
    /// progress: published by an install interrupted before it completed
    /// (replaced by the next install of that package), or put there by
    /// another tool (`repo adopt` takes those over). Staging trees are not
    /// listed here but in `staging`.
    pub leftovers: Vec<PathBuf>,
    /// Every staging directory with its owner (pid, alive or not) and whether
    /// it is orphaned (removed by the next install of any package, or gc).
    pub staging: Vec<StagingEntry>,
    /// The content-addressed store (`None` before the first install).
    pub store: Option<StoreStatus>,
    /// What `repo gc` would remove.
    pub gc: GcCandidates,
}

/// Versions unused this long are gc candidates in [`status`].
pub const DEFAULT_UNUSED: Duration = Duration::from_secs(30 * 24 * 3600);

/// Lists installed packages, held locks and leftovers of interrupted installs,
/// with versions unused for 30 days as gc candidates.
pub fn status(repo_dir: &Path) -> Result<RepoStatus, RepoError> {
    status_with(repo_dir, DEFAULT_UNUSED)
}

/// [`status`], judging versions unused for `older_than` as gc candidates.
pub fn status_with(repo_dir: &Path, older_than: Duration) -> Result<RepoStatus, RepoError> {
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
        let key = sentinel.alias.replace('/', "+");
        installed.push(InstalledPackage {
            last_used_ms: super::last_used_ms(&root, &key, sentinel.installed_at_ms),
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
    let mut leftovers = Vec::new();
    // Packages in node_modules without a sentinel, unless an install of
    // them is in progress (its lock held by a live holder).
    for (alias, path) in aliases_in(&root)? {
        if sentinel_aliases.contains_key(&alias) {
            continue;
        }
        let in_progress = repo
            .lock_of_key(&alias.replace('/', "+"))
            .ok()
            .flatten()
            .is_some_and(|l| !l.stale);
        if !in_progress {
            leftovers.push(path);
        }
    }
    let store = match Store::open(&root, false) {
        Ok(store) => {
            let usage = store
                .usage()
                .map_err(io_err("read the store", &repo.dir.join(STORE_DIR)))?;
            let (package_bytes, disk_bytes) = match root.dir("node_modules", false) {
                Ok(nm) => store::sharing(&nm).map_err(io_err("read", nm.path()))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => (0, 0),
                Err(e) => return Err(io_err("read", &repo.dir.join("node_modules"))(e)),
            };
            Some(StoreStatus {
                usage,
                package_bytes,
                disk_bytes,
                sharing_ratio: if disk_bytes == 0 {
                    0.0
                } else {
                    package_bytes as f64 / disk_bytes as f64
                },
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("read the store", &repo.dir.join(STORE_DIR))(e)),
    };
    let cutoff = super::now_ms().saturating_sub(older_than.as_millis() as u64);
    let gc = GcCandidates {
        store_files: store.as_ref().map_or(0, |s| s.usage.unreferenced_files),
        store_bytes: store.as_ref().map_or(0, |s| s.usage.unreferenced_bytes),
        orphaned_staging: staging
            .iter()
            .filter(|s| s.orphaned)
            .map(|s| s.path.clone())
            .collect(),
        unused: installed
            .iter()
            .filter(|p| p.last_used_ms < cutoff)
            .map(|p| p.specifier.clone())
            .collect(),
        older_than_ms: older_than.as_millis() as u64,
    };
    Ok(RepoStatus {
        dir: repo.dir,
        installed,
        locks,
        leftovers,
        staging,
        store,
        gc,
    })
}

/// The packages under `node_modules` whose name is an alias
/// (`<name>_<exact version>`), with their paths; other entries (hoisted
/// dependencies of a plain npm tree, `.bin`) are not aliases.
pub(crate) fn aliases_in(root: &Dir) -> Result<Vec<(String, PathBuf)>, RepoError> {
    let mut out = Vec::new();
    for path in list_in(root, Path::new("node_modules"))? {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let candidates: Vec<(String, PathBuf)> = if name.starts_with('@') {
            list_in(root, &Path::new("node_modules").join(&name))?
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
            if spec_of_alias(&alias).is_some() {
                out.push((alias, path));
            }
        }
    }
    Ok(out)
}

/// The package an alias names: `<name>_<version>`, split at the last `_`
/// whose right side is an exact version (npm names may contain `_`).
pub(crate) fn spec_of_alias(alias: &str) -> Option<PackageSpec> {
    let (name, version) = alias.rsplit_once('_')?;
    PackageSpec::parse(&format!("{name}@{version}"))
        .ok()
        .filter(|s| s.alias() == alias)
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
