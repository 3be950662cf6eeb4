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
//! * **Containers** (create body, names, logs): [`container`]; **the env's
//!   network**: [`network`]; **stops and removals**: [`stop`].
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
mod container;
mod install;
mod network;
mod probe;
mod stop;

use container::image_hint;
use network::network_gone;
use stop::{wait_removed, wait_stopped};

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
    /// The id of the env's network this provider attaches containers to
    /// (by id, not name: a duplicate of the name made by another run at
    /// once cannot make it ambiguous).
    network_id: std::sync::Mutex<Option<String>>,
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

fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
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
            network_id: std::sync::Mutex::new(None),
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
        self.create_container(spec).await
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

    async fn down_complete(&self, scope: &Scope, leaving: &[String]) -> Result<(), ProviderError> {
        self.free_network(scope, leaving).await
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

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), ProviderError> {
        self.stop_container(id, grace).await
    }

    async fn exited(&self, id: &str) {
        self.wait_exit(id).await
    }

    async fn port_user(&self, port: u16) -> Option<String> {
        self.publisher(port).await
    }

    fn ports_bound_here(&self) -> bool {
        connect::Endpoint::from_env().on_this_host()
    }

    async fn remove(&self, id: &str) -> Result<(), ProviderError> {
        self.remove_container(id).await
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
