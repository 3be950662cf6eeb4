//! The Docker provider, on `bollard` (the daemon's HTTP API over its unix
//! socket, or `DOCKER_HOST`, over TLS with `DOCKER_TLS_VERIFY`: [`connect`]),
//! with the API version negotiated down to what the daemon speaks (Debian's
//! engine 20.10 speaks 1.41).
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
//! * **Health**: `healthcheck` becomes the container's Docker HEALTHCHECK
//!   (so `docker ps` and other tools see the same health), and nanokit also
//!   runs it itself as an exec from the moment the container starts, instead
//!   of waiting one `interval` for Docker's first verdict. A probe takes
//!   Docker's verdict when it has one: healthy passes, unhealthy fails the
//!   wait, so what nanokit reports never contradicts Docker. A port-only service is probed by a TCP connect to the
//!   container's address on its network (`expose`): the published host port
//!   is answered by Docker's userland proxy even when nothing listens inside,
//!   so connecting to it proves nothing.
//! * **Provisioning on shared volumes**: [`install`].
//! * **Execs and probes**: [`probe`].

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
    WaitContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::sys::proc;

use super::*;

mod connect;
mod install;
mod probe;

/// Docker label of an engine label key: `NK_CONFIG_HASH` → `nk-config-hash`.
pub fn docker_label(key: &str) -> String {
    key.to_ascii_lowercase().replace('_', "-")
}

/// Label of the installer containers: the volume (or directory) they install into.
const LABEL_INSTALL_TARGET: &str = "nk-install-target";
const LABEL_ROLE: &str = "nk-role";
/// How long [`Provider::remove`] waits for the daemon to finish a stop
/// before it removes the container regardless (`force`).
const REMOVE_WAITS_FOR_STOP: Duration = Duration::from_secs(10);

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
        | DockerError::SocketNotFoundError(_) => {
            ProviderError::Unreachable(connect::unreachable(what, &e))
        }
        other => ProviderError::Failed(format!("{what}: {other}")),
    }
}

/// Waits (at most [`REMOVE_WAITS_FOR_STOP`]) until the daemon counts
/// container `id` as not running, or it is gone.
async fn wait_stopped(d: &Docker, id: &str) {
    wait_for(d, id, "not-running").await
}

/// Waits (at most [`REMOVE_WAITS_FOR_STOP`]) until container `id` is gone.
async fn wait_removed(d: &Docker, id: &str) {
    wait_for(d, id, "removed").await
}

async fn wait_for(d: &Docker, id: &str, condition: &str) {
    let options = WaitContainerOptions {
        condition: condition.into(),
    };
    let _ = tokio::time::timeout(
        REMOVE_WAITS_FOR_STOP,
        d.wait_container(id, Some(options)).next(),
    )
    .await;
}

fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Docker's answer for a container whose network no longer exists.
/// The env's network is gone, or for a moment there are two of that name
/// (two runs created it at once; see [`DockerProvider::make_network`]).
fn network_gone(e: &DockerError) -> bool {
    match e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => (*status_code == 404 && message.contains("network")) || network_ambiguous(e),
        _ => false,
    }
}

fn network_ambiguous(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { message, .. } if message.contains("is ambiguous"))
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
                let endpoint = connect::Endpoint::from_env();
                let d = connect::connect(&endpoint)?;
                d.negotiate_version()
                    .await
                    .map_err(|e| connect::failed(&endpoint, e))
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

    /// Creates the env's network unless it exists. Engines before API 1.44
    /// accept a second network of the same name, so two runs creating it
    /// at once can make two: then the extra ones are removed.
    async fn make_network(&self) -> Result<(), ProviderError> {
        let d = self.docker().await?;
        match d
            .inspect_network(&self.network, None::<InspectNetworkOptions>)
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) if network_ambiguous(&e) => return self.dedupe_network().await,
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
            Ok(_) => self.dedupe_network().await,
            // Created meanwhile by another run.
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            Err(e) => Err(docker_err(
                &format!("cannot create network {}", self.network),
                e,
            )),
        }
    }

    /// When several networks carry the env network's name, removes all but
    /// the first by creation time and id (every run picks the same one); one
    /// in use by a container stays.
    async fn dedupe_network(&self) -> Result<(), ProviderError> {
        let d = self.docker().await?;
        let mut named: Vec<_> = d
            .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
                filters: Some(HashMap::from([(
                    "name".to_string(),
                    vec![self.network.clone()],
                )])),
            }))
            .await
            .map_err(|e| docker_err(&format!("network {}", self.network), e))?
            .into_iter()
            // The filter matches substrings.
            .filter(|n| n.name.as_deref() == Some(self.network.as_str()))
            .filter_map(|n| Some((n.created.clone().unwrap_or_default(), n.id?)))
            .collect();
        named.sort();
        for (_, id) in named.iter().skip(1) {
            match d.remove_network(id).await {
                Ok(()) => {}
                Err(e) if matches!(status_of(&e), Some(403 | 404 | 409)) => {}
                Err(e) => return Err(docker_err(&format!("removing duplicate network {id}"), e)),
            }
        }
        Ok(())
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

    /// What to create for `spec`: its image and command under `sh -c`, env
    /// and labels, mounts, ports, HEALTHCHECK, limits, the env's network.
    fn container_body(&self, spec: &InstanceSpec, image: &str) -> ContainerCreateBody {
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
        ContainerCreateBody {
            image: Some(image.to_string()),
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
        }
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
        let body = self.container_body(spec, &image);
        let name = self.base_name(spec);
        let d = self.docker().await?;
        // An error names the step that failed; nothing half-created stays
        // behind unrecorded.
        let create_and_start = || async {
            let id = self
                .create_named(&name, body.clone())
                .instrument(tracing::info_span!("docker.create"))
                .await
                .map_err(|e| ("create", e))?;
            let started = d
                .start_container(
                    &id,
                    None::<bollard::query_parameters::StartContainerOptions>,
                )
                .instrument(tracing::info_span!("docker.start"))
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
    /// project, in any state) is left but `leaving`, as Compose removes its
    /// project network; of several projects' `down`s at once, the last to
    /// finish removes it. A network something else still uses stays.
    async fn down_complete(&self, scope: &Scope, leaving: &[String]) -> Result<(), ProviderError> {
        let env_label = format!("{}={}", docker_label(LABEL_ENV), scope.env);
        let d = self.docker().await?;
        // The daemon releases a container's endpoint before it reports the
        // container not running, so once `leaving` are all not running the
        // network can go while their removals are still under way.
        let torn_down = futures::future::join_all(leaving.iter().map(|id| wait_stopped(d, id)));
        let in_use = |listed: Vec<bollard::models::ContainerSummary>| {
            listed
                .iter()
                .filter_map(|c| c.id.as_deref())
                .any(|id| !leaving.iter().any(|l| l == id))
        };
        let (listed, _) = tokio::join!(self.list_labelled(vec![env_label.clone()]), torn_down);
        if in_use(listed?) {
            // Other projects' containers may be on their way out as well
            // (several `down`s at once), each run seeing the others': the
            // run whose containers are gone last finds none left. So once
            // `leaving` are gone, look again.
            futures::future::join_all(leaving.iter().map(|id| wait_removed(d, id))).await;
            if in_use(self.list_labelled(vec![env_label]).await?) {
                return Ok(());
            }
        }
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
        self.exec_in(id, spec, argv, timeout).await
    }

    async fn probe(
        &self,
        id: &str,
        spec: &InstanceSpec,
        probe: &Probe,
        timeout: Duration,
    ) -> Result<ProbeResult, ProviderError> {
        self.probe_instance(id, spec, probe, timeout).await
    }

    async fn probe_until(
        &self,
        id: &str,
        spec: &InstanceSpec,
        argv: &[String],
        within: Duration,
        timeout: Duration,
    ) -> Result<Option<bool>, ProviderError> {
        self.loop_probe(id, spec, argv, within, timeout).await
    }

    /// Returns once the container's process has exited, which is what a
    /// dependency's stop waits for, while the daemon may still be tearing
    /// the container down (its network, its mounts): [`Provider::remove`]
    /// waits for that. On the Docker host, nanokit signals the process
    /// itself (see [`signal_directly`]); elsewhere it asks the daemon to
    /// stop the container and waits for the whole stop.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), ProviderError> {
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

    /// When the daemon reports the container not running (its wait API),
    /// or gone. Should the wait break off (the daemon restarting), the
    /// container is looked at and waited for again.
    async fn exited(&self, id: &str) {
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

    /// The running container that publishes `port`, with the nanokit
    /// service it is, if any.
    async fn port_user(&self, port: u16) -> Option<String> {
        let d = self.docker().await.ok()?;
        let filters = HashMap::from([("publish".to_string(), vec![port.to_string()])]);
        let c = d
            .list_containers(Some(ListContainersOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .ok()?
            .into_iter()
            .next()?;
        let name = c
            .names
            .unwrap_or_default()
            .into_iter()
            .next()
            .unwrap_or_default();
        let mut s = format!("container {}", name.trim_start_matches('/'));
        let labels = c.labels.unwrap_or_default();
        let label = |k: &str| labels.get(&docker_label(k)).cloned().unwrap_or_default();
        if labels.contains_key(&docker_label(LABEL_SERVICE)) {
            s.push_str(&format!(
                " (service `{}` of nanokit project `{}`, env `{}`)",
                label(LABEL_SERVICE),
                label(LABEL_PROJECT),
                label(LABEL_ENV)
            ));
        }
        Some(s)
    }

    fn ports_bound_here(&self) -> bool {
        connect::Endpoint::from_env().on_this_host()
    }

    async fn remove(&self, id: &str) -> Result<(), ProviderError> {
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

    async fn provision(
        &self,
        spec: &InstanceSpec,
        install: &str,
        manifests: &[PathBuf],
        cancel: &CancellationToken,
    ) -> Result<Provisioned, ProviderError> {
        self.provision_volume(spec, install, manifests, cancel)
            .await
    }

    /// The daemon's event stream, filtered by the scope's labels to the
    /// container events a watcher acts on: `kill` (a stop, kill or forced
    /// removal asked of the daemon), `die`, `stop`, `destroy` and
    /// `health_status`.
    async fn events(&self, scope: &Scope) -> Result<Option<EventStream>, ProviderError> {
        let d = self.docker().await?.clone();
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            (
                "label".to_string(),
                vec![
                    format!("{}={}", docker_label(LABEL_STATE_ID), scope.state_id),
                    format!("{}={}", docker_label(LABEL_ENV), scope.env),
                ],
            ),
            (
                "event".to_string(),
                ["kill", "die", "stop", "destroy", "health_status"]
                    .map(String::from)
                    .to_vec(),
            ),
        ]);
        let stream = d.events(Some(bollard::query_parameters::EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }));
        let events = stream.filter_map(|r| async move {
            match r {
                Ok(m) => instance_event(m).map(Ok),
                Err(e) => Some(Err(docker_err("the daemon's event stream", e))),
            }
        });
        Ok(Some(Box::pin(events)))
    }

    fn reports_health(&self) -> bool {
        true
    }
}

/// A container event as an [`InstanceEvent`] (None: not one a watcher acts
/// on, or not a service's container).
fn instance_event(m: bollard::models::EventMessage) -> Option<InstanceEvent> {
    let action = m.action?;
    let actor = m.actor?;
    let attrs = actor.attributes.unwrap_or_default();
    let what = match action.as_str() {
        "kill" => Happening::Killed,
        "die" => Happening::Died(
            attrs
                .get("exitCode")
                .and_then(|c| c.parse().ok())
                .map_or(Exit::new(ExitKind::Exited), Exit::code),
        ),
        "stop" => Happening::Stopped,
        "destroy" => Happening::Removed,
        a => match a.strip_prefix("health_status:").map(str::trim) {
            Some("healthy") => Happening::Health { healthy: true },
            Some("unhealthy") => Happening::Health { healthy: false },
            _ => return None,
        },
    };
    Some(InstanceEvent {
        id: actor.id?,
        service: attrs.get(&docker_label(LABEL_SERVICE))?.clone(),
        what,
    })
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
fn signal_directly(id: &str, c: &bollard::models::ContainerInspectResponse) -> Option<proc::Held> {
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
