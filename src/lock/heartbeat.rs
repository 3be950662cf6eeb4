//! One background thread renews every lease this process holds.
//!
//! It is a plain OS thread, not a Node timer, so it never keeps Node's event
//! loop alive. Renewal happens outside the registry's mutex so that taking and
//! releasing locks never waits on another lock's filesystem I/O.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A lease the heartbeat keeps alive.
pub(super) trait Renewed: Send + Sync {
    /// Renews it; false when it is no longer ours (it is then dropped).
    fn renew(&self) -> bool;
    /// Its stale period: it is renewed four times per period.
    fn stale(&self) -> Duration;
    /// Releases it (at process exit).
    fn release(&self);
}

type Held = dyn Renewed;

struct Entry {
    held: Arc<Held>,
    next: Instant,
}

struct Registry {
    entries: Mutex<Entries>,
    wake: Condvar,
}

#[derive(Default)]
struct Entries {
    list: Vec<Entry>,
    /// When the thread is due to wake up next (None: running or idle forever).
    wakes_at: Option<Instant>,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        std::thread::Builder::new()
            .name("nanokit-heartbeat".into())
            .spawn(run)
            .expect("spawn the lock heartbeat thread");
        Registry {
            entries: Mutex::new(Entries::default()),
            wake: Condvar::new(),
        }
    })
}

/// How often a lease with this stale period is renewed: four times per
/// period, so a waiter sees progress well before it could judge the lease stale.
pub(super) fn interval(stale: Duration) -> Duration {
    (stale / 4).max(Duration::from_millis(5))
}

pub(super) fn register(held: Arc<Held>) {
    let reg = registry();
    let next = Instant::now() + interval(held.stale());
    let mut entries = reg.entries.lock().unwrap();
    entries.list.push(Entry { held, next });
    // Wake the thread only if it would otherwise sleep past this lease's
    // first renewal: a thread wake-up costs more than the whole acquisition.
    if entries.wakes_at.is_none_or(|at| next < at) {
        reg.wake.notify_one();
    }
}

pub(super) fn unregister(held: &Held) {
    let reg = registry();
    reg.entries
        .lock()
        .unwrap()
        .list
        .retain(|e| !std::ptr::addr_eq(Arc::as_ptr(&e.held), held));
}

/// Every lease currently held by this process (for release at exit).
pub(super) fn all() -> Vec<Arc<Held>> {
    registry()
        .entries
        .lock()
        .unwrap()
        .list
        .iter()
        .map(|e| e.held.clone())
        .collect()
}

fn run() {
    let reg = registry();
    let mut entries = reg.entries.lock().unwrap();
    loop {
        let now = Instant::now();
        entries.wakes_at = None;
        let due: Vec<Arc<Held>> = entries
            .list
            .iter()
            .filter(|e| e.next <= now)
            .map(|e| e.held.clone())
            .collect();
        if !due.is_empty() {
            drop(entries);
            let lost: Vec<Arc<Held>> = due.into_iter().filter(|h| !h.renew()).collect();
            entries = reg.entries.lock().unwrap();
            let now = Instant::now();
            entries
                .list
                .retain(|e| !lost.iter().any(|l| Arc::ptr_eq(l, &e.held)));
            for e in entries.list.iter_mut().filter(|e| e.next <= now) {
                e.next = now + interval(e.held.stale());
            }
            continue;
        }
        let next = entries.list.iter().map(|e| e.next).min();
        entries.wakes_at = next;
        let wait = next.map_or(Duration::from_secs(3600), |n| {
            n.saturating_duration_since(now)
        });
        entries = reg.wake.wait_timeout(entries, wait).unwrap().0;
    }
}
