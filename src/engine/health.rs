//! Waiting for an instance to become healthy: its `healthcheck` command,
//! else its port, else its staying up for a moment. The error says which
//! check failed and quotes the last probe output.

use std::time::{Duration, Instant};

use tracing::info_span;

use super::hooks::indent;
use super::report::{Phase, StepError};
use super::run::Run;
use crate::config::Service;
use crate::provider::{InstanceSpec, Probe};
use crate::sys::command::tail;
use crate::trace;

/// How one service's health is probed.
struct Check {
    probe: Probe,
    interval: Duration,
    timeout: Duration,
    /// Failed probes (after `start_period`) that fail the service.
    retries: u32,
    start_period: Duration,
    /// With a runtime-evaluated check the runtime counts retries; the engine
    /// only polls its verdict, often, until this cap.
    native_cap: Option<Duration>,
}

impl Check {
    fn of(svc: &Service, native: bool) -> Check {
        let native_cap = svc.healthcheck.as_ref().filter(|_| native).map(|h| {
            h.start_period + (h.interval + h.timeout) * (h.retries + 1) + Duration::from_secs(10)
        });
        let check = |probe, interval, timeout, retries, start_period| Check {
            probe,
            interval,
            timeout,
            retries,
            start_period,
            native_cap,
        };
        match (&svc.healthcheck, svc.port.or(svc.expose)) {
            (Some(h), _) if native => check(
                Probe::Command(h.test.clone()),
                Duration::from_millis(100),
                h.timeout,
                u32::MAX,
                Duration::ZERO,
            ),
            (Some(h), _) => check(
                Probe::Command(h.test.clone()),
                h.interval,
                h.timeout,
                h.retries,
                h.start_period,
            ),
            (None, Some(p)) => check(
                Probe::Port(p),
                Duration::from_millis(50),
                Duration::from_secs(1),
                u32::MAX,
                Duration::ZERO,
            ),
            (None, None) => check(
                Probe::Running,
                Duration::from_millis(100),
                Duration::from_secs(1),
                1,
                Duration::from_millis(200),
            ),
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
        );
        trace::step_masked(span, &self.mask, self.wait_healthy(id, svc, spec, started)).await
    }

    /// Waits until healthy; the error carries the last probe output.
    async fn wait_healthy(
        &self,
        id: &str,
        svc: &Service,
        spec: &InstanceSpec,
        started: Instant,
    ) -> Result<(), StepError> {
        self.emit(&svc.name, Phase::Health, started, None);
        let t0 = Instant::now();
        let check = Check::of(svc, self.provider.native_healthcheck());
        let mut failures = 0u32;
        let mut last = String::new();
        loop {
            if self.opts.cancel.is_cancelled() {
                return Err(StepError::Cancelled);
            }
            self.still_running(id, svc).await?;
            let in_grace = t0.elapsed() < check.start_period;
            if !(matches!(check.probe, Probe::Running) && in_grace) {
                let r = self
                    .provider
                    .probe(id, spec, &check.probe, check.timeout)
                    .await?;
                if r.ok {
                    return Ok(());
                }
                last = r.output;
                if r.fatal {
                    let test = match &check.probe {
                        Probe::Command(argv) => argv.join(" "),
                        _ => String::new(),
                    };
                    return Err(StepError::failed(format!(
                        "health check `{test}` reported unhealthy after {:.1}s; last probe output:\n{}",
                        t0.elapsed().as_secs_f64(),
                        indent(&tail(&last, 20))
                    )));
                }
                if !in_grace {
                    failures += 1;
                }
            }
            let capped = (matches!(check.probe, Probe::Port(_))
                && t0.elapsed() >= self.opts.health_timeout)
                || check.native_cap.is_some_and(|c| t0.elapsed() >= c);
            if failures >= check.retries || capped {
                return Err(StepError::failed(format!(
                    "{} failed after {failures} attempt(s) in {:.1}s; last probe output:\n{}",
                    check.what(),
                    t0.elapsed().as_secs_f64(),
                    indent(&tail(&last, 20))
                )));
            }
            tokio::select! {
                _ = tokio::time::sleep(check.interval) => {}
                _ = self.opts.cancel.cancelled() => return Err(StepError::Cancelled),
            }
        }
    }

    /// Fails with the service's last log lines when instance `id` exited.
    async fn still_running(&self, id: &str, svc: &Service) -> Result<(), StepError> {
        if self.is_running(id).await {
            return Ok(());
        }
        let logs = self.provider.logs(&svc.name, 20).await.unwrap_or_default();
        Err(StepError::failed(format!(
            "the instance exited while starting; last log lines:\n{}",
            indent(&logs)
        )))
    }
}
