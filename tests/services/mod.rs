//! The services some integration tests need (PostgreSQL, Docker, the S3,
//! Vault and GCS test servers), and one
//! rule for all of them: a test that needs a service carries
//! `#[cfg_attr(not(nk_pg), ignore = …)]` (or `nk_docker`; see build.rs), so
//! without the service, and outside CI, cargo lists it as *ignored* with a
//! `SKIPPED:` reason. When it runs (the variable is set, or `CI` is), the
//! service must be there: these helpers panic, naming what to run, rather than
//! letting a test return early and report `ok` without testing anything.
#![allow(dead_code)]

use std::process::Command;
use std::sync::OnceLock;

/// The URL of the test PostgreSQL server. Panics when it is not set: a
/// PostgreSQL test only runs (cfg `nk_pg`) when it was set at build time or
/// `CI` is set, and in both cases a missing server is a failure.
pub fn pg_url() -> String {
    match std::env::var("NANOKIT_TEST_PG_URL") {
        Ok(u) if !u.trim().is_empty() => u,
        _ => panic!(
            "this test needs PostgreSQL, and NANOKIT_TEST_PG_URL is not set{}: run `eval \"$(bash scripts/pg-test-cluster.sh)\"` first (outside CI, without it, cargo reports this test as ignored)",
            if in_ci() { " (CI is set, so PostgreSQL tests must run)" } else { " (it was set when this test binary was built)" }
        ),
    }
}

/// Checks, once per test binary, that Docker and the local test images are
/// usable; panics naming what is missing otherwise. Only called by tests that
/// run (cfg `nk_docker`: `NANOKIT_TEST_DOCKER` set at build time, or `CI`).
pub fn require_docker() {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        if std::env::var("NANOKIT_TEST_DOCKER").map_or(true, |v| v.trim().is_empty()) {
            return Err("NANOKIT_TEST_DOCKER is not set".into());
        }
        match Command::new("docker")
            .args(["image", "inspect", "nk-busybox:latest", "nk-node:latest"])
            .output()
        {
            Err(e) => Err(format!("cannot run `docker`: {e}")),
            Ok(o) if !o.status.success() => Err(format!(
                "the Docker daemon or the test images nk-busybox/nk-node are not available: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Ok(_) => Ok(()),
        }
    });
    if let Err(why) = probe {
        panic!(
            "this test needs Docker: {why}; run `eval \"$(bash scripts/docker-test-env.sh)\"` first (outside CI, without NANOKIT_TEST_DOCKER, cargo reports this test as ignored)"
        );
    }
}

/// The S3, Vault and GCS test servers (scripts/state-test-servers.sh), as
/// the variables the state backends read: set once for this process (and
/// inherited by its children). Panics when they are not there: a test that
/// needs them only runs (cfg `nk_stores`) when they were set at build time
/// or `CI` is set.
pub struct Stores {
    pub s3_endpoint: String,
    pub vault_addr: String,
    pub vault_token: String,
    pub gcs_host: String,
}

pub fn stores() -> &'static Stores {
    static STORES: OnceLock<Stores> = OnceLock::new();
    STORES.get_or_init(|| {
        let var = |k: &str| match std::env::var(k) {
            Ok(v) if !v.trim().is_empty() => v,
            _ => panic!(
                "this test needs the S3, Vault and GCS test servers, and {k} is not set{}: run `eval \"$(bash scripts/state-test-servers.sh)\"` first (outside CI, without it, cargo reports this test as ignored)",
                if in_ci() { " (CI is set, so these tests must run)" } else { "" }
            ),
        };
        let s = Stores {
            s3_endpoint: var("NANOKIT_TEST_S3_ENDPOINT"),
            vault_addr: var("NANOKIT_TEST_VAULT_ADDR"),
            vault_token: var("NANOKIT_TEST_VAULT_TOKEN"),
            gcs_host: var("NANOKIT_TEST_GCS_HOST"),
        };
        // Credentials the test servers accept (SeaweedFS checks none), so
        // that no credential chain ever looks past the environment (no
        // instance metadata request leaves the machine).
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "nanokit-test"),
            ("AWS_SECRET_ACCESS_KEY", "nanokit-test-secret"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("STORAGE_EMULATOR_HOST", s.gcs_host.as_str()),
            ("VAULT_ADDR", s.vault_addr.as_str()),
            ("VAULT_TOKEN", s.vault_token.as_str()),
        ] {
            std::env::set_var(k, v);
        }
        std::env::remove_var("AWS_PROFILE");
        s
    })
}

/// Whether `CI` says this is a CI run — the rule of build.rs and
/// `__test__/helpers/services.mjs`.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        !(v.is_empty() || v == "0" || v == "false")
    })
}

/// The gate itself: in CI this test binary must have been built with every
/// service cfg, so that no service test is ignored there. (Each binary that
/// includes this module checks its own build.)
#[test]
#[allow(clippy::assertions_on_constants)] // the constant is this build's cfg: that is what is checked
fn in_ci_no_service_test_is_ignored() {
    if in_ci() {
        assert!(
            cfg!(nk_pg) && cfg!(nk_docker) && cfg!(nk_stores),
            "CI is set, but this test binary was built without cfg nk_pg/nk_docker/nk_stores (pg: {}, docker: {}, stores: {}), so its service tests would be ignored: build.rs must set them when CI is set",
            cfg!(nk_pg),
            cfg!(nk_docker),
            cfg!(nk_stores)
        );
    }
}
