//! The command line as a process: what one CLI command costs the process
//! (no thread started for an OTLP export that is off), and which
//! executables the crate builds (both names, `nanokit` and `nkapp`, from
//! every `cargo build --release` and `cargo install --path .`). One test per
//! file section; the thread count is only meaningful with nothing else
//! running in this test binary, so it runs alone (its own process).

use std::path::Path;

/// The threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// A command of the CLI with OTLP export off starts no thread beside the
/// runtime's own (it used to start a blocking-pool thread for the export's
/// flush on every command). Run in a child process of this test binary, so
/// that no other test's threads are counted.
#[test]
fn a_cli_command_with_export_off_starts_no_flush_thread() {
    if std::env::var_os("NK_CLI_THREADS_CHILD").is_some() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nanokit.yml");
        std::fs::write(&file, "name: t\nservices:\n  a:\n    start: run\n").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let before = threads();
        let code = rt.block_on(nanokit::cli::run(vec![
            "validate".into(),
            "-f".into(),
            file.to_string_lossy().into_owned(),
        ]));
        let after = threads();
        assert_eq!(code, 0);
        println!("THREADS {before} {after}");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "a_cli_command_with_export_off_starts_no_flush_thread",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NK_CLI_THREADS_CHILD", "1")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts: Vec<usize> = text
        .lines()
        .find_map(|l| l.strip_prefix("THREADS "))
        .unwrap_or_else(|| panic!("no count: {text}"))
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(counts[1], counts[0], "threads before and after: {counts:?}");
}

/// `cargo build --release` and `cargo install --path .` build every binary
/// target: both names are targets of their own, neither behind a feature.
#[test]
fn the_crate_builds_both_nanokit_and_nkapp() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bins: Vec<(String, Option<serde_json::Value>)> = meta["packages"][0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t.get("required-features").cloned(),
            )
        })
        .collect();
    let mut names: Vec<&str> = bins.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, ["nanokit", "nkapp"]);
    for (name, features) in &bins {
        assert!(
            features
                .as_ref()
                .is_none_or(|f| f.as_array().is_none_or(|a| a.is_empty())),
            "{name} needs features {features:?}: a plain build skips it"
        );
    }
}
