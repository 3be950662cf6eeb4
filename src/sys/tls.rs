//! TLS client configuration for the OTLP exporter and the Docker client:
//! rustls with the **ring** provider only (no OpenSSL, no aws-lc), chosen
//! explicitly, never from a process-wide default.
//!
//! - PEM files are read when the configuration is built, so a missing,
//!   unreadable or empty CA / certificate / key file is reported by its path
//!   before any connection is tried.
//! - Without a CA file the platform's roots are trusted: the system's CA
//!   store read by `rustls-native-certs` (`SSL_CERT_FILE` / `SSL_CERT_DIR`,
//!   else the distribution's bundle), the roots curl and the docker CLI trust,
//!   CAs an administrator added included. (`webpki-roots` would bake Mozilla's
//!   list into the binary: no corporate CA, no update without a new build.)
//! - [`explain`] turns a handshake failure found anywhere in an error's
//!   source chain into words: untrusted certificate, wrong host name,
//!   client certificate refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// A TLS setting that cannot be used (read before connecting).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {} is not usable: {detail}", path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("no trusted root certificates: {0}")]
    NoRoots(String),
    #[error("the client certificate {} and key {} do not go together: {detail}", cert.display(), key.display())]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
}

/// Which servers to trust.
#[derive(Debug, Clone, Copy)]
pub enum Roots<'a> {
    /// Only the CA certificates in this PEM file (what `DOCKER_CERT_PATH`'s
    /// `ca.pem` and `OTEL_EXPORTER_OTLP_CERTIFICATE` mean).
    File(&'a Path),
    /// The platform's store.
    Platform,
    /// None (a client that never makes a TLS connection).
    Nothing,
}

/// A client certificate and its private key (PEM files).
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates of a PEM file (at least one).
pub fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let invalid = |detail: String| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("bad PEM ({e})")))?;
    if certs.is_empty() {
        return Err(invalid(
            "no PEM certificate (BEGIN CERTIFICATE) in it".into(),
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1; not encrypted).
pub fn read_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        detail: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no unencrypted PEM private key in it".into()
            }
            e => format!("bad PEM ({e})"),
        },
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The trust anchors of `roots` (`what` names the CA file in errors).
pub fn root_store(roots: Roots<'_>, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::Nothing => {}
        Roots::File(path) => {
            for cert in read_certs(what, path)? {
                store.add(cert).map_err(|e| TlsError::Invalid {
                    what,
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })?;
            }
        }
        Roots::Platform => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err(TlsError::NoRoots(format!(
                    "the system's CA store is empty or unreadable{why}; install the ca-certificates package, set SSL_CERT_FILE, or name a CA file"
                )));
            }
        }
    }
    Ok(store)
}

/// A client configuration trusting `roots` (`what` names the CA file in
/// errors), presenting `identity` when given.
pub fn client_config(
    roots: Roots<'_>,
    what: &'static str,
    identity: Option<Identity<'_>>,
) -> Result<ClientConfig, TlsError> {
    let store = root_store(roots, what)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(store);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => {
            let certs = read_certs("client certificate", id.cert)?;
            let key = read_key("client key", id.key)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsError::Identity {
                    cert: id.cert.to_path_buf(),
                    key: id.key.to_path_buf(),
                    detail: e.to_string(),
                })
        }
    }
}

/// What went wrong in a TLS handshake, when `err`'s source chain holds a
/// rustls error (directly or inside `io::Error`s), in words.
pub fn explain(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    rustls_cause(err).map(describe)
}

/// The rustls error in `err`'s source chain (directly or inside
/// `io::Error`s), if any.
pub fn rustls_cause<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    find_rustls(err, 0)
}

fn find_rustls<'a>(
    e: &'a (dyn std::error::Error + 'static),
    depth: usize,
) -> Option<&'a rustls::Error> {
    if depth > 16 {
        return None;
    }
    if let Some(t) = e.downcast_ref::<rustls::Error>() {
        return Some(t);
    }
    // An io::Error's source() skips the error it wraps: look inside.
    let inner = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|i| find_rustls(i, depth + 1));
    inner.or_else(|| find_rustls(e.source()?, depth + 1))
}

fn describe(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::UnknownIssuer) => format!(
            "TLS: the server's certificate is not trusted (not issued by a CA nanokit trusts) ({e})"
        ),
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "TLS: the server's certificate does not name this host ({e})"
        ),
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            format!("TLS: the server's certificate has expired ({e})")
        }
        E::InvalidCertificate(_) => format!("TLS: the server's certificate is not valid ({e})"),
        E::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateRequired
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::AccessDenied,
        ) => format!(
            "TLS: the server refused nanokit's client certificate (missing, or not issued by a CA the server trusts) ({e})"
        ),
        _ => format!("TLS handshake failed ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let e = client_config(Roots::File(&missing), "CA file", None).unwrap_err();
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        assert!(e.to_string().contains("CA file"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = client_config(Roots::File(&empty), "CA file", None).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = read_key("client key", &empty).unwrap_err();
        assert!(
            e.to_string().contains("no unencrypted PEM private key"),
            "{e}"
        );
    }

    #[test]
    fn handshake_errors_are_explained_through_io_errors() {
        // As reqwest hands it on: an io::Error around hyper-rustls' io::Error.
        let io = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert!(explain(&io).unwrap().contains("not trusted"));
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate);
        assert!(explain(&alert).unwrap().contains("client certificate"));
        let other = std::io::Error::other("refused");
        assert!(explain(&other).is_none());
    }
}
