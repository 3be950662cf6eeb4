//! Committing an install: the staged package is published into
//! `node_modules` with one rename, recorded in the repo's `package.json`
//! under the repo-wide lock, and only then is its sentinel written.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{
    installer, io_err, now_ms, store, InstallOutcome, InstallTxn, PackageSpec, Repo, RepoError,
    Sentinel,
};
use crate::lock::{self, Lease, LockError, LockOptions};
use crate::sys::beneath::{Access, Dir};

/// The directories of a staged install, opened beneath the repo root.
struct Staged {
    /// `.staging`.
    staging_root: Dir,
    /// This attempt's directory inside it.
    staging: Dir,
    /// `<staging>/node_modules`.
    node_modules: Dir,
    /// `<staging>/node_modules/<scope>`, for a scoped alias.
    scope: Option<Dir>,
    /// The package itself. After publishing, the published directory (a
    /// descriptor follows the directory it names through the rename).
    package: Dir,
}

impl Staged {
    /// The directory holding the package.
    fn parent(&self) -> &Dir {
        self.scope.as_ref().unwrap_or(&self.node_modules)
    }
}

/// An alias's scope (`@scope`, if any) and its last component.
fn split_alias(alias: &str) -> (Option<&str>, &str) {
    match alias.split_once('/') {
        Some((scope, leaf)) => (Some(scope), leaf),
        None => (None, alias),
    }
}

/// The directory `name` in `parent`, created if missing.
fn create_dir(parent: &Dir, name: &str) -> Result<Dir, RepoError> {
    parent
        .dir(name, true)
        .map_err(io_err("create", &parent.join(name)))
}

impl InstallTxn {
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
        // Everything below is reached from the repo root's descriptor, never
        // through a link: a `.staging` or `node_modules` replaced by one is
        // refused, not followed.
        let root = self.repo.root(false)?;
        let staged = self.open_staged(&root, &alias)?;
        // A tree built from the store (`replay_recorded`) is links already.
        if !self.replayed {
            fold_hoisted(&staged.node_modules, &staged.package, &alias)?;
            intern_and_record(&self.repo, &root, &self.spec, &staged.package)?;
        }

        self.publish(&root, &staged, &alias)?;
        installer::test_point("publish").await;

        self.record_dependency(&root).await?;
        installer::test_point("manifest").await;

        write_sentinel(&self.repo, &root, &self.spec, &staged.package)?;
        // Complete and visible from here on: a kill now leaves an installed
        // package and this attempt's staging tree (swept by the next install).
        installer::test_point("sentinel").await;

        installer::remove_tree(&staged.staging_root, self.staging_name());
        Ok(self.finish().await)
    }

    /// Opens this attempt's staged package; fails unless the installer
    /// produced `node_modules/<alias>/package.json`.
    fn open_staged(&self, root: &Dir, alias: &str) -> Result<Staged, RepoError> {
        let (scope, leaf) = split_alias(alias);
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
                    .join(alias)
                    .join("package.json")
                    .display()
            ),
        };
        let open_staged = |name: &str, parent: &Dir| match parent.dir(name, false) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_produced()),
            r => r.map_err(io_err("open", &parent.join(name))),
        };
        let node_modules = open_staged("node_modules", &staging)?;
        let scope = scope.map(|s| open_staged(s, &node_modules)).transpose()?;
        let package = open_staged(leaf, scope.as_ref().unwrap_or(&node_modules))?;
        if !package
            .has_file("package.json")
            .map_err(io_err("open", &package.join("package.json")))?
        {
            return Err(not_produced());
        }
        Ok(Staged {
            staging_root,
            staging,
            node_modules,
            scope,
            package,
        })
    }

    /// Publish: one rename makes the complete package visible. Whatever was
    /// at its place (an incomplete install) is moved aside into this
    /// attempt's staging directory first.
    fn publish(&self, root: &Dir, staged: &Staged, alias: &str) -> Result<(), RepoError> {
        let (scope, leaf) = split_alias(alias);
        let target = self.repo.package_dir(&self.spec);
        let nm = create_dir(root, "node_modules")?;
        let nm_scope = scope.map(|s| create_dir(&nm, s)).transpose()?;
        let target_parent = nm_scope.as_ref().unwrap_or(&nm);
        if target_parent
            .file_type(leaf)
            .map_err(io_err("stat", &target))?
            .is_some()
        {
            target_parent
                .rename(leaf, &staged.staging, ".replaced")
                .map_err(io_err("move aside the incomplete", &target))?;
        }
        staged
            .parent()
            .rename(leaf, target_parent, leaf)
            .map_err(io_err("publish the package to", &target))?;
        Ok(())
    }

    /// After the sentinel: releases the package lock and waits for the
    /// removal of earlier attempts' leftovers.
    async fn finish(&mut self) -> InstallOutcome {
        let lease = self
            .lease
            .take()
            .expect("an open transaction holds its lease");
        if let Err(e) = lease.release() {
            // The install is complete and recorded; only say what happened.
            tracing::warn!(error = %e, spec = %self.spec, "the package lock was lost before release");
        }
        self.slot = None;
        // Earlier attempts' leftovers are gone (or logged) when we return.
        if let Some(sweeper) = self.sweeper.take() {
            sweeper.finish().await;
        }
        InstallOutcome {
            installed: true,
            waited: self.waited,
            duration: self.start.elapsed(),
            attempts: self.attempts,
        }
    }

    /// Adds the dependency entry to `<repo>/package.json`, atomically, under
    /// the short repo-wide lock.
    async fn record_dependency(&self, root: &Dir) -> Result<(), RepoError> {
        let (alias, value) = (
            self.spec.alias(),
            format!("npm:{}@{}", self.spec.name, self.spec.version),
        );
        edit_dependencies(&self.repo, root, &format!("record {}", self.spec), |deps| {
            deps.insert(alias, value.into());
        })
        .await
    }
}

/// Makes every file of the staged `package` a read-only link to its one
/// copy in the store, and records its tree (so that a later install of the
/// same version, its files still in the store, is links alone).
pub(super) fn intern_and_record(
    repo: &Repo,
    root: &Dir,
    spec: &PackageSpec,
    package: &Dir,
) -> Result<(), RepoError> {
    let store_path = repo.dir.join(store::STORE_DIR);
    let store =
        store::Store::open(root, true).map_err(io_err("open the package store", &store_path))?;
    let (interned, record) = store.intern(package).map_err(io_err(
        "move the package's files into the store",
        &store_path,
    ))?;
    if interned.copies == 0 {
        if let Err(e) = store.write_record(root, &spec.file_key(), &record) {
            tracing::warn!(error = %e, spec = %spec, "cannot record the package's tree");
        }
    }
    Ok(())
}

/// Writes the sentinel of `spec`, whose published directory is `package`:
/// the install is complete from then on. It carries the modification time
/// of the package's `package.json` (`is_installed` compares the two with two
/// stats), set before it is renamed into place: it appears complete.
pub(super) fn write_sentinel(
    repo: &Repo,
    root: &Dir,
    spec: &PackageSpec,
    package: &Dir,
) -> Result<(), RepoError> {
    let pkg_json_path = repo.package_dir(spec).join("package.json");
    let (pkg_json, pkg_mtime) = package
        .open_file("package.json", Access::Read, rustix::fs::OFlags::empty())
        .and_then(|mut f| {
            use std::io::Read;
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes)?;
            Ok((bytes, f.metadata()?.modified()?))
        })
        .map_err(io_err("read", &pkg_json_path))?;
    let sentinel = Sentinel {
        specifier: spec.to_string(),
        alias: spec.alias(),
        hash: format!("sha256:{}", hex::encode(Sha256::digest(&pkg_json))),
        package_json_size: pkg_json.len() as u64,
        installed_at_ms: now_ms(),
    };
    let path = repo.sentinel_path(spec);
    create_dir(root, ".sentinels")?
        .atomic_write(
            Repo::sentinel_name(spec),
            &serde_json::to_vec_pretty(&sentinel).expect("sentinel serialises"),
            0o644,
            Some(pkg_mtime),
        )
        .map_err(io_err("write the sentinel", &path))?;
    // Installing is a use: `repo gc --older-than` counts from now.
    if let Err(e) = create_dir(root, Repo::USED).and_then(|d| {
        d.replace_file(spec.file_key(), b"", 0o644)
            .map_err(io_err("write", &repo.dir.join(Repo::USED)))
    }) {
        tracing::warn!(error = %e, spec = %spec, "cannot record the install time as a use");
    }
    Ok(())
}

/// Changes the `dependencies` of `<repo>/package.json` with `edit`, under
/// the short repo-wide lock, and writes it atomically (a fresh file renamed
/// over it). A `package.json` that is not valid JSON, or whose
/// `dependencies` is not an object, is refused (`ENKREPO`), never
/// overwritten: it may be someone's hand edit.
pub(super) async fn edit_dependencies(
    repo: &Repo,
    root: &Dir,
    holder: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> Result<(), RepoError> {
    let opts = LockOptions {
        holder: Some(holder.to_string()),
        timeout: Some(Duration::from_secs(120)),
        ..LockOptions::default()
    };
    let cancel = CancellationToken::new();
    let rel = Repo::manifest_lock_rel();
    let now = LockOptions {
        timeout: Some(Duration::ZERO),
        ..opts.clone()
    };
    let lease = match lock::acquire_in(&repo.dir, rel, &now, &cancel).await {
        Err(LockError::Locked { .. }) => {
            installer::test_point("manifest-lock-wait").await;
            lock::acquire_in(&repo.dir, rel, &opts, &cancel).await?
        }
        r => r?,
    };
    let path = repo.dir.join("package.json");
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
    installer::test_point("manifest-read").await;
    let deps = manifest
        .entry("dependencies")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    let Some(deps) = deps.as_object_mut() else {
        return Err(RepoError::Corrupt {
            path,
            message: "\"dependencies\" is not an object".into(),
        });
    };
    edit(deps);
    let mut bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    bytes.push(b'\n');
    root.atomic_write("package.json", &bytes, 0o644, None)
        .map_err(io_err("write", &path))?;
    lease.release()?;
    Ok(())
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
