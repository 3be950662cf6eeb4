//! Stopping, removing and waiting for containers. On the Docker host the
//! stop signal is sent to the container's process directly (through a pidfd
//! checked against the container's control group, as `docker stop` would
//! send it); elsewhere the daemon stops it. A removal first waits (bounded)
//! for the daemon to finish the stop. The exit of a container is its wait
//! API's notice.

use super::*;

/// How long [`Provider::remove`] waits for the daemon to finish a stop
/// before it removes the container regardless (`force`).
pub(super) const REMOVE_WAITS_FOR_STOP: Duration = Duration::from_secs(10);

/// Waits (at most [`REMOVE_WAITS_FOR_STOP`]) until the daemon counts
/// container `id` as not running, or it is gone.
pub(super) async fn wait_stopped(d: &Docker, id: &str) {
    wait_for(d, id, "not-running").await
}

/// Waits (at most [`REMOVE_WAITS_FOR_STOP`]) until container `id` is gone.
pub(super) async fn wait_removed(d: &Docker, id: &str) {
    wait_for(d, id, "removed").await
}

pub(super) async fn wait_for(d: &Docker, id: &str, condition: &str) {
    let options = WaitContainerOptions {
        condition: condition.into(),
    };
    let _ = tokio::time::timeout(
        REMOVE_WAITS_FOR_STOP,
        d.wait_container(id, Some(options)).next(),
    )
    .await;
}

impl DockerProvider {
    /// Returns once the container's process has exited, which is what a
    /// dependency's stop waits for, while the daemon may still be tearing
    /// the container down (its network, its mounts): [`Provider::remove`]
    /// waits for that. On the Docker host, nanokit signals the process
    /// itself (see [`signal_directly`]); elsewhere it asks the daemon to
    /// stop the container and waits for the whole stop.
    pub(super) async fn stop_container(
        &self,
        id: &str,
        grace: Duration,
    ) -> Result<(), ProviderError> {
        let d = self.docker().await?;
        let c = match d
            .inspect_container(id, None::<InspectContainerOptions>)
            .instrument(tracing::info_span!("docker.inspect"))
            .await
        {
            Ok(c) => c,
            Err(e) if status_of(&e) == Some(404) => return Ok(()),
            Err(e) => return Err(docker_err(&format!("inspecting container {id}"), e)),
        };
        if c.state.as_ref().and_then(|st| st.running) != Some(true) {
            return Ok(());
        }
        let direct = signal_directly(id, &c);
        crate::trace::set(
            &tracing::Span::current(),
            "nanokit.signalled_by",
            if direct.is_some() {
                "nanokit"
            } else {
                "docker"
            },
        );
        let mut grace = grace;
        if let Some(held) = direct {
            if tokio::time::timeout(grace, held.exited()).await.is_ok() {
                return Ok(());
            }
            // The grace period is over: what `docker stop` does next.
            if held.signal(rustix::process::Signal::KILL).is_ok() {
                held.exited().await;
                return Ok(());
            }
            // Served already: the daemon is to kill at once.
            grace = Duration::ZERO;
        }
        let options = StopContainerOptions {
            t: Some(grace.as_secs().min(i32::MAX as u64) as i32),
            ..Default::default()
        };
        match d.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if matches!(status_of(&e), Some(304) | Some(404)) => Ok(()),
            Err(e) => Err(docker_err(&format!("stopping container {id}"), e)),
        }
    }

    pub(super) async fn remove_container(&self, id: &str) -> Result<(), ProviderError> {
        let d = self.docker().await?;
        // After a stop that signalled the process directly, the daemon may
        // still count the container as running until it has torn it down;
        // a forced removal then would have it kill the dead process again
        // (a `runc kill` for nothing). So wait for that, within a bound.
        wait_stopped(d, id).await;
        match d
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            // "removal of container … is already in progress"
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) => Err(docker_err(&format!("removing container {id}"), e)),
        }
    }

    /// When the daemon reports the container not running (its wait API),
    /// or gone. Should the wait break off (the daemon restarting), the
    /// container is looked at and waited for again.
    pub(super) async fn wait_exit(&self, id: &str) {
        loop {
            if let Ok(d) = self.docker().await {
                let options = WaitContainerOptions {
                    condition: "not-running".into(),
                };
                match d.wait_container(id, Some(options)).next().await {
                    Some(Ok(_)) | Some(Err(DockerError::DockerContainerWaitError { .. })) => return,
                    Some(Err(e)) if status_of(&e) == Some(404) => return,
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if matches!(
                self.inspect(id).await,
                Ok(None) | Ok(Some(Instance { running: false, .. }))
            ) {
                return;
            }
        }
    }
}

/// Sends container `c`'s stop signal to its process directly, as the daemon
/// would on `docker stop`, and returns the process held, when nanokit can
/// and may: the process is visible here (nanokit on the Docker host, in its
/// pid namespace) and in the container's control group, and the container
/// has no restart policy (the daemon would restart a process it did not see
/// stopped). Otherwise None, and the daemon is asked instead.
///
/// Why: each `docker stop` costs the daemon a `runc kill` and queues behind
/// its other work; on a busy host that was most of `down`'s time.
pub(super) fn signal_directly(
    id: &str,
    c: &bollard::models::ContainerInspectResponse,
) -> Option<proc::Held> {
    let policy = c
        .host_config
        .as_ref()
        .and_then(|h| h.restart_policy.as_ref())
        .and_then(|p| p.name);
    if !matches!(
        policy,
        None | Some(
            bollard::models::RestartPolicyNameEnum::EMPTY
                | bollard::models::RestartPolicyNameEnum::NO
        )
    ) {
        return None;
    }
    let signal = match c.config.as_ref().and_then(|c| c.stop_signal.as_deref()) {
        None | Some("") => rustix::process::Signal::TERM,
        Some(name) => proc::signal_named(name)?,
    };
    let pid = c.state.as_ref()?.pid.and_then(|p| u32::try_from(p).ok())?;
    let held = proc::Held::in_container(pid, id)?;
    held.signal(signal).ok()?;
    Some(held)
}
