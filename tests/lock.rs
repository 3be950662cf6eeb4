//! The lease lock primitive, without Node: acquisition, takeover, loss.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use nanokit::error::ErrorCode;
use nanokit::lock::{self, LockInfo, LockOptions};
use tokio_util::sync::CancellationToken;

fn opts(stale_ms: u64) -> LockOptions {
    LockOptions {
        stale: Duration::from_millis(stale_ms),
        timeout: None,
        holder: Some("test".into()),
    }
}

fn write_record(path: &Path, host_id: &str, pid: u32) {
    let info = LockInfo {
        token: "t".into(),
        host_id: host_id.into(),
        hostname: "elsewhere".into(),
        pid,
        pid_start: None,
        holder: Some("ghost".into()),
        acquired_at_ms: 0,
        stale_ms: 1000,
    };
    fs::write(path, serde_json::to_vec(&info).unwrap()).unwrap();
}

fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn acquire_excludes_and_release_frees() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/dir/a.lock");
    let lease = lock::try_acquire(&path, &opts(30_000))
        .unwrap()
        .expect("free lock");
    assert!(path.exists(), "parent directories are created");
    assert!(lock::try_acquire(&path, &opts(30_000)).unwrap().is_none());
    let status = lock::inspect(&path, Duration::from_secs(30))
        .unwrap()
        .unwrap();
    let info = status.info.unwrap();
    assert_eq!(info.pid, std::process::id());
    assert_eq!(info.holder.as_deref(), Some("test"));
    assert_eq!(info.token, lease.token());
    assert!(status.same_host);
    assert_eq!(status.holder_alive, Some(true));
    assert!(!status.stale);
    lease.release().unwrap();
    assert!(
        fs::read(&path).unwrap().iter().all(|&b| b == b' '),
        "the file stays, blank: free"
    );
    assert!(lock::inspect(&path, Duration::from_secs(30))
        .unwrap()
        .is_none());
    assert!(lock::try_acquire(&path, &opts(30_000)).unwrap().is_some());
}

#[test]
fn dead_holder_on_this_host_is_taken_over_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dead.lock");
    write_record(&path, &lock::this_host().id, dead_pid());
    let status = lock::inspect(&path, Duration::from_secs(30))
        .unwrap()
        .unwrap();
    assert_eq!(status.holder_alive, Some(false));
    assert!(status.stale);
    let lease = lock::try_acquire(&path, &opts(60_000)).unwrap();
    assert!(
        lease.is_some(),
        "a dead holder's lock is taken over without waiting"
    );
}

#[test]
fn reused_pid_is_not_mistaken_for_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reused.lock");
    // Our own pid, but with another start time: the recorded process is gone.
    let mut info: LockInfo = {
        write_record(&path, &lock::this_host().id, std::process::id());
        serde_json::from_slice(&fs::read(&path).unwrap()).unwrap()
    };
    info.pid_start = Some(1);
    fs::write(&path, serde_json::to_vec(&info).unwrap()).unwrap();
    assert!(lock::try_acquire(&path, &opts(60_000)).unwrap().is_some());
}

#[tokio::test]
async fn foreign_holder_is_taken_over_after_stale_and_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreign.lock");
    // A pid that is dead here, but on another host: it must not be judged.
    write_record(&path, "another-host", dead_pid());
    assert!(lock::try_acquire(&path, &opts(300)).unwrap().is_none());
    let start = Instant::now();
    let lease = lock::acquire(&path, &opts(300), &CancellationToken::new())
        .await
        .unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "took over after {waited:?}"
    );
    assert_ne!(lease.info().host_id, "another-host");
}

#[tokio::test]
async fn heartbeat_keeps_a_live_lease_from_being_judged_stale() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.lock");
    let held = lock::try_acquire(&path, &opts(100)).unwrap().unwrap();
    // A waiter that cannot use the pid check (it pretends nothing) still must
    // not take over during 5 stale periods because the heartbeat progresses.
    let o = LockOptions {
        timeout: Some(Duration::from_millis(500)),
        ..opts(100)
    };
    let err = lock::acquire(&path, &o, &CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "ENKLOCKED");
    assert!(err.to_string().contains("'test'"), "{err}");
    assert!(!held.is_lost());
    held.release().unwrap();
}

#[tokio::test]
async fn broken_lease_is_reported_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.lock");
    let lease = lock::try_acquire(&path, &opts(40)).unwrap().unwrap();
    let lost = lease.lost_token();
    let broken = lock::break_lock(&path).unwrap().expect("was held");
    assert_eq!(broken.token, lease.token());
    tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
        .await
        .expect("the heartbeat notices the loss");
    assert!(lease.is_lost());
    // Someone else takes it; our release must not remove their lock.
    let other = lock::try_acquire(&path, &opts(30_000)).unwrap().unwrap();
    let err = lease.release().unwrap_err();
    assert_eq!(err.code(), "ENKLOCKLOST");
    assert_eq!(
        lock::inspect(&path, Duration::from_secs(30))
            .unwrap()
            .unwrap()
            .info
            .unwrap()
            .token,
        other.token(),
        "a lost holder's release leaves the new holder's lock alone"
    );
    other.release().unwrap();
}

#[tokio::test]
async fn abort_and_timeout_and_bad_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("abort.lock");
    let _held = lock::try_acquire(&path, &opts(30_000)).unwrap().unwrap();
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        c2.cancel();
    });
    let err = lock::acquire(&path, &opts(30_000), &cancel)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "ENKABORTED");

    let zero = LockOptions {
        timeout: Some(Duration::ZERO),
        ..opts(30_000)
    };
    let err = lock::acquire(&path, &zero, &CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "ENKLOCKED");

    for bad in ["", "a/", "x\0y"] {
        let err = lock::try_acquire(Path::new(bad), &opts(1000)).unwrap_err();
        assert_eq!(err.code(), "ENKSPEC", "{bad:?}");
    }
}

#[tokio::test]
async fn waiter_acquires_after_release() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wake.lock");
    let held = lock::try_acquire(&path, &opts(30_000)).unwrap().unwrap();
    let p2 = path.clone();
    let waiter = tokio::spawn(async move {
        let lease = lock::acquire(&p2, &opts(30_000), &CancellationToken::new())
            .await
            .unwrap();
        (Instant::now(), lease)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let released = Instant::now();
    held.release().unwrap();
    let (got, lease) = waiter.await.unwrap();
    // How fast is measured by bench/, not asserted here.
    assert!(got >= released);
    lease.release().unwrap();
}

#[tokio::test]
async fn a_lock_file_deleted_by_hand_is_reported_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deleted.lock");
    let lease = lock::try_acquire(&path, &opts(40)).unwrap().unwrap();
    fs::remove_file(&path).unwrap();
    let newcomer = lock::try_acquire(&path, &opts(30_000))
        .unwrap()
        .expect("the path is free");
    tokio::time::timeout(Duration::from_secs(5), lease.lost_token().cancelled())
        .await
        .expect("the old holder learns its file is gone");
    assert_eq!(lease.release().unwrap_err().code(), "ENKLOCKLOST");
    assert_eq!(
        lock::inspect(&path, Duration::from_secs(30))
            .unwrap()
            .unwrap()
            .info
            .unwrap()
            .token,
        newcomer.token()
    );
}

#[test]
fn release_reports_a_lock_file_deleted_or_replaced_while_held() {
    // Before any renewal could notice (30 s stale period: the first one is
    // 7.5 s away), release itself tells the holder that the lock file it
    // held was deleted, or had another renamed over it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gone.lock");
    let lease = lock::try_acquire(&path, &opts(30_000)).unwrap().unwrap();
    fs::remove_file(&path).unwrap();
    assert_eq!(lease.release().unwrap_err().code(), "ENKLOCKLOST");

    let lease = lock::try_acquire(&path, &opts(30_000)).unwrap().unwrap();
    let other = dir.path().join("other.lock");
    fs::write(&other, "").unwrap();
    fs::rename(&other, &path).unwrap();
    assert_eq!(lease.release().unwrap_err().code(), "ENKLOCKLOST");
    // The file now at the path is free and untouched by that release.
    assert!(fs::read(&path).unwrap().is_empty());
    lock::try_acquire(&path, &opts(30_000))
        .unwrap()
        .expect("free")
        .release()
        .unwrap();
}

#[test]
fn a_lock_file_replaced_by_hand_is_never_locked_through_an_old_descriptor() {
    // This process keeps lock files open between acquisitions; a file
    // replaced at the path must be read afresh, not through the old one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replaced.lock");
    lock::try_acquire(&path, &opts(30_000))
        .unwrap()
        .unwrap()
        .release()
        .unwrap();
    // A holder on another host, in a new file renamed over the old one.
    let other = dir.path().join("other.lock");
    write_record(&other, "another-host", 1);
    fs::rename(&other, &path).unwrap();
    assert!(
        lock::try_acquire(&path, &opts(30_000)).unwrap().is_none(),
        "the new file's holder holds it"
    );
    // Deleted by hand: a new file is made and taken.
    fs::remove_file(&path).unwrap();
    let lease = lock::try_acquire(&path, &opts(30_000)).unwrap().unwrap();
    let on_disk: LockInfo =
        serde_json::from_slice(fs::read(&path).unwrap().trim_ascii_end()).unwrap();
    assert_eq!(on_disk.token, lease.token());
    lease.release().unwrap();
}
