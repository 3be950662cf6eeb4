//! The plan: desired state (config + a stable SHA-256 hash per service)
//! against live state (state.json + the provider's observation) → actions
//! `create`, `update` (with the fields that changed), `delete`, `noop`;
//! and the plan of `down`.
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
use crate::state::{Resource, State, Status};

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
    /// A plan of `actions` and `volumes` for `config`, made now against `state`.
    fn new(
        config: &Config,
        state: &State,
        actions: Vec<Action>,
        volumes: Vec<VolumeAction>,
    ) -> Plan {
        Plan {
            project: config.name.clone(),
            env: config.env.clone(),
            created_at: crate::state::now(),
            lineage: state.lineage.clone(),
            state_serial: state.serial,
            actions,
            volumes,
        }
    }

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
    /// Replace the running instances of these services even when nothing
    /// changed (`nanokit restart`).
    pub restart: Vec<String>,
}

/// Computes the plan of `up`.
pub fn plan(
    config: &Config,
    dag: &Dag,
    state: &State,
    observed: &[Instance],
    opts: &PlanOptions,
) -> Result<Plan, PlanError> {
    for t in opts.targets.iter().chain(&opts.restart) {
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
    let by_service = by_service(observed);
    let mut actions: Vec<Action> = scope
        .iter()
        .map(|name| {
            let live = by_service.get(name.as_str()).cloned().unwrap_or_default();
            let restart = opts.restart.contains(name);
            service_action(config, &config.services[name], state, live, restart)
        })
        .collect();
    if !targeted {
        actions.extend(removed_services(config, state, &by_service));
    }
    let volumes = volume_actions(config, state, targeted.then_some(&scope[..]));
    Ok(Plan::new(config, state, actions, volumes))
}

/// The plan of `down`: delete every service in state or running under our
/// labels, or only `targets` and everything that depends on them; with
/// `volumes` (and no targets), also every named volume in state.
pub fn down_plan(
    config: &Config,
    state: &State,
    observed: &[Instance],
    targets: &[String],
    volumes: bool,
) -> Result<Plan, PlanError> {
    let mut names: BTreeSet<String> = state.resources.keys().cloned().collect();
    names.extend(observed.iter().map(|i| i.service.clone()));
    if !targets.is_empty() {
        if let Some(t) = targets.iter().find(|t| !names.contains(*t)) {
            return Err(PlanError::UnknownTarget(t.clone()));
        }
        // The targets and everything that depends on them.
        let dag = Dag::from_edges(state.resources.iter().map(|(n, r)| {
            (
                n.as_str(),
                r.depends_on.iter().map(String::as_str).collect(),
            )
        }));
        let mut keep = BTreeSet::new();
        let mut stack = targets.to_vec();
        while let Some(n) = stack.pop() {
            if keep.insert(n.clone()) {
                stack.extend(dag.dependents(&n));
            }
        }
        names.retain(|n| keep.contains(n));
    }
    let by_service = by_service(observed);
    let actions = names
        .iter()
        .map(|n| delete_action(n, "down".into(), state, &by_service))
        .collect();
    let volumes = if volumes && targets.is_empty() {
        state
            .volumes
            .keys()
            .map(|v| VolumeAction {
                volume: v.clone(),
                action: ActionKind::Delete,
                needs_force: false,
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(Plan::new(config, state, actions, volumes))
}

type ByService<'a> = BTreeMap<&'a str, Vec<&'a Instance>>;

fn by_service(observed: &[Instance]) -> ByService<'_> {
    let mut by_service: ByService<'_> = BTreeMap::new();
    for i in observed {
        by_service.entry(i.service.as_str()).or_default().push(i);
    }
    by_service
}

/// What to stop and keep of one service, and why.
#[derive(Default)]
struct Verdict {
    reasons: Vec<String>,
    keep: Vec<String>,
    stop: Vec<String>,
}

impl Verdict {
    fn stop(&mut self, id: &str, why: String) {
        self.stop.push(id.to_string());
        self.reasons.push(why);
    }
}

fn orphaned(id: &str) -> String {
    format!("stop orphaned instance {id} (from an interrupted run)")
}

/// The action of one service of the configuration.
fn service_action(
    config: &Config,
    svc: &Service,
    state: &State,
    mut live: Vec<&Instance>,
    restart: bool,
) -> Action {
    let fields = field_hashes(svc, config, &state.lineage);
    let hash = config_hash(&fields);
    let want = svc.instances.max(1) as usize;
    live.sort_by(|a, b| a.replica.cmp(&b.replica).then(a.id.cmp(&b.id)));
    let (kind, v) = match state.resources.get(&svc.name) {
        None => unrecorded(&live, &hash, want),
        Some(r) => recorded(r, &live, &fields, &hash, want, restart),
    };
    Action {
        service: svc.name.clone(),
        action: kind,
        reasons: v.reasons,
        config_hash: Some(hash),
        fields,
        depends_on: svc.dep_names().map(str::to_string).collect(),
        stop: v.stop,
        keep: v.keep,
    }
}

/// No record: a new service, or a state that was lost. Running instances
/// with exactly this configuration are adopted (their labels carry the
/// lineage the hash is salted with), anything else found by label is
/// stopped.
fn unrecorded(live: &[&Instance], hash: &str, want: usize) -> (ActionKind, Verdict) {
    let mut v = Verdict::default();
    for i in live {
        if i.running && i.config_hash == hash && v.keep.len() < want {
            v.keep.push(i.id.clone());
        } else {
            v.stop(&i.id, orphaned(&i.id));
        }
    }
    if v.keep.is_empty() {
        v.reasons.insert(0, "new service".to_string());
        (ActionKind::Create, v)
    } else {
        let adopt = format!(
            "adopt {} running instance(s) found by label ({})",
            v.keep.len(),
            v.keep.join(", ")
        );
        v.reasons.insert(0, adopt);
        (ActionKind::Update, v)
    }
}

/// A recorded service: keep what runs with the recorded configuration
/// when it did not change, replace it when it did or when the last run did
/// not finish, stop what is not ours.
fn recorded(
    r: &Resource,
    live: &[&Instance],
    fields: &BTreeMap<String, String>,
    hash: &str,
    want: usize,
    restart: bool,
) -> (ActionKind, Verdict) {
    let recorded = r.ids();
    let changed = r.config_hash != hash;
    let unfinished = r.status != Status::Healthy;
    let mut v = Verdict::default();
    let mut rec_live = Vec::new();
    for i in live {
        if !recorded.contains(&i.id) {
            v.stop(&i.id, orphaned(&i.id));
        } else if !i.running {
            v.stop(&i.id, format!("recorded instance {} is stopped", i.id));
        } else if i.config_hash != r.config_hash {
            let why = format!("recorded instance {} was changed outside nanokit", i.id);
            v.stop(&i.id, why);
        } else {
            rec_live.push(i.id.clone());
        }
    }
    for id in &recorded {
        if !live.iter().any(|i| &i.id == id) {
            v.reasons
                .push(format!("recorded instance {id} is not running"));
        }
    }
    if r.provider_id.is_none() {
        v.reasons.push(format!(
            "the last run did not finish creating it (status {})",
            r.status.as_str()
        ));
    }
    let restart = restart && !rec_live.is_empty();
    if changed || unfinished || restart {
        if changed {
            let diff = diff_reasons(&r.fields, fields);
            if diff.is_empty() {
                v.reasons.push("config hash changed".into());
            }
            v.reasons.extend(diff);
        } else if unfinished && r.provider_id.is_some() && !rec_live.is_empty() {
            v.reasons
                .push(format!("the last run left it {}", r.status.as_str()));
        }
        if restart {
            v.reasons.push("restart requested".into());
        }
        v.stop.extend(rec_live.iter().cloned());
    } else {
        v.keep = rec_live;
        if v.keep.len() > want {
            for id in v.keep.split_off(want) {
                v.stop(&id, format!("scale down: stop {id}"));
            }
        } else if !v.keep.is_empty() && v.keep.len() < want {
            v.reasons
                .push(format!("{} of {want} instance(s) running", v.keep.len()));
        }
    }
    let any_running = live.iter().any(|i| i.running && recorded.contains(&i.id));
    let kind = if v.keep.len() == want && v.stop.is_empty() && v.reasons.is_empty() {
        ActionKind::Noop
    } else if !any_running {
        ActionKind::Create
    } else {
        ActionKind::Update
    };
    (kind, v)
}

/// Services in state or live but no longer in the configuration, to be
/// deleted dependents first.
fn removed_services(config: &Config, state: &State, by_service: &ByService<'_>) -> Vec<Action> {
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
    Dag::from_edges(edges)
        .reverse_order()
        .into_iter()
        .map(|name| {
            let reason = if config.disabled.contains(&name) {
                format!("disabled in environment `{}` (instances: 0)", config.env)
            } else if !state.resources.contains_key(&name) {
                "orphaned instance not in state or configuration".to_string()
            } else {
                "no longer in the configuration".to_string()
            };
            delete_action(&name, reason, state, by_service)
        })
        .collect()
}

/// Deleting service `name`: stop every instance of it that runs under our
/// labels or is recorded.
fn delete_action(name: &str, reason: String, state: &State, by_service: &ByService<'_>) -> Action {
    let rec = state.resources.get(name);
    let mut stop: Vec<String> = by_service
        .get(name)
        .map(|v| v.iter().map(|i| i.id.clone()).collect())
        .unwrap_or_default();
    for id in rec.map(|r| r.ids()).unwrap_or_default() {
        if !stop.contains(&id) {
            stop.push(id);
        }
    }
    Action {
        service: name.to_string(),
        action: ActionKind::Delete,
        reasons: vec![reason],
        config_hash: None,
        fields: BTreeMap::new(),
        depends_on: rec.map(|r| r.depends_on.clone()).unwrap_or_default(),
        stop,
        keep: Vec::new(),
    }
}

/// Named volumes: create what the configuration (or the targeted services)
/// mount and state lacks; without targets, delete (with `--force` only)
/// what state has and the configuration no longer declares.
fn volume_actions(
    config: &Config,
    state: &State,
    targeted: Option<&[String]>,
) -> Vec<VolumeAction> {
    let wanted: BTreeSet<&str> = match targeted {
        Some(scope) => scope
            .iter()
            .flat_map(|s| {
                config.services[s]
                    .volumes
                    .iter()
                    .filter(|m| m.named)
                    .map(|m| m.source.as_str())
            })
            .collect(),
        None => config.volumes.keys().map(String::as_str).collect(),
    };
    let mut volumes: Vec<VolumeAction> = wanted
        .iter()
        .map(|v| VolumeAction {
            volume: v.to_string(),
            action: if state.volumes.contains_key(*v) {
                ActionKind::Noop
            } else {
                ActionKind::Create
            },
            needs_force: false,
        })
        .collect();
    if targeted.is_none() {
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
    volumes
}
