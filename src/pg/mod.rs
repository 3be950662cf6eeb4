//! PostgreSQL connections, for every part of nanokit that keeps something in
//! PostgreSQL (the key/value store, the remote infra state and its deploy
//! lock): one [`connect`] with libpq's URL and TLS meanings ([`tls`]), one
//! error type, and the URL without its password for messages.

use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

mod tls;

pub use tls::with_causes;
use tls::TlsOptions;

use crate::error::ErrorCode;

/// How long connecting may take when the URL does not say
/// (`connect_timeout=` in the URL overrides it).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong talking to a PostgreSQL server. Each variant has a
/// stable code and a message that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// A URL nanokit cannot use (`ENKSTATEURL`).
    #[error("invalid PostgreSQL URL: {0}; expected postgres://user:password@host:port/database")]
    BadUrl(String),
    /// The server cannot be reached, or the connection was lost
    /// (`ENKSTATEUNAVAILABLE`).
    #[error("{location} is unavailable: {detail}")]
    Unavailable { location: String, detail: String },
    /// TLS with the server failed, or the server demanded TLS that was not
    /// used, or a certificate file cannot be used; the [`TlsFailure`] says
    /// which (and gives the code).
    #[error("{location}: {detail}")]
    Tls {
        location: String,
        failure: TlsFailure,
        detail: String,
    },
    /// A nanokit table does not have the expected shape (`ENKSTATECORRUPT`).
    #[error(
        "{location} is corrupt or not a nanokit database ({detail}); nanokit will not reset it"
    )]
    Corrupt { location: String, detail: String },
    /// Any other error the server reported (`ENKSTATE`).
    #[error("{location}: {detail}")]
    Server { location: String, detail: String },
}

impl ErrorCode for PgError {
    fn code(&self) -> &'static str {
        match self {
            PgError::BadUrl(_) => "ENKSTATEURL",
            PgError::Unavailable { .. } => "ENKSTATEUNAVAILABLE",
            PgError::Tls { failure, .. } => failure.code(),
            PgError::Corrupt { .. } => "ENKSTATECORRUPT",
            PgError::Server { .. } => "ENKSTATE",
        }
    }
}

/// Which part of TLS with a PostgreSQL server failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// `ENKTLSREFUSED`: the sslmode requires TLS and the server does not
    /// offer it.
    Refused,
    /// `ENKTLSREQUIRED`: the server refused a connection without TLS
    /// (`hostssl`-only `pg_hba.conf`).
    Required,
    /// `ENKTLSCERT`: the server's certificate is not trusted by the CA.
    Untrusted,
    /// `ENKTLSHOSTNAME`: the server's certificate does not name the host.
    HostName,
    /// `ENKTLSCLIENTCERT`: the server rejected (or wanted) a client
    /// certificate.
    ClientCert,
    /// `ENKTLSFILE`: an sslrootcert/sslcert/sslkey file cannot be read or
    /// used, or a verifying sslmode has no CA.
    File,
    /// `ENKTLS`: any other TLS handshake failure.
    Handshake,
}

impl TlsFailure {
    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            TlsFailure::Refused => "ENKTLSREFUSED",
            TlsFailure::Required => "ENKTLSREQUIRED",
            TlsFailure::Untrusted => "ENKTLSCERT",
            TlsFailure::HostName => "ENKTLSHOSTNAME",
            TlsFailure::ClientCert => "ENKTLSCLIENTCERT",
            TlsFailure::File => "ENKTLSFILE",
            TlsFailure::Handshake => "ENKTLS",
        }
    }
}

/// The URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    // postgres://user:password@host/db → postgres://user:***@host/db
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let auth_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..auth_end].rfind('@') {
            let auth = &rest[..at];
            if let Some(colon) = auth.find(':') {
                return format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &auth[..colon],
                    &rest[at..]
                );
            }
        }
    }
    url.to_string()
}

/// Connects to `url`, spawning the connection task on the current Tokio
/// runtime, with TLS as the URL's libpq parameters say (see [`tls`]). A
/// server that does not answer gives `ENKSTATEUNAVAILABLE`; a TLS failure
/// gives [`PgError::Tls`] (`ENKTLS…`).
pub async fn connect(url: &str) -> Result<Client, PgError> {
    // Boxed: a caller's future holds a pointer, not the whole connection
    // state machine, whose drop glue would otherwise be compiled again into
    // every caller.
    Box::pin(connect_unboxed(url)).await
}

async fn connect_unboxed(url: &str) -> Result<Client, PgError> {
    let location = redact_url(url);
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(PgError::BadUrl(format!(
            "{location:?} does not start with postgres:// or postgresql://"
        )));
    }
    let (rest, mut tls) = TlsOptions::from_url(url)?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| PgError::BadUrl(format!("{location:?}: {}", tls::with_causes(&e))))?;
    let timeout = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    config.connect_timeout(timeout);
    if config.get_application_name().is_none() {
        config.application_name("nanokit");
    }
    // As libpq: no TLS over a Unix socket.
    let hosts = config.get_hosts();
    if !hosts.is_empty() && hosts.iter().all(|h| !matches!(h, Host::Tcp(_))) {
        tls.mode = tls::SslMode::Disable;
    }
    let connector = tls.connector(&location)?;
    let (first, second) = tls.attempts();
    let e1 = match attempt(&mut config, first, connector.clone(), timeout, &location).await? {
        Ok(client) => return Ok(client),
        Err(e) => e,
    };
    let explained = tls.explain(&e1, &location);
    // libpq's second try: `allow` after the server refused the plain
    // connection, `prefer` after the TLS handshake failed.
    let retry = match (tls.mode, &explained) {
        (tls::SslMode::Allow, _) => e1.as_db_error().is_some(),
        (tls::SslMode::Prefer, Some(PgError::Tls { failure, .. })) => matches!(
            failure,
            TlsFailure::Untrusted
                | TlsFailure::HostName
                | TlsFailure::ClientCert
                | TlsFailure::Handshake
        ),
        _ => false,
    };
    if let (true, Some(mode)) = (retry, second) {
        match attempt(&mut config, mode, connector, timeout, &location).await? {
            Ok(client) => return Ok(client),
            // Report the TLS attempt's failure: `allow`'s second, `prefer`'s first.
            Err(e2) if tls.mode == tls::SslMode::Allow => {
                return Err(tls
                    .explain(&e2, &location)
                    .unwrap_or_else(|| unreachable_err(&location, &e2)))
            }
            Err(_) => {}
        }
    }
    Err(explained.unwrap_or_else(|| unreachable_err(&location, &e1)))
}

/// One connection attempt with `mode`: the client, or the error of the
/// server or the handshake (`Err` of the outer result: no answer in time).
async fn attempt(
    config: &mut tokio_postgres::Config,
    mode: tokio_postgres::config::SslMode,
    connector: MakeRustlsConnect,
    timeout: Duration,
    location: &str,
) -> Result<std::result::Result<Client, tokio_postgres::Error>, PgError> {
    config.ssl_mode(mode);
    let (client, connection) = match tokio::time::timeout(timeout, config.connect(connector))
        .await
        .map_err(|_| PgError::Unavailable {
            location: location.to_string(),
            detail: format!(
                "no answer within {} s; check that the server is running and reachable (connect_timeout= in the URL changes the wait)",
                timeout.as_secs_f64()
            ),
        })? {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("state database connection closed: {e}");
        }
    });
    Ok(Ok(client))
}

fn unreachable_err(location: &str, e: &tokio_postgres::Error) -> PgError {
    PgError::Unavailable {
        location: location.to_string(),
        detail: format!(
            "{}; check that the server is running and the URL is right",
            tls::with_causes(e)
        ),
    }
}

/// Maps a PostgreSQL error to a [`PgError`].
pub fn map_err(location: &str, e: tokio_postgres::Error) -> PgError {
    if e.is_closed() {
        return PgError::Unavailable {
            location: location.to_string(),
            detail: format!("the connection was lost ({e})"),
        };
    }
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        // 08: connection exceptions; 57: operator intervention (server
        // shutting down, backend terminated, cannot connect now).
        if code.code().starts_with("08") || code.code().starts_with("57") {
            return PgError::Unavailable {
                location: location.to_string(),
                detail: format!("{} ({})", db.message(), code.code()),
            };
        }
        if *code == SqlState::UNDEFINED_COLUMN
            || *code == SqlState::DATATYPE_MISMATCH
            || *code == SqlState::UNDEFINED_TABLE
        {
            return PgError::Corrupt {
                location: location.to_string(),
                detail: format!(
                    "a nanokit table does not have the expected schema: {}",
                    db.message()
                ),
            };
        }
        return PgError::Server {
            location: location.to_string(),
            detail: format!("{} ({})", db.message(), code.code()),
        };
    }
    PgError::Unavailable {
        location: location.to_string(),
        detail: e.to_string(),
    }
}
