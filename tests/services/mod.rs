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
            if std::env::var_os("CI").is_some() { " (CI is set, so PostgreSQL tests must run)" } else { " (it was set when this test binary was built)" }
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
