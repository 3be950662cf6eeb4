//! Commands and probes in containers: Docker execs with a timeout, health
//! checks run as such execs until the container's own HEALTHCHECK has a
//! verdict (then that verdict), and TCP probes of its address on the env's
//! network (a published host port is answered by Docker's proxy
//! even when nothing listens inside, so it proves nothing).

use super::*;
use crate::sys::proc;

impl DockerProvider {
    /// [`Provider::exec`]: `argv` in the container through a Docker exec;
    /// at the timeout the exec's process tree is killed where it is visible.
    pub(super) async fn exec_in(
        &self,
        id: &str,
        spec: &InstanceSpec,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, ProviderError> {
        let d = self.docker().await?;
        let mut env = Self::env_list(spec);
        env.extend(command_labels(&spec.labels).map(|(k, v)| format!("{k}={v}")));
        let exec = d
            .create_exec(
                id,
                CreateExecOptions {
                    cmd: Some(argv.to_vec()),
                    env: Some(env),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| docker_err(&format!("exec in {id}"), e))?;
        let mut text = String::new();
        let run = async {
            if let StartExecResults::Attached { mut output, .. } = d
                .start_exec(&exec.id, None::<StartExecOptions>)
                .await
                .map_err(|e| docker_err(&format!("exec in {id}"), e))?
            {
                while let Some(chunk) = output.next().await {
                    match chunk {
                        Ok(c) => text.push_str(&String::from_utf8_lossy(&c.into_bytes())),
                        Err(e) => return Err(docker_err(&format!("exec in {id}"), e)),
                    }
                }
            }
            Ok(())
        };
        let finished = tokio::time::timeout(timeout, run).await;
        let info = d
            .inspect_exec(&exec.id)
            .await
            .map_err(|e| docker_err(&format!("exec in {id}"), e))?;
        match finished {
            Ok(r) => {
                r?;
                Ok(ExecOutput {
                    code: info.exit_code.map(|c| c as i32),
                    timed_out: false,
                    output: text,
                })
            }
            Err(_) => {
                // Docker has no way to stop an exec; its process is ours to
                // kill when it runs on this host.
                let container = info.container_id.as_deref().unwrap_or_default();
                let killed = info.running == Some(true)
                    && info.pid.is_some_and(|pid| kill_exec_tree(pid, container));
                let what = if killed {
                    "it was killed"
                } else if info.running == Some(true) {
                    "it may still run in the container: nanokit is not on the Docker host"
                } else {
                    "it has ended since"
                };
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(&format!(
                    "timed out after {} ({what})",
                    humantime::format_duration(timeout)
                ));
                Ok(ExecOutput {
                    code: None,
                    timed_out: true,
                    output: text,
                })
            }
        }
    }

    /// [`Provider::probe`]: the container's Docker health status for a
    /// command check, a TCP connect to its address for a port.
    pub(super) async fn probe_instance(
        &self,
        id: &str,
        spec: &InstanceSpec,
        probe: &Probe,
        timeout: Duration,
    ) -> Result<ProbeResult, ProviderError> {
        let d = self.docker().await?;
        // A command check runs beside the inspect that fetches Docker's
        // verdict (which wins when there is one): one round trip less per
        // probe while the service starts, when it matters.
        let exec = async {
            match probe {
                Probe::Command(argv) => Some(self.exec_in(id, spec, argv, timeout).await),
                _ => None,
            }
        };
        let (c, exec) = tokio::join!(
            d.inspect_container(id, None::<InspectContainerOptions>),
            exec
        );
        let c = match c {
            Ok(c) => c,
            Err(e) if status_of(&e) == Some(404) => {
                return Ok(ProbeResult {
                    ok: false,
                    output: format!("container {id} is gone"),
                    fatal: true,
                })
            }
            Err(e) => return Err(docker_err(&format!("inspecting container {id}"), e)),
        };
        let st = c.state.clone().unwrap_or_default();
        let running = st.running.unwrap_or(false);
        match probe {
            Probe::Running => Ok(ProbeResult {
                ok: running,
                output: String::new(),
                fatal: false,
            }),
            Probe::Command(_) => {
                let health = st.health.unwrap_or_default();
                let docker_says = || {
                    health
                        .log
                        .as_ref()
                        .and_then(|l| l.last())
                        .map(|r| {
                            format!(
                                "Docker's last health check: exit code {}: {}",
                                r.exit_code.unwrap_or(-1),
                                r.output.clone().unwrap_or_default().trim_end()
                            )
                        })
                        .unwrap_or_default()
                };
                // Docker's verdict when it has one, so that the two never
                // disagree; before it, the check run here, at once. A
                // container that no longer runs has no verdict (Docker
                // marks it unhealthy when it stops).
                match health.status {
                    _ if !running => Ok(ProbeResult {
                        ok: false,
                        output: format!("container {id} is not running"),
                        fatal: false,
                    }),
                    Some(HealthStatusEnum::HEALTHY) => Ok(ProbeResult {
                        ok: true,
                        output: docker_says(),
                        fatal: false,
                    }),
                    Some(HealthStatusEnum::UNHEALTHY) => {
                        // Ours, which ran beside, then Docker's.
                        let ours = match exec {
                            Some(Ok(out)) => ProbeResult::of_command(out).output,
                            _ => String::new(),
                        };
                        let output = [ours, docker_says()]
                            .into_iter()
                            .filter(|o| !o.is_empty())
                            .collect::<Vec<_>>()
                            .join("\n");
                        Ok(ProbeResult {
                            ok: false,
                            output,
                            fatal: true,
                        })
                    }
                    _ => Ok(ProbeResult::of_command(
                        exec.expect("a command check has its exec")?,
                    )),
                }
            }
            Probe::Port(p) => {
                let inner = spec.expose.unwrap_or(*p);
                let ip = c
                    .network_settings
                    .and_then(|n| n.networks)
                    .and_then(|n| n.get(&self.network).cloned())
                    .and_then(|e| e.ip_address)
                    .filter(|ip| !ip.is_empty());
                let addr: SocketAddr = match ip.and_then(|ip| ip.parse().ok()) {
                    Some(ip) => SocketAddr::new(ip, inner),
                    None => SocketAddr::from(([127, 0, 0, 1], *p)),
                };
                Ok(
                    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await
                    {
                        Ok(Ok(_)) => ProbeResult {
                            ok: true,
                            output: String::new(),
                            fatal: false,
                        },
                        Ok(Err(e)) => ProbeResult {
                            ok: false,
                            output: format!("{addr} (port {inner} of container {id}): {e}"),
                            fatal: false,
                        },
                        Err(_) => ProbeResult {
                            ok: false,
                            output: format!("{addr}: connect timed out"),
                            fatal: false,
                        },
                    },
                )
            }
        }
    }
}

impl DockerProvider {
    /// [`Provider::probe_until`]: one exec of a shell loop that runs the
    /// check every 20 ms (its output discarded) until it passes or `within`
    /// is over: each separate probe is a Docker exec, which a busy daemon
    /// takes 50 to 500 ms to run, while the loop sees the check pass within
    /// 20 ms. The exec is cut `timeout` after `within` (a check that hangs
    /// holds the loop up to then). None when the container has no `sh` (or
    /// no fractional `sleep`), or the loop was cut.
    pub(super) async fn loop_probe(
        &self,
        id: &str,
        spec: &InstanceSpec,
        argv: &[String],
        within: Duration,
        timeout: Duration,
    ) -> Result<Option<bool>, ProviderError> {
        const EVERY_MS: u128 = 20;
        const NOT_YET: i32 = 75;
        let rounds = (within.as_millis() / EVERY_MS).max(1);
        let script = format!(
            "i=0; while [ $i -lt {rounds} ]; do \"$@\" >/dev/null 2>&1 && exit 0; i=$((i+1)); sleep 0.02 || exit 76; done; exit {NOT_YET}"
        );
        let mut cmd = vec![
            "sh".to_string(),
            "-c".to_string(),
            script,
            "nanokit-probe".to_string(),
        ];
        cmd.extend(argv.iter().cloned());
        let out = self.exec_in(id, spec, &cmd, within + timeout).await?;
        Ok(match out.code {
            Some(0) => Some(true),
            Some(NOT_YET) => Some(false),
            _ => None,
        })
    }
}

/// SIGKILLs a timed-out exec's process and its descendants that are in
/// `container`'s control group, if `pid` (its pid as Docker reports it, in
/// the daemon's pid namespace) is visible here: nanokit may run elsewhere
/// than the daemon, or in another pid namespace. (The command may have
/// replaced itself with `exec`, so its command line proves nothing.)
fn kill_exec_tree(pid: i64, container: &str) -> bool {
    let Ok(pid) = u32::try_from(pid) else {
        return false;
    };
    let mut killed = false;
    for p in proc::tree(pid) {
        if let Some(held) = proc::Held::in_container(p, container) {
            killed |= held.signal(rustix::process::Signal::KILL).is_ok();
        }
    }
    killed
}
