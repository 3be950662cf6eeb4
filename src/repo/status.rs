//! `repo status`: what is installed (and whether it still verifies), which
//! locks are held, and what interrupted installs left behind. Read-only,
//! through the root's descriptor.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::installer::{self, StagingEntry};
use super::{io_err, Repo, RepoError, Sentinel};
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
