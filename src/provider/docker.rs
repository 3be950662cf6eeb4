//! The Docker provider, on `bollard` (the daemon's HTTP API over its unix
//! socket, or `DOCKER_HOST`), with the API version negotiated down to what
//! the daemon speaks (Debian's engine 20.10 speaks 1.41).
//!
//! * **Names**: containers `nk-<project>-<env>-<service>` (`…-<n>` per
//!   replica when a service has several); when the name is taken (a rolling
//!   update starts the new replica while the old one still runs) a short
//!   random suffix is added. Networks `nanokit-net-<env>`, where every
//!   container is reachable by its service name. Named volumes
//!   `nk-<project>-<env>-<volume>` unless `volumes.<v>.name` names a Docker
//!   volume (shared with other projects).
//! * **Labels**: the engine's labels in Docker style (`nk-project`,
//!   `nk-env`, `nk-service`, `nk-replica`, `nk-config-hash`, `nk-state-id`,
//!   `nk-lineage`). Live state is observed with one label-filtered list call,
//!   so containers are found again even when `state.json` was lost.
//! * **Health**: `healthcheck` becomes the container's Docker HEALTHCHECK and
//!   the engine polls the container's health status
//!   ([`Provider::native_healthcheck`]); the failure reports the last health
//!   log entry. A port-only service is probed by a TCP connect to the
//!   container's address on its network (`expose`): the published host port
//!   is answered by Docker's userland proxy even when nothing listens inside,
//!   so connecting to it proves nothing.
//! * **Provisioning on shared volumes** (`provisioning.install`): the lock
//!   `.nk-install-lock` and the sentinel `.nk-installed-<hash>` live in the
//!   volume itself, reached through its mountpoint on the Docker host
//!   (`docker volume inspect` → `Mountpoint`); the lock is nanokit's own
//!   lease lock (`crate::lock`), and the install runs in a short-lived
//!   installer container that mounts the volume. Why not a shell protocol
//!   inside the container (`mkdir` lock + sentinel file)? Such a lock cannot
//!   tell a dead holder from a slow one: a SIGKILLed `nanokit up` would leave
//!   it held until some timeout, and a timeout-based takeover can let two
//!   installers run at once. The lease lock records the holder's pid and
//!   process start time, so a holder killed on this host is detected at
//!   once, and a holder on another host by its stopped heartbeat; takeover is
//!   a compare-and-swap. Two separate `nanokit up` runs on the same Docker
//!   host (two terminals, two CI jobs) coordinate through that file. The new
//!   holder first removes any installer container left by a dead holder
//!   (labelled with the volume), so two installs never overlap. This needs
//!   nanokit to run on the Docker host, with access to `/var/lib/docker`
//!   (as the daemon's volumes are root-owned); otherwise provisioning fails
//!   with an error that says so.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, EndpointSettings, HealthConfig,
    HealthStatusEnum, HostConfig, Mount, MountType, NetworkCreateRequest, NetworkingConfig,
    PortBinding, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, InspectNetworkOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, RemoveVolumeOptions, StopContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use super::*;

/// Docker label of an engine label key: `NK_CONFIG_HASH` → `nk-config-hash`.
pub fn docker_label(key: &str) -> String {
    key.to_ascii_lowercase().replace('_', "-")
}

/// Label of the installer containers: the volume (or directory) they install into.
const LABEL_INSTALL_TARGET: &str = "nk-install-target";
const LABEL_ROLE: &str = "nk-role";

/// The Docker provider of one project and environment.
pub struct DockerProvider {
    client: OnceCell<Docker>,
    project: String,
    env: String,
    state_id: String,
    network: String,
    network_ready: OnceCell<()>,
    /// Config volume name → Docker volume name.
    volumes: BTreeMap<String, String>,
}

impl std::fmt::Debug for DockerProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerProvider")
            .field("project", &self.project)
            .field("env", &self.env)
            .finish()
    }
}

fn daemon_address() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
}

/// A bollard error as a provider error: transport failures mean the daemon
/// is unreachable; the daemon's own refusals keep its message.
fn docker_err(what: &str, e: DockerError) -> ProviderError {
    match e {
        DockerError::DockerResponseServerError { message, .. } => {
            ProviderError::Failed(format!("{what}: {}", message.trim()))
        }
        DockerError::HyperResponseError { .. }
        | DockerError::IOError { .. }
        | DockerError::RequestTimeoutError
        | DockerError::HyperLegacyError { .. }
        | DockerError::SocketNotFoundError(_) => ProviderError::Unreachable(format!(
            "{what}: cannot reach the Docker daemon at {}: {e}; is dockerd running (and may this user use its socket)?",
            daemon_address()
        )),
        other => ProviderError::Failed(format!("{what}: {other}")),
    }
}

fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// SIGKILLs a timed-out exec's process and its descendants, if `pid` (its
/// pid as Docker reports it, in the host's pid namespace) is visible here and
/// runs the command we started: nanokit may run elsewhere than the daemon.
fn kill_exec_tree(pid: i64, argv: &[String]) -> bool {
    let Ok(pid) = u32::try_from(pid) else {
        return false;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let expected: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    if pid == 0 || cmdline != expected {
        return false;
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", tree[i]));
        for task in tasks.into_iter().flatten().flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            tree.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    for p in tree {
        // SAFETY: kill with a pid we just read from /proc.
        unsafe { libc::kill(p as libc::pid_t, libc::SIGKILL) };
    }
    true
}

/// Docker's answer for a container whose network no longer exists.
fn network_gone(e: &DockerError) -> bool {
    match e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => *status_code == 404 && message.contains("network"),
        _ => false,
    }
}

fn nanos(d: Duration) -> i64 {
    d.as_nanos().min(i64::MAX as u128) as i64
}

impl DockerProvider {
    pub fn new(config: &crate::config::Config, scope: Scope) -> Result<Self, ProviderError> {
        let volumes = config
            .volumes
            .values()
            .map(|v| {
                (
                    v.name.clone(),
                    v.external_name
                        .clone()
                        .unwrap_or_else(|| format!("nk-{}-{}-{}", config.name, config.env, v.name)),
                )
            })
            .collect();
        Ok(DockerProvider {
            client: OnceCell::new(),
            project: scope.project,
            env: scope.env.clone(),
            state_id: scope.state_id,
            network: format!("nanokit-net-{}", scope.env),
            network_ready: OnceCell::new(),
            volumes,
        })
    }

    /// The client, connected and version-negotiated on first use (one
    /// `/version` call per run).
    async fn docker(&self) -> Result<&Docker, ProviderError> {
        self.client
            .get_or_try_init(|| async {
                let d = Docker::connect_with_defaults()
                    .map_err(|e| docker_err("connecting to Docker", e))?;
                d.negotiate_version()
                    .await
                    .map_err(|e| docker_err("connecting to Docker", e))
            })
            .await
    }

    fn volume_name(&self, name: &str) -> String {
        self.volumes
            .get(name)
            .cloned()
            .unwrap_or_else(|| format!("nk-{}-{}-{name}", self.project, self.env))
    }

    fn base_name(&self, spec: &InstanceSpec) -> String {
        let base = format!("nk-{}-{}-{}", self.project, self.env, spec.service);
        if spec.replicas > 1 {
            format!("{base}-{}", spec.replica)
        } else {
            base
        }
    }

    fn labels(&self, spec: &InstanceSpec) -> HashMap<String, String> {
        spec.labels
            .iter()
            .map(|(k, v)| (docker_label(k), v.clone()))
            .collect()
    }

    fn instance_of(
        id: String,
        labels: &HashMap<String, String>,
        running: bool,
    ) -> Option<Instance> {
        let service = labels.get(&docker_label(LABEL_SERVICE))?.clone();
        Some(Instance {
            id,
            service,
            config_hash: labels
                .get(&docker_label(LABEL_HASH))
                .cloned()
                .unwrap_or_default(),
            running,
            pid: None,
            replica: labels
                .get(&docker_label(LABEL_REPLICA))
                .and_then(|r| r.parse().ok())
                .unwrap_or(0),
            lineage: labels.get(&docker_label(LABEL_LINEAGE)).cloned(),
        })
    }

    /// The env's network exists (checked once per provider).
    async fn ensure_network(&self) -> Result<(), ProviderError> {
        self.network_ready
            .get_or_try_init(|| self.make_network())
            .await
            .map(|_| ())
    }

    /// Creates the env's network unless it exists.
    async fn make_network(&self) -> Result<(), ProviderError> {
        let d = self.docker().await?;
        match d
            .inspect_network(&self.network, None::<InspectNetworkOptions>)
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(docker_err(&format!("network {}", self.network), e)),
        }
        let mut labels = HashMap::new();
        labels.insert(docker_label(LABEL_ENV), self.env.clone());
        match d
            .create_network(NetworkCreateRequest {
                name: self.network.clone(),
                driver: Some("bridge".into()),
                labels: Some(labels),
                ..Default::default()
            })
            .await
        {
            Ok(_) => Ok(()),
            // Created meanwhile by another run.
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) => Err(docker_err(
                &format!("cannot create network {}", self.network),
                e,
            )),
        }
    }

    /// Binds and volume mounts of `spec`, and its working directory.
    fn mounts(&self, spec: &InstanceSpec) -> (Vec<String>, Vec<Mount>, Option<String>) {
        let mut binds = Vec::new();
        let mut workdir = None;
        if spec.path_given {
            binds.push(format!("{}:/app", spec.dir.display()));
            workdir = Some("/app".to_string());
        }
        for (host, target) in &spec.mounts {
            binds.push(format!("{}:{target}", host.display()));
        }
        let mounts = spec
            .volumes
            .iter()
            .map(|(name, target)| Mount {
                typ: Some(MountType::VOLUME),
                source: Some(self.volume_name(name)),
                target: Some(target.clone()),
                ..Default::default()
            })
            .collect();
        (binds, mounts, workdir)
    }

    fn env_list(spec: &InstanceSpec) -> Vec<String> {
        spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// Creates a container named `name` (or `name-<suffix>` when taken).
    ///
    /// A container holding `name` that carries the very labels of the one
    /// being created (same state, service, replica and configuration) is a
    /// leftover of an interrupted run that nothing recorded: a killed `up`'s
    /// last create request still completes in the daemon, possibly after the
    /// next run looked. It is removed and the name reused, instead of
    /// running twice. (The old container of a rolling update differs in its
    /// configuration hash, so it keeps the name and the new one is suffixed.)
    async fn create_named(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, DockerError> {
        let d = self
            .docker()
            .await
            .map_err(|_| DockerError::RequestTimeoutError)?;
        let mut attempt = name.to_string();
        let mut cleared = false;
        for _ in 0..5 {
            match d
                .create_container(
                    Some(CreateContainerOptions {
                        name: Some(attempt.clone()),
                        ..Default::default()
                    }),
                    body.clone(),
                )
                .await
            {
                Ok(r) => return Ok(r.id),
                Err(e) if status_of(&e) == Some(409) => {
                    if !cleared && attempt == name && self.is_leftover(name, &body).await {
                        cleared = true;
                        tracing::warn!(
                            container = name,
                            "removing an unrecorded copy left by an interrupted run"
                        );
                        self.remove_quietly(name).await;
                        continue;
                    }
                    attempt = format!("{name}-{:06x}", fastrand::u32(..0x0100_0000));
                }
                Err(e) => return Err(e),
            }
        }
        Err(DockerError::DockerResponseServerError {
            status_code: 409,
            message: format!("the container name {name} and its alternatives are all taken"),
        })
    }

    /// Whether the container `name` carries the same instance labels as
    /// `body` (see [`Self::create_named`]).
    async fn is_leftover(&self, name: &str, body: &ContainerCreateBody) -> bool {
        let Ok(d) = self.docker().await else {
            return false;
        };
        let Ok(c) = d
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        else {
            return false;
        };
        let theirs = c.config.and_then(|c| c.labels).unwrap_or_default();
        let ours = body.labels.clone().unwrap_or_default();
        [LABEL_STATE_ID, LABEL_SERVICE, LABEL_REPLICA, LABEL_HASH]
            .iter()
            .map(|k| docker_label(k))
            .all(|k| ours.contains_key(&k) && ours.get(&k) == theirs.get(&k))
    }

    /// Every container, running or not, carrying all of `labels` (`key=value`).
    async fn list_labelled(
        &self,
        labels: Vec<String>,
    ) -> Result<Vec<bollard::models::ContainerSummary>, ProviderError> {
        let d = self.docker().await?;
        let filters = HashMap::from([("label".to_string(), labels)]);
        d.list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(|e| docker_err("listing containers", e))
    }

    async fn remove_quietly(&self, id: &str) {
        if let Ok(d) = self.docker().await {
            let _ = d
                .remove_container(
                    id,
                    Some(RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
        }
    }

    async fn logs_of(&self, id: &str, lines: usize) -> Result<String, ProviderError> {
        let d = self.docker().await?;
        let mut stream = d.logs(
            id,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: lines.to_string(),
                ..Default::default()
            }),
        );
        let mut out = String::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => out.push_str(&String::from_utf8_lossy(&c.into_bytes())),
                Err(e) => return Err(docker_err(&format!("logs of {id}"), e)),
            }
        }
        Ok(out)
    }

    /// Host directory holding the provisioning lock and sentinel of `spec`:
    /// the mountpoint of its first named volume, else its `path`.
    async fn provision_dir(&self, spec: &InstanceSpec) -> Result<(PathBuf, String), ProviderError> {
        let Some((vol, _)) = spec.volumes.first() else {
            return Ok((spec.dir.clone(), spec.dir.display().to_string()));
        };
        let name = self.volume_name(vol);
        let d = self.docker().await?;
        let v = d
            .inspect_volume(&name)
            .await
            .map_err(|e| docker_err(&format!("volume {name}"), e))?;
        let dir = PathBuf::from(&v.mountpoint);
        if v.mountpoint.is_empty() || !dir.is_dir() {
            return Err(ProviderError::Failed(format!(
                "service `{}`: the mountpoint `{}` of volume {name} is not reachable from here; provisioning a shared volume needs nanokit to run on the Docker host with access to the daemon's volumes (as root, or a user who may read {})",
                spec.service,
                v.mountpoint,
                Path::new(&v.mountpoint).parent().map(|p| p.display().to_string()).unwrap_or_default()
            )));
        }
        Ok((dir, name))
    }

    /// Runs the install in a fresh installer container; waits for it.
    async fn run_installer(
        &self,
        spec: &InstanceSpec,
        install: &str,
        target: &str,
        hash: &str,
    ) -> Result<crate::repo::InstallRun, ProviderError> {
        let d = self.docker().await?;
        // We hold the lock: any installer still there belongs to a holder
        // that died; it must not write alongside ours.
        let leftovers = self
            .list_labelled(vec![format!("{LABEL_INSTALL_TARGET}={target}")])
            .await?;
        for c in leftovers {
            if let Some(id) = c.id {
                tracing::info!("removing installer container {id} left by a dead run");
                self.remove_quietly(&id).await;
            }
        }
        let image = spec
            .install_image
            .clone()
            .or_else(|| spec.image.clone())
            .ok_or_else(|| {
                ProviderError::Failed(format!("service `{}` has no image", spec.service))
            })?;
        let (binds, mounts, workdir) = self.mounts(spec);
        let mut env = Self::env_list(spec);
        env.push(format!("NANOKIT_PROVISION_HASH={hash}"));
        let mut labels = HashMap::new();
        labels.insert(LABEL_ROLE.to_string(), "installer".to_string());
        labels.insert(LABEL_INSTALL_TARGET.to_string(), target.to_string());
        labels.insert(docker_label(LABEL_PROJECT), self.project.clone());
        labels.insert(docker_label(LABEL_ENV), self.env.clone());
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: Some(vec!["sh".into(), "-c".into(), install.to_string()]),
            env: Some(env),
            labels: Some(labels),
            working_dir: workdir,
            host_config: Some(HostConfig {
                binds: Some(binds),
                mounts: Some(mounts),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!("nk-{}-{}-{}-install", self.project, self.env, spec.service);
        let id = self.create_named(&name, body).await.map_err(|e| {
            image_hint(
                &image,
                docker_err(
                    &format!(
                        "service `{}`: cannot create the installer container",
                        spec.service
                    ),
                    e,
                ),
            )
        })?;
        // Removed on every exit path, also when this future is dropped
        // (Ctrl-C, a lost lease).
        let guard = RemoveOnDrop {
            docker: d.clone(),
            id: Some(id.clone()),
        };
        d.start_container(
            &id,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .map_err(|e| {
            docker_err(
                &format!("service `{}`: cannot start the installer", spec.service),
                e,
            )
        })?;
        let code = loop {
            let c = d
                .inspect_container(&id, None::<InspectContainerOptions>)
                .await
                .map_err(|e| docker_err("installer container", e))?;
            let st = c.state.unwrap_or_default();
            if !st.running.unwrap_or(false) {
                break st.exit_code.unwrap_or(-1);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let output = self.logs_of(&id, 200).await.unwrap_or_default();
        drop(guard);
        Ok(crate::repo::InstallRun {
            success: code == 0,
            status: format!("exit code {code} in the installer container of image {image}"),
            output: Some(output),
        })
    }
}

/// Adds what to do about a missing image to `e`.
fn image_hint(image: &str, e: ProviderError) -> ProviderError {
    match e {
        ProviderError::Failed(m) if m.contains("No such image") || m.contains("not found") => {
            ProviderError::Failed(format!(
                "{m} (image `{image}` is not on this Docker host; nanokit does not pull images: `docker pull {image}` or build it first)"
            ))
        }
        other => other,
    }
}

/// Force-removes a container when dropped.
struct RemoveOnDrop {
    docker: Docker,
    id: Option<String>,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let (Some(id), Ok(rt)) = (self.id.take(), tokio::runtime::Handle::try_current()) {
            let d = self.docker.clone();
            rt.spawn(async move {
                let _ = d
                    .remove_container(
                        &id,
                        Some(RemoveContainerOptions {
                            force: true,
                            ..Default::default()
                        }),
                    )
                    .await;
            });
        }
    }
}

#[async_trait]
impl Provider for DockerProvider {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn observe(&self, scope: &Scope) -> Result<Vec<Instance>, ProviderError> {
        let list = self
            .list_labelled(vec![
                format!("{}={}", docker_label(LABEL_STATE_ID), scope.state_id),
                format!("{}={}", docker_label(LABEL_ENV), scope.env),
            ])
            .await?;
        let mut out: Vec<Instance> = list
            .into_iter()
            .filter_map(|c| {
                let running = c.state == Some(ContainerSummaryStateEnum::RUNNING);
                Self::instance_of(c.id?, &c.labels.unwrap_or_default(), running)
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service).then(a.replica.cmp(&b.replica)));
        Ok(out)
    }

    async fn inspect(&self, id: &str) -> Result<Option<Instance>, ProviderError> {
        let d = self.docker().await?;
        match d
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => {
                let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
                if labels.get(&docker_label(LABEL_STATE_ID)) != Some(&self.state_id) {
                    return Ok(None);
                }
                let st = c.state.unwrap_or_default();
                let running = st.running.unwrap_or(false) && !st.restarting.unwrap_or(false);
                Ok(Self::instance_of(
                    c.id.unwrap_or_else(|| id.to_string()),
                    &labels,
                    running,
                ))
            }
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(docker_err(&format!("inspecting container {id}"), e)),
        }
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProviderError> {
        let image = spec.image.clone().ok_or_else(|| {
            ProviderError::Failed(format!("service `{}` has no image", spec.service))
        })?;
        self.ensure_network().await?;
        let (binds, mounts, workdir) = self.mounts(spec);
        let container_port = spec.expose.or(spec.port);
        let exposed = container_port.map(|p| vec![format!("{p}/tcp")]);
        let port_bindings = match (spec.port, container_port) {
            (Some(host), Some(inner)) => {
                let mut m = HashMap::new();
                m.insert(
                    format!("{inner}/tcp"),
                    Some(vec![PortBinding {
                        host_ip: None,
                        host_port: Some(host.to_string()),
                    }]),
                );
                Some(m)
            }
            _ => None,
        };
        let healthcheck = spec.healthcheck.as_ref().map(|h| HealthConfig {
            test: Some(
                std::iter::once("CMD".to_string())
                    .chain(h.test.iter().cloned())
                    .collect(),
            ),
            interval: Some(nanos(h.interval.max(Duration::from_millis(1)))),
            timeout: Some(nanos(h.timeout.max(Duration::from_millis(1)))),
            retries: Some(h.retries as i64),
            start_period: Some(nanos(h.start_period)),
            start_interval: None,
        });
        let mut endpoints = HashMap::new();
        endpoints.insert(
            self.network.clone(),
            EndpointSettings {
                aliases: Some(vec![spec.service.clone()]),
                ..Default::default()
            },
        );
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: spec
                .command
                .as_ref()
                .map(|c| vec!["sh".to_string(), "-c".to_string(), c.clone()]),
            env: Some(Self::env_list(spec)),
            labels: Some(self.labels(spec)),
            working_dir: workdir,
            exposed_ports: exposed,
            healthcheck,
            host_config: Some(HostConfig {
                // Docker's init (tini) as PID 1: `start` runs under `sh -c`,
                // and a shell or program as PID 1 ignores SIGTERM unless it
                // installs a handler, so every stop would wait out the whole
                // grace period. The init forwards the signal and reaps zombies.
                init: Some(true),
                binds: Some(binds),
                mounts: Some(mounts),
                port_bindings,
                nano_cpus: spec.cpu.map(|c| (c * 1e9) as i64),
                memory: spec.memory.map(|m| m as i64),
                ..Default::default()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(endpoints),
            }),
            ..Default::default()
        };
        let name = self.base_name(spec);
        let d = self.docker().await?;
        // An error names the step that failed; nothing half-created stays
        // behind unrecorded.
        let create_and_start = || async {
            let id = self
                .create_named(&name, body.clone())
                .await
                .map_err(|e| ("create", e))?;
            let started = d
                .start_container(
                    &id,
                    None::<bollard::query_parameters::StartContainerOptions>,
                )
                .await;
            if let Err(e) = started {
                self.remove_quietly(&id).await;
                return Err(("start", e));
            }
            Ok(id)
        };
        let mut made = create_and_start().await;
        // The env's network may be removed by another project's `down` right
        // after we made sure of it (it goes once no container of the env is
        // left): make it again and retry once.
        if matches!(&made, Err((_, e)) if network_gone(e)) {
            self.make_network().await?;
            made = create_and_start().await;
        }
        let id = made.map_err(|(step, e)| {
            let err = docker_err(
                &format!("service `{}`: cannot {step} container {name}", spec.service),
                e,
            );
            match step {
                "create" => image_hint(&image, err),
                _ => err,
            }
        })?;
        Ok(Instance {
            id,
            service: spec.service.clone(),
            config_hash: spec.config_hash.clone(),
            running: true,
            pid: None,
            replica: spec.replica,
            lineage: spec.labels.get(LABEL_LINEAGE).cloned(),
        })
    }

    /// A killed client's last create or start request still completes in
    /// the daemon, possibly after the next run looked: look until two looks
    /// a moment apart agree (at most a few seconds).
    async fn settle(&self, scope: &Scope) -> Result<(), ProviderError> {
        let look = || async {
            let mut seen: Vec<(String, bool)> = self
                .observe(scope)
                .await?
                .into_iter()
                .map(|i| (i.id, i.running))
                .collect();
            seen.sort();
            Ok::<_, ProviderError>(seen)
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut before = look().await?;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = look().await?;
            if now == before {
                break;
            }
            before = now;
        }
        Ok(())
    }

    /// Removes the env's network once no container of the env (of any
    /// project, in any state) is left, as Compose removes its project
    /// network. A network something else still uses stays.
    async fn down_complete(&self, scope: &Scope) -> Result<(), ProviderError> {
        let env_label = format!("{}={}", docker_label(LABEL_ENV), scope.env);
        if !self.list_labelled(vec![env_label]).await?.is_empty() {
            return Ok(());
        }
        let d = self.docker().await?;
        match d.remove_network(&self.network).await {
            Ok(()) => Ok(()),
            // Gone already, or in use (another project's container was
            // created meanwhile, or something outside nanokit joined it).
            Err(e) if matches!(status_of(&e), Some(403 | 404 | 409)) => Ok(()),
            Err(e) => Err(docker_err(
                &format!("cannot remove network {}", self.network),
                e,
            )),
        }
    }

    async fn exec(
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
                let killed = info.running == Some(true)
                    && info.pid.is_some_and(|pid| kill_exec_tree(pid, argv));
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

    async fn probe(
        &self,
        id: &str,
        spec: &InstanceSpec,
        probe: &Probe,
        timeout: Duration,
    ) -> Result<ProbeResult, ProviderError> {
        let d = self.docker().await?;
        let c = match d
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
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
                let last = health
                    .log
                    .as_ref()
                    .and_then(|l| l.last())
                    .map(|r| {
                        format!(
                            "exit code {}: {}",
                            r.exit_code.unwrap_or(-1),
                            r.output.clone().unwrap_or_default().trim_end()
                        )
                    })
                    .unwrap_or_else(|| "no health check has completed yet".into());
                Ok(match health.status {
                    Some(HealthStatusEnum::HEALTHY) => ProbeResult {
                        ok: true,
                        output: last,
                        fatal: false,
                    },
                    Some(HealthStatusEnum::UNHEALTHY) => ProbeResult {
                        ok: false,
                        output: last,
                        fatal: true,
                    },
                    _ => ProbeResult {
                        ok: false,
                        output: last,
                        fatal: false,
                    },
                })
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

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), ProviderError> {
        let d = self.docker().await?;
        match d
            .stop_container(
                id,
                Some(StopContainerOptions {
                    t: Some(grace.as_secs().min(i32::MAX as u64) as i32),
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if matches!(status_of(&e), Some(304) | Some(404)) => {}
            Err(e) => return Err(docker_err(&format!("stopping container {id}"), e)),
        }
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

    async fn logs(&self, service: &str, lines: usize) -> Result<String, ProviderError> {
        let list = self
            .list_labelled(vec![
                format!("{}={}", docker_label(LABEL_STATE_ID), self.state_id),
                format!("{}={service}", docker_label(LABEL_SERVICE)),
            ])
            .await?;
        let newest = list
            .into_iter()
            .max_by_key(|c| c.created.unwrap_or(0))
            .and_then(|c| c.id)
            .ok_or_else(|| {
                ProviderError::Failed(format!("no container of service `{service}` exists"))
            })?;
        self.logs_of(&newest, lines).await
    }

    async fn create_volume(&self, name: &str) -> Result<String, ProviderError> {
        let d = self.docker().await?;
        let docker_name = self.volume_name(name);
        let mut labels = HashMap::new();
        labels.insert(docker_label(LABEL_PROJECT), self.project.clone());
        labels.insert(docker_label(LABEL_ENV), self.env.clone());
        labels.insert("nk-volume".to_string(), name.to_string());
        d.create_volume(VolumeCreateRequest {
            name: Some(docker_name.clone()),
            labels: Some(labels),
            ..Default::default()
        })
        .await
        .map_err(|e| docker_err(&format!("cannot create volume {docker_name}"), e))?;
        Ok(docker_name)
    }

    async fn delete_volume(&self, id: &str) -> Result<(), ProviderError> {
        let d = self.docker().await?;
        match d
            .remove_volume(id, Some(RemoveVolumeOptions { force: false }))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(docker_err(&format!("cannot delete volume {id}"), e)),
        }
    }

    /// The Docker volume's name (a Docker volume has no path of its own
    /// that a container could use; it is mounted by name).
    fn volume_path(&self, name: &str) -> PathBuf {
        PathBuf::from(self.volume_name(name))
    }

    fn native_healthcheck(&self) -> bool {
        true
    }

    async fn provision(
        &self,
        spec: &InstanceSpec,
        install: &str,
        manifests: &[PathBuf],
        cancel: &CancellationToken,
    ) -> Result<Provisioned, ProviderError> {
        let (dir, target) = self.provision_dir(spec).await?;
        let image = spec.install_image.clone().or_else(|| spec.image.clone());
        // The image is part of what was installed: another image, another
        // install (its toolchain produced the files).
        let command = vec![
            "sh".to_string(),
            "-c".to_string(),
            install.to_string(),
            format!("# image {}", image.unwrap_or_default()),
        ];
        let opts = crate::repo::ProvisionOptions {
            capture: true,
            lock: crate::lock::LockOptions {
                holder: Some(format!(
                    "nanokit install for `{}` ({} / {})",
                    spec.service, self.project, self.env
                )),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = crate::repo::provision_with(&dir, &command, manifests, &opts, cancel, |hash| {
            let target = target.clone();
            async move {
                self.run_installer(spec, install, &target, &hash)
                    .await
                    .map_err(|e| crate::repo::RepoError::Provision(e.to_string()))
            }
        })
        .await?;
        Ok(Provisioned { ran: r.ran })
    }
}
