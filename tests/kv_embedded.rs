//! Cases that only concern one backend: the embedded file (corrupt or
//! foreign files are reported and never reset; permissions) and connecting
//! to a PostgreSQL URL that does not answer (no server needed).

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nanokit::error::ErrorCode;
use nanokit::kv::{sqlite::SqliteStore, KvError, OpenOptions, Store, Value};

fn code<T>(r: Result<T, KvError>) -> &'static str {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.code(),
    }
}

fn embedded_opts(dir: &std::path::Path) -> OpenOptions {
    OpenOptions {
        agent: Some("local".into()),
        state_dir: Some(dir.to_path_buf()),
        url: Some(String::new()),
    }
}

#[test]
fn a_file_that_is_not_a_database_is_reported_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("local.db");
    let garbage: Vec<u8> = b"this is not an SQLite database, it is someone's notes\n"
        .iter()
        .cycle()
        .take(8192)
        .copied()
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    let err = Store::open_embedded(&embedded_opts(tmp.path()))
        .err()
        .expect("opening a garbage file must fail");
    assert_eq!(err.code(), "ENKSTATECORRUPT", "{err}");
    assert!(err.to_string().contains("local.db"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        garbage,
        "the file was modified"
    );
    assert!(!tmp.path().join("local.db-wal").exists());
}

#[test]
fn a_foreign_sqlite_database_is_reported_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("local.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users (name) VALUES ('ada');")
            .unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = SqliteStore::open(tmp.path(), "local").err().unwrap();
    assert_eq!(err.code(), "ENKSTATECORRUPT", "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file was modified"
    );

    // Another application's id.
    let path2 = tmp.path().join("other.db");
    {
        let c = rusqlite::Connection::open(&path2).unwrap();
        c.execute_batch("PRAGMA application_id = 1234;").unwrap();
    }
    assert_eq!(
        code(SqliteStore::open(tmp.path(), "other")),
        "ENKSTATECORRUPT"
    );
}

#[test]
fn a_database_with_a_broken_header_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let s = SqliteStore::open(tmp.path(), "local").unwrap();
        s.set("k", &Value::Text("v".into())).unwrap();
    }
    let path = tmp.path().join("local.db");
    // Checkpoint leftovers away so that only the main file matters.
    let _ = std::fs::remove_file(tmp.path().join("local.db-wal"));
    let _ = std::fs::remove_file(tmp.path().join("local.db-shm"));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..16].copy_from_slice(b"NOT SQLITE AT A\0");
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(
        code(SqliteStore::open(tmp.path(), "local")),
        "ENKSTATECORRUPT"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn a_database_from_a_newer_nanokit_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(tmp.path(), "local").unwrap());
    {
        let c = rusqlite::Connection::open(tmp.path().join("local.db")).unwrap();
        c.execute_batch("PRAGMA user_version = 99;").unwrap();
    }
    let err = SqliteStore::open(tmp.path(), "local").err().unwrap();
    assert_eq!(err.code(), "ENKSTATECORRUPT");
    assert!(err.to_string().contains("newer"), "{err}");
}

#[test]
fn files_are_private_and_reopening_keeps_data() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    {
        let s = SqliteStore::open(&dir, "worker-1").unwrap();
        s.set("k", &Value::Text("v".into())).unwrap();
        assert_eq!(s.path(), dir.join("worker-1.db"));
    }
    let mode = std::fs::metadata(dir.join("worker-1.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let s = SqliteStore::open(&dir, "worker-1").unwrap();
    assert_eq!(s.get("k").unwrap(), Some(Value::Text("v".into())));
    let mode: String = rusqlite::Connection::open(dir.join("worker-1.db"))
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn lock_expiry_compares_numbers_not_text() {
    // sloth-runner compared timestamps as text, so "9…" sorted after "10…"
    // and locks never expired. Plant such a row: expired long ago, but
    // larger as text than now.
    let tmp = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(tmp.path(), "local").unwrap();
    drop(s);
    {
        let c = rusqlite::Connection::open(tmp.path().join("local.db")).unwrap();
        c.execute(
            "INSERT INTO locks (name, holder, acquired_at, expires_at) VALUES ('old', 'ghost', 0, 999999999)",
            [],
        )
        .unwrap();
    }
    let s = SqliteStore::open(tmp.path(), "local").unwrap();
    assert!(!s.is_locked("old").unwrap().locked);
    s.lock("old", "alive", 10.0, Duration::ZERO).unwrap();
}

#[tokio::test]
async fn a_url_that_refuses_is_unavailable_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    // A port that was free a moment ago: connection refused.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let opts = OpenOptions {
        agent: Some("local".into()),
        state_dir: Some(tmp.path().join("state")),
        url: Some(format!("postgres://nobody:secret@127.0.0.1:{port}/db")),
    };
    let err = Store::open(&opts).await.err().unwrap();
    assert_eq!(err.code(), "ENKSTATEUNAVAILABLE", "{err}");
    assert!(
        !err.to_string().contains("secret"),
        "password leaked: {err}"
    );
    assert!(!tmp.path().join("state").exists());
}

#[tokio::test]
async fn a_url_that_never_answers_times_out_as_unavailable() {
    // Accepts TCP connections but never says anything.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_secs(5));
        drop(sock);
    });
    let opts = OpenOptions {
        agent: Some("local".into()),
        state_dir: None,
        url: Some(format!(
            "postgres://u@127.0.0.1:{port}/db?connect_timeout=1"
        )),
    };
    let err = Store::open(&opts).await.err().unwrap();
    assert_eq!(err.code(), "ENKSTATEUNAVAILABLE", "{err}");
    drop(hold);
}

#[tokio::test]
async fn a_malformed_url_is_refused() {
    for url in [
        "mysql://x@127.0.0.1/db",
        "postgres://u@127.0.0.1:notaport/db",
    ] {
        let opts = OpenOptions {
            agent: Some("local".into()),
            state_dir: None,
            url: Some(url.into()),
        };
        let err = Store::open(&opts).await.err().unwrap();
        assert_eq!(err.code(), "ENKSTATEURL", "{url}: {err}");
    }
}

#[test]
fn sync_and_async_paths_see_the_same_data() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open_embedded(&embedded_opts(tmp.path())).unwrap();
    let sync = store.embedded().unwrap();
    sync.set("k", &Value::Text("v".into())).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = rt.block_on(store.get("k")).unwrap();
    assert_eq!(got, Some(Value::Text("v".into())));
    let _ = std::io::stderr().flush();
}

#[test]
fn get_always_sees_writes_that_returned_before_it() {
    // `get` reuses its read transaction while nobody commits; every write by
    // another connection (here: another store on the same file, which is
    // what another process is to SQLite) must be visible to the next get.
    let tmp = tempfile::tempdir().unwrap();
    let a = SqliteStore::open(tmp.path(), "local").unwrap();
    let b = SqliteStore::open(tmp.path(), "local").unwrap();
    b.set("k", &Value::Text("v0".into())).unwrap();
    for i in 1..=300 {
        // Two gets in a row: the second may reuse the first's snapshot.
        assert_eq!(
            a.get("k").unwrap(),
            Some(Value::Text(format!("v{}", i - 1)))
        );
        assert_eq!(
            a.get("k").unwrap(),
            Some(Value::Text(format!("v{}", i - 1)))
        );
        match i % 3 {
            0 => b.set("k", &Value::Text(format!("v{i}"))).unwrap(),
            1 => {
                // A write through `a` itself ends its snapshot first.
                a.set("k", &Value::Text(format!("v{i}"))).unwrap()
            }
            _ => {
                b.set("k", &Value::Text(format!("v{i}"))).unwrap();
                assert!(b.delete("other").is_ok());
            }
        }
    }
    let n = b.increment("n", 1).unwrap();
    assert_eq!(a.get("n").unwrap(), Some(Value::Json(serde_json::json!(n))));
    assert!(b.delete("n").unwrap());
    assert_eq!(a.get("n").unwrap(), None);
}

#[test]
fn an_idle_get_snapshot_is_released_so_checkpoints_can_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let a = SqliteStore::open(tmp.path(), "local").unwrap();
    let b = SqliteStore::open(tmp.path(), "local").unwrap();
    a.set("k", &Value::Text("v".into())).unwrap();
    a.get("k").unwrap();
    for i in 0..200 {
        b.set(&format!("x{i}"), &Value::Text("y".repeat(500)))
            .unwrap();
    }
    // The reaper ends a's idle snapshot (no assertion on how long it takes).
    let mut spins = 0;
    while a.has_open_snapshot() {
        std::thread::sleep(Duration::from_millis(1));
        spins += 1;
        assert!(spins < 60_000, "the idle snapshot was never released");
    }
    let c = rusqlite::Connection::open(tmp.path().join("local.db")).unwrap();
    let (busy, _log, _done): (i64, i64, i64) = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(busy, 0, "a checkpoint could not finish");
    assert_eq!(
        std::fs::metadata(tmp.path().join("local.db-wal"))
            .unwrap()
            .len(),
        0
    );
}
