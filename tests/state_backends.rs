//! The guarantees every state backend gives (src/state/backend.rs), checked
//! the same way on each one, with real processes (this test binary re-run
//! as a child, see `state_child`) and real stores:
//! - a write on an older version is `ENKSTATESTALE` and writes nothing;
//! - the deploy lock names its holder, hands out a greater epoch at every
//!   acquisition (also after `infra unlock`), and is taken over only once
//!   its holder stopped renewing it for its TTL;
//! - many runs at once deploy one at a time, with serials strictly
//!   increasing and no write lost;
//! - a writer paused (SIGSTOP) past its lock gets `ENKSTATESTALE` on resume
//!   and overwrites nothing.
//!
//! The file backend always runs; PostgreSQL needs `NANOKIT_TEST_PG_URL`
//! (without it, outside CI, its cases are *ignored* with a `SKIPPED:`
//! reason; in CI a missing server fails them, tests/services/mod.rs).

mod services;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nanokit::config::{self, Config, LoadOptions};
use nanokit::error::ErrorCode;
use nanokit::state::backend::{Holder, LockRequest};
use nanokit::state::{self, Location, Resource, State, Status, Store};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Pg,
    S3,
    Gcs,
    Vault,
}

/// The `infra.state` of a fresh state of `kind` named `name` (in `dir` for
/// a file), and its store reached through `via` (`host:port`) instead of
/// the test server when given.
fn state_url(kind: Kind, dir: &Path, name: &str, via: Option<&str>) -> String {
    match kind {
        Kind::File => dir.join("state.json").display().to_string(),
        Kind::Pg => services::pg_url(),
        Kind::S3 => {
            let s = services::stores();
            let endpoint = via.map_or(s.s3_endpoint.clone(), |v| format!("http://{v}"));
            format!("s3://nanokit/{name}/state.json?endpoint={endpoint}&path_style=true")
        }
        Kind::Gcs => {
            services::stores();
            format!("gs://nanokit/{name}/state.json")
        }
        Kind::Vault => {
            let s = services::stores();
            let host = via.map_or_else(
                || s.vault_addr.trim_start_matches("http://").to_string(),
                str::to_string,
            );
            format!("vault://{host}/secret/{name}/state")
        }
    }
}

/// One project whose state lives in a backend of `kind`: its nanokit.yml in
/// a temp dir shared by the child processes.
struct Case {
    dir: tempfile::TempDir,
    name: String,
}

impl Case {
    fn new(kind: Kind) -> Case {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("sb{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let state = state_url(kind, dir.path(), &name, None);
        std::fs::write(
            dir.path().join("nanokit.yml"),
            format!(
                "name: {name}\ninfra:\n  state: \"{state}\"\nservices:\n  a:\n    start: \"exec sleep 600\"\n"
            ),
        )
        .unwrap();
        Case { dir, name }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn config(&self) -> Config {
        config_at(self.path())
    }

    fn location(&self) -> Location {
        Location::of(&self.config())
    }

    async fn backend(&self) -> Arc<dyn state::Backend> {
        state::open(&self.location()).await.unwrap()
    }

    async fn store(&self) -> Store {
        Store::open(self.backend().await, &self.name, "local")
            .await
            .unwrap()
    }

    /// The stored state (a fresh one when none).
    async fn stored(&self) -> State {
        self.store().await.state().clone()
    }

    /// Starts a child in `mode` in directory `dir`, with extra environment.
    fn child_in(&self, mode: &str, dir: &Path, env: &[(&str, &str)]) -> Child {
        let mut child = self.command(mode, 0, env);
        child.current_dir(dir);
        child.spawn().unwrap()
    }

    /// Starts a child in `mode`, with extra environment.
    fn child(&self, mode: &str, id: usize, env: &[(&str, &str)]) -> Child {
        self.command(mode, id, env).spawn().unwrap()
    }

    fn command(&self, mode: &str, id: usize, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "state_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .current_dir(self.path())
        .env("NK_SB_MODE", mode)
        .env("NK_SB_DIR", self.path())
        .env("NK_SB_ID", id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in env {
            // An empty value: not set at all.
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        cmd
    }
}

fn config_at(dir: &Path) -> Config {
    config::load(&LoadOptions {
        file: dir.join("nanokit.yml"),
        env: "local".into(),
        vars: Some(Default::default()),
    })
    .unwrap()
}

fn resource(note: &str) -> Resource {
    Resource {
        provider: "test".into(),
        provider_id: Some(note.into()),
        instances: Vec::new(),
        config_hash: String::new(),
        fields: Default::default(),
        depends_on: Vec::new(),
        status: Status::Healthy,
        error: None,
        created_at: state::now(),
        updated_at: state::now(),
    }
}

/// Reads a child's stdout lines until one starts with `prefix`; returns the
/// rest of it.
fn wait_line(lines: &mut impl Iterator<Item = std::io::Result<String>>, prefix: &str) -> String {
    for l in lines.by_ref() {
        let l = l.unwrap();
        // The test harness may have written `test state_child ... ` first.
        if let Some(i) = l.find(prefix) {
            return l[i + prefix.len()..].trim().to_string();
        }
    }
    panic!("the child ended before printing {prefix}");
}

fn finish(child: Child) -> (Value, String) {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let text = format!(
        "exit {:?}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    let result = stdout
        .lines()
        .find_map(|l| l.find("RESULT ").map(|i| &l[i + 7..]))
        .unwrap_or_else(|| panic!("no RESULT line:\n{text}"));
    (serde_json::from_str(result).unwrap(), text)
}

/// Waits for a `cli` child; it must exit 0.
fn finish_ok(child: Child) {
    let (r, text) = finish(child);
    assert_eq!(r["exit"], 0, "{text}");
}

fn holder(label: &str) -> Holder {
    Holder::this_run(label)
}

// ---------------------------------------------------------------- cases

/// Two readers of one version: the first write wins, the second is
/// `ENKSTATESTALE` and writes nothing, and so is every later write of it.
async fn compare_and_swap(kind: Kind) {
    let c = Case::new(kind);
    let mut a = c.store().await;
    a.update(|s| {
        s.resources.insert("first".into(), resource("a1"));
    })
    .await
    .unwrap();
    let mut a = c.store().await;
    let mut b = c.store().await;
    assert_eq!(a.state().serial, 1);
    a.update(|s| {
        s.resources.insert("a".into(), resource("a2"));
    })
    .await
    .unwrap();
    let e = b
        .update(|s| {
            s.resources.insert("b".into(), resource("b2"));
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ENKSTATESTALE", "{e}");
    assert!(e.to_string().contains("nothing was written"), "{e}");
    let now = c.stored().await;
    assert_eq!(now.serial, 2);
    assert!(now.resources.contains_key("a") && !now.resources.contains_key("b"));
    // Every later write of the stale store fails too.
    assert_eq!(b.update(|_| {}).await.unwrap_err().code(), "ENKSTATESTALE");
    // A first write where a state exists is stale too.
    let mut fresh = c.store().await;
    let e = {
        let backend = c.backend().await;
        let meta = state::WriteMeta {
            serial: 1,
            lineage: &now.lineage,
            epoch: 0,
            writer: "test",
        };
        backend.write(b"{}", None, &meta).await.unwrap_err()
    };
    assert_eq!(
        e.code(),
        "ENKSTATESTALE",
        "a first write where one exists: {e}"
    );
    fresh.update(|_| {}).await.unwrap();
    assert_eq!(c.stored().await.serial, 3);
}

/// The lock names its holder; epochs grow at every acquisition, also after
/// `infra unlock`; a released lock is not "taken over".
async fn lock_epochs_and_holder(kind: Kind) {
    let c = Case::new(kind);
    let cancel = CancellationToken::new();
    let ttl = Duration::from_secs(60);
    let a = c.backend().await;
    let ha = holder("nanokit up (job a)");
    let ga = a
        .lock(&LockRequest {
            holder: &ha,
            ttl,
            wait: Duration::ZERO,
            cancel: &cancel,
        })
        .await
        .unwrap();
    assert!(!ga.took_over, "a free lock is not taken over");
    assert!(ga.epoch >= 1);
    let b = c.backend().await;
    let hb = holder("nanokit up (job b)");
    let t0 = Instant::now();
    let e = b
        .lock(&LockRequest {
            holder: &hb,
            ttl,
            wait: Duration::from_millis(300),
            cancel: &cancel,
        })
        .await
        .unwrap_err();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(e.code(), "ENKLOCKED", "{e}");
    assert!(
        e.to_string().contains("job a") && e.to_string().contains("infra unlock"),
        "{e}"
    );
    let seen = b.lock_info().await.unwrap().expect("held");
    assert!(seen.description.contains("job a"), "{seen:?}");
    assert_eq!(seen.epoch, ga.epoch);
    // infra unlock: cleared, the epoch kept.
    let cleared = b.force_unlock().await.unwrap().expect("it was held");
    assert!(cleared.description.contains("job a"));
    assert!(b.lock_info().await.unwrap().is_none());
    let gb = b
        .lock(&LockRequest {
            holder: &hb,
            ttl,
            wait: Duration::ZERO,
            cancel: &cancel,
        })
        .await
        .unwrap();
    assert!(gb.epoch > ga.epoch, "{} > {}", gb.epoch, ga.epoch);
    // a's lock is gone: its release says so.
    assert!(a.unlock().await.is_err(), "a's lock was cleared");
    b.unlock().await.unwrap();
    let c2 = c.backend().await;
    let gc = c2
        .lock(&LockRequest {
            holder: &holder("c"),
            ttl,
            wait: Duration::ZERO,
            cancel: &cancel,
        })
        .await
        .unwrap();
    assert!(!gc.took_over, "b released it");
    assert!(gc.epoch > gb.epoch);
    c2.unlock().await.unwrap();
}

/// A state that has seen a higher epoch refuses a lower one, and a store
/// fenced by an older lock gets `ENKSTATESTALE` naming both epochs.
async fn a_lower_epoch_is_refused(kind: Kind) {
    let c = Case::new(kind);
    let cfg = c.config();
    let cancel = CancellationToken::new();
    let (l1, mut s1) = state::lock::lock_state(&cfg, "first", None, &cancel)
        .await
        .unwrap();
    s1.update(|s| {
        s.resources.insert("one".into(), resource("1"));
    })
    .await
    .unwrap();
    let e1 = l1.epoch();
    assert_eq!(s1.state().epoch, e1);
    l1.release().await.unwrap();
    let (l2, mut s2) = state::lock::lock_state(&cfg, "second", None, &cancel)
        .await
        .unwrap();
    assert!(l2.epoch() > e1);
    s2.update(|s| {
        s.resources.insert("two".into(), resource("2"));
    })
    .await
    .unwrap();
    l2.release().await.unwrap();
    // The first run, still holding its store, writes again.
    let e = s1.update(|s| s.resources.clear()).await.unwrap_err();
    assert_eq!(e.code(), "ENKSTATESTALE", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("epoch {e1}")) && msg.contains("another run"),
        "{msg}"
    );
    let now = c.stored().await;
    assert!(now.resources.contains_key("two") && now.resources.contains_key("one"));
    // Nor does it get through by reading the state again (the version is
    // then current: only the epoch stops it).
    let mut again = c.store().await;
    let e = again.fence(e1, &holder("first-again")).unwrap_err();
    assert_eq!(e.code(), "ENKSTATESTALE", "{e}");
    let e = again.update(|s| s.resources.clear()).await.unwrap_err();
    assert_eq!(e.code(), "ENKSTATESTALE", "{e}");
    assert_eq!(c.stored().await, now, "nothing was overwritten");
    if kind == Kind::Pg {
        // The database itself refuses it, whatever the client checked.
        let b = c.backend().await;
        let cur = b.read().await.unwrap().unwrap();
        let meta = state::WriteMeta {
            serial: now.serial + 1,
            lineage: &now.lineage,
            epoch: e1,
            writer: "first-again",
        };
        let e = b.write(b"{}", Some(&cur.version), &meta).await.unwrap_err();
        assert_eq!(e.code(), "ENKSTATESTALE", "{e}");
        assert_eq!(c.stored().await, now, "nothing was overwritten");
    }
}

/// `n` runs at once, each taking the deploy lock (the engine's
/// `lock_state`), writing `writes` times and releasing: never two inside at
/// once, every write kept, serials strictly increasing.
async fn many_runs_at_once(kind: Kind, n: usize, writes: usize) {
    let c = Case::new(kind);
    let kids: Vec<Child> = (0..n)
        .map(|i| c.child("deploy", i, &[("NK_SB_WRITES", &writes.to_string())]))
        .collect();
    let mut serials = Vec::new();
    let mut windows = Vec::new();
    let mut epochs = Vec::new();
    for k in kids {
        let (r, _) = finish(k);
        let s: Vec<u64> = serde_json::from_value(r["serials"].clone()).unwrap();
        assert_eq!(s.len(), writes);
        assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
        windows.push((s[0], *s.last().unwrap()));
        serials.extend(s);
        epochs.push(r["epoch"].as_u64().unwrap());
    }
    // One deploy at a time: the runs' serial ranges do not interleave.
    windows.sort();
    assert!(
        windows.windows(2).all(|w| w[0].1 < w[1].0),
        "interleaved runs: {windows:?}"
    );
    serials.sort();
    let before = serials.len();
    serials.dedup();
    assert_eq!(serials.len(), before, "a serial was written twice");
    epochs.sort();
    epochs.dedup();
    assert_eq!(epochs.len(), n, "every acquisition has its own epoch");
    let st = c.stored().await;
    assert_eq!(st.resources.len(), n * writes, "no write lost");
    assert_eq!(st.serial, (n * writes) as u64);
    assert!(!c.path().join("inside").exists());
}

/// 16 `nanokit up` processes of one project at once, each from its own
/// directory with its own value of one variable (so each one updates the
/// service): one deploy at a time (the hooks of one run never interleave
/// with another's), every run's writes kept (the serial grows by exactly
/// what 16 updates write), and the last deploy is what runs.
async fn sixteen_ups_at_once(kind: Kind) {
    let c = Case::new(kind);
    let log = c.path().join("deploys.log");
    let state = state_url(kind, c.path(), &c.name, None);
    let dirs: Vec<tempfile::TempDir> = (0..18).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, d) in dirs.iter().enumerate() {
        std::fs::write(
            d.path().join("nanokit.yml"),
            format!(
                "name: {name}\ninfra:\n  state: \"{state}\"\nservices:\n  a:\n    start: \"exec sleep 600\"\n    env: {{ RUN: \"{i}\" }}\n    hooks:\n      prestart: \"echo begin {i} >> {log}\"\n      poststart: \"echo end {i} >> {log}\"\n",
                name = c.name,
                log = log.display()
            ),
        )
        .unwrap();
    }
    let up = |i: usize| {
        let args = json!([
            "up",
            "-f",
            dirs[i].path().join("nanokit.yml"),
            "--lock-timeout",
            "300"
        ]);
        c.child_in("cli", dirs[i].path(), &[("NK_SB_ARGS", &args.to_string())])
    };
    let serial = || async { direct_state(kind, &c).await.serial };
    // The first run creates; the second updates: what one update writes.
    finish_ok(up(16));
    let s0 = serial().await;
    finish_ok(up(17));
    let per_update = serial().await - s0;
    assert!(per_update > 0);
    let s1 = serial().await;
    let kids: Vec<Child> = (0..16).map(up).collect();
    for k in kids {
        finish_ok(k);
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().skip(4).collect();
    assert_eq!(lines.len(), 32, "{text}");
    for pair in lines.chunks(2) {
        let (b, e) = (pair[0], pair[1]);
        assert!(
            b.starts_with("begin ") && e == b.replace("begin", "end"),
            "deploys interleaved: {text}"
        );
    }
    let end = direct_state(kind, &c).await;
    assert_eq!(end.serial, s1 + 16 * per_update, "a write was lost");
    let last = lines.last().unwrap().trim_start_matches("end ");
    let id = end.resources["a"].provider_id.clone().unwrap();
    let pid = id.split('@').next().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|kv| kv == format!("RUN={last}").as_bytes()),
        "the last deploy ({last}) runs"
    );
    let args = json!(["down", "-f", dirs[0].path().join("nanokit.yml")]);
    finish_ok(c.child_in("cli", dirs[0].path(), &[("NK_SB_ARGS", &args.to_string())]));
}

/// The stored state of `c` (read directly, a fresh one when none).
async fn direct_state(kind: Kind, c: &Case) -> State {
    let loc = match kind {
        Kind::File | Kind::Pg => c.location(),
        _ => Location::Url(state_url(kind, c.path(), &c.name, None)),
    };
    Store::open(state::open(&loc).await.unwrap(), &c.name, "local")
        .await
        .unwrap()
        .state()
        .clone()
}

/// A holder paused (SIGSTOP) past its lock's TTL: another run takes the
/// lock over (and writes, or has nothing to write); resumed, the paused
/// one's write is `ENKSTATESTALE` naming both epochs, and nothing of the new
/// holder's is overwritten.
/// A holder whose lock was taken over (it stopped renewing past its TTL)
/// learns it at its next renewal, and its release leaves the taker's lock
/// held.
async fn a_taken_over_holder_cannot_renew(kind: Kind) {
    let c = Case::new(kind);
    let cancel = CancellationToken::new();
    let short = Duration::from_millis(500);
    let a = c.backend().await;
    let ga = a
        .lock(&LockRequest {
            holder: &holder("nanokit up (job paused)"),
            ttl: short,
            wait: Duration::ZERO,
            cancel: &cancel,
        })
        .await
        .unwrap();
    let b = c.backend().await;
    let gb = b
        .lock(&LockRequest {
            holder: &holder("nanokit up (job taker)"),
            ttl: Duration::from_secs(60),
            wait: Duration::from_secs(30),
            cancel: &cancel,
        })
        .await
        .unwrap();
    assert!(gb.took_over, "taken over after the TTL");
    assert!(gb.epoch > ga.epoch, "{} > {}", gb.epoch, ga.epoch);
    assert!(
        !a.renew(short).await.unwrap(),
        "the old holder renewed a lock that was taken over"
    );
    let _ = a.unlock().await;
    let seen = c.backend().await.lock_info().await.unwrap();
    assert!(
        seen.as_ref()
            .is_some_and(|v| v.description.contains("job taker")),
        "the taker still holds it: {seen:?}"
    );
    b.unlock().await.unwrap();
    assert!(c.backend().await.lock_info().await.unwrap().is_none());
}

async fn a_paused_writer_is_refused_on_resume(kind: Kind, taker_writes: bool) {
    let c = Case::new(kind);
    let ttl = "1";
    let mut old = c.child("hold", 0, &[("NANOKIT_DEPLOY_LOCK_TTL", ttl)]);
    let mut lines = BufReader::new(old.stdout.take().unwrap()).lines();
    let locked: Value = serde_json::from_str(&wait_line(&mut lines, "LOCKED ")).unwrap();
    let old_epoch = locked["epoch"].as_u64().unwrap();
    let pid = old.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // Well past the TTL.
    std::thread::sleep(Duration::from_millis(1500));
    let writes = if taker_writes { "1" } else { "0" };
    let (took, _) = finish(c.child(
        "take",
        1,
        &[("NANOKIT_DEPLOY_LOCK_TTL", ttl), ("NK_SB_WRITES", writes)],
    ));
    assert_eq!(took["tookOver"], true, "{took}");
    let new_epoch = took["epoch"].as_u64().unwrap();
    assert!(new_epoch > old_epoch);
    let after_take = c.stored().await;
    assert_eq!(after_take.resources.contains_key("taker"), taker_writes);
    std::fs::write(c.path().join("go"), "").unwrap();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = old.wait().unwrap();
    assert!(status.success(), "{rest:?}");
    let result: Value = rest
        .iter()
        .find_map(|l| l.find("RESULT ").map(|i| &l[i + 7..]))
        .map(|r| serde_json::from_str(r).unwrap())
        .unwrap_or_else(|| panic!("no RESULT: {rest:?}"));
    assert_eq!(result["code"], "ENKSTATESTALE", "{result}");
    let msg = result["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("epoch {old_epoch}")) && msg.contains(&new_epoch.to_string()),
        "names both epochs: {msg}"
    );
    let end = c.stored().await;
    assert_eq!(end, after_take, "nothing was overwritten");
    assert!(!end.resources.contains_key("stale"));
}

/// Whether process `pid` is stopped (state `T` in /proc).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

/// The file backend's residual window: a writer stopped (SIGSTOP) after its
/// check and before its rename holds off the takeover instead of
/// overwriting its successor: nobody takes the lock while it is stopped,
/// and once resumed its write lands and the next run sees it.
#[tokio::test(flavor = "multi_thread")]
async fn file_a_writer_stopped_inside_its_commit_holds_off_the_takeover() {
    let c = Case::new(Kind::File);
    let pause = c.path().join("pause");
    let pause_s = pause.display().to_string();
    let mut old = c.child(
        "hold",
        0,
        &[
            ("NANOKIT_DEPLOY_LOCK_TTL", "1"),
            ("NANOKIT_TEST_STOP_IN_COMMIT", pause_s.as_str()),
        ],
    );
    let mut lines = BufReader::new(old.stdout.take().unwrap()).lines();
    wait_line(&mut lines, "LOCKED ");
    std::fs::write(&pause, "").unwrap();
    std::fs::write(c.path().join("go"), "").unwrap();
    let t0 = Instant::now();
    while !stopped(old.id()) {
        assert!(t0.elapsed() < Duration::from_secs(20), "never stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!pause.exists(), "stopped in its commit");
    // Well past its TTL, a taker cannot get the lock while it is stopped.
    let b = c.backend().await;
    let cancel = CancellationToken::new();
    let hb = holder("taker");
    let e = b
        .lock(&LockRequest {
            holder: &hb,
            ttl: Duration::from_secs(1),
            wait: Duration::from_secs(3),
            cancel: &cancel,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ENKLOCKED", "{e}");
    unsafe { libc::kill(old.id() as i32, libc::SIGCONT) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(old.wait().unwrap().success(), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains(r#"RESULT {"code":null}"#)),
        "the resumed write lands: {rest:?}"
    );
    let (took, _) = finish(c.child("take", 1, &[("NANOKIT_DEPLOY_LOCK_TTL", "1")]));
    let st = c.stored().await;
    assert!(
        st.resources.contains_key("stale") && st.resources.contains_key("taker"),
        "the next run saw the resumed write and kept it: {st:?} {took}"
    );
}

/// A holder killed (SIGKILL) on "another host": its lock is taken over once
/// it has not been renewed for the TTL, and not before.
async fn a_killed_holder_is_taken_over_after_the_ttl(kind: Kind) {
    let c = Case::new(kind);
    let ttl = Duration::from_secs(3);
    let ttl_s = ttl.as_secs().to_string();
    let mut held = c.child(
        "hold",
        0,
        &[
            ("NANOKIT_DEPLOY_LOCK_TTL", ttl_s.as_str()),
            // Another machine: its pid cannot be checked from here.
            ("NANOKIT_HOST_ID", "some-other-host"),
        ],
    );
    let mut lines = BufReader::new(held.stdout.take().unwrap()).lines();
    wait_line(&mut lines, "LOCKED ");
    // Let it renew once or twice, then kill it.
    std::thread::sleep(Duration::from_millis(1200));
    unsafe { libc::kill(held.id() as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let _ = held.wait();
    let b = c.backend().await;
    let cancel = CancellationToken::new();
    let hb = holder("taker");
    let req = |wait| LockRequest {
        holder: &hb,
        ttl,
        wait,
        cancel: &cancel,
    };
    let e = b.lock(&req(Duration::ZERO)).await.unwrap_err();
    assert_eq!(e.code(), "ENKLOCKED", "just killed, still held: {e}");
    let grant = b.lock(&req(ttl * 3)).await.unwrap();
    let after = killed.elapsed();
    assert!(grant.took_over);
    // The last renewal came at most a third of the TTL before the kill.
    assert!(
        after >= ttl * 2 / 3 - Duration::from_millis(100),
        "taken over {after:?} after the kill, before the TTL of {ttl:?}"
    );
    assert!(after <= ttl + Duration::from_secs(2), "took {after:?}");
    b.unlock().await.unwrap();
}

/// A case whose store is reached through a proxy in `mode`, and the
/// environment a child needs to reach it so.
fn via_proxy(kind: Kind, mode: proxy::Mode) -> (Case, proxy::Proxy, Vec<(&'static str, String)>) {
    let s = services::stores();
    let upstream = match kind {
        Kind::S3 => s.s3_endpoint.trim_start_matches("http://").to_string(),
        Kind::Gcs => s.gcs_host.clone(),
        Kind::Vault => s.vault_addr.trim_start_matches("http://").to_string(),
        _ => unreachable!("object stores only"),
    };
    let proxy = proxy::Proxy::start(&upstream, mode);
    let c = Case::new(kind);
    let via = proxy.addr();
    std::fs::write(
        c.path().join("nanokit.yml"),
        format!(
            "name: {}\ninfra:\n  state: \"{}\"\nservices:\n  a:\n    start: \"exec sleep 600\"\n",
            c.name,
            state_url(kind, c.path(), &c.name, Some(&via))
        ),
    )
    .unwrap();
    let env = match kind {
        Kind::Gcs => vec![("STORAGE_EMULATOR_HOST", via)],
        Kind::Vault => vec![("VAULT_ADDR", format!("http://{via}"))],
        _ => vec![],
    };
    (c, proxy, env)
}

/// The backend of `c`'s state reached directly (not through its proxy).
async fn direct(kind: Kind, c: &Case) -> Arc<dyn state::Backend> {
    let loc = Location::Url(state_url(kind, c.path(), &c.name, None));
    state::open(&loc).await.unwrap()
}

/// A store that ignores preconditions (here: the test server behind a proxy
/// that strips them: `If-Match`/`If-None-Match`, `ifGenerationMatch`, KV
/// `options.cas`) is refused with `ENKSTATEBACKEND` before anything is
/// locked or written, although the same store reached directly passed the
/// probe just before and is remembered as good (in the same cache): a
/// verdict on one endpoint does not vouch for another.
async fn a_store_that_ignores_preconditions_is_refused(kind: Kind) {
    let cache = tempfile::tempdir().unwrap();
    let cache_env = cache.path().display().to_string();
    // The same store, reached directly, is used (and remembered).
    let direct_case = Case::new(kind);
    let (r, text) = finish(direct_case.child("probe", 0, &[("XDG_CACHE_HOME", &cache_env)]));
    assert_eq!(r["code"], Value::Null, "{text}");
    assert_eq!(probe_slots(cache.path()).len(), 1, "the pass is remembered");
    let (c, proxy, env) = via_proxy(kind, proxy::Mode::Strip);
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("XDG_CACHE_HOME", &cache_env));
    let (r, text) = finish(c.child("probe", 0, &env));
    assert_eq!(r["code"], "ENKSTATEBACKEND", "{text}");
    let msg = r["message"].as_str().unwrap();
    assert!(msg.contains("ignores preconditions"), "{msg}");
    assert!(proxy.count() > 0, "the proxy stripped nothing");
    let b = direct(kind, &c).await;
    assert!(
        b.read().await.unwrap().is_none() && b.lock_info().await.unwrap().is_none(),
        "nothing was written through the stripping proxy"
    );
    // A refusal is not remembered as a pass.
    assert_eq!(probe_slots(cache.path()).len(), 1);
    let (r, text) = finish(c.child("probe", 0, &env));
    assert_eq!(r["code"], "ENKSTATEBACKEND", "refused again: {text}");
}

/// The remembered probes in the cache folder `cache` (`XDG_CACHE_HOME`).
fn probe_slots(cache: &Path) -> Vec<PathBuf> {
    let dir = cache.join("nanokit").join("state-locks");
    let mut slots: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("probe-"))
                })
                .collect()
        })
        .unwrap_or_default();
    slots.sort();
    slots
}

/// A remembered probe slot holding `payload` (its checksum, a space, the
/// payload, padded to 1024 bytes), as nanokit writes it.
fn probe_slot(payload: &str) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut slot = hex::encode(Sha256::digest(payload.as_bytes())).into_bytes();
    slot.push(b' ');
    slot.extend_from_slice(payload.as_bytes());
    slot.resize(1024, b' ');
    slot
}

/// The precondition probe is made once per store, not once per process: a
/// second process using the same store makes no probe request; a remembered
/// pass that is torn, expired, dated in the future, another store's, or a
/// file another user could have written is not trusted (the store is probed
/// again, and the slot rewritten as this user's alone).
async fn the_probe_is_remembered_per_store(kind: Kind) {
    use std::os::unix::fs::PermissionsExt as _;
    let cache = tempfile::tempdir().unwrap();
    let cache_env = cache.path().display().to_string();
    let (c, proxy, env) = via_proxy(kind, proxy::Mode::Record);
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("XDG_CACHE_HOME", &cache_env));
    // The probe requests one process makes (requests naming its scratch
    // object).
    let run = |what: &str| {
        let before = proxy.probes();
        let (r, text) = finish(c.child("probe", 0, &env));
        assert_eq!(r["code"], Value::Null, "{what}: {text}");
        proxy.probes() - before
    };
    assert!(run("first use") >= 4, "the first process probes");
    let slots = probe_slots(cache.path());
    assert_eq!(slots.len(), 1, "{slots:?}");
    let slot = &slots[0];
    let mode = std::fs::metadata(slot).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the slot is this user's alone");
    assert_eq!(run("second process"), 0, "a second process probed again");
    assert_eq!(run("third process"), 0, "a third process probed again");
    let good = std::fs::read(slot).unwrap();
    let text = String::from_utf8_lossy(&good).to_string();
    let payload: Value = serde_json::from_str(text.split_once(' ').unwrap().1.trim()).unwrap();
    let store = payload["store"].as_str().unwrap().to_string();
    let at = payload["passed_at_ms"].as_i64().unwrap();
    let day = 24 * 3600 * 1000;
    // Each bad slot makes the next process probe, and leaves a good slot.
    // Torn: a digit of the time changed (still a pass of this store, within
    // the day, as JSON): only the checksum tells.
    let mut torn = good.clone();
    let at_text = at.to_string();
    let last_digit = text.find(&at_text).unwrap() + at_text.len() - 1;
    torn[last_digit] = if torn[last_digit] == b'0' { b'1' } else { b'0' };
    let planted: Vec<(&str, Vec<u8>)> = vec![
        ("a torn slot", torn),
        ("an empty slot", Vec::new()),
        (
            "an expired pass",
            probe_slot(&json!({"store": store, "passed_at_ms": at - day - 1}).to_string()),
        ),
        (
            "a pass dated in the future",
            probe_slot(&json!({"store": store, "passed_at_ms": at + day}).to_string()),
        ),
        (
            "another store's pass",
            probe_slot(&json!({"store": format!("{store}x"), "passed_at_ms": at}).to_string()),
        ),
        ("a slot writable by others", good.clone()),
    ];
    for (what, bytes) in planted {
        std::fs::write(slot, &bytes).unwrap();
        let mode = if what.contains("writable") {
            0o666
        } else {
            0o600
        };
        std::fs::set_permissions(slot, std::fs::Permissions::from_mode(mode)).unwrap();
        assert!(run(what) >= 4, "{what}: trusted, not probed again");
        assert_eq!(run(what), 0, "{what}: the new pass is not remembered");
    }
    // A slot of another user (root can make one): not trusted.
    if rustix::process::geteuid().is_root() {
        std::fs::write(slot, &good).unwrap();
        std::os::unix::fs::chown(slot, Some(65534), Some(65534)).unwrap();
        assert!(
            run("another user's slot") >= 4,
            "another user's slot trusted"
        );
        assert_eq!(run("another user's slot"), 0);
    }
}

/// The pid of the recorded instance of `service` in `state`.
fn pid_in(state: &State, service: &str) -> i32 {
    let id = state.resources[service].provider_id.clone().unwrap();
    id.split('@').next().unwrap().parse().unwrap()
}

/// Whether `pid` is a process that has not exited.
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// An `up` observes the world before taking the lock when the lock then
/// proves that nobody held it since (this user released the last epoch and
/// takes the next): the lock is held for planning and applying alone. When
/// someone else held the lock meanwhile (here: a deploy that stopped `a`
/// while this run waited), the world is observed again under the lock, and
/// what that deploy did is seen: `a` is started again, not taken for
/// running.
async fn a_deploy_made_while_waiting_for_the_lock_is_seen(kind: Kind) {
    let (c, proxy, env) = via_proxy(kind, proxy::Mode::Record);
    let up = || {
        let args = json!([
            "up",
            "-f",
            c.path().join("nanokit.yml"),
            "--lock-timeout",
            "60"
        ]);
        let mut e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let args = args.to_string();
        e.push(("NK_SB_ARGS", &args));
        c.child("cli", 0, &e)
    };
    finish_ok(up());
    // Uncontended: the observation was made before the lock was taken.
    finish_ok(up());
    let traces = c.path().join(".nanokit").join("traces");
    let newest = || -> Value {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&traces)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        serde_json::from_slice(&std::fs::read(files.last().unwrap()).unwrap()).unwrap()
    };
    let t = newest();
    let span = |name: &str| {
        t["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} span in {t}"))
    };
    assert!(
        span("observe")["end_unix_nano"].as_u64()
            <= span("deploy_lock")["start_unix_nano"].as_u64(),
        "observed under the lock: {t}"
    );
    let a = pid_in(&direct_state(kind, &c).await, "a");
    assert!(running(a));

    // Another deploy holds the lock; this run starts, observes `a`
    // running, and waits (it has listed the held lock's folder).
    let other = direct(kind, &c).await;
    let cancel = CancellationToken::new();
    other
        .lock(&LockRequest {
            holder: &holder("another deploy"),
            ttl: Duration::from_secs(60),
            wait: Duration::ZERO,
            cancel: &cancel,
        })
        .await
        .unwrap();
    let before = proxy.heads().len();
    let child = up();
    let t0 = Instant::now();
    while proxy.heads()[before..]
        .iter()
        .filter(|h| h.contains("nklock"))
        .count()
        < 2
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the run never looked at the lock: {:?}",
            &proxy.heads()[before..]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // That deploy stops `a`, then releases the lock.
    unsafe { libc::kill(a, libc::SIGKILL) };
    while running(a) {
        assert!(t0.elapsed() < Duration::from_secs(30), "{a} did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    other.unlock().await.unwrap();
    finish_ok(child);
    let after = pid_in(&direct_state(kind, &c).await, "a");
    assert_ne!(
        after, a,
        "a was taken for running: the run planned from what it saw before the lock"
    );
    assert!(running(after), "a is not running");
    let args = json!(["down", "-f", c.path().join("nanokit.yml")]).to_string();
    let mut e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    e.push(("NK_SB_ARGS", &args));
    finish_ok(c.child("cli", 0, &e));
}

/// The answer to a lock release is lost (the release landed; the client
/// retries and gets 412 against its own lock, opentofu#4405): the run
/// recognises its release by its run id, reports success, and the lock is
/// free, not left behind.
async fn a_release_whose_answer_is_lost_is_recognised(kind: Kind) {
    let (c, proxy, env) = via_proxy(kind, proxy::Mode::LoseRelease);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (r, text) = finish(c.child("probe", 0, &env));
    assert_eq!(r["code"], Value::Null, "{text}");
    assert_eq!(proxy.count(), 1, "one release answer lost: {text}");
    let b = direct(kind, &c).await;
    assert!(b.lock_info().await.unwrap().is_none(), "the lock is free");
    assert_eq!(
        state::decode(&b.read().await.unwrap().unwrap().bytes, "", &c.name)
            .unwrap()
            .serial,
        1
    );
}

// ------------------------------------------------ history, push, migrate

/// A project of one or two `sleep` services whose state is `state`, with
/// `infra` lines added and `RUN` set to `run` (changing it updates `a`).
fn yml28(name: &str, state: &str, infra: &str, run: &str) -> String {
    format!(
        "name: {name}\ninfra:\n  state: \"{state}\"\n{infra}services:\n  a:\n    start: \"exec sleep 600\"\n    env: {{ RUN: \"{run}\" }}\n"
    )
}

/// `nanokit <args> -f <case's nanokit.yml>` in a child process: its exit
/// code and output.
fn nk(c: &Case, args: &[&str], env: &[(&str, &str)]) -> (i64, String) {
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.push("-f".into());
    a.push(c.path().join("nanokit.yml").display().to_string());
    let argv = json!(a).to_string();
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.push(("NK_SB_ARGS", &argv));
    let (r, text) = finish(c.child_in("cli", c.path(), &env));
    (r["exit"].as_i64().unwrap(), text)
}

fn nk_ok(c: &Case, args: &[&str], env: &[(&str, &str)]) -> String {
    let (code, text) = nk(c, args, env);
    assert_eq!(code, 0, "nanokit {args:?}: {text}");
    text
}

/// History, show, pull and push on one backend: the last N writes listed
/// with serial, time, holder, command and changes; pull then push of the
/// same state a no-op; an older serial or another lineage refused without
/// --force.
async fn history_pull_push(kind: Kind) {
    use nanokit::state::manage;
    let c = Case::new(kind);
    let state = state_url(kind, c.path(), &c.name, None);
    let infra = "  state_history: 3\n";
    for run in ["1", "2", "3", "4"] {
        std::fs::write(
            c.path().join("nanokit.yml"),
            yml28(&c.name, &state, infra, run),
        )
        .unwrap();
        nk_ok(&c, &["up"], &[]);
    }
    let cfg = c.config();
    let end = direct_state(kind, &c).await;
    let s = end.serial;
    let listed = manage::history(&cfg, 20).await.unwrap();
    let serials: Vec<u64> = listed.iter().map(|r| r.serial).collect();
    assert_eq!(
        serials,
        vec![s, s - 1, s - 2],
        "the last 3 writes: {listed:#?}"
    );
    for r in &listed {
        assert!(r.at.is_some(), "{r:?}");
        assert!(
            r.holder
                .as_deref()
                .is_some_and(|h| h.contains("pid ") && h.contains("nanokit up")),
            "{r:?}"
        );
        assert!(
            r.command.as_deref().is_some_and(|c| c.contains(" up ")),
            "{r:?}"
        );
    }
    // Changes against the revision before: known for all but the oldest.
    assert!(
        listed[..2]
            .iter()
            .all(|r| r.changes.as_deref().is_some_and(|ch| ch.contains("~a"))),
        "{listed:#?}"
    );
    assert!(listed[2].changes.is_none(), "{listed:#?}");
    let backend = c.backend().await;
    assert_eq!(
        backend.list_revisions().await.unwrap(),
        vec![s - 2, s - 1, s]
    );
    assert_eq!(manage::show(&cfg, s - 1).await.unwrap().serial, s - 1);
    assert!(
        manage::show(&cfg, s - 3).await.is_err(),
        "fell out of the history"
    );
    // The CLI lists them too.
    let text = nk_ok(&c, &["infra", "state", "history"], &[]);
    assert!(
        text.contains(&format!("{s} ")) && text.contains("up"),
        "{text}"
    );
    // pull, push of the same: a no-op.
    let pulled = manage::pull(&cfg).await.unwrap().unwrap();
    let bytes = serde_json::to_vec_pretty(&pulled).unwrap();
    let cancel = CancellationToken::new();
    let before = backend.read().await.unwrap().unwrap();
    assert_eq!(
        manage::push(&cfg, &bytes, false, &cancel).await.unwrap(),
        manage::Pushed::Unchanged { serial: s }
    );
    assert_eq!(
        backend.read().await.unwrap().unwrap().bytes,
        before.bytes,
        "nothing written"
    );
    // An older serial, another lineage: refused.
    let older = serde_json::to_vec(&manage::show(&cfg, s - 1).await.unwrap()).unwrap();
    let e = manage::push(&cfg, &older, false, &cancel)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ENKSTATEREFUSED", "{e}");
    let mut other = pulled.clone();
    other.lineage = uuid::Uuid::new_v4().to_string();
    let other = serde_json::to_vec(&other).unwrap();
    let e = manage::push(&cfg, &other, false, &cancel)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ENKSTATEREFUSED", "{e}");
    assert!(e.to_string().contains("lineage"), "{e}");
    assert_eq!(
        backend.read().await.unwrap().unwrap().bytes,
        before.bytes,
        "nothing written"
    );
    // Through the CLI as well.
    std::fs::write(c.path().join("older.json"), &older).unwrap();
    let (code, text) = nk(&c, &["infra", "state", "push", "older.json"], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("ENKSTATEREFUSED"), "{text}");
    nk_ok(&c, &["down"], &[]);
    // Forced: written, with the next serial.
    let now = direct_state(kind, &c).await.serial;
    assert_eq!(
        manage::push(&cfg, &other, true, &cancel).await.unwrap(),
        manage::Pushed::Written { serial: now + 1 }
    );
    assert_ne!(direct_state(kind, &c).await.lineage, pulled.lineage);
}

/// file → S3 → Vault → GCS → file: lineage, serial and history kept at each
/// step; a run against a store the state left fails naming where it went.
async fn migrate_round_trip() {
    use nanokit::state::manage;
    let c = Case::new(Kind::File);
    let file_state = state_url(Kind::File, c.path(), &c.name, None);
    for run in ["1", "2"] {
        std::fs::write(
            c.path().join("nanokit.yml"),
            yml28(&c.name, &file_state, "", run),
        )
        .unwrap();
        nk_ok(&c, &["up"], &[]);
    }
    let start = direct_state(Kind::File, &c).await;
    let revisions = c.backend().await.list_revisions().await.unwrap();
    assert!(revisions.len() >= 2);
    let cancel = CancellationToken::new();
    let mut from = Kind::File;
    for to in [Kind::S3, Kind::Vault, Kind::Gcs, Kind::File] {
        let cfg = c.config();
        let url = state_url(to, c.path(), &c.name, None);
        let m = manage::migrate(&cfg, &url, false, &cancel)
            .await
            .unwrap_or_else(|e| panic!("{from:?} -> {to:?}: {e}"));
        assert_eq!((m.serial, &m.lineage), (start.serial, &start.lineage));
        // The source refuses runs, naming the destination.
        let (code, text) = nk(&c, &["up"], &[]);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("ENKSTATEMIGRATED"), "{text}");
        let dest_shown = manage::destination(&cfg, &url).unwrap().display();
        assert!(text.contains(&dest_shown), "names {dest_shown}: {text}");
        // The destination has it all.
        std::fs::write(c.path().join("nanokit.yml"), yml28(&c.name, &url, "", "2")).unwrap();
        let there = direct_state(to, &c).await;
        assert_eq!(
            (there.serial, &there.lineage),
            (start.serial, &start.lineage)
        );
        assert_eq!(there.resources, start.resources);
        assert_eq!(
            c.backend().await.list_revisions().await.unwrap(),
            revisions,
            "history kept"
        );
        from = to;
    }
    // Back in the file: a run works (nothing to change).
    let text = nk_ok(&c, &["up"], &[]);
    assert!(text.contains("0 changed"), "{text}");
    nk_ok(&c, &["down"], &[]);
}

/// A migration killed after its copy, before the source is marked: the
/// source is still the state and says so on its next run; migrating again
/// finishes.
async fn migrate_killed_half_way() {
    use nanokit::state::manage;
    let c = Case::new(Kind::File);
    let file_state = state_url(Kind::File, c.path(), &c.name, None);
    std::fs::write(
        c.path().join("nanokit.yml"),
        yml28(&c.name, &file_state, "", "1"),
    )
    .unwrap();
    nk_ok(&c, &["up"], &[]);
    let before = direct_state(Kind::File, &c).await;
    let to = state_url(Kind::S3, c.path(), &c.name, None);
    let pause = c.path().join("pause");
    std::fs::write(&pause, "").unwrap();
    let pause_s = pause.display().to_string();
    let args = json!([
        "infra",
        "state",
        "migrate",
        "--to",
        to,
        "--yes",
        "-f",
        c.path().join("nanokit.yml")
    ])
    .to_string();
    let mut child = c.child_in(
        "cli",
        c.path(),
        &[
            ("NK_SB_ARGS", &args),
            ("NANOKIT_TEST_STOP_IN_MIGRATE", &pause_s),
        ],
    );
    let t0 = Instant::now();
    while !stopped(child.id()) {
        assert!(t0.elapsed() < Duration::from_secs(60), "never stopped");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the migration ended ({st:?}) before its pause");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    // The destination holds a copy, but the source is the state.
    let copy = Store::open_any(
        state::open(&Location::Url(to.clone())).await.unwrap(),
        &c.name,
        "local",
        Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(copy.state().serial, before.serial);
    let src = direct_state(Kind::File, &c).await;
    assert!(
        src.migrated_to.is_none() && src.migrating_to.is_some(),
        "{src:?}"
    );
    // The next run works on the source, saying what happened.
    let text = nk_ok(&c, &["up", "--lock-timeout", "30"], &[]);
    assert!(text.contains("interrupted"), "{text}");
    assert!(
        text.contains(&Location::Url(to.clone()).display()),
        "names the destination: {text}"
    );
    assert!(direct_state(Kind::File, &c).await.migrated_to.is_none());
    // Run again: finishes.
    let cancel = CancellationToken::new();
    let m = manage::migrate(&c.config(), &to, false, &cancel)
        .await
        .unwrap();
    assert_eq!(m.lineage, before.lineage);
    let e = Store::open(c.backend().await, &c.name, "local")
        .await
        .expect_err("migrated");
    assert_eq!(e.code(), "ENKSTATEMIGRATED");
    std::fs::write(c.path().join("nanokit.yml"), yml28(&c.name, &to, "", "1")).unwrap();
    nk_ok(&c, &["down"], &[]);
}

const PASS_OLD: &str = "correct horse battery staple";
const PASS_NEW: &str = "a newer passphrase, rotated";

/// Encryption at rest on one backend: nothing of the state in the clear in
/// the stored object, its revisions or a saved plan; a wrong or missing
/// passphrase is ENKSTATEKEY and writes nothing; a fallback key opens the
/// old state and the next write re-encrypts it with the new key.
async fn encrypted_at_rest(kind: Kind) {
    let c = Case::new(kind);
    let state = state_url(kind, c.path(), &c.name, None);
    let secret = format!("s3cr3t-{}", uuid::Uuid::new_v4().simple());
    let svc = format!("svc{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let yml = |pass_env: &str, fallback: &str, run: &str| {
        format!(
            "name: {}\ninfra:\n  state: \"{state}\"\n  state_encryption:\n    passphrase: {{ env: {pass_env} }}\n{fallback}services:\n  {svc}:\n    start: \"exec sleep 600\"\n    env: {{ TOKEN: \"{secret}\", RUN: \"{run}\" }}\n",
            c.name
        )
    };
    std::fs::write(c.path().join("nanokit.yml"), yml("NK_PASS", "", "1")).unwrap();
    nk_ok(&c, &["up"], &[("NK_PASS", PASS_OLD)]);
    nk_ok(&c, &["plan"], &[("NK_PASS", PASS_OLD)]);
    let backend = c.backend().await;
    let raw = backend.read().await.unwrap().unwrap().bytes;
    let mut cfg = c.config();
    let set_pass = |cfg: &mut nanokit::config::Config, v: &str| {
        if let Some(nanokit::config::StateEncryption {
            key:
                nanokit::config::KeySource::Passphrase(nanokit::config::PassphraseSource::Env {
                    value,
                    ..
                }),
            ..
        }) = cfg.state_encryption.as_mut()
        {
            *value = Some(v.to_string());
        }
    };
    set_pass(&mut cfg, PASS_OLD);
    let codec = state::StoreOptions::of(&cfg).codec;
    let st = state::decode_stored(&raw, &codec, "", &c.name)
        .await
        .unwrap();
    let hash = st.resources[&svc].config_hash.clone();
    let plan = std::fs::read(c.path().join(".nanokit/plans/latest.json")).unwrap();
    let mut stored = vec![("the state", raw.clone()), ("the saved plan", plan)];
    for serial in backend.list_revisions().await.unwrap() {
        stored.push((
            "a revision",
            backend.get_revision(serial).await.unwrap().unwrap(),
        ));
    }
    for (what, bytes) in &stored {
        let text = String::from_utf8_lossy(bytes);
        for needle in [svc.as_str(), secret.as_str(), hash.as_str(), "exec sleep"] {
            assert!(
                !text.contains(needle),
                "{what} shows {needle:?} in the clear: {text}"
            );
        }
        assert!(text.contains("encrypted_data"), "{what}: {text}");
    }
    // Wrong or missing passphrase: ENKSTATEKEY, nothing written.
    let revisions = backend.list_revisions().await.unwrap();
    std::fs::write(c.path().join("nanokit.yml"), yml("NK_PASS", "", "2")).unwrap();
    for env in [[("NK_PASS", PASS_NEW)], [("NK_PASS", "")]] {
        let (code, text) = nk(&c, &["up"], &env);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("ENKSTATEKEY"), "{text}");
        assert_eq!(
            backend.read().await.unwrap().unwrap().bytes,
            raw,
            "nothing written"
        );
        assert_eq!(backend.list_revisions().await.unwrap(), revisions);
    }
    // Rotation: the new key first, the old one as fallback; the next write
    // re-encrypts with the new key.
    std::fs::write(
        c.path().join("nanokit.yml"),
        yml(
            "NK_PASS",
            "    fallback:\n      passphrase: { env: NK_OLD_PASS }\n",
            "2",
        ),
    )
    .unwrap();
    nk_ok(
        &c,
        &["up"],
        &[("NK_PASS", PASS_NEW), ("NK_OLD_PASS", PASS_OLD)],
    );
    let rotated = backend.read().await.unwrap().unwrap().bytes;
    assert_ne!(rotated, raw);
    let only = |p: &str| {
        let mut cfg = c.config();
        cfg.state_encryption.as_mut().unwrap().fallback = None;
        set_pass(&mut cfg, p);
        state::StoreOptions::of(&cfg).codec
    };
    assert!(state::decode_stored(&rotated, &only(PASS_NEW), "", &c.name)
        .await
        .is_ok());
    let e = state::decode_stored(&rotated, &only(PASS_OLD), "", &c.name)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ENKSTATEKEY");
    nk_ok(
        &c,
        &["down"],
        &[("NK_PASS", PASS_NEW), ("NK_OLD_PASS", PASS_OLD)],
    );
}

/// The OpenBao Transit key provider: a data key per write, wrapped in the
/// envelope; the state opens and nothing is in the clear.
async fn transit_key_provider() {
    let s = services::stores();
    let addr = s.vault_addr.trim_start_matches("http://").to_string();
    let token = [("X-Vault-Token", s.vault_token.as_str())];
    let mount = format!("transit{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let (st, body) = fake::request(
        &addr,
        "POST",
        &format!("/v1/sys/mounts/{mount}"),
        &token,
        r#"{"type":"transit"}"#,
    );
    assert!(st == 200 || st == 204, "{st} {body}");
    let (st, body) = fake::request(
        &addr,
        "POST",
        &format!("/v1/{mount}/keys/nanokit"),
        &token,
        "{}",
    );
    assert!(st == 200 || st == 204, "{st} {body}");
    let c = Case::new(Kind::S3);
    let state = state_url(Kind::S3, c.path(), &c.name, None);
    let infra = format!("  state_encryption:\n    transit: {{ key: nanokit, mount: {mount} }}\n");
    std::fs::write(
        c.path().join("nanokit.yml"),
        yml28(&c.name, &state, &infra, "transit-run"),
    )
    .unwrap();
    nk_ok(&c, &["up"], &[]);
    let raw = direct(Kind::S3, &c)
        .await
        .read()
        .await
        .unwrap()
        .unwrap()
        .bytes;
    let text = String::from_utf8_lossy(&raw);
    assert!(
        !text.contains("transit-run") && !text.contains("exec sleep"),
        "{text}"
    );
    let env: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(env["meta"]["key_provider"], "transit");
    assert!(
        env["meta"]["ciphertext"]
            .as_str()
            .unwrap()
            .starts_with("vault:v1:"),
        "{env}"
    );
    let pulled = nanokit::state::manage::pull(&c.config())
        .await
        .unwrap()
        .unwrap();
    assert!(pulled.resources.contains_key("a"));
    nk_ok(&c, &["down"], &[]);
}

// ------------------------------------------------------------ credentials

/// A small HTTP server on loopback answering every request with `answer`
/// (given the request's head and body), recording the requests.
mod fake {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    pub type Answer = dyn Fn(&str, &[u8]) -> (u16, String) + Send + Sync;
    /// Each request's head and body.
    pub type Log = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

    pub struct Server {
        pub addr: String,
        pub requests: Log,
    }

    pub fn start(answer: Box<Answer>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (log, answer) = (requests.clone(), Arc::new(answer));
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let (log, answer) = (log.clone(), answer.clone());
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut byte = [0u8; 1];
                    while !buf.ends_with(b"\r\n\r\n") {
                        if conn.read(&mut byte).unwrap_or(0) == 0 {
                            return;
                        }
                        buf.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    let _ = conn.read_exact(&mut body);
                    let (status, text) = answer(&head, &body);
                    log.lock().unwrap().push((head, body));
                    let _ = conn.write_all(
                        format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                            text.len()
                        )
                        .as_bytes(),
                    );
                });
            }
        });
        Server { addr, requests }
    }

    /// One plain HTTP/1.1 request: status and body.
    pub fn request(
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        c.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        let status = resp
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        (status, body)
    }
}

/// Whether every recorded request head carries `header` (case-insensitive
/// name, exact value prefix).
fn all_carry(heads: &[String], header: &str) -> bool {
    !heads.is_empty()
        && heads.iter().all(|h| {
            h.lines().any(|l| {
                l.to_ascii_lowercase()
                    .starts_with(&header.to_ascii_lowercase())
            })
        })
}

/// S3 credentials from `AWS_PROFILE` in the shared credentials file, its
/// region from the config file, when the environment has no keys.
async fn s3_credentials_from_a_profile() {
    let (c, proxy, _) = via_proxy(Kind::S3, proxy::Mode::Record);
    let aws = c.path().join("aws");
    std::fs::create_dir_all(&aws).unwrap();
    std::fs::write(
        aws.join("credentials"),
        "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = x\n\n[team]\naws_access_key_id = AKIDNANOKITTEAM\naws_secret_access_key = team-secret\n",
    )
    .unwrap();
    std::fs::write(aws.join("config"), "[profile team]\nregion = eu-west-3\n").unwrap();
    let creds = aws.join("credentials").display().to_string();
    let config = aws.join("config").display().to_string();
    let (r, text) = finish(c.child(
        "probe",
        0,
        &[
            ("AWS_ACCESS_KEY_ID", ""),
            ("AWS_SECRET_ACCESS_KEY", ""),
            ("AWS_REGION", ""),
            ("AWS_DEFAULT_REGION", ""),
            ("AWS_PROFILE", "team"),
            ("AWS_SHARED_CREDENTIALS_FILE", &creds),
            ("AWS_CONFIG_FILE", &config),
            // Were the profile not read, the chain must not reach the
            // instance metadata service (no traffic off this machine).
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    ));
    assert_eq!(r["code"], Value::Null, "{text}");
    let heads = proxy.heads();
    assert!(
        heads
            .iter()
            .all(|h| h.contains("Credential=AKIDNANOKITTEAM/")
                && h.contains("/eu-west-3/s3/aws4_request")),
        "{heads:#?}"
    );
}

/// The fields of an `application/x-www-form-urlencoded` body, decoded.
fn form_fields(body: &[u8]) -> std::collections::HashMap<String, String> {
    let dec = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (dec(k), dec(v)))
        .collect()
}

fn unb64url(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

/// GCS with a service-account key (`GOOGLE_APPLICATION_CREDENTIALS`): an
/// RS256 JWT, signed with the key, exchanged at its `token_uri`; every
/// request carries the token.
async fn gcs_service_account_key() {
    let (c, proxy, env) = via_proxy(Kind::Gcs, proxy::Mode::Record);
    let key = c.path().join("key.pem");
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl: {out:?}");
    let pem = std::fs::read_to_string(&key).unwrap();
    let der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .secret_pkcs8_der()
            .to_vec()
    };
    let public = ring::signature::RsaKeyPair::from_pkcs8(&der)
        .unwrap()
        .public()
        .as_ref()
        .to_vec();
    let tokens = fake::start(Box::new(move |head, body| {
        let form = form_fields(body);
        let assertion = form.get("assertion").cloned().unwrap_or_default();
        let parts: Vec<&str> = assertion.split('.').collect();
        let ok = head.starts_with("POST /token ")
            && form.get("grant_type").map(String::as_str)
                == Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
            && parts.len() == 3
            && ring::signature::UnparsedPublicKey::new(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                &public,
            )
            .verify(
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &unb64url(parts[2]),
            )
            .is_ok();
        if ok {
            (200, r#"{"access_token":"tok-sa","expires_in":3600}"#.into())
        } else {
            (401, r#"{"error":"invalid_grant"}"#.into())
        }
    }));
    let creds = c.path().join("sa.json");
    std::fs::write(
        &creds,
        json!({
            "type": "service_account",
            "client_email": "nanokit@test.iam.gserviceaccount.com",
            "private_key": pem,
            "token_uri": format!("http://{}/token", tokens.addr),
        })
        .to_string(),
    )
    .unwrap();
    let creds = creds.display().to_string();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("GOOGLE_APPLICATION_CREDENTIALS", &creds));
    let (r, text) = finish(c.child("probe", 0, &env));
    assert_eq!(r["code"], Value::Null, "{text}");
    assert!(
        all_carry(&proxy.heads(), "authorization: Bearer tok-sa"),
        "{:#?}",
        proxy.heads()
    );
    let reqs = tokens.requests.lock().unwrap();
    assert_eq!(reqs.len(), 1, "one token for the whole run");
    let form = form_fields(&reqs[0].1);
    let jwt = &form["assertion"];
    let claims: Value = serde_json::from_slice(&unb64url(jwt.split('.').nth(1).unwrap())).unwrap();
    assert_eq!(claims["iss"], "nanokit@test.iam.gserviceaccount.com");
    assert_eq!(claims["aud"], format!("http://{}/token", tokens.addr));
    assert_eq!(
        claims["scope"],
        "https://www.googleapis.com/auth/devstorage.read_write"
    );
}

/// GCS from the metadata server (`GCE_METADATA_HOST`) when there is no key.
async fn gcs_metadata_server() {
    let (c, proxy, env) = via_proxy(Kind::Gcs, proxy::Mode::Record);
    let md = fake::start(Box::new(|head, _| {
        let flavored = head
            .lines()
            .any(|l| l.eq_ignore_ascii_case("metadata-flavor: Google"));
        if head.starts_with("GET /computeMetadata/v1/instance/service-accounts/default/token ")
            && flavored
        {
            (
                200,
                r#"{"access_token":"tok-md","expires_in":3599,"token_type":"Bearer"}"#.into(),
            )
        } else {
            (404, "{}".into())
        }
    }));
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("GCE_METADATA_HOST", &md.addr));
    env.push(("GOOGLE_APPLICATION_CREDENTIALS", ""));
    let (r, text) = finish(c.child("probe", 0, &env));
    assert_eq!(r["code"], Value::Null, "{text}");
    assert!(
        all_carry(&proxy.heads(), "authorization: Bearer tok-md"),
        "{:#?}",
        proxy.heads()
    );
    assert_eq!(md.requests.lock().unwrap().len(), 1);
}

/// Vault's token from `~/.vault-token` when `VAULT_TOKEN` is not set, and
/// the state kept in `VAULT_NAMESPACE` (OpenBao namespaces).
async fn vault_token_file_and_namespace() {
    let s = services::stores();
    let addr = s.vault_addr.trim_start_matches("http://").to_string();
    let ns = format!("nk{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let token = [("X-Vault-Token", s.vault_token.as_str())];
    let (st, body) = fake::request(
        &addr,
        "POST",
        &format!("/v1/sys/namespaces/{ns}"),
        &token,
        "",
    );
    assert_eq!(st, 200, "{body}");
    let in_ns = [
        ("X-Vault-Token", s.vault_token.as_str()),
        ("X-Vault-Namespace", ns.as_str()),
    ];
    let (st, body) = fake::request(
        &addr,
        "POST",
        "/v1/sys/mounts/secret",
        &in_ns,
        r#"{"type":"kv","options":{"version":"2"}}"#,
    );
    assert!(st == 200 || st == 204, "{st} {body}");
    let (c, proxy, env) = via_proxy(Kind::Vault, proxy::Mode::Record);
    let home = c.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join(".vault-token"), format!("{}\n", s.vault_token)).unwrap();
    let home = home.display().to_string();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend([
        ("VAULT_TOKEN", ""),
        ("HOME", home.as_str()),
        ("VAULT_NAMESPACE", ns.as_str()),
    ]);
    let (r, text) = finish(c.child("probe", 0, &env));
    assert_eq!(r["code"], Value::Null, "{text}");
    let heads = proxy.heads();
    assert!(
        all_carry(&heads, &format!("x-vault-namespace: {ns}")),
        "{heads:#?}"
    );
    assert!(
        all_carry(&heads, &format!("x-vault-token: {}", s.vault_token)),
        "{heads:#?}"
    );
    let path = format!("/v1/secret/data/{}/state", c.name);
    assert_eq!(
        fake::request(&addr, "GET", &path, &in_ns, "").0,
        200,
        "kept in the namespace"
    );
    assert_eq!(
        fake::request(&addr, "GET", &path, &token, "").0,
        404,
        "not in the root namespace"
    );
}

/// A small HTTP/1.1 proxy in front of a test server (one request per
/// connection), which can strip the preconditions of every request, or lose
/// the answer of the first lock release it forwards, and records what it
/// forwarded.
mod proxy {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Mode {
        /// Strip `If-Match`/`If-None-Match`, `ifGenerationMatch` and KV
        /// `options.cas`.
        Strip,
        /// Forward the first lock release (the creation of its release
        /// marker) but close the connection instead of answering.
        LoseRelease,
        /// Only forward (and record the heads).
        Record,
    }

    struct Shared {
        upstream: String,
        mode: Mode,
        /// Preconditions stripped, or answers lost.
        count: AtomicUsize,
        /// Requests naming a precondition probe's scratch object.
        probes: AtomicUsize,
        /// The head of every request forwarded.
        heads: Mutex<Vec<String>>,
    }

    pub struct Proxy {
        addr: String,
        shared: Arc<Shared>,
    }

    impl Proxy {
        pub fn start(upstream: &str, mode: Mode) -> Proxy {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let shared = Arc::new(Shared {
                upstream: upstream.to_string(),
                mode,
                count: AtomicUsize::new(0),
                probes: AtomicUsize::new(0),
                heads: Mutex::new(Vec::new()),
            });
            let sh = shared.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    let sh = sh.clone();
                    std::thread::spawn(move || {
                        let _ = serve(conn, &sh);
                    });
                }
            });
            Proxy { addr, shared }
        }

        pub fn addr(&self) -> String {
            self.addr.clone()
        }

        /// Preconditions stripped, or answers lost.
        pub fn count(&self) -> usize {
            self.shared.count.load(Ordering::SeqCst)
        }

        /// Requests naming a precondition probe's scratch object.
        pub fn probes(&self) -> usize {
            self.shared.probes.load(Ordering::SeqCst)
        }

        pub fn heads(&self) -> Vec<String> {
            self.shared.heads.lock().unwrap().clone()
        }
    }

    /// Reads one request (head and Content-Length body).
    fn read_request(conn: &mut TcpStream) -> Option<(String, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if conn.read(&mut byte).ok()? == 0 {
                return None;
            }
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).to_string();
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0; len];
        conn.read_exact(&mut body).ok()?;
        Some((head, body))
    }

    fn serve(mut conn: TcpStream, sh: &Shared) -> std::io::Result<()> {
        let Some((head, mut body)) = read_request(&mut conn) else {
            return Ok(());
        };
        sh.heads.lock().unwrap().push(head.clone());
        if head.contains("nkprobe") || String::from_utf8_lossy(&body).contains("nkprobe") {
            sh.probes.fetch_add(1, Ordering::SeqCst);
        }
        let strip = sh.mode == Mode::Strip;
        let count = &sh.count;
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let (method, rest) = request_line.split_once(' ').unwrap_or((request_line, ""));
        let (target, version) = rest.rsplit_once(' ').unwrap_or((rest, "HTTP/1.1"));
        let target = match target.split_once('?') {
            Some((path, query)) if strip => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|p| {
                        let out = p.starts_with("ifGenerationMatch=");
                        if out {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        !out
                    })
                    .collect();
                format!("{path}?{}", kept.join("&"))
            }
            _ => target.to_string(),
        };
        if strip {
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) {
                if let Some(o) = v.as_object_mut() {
                    if o.remove("options").is_some() {
                        count.fetch_add(1, Ordering::SeqCst);
                        body = serde_json::to_vec(&v).unwrap();
                    }
                }
            }
        }
        // A lock release creates `<key>.nklock/<epoch>.released`: named in
        // the path (S3; Vault, with the dot percent-encoded) or in the
        // upload's metadata part (GCS).
        let text = String::from_utf8_lossy(&body);
        let release = sh.mode == Mode::LoseRelease
            && method != "GET"
            && [target.as_str(), &text]
                .iter()
                .any(|t| t.contains(".released") || t.contains("%2Ereleased"));
        let mut out = format!("{method} {target} {version}\r\n");
        for l in lines.filter(|l| !l.is_empty()) {
            let name = l
                .split(':')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if strip && (name == "if-match" || name == "if-none-match") {
                count.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            if name == "content-length" || name == "connection" {
                continue;
            }
            out.push_str(l);
            out.push_str("\r\n");
        }
        out.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ));
        let mut up = TcpStream::connect(&sh.upstream)?;
        up.write_all(out.as_bytes())?;
        up.write_all(&body)?;
        let mut resp = Vec::new();
        up.read_to_end(&mut resp)?;
        if release
            && count
                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            // The release landed; its answer is lost.
            return Ok(());
        }
        conn.write_all(&resp)
    }
}

// ---------------------------------------------------------- file backend

#[tokio::test(flavor = "multi_thread")]
async fn file_compare_and_swap() {
    compare_and_swap(Kind::File).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn file_lock_epochs_and_holder() {
    lock_epochs_and_holder(Kind::File).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn file_a_lower_epoch_is_refused() {
    a_lower_epoch_is_refused(Kind::File).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn file_sixteen_runs_at_once() {
    many_runs_at_once(Kind::File, 16, 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn file_sixteen_ups_at_once() {
    sixteen_ups_at_once(Kind::File).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn file_a_paused_writer_is_refused_on_resume() {
    a_paused_writer_is_refused_on_resume(Kind::File, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn file_a_paused_writer_is_refused_even_if_the_taker_writes_nothing() {
    a_paused_writer_is_refused_on_resume(Kind::File, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn file_a_killed_holder_is_taken_over_after_the_ttl() {
    a_killed_holder_is_taken_over_after_the_ttl(Kind::File).await;
}

// ------------------------------------------------------------ PostgreSQL

macro_rules! pg_test {
    ($name:ident, $body:expr) => {
        #[tokio::test(flavor = "multi_thread")]
        #[cfg_attr(
            not(nk_pg),
            ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
        )]
        async fn $name() {
            $body.await;
        }
    };
}

pg_test!(pg_compare_and_swap, compare_and_swap(Kind::Pg));
pg_test!(pg_lock_epochs_and_holder, lock_epochs_and_holder(Kind::Pg));
pg_test!(
    pg_a_lower_epoch_is_refused,
    a_lower_epoch_is_refused(Kind::Pg)
);
pg_test!(pg_sixteen_runs_at_once, many_runs_at_once(Kind::Pg, 16, 3));
pg_test!(pg_sixteen_ups_at_once, sixteen_ups_at_once(Kind::Pg));
pg_test!(
    pg_a_taken_over_holder_cannot_renew,
    a_taken_over_holder_cannot_renew(Kind::Pg)
);
pg_test!(
    pg_a_paused_writer_is_refused_on_resume,
    a_paused_writer_is_refused_on_resume(Kind::Pg, true)
);
pg_test!(
    pg_a_paused_writer_is_refused_even_if_the_taker_writes_nothing,
    a_paused_writer_is_refused_on_resume(Kind::Pg, false)
);
pg_test!(
    pg_a_killed_holder_is_taken_over_after_the_ttl,
    a_killed_holder_is_taken_over_after_the_ttl(Kind::Pg)
);

// ------------------------------------------- S3 (SeaweedFS), GCS, OpenBao

macro_rules! store_test {
    ($name:ident, $body:expr) => {
        #[tokio::test(flavor = "multi_thread")]
        #[cfg_attr(
            not(nk_stores),
            ignore = "SKIPPED: needs the S3, Vault and GCS test servers (eval \"$(bash scripts/state-test-servers.sh)\")"
        )]
        async fn $name() {
            $body.await;
        }
    };
}

store_test!(s3_compare_and_swap, compare_and_swap(Kind::S3));
store_test!(s3_lock_epochs_and_holder, lock_epochs_and_holder(Kind::S3));
store_test!(
    s3_a_lower_epoch_is_refused,
    a_lower_epoch_is_refused(Kind::S3)
);
store_test!(s3_sixteen_runs_at_once, many_runs_at_once(Kind::S3, 16, 3));
store_test!(s3_sixteen_ups_at_once, sixteen_ups_at_once(Kind::S3));
store_test!(
    s3_a_taken_over_holder_cannot_renew,
    a_taken_over_holder_cannot_renew(Kind::S3)
);
store_test!(
    s3_a_paused_writer_is_refused_on_resume,
    a_paused_writer_is_refused_on_resume(Kind::S3, true)
);
store_test!(
    s3_a_paused_writer_is_refused_even_if_the_taker_writes_nothing,
    a_paused_writer_is_refused_on_resume(Kind::S3, false)
);
store_test!(
    s3_a_killed_holder_is_taken_over_after_the_ttl,
    a_killed_holder_is_taken_over_after_the_ttl(Kind::S3)
);
store_test!(
    s3_a_store_that_ignores_preconditions_is_refused,
    a_store_that_ignores_preconditions_is_refused(Kind::S3)
);
store_test!(
    s3_a_release_whose_answer_is_lost_is_recognised,
    a_release_whose_answer_is_lost_is_recognised(Kind::S3)
);
store_test!(
    s3_the_probe_is_remembered_per_store,
    the_probe_is_remembered_per_store(Kind::S3)
);
store_test!(
    s3_a_deploy_made_while_waiting_for_the_lock_is_seen,
    a_deploy_made_while_waiting_for_the_lock_is_seen(Kind::S3)
);
store_test!(
    gcs_a_deploy_made_while_waiting_for_the_lock_is_seen,
    a_deploy_made_while_waiting_for_the_lock_is_seen(Kind::Gcs)
);
store_test!(
    vault_a_deploy_made_while_waiting_for_the_lock_is_seen,
    a_deploy_made_while_waiting_for_the_lock_is_seen(Kind::Vault)
);

store_test!(gcs_compare_and_swap, compare_and_swap(Kind::Gcs));
store_test!(
    gcs_lock_epochs_and_holder,
    lock_epochs_and_holder(Kind::Gcs)
);
store_test!(
    gcs_a_lower_epoch_is_refused,
    a_lower_epoch_is_refused(Kind::Gcs)
);
store_test!(
    gcs_sixteen_runs_at_once,
    many_runs_at_once(Kind::Gcs, 16, 3)
);
store_test!(gcs_sixteen_ups_at_once, sixteen_ups_at_once(Kind::Gcs));
store_test!(
    gcs_a_taken_over_holder_cannot_renew,
    a_taken_over_holder_cannot_renew(Kind::Gcs)
);
store_test!(
    gcs_a_paused_writer_is_refused_on_resume,
    a_paused_writer_is_refused_on_resume(Kind::Gcs, true)
);
store_test!(
    gcs_a_paused_writer_is_refused_even_if_the_taker_writes_nothing,
    a_paused_writer_is_refused_on_resume(Kind::Gcs, false)
);
store_test!(
    gcs_a_killed_holder_is_taken_over_after_the_ttl,
    a_killed_holder_is_taken_over_after_the_ttl(Kind::Gcs)
);
store_test!(
    gcs_a_store_that_ignores_preconditions_is_refused,
    a_store_that_ignores_preconditions_is_refused(Kind::Gcs)
);
store_test!(
    gcs_a_release_whose_answer_is_lost_is_recognised,
    a_release_whose_answer_is_lost_is_recognised(Kind::Gcs)
);
store_test!(
    gcs_the_probe_is_remembered_per_store,
    the_probe_is_remembered_per_store(Kind::Gcs)
);

store_test!(vault_compare_and_swap, compare_and_swap(Kind::Vault));
store_test!(
    vault_lock_epochs_and_holder,
    lock_epochs_and_holder(Kind::Vault)
);
store_test!(
    vault_a_lower_epoch_is_refused,
    a_lower_epoch_is_refused(Kind::Vault)
);
store_test!(
    vault_sixteen_runs_at_once,
    many_runs_at_once(Kind::Vault, 16, 3)
);
store_test!(vault_sixteen_ups_at_once, sixteen_ups_at_once(Kind::Vault));
store_test!(
    vault_a_taken_over_holder_cannot_renew,
    a_taken_over_holder_cannot_renew(Kind::Vault)
);
store_test!(
    vault_a_paused_writer_is_refused_on_resume,
    a_paused_writer_is_refused_on_resume(Kind::Vault, true)
);
store_test!(
    vault_a_paused_writer_is_refused_even_if_the_taker_writes_nothing,
    a_paused_writer_is_refused_on_resume(Kind::Vault, false)
);
store_test!(
    vault_a_killed_holder_is_taken_over_after_the_ttl,
    a_killed_holder_is_taken_over_after_the_ttl(Kind::Vault)
);
store_test!(
    vault_a_store_that_ignores_preconditions_is_refused,
    a_store_that_ignores_preconditions_is_refused(Kind::Vault)
);
store_test!(
    vault_a_release_whose_answer_is_lost_is_recognised,
    a_release_whose_answer_is_lost_is_recognised(Kind::Vault)
);
store_test!(
    vault_the_probe_is_remembered_per_store,
    the_probe_is_remembered_per_store(Kind::Vault)
);

store_test!(
    s3_credentials_come_from_a_profile,
    s3_credentials_from_a_profile()
);
store_test!(
    gcs_a_service_account_key_gets_a_token,
    gcs_service_account_key()
);
store_test!(gcs_a_token_from_the_metadata_server, gcs_metadata_server());
store_test!(
    vault_token_from_the_token_file_and_state_in_the_namespace,
    vault_token_file_and_namespace()
);

#[tokio::test(flavor = "multi_thread")]
async fn file_history_pull_push() {
    history_pull_push(Kind::File).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn file_encrypted_at_rest() {
    encrypted_at_rest(Kind::File).await;
}

pg_test!(pg_history_pull_push, history_pull_push(Kind::Pg));
pg_test!(pg_encrypted_at_rest, encrypted_at_rest(Kind::Pg));
store_test!(s3_history_pull_push, history_pull_push(Kind::S3));
store_test!(gcs_history_pull_push, history_pull_push(Kind::Gcs));
store_test!(vault_history_pull_push, history_pull_push(Kind::Vault));
store_test!(s3_encrypted_at_rest, encrypted_at_rest(Kind::S3));
store_test!(gcs_encrypted_at_rest, encrypted_at_rest(Kind::Gcs));
store_test!(vault_encrypted_at_rest, encrypted_at_rest(Kind::Vault));
store_test!(
    migrate_file_s3_vault_gcs_file_keeps_lineage_serial_history,
    migrate_round_trip()
);
store_test!(
    a_migration_killed_half_way_leaves_the_source_the_state,
    migrate_killed_half_way()
);
store_test!(transit_key_provider_on_openbao, transit_key_provider());

// ----------------------------------------------------------- the child

/// Not a test: one run in a child process, in the mode `NK_SB_MODE`:
/// - `deploy`: take the deploy lock (waiting), check nobody else is inside,
///   write `NK_SB_WRITES` times, release; prints the serials written;
/// - `hold`: take the lock, write once, print `LOCKED`, wait for the file
///   `go`, write again, print how that went;
/// - `take`: take the lock (waiting), write once, print the epoch.
#[test]
#[ignore = "helper: run as a child process by the state backend tests"]
fn state_child() {
    let Ok(mode) = std::env::var("NK_SB_MODE") else {
        return;
    };
    let dir = PathBuf::from(std::env::var("NK_SB_DIR").unwrap());
    let id = std::env::var("NK_SB_ID").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(async {
        let cfg = config_at(&dir);
        let cancel = CancellationToken::new();
        let wait = Some(Duration::from_secs(120));
        match mode.as_str() {
            "deploy" => {
                let writes: usize = std::env::var("NK_SB_WRITES").unwrap().parse().unwrap();
                let (lock, mut store) =
                    state::lock::lock_state(&cfg, &format!("deploy {id}"), wait, &cancel)
                        .await
                        .unwrap();
                let inside = dir.join("inside");
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&inside)
                    .unwrap_or_else(|e| panic!("two runs inside the lock at once: {e}"));
                let mut serials = Vec::new();
                for k in 0..writes {
                    store
                        .update(|s| {
                            s.resources
                                .insert(format!("c{id}-{k}"), resource(&format!("{id}/{k}")));
                        })
                        .await
                        .unwrap();
                    serials.push(store.state().serial);
                }
                std::fs::remove_file(&inside).unwrap();
                let epoch = lock.epoch();
                lock.release().await.unwrap();
                json!({"serials": serials, "epoch": epoch})
            }
            "hold" => {
                let (lock, mut store) = state::lock::lock_state(&cfg, "holder", None, &cancel)
                    .await
                    .unwrap();
                store
                    .update(|s| {
                        s.resources.insert("holder".into(), resource("h"));
                    })
                    .await
                    .unwrap();
                println!(
                    "LOCKED {}",
                    json!({"epoch": lock.epoch(), "serial": store.state().serial})
                );
                std::io::stdout().flush().unwrap();
                let go = dir.join("go");
                let t0 = Instant::now();
                while !go.exists() {
                    assert!(t0.elapsed() < Duration::from_secs(120), "never told to go");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let r = store
                    .update(|s| {
                        s.resources.clear();
                        s.resources.insert("stale".into(), resource("s"));
                    })
                    .await;
                let _ = lock.release().await;
                match r {
                    Ok(()) => json!({"code": null}),
                    Err(e) => json!({"code": e.code(), "message": e.to_string()}),
                }
            }
            "take" => {
                let (lock, mut store) = state::lock::lock_state(&cfg, "taker", wait, &cancel)
                    .await
                    .unwrap();
                if std::env::var("NK_SB_WRITES").as_deref() != Ok("0") {
                    store
                        .update(|s| {
                            s.resources.insert("taker".into(), resource("t"));
                        })
                        .await
                        .unwrap();
                }
                let r = json!({"epoch": lock.epoch(), "tookOver": lock.recovered()});
                lock.release().await.unwrap();
                r
            }
            "cli" => {
                let args: Vec<String> =
                    serde_json::from_str(&std::env::var("NK_SB_ARGS").unwrap()).unwrap();
                json!({"exit": nanokit::cli::run(args).await})
            }
            "probe" => {
                // Uses the store (its own environment may point elsewhere).
                match state::lock::lock_state(&cfg, "probe", None, &cancel).await {
                    Ok((lock, mut store)) => {
                        let w = store.update(|_| {}).await;
                        let released = lock.release().await;
                        match w.and(released) {
                            Ok(()) => json!({"code": null}),
                            Err(e) => json!({"code": e.code(), "message": e.to_string()}),
                        }
                    }
                    Err(e) => json!({"code": e.code(), "message": e.to_string()}),
                }
            }
            other => panic!("unknown mode {other}"),
        }
    });
    println!("\nRESULT {result}");
    let _ = std::io::stdout().flush();
}
