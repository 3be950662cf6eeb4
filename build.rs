//! Build script: napi-rs's link setup, the hub's page compressed (feature
//! `hub`), and the cfgs that decide which service-backed tests run.
//!
//! The hub's scripts, styles and icon (`src/hub/assets/`) are gzipped into
//! `OUT_DIR`, and the binary carries them so: a quarter of their size
//! (src/hub/assets.rs serves them; docs/hub.md#size).
//!
//! `nk_pg` / `nk_docker` / `nk_stores` are set when the test build is meant
//! to reach PostgreSQL / Docker / the S3, GCS and Vault test servers:
//! `NANOKIT_TEST_PG_URL` / `NANOKIT_TEST_DOCKER` / `NANOKIT_TEST_S3_ENDPOINT`
//! is set, or `CI` is. Tests that need a service carry
//! `#[cfg_attr(not(nk_pg), ignore = "SKIPPED: …")]`: without the service and
//! outside CI, cargo lists them as *ignored* with the reason, never as passed;
//! with the cfg on they run, and fail loudly if the service cannot be reached
//! (tests/services/mod.rs). Cargo re-runs this script when one of those
//! variables changes, so `cargo test` always builds for the current
//! environment. The addon build (`--features node`) contains no tests and is
//! not made to depend on them.

use std::env;
use std::io::Write;
use std::path::Path;

/// The variables that decide the test cfgs.
const TEST_ENV: [&str; 4] = [
    "CI",
    "NANOKIT_TEST_PG_URL",
    "NANOKIT_TEST_DOCKER",
    "NANOKIT_TEST_S3_ENDPOINT",
];

/// Whether `CI` says this is a CI run (`true`, `1`, anything but empty,
/// `0` or `false`) — the same rule as `__test__/helpers/services.mjs`.
fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        !(v.is_empty() || v == "0" || v == "false")
    })
}

fn set(var: &str) -> bool {
    env::var(var).is_ok_and(|v| !v.trim().is_empty())
}

/// The hub's assets served compressed (src/hub/assets.rs includes them).
const HUB_ASSETS: [&str; 3] = ["app.js", "app.css", "icon.svg"];

/// Gzips each of [`HUB_ASSETS`] into `OUT_DIR/<name>.gz`.
fn compress_hub_assets() {
    let out = env::var_os("OUT_DIR").expect("cargo sets OUT_DIR");
    for name in HUB_ASSETS {
        let src = Path::new("src/hub/assets").join(name);
        println!("cargo::rerun-if-changed={}", src.display());
        let text = std::fs::read(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        // No name and no time in the header: the same bytes on every build.
        let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
        gz.write_all(&text).expect("gzip into memory");
        let gz = gz.finish().expect("gzip into memory");
        let dest = Path::new(&out).join(format!("{name}.gz"));
        std::fs::write(&dest, gz).unwrap_or_else(|e| panic!("{}: {e}", dest.display()));
    }
}

fn main() {
    napi_build::setup();
    if env::var_os("CARGO_FEATURE_HUB").is_some() {
        compress_hub_assets();
    }

    println!("cargo::rustc-check-cfg=cfg(nk_pg)");
    println!("cargo::rustc-check-cfg=cfg(nk_docker)");
    println!("cargo::rustc-check-cfg=cfg(nk_stores)");
    if env::var_os("CARGO_FEATURE_NODE").is_some() {
        return;
    }
    for var in TEST_ENV {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let ci = in_ci();
    if ci || set("NANOKIT_TEST_PG_URL") {
        println!("cargo::rustc-cfg=nk_pg");
    }
    if ci || set("NANOKIT_TEST_DOCKER") {
        println!("cargo::rustc-cfg=nk_docker");
    }
    if ci || set("NANOKIT_TEST_S3_ENDPOINT") {
        println!("cargo::rustc-cfg=nk_stores");
    }
}
