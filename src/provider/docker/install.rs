//! Provisioning on shared volumes (`provisioning.install`): the lock
//! `.nk-install-lock` and the sentinel `.nk-installed-<hash>` live in the
//! volume itself, reached through its mountpoint on the Docker host
//! (`docker volume inspect` → `Mountpoint`); the lock is nanokit's lease lock
//! ([`crate::lock`]), so a holder killed on this host is detected at once and
//! one on another host by its stopped heartbeat, and the install runs in a
//! short-lived installer container that mounts the volume. A new holder
//! first removes any installer container a dead holder left. This needs
//! nanokit on the Docker host, with access to the daemon's volumes;
//! otherwise provisioning fails with an error that says so. Why a lease lock
//! and not a shell protocol in the container: docs/repo-protocol.md.

use super::*;

impl DockerProvider {
    /// [`Provider::provision`]: the lock and sentinel in the volume, the
    /// install in an installer container.
    pub(super) async fn provision_volume(
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

    /// Host directory holding the provisioning lock and sentinel of `spec`:
    /// the mountpoint of its first named volume, else its `path`.
    pub(super) async fn provision_dir(
        &self,
        spec: &InstanceSpec,
    ) -> Result<(PathBuf, String), ProviderError> {
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
