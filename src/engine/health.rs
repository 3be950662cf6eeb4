//! Waiting for an instance to become healthy: its `healthcheck` command,
//! else its port, else its staying up for a moment.
//!
//! nanokit runs a `healthcheck` itself (in the container, for Docker), from
//! the moment the instance starts, until the first success: dense while it
//! starts, the gap after each probe a twentieth of the time waited so far
//! (at least [`FIRST_PROBE`], at most the check's `interval`), so that a
//! service is released soon after it becomes ready (within about 5% of its
//! start-up time plus one probe) without a slow starter being probed
//! hundreds of times. Until failures count, a provider that can run the
//! check in a loop of its own does (Docker: one exec instead of one per
//! probe, [`Provider::probe_until`]). A probe is
//! cut at `timeout`. Failures count only after `start_period`, and at most
//! one per `interval`, as Docker counts them, so nanokit never fails a
//! service that the runtime's own check would still call `starting`. At most
//! [`PROBES_IN_FLIGHT`](super::run::PROBES_IN_FLIGHT) probes of one run are
//! in flight; a healthy instance is not probed again. The error says which
//! check failed and quotes the last probe output. A passing probe counts
//! only while the instance still runs, and an instance that exits fails at
//! once with its log ([`super::live`]).

use std::time::{Duration, Instant};

use tracing::{info_span, Instrument};

use super::hooks::indent;
use super::report::{Phase, StepError};
use super::run::Run;
use crate::config::Service;
#[cfg(doc)]
use crate::provider::Provider;
use crate::provider::{InstanceSpec, Probe};
use crate::sys::command::tail;
use crate::trace;

/// The gap after a service's first `healthcheck` probes (the shortest).
pub(super) const FIRST_PROBE: Duration = Duration::from_millis(20);

/// The longest a provider's own check loop runs ([`Provider::probe_until`]).
const LOOP_AT_MOST: Duration = Duration::from_secs(10);

/// The gap after a probe grows with the time waited: this fraction of it.
const GAP_PER_WAITED: u32 = 20;

/// How one service's health is probed.
struct Check {
    probe: Probe,
    /// The shortest gap after a probe (see [`Check::gap`]), up to
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

    /// The gap after a probe that ended `waited` after the instance
    /// started: a twentieth of that, at least `first`, at most `interval`.
    fn gap(&self, waited: Duration) -> Duration {
        (waited / GAP_PER_WAITED).clamp(self.first, self.interval.max(self.first))
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
        let mut last = String::new();
        let exit = self.watch_exit(&svc.name, id);
        let exited = || self.exited(&svc.name, "the instance exited while starting");
        if let Probe::Command(argv) = &check.probe {
            // Until failures count, the provider may run the check in a loop
            // of its own (one exec instead of one per probe).
            let window = (check.start_period + check.interval).min(LOOP_AT_MOST);
            let passed = {
                let _slot = tokio::select! {
                    slot = self.probes.acquire() => slot,
                    _ = self.opts.cancel.cancelled() => return Err(StepError::Cancelled),
                    _ = exit.wait() => return Err(exited().await),
                };
                let looped = self
                    .provider
                    .probe_until(id, spec, argv, window, check.timeout)
                    .instrument(
                        info_span!("probe", nanokit.service = %svc.name, nanokit.looped = true),
                    );
                tokio::select! {
                    r = looped => r?,
                    _ = self.opts.cancel.cancelled() => return Err(StepError::Cancelled),
                    _ = exit.wait() => return Err(exited().await),
                }
            };
            if passed.is_some() {
                probes += 1;
                trace::set(span, "nanokit.probes", i64::from(probes));
            }
            if passed == Some(true) {
                if !exit.happened() && self.is_running(id).await {
                    return Ok(());
                }
                return Err(exited().await);
            }
        }
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
                    let probe = self
                        .provider
                        .probe(id, spec, &check.probe, check.timeout)
                        .instrument(info_span!("probe", nanokit.service = %svc.name));
                    tokio::select! {
                        r = probe => r?,
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
                _ = tokio::time::sleep(check.gap(t0.elapsed())) => {}
                _ = self.opts.cancel.cancelled() => return Err(StepError::Cancelled),
                _ = exit.wait() => {}
            }
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
    fn probes_are_dense_while_starting_and_thin_out_with_the_time_waited() {
        let c = command(1000, 0);
        // The first second: 20 ms apart, so a service ready at +500 ms is
        // seen within 20 ms and a probe.
        assert_eq!(c.gap(ms(0)), ms(20));
        assert_eq!(c.gap(ms(400)), ms(20));
        assert_eq!(c.gap(ms(500)), ms(25));
        // A slow starter: a twentieth of the wait, never beyond `interval`.
        assert_eq!(c.gap(ms(4000)), ms(200));
        assert_eq!(c.gap(ms(60_000)), ms(1000));
        // An interval shorter than the first gap is the gap.
        let mut short = command(10, 0);
        short.first = FIRST_PROBE.min(short.interval);
        assert_eq!(short.gap(ms(0)), ms(10));
        assert_eq!(short.gap(ms(5000)), ms(10));
    }

    #[test]
    fn the_running_check_counts_once_its_grace_is_over() {
        let mut c = command(100, 200);
        c.probe = Probe::Running;
        assert!(!c.counts(ms(199), 0));
        assert!(c.counts(ms(200), 0));
    }
}
