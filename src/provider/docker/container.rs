//! Creating containers: the create body (image, `sh -c` command, env and
//! labels, mounts, ports, HEALTHCHECK, limits, the env's network), names (a
//! leftover of an interrupted run with the very same labels is replaced),
//! listing by labels, logs, and the container that publishes a host port.

use super::*;

impl DockerProvider {
    pub(super) async fn create_container(
        &self,
        spec: &InstanceSpec,
    ) -> Result<Instance, ProviderError> {
        let image = spec.image.clone().ok_or_else(|| {
            ProviderError::Failed(format!("service `{}` has no image", spec.service))
        })?;
        self.ensure_network().await?;
        let name = self.base_name(spec);
        let d = self.docker().await?;
        // An error names the step that failed; nothing half-created stays
        // behind unrecorded.
        let create_and_start = || async {
            // Built per attempt: a retry attaches to the network made again.
            let body = self.container_body(spec, &image);
            let id = self
                .create_named(&name, body)
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
        // left), or be ambiguous for a moment while another run's duplicate
        // of it is not yet removed (engines before API 1.44): make it again
        // (removing duplicates) and retry, a bounded number of times.
        for _ in 0..3 {
            if !matches!(&made, Err((_, e)) if network_gone(e)) {
                break;
            }
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

    /// Binds and volume mounts of `spec`, and its working directory.
    pub(super) fn mounts(&self, spec: &InstanceSpec) -> (Vec<String>, Vec<Mount>, Option<String>) {
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
    pub(super) fn container_body(&self, spec: &InstanceSpec, image: &str) -> ContainerCreateBody {
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
            self.network_ref(),
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

    pub(super) fn env_list(spec: &InstanceSpec) -> Vec<String> {
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
    pub(super) async fn create_named(
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
    pub(super) async fn is_leftover(&self, name: &str, body: &ContainerCreateBody) -> bool {
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
    pub(super) async fn list_labelled(
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

    pub(super) async fn remove_quietly(&self, id: &str) {
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

    pub(super) async fn logs_of(&self, id: &str, lines: usize) -> Result<String, ProviderError> {
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

    /// The running container that publishes `port`, with the nanokit
    /// service it is, if any.
    pub(super) async fn publisher(&self, port: u16) -> Option<String> {
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
}

/// Adds what to do about a missing image to `e`.
pub(super) fn image_hint(image: &str, e: ProviderError) -> ProviderError {
    match e {
        ProviderError::Failed(m) if m.contains("No such image") || m.contains("not found") => {
            ProviderError::Failed(format!(
                "{m} (image `{image}` is not on this Docker host; nanokit does not pull images: `docker pull {image}` or build it first)"
            ))
        }
        other => other,
    }
}
