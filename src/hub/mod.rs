//! The hub: a live local dashboard (`nanokit hub`, JS `hub()`), a front end
//! beside cli/ and node/ that calls the same engine, repo, kv and trace API.
//!
//! Guarantees:
//! - it listens on 127.0.0.1 only; every request must carry the random token
//!   of the printed URL (a cookie after the first load) and a `Host` naming
//!   the loopback address and port (no DNS rebinding); actions are POSTs
//!   that carry the token in a header, and they run the engine calls the CLI
//!   makes, so they record the same traces and fail with the same codes;
//! - the page loads nothing from another origin (a strict
//!   Content-Security-Policy) and renders every string as text;
//! - everything it sends is masked with the configuration's secrets;
//! - the view is pushed over server-sent events: the whole view on connect,
//!   then each section that changed, driven by file change notifications and
//!   a short poll of liveness while a page is open (nothing while none is).
//!
//! See docs/hub.md.

mod actions;
mod assets;
mod http;
mod json;
mod live;
mod logs;
mod project;
mod query;
mod respond;
mod view;
mod watch;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError, LoadOptions};
use crate::error::ErrorCode;

/// An engine, state or kv call's future, boxed where the hub awaits it:
/// polled through a pointer, it is one shared instance in the binary, not a
/// copy (with its drop glue) inlined into each hub future that awaits it.
pub(super) fn boxed<'a, T>(
    f: impl std::future::Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>> {
    Box::pin(f)
}

/// Spawns a task of the hub as one boxed future: every hub task is then the
/// same type to tokio, whose task machinery (poll, wake, cancel, join) the
/// binary carries once for them all, not once per task.
pub(super) fn spawn(
    f: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let f: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = Box::pin(f);
    tokio::spawn(f)
}

/// The default port (`--port`).
pub const DEFAULT_PORT: u16 = 7420;

/// What to show.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The nanokit.yml.
    pub file: PathBuf,
    /// Environments to show, grouped; empty: the default environment and
    /// every other one with a local state file beside the configuration.
    pub envs: Vec<String>,
    /// Variables for `${VAR}` instead of the process environment.
    pub vars: Option<HashMap<String, String>>,
    /// Shared package repositories to show (`--repo`).
    pub repos: Vec<PathBuf>,
    /// Port on 127.0.0.1 (0: any free port).
    pub port: u16,
    /// Where the key/value state lives (default: as `nanokit state`).
    pub state: crate::kv::OpenOptions,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            file: PathBuf::from("nanokit.yml"),
            envs: Vec::new(),
            vars: None,
            repos: Vec::new(),
            port: DEFAULT_PORT,
            state: crate::kv::OpenOptions::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on 127.0.0.1:{port}: {source} (is another hub running? pass --port 0 for any free port)")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("`{0}` is not a directory (--repo names a shared package repository)")]
    Repo(PathBuf),
    #[error("cannot watch files for changes: {0}")]
    Watch(std::io::Error),
    #[error(transparent)]
    Provider(#[from] crate::provider::ProviderError),
}

impl ErrorCode for HubError {
    fn code(&self) -> &'static str {
        match self {
            HubError::Config(e) => e.code(),
            HubError::Bind { .. } => "ENKHUBPORT",
            HubError::Repo(_) => "ENKREPO",
            HubError::Watch(_) => "ENKIO",
            HubError::Provider(e) => e.code(),
        }
    }
}

/// A running hub. Dropping it does not stop it: call [`Hub::close`].
pub struct Hub {
    url: String,
    port: u16,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Hub {
    /// Loads the configuration (each environment), binds 127.0.0.1 and
    /// starts serving. Must run inside a Tokio runtime.
    pub async fn start(opts: HubOptions) -> Result<Hub, HubError> {
        for r in &opts.repos {
            if !r.is_dir() {
                return Err(HubError::Repo(r.clone()));
            }
        }
        let envs = environments(&opts)?;
        let listener =
            tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, opts.port)))
                .await
                .map_err(|source| HubError::Bind {
                    port: opts.port,
                    source,
                })?;
        let port = listener
            .local_addr()
            .map_err(|source| HubError::Bind {
                port: opts.port,
                source,
            })?
            .port();
        let token = new_token();
        let url = format!("http://127.0.0.1:{port}/?token={token}");
        let stop = CancellationToken::new();
        let live = live::Live::start(opts, envs, stop.clone())?;
        let server = Arc::new(http::Server {
            token,
            port,
            live,
            stop: stop.clone(),
        });
        let done = spawn(http::serve(server, listener));
        Ok(Hub {
            url,
            port,
            stop,
            done,
        })
    }

    /// The URL to open, with the token.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A token cancelled when the hub stops (or to stop it).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stops serving: open pages see their connection end; actions still
    /// running finish in the background.
    pub async fn close(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }
}

/// Opens `url` with the desktop's opener (`xdg-open`, `open` on macOS);
/// says on stderr when there is none.
pub fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    // Started in the background by a shell that exits at once: nothing is
    // left for us to reap (the URL is an argument, never part of the script).
    let script =
        format!("command -v {opener} >/dev/null || exit 127; {opener} \"$1\" >/dev/null 2>&1 &");
    let status = std::process::Command::new("sh")
        .args(["-c", &script, "sh", url])
        .stdin(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(_) => eprintln!("cannot open a browser ({opener} not found); open the URL yourself"),
        Err(e) => eprintln!("cannot open a browser (sh: {e}); open the URL yourself"),
    }
}

/// 256 random bits as hex (from the OS's CSPRNG, through uuid v4).
fn new_token() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("{a}{b}")
}

/// The environments to show: those asked for, else the default one and
/// every one with a local state file (`.nanokit/state.<env>.json`). Each
/// must load.
fn environments(opts: &HubOptions) -> Result<Vec<String>, HubError> {
    let mut envs = opts.envs.clone();
    if envs.is_empty() {
        envs.push(config::DEFAULT_ENV.to_string());
        let dir = opts
            .file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."))
            .join(".nanokit");
        let mut found: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let n = e.file_name().into_string().ok()?;
                        let env = n.strip_prefix("state.")?.strip_suffix(".json")?;
                        (!env.is_empty() && !env.contains('.')).then(|| env.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        envs.extend(found.into_iter().filter(|e| e != config::DEFAULT_ENV));
    }
    envs.dedup();
    for env in &envs {
        load(opts, env)?;
    }
    Ok(envs)
}

/// Loads the configuration of `env` as the CLI does.
fn load(opts: &HubOptions, env: &str) -> Result<config::Config, ConfigError> {
    let cfg = config::load(&LoadOptions {
        file: opts.file.clone(),
        env: env.to_string(),
        vars: opts.vars.clone(),
    })?;
    crate::trace::mask::register(&cfg.masker());
    Ok(cfg)
}
