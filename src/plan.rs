//! PlanEngine: desired state (config + a stable SHA-256 hash per service)
//! against live state (state.json + the provider's observation) → actions
//! `create`, `update` (with the fields that changed), `delete`, `noop`.
//!
//! Pure: it reads no files and starts nothing. Env values never appear in a
//! plan, only the names of the variables that changed.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Config, Service};
use crate::error::ErrorCode;
use crate::graph::Dag;
use crate::provider::Instance;
use crate::state::{State, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    Create,
    Update,
    Delete,
    Noop,
}

impl ActionKind {
    pub fn symbol(self) -> &'static str {
        match self {
            ActionKind::Create => "+",
            ActionKind::Update => "~",
            ActionKind::Delete => "-",
            ActionKind::Noop => " ",
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Create => "create",
            ActionKind::Update => "update",
            ActionKind::Delete => "delete",
            ActionKind::Noop => "noop",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Action {
    pub service: String,
    pub action: ActionKind,
    pub reasons: Vec<String>,
    /// Desired config hash (absent for deletes).
    pub config_hash: Option<String>,
    /// Desired per-field hashes (absent for deletes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
    pub depends_on: Vec<String>,
    /// Provider ids to stop before acting: the recorded instances (update,
    /// delete), recorded instances that are stopped or were changed outside
    /// nanokit, and orphans found by label (from an interrupted run).
    pub stop: Vec<String>,
    /// Running instances with the desired configuration that stay: the
    /// healthy replicas of a service that lost only some, or instances
    /// adopted by label when the state had no record of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeAction {
    pub volume: String,
    pub action: ActionKind,
    /// Deleting a volume destroys data: only with `--force`.
    pub needs_force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    pub project: String,
    pub env: String,
    pub created_at: String,
    pub lineage: String,
    pub state_serial: u64,
    /// Services in start order (dependencies first), deletes last.
    pub actions: Vec<Action>,
    pub volumes: Vec<VolumeAction>,
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        self.actions.iter().any(|a| a.action != ActionKind::Noop)
            || self.volumes.iter().any(|v| v.action != ActionKind::Noop)
    }

    /// Volumes the plan would delete without the needed `--force`.
    pub fn blocked(&self, force: bool) -> Vec<&str> {
        if force {
            return Vec::new();
        }
        self.volumes
            .iter()
            .filter(|v| v.needs_force)
            .map(|v| v.volume.as_str())
            .collect()
    }

    pub fn count(&self, kind: ActionKind) -> usize {
        self.actions.iter().filter(|a| a.action == kind).count()
            + self.volumes.iter().filter(|v| v.action == kind).count()
    }

    /// Human-readable plan (`+ ~ -` with reasons).
    pub fn render(&self) -> String {
        let mut s = String::new();
        for a in &self.actions {
            if a.action == ActionKind::Noop {
                continue;
            }
            s.push_str(&format!(
                "{} {} ({})\n",
                a.action.symbol(),
                a.service,
                a.action.as_str()
            ));
            for r in &a.reasons {
                s.push_str(&format!("    {r}\n"));
            }
        }
        for v in &self.volumes {
            if v.action == ActionKind::Noop {
                continue;
            }
            s.push_str(&format!(
                "{} volume {} ({})\n",
                v.action.symbol(),
                v.volume,
                v.action.as_str()
            ));
            if v.needs_force {
                s.push_str("    deletes its data: needs --force\n");
            }
        }
        let noop = self.count(ActionKind::Noop);
        s.push_str(&format!(
            "Plan: {} to create, {} to update, {} to delete, {} unchanged.\n",
            self.count(ActionKind::Create),
            self.count(ActionKind::Update),
            self.count(ActionKind::Delete),
            noop
        ));
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("unknown service `{0}`: it is not in the configuration (see `nanokit graph`)")]
    UnknownTarget(String),
}

impl ErrorCode for PlanError {
    fn code(&self) -> &'static str {
        "ENKTARGET"
    }
}

fn short_hash(bytes: &[u8], salt: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0]);
    h.update(bytes);
    hex::encode(&h.finalize()[..8])
}

/// Per-field hashes of a service. `salt` (the state lineage) keeps hashes of
/// short secret values from being looked up in a table.
pub fn field_hashes(svc: &Service, config: &Config, salt: &str) -> BTreeMap<String, String> {
    let mut f = BTreeMap::new();
    let mut put = |k: &str, v: serde_json::Value| {
        if !v.is_null() {
            f.insert(k.to_string(), short_hash(v.to_string().as_bytes(), salt));
        }
    };
    use serde_json::json;
    put("image", json!(svc.image));
    put("start", json!(svc.start));
    put("port", json!(svc.port));
    put("expose", json!(svc.expose));
    put(
        "path",
        json!(svc.path.strip_prefix(&config.dir).unwrap_or(&svc.path)),
    );
    put("volumes", json!(svc.volumes));
    put("provisioning.install", json!(svc.install));
    put("provisioning.image", json!(svc.install_image));
    put("provisioning.manifests", json!(svc.manifest_digest));
    // Only when not the default, so hashes of existing deployments stay.
    put(
        "instances",
        json!((svc.instances != 1).then_some(svc.instances)),
    );
    put("hooks", json!(svc.hooks));
    put("healthcheck", json!(svc.healthcheck));
    put("cpu", json!(svc.cpu));
    put("memory", json!(svc.memory));
    put("updateStrategy", json!(svc.update_strategy));
    for (k, v) in &svc.env {
        put(&format!("env.{k}"), json!(v));
    }
    f
}

/// The config hash: SHA-256 over the sorted field hashes.
pub fn config_hash(fields: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (k, v) in fields {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

fn diff_reasons(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<String> {
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter_map(|k| match (old.get(k), new.get(k)) {
            (None, Some(_)) => Some(format!("{k} added")),
            (Some(_), None) => Some(format!("{k} removed")),
            (Some(a), Some(b)) if a != b => Some(format!("{k} changed")),
            _ => None,
        })
        .collect()
}

/// Options of a plan.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Reconcile only these services and what they depend on.
    pub targets: Vec<String>,
}

/// Computes the plan.
pub fn plan(
    config: &Config,
    dag: &Dag,
    state: &State,
    observed: &[Instance],
    opts: &PlanOptions,
) -> Result<Plan, PlanError> {
    for t in &opts.targets {
        if !config.services.contains_key(t) {
            return Err(PlanError::UnknownTarget(t.clone()));
        }
    }
    let targeted = !opts.targets.is_empty();
    let scope: Vec<String> = if targeted {
        dag.closure(&opts.targets)
    } else {
        dag.order().to_vec()
    };
    let mut by_service: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
    for i in observed {
        by_service.entry(i.service.as_str()).or_default().push(i);
    }
    let mut actions = Vec::with_capacity(scope.len());
    for name in &scope {
        let svc = &config.services[name];
        let fields = field_hashes(svc, config, &state.lineage);
        let hash = config_hash(&fields);
        let want = svc.instances.max(1) as usize;
        let rec = state.resources.get(name);
        let mut live = by_service.get(name.as_str()).cloned().unwrap_or_default();
        live.sort_by(|a, b| a.replica.cmp(&b.replica).then(a.id.cmp(&b.id)));
        let recorded: Vec<String> = rec.map(|r| r.ids()).unwrap_or_default();
        let mut reasons = Vec::new();
        let mut keep: Vec<String> = Vec::new();
        let mut stop: Vec<String> = Vec::new();
        let kind = match rec {
            None => {
                // No record: a new service, or a state that was lost. Running
                // instances with exactly this configuration are adopted
                // (their labels carry the lineage the hash is salted with),
                // anything else found by label is stopped.
                for i in &live {
                    if i.running && i.config_hash == hash && keep.len() < want {
                        keep.push(i.id.clone());
                    } else {
                        stop.push(i.id.clone());
                        reasons.push(format!(
                            "stop orphaned instance {} (from an interrupted run)",
                            i.id
                        ));
                    }
                }
                if keep.is_empty() {
                    reasons.insert(0, "new service".to_string());
                    ActionKind::Create
                } else {
                    reasons.insert(
                        0,
                        format!(
                            "adopt {} running instance(s) found by label ({})",
                            keep.len(),
                            keep.join(", ")
                        ),
                    );
                    ActionKind::Update
                }
            }
            Some(r) => {
                let changed = r.config_hash != hash;
                let unfinished = r.status != Status::Healthy;
                let mut rec_live = Vec::new();
                for i in &live {
                    if !recorded.contains(&i.id) {
                        stop.push(i.id.clone());
                        reasons.push(format!(
                            "stop orphaned instance {} (from an interrupted run)",
                            i.id
                        ));
                    } else if !i.running {
                        stop.push(i.id.clone());
                        reasons.push(format!("recorded instance {} is stopped", i.id));
                    } else if i.config_hash != r.config_hash {
                        stop.push(i.id.clone());
                        reasons.push(format!(
                            "recorded instance {} was changed outside nanokit",
                            i.id
                        ));
                    } else {
                        rec_live.push(i.id.clone());
                    }
                }
                for id in &recorded {
                    if !live.iter().any(|i| &i.id == id) {
                        reasons.push(format!("recorded instance {id} is not running"));
                    }
                }
                if r.provider_id.is_none() {
                    reasons.push(format!(
                        "the last run did not finish creating it (status {})",
                        r.status.as_str()
                    ));
                }
                if changed || unfinished {
                    if changed {
                        let diff = diff_reasons(&r.fields, &fields);
                        if diff.is_empty() {
                            reasons.push("config hash changed".into());
                        }
                        reasons.extend(diff);
                    } else if r.provider_id.is_some() && !rec_live.is_empty() {
                        reasons.push(format!("the last run left it {}", r.status.as_str()));
                    }
                    stop.extend(rec_live.iter().cloned());
                } else {
                    keep = rec_live;
                    if keep.len() > want {
                        for id in keep.split_off(want) {
                            reasons.push(format!("scale down: stop {id}"));
                            stop.push(id);
                        }
                    } else if !keep.is_empty() && keep.len() < want {
                        reasons.push(format!("{} of {want} instance(s) running", keep.len()));
                    }
                }
                let any_running = live.iter().any(|i| i.running && recorded.contains(&i.id));
                if keep.len() == want && stop.is_empty() && reasons.is_empty() {
                    ActionKind::Noop
                } else if !any_running {
                    ActionKind::Create
                } else {
                    ActionKind::Update
                }
            }
        };
        actions.push(Action {
            service: name.clone(),
            action: kind,
            reasons,
            config_hash: Some(hash),
            fields,
            depends_on: svc.dep_names().map(str::to_string).collect(),
            stop,
            keep,
        });
    }
    if !targeted {
        // In state or live, but no longer in the configuration.
        let mut gone: BTreeSet<&str> = state
            .resources
            .keys()
            .map(String::as_str)
            .filter(|n| !config.services.contains_key(*n))
            .collect();
        gone.extend(
            by_service
                .keys()
                .copied()
                .filter(|n| !config.services.contains_key(*n)),
        );
        let edges = gone.iter().map(|n| {
            let deps = state
                .resources
                .get(*n)
                .map(|r| r.depends_on.iter().map(String::as_str).collect())
                .unwrap_or_default();
            (*n, deps)
        });
        let order = Dag::from_edges(edges).reverse_order();
        for name in order {
            let disabled = config.disabled.contains(&name);
            let rec = state.resources.get(&name);
            let mut stop: Vec<String> = by_service
                .get(name.as_str())
                .map(|v| v.iter().map(|i| i.id.clone()).collect())
                .unwrap_or_default();
            for id in rec.map(|r| r.ids()).unwrap_or_default() {
                if !stop.contains(&id) {
                    stop.push(id);
                }
            }
            let reason = if disabled {
                format!("disabled in environment `{}` (instances: 0)", config.env)
            } else if rec.is_none() {
                "orphaned instance not in state or configuration".to_string()
            } else {
                "no longer in the configuration".to_string()
            };
            actions.push(Action {
                service: name.clone(),
                action: ActionKind::Delete,
                reasons: vec![reason],
                config_hash: None,
                fields: BTreeMap::new(),
                depends_on: rec.map(|r| r.depends_on.clone()).unwrap_or_default(),
                stop,
                keep: Vec::new(),
            });
        }
    }
    let mut volumes = Vec::new();
    let wanted: BTreeSet<&str> = if targeted {
        scope
            .iter()
            .flat_map(|s| {
                config.services[s]
                    .volumes
                    .iter()
                    .filter(|m| m.named)
                    .map(|m| m.source.as_str())
            })
            .collect()
    } else {
        config.volumes.keys().map(String::as_str).collect()
    };
    for v in &wanted {
        volumes.push(VolumeAction {
            volume: v.to_string(),
            action: if state.volumes.contains_key(*v) {
                ActionKind::Noop
            } else {
                ActionKind::Create
            },
            needs_force: false,
        });
    }
    if !targeted {
        for v in state.volumes.keys() {
            if !config.volumes.contains_key(v) {
                volumes.push(VolumeAction {
                    volume: v.clone(),
                    action: ActionKind::Delete,
                    needs_force: true,
                });
            }
        }
    }
    Ok(Plan {
        project: config.name.clone(),
        env: config.env.clone(),
        created_at: crate::state::now(),
        lineage: state.lineage.clone(),
        state_serial: state.serial,
        actions,
        volumes,
    })
}
