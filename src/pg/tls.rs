//! TLS for every PostgreSQL connection (KV store, remote infra state, deploy
//! lock, `infra unlock`), with libpq's parameters and meanings, on rustls
//! with the ring provider.
//!
//! - `sslmode`: `disable`; `allow` (plain, TLS if the server insists);
//!   `prefer` (the default: TLS if the server offers it, plain otherwise or
//!   when the TLS handshake fails); `require` (TLS, the certificate is not
//!   checked, unless a root certificate file is there: then as `verify-ca`,
//!   libpq's rule); `verify-ca` (the chain must reach the CA, any host name);
//!   `verify-full` (chain and host name).
//! - `sslrootcert` (a PEM file, or `system` for the platform's roots through
//!   rustls-native-certs), `sslcert`/`sslkey` (client certificate); libpq's
//!   defaults `~/.postgresql/root.crt`, `postgresql.crt`, `postgresql.key`
//!   when they exist; `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`
//!   when the URL does not say.
//! - These parameters are taken out of the URL before tokio-postgres parses
//!   it (it refuses most of them); tokio-postgres is told only whether TLS
//!   is off, optional or required, and the rustls verifier chosen here does
//!   the checking. Unix-socket connections never use TLS (as libpq).
//! - A failure caused by TLS becomes [`PgError::Tls`], whose
//!   [`TlsFailure`] says which it was, with a stable code.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as PgMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{PgError, TlsFailure};
use crate::sys::tls;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// Where the trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// A PEM file of CA certificates (`sslrootcert=<file>`).
    File(PathBuf),
    /// The platform's roots (`sslrootcert=system`).
    System,
}

/// The TLS settings of one connection URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    pub mode: SslMode,
    /// `None`: no root certificate (`require`/`prefer`/`allow` then check
    /// nothing; `verify-*` fail).
    pub roots: Option<Roots>,
    /// A client certificate and its key.
    pub client: Option<(PathBuf, PathBuf)>,
    /// Set when the roots were not given but `~/.postgresql/root.crt` was
    /// looked for (for the message of a `verify-*` without roots).
    default_root: Option<PathBuf>,
}

/// The parameters handled here (and taken out of the URL).
const OWN: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl TlsOptions {
    /// Takes the TLS parameters out of `url` (falling back to the
    /// environment, then to libpq's defaults) and returns the URL that
    /// tokio-postgres is given.
    pub fn from_url(url: &str) -> Result<(String, TlsOptions), PgError> {
        Self::from_url_with(url, &|k| std::env::var(k).ok(), home().as_deref())
    }

    /// [`TlsOptions::from_url`] with the environment and home directory
    /// given (for tests).
    pub fn from_url_with(
        url: &str,
        env: &dyn Fn(&str) -> Option<String>,
        home: Option<&Path>,
    ) -> Result<(String, TlsOptions), PgError> {
        // The query starts at the first '?' after the credentials (the part
        // up to the first '@'), as tokio-postgres' own parser reads it.
        let after_creds = url.find('@').map_or(0, |i| i + 1);
        let (base, query) = match url[after_creds..].find('?') {
            Some(q) => (&url[..after_creds + q], Some(&url[after_creds + q + 1..])),
            None => (url, None),
        };
        let mut kept = Vec::new();
        let mut given: [Option<String>; 4] = Default::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode(k)?;
            match OWN.iter().position(|o| *o == key) {
                Some(i) => given[i] = Some(decode(v)?),
                None => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let env_names = ["PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"];
        let [mode, root, cert, key] = std::array::from_fn(|i| {
            given[i]
                .clone()
                .or_else(|| env(env_names[i]).filter(|v| !v.is_empty()))
        });

        let roots = match root.as_deref() {
            Some("system") => Some(Roots::System),
            Some(file) => Some(Roots::File(PathBuf::from(file))),
            None => None,
        };
        let mode = match mode.as_deref() {
            Some(m) => SslMode::parse(m).ok_or_else(|| {
                PgError::BadUrl(format!(
                    "sslmode={m:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ))
            })?,
            // libpq: sslrootcert=system makes verify-full the default.
            None if roots == Some(Roots::System) => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if roots == Some(Roots::System) && mode != SslMode::VerifyFull && mode != SslMode::Disable {
            return Err(PgError::BadUrl(format!(
                "sslmode={} may not be used with sslrootcert=system (the platform's roots make sense only with a host name check): use sslmode=verify-full",
                mode.as_str()
            )));
        }
        // libpq's default files, used when they exist.
        let pg_dir = home.map(|h| h.join(".postgresql"));
        let mut default_root = None;
        let roots = match roots {
            Some(r) => Some(r),
            None => {
                let f = pg_dir.as_ref().map(|d| d.join("root.crt"));
                default_root = f.clone();
                f.filter(|f| f.exists()).map(Roots::File)
            }
        };
        let client = match (cert, key) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            // The key may be in the certificate's file.
            (Some(c), None) => Some((PathBuf::from(&c), PathBuf::from(c))),
            (None, Some(_)) => return Err(PgError::BadUrl(
                "sslkey is set but sslcert is not; give the client certificate with sslcert=<file>"
                    .into(),
            )),
            (None, None) => pg_dir
                .map(|d| (d.join("postgresql.crt"), d.join("postgresql.key")))
                .filter(|(c, k)| c.exists() && k.exists()),
        };
        Ok((
            rest,
            TlsOptions {
                mode,
                roots,
                client,
                default_root,
            },
        ))
    }

    /// The tokio-postgres mode of the first attempt, and of the second one
    /// when the first failed in a way that libpq retries (`allow`: plain
    /// refused by the server → TLS; `prefer`: TLS handshake failed → plain).
    pub fn attempts(&self) -> (PgMode, Option<PgMode>) {
        match self.mode {
            SslMode::Disable => (PgMode::Disable, None),
            SslMode::Allow => (PgMode::Disable, Some(PgMode::Require)),
            SslMode::Prefer => (PgMode::Prefer, Some(PgMode::Disable)),
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => (PgMode::Require, None),
        }
    }

    /// The rustls connector for this mode; reads the certificate files.
    pub fn connector(&self, location: &str) -> Result<MakeRustlsConnect, PgError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let file_err = |detail: String| PgError::Tls {
            location: location.to_string(),
            failure: TlsFailure::File,
            detail,
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| file_err(format!("cannot set up TLS: {e}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = if self.mode == SslMode::Disable {
            Arc::new(NoHostName {
                roots: None,
                provider: provider.clone(),
            })
        } else {
            match (&self.roots, self.mode) {
                (None, m) if m.verifies() => {
                    let looked = self
                        .default_root
                        .as_ref()
                        .map(|p| format!(" ({} does not exist)", p.display()))
                        .unwrap_or_default();
                    return Err(file_err(format!(
                        "sslmode={} checks the server's certificate but no CA certificate is given{looked}; set sslrootcert=<file> to the CA that signed the server's certificate, or sslrootcert=system for the platform's roots",
                        m.as_str()
                    )));
                }
                (None, _) => Arc::new(NoHostName {
                    roots: None,
                    provider: provider.clone(),
                }),
                (Some(roots), m) => {
                    let store = Arc::new(load_roots(roots).map_err(file_err)?);
                    if m == SslMode::VerifyFull {
                        WebPkiServerVerifier::builder_with_provider(store, provider.clone())
                            .build()
                            .map_err(|e| {
                                file_err(format!("cannot use {}: {e}", roots_name(roots)))
                            })?
                    } else {
                        // verify-ca, and libpq's require/prefer/allow with a root file.
                        Arc::new(NoHostName {
                            roots: Some(store),
                            provider: provider.clone(),
                        })
                    }
                }
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.client, self.mode) {
            (Some((cert, key_file)), m) if m != SslMode::Disable => {
                let (chain, key) = load_client(cert, key_file).map_err(file_err)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    file_err(format!(
                        "cannot use the client certificate {} with the key {}: {e}",
                        cert.display(),
                        key_file.display()
                    ))
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }

    /// The [`PgError`] of a failed connection when TLS was the cause (or the
    /// server demanded TLS that was not used); `None` otherwise.
    pub fn explain(&self, e: &tokio_postgres::Error, location: &str) -> Option<PgError> {
        let err = |failure, detail: String| {
            Some(PgError::Tls {
                location: location.to_string(),
                failure,
                detail,
            })
        };
        if let Some(db) = e.as_db_error() {
            let msg = db.message();
            if db.code() != &tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
                return None;
            }
            if msg.contains("no encryption") || msg.contains("SSL off") {
                return err(
                    TlsFailure::Required,
                    format!(
                        "the server requires TLS for this connection ({msg}), but sslmode={} did not use it; use sslmode=verify-full with sslrootcert=<CA file> (or sslmode=require)",
                        self.mode.as_str()
                    ),
                );
            }
            if msg.contains("certificate") {
                let what = match &self.client {
                    Some((c, _)) => {
                        format!("the client certificate {} was not accepted", c.display())
                    }
                    None => "no client certificate was given".to_string(),
                };
                return err(
                    TlsFailure::ClientCert,
                    format!(
                        "the server wants a valid client certificate for this user ({msg}); {what}: give sslcert=<file> and sslkey=<file>, a certificate signed by the server's CA whose CN is the user name"
                    ),
                );
            }
            return None;
        }
        if let Some(tls) = crate::sys::tls::rustls_cause(e) {
            return Some(self.explain_rustls(tls, location));
        }
        let text = with_causes(e);
        if text.contains("server does not support TLS") {
            return err(
                TlsFailure::Refused,
                format!(
                    "the server refused TLS (it does not support it: ssl=off?), but sslmode={} requires it; enable ssl on the server, or use sslmode=prefer to allow a connection without TLS",
                    self.mode.as_str()
                ),
            );
        }
        if text.contains("TLS handshake") {
            return err(
                TlsFailure::Handshake,
                format!("TLS with the server failed: {text}"),
            );
        }
        None
    }

    fn explain_rustls(&self, tls: &rustls::Error, location: &str) -> PgError {
        use rustls::{AlertDescription as A, CertificateError as C};
        let (failure, detail) = match tls {
            rustls::Error::InvalidCertificate(C::NotValidForNameContext { expected, presented }) => (
                TlsFailure::HostName,
                format!(
                    "the server's certificate is not valid for the host name {} (it names {}); connect by a name the certificate lists, get a certificate that names {0}, or use sslmode=verify-ca to check only the CA",
                    server_name(expected),
                    if presented.is_empty() {
                        "none".to_string()
                    } else {
                        presented.iter().map(|n| presented_name(n)).collect::<Vec<_>>().join(", ")
                    }
                ),
            ),
            rustls::Error::InvalidCertificate(C::NotValidForName) => (
                TlsFailure::HostName,
                "the server's certificate is not valid for the host name of the URL; connect by a name the certificate lists, or use sslmode=verify-ca to check only the CA".to_string(),
            ),
            rustls::Error::InvalidCertificate(why) => (
                TlsFailure::Untrusted,
                format!(
                    "the server's certificate is not trusted: {} (checked against {}); set sslrootcert=<file> to the CA that signed the server's certificate",
                    describe_cert_error(why),
                    self.roots.as_ref().map(roots_name).unwrap_or_else(|| "no CA".into())
                ),
            ),
            rustls::Error::AlertReceived(
                a @ (A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::CertificateRequired),
            ) => (
                TlsFailure::ClientCert,
                match &self.client {
                    Some((c, _)) => format!(
                        "the server rejected the client certificate {} (TLS alert {a:?}); give sslcert/sslkey a certificate signed by a CA the server trusts (its ssl_ca_file)",
                        c.display()
                    ),
                    None => format!(
                        "the server requires a client certificate (TLS alert {a:?}); give sslcert=<file> and sslkey=<file>"
                    ),
                },
            ),
            other => (
                TlsFailure::Handshake,
                format!("the TLS handshake with the server failed: {other}"),
            ),
        };
        PgError::Tls {
            location: location.to_string(),
            failure,
            detail,
        }
    }
}

/// The error and each of its causes, `: `-separated (tokio-postgres'
/// `Display` shows only its own kind).
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !text.ends_with(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cur = c.source();
    }
    text
}

/// A name webpki presents as `DnsName("x")`, as `x`.
fn presented_name(n: &str) -> &str {
    n.strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .unwrap_or(n)
}

fn describe_cert_error(e: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match e {
        C::UnknownIssuer => "it is not signed by a trusted CA".into(),
        C::BadSignature => "its signature does not verify".into(),
        C::Expired | C::ExpiredContext { .. } => "it has expired".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet".into(),
        C::Revoked => "it is revoked".into(),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "it is not meant for a TLS server".into()
        }
        other => format!("{other:?}"),
    }
}

fn server_name(n: &ServerName<'_>) -> String {
    match n {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

fn roots_name(r: &Roots) -> String {
    match r {
        Roots::File(p) => format!("the CA file {}", p.display()),
        Roots::System => "the system's root certificates, sslrootcert=system".into(),
    }
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

fn decode(s: &str) -> Result<String, PgError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| PgError::BadUrl(format!("the URL parameter {s:?} is not UTF-8")))
}

fn load_roots(roots: &Roots) -> Result<RootCertStore, String> {
    let roots = match roots {
        Roots::File(path) => tls::Roots::File(path),
        Roots::System => tls::Roots::Platform,
    };
    tls::root_store(roots, "sslrootcert file").map_err(|e| e.to_string())
}

type ClientAuth = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load_client(cert: &Path, key: &Path) -> Result<ClientAuth, String> {
    let chain = tls::read_certs("sslcert file", cert).map_err(|e| e.to_string())?;
    if key == cert {
        let key = tls::read_key("sslcert file", cert).map_err(|_| {
            format!(
                "sslcert is set without sslkey, and the sslcert file {} holds no private key; give the key with sslkey=<file>",
                cert.display()
            )
        })?;
        return Ok((chain, key));
    }
    let key = tls::read_key("sslkey file", key).map_err(|e| {
        format!("{e}; give an unencrypted PEM key (PKCS#8, PKCS#1 or SEC1) with sslkey=<file>")
    })?;
    Ok((chain, key))
}

/// The verifier of every mode but `verify-full`: with `roots` (`verify-ca`,
/// and libpq's `require`/`prefer`/`allow` with a root file) the chain must
/// reach one of them; without (`require`/`prefer`/`allow` without a root
/// certificate, libpq's meaning) any certificate is accepted. The host name
/// is never checked; the handshake signature must always be made by the
/// certificate's key, so the session is encrypted to whoever holds it.
#[derive(Debug)]
struct NoHostName {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str, env: &[(&str, &str)]) -> Result<(String, TlsOptions), PgError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TlsOptions::from_url_with(
            url,
            &move |k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
            None,
        )
    }

    #[test]
    fn tls_parameters_leave_the_url_and_the_rest_stays_in_order() {
        let (rest, o) = split(
            "postgres://u:p%3Fw@db.example:5432/app?connect_timeout=5&sslmode=verify-full&sslrootcert=/etc/ca%20x.pem&application_name=a&sslcert=/c.pem&sslkey=/k.pem",
            &[],
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p%3Fw@db.example:5432/app?connect_timeout=5&application_name=a"
        );
        assert_eq!(o.mode, SslMode::VerifyFull);
        assert_eq!(o.roots, Some(Roots::File("/etc/ca x.pem".into())));
        assert_eq!(o.client, Some(("/c.pem".into(), "/k.pem".into())));
        let (rest, o) = split("postgres://u@h/db?sslmode=require", &[]).unwrap();
        assert_eq!(rest, "postgres://u@h/db");
        assert_eq!(o.mode, SslMode::Require);
        assert_eq!(o.roots, None);
    }

    #[test]
    fn the_default_is_prefer_and_the_environment_applies_when_the_url_is_silent() {
        let (_, o) = split("postgres://u@h/db", &[]).unwrap();
        assert_eq!((o.mode, o.roots, o.client), (SslMode::Prefer, None, None));
        let env = [
            ("PGSSLMODE", "verify-ca"),
            ("PGSSLROOTCERT", "/env/ca.pem"),
            ("PGSSLCERT", "/env/c.pem"),
            ("PGSSLKEY", "/env/k.pem"),
        ];
        let (_, o) = split("postgres://u@h/db", &env).unwrap();
        assert_eq!(o.mode, SslMode::VerifyCa);
        assert_eq!(o.roots, Some(Roots::File("/env/ca.pem".into())));
        assert_eq!(o.client, Some(("/env/c.pem".into(), "/env/k.pem".into())));
        let (_, o) = split("postgres://u@h/db?sslmode=disable&sslrootcert=/u.pem", &env).unwrap();
        assert_eq!(o.mode, SslMode::Disable);
        assert_eq!(o.roots, Some(Roots::File("/u.pem".into())));
    }

    #[test]
    fn system_roots_mean_verify_full_and_refuse_weaker_modes() {
        let (_, o) = split("postgres://u@h/db?sslrootcert=system", &[]).unwrap();
        assert_eq!(
            (o.mode, o.roots),
            (SslMode::VerifyFull, Some(Roots::System))
        );
        let e = split("postgres://u@h/db?sslrootcert=system&sslmode=require", &[]).unwrap_err();
        assert!(e.to_string().contains("verify-full"), "{e}");
        assert_eq!(crate::error::ErrorCode::code(&e), "ENKSTATEURL");
    }

    #[test]
    fn an_unknown_sslmode_is_a_bad_url() {
        let e = split("postgres://u@h/db?sslmode=verify_full", &[]).unwrap_err();
        assert_eq!(crate::error::ErrorCode::code(&e), "ENKSTATEURL");
        assert!(e.to_string().contains("verify-full"), "{e}");
    }

    #[test]
    fn attempts_follow_libpq() {
        let o = |mode| TlsOptions {
            mode,
            roots: None,
            client: None,
            default_root: None,
        };
        assert_eq!(o(SslMode::Disable).attempts(), (PgMode::Disable, None));
        assert_eq!(
            o(SslMode::Allow).attempts(),
            (PgMode::Disable, Some(PgMode::Require))
        );
        assert_eq!(
            o(SslMode::Prefer).attempts(),
            (PgMode::Prefer, Some(PgMode::Disable))
        );
        for m in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
            assert_eq!(o(m).attempts(), (PgMode::Require, None));
        }
    }
}
