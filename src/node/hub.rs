//! JS binding of the hub: `hub(options)` → a handle with its URL and
//! `close()`.

use std::collections::HashMap;
use std::path::PathBuf;

use napi::Result;
use napi_derive::napi;

use super::js_err;
use crate::hub::{Hub, HubOptions as Options, DEFAULT_PORT};

/// What the hub shows and where it listens.
#[napi(object)]
#[derive(Default)]
pub struct HubOptions {
    /// Path to nanokit.yml. Default `nanokit.yml` in the working directory.
    pub file: Option<String>,
    /// One environment to show (as `-e`).
    pub env: Option<String>,
    /// Environments to show, grouped. Default: the default environment and
    /// every other one with a state file beside the nanokit.yml.
    pub envs: Option<Vec<String>>,
    /// Variables for `${VAR}` instead of `process.env`.
    pub vars: Option<HashMap<String, String>>,
    /// Shared package repositories to show.
    pub repos: Option<Vec<String>>,
    /// Port on 127.0.0.1. Default 7420; 0: any free port.
    pub port: Option<u32>,
    /// Open the page in the default browser.
    pub open: Option<bool>,
    /// The key/value state to show: its directory (embedded) …
    pub state_dir: Option<String>,
    /// … or its PostgreSQL URL. Default: as `openState()`.
    pub state_url: Option<String>,
}

/// A running hub.
#[napi]
pub struct HubHandle {
    url: String,
    port: u32,
    inner: std::sync::Mutex<Option<Hub>>,
}

#[napi]
impl HubHandle {
    /// The page's URL, with its token.
    #[napi(getter)]
    pub fn url(&self) -> String {
        self.url.clone()
    }

    #[napi(getter)]
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Stops serving (idempotent).
    #[napi]
    pub async fn close(&self) {
        let hub = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(hub) = hub {
            hub.close().await;
        }
    }
}

/// Serves the dashboard on 127.0.0.1.
#[napi]
pub async fn hub(options: Option<HubOptions>) -> Result<HubHandle> {
    let o = options.unwrap_or_default();
    let mut envs = o.envs.unwrap_or_default();
    if let Some(e) = o.env {
        envs.insert(0, e);
    }
    let port = o.port.unwrap_or(DEFAULT_PORT as u32);
    let port = u16::try_from(port).map_err(|_| {
        napi::Error::from_reason(format!("ENKHUBPORT: port {port} is not a TCP port"))
    })?;
    let hub = Hub::start(Options {
        file: PathBuf::from(o.file.unwrap_or_else(|| "nanokit.yml".into())),
        envs,
        vars: o.vars,
        repos: o
            .repos
            .unwrap_or_default()
            .into_iter()
            .map(PathBuf::from)
            .collect(),
        port,
        state: crate::kv::OpenOptions {
            agent: None,
            state_dir: o.state_dir.map(PathBuf::from),
            url: o.state_url,
        },
    })
    .await
    .map_err(js_err)?;
    if o.open == Some(true) {
        crate::hub::open_browser(hub.url());
    }
    Ok(HubHandle {
        url: hub.url().to_string(),
        port: u32::from(hub.port()),
        inner: std::sync::Mutex::new(Some(hub)),
    })
}
