//! `repo gc`: removes what nobody needs any more, never a package a worker
//! may be loading.
//!
//! Guarantees:
//! * An installed version is removed only when asked (`older_than`) and its
//!   last use is older than that, and only under its package lock, taken
//!   without waiting (a version being installed is left alone). Its sentinel
//!   goes first (from then on it reads as not installed: a worker that asks
//!   installs it again, after waiting for the lock), then one rename moves
//!   it out of `node_modules` into `.staging` (a loader finds all of it or
//!   none of it), then its entry leaves `package.json` (under the repo-wide
//!   lock), and only then is its tree deleted.
//! * Staging trees of attempts that are over are removed as an install's
//!   sweep removes them (a still-running installer of a dead owner on this
//!   host is killed first).
//! * Store files that no package links to are removed; an installer that
//!   was about to link one places its own copy instead.
//! * With `dry_run` nothing is removed; the report says what would be.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::publish::edit_dependencies;
use super::status::{aliases_in, spec_of_alias};
use super::store::{Store, Usage, STORE_DIR};
use super::{installer, io_err, last_used_ms, now_ms, PackageSpec, Repo, RepoError, Sentinel};
use crate::sys::beneath::Dir;

/// Options of [`gc`].
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Also remove installed versions whose last use is older than this.
    pub older_than: Option<Duration>,
    /// Report only; remove nothing.
    pub dry_run: bool,
}

/// A version gc left in place, and why.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Kept {
    pub specifier: String,
    pub reason: String,
}

/// What [`gc`] removed (or, with `dry_run`, would remove).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GcReport {
    pub dry_run: bool,
    /// Versions unpublished and deleted.
    pub removed: Vec<String>,
    /// Versions old enough that were kept (being installed, or used meanwhile).
    pub kept: Vec<Kept>,
    /// Staging trees of attempts that are over.
    pub staging: Vec<PathBuf>,
    /// Store files no package links to.
    pub store: Usage,
}

/// Collects the garbage of the repo at `repo_dir` (see the module's
/// guarantees).
pub async fn gc(repo_dir: &std::path::Path, opts: &GcOptions) -> Result<GcReport, RepoError> {
    super::validate_repo_dir(repo_dir)?;
    let repo = Repo::new(repo_dir);
    let root = repo.root(false)?;
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..GcReport::default()
    };
    if let Some(older_than) = opts.older_than {
        let cutoff = now_ms().saturating_sub(older_than.as_millis() as u64);
        for (alias, _) in aliases_in(&root)? {
            let Some(spec) = spec_of_alias(&alias) else {
                continue;
            };
            let Some(sentinel) = read_sentinel(&root, &spec) else {
                continue;
            };
            if last_used_ms(&root, &spec.file_key(), sentinel.installed_at_ms) >= cutoff {
                continue;
            }
            if opts.dry_run {
                report.removed.push(spec.to_string());
                continue;
            }
            match unpublish(&repo, &root, &spec, cutoff).await? {
                None => report.removed.push(spec.to_string()),
                Some(reason) => report.kept.push(Kept {
                    specifier: spec.to_string(),
                    reason,
                }),
            }
        }
    }
    // Staging trees of attempts that are over (and of what was unpublished).
    match root.dir(".staging", false) {
        Ok(staging) => {
            let lock_of_key = |k: &str| repo.lock_of_key(k);
            report.staging = installer::list(&staging, &lock_of_key)
                .into_iter()
                .filter(|e| e.orphaned)
                .map(|e| e.path)
                .collect();
            if !opts.dry_run {
                installer::sweep(&staging, &lock_of_key).finish().await;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("open", &repo.staging_root())(e)),
    }
    match Store::open(&root, false) {
        Ok(store) => {
            report.store = store.collect_garbage(opts.dry_run).map_err(io_err(
                "collect the store's garbage",
                &repo.dir.join(STORE_DIR),
            ))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("open", &repo.dir.join(STORE_DIR))(e)),
    }
    Ok(report)
}

/// The sentinel of `spec`, if it is a readable one.
fn read_sentinel(root: &Dir, spec: &PackageSpec) -> Option<Sentinel> {
    let bytes = root
        .dir(".sentinels", false)
        .ok()?
        .read_file(Repo::sentinel_name(spec))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Unpublishes and deletes `spec` under its package lock, unless it is being
/// installed or was used since `cutoff`: then says why it was kept.
async fn unpublish(
    repo: &Repo,
    root: &Dir,
    spec: &PackageSpec,
    cutoff: u64,
) -> Result<Option<String>, RepoError> {
    let lease = match repo.lock_now(spec, &format!("gc {spec}")).await? {
        Ok(lease) => lease,
        Err(holder) => return Ok(Some(format!("its lock is held by {holder}"))),
    };
    let key = spec.file_key();
    // Used since it was judged, or reinstalled: keep it.
    let Some(sentinel) = read_sentinel(root, spec) else {
        lease.release()?;
        return Ok(Some("it was removed meanwhile".into()));
    };
    if last_used_ms(root, &key, sentinel.installed_at_ms) >= cutoff {
        lease.release()?;
        return Ok(Some("it was used meanwhile".into()));
    }
    let sentinels = root
        .dir(".sentinels", false)
        .map_err(io_err("open", &repo.dir.join(".sentinels")))?;
    sentinels
        .remove_file(Repo::sentinel_name(spec))
        .map_err(io_err("remove", &repo.sentinel_path(spec)))?;
    // Unpublish: one rename out of node_modules, into a trash name that the
    // sweep of any install (or gc) removes if we die before deleting it.
    let alias = spec.alias();
    let (scope, leaf) = match alias.split_once('/') {
        Some((s, l)) => (Some(s), l),
        None => (None, alias.as_str()),
    };
    let target = repo.package_dir(spec);
    let nm = root
        .dir("node_modules", false)
        .map_err(io_err("open", &repo.dir.join("node_modules")))?;
    let parent = match scope {
        Some(s) => nm.dir(s, false).map_err(io_err("open", &target))?,
        None => nm,
    };
    let staging = root
        .dir(".staging", true)
        .map_err(io_err("create", &repo.staging_root()))?;
    let trash = installer::trash_name();
    let moved = match parent.rename(leaf, &staging, &trash) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_err("unpublish", &target)(e)),
    };
    edit_dependencies(repo, root, &format!("gc {spec}"), |deps| {
        deps.remove(&alias);
    })
    .await?;
    if let Ok(used) = root.dir(Repo::USED, false) {
        let _ = used.remove_file(&key);
    }
    // Its files go with the next store collection: no reinstall by links.
    Store::remove_record(root, &key);
    if moved {
        installer::remove_tree(&staging, std::ffi::OsStr::new(&trash));
    }
    lease.release()?;
    Ok(None)
}
