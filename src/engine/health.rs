//! Waiting for an instance to become healthy: its `healthcheck` command,
//! else its port, else its staying up for a moment.
//!
//! nanokit runs a `healthcheck` itself (in the container, for Docker), from
//! the moment the instance starts: probes come [`FIRST_PROBE`] apart and back
//! off towards the check's `interval`, until the first success. A probe is
//! cut at `timeout`. Failures count only after `start_period`, and at most
//! one per `interval`, as Docker counts them, so nanokit never fails a
//! service that the runtime's own check would still call `starting`. At most
//! [`PROBES_IN_FLIGHT`](super::run::PROBES_IN_FLIGHT) probes of one run are
//! in flight; a healthy instance is not probed again. The error says which
//! check failed and quotes the last probe output. A passing probe counts
//! only while the instance still runs, and an instance that exits fails at
//! once with its log ([`super::live`]).

use std::time::{Duration, Instant};

use tracing::info_span;

use super::hooks::indent;
use super::report::{Phase, StepError};
use super::run::Run;
use crate::config::Service;
use crate::provider::{InstanceSpec, Probe};
use crate::sys::command::tail;
use crate::trace;

/// The gap after a service's first `healthcheck` probes.
pub(super) const FIRST_PROBE: Duration = Duration::from_millis(100);

/// How one service's health is probed.
struct Check {
    probe: Probe,
    /// The gap after the first probe; it grows by half each time, up to
    /// `interval`.
    first: Duration,
    interval: Duration,
    timeout: Duration,
    /// Counted failures that fail the service.
    retries: u32,
    start_period: Duration,
    /// Give up after this long whatever the count (port probes).
    cap: Option<Duration>,
}

impl Check {
    fn of(svc: &Service, health_timeout: Duration) -> Check {
        match (&svc.healthcheck, svc.port.or(svc.expose)) {
            (Some(h), _) => Check {
                probe: Probe::Command(h.test.clone()),
                first: FIRST_PROBE.min(h.interval),
                interval: h.interval,
                timeout: h.timeout,
                retries: h.retries,
                start_period: h.start_period,
                cap: None,
            },
            (None, Some(p)) => Check {
                probe: Probe::Port(p),
                first: Duration::from_millis(50),
                interval: Duration::from_millis(50),
                timeout: Duration::from_secs(1),
                retries: u32::MAX,
                start_period: Duration::ZERO,
                cap: Some(health_timeout),
            },
            (None, None) => Check {
                probe: Probe::Running,
                first: Duration::from_millis(100),
                interval: Duration::from_millis(100),
                timeout: Duration::from_secs(1),
                retries: 1,
                start_period: Duration::from_millis(200),
                cap: None,
            },
        }
    }

    /// Whether a failed probe that started `at` (since the instance
    /// started) counts, with `counted` failures counted so far: the n-th
    /// counts from `start_period` + n × `interval` on, where Docker's own
    /// n-th probe after `start_period` would come at the earliest.
    fn counts(&self, at: Duration, counted: u32) -> bool {
        match self.probe {
            Probe::Running => at >= self.start_period,
            _ => at >= self.start_period + self.interval.saturating_mul(counted.saturating_add(1)),
        }
    }

    /// `health check `…``, `port 8080 check`, `running check`.
    fn what(&self) -> String {
        match &self.probe {
            Probe::Command(argv) => format!("health check `{}`", argv.join(" ")),
            Probe::Port(p) => format!("port {p} check"),
            Probe::Running => "running check".into(),
        }
    }
}

impl Run {
    /// [`Self::wait_healthy`] in a `health` span.
    pub(super) async fn health(
        &self,
        id: &str,
        svc: &Service,
        spec: &InstanceSpec,
        started: Instant,
    ) -> Result<(), StepError> {
        let span = info_span!(
            "health",
            nanokit.service = %svc.name,
            nanokit.instance = id,
            nanokit.replica = spec.replica,
            nanokit.replicas = spec.replicas,
            nanokit.probes = tracing::field::Empty,
        );
        trace::step_masked(
            span.clone(),
            &self.mask,
            self.wait_healthy(id, svc, spec, started, &span),
        )
        .await
    }

    /// Waits until healthy; the error carries the last probe output.
    async fn wait_healthy(
        &self,
        id: &str,
        svc: &Service,
        spec: &InstanceSpec,
        started: Instant,
        span: &tracing::Span,
    ) -> Result<(), StepError> {
        self.emit(&svc.name, Phase::Health, started, None);
        let t0 = Instant::now();
        let check = Check::of(svc, self.opts.health_timeout);
        let (mut counted, mut probes) = (0u32, 0u32);
        let mut gap = check.first;
        let mut last = String::new();
        let exit = self.watch_exit(&svc.name, id);
        let exited = || self.exited(&svc.name, "the instance exited while starting");
        loop {
            if self.opts.cancel.is_cancelled() {
                return Err(StepError::Cancelled);
            }
            if exit.happened() {
                return Err(exited().await);
            }
            let at = t0.elapsed();
            if !(matches!(check.probe, Probe::Running) && at < check.start_period) {
                let r = {
                    let _slot = tokio::select! {
                        slot = self.probes.acquire() => slot,
                        _ = self.opts.cancel.cancelled() => return Err(StepError::Cancelled),
                        _ = exit.wait() => return Err(exited().await),
                    };
                    tokio::select! {
                        r = self.provider.probe(id, spec, &check.probe, check.timeout) => r?,
                        _ = exit.wait() => return Err(exited().await),
                    }
                };
                probes += 1;
                trace::set(span, "nanokit.probes", i64::from(probes));
                // The verdict holds only for a live instance: the answer
                // may have come from another process (on its port).
                if r.ok && !exit.happened() && self.is_running(id).await {
                    return Ok(());
                }
                if r.ok {
                    return Err(exited().await);
                }
                if r.fatal {
                    // The runtime's verdict, with the last output of ours.
                    let outputs = [last.trim_end(), r.output.trim_end()];
                    return Err(StepError::failed(format!(
                        "{} is unhealthy, as the runtime's own check reports after {:.1}s; last probe output:\n{}",
                        check.what(),
                        t0.elapsed().as_secs_f64(),
                        indent(tail(&outputs.join("\n"), 20).trim_start())
                    )));
                }
                last = r.output;
                if check.counts(at, counted) {
                    counted += 1;
                }
            }
            if counted >= check.retries || check.cap.is_some_and(|c| t0.elapsed() >= c) {
                let why = match check.probe {
                    Probe::Command(_) => {
                        format!("is unhealthy: {counted} failure(s) counted after the start period")
                    }
                    _ => "failed".into(),
                };
                return Err(StepError::failed(format!(
                    "{} {why} ({probes} probe(s) in {:.1}s); last probe output:\n{}",
                    check.what(),
                    t0.elapsed().as_secs_f64(),
                    indent(&tail(&last, 20))
                )));
            }
            tokio::select! {
                _ = tokio::time::sleep(gap) => {}
                _ = self.opts.cancel.cancelled() => return Err(StepError::Cancelled),
                _ = exit.wait() => {}
            }
            gap = (gap + gap / 2).min(check.interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(interval_ms: u64, start_period_ms: u64) -> Check {
        Check {
            probe: Probe::Command(vec!["true".into()]),
            first: FIRST_PROBE,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_secs(1),
            retries: 3,
            start_period: Duration::from_millis(start_period_ms),
            cap: None,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn failures_in_the_start_period_do_not_count() {
        let c = command(1000, 5000);
        assert!(!c.counts(ms(0), 0));
        assert!(!c.counts(ms(4999), 0));
        // Docker's first probe after the start period comes an interval on.
        assert!(!c.counts(ms(5999), 0));
        assert!(c.counts(ms(6000), 0));
    }

    #[test]
    fn at_most_one_failure_counts_per_interval() {
        let c = command(1000, 0);
        // The fast first probes fail without counting until Docker's first
        // probe would have run; then one per interval.
        assert!(!c.counts(ms(100), 0));
        assert!(!c.counts(ms(999), 0));
        assert!(c.counts(ms(1000), 0));
        assert!(!c.counts(ms(1500), 1));
        assert!(c.counts(ms(2000), 1));
        assert!(!c.counts(ms(2900), 2));
        assert!(c.counts(ms(3000), 2));
    }

    #[test]
    fn the_running_check_counts_once_its_grace_is_over() {
        let mut c = command(100, 200);
        c.probe = Probe::Running;
        assert!(!c.counts(ms(199), 0));
        assert!(c.counts(ms(200), 0));
    }
}
