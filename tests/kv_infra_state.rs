//! Remote infra state on PostgreSQL (`nanokit::state::remote`): the
//! compare-and-swap on the serial and the deploy lock, including two "up"
//! runs from different working directories (real child processes). Needs
//! `NANOKIT_TEST_PG_URL` (scripts/pg-test-cluster.sh); without it, outside
//! CI, every case is *ignored* with a `SKIPPED:` reason; in CI a missing server
//! fails them (tests/services/mod.rs).

mod services;

use std::process::Command;
use std::time::Duration;

use nanokit::error::ErrorCode;
use nanokit::kv::KvError;
use nanokit::state::remote::InfraStateStore;
use serde_json::json;

fn workspace() -> String {
    format!("proj-{}/prod", uuid::Uuid::new_v4().simple())
}

fn doc(serial: i64, lineage: &str, runs: &[String]) -> String {
    json!({"serial": serial, "lineage": lineage, "runs": runs}).to_string()
}

#[tokio::test]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn compare_and_swap_refuses_a_stale_serial() {
    let url = services::pg_url();
    let a = InfraStateStore::connect(&url).await.unwrap();
    let b = InfraStateStore::connect(&url).await.unwrap();
    let ws = workspace();
    assert_eq!(a.read(&ws).await.unwrap(), None);
    a.compare_and_swap(&ws, None, "L1", 1, &doc(1, "L1", &[]), "machine-a")
        .await
        .unwrap();
    // A second "first write" is stale.
    let e = b
        .compare_and_swap(
            &ws,
            None,
            "L1",
            1,
            &doc(1, "L1", &["b".into()]),
            "machine-b",
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ENKSTATESTALE", "{e}");
    // Both read serial 1; a writes first; b's write is refused.
    let seen_a = a.read(&ws).await.unwrap().unwrap();
    let seen_b = b.read(&ws).await.unwrap().unwrap();
    assert_eq!((seen_a.serial, seen_b.serial), (1, 1));
    a.compare_and_swap(
        &ws,
        Some(1),
        "L1",
        2,
        &doc(2, "L1", &["a".into()]),
        "machine-a",
    )
    .await
    .unwrap();
    let e = b
        .compare_and_swap(
            &ws,
            Some(1),
            "L1",
            2,
            &doc(2, "L1", &["b".into()]),
            "machine-b",
        )
        .await
        .unwrap_err();
    match &e {
        KvError::StaleState {
            expected,
            actual,
            writer,
            ..
        } => {
            assert_eq!((*expected, *actual), (Some(1), Some(2)));
            assert_eq!(writer, "machine-a");
        }
        other => panic!("expected ENKSTATESTALE, got {other:?}"),
    }
    assert!(e.to_string().contains("machine-a"), "{e}");
    // Nothing of b's was written.
    let now = b.read(&ws).await.unwrap().unwrap();
    assert_eq!(now.serial, 2);
    assert_eq!(now.document, doc(2, "L1", &["a".into()]));
    assert_eq!(now.updated_by, "machine-a");
    // Another lineage is refused.
    let e = b
        .compare_and_swap(&ws, Some(2), "OTHER", 3, "{}", "machine-b")
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ENKSTATELINEAGE", "{e}");
    // Serial must move forward.
    let e = b
        .compare_and_swap(&ws, Some(2), "L1", 2, "{}", "machine-b")
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ENKARG");
}

#[tokio::test]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn deploy_lock_names_its_holder_and_can_be_cleared() {
    let url = services::pg_url();
    let s = InfraStateStore::connect(&url).await.unwrap();
    let ws = workspace();
    let first = s
        .lock(
            &ws,
            "host-a:101",
            "nanokit up in /srv/a",
            60.0,
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert!(!first.took_over, "a free workspace is not taken over");
    let e = s
        .lock(
            &ws,
            "host-b:202",
            "nanokit up in /srv/b",
            60.0,
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ENKLOCKED");
    assert!(e.to_string().contains("host-a:101"), "{e}");
    assert!(e.to_string().contains("/srv/a"), "{e}");
    // Renewal by the holder keeps acquired_at.
    let before = s.lock_info(&ws).await.unwrap().unwrap();
    let renewed = s
        .lock(
            &ws,
            "host-a:101",
            "nanokit up in /srv/a",
            120.0,
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert!(!renewed.took_over, "renewing one's own lock is no takeover");
    let after = s.lock_info(&ws).await.unwrap().unwrap();
    assert_eq!(before.acquired_at_ms, after.acquired_at_ms);
    assert!(after.expires_at_ms > before.expires_at_ms);
    assert_eq!(
        s.unlock(&ws, "host-b:202").await.unwrap_err().code(),
        "ENKNOTHOLDER"
    );
    let removed = s.force_unlock(&ws).await.unwrap().unwrap();
    assert_eq!(removed.holder, "host-a:101");
    assert_eq!(removed.info, "nanokit up in /srv/a");
    assert_eq!(s.lock_info(&ws).await.unwrap(), None);
    // Expiry by the database's clock; taking an expired lock is a takeover
    // (its holder died or stopped renewing), taking a released one is not.
    s.lock(&ws, "host-c", "", 0.2, Duration::ZERO)
        .await
        .unwrap();
    let got = s
        .lock(&ws, "host-d", "", 60.0, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(got.holder, "host-d");
    assert!(got.took_over, "host-c's lock had expired");
    s.unlock(&ws, "host-d").await.unwrap();
    let after_release = s
        .lock(&ws, "host-e", "", 60.0, Duration::ZERO)
        .await
        .unwrap();
    assert!(!after_release.took_over, "host-d released it");
    s.unlock(&ws, "host-e").await.unwrap();
}

fn run_children(
    url: &str,
    ws: &str,
    mode: &str,
    n: usize,
    runs: usize,
    wait_ms: u64,
) -> Vec<String> {
    let exe = std::env::current_exe().unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let kids: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "infra_child",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .current_dir(d.path())
                .env("NK_INFRA_MODE", mode)
                .env("NK_INFRA_URL", url)
                .env("NK_INFRA_WS", ws)
                .env("NK_INFRA_ID", i.to_string())
                .env("NK_INFRA_RUNS", runs.to_string())
                .env("NK_INFRA_WAIT_MS", wait_ms.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    kids.into_iter()
        .map(|k| {
            let out = k.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                out.status.success(),
                "child failed:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            stdout
                .lines()
                .find_map(|l| l.find("RESULT ").map(|i| l[i + 7..].to_string()))
                .unwrap_or_else(|| panic!("no RESULT line:\n{stdout}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn a_second_up_from_another_directory_fails_fast_naming_the_holder() {
    let url = services::pg_url();
    let s = InfraStateStore::connect(&url).await.unwrap();
    let ws = workspace();
    let here = std::env::current_dir().unwrap().display().to_string();
    s.lock(
        &ws,
        "up-first",
        &format!("nanokit up in {here}"),
        60.0,
        Duration::ZERO,
    )
    .await
    .unwrap();
    let results = run_children(&url, &ws, "failfast", 1, 1, 0);
    let r: serde_json::Value = serde_json::from_str(&results[0]).unwrap();
    assert_eq!(r["code"], "ENKLOCKED", "{r}");
    let msg = r["message"].as_str().unwrap();
    assert!(msg.contains("up-first") && msg.contains(&here), "{msg}");
    assert_ne!(r["cwd"].as_str().unwrap(), here);
    assert_eq!(
        s.read(&ws).await.unwrap(),
        None,
        "the second run wrote nothing"
    );
    s.unlock(&ws, "up-first").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn two_ups_from_different_directories_lose_no_update() {
    let url = services::pg_url();
    let ws = workspace();
    // Each child: 15 runs of lock(wait) → read → append → CAS → unlock.
    let results = run_children(&url, &ws, "up", 2, 15, 60_000);
    assert_eq!(results.len(), 2);
    let s = InfraStateStore::connect(&url).await.unwrap();
    let state = s.read(&ws).await.unwrap().unwrap();
    assert_eq!(state.serial, 30);
    let d: serde_json::Value = serde_json::from_str(&state.document).unwrap();
    assert_eq!(d["runs"].as_array().unwrap().len(), 30);
    assert_eq!(d["serial"], 30);
    assert_eq!(s.lock_info(&ws).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn compare_and_swap_alone_prevents_lost_updates_between_processes() {
    let url = services::pg_url();
    let ws = workspace();
    // No lock: 4 children × 15 writes, each retrying on ENKSTATESTALE.
    let results = run_children(&url, &ws, "cas", 4, 15, 0);
    let stale: u64 = results
        .iter()
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(r).unwrap()["stale"]
                .as_u64()
                .unwrap()
        })
        .sum();
    let s = InfraStateStore::connect(&url).await.unwrap();
    let state = s.read(&ws).await.unwrap().unwrap();
    let d: serde_json::Value = serde_json::from_str(&state.document).unwrap();
    assert_eq!(
        d["runs"].as_array().unwrap().len(),
        60,
        "stale retries: {stale}"
    );
    assert_eq!(state.serial, 60);
}

/// Child process of the cases above: one "nanokit up" from its own working
/// directory.
#[test]
#[ignore = "helper: run as a child process by the remote infra state tests"]
fn infra_child() {
    let Ok(mode) = std::env::var("NK_INFRA_MODE") else {
        return;
    };
    let env = |k: &str| std::env::var(k).unwrap();
    let url = env("NK_INFRA_URL");
    let ws = env("NK_INFRA_WS");
    let id = env("NK_INFRA_ID");
    let runs: usize = env("NK_INFRA_RUNS").parse().unwrap();
    let wait = Duration::from_millis(env("NK_INFRA_WAIT_MS").parse().unwrap());
    let cwd = std::env::current_dir().unwrap().display().to_string();
    let holder = format!("up-{id}-{}", std::process::id());
    let info = format!("nanokit up in {cwd}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let line = rt.block_on(async {
        let s = InfraStateStore::connect(&url).await.unwrap();
        // Reads, appends one run, writes with CAS. Returns Err on a stale serial.
        let write_once = |run: usize| {
            let s = &s;
            let (ws, holder, id) = (&ws, &holder, &id);
            async move {
                let cur = s.read(ws).await.unwrap();
                let (serial, lineage, mut runs) = match cur {
                    Some(c) => {
                        let d: serde_json::Value = serde_json::from_str(&c.document).unwrap();
                        let runs: Vec<String> = serde_json::from_value(d["runs"].clone()).unwrap();
                        (Some(c.serial), c.lineage, runs)
                    }
                    None => (None, "lineage-1".to_string(), Vec::new()),
                };
                runs.push(format!("{id}:{run}"));
                let next = serial.unwrap_or(0) + 1;
                s.compare_and_swap(
                    ws,
                    serial,
                    &lineage,
                    next,
                    &doc(next, &lineage, &runs),
                    holder,
                )
                .await
            }
        };
        match mode.as_str() {
            "failfast" => match s.lock(&ws, &holder, &info, 60.0, wait).await {
                Ok(_) => json!({"code": null, "cwd": cwd}),
                Err(e) => json!({"code": e.code(), "message": e.to_string(), "cwd": cwd}),
            },
            "up" => {
                for run in 0..runs {
                    s.lock(&ws, &holder, &info, 60.0, wait).await.unwrap();
                    // Under the deploy lock a stale write must never happen.
                    write_once(run).await.unwrap();
                    s.unlock(&ws, &holder).await.unwrap();
                }
                json!({"runs": runs, "cwd": cwd})
            }
            "cas" => {
                let mut stale = 0;
                for run in 0..runs {
                    loop {
                        match write_once(run).await {
                            Ok(()) => break,
                            Err(e) if e.code() == "ENKSTATESTALE" => stale += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                json!({"runs": runs, "stale": stale})
            }
            other => panic!("unknown mode {other}"),
        }
    });
    println!("\nRESULT {line}");
}
