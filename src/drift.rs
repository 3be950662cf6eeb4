//! Drift: state.json against the live world. A recorded instance that is
//! gone, a pid now used by another process, a service whose configuration
//! changed since it was deployed, an instance nobody recorded.

use serde::Serialize;

use crate::config::Config;
use crate::exec::{scope, ExecError};
use crate::plan;
use crate::provider::Provider;
use crate::state;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// The recorded process no longer exists.
    Gone,
    /// The recorded pid exists but is another process (start time differs).
    PidReused,
    /// The configuration changed since the service was deployed.
    ConfigChanged,
    /// The service is in the configuration but was never deployed.
    NotDeployed,
    /// The last run left it failed or unfinished.
    NotHealthy,
    /// A live instance with our labels that state does not know.
    Unmanaged,
}

#[derive(Debug, Clone, Serialize)]
pub struct DriftItem {
    pub service: String,
    pub kind: DriftKind,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DriftReport {
    pub drifted: bool,
    pub items: Vec<DriftItem>,
}

/// Compares state with what runs.
pub async fn detect(config: &Config, provider: &dyn Provider) -> Result<DriftReport, ExecError> {
    let st = state::load(config).await?;
    let observed = provider.observe(&scope(config)).await?;
    let mut items = Vec::new();
    let item = |service: &str, kind, detail: String| DriftItem {
        service: service.to_string(),
        kind,
        detail,
    };
    for (name, r) in &st.resources {
        match &r.provider_id {
            None => items.push(item(
                name,
                DriftKind::NotHealthy,
                format!("creation did not finish (status {})", r.status.as_str()),
            )),
            Some(id) => {
                if provider.inspect(id).await?.is_none() {
                    let reused = crate::provider::process::parse_id(id).and_then(|(pid, _)| {
                        crate::provider::process::proc_start_time(pid).map(|_| pid)
                    });
                    match reused {
                        Some(pid) if provider.name() == "process" => items.push(item(
                            name,
                            DriftKind::PidReused,
                            format!("pid {pid} now belongs to another process; the service is not running"),
                        )),
                        _ => items.push(item(name, DriftKind::Gone, format!("instance {id} is not running"))),
                    }
                } else if r.status != state::Status::Healthy {
                    items.push(item(
                        name,
                        DriftKind::NotHealthy,
                        format!("status {}", r.status.as_str()),
                    ));
                }
            }
        }
        if let Some(svc) = config.services.get(name) {
            let fields = plan::field_hashes(svc, config, &st.lineage);
            if plan::config_hash(&fields) != r.config_hash {
                let changed: Vec<String> = fields
                    .keys()
                    .chain(r.fields.keys())
                    .filter(|k| fields.get(*k) != r.fields.get(*k))
                    .cloned()
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                items.push(item(
                    name,
                    DriftKind::ConfigChanged,
                    format!("changed: {}", changed.join(", ")),
                ));
            }
        }
    }
    for name in config.services.keys() {
        if !st.resources.contains_key(name) {
            items.push(item(
                name,
                DriftKind::NotDeployed,
                "in the configuration, not deployed".into(),
            ));
        }
    }
    for i in &observed {
        let known = st
            .resources
            .get(&i.service)
            .and_then(|r| r.provider_id.as_deref())
            == Some(i.id.as_str());
        if !known {
            items.push(item(
                &i.service,
                DriftKind::Unmanaged,
                format!("instance {} is running but not recorded in state", i.id),
            ));
        }
    }
    Ok(DriftReport {
        drifted: !items.is_empty(),
        items,
    })
}
