//! Unit tests of the compare-and-swap (they need its internals).

use std::fs;
use std::os::unix::fs::FileExt;
use std::time::{Duration, UNIX_EPOCH};

use super::file::Target;
use super::record::{new_info, read_record};
use super::wait::{attempt, Attempt, Judged};
use super::{host, this_host, LockOptions};

fn record(host_id: &str, pid: u32, token: char) -> Vec<u8> {
    let mut info = new_info(&LockOptions::default());
    info.host_id = host_id.into();
    info.pid = pid;
    info.pid_start = None;
    info.token = std::iter::repeat_n(token, 32).collect();
    info.acquired_at_ms = 1;
    serde_json::to_vec(&info).unwrap()
}

/// A torn read outside the section can yield a dead holder's pid while
/// the stat already shows a live holder's write: the takeover must
/// compare the bytes it judged, not only the observation.
#[test]
fn takeover_replaces_only_the_bytes_that_were_judged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.lock");
    let target = Target::user(&path);
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let here = this_host().id.clone();

    // The judged bytes: a dead holder's record on this host.
    let judged = record(&here, dead, 'd');
    fs::write(&path, &judged).unwrap();
    let seen = read_record(target).unwrap();
    assert!(!host::process_alive(seen.info.as_ref().unwrap().pid, None));

    // A live holder's record of the same length, at the same mtime: the
    // same observation, other bytes.
    let live = record(&here, std::process::id(), 'l');
    assert_eq!(live.len(), judged.len());
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&live, 0).unwrap();
    let mtime = UNIX_EPOCH + Duration::new(seen.obs.mtime.0 as u64, seen.obs.mtime.1 as u32);
    file.set_times(fs::FileTimes::new().set_modified(mtime))
        .unwrap();
    drop(file);
    assert_eq!(
        read_record(target).unwrap().obs,
        seen.obs,
        "the same observation"
    );

    let opts = LockOptions::default();
    let replace = |content: &[u8]| {
        attempt(
            target,
            &opts,
            Some(Judged {
                seen: &seen.obs,
                content,
                why: "dead holder's",
            }),
        )
        .unwrap()
    };
    assert!(
        matches!(replace(&judged), Attempt::Held),
        "took over bytes it never judged"
    );
    assert_eq!(fs::read(&path).unwrap(), live, "the live record is intact");

    // Judged on what is there, the same call takes it over.
    match replace(&live) {
        Attempt::Acquired(lease) => lease.release().unwrap(),
        _ => panic!("a takeover of exactly what was judged must succeed"),
    }
}

/// `inspect` counts the contenders waiting now: each holds a slot of the
/// waiters file while it waits and gives it up when it gets the lock or
/// gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_counts_the_waiters_while_they_wait() {
    use tokio_util::sync::CancellationToken;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.lock");
    let opts = LockOptions::default();
    let held = super::try_acquire(&path, &opts).unwrap().expect("free");
    let waiters_now = || {
        super::inspect(&path, super::DEFAULT_STALE)
            .unwrap()
            .map_or(0, |s| s.waiters)
    };
    assert_eq!(waiters_now(), 0);
    let cancel = CancellationToken::new();
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let (path, opts, cancel) = (path.clone(), opts.clone(), cancel.clone());
            tokio::spawn(async move { super::acquire(&path, &opts, &cancel).await })
        })
        .collect();
    let until = |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while waiters_now() != n {
            assert!(std::time::Instant::now() < deadline, "never {n} waiters");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    tokio::task::block_in_place(|| until(3));
    held.release().unwrap();
    // One takes it; the other two still wait.
    tokio::task::block_in_place(|| until(2));
    cancel.cancel();
    for w in waiting {
        if let Ok(lease) = w.await.unwrap() {
            lease.release().unwrap();
        }
    }
    let after = super::try_acquire(&path, &opts)
        .unwrap()
        .expect("free again");
    assert_eq!(waiters_now(), 0, "nobody waits any more");
    after.release().unwrap();
}
