//! How the Docker client reaches the daemon, from the variables the docker
//! CLI reads:
//!
//! - `DOCKER_HOST` unset: `unix:///var/run/docker.sock`; `unix://<path>`:
//!   that socket. (Docker contexts are not read.)
//! - `DOCKER_HOST=tcp://host:port` (or `http://`): plain HTTP, unless
//!   `DOCKER_TLS_VERIFY` is set to anything non-empty (as the CLI, even
//!   `0`): then HTTPS, the daemon's certificate verified against
//!   `$DOCKER_CERT_PATH/ca.pem` **only** (not the system's roots, as the
//!   CLI), host name included, and `cert.pem` / `key.pem` presented as the
//!   client certificate. `DOCKER_CERT_PATH` defaults to `$DOCKER_CONFIG`,
//!   else `~/.docker`. The files are read before connecting, so a missing or
//!   bad one fails naming it (`cert.pem` and `key.pem` may both be absent,
//!   as for the CLI: no client certificate is offered then).
//! - Anything else goes to bollard as it is (`ssh://` is refused there).
//!
//! TLS is rustls with ring ([`crate::sys::tls`]), through bollard's custom
//! transport, so bollard's own TLS (which adds the system's roots) is not
//! compiled in.

use std::path::PathBuf;
use std::sync::Arc;

use bollard::errors::Error as DockerError;
use bollard::{BollardRequest, Docker};

use super::ProviderError;
use crate::sys::tls;

/// bollard's per-request timeout (seconds), as for its own transports.
const TIMEOUT_SECS: u64 = 120;
const DEFAULT_SOCKET: &str = "unix:///var/run/docker.sock";

/// Where the daemon is, as the environment says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// A unix socket (or anything else bollard reads from `DOCKER_HOST`).
    Other(String),
    /// `tcp://host:port` without TLS.
    Tcp(String),
    /// `tcp://host:port` with `DOCKER_TLS_VERIFY`: the certificate directory.
    TcpTls { host: String, certs: PathBuf },
}

impl Endpoint {
    pub(super) fn from_env() -> Endpoint {
        let var = |n: &str| std::env::var(n).ok();
        Endpoint::parse(
            var("DOCKER_HOST").as_deref(),
            var("DOCKER_TLS_VERIFY").as_deref(),
            cert_path,
        )
    }

    /// The endpoint `DOCKER_HOST` and `DOCKER_TLS_VERIFY` name; `certs`
    /// gives the certificate directory when TLS is on.
    fn parse(
        host: Option<&str>,
        tls_verify: Option<&str>,
        certs: impl FnOnce() -> PathBuf,
    ) -> Endpoint {
        let host = host
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .unwrap_or(DEFAULT_SOCKET);
        let lower = host.to_ascii_lowercase();
        let Some(rest) = ["tcp://", "http://"]
            .iter()
            .find_map(|p| lower.starts_with(p).then(|| &host[p.len()..]))
        else {
            return Endpoint::Other(host.to_string());
        };
        let rest = rest.trim_end_matches('/');
        let tls = tls_verify.is_some_and(|v| !v.is_empty());
        // The CLI's default ports: 2376 with TLS, 2375 without.
        let has_port = rest.rsplit_once(':').is_some_and(|(h, p)| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':')
        });
        let addr = match (has_port, tls) {
            (true, _) => rest.to_string(),
            (false, true) => format!("{rest}:2376"),
            (false, false) => format!("{rest}:2375"),
        };
        if tls {
            Endpoint::TcpTls {
                host: addr,
                certs: certs(),
            }
        } else {
            Endpoint::Tcp(addr)
        }
    }

    /// Whether the daemon runs on this host: a unix socket, or TCP to a
    /// loopback address. (Its published ports are then bound here.)
    pub(super) fn on_this_host(&self) -> bool {
        match self {
            Endpoint::Other(h) => h.starts_with("unix://") || h.starts_with('/'),
            Endpoint::Tcp(a) | Endpoint::TcpTls { host: a, .. } => {
                let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                host.eq_ignore_ascii_case("localhost")
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        }
    }

    /// The address as the user wrote it (for messages).
    pub(super) fn shown(&self) -> String {
        match self {
            Endpoint::Other(h) => h.clone(),
            Endpoint::Tcp(a) | Endpoint::TcpTls { host: a, .. } => format!("tcp://{a}"),
        }
    }
}

/// `DOCKER_CERT_PATH`, else `DOCKER_CONFIG`, else `~/.docker`.
fn cert_path() -> PathBuf {
    ["DOCKER_CERT_PATH", "DOCKER_CONFIG"]
        .iter()
        .find_map(|v| std::env::var_os(v).filter(|p| !p.is_empty()))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".docker")
        })
}

/// A client for `endpoint` (not yet contacted).
pub(super) fn connect(endpoint: &Endpoint) -> Result<Docker, ProviderError> {
    match endpoint {
        Endpoint::Other(h) => {
            Docker::connect_with_host(h).map_err(|e| super::docker_err("connecting to Docker", e))
        }
        Endpoint::Tcp(a) => Docker::connect_with_http(
            &format!("tcp://{a}"),
            TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| super::docker_err("connecting to Docker", e)),
        Endpoint::TcpTls { host, certs } => connect_tls(host, certs),
    }
}

fn connect_tls(host: &str, dir: &std::path::Path) -> Result<Docker, ProviderError> {
    let ca = dir.join("ca.pem");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let identity = match (cert.exists(), key.exists()) {
        (false, false) => None,
        _ => Some(tls::Identity {
            cert: &cert,
            key: &key,
        }),
    };
    let config = tls::client_config(tls::Roots::File(&ca), "CA certificate", identity).map_err(|e| {
        ProviderError::Failed(format!(
            "connecting to the Docker daemon at tcp://{host} over TLS (DOCKER_TLS_VERIFY is set): {e}; DOCKER_CERT_PATH ({}) must hold ca.pem, cert.pem and key.pem",
            dir.display()
        ))
    })?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    let mut builder =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    // Connections are kept between calls (as the docker CLI keeps them):
    // a TLS handshake per call cost `up` of 12 services ~1 s on loopback,
    // and two round trips per call on a real network. An upgraded (exec)
    // connection never returns to the pool; an idle one is closed after 30 s.
    builder
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(std::time::Duration::from_secs(30));
    let client = Arc::new(builder.build(https));
    Docker::connect_with_custom_transport(
        move |req: BollardRequest| {
            let client = Arc::clone(&client);
            async move { client.request(req).await.map_err(DockerError::from) }
        },
        Some(format!("https://{host}")),
        TIMEOUT_SECS,
        bollard::API_DEFAULT_VERSION,
    )
    .map_err(|e| super::docker_err("connecting to Docker", e))
}

/// The first call to the daemon (the version handshake) failed.
pub(super) fn failed(endpoint: &Endpoint, e: DockerError) -> ProviderError {
    match (&e, endpoint) {
        // dockerd's answer to plain HTTP on its TLS port.
        (DockerError::DockerResponseServerError { message, .. }, Endpoint::Tcp(_))
            if message.contains("HTTPS") =>
        {
            ProviderError::Unreachable(format!(
                "connecting to Docker: the daemon at {} expects TLS (it answered \"{}\"); set DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH to a directory with ca.pem, cert.pem and key.pem",
                endpoint.shown(),
                message.trim()
            ))
        }
        _ => super::docker_err("connecting to Docker", e),
    }
}

/// The message of a transport failure reaching the daemon.
pub(super) fn unreachable(what: &str, e: &DockerError) -> String {
    let endpoint = Endpoint::from_env();
    let addr = endpoint.shown();
    match &endpoint {
        Endpoint::TcpTls { certs, .. } => match tls::explain(e) {
            Some(why) => format!(
                "{what}: the TLS connection to the Docker daemon at {addr} failed: {why}; nanokit trusts only {}/ca.pem and presents {0}/cert.pem (DOCKER_TLS_VERIFY, DOCKER_CERT_PATH)",
                certs.display()
            ),
            None => format!(
                "{what}: cannot reach the Docker daemon at {addr} (TLS): {}; is dockerd listening there with --tlsverify?",
                with_causes(e)
            ),
        },
        Endpoint::Tcp(_) => format!(
            "{what}: cannot reach the Docker daemon at {addr} (plain HTTP: DOCKER_TLS_VERIFY is not set): {}; is dockerd listening there without TLS?",
            with_causes(e)
        ),
        Endpoint::Other(_) => format!(
            "{what}: cannot reach the Docker daemon at {addr}: {e}; is dockerd running (and may this user use its socket)?"
        ),
    }
}

/// `e`'s message and those of its sources ("client error (Connect)" alone
/// does not say that the connection was refused).
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !text.contains(&m) {
            text.push_str(": ");
            text.push_str(&m);
        }
        cur = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_and_tls_verify_are_read_as_the_cli_reads_them() {
        let dir = || PathBuf::from("/certs");
        let p = |h: Option<&str>, v: Option<&str>| Endpoint::parse(h, v, dir);
        assert_eq!(p(None, Some("1")), Endpoint::Other(DEFAULT_SOCKET.into()));
        assert_eq!(
            p(Some("unix:///run/d.sock"), Some("1")),
            Endpoint::Other("unix:///run/d.sock".into())
        );
        assert_eq!(
            p(Some("tcp://127.0.0.1:2376"), None),
            Endpoint::Tcp("127.0.0.1:2376".into())
        );
        assert_eq!(p(Some("tcp://h"), Some("")), Endpoint::Tcp("h:2375".into()));
        let tls = |host: &str| Endpoint::TcpTls {
            host: host.into(),
            certs: dir(),
        };
        assert_eq!(p(Some("tcp://h/"), Some("1")), tls("h:2376"));
        // Any non-empty value turns verification on, as for the CLI.
        assert_eq!(p(Some("tcp://[::1]:9"), Some("0")), tls("[::1]:9"));
        assert_eq!(tls("h:1").shown(), "tcp://h:1");
    }
}
