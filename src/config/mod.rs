//! Ingestion of `nanokit.yml`: parse (with locations), merge
//! `environments.<env>` over the global blocks, interpolate `${VAR}`, apply
//! runtime inheritance, validate into a typed [`Config`].
//!
//! Order matters in one place: the environment block is merged *before*
//! interpolation, so a `${PROD_DB:?…}` that only the `prod` block uses does
//! not fail a `local` run.
//!
//! Every error names the file, line and column and says what to fix. Keys
//! nanokit does not know or does not support produce a [`Warning`] naming the
//! key. Environment values are never put in messages (a value that came
//! from `${…}` is described, not shown).
//!
//! A configuration that loads is one `up` can run: durations within
//! [`MIN_DURATION`]..=[`MAX_DURATION`], names that fit every container and
//! file name the providers derive from them ([`MAX_NAME_TOTAL`],
//! [`MAX_FILE_NAME`]), a non-empty `start` where the provider runs one.
//! Hostile input is bounded (file size, nesting, aliases: see
//! [`yaml`]; interpolated text and runtime inheritance here), so loading
//! takes bounded time, memory and stack.
//!
//! The stages, one file each: `read` (the file and `.env`), [`yaml`] (the
//! located tree), `resolve` (environment merge, interpolation), `build`
//! (the top level), `service` and `health` (one service), over the typed
//! node readers of `cx`.

mod build;
mod cx;
mod health;
pub mod interp;
mod read;
mod resolve;
mod secrets;
mod service;
pub mod yaml;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use yaml::Loc;

use cx::Cx;
use read::{read_capped, read_dotenv, ReadError};

use crate::error::ErrorCode;

/// Default environment when `-e` is not given.
pub const DEFAULT_ENV: &str = "local";

/// A configuration error with its location.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub code: &'static str,
    pub file: PathBuf,
    pub loc: Option<Loc>,
    pub message: String,
}

impl ConfigError {
    fn at(file: &Path, loc: Loc, message: impl Into<String>) -> Self {
        ConfigError {
            code: "ENKCONFIG",
            file: file.to_path_buf(),
            loc: Some(loc),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.loc {
            Some(l) => write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                l.line,
                l.col,
                self.message
            ),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ErrorCode for ConfigError {
    fn code(&self) -> &'static str {
        self.code
    }
}

/// A warning about the configuration (unknown or unsupported key, …).
#[derive(Debug, Clone, Serialize)]
pub struct Warning {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Process,
    Docker,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Process => "process",
            ProviderKind::Docker => "docker",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateStrategy {
    Recreate,
    Rolling,
}

/// A health check (Docker Compose style).
#[derive(Debug, Clone, Serialize)]
pub struct Healthcheck {
    /// Command run in the instance; exit 0 means healthy.
    pub test: Vec<String>,
    #[serde(with = "dur_ms")]
    pub interval: Duration,
    #[serde(with = "dur_ms")]
    pub timeout: Duration,
    pub retries: u32,
    #[serde(with = "dur_ms")]
    pub start_period: Duration,
}

mod dur_ms {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// Lifecycle hooks; each is a list of shell commands run in order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Hooks {
    /// On the host, before the instance is created.
    pub prestart: Vec<String>,
    /// Inside the instance, after it started (before provisioning).
    pub prestart_container: Vec<String>,
    /// On the host, once the instance is healthy.
    pub poststart: Vec<String>,
    /// Inside the instance, before it is stopped.
    pub prestop: Vec<String>,
    /// On the host, after the instance is stopped.
    pub poststop: Vec<String>,
}

/// One of a service's lifecycle hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prestart,
    PrestartContainer,
    Poststart,
    Prestop,
    Poststop,
}

impl Hook {
    /// The hook's key in `hooks:`.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Prestart => "prestart",
            Hook::PrestartContainer => "prestart_container",
            Hook::Poststart => "poststart",
            Hook::Prestop => "prestop",
            Hook::Poststop => "poststop",
        }
    }
}

impl Hooks {
    /// The commands of `hook`.
    pub fn of(&self, hook: Hook) -> &[String] {
        match hook {
            Hook::Prestart => &self.prestart,
            Hook::PrestartContainer => &self.prestart_container,
            Hook::Poststart => &self.poststart,
            Hook::Prestop => &self.prestop,
            Hook::Poststop => &self.poststop,
        }
    }
}

/// A `source:target` volume mapping of a service.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeMount {
    pub source: String,
    pub target: String,
    /// True when `source` names an entry of the top-level `volumes`.
    pub named: bool,
}

/// One dependency edge as written.
#[derive(Debug, Clone, Serialize)]
pub struct Dep {
    pub name: String,
    #[serde(skip)]
    pub loc: Loc,
    /// `depends_on: {<name>: {restart: true}}`: under `nanokit watch`, this
    /// service is restarted after `<name>` was restarted and is healthy
    /// again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub restart: bool,
}

/// What `nanokit watch` does when a service's instance ends
/// (`restart:`, in Docker Compose's words). Nothing else looks at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Restart whatever ended it (the default).
    #[default]
    Always,
    /// Restart when it failed (exit code not 0, killed, unhealthy), at most
    /// `max` times (None: no limit) until it stays healthy; not when a
    /// user stopped or removed it.
    OnFailure { max: Option<u32> },
    /// As `always`, except after a user stopped or removed it (`docker
    /// stop`, `docker rm`, `nanokit down <service>`).
    UnlessStopped,
    /// Never restart it (the watcher still applies configuration changes).
    No,
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartPolicy::Always => f.write_str("always"),
            RestartPolicy::OnFailure { max: None } => f.write_str("on-failure"),
            RestartPolicy::OnFailure { max: Some(n) } => write!(f, "on-failure:{n}"),
            RestartPolicy::UnlessStopped => f.write_str("unless-stopped"),
            RestartPolicy::No => f.write_str("no"),
        }
    }
}

impl Serialize for RestartPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The longest restart backoff by default (`restart_backoff_max`).
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A service after merging, interpolation and runtime inheritance.
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    pub name: String,
    #[serde(skip)]
    pub loc: Loc,
    pub image: Option<String>,
    pub runtime: Option<String>,
    pub start: Option<String>,
    pub port: Option<u16>,
    pub expose: Option<u16>,
    /// Absolute working directory (the service's `path`, or the project dir).
    pub path: PathBuf,
    /// Whether `path` was given (the Docker provider mounts it at `/app`).
    #[serde(skip)]
    pub path_given: bool,
    pub depends_on: Vec<Dep>,
    /// Environment; values may be secrets and are never printed.
    #[serde(skip)]
    pub env: BTreeMap<String, String>,
    pub volumes: Vec<VolumeMount>,
    pub instances: u32,
    pub update_strategy: UpdateStrategy,
    pub install: Option<String>,
    /// `provisioning.image`: the image the install runs in (a full image
    /// with build tools), when it differs from the one the service runs.
    pub install_image: Option<String>,
    /// The manifests `provisioning.install` installs from (`package.json`,
    /// `package-lock.json` in `path`, those that exist) and a digest of
    /// their content: a changed manifest changes the service, so `up`
    /// reinstalls.
    #[serde(skip)]
    pub manifests: Vec<PathBuf>,
    #[serde(skip)]
    pub manifest_digest: Option<String>,
    pub hooks: Hooks,
    pub healthcheck: Option<Healthcheck>,
    pub cpu: Option<f64>,
    pub memory: Option<u64>,
    /// Under `nanokit watch`: when to restart it.
    pub restart: RestartPolicy,
    /// Under `nanokit watch`: the longest delay between restarts.
    #[serde(with = "dur_ms")]
    pub restart_backoff_max: Duration,
}

impl Service {
    pub fn dep_names(&self) -> impl Iterator<Item = &str> {
        self.depends_on.iter().map(|d| d.name.as_str())
    }
}

/// A named volume.
#[derive(Debug, Clone, Serialize)]
pub struct Volume {
    pub name: String,
    /// `volumes.<name>.name`: the runtime's name for it (a Docker volume
    /// shared with other projects); by default the provider derives one
    /// from the project and environment.
    pub external_name: Option<String>,
    #[serde(skip)]
    pub loc: Loc,
}

/// The environment variable naming a PostgreSQL state when `infra.state` is
/// not set in nanokit.yml.
pub const STATE_URL_ENV: &str = "NANOKIT_STATE_URL";

/// The URL schemes `infra.state` may name a store with.
pub const STATE_SCHEMES: &[&str] = &["postgres", "postgresql", "s3", "gs", "vault"];

/// The scheme of `s` when it is written as a URL (`<scheme>://…`), which an
/// `infra.state` path never is.
pub fn url_scheme(s: &str) -> Option<&str> {
    let (scheme, _) = s.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres_url(url: &str) -> bool {
    matches!(url_scheme(url), Some("postgres" | "postgresql"))
}

/// Where a state encryption passphrase comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassphraseSource {
    /// An environment variable (of the variables the file was loaded
    /// with), and its value then.
    Env { name: String, value: Option<String> },
    /// A file (read when the state is used).
    File(PathBuf),
}

impl PassphraseSource {
    /// Where it comes from, for messages (never the value).
    pub fn describe(&self) -> String {
        match self {
            PassphraseSource::Env { name, .. } => format!("the environment variable {name}"),
            PassphraseSource::File(p) => format!("the file {}", p.display()),
        }
    }
}

/// A key provider of `infra.state_encryption`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// PBKDF2 of a passphrase.
    Passphrase(PassphraseSource),
    /// A Vault/OpenBao Transit key (`address`: else `VAULT_ADDR`).
    Transit {
        key: String,
        mount: String,
        address: Option<String>,
    },
}

/// `infra.state_encryption`: the key every write is sealed with, and the one
/// that still opens what an older key sealed (rotation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEncryption {
    pub key: KeySource,
    pub fallback: Option<KeySource>,
}

/// How many revisions of the state are kept by default (`infra.state_history`).
pub const DEFAULT_STATE_HISTORY: usize = 20;

/// The validated configuration for one environment.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub name: String,
    pub env: String,
    pub file: PathBuf,
    /// The directory of the file: relative paths resolve against it.
    pub dir: PathBuf,
    pub provider: ProviderKind,
    /// Where state.json lives (a local file; also the default when the
    /// state is remote, for nothing but naming).
    pub state_file: PathBuf,
    /// The URL of a remote state (`postgres://`, `s3://`, `gs://`,
    /// `vault://`): `infra.state` when it is a URL, else `NANOKIT_STATE_URL`
    /// (from the loaded variables) when `infra.state` is not set. Never
    /// serialised (it can hold a password).
    #[serde(skip)]
    pub state_url: Option<String>,
    /// `infra.state_encryption` (never serialised).
    #[serde(skip)]
    pub state_encryption: Option<StateEncryption>,
    /// `infra.state_history`: revisions kept (0: none).
    pub state_history: usize,
    /// Enabled services (`instances > 0`).
    pub services: BTreeMap<String, Service>,
    /// Services disabled in this environment (`instances: 0`).
    pub disabled: Vec<String>,
    pub volumes: BTreeMap<String, Volume>,
    pub networks: Vec<String>,
    pub warnings: Vec<Warning>,
    /// Values that came from `.env` or, through `${VAR}`, from the
    /// environment: secrets to mask in everything nanokit records or prints
    /// ([`Config::masker`]). Never serialised.
    #[serde(skip)]
    pub secrets: Vec<String>,
}

impl Config {
    /// The file's absolute path (its folder resolved).
    pub fn file_abs(&self) -> PathBuf {
        match self.file.file_name() {
            Some(n) => self.dir.join(n),
            None => self.file.clone(),
        }
    }

    /// `.nanokit` beside the file.
    pub fn work_dir(&self) -> PathBuf {
        self.dir.join(".nanokit")
    }
    pub fn log_file(&self, service: &str) -> PathBuf {
        self.work_dir()
            .join("logs")
            .join(&self.env)
            .join(format!("{service}.log"))
    }
    pub fn volume_dir(&self, volume: &str) -> PathBuf {
        self.work_dir().join("volumes").join(&self.env).join(volume)
    }
    pub fn plan_file(&self) -> PathBuf {
        self.work_dir().join("plans").join("latest.json")
    }
}

/// What to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub file: PathBuf,
    pub env: String,
    /// Variables to use instead of the process environment (tests, JS API).
    pub vars: Option<HashMap<String, String>>,
}

impl LoadOptions {
    pub fn new(file: impl Into<PathBuf>) -> Self {
        LoadOptions {
            file: file.into(),
            env: DEFAULT_ENV.into(),
            vars: None,
        }
    }
}

/// Loads, merges, interpolates and validates a nanokit.yml.
pub fn load(opts: &LoadOptions) -> Result<Config, ConfigError> {
    let file = if opts.file.is_absolute() {
        opts.file.clone()
    } else {
        std::env::current_dir()
            .map(|d| d.join(&opts.file))
            .unwrap_or_else(|_| opts.file.clone())
    };
    let src = read_capped(&file).map_err(|e| match e {
        ReadError::Io(e) => ConfigError {
            code: "ENKCONFIG",
            file: opts.file.clone(),
            loc: None,
            message: if e.kind() == std::io::ErrorKind::NotFound {
                "file not found: create a nanokit.yml or pass its path with -f <file>".into()
            } else {
                format!("cannot read the file: {e}")
            },
        },
        ReadError::Located(loc, message) => ConfigError::at(&opts.file, loc, message),
    })?;
    let shown = opts.file.clone();
    let dir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    // Canonical, so the state file (and the instance labels derived from its
    // path) are the same however the file was named.
    let dir = dir.canonicalize().unwrap_or(dir);
    let process = opts
        .vars
        .clone()
        .unwrap_or_else(|| std::env::vars().collect());
    let dotenv = read_dotenv(&dir.join(".env"))?;
    let vars = interp::Vars::new(process, dotenv);
    load_str(&src, &shown, &dir, &opts.env, &vars)
}

/// Loads from a string (the file name is only used in messages; `dir`
/// resolves relative paths).
pub fn load_str(
    src: &str,
    file: &Path,
    dir: &Path,
    env: &str,
    vars: &interp::Vars,
) -> Result<Config, ConfigError> {
    let root = yaml::parse(src).map_err(|e| ConfigError::at(file, e.loc, e.message))?;
    let mut cx = Cx::new(file, src);
    let root = cx.merge_env(root, env)?;
    let root = cx.interpolate(root, vars)?;
    let mut config = cx.build(&root, env, dir, vars)?;
    config.secrets = vars.secret_values();
    Ok(config)
}

/// The shortest duration a setting takes (Docker's minimum for health
/// check times) and the longest (a day: past that a wait looks like a hang).
pub const MIN_DURATION: Duration = Duration::from_millis(1);
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// The longest container name nanokit makes may have this many characters:
/// a DNS label, since Docker's embedded DNS resolves container names on the
/// project network (and the service name, a network alias, is one too).
pub const MAX_CONTAINER_NAME: usize = 63;
/// What the longest container name nanokit makes adds to `<project>`,
/// `<env>` and `<service>`: `nk-<project>-<env>-<service>-install-<6 hex>`
/// (the installer container, with the suffix added when the name is taken;
/// a replica's `-<n>-<6 hex>` is shorter, as `instances` is at most 1000).
pub const CONTAINER_NAME_OVERHEAD: usize = "nk---".len() + "-install-".len() + 6;
/// One path component (NAME_MAX): a log file `<service>.log`, a volume
/// directory, Docker's directory of a volume.
pub const MAX_FILE_NAME: usize = 255;
/// Most characters `<project>`, `<env>` and `<service>` may have together.
pub const MAX_NAME_TOTAL: usize = MAX_CONTAINER_NAME - CONTAINER_NAME_OVERHEAD;
/// The most text `${VAR}` interpolation may produce over the whole file.
pub const MAX_INTERPOLATED_BYTES: usize = 16 << 20;
/// The most values runtime inheritance may copy into services in total.
pub const MAX_INHERITED_NODES: usize = 200_000;
