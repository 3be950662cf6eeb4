//! Which actions of a plan one watch pass takes (pure).
//!
//! The plan is `up`'s, against the state and the live world. A pass takes:
//! - every change the configuration asks for (a new, changed or removed
//!   service), at once;
//! - of the services that drifted at runtime (an instance gone, stopped,
//!   changed outside nanokit, or a start that did not finish), only those
//!   whose restart is due now: the others wait for their backoff or are
//!   held by their policy;
//! - running services to replace (a failed health check);
//! - and, after each service it restarts, the dependents that declared
//!   `depends_on: {<service>: {restart: true}}` (transitively), replaced
//!   once it is healthy again. Other dependents are left alone.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::config::Config;
use crate::engine::plan::{Action, ActionKind, Plan};
use crate::state::State;

/// Where a service's drift comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drift {
    /// The configuration asks for a change (new, changed, removed).
    Config,
    /// The runtime lost what the recorded configuration made.
    Runtime,
}

/// Where the drift of non-noop action `a` comes from. An action that only
/// removes instances nothing recorded (orphans of an interrupted run, or of
/// a leader that lost its lease) is cleanup, done at once.
pub(super) fn drift_of(a: &Action, state: &State) -> Drift {
    if a.action == ActionKind::Delete {
        return Drift::Config;
    }
    match state.resources.get(&a.service) {
        Some(r) if a.config_hash.as_ref() == Some(&r.config_hash) => {
            let lost = r.ids().iter().any(|id| !a.keep.contains(id))
                || r.status != crate::state::Status::Healthy;
            if lost {
                Drift::Runtime
            } else {
                Drift::Config
            }
        }
        _ => Drift::Config,
    }
}

/// What a pass applies.
#[derive(Debug, Clone)]
pub(super) struct Selection {
    /// The actions taken, in the plan's order (no no-ops).
    pub(super) plan: Plan,
    /// Services that drifted at runtime and are restored by this pass.
    pub(super) restored: BTreeSet<String>,
    /// Running services replaced (why).
    pub(super) replaced: BTreeMap<String, String>,
    /// Service → the dependents it releases.
    pub(super) released: BTreeMap<String, Vec<String>>,
}

impl Selection {
    pub(super) fn is_empty(&self) -> bool {
        self.plan.actions.is_empty()
            && !self
                .plan
                .volumes
                .iter()
                .any(|v| v.action != ActionKind::Noop)
    }
}

/// `action` made to replace its running instances.
fn replace(action: &mut Action, why: String) {
    action.action = ActionKind::Update;
    let keep = std::mem::take(&mut action.keep);
    action.stop.extend(keep);
    action.reasons.push(why);
}

/// The selection of `full` (made against `state`): configuration changes,
/// the runtime restores in `take`, the running services in `replace_now`
/// (with why), and the dependents released by what restarts. Volume
/// deletions stay out unless `delete_volumes`.
pub(super) fn select(
    full: &Plan,
    state: &State,
    config: &Config,
    take: &BTreeSet<String>,
    replace_now: &BTreeMap<String, String>,
    delete_volumes: bool,
) -> Selection {
    let mut chosen: BTreeMap<String, Action> = BTreeMap::new();
    let mut restored = BTreeSet::new();
    let mut replaced = BTreeMap::new();
    for a in &full.actions {
        if a.action == ActionKind::Noop {
            if let Some(why) = replace_now.get(&a.service) {
                let mut a = a.clone();
                replace(&mut a, why.clone());
                replaced.insert(a.service.clone(), why.clone());
                chosen.insert(a.service.clone(), a);
            }
            continue;
        }
        match drift_of(a, state) {
            Drift::Config => {
                chosen.insert(a.service.clone(), a.clone());
            }
            Drift::Runtime if take.contains(&a.service) => {
                restored.insert(a.service.clone());
                chosen.insert(a.service.clone(), a.clone());
            }
            Drift::Runtime => {}
        }
    }
    // What stops and starts again: restored or replaced services, and
    // recorded services the configuration changed.
    let restarting: Vec<String> = chosen
        .values()
        .filter(|a| a.action != ActionKind::Delete)
        .filter(|a| {
            state
                .resources
                .get(&a.service)
                .is_some_and(|r| r.ids().iter().any(|id| !a.keep.contains(id)))
        })
        .map(|a| a.service.clone())
        .collect();
    let mut released: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut queue: VecDeque<String> = restarting.into();
    while let Some(dep) = queue.pop_front() {
        for svc in config.services.values() {
            let follows = svc.depends_on.iter().any(|d| d.name == dep && d.restart);
            if !follows || chosen.contains_key(&svc.name) {
                continue;
            }
            // Only a dependent that runs unchanged is replaced; one that is
            // down waits for its own restart.
            let Some(a) = full
                .actions
                .iter()
                .find(|a| a.service == svc.name && a.action == ActionKind::Noop)
            else {
                continue;
            };
            let mut a = a.clone();
            replace(
                &mut a,
                format!("restarted after `{dep}` (depends_on.{dep}.restart)"),
            );
            chosen.insert(svc.name.clone(), a);
            released
                .entry(dep.clone())
                .or_default()
                .push(svc.name.clone());
            queue.push_back(svc.name.clone());
        }
    }
    let mut plan = full.clone();
    plan.actions = full
        .actions
        .iter()
        .filter_map(|a| chosen.remove(&a.service))
        .collect();
    plan.volumes.retain(|v| {
        v.action == ActionKind::Create || (delete_volumes && v.action == ActionKind::Delete)
    });
    Selection {
        plan,
        restored,
        replaced,
        released,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::interp::Vars;
    use crate::engine::plan::{self, PlanOptions};
    use crate::graph::Dag;
    use crate::provider::Instance;
    use crate::state::{Resource, Status};

    const YML: &str = r#"
name: demo
services:
  db: { start: "exec sleep 600" }
  cache: { start: "exec sleep 600" }
  api:
    start: "exec sleep 600"
    depends_on: { db: { restart: true }, cache: {} }
  worker:
    start: "exec sleep 600"
    depends_on: { api: { restart: true } }
  report:
    start: "exec sleep 600"
    depends_on: [db]
"#;

    fn config(yml: &str) -> Config {
        let vars = Vars::new(Default::default(), Default::default());
        crate::config::load_str(
            yml,
            std::path::Path::new("nanokit.yml"),
            std::path::Path::new("/tmp"),
            "local",
            &vars,
        )
        .unwrap()
    }

    /// State and live instances with every service deployed and running,
    /// except those in `dead`.
    fn world(c: &Config, dead: &[&str]) -> (State, Vec<Instance>) {
        let mut state = State::new("demo", "local");
        let empty = plan::plan(
            c,
            &Dag::build(c).unwrap(),
            &state,
            &[],
            &PlanOptions::default(),
        )
        .unwrap();
        let mut live = Vec::new();
        for (n, a) in empty.actions.iter().enumerate() {
            let id = format!("{}@1", 100 + n);
            let hash = a.config_hash.clone().unwrap();
            let mut r = Resource {
                provider: "process".into(),
                provider_id: None,
                instances: Vec::new(),
                config_hash: hash.clone(),
                fields: a.fields.clone(),
                depends_on: a.depends_on.clone(),
                status: Status::Healthy,
                error: None,
                created_at: String::new(),
                updated_at: String::new(),
            };
            r.set_ids(vec![id.clone()]);
            state.resources.insert(a.service.clone(), r);
            if !dead.contains(&a.service.as_str()) {
                live.push(Instance {
                    id,
                    service: a.service.clone(),
                    config_hash: hash,
                    running: true,
                    pid: None,
                    replica: 1,
                    lineage: None,
                });
            }
        }
        (state, live)
    }

    fn names(s: &Selection) -> Vec<(&str, ActionKind)> {
        s.plan
            .actions
            .iter()
            .map(|a| (a.service.as_str(), a.action))
            .collect()
    }

    fn full(c: &Config, state: &State, live: &[Instance]) -> Plan {
        plan::plan(
            c,
            &Dag::build(c).unwrap(),
            state,
            live,
            &PlanOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_restored_dependency_releases_only_the_dependents_that_asked_transitively() {
        let c = config(YML);
        let (state, live) = world(&c, &["db"]);
        let p = full(&c, &state, &live);
        let take = BTreeSet::from(["db".to_string()]);
        let s = select(&p, &state, &c, &take, &BTreeMap::new(), false);
        assert_eq!(
            names(&s),
            [
                ("db", ActionKind::Create),
                ("api", ActionKind::Update),
                ("worker", ActionKind::Update)
            ],
            "report (short form) and cache are left alone"
        );
        assert_eq!(s.released["db"], ["api"]);
        assert_eq!(s.released["api"], ["worker"]);
        let api = &s.plan.actions[1];
        assert_eq!(
            api.stop,
            state.resources["api"].ids(),
            "its running instance is replaced"
        );
        assert!(api.keep.is_empty());
        assert!(api
            .reasons
            .iter()
            .any(|r| r.contains("depends_on.db.restart")));
    }

    #[test]
    fn runtime_drift_waits_for_its_turn_and_configuration_changes_do_not() {
        let c = config(YML);
        let (state, live) = world(&c, &["cache", "db"]);
        let p = full(&c, &state, &live);
        let s = select(&p, &state, &c, &BTreeSet::new(), &BTreeMap::new(), false);
        assert!(s.is_empty(), "{:?}", names(&s));
        assert_eq!(drift_of(&p.actions[0], &state), Drift::Runtime);
        // The configuration of `report` changed: applied now, and nothing
        // declared restart: true on it.
        let changed = config(&YML.replace(
            "report:\n    start: \"exec sleep 600\"",
            "report:\n    start: \"exec sleep 601\"",
        ));
        let p = full(&changed, &state, &live);
        let s = select(
            &p,
            &state,
            &changed,
            &BTreeSet::new(),
            &BTreeMap::new(),
            false,
        );
        assert_eq!(names(&s), [("report", ActionKind::Update)]);
        assert!(s.restored.is_empty());
    }

    #[test]
    fn an_orphan_beside_a_running_instance_is_removed_at_once_not_restarted() {
        let c = config(&YML.replace("cache: {}", "cache: { restart: true }"));
        let (state, mut live) = world(&c, &[]);
        let mut orphan = live.iter().find(|i| i.service == "cache").unwrap().clone();
        orphan.id = "999@9".into();
        live.push(orphan);
        let p = full(&c, &state, &live);
        let cache = p.actions.iter().find(|a| a.service == "cache").unwrap();
        assert_eq!(cache.stop, ["999@9"]);
        assert_eq!(drift_of(cache, &state), Drift::Config);
        let s = select(&p, &state, &c, &BTreeSet::new(), &BTreeMap::new(), false);
        assert_eq!(names(&s), [("cache", ActionKind::Update)]);
        assert!(s.restored.is_empty());
        assert!(s.released.is_empty(), "nothing restarted: nothing released");
    }

    #[test]
    fn a_running_service_is_replaced_when_asked() {
        let c = config(YML);
        let (state, live) = world(&c, &[]);
        let p = full(&c, &state, &live);
        let replace_now = BTreeMap::from([("cache".to_string(), "unhealthy".to_string())]);
        let s = select(&p, &state, &c, &BTreeSet::new(), &replace_now, false);
        assert_eq!(names(&s), [("cache", ActionKind::Update)]);
        assert_eq!(s.replaced["cache"], "unhealthy");
        assert!(s.released.is_empty(), "api's edge on cache has no restart");
    }
}
