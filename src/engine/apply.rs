//! Applying a plan: each service's steps, scheduled over the dependency
//! graph. Per service: host `prestart` → `provisioning.install` → create and
//! start each replica → `prestart_container` in it → health → host
//! `poststart`; a changed service is replaced by `recreate` or `rolling`.
//! Down, in reverse dependency order: `prestop` in the instance → stop →
//! `poststop` on the host. A failing step fails that service and skips its
//! dependents; independent branches go on. State is saved after every step,
//! so a kill loses nothing already done.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{info_span, Instrument, Span};

use super::hooks::HookSite;
use super::plan::{self, ActionKind};
use super::report::{to_result, Phase, ServiceResult, StepError, StepResult};
use super::run::Run;
use super::schedule::schedule;
use super::EngineError;
use crate::config::{Hook, Service};
use crate::provider::InstanceSpec;
use crate::state::{self, Resource, StateError, Status};
use crate::trace;

impl Run {
    /// Stops one instance: prestop in it (failure is reported, the stop goes on), stop.
    async fn stop_instance(
        &self,
        name: &str,
        id: &str,
        svc: Option<&Service>,
        started: Instant,
    ) -> Result<(), StepError> {
        self.emit(name, Phase::Stopping, started, Some(id.to_string()));
        self.unwatch(id);
        if let Some(svc) = svc {
            if !svc.hooks.prestop.is_empty() && self.is_running(id).await {
                let spec = self.spec(svc, "", 1);
                if let Err(e) = self
                    .hooks(HookSite::Instance(id), svc, &spec, Hook::Prestop, started)
                    .await
                {
                    self.emit(name, Phase::Hook, started, Some(format!("warning: {e}")));
                }
            }
        }
        let span = info_span!("stop", nanokit.service = %name, nanokit.instance = id);
        trace::step(span, async {
            self.provider
                .stop(id, self.opts.stop_grace)
                .await
                .map_err(|e| StepError::failed(format!("stopping {id}: {e}")))?;
            if self.defer_removal(name, id) {
                return Ok(());
            }
            self.provider
                .remove(id)
                .await
                .map_err(|e| StepError::failed(format!("removing {id}: {e}")))
        })
        .await
    }

    /// Deletes named volume `name` (and its data) and forgets it.
    pub(super) async fn delete_volume(&self, name: &str) -> Result<(), EngineError> {
        let id = self
            .store
            .lock()
            .await
            .state()
            .volumes
            .get(name)
            .map(|r| r.provider_id.clone());
        if let Some(id) = id {
            self.provider.delete_volume(&id).await?;
        }
        self.save(|s| {
            s.volumes.remove(name);
        })
        .await?;
        Ok(())
    }

    /// Stops instances `ids` of service `name` together (with `svc`'s stop
    /// hooks when given: replicas each wait out their own grace period at
    /// the same time, not one after another) and drops from state each one
    /// that is gone. Every stop is attempted; the first error is returned.
    async fn retire(
        &self,
        name: &str,
        ids: &[String],
        svc: Option<&Service>,
        started: Instant,
    ) -> Result<(), StepError> {
        let stops = futures::future::join_all(
            ids.iter()
                .map(|id| self.stop_instance(name, id, svc, started)),
        )
        .await;
        let mut first_error = None;
        for (id, r) in ids.iter().zip(stops) {
            match r {
                Ok(()) => self.save_ids(name, |ids| ids.retain(|x| x != id)).await?,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Records `f` applied to the service's instance ids.
    async fn save_ids(
        &self,
        name: &str,
        f: impl FnOnce(&mut Vec<String>),
    ) -> Result<(), StateError> {
        self.save(|s| {
            if let Some(r) = s.resources.get_mut(name) {
                let mut ids = r.ids();
                f(&mut ids);
                r.set_ids(ids);
                r.updated_at = state::now();
            }
        })
        .await
    }

    /// Creates and starts replica `replica`, records it, runs the
    /// instance-side prestart in it.
    async fn start_replica(
        &self,
        svc: &Service,
        hash: &str,
        replica: u32,
        started: Instant,
    ) -> Result<(String, InstanceSpec), StepError> {
        let spec = self.spec(svc, hash, replica);
        let create = info_span!(
            "create",
            nanokit.service = %svc.name,
            nanokit.provider = self.provider.name(),
            nanokit.replica = replica,
            nanokit.replicas = svc.instances.max(1),
        );
        let inst = trace::step(create.clone(), async {
            self.provider.create(&spec).await.map_err(StepError::from)
        })
        .await?;
        self.watch_exit(&svc.name, &inst.id);
        trace::set(&create, "nanokit.instance", inst.id.clone());
        self.save(|s| {
            if let Some(r) = s.resources.get_mut(&svc.name) {
                let mut ids = r.ids();
                ids.push(inst.id.clone());
                r.set_ids(ids);
                if r.status == Status::Creating {
                    r.status = Status::Starting;
                }
                r.updated_at = state::now();
            }
        })
        .await?;
        self.hooks(
            HookSite::Instance(&inst.id),
            svc,
            &spec,
            Hook::PrestartContainer,
            started,
        )
        .await?;
        Ok((inst.id, spec))
    }

    /// The whole up lifecycle of one service: stop what the plan replaces
    /// (unless rolling), prestart, record, provision, start and wait for the
    /// replicas, poststart.
    pub(super) async fn up_service(&self, action: &plan::Action, started: Instant) -> StepResult {
        let name = &action.service;
        let svc = &self.config.services[name];
        let hash = action.config_hash.clone().unwrap_or_default();
        trace::set(&Span::current(), "nanokit.action", action.action.as_str());
        if action.action == ActionKind::Noop {
            self.emit(name, Phase::Unchanged, started, None);
            return Ok(Phase::Unchanged);
        }
        let want = svc.instances.max(1) as usize;
        let spec = self.spec(svc, &hash, 1);
        let old = self.running_recorded(action, started).await?;
        let rolling = svc.update_strategy == crate::config::UpdateStrategy::Rolling
            && !old.is_empty()
            && action.keep.is_empty();
        if !rolling {
            self.retire(name, &old, Some(svc), started).await?;
            if !old.is_empty() {
                self.hooks(HookSite::Host, svc, &spec, Hook::Poststop, started)
                    .await?;
            }
        }
        let creating = want.saturating_sub(action.keep.len());
        self.emit(name, Phase::Starting, started, None);
        if creating > 0 {
            self.port_free(&spec).await?;
            self.hooks(HookSite::Host, svc, &spec, Hook::Prestart, started)
                .await?;
        }
        if self.opts.cancel.is_cancelled() {
            return Err(StepError::Cancelled);
        }
        let mut ids = action.keep.clone();
        if rolling {
            ids.extend(old.iter().cloned());
        }
        // When nothing runs between recording the service and creating its
        // instances (no host prestart hook, no provisioning), it is recorded
        // once they are created: a restart does not wait for a durable
        // write before its new instance exists. (An instance made by a run
        // killed before it recorded it carries the labels: the next run
        // finds it and removes or adopts it.)
        let record_after =
            creating > 0 && !rolling && svc.hooks.prestart.is_empty() && svc.install.is_none();
        if !record_after {
            self.record_service(action, &hash, ids, creating > 0)
                .await?;
        }
        for m in &spec.mounts {
            std::fs::create_dir_all(&m.0)
                .map_err(|e| StepError::failed(format!("volume {}: {e}", m.0.display())))?;
        }
        if creating > 0 {
            self.provision(svc, &spec, started).await?;
        }
        let slots = self.free_slots(&action.keep, creating).await;
        if rolling {
            self.roll(svc, &hash, slots, old, &spec, started).await?;
        } else {
            let record = record_after.then_some(action);
            self.start_all(svc, &hash, &slots, &action.keep, &spec, started, record)
                .await?;
        }
        if creating > 0 {
            self.hooks(HookSite::Host, svc, &spec, Hook::Poststart, started)
                .await?;
        }
        self.set_status(name, Status::Healthy, None).await?;
        self.emit(name, Phase::Healthy, started, None);
        Ok(Phase::Healthy)
    }

    /// The instances the plan stops that are recorded and running: these get
    /// their stop hooks (and, rolling, stay until their replacement is
    /// healthy). Orphans, stopped or foreign instances are removed at once.
    async fn running_recorded(
        &self,
        action: &plan::Action,
        started: Instant,
    ) -> Result<Vec<String>, StepError> {
        let name = &action.service;
        let recorded = self
            .store
            .lock()
            .await
            .state()
            .resources
            .get(name)
            .map(|r| r.ids())
            .unwrap_or_default();
        let mut old = Vec::new();
        for id in &action.stop {
            let running = recorded.contains(id) && self.is_running(id).await;
            if running {
                old.push(id.clone());
            } else {
                self.retire(name, std::slice::from_ref(id), None, started)
                    .await?;
            }
        }
        Ok(old)
    }

    /// Records the service as being created (or started, when nothing new
    /// is created) with the instances `ids` that stay.
    async fn record_service(
        &self,
        action: &plan::Action,
        hash: &str,
        ids: Vec<String>,
        creating: bool,
    ) -> Result<(), StateError> {
        let now = state::now();
        self.save(|s| {
            let created_at = s
                .resources
                .get(&action.service)
                .map_or(now.clone(), |r| r.created_at.clone());
            let mut r = Resource {
                provider: self.provider.name().to_string(),
                provider_id: None,
                instances: Vec::new(),
                config_hash: hash.to_string(),
                fields: action.fields.clone(),
                depends_on: action.depends_on.clone(),
                status: if creating {
                    Status::Creating
                } else {
                    Status::Starting
                },
                error: None,
                created_at,
                updated_at: now.clone(),
            };
            r.set_ids(ids);
            s.resources.insert(action.service.clone(), r);
        })
        .await
    }

    /// `provisioning.install`, once per manifest hash, before any new
    /// instance starts.
    async fn provision(
        &self,
        svc: &Service,
        spec: &InstanceSpec,
        started: Instant,
    ) -> Result<(), StepError> {
        let Some(install) = &svc.install else {
            return Ok(());
        };
        let name = &svc.name;
        self.set_status(name, Status::Provisioning, None).await?;
        self.emit(name, Phase::Provisioning, started, Some(install.clone()));
        let span = info_span!("provisioning", nanokit.service = %name);
        let r = trace::step_masked(span.clone(), &self.mask, async {
            self.provider
                .provision(spec, install, &svc.manifests, &self.opts.cancel)
                .await
                .map_err(|e| StepError::failed(format!("provisioning `{install}` failed: {e}")))
        })
        .await?;
        trace::set(&span, "nanokit.provision.ran", r.ran);
        if !r.ran {
            let msg = Some("already installed".into());
            self.emit(name, Phase::Provisioning, started, msg);
        }
        self.set_status(name, Status::Starting, None).await?;
        Ok(())
    }

    /// `count` replica numbers not taken by the instances `keep` that stay.
    async fn free_slots(&self, keep: &[String], count: usize) -> Vec<u32> {
        let mut used = Vec::new();
        for id in keep {
            if let Ok(Some(i)) = self.provider.inspect(id).await {
                used.push(i.replica);
            }
        }
        (1..).filter(|n| !used.contains(n)).take(count).collect()
    }

    /// Rolling update, one replica at a time: the new one healthy before an
    /// old one goes. A new replica that fails is removed and the old ones
    /// keep running.
    async fn roll(
        &self,
        svc: &Service,
        hash: &str,
        slots: Vec<u32>,
        old: Vec<String>,
        spec: &InstanceSpec,
        started: Instant,
    ) -> Result<(), StepError> {
        let name = &svc.name;
        let mut old = old.into_iter();
        for slot in slots {
            if self.opts.cancel.is_cancelled() {
                return Err(StepError::Cancelled);
            }
            let (id, rspec) = self.start_replica(svc, hash, slot, started).await?;
            if let Err(e) = self.health(&id, svc, &rspec, started).await {
                // Keep serving from the old instances.
                let _ = self.stop_instance(name, &id, None, started).await;
                self.save_ids(name, |ids| ids.retain(|x| x != &id)).await?;
                return Err(e.context(
                    "rolling update: the new replica failed, the old instance(s) keep running",
                ));
            }
            if let Some(o) = old.next() {
                self.retire(name, &[o], Some(svc), started).await?;
            }
        }
        let rest: Vec<String> = old.collect();
        self.retire(name, &rest, Some(svc), started).await?;
        self.hooks(HookSite::Host, svc, spec, Hook::Poststop, started)
            .await
    }

    /// Starts the replicas of `slots` together (then records the service of
    /// `record` with them and the instances `keep` that stay, when given),
    /// then waits until they are all healthy.
    #[allow(clippy::too_many_arguments)]
    async fn start_all(
        &self,
        svc: &Service,
        hash: &str,
        slots: &[u32],
        keep: &[String],
        spec: &InstanceSpec,
        started: Instant,
        record: Option<&plan::Action>,
    ) -> Result<(), StepError> {
        let created = futures::future::join_all(
            slots
                .iter()
                .map(|slot| self.start_replica(svc, hash, *slot, started)),
        )
        .await;
        let mut all = Vec::new();
        for id in keep {
            // Instances that stay: their replica number is not known here.
            let mut kept = spec.clone();
            kept.replica = 0;
            all.push((id.clone(), kept));
        }
        let mut failed = None;
        for r in created {
            match r {
                Ok(made) => all.push(made),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(action) = record {
            // What was made is recorded, also when a replica failed.
            let ids = all.iter().map(|(id, _)| id.clone()).collect();
            self.record_service(action, hash, ids, false).await?;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let waits = futures::future::join_all(
            all.iter()
                .map(|(id, rspec)| self.health(id, svc, rspec, started)),
        )
        .await;
        waits.into_iter().collect()
    }

    /// Deletes one service: stop its instances, poststop, drop from state.
    pub(super) async fn delete_service(
        &self,
        action: &plan::Action,
        started: Instant,
    ) -> StepResult {
        let name = &action.service;
        let svc = self.config.services.get(name);
        trace::set(&Span::current(), "nanokit.action", action.action.as_str());
        self.set_status(name, Status::Stopping, None).await?;
        self.retire(name, &action.stop, svc, started).await?;
        if let Some(svc) = svc {
            let spec = self.spec(svc, "", 1);
            self.hooks(HookSite::Host, svc, &spec, Hook::Poststop, started)
                .await?;
        }
        self.save(|s| {
            s.resources.remove(name);
        })
        .await?;
        self.emit(name, Phase::Deleted, started, None);
        Ok(Phase::Deleted)
    }
}

/// Deletes the services of `actions`, each once every service that depends
/// on it is gone (dependents first), at most `limit` at a time. A failure is
/// recorded in state and reported; what depended on it is skipped. Once
/// `cancel` fires, no new delete starts (those in progress finish).
pub(super) async fn delete_services(
    run: &Arc<Run>,
    actions: Vec<plan::Action>,
    limit: usize,
    cancel: CancellationToken,
) -> Vec<(String, StepResult, u64)> {
    let nodes = actions
        .iter()
        .map(|a| {
            let waits = actions
                .iter()
                .filter(|b| b.depends_on.contains(&a.service))
                .map(|b| b.service.clone())
                .collect();
            (a.service.clone(), waits)
        })
        .collect();
    run_actions(
        run,
        nodes,
        actions,
        limit,
        cancel,
        |run, action, started| async move { run.delete_service(&action, started).await },
    )
    .await
}

/// Runs `step` for each action as soon as the actions it waits for
/// (`nodes`: action → what it waits for) are done, at most `limit` at once.
/// A failure is recorded in state and reported, and what waits for it is
/// skipped; a cancelled step is reported as such.
pub(super) async fn run_actions<F, Fut>(
    run: &Arc<Run>,
    nodes: Vec<(String, Vec<String>)>,
    actions: Vec<plan::Action>,
    limit: usize,
    cancel: CancellationToken,
    step: F,
) -> Vec<(String, StepResult, u64)>
where
    F: Fn(Arc<Run>, plan::Action, Instant) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = StepResult> + Send + 'static,
{
    let by_name: HashMap<String, plan::Action> = actions
        .into_iter()
        .map(|a| (a.service.clone(), a))
        .collect();
    let (r2, r3) = (run.clone(), run.clone());
    schedule(
        nodes,
        limit,
        cancel,
        move |name, why| r3.emit(name, Phase::Skipped, Instant::now(), Some(why)),
        move |name, started| {
            let run = r2.clone();
            let work = step(run.clone(), by_name[&name].clone(), started);
            async move {
                // Errors quote commands and their output: masked before they
                // are recorded in state, sent as events or reported.
                let r = work.await.map_err(|e| e.masked(&run.mask));
                if let Err(e) = &r {
                    let cancelled = *e == StepError::Cancelled;
                    if !cancelled {
                        let _ = run
                            .set_status(&name, Status::Failed, Some(e.to_string()))
                            .await;
                    }
                    let phase = if cancelled {
                        Phase::Cancelled
                    } else {
                        Phase::Failed
                    };
                    run.emit(&name, phase, started, Some(e.to_string()));
                }
                r
            }
        },
    )
    .await
}

/// Applies the plan of `up`: volumes first (services mount them), then the
/// deletes (dependents first), then creates, updates and no-ops in
/// dependency order, then volume deletes (only planned with `--force`).
/// The results follow the plan's order.
pub(super) async fn up(
    run: &Arc<Run>,
    plan: &plan::Plan,
) -> Result<Vec<ServiceResult>, EngineError> {
    let limit = run.opts.concurrency;
    for v in plan
        .volumes
        .iter()
        .filter(|v| v.action == ActionKind::Create)
    {
        let id = run.provider.create_volume(&v.volume).await?;
        run.save(|s| {
            let created_at = state::now();
            let record = state::VolumeRecord {
                provider_id: id,
                created_at,
            };
            s.volumes.insert(v.volume.clone(), record);
        })
        .await?;
    }
    let mut results = Vec::new();
    let (deletes, ups): (Vec<plan::Action>, Vec<plan::Action>) = plan
        .actions
        .iter()
        .cloned()
        .partition(|a| a.action == ActionKind::Delete);
    if !deletes.is_empty() {
        for (n, r, ms) in delete_services(run, deletes, limit, run.opts.cancel.clone()).await {
            results.push(to_result(ActionKind::Delete, n, r, ms));
        }
    }
    let kinds: HashMap<String, ActionKind> =
        ups.iter().map(|a| (a.service.clone(), a.action)).collect();
    let nodes = waits_in_plan(run, &ups);
    let out = run_actions(
        run,
        nodes,
        ups,
        limit,
        run.opts.cancel.clone(),
        |run, action, started| async move { run.up_service(&action, started).await },
    )
    .await;
    for (n, r, ms) in out {
        results.push(to_result(kinds[&n], n, r, ms));
    }
    super::live::confirm(run, &mut results).await;
    refresh_dependencies(run, plan).await?;
    for v in plan
        .volumes
        .iter()
        .filter(|v| v.action == ActionKind::Delete)
    {
        run.delete_volume(&v.volume).await?;
    }
    results.sort_by_key(|r| plan.actions.iter().position(|a| a.service == r.service));
    Ok(results)
}

/// What each action waits for (its dependencies in the plan); announces
/// each service that will wait.
fn waits_in_plan(run: &Run, ups: &[plan::Action]) -> Vec<(String, Vec<String>)> {
    let in_plan: std::collections::HashSet<&str> = ups.iter().map(|a| a.service.as_str()).collect();
    ups.iter()
        .map(|a| {
            let deps: Vec<String> = a
                .depends_on
                .iter()
                .filter(|d| in_plan.contains(d.as_str()))
                .cloned()
                .collect();
            if a.action != ActionKind::Noop {
                let msg = (!deps.is_empty()).then(|| format!("waiting for {}", deps.join(", ")));
                run.emit(&a.service, Phase::Waiting, Instant::now(), msg);
            }
            (a.service.clone(), deps)
        })
        .collect()
}

/// Records the current dependencies of unchanged services (one write).
pub(super) async fn refresh_dependencies(run: &Run, plan: &plan::Plan) -> Result<(), StateError> {
    let stale: Vec<(String, Vec<String>)> = {
        let store = run.store.lock().await;
        plan.actions
            .iter()
            .filter(|a| a.action == ActionKind::Noop)
            .filter(|a| {
                store
                    .state()
                    .resources
                    .get(&a.service)
                    .is_some_and(|r| r.depends_on != a.depends_on)
            })
            .map(|a| (a.service.clone(), a.depends_on.clone()))
            .collect()
    };
    if stale.is_empty() {
        return Ok(());
    }
    run.save(|s| {
        for (n, d) in stale {
            if let Some(r) = s.resources.get_mut(&n) {
                r.depends_on = d;
            }
        }
    })
    .await
}

/// Applies the plan of `down`: services dependents first, then the removal
/// of what they stopped, then volumes. When the whole project went
/// (`everything`) and every stop succeeded, the provider frees what it set
/// up for it (`down_complete`) while those removals run. The results come
/// dependents first.
pub(super) async fn down(
    run: &Arc<Run>,
    plan: &plan::Plan,
    everything: bool,
) -> Result<Vec<ServiceResult>, EngineError> {
    *run.removals.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    let cancel = run.opts.cancel.clone();
    let out = delete_services(run, plan.actions.clone(), run.opts.concurrency, cancel).await;
    let mut results: Vec<ServiceResult> = out
        .into_iter()
        .map(|(n, r, ms)| to_result(ActionKind::Delete, n, r, ms))
        .collect();
    let pending = run
        .removals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    let leaving: Vec<String> = pending.iter().map(|(_, id)| id.clone()).collect();
    let cleanup = async {
        // Only after a whole `down` in which every stop succeeded (not
        // after a failure, nor after Ctrl-C left services running).
        if !everything || results.iter().any(|r| r.outcome != Phase::Deleted) {
            return;
        }
        let freed = run
            .provider
            .down_complete(&run.scope, &leaving)
            .instrument(info_span!("down_complete"));
        if let Err(e) = freed.await {
            tracing::warn!(error = %e, "down: cleaning up after the last instance");
        }
    };
    let (failed, ()) = tokio::join!(remove_stopped(run, pending), cleanup);
    for (service, error) in failed {
        if let Some(r) = results.iter_mut().find(|r| r.service == service) {
            r.outcome = Phase::Failed;
            r.error.get_or_insert(error);
        }
    }
    if !run.opts.cancel.is_cancelled() {
        for v in &plan.volumes {
            run.delete_volume(&v.volume).await?;
        }
    }
    results.sort_by_key(|r| {
        std::cmp::Reverse(plan.actions.iter().position(|a| a.service == r.service))
    });
    Ok(results)
}

/// Removes, all at once, the instances (service, id) that `down` stopped;
/// returns (service, error) for each that could not be removed. (A run
/// killed before this leaves stopped instances labelled with the state: the
/// next run sees them as orphans and removes them, as it does one whose
/// removal failed.)
async fn remove_stopped(run: &Run, pending: Vec<(String, String)>) -> Vec<(String, String)> {
    let removals = pending.into_iter().map(|(service, id)| async move {
        let span = info_span!("remove", nanokit.service = %service, nanokit.instance = %id);
        let r = trace::step(span, async {
            run.provider
                .remove(&id)
                .await
                .map_err(|e| StepError::failed(format!("stopped, but removing {id} failed: {e}")))
        })
        .await;
        r.err().map(|e| (service, e.to_string()))
    });
    futures::future::join_all(removals)
        .await
        .into_iter()
        .flatten()
        .collect()
}
