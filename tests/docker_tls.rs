//! The Docker provider over `DOCKER_HOST=tcp://…` with `DOCKER_TLS_VERIFY`
//! and `DOCKER_CERT_PATH`, against the real daemon's TLS listener
//! (`NANOKIT_TEST_DOCKER_TLS_HOST`, tcp://127.0.0.1:2376 with --tlsverify and
//! the test PKI: `eval "$(bash scripts/docker-test-env.sh)"`). The `nanokit`
//! binary runs with `DOCKER_HOST` set to the TCP endpoint only, so the unix
//! socket is never its way in; certificate directories are made from the
//! test PKI per test. Gated like tests/docker.rs (run them under
//! `flock /tmp/nk-docker.lock`).

mod services;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The daemon's TLS endpoint. Panics when it is not set (the test runs only
/// with `NANOKIT_TEST_DOCKER` or in CI, and then it must be there).
fn tls_host() -> String {
    match std::env::var("NANOKIT_TEST_DOCKER_TLS_HOST") {
        Ok(h) if !h.trim().is_empty() => h,
        _ => panic!(
            "this test needs dockerd's TLS listener, and NANOKIT_TEST_DOCKER_TLS_HOST is not set: run `eval \"$(bash scripts/docker-test-env.sh)\"` first"
        ),
    }
}

fn pki(name: &str) -> PathBuf {
    let dir = std::env::var_os("NANOKIT_TEST_CERTS")
        .filter(|d| !d.is_empty())
        .expect("NANOKIT_TEST_CERTS (printed by scripts/docker-test-env.sh)");
    Path::new(&dir).join(name)
}

/// A DOCKER_CERT_PATH directory: ca.pem, and cert.pem / key.pem copied from
/// the test PKI's `client` files (`None`: left out).
fn cert_dir(ca: &str, client: Option<(&str, &str)>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(pki(ca), dir.path().join("ca.pem")).unwrap();
    if let Some((cert, key)) = client {
        std::fs::copy(pki(cert), dir.path().join("cert.pem")).unwrap();
        std::fs::copy(pki(key), dir.path().join("key.pem")).unwrap();
    }
    dir
}

/// The docker CLI on the TLS endpoint with the test client certificate.
fn docker_tls(args: &[&str]) -> String {
    let host = tls_host();
    let (ca, cert, key) = (pki("ca.pem"), pki("client.pem"), pki("client-key.pem"));
    let mut all: Vec<&str> = vec!["-H", &host, "--tlsverify"];
    let (ca, cert, key) = (
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    all.extend(["--tlscacert", ca, "--tlscert", cert, "--tlskey", key]);
    all.extend(args);
    let o = Command::new("docker")
        .args(&all)
        .env_remove("DOCKER_HOST")
        .output()
        .expect("docker");
    assert!(
        o.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

struct Ran {
    code: Option<i32>,
    out: String,
}

/// A project on the Docker provider, swept over the TLS endpoint on drop.
struct TlsProject {
    dir: tempfile::TempDir,
    name: String,
}

impl TlsProject {
    fn new() -> TlsProject {
        services::require_docker();
        let name = format!("ttls{:05x}", fastrand::u32(..0x10_0000));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("nanokit.yml"),
            format!(
                "name: {name}\ninfra: {{ provider: docker }}\nservices:\n  s:\n    image: nk-busybox:latest\n    start: \"exec sleep 600\"\n"
            ),
        )
        .unwrap();
        TlsProject { dir, name }
    }

    /// `nanokit <cmd>` with `DOCKER_HOST` = the TLS endpoint and `vars`.
    fn run(&self, cmd: &[&str], vars: &[(&str, &Path)], tls_verify: bool) -> Ran {
        self.run_at(&tls_host(), cmd, vars, tls_verify)
    }

    /// [`TlsProject::run`] with `DOCKER_HOST` = `host`.
    fn run_at(&self, host: &str, cmd: &[&str], vars: &[(&str, &Path)], tls_verify: bool) -> Ran {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nanokit"));
        c.args(cmd)
            .arg("-f")
            .arg(self.dir.path().join("nanokit.yml"))
            .env("DOCKER_HOST", host)
            .env_remove("DOCKER_CERT_PATH")
            .env_remove("DOCKER_CONFIG")
            .env_remove("DOCKER_TLS_VERIFY")
            // No ~/.docker to fall back on.
            .env("HOME", self.dir.path());
        if tls_verify {
            c.env("DOCKER_TLS_VERIFY", "1");
        }
        for (k, v) in vars {
            c.env(k, v);
        }
        let o = c.output().expect("run nanokit");
        Ran {
            code: o.status.code(),
            out: format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        }
    }

    /// This project's containers, as the TLS endpoint lists them.
    fn running(&self) -> Vec<String> {
        let out = docker_tls(&[
            "ps",
            "--filter",
            &format!("label=nk-project={}", self.name),
            "--format",
            "{{.Names}}",
        ]);
        out.lines().map(str::to_string).collect()
    }
}

impl Drop for TlsProject {
    fn drop(&mut self) {
        // Without the endpoint the test has failed already: nothing to sweep
        // (and a second panic here would abort the whole test binary).
        if std::env::var_os("NANOKIT_TEST_DOCKER_TLS_HOST").is_none() {
            return;
        }
        let ids = docker_tls(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=nk-project={}", self.name),
        ]);
        for id in ids.lines().filter(|l| !l.is_empty()) {
            let _ = docker_tls(&["rm", "-f", id]);
        }
    }
}

#[test]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
fn up_status_down_over_tcp_with_tls_verify_and_the_cert_path() {
    let p = TlsProject::new();
    let certs = cert_dir("ca.pem", Some(("client.pem", "client-key.pem")));
    let vars = [("DOCKER_CERT_PATH", certs.path())];
    let up = p.run(&["up"], &vars, true);
    assert_eq!(up.code, Some(0), "{}", up.out);
    assert_eq!(p.running(), [format!("nk-{}-local-s", p.name)]);
    let status = p.run(&["status", "--output", "json"], &vars, true);
    assert_eq!(status.code, Some(0), "{}", status.out);
    let rows: serde_json::Value =
        serde_json::from_str(status.out.trim()).unwrap_or_else(|e| panic!("{e}: {}", status.out));
    assert_eq!(rows[0]["service"], "s", "{rows}");
    assert_eq!(rows[0]["running"], 1, "{rows}");

    // TLS is what carried it: the same endpoint in plain HTTP is refused …
    let plain = p.run(&["status"], &vars, false);
    assert_ne!(plain.code, Some(0), "{}", plain.out);
    assert!(
        plain.out.contains("expects TLS") && plain.out.contains("DOCKER_TLS_VERIFY=1"),
        "{}",
        plain.out
    );
    // … and ~/.docker (HOME is the project dir) holds no certificates.
    let none = p.run(&["status"], &[], true);
    assert_ne!(none.code, Some(0), "{}", none.out);
    assert!(none.out.contains(".docker/ca.pem"), "{}", none.out);

    let down = p.run(&["down"], &vars, true);
    assert_eq!(down.code, Some(0), "{}", down.out);
    assert!(p.running().is_empty());
}

/// A loopback TCP relay to `target` (`host:port`) that counts the
/// connections it accepts; returns its `tcp://` address and the count.
fn counting_relay(target: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp://{}", listener.local_addr().unwrap());
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            seen.fetch_add(1, Ordering::SeqCst);
            let Ok(server) = TcpStream::connect(&target) else {
                continue;
            };
            let pipe = |mut from: TcpStream, mut to: TcpStream| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            };
            pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
            pipe(server, client);
        }
    });
    (addr, count)
}

#[test]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
fn a_run_over_tls_keeps_its_connections_instead_of_a_handshake_per_call() {
    let p = TlsProject::new();
    let certs = cert_dir("ca.pem", Some(("client.pem", "client-key.pem")));
    let target = tls_host().trim_start_matches("tcp://").to_string();
    let (relay, connections) = counting_relay(target);
    let via_relay = |cmd: &[&str]| {
        let r = p.run_at(&relay, cmd, &[("DOCKER_CERT_PATH", certs.path())], true);
        assert_eq!(r.code, Some(0), "{cmd:?}: {}", r.out);
    };
    // `up` of one service makes ten calls (version, network, observe,
    // image, create, start, inspect, …) and `down` eight, at most three at
    // a time: without kept connections that was 10 and 8 connections (a TLS
    // handshake each), with them 2 and 3. The bound leaves room for a
    // connection opened while another is on its way back to the pool.
    via_relay(&["up"]);
    let up = connections.swap(0, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(p.running(), [format!("nk-{}-local-s", p.name)]);
    via_relay(&["down"]);
    let down = connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(p.running().is_empty());
    assert!(
        up <= 4 && down <= 5,
        "connections to the daemon: {up} for up, {down} for down"
    );
}

#[test]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
fn a_client_certificate_of_the_wrong_ca_fails_naming_the_endpoint_and_the_certificate() {
    let p = TlsProject::new();
    let certs = cert_dir("ca.pem", Some(("other-client.pem", "other-client-key.pem")));
    let r = p.run(&["up"], &[("DOCKER_CERT_PATH", certs.path())], true);
    assert_eq!(r.code, Some(1), "{}", r.out);
    let host = tls_host();
    assert!(r.out.contains("ENKUNREACHABLE"), "{}", r.out);
    assert!(r.out.contains(&format!("at {host}")), "{}", r.out);
    assert!(
        r.out.contains("refused nanokit's client certificate"),
        "{}",
        r.out
    );
    assert!(p.running().is_empty());

    // The server's certificate checked against another CA: not trusted.
    let wrong_ca = cert_dir("other-ca.pem", Some(("client.pem", "client-key.pem")));
    let r = p.run(&["up"], &[("DOCKER_CERT_PATH", wrong_ca.path())], true);
    assert_eq!(r.code, Some(1), "{}", r.out);
    assert!(r.out.contains(&format!("at {host}")), "{}", r.out);
    assert!(
        r.out.contains("server's certificate is not trusted"),
        "{}",
        r.out
    );
}

#[test]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
fn a_missing_file_in_the_cert_path_fails_naming_it() {
    let p = TlsProject::new();
    for gone in ["cert.pem", "key.pem", "ca.pem"] {
        let certs = cert_dir("ca.pem", Some(("client.pem", "client-key.pem")));
        let file = certs.path().join(gone);
        std::fs::remove_file(&file).unwrap();
        let r = p.run(&["up"], &[("DOCKER_CERT_PATH", certs.path())], true);
        assert_eq!(r.code, Some(1), "{gone}: {}", r.out);
        // Read before connecting: the file itself is what is reported.
        assert!(
            r.out.contains(&format!("{}: No such file", file.display())),
            "{gone}: {}",
            r.out
        );
        assert!(r.out.contains(&tls_host()), "{gone}: {}", r.out);
    }
    assert!(p.running().is_empty());
}
