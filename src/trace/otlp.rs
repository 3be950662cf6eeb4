//! The HTTP client of the OTLP exporter: nanokit's own blocking `reqwest`
//! client on rustls + ring ([`crate::sys::tls`]), so `https://` endpoints
//! work without OpenSSL.
//!
//! - **TLS settings** (read when the exporter is built), each
//!   `OTEL_EXPORTER_OTLP_TRACES_<X>` winning over `OTEL_EXPORTER_OTLP_<X>`
//!   as the OpenTelemetry spec says: `…CERTIFICATE` (the CA file to trust
//!   instead of the system's store), `…CLIENT_CERTIFICATE` and
//!   `…CLIENT_KEY` (mTLS, both or neither). A file that cannot be used turns
//!   export off with one warning naming it; the run goes on.
//! - **Headers** (`OTEL_EXPORTER_OTLP_HEADERS` / `…_TRACES_HEADERS`) are
//!   parsed by `opentelemetry-otlp` and never printed by nanokit.
//! - **Failures at export** (a TLS error, a refused connection) are kept in
//!   a [`Diag`] so the one warning of a run says what went wrong (the
//!   exporter itself only says "network error").

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};

use crate::sys::tls;

/// The last transport failure of an exporter, in words.
pub(super) type Diag = Arc<Mutex<Option<String>>>;

/// `OTEL_EXPORTER_OTLP_TRACES_<x>`, else `OTEL_EXPORTER_OTLP_<x>`, when set
/// and not empty: (variable, value).
fn setting(x: &str) -> Option<(String, String)> {
    [
        format!("OTEL_EXPORTER_OTLP_TRACES_{x}"),
        format!("OTEL_EXPORTER_OTLP_{x}"),
    ]
    .into_iter()
    .find_map(|name| {
        let v = std::env::var(&name).ok()?;
        let v = v.trim().to_string();
        (!v.is_empty()).then_some((name, v))
    })
}

/// The exporter's timeout: `…TRACES_TIMEOUT` / `…TIMEOUT` in milliseconds,
/// else `default`.
pub(super) fn timeout(default: Duration) -> Duration {
    setting("TIMEOUT")
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(default)
}

/// `url` without any `user:password@` in it (for messages).
pub(super) fn shown(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            return format!("{scheme}://***@{}", &rest[at + 1..]);
        }
    }
    url.to_string()
}

/// The TLS configuration the variables ask for (`https` endpoints).
fn tls_config() -> Result<(rustls::ClientConfig, String), String> {
    let ca = setting("CERTIFICATE");
    let cert = setting("CLIENT_CERTIFICATE");
    let key = setting("CLIENT_KEY");
    let identity = match (&cert, &key) {
        (Some(c), Some(k)) => Some((PathBuf::from(&c.1), PathBuf::from(&k.1))),
        (None, None) => None,
        (Some((set, _)), None) | (None, Some((set, _))) => {
            let missing = if set.ends_with("_KEY") {
                set.replace("_CLIENT_KEY", "_CLIENT_CERTIFICATE")
            } else {
                set.replace("_CLIENT_CERTIFICATE", "_CLIENT_KEY")
            };
            return Err(format!(
                "{set} is set but {missing} is not: a client certificate needs its key (set both, or neither)"
            ));
        }
    };
    let roots = match &ca {
        Some((_, path)) => tls::Roots::File(std::path::Path::new(path)),
        None => tls::Roots::Platform,
    };
    let id = identity
        .as_ref()
        .map(|(c, k)| tls::Identity { cert: c, key: k });
    let config = tls::client_config(roots, "CA file", id).map_err(|e| {
        let vars: Vec<&str> = [&ca, &cert, &key]
            .into_iter()
            .flatten()
            .map(|(n, _)| n.as_str())
            .collect();
        if vars.is_empty() {
            e.to_string()
        } else {
            format!("{e} (from {})", vars.join(", "))
        }
    })?;
    let trusted = match ca {
        Some((name, path)) => format!("the CA in {path} ({name})"),
        None => "the system's CA store".into(),
    };
    Ok((config, trusted))
}

/// The HTTP client for an exporter sending to `endpoint`, and where its
/// failures are recorded. Err: why export must be off.
pub(super) fn client(endpoint: &str, timeout: Duration) -> Result<(Explaining, Diag), String> {
    let https = endpoint.trim().to_ascii_lowercase().starts_with("https:");
    let (config, trusted) = if https {
        tls_config()?
    } else {
        (
            tls::client_config(tls::Roots::Nothing, "CA file", None).map_err(|e| e.to_string())?,
            String::new(),
        )
    };
    // reqwest's blocking client runs its own runtime thread and must not
    // be built on a thread of another runtime.
    let client = std::thread::spawn(move || {
        reqwest::blocking::Client::builder()
            .timeout(timeout)
            .tls_backend_preconfigured(config)
            .build()
    })
    .join()
    .map_err(|_| "building the HTTP client panicked".to_string())?
    .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let diag = Diag::default();
    Ok((
        Explaining {
            client,
            trusted,
            diag: diag.clone(),
        },
        diag,
    ))
}

/// The exporter's HTTP client: reqwest's, recording why a request failed.
#[derive(Debug)]
pub(super) struct Explaining {
    client: reqwest::blocking::Client,
    /// What the server's certificate is checked against (https), for messages.
    trusted: String,
    diag: Diag,
}

/// The messages of `e`'s sources (reqwest's own message names the URL,
/// which may hold credentials: left out).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !out.iter().any(|o| o.contains(&m)) {
            out.push(m);
        }
        cur = c.source();
    }
    if out.is_empty() {
        if e.downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.is_timeout())
        {
            return "timed out".into();
        }
        return "the request failed".into();
    }
    out.join(": ")
}

#[async_trait::async_trait]
impl HttpClient for Explaining {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let r = self.client.send_bytes(request).await;
        let why = r.as_ref().err().map(|e| match tls::explain(e.as_ref()) {
            Some(t) => format!("{t}; the certificate was checked against {}", self.trusted),
            None => causes(e.as_ref()),
        });
        *self.diag.lock().unwrap_or_else(|e| e.into_inner()) = why;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_an_endpoint_are_not_shown() {
        assert_eq!(
            shown("https://user:pw@collector:4318/v1/traces"),
            "https://***@collector:4318/v1/traces"
        );
        assert_eq!(shown("http://127.0.0.1:1/a@b"), "http://127.0.0.1:1/a@b");
    }
}
