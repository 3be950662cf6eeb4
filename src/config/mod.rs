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

pub mod interp;
mod secrets;
pub mod yaml;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use yaml::Loc;
use yaml::{Key, Node, Value};

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
}

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

/// Whether `infra.state` names a PostgreSQL database rather than a file.
pub fn is_state_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

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
    /// The PostgreSQL URL of a remote state: `infra.state` when it is a
    /// `postgres://` / `postgresql://` URL, else `NANOKIT_STATE_URL` when
    /// `infra.state` is not set. Never serialised (it can hold a password).
    #[serde(skip)]
    pub state_url: Option<String>,
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

enum ReadError {
    Io(std::io::Error),
    Located(Loc, String),
}

/// Reads a UTF-8 text file of at most [`yaml::MAX_FILE_BYTES`]; a longer
/// file (or `/dev/zero`) is refused at the byte where the limit is passed,
/// invalid UTF-8 at its first bad byte.
fn read_capped(path: &Path) -> Result<String, ReadError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(ReadError::Io)?;
    let mut bytes = Vec::new();
    f.take(yaml::MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() > yaml::MAX_FILE_BYTES {
        return Err(ReadError::Located(
            yaml::loc_of_offset(&bytes, yaml::MAX_FILE_BYTES),
            format!(
                "the file is larger than {} MiB, where nanokit stops reading: this is not a configuration file",
                yaml::MAX_FILE_BYTES >> 20
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        ReadError::Located(
            yaml::loc_of_offset(e.as_bytes(), at),
            "the file is not valid UTF-8 here: save it as UTF-8 text".into(),
        )
    })
}

/// Reads `.env` (Docker Compose's format, parsed by dotenvy). A line that
/// does not parse is reported at its own line (and the column dotenvy
/// points at), a multi-line quoted value that never closes at its opening
/// line.
fn read_dotenv(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let mut out = HashMap::new();
    let content = match read_capped(path) {
        Ok(c) => c,
        Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(ReadError::Io(e)) => {
            return Err(ConfigError {
                code: "ENKCONFIG",
                file: path.to_path_buf(),
                loc: None,
                message: format!("cannot read the .env file: {e}"),
            })
        }
        Err(ReadError::Located(loc, message)) => {
            return Err(ConfigError::at(
                path,
                loc,
                message.replace("file", ".env file"),
            ))
        }
    };
    for item in dotenvy::from_read_iter(content.as_bytes()) {
        match item {
            Ok((k, v)) => {
                out.insert(k, v);
            }
            Err(dotenvy::Error::LineParse(_, _)) => {
                let loc = dotenv_error_loc(&content);
                return Err(ConfigError::at(
                    path,
                    loc,
                    "cannot parse this line of the .env file: write KEY=value (quote values with spaces or `#`, close every quote)",
                ));
            }
            Err(e) => {
                return Err(ConfigError {
                    code: "ENKCONFIG",
                    file: path.to_path_buf(),
                    loc: None,
                    message: format!("cannot read the .env file: {e}"),
                })
            }
        }
    }
    Ok(out)
}

/// Where the first line of `content` that dotenvy refuses is. dotenvy
/// reports only the text of the (logical, possibly multi-line) line, so
/// the file is split into logical lines the way dotenvy does and each is
/// parsed alone (syntax does not depend on earlier lines) until one fails.
fn dotenv_error_loc(content: &str) -> Loc {
    for (first_line, text) in dotenv_logical_lines(content) {
        if let Some(Err(dotenvy::Error::LineParse(_, pos))) =
            dotenvy::from_read_iter(text.as_bytes()).find(|r| r.is_err())
        {
            let pos = pos.min(text.len());
            // An unclosed quote: dotenvy points at the end; the quote's
            // line is more useful, so stay on the first line.
            let inner = if pos >= text.trim_end().len() && text.contains('\n') {
                Loc { line: 1, col: 1 }
            } else {
                yaml::loc_of_offset(text.as_bytes(), pos)
            };
            return Loc {
                line: first_line + inner.line - 1,
                col: inner.col,
            };
        }
    }
    Loc { line: 1, col: 1 }
}

/// `.env`'s logical lines with the 1-based number of their first physical
/// line: a line continues while a quote is open or it ends in `\`
/// (dotenvy's rule); comment and blank lines are skipped.
fn dotenv_logical_lines(content: &str) -> Vec<(usize, String)> {
    #[derive(Clone, Copy, PartialEq)]
    enum St {
        Complete,
        Escape,
        Strong,
        StrongEsc,
        Weak,
        WeakEsc,
        White,
    }
    let content = content.strip_prefix('\u{feff}').unwrap_or(content);
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut start = 0;
    let mut st = St::Complete;
    for (i, line) in content.split_inclusive('\n').enumerate() {
        if buf.is_empty() {
            start = i + 1;
            if line.trim_start().starts_with('#') || line.trim().is_empty() {
                continue;
            }
        }
        buf.push_str(line);
        for c in line.chars() {
            st = match st {
                St::White => match c {
                    '#' => {
                        st = St::Complete;
                        break;
                    }
                    '\\' => St::Escape,
                    '"' => St::Weak,
                    '\'' => St::Strong,
                    _ => St::Complete,
                },
                St::Escape => St::Complete,
                St::Complete => match c {
                    c if c.is_whitespace() && c != '\n' && c != '\r' => St::White,
                    '\\' => St::Escape,
                    '"' => St::Weak,
                    '\'' => St::Strong,
                    _ => St::Complete,
                },
                St::Weak => match c {
                    '\\' => St::WeakEsc,
                    '"' => St::Complete,
                    _ => St::Weak,
                },
                St::WeakEsc => St::Weak,
                St::Strong => match c {
                    '\\' => St::StrongEsc,
                    '\'' => St::Complete,
                    _ => St::Strong,
                },
                St::StrongEsc => St::Strong,
            };
        }
        if st == St::Complete {
            out.push((start, std::mem::take(&mut buf)));
        }
    }
    if !buf.is_empty() {
        out.push((start, buf));
    }
    out
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
    let mut cx = Cx {
        file: file.to_path_buf(),
        src,
        warnings: Vec::new(),
        env_loc: None,
        interpolated: std::cell::Cell::new(0),
        inherited: 0,
        interpolated_at: Default::default(),
    };
    let root = cx.merge_env(root, env)?;
    let root = cx.interpolate(root, vars)?;
    let mut config = cx.build(&root, env, dir)?;
    config.secrets = vars.secret_values();
    Ok(config)
}

struct Cx<'s> {
    file: PathBuf,
    /// The file's text, to place errors inside a scalar.
    src: &'s str,
    warnings: Vec<Warning>,
    /// Where the chosen environment is declared (`environments.<env>`).
    env_loc: Option<Loc>,
    /// Text produced by interpolation so far.
    interpolated: std::cell::Cell<usize>,
    /// Values copied into services by runtime inheritance so far.
    inherited: usize,
    /// Where scalars that interpolation changed are: their text may hold
    /// a secret, so messages do not show it.
    interpolated_at: std::cell::RefCell<std::collections::HashSet<Loc>>,
}

const TOP_KEYS: &[&str] = &[
    "name",
    "version",
    "infra",
    "runtimes",
    "services",
    "volumes",
    "networks",
    "environments",
];
const SERVICE_KEYS: &[&str] = &[
    "image",
    "runtime",
    "start",
    "port",
    "expose",
    "path",
    "depends_on",
    "env",
    "volumes",
    "instances",
    "updateStrategy",
    "provisioning",
    "hooks",
    "healthcheck",
    "cpu",
    "memory",
];
const HOOK_KEYS: &[&str] = &[
    "prestart",
    "prestart_container",
    "poststart",
    "prestop",
    "poststop",
];
const HEALTH_KEYS: &[&str] = &["test", "interval", "timeout", "retries", "start_period"];

fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_lowercase() || f.is_ascii_digit())
        && c.all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-' || ch == '_')
}

/// Docker's rule for container, volume and network names
/// (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`), which also keeps them plain file names.
fn docker_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphanumeric())
        && c.all(|ch| ch.is_ascii_alphanumeric() || "_.-".contains(ch))
}

/// A name or value for a message: long ones are cut.
fn shown(s: &str) -> String {
    const MAX: usize = 60;
    match s.char_indices().nth(MAX) {
        None => s.to_string(),
        Some((i, _)) => format!("{}… ({} characters)", &s[..i], s.chars().count()),
    }
}

/// `1ms`, `5s`, `24h`: a bound as a user would write it.
fn short_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms.is_multiple_of(3_600_000) && ms > 0 => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) && ms > 0 => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) && ms > 0 => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
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

impl Cx<'_> {
    fn err(&self, loc: Loc, message: impl Into<String>) -> ConfigError {
        ConfigError::at(&self.file, loc, message)
    }

    /// `text` (read from `node`) for a message, in backticks and cut when
    /// long; a value that came from `${…}` is not shown.
    fn val(&self, node: &Node, text: &str) -> String {
        if self.interpolated_at.borrow().contains(&node.loc) {
            "the value from `${…}` (not shown)".into()
        } else {
            format!("`{}`", shown(text))
        }
    }

    fn warn(&mut self, loc: Loc, message: impl Into<String>) {
        self.warnings.push(Warning {
            file: self.file.clone(),
            line: loc.line,
            col: loc.col,
            message: message.into(),
        });
    }

    fn map<'a>(&self, node: &'a Node, what: &str) -> Result<&'a [(Key, Node)], ConfigError> {
        match &node.value {
            Value::Map(e) => Ok(e),
            _ if node.is_null() => Ok(&[]),
            _ => Err(self.err(
                node.loc,
                format!(
                    "`{what}` must be a mapping (key: value), found {}",
                    node.kind()
                ),
            )),
        }
    }

    /// Warns about keys not in `known`, with a suggestion when one is close.
    fn check_keys(&mut self, entries: &[(Key, Node)], known: &[&str], context: &str) {
        for (k, _) in entries {
            if known.contains(&k.name.as_str()) {
                continue;
            }
            let best = known
                .iter()
                .map(|c| (strsim::jaro_winkler(c, &k.name), *c))
                .fold((0.0, ""), |a, b| if b.0 > a.0 { b } else { a });
            let hint = if best.0 > 0.8 {
                format!("; did you mean `{}`?", best.1)
            } else {
                String::new()
            };
            self.warn(
                k.loc,
                format!("unknown key `{}` in {context} is ignored{hint}", k.name),
            );
        }
    }

    fn string(&self, node: &Node, what: &str) -> Result<String, ConfigError> {
        match &node.value {
            Value::Scalar { text, .. } if !node.is_null() => Ok(text.clone()),
            _ => Err(self.err(
                node.loc,
                format!("`{what}` must be a string, found {}", node.kind()),
            )),
        }
    }

    fn opt_string(&self, node: Option<&Node>, what: &str) -> Result<Option<String>, ConfigError> {
        match node {
            None => Ok(None),
            Some(n) if n.is_null() => Ok(None),
            Some(n) => self.string(n, what).map(Some),
        }
    }

    fn int(&self, node: &Node, what: &str, min: i64, max: i64) -> Result<i64, ConfigError> {
        let (v, text) = match &node.value {
            Value::Scalar { text, plain: true } => (text.trim().parse::<i64>().ok(), Some(text)),
            _ => (None, None),
        };
        let range = format!("a whole number between {min} and {max}");
        match v {
            Some(v) if v >= min && v <= max => Ok(v),
            Some(v) => Err(self.err(
                node.loc,
                format!(
                    "`{what}` is {}, it must be between {min} and {max}",
                    self.val(node, &v.to_string()).trim_matches('`')
                ),
            )),
            None => Err(self.err(
                node.loc,
                match text {
                    // A number, but not a whole one in i64 (`1e23`, `2.5`).
                    Some(t) if node.kind() == "a number" => {
                        format!(
                            "`{what}` must be {range}; {} is not",
                            self.val(node, t.trim())
                        )
                    }
                    _ => format!("`{what}` must be {range}, found {}", node.kind()),
                },
            )),
        }
    }

    /// A duration within `[min, max]`; `allow_zero` also admits 0 (off).
    fn duration(
        &self,
        node: &Node,
        what: &str,
        min: Duration,
        max: Duration,
        allow_zero: bool,
    ) -> Result<Duration, ConfigError> {
        let text = self.string(node, what)?;
        let t = text.trim();
        let range = format!(
            "between {} and {}{}",
            short_duration(min),
            short_duration(max),
            if allow_zero { " (or 0 for none)" } else { "" }
        );
        let d = match t.parse::<f64>() {
            // A bare number is seconds; NaN, negatives and values too large
            // for a Duration fail here, never panic.
            Ok(secs) => Duration::try_from_secs_f64(secs).ok(),
            Err(_) => humantime::parse_duration(t).ok(),
        };
        let Some(d) = d else {
            return Err(self.err(
                node.loc,
                format!(
                    "`{what}` must be a duration such as `500ms`, `5s` or `2m` ({range}), found {}",
                    self.val(node, t)
                ),
            ));
        };
        if (allow_zero && d.is_zero()) || (d >= min && d <= max) {
            return Ok(d);
        }
        Err(self.err(
            node.loc,
            format!("`{what}` is {}: it must be {range}", self.val(node, t)),
        ))
    }

    /// One command (string) or several (list of strings).
    fn commands(&self, node: Option<&Node>, what: &str) -> Result<Vec<String>, ConfigError> {
        match node {
            None => Ok(Vec::new()),
            Some(n) if n.is_null() => Ok(Vec::new()),
            Some(Node {
                value: Value::Seq(items),
                ..
            }) => items.iter().map(|i| self.string(i, what)).collect(),
            Some(n) => Ok(vec![self.string(n, what)?]),
        }
    }

    fn merge_env(&mut self, root: Node, env: &str) -> Result<Node, ConfigError> {
        let entries = match root.value {
            Value::Map(e) => e,
            _ => {
                return Err(self.err(
                    root.loc,
                    format!(
                        "the file must be a mapping with `name` and `services`, found {}",
                        root.kind()
                    ),
                ))
            }
        };
        let mut rest = Vec::new();
        let mut envs = None;
        for (k, v) in entries {
            if k.name == "environments" {
                envs = Some(v);
            } else {
                rest.push((k, v));
            }
        }
        let base = Node {
            value: Value::Map(rest),
            loc: root.loc,
        };
        let Some(envs) = envs else {
            return if env == DEFAULT_ENV {
                Ok(base)
            } else {
                Err(ConfigError {
                    code: "ENKCONFIG",
                    file: self.file.clone(),
                    loc: None,
                    message: format!("environment `{env}` is not defined: add `environments.{env}` or choose another with -e"),
                })
            };
        };
        let list = self.map(&envs, "environments")?;
        let names: Vec<String> = list.iter().map(|(k, _)| k.name.clone()).collect();
        let Some((env_key, block)) = list.iter().find(|(k, _)| k.name == env) else {
            return if env == DEFAULT_ENV {
                Ok(base)
            } else {
                Err(self.err(
                    envs.loc,
                    format!(
                        "environment `{env}` is not defined; defined here: {}",
                        if names.is_empty() {
                            "none".into()
                        } else {
                            names.join(", ")
                        }
                    ),
                ))
            };
        };
        if !docker_name(env) {
            return Err(self.err(
                env_key.loc,
                format!("environment name `{}` must be letters, digits, `_`, `.` or `-`, starting with a letter or digit: it becomes part of file, container and network names", shown(env)),
            ));
        }
        self.env_loc = Some(env_key.loc);
        let block = block.clone();
        let keys = self.map(&block, &format!("environments.{env}"))?.to_vec();
        let allowed: Vec<&str> = TOP_KEYS
            .iter()
            .copied()
            .filter(|k| *k != "environments")
            .collect();
        self.check_keys(&keys, &allowed, &format!("environments.{env}"));
        if block.is_null() {
            return Ok(base);
        }
        Ok(yaml::deep_merge(base, block))
    }

    /// Where in the file the scalar starting at `loc` reaches the end of
    /// `prefix` (its value up to a point): exact when that part is written
    /// verbatim on the scalar's first line; otherwise (folded lines, escapes,
    /// block scalars) the scalar's start.
    fn loc_in_scalar(&self, loc: Loc, prefix: &str, plain: bool) -> Loc {
        let quote = usize::from(!plain);
        let line = self
            .src
            .split("\r\n")
            .flat_map(|l| l.split(['\r', '\n']))
            .nth(loc.line.saturating_sub(1));
        let verbatim = line.is_some_and(|line| {
            let mut rest = line.chars().skip(loc.col.saturating_sub(1) + quote);
            prefix.chars().all(|c| rest.next() == Some(c))
        });
        if !verbatim {
            return loc;
        }
        Loc {
            col: loc.col + quote + prefix.chars().count(),
            ..loc
        }
    }

    fn interpolate(&self, node: Node, vars: &interp::Vars) -> Result<Node, ConfigError> {
        let loc = node.loc;
        let value = match node.value {
            Value::Scalar { text, plain } => {
                let new = interp::interpolate_capped(&text, vars, MAX_INTERPOLATED_BYTES).map_err(
                    |e| self.err(self.loc_in_scalar(loc, &text[..e.offset], plain), e.message),
                )?;
                let total = self.interpolated.get() + new.len();
                if total > MAX_INTERPOLATED_BYTES {
                    return Err(self.err(
                        loc,
                        format!(
                            "interpolating `${{…}}` makes the file's values larger than {} MiB in total here: a variable is repeated too often or is too large",
                            MAX_INTERPOLATED_BYTES >> 20
                        ),
                    ));
                }
                self.interpolated.set(total);
                if new != text {
                    self.interpolated_at.borrow_mut().insert(loc);
                }
                Value::Scalar { text: new, plain }
            }
            Value::Seq(items) => Value::Seq(
                items
                    .into_iter()
                    .map(|n| self.interpolate(n, vars))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Map(entries) => Value::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| Ok((k, self.interpolate(v, vars)?)))
                    .collect::<Result<_, ConfigError>>()?,
            ),
        };
        Ok(Node { value, loc })
    }

    fn build(mut self, root: &Node, env: &str, dir: &Path) -> Result<Config, ConfigError> {
        let top = self.map(root, "the file")?;
        self.check_keys(top, TOP_KEYS, "the top level");
        let name_node = root.get("name").ok_or_else(|| {
            self.err(
                root.loc,
                "missing required key `name`: add `name: <project>` at the top level",
            )
        })?;
        let name = self.string(name_node, "name")?;
        if !valid_name(&name) {
            return Err(self.err(
                name_node.loc,
                format!("project name {} must be lowercase letters, digits, `-` or `_`, starting with a letter or digit", self.val(name_node, &name)),
            ));
        }
        if name.len() + env.len() >= MAX_NAME_TOTAL {
            return Err(self.err(
                self.env_loc.filter(|_| env.len() > name.len()).unwrap_or(name_node.loc),
                format!(
                    "project name `{}` and environment `{}` are {} characters together, which leaves no room for service names: Docker container names `nk-<project>-<env>-<service>-install-<suffix>` have at most {MAX_CONTAINER_NAME} characters, so project, environment and service names have {MAX_NAME_TOTAL} together; shorten them",
                    shown(&name), shown(env), name.len() + env.len()
                ),
            ));
        }
        if let Some((k, _)) = top.iter().find(|(k, _)| k.name == "version") {
            self.warn(k.loc, "key `version` is not used by nanokit and is ignored");
        }

        // infra
        let mut provider = ProviderKind::Process;
        let mut state_file = None;
        let mut state_url = None;
        let mut state_set = false;
        if let Some(infra) = root.get("infra") {
            let entries = self.map(infra, "infra")?;
            self.check_keys(entries, &["provider", "state"], "infra");
            if let Some(p) = infra.get("provider") {
                let shown_p = self.val(p, &self.string(p, "infra.provider")?);
                provider = match self.string(p, "infra.provider")?.as_str() {
                    "process" => ProviderKind::Process,
                    "docker" => ProviderKind::Docker,
                    other => {
                        return Err(self.err(
                            p.loc,
                            format!(
                                "unknown provider {}: use `process` (local processes) or `docker`",
                                if other.is_empty() {
                                    "``".into()
                                } else {
                                    shown_p
                                }
                            ),
                        ))
                    }
                };
            }
            if let Some(s) = self.opt_string(infra.get("state"), "infra.state")? {
                state_set = true;
                if is_state_url(&s) {
                    state_url = Some(s);
                } else {
                    state_file = Some(dir.join(s));
                }
            }
        }
        // `infra.state` wins; NANOKIT_STATE_URL applies only when it is unset.
        if !state_set {
            state_url = std::env::var(STATE_URL_ENV)
                .ok()
                .filter(|u| !u.trim().is_empty());
        }
        let state_file = state_file.unwrap_or_else(|| {
            let n = if env == DEFAULT_ENV {
                "state.json".to_string()
            } else {
                format!("state.{env}.json")
            };
            dir.join(".nanokit").join(n)
        });

        // volumes / networks
        let mut volumes = BTreeMap::new();
        if let Some(v) = root.get("volumes") {
            for (k, body) in self.map(v, "volumes")? {
                if !valid_name(&k.name) {
                    return Err(self.err(
                        k.loc,
                        format!(
                            "volume name `{}` must be lowercase letters, digits, `-` or `_`, starting with a letter or digit",
                            shown(&k.name)
                        ),
                    ));
                }
                // `nk-<project>-<env>-<volume>` is Docker's volume name and a
                // directory of Docker's; `<volume>` a directory of nanokit's.
                let derived = "nk---".len() + name.len() + env.len() + k.name.len();
                if derived > MAX_FILE_NAME {
                    return Err(self.err(
                        k.loc,
                        format!(
                            "volume name `{}` is too long: the Docker volume `nk-<project>-<env>-<volume>` would have {derived} characters, and a volume name is a directory name of at most {MAX_FILE_NAME}; use at most {} characters",
                            shown(&k.name),
                            MAX_FILE_NAME.saturating_sub(derived - k.name.len())
                        ),
                    ));
                }
                let mut external_name = None;
                if !body.is_null() {
                    let e = self.map(body, &format!("volumes.{}", k.name))?;
                    self.check_keys(e, &["name"], &format!("volume `{}`", k.name));
                    if let Some(n) = body.get("name") {
                        let v = self.string(n, "name")?;
                        let ok = docker_name(&v) && (2..=MAX_FILE_NAME).contains(&v.len());
                        if !ok {
                            return Err(self.err(
                                n.loc,
                                format!("`volumes.{}.name` is {}: a Docker volume name is 2 to {MAX_FILE_NAME} letters, digits, `_`, `.` or `-`, starting with a letter or digit", k.name, self.val(n, &v)),
                            ));
                        }
                        external_name = Some(v);
                    }
                }
                volumes.insert(
                    k.name.clone(),
                    Volume {
                        name: k.name.clone(),
                        external_name,
                        loc: k.loc,
                    },
                );
            }
        }
        let mut networks = Vec::new();
        if let Some(n) = root.get("networks") {
            for (k, _) in self.map(n, "networks")? {
                networks.push(k.name.clone());
            }
            if !networks.is_empty() {
                match provider {
                    ProviderKind::Process => self.warn(n.loc, "`networks` are not used by the process provider (every service shares the host network)"),
                    ProviderKind::Docker => self.warn(n.loc, "`networks` are not used yet by the docker provider: every service joins the network `nanokit-net-<env>`, where services reach each other by name"),
                }
            }
        }

        // runtimes
        let runtimes: &[(Key, Node)] = match root.get("runtimes") {
            Some(r) => self.map(r, "runtimes")?,
            None => &[],
        };
        for (k, body) in runtimes {
            let e = self.map(body, &format!("runtimes.{}", k.name))?;
            self.check_keys(e, SERVICE_KEYS, &format!("runtime `{}`", k.name));
        }

        // services
        let services_node = root.get("services").ok_or_else(|| {
            self.err(
                root.loc,
                "missing required key `services`: declare at least one service under `services:`",
            )
        })?;
        let entries = self.map(services_node, "services")?;
        if entries.is_empty() {
            self.warn(
                services_node.loc,
                "`services` is empty: there is nothing to run",
            );
        }
        let runtime_index: HashMap<&str, &Node> =
            runtimes.iter().map(|(k, v)| (k.name.as_str(), v)).collect();
        let mut services = BTreeMap::new();
        let mut disabled = Vec::new();
        for (k, body) in entries {
            if !valid_name(&k.name) {
                return Err(self.err(
                    k.loc,
                    format!("service name `{}` must be lowercase letters, digits, `-` or `_`, starting with a letter or digit", shown(&k.name)),
                ));
            }
            // Checked for every provider, so a file that validates with one
            // works with the other.
            let room = MAX_NAME_TOTAL - name.len() - env.len();
            if k.name.len() > room {
                return Err(self.err(
                    k.loc,
                    format!(
                        "service name `{}` is too long ({} characters): its Docker container `nk-{name}-{env}-<service>-install-<suffix>` may have at most {MAX_CONTAINER_NAME} characters, so with project `{name}` and environment `{env}` a service name has at most {room}",
                        shown(&k.name),
                        k.name.len()
                    ),
                ));
            }
            let svc = self.service(k, body, &runtime_index, &volumes, provider, dir)?;
            if svc.instances == 0 {
                disabled.push(svc.name);
            } else {
                services.insert(svc.name.clone(), svc);
            }
        }
        let disabled_set: std::collections::HashSet<&str> =
            disabled.iter().map(String::as_str).collect();
        for svc in services.values() {
            for d in &svc.depends_on {
                if disabled_set.contains(d.name.as_str()) {
                    return Err(ConfigError {
                        code: "ENKDEP",
                        file: self.file.clone(),
                        loc: Some(d.loc),
                        message: format!(
                            "service `{}` depends on `{}`, which is disabled in environment `{env}` (instances: 0); enable it or drop the dependency",
                            svc.name, d.name
                        ),
                    });
                }
            }
        }
        Ok(Config {
            name,
            env: env.to_string(),
            file: self.file.clone(),
            dir: dir.to_path_buf(),
            provider,
            state_file,
            state_url,
            services,
            disabled,
            volumes,
            networks,
            warnings: self.warnings,
            secrets: Vec::new(),
        })
    }

    fn service(
        &mut self,
        key: &Key,
        body: &Node,
        runtime_index: &HashMap<&str, &Node>,
        volumes: &BTreeMap<String, Volume>,
        provider: ProviderKind,
        dir: &Path,
    ) -> Result<Service, ConfigError> {
        let name = key.name.clone();
        let ctx = format!("service `{name}`");
        if !matches!(body.value, Value::Map(_)) && !body.is_null() {
            return Err(self.err(
                body.loc,
                format!("{ctx} must be a mapping of settings, found {}", body.kind()),
            ));
        }
        let own = self.map(body, &format!("services.{name}"))?;
        self.check_keys(own, SERVICE_KEYS, &ctx);

        // Runtime inheritance: the runtime's block under the service's own.
        let runtime = self.opt_string(body.get("runtime"), "runtime")?;
        let mut runtime_deps = Vec::new();
        let merged = match &runtime {
            None => body.clone(),
            Some(rt) => {
                let Some(rnode) = runtime_index.get(rt.as_str()).copied() else {
                    let mut known: Vec<&str> = runtime_index.keys().copied().collect();
                    known.sort_unstable();
                    return Err(self.err(
                        body.get("runtime").map_or(key.loc, |n| n.loc),
                        format!(
                            "{ctx} uses runtime {}, which is not defined under `runtimes` (defined: {})",
                            body.get("runtime").map_or_else(|| shown(rt), |n| self.val(n, rt)),
                            if known.is_empty() { "none".into() } else { known.join(", ") }
                        ),
                    ));
                };
                if let Some(d) = rnode.get("depends_on") {
                    runtime_deps = self.deps(d)?;
                }
                // Every service copies its runtime: bounded in total, or a
                // large runtime used by many services multiplies.
                self.inherited += yaml::count_nodes(rnode);
                if self.inherited > MAX_INHERITED_NODES {
                    return Err(self.err(
                        body.get("runtime").map_or(key.loc, |n| n.loc),
                        format!("runtime inheritance copies more than {MAX_INHERITED_NODES} values into services in total (runtime {} is copied into each service that uses it): make the runtime smaller", body.get("runtime").map_or_else(|| shown(rt), |n| self.val(n, rt))),
                    ));
                }
                yaml::deep_merge(rnode.clone(), body.clone())
            }
        };
        let b = &merged;

        let image = self.opt_string(b.get("image"), "image")?;
        let start = self.opt_string(b.get("start"), "start")?;
        // Which provider needs what: the process provider runs `start` (it
        // has nothing else to run); Docker runs `image`, and `start` only
        // replaces the image's command. Whether an image has a command of
        // its own is not checked here (`validate` does not talk to the
        // daemon): an image without one fails at `up`, naming the service.
        if provider == ProviderKind::Process && start.is_none() {
            return Err(self.err(
                key.loc,
                format!("{ctx} has no `start` command: the process provider runs `start` as a local process; add `start: <command>`"),
            ));
        }
        if let (Some(s), Some(n)) = (&start, b.get("start")) {
            if s.trim().is_empty() {
                return Err(self.err(
                    n.loc,
                    match provider {
                        ProviderKind::Process => format!("`start` of {ctx} is empty: the process provider runs it as the service's command; write one, such as `start: node server.js`"),
                        ProviderKind::Docker => format!("`start` of {ctx} is empty: omit `start` to run the image's own command, or write one"),
                    },
                ));
            }
        }
        if provider == ProviderKind::Docker && image.is_none() {
            return Err(self.err(
                key.loc,
                format!("{ctx} has no `image`: the docker provider needs one"),
            ));
        }
        if let (ProviderKind::Docker, Some(i), Some(n)) = (provider, &image, b.get("image")) {
            if i.trim().is_empty() || i.chars().any(char::is_whitespace) {
                return Err(self.err(
                    n.loc,
                    format!("`image` of {ctx} is {}: name the image to run, such as `image: node:22-alpine` (no spaces)", self.val(n, i)),
                ));
            }
        }
        if provider == ProviderKind::Process {
            if let Some(n) = b.get("image") {
                self.warn(
                    n.loc,
                    format!("`image` of {ctx} is not used by the process provider"),
                );
            }
        }
        let port = match b.get("port") {
            Some(n) if !n.is_null() => Some(self.int(n, "port", 1, 65535)? as u16),
            _ => None,
        };
        let expose = match b.get("expose") {
            Some(n) if !n.is_null() => Some(self.int(n, "expose", 1, 65535)? as u16),
            _ => port,
        };
        let path_given = b.get("path").is_some_and(|n| !n.is_null());
        let path = match self.opt_string(b.get("path"), "path")? {
            None => dir.to_path_buf(),
            Some(p) => {
                let abs = dir.join(&p);
                if !abs.is_dir() {
                    return Err(self.err(
                        b.get("path").map_or(key.loc, |n| n.loc),
                        format!("`path` of {ctx} is {}, which is not a directory (relative paths start at the nanokit.yml's folder)", b.get("path").map_or_else(|| shown(&p), |n| self.val(n, &p))),
                    ));
                }
                abs
            }
        };
        let mut depends_on = runtime_deps;
        let mut dep_names: std::collections::HashSet<String> =
            depends_on.iter().map(|d| d.name.clone()).collect();
        if let Some(d) = body.get("depends_on") {
            for dep in self.deps(d)? {
                if dep_names.insert(dep.name.clone()) {
                    depends_on.push(dep);
                }
            }
        }
        if let Some(d) = depends_on.iter().find(|d| d.name == name) {
            return Err(ConfigError {
                code: "ENKCYCLE",
                file: self.file.clone(),
                loc: Some(d.loc),
                message: format!("{ctx} depends on itself: dependency cycle {name} → {name}"),
            });
        }

        let mut env = BTreeMap::new();
        if let Some(e) = b.get("env") {
            match &e.value {
                Value::Seq(items) => {
                    for item in items {
                        let s = self.string(item, "env entry")?;
                        let (k, v) = s.split_once('=').ok_or_else(|| {
                            self.err(item.loc, "an `env` list entry must be `KEY=value`")
                        })?;
                        env.insert(k.to_string(), v.to_string());
                    }
                }
                _ => {
                    for (k, v) in self.map(e, "env")? {
                        let value = match &v.value {
                            Value::Scalar { .. } if v.is_null() => String::new(),
                            Value::Scalar { text, .. } => text.clone(),
                            _ => {
                                return Err(self.err(
                                    v.loc,
                                    format!(
                                        "env `{}` must be a string, number or boolean, found {}",
                                        k.name,
                                        v.kind()
                                    ),
                                ))
                            }
                        };
                        env.insert(k.name.clone(), value);
                    }
                }
            }
            for k in env.keys() {
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    return Err(self.err(
                        e.loc,
                        format!("`{k}` is not a valid environment variable name"),
                    ));
                }
            }
        }

        let mut mounts = Vec::new();
        if let Some(v) = b.get("volumes") {
            let Value::Seq(items) = &v.value else {
                return Err(self.err(
                    v.loc,
                    format!("`volumes` of {ctx} must be a list of `source:target`"),
                ));
            };
            for item in items {
                let s = self.string(item, "volume")?;
                let (source, target) = s.split_once(':').ok_or_else(|| {
                    self.err(item.loc, format!("volume {} must be `source:target` (a named volume or a path, then where it appears)", self.val(item, &s)))
                })?;
                let is_path =
                    source.starts_with('.') || source.starts_with('/') || source.starts_with('~');
                if provider == ProviderKind::Docker && !target.starts_with('/') {
                    return Err(self.err(
                        item.loc,
                        format!("volume {} of {ctx}: the target must be an absolute path inside the container, such as `/data`", self.val(item, &s)),
                    ));
                }
                if !is_path && !volumes.contains_key(source) {
                    return Err(self.err(
                        item.loc,
                        format!("{ctx} mounts volume {}, which is not declared under top-level `volumes`; declare it, or write a path such as `./data:/data`", self.val(item, source)),
                    ));
                }
                mounts.push(VolumeMount {
                    source: source.to_string(),
                    target: target.to_string(),
                    named: !is_path,
                });
            }
        }

        let mut instances = match b.get("instances") {
            Some(n) if !n.is_null() => self.int(n, "instances", 0, 1000)? as u32,
            _ => 1,
        };
        if instances > 1 && provider == ProviderKind::Process {
            self.warn(
                b.get("instances").map_or(key.loc, |n| n.loc),
                format!("`instances: {instances}` of {ctx}: the process provider runs one instance per service"),
            );
            instances = 1;
        }
        if instances > 1 && provider == ProviderKind::Docker && port.is_some() {
            return Err(self.err(
                b.get("instances").map_or(key.loc, |n| n.loc),
                format!("{ctx} has `instances: {instances}` and publishes host `port` {}: only one container can bind a host port; drop `port` and keep `expose` (replicas are reachable by the service name on the project network)", port.unwrap_or_default()),
            ));
        }
        let update_strategy = match self
            .opt_string(b.get("updateStrategy"), "updateStrategy")?
            .as_deref()
        {
            None | Some("recreate") => UpdateStrategy::Recreate,
            Some("rolling") => {
                if provider == ProviderKind::Process {
                    self.warn(
                        b.get("updateStrategy").map_or(key.loc, |n| n.loc),
                        format!("`updateStrategy: rolling` of {ctx} is not supported by the process provider; it recreates"),
                    );
                    UpdateStrategy::Recreate
                } else if port.is_some() {
                    self.warn(
                        b.get("updateStrategy").map_or(key.loc, |n| n.loc),
                        format!("`updateStrategy: rolling` of {ctx} needs two containers at once, but only one can bind host `port`; it recreates (drop `port` and keep `expose` to roll)"),
                    );
                    UpdateStrategy::Recreate
                } else {
                    UpdateStrategy::Rolling
                }
            }
            Some(other) => {
                return Err(self.err(
                    b.get("updateStrategy").map_or(key.loc, |n| n.loc),
                    format!(
                        "`updateStrategy` is {}: use `recreate` or `rolling`",
                        b.get("updateStrategy")
                            .map_or_else(|| shown(other), |n| self.val(n, other))
                    ),
                ))
            }
        };
        let mut install = None;
        let mut install_image = None;
        if let Some(p) = b.get("provisioning") {
            let e = self.map(p, "provisioning")?.to_vec();
            self.check_keys(&e, &["install", "image"], &format!("provisioning of {ctx}"));
            install = self.opt_string(p.get("install"), "provisioning.install")?;
            if let (Some(i), Some(n)) = (&install, p.get("install")) {
                if i.trim().is_empty() {
                    return Err(self.err(
                        n.loc,
                        format!("`provisioning.install` of {ctx} is empty: write the install command, or drop the key"),
                    ));
                }
            }
            install_image = self.opt_string(p.get("image"), "provisioning.image")?;
            if install_image.is_some() && provider == ProviderKind::Process {
                self.warn(
                    p.get("image").map_or(key.loc, |n| n.loc),
                    format!("`provisioning.image` of {ctx} is not used by the process provider"),
                );
            }
        }
        let mut manifests = Vec::new();
        let mut manifest_digest = None;
        if install.is_some() {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for m in ["package.json", "package-lock.json"] {
                let p = path.join(m);
                if let Ok(bytes) = std::fs::read(&p) {
                    h.update(m.as_bytes());
                    h.update([0]);
                    h.update((bytes.len() as u64).to_le_bytes());
                    h.update(&bytes);
                    manifests.push(p);
                }
            }
            if !manifests.is_empty() {
                manifest_digest = Some(hex::encode(&h.finalize()[..12]));
            }
        }
        let mut hooks = Hooks::default();
        if let Some(h) = b.get("hooks") {
            let e = self.map(h, "hooks")?.to_vec();
            self.check_keys(&e, HOOK_KEYS, &format!("hooks of {ctx}"));
            hooks.prestart = self.commands(h.get("prestart"), "hooks.prestart")?;
            hooks.prestart_container =
                self.commands(h.get("prestart_container"), "hooks.prestart_container")?;
            hooks.poststart = self.commands(h.get("poststart"), "hooks.poststart")?;
            hooks.prestop = self.commands(h.get("prestop"), "hooks.prestop")?;
            hooks.poststop = self.commands(h.get("poststop"), "hooks.poststop")?;
        }
        let healthcheck = match b.get("healthcheck") {
            Some(h) if !h.is_null() => Some(self.healthcheck(h, &ctx)?),
            _ => None,
        };
        let cpu = match b.get("cpu") {
            Some(n) if !n.is_null() => {
                let s = self.string(n, "cpu")?;
                let v: f64 = s
                    .trim()
                    .parse()
                    .ok()
                    .filter(|v: &f64| (0.01..=1024.0).contains(v))
                    .ok_or_else(|| {
                        self.err(
                            n.loc,
                            format!("`cpu` must be a number of CPUs between 0.01 (Docker's least) and 1024, such as `0.5`, found {}", self.val(n, &s)),
                        )
                    })?;
                if provider == ProviderKind::Process {
                    self.warn(
                        n.loc,
                        format!("`cpu` of {ctx} is not enforced by the process provider"),
                    );
                }
                Some(v)
            }
            _ => None,
        };
        let memory = match b.get("memory") {
            Some(n) if !n.is_null() => {
                let s = self.string(n, "memory")?;
                let v = parse_memory(&s)
                    .filter(|v| (MIN_MEMORY..=MAX_MEMORY).contains(v))
                    .ok_or_else(|| {
                        self.err(
                            n.loc,
                            format!("`memory` must be a size between 6mb (Docker's least) and 16tb, such as `512mb` or `1gb`, found {}", self.val(n, &s)),
                        )
                    })?;
                if provider == ProviderKind::Process {
                    self.warn(
                        n.loc,
                        format!("`memory` of {ctx} is not enforced by the process provider"),
                    );
                }
                Some(v)
            }
            _ => None,
        };
        Ok(Service {
            name,
            loc: key.loc,
            image,
            runtime,
            start,
            port,
            expose,
            path,
            path_given,
            depends_on,
            env,
            volumes: mounts,
            instances,
            update_strategy,
            install,
            install_image,
            manifests,
            manifest_digest,
            hooks,
            healthcheck,
            cpu,
            memory,
        })
    }

    fn deps(&self, node: &Node) -> Result<Vec<Dep>, ConfigError> {
        let mut out = Vec::new();
        match &node.value {
            _ if node.is_null() => {}
            Value::Seq(items) => {
                for i in items {
                    out.push(Dep {
                        name: self.string(i, "depends_on entry")?,
                        loc: i.loc,
                    });
                }
            }
            // Compose's long form: `depends_on: { db: { condition: … } }`.
            Value::Map(entries) => {
                for (k, _) in entries {
                    out.push(Dep {
                        name: k.name.clone(),
                        loc: k.loc,
                    });
                }
            }
            Value::Scalar { .. } => {
                return Err(self.err(
                    node.loc,
                    "`depends_on` must be a list of service names, e.g. `depends_on: [db]`",
                ))
            }
        }
        Ok(out)
    }

    fn healthcheck(&mut self, h: &Node, ctx: &str) -> Result<Healthcheck, ConfigError> {
        let e = self.map(h, "healthcheck")?.to_vec();
        self.check_keys(&e, HEALTH_KEYS, &format!("healthcheck of {ctx}"));
        let test_node = h.get("test").ok_or_else(|| {
            self.err(
                h.loc,
                format!(
                    "healthcheck of {ctx} has no `test`: add `test: <command>` (exit 0 = healthy)"
                ),
            )
        })?;
        let test = match &test_node.value {
            Value::Seq(items) => {
                let mut argv: Vec<String> = items
                    .iter()
                    .map(|i| self.string(i, "healthcheck.test"))
                    .collect::<Result<_, _>>()?;
                match argv.first().map(String::as_str) {
                    Some("CMD") => {
                        argv.remove(0);
                    }
                    Some("CMD-SHELL") => {
                        argv = vec!["sh".into(), "-c".into(), argv[1..].join(" ")];
                    }
                    _ => {}
                }
                argv
            }
            _ => vec![
                "sh".into(),
                "-c".into(),
                self.string(test_node, "healthcheck.test")?,
            ],
        };
        if test.is_empty() {
            return Err(self.err(test_node.loc, "`healthcheck.test` is empty"));
        }
        let shell = test.len() == 3 && test[0] == "sh" && test[1] == "-c";
        if (shell && test[2].trim().is_empty()) || test.iter().all(|a| a.trim().is_empty()) {
            return Err(self.err(
                test_node.loc,
                format!("`healthcheck.test` of {ctx} is an empty command: write the command that exits 0 when the service is healthy"),
            ));
        }
        // Docker takes 0 (inherit) or at least 1 ms for each; a day is far
        // past any sane wait, and a longer one would make `up` look hung.
        let dur =
            |key: &str, default: Duration, allow_zero: bool| -> Result<Duration, ConfigError> {
                match h.get(key) {
                    Some(n) if !n.is_null() => self.duration(
                        n,
                        &format!("healthcheck.{key}"),
                        MIN_DURATION,
                        MAX_DURATION,
                        allow_zero,
                    ),
                    _ => Ok(default),
                }
            };
        Ok(Healthcheck {
            test,
            interval: dur("interval", Duration::from_millis(500), false)?,
            timeout: dur("timeout", Duration::from_secs(5), false)?,
            start_period: dur("start_period", Duration::ZERO, true)?,
            retries: match h.get("retries") {
                Some(n) if !n.is_null() => self.int(n, "healthcheck.retries", 1, 10_000)? as u32,
                _ => 3,
            },
        })
    }
}

/// Docker's smallest memory limit, and a bound far past any host.
const MIN_MEMORY: u64 = 6 << 20;
const MAX_MEMORY: u64 = 16 << 40;

/// `512mb`, `1gb`, `1024k`, `100` (bytes).
fn parse_memory(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = n * mult;
    (bytes > 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}
