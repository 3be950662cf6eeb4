//! Drift: state.json against the live world. A recorded instance that is
//! gone, a pid now used by another process, a service whose configuration
//! changed since it was deployed, an instance nobody recorded.

use serde::Serialize;

use super::{plan, scope, EngineError};
use crate::config::Config;
use crate::provider::Provider;
use crate::state;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// The recorded process / container no longer exists.
    Gone,
    /// The recorded container exists but is not running (`docker stop`).
    Stopped,
    /// The recorded instance runs with labels of another configuration
    /// (replaced or changed outside nanokit).
    Changed,
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

/// Compares state with what runs. Boxed: one instance of the comparison in
/// the binary, however many futures await it.
pub fn detect<'a>(
    config: &'a Config,
    provider: &'a dyn Provider,
) -> futures::future::BoxFuture<'a, Result<DriftReport, EngineError>> {
    Box::pin(detect_inner(config, provider))
}

async fn detect_inner(
    config: &Config,
    provider: &dyn Provider,
) -> Result<DriftReport, EngineError> {
    let st = state::load(config).await?;
    let observed = provider.observe(&scope(config)).await?;
    let mut items = Vec::new();
    for (name, r) in &st.resources {
        recorded(
            &mut items,
            name,
            r,
            &observed,
            provider,
            config,
            &st.lineage,
        );
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
            .is_some_and(|r| r.ids().contains(&i.id));
        if !known {
            let why = if config.services.contains_key(&i.service) {
                "not recorded in state"
            } else {
                "an orphan: its service is not in the configuration (`nanokit up` removes it)"
            };
            items.push(item(
                &i.service,
                DriftKind::Unmanaged,
                format!("instance {} exists but is {why}", i.id),
            ));
        }
    }
    Ok(DriftReport {
        drifted: !items.is_empty(),
        items,
    })
}

fn item(service: &str, kind: DriftKind, detail: String) -> DriftItem {
    DriftItem {
        service: service.to_string(),
        kind,
        detail,
    }
}

/// The drift of one recorded service: its instances against what runs,
/// its status, its replica count and its configuration.
fn recorded(
    items: &mut Vec<DriftItem>,
    name: &str,
    r: &state::Resource,
    observed: &[crate::provider::Instance],
    provider: &dyn Provider,
    config: &Config,
    lineage: &str,
) {
    let ids = r.ids();
    if ids.is_empty() {
        items.push(item(
            name,
            DriftKind::NotHealthy,
            format!("creation did not finish (status {})", r.status.as_str()),
        ));
    }
    let mut all_live = !ids.is_empty();
    for id in &ids {
        match observed.iter().find(|i| &i.id == id) {
            Some(i) if !i.running => {
                all_live = false;
                items.push(item(
                    name,
                    DriftKind::Stopped,
                    format!("instance {id} exists but is not running"),
                ));
            }
            Some(i) if i.config_hash != r.config_hash => {
                all_live = false;
                items.push(item(
                    name,
                    DriftKind::Changed,
                    format!("instance {id} was changed outside nanokit (its configuration label differs)"),
                ));
            }
            Some(_) => {}
            None => {
                all_live = false;
                match provider.reused_pid(id) {
                    Some(pid) => items.push(item(
                        name,
                        DriftKind::PidReused,
                        format!(
                            "pid {pid} now belongs to another process; the service is not running"
                        ),
                    )),
                    _ => items.push(item(
                        name,
                        DriftKind::Gone,
                        format!("instance {id} is not running"),
                    )),
                }
            }
        }
    }
    if all_live && r.status != state::Status::Healthy {
        items.push(item(
            name,
            DriftKind::NotHealthy,
            format!("status {}", r.status.as_str()),
        ));
    }
    if let Some(svc) = config.services.get(name) {
        let want = svc.instances.max(1) as usize;
        if !ids.is_empty() && ids.len() != want {
            items.push(item(
                name,
                DriftKind::NotHealthy,
                format!("{} of {want} instance(s) recorded", ids.len()),
            ));
        }
    }
    if let Some(svc) = config.services.get(name) {
        let fields = plan::field_hashes(svc, config, lineage);
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
