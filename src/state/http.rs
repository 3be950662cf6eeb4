//! The HTTP client of the remote state stores (S3, GCS, Vault): reqwest
//! with rustls on ring only (no aws-lc, no OpenSSL), configured here rather
//! than by any crate's defaults, with bounded waits.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use crate::sys::tls;

fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Which servers to trust, and how to present ourselves.
#[derive(Debug, Clone, Default)]
pub struct Trust<'a> {
    /// CA certificates (PEM files); none: the platform's store.
    pub ca_files: Vec<&'a Path>,
    /// A client certificate and its key.
    pub identity: Option<tls::Identity<'a>>,
    /// Only plain `http://` will be used: no roots are loaded.
    pub plain_only: bool,
}

/// A client for `trust`; the error says which file or setting is wrong.
pub fn client(trust: &Trust<'_>) -> Result<reqwest::Client, String> {
    let mut config = match (trust.plain_only, trust.ca_files.first()) {
        (true, _) => tls::client_config(tls::Roots::Nothing, "CA file", None),
        (false, None) => tls::client_config(tls::Roots::Platform, "CA file", trust.identity),
        (false, Some(first)) => {
            tls::client_config(tls::Roots::File(first), "CA file", trust.identity)
        }
    }
    .map_err(|e| e.to_string())?;
    if trust.ca_files.len() > 1 {
        // More CA files (VAULT_CAPATH): every certificate of each is trusted.
        let mut store =
            tls::root_store(tls::Roots::Nothing, "CA file").map_err(|e| e.to_string())?;
        for f in &trust.ca_files {
            for c in tls::read_certs("CA file", f).map_err(|e| e.to_string())? {
                store.add(c).map_err(|e| format!("{}: {e}", f.display()))?;
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(store);
        config = match trust.identity {
            None => builder.with_no_client_auth(),
            Some(id) => builder
                .with_client_auth_cert(
                    tls::read_certs("client certificate", id.cert).map_err(|e| e.to_string())?,
                    tls::read_key("client key", id.key).map_err(|e| e.to_string())?,
                )
                .map_err(|e| format!("the client certificate {}: {e}", id.cert.display()))?,
        };
    }
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .tls_backend_preconfigured(config)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// Sends `req`, and again (three tries in all) after a connection error, an
/// answer lost on the way, or a 502/503/504. A write whose answer was lost
/// may have landed: the caller then recognises its own write (its run id or
/// its bytes) in the 412 the retry gets.
pub async fn send(req: reqwest::RequestBuilder) -> Result<reqwest::Response, reqwest::Error> {
    let mut pause = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        tries += 1;
        let attempt = req.try_clone().expect("request bodies are bytes");
        match attempt.send().await {
            Ok(r) if tries < 3 && matches!(r.status().as_u16(), 502..=504) => {}
            Err(e) if tries < 3 && !e.is_timeout() && (e.is_connect() || e.is_request()) => {
                tracing::debug!("retrying a state store request: {}", describe(&e));
            }
            r => return r,
        }
        tokio::time::sleep(pause).await;
        pause *= 3;
    }
}

/// An error of a request, with its causes (reqwest's `Display` shows only
/// its own kind) and, for a failed TLS handshake, what went wrong in words.
pub fn describe(e: &reqwest::Error) -> String {
    if let Some(why) = tls::explain(e) {
        return why;
    }
    crate::pg::with_causes(e)
}

/// A refused answer as an error's detail: its status and the first 300
/// characters of its body.
pub(super) async fn answer(resp: reqwest::Response) -> String {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    format!("{status}: {}", text.chars().take(300).collect::<String>())
}

/// `application/x-www-form-urlencoded` bodies without reqwest's `form`
/// feature.
pub(super) trait FormBody {
    fn form_body(self, pairs: &[(&str, &str)]) -> Self;
}

impl FormBody for reqwest::RequestBuilder {
    fn form_body(self, pairs: &[(&str, &str)]) -> Self {
        let body = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
            .collect::<Vec<_>>()
            .join("&");
        self.header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
    }
}

/// JSON bodies without reqwest's `json` feature.
#[async_trait]
pub(super) trait JsonBody {
    async fn json_body<T: serde::de::DeserializeOwned>(self) -> Result<T, String>;
}

#[async_trait]
impl JsonBody for reqwest::Response {
    async fn json_body<T: serde::de::DeserializeOwned>(self) -> Result<T, String> {
        let bytes = self.bytes().await.map_err(|e| describe(&e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "unexpected answer ({e}): {}",
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(300)
                    .collect::<String>()
            )
        })
    }
}
