//! The env's network, `nanokit-net-<env>`, where every container is
//! reachable by its service name: made once per provider run (when two runs
//! made it at once, as engines before API 1.44 allow, the extra ones are
//! removed), and removed by the last `down` of the env.

use super::*;

/// Docker's answer for a container whose network no longer exists.
/// The env's network is gone, or for a moment there are two of that name
/// (two runs created it at once; see [`DockerProvider::make_network`]).
pub(super) fn network_gone(e: &DockerError) -> bool {
    match e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => (*status_code == 404 && message.contains("network")) || network_ambiguous(e),
        _ => false,
    }
}

pub(super) fn network_ambiguous(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { message, .. } if message.contains("is ambiguous"))
}

impl DockerProvider {
    /// The env's network exists (checked once per provider).
    pub(super) async fn ensure_network(&self) -> Result<(), ProviderError> {
        self.network_ready
            .get_or_try_init(|| self.make_network())
            .await
            .map(|_| ())
    }

    /// Creates the env's network unless it exists. Engines before API 1.44
    /// accept a second network of the same name, so two runs creating it
    /// at once can make two: then the extra ones are removed.
    pub(super) async fn make_network(&self) -> Result<(), ProviderError> {
        let d = self.docker().await?;
        match d
            .inspect_network(&self.network, None::<InspectNetworkOptions>)
            .await
        {
            Ok(n) => {
                self.set_network_id(n.id);
                return Ok(());
            }
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

    fn set_network_id(&self, id: Option<String>) {
        *self.network_id.lock().unwrap_or_else(|e| e.into_inner()) = id;
    }

    /// The env's network as containers name it: its id once known, else
    /// its name.
    pub(super) fn network_ref(&self) -> String {
        self.network_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| self.network.clone())
    }

    /// When several networks carry the env network's name, removes all but
    /// the first by creation time and id (every run picks the same one); one
    /// in use by a container stays.
    pub(super) async fn dedupe_network(&self) -> Result<(), ProviderError> {
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
        self.set_network_id(named.first().map(|(_, id)| id.clone()));
        for (_, id) in named.iter().skip(1) {
            match d.remove_network(id).await {
                Ok(()) => {}
                Err(e) if matches!(status_of(&e), Some(403 | 404 | 409)) => {}
                Err(e) => return Err(docker_err(&format!("removing duplicate network {id}"), e)),
            }
        }
        Ok(())
    }

    /// Removes the env's network once no container of the env (of any
    /// project, in any state) is left but `leaving`, as Compose removes its
    /// project network; of several projects' `down`s at once, the last to
    /// finish removes it. A network something else still uses stays.
    pub(super) async fn free_network(
        &self,
        scope: &Scope,
        leaving: &[String],
    ) -> Result<(), ProviderError> {
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
}
