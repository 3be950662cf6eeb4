//! Restart policies and backoff, per service (pure: the caller gives the
//! time).
//!
//! A death (an exit, a removal, a failed health check, a failed restart)
//! is judged by the service's `restart` policy: restart, or hold. Restarts
//! of a service back off: the first after a healthy run is immediate, the
//! next ones wait [`FIRST_DELAY`] and twice as long each time, up to its
//! `restart_backoff_max`. Once it has stayed healthy [`HEALTHY_RESET`], the
//! count starts over (as moby's restart manager does after a 10 s run).

use std::time::{Duration, Instant};

use crate::config::RestartPolicy;
use crate::provider::{Exit, ExitKind};

/// The delay before the second restart in a row.
pub(super) const FIRST_DELAY: Duration = Duration::from_millis(100);

/// A service healthy this long starts its backoff over.
pub(super) const HEALTHY_RESET: Duration = Duration::from_secs(10);

/// What to do about a death.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Decision {
    /// Restart it after `delay` (its `attempt`-th restart in a row).
    Restart { attempt: u32, delay: Duration },
    /// Do not restart it, for this reason.
    Hold(String),
}

/// What the watcher keeps about one service.
#[derive(Debug, Clone)]
pub(super) struct Tracker {
    pub(super) policy: RestartPolicy,
    pub(super) max_delay: Duration,
    /// Deaths since it last stayed healthy [`HEALTHY_RESET`] (the
    /// backoff's exponent and `on-failure`'s count).
    pub(super) streak: u32,
    /// Restarts this watcher made.
    pub(super) restarts: u32,
    /// Since when it runs healthy (None while down or starting).
    pub(super) healthy_since: Option<Instant>,
    /// When its restart is due, while one is scheduled.
    pub(super) due: Option<Instant>,
    /// The delay of that restart.
    pub(super) delay: Option<Duration>,
    /// Why it is not restarted, while it is held.
    pub(super) held: Option<String>,
    /// The last death, once seen, and when (RFC 3339).
    pub(super) last_exit: Option<(Exit, String)>,
    /// Health check failures in a row (while it runs).
    pub(super) probe_failures: u32,
}

impl Tracker {
    pub(super) fn new(policy: RestartPolicy, max_delay: Duration) -> Tracker {
        Tracker {
            policy,
            max_delay,
            streak: 0,
            restarts: 0,
            healthy_since: None,
            due: None,
            delay: None,
            held: None,
            last_exit: None,
            probe_failures: 0,
        }
    }

    /// The delay before the `attempt`-th restart in a row.
    pub(super) fn delay_of(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let doublings = (attempt - 2).min(30);
        FIRST_DELAY
            .saturating_mul(1 << doublings)
            .min(self.max_delay)
    }

    /// A death (`exit`) at `now`: restart per the policy (and schedule it),
    /// or hold.
    pub(super) fn on_death(&mut self, exit: &Exit, now: Instant) -> Decision {
        self.last_exit = Some((exit.clone(), crate::state::now()));
        self.settle_healthy(now);
        self.healthy_since = None;
        self.probe_failures = 0;
        let by_user = matches!(exit.kind, ExitKind::Stopped | ExitKind::Removed);
        let hold = match self.policy {
            RestartPolicy::No => Some("restart: no".to_string()),
            RestartPolicy::UnlessStopped if by_user => {
                Some(format!("{exit} (restart: unless-stopped)"))
            }
            RestartPolicy::OnFailure { .. } if by_user || exit.success() => {
                Some(format!("{exit} (restart: {})", self.policy))
            }
            RestartPolicy::OnFailure { max: Some(max) } if self.streak >= max => Some(format!(
                "gave up after {max} restart(s) in a row (restart: {})",
                self.policy
            )),
            _ => None,
        };
        if let Some(why) = hold {
            self.hold(why.clone());
            return Decision::Hold(why);
        }
        self.streak += 1;
        let delay = self.delay_of(self.streak);
        self.held = None;
        self.due = Some(now + delay);
        self.delay = Some(delay);
        Decision::Restart {
            attempt: self.streak,
            delay,
        }
    }

    /// Holds it: no restart until something releases it.
    pub(super) fn hold(&mut self, why: String) {
        self.held = Some(why);
        self.due = None;
        self.delay = None;
    }

    /// A restart is being made now (its due time has come).
    pub(super) fn restarting(&mut self) {
        self.due = None;
        self.delay = None;
    }

    /// It came up healthy (after a restart, or a configuration change).
    pub(super) fn on_healthy(&mut self, now: Instant) {
        self.healthy_since.get_or_insert(now);
        self.due = None;
        self.delay = None;
        self.held = None;
        self.probe_failures = 0;
    }

    /// Starts over: a new deployment (its configuration changed) or a
    /// user's `up` of it.
    pub(super) fn reset(&mut self) {
        self.streak = 0;
        self.held = None;
        self.due = None;
        self.delay = None;
        self.probe_failures = 0;
    }

    /// When its backoff will start over if it stays healthy (None when
    /// there is nothing to start over).
    pub(super) fn reset_due(&self) -> Option<Instant> {
        (self.streak > 0)
            .then_some(self.healthy_since)
            .flatten()
            .map(|t| t + HEALTHY_RESET)
    }

    /// Starts the backoff over once it has stayed healthy long enough;
    /// returns whether it did.
    pub(super) fn settle_healthy(&mut self, now: Instant) -> bool {
        if self.reset_due().is_some_and(|t| now >= t) {
            self.streak = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn crash() -> Exit {
        Exit::code(1)
    }

    fn restart_delays(t: &mut Tracker, n: usize, now: Instant) -> Vec<Duration> {
        (0..n)
            .map(|_| match t.on_death(&crash(), now) {
                Decision::Restart { delay, .. } => delay,
                Decision::Hold(why) => panic!("held: {why}"),
            })
            .collect()
    }

    #[test]
    fn the_first_restart_is_immediate_then_100ms_doubling_to_the_cap() {
        let mut t = Tracker::new(RestartPolicy::Always, Duration::from_secs(1));
        let now = Instant::now();
        assert_eq!(
            restart_delays(&mut t, 7, now),
            [
                ms(0),
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1000),
                ms(1000)
            ]
        );
        let mut t = Tracker::new(RestartPolicy::Always, Duration::from_secs(60));
        let d = restart_delays(&mut t, 40, now);
        assert_eq!(*d.last().unwrap(), Duration::from_secs(60));
    }

    #[test]
    fn staying_healthy_ten_seconds_starts_the_backoff_over() {
        let mut t = Tracker::new(RestartPolicy::Always, Duration::from_secs(60));
        let t0 = Instant::now();
        restart_delays(&mut t, 3, t0);
        t.on_healthy(t0);
        assert_eq!(t.reset_due(), Some(t0 + HEALTHY_RESET));
        // Dies before 10 s: the backoff goes on.
        let d = restart_delays(&mut t, 1, t0 + ms(9_999));
        assert_eq!(d, [ms(400)]);
        t.on_healthy(t0 + ms(10_000));
        assert!(!t.settle_healthy(t0 + ms(19_999)));
        assert!(t.settle_healthy(t0 + ms(20_000)));
        assert_eq!(restart_delays(&mut t, 2, t0 + ms(20_001)), [ms(0), ms(100)]);
        // Also when nobody looked at the 10 s mark: the death judges it.
        t.on_healthy(t0 + ms(30_000));
        assert_eq!(restart_delays(&mut t, 1, t0 + ms(45_000)), [ms(0)]);
    }

    #[test]
    fn policies_decide_in_composes_words() {
        let now = Instant::now();
        let decide = |p: RestartPolicy, exit: Exit| Tracker::new(p, ms(1000)).on_death(&exit, now);
        let user_stop = Exit::new(ExitKind::Stopped);
        let removed = Exit::new(ExitKind::Removed);
        let restarts = |d: Decision| matches!(d, Decision::Restart { .. });
        for exit in [crash(), Exit::code(0), user_stop.clone(), removed.clone()] {
            assert!(
                restarts(decide(RestartPolicy::Always, exit.clone())),
                "{exit}"
            );
            assert!(!restarts(decide(RestartPolicy::No, exit.clone())), "{exit}");
        }
        let unless = RestartPolicy::UnlessStopped;
        assert!(restarts(decide(unless, crash())));
        assert!(restarts(decide(unless, Exit::code(0))));
        assert!(!restarts(decide(unless, user_stop.clone())));
        assert!(!restarts(decide(unless, removed.clone())));
        let on_failure = RestartPolicy::OnFailure { max: None };
        assert!(restarts(decide(on_failure, crash())));
        assert!(restarts(decide(on_failure, Exit::new(ExitKind::Unhealthy))));
        assert!(restarts(decide(on_failure, Exit::new(ExitKind::Gone))));
        assert!(!restarts(decide(on_failure, Exit::code(0))));
        assert!(!restarts(decide(on_failure, user_stop)));
        match decide(RestartPolicy::No, crash()) {
            Decision::Hold(why) => assert_eq!(why, "restart: no"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn on_failure_max_counts_restarts_in_a_row() {
        let now = Instant::now();
        let mut t = Tracker::new(RestartPolicy::OnFailure { max: Some(2) }, ms(1000));
        assert_eq!(restart_delays(&mut t, 2, now).len(), 2);
        match t.on_death(&crash(), now) {
            Decision::Hold(why) => assert!(why.contains("gave up after 2"), "{why}"),
            d => panic!("{d:?}"),
        }
        assert!(t.held.is_some() && t.due.is_none());
        // A healthy 10 s run gives it its restarts back.
        t.reset();
        t.on_healthy(now);
        assert_eq!(restart_delays(&mut t, 2, now + HEALTHY_RESET).len(), 2);
    }
}
