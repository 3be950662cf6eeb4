//! nanokit's direct installer: what `npm install` does for a package whose
//! whole tree is plain registry packages, without starting npm. It reads the
//! packuments, picks versions as npm does, fetches each tarball once, checks
//! it against its `sha512` integrity and extracts it into the staging tree
//! in-process; the commit then moves the files into the store as for npm.
//!
//! Guarantees:
//! * Used only for the default `npm` where npm's configuration is known to
//!   name nothing but the registry (see [`registry_for`]); anything else (an
//!   npm of the caller's choice, auth, scoped registries, proxies, CA
//!   settings, offline modes, an npm argument it does not know) leaves the
//!   install to npm.
//! * A tree with anything npm does more for — install scripts, native
//!   builds, peer, optional or bundled dependencies, a shrinkwrap, platform
//!   restrictions, non-registry specifiers, bins below the top level — is
//!   [`Direct::Unsupported`], decided before any tarball is fetched: the
//!   caller runs npm for the whole package.
//! * No byte of a tarball is extracted before all of it matched the
//!   registry's `sha512` integrity (`EINTEGRITY` otherwise, permanent).
//! * Extraction writes only beneath the staging directory, through
//!   descriptors; entries with `..` or absolute paths, links and devices are
//!   skipped (npm skips links too).
//! * Failures carry npm's codes (`E404`, `E500`, `ETARGET`, `ECONNRESET`…),
//!   so that the same retry rules apply as to npm.
//!
//! See docs/repo-protocol.md ("The direct installer") for why.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use futures::{StreamExt, TryStreamExt};
use nodejs_semver::{Range, Version};
use serde_json::Value;
use sha2::{Digest, Sha512};

use super::options::NpmOptions;
use super::PackageSpec;
use crate::sys::beneath::{Access, Dir};

/// How one attempt went wrong, with npm's code for it.
#[derive(Debug)]
pub struct DirectError {
    pub code: String,
    pub message: String,
}

impl DirectError {
    fn new(code: impl Into<String>, message: impl Into<String>) -> DirectError {
        DirectError {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// What the direct installer did.
#[derive(Debug)]
pub enum Direct {
    /// The package and its dependencies are in the staging tree.
    Done { packages: usize },
    /// Something in the tree needs npm (the reason); nothing was written.
    Unsupported(String),
}

/// Options npm may be given that change nothing the direct installer does
/// (the value-taking ones with their value).
const HARMLESS_FLAGS: &[&str] = &[
    "--no-update-notifier",
    "--prefer-online",
    "--no-audit",
    "--no-fund",
    "--no-progress",
    "--silent",
    "--quiet",
];
const HARMLESS_VALUED: &[&str] = &["--cache", "--loglevel", "--fetch-retries", "--userconfig"];

/// npm configuration keys (as in `.npmrc`, `-` or `_`) that change how or
/// from where packages are fetched or laid out: any of them leaves the
/// install to npm.
fn config_key_matters(key: &str) -> bool {
    let k = key.trim().to_ascii_lowercase().replace('-', "_");
    k.starts_with('@') // a scoped registry
        || k.starts_with("//") // auth for a registry
        || k.contains("_auth")
        || k.contains("token")
        || k.ends_with("proxy") && k != "noproxy"
        || matches!(
            k.as_str(),
            "ca" | "cert"
                | "key"
                | "strict_ssl"
                | "offline"
                | "prefer_offline"
                | "omit"
                | "include"
                | "legacy_peer_deps"
                | "strict_peer_deps"
                | "install_links"
                | "install_strategy"
                | "global_style"
                | "legacy_bundling"
                | "before"
                | "force"
                | "os"
                | "cpu"
                | "libc"
                | "always_auth"
                | "username"
                | "_password"
                | "email"
                | "otp"
                | "engine_strict"
                | "bin_links"
                | "umask"
                | "globalconfig"
                | "userconfig"
                | "workspaces"
        )
}

/// The `key = value` lines of an `.npmrc` file (none if it is missing).
fn npmrc(path: &Path) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect()
}

/// The npm configuration files npm would read besides the project's (a
/// staging directory has none): the user's, the global one and npm's own.
fn npmrc_files(user: Option<PathBuf>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let env = |k: &str| {
        std::env::var_os(k)
            .or_else(|| std::env::var_os(k.to_ascii_uppercase()))
            .filter(|v| !v.is_empty())
    };
    match user.or_else(|| env("npm_config_userconfig").map(PathBuf::from)) {
        Some(u) => files.push(u),
        None => {
            if let Some(home) = std::env::var_os("HOME") {
                files.push(Path::new(&home).join(".npmrc"));
            }
        }
    }
    match env("npm_config_globalconfig") {
        Some(g) => files.push(PathBuf::from(g)),
        None => {
            files.push(PathBuf::from("/etc/npmrc"));
            files.push(PathBuf::from("/usr/etc/npmrc"));
            files.push(PathBuf::from("/usr/local/etc/npmrc"));
        }
    }
    if let Some(prefix) = env("npm_config_prefix") {
        files.push(Path::new(&prefix).join("etc/npmrc"));
    }
    // npm's built-in npmrc, beside the npm package on PATH.
    if let Some(root) = npm_package_dir() {
        files.push(root.join("npmrc"));
        if let Some(prefix) = root.ancestors().nth(3) {
            files.push(prefix.join("etc/npmrc"));
        }
    }
    files
}

/// The directory of the npm package that `npm` on `PATH` runs.
fn npm_package_dir() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let npm = std::env::split_paths(&path)
        .map(|d| d.join("npm"))
        .find(|p| p.is_file())?;
    let real = std::fs::canonicalize(npm).ok()?;
    // …/npm/bin/npm-cli.js
    real.ancestors()
        .find(|a| a.join("package.json").is_file() && a.file_name() == Some("npm".as_ref()))
        .map(Path::to_path_buf)
}

/// Where the direct installer fetches from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// Ending in `/`.
    pub url: String,
    /// npm's `cafile`: the only CAs trusted for an `https` registry.
    pub cafile: Option<PathBuf>,
}

/// The registry when npm, run with `npm`'s options and this process's
/// environment and configuration files, would fetch from that registry
/// alone with nothing else configured that matters (a `cafile` is used as
/// npm uses it); `None` leaves the install to npm.
pub fn registry_for(npm: &NpmOptions) -> Option<Registry> {
    // An npm of the caller's choice (a wrapper, another version) is run.
    if npm.npm != Path::new("npm")
        || std::env::var_os("NANOKIT_NPM_ONLY").is_some_and(|v| !v.is_empty() && v != "0")
    {
        return None;
    }
    let mut registry = None;
    let mut cafile: Option<String> = None;
    let mut user = None;
    let mut args = npm.extra_args.iter();
    while let Some(arg) = args.next() {
        let (flag, value) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let valued = flag == "--registry" || HARMLESS_VALUED.contains(&flag);
        if valued {
            let value = match value {
                Some(v) => v,
                None => args.next()?.clone(),
            };
            if flag == "--registry" {
                registry = Some(value);
            } else if flag == "--userconfig" {
                user = Some(PathBuf::from(value));
            }
        } else if !HARMLESS_FLAGS.contains(&flag) {
            return None;
        }
    }
    for (key, value) in std::env::vars() {
        let Some(k) = key
            .strip_prefix("npm_config_")
            .or_else(|| key.strip_prefix("NPM_CONFIG_"))
        else {
            continue;
        };
        if k.eq_ignore_ascii_case("registry") {
            registry.get_or_insert(value);
        } else if k.eq_ignore_ascii_case("cafile") {
            cafile.get_or_insert(value);
        } else if config_key_matters(k)
            && !matches!(
                k.to_ascii_lowercase().as_str(),
                "globalconfig" | "userconfig"
            )
        {
            return None;
        }
    }
    for file in npmrc_files(user) {
        for (key, value) in npmrc(&file) {
            if key == "registry" {
                registry.get_or_insert(value);
            } else if key == "cafile" {
                cafile.get_or_insert(value);
            } else if config_key_matters(&key) {
                return None;
            }
        }
    }
    let mut url = registry.unwrap_or_else(|| "https://registry.npmjs.org/".to_string());
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return None;
    }
    if !url.ends_with('/') {
        url.push('/');
    }
    Some(Registry {
        url,
        cafile: cafile.filter(|c| !c.is_empty()).map(PathBuf::from),
    })
}

/// One HTTP client per process and trust (no TLS, the platform's roots, or
/// a `cafile`), with rustls/ring.
fn client(https: bool, cafile: Option<&Path>) -> Result<reqwest::Client, DirectError> {
    type Clients = std::sync::Mutex<HashMap<Option<PathBuf>, reqwest::Client>>;
    static CLIENTS: OnceLock<Clients> = OnceLock::new();
    let key = https.then(|| cafile.map_or_else(PathBuf::new, Path::to_path_buf));
    let clients = CLIENTS.get_or_init(Default::default);
    let mut clients = clients.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = clients.get(&key) {
        return Ok(c.clone());
    }
    use crate::sys::tls::Roots;
    let roots = match (https, cafile) {
        (false, _) => Roots::Nothing,
        (true, None) => Roots::Platform,
        (true, Some(f)) => Roots::File(f),
    };
    let config = crate::sys::tls::client_config(roots, "npm cafile", None)
        .map_err(|e| DirectError::new("ETLS", e.to_string()))?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(300))
        .user_agent(concat!("nanokit/", env!("CARGO_PKG_VERSION")))
        .tls_backend_preconfigured(config)
        .build()
        .map_err(|e| DirectError::new("ECLIENT", format!("cannot build the HTTP client: {e}")))?;
    clients.insert(key, client.clone());
    Ok(client)
}

/// npm's code for a request that got no answer.
fn network_code(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        return "ETIMEDOUT";
    }
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return match io.kind() {
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => "ECONNRESET",
                io::ErrorKind::ConnectionAborted | io::ErrorKind::UnexpectedEof => "ECONNRESET",
                io::ErrorKind::TimedOut => "ETIMEDOUT",
                io::ErrorKind::ConnectionRefused => "ECONNREFUSED",
                _ => "ENETWORK",
            };
        }
        let text = s.to_string();
        if text.contains("dns error") || text.contains("failed to lookup") {
            return if text.contains("Temporary failure") {
                "EAI_AGAIN"
            } else {
                "ENOTFOUND"
            };
        }
        if text.contains("connection closed before message completed")
            || text.contains("IncompleteMessage")
        {
            return "ECONNRESET";
        }
        source = s.source();
    }
    "ENETWORK"
}

/// GET `url`: its body, or npm's code for what went wrong.
async fn get(registry: &Registry, url: &str, accept: &str) -> Result<Vec<u8>, DirectError> {
    let client = client(url.starts_with("https://"), registry.cafile.as_deref())?;
    let failed = |e: reqwest::Error| DirectError::new(network_code(&e), format!("GET {url}: {e}"));
    let res = client
        .get(url)
        .header("accept", accept)
        .send()
        .await
        .map_err(failed)?;
    let status = res.status();
    if !status.is_success() {
        return Err(DirectError::new(
            format!("E{}", status.as_u16()),
            format!("GET {url}: {status}"),
        ));
    }
    Ok(res.bytes().await.map_err(failed)?.to_vec())
}

/// The registry URL of a package's packument.
fn packument_url(registry: &str, name: &str) -> String {
    format!("{registry}{}", name.replace('/', "%2f"))
}

/// One version of a package, as the installer needs it.
#[derive(Debug, Clone)]
struct Manifest {
    name: String,
    version: String,
    dependencies: Vec<(String, Range)>,
    tarball: String,
    /// The base64 `sha512` digest of the tarball.
    sha512: String,
    /// Files the package declares as executables (npm makes them 0755).
    bins: Vec<String>,
}

/// A version's entry of a packument; `Err` says why npm is needed.
fn manifest(name: &str, v: &Value) -> Result<Manifest, String> {
    let version = v["version"].as_str().unwrap_or_default().to_string();
    let at = format!("{name}@{version}");
    let non_empty = |key: &str| match &v[key] {
        Value::Null => false,
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Number(_) => true,
    };
    let scripts = &v["scripts"];
    if ["preinstall", "install", "postinstall"]
        .iter()
        .any(|s| scripts.get(s).is_some())
        || v["hasInstallScript"].as_bool() == Some(true)
    {
        return Err(format!("{at} has an install script"));
    }
    for key in [
        "gypfile",
        "optionalDependencies",
        "bundleDependencies",
        "bundledDependencies",
        "_hasShrinkwrap",
        "os",
        "cpu",
        "libc",
    ] {
        if non_empty(key) {
            return Err(format!("{at} has {key}"));
        }
    }
    if let Some(peers) = v["peerDependencies"].as_object() {
        let optional = |p: &str| v["peerDependenciesMeta"][p]["optional"].as_bool() == Some(true);
        if peers.keys().any(|p| !optional(p)) {
            return Err(format!("{at} has peerDependencies"));
        }
    }
    if non_empty("directories") && v["directories"].get("bin").is_some() {
        return Err(format!("{at} has directories.bin"));
    }
    let mut dependencies = Vec::new();
    if let Some(deps) = v["dependencies"].as_object() {
        for (dep, spec) in deps {
            let spec = spec.as_str().unwrap_or_default();
            let range = Range::parse(if spec.trim().is_empty() { "*" } else { spec })
                .map_err(|_| format!("{at} depends on {dep}@{spec}, not a version range"))?;
            dependencies.push((dep.clone(), range));
        }
    }
    let bins = match &v["bin"] {
        Value::String(s) => vec![s.clone()],
        Value::Object(m) => m
            .values()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    let tarball = v["dist"]["tarball"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let sha512 = v["dist"]["integrity"]
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
        .find_map(|i| i.strip_prefix("sha512-"))
        .map(|s| s.split('?').next().unwrap_or(s).to_string());
    let Some(sha512) = sha512 else {
        return Err(format!("{at} has no sha512 integrity"));
    };
    if tarball.is_empty() {
        return Err(format!("{at} has no tarball"));
    }
    Ok(Manifest {
        name: name.to_string(),
        version,
        dependencies,
        tarball,
        sha512,
        bins,
    })
}

/// The version of `packument` npm picks for `range`: the `latest` tag if
/// it satisfies the range, else the highest satisfying version, preferring
/// versions that are not deprecated.
fn pick(packument: &Value, range: &Range) -> Option<String> {
    if let Some(latest) = packument["dist-tags"]["latest"].as_str() {
        if Version::parse(latest).is_ok_and(|v| range.satisfies(&v))
            && packument["versions"].get(latest).is_some()
        {
            return Some(latest.to_string());
        }
    }
    let versions = packument["versions"].as_object()?;
    versions
        .iter()
        .filter_map(|(s, m)| Some((Version::parse(s).ok()?, s, m)))
        .filter(|(v, _, _)| range.satisfies(v))
        .max_by(|(a, _, am), (b, _, bm)| {
            let live = |m: &Value| m.get("deprecated").is_none_or(Value::is_null);
            live(am).cmp(&live(bm)).then(a.cmp(b))
        })
        .map(|(_, s, _)| s.clone())
}

/// A package placed in the tree: where it goes, relative to the package.
struct Node {
    manifest: Manifest,
    /// Relative to the installed package's directory ("" for the package).
    dir: PathBuf,
    parent: Option<usize>,
    children: HashMap<String, usize>,
}

/// Most packages in one tree before the installer gives up on it.
const MAX_NODES: usize = 5000;
const ACCEPT_CORGI: &str =
    "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*";

/// The packuments fetched so far, by name.
struct Packuments<'a> {
    registry: &'a Registry,
    cache: HashMap<String, Value>,
}

impl Packuments<'_> {
    /// Fetches the packuments of `names` not fetched yet, at once.
    async fn load(&mut self, names: Vec<String>) -> Result<(), DirectError> {
        let mut missing: Vec<String> = names
            .into_iter()
            .filter(|n| !self.cache.contains_key(n))
            .collect();
        missing.sort();
        missing.dedup();
        let urls: Vec<(String, String)> = missing
            .into_iter()
            .map(|name| (packument_url(&self.registry.url, &name), name))
            .collect();
        let fetched: Vec<(String, Value)> = futures::stream::iter(urls)
            .map(|(url, name)| {
                let registry = self.registry.clone();
                async move {
                    let body = get(&registry, &url, ACCEPT_CORGI).await?;
                    let v: Value = serde_json::from_slice(&body).map_err(|e| {
                        DirectError::new("EJSONPARSE", format!("GET {url}: not a packument: {e}"))
                    })?;
                    Ok::<_, DirectError>((name, v))
                }
            })
            .buffer_unordered(16)
            .try_collect()
            .await?;
        self.cache.extend(fetched);
        Ok(())
    }
}

/// Resolves the tree of `spec` as npm lays it out beneath the package (its
/// dependencies hoisted into its own `node_modules` where no other version
/// is in the way, else nested), or says why npm is needed.
async fn resolve(
    registry: &Registry,
    spec: &PackageSpec,
) -> Result<Result<Vec<Node>, String>, DirectError> {
    let mut packuments = Packuments {
        registry,
        cache: HashMap::new(),
    };
    packuments.load(vec![spec.name.clone()]).await?;
    let root = &packuments.cache[&spec.name];
    let Some(v) = root["versions"].get(&spec.version) else {
        return Err(DirectError::new(
            "ETARGET",
            format!("No matching version found for {spec}"),
        ));
    };
    let root_manifest = match manifest(&spec.name, v) {
        Ok(m) => m,
        Err(why) => return Ok(Err(why)),
    };
    let mut nodes = vec![Node {
        manifest: root_manifest,
        dir: PathBuf::new(),
        parent: None,
        children: HashMap::new(),
    }];
    // Breadth first, one level at a time (its packuments fetched at once).
    let mut level: VecDeque<usize> = VecDeque::from([0]);
    while !level.is_empty() {
        let names = level
            .iter()
            .flat_map(|&i| {
                nodes[i]
                    .manifest
                    .dependencies
                    .iter()
                    .map(|(d, _)| d.clone())
            })
            .collect();
        packuments.load(names).await?;
        let mut next = VecDeque::new();
        for i in level {
            for (dep, range) in nodes[i].manifest.dependencies.clone() {
                // The copy Node would load from `nodes[i]`.
                let mut found = None;
                let mut at = Some(i);
                while let Some(n) = at {
                    if let Some(&c) = nodes[n].children.get(&dep) {
                        found = Some(c);
                        break;
                    }
                    at = nodes[n].parent;
                }
                if let Some(c) = found {
                    let have = Version::parse(&nodes[c].manifest.version);
                    if have.is_ok_and(|v| range.satisfies(&v)) {
                        continue;
                    }
                }
                let packument = &packuments.cache[&dep];
                let Some(version) = pick(packument, &range) else {
                    return Err(DirectError::new(
                        "ETARGET",
                        format!("No matching version found for {dep}@{range}"),
                    ));
                };
                let m = match manifest(&dep, &packument["versions"][&version]) {
                    Ok(m) => m,
                    Err(why) => return Ok(Err(why)),
                };
                // Hoisted to the package's own node_modules unless another
                // version is in the way there: then beside the dependent.
                let parent = if found.is_some() { i } else { 0 };
                if parent != 0 && !m.bins.is_empty() {
                    return Ok(Err(format!(
                        "{dep}@{version} has bins and is nested below the top level"
                    )));
                }
                let dir = nodes[parent].dir.join("node_modules").join(&dep);
                let id = nodes.len();
                nodes[parent].children.insert(dep, id);
                nodes.push(Node {
                    manifest: m,
                    dir,
                    parent: Some(parent),
                    children: HashMap::new(),
                });
                next.push_back(id);
                if nodes.len() > MAX_NODES {
                    return Ok(Err(format!("more than {MAX_NODES} packages")));
                }
            }
        }
        level = next;
    }
    Ok(Ok(nodes))
}

/// A tarball's bytes, checked against its integrity.
async fn fetch_tarball(registry: &Registry, m: &Manifest) -> Result<Vec<u8>, DirectError> {
    let bytes = get(registry, &m.tarball, "application/octet-stream").await?;
    let digest = base64::engine::general_purpose::STANDARD.encode(Sha512::digest(&bytes));
    if digest != m.sha512 {
        return Err(DirectError::new(
            "EINTEGRITY",
            format!(
                "{}@{}: the tarball {} does not match its integrity sha512-{} (got sha512-{digest})",
                m.name, m.version, m.tarball, m.sha512
            ),
        ));
    }
    Ok(bytes)
}

/// Extracts the gzipped tarball `tgz` into `dest` as npm does: the first
/// path component stripped, files and directories only.
fn extract(tgz: &[u8], dest: &Dir, what: &str) -> io::Result<usize> {
    let bad = |e: io::Error| io::Error::new(e.kind(), format!("TAR_BAD_ARCHIVE {what}: {e}"));
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tgz));
    let mut dirs: HashMap<PathBuf, Dir> = HashMap::new();
    let mut files = 0;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            continue;
        }
        let path = entry.path().map_err(bad)?.into_owned();
        let mut parts = Vec::new();
        for c in path.components().skip(1) {
            match c {
                Component::Normal(p) => parts.push(p.to_os_string()),
                Component::CurDir => {}
                _ => {
                    parts.clear();
                    break;
                }
            }
        }
        if parts.is_empty() || (kind.is_file() && parts.len() != path.components().count() - 1) {
            continue;
        }
        let (leaf, parents) = if kind.is_dir() {
            (None, &parts[..])
        } else {
            (parts.last(), &parts[..parts.len() - 1])
        };
        let mut rel = PathBuf::new();
        let mut dir: &Dir = dest;
        for p in parents {
            rel.push(p);
            if !dirs.contains_key(&rel) {
                let d = dir.dir(p, true)?;
                dirs.insert(rel.clone(), d);
            }
            dir = &dirs[&rel];
        }
        let Some(leaf) = leaf else { continue };
        let exec = entry.header().mode().map_err(bad)? & 0o111 != 0;
        let mode = if exec { 0o755 } else { 0o644 };
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes).map_err(bad)?;
        // A name given twice: the last one wins, as with npm.
        dir.remove_file(leaf)?;
        let mut f = dir.open_file(leaf, Access::CreateNew(mode), rustix::fs::OFlags::empty())?;
        f.write_all(&bytes)?;
        files += 1;
    }
    Ok(files)
}

/// Makes the declared bins of the package in `dir` executable, as npm's
/// bin linking does.
fn chmod_bins(dir: &Dir, bins: &[String]) -> io::Result<()> {
    for bin in bins {
        let rel = Path::new(bin);
        let mut parts: Vec<_> = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(p) => parts.push(p),
                Component::CurDir => {}
                _ => return Ok(()),
            }
        }
        let Some((leaf, parents)) = parts.split_last() else {
            continue;
        };
        let mut d = dir.try_clone()?;
        for p in parents {
            match d.dir(p, false) {
                Ok(x) => d = x,
                Err(_) => return Ok(()),
            }
        }
        if let Ok(f) = d.open_file(leaf, Access::Read, rustix::fs::OFlags::empty()) {
            let st = rustix::fs::fstat(&f)?;
            rustix::fs::fchmod(
                &f,
                rustix::fs::Mode::from_raw_mode((st.st_mode & 0o7777) | 0o111),
            )?;
        }
    }
    Ok(())
}

/// Installs `spec` and its dependencies from `registry` into `package` (the
/// package's directory in the staging tree, empty), or says why npm is
/// needed.
pub async fn install(
    registry: &Registry,
    spec: &PackageSpec,
    package: Dir,
) -> Result<Direct, DirectError> {
    let nodes = match resolve(registry, spec).await? {
        Ok(nodes) => nodes,
        Err(why) => return Ok(Direct::Unsupported(why)),
    };
    let count = nodes.len();
    let manifests: Vec<Manifest> = nodes.iter().map(|n| n.manifest.clone()).collect();
    let tarballs: Vec<(usize, Vec<u8>)> = futures::stream::iter(manifests.into_iter().enumerate())
        .map(|(i, m)| {
            let registry = registry.clone();
            async move { Ok::<_, DirectError>((i, fetch_tarball(&registry, &m).await?)) }
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    let shown = spec.to_string();
    let work = move || -> io::Result<()> {
        let by_index: BTreeMap<usize, Vec<u8>> = tarballs.into_iter().collect();
        for (i, tgz) in by_index {
            let node = &nodes[i];
            let dest = if node.dir.as_os_str().is_empty() {
                package.try_clone()?
            } else {
                package.dirs(&node.dir, true)?
            };
            let what = format!("{}@{}", node.manifest.name, node.manifest.version);
            extract(&tgz, &dest, &what)?;
            chmod_bins(&dest, &node.manifest.bins)?;
        }
        if !package.has_file("package.json")? {
            return Err(io::Error::other(format!(
                "TAR_BAD_ARCHIVE {shown}: the tarball has no package/package.json"
            )));
        }
        Ok(())
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| DirectError::new("EEXTRACT", format!("extraction stopped: {e}")))?
        .map_err(|e| {
            let text = e.to_string();
            let code = match text.split_whitespace().next() {
                Some("TAR_BAD_ARCHIVE") => "TAR_BAD_ARCHIVE".to_string(),
                _ => "EEXTRACT".to_string(),
            };
            DirectError::new(code, text)
        })?;
    Ok(Direct::Done { packages: count })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_as_npm_does() {
        let p: Value = serde_json::json!({
            "dist-tags": { "latest": "1.2.0" },
            "versions": { "1.0.0": {}, "1.2.0": {}, "1.3.0": {}, "1.4.0": { "deprecated": "no" }, "2.0.0": {} }
        });
        let r = |s: &str| Range::parse(s).unwrap();
        assert_eq!(
            pick(&p, &r("^1.0.0")).as_deref(),
            Some("1.2.0"),
            "latest wins"
        );
        assert_eq!(
            pick(&p, &r(">=1.3.0 <2")).as_deref(),
            Some("1.3.0"),
            "not deprecated"
        );
        assert_eq!(pick(&p, &r("1.4.0")).as_deref(), Some("1.4.0"));
        assert_eq!(pick(&p, &r("^2 || ^3")).as_deref(), Some("2.0.0"));
        assert_eq!(pick(&p, &r("^3")), None);
    }

    #[test]
    fn what_needs_npm() {
        let ok = serde_json::json!({ "version": "1.0.0", "dependencies": { "a": "^1" },
            "dist": { "tarball": "http://x/a.tgz", "integrity": "sha512-AAAA" } });
        assert!(manifest("x", &ok).is_ok());
        for (key, value) in [
            ("scripts", serde_json::json!({ "postinstall": "node x" })),
            ("hasInstallScript", serde_json::json!(true)),
            ("gypfile", serde_json::json!(true)),
            (
                "optionalDependencies",
                serde_json::json!({ "fsevents": "^2" }),
            ),
            ("peerDependencies", serde_json::json!({ "react": "^18" })),
            ("bundleDependencies", serde_json::json!(["a"])),
            ("os", serde_json::json!(["linux"])),
            (
                "dependencies",
                serde_json::json!({ "a": "git+https://x/y.git" }),
            ),
        ] {
            let mut m = ok.clone();
            m[key] = value;
            assert!(manifest("x", &m).is_err(), "{key}");
        }
        let mut sha1 = ok.clone();
        sha1["dist"]["integrity"] = serde_json::json!("sha1-AAAA");
        assert!(manifest("x", &sha1).is_err());
        assert!(config_key_matters("//registry.example/:_authToken"));
        assert!(config_key_matters("@openfn:registry"));
        assert!(config_key_matters("https-proxy"));
        assert!(!config_key_matters("noproxy"));
        assert!(!config_key_matters("fund"));
    }
}
