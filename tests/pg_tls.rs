//! PostgreSQL over TLS, against the real test cluster (`ssl=on`, certificate
//! for `localhost` only, the hostssl-only role `nanokit-tlsonly` and the
//! `cert` role `nanokit-cert`; scripts/pg-test-cluster.sh) with the test PKI
//! (`NANOKIT_TEST_CERTS`, scripts/test-certs.sh): libpq's sslmodes, the CA
//! and host name checks, client certificates, the `PGSSL*` variables (through
//! the `nanokit` binary) and the errors of each failure. Whether a session
//! really is encrypted is read from the server's own `pg_stat_ssl`.
//!
//! Gated like every PostgreSQL test (tests/services/mod.rs): ignored with a
//! `SKIPPED:` reason without `NANOKIT_TEST_PG_URL` outside CI, failing in CI.

mod common;
mod services;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use nanokit::error::ErrorCode;
use nanokit::kv::{KvError, OpenOptions, Store, Value};

/// The test cluster: its owner role and port, from `NANOKIT_TEST_PG_URL`.
struct Pg {
    owner: String,
    port: u16,
    plain: String,
}

fn pg() -> Pg {
    let plain = services::pg_url();
    let rest = plain
        .strip_prefix("postgres://")
        .or_else(|| plain.strip_prefix("postgresql://"))
        .expect("NANOKIT_TEST_PG_URL is a postgres:// URL");
    let (owner, rest) = rest.split_once('@').expect("user@host");
    let hostport = rest.split(['/', '?']).next().unwrap();
    let port = hostport
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(5432);
    Pg {
        owner: owner.split(':').next().unwrap().to_string(),
        port,
        plain,
    }
}

/// A file of the test PKI.
fn cert(name: &str) -> String {
    let dir = std::env::var("NANOKIT_TEST_CERTS").unwrap_or_else(|_| {
        panic!("this test needs the test PKI: NANOKIT_TEST_CERTS is not set; run `eval \"$(bash scripts/pg-test-cluster.sh)\"`, which sets it")
    });
    let p = PathBuf::from(dir).join(name);
    assert!(p.exists(), "{} is missing", p.display());
    p.display().to_string()
}

impl Pg {
    /// A URL as `user` to `host` with these parameters, tagged with an
    /// application name of its own (to find its sessions in pg_stat_ssl).
    fn url(&self, user: &str, host: &str, params: &str) -> (String, String) {
        let app = format!(
            "nk-tls-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let sep = if params.is_empty() { "" } else { "&" };
        (
            format!(
                "postgres://{user}@{host}:{}/postgres?connect_timeout=5&application_name={app}{sep}{params}",
                self.port
            ),
            app,
        )
    }

    /// Whether each session of `app` is encrypted, as the server sees it.
    async fn ssl_of(&self, app: &str) -> Vec<(bool, Option<String>)> {
        let (client, conn) = tokio_postgres::connect(&self.plain, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .query(
                "SELECT s.ssl, s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid
                 WHERE a.application_name = $1",
                &[&app],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
}

async fn open(url: &str) -> Result<Store, KvError> {
    Store::open(&OpenOptions {
        agent: Some(format!(
            "tls-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        )),
        state_dir: None,
        url: Some(url.to_string()),
    })
    .await
}

async fn open_ok(url: &str) -> Store {
    open(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: [{}] {e}", e.code()))
}

async fn open_err(url: &str) -> KvError {
    match open(url).await {
        Ok(_) => panic!("{url} connected, but must fail"),
        Err(e) => e,
    }
}

/// A set/get round trip.
async fn round_trip(store: &Store) {
    store.set("k", &Value::Text("v".into())).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(Value::Text("v".into())));
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn verify_full_with_the_right_ca_by_localhost_does_kv_and_locks_exclude_over_tls() {
    let pg = pg();
    let params = format!("sslmode=verify-full&sslrootcert={}", cert("ca.pem"));
    let (url, app) = pg.url(&pg.owner, "localhost", &params);
    let a = open_ok(&url).await;
    round_trip(&a).await;
    // A second holder, on its own TLS connection to the same namespace.
    let b = Store::open(&OpenOptions {
        agent: Some(a.agent().to_string()),
        state_dir: None,
        url: Some(url.clone()),
    })
    .await
    .unwrap();
    assert_eq!(b.get("k").await.unwrap(), Some(Value::Text("v".into())));
    a.lock("m", "holder-a", 60.0, Duration::ZERO).await.unwrap();
    let e = b
        .lock("m", "holder-b", 60.0, Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ENKLOCKED", "{e}");
    assert!(e.to_string().contains("holder-a"), "{e}");
    a.unlock("m", "holder-a").await.unwrap();
    b.lock("m", "holder-b", 60.0, Duration::ZERO).await.unwrap();

    let sessions = pg.ssl_of(&app).await;
    assert_eq!(sessions.len(), 2, "two open sessions: {sessions:?}");
    assert!(
        sessions.iter().all(|s| s.0),
        "every session is TLS: {sessions:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn verify_full_with_the_wrong_ca_fails_saying_certificate_and_naming_the_ca_file() {
    let pg = pg();
    let wrong = cert("other-ca.pem");
    let (url, _) = pg.url(
        &pg.owner,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={wrong}"),
    );
    let e = open_err(&url).await;
    assert_eq!(e.code(), "ENKTLSCERT", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("certificate is not trusted") && msg.contains(&wrong),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn by_127_0_0_1_verify_full_fails_naming_the_host_and_verify_ca_works_but_still_checks_the_ca(
) {
    let pg = pg();
    let (url, _) = pg.url(
        &pg.owner,
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", cert("ca.pem")),
    );
    let e = open_err(&url).await;
    assert_eq!(e.code(), "ENKTLSHOSTNAME", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("host name 127.0.0.1")
            && msg.contains("names localhost")
            && msg.contains("verify-ca"),
        "{msg}"
    );

    let (url, app) = pg.url(
        &pg.owner,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={}", cert("ca.pem")),
    );
    let store = open_ok(&url).await;
    round_trip(&store).await;
    assert_eq!(pg.ssl_of(&app).await, vec![(true, None)]);

    // verify-ca still checks the chain.
    let (url, _) = pg.url(
        &pg.owner,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={}", cert("other-ca.pem")),
    );
    assert_eq!(open_err(&url).await.code(), "ENKTLSCERT");
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn require_without_a_ca_is_tls_prefer_too_and_disable_is_plain() {
    let pg = pg();
    for (params, tls) in [
        ("sslmode=require", true),
        // The default is prefer: TLS when the server offers it.
        ("", true),
        ("sslmode=prefer", true),
        ("sslmode=disable", false),
    ] {
        let (url, app) = pg.url(&pg.owner, "127.0.0.1", params);
        let store = open_ok(&url).await;
        round_trip(&store).await;
        assert_eq!(pg.ssl_of(&app).await, vec![(tls, None)], "{params:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn disable_against_a_hostssl_only_role_fails_saying_the_server_requires_tls() {
    let pg = pg();
    let (url, _) = pg.url("nanokit-tlsonly", "127.0.0.1", "sslmode=disable");
    let e = open_err(&url).await;
    assert_eq!(e.code(), "ENKTLSREQUIRED", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("the server requires TLS")
            && msg.contains("no encryption")
            && msg.contains("sslmode=disable"),
        "{msg}"
    );
    // The same role over TLS works: it was TLS that was missing. `allow`
    // tries plain first and then TLS, as libpq.
    for mode in ["require", "allow"] {
        let (url, app) = pg.url("nanokit-tlsonly", "127.0.0.1", &format!("sslmode={mode}"));
        let store = open_ok(&url).await;
        round_trip(&store).await;
        assert_eq!(pg.ssl_of(&app).await, vec![(true, None)], "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn a_client_certificate_is_accepted_for_the_cert_role_and_refused_without_or_from_another_ca()
{
    let pg = pg();
    let verify = format!("sslmode=verify-full&sslrootcert={}", cert("ca.pem"));
    let (url, app) = pg.url(
        "nanokit-cert",
        "localhost",
        &format!(
            "{verify}&sslcert={}&sslkey={}",
            cert("client.pem"),
            cert("client-key.pem")
        ),
    );
    let store = open_ok(&url).await;
    round_trip(&store).await;
    assert_eq!(
        pg.ssl_of(&app).await,
        vec![(true, Some("/CN=nanokit-cert".to_string()))]
    );

    let (url, _) = pg.url("nanokit-cert", "localhost", &verify);
    let e = open_err(&url).await;
    assert_eq!(e.code(), "ENKTLSCLIENTCERT", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("client certificate") && msg.contains("sslcert="),
        "{msg}"
    );

    let other = cert("other-client.pem");
    let (url, _) = pg.url(
        "nanokit-cert",
        "localhost",
        &format!(
            "{verify}&sslcert={other}&sslkey={}",
            cert("other-client-key.pem")
        ),
    );
    let e = open_err(&url).await;
    assert_eq!(e.code(), "ENKTLSCLIENTCERT", "{e}");
    assert!(e.to_string().contains(&other), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn certificate_files_that_cannot_be_read_are_named() {
    let pg = pg();
    let missing = "/nonexistent/nk-ca.pem";
    for params in [
        format!("sslmode=verify-full&sslrootcert={missing}"),
        format!("sslmode=require&sslrootcert={missing}"),
        format!(
            "sslmode=require&sslcert={}&sslkey={missing}",
            cert("client.pem")
        ),
    ] {
        let (url, _) = pg.url(&pg.owner, "localhost", &params);
        let e = open_err(&url).await;
        assert_eq!(e.code(), "ENKTLSFILE", "{e}");
        assert!(
            e.to_string().contains("cannot read the") && e.to_string().contains(missing),
            "{e}"
        );
    }
    // A key that is not the certificate's, and a certificate without a key.
    for (params, says) in [
        (
            format!(
                "sslcert={}&sslkey={}",
                cert("client.pem"),
                cert("other-client-key.pem")
            ),
            "cannot use the client certificate",
        ),
        (
            format!("sslcert={}", cert("client.pem")),
            "sslcert is set without sslkey",
        ),
    ] {
        let (url, _) = pg.url(
            "nanokit-cert",
            "localhost",
            &format!("sslmode=require&{params}"),
        );
        let e = open_err(&url).await;
        assert_eq!(e.code(), "ENKTLSFILE", "{e}");
        assert!(e.to_string().contains(says), "{e}");
    }
    // A file that is not a certificate.
    let (url, _) = pg.url(
        &pg.owner,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", cert("ca-key.pem")),
    );
    let e = open_err(&url).await;
    assert_eq!(e.code(), "ENKTLSFILE", "{e}");
    assert!(e.to_string().contains("no PEM certificate"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn the_password_never_appears_in_a_tls_error() {
    let pg = pg();
    let pw = "s3cret-tls-pw";
    for (host, params) in [
        (
            "localhost",
            format!("sslmode=verify-full&sslrootcert={}", cert("other-ca.pem")),
        ),
        (
            "127.0.0.1",
            format!("sslmode=verify-full&sslrootcert={}", cert("ca.pem")),
        ),
        (
            "localhost",
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem".to_string(),
        ),
    ] {
        let (url, _) = pg.url(&format!("{}:{pw}", pg.owner), host, &params);
        let e = open_err(&url).await;
        assert!(e.code().starts_with("ENKTLS"), "{e}");
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(pw), "{shown}");
        assert!(
            shown.contains(":***@"),
            "the URL is shown redacted: {shown}"
        );
        // And through the remote infra state (state.json on PostgreSQL).
        let e = nanokit::state::open(&nanokit::state::Location::Postgres {
            url: url.clone(),
            workspace: "tls/local".into(),
        })
        .await
        .err()
        .expect("the connection fails");
        assert_eq!(e.code(), open_err(&url).await.code());
        assert!(!format!("{e} {e:?}").contains(pw), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn a_server_that_refuses_tls_fails_each_mode_that_requires_it() {
    // What PostgreSQL with ssl=off does: answer the SSLRequest with 'N'.
    // (The test cluster has ssl=on, so this one listener stands in for it.)
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut conn in listener.incoming().flatten() {
            let mut req = [0u8; 8];
            if conn.read_exact(&mut req).is_ok() && req == [0, 0, 0, 8, 4, 210, 22, 47] {
                let _ = conn.write_all(b"N");
            }
        }
    });
    for mode in ["require", "verify-ca", "verify-full"] {
        let url = format!(
            "postgres://nk:pw@127.0.0.1:{port}/postgres?connect_timeout=5&sslmode={mode}&sslrootcert={}",
            cert("ca.pem")
        );
        let e = open_err(&url).await;
        assert_eq!(e.code(), "ENKTLSREFUSED", "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("the server refused TLS") && msg.contains(&format!("sslmode={mode}")),
            "{msg}"
        );
    }
}

/// Runs the `nanokit` binary with `env` (and no PGSSL* of this process).
fn nanokit(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nanokit"));
    cmd.args(args)
        .env_remove("NANOKIT_STATE_URL")
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT")
        .env_remove("PGSSLCERT")
        .env_remove("PGSSLKEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
fn the_cli_honours_pgsslmode_pgsslrootcert_and_sslrootcert_system() {
    let pg = pg();
    let home = tempfile::tempdir().unwrap();
    let home_s = home.path().to_str().unwrap();
    let (url, _) = pg.url(&pg.owner, "localhost", "");
    let agent = format!(
        "tls-cli-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let set = |env: &[(&str, &str)]| {
        nanokit(
            &[
                "state",
                "set",
                "k",
                "v",
                "--agent",
                &agent,
                "--state-url",
                &url,
            ],
            env,
        )
    };
    let ca = cert("ca.pem");
    let other = cert("other-ca.pem");
    let ok = set(&[
        ("PGSSLMODE", "verify-full"),
        ("PGSSLROOTCERT", &ca),
        ("HOME", home_s),
    ]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    // The same URL with the wrong CA in the environment: refused.
    let bad = set(&[
        ("PGSSLMODE", "verify-full"),
        ("PGSSLROOTCERT", &other),
        ("HOME", home_s),
    ]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(
        text(&bad).contains("error[ENKTLSCERT]") && text(&bad).contains(&other),
        "{}",
        text(&bad)
    );
    // PGSSLMODE=verify-full without any CA (and none in ~/.postgresql).
    let none = set(&[("PGSSLMODE", "verify-full"), ("HOME", home_s)]);
    assert_eq!(none.status.code(), Some(1), "{}", text(&none));
    assert!(
        text(&none).contains("error[ENKTLSFILE]") && text(&none).contains("sslrootcert=system"),
        "{}",
        text(&none)
    );
    // sslrootcert=system: the platform's roots, here SSL_CERT_FILE (which
    // rustls-native-certs reads, as OpenSSL does); verify-full by default.
    let sys = set(&[
        ("PGSSLROOTCERT", "system"),
        ("SSL_CERT_FILE", &ca),
        ("HOME", home_s),
    ]);
    assert_eq!(sys.status.code(), Some(0), "{}", text(&sys));
    let sys_wrong = set(&[
        ("PGSSLROOTCERT", "system"),
        ("SSL_CERT_FILE", &other),
        ("HOME", home_s),
    ]);
    assert!(
        text(&sys_wrong).contains("error[ENKTLSCERT]"),
        "{}",
        text(&sys_wrong)
    );
    // The URL wins over the environment.
    let url_wins = nanokit(
        &[
            "state",
            "get",
            "k",
            "--agent",
            &agent,
            "--state-url",
            &format!("{url}&sslmode=verify-full&sslrootcert={ca}"),
        ],
        &[
            ("PGSSLMODE", "disable"),
            ("PGSSLROOTCERT", &other),
            ("HOME", home_s),
        ],
    );
    assert_eq!(url_wins.status.code(), Some(0), "{}", text(&url_wins));
    assert!(String::from_utf8_lossy(&url_wins.stdout).contains('v'));
    // PGSSLMODE=disable is honoured too: the hostssl-only role refuses it.
    let (tls_only, _) = pg.url("nanokit-tlsonly", "127.0.0.1", "");
    let plain = nanokit(
        &["state", "get", "k", "--state-url", &tls_only],
        &[("PGSSLMODE", "disable"), ("HOME", home_s)],
    );
    assert!(
        text(&plain).contains("error[ENKTLSREQUIRED]"),
        "{}",
        text(&plain)
    );
}

/// examples/basic in a temp dir with its state on PostgreSQL (`url`), a
/// project name of its own and free ports.
fn example(url: &str) -> (tempfile::TempDir, nanokit::config::LoadOptions, String) {
    let dir = common::copy_example("basic");
    let file = dir.path().join("nanokit.yml");
    let yml = std::fs::read_to_string(&file).unwrap();
    let name = format!(
        "basic-tls-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    assert!(
        yml.contains("name: basic\n") && yml.contains("infra:\n  provider: process\n"),
        "examples/basic/nanokit.yml changed shape"
    );
    let yml = yml
        .replace("name: basic\n", &format!("name: {name}\n"))
        .replace(
            "infra:\n  provider: process\n",
            &format!("infra:\n  provider: process\n  state: \"{url}\"\n"),
        );
    std::fs::write(&file, yml).unwrap();
    let mut vars: std::collections::HashMap<String, String> = std::env::vars().collect();
    for v in ["DB_PORT", "API_PORT"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        vars.insert(v.into(), port.to_string());
    }
    let mut opts = nanokit::config::LoadOptions::new(file);
    opts.vars = Some(vars);
    (dir, opts, name)
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn remote_state_up_and_down_of_the_example_over_verify_full() {
    use nanokit::engine::{self, RunOptions};
    let pg = pg();
    let (url, app) = pg.url(
        &pg.owner,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", cert("ca.pem")),
    );
    let (_dir, load, name) = example(&url);
    let ws = format!("{name}/local");
    let db = nanokit::state::open(&nanokit::state::Location::Postgres {
        url: url.clone(),
        workspace: ws.clone(),
    })
    .await
    .unwrap();

    let cfg = std::sync::Arc::new(nanokit::config::load(&load).unwrap());
    assert!(cfg.state_url.is_some());
    let p = engine::provider_for(&cfg).unwrap();
    let up = engine::up(cfg.clone(), p, RunOptions::default()).await;
    let report = up.unwrap_or_else(|e| panic!("up: [{}] {e}", e.code()));
    assert!(
        report
            .results
            .iter()
            .all(|r| r.outcome == engine::Phase::Healthy),
        "{:?}",
        report.results
    );
    let doc = db.read().await.unwrap().expect("the state is stored");
    let st: nanokit::state::State = serde_json::from_slice(&doc.bytes).unwrap();
    assert_eq!(
        st.resources.keys().collect::<Vec<_>>(),
        vec!["api", "db", "worker"]
    );
    assert!(db.lock_info().await.unwrap().is_none(), "lock released");

    let p = engine::provider_for(&cfg).unwrap();
    engine::down(cfg.clone(), p, RunOptions::default())
        .await
        .unwrap();
    let doc = db.read().await.unwrap().expect("the state is stored");
    let st: nanokit::state::State = serde_json::from_slice(&doc.bytes).unwrap();
    assert!(st.resources.is_empty(), "{st:?}");
    // The runs' and this test's sessions were TLS (those still open).
    let sessions = pg.ssl_of(&app).await;
    assert!(
        !sessions.is_empty() && sessions.iter().all(|s| s.0),
        "{sessions:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn require_with_a_root_certificate_checks_the_ca_but_not_the_name_as_libpq() {
    let pg = pg();
    let (url, _) = pg.url(
        &pg.owner,
        "localhost",
        &format!("sslmode=require&sslrootcert={}", cert("other-ca.pem")),
    );
    assert_eq!(open_err(&url).await.code(), "ENKTLSCERT");
    let (url, app) = pg.url(
        &pg.owner,
        "127.0.0.1",
        &format!("sslmode=require&sslrootcert={}", cert("ca.pem")),
    );
    let store = open_ok(&url).await;
    round_trip(&store).await;
    assert_eq!(pg.ssl_of(&app).await, vec![(true, None)]);
}

#[test]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
fn libpq_default_files_in_home_dot_postgresql_are_used() {
    let pg = pg();
    let home = tempfile::tempdir().unwrap();
    let dot = home.path().join(".postgresql");
    std::fs::create_dir(&dot).unwrap();
    let home_s = home.path().to_str().unwrap();
    let stats = |user: &str, host: &str, mode: &str| {
        let (url, _) = pg.url(user, host, &format!("sslmode={mode}"));
        nanokit(
            &["state", "stats", "--state-url", &url],
            &[("HOME", home_s)],
        )
    };
    // ~/.postgresql/root.crt: verify-full uses it.
    std::fs::copy(cert("ca.pem"), dot.join("root.crt")).unwrap();
    let o = stats(&pg.owner, "localhost", "verify-full");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // A wrong root.crt: require checks the CA with it (libpq's rule), and
    // prefer falls back to a connection without TLS.
    std::fs::copy(cert("other-ca.pem"), dot.join("root.crt")).unwrap();
    let o = stats(&pg.owner, "127.0.0.1", "require");
    assert!(
        text(&o).contains("error[ENKTLSCERT]") && text(&o).contains("root.crt"),
        "{}",
        text(&o)
    );
    let o = stats(&pg.owner, "127.0.0.1", "prefer");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // ~/.postgresql/postgresql.crt and .key: the client certificate.
    std::fs::remove_file(dot.join("root.crt")).unwrap();
    let o = stats("nanokit-cert", "localhost", "require");
    assert!(text(&o).contains("error[ENKTLSCLIENTCERT]"), "{}", text(&o));
    std::fs::copy(cert("client.pem"), dot.join("postgresql.crt")).unwrap();
    std::fs::copy(cert("client-key.pem"), dot.join("postgresql.key")).unwrap();
    let o = stats("nanokit-cert", "localhost", "require");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn a_unix_socket_connection_never_uses_tls_whatever_the_sslmode_as_libpq() {
    let pg = pg();
    let (client, conn) = tokio_postgres::connect(&pg.plain, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let dirs: String = client
        .query_one("SHOW unix_socket_directories", &[])
        .await
        .unwrap()
        .get(0);
    let dir = dirs.split(',').next().unwrap().trim();
    let app = format!(
        "nk-tls-unix-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let url = format!(
        "postgres://{}@/postgres?host={dir}&port={}&application_name={app}&sslmode=verify-full",
        pg.owner, pg.port
    );
    let store = open_ok(&url).await;
    round_trip(&store).await;
    assert_eq!(pg.ssl_of(&app).await, vec![(false, None)]);
}
