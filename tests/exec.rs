//! ExecutionEngine with real processes: start order, hooks, failures,
//! targeted up, deploy lock, unlock, drift after kill -9.

mod common;

use common::{free_port, recorder, Project};
use nanokit::engine::plan::ActionKind;
use nanokit::engine::{EngineError, Phase, RunOptions};
use nanokit::state::Status;

fn ns(p: &Project, f: &str) -> u128 {
    p.read(f)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("timestamp file {f} missing or bad: {:?}", p.read(f)))
}

#[tokio::test(flavor = "multi_thread")]
async fn dependents_start_after_dependencies_are_healthy_and_independent_ones_concurrently() {
    // a becomes healthy only after it wrote `a.ready` (1.5 s after start);
    // b depends on a; c depends on nothing.
    let p = Project::new(
        r#"
name: order
services:
  a:
    start: "date +%s%N > a.start; sleep 1.5; date +%s%N > a.ready; exec sleep 600"
    healthcheck: { test: "test -f a.ready", interval: 50ms, retries: 200 }
  b:
    start: "date +%s%N > b.start; exec sleep 600"
    depends_on: [a]
  c:
    start: "date +%s%N > c.start; exec sleep 600"
"#,
    );
    let report = p.up(RunOptions::default()).await.expect("up");
    assert!(report.failures().is_empty(), "{:?}", report.results);
    assert!(
        ns(&p, "b.start") > ns(&p, "a.ready"),
        "b started before a was healthy"
    );
    assert!(
        ns(&p, "c.start") < ns(&p, "a.ready"),
        "c (independent) waited for a"
    );
    let st = p.state();
    assert!(st.resources.values().all(|r| r.status == Status::Healthy));
    assert_eq!(st.resources["b"].depends_on, vec!["a".to_string()]);
    // A second up changes nothing.
    let again = p.up(RunOptions::default()).await.expect("up again");
    assert!(
        again.results.iter().all(|r| r.outcome == Phase::Unchanged),
        "{:?}",
        again.results
    );
    p.down().await;
    assert!(p.state().resources.is_empty());
    assert!(common::labelled(&nanokit::engine::scope(&p.config()).state_id).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn hooks_run_in_lifecycle_order() {
    let p = Project::new(
        r#"
name: hooks
services:
  svc:
    start: "echo start >> ev; exec sleep 600"
    hooks:
      prestart: "echo prestart >> ev"
      prestart_container: "echo prestart_container >> ev"
      poststart: ["echo poststart1 >> ev", "echo poststart2 >> ev"]
      prestop: "echo prestop >> ev"
      poststop: "echo poststop >> ev"
    provisioning:
      install: "echo install >> ev"
"#,
    );
    let (sink, events) = recorder();
    let opts = RunOptions {
        events: Some(sink),
        ..RunOptions::default()
    };
    p.up(opts).await.expect("up");
    let lines: Vec<String> = p.read("ev").lines().map(str::to_string).collect();
    assert_eq!(
        lines,
        [
            "prestart",
            "install",
            "start",
            "prestart_container",
            "poststart1",
            "poststart2"
        ],
        "provisioning comes before the start: the instance runs what it installs"
    );
    let phases: Vec<Phase> = events.lock().unwrap().iter().map(|e| e.phase).collect();
    assert!(
        phases.contains(&Phase::Provisioning) && phases.last() == Some(&Phase::Healthy),
        "{phases:?}"
    );
    // Provisioning is skipped when already done (sentinel).
    std::fs::write(p.path().join("ev"), "").unwrap();
    let mut cfg_src = std::fs::read_to_string(p.file()).unwrap();
    cfg_src = cfg_src.replace("exec sleep 600", "exec sleep 601");
    p.write(&cfg_src);
    let r = p.up(RunOptions::default()).await.expect("up update");
    assert_eq!(r.plan.actions[0].action, ActionKind::Update);
    assert_eq!(r.plan.actions[0].reasons, vec!["start changed".to_string()]);
    let lines: Vec<String> = p.read("ev").lines().map(str::to_string).collect();
    assert_eq!(
        lines,
        [
            "prestop",
            "poststop",
            "prestart",
            "start",
            "prestart_container",
            "poststart1",
            "poststart2"
        ],
        "update = stop hooks of the old instance, then the start lifecycle; install skipped"
    );
    std::fs::write(p.path().join("ev"), "").unwrap();
    p.down().await;
    assert_eq!(
        p.read("ev").lines().collect::<Vec<_>>(),
        ["prestop", "poststop"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_hook_stops_dependents_but_independent_branches_finish() {
    let p = Project::new(
        r#"
name: fail
services:
  a:
    start: "exec sleep 600"
    hooks:
      prestart: "echo migration exploded >&2; exit 3"
  b:
    start: "exec sleep 600"
    depends_on: [a]
  c:
    start: "sleep 0.3; touch c.done; exec sleep 600"
    healthcheck: { test: "test -f c.done", interval: 50ms, retries: 100 }
"#,
    );
    let report = p
        .up(RunOptions::default())
        .await
        .expect("up returns a report");
    let by = |n: &str| {
        report
            .results
            .iter()
            .find(|r| r.service == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by("a").outcome, Phase::Failed);
    let err = by("a").error.unwrap();
    assert!(
        err.contains("hook prestart")
            && err.contains("exit code 3")
            && err.contains("migration exploded"),
        "{err}"
    );
    assert_eq!(by("b").outcome, Phase::Skipped);
    assert!(by("b").error.unwrap().contains("`a`"));
    assert_eq!(by("c").outcome, Phase::Healthy);
    let st = p.state();
    assert!(!st.resources.contains_key("b"), "b must not be started");
    assert_eq!(st.resources["c"].status, Status::Healthy);
    p.down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_timeout_reports_the_last_probe_output() {
    let p = Project::new(
        r#"
name: health
services:
  a:
    start: "exec sleep 600"
    healthcheck: { test: "echo not ready yet; exit 1", interval: 20ms, retries: 3 }
"#,
    );
    let report = p.up(RunOptions::default()).await.unwrap();
    let err = report.results[0].error.clone().unwrap();
    assert!(
        err.contains("is unhealthy: 3 failure(s) counted") && err.contains("not ready yet"),
        "{err}"
    );
    assert_eq!(p.state().resources["a"].status, Status::Failed);
    // The next up retries it (it is not healthy).
    let plan = nanokit::engine::make_plan(
        &p.config(),
        nanokit::engine::provider_for(&p.config()).unwrap().as_ref(),
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(plan.actions[0].action, ActionKind::Update);
    p.down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_exits_during_startup_fails_with_its_log() {
    let port = free_port();
    let p = Project::new(&format!(
        "name: crashy\nservices:\n  a:\n    start: \"echo boom: missing config >&2; exit 1\"\n    port: {port}\n"
    ));
    let report = p.up(RunOptions::default()).await.unwrap();
    let err = report.results[0].error.clone().unwrap();
    assert!(
        err.contains("exited while starting") && err.contains("boom: missing config"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn port_health_and_targeted_up_leave_others_alone() {
    let port = free_port();
    let p = Project::new(&format!(
        r#"
name: target
services:
  db:
    start: "exec node -e \"require('net').createServer().listen(process.env.PORT, '127.0.0.1')\""
    port: {port}
  api:
    start: "exec sleep 600"
    depends_on: [db]
  other:
    start: "exec sleep 600"
"#
    ));
    let r = p
        .up(RunOptions {
            targets: vec!["api".into()],
            ..RunOptions::default()
        })
        .await
        .unwrap();
    assert!(r.failures().is_empty(), "{:?}", r.results);
    let names: Vec<&str> = r.plan.actions.iter().map(|a| a.service.as_str()).collect();
    assert_eq!(names, ["db", "api"]);
    let st = p.state();
    assert!(st.resources.contains_key("db") && st.resources.contains_key("api"));
    assert!(
        !st.resources.contains_key("other"),
        "targeted up touched `other`"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    // Unknown target.
    let e = p
        .up(RunOptions {
            targets: vec!["nope".into()],
            ..RunOptions::default()
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown service `nope`"));
    // Removing `api` from the config deletes it on the next full up.
    p.write(&std::fs::read_to_string(p.file()).unwrap().replace(
        "  api:\n    start: \"exec sleep 600\"\n    depends_on: [db]\n",
        "",
    ));
    let r = p.up(RunOptions::default()).await.unwrap();
    let del = r.plan.actions.iter().find(|a| a.service == "api").unwrap();
    assert_eq!(del.action, ActionKind::Delete);
    assert_eq!(
        del.reasons,
        vec!["no longer in the configuration".to_string()]
    );
    assert!(!p.state().resources.contains_key("api"));
    p.down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn second_up_is_refused_with_holder_details_and_infra_unlock_clears_it() {
    let p = Project::new("name: locked\nservices:\n  a:\n    start: \"exec sleep 600\"\n");
    let cfg = p.config();
    let token = tokio_util::sync::CancellationToken::new();
    let (held, _store) =
        nanokit::state::lock::lock_state(&cfg, "nanokit up (ci job 42)", None, &token)
            .await
            .unwrap();
    let held_now = || async {
        nanokit::state::lock::inspect(&cfg)
            .await
            .unwrap()
            .1
            .is_some()
    };
    let e = p.up(RunOptions::default()).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("ci job 42") && msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    assert!(msg.contains("nanokit infra unlock"), "{msg}");
    assert_eq!(nanokit::error::ErrorCode::code(&e), "ENKLOCKED");
    // The CLI says the same and exits 1.
    assert_eq!(nanokit::cli::run(p.args(&["up"])).await, 1);
    // Without --yes on a non-terminal, unlock refuses.
    assert_eq!(nanokit::cli::run(p.args(&["infra", "unlock"])).await, 1);
    assert!(held_now().await);
    assert_eq!(
        nanokit::cli::run(p.args(&["infra", "unlock", "--yes"])).await,
        0
    );
    assert!(!held_now().await, "unlock must free the lock");
    assert!(
        held.release().await.is_err(),
        "the old holder finds its lease lost"
    );
    let r = p.up(RunOptions::default()).await.expect("up after unlock");
    assert!(r.failures().is_empty());
    p.down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_after_kill_9_is_detected_and_restored() {
    let p = Project::new("name: drifty\nservices:\n  a:\n    start: \"exec sleep 600\"\n  b:\n    start: \"exec sleep 600\"\n");
    p.up(RunOptions::default()).await.unwrap();
    let cfg = p.config();
    let provider = nanokit::engine::provider_for(&cfg).unwrap();
    let d = nanokit::engine::drift::detect(&cfg, provider.as_ref())
        .await
        .unwrap();
    assert!(!d.drifted, "{:?}", d.items);
    assert_eq!(nanokit::cli::run(p.args(&["drift"])).await, 0);

    let id = p.state().resources["a"].provider_id.clone().unwrap();
    let pid: i32 = id.split('@').next().unwrap().parse().unwrap();
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    while nanokit::provider::process::id_alive(&id) {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let d = nanokit::engine::drift::detect(&cfg, provider.as_ref())
        .await
        .unwrap();
    assert!(d.drifted);
    assert_eq!(d.items.len(), 1, "{:?}", d.items);
    assert_eq!(d.items[0].service, "a");
    assert_eq!(nanokit::cli::run(p.args(&["drift"])).await, 2);
    assert_eq!(nanokit::cli::run(p.args(&["drift", "--restore"])).await, 0);
    assert_eq!(nanokit::cli::run(p.args(&["drift"])).await, 0);
    let st = p.state();
    assert_ne!(st.resources["a"].provider_id.as_deref(), Some(id.as_str()));
    // b was not touched by the restore.
    p.down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_state_adopts_matching_instances_and_stops_other_orphans() {
    let p = Project::new("name: orphan\nservices:\n  a:\n    start: \"exec sleep 600\"\n");
    p.up(RunOptions::default()).await.unwrap();
    let first = p.state().resources["a"].provider_id.clone().unwrap();
    // Lose the state: the running instance (same configuration, labelled
    // with the old lineage) is adopted, not duplicated.
    std::fs::remove_file(p.config().state_file).unwrap();
    let r = p.up(RunOptions::default()).await.unwrap();
    assert_eq!(r.plan.actions[0].action, ActionKind::Update);
    assert_eq!(r.plan.actions[0].keep, vec![first.clone()]);
    assert!(r.plan.actions[0].stop.is_empty(), "{:?}", r.plan.actions[0]);
    assert!(nanokit::provider::process::id_alive(&first));
    assert_eq!(
        p.state().resources["a"].provider_id.as_deref(),
        Some(first.as_str())
    );
    // Lose it again after a config change: the instance no longer matches
    // and is stopped as an orphan.
    std::fs::remove_file(p.config().state_file).unwrap();
    p.write("name: orphan\nservices:\n  a:\n    start: \"exec sleep 601\"\n");
    let r = p.up(RunOptions::default()).await.unwrap();
    assert_eq!(r.plan.actions[0].action, ActionKind::Create);
    assert!(
        r.plan.actions[0].stop.contains(&first),
        "{:?}",
        r.plan.actions[0]
    );
    assert!(
        !nanokit::provider::process::id_alive(&first),
        "the orphan still runs"
    );
    assert_eq!(
        common::labelled(&nanokit::engine::scope(&p.config()).state_id).len(),
        1
    );
    p.down().await;
}

/// Drift asks the provider whether a missing instance's pid now belongs to
/// another process (no check on the provider's name): a recorded id whose
/// pid runs with another start time is `pid_reused`, not `gone`.
#[tokio::test(flavor = "multi_thread")]
async fn drift_reports_a_recorded_pid_that_another_process_now_has() {
    let p = Project::new("name: reused\nservices:\n  a:\n    start: \"exec sleep 600\"\n");
    p.up(RunOptions::default()).await.unwrap();
    let cfg = p.config();
    let id = p.state().resources["a"].provider_id.clone().unwrap();
    let pid = id.split('@').next().unwrap();
    // The same pid with another start time: the recorded process is gone and
    // its pid is taken (by the instance itself, as far as drift can tell).
    let text = std::fs::read_to_string(&cfg.state_file).unwrap();
    std::fs::write(&cfg.state_file, text.replace(&id, &format!("{pid}@1"))).unwrap();
    let provider = nanokit::engine::provider_for(&cfg).unwrap();
    let d = nanokit::engine::drift::detect(&cfg, provider.as_ref())
        .await
        .unwrap();
    let kinds: Vec<_> = d
        .items
        .iter()
        .map(|i| (i.service.as_str(), i.kind))
        .collect();
    assert!(
        kinds.contains(&("a", nanokit::engine::drift::DriftKind::PidReused)),
        "{:?}",
        d.items
    );
}

/// A step cut short by cancelling is reported as cancelled and is not
/// recorded as failed; what waits for it never starts.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_step_is_not_recorded_as_failed() {
    let p = Project::new(
        "name: cancelme\nservices:\n  a:\n    start: \"exec sleep 600\"\n    healthcheck: { test: \"false\", interval: 50ms, retries: 10000 }\n  b:\n    start: \"exec sleep 600\"\n    depends_on: [a]\n",
    );
    let (events, log) = recorder();
    let cancel = tokio_util::sync::CancellationToken::new();
    let trigger = {
        let (cancel, log) = (cancel.clone(), log.clone());
        tokio::spawn(async move {
            // Cancel once `a` waits for its health check.
            while !log
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.service == "a" && e.phase == Phase::Health)
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            cancel.cancel();
        })
    };
    let e = p
        .up(RunOptions {
            events: Some(events),
            cancel,
            ..RunOptions::default()
        })
        .await
        .unwrap_err();
    trigger.await.unwrap();
    assert!(matches!(e, EngineError::Cancelled), "{e:?}");
    let st = p.state();
    assert_eq!(st.resources["a"].status, Status::Starting);
    assert_eq!(st.resources["a"].error, None);
    assert!(!st.resources.contains_key("b"), "b must not start");
    let phases: Vec<Phase> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.service == "a")
        .map(|e| e.phase)
        .collect();
    assert!(phases.contains(&Phase::Cancelled), "{phases:?}");
    assert!(!phases.contains(&Phase::Failed), "{phases:?}");
}

/// Cancels `cancel` after `secs`: a guard that turns "waited a whole
/// interval" into a failure instead of a slow pass.
fn cancel_after(cancel: &tokio_util::sync::CancellationToken, secs: u64) {
    let cancel = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
        cancel.cancel();
    });
}

/// nanokit's first probes come at once and then fast, not one `interval`
/// (60 s here) apart; a healthy service is not probed again while the run
/// goes on (b's probes see a's probe count frozen).
#[tokio::test(flavor = "multi_thread")]
async fn the_first_health_probes_come_fast_and_a_healthy_service_is_not_probed_again() {
    let p = Project::new(
        r#"
name: fastprobe
services:
  a:
    start: "sleep 0.3; touch a.ready; exec sleep 600"
    healthcheck: { test: "echo x >> a.probes; test -f a.ready", interval: 60s, retries: 3 }
  b:
    start: "sleep 0.5; touch b.ready; exec sleep 600"
    healthcheck: { test: "wc -l < a.probes >> b.seen; test -f b.ready", interval: 60s, retries: 3 }
    depends_on: [a]
"#,
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    cancel_after(&cancel, 30);
    let report = p
        .up(RunOptions {
            cancel,
            ..RunOptions::default()
        })
        .await
        .expect("up (cancelled: a probe waited a whole interval)");
    assert!(report.failures().is_empty(), "{:?}", report.results);
    let a_probes = p.read("a.probes").lines().count();
    assert!(a_probes >= 2, "a was healthy at its first probe?");
    let seen: Vec<usize> = p
        .read("b.seen")
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(
        seen.iter().all(|&n| n == a_probes),
        "a was probed again after it was healthy: {seen:?}, {a_probes} in all"
    );
    p.down().await;
}

/// However many services wait for their health at once, at most
/// PROBES_IN_FLIGHT (8) probes run at any instant: each probe records how
/// many are running when it starts.
#[tokio::test(flavor = "multi_thread")]
async fn health_probes_in_flight_are_bounded() {
    let mut yml = String::from("name: probeload\nservices:\n");
    for i in 0..16 {
        yml += &format!(
            "  s{i}:\n    start: \"exec sleep 600\"\n    healthcheck: {{ test: \"mkdir -p inflight; mkdir inflight/$$$$; ls inflight | wc -l >> peaks; sleep 0.2; rmdir inflight/$$$$; test -f go\", interval: 100ms, retries: 10000 }}\n"
        );
    }
    let p = Project::new(&yml);
    let dir = p.path().to_path_buf();
    let go = std::thread::spawn(move || {
        // Let every service probe a few times, then let them pass.
        while std::fs::read_to_string(dir.join("peaks"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
            < 64
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::fs::write(dir.join("go"), "").unwrap();
    });
    let report = p
        .up(RunOptions {
            concurrency: 16,
            ..RunOptions::default()
        })
        .await
        .expect("up");
    go.join().unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.results);
    let peaks: Vec<usize> = p
        .read("peaks")
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let max = *peaks.iter().max().unwrap();
    assert!(max <= 8, "{max} probes in flight at once");
    assert!(
        max >= 4,
        "the probes never overlapped ({max}): the test proves nothing"
    );
    p.down().await;
}

/// The first Ctrl-C stops `down` once it holds the lock (a real SIGINT to
/// the `nanokit` process): the stop in progress (b's, whose prestop takes a
/// second) finishes and is recorded; a, which is stopped only after b, is
/// never stopped and stays recorded; the command exits 130. The next `down`
/// finishes the job.
#[tokio::test(flavor = "multi_thread")]
async fn the_first_ctrl_c_stops_down_after_the_step_in_progress() {
    use std::io::BufRead;
    let p = Project::new(
        "name: downint\nservices:\n  a:\n    start: \"exec sleep 600\"\n  b:\n    start: \"exec sleep 600\"\n    depends_on: [a]\n    hooks:\n      prestop: \"sleep 1\"\n",
    );
    let r = p.up(RunOptions::default()).await.unwrap();
    assert!(r.failures().is_empty(), "{:?}", r.results);
    let id = |svc: &str| p.state().resources[svc].ids()[0].clone();
    let (a, b) = (id("a"), id("b"));
    let alive = nanokit::provider::process::id_alive;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nanokit"))
        .args(p.args(&["down"]))
        .env("NANOKIT_TRACE", "off")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let stopping_b = {
            let w: Vec<&str> = line.split_whitespace().collect();
            w.get(2) == Some(&"b") && w.get(3) == Some(&"stopping")
        };
        seen.push(line);
        if stopping_b {
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            break;
        }
    }
    seen.extend(lines.map_while(Result::ok));
    let status = child.wait().unwrap();
    let out = seen.join("\n");
    assert_eq!(status.code(), Some(130), "{out}");
    assert!(out.contains("ENKCANCELLED"), "{out}");
    let state = p.state();
    assert!(!state.resources.contains_key("b"), "{out}");
    assert!(!alive(&b), "b still runs");
    assert!(state.resources.contains_key("a"), "a was stopped: {out}");
    assert!(alive(&a), "a was stopped: {out}");
    let d = p.down().await;
    assert!(d.failures().is_empty(), "{:?}", d.results);
    assert!(p.state().resources.is_empty());
    assert!(!alive(&a));
}

/// `down` asks first when run from a terminal (a pty made by `script`):
/// answered no, nothing is stopped; yes, everything is. From a script (no
/// terminal) it does not ask (every other test's `down`).
#[tokio::test(flavor = "multi_thread")]
async fn down_asks_first_from_a_terminal() {
    use std::io::Write;
    let p = Project::new("name: downask\nservices:\n  a:\n    start: \"exec sleep 600\"\n");
    let r = p.up(RunOptions::default()).await.unwrap();
    assert!(r.failures().is_empty(), "{:?}", r.results);
    let in_terminal = |answer: &str| {
        let cmd = format!(
            "{} down -f {}",
            nanokit::cli::shell_word(env!("CARGO_BIN_EXE_nanokit")),
            nanokit::cli::shell_word(&p.file().display().to_string())
        );
        let mut child = std::process::Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("NANOKIT_TRACE", "off")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("script (util-linux)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{answer}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), text)
    };
    let (code, text) = in_terminal("n");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("Stop and remove every service of") && text.contains("ENKCONFIRM"),
        "{text}"
    );
    assert!(p.state().resources.contains_key("a"), "{text}");
    let (code, text) = in_terminal("y");
    assert_eq!(code, Some(0), "{text}");
    assert!(p.state().resources.is_empty(), "{text}");
}
