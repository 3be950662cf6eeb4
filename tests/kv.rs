//! The state store's test suite, run against both backends: every case is
//! generated twice, as `<case>::embedded` (a real SQLite file in a temporary
//! directory) and `<case>::postgres` (the server in `NANOKIT_TEST_PG_URL`,
//! started by `scripts/pg-test-cluster.sh`). Without that variable, outside
//! CI, the PostgreSQL half is *ignored* with a `SKIPPED:` reason; with it, or
//! in CI, it runs and a missing server fails it (tests/services/mod.rs).
//!
//! Multi-process cases re-run this test binary as child processes (the
//! ignored `child_worker` test).

mod services;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nanokit::error::ErrorCode;
use nanokit::kv::{KvError, OpenOptions, Store, Value};
use serde_json::json;

const NO_WAIT: Duration = Duration::ZERO;
const LONG_WAIT: Duration = Duration::from_secs(60);

/// One backend under test, with a namespace of its own.
struct Ctx {
    opts: OpenOptions,
    store: Store,
    tmp: tempfile::TempDir,
    backend: &'static str,
}

impl Ctx {
    async fn embedded() -> Ctx {
        let tmp = tempfile::tempdir().unwrap();
        let opts = OpenOptions {
            agent: Some("local".into()),
            state_dir: Some(tmp.path().join("state")),
            url: Some(String::new()),
        };
        let store = Store::open(&opts).await.unwrap();
        assert_eq!(store.backend(), "embedded");
        Ctx {
            opts,
            store,
            tmp,
            backend: "embedded",
        }
    }

    async fn postgres() -> Ctx {
        let url = services::pg_url();
        let tmp = tempfile::tempdir().unwrap();
        let agent = format!("t-{}", uuid::Uuid::new_v4().simple());
        let opts = OpenOptions {
            agent: Some(agent),
            state_dir: Some(tmp.path().join("unused")),
            url: Some(url),
        };
        let store = Store::open(&opts).await.unwrap();
        assert_eq!(store.backend(), "postgres");
        Ctx {
            opts,
            store,
            tmp,
            backend: "postgres",
        }
    }

    /// A second, independent handle on the same namespace.
    async fn reopen(&self) -> Store {
        Store::open(&self.opts).await.unwrap()
    }

    /// Runs `n` child processes of this test binary in `mode`, returning
    /// each one's `RESULT` line.
    fn children(&self, mode: &str, n: usize, per_child: usize) -> Vec<String> {
        let marker_dir = self.tmp.path().join("cs");
        std::fs::create_dir_all(&marker_dir).unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut kids = Vec::new();
        for id in 0..n {
            let mut cmd = Command::new(&exe);
            cmd.args([
                "--exact",
                "child_worker",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("NK_CHILD_MODE", mode)
            .env("NK_CHILD_ID", id.to_string())
            .env("NK_CHILD_N", per_child.to_string())
            .env("NK_CHILD_AGENT", self.opts.agent.clone().unwrap())
            .env("NK_CHILD_DIR", self.opts.state_dir.clone().unwrap())
            .env("NK_CHILD_URL", self.opts.url.clone().unwrap_or_default())
            .env("NK_CHILD_MARKER_DIR", &marker_dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
            kids.push(cmd.spawn().unwrap());
        }
        kids.into_iter()
            .map(|k| {
                let out = k.wait_with_output().unwrap();
                let stdout = String::from_utf8_lossy(&out.stdout).to_string();
                assert!(
                    out.status.success(),
                    "child failed: {}\n{stdout}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
                stdout
                    .lines()
                    .find_map(|l| l.find("RESULT ").map(|i| l[i..].to_string()))
                    .unwrap_or_else(|| panic!("child printed no RESULT line:\n{stdout}"))
            })
            .collect()
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, KvError>) -> &'static str {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.code(),
    }
}

/// Generates `<case>::embedded` and `<case>::postgres` from `async fn case(ctx)`.
macro_rules! both {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$case(super::Ctx::embedded().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[cfg_attr(not(nk_pg), ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")")]
            async fn postgres() {
                super::$case(super::Ctx::postgres().await).await
            }
        }
    )*};
}

both!(
    set_get_exists_delete,
    values_are_strings_or_json,
    list_by_prefix,
    increment_semantics,
    clear_and_stats,
    lock_is_exclusive,
    unlock_by_non_holder_is_refused,
    lock_expiry_really_expires,
    lock_wait_acquires_after_release,
    with_lock_releases_on_error,
    bad_input_is_refused_and_nothing_written,
    agents_are_separate_namespaces,
    agents_and_held_locks_are_listed,
    processes_increment_exactly,
    processes_never_overlap_in_critical_section,
);

async fn set_get_exists_delete(ctx: Ctx) {
    let s = &ctx.store;
    assert_eq!(s.get("missing").await.unwrap(), None);
    assert!(!s.exists("missing").await.unwrap());
    s.set("package:installed:nginx", &Value::Text("1.25".into()))
        .await
        .unwrap();
    assert_eq!(
        s.get("package:installed:nginx").await.unwrap(),
        Some(Value::Text("1.25".into()))
    );
    assert!(s.exists("package:installed:nginx").await.unwrap());
    // Overwrite.
    s.set("package:installed:nginx", &Value::Text("1.26".into()))
        .await
        .unwrap();
    // Visible through another handle (another connection).
    let other = ctx.reopen().await;
    assert_eq!(
        other.get("package:installed:nginx").await.unwrap(),
        Some(Value::Text("1.26".into()))
    );
    let entry = other
        .get_entry("package:installed:nginx")
        .await
        .unwrap()
        .unwrap();
    assert!(entry.updated_at_ms > 1_600_000_000_000, "{entry:?}");
    assert!(s.delete("package:installed:nginx").await.unwrap());
    assert!(!s.delete("package:installed:nginx").await.unwrap());
    assert!(!other.exists("package:installed:nginx").await.unwrap());
    assert_eq!(other.get("package:installed:nginx").await.unwrap(), None);
}

async fn values_are_strings_or_json(ctx: Ctx) {
    let s = &ctx.store;
    let doc = json!({"hash": "abc", "n": 3, "list": [1, 2, {"x": null}], "ok": true});
    s.set("doc", &Value::Json(doc.clone())).await.unwrap();
    assert_eq!(s.get("doc").await.unwrap(), Some(Value::Json(doc)));
    s.set("num", &Value::Json(json!(42))).await.unwrap();
    assert_eq!(s.get("num").await.unwrap(), Some(Value::Json(json!(42))));
    // A string that looks like JSON stays a string.
    s.set("str", &Value::Text("42".into())).await.unwrap();
    assert_eq!(s.get("str").await.unwrap(), Some(Value::Text("42".into())));
    // A JSON string is a string.
    s.set("jstr", &Value::from_json(json!("hi"))).await.unwrap();
    assert_eq!(s.get("jstr").await.unwrap(), Some(Value::Text("hi".into())));
    s.set("null", &Value::Json(json!(null))).await.unwrap();
    assert_eq!(s.get("null").await.unwrap(), Some(Value::Json(json!(null))));
    let unicode = "ünïcødé ✓ 🚀 with\nnewlines\tand \"quotes\"";
    s.set("ü/key 🚀", &Value::Text(unicode.into()))
        .await
        .unwrap();
    assert_eq!(
        s.get("ü/key 🚀").await.unwrap(),
        Some(Value::Text(unicode.into()))
    );
    // Exactly at the limits is fine.
    let key = "k".repeat(1024);
    let value = "v".repeat(1024 * 1024);
    s.set(&key, &Value::Text(value.clone())).await.unwrap();
    assert_eq!(s.get(&key).await.unwrap(), Some(Value::Text(value)));
}

async fn list_by_prefix(ctx: Ctx) {
    let s = &ctx.store;
    for k in ["b:2", "a:1", "a:3", "a:2", "ab", "c", "a%", "a_x"] {
        s.set(k, &Value::Text(format!("v-{k}"))).await.unwrap();
    }
    let keys = |v: Vec<nanokit::kv::Entry>| v.into_iter().map(|e| e.key).collect::<Vec<_>>();
    assert_eq!(keys(s.list("a:").await.unwrap()), vec!["a:1", "a:2", "a:3"]);
    // LIKE wildcards in a prefix are literal.
    assert_eq!(keys(s.list("a%").await.unwrap()), vec!["a%"]);
    assert_eq!(keys(s.list("a_").await.unwrap()), vec!["a_x"]);
    assert_eq!(
        keys(s.list("").await.unwrap()),
        vec!["a%", "a:1", "a:2", "a:3", "a_x", "ab", "b:2", "c"]
    );
    assert!(s.list("zzz").await.unwrap().is_empty());
    let listed = s.list("c").await.unwrap();
    assert_eq!(listed[0].value, Value::Text("v-c".into()));
}

async fn increment_semantics(ctx: Ctx) {
    let s = &ctx.store;
    assert_eq!(s.increment("counter", 1).await.unwrap(), 1);
    assert_eq!(s.increment("counter", 41).await.unwrap(), 42);
    assert_eq!(s.increment("counter", -50).await.unwrap(), -8);
    assert_eq!(
        s.get("counter").await.unwrap(),
        Some(Value::Json(json!(-8)))
    );
    assert_eq!(s.increment("fresh", -3).await.unwrap(), -3);
    // A string holding an integer counts.
    s.set("textnum", &Value::Text("10".into())).await.unwrap();
    assert_eq!(s.increment("textnum", 5).await.unwrap(), 15);
    // Not an integer: coded error, value unchanged.
    s.set("word", &Value::Text("hello".into())).await.unwrap();
    assert_eq!(code(s.increment("word", 1).await), "ENKNOTINTEGER");
    assert_eq!(
        s.get("word").await.unwrap(),
        Some(Value::Text("hello".into()))
    );
    s.set("float", &Value::Json(json!(1.5))).await.unwrap();
    assert_eq!(code(s.increment("float", 1).await), "ENKNOTINTEGER");
    // Overflow: coded error, value unchanged.
    s.set("big", &Value::Json(json!(i64::MAX))).await.unwrap();
    assert_eq!(code(s.increment("big", 1).await), "ENKNOTINTEGER");
    assert_eq!(
        s.get("big").await.unwrap(),
        Some(Value::Json(json!(i64::MAX)))
    );
    // With a bound (JS passes 2^53 - 1, so its numbers stay exact): a result
    // beyond it is refused with a coded error and nothing is written.
    let b = nanokit::kv::JS_SAFE_INTEGER;
    s.set("js", &Value::Json(json!(b - 1))).await.unwrap();
    assert_eq!(s.increment_within("js", 1, Some(b)).await.unwrap(), b);
    assert_eq!(
        code(s.increment_within("js", 1, Some(b)).await),
        "ENKNOTINTEGER"
    );
    assert_eq!(s.get("js").await.unwrap(), Some(Value::Json(json!(b))));
    assert_eq!(
        code(s.increment_within("jsneg", -b - 1, Some(b)).await),
        "ENKNOTINTEGER"
    );
    assert_eq!(s.get("jsneg").await.unwrap(), None, "nothing inserted");
    assert_eq!(s.increment_within("jsneg", -b, Some(b)).await.unwrap(), -b);
    // Unbounded (Rust, the CLI), the same step is fine.
    assert_eq!(s.increment("js", 1).await.unwrap(), b + 1);
}

async fn clear_and_stats(ctx: Ctx) {
    let s = &ctx.store;
    let st = s.stats().await.unwrap();
    assert_eq!((st.keys, st.locks, st.value_bytes), (0, 0, 0));
    assert_eq!(st.backend, ctx.backend);
    s.set("a", &Value::Text("xyz".into())).await.unwrap();
    s.set("b", &Value::Json(json!([1, 2]))).await.unwrap();
    s.lock("l", "me", 60.0, NO_WAIT).await.unwrap();
    let st = s.stats().await.unwrap();
    assert_eq!((st.keys, st.locks, st.value_bytes), (2, 1, 3 + 5));
    assert_eq!(st.agent, ctx.opts.agent.clone().unwrap());
    assert!(!st.location.is_empty());
    assert_eq!(s.clear().await.unwrap(), 2);
    assert!(s.list("").await.unwrap().is_empty());
    // clear keeps live locks.
    assert!(s.is_locked("l").await.unwrap().locked);
    let st = s.stats().await.unwrap();
    assert_eq!((st.keys, st.locks), (0, 1));
}

async fn lock_is_exclusive(ctx: Ctx) {
    let a = &ctx.store;
    let b = ctx.reopen().await;
    let got = a.lock("deploy", "worker-a", 60.0, NO_WAIT).await.unwrap();
    assert_eq!(got.holder, "worker-a");
    match b.lock("deploy", "worker-b", 60.0, NO_WAIT).await {
        Err(e @ KvError::Locked { .. }) => {
            assert_eq!(e.code(), "ENKLOCKED");
            assert!(e.to_string().contains("worker-a"), "{e}");
        }
        other => panic!("expected ENKLOCKED, got {other:?}"),
    }
    // Waiting a little does not help while it is held.
    assert_eq!(
        code(
            b.lock("deploy", "worker-b", 60.0, Duration::from_millis(50))
                .await
        ),
        "ENKLOCKED"
    );
    let info = b.is_locked("deploy").await.unwrap();
    assert!(info.locked);
    assert_eq!(info.holder.as_deref(), Some("worker-a"));
    assert!(info.expires_at_ms.unwrap() > got.expires_at_ms - 1000);
    // Another name is independent.
    b.lock("other", "worker-b", 60.0, NO_WAIT).await.unwrap();
    // The holder may renew.
    a.lock("deploy", "worker-a", 120.0, NO_WAIT).await.unwrap();
    a.unlock("deploy", "worker-a").await.unwrap();
    assert!(!b.is_locked("deploy").await.unwrap().locked);
    b.lock("deploy", "worker-b", 60.0, NO_WAIT).await.unwrap();
    assert_eq!(
        a.is_locked("deploy").await.unwrap().holder.as_deref(),
        Some("worker-b")
    );
}

async fn unlock_by_non_holder_is_refused(ctx: Ctx) {
    let s = &ctx.store;
    s.lock("job", "alice", 60.0, NO_WAIT).await.unwrap();
    match s.unlock("job", "mallory").await {
        Err(e @ KvError::NotHolder { .. }) => {
            assert_eq!(e.code(), "ENKNOTHOLDER");
            assert!(e.to_string().contains("alice"), "{e}");
        }
        other => panic!("expected ENKNOTHOLDER, got {other:?}"),
    }
    assert_eq!(
        s.is_locked("job").await.unwrap().holder.as_deref(),
        Some("alice")
    );
    s.unlock("job", "alice").await.unwrap();
    // Unlocking what nobody holds is refused too.
    assert_eq!(code(s.unlock("job", "alice").await), "ENKNOTHOLDER");
    assert_eq!(code(s.unlock("never", "alice").await), "ENKNOTHOLDER");
    // force_unlock clears whoever holds it.
    s.lock("job", "bob", 60.0, NO_WAIT).await.unwrap();
    assert_eq!(s.force_unlock("job").await.unwrap().as_deref(), Some("bob"));
    assert!(!s.is_locked("job").await.unwrap().locked);
    assert_eq!(s.force_unlock("job").await.unwrap(), None);
}

async fn lock_expiry_really_expires(ctx: Ctx) {
    let a = &ctx.store;
    let b = ctx.reopen().await;
    // 1.1 s: crosses a decimal digit boundary of the seconds, where a
    // textual comparison of timestamps goes wrong.
    a.lock("lease", "short-lived", 1.1, NO_WAIT).await.unwrap();
    // b waits for the expiry (no assertion on how long it takes).
    let got = b.lock("lease", "successor", 60.0, LONG_WAIT).await.unwrap();
    assert_eq!(got.holder, "successor");
    let info = a.is_locked("lease").await.unwrap();
    assert_eq!(info.holder.as_deref(), Some("successor"));
    // The expired holder can no longer unlock it.
    match a.unlock("lease", "short-lived").await {
        Err(KvError::NotHolder { current, .. }) => {
            assert_eq!(current.as_deref(), Some("successor"))
        }
        other => panic!("expected ENKNOTHOLDER, got {other:?}"),
    }
    // An expired lock is reported as not locked.
    a.lock("lease2", "x", 0.05, NO_WAIT).await.unwrap();
    loop {
        let info = a.is_locked("lease2").await.unwrap();
        if !info.locked {
            assert_eq!(info.holder, None);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...and its holder can still release its own (expired, untaken) row.
    a.unlock("lease2", "x").await.unwrap();
}

async fn lock_wait_acquires_after_release(ctx: Ctx) {
    let a = ctx.store.clone();
    let b = ctx.reopen().await;
    a.lock("gate", "first", 600.0, NO_WAIT).await.unwrap();
    let waiter = tokio::spawn(async move { b.lock("gate", "second", 60.0, LONG_WAIT).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.unlock("gate", "first").await.unwrap();
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(got.holder, "second");
}

async fn with_lock_releases_on_error(ctx: Ctx) {
    let s = &ctx.store;
    let out: Result<(), String> = s
        .with_lock("wl", "me", 60.0, NO_WAIT, || async {
            let inside = ctx.reopen().await.is_locked("wl").await.unwrap();
            assert_eq!(inside.holder.as_deref(), Some("me"));
            Err("boom".to_string())
        })
        .await
        .unwrap();
    assert_eq!(out, Err("boom".to_string()));
    assert!(!s.is_locked("wl").await.unwrap().locked);
    let n = s
        .with_lock("wl", "me", 60.0, NO_WAIT, || async { 7 })
        .await
        .unwrap();
    assert_eq!(n, 7);
    assert!(!s.is_locked("wl").await.unwrap().locked);
    // Held by someone else: ENKLOCKED and the closure does not run.
    s.lock("wl", "other", 60.0, NO_WAIT).await.unwrap();
    let r = s
        .with_lock("wl", "me", 60.0, NO_WAIT, || async {
            panic!("must not run")
        })
        .await;
    assert_eq!(code(r.map(|_: ()| ())), "ENKLOCKED");
}

async fn bad_input_is_refused_and_nothing_written(ctx: Ctx) {
    let s = &ctx.store;
    let v = Value::Text("x".into());
    assert_eq!(code(s.set("", &v).await), "ENKKEY");
    assert_eq!(code(s.set(&"k".repeat(1025), &v).await), "ENKKEY");
    assert_eq!(code(s.set("nul\0key", &v).await), "ENKKEY");
    assert_eq!(
        code(
            s.set("big", &Value::Text("v".repeat(1024 * 1024 + 1)))
                .await
        ),
        "ENKKEY"
    );
    assert_eq!(
        code(
            s.set("bigjson", &Value::Json(json!(["v".repeat(1024 * 1024)])))
                .await
        ),
        "ENKKEY"
    );
    assert_eq!(
        code(s.set("empty", &Value::Text(String::new())).await),
        "ENKKEY"
    );
    assert_eq!(code(s.get("").await), "ENKKEY");
    assert_eq!(code(s.exists(&"k".repeat(2000)).await), "ENKKEY");
    assert_eq!(code(s.delete("").await), "ENKKEY");
    assert_eq!(code(s.increment("", 1).await), "ENKKEY");
    assert_eq!(code(s.lock("", "h", 1.0, NO_WAIT).await), "ENKKEY");
    assert_eq!(code(s.lock("n", "", 1.0, NO_WAIT).await), "ENKARG");
    assert_eq!(code(s.lock("n", "h", 0.0, NO_WAIT).await), "ENKARG");
    assert_eq!(code(s.lock("n", "h", -1.0, NO_WAIT).await), "ENKARG");
    assert_eq!(code(s.lock("n", "h", f64::NAN, NO_WAIT).await), "ENKARG");
    assert_eq!(code(s.unlock("n", "").await), "ENKARG");
    assert_eq!(code(s.list(&"p".repeat(1025)).await), "ENKKEY");
    for agent in [
        "",
        "../etc",
        "a/b",
        "..",
        ".hidden",
        "a\\b",
        "a b",
        "x\0",
        &"a".repeat(65),
    ] {
        let opts = OpenOptions {
            agent: Some(agent.to_string()),
            ..ctx.opts.clone()
        };
        assert_eq!(
            code(Store::open(&opts).await.map(|_| ())),
            "ENKAGENT",
            "{agent:?}"
        );
    }
    // Nothing was written.
    assert!(s.list("").await.unwrap().is_empty());
    assert_eq!(s.stats().await.unwrap().locks, 0);
    if ctx.backend == "embedded" {
        let dir = ctx.opts.state_dir.clone().unwrap();
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|f| !f.ends_with("-wal") && !f.ends_with("-shm"))
            .collect();
        files.sort();
        assert_eq!(files, vec!["local.db"]);
        assert!(!ctx.tmp.path().join("etc.db").exists());
    }
}

async fn agents_are_separate_namespaces(ctx: Ctx) {
    let base = ctx.opts.agent.clone().unwrap();
    let other_opts = OpenOptions {
        agent: Some(format!("{base}-other")),
        ..ctx.opts.clone()
    };
    let other = Store::open(&other_opts).await.unwrap();
    ctx.store
        .set("k", &Value::Text("mine".into()))
        .await
        .unwrap();
    ctx.store.lock("l", "me", 60.0, NO_WAIT).await.unwrap();
    assert_eq!(other.get("k").await.unwrap(), None);
    assert!(!other.is_locked("l").await.unwrap().locked);
    other.lock("l", "them", 60.0, NO_WAIT).await.unwrap();
    other.set("k", &Value::Text("theirs".into())).await.unwrap();
    other.clear().await.unwrap();
    assert_eq!(
        ctx.store.get("k").await.unwrap(),
        Some(Value::Text("mine".into()))
    );
    assert_eq!(other.agent(), format!("{base}-other"));
}

/// What the hub's state view lists: the agents with state, and each
/// agent's locks held now (with holder and expiry), never expired ones.
async fn agents_and_held_locks_are_listed(ctx: Ctx) {
    let base = ctx.opts.agent.clone().unwrap();
    let other_opts = OpenOptions {
        agent: Some(format!("{base}-other")),
        ..ctx.opts.clone()
    };
    let other = Store::open(&other_opts).await.unwrap();
    other.set("k", &Value::Text("v".into())).await.unwrap();
    ctx.store.lock("b-lock", "me", 60.0, NO_WAIT).await.unwrap();
    ctx.store
        .lock("a-lock", "you", 60.0, NO_WAIT)
        .await
        .unwrap();
    ctx.store.lock("gone", "me", 0.05, NO_WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let agents = nanokit::kv::agents(&ctx.opts).await.unwrap();
    assert!(agents.contains(&base), "{agents:?}");
    assert!(agents.contains(&format!("{base}-other")), "{agents:?}");
    let locks = ctx.store.locks().await.unwrap();
    let names: Vec<(&str, &str)> = locks
        .iter()
        .map(|l| (l.name.as_str(), l.holder.as_str()))
        .collect();
    assert_eq!(names, [("a-lock", "you"), ("b-lock", "me")]);
    assert!(locks.iter().all(|l| l.expires_at_ms > l.acquired_at_ms));
    assert!(other.locks().await.unwrap().is_empty());
    ctx.store.unlock("a-lock", "you").await.unwrap();
    assert_eq!(ctx.store.locks().await.unwrap().len(), 1);
}

async fn processes_increment_exactly(ctx: Ctx) {
    let results = ctx.children("incr", 8, 1000);
    assert_eq!(results.len(), 8);
    assert_eq!(ctx.store.increment("counter", 0).await.unwrap(), 8000);
    assert_eq!(
        ctx.store.get("counter").await.unwrap(),
        Some(Value::Json(json!(8000)))
    );
}

async fn processes_never_overlap_in_critical_section(ctx: Ctx) {
    let per_child = 40;
    let results = ctx.children("lock", 8, per_child);
    let mut overlaps = 0;
    let mut acquired = 0;
    for r in &results {
        // RESULT acquired=N overlaps=M
        for part in r.split_whitespace().skip(1) {
            let (k, v) = part.split_once('=').unwrap();
            let v: usize = v.parse().unwrap();
            match k {
                "acquired" => acquired += v,
                "overlaps" => overlaps += v,
                _ => {}
            }
        }
    }
    assert_eq!(overlaps, 0, "{results:?}");
    assert_eq!(acquired, 8 * per_child);
    // The unprotected read-modify-write counter file lost no update.
    let counter: usize = std::fs::read_to_string(ctx.tmp.path().join("cs").join("counter"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(counter, 8 * per_child);
    assert!(!ctx.store.is_locked("critical").await.unwrap().locked);
}

/// The child process of the multi-process cases (run by `Ctx::children`).
#[test]
#[ignore = "helper: run as a child process by the multi-process tests"]
fn child_worker() {
    let Ok(mode) = std::env::var("NK_CHILD_MODE") else {
        return;
    };
    let env = |k: &str| std::env::var(k).unwrap();
    let id: usize = env("NK_CHILD_ID").parse().unwrap();
    let n: usize = env("NK_CHILD_N").parse().unwrap();
    let opts = OpenOptions {
        agent: Some(env("NK_CHILD_AGENT")),
        state_dir: Some(PathBuf::from(env("NK_CHILD_DIR"))),
        url: Some(env("NK_CHILD_URL")),
    };
    let marker_dir = PathBuf::from(env("NK_CHILD_MARKER_DIR"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let line = rt.block_on(async move {
        let store = Store::open(&opts).await.unwrap();
        match mode.as_str() {
            "incr" => {
                for _ in 0..n {
                    store.increment("counter", 1).await.unwrap();
                }
                format!("RESULT incremented={n}")
            }
            "lock" => {
                let holder = format!("child-{id}-{}", std::process::id());
                let (mut acquired, mut overlaps) = (0, 0);
                for _ in 0..n {
                    store
                        .lock("critical", &holder, 60.0, LONG_WAIT)
                        .await
                        .unwrap();
                    acquired += 1;
                    if !critical_section(&marker_dir) {
                        overlaps += 1;
                    }
                    store.unlock("critical", &holder).await.unwrap();
                }
                format!("RESULT acquired={acquired} overlaps={overlaps}")
            }
            other => panic!("unknown mode {other}"),
        }
    });
    println!("{line}");
}

/// Enters the critical section: creates an exclusive marker (fails if anyone
/// else is inside), does an unprotected read-modify-write of a counter file,
/// then leaves. Returns false when an overlap was seen.
fn critical_section(dir: &Path) -> bool {
    let marker = dir.join("inside");
    let alone = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&marker)
        .is_ok();
    let counter = dir.join("counter");
    let n: usize = std::fs::read_to_string(&counter)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    std::thread::yield_now();
    std::fs::write(&counter, format!("{}", n + 1)).unwrap();
    if alone {
        std::fs::remove_file(&marker).unwrap();
    }
    alone
}

/// PostgreSQL only: a lost connection (server restart, killed backend) is
/// reported as ENKSTATEUNAVAILABLE at most once, then the store reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn postgres_store_reconnects_after_a_lost_connection() {
    let url = services::pg_url();
    let app = format!("nk-reconnect-{}", uuid::Uuid::new_v4().simple());
    let sep = if url.contains('?') { '&' } else { '?' };
    let opts = OpenOptions {
        agent: Some(format!("t-{}", uuid::Uuid::new_v4().simple())),
        state_dir: None,
        url: Some(format!("{url}{sep}application_name={app}")),
    };
    let store = Store::open(&opts).await.unwrap();
    store.set("k", &Value::Text("v".into())).await.unwrap();
    // Kill our backend from another session.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let killed = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(killed, 1);
    match store.get("k").await {
        Ok(v) => assert_eq!(v, Some(Value::Text("v".into()))),
        Err(e) => assert_eq!(e.code(), "ENKSTATEUNAVAILABLE", "{e}"),
    }
    assert_eq!(store.get("k").await.unwrap(), Some(Value::Text("v".into())));
}
