//! `nanokit watch` on the local-process provider, as separate processes:
//! restores, restart policies and backoff, restart on failed health,
//! dependents that follow, configuration edits, graceful stop, one fenced
//! leader, handed-over `up`/`down`, and a bounded footprint. Every wait is
//! for an event of the watcher (`--output json`), never a sleep.

mod common;
mod services;

use std::collections::BTreeSet;
use std::time::Duration;

use common::watcher::{alive, recorded_pid, Watcher};
use common::Project;
use serde_json::Value;

fn is(kind: &'static str, service: &'static str) -> impl Fn(&Value) -> bool {
    move |e: &Value| e["type"] == kind && e["service"] == service
}

fn progress(service: &'static str, phase: &'static str) -> impl Fn(&Value) -> bool {
    move |e: &Value| e["type"] == "progress" && e["service"] == service && e["phase"] == phase
}

fn kill9(pid: u32) {
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

fn pid_of(p: &Project, service: &str) -> u32 {
    recorded_pid(&p.path().join(".nanokit/state.json"), service)
        .unwrap_or_else(|| panic!("no pid recorded for {service}"))
}

/// Starts a watcher and waits for its initial pass to finish.
fn watch(p: &Project, args: &[&str]) -> Watcher {
    let mut w = Watcher::start(&p.file(), args, &[]);
    w.until_event("leadershipAcquired", None);
    let done = w.until_event("passFinished", None);
    assert_eq!(done["outcome"], "ok", "{}", w.recent());
    w
}

/// Waits until the watcher's status file has named `n` different full
/// checks (a minute at most).
fn full_checks(p: &Project, n: usize) {
    let status = p.path().join(".nanokit/watch/status.json");
    let t0 = std::time::Instant::now();
    let mut seen = BTreeSet::new();
    while seen.len() < n {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{} full checks in a minute, not {n}",
            seen.len()
        );
        if let Ok(bytes) = std::fs::read(&status) {
            if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
                seen.insert(v["lastCheck"].to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pass after an edit that set b's `V` to 2 changed b alone: a kept its
/// process `a`, b's new process (returned) is not `b` and has `V=2`.
fn applied_to_b_alone(w: &mut Watcher, p: &Project, a: u32, b: u32) -> u32 {
    let done = w.until("config pass", |e| e["type"] == "passFinished");
    assert_eq!(done["changed"], serde_json::json!(["b"]), "{}", w.recent());
    assert_eq!(pid_of(p, "a"), a);
    let b2 = pid_of(p, "b");
    assert_ne!(b2, b);
    let env = std::fs::read(format!("/proc/{b2}/environ")).unwrap();
    assert!(env.split(|c| *c == 0).any(|kv| kv == b"V=2"));
    b2
}

#[test]
fn a_sigkilled_service_is_restarted_and_its_exit_is_told() {
    let p = Project::new(
        "name: wkill\nservices:\n  a:\n    start: \"exec sleep 600\"\n  b:\n    start: \"exec sleep 600\"\n",
    );
    let mut w = watch(&p, &[]);
    let (a, b) = (pid_of(&p, "a"), pid_of(&p, "b"));
    kill9(a);
    let exited = w.until("a exited", is("serviceExited", "a"));
    assert_eq!(exited["exit"]["signal"], "SIGKILL", "{exited}");
    assert_eq!(
        exited["instance"].as_str().unwrap().split('@').next(),
        Some(a.to_string().as_str())
    );
    let sched = w.until("restart scheduled", is("restartScheduled", "a"));
    assert_eq!(sched["delayMs"], 0, "the first restart is immediate");
    let restarted = w.until("a restarted", is("restarted", "a"));
    w.until("pass finished", |e| e["type"] == "passFinished");
    let a2 = pid_of(&p, "a");
    assert_eq!(
        restarted["instances"][0]
            .as_str()
            .unwrap()
            .split('@')
            .next(),
        Some(a2.to_string().as_str())
    );
    assert_ne!(a2, a);
    assert!(alive(a2), "the new instance runs");
    assert_eq!(pid_of(&p, "b"), b, "b was left alone");
    assert!(alive(b));
    // The status file tells it.
    let status: Value = serde_json::from_slice(
        &std::fs::read(p.path().join(".nanokit/watch/status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(status["role"], "leader");
    assert_eq!(status["leader"]["pid"], w.pid);
    assert_eq!(status["services"]["a"]["restarts"], 1, "{status}");
    assert_eq!(status["services"]["a"]["lastExit"]["signal"], "SIGKILL");
    assert_eq!(status["services"]["b"]["restarts"], 0);
}

#[test]
fn one_that_exits_at_once_backs_off_growing_and_starts_over_once_healthy() {
    // Fails its first four starts, then runs.
    let p = Project::new(
        r#"name: wloop
services:
  flappy:
    start: "n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count; [ $n -ge 4 ] && exec sleep 600; echo boom; exit 3"
"#,
    );
    let mut w = Watcher::start(&p.file(), &[], &[]);
    let mut delays = Vec::new();
    while delays.len() < 4 {
        let s = w.until("restart scheduled", is("restartScheduled", "flappy"));
        delays.push(s["delayMs"].as_u64().unwrap());
    }
    assert_eq!(delays, [0, 100, 200, 400], "{}", w.recent());
    w.until("flappy restarted", is("restarted", "flappy"));
    let failed = w.taken(is("restartFailed", "flappy"));
    assert_eq!(failed.len(), 3, "{}", w.recent());
    assert!(
        failed[0]["error"].as_str().unwrap().contains("boom"),
        "{}",
        failed[0]
    );
    // Healthy 10 s: the next restart is immediate again.
    w.until("backoff reset", is("backoffReset", "flappy"));
    kill9(pid_of(&p, "flappy"));
    let s = w.until("restart scheduled", is("restartScheduled", "flappy"));
    assert_eq!(
        (s["attempt"].as_u64(), s["delayMs"].as_u64()),
        (Some(1), Some(0))
    );
    w.until("flappy restarted", is("restarted", "flappy"));
}

#[test]
fn a_service_whose_check_starts_failing_is_restarted_after_retries_failures() {
    let p = Project::new(
        r#"name: whealth
services:
  web:
    start: "rm -f broken; exec sleep 600"
    healthcheck: { test: "test ! -f broken", interval: 100ms, retries: 3 }
"#,
    );
    let mut w = watch(&p, &[]);
    let before = pid_of(&p, "web");
    std::fs::write(p.path().join("broken"), "").unwrap();
    for n in 1..=3 {
        let f = w.until("health failed", is("healthFailed", "web"));
        assert_eq!(f["failures"], n, "{f}");
        assert_eq!(f["retries"], 3);
    }
    let exited = w.until("web unhealthy", is("serviceExited", "web"));
    assert_eq!(exited["exit"]["kind"], "unhealthy");
    w.until("web restarted", is("restarted", "web"));
    let after = pid_of(&p, "web");
    assert_ne!(before, after);
    assert!(!alive(before), "the unhealthy instance was stopped");
    assert!(alive(after));
    assert!(!p.path().join("broken").exists());
}

#[test]
fn a_dependent_with_restart_true_follows_once_its_dependency_is_healthy_and_others_keep_their_pid()
{
    let p = Project::new(
        r#"name: wdeps
services:
  db:
    start: "exec sleep 600"
    healthcheck: { test: "true", interval: 100ms }
  api:
    start: "exec sleep 600"
    depends_on: { db: { condition: service_healthy, restart: true } }
  report:
    start: "exec sleep 600"
    depends_on: [db]
"#,
    );
    let mut w = watch(&p, &[]);
    let (db, api, report) = (pid_of(&p, "db"), pid_of(&p, "api"), pid_of(&p, "report"));
    kill9(db);
    let released = w.until("dependents released", is("dependentsReleased", "db"));
    assert_eq!(released["dependents"], serde_json::json!(["api"]));
    w.until("db healthy", progress("db", "healthy"));
    let stop = w.until("api stopping", progress("api", "stopping"));
    assert!(stop["message"]
        .as_str()
        .unwrap()
        .starts_with(&api.to_string()));
    w.until("api healthy", progress("api", "healthy"));
    w.until("pass finished", |e| e["type"] == "passFinished");
    // The order: db healthy before api was touched.
    let pos = |pred: &dyn Fn(&Value) -> bool| w.seen.iter().position(pred).unwrap();
    assert!(pos(&progress("db", "healthy")) < pos(&progress("api", "stopping")));
    assert_ne!(pid_of(&p, "db"), db);
    assert_ne!(pid_of(&p, "api"), api);
    assert!(!alive(api));
    assert_eq!(
        pid_of(&p, "report"),
        report,
        "report (short form) keeps its pid"
    );
    assert!(alive(report));
    assert!(w.taken(progress("report", "stopping")).is_empty());
}

#[test]
fn an_edit_of_nanokit_yml_is_applied_once() {
    let yml = |v: &str| {
        format!("name: wedit\nservices:\n  a:\n    start: \"exec sleep 600\"\n  b:\n    start: \"exec sleep 600\"\n    env: {{ V: \"{v}\" }}\n")
    };
    let p = Project::new(&yml("1"));
    let mut w = watch(&p, &["--interval", "200ms"]);
    let (a, b) = (pid_of(&p, "a"), pid_of(&p, "b"));
    // Written twice in a row, as editors do: read once.
    p.write(&yml("2"));
    p.write(&yml("2"));
    w.until("config reloaded", |e| e["type"] == "configReloaded");
    let b2 = applied_to_b_alone(&mut w, &p, a, b);
    // Full checks come and go (every 200 ms) and change nothing more.
    full_checks(&p, 4);
    assert_eq!(pid_of(&p, "b"), b2);
    w.signal(libc::SIGTERM);
    w.wait_exit();
    assert_eq!(
        w.taken(|e| e["type"] == "passFinished").len(),
        2,
        "the initial pass and one for the edit:\n{}",
        w.recent()
    );
    assert_eq!(w.taken(progress("b", "starting")).len(), 2);
}

/// The nanokit CLI (the standalone binary), in `p`'s folder.
fn cli(p: &Project, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_nanokit"))
        .args(args)
        .arg("-f")
        .arg(p.file())
        .output()
        .expect("run nanokit")
}

fn lock_file(p: &Project) -> std::path::PathBuf {
    p.path().join(".nanokit/state.json.lock")
}

#[test]
fn processes_started_by_an_earlier_up_are_adopted_and_restarted() {
    let p = Project::new("name: wadopt\nservices:\n  a:\n    start: \"exec sleep 600\"\n");
    let up = cli(&p, &["up"]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let a = pid_of(&p, "a");
    let mut w = Watcher::start(&p.file(), &["--interval", "200ms"], &[]);
    let first = w.until_event("passFinished", None);
    assert_eq!(
        first["changed"],
        serde_json::json!([]),
        "nothing to do at first"
    );
    // A first pass with nothing to do is still the last pass the status names.
    let status = p.path().join(".nanokit/watch/status.json");
    let v: Value = serde_json::from_slice(&std::fs::read(&status).unwrap()).unwrap();
    assert_eq!(v["lastPass"]["pass"], 1, "{v}");
    assert_eq!(v["lastPass"]["reason"], "initial", "{v}");
    assert_eq!(v["lastPass"]["outcome"], "ok", "{v}");
    // Full checks go by: the adopted process is watched, not taken for dead
    // (an exit seen wrongly would come at once).
    full_checks(&p, 3);
    w.drain();
    assert!(
        w.taken(|e| e["type"] == "serviceExited").is_empty(),
        "{}",
        w.recent()
    );
    assert_eq!(pid_of(&p, "a"), a);
    kill9(a);
    let exited = w.until("a exited", is("serviceExited", "a"));
    // Not its child: the exit is known at once, its code is not.
    assert_eq!(exited["exit"]["kind"], "exited");
    assert!(exited["exit"]["code"].is_null() && exited["exit"]["signal"].is_null());
    w.until("a restarted", is("restarted", "a"));
    assert_ne!(pid_of(&p, "a"), a);
}

#[test]
fn sigterm_stops_the_watcher_frees_the_lease_and_leaves_services_running() {
    let p = Project::new(
        "name: wterm\nservices:\n  a:\n    start: \"exec sleep 600\"\n  b:\n    start: \"exec sleep 600\"\n",
    );
    let mut w = watch(&p, &[]);
    let held = nanokit::lock::inspect(&lock_file(&p), nanokit::lock::DEFAULT_STALE).unwrap();
    let label = held.and_then(|h| h.info).and_then(|i| i.holder).unwrap();
    assert!(label.contains("nanokit watch"), "{label}");
    let (a, b) = (pid_of(&p, "a"), pid_of(&p, "b"));
    w.signal(libc::SIGTERM);
    let st = w.wait_exit();
    assert!(st.success(), "{st:?}\n{}", w.recent());
    assert!(w.taken(|e| e["type"] == "stopped").len() == 1);
    assert!(
        nanokit::lock::inspect(&lock_file(&p), nanokit::lock::DEFAULT_STALE)
            .unwrap()
            .is_none(),
        "the lease is free"
    );
    assert!(alive(a) && alive(b), "services keep running");
    let status: Value = serde_json::from_slice(
        &std::fs::read(p.path().join(".nanokit/watch/status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(status["role"], "stopped");
    // And the next `up` finds everything in place.
    let up = cli(&p, &["up"]);
    assert!(String::from_utf8_lossy(&up.stderr).contains("0 changed"));
}

/// An edit no file event tells of is applied at the next full check: here
/// nanokit.yml is a symbolic link into another folder (as a Kubernetes
/// ConfigMap's file is), edited there, where the watcher's file events do
/// not look.
#[test]
fn an_edit_behind_a_symbolic_link_is_applied_at_the_next_full_check() {
    let yml = |v: &str| {
        format!("name: wlink\nservices:\n  a:\n    start: \"exec sleep 600\"\n  b:\n    start: \"exec sleep 600\"\n    env: {{ V: \"{v}\" }}\n")
    };
    let p = Project::new(&yml("1"));
    let real = p.path().join("conf").join("real.yml");
    std::fs::create_dir_all(real.parent().unwrap()).unwrap();
    std::fs::rename(p.file(), &real).unwrap();
    std::os::unix::fs::symlink("conf/real.yml", p.file()).unwrap();
    let mut w = watch(&p, &["--interval", "300ms"]);
    let (a, b) = (pid_of(&p, "a"), pid_of(&p, "b"));
    // Replaced whole, as a ConfigMap's update is (a full check never reads
    // half a file).
    let next = real.with_extension("new");
    std::fs::write(&next, yml("2")).unwrap();
    std::fs::rename(&next, &real).unwrap();
    let read = w.until("config reloaded", |e| e["type"] == "configReloaded");
    assert!(read["error"].is_null(), "{}", w.recent());
    let b2 = applied_to_b_alone(&mut w, &p, a, b);
    // Full checks come and go (every 300 ms) and find the file as read.
    full_checks(&p, 4);
    assert_eq!(pid_of(&p, "b"), b2);
    w.signal(libc::SIGTERM);
    w.wait_exit();
    // Read once.
    assert_eq!(
        w.taken(|e| e["type"] == "configReloaded").len(),
        1,
        "{}",
        w.recent()
    );
    let _ = cli(&p, &["down"]);
}

/// SIGHUP reads nanokit.yml again and applies it at once, without an edit
/// for the file watcher to see (as on NFS, edited from another host), and
/// the watcher goes on: a hangup does not end it.
#[test]
fn sighup_reads_nanokit_yml_again_and_the_watcher_goes_on() {
    let p = Project::new("name: whup\nservices:\n  a:\n    start: \"exec sleep 600\"\n");
    let mut w = watch(&p, &[]);
    let a = pid_of(&p, "a");
    w.drain();
    w.signal(libc::SIGHUP);
    let reloaded = w.until_event("configReloaded", None);
    assert!(reloaded["error"].is_null(), "{}", w.recent());
    // Twice: a hangup is taken up every time, not once.
    w.signal(libc::SIGHUP);
    w.until_event("configReloaded", None);
    assert!(
        w.taken(|e| e["type"] == "stopped").is_empty(),
        "{}",
        w.recent()
    );
    assert!(alive(a), "the service keeps running");
    w.signal(libc::SIGTERM);
    let st = w.wait_exit();
    assert!(
        st.success(),
        "the watcher was still there to stop: {st:?}\n{}",
        w.recent()
    );
    let _ = cli(&p, &["down"]);
}

/// Services are not part of the terminal job that started them: a Ctrl-C
/// (SIGINT to the watcher's whole process group, as a terminal sends it)
/// stops the watcher, and the services, each in its own process group,
/// keep running; a hangup (SIGHUP) of that group afterwards reaches none
/// of them either.
#[test]
fn ctrl_c_and_hangup_of_the_watchers_terminal_job_do_not_reach_the_services() {
    let p = Project::new(
        "name: wjob\nservices:\n  a:\n    start: \"exec sleep 600\"\n  b:\n    start: \"exec sleep 600\"\n",
    );
    let mut w = Watcher::start_as_job(&p.file(), &[], &[]);
    w.until_event("leadershipAcquired", None);
    let done = w.until_event("passFinished", None);
    assert_eq!(done["outcome"], "ok", "{}", w.recent());
    let (a, b) = (pid_of(&p, "a"), pid_of(&p, "b"));
    w.signal_group(libc::SIGINT);
    let st = w.wait_exit();
    assert!(st.success(), "{st:?}\n{}", w.recent());
    w.signal_group(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        alive(a) && alive(b),
        "a Ctrl-C and a hangup of the watcher's job reached its services"
    );
    let up = cli(&p, &["up"]);
    assert!(
        String::from_utf8_lossy(&up.stderr).contains("0 changed"),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let _ = cli(&p, &["down"]);
}

/// On a state in an object store the lease is a lock object that outlives
/// the process (on a file state the kernel frees the lock when the watcher
/// exits, so a missing release would not show): SIGTERM must release it,
/// not leave it to expire.
#[test]
#[cfg_attr(
    not(nk_stores),
    ignore = "SKIPPED: needs the S3, Vault and GCS test servers (eval \"$(bash scripts/state-test-servers.sh)\")"
)]
fn sigterm_releases_a_lease_kept_in_an_object_store() {
    let s = services::stores();
    let name = format!("wrel{:06x}", fastrand::u32(..0x100_0000));
    let p = Project::new(&format!(
        "name: {name}\ninfra: {{ state: \"s3://nanokit/{name}/state.json?endpoint={}&path_style=true\" }}\nservices:\n  a:\n    start: \"exec sleep 600\"\n",
        s.s3_endpoint
    ));
    let cfg = p.config();
    let lease = || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(nanokit::state::lock::inspect(&cfg))
            .unwrap()
            .1
    };
    let mut w = watch(&p, &[]);
    let held = lease().expect("the leader holds the lease");
    assert!(held.description.contains("nanokit watch"), "{held:?}");
    w.signal(libc::SIGTERM);
    let st = w.wait_exit();
    assert!(st.success(), "{st:?}\n{}", w.recent());
    assert!(lease().is_none(), "the lease is free: {:?}", lease());
    let labelled = common::labelled(&nanokit::engine::scope(&cfg).state_id);
    assert_eq!(labelled.len(), 1, "{labelled:?}");
    assert!(alive(labelled[0]), "services keep running");
    let down = cli(&p, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

#[test]
fn of_two_watchers_one_acts_and_the_standby_takes_over_when_it_is_killed() {
    let p = Project::new(
        "name: wtwo\nservices:\n  a:\n    start: \"exec sleep 600\"\n  b:\n    start: \"exec sleep 600\"\n",
    );
    let mut first = watch(&p, &[]);
    let mut second = Watcher::start(&p.file(), &[], &[]);
    let standby = second.until_event("standby", None);
    assert!(
        standby["holder"]
            .as_str()
            .unwrap()
            .contains("nanokit watch"),
        "{standby}"
    );
    let (a, b) = (pid_of(&p, "a"), pid_of(&p, "b"));
    // Only the leader acts on a death.
    kill9(a);
    first.until("a restarted", is("restarted", "a"));
    let a2 = pid_of(&p, "a");
    first.signal(libc::SIGKILL);
    first.wait_exit();
    second.until_event("leadershipAcquired", None);
    let pass = second.until_event("passFinished", None);
    assert_eq!(pass["changed"], serde_json::json!([]), "nothing to redo");
    assert!(second.taken(|e| e["type"] == "serviceExited").is_empty());
    assert_eq!((pid_of(&p, "a"), pid_of(&p, "b")), (a2, b));
    // It leads: a death is its to restore.
    kill9(b);
    second.until("b restarted", is("restarted", "b"));
    let cfg = p.config();
    let labelled = common::labelled(&nanokit::engine::scope(&cfg).state_id);
    assert_eq!(labelled.len(), 2, "one instance per service: {labelled:?}");
}

#[test]
fn a_manual_down_and_up_during_a_watch_are_handed_to_the_watcher() {
    let p = Project::new(
        "name: whand\nservices:\n  a:\n    start: \"exec sleep 600\"\n  b:\n    start: \"exec sleep 600\"\n    restart: unless-stopped\n",
    );
    let mut w = watch(&p, &["--interval", "200ms"]);
    let b = pid_of(&p, "b");
    let down = cli(&p, &["down", "b"]);
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(down.status.success(), "{err}");
    assert!(err.contains("handed to the watcher"), "{err}");
    assert!(err.contains("deleted"), "its progress is shown: {err}");
    let req = w.until_event("request", None);
    assert_eq!(req["command"], "down");
    let held = w.until("b held", is("held", "b"));
    assert!(held["reason"].as_str().unwrap().contains("nanokit down"));
    assert!(!alive(b));
    // Full checks go by; b stays down.
    let status = p.path().join(".nanokit/watch/status.json");
    full_checks(&p, 3);
    assert_eq!(
        common::labelled(&nanokit::engine::scope(&p.config()).state_id).len(),
        1
    );
    let st: Value = serde_json::from_slice(&std::fs::read(&status).unwrap()).unwrap();
    assert_eq!(st["services"]["b"]["health"], "down", "{st}");
    let text = String::from_utf8_lossy(&cli(&p, &["status"]).stdout).into_owned();
    assert!(text.contains("Watcher: pid"), "{text}");
    assert!(
        text.contains("not restarted: stopped by `nanokit down`"),
        "{text}"
    );
    // `up b` brings it back, through the watcher.
    let up = cli(&p, &["up", "b"]);
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(up.status.success(), "{err}");
    assert!(err.contains("1 changed"), "{err}");
    let b2 = pid_of(&p, "b");
    assert!(alive(b2));
    let req = w.until_event("request", None);
    assert_eq!(req["command"], "up");
    assert_eq!(req["services"], serde_json::json!(["b"]));
}

#[test]
fn a_restart_during_a_watch_is_handed_to_the_watcher_and_replaces_only_that_service() {
    let p = Project::new(
        "name: wrestart\nservices:\n  a:\n    start: \"exec sleep 600\"\n  b:\n    start: \"exec sleep 600\"\n    depends_on: [a]\n  c:\n    start: \"exec sleep 600\"\n",
    );
    let mut w = watch(&p, &[]);
    let (a, b, c) = (pid_of(&p, "a"), pid_of(&p, "b"), pid_of(&p, "c"));
    let out = cli(&p, &["restart", "a"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("handed to the watcher"), "{err}");
    let req = w.until_event("request", None);
    assert_eq!(req["command"], "restart");
    assert_eq!(req["services"], serde_json::json!(["a"]));
    w.until("a restarted", is("restarted", "a"));
    let a2 = pid_of(&p, "a");
    assert_ne!(a2, a, "a was replaced");
    assert!(!alive(a) && alive(a2));
    assert_eq!(pid_of(&p, "b"), b, "b (which depends on a) keeps its pid");
    assert_eq!(pid_of(&p, "c"), c, "c keeps its pid");
    assert!(alive(b) && alive(c));
    // The watcher counts it and goes on watching the new instance.
    let st: Value = serde_json::from_slice(
        &std::fs::read(p.path().join(".nanokit/watch/status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(st["services"]["a"]["restarts"], 1, "{st}");
    assert_eq!(st["services"]["b"]["restarts"], 0, "{st}");
    kill9(a2);
    w.until("a restored", is("restarted", "a"));
    assert_ne!(pid_of(&p, "a"), a2);
}

/// Open descriptors and threads of `pid`.
fn footprint(pid: u32) -> (usize, usize, u64) {
    let count = |d: String| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096;
    (
        count(format!("/proc/{pid}/fd")),
        count(format!("/proc/{pid}/task")),
        rss,
    )
}

#[test]
fn five_hundred_passes_keep_descriptors_threads_and_memory_flat_and_traces_capped() {
    let p = Project::new(
        r#"name: wfoot
services:
  a:
    start: "exec sleep 600"
    restart_backoff_max: 100ms
    healthcheck: { test: "true", interval: 1h }
  b:
    start: "exec sleep 600"
"#,
    );
    let mut w = watch(&p, &["--keep-traces", "20"]);
    let (mut early, mut late) = ((0, 0, 0), (0, 0, 0));
    for i in 0..500 {
        kill9(pid_of(&p, "a"));
        w.until("a restarted", is("restarted", "a"));
        w.until("pass finished", |e| e["type"] == "passFinished");
        let (fds, threads, rss) = footprint(w.pid);
        let max = |m: &mut (usize, usize, u64)| {
            *m = (m.0.max(fds), m.1.max(threads), m.2.max(rss));
        };
        match i {
            50..150 => max(&mut early),
            400..500 => max(&mut late),
            _ => {}
        }
        // Only the events of this pass are kept in memory here.
        w.seen.clear();
    }
    eprintln!("(fds, threads, rss) passes 50-150: {early:?}, 400-500: {late:?}");
    // Pooled threads (and their descriptors) come and go with timing: a
    // couple either way is not growth; a leak per pass would be hundreds.
    assert!(
        late.0 <= early.0 + 2,
        "descriptors grew: {early:?} → {late:?}"
    );
    assert!(late.1 <= early.1 + 2, "threads grew: {early:?} → {late:?}");
    assert!(
        late.2 <= early.2 + early.2 / 10,
        "memory grew more than 10%: {early:?} → {late:?}"
    );
    let traces = std::fs::read_dir(p.path().join(".nanokit/traces"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("-watch-")
        })
        .count();
    assert_eq!(traces, 20, "traces are capped at --keep-traces");
    let log = std::fs::metadata(p.path().join(".nanokit/watch/events.jsonl")).unwrap();
    assert!(log.len() <= 1 << 20);
}

/// Waits until `path` exists (the test's own hooks create them).
fn wait_file(path: &std::path::Path, w: &Watcher) {
    let by = std::time::Instant::now() + common::watcher::PATIENCE;
    while !path.exists() {
        assert!(
            std::time::Instant::now() < by,
            "no {}\n{}",
            path.display(),
            w.recent()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_leader_paused_past_its_lease_has_its_write_refused_and_nothing_is_duplicated() {
    // svc's prestart hook, once `block` exists, says which watcher runs it
    // and waits for `go`.
    let p = Project::new(
        r#"name: wfence
services:
  svc:
    start: "exec sleep 600"
    hooks:
      prestart: "echo $PPID >> hooks.log; if [ -f block ]; then touch in-hook.$PPID; while [ ! -f go ]; do sleep 0.05; done; fi"
"#,
    );
    let lease = [("NANOKIT_DEPLOY_LOCK_TTL", "3")];
    let mut a = Watcher::start(&p.file(), &[], &lease);
    a.until_event("passFinished", None);
    let mut b = Watcher::start(&p.file(), &[], &lease);
    b.until_event("standby", None);
    let epoch_a = a.seen[0]["epoch"].as_u64().unwrap();
    std::fs::write(p.path().join("block"), "").unwrap();
    let first = pid_of(&p, "svc");
    kill9(first);
    // A restarts it and is inside the hook: pause it there, past its lease.
    wait_file(&p.path().join(format!("in-hook.{}", a.pid)), &a);
    a.signal(libc::SIGSTOP);
    let took = b.until_event("leadershipAcquired", None);
    assert!(took["epoch"].as_u64().unwrap() > epoch_a, "{took}");
    // B restores svc itself (through the same hook).
    wait_file(&p.path().join(format!("in-hook.{}", b.pid)), &b);
    std::fs::write(p.path().join("go"), "").unwrap();
    b.until("svc healthy", progress("svc", "healthy"));
    b.until_event("passFinished", None);
    let by_b = pid_of(&p, "svc");
    let serial: u64 = {
        let v: Value =
            serde_json::from_slice(&std::fs::read(p.path().join(".nanokit/state.json")).unwrap())
                .unwrap();
        v["serial"].as_u64().unwrap()
    };
    // A wakes up in its pass: its next state write is refused.
    a.signal(libc::SIGCONT);
    let lost = a.until_event("leadershipLost", None);
    assert!(
        lost["reason"].as_str().unwrap().contains("refused"),
        "{lost}"
    );
    let failed = a.taken(progress("svc", "failed"));
    assert!(
        failed.iter().any(|e| e["message"]
            .as_str()
            .unwrap_or("")
            .contains("ENKSTATESTALE")
            || e["message"].as_str().unwrap_or("").contains("refused")),
        "{}",
        a.recent()
    );
    a.until_event("standby", None);
    // Nothing of A's made it: B's instance is the one recorded and running,
    // and it is the only one.
    let v: Value =
        serde_json::from_slice(&std::fs::read(p.path().join(".nanokit/state.json")).unwrap())
            .unwrap();
    assert_eq!(v["serial"].as_u64().unwrap(), serial, "A wrote nothing");
    assert_eq!(pid_of(&p, "svc"), by_b);
    assert!(alive(by_b));
    let labelled = common::labelled(&nanokit::engine::scope(&p.config()).state_id);
    assert_eq!(labelled, [by_b], "one instance");
    let hooks = std::fs::read_to_string(p.path().join("hooks.log")).unwrap();
    assert_eq!(
        hooks.lines().filter(|l| *l == a.pid.to_string()).count(),
        2,
        "A's initial start and its one restart attempt: {hooks}"
    );
}

#[test]
fn sigterm_lets_the_step_in_progress_finish_and_a_second_one_quits_at_once() {
    let p = Project::new(
        r#"name: wterm2
services:
  a:
    start: "exec sleep 600"
    hooks:
      prestart: "if [ -f block ]; then touch in-hook; while [ ! -f go ]; do sleep 0.05; done; fi"
"#,
    );
    // One SIGTERM: the hook finishes, nothing new starts, exit 0.
    let mut w = watch(&p, &[]);
    std::fs::write(p.path().join("block"), "").unwrap();
    kill9(pid_of(&p, "a"));
    wait_file(&p.path().join("in-hook"), &w);
    w.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(w.pid), "the step in progress is not cut");
    std::fs::write(p.path().join("go"), "").unwrap();
    let st = w.wait_exit();
    assert!(st.success(), "{st:?}\n{}", w.recent());
    let pass = w.taken(|e| e["type"] == "passFinished");
    assert_eq!(
        pass.last().unwrap()["outcome"],
        "cancelled",
        "{}",
        w.recent()
    );
    let restart = w
        .seen
        .iter()
        .rposition(|e| e["type"] == "passStarted")
        .unwrap();
    assert!(
        !w.seen[restart..].iter().any(progress("a", "health")),
        "nothing new started after the hook: {}",
        w.recent()
    );
    // Two SIGTERMs: it quits at once, mid-hook; the lease goes to the next
    // watcher at once (its holder's pid is gone) and state is consistent.
    std::fs::remove_file(p.path().join("go")).unwrap();
    std::fs::remove_file(p.path().join("in-hook")).unwrap();
    let mut w = Watcher::start(&p.file(), &[], &[]);
    wait_file(&p.path().join("in-hook"), &w);
    w.signal(libc::SIGTERM);
    // The second only once the first was taken up (else the kernel merges
    // the two while the first is pending, and one graceful stop waits for
    // the hook forever).
    w.wait_signal_taken(libc::SIGTERM);
    w.signal(libc::SIGTERM);
    let st = w.wait_exit();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGTERM), "{st:?}");
    std::fs::remove_file(p.path().join("block")).unwrap();
    // (The killed watcher's hook would wait for `go` forever.)
    std::fs::write(p.path().join("go"), "").unwrap();
    let next = watch(&p, &[]);
    let restored = next.taken(progress("a", "healthy"));
    assert_eq!(restored.len(), 1, "{}", next.recent());
    assert!(alive(pid_of(&p, "a")));
}

#[test]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
fn on_a_postgresql_state_a_standby_in_another_folder_takes_over_once_the_lease_expires() {
    let url = services::pg_url();
    let name = format!("wpg{:06x}", fastrand::u32(..0x100_0000));
    let yml = format!(
        "name: {name}\ninfra: {{ state: \"{url}\" }}\nservices:\n  a:\n    start: \"exec sleep 600\"\n"
    );
    let (p, q) = (Project::new(&yml), Project::new(&yml));
    let lease = [("NANOKIT_DEPLOY_LOCK_TTL", "2")];
    let mut first = Watcher::start(&p.file(), &[], &lease);
    first.until_event("passFinished", None);
    let epoch = first.seen[0]["epoch"].as_u64().unwrap();
    let mut second = Watcher::start(&q.file(), &[], &lease);
    second.until_event("standby", None);
    first.signal(libc::SIGKILL);
    first.wait_exit();
    let took = second.until_event("leadershipAcquired", None);
    assert!(took["epoch"].as_u64().unwrap() > epoch, "{took}");
    let pass = second.until_event("passFinished", None);
    assert_eq!(
        pass["changed"],
        serde_json::json!([]),
        "adopted, not redone"
    );
    let labelled = common::labelled(&nanokit::engine::scope(&q.config()).state_id);
    assert_eq!(labelled.len(), 1, "{labelled:?}");
    kill9(labelled[0]);
    second.until("a restarted", is("restarted", "a"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_engine_api_stops_or_kills_and_frees_the_lease_in_a_process_that_goes_on() {
    use nanokit::engine::watch::{self, status::WatchEvent, WatchOptions};
    use std::sync::Arc;
    let p = Project::new("name: wapi\nservices:\n  a:\n    start: \"exec sleep 600\"\n");
    let held = |p: &Project| {
        nanokit::lock::inspect(&lock_file(p), nanokit::lock::DEFAULT_STALE)
            .unwrap()
            .is_some()
    };
    for kill in [false, true] {
        let file = p.file();
        let mut opts = WatchOptions::new(Arc::new(move || {
            nanokit::config::load(&nanokit::config::LoadOptions::new(file.clone()))
        }));
        let (stop, now) = (opts.run.cancel.clone(), opts.kill.clone());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        opts.on_event = Some(Arc::new(move |r| {
            let _ = tx.send(r.event.clone());
        }));
        let run = tokio::spawn(watch::watch(opts));
        while let Some(e) = rx.recv().await {
            if matches!(e, WatchEvent::PassFinished { .. }) {
                break;
            }
        }
        assert!(held(&p), "the leader holds the lease");
        if kill {
            now.cancel();
        } else {
            stop.cancel();
        }
        let end = run.await.unwrap().unwrap();
        assert_eq!(end.reason, if kill { "killed" } else { "stopped" });
        assert!(!held(&p), "the lease is free while this process goes on");
        assert!(alive(pid_of(&p, "a")), "services keep running");
        let status: Value = serde_json::from_slice(
            &std::fs::read(p.path().join(".nanokit/watch/status.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(status["role"], "stopped");
    }
}
