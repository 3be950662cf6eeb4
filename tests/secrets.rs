//! Secrets never leave nanokit unmasked, its files are private, and plan
//! hashes of env values are salted per state lineage.
//!
//! The CLI runs for real, each command in its own process (this test binary
//! re-executed as `cli_child`, which calls `nanokit::cli::run`, the code
//! behind `npx nanokit`), with real services on the process provider. Every
//! byte of its stdout and stderr and every file under `.nanokit/` is
//! searched for the secrets, and the mode of every file and folder there is
//! checked after every command.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::Project;
use nanokit::engine::plan::PlanOptions;
use nanokit::engine::{self, Phase, RunOptions};

/// From `.env`.
const DOTENV_SECRET: &str = "Pw-7f3kq9-zz81";
/// From the process environment of the CLI, through `${SHELL_SECRET}`.
const SHELL_SECRET: &str = "Sh3ll-s3cret-991";
/// Set in the child to the JSON list of CLI arguments.
const CHILD: &str = "NK_SECRETS_TEST_CLI";

/// Not a test: the CLI, when this binary is re-executed by [`cli`].
#[test]
#[ignore = "runs the CLI when re-executed by the other tests of this file"]
fn cli_child() {
    let args = std::env::var(CHILD).expect("run by cli()");
    let args: Vec<String> = serde_json::from_str(&args).expect("args");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let code = rt.block_on(nanokit::cli::run(args));
    std::process::exit(code);
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `nanokit <args> -f <project>/nanokit.yml` in its own process.
fn cli(p: &Project, args: &[&str]) -> Out {
    let args = p.args(args);
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "cli_child", "--nocapture"])
        .env(CHILD, serde_json::to_string(&args).unwrap())
        .env("SHELL_SECRET", SHELL_SECRET)
        .env_remove("NANOKIT_LOG")
        .current_dir(p.path())
        .output()
        .expect("run the CLI");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every file and folder under `dir`.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        out.push(p.clone());
        if e.file_type().unwrap().is_dir() {
            walk(&p, out);
        }
    }
}

/// Checks every entry under `.nanokit/` (and `.nanokit` itself): folders
/// 0700, files 0600, no secret in any file. Returns the files' paths
/// relative to `.nanokit`.
fn check_work_dir(p: &Project, after: &str) -> Vec<String> {
    let root = p.path().join(".nanokit");
    let mut all = vec![root.clone()];
    walk(&root, &mut all);
    let mut files = Vec::new();
    for path in &all {
        let meta = std::fs::symlink_metadata(path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(
                mode,
                0o700,
                "after {after}: folder {} is {mode:o}",
                path.display()
            );
        } else {
            assert_eq!(
                mode,
                0o600,
                "after {after}: file {} is {mode:o}",
                path.display()
            );
            let bytes = std::fs::read(path).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            for s in [DOTENV_SECRET, SHELL_SECRET] {
                assert!(
                    !text.contains(s),
                    "after {after}: {} holds a secret:\n{text}",
                    path.display()
                );
            }
            files.push(
                path.strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    files
}

fn assert_clean(what: &str, out: &Out) {
    for (stream, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        for s in [DOTENV_SECRET, SHELL_SECRET] {
            assert!(
                !text.contains(s),
                "`{what}` printed a secret on {stream}:\n{text}"
            );
        }
    }
}

const YML: &str = r#"
name: secrets
services:
  db:
    start: "PASS=${DBPASS} exec sleep 600"
    env:
      DATABASE_URL: "postgres://app:${DBPASS}@127.0.0.1:5432/app"
    hooks:
      prestart: "printf %s \"$DATABASE_URL\" > seen-by-hook.txt; echo connecting to postgres://app:${DBPASS}@127.0.0.1/app with ${SHELL_SECRET}"
    healthcheck:
      test: "echo probing http://u:${DBPASS}@127.0.0.1/health; test -n \"$DATABASE_URL\""
      interval: 50ms
      retries: 40
  api:
    start: "exec sleep 600"
    depends_on: [db]
    hooks:
      poststart: "echo using ${DBPASS} and ${SHELL_SECRET}; exit 3"
"#;

#[test]
fn secrets_from_env_and_dotenv_reach_no_file_and_no_cli_output() {
    let p = Project::new(YML);
    std::fs::write(
        p.path().join(".env"),
        format!("DBPASS={DOTENV_SECRET}\nNOT_USED=short\n"),
    )
    .unwrap();
    // What an older nanokit left: world-readable folders and log.
    let logs = p.path().join(".nanokit/logs/local");
    std::fs::create_dir_all(&logs).unwrap();
    for d in [
        p.path().join(".nanokit"),
        p.path().join(".nanokit/logs"),
        logs.clone(),
    ] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(logs.join("db.log"), "old line\n").unwrap();
    std::fs::set_permissions(logs.join("db.log"), std::fs::Permissions::from_mode(0o644)).unwrap();

    let plan = cli(&p, &["plan"]);
    assert_eq!(plan.code, Some(0), "{}", plan.stderr);
    assert_clean("plan", &plan);
    check_work_dir(&p, "plan");

    // api's poststart fails: the failure list, the failed event, the error
    // in state and in the trace all quote the hook and its output.
    let up = cli(&p, &["up"]);
    assert_eq!(up.code, Some(1), "{}\n{}", up.stdout, up.stderr);
    assert_clean("up", &up);
    assert!(
        up.stderr.contains("error[ENKFAILED]: api failed: hook poststart `echo using *** and ***; exit 3` failed (exit code 3)"),
        "the failure is reported, masked:\n{}",
        up.stderr
    );
    assert!(up.stderr.contains("using *** and ***"), "{}", up.stderr);
    assert!(
        up.stderr.contains("prestart: printf"),
        "hook events are printed:\n{}",
        up.stderr
    );
    let files = check_work_dir(&p, "up");
    // The hooks got the real values: masking is only on the way out.
    assert_eq!(
        p.read("seen-by-hook.txt"),
        format!("postgres://app:{DOTENV_SECRET}@127.0.0.1:5432/app")
    );
    let log = std::fs::read_to_string(logs.join("db.log")).unwrap();
    assert!(
        log.contains("connecting to postgres://app:***@127.0.0.1/app with ***"),
        "{log}"
    );

    let status = cli(&p, &["status"]);
    assert_clean("status", &status);
    assert!(
        status
            .stdout
            .contains("hook poststart `echo using *** and ***; exit 3`"),
        "{}",
        status.stdout
    );
    let status_json = cli(&p, &["status", "--output", "json"]);
    assert_clean("status --output json", &status_json);
    check_work_dir(&p, "status");

    let timeline = cli(&p, &["timeline"]);
    assert_eq!(timeline.code, Some(0), "{}", timeline.stderr);
    assert_clean("timeline", &timeline);
    assert!(
        timeline.stdout.contains("using *** and ***"),
        "the failure list is shown, masked:\n{}",
        timeline.stdout
    );
    let timeline_json = cli(&p, &["timeline", "--output", "json"]);
    assert_clean("timeline --output json", &timeline_json);
    let after_timeline = check_work_dir(&p, "timeline");

    let drift = cli(&p, &["drift"]);
    assert_clean("drift", &drift);
    let drift_json = cli(&p, &["drift", "--output", "json"]);
    assert_clean("drift --output json", &drift_json);
    check_work_dir(&p, "drift");

    let up_json = cli(&p, &["up", "--output", "json"]);
    assert_clean("up --output json", &up_json);
    let plan_json = cli(&p, &["plan", "--output", "json"]);
    assert_clean("plan --output json", &plan_json);
    let logs_out = cli(&p, &["logs", "db"]);
    assert_clean("logs db", &logs_out);
    check_work_dir(&p, "the second up");

    let down = cli(&p, &["down"]);
    assert_eq!(down.code, Some(0), "{}", down.stderr);
    assert_clean("down", &down);
    check_work_dir(&p, "down");

    // Every sink was written (else the checks above proved little).
    for f in [
        "state.json",
        "state.json.lock",
        "plans/latest.json",
        "logs/local/db.log",
        "logs/local/api.log",
    ] {
        assert!(files.iter().any(|x| x == f), "{f} not written: {files:?}");
    }
    assert!(
        files
            .iter()
            .any(|f| f.starts_with("traces/") && f.ends_with(".json")),
        "{files:?}"
    );
    assert!(
        after_timeline
            .iter()
            .any(|f| f.starts_with("traces/") && f.ends_with(".html")),
        "{after_timeline:?}"
    );
}

const SALTED: &str = r#"
name: salted
services:
  a:
    start: "exec sleep 600"
    env: { SHARED_VALUE: "equal-in-both-services" }
  b:
    start: "exec sleep 600"
    env: { SHARED_VALUE: "equal-in-both-services" }
"#;

async fn plan_of(p: &Project) -> nanokit::engine::plan::Plan {
    let cfg = p.config();
    let provider = engine::provider_for(&cfg).unwrap();
    engine::make_plan(&cfg, provider.as_ref(), &PlanOptions::default())
        .await
        .unwrap()
}

fn field<'a>(plan: &'a nanokit::engine::plan::Plan, service: &str, f: &str) -> &'a str {
    plan.actions
        .iter()
        .find(|a| a.service == service)
        .and_then(|a| a.fields.get(f))
        .unwrap_or_else(|| panic!("{service}.{f} not in the plan"))
}

#[tokio::test(flavor = "multi_thread")]
async fn env_hashes_are_salted_per_lineage_and_a_plan_before_any_state_is_the_one_up_makes() {
    let one = Project::new(SALTED);
    let two = Project::new(SALTED);
    let env = "env.SHARED_VALUE";

    // No state yet: the plan already uses the lineage the first state gets.
    let before = plan_of(&one).await;
    assert_eq!(before.state_serial, 0);
    assert_eq!(
        plan_of(&one).await.lineage,
        before.lineage,
        "two plans before any state must agree"
    );
    let report = one.up(RunOptions::default()).await.unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.results);
    let st = one.state();
    assert_eq!(
        st.lineage, before.lineage,
        "the first state took the planned lineage"
    );
    for a in &before.actions {
        assert_eq!(
            Some(&st.resources[&a.service].config_hash),
            a.config_hash.as_ref(),
            "{}: the plan made before the state is not what up did",
            a.service
        );
    }
    assert!(
        !nanokit::state::lineage_file(&one.config().state_file).exists(),
        "the reservation is removed once the state is written"
    );

    // Within one lineage equal values hash equal; across lineages they differ.
    let after = plan_of(&one).await;
    assert!(!after.has_changes(), "{}", after.render());
    assert_eq!(field(&after, "a", env), field(&after, "b", env));
    let other = plan_of(&two).await;
    assert_ne!(other.lineage, after.lineage);
    assert_ne!(field(&other, "a", env), field(&after, "a", env));
    assert_ne!(field(&other, "b", env), field(&after, "b", env));
    assert_eq!(field(&other, "a", env), field(&other, "b", env));

    // A no-change up stays no-change.
    let again = one.up(RunOptions::default()).await.unwrap();
    assert!(
        again.results.iter().all(|r| r.outcome == Phase::Unchanged),
        "{:?}",
        again.results
    );
    one.down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_and_results_of_the_engine_are_masked() {
    // The JS API's onEvent and results come from these events and results.
    let p = Project::new(
        "name: events\nservices:\n  a:\n    start: \"exec sleep 600\"\n    env: { API_TOKEN: tok-abcdef-123456 }\n    hooks:\n      prestart: \"echo $API_TOKEN; echo tok-abcdef-123456\"\n      poststart: \"echo failing with tok-abcdef-123456; exit 2\"\n",
    );
    let (sink, log) = common::recorder();
    let opts = RunOptions {
        events: Some(sink),
        ..RunOptions::default()
    };
    let cfg = p.config();
    let provider = engine::provider_for(&cfg).unwrap();
    let report = engine::up(Arc::new(cfg), provider, opts).await.unwrap();
    let events = format!("{:?}", log.lock().unwrap());
    assert!(!events.contains("tok-abcdef-123456"), "{events}");
    assert!(
        events.contains("poststart: echo failing with ***; exit 2"),
        "{events}"
    );
    let results = serde_json::to_string(&report).unwrap();
    assert!(!results.contains("tok-abcdef-123456"), "{results}");
    assert!(results.contains("failing with ***"), "{results}");
    let state = std::fs::read_to_string(p.config().state_file).unwrap();
    assert!(!state.contains("tok-abcdef-123456"), "{state}");
    p.down().await;
}

#[test]
fn what_an_older_nanokit_wrote_unmasked_is_masked_when_shown() {
    // A trace and a state written before masking covered `.env` values.
    let p = Project::new(
        "name: olderfiles\nservices:\n  a:\n    start: \"exec sleep 600 ${DBPASS}\"\n",
    );
    std::fs::write(p.path().join(".env"), format!("DBPASS={DOTENV_SECRET}\n")).unwrap();
    let traces = p.path().join(".nanokit/traces");
    std::fs::create_dir_all(&traces).unwrap();
    let leaked = format!(
        "hook poststart `echo {DOTENV_SECRET}; exit 3` failed (exit code 3):\n    {DOTENV_SECRET}"
    );
    let trace = serde_json::json!({
        "version": 1, "run": "20260101T000000.000Z-up-0123abcd", "command": "up",
        "project": "olderfiles", "env": "local", "file": "nanokit.yml",
        "trace_id": "0123abcd0123abcd0123abcd0123abcd", "started_at": "2026-01-01T00:00:00Z",
        "start_unix_nano": 1_000_000_000u64, "end_unix_nano": 2_000_000_000u64,
        "outcome": "failed", "error": format!("a failed: {leaked}"),
        "spans": [
            {"span_id": "00000000000000a1", "parent_span_id": null, "name": "nanokit up",
             "start_unix_nano": 1_000_000_000u64, "end_unix_nano": 2_000_000_000u64,
             "status": "error", "status_message": "a failed", "attributes": {"error": format!("a failed: {leaked}")}, "events": []},
            {"span_id": "00000000000000a2", "parent_span_id": "00000000000000a1", "name": "poststart",
             "start_unix_nano": 1_100_000_000u64, "end_unix_nano": 1_900_000_000u64,
             "status": "error", "status_message": leaked.lines().next().unwrap(),
             "attributes": {"nanokit.service": "a", "nanokit.command": format!("echo {DOTENV_SECRET}; exit 3"), "error": leaked}, "events": []}
        ]
    });
    std::fs::write(
        traces.join("20260101T000000.000Z-up-0123abcd.json"),
        serde_json::to_vec(&trace).unwrap(),
    )
    .unwrap();
    let state = serde_json::json!({
        "version": 1, "serial": 3, "lineage": "9b2b3c1e-1111-4222-8333-444455556666",
        "project": "olderfiles", "env": "local",
        "resources": {"a": {"provider": "process", "provider_id": null, "config_hash": "x",
            "status": "failed", "error": leaked, "created_at": "t", "updated_at": "t"}}
    });
    std::fs::write(
        p.path().join(".nanokit/state.json"),
        serde_json::to_vec(&state).unwrap(),
    )
    .unwrap();

    let timeline = cli(&p, &["timeline", "-o", "page.html"]);
    assert_eq!(timeline.code, Some(0), "{}", timeline.stderr);
    assert_clean("timeline of an older trace", &timeline);
    assert!(
        timeline.stdout.contains("echo ***; exit 3"),
        "{}",
        timeline.stdout
    );
    let html = p.read("page.html");
    assert!(html.contains("echo ***; exit 3"), "{html}");
    assert!(!html.contains(DOTENV_SECRET), "the page shows the secret");
    let json = cli(&p, &["timeline", "--output", "json"]);
    assert_clean("timeline --output json of an older trace", &json);
    let list = cli(&p, &["timeline", "--list", "--output", "json"]);
    assert_clean("timeline --list", &list);
    for args in [&["status"][..], &["status", "--output", "json"]] {
        let status = cli(&p, args);
        assert_clean("status of an older state", &status);
        assert!(
            status.stdout.contains("echo ***; exit 3"),
            "{}",
            status.stdout
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn anything_recorded_in_a_run_is_masked_even_where_its_call_site_did_not() {
    // A log line and a span attribute inside a run, written by code that
    // masks nothing itself: the run's span processor masks them.
    let p = Project::new("name: anyspan\nservices:\n  a:\n    start: \"exec sleep 600\"\n");
    std::fs::write(p.path().join(".env"), format!("DBPASS={DOTENV_SECRET}\n")).unwrap();
    let file = p.file();
    let meta = nanokit::trace::RunMeta {
        command: "up",
        file: file.clone(),
        env: "local".into(),
    };
    let settings = nanokit::trace::Settings {
        export: nanokit::trace::Export::Off,
        ..Default::default()
    };
    let (r, t) = nanokit::trace::record_run(meta, settings, async {
        let cfg = nanokit::engine::load_config(|| {
            nanokit::config::load(&nanokit::config::LoadOptions::new(file.clone()))
        })?;
        let span =
            tracing::info_span!("custom", detail = %format!("url http://u:{DOTENV_SECRET}@h/"));
        let _g = span.enter();
        tracing::warn!("something about {DOTENV_SECRET}");
        drop(_g);
        let provider = engine::provider_for(&cfg)?;
        engine::up(Arc::new(cfg), provider, RunOptions::default()).await
    })
    .await;
    r.unwrap();
    let text = std::fs::read_to_string(t.unwrap().file.unwrap()).unwrap();
    assert!(text.contains("url http://u:***@h/"), "{text}");
    assert!(text.contains("something about ***"), "{text}");
    assert!(!text.contains(DOTENV_SECRET), "{text}");
    p.down().await;
}
