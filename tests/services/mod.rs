//! The services some integration tests need (PostgreSQL, Docker), and one
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
            cfg!(nk_pg) && cfg!(nk_docker),
            "CI is set, but this test binary was built without cfg nk_pg/nk_docker (pg: {}, docker: {}), so its service tests would be ignored: build.rs must set both when CI is set",
            cfg!(nk_pg),
            cfg!(nk_docker)
        );
    }
}
