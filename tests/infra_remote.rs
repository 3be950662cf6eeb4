//! The engine's state.json and deploy lock on PostgreSQL, with real
//! `nanokit up` processes (this test binary re-run as the CLI, see
//! `cli_child`) from different working directories, real services on the
//! process provider, and a real database. Needs `NANOKIT_TEST_PG_URL`
//! (`eval "$(scripts/pg-test-cluster.sh)"`); without it, outside CI, every
//! case that needs it is *ignored* with a `SKIPPED:` reason; in CI a missing
//! server fails them (tests/services/mod.rs).

mod services;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use nanokit::error::ErrorCode;
use nanokit::state::{Backend, Location, State, Status, Store};

/// The PostgreSQL state of workspace `ws` at `url`.
async fn backend(url: &str, ws: &str) -> Arc<dyn Backend> {
    nanokit::state::open(&Location::Postgres {
        url: url.to_string(),
        workspace: ws.to_string(),
    })
    .await
    .unwrap()
}

/// Not a test: the `nanokit` CLI in a child process. Runs `cli::run` with
/// the JSON argv in `NK_CLI_ARGS` and exits with its code.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "child process entry of the remote state tests"]
async fn cli_child() {
    let Ok(args) = std::env::var("NK_CLI_ARGS") else {
        return;
    };
    let args: Vec<String> = serde_json::from_str(&args).expect("NK_CLI_ARGS");
    let code = nanokit::cli::run(args).await;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code);
}

/// Starts `nanokit <args>` as a child process in `dir`.
fn spawn_cli(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "cli_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .current_dir(dir)
    .env("NK_CLI_ARGS", serde_json::to_string(args).unwrap())
    .env_remove("NANOKIT_STATE_URL")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A project copied into its own temp dir (its own working directory).
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new(yml: &str) -> Dir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nanokit.yml"), yml).unwrap();
        Dir { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn file(&self) -> PathBuf {
        self.path().join("nanokit.yml")
    }
    fn args(&self, cmd: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        v.push("-f".into());
        v.push(self.file().to_string_lossy().into_owned());
        v
    }
    async fn cli(&self, cmd: &[&str]) -> i32 {
        nanokit::cli::run(self.args(cmd)).await
    }
    fn config(&self) -> nanokit::config::Config {
        nanokit::config::load(&nanokit::config::LoadOptions::new(self.file())).unwrap()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // Whatever still runs with this project's labels (a failed test).
        if let Ok(cfg) = nanokit::config::load(&nanokit::config::LoadOptions::new(self.file())) {
            let needle = format!("NK_STATE_ID={}", nanokit::engine::scope(&cfg).state_id);
            for e in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

fn project() -> String {
    format!("rt{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// Two services; `a`'s host prestart hook takes `slow` seconds, so the run
/// holds the deploy lock at least that long.
fn yml(name: &str, url: &str, slow: f64) -> String {
    format!(
        r#"name: {name}
infra:
  state: "{url}"
services:
  a:
    start: "exec sleep 600"
    hooks:
      prestart: "sleep {slow}"
  b:
    start: "exec sleep 600"
    depends_on: [a]
"#
    )
}

/// Records every write of the state table (serial and writer) through a
/// trigger, so a test can count the writes the database really saw.
async fn install_history(url: &str) -> tokio_postgres::Client {
    // Creates nanokit_infra_state if needed.
    backend(url, "history/setup").await;
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "BEGIN;
             SELECT pg_advisory_xact_lock(7234561099);
             CREATE TABLE IF NOT EXISTS nanokit_test_state_history (
                 id bigserial PRIMARY KEY, workspace text NOT NULL, serial bigint NOT NULL,
                 writer text NOT NULL, document text NOT NULL);
             CREATE OR REPLACE FUNCTION nanokit_test_state_history_fn() RETURNS trigger AS $$
             BEGIN
               INSERT INTO nanokit_test_state_history (workspace, serial, writer, document)
               VALUES (NEW.workspace, NEW.serial, NEW.updated_by, NEW.document);
               RETURN NEW;
             END $$ LANGUAGE plpgsql;
             CREATE OR REPLACE TRIGGER nanokit_test_state_history_tr
               AFTER INSERT OR UPDATE ON nanokit_infra_state
               FOR EACH ROW EXECUTE FUNCTION nanokit_test_state_history_fn();
             COMMIT;",
        )
        .await
        .unwrap();
    client
}

/// (serial, writer) of every write of `ws`, in order.
async fn history(client: &tokio_postgres::Client, ws: &str) -> Vec<(i64, String)> {
    client
        .query(
            "SELECT serial, writer FROM nanokit_test_state_history WHERE workspace = $1 ORDER BY id",
            &[&ws],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The stored document of the workspace (the backend checks it against its
/// row), parsed.
async fn stored(db: &Arc<dyn Backend>) -> State {
    let doc = db.read().await.unwrap().expect("a stored state");
    let st: State = serde_json::from_slice(&doc.bytes).unwrap_or_else(|e| {
        panic!(
            "stored document does not parse: {e}\n{}",
            String::from_utf8_lossy(&doc.bytes)
        )
    });
    assert_eq!(
        st.serial.to_string(),
        doc.version.0,
        "document serial = row serial"
    );
    st
}

/// Checks that the writes form one unbroken chain 1, 2, …, n and that the
/// stored serial is n: no write was lost or overwritten.
fn assert_chain(h: &[(i64, String)], st: &State) {
    let serials: Vec<i64> = h.iter().map(|x| x.0).collect();
    let want: Vec<i64> = (1..=h.len() as i64).collect();
    assert_eq!(serials, want, "writes must be serials 1..=n: {h:?}");
    assert_eq!(
        st.serial,
        h.len() as u64,
        "serial equals the number of writes"
    );
}

async fn wait_for_lock(db: &Arc<dyn Backend>, within: Duration) -> (String, String) {
    let t0 = Instant::now();
    loop {
        if let Some(l) = db.lock_info().await.unwrap() {
            return (l.run_id, l.description);
        }
        assert!(t0.elapsed() < within, "the first run never took the lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn two_ups_from_two_directories_one_fails_fast_naming_the_holder_one_waits_no_lost_update() {
    let url = services::pg_url();
    let hist = install_history(&url).await;
    let name = project();
    let ws = format!("{name}/local");
    let db = backend(&url, &ws).await;
    let text_yml = yml(&name, &url, 4.0);
    let (a, b) = (Dir::new(&text_yml), Dir::new(&text_yml));
    assert_ne!(a.path(), b.path());

    // Run 1 from directory A holds the lock through its slow prestart.
    let first = spawn_cli(a.path(), &["up", "-f", "nanokit.yml"], &[]);
    let first_pid = first.id();
    let (holder, info) = wait_for_lock(&db, Duration::from_secs(20)).await;
    assert!(
        info.contains(&format!("pid {first_pid}"))
            && info.contains(&a.path().display().to_string()),
        "lock info names the run: {info}"
    );

    // Run 2 from directory B without --lock-timeout fails fast, naming it.
    let t0 = Instant::now();
    let second = spawn_cli(b.path(), &["up", "-f", "nanokit.yml"], &[])
        .wait_with_output()
        .unwrap();
    let fast = t0.elapsed();
    let out = text(&second);
    assert_eq!(second.status.code(), Some(1), "{out}");
    assert!(fast < Duration::from_secs(3), "took {fast:?}: {out}");
    assert!(out.contains("error[ENKLOCKED]"), "{out}");
    assert!(out.contains(&holder), "names the holder {holder}: {out}");
    assert!(
        out.contains(&format!("pid {first_pid}")) && out.contains(&a.path().display().to_string()),
        "names the first run's pid and directory: {out}"
    );
    assert!(
        out.contains("--lock-timeout") && out.contains("nanokit infra unlock"),
        "says how to wait or unlock: {out}"
    );

    // Run 3 from directory B waits for the lock, then succeeds.
    let third = spawn_cli(
        b.path(),
        &["up", "-f", "nanokit.yml", "--lock-timeout", "60"],
        &[],
    );
    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let third = third.wait_with_output().unwrap();
    assert_eq!(third.status.code(), Some(0), "{}", text(&third));
    assert!(db.lock_info().await.unwrap().is_none(), "lock released");

    let st = stored(&db).await;
    let h = history(&hist, &ws).await;
    assert_chain(&h, &st);
    assert!(
        h.iter().any(|(_, w)| w == &holder),
        "run 1 wrote as its holder"
    );
    assert_eq!(
        st.resources.keys().collect::<Vec<_>>(),
        vec!["a", "b"],
        "{st:?}"
    );
    assert!(st.resources.values().all(|r| r.status == Status::Healthy));
    // Run 3 found run 1's instances (one scope for one remote state) and
    // changed nothing: every write is run 1's.
    assert!(h.iter().all(|(_, w)| w == &holder), "{h:?}");

    // Down from directory B stops what run 1 started.
    assert_eq!(b.cli(&["down"]).await, 0);
    let st = stored(&db).await;
    assert!(st.resources.is_empty(), "{st:?}");
    assert_chain(&history(&hist, &ws).await, &st);
    assert!(nanokit::engine::make_plan(
        &a.config(),
        nanokit::engine::provider_for(&a.config()).unwrap().as_ref(),
        &Default::default()
    )
    .await
    .unwrap()
    .actions
    .iter()
    .all(|x| x.action == nanokit::engine::plan::ActionKind::Create));
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn a_writer_with_a_stale_serial_gets_enkstatestale_and_nothing_is_overwritten() {
    let url = services::pg_url();
    let hist = install_history(&url).await;
    let name = project();
    let ws = format!("{name}/local");
    let db = backend(&url, &ws).await;
    let dir = Dir::new(&yml(&name, &url, 0.0));
    assert_eq!(dir.cli(&["up"]).await, 0);
    let before = stored(&db).await;
    assert_eq!(before.resources.len(), 2);

    // A writer that read this state…
    let mut stale = Store::open(backend(&url, &ws).await, &name, "local")
        .await
        .unwrap();
    assert_eq!(stale.state().serial, before.serial);
    // …then another run changes it (takes b down).
    dir.cli(&["down", "b"]).await;
    let after = stored(&db).await;
    assert!(after.serial > before.serial);
    assert!(!after.resources.contains_key("b"));

    let e = stale
        .update(|s| {
            s.resources.clear();
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ENKSTATESTALE", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("nothing was written") && msg.contains(&ws),
        "{msg}"
    );
    // Every later write of the stale writer fails too.
    let e = stale.update(|_| {}).await.unwrap_err();
    assert_eq!(e.code(), "ENKSTATESTALE", "{e}");
    assert_eq!(stored(&db).await, after, "nothing was overwritten");
    assert_chain(&history(&hist, &ws).await, &after);

    assert_eq!(dir.cli(&["down"]).await, 0);
    let end = stored(&db).await;
    assert!(end.resources.is_empty());
    assert_chain(&history(&hist, &ws).await, &end);
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn infra_unlock_clears_the_lock_of_a_killed_up() {
    let url = services::pg_url();
    let name = project();
    let ws = format!("{name}/local");
    let db = backend(&url, &ws).await;
    let (a, b) = (
        Dir::new(&yml(&name, &url, 20.0)),
        Dir::new(&yml(&name, &url, 0.0)),
    );
    let mut victim = spawn_cli(a.path(), &["up", "-f", "nanokit.yml"], &[]);
    let (holder, _) = wait_for_lock(&db, Duration::from_secs(20)).await;
    unsafe {
        libc::kill(victim.id() as i32, libc::SIGKILL);
    }
    let _ = victim.wait();
    // The lock outlives the killed run (until its TTL).
    let held = db.lock_info().await.unwrap().expect("still locked");
    assert_eq!(held.run_id, holder);

    let out = spawn_cli(b.path(), &["up", "-f", "nanokit.yml"], &[])
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("ENKLOCKED"), "{}", text(&out));

    // Without --yes and without a terminal, unlock refuses and keeps it.
    let out = spawn_cli(b.path(), &["infra", "unlock", "-f", "nanokit.yml"], &[])
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&holder) && text(&out).contains("ENKCONFIRM"),
        "{}",
        text(&out)
    );
    assert!(db.lock_info().await.unwrap().is_some());

    let out = spawn_cli(
        b.path(),
        &["infra", "unlock", "-f", "nanokit.yml", "--yes"],
        &[],
    )
    .wait_with_output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(db.lock_info().await.unwrap().is_none(), "cleared");
    let out = spawn_cli(b.path(), &["infra", "unlock", "-f", "nanokit.yml"], &[])
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("not held"), "{}", text(&out));

    // Now an up from B goes through and finishes what the killed run began.
    assert_eq!(b.cli(&["up"]).await, 0);
    let st = stored(&db).await;
    assert!(st.resources.values().all(|r| r.status == Status::Healthy));
    assert_eq!(st.resources.len(), 2);
    assert_eq!(b.cli(&["down"]).await, 0);
    assert!(stored(&db).await.resources.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn a_run_whose_lock_is_cleared_stops_like_a_lost_lease() {
    let url = services::pg_url();
    let name = project();
    let ws = format!("{name}/local");
    let db = backend(&url, &ws).await;
    let a = Dir::new(&yml(&name, &url, 5.0));
    // A 3 s TTL: renewed every second.
    let run = spawn_cli(
        a.path(),
        &["up", "-f", "nanokit.yml"],
        &[("NANOKIT_DEPLOY_LOCK_TTL", "3")],
    );
    wait_for_lock(&db, Duration::from_secs(20)).await;
    assert!(db.force_unlock().await.unwrap().is_some());
    let out = run.wait_with_output().unwrap();
    // Exits like an interrupted run (130), saying why.
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert!(
        text(&out).contains("ENKCANCELLED") && text(&out).contains("deploy lock"),
        "{}",
        text(&out)
    );
    // b (after a) was never started; the lock was not re-taken by the run.
    if let Some(doc) = db.read().await.unwrap() {
        let st: State = serde_json::from_slice(&doc.bytes).unwrap();
        assert!(!st.resources.contains_key("b"), "{st:?}");
    }
    assert!(db.lock_info().await.unwrap().is_none());
    assert_eq!(a.cli(&["down"]).await, 0);
}

#[tokio::test]
async fn without_a_database_the_state_url_is_reported_without_its_password() {
    // Needs no server: nothing listens on port 1.
    let dir = Dir::new(&yml(
        "nopg",
        "postgres://nk:s3cret-pw@127.0.0.1:1/nk?connect_timeout=2",
        0.0,
    ));
    let cfg = dir.config();
    assert!(cfg.state_url.is_some());
    let shown = serde_json::to_string(&cfg).unwrap();
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    let p = nanokit::engine::provider_for(&cfg).unwrap();
    let e = nanokit::engine::up(
        std::sync::Arc::new(cfg),
        p,
        nanokit::engine::RunOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), "ENKSTATEUNAVAILABLE", "{e}");
    assert!(!e.to_string().contains("s3cret-pw"), "{e}");
}

#[test]
fn infra_state_wins_over_nanokit_state_url_which_applies_when_it_is_unset_and_only_from_the_loads_variables(
) {
    // Every other test here sets `infra.state`, so this variable cannot
    // change them.
    let url = "postgres://nk@127.0.0.1:1/nk";
    std::env::set_var("NANOKIT_STATE_URL", url);
    let unset = Dir::new("name: prec\nservices:\n  a:\n    start: \"exec sleep 600\"\n");
    let file = Dir::new(
        "name: prec\ninfra:\n  state: my-state.json\nservices:\n  a:\n    start: \"exec sleep 600\"\n",
    );
    let (c_unset, c_file) = (unset.config(), file.config());
    // A load given its variables is hermetic: the process's
    // NANOKIT_STATE_URL is not among them, so it does not apply...
    let given = |vars: &[(&str, &str)]| {
        nanokit::config::load(&nanokit::config::LoadOptions {
            file: unset.file(),
            env: "local".into(),
            vars: Some(
                vars.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        })
        .unwrap()
    };
    let hermetic = given(&[]);
    // ...but the one among them does.
    let other = "postgres://nk@127.0.0.1:2/other";
    let from_vars = given(&[("NANOKIT_STATE_URL", other)]);
    std::env::remove_var("NANOKIT_STATE_URL");
    assert_eq!(
        nanokit::state::Location::of(&c_unset),
        nanokit::state::Location::Postgres {
            url: url.into(),
            workspace: "prec/local".into()
        }
    );
    assert_eq!(
        nanokit::state::Location::of(&c_file),
        nanokit::state::Location::File(file.path().join("my-state.json"))
    );
    assert_eq!(
        nanokit::state::Location::of(&unset.config()),
        nanokit::state::Location::File(unset.path().join(".nanokit/state.json"))
    );
    assert_eq!(
        nanokit::state::Location::of(&hermetic),
        nanokit::state::Location::File(unset.path().join(".nanokit/state.json")),
        "the process's NANOKIT_STATE_URL leaked into a load given its variables"
    );
    assert_eq!(hermetic.state_url, None);
    assert_eq!(from_vars.state_url.as_deref(), Some(other));
}

/// `nanokit infra unlock` of a PostgreSQL state goes through the state's
/// backend: the lock is cleared but its epoch kept, so the next run's epoch
/// is still greater than the cleared holder's (a holder that never wrote,
/// whose epoch the state has not seen).
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_pg),
    ignore = "SKIPPED: needs NANOKIT_TEST_PG_URL (eval \"$(bash scripts/pg-test-cluster.sh)\")"
)]
async fn infra_unlock_keeps_the_epoch_counting() {
    let url = services::pg_url();
    let name = project();
    let a = Dir::new(&yml(&name, &url, 0.0));
    let cfg = a.config();
    let cancel = tokio_util::sync::CancellationToken::new();
    let (first, _store) = nanokit::state::lock::lock_state(&cfg, "first", None, &cancel)
        .await
        .unwrap();
    let (_, held) = nanokit::state::lock::inspect(&cfg).await.unwrap();
    assert_eq!(held.expect("held").epoch, first.epoch());
    assert_eq!(a.cli(&["infra", "unlock", "--yes"]).await, 0);
    assert!(nanokit::state::lock::inspect(&cfg)
        .await
        .unwrap()
        .1
        .is_none());
    let (second, _store) = nanokit::state::lock::lock_state(&cfg, "second", None, &cancel)
        .await
        .unwrap();
    assert!(
        second.epoch() > first.epoch(),
        "{} > {}",
        second.epoch(),
        first.epoch()
    );
    assert_eq!(first.release().await.unwrap_err().code(), "ENKLOCKLOST");
    second.release().await.unwrap();
}
