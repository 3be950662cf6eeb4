//! `repo adopt`: takes over a repo that another tool populated, without
//! reinstalling: OpenFn's runtime (plain `npm install` of aliases in the repo
//! root, no sentinels) or the lock of OpenFn/kit PR #1416 (its sentinels are
//! `.sentinels/@scope/<alias>.done`).
//!
//! Guarantees:
//! * A package is adopted only when all of this holds: `package.json` lists
//!   its alias as `npm:<name>@…`; `node_modules/<alias>/package.json` names
//!   that name and version; its entry point exists; every dependency it
//!   declares, and theirs in turn, resolves from inside it as Node resolves
//!   it (within the repo's `node_modules`); and the tool that installed it
//!   recorded it complete: PR #1416's sentinel for it, or, without those, an
//!   entry for it at that version in npm's own `node_modules/.package-lock.json`
//!   (which npm writes only after an install finished).
//! * Each is adopted under its package lock (taken without waiting: a
//!   package being installed is skipped): its files become links into the
//!   store (each replaced by one rename of a link with the same bytes, so a
//!   worker loading it meanwhile reads the same content), then nanokit's
//!   sentinel is written. npm never runs.
//! * What does not verify is reported with the reason and left as it is;
//!   the next install of it replaces it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::publish::{intern_and_record, write_sentinel};
use super::status::spec_of_alias;
use super::{io_err, PackageSpec, Repo, RepoError};
use crate::sys::beneath::Dir;

/// A package `adopt` left alone, and why.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Skipped {
    pub alias: String,
    pub reason: String,
}

/// What [`adopt`] did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdoptReport {
    /// Specifiers adopted now.
    pub adopted: Vec<String>,
    /// Specifiers nanokit had installed already.
    pub already: Vec<String>,
    pub skipped: Vec<Skipped>,
}

/// Adopts every package listed in `<repo_dir>/package.json` that verifies
/// (see the module's guarantees).
pub async fn adopt(repo_dir: &Path) -> Result<AdoptReport, RepoError> {
    super::validate_repo_dir(repo_dir)?;
    let repo = Repo::new(repo_dir);
    let root = repo.root(false)?;
    let manifest_path = repo.dir.join("package.json");
    let manifest: serde_json::Value = match root.read_file("package.json") {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| RepoError::Corrupt {
            path: manifest_path.clone(),
            message: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RepoError::Provision(format!(
                "{} has no package.json: nothing to adopt (is it the repo directory?)",
                repo.dir.display()
            )))
        }
        Err(e) => return Err(io_err("read", &manifest_path)(e)),
    };
    let deps = manifest
        .get("dependencies")
        .and_then(|d| d.as_object())
        .cloned()
        .unwrap_or_default();
    let completed = Completed::read(&root);
    let mut report = AdoptReport::default();
    for (alias, value) in deps {
        let skip = |reason: String| Skipped {
            alias: alias.clone(),
            reason,
        };
        let Some(spec) = spec_of_alias(&alias) else {
            report.skipped.push(skip(
                "not an alias of the form <name>_<exact version>".into(),
            ));
            continue;
        };
        let listed = value
            .as_str()
            .is_some_and(|v| v.starts_with(&format!("npm:{}@", spec.name)));
        if !listed {
            report.skipped.push(skip(format!(
                "package.json gives {value}, not npm:{}@…",
                spec.name
            )));
            continue;
        }
        if repo.is_installed(&spec) {
            report.already.push(spec.to_string());
            continue;
        }
        match adopt_one(&repo, &root, &spec, &completed).await? {
            None => report.adopted.push(spec.to_string()),
            Some(reason) => report.skipped.push(skip(reason)),
        }
    }
    Ok(report)
}

/// What the tool that populated the repo recorded as complete.
struct Completed {
    /// Aliases with a PR #1416 sentinel; `None` if the repo has none.
    sentinels: Option<BTreeSet<String>>,
    /// `node_modules/.package-lock.json`: path → version.
    npm: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Completed {
    fn read(root: &Dir) -> Completed {
        let mut found = BTreeSet::new();
        if let Ok(dir) = root.dir(".sentinels", false) {
            for name in dir.entries().unwrap_or_default() {
                let name = name.to_string_lossy().into_owned();
                if name.starts_with('@') {
                    // `.sentinels/@scope/<alias-leaf>.done`.
                    let Ok(scope) = dir.dir(&name, false) else {
                        continue;
                    };
                    for inner in scope.entries().unwrap_or_default() {
                        if let Some(leaf) = inner.to_string_lossy().strip_suffix(".done") {
                            found.insert(format!("{name}/{leaf}"));
                        }
                    }
                } else if let Some(alias) = name.strip_suffix(".done") {
                    // Unscoped: the same name as nanokit's own sentinel,
                    // which is JSON; PR #1416's is not nanokit's.
                    let ours = dir
                        .read_file(&name)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<super::Sentinel>(&b).ok())
                        .is_some();
                    if !ours && !alias.contains('+') {
                        found.insert(alias.to_string());
                    }
                }
            }
        }
        let npm = root
            .dir("node_modules", false)
            .ok()
            .and_then(|nm| nm.read_file(".package-lock.json").ok())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("packages")?.as_object().cloned());
        Completed {
            sentinels: (!found.is_empty()).then_some(found),
            npm,
        }
    }

    /// Why `alias` (of `spec`) is not known complete, if it is not.
    fn doubt(&self, alias: &str, spec: &PackageSpec) -> Option<String> {
        if let Some(sentinels) = &self.sentinels {
            return (!sentinels.contains(alias)).then(|| {
                format!("the repo uses PR #1416's sentinels and .sentinels/{alias}.done is missing (an install that did not finish)")
            });
        }
        let entry = self
            .npm
            .as_ref()
            .and_then(|p| p.get(&format!("node_modules/{alias}")));
        match entry.and_then(|e| e.get("version")).and_then(|v| v.as_str()) {
            Some(v) if v == spec.version => None,
            Some(v) => Some(format!(
                "npm's node_modules/.package-lock.json records version {v}, not {}",
                spec.version
            )),
            None => Some(
                "npm's node_modules/.package-lock.json does not record it: nothing says the install that put it there finished".into(),
            ),
        }
    }
}

/// Adopts one package under its lock; `Some` says why it was skipped.
async fn adopt_one(
    repo: &Repo,
    root: &Dir,
    spec: &PackageSpec,
    completed: &Completed,
) -> Result<Option<String>, RepoError> {
    let alias = spec.alias();
    if let Some(doubt) = completed.doubt(&alias, spec) {
        return Ok(Some(doubt));
    }
    let dir = repo.package_dir(spec);
    if let Some(problem) = verify(&repo.dir.join("node_modules"), &dir, spec) {
        return Ok(Some(problem));
    }
    let lease = match repo.lock_now(spec, &format!("adopt {spec}")).await? {
        Ok(lease) => lease,
        Err(holder) => {
            return Ok(Some(format!(
                "being installed: its lock is held by {holder}"
            )))
        }
    };
    let rel = Path::new("node_modules").join(&alias);
    let package = root.dirs(&rel, false).map_err(io_err("open", &dir))?;
    intern_and_record(repo, root, spec, &package)?;
    write_sentinel(repo, root, spec, &package)?;
    lease.release()?;
    Ok(None)
}

/// The package at `dir` as `spec` (see the module's guarantees); `Some`
/// says what is wrong. `node_modules` is the repo's, where hoisted
/// dependencies live.
fn verify(node_modules: &Path, dir: &Path, spec: &PackageSpec) -> Option<String> {
    let manifest = match read_manifest(dir) {
        Ok(m) => m,
        Err(why) => return Some(why),
    };
    let field = |k: &str| manifest.get(k).and_then(|v| v.as_str()).unwrap_or("");
    if field("name") != spec.name || field("version") != spec.version {
        return Some(format!(
            "its package.json names {}@{}, not {spec}",
            field("name"),
            field("version")
        ));
    }
    if let Some(why) = missing_entry(dir, &manifest) {
        return Some(why);
    }
    // Every dependency, and theirs, resolves as Node would resolve it.
    let mut seen = BTreeSet::new();
    let mut todo = vec![(dir.to_path_buf(), manifest)];
    while let Some((at, m)) = todo.pop() {
        let deps = m
            .get("dependencies")
            .and_then(|d| d.as_object())
            .map(|d| d.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        for dep in deps {
            let Some(found) = resolve(node_modules, &at, &dep) else {
                return Some(format!(
                    "its dependency {dep} (needed by {}) is not installed where Node would find it",
                    at.display()
                ));
            };
            if seen.insert(found.clone()) {
                match read_manifest(&found) {
                    Ok(m) => todo.push((found, m)),
                    Err(why) => return Some(why),
                }
            }
        }
    }
    None
}

fn read_manifest(dir: &Path) -> Result<serde_json::Value, String> {
    let path = dir.join("package.json");
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{} is not valid JSON: {e}", path.display()))
}

/// Why the package's entry point (as OpenFn's runtime picks it: `exports`,
/// then `main`, then `index.js`) is missing, if it is.
fn missing_entry(dir: &Path, manifest: &serde_json::Value) -> Option<String> {
    let exports = manifest.get("exports");
    let entry = exports
        .and_then(|e| e.as_str())
        .or_else(|| {
            let dot = exports?.get(".")?;
            dot.as_str()
                .or_else(|| dot.get("import")?.as_str())
                .or_else(|| dot.get("require")?.as_str())
                .or_else(|| dot.get("default")?.as_str())
        })
        .or_else(|| manifest.get("main").and_then(|m| m.as_str()))
        .unwrap_or("index.js");
    let p = dir.join(entry);
    let candidates = [
        p.clone(),
        PathBuf::from(format!("{}.js", p.display())),
        p.join("index.js"),
    ];
    (!candidates.iter().any(|c| c.is_file())).then(|| format!("its entry point {entry} is missing"))
}

/// Where Node finds package `dep` required from inside the package at
/// `from`: the nearest `node_modules/<dep>` going up, within the repo's
/// `node_modules`.
fn resolve(node_modules: &Path, from: &Path, dep: &str) -> Option<PathBuf> {
    let mut at = Some(from);
    while let Some(dir) = at {
        if !dir.starts_with(node_modules) {
            break;
        }
        let candidate = if dir.file_name().is_some_and(|n| n == "node_modules") {
            dir.join(dep)
        } else {
            dir.join("node_modules").join(dep)
        };
        if candidate.join("package.json").is_file() {
            return Some(candidate);
        }
        at = dir.parent();
    }
    None
}
