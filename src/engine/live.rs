//! A health verdict is about one live instance. From its start (or from
//! the first health wait, for an instance that stays) until the run ends,
//! the engine watches each instance's exit through [`Provider::exited`];
//! an instance that has exited is not healthy, whatever a probe answered
//! (another process may hold its port): its service fails, quoting its
//! log's tail, and at the end of `up` every service reported healthy is
//! looked at once more. A host `port` that something already listens on is
//! reported before the service starts, naming the process that holds it.
//!
//! [`Provider::exited`]: crate::provider::Provider::exited

use tokio_util::sync::CancellationToken;

use super::hooks::indent;
use super::report::{Phase, ServiceResult, StepError};
use super::run::{Exit, Run, Watched};
use crate::provider::{self, InstanceSpec};
use crate::state::Status;
use crate::sys::{net, proc};

/// Log lines quoted when an instance exited.
const LOG_LINES: usize = 20;

impl Run {
    /// The exit of instance `id` of `service`, watched from now until the
    /// run ends (or the engine stops it: [`Self::unwatch`]).
    pub(super) fn watch_exit(&self, service: &str, id: &str) -> Exit {
        let mut map = self.exits.lock();
        if let Some(w) = map.get(id) {
            return w.exit.clone();
        }
        let exit = Exit(CancellationToken::new());
        let (provider, fire, owned) = (self.provider.clone(), exit.0.clone(), id.to_string());
        let task = tokio::spawn(async move {
            provider.exited(&owned).await;
            fire.cancel();
        });
        map.insert(
            id.to_string(),
            Watched {
                service: service.to_string(),
                exit: exit.clone(),
                task: task.abort_handle(),
            },
        );
        exit
    }

    /// Stops watching instance `id`: the engine is about to stop it.
    pub(super) fn unwatch(&self, id: &str) {
        if let Some(w) = self.exits.lock().remove(id) {
            w.task.abort();
        }
    }

    /// The failure of an instance of `service` that exited: `what` happened,
    /// and the last lines of the service's log.
    pub(super) async fn exited(&self, service: &str, what: &str) -> StepError {
        let logs = match self.provider.logs(service, LOG_LINES).await {
            Ok(l) => l,
            Err(e) => format!("({e})"),
        };
        StepError::failed(format!("{what}; last log lines:\n{}", indent(&logs)))
    }

    /// Fails when `spec`'s host `port` is already bound where the instance
    /// would bind it, naming who holds it: the instance could not bind it,
    /// and its health check would be answered by the holder. Where the
    /// provider's instances bind ports on this host, any listener counts;
    /// elsewhere, what the provider knows (a remote Docker daemon's own
    /// containers).
    pub(super) async fn port_free(&self, spec: &InstanceSpec) -> Result<(), StepError> {
        let Some(port) = spec.port else {
            return Ok(());
        };
        let here = self.provider.ports_bound_here();
        let listener = if here {
            match net::listeners(port).into_iter().next() {
                Some(l) => Some(l),
                None => return Ok(()),
            }
        } else {
            None
        };
        let user = self.provider.port_user(port).await;
        let holder = match (listener, user) {
            (_, Some(user)) => format!("used by {user}"),
            (Some(l), None) => format!("{} is held by {}", l.addr, holder(l.inode)),
            (None, None) => return Ok(()),
        };
        Err(StepError::failed(format!(
            "port {port} is already allocated: {holder}; stop that, or give service `{}` another `port`",
            spec.service
        )))
    }
}

/// Who holds socket `inode`: `pid 4711 (node db.js)`, and for a nanokit
/// instance ` in /srv/db, service `db` of nanokit project `basic` (env
/// `local`)`.
fn holder(inode: u64) -> String {
    let Some(&pid) = net::holders(inode).first() else {
        return "a process nanokit cannot see (another user's, or in another namespace)".into();
    };
    let mut s = format!("pid {pid}");
    if let Some(cmd) = proc::cmdline(pid) {
        let cmd: String = cmd.chars().take(120).collect();
        s.push_str(&format!(" ({cmd})"));
    }
    let labels = proc::environ(pid, "NK_").unwrap_or_default();
    if let (Some(svc), Some(project)) = (
        labels.get(provider::LABEL_SERVICE),
        labels.get(provider::LABEL_PROJECT),
    ) {
        if let Some(dir) = proc::cwd(pid) {
            s.push_str(&format!(" in {}", dir.display()));
        }
        let env = labels.get(provider::LABEL_ENV).map_or("", String::as_str);
        s.push_str(&format!(
            ", service `{svc}` of nanokit project `{project}` (env `{env}`)"
        ));
    }
    s
}

/// At the end of `up`: fails each service reported healthy of which a
/// watched instance no longer runs (it exited after its check passed),
/// quoting its log, and records that in state.
pub(super) async fn confirm(run: &Run, results: &mut [ServiceResult]) {
    let watched: Vec<(String, String, Exit)> = run
        .exits
        .lock()
        .iter()
        .map(|(id, w)| (w.service.clone(), id.clone(), w.exit.clone()))
        .collect();
    if !results.iter().any(|r| r.outcome == Phase::Healthy) || watched.is_empty() {
        return;
    }
    // One look at everything (a list call for Docker) beside the notices.
    let running: Option<Vec<String>> = run.provider.observe(&run.scope).await.ok().map(|all| {
        all.into_iter()
            .filter(|i| i.running)
            .map(|i| i.id)
            .collect()
    });
    for r in results.iter_mut().filter(|r| r.outcome == Phase::Healthy) {
        let gone = watched.iter().find(|(svc, id, exit)| {
            svc == &r.service
                && (exit.happened() || running.as_ref().is_some_and(|ids| !ids.contains(id)))
        });
        let Some((_, id, _)) = gone else { continue };
        let what = format!("instance {id} exited after its health check passed (was the check answered by another process, on its port?)");
        let e = run
            .exited(&r.service, &what)
            .await
            .masked(&run.mask)
            .to_string();
        let _ = run
            .set_status(&r.service, Status::Failed, Some(e.clone()))
            .await;
        run.emit(
            &r.service,
            Phase::Failed,
            std::time::Instant::now(),
            Some(e.clone()),
        );
        r.outcome = Phase::Failed;
        r.error = Some(e);
    }
}
