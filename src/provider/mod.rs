//! Runtime providers: what actually runs a service instance.
//!
//! The engines only see [`Provider`]. An instance is found again by its
//! provider id (recorded in state) or by its labels (project, env, state id,
//! service, config hash), so instances created by a run that was killed
//! before it could record them are still found. The local-process provider
//! lives in [`process`]; the Docker provider (`docker/`) maps the same
//! calls onto containers (labels, create/start, exec, inspect, stop/remove,
//! logs).

pub(crate) mod docker;
pub mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::error::ErrorCode;
use crate::sys::command::CommandError;
pub use crate::sys::command::ExecOutput;

/// Label keys every instance carries (process env vars / container labels).
pub const LABEL_PROJECT: &str = "NK_PROJECT";
pub const LABEL_ENV: &str = "NK_ENV";
pub const LABEL_STATE_ID: &str = "NK_STATE_ID";
pub const LABEL_SERVICE: &str = "NK_SERVICE";
pub const LABEL_HASH: &str = "NK_CONFIG_HASH";
/// The state lineage the instance was created under: lets a run whose
/// `state.json` was lost recompute the same (salted) config hashes and
/// adopt the instances instead of duplicating them.
pub const LABEL_LINEAGE: &str = "NK_LINEAGE";
/// Replica number (1-based) of the instance within its service.
pub const LABEL_REPLICA: &str = "NK_REPLICA";

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{0}")]
    Io(String),
    #[error("provider `{0}` is not available in this build; use `infra.provider: process`")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
    /// The runtime (Docker daemon) cannot be reached.
    #[error("{0}")]
    Unreachable(String),
    /// A command on the host (a hook, a probe of a process instance) could
    /// not be run to its end.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// Provisioning failed (the install command, its lock or sentinel).
    #[error(transparent)]
    Provision(#[from] crate::repo::RepoError),
}

impl ErrorCode for ProviderError {
    fn code(&self) -> &'static str {
        match self {
            ProviderError::Io(_) => "ENKIO",
            ProviderError::Unavailable(_) => "ENKPROVIDER",
            ProviderError::Failed(_) => "ENKPROVIDER",
            ProviderError::Unreachable(_) => "ENKUNREACHABLE",
            ProviderError::Command(_) => "ENKIO",
            ProviderError::Provision(e) => e.code(),
        }
    }
}

/// Which instances belong to one state file.
#[derive(Debug, Clone)]
pub struct Scope {
    pub project: String,
    pub env: String,
    /// Stable id of the state file (hash of its path).
    pub state_id: String,
}

/// The labels a command run for an instance (hook, probe) sees: all but the
/// state id, so such short-lived processes are never taken for instances.
pub fn command_labels(
    labels: &BTreeMap<String, String>,
) -> impl Iterator<Item = (String, String)> + '_ {
    labels
        .iter()
        .filter(|(k, _)| k.as_str() != LABEL_STATE_ID)
        .map(|(k, v)| (k.clone(), v.clone()))
}

/// What to run.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub service: String,
    pub config_hash: String,
    /// Provider-specific "what" (image for Docker).
    pub image: Option<String>,
    /// Shell command to run.
    pub command: Option<String>,
    pub dir: PathBuf,
    /// Environment of the instance (may hold secrets).
    pub env: BTreeMap<String, String>,
    /// Labels, also exported to the instance.
    pub labels: BTreeMap<String, String>,
    pub log_file: PathBuf,
    pub port: Option<u16>,
    /// (host path, target) mounts.
    pub mounts: Vec<(PathBuf, String)>,
    /// (named volume as declared in the config, target) mounts. The process
    /// provider sees them in `mounts` as host directories as well.
    pub volumes: Vec<(String, String)>,
    /// Port the service listens on inside the instance (`expose`).
    pub expose: Option<u16>,
    /// Whether `path` was given (the Docker provider bind-mounts it).
    pub path_given: bool,
    /// Replica number, 1-based.
    pub replica: u32,
    /// Replica count of the service.
    pub replicas: u32,
    pub healthcheck: Option<crate::config::Healthcheck>,
    pub cpu: Option<f64>,
    pub memory: Option<u64>,
    /// Image for `provisioning.install` (defaults to `image`).
    pub install_image: Option<String>,
}

/// One live instance as the provider sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    pub id: String,
    pub service: String,
    pub config_hash: String,
    pub running: bool,
    pub pid: Option<u32>,
    /// Replica number from the instance's labels (0 when unknown).
    #[serde(default)]
    pub replica: u32,
    /// State lineage from the instance's labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lineage: Option<String>,
}

/// How an instance ended, as its runtime tells it (or as the watcher found
/// it): what a restart policy decides on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Exit {
    pub kind: ExitKind,
    /// The exit code, when the process exited by itself and it is known
    /// (Docker reports 128 + n for a process ended by signal n).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that ended it (`SIGKILL`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

/// What ended an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ExitKind {
    /// Its process ended (by itself, or killed by a signal sent outside the
    /// runtime's API, such as `kill -9`).
    Exited,
    /// Stopped through the runtime by a user (`docker stop`, `docker kill`)
    /// or by `nanokit down <service>`.
    Stopped,
    /// Removed through the runtime (`docker rm -f`).
    Removed,
    /// Its health check failed `retries` times in a row.
    Unhealthy,
    /// Found gone or stopped by a check, with no event telling how.
    Gone,
    /// Its start did not finish (a hook, provisioning or the health check
    /// while starting failed).
    Failed,
}

impl Exit {
    pub fn new(kind: ExitKind) -> Exit {
        Exit {
            kind,
            code: None,
            signal: None,
        }
    }

    /// An exit with `code` (and the signal it stands for, past 128).
    pub fn code(code: i32) -> Exit {
        Exit {
            kind: ExitKind::Exited,
            code: Some(code),
            signal: (code > 128)
                .then(|| crate::sys::proc::signal_name(code - 128))
                .flatten(),
        }
    }

    /// Whether it ended well: exit code 0. (`on-failure` restarts the rest,
    /// except what a user stopped or removed.)
    pub fn success(&self) -> bool {
        self.kind == ExitKind::Exited && self.code == Some(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.kind, self.code, &self.signal) {
            (ExitKind::Exited, Some(c), Some(s)) => write!(f, "exited with code {c} ({s})"),
            (ExitKind::Exited, Some(c), None) => write!(f, "exited with code {c}"),
            (ExitKind::Exited, None, Some(s)) => write!(f, "killed by {s}"),
            (ExitKind::Exited, None, None) => f.write_str("exited (its code is not known here)"),
            (ExitKind::Stopped, ..) => f.write_str("stopped by a user"),
            (ExitKind::Removed, ..) => f.write_str("removed by a user"),
            (ExitKind::Unhealthy, ..) => f.write_str("unhealthy"),
            (ExitKind::Gone, ..) => f.write_str("found not running by a full check"),
            (ExitKind::Failed, ..) => f.write_str("failed to start"),
        }
    }
}

/// What a runtime's event stream says happened to one of its instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEvent {
    pub id: String,
    pub service: String,
    pub what: Happening,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Happening {
    /// Someone asked the runtime to stop or kill it (`docker stop`, `docker
    /// kill`, `docker rm -f`): the exit that follows was wanted.
    Killed,
    /// Its process ended.
    Died(Exit),
    /// The runtime finished stopping it.
    Stopped,
    /// It was removed.
    Removed,
    /// The runtime's own health check has a new verdict.
    Health { healthy: bool },
}

/// A runtime's events about a scope's instances.
pub type EventStream = futures::stream::BoxStream<'static, Result<InstanceEvent, ProviderError>>;

/// One health probe.
#[derive(Debug, Clone)]
pub enum Probe {
    /// Run this argv in the instance; exit 0 = healthy.
    Command(Vec<String>),
    /// The port accepts TCP connections.
    Port(u16),
    /// The instance is running.
    Running,
}

#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub ok: bool,
    pub output: String,
    /// The runtime itself judged the instance unhealthy for good (its own
    /// retries are exhausted): stop waiting.
    pub fatal: bool,
}

impl ProbeResult {
    /// A command probe's verdict: healthy when it exited 0; the output
    /// ends with how it ended.
    pub fn of_command(out: ExecOutput) -> ProbeResult {
        let mut output = out.output.trim_end().to_string();
        if !out.timed_out {
            if !output.is_empty() {
                output.push('\n');
            }
            output.push_str(&format!("({})", out.exit_text()));
        }
        ProbeResult {
            ok: out.success(),
            output,
            fatal: false,
        }
    }
}

/// Result of [`Provider::provision`].
#[derive(Debug, Clone)]
pub struct Provisioned {
    /// False when the sentinel showed the same install already done.
    pub ran: bool,
}

#[async_trait]
pub trait Provider: Send + Sync {
    fn name(&self) -> &'static str;

    /// Every live instance labelled with `scope`.
    async fn observe(&self, scope: &Scope) -> Result<Vec<Instance>, ProviderError>;

    /// The recorded instances `ids` of `scope` that still exist: what a
    /// pass that only restores them needs to look at (orphans are for a
    /// full [`observe`](Provider::observe)). By default, `observe`.
    async fn observe_recorded(
        &self,
        scope: &Scope,
        _ids: &[String],
    ) -> Result<Vec<Instance>, ProviderError> {
        self.observe(scope).await
    }

    /// The instance with provider id `id`, if it still exists (and is ours:
    /// a reused pid is not).
    async fn inspect(&self, id: &str) -> Result<Option<Instance>, ProviderError>;

    /// Creates and starts an instance.
    async fn create(&self, spec: &InstanceSpec) -> Result<Instance, ProviderError>;

    /// Runs `argv` inside the instance.
    async fn exec(
        &self,
        id: &str,
        spec: &InstanceSpec,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, ProviderError>;

    /// One health probe.
    async fn probe(
        &self,
        id: &str,
        spec: &InstanceSpec,
        probe: &Probe,
        timeout: Duration,
    ) -> Result<ProbeResult, ProviderError>;

    /// Resolves once instance `id` no longer runs (it exited, was stopped
    /// or is gone), from the runtime's own notice where it gives one: the
    /// engine holds a health verdict only while this has not resolved. By
    /// default, `inspect` every 100 ms.
    async fn exited(&self, id: &str) {
        loop {
            if !matches!(self.inspect(id).await, Ok(Some(i)) if i.running) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the host `port` of an instance is bound in this process's
    /// network namespace (the instance runs on this host), so that a
    /// listener found here on that port keeps the instance from binding it.
    fn ports_bound_here(&self) -> bool {
        false
    }

    /// What of the runtime's uses host `port` (a container publishing
    /// it), said for a message; None when nothing does, or the provider
    /// cannot tell.
    async fn port_user(&self, _port: u16) -> Option<String> {
        None
    }

    /// Runs the health check `argv` in instance `id` again and again, a few
    /// milliseconds apart, until it passes (`Some(true)`) or `within` is
    /// over (`Some(false)`), cut `timeout` after that: while an instance
    /// starts, one call instead of a probe per check. None: the provider
    /// has no cheaper way than separate [`probe`](Provider::probe)s (the
    /// default), or this instance cannot (no shell in it), or it was cut.
    async fn probe_until(
        &self,
        _id: &str,
        _spec: &InstanceSpec,
        _argv: &[String],
        _within: Duration,
        _timeout: Duration,
    ) -> Result<Option<bool>, ProviderError> {
        Ok(None)
    }

    /// Stops (gracefully, then forcibly after `grace`). What a stopped
    /// instance leaves behind (a Docker container) stays until
    /// [`remove`](Provider::remove).
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), ProviderError>;

    /// Removes what stopped instance `id` left behind (nothing, unless the
    /// provider keeps stopped instances). Gone already is not an error.
    async fn remove(&self, _id: &str) -> Result<(), ProviderError> {
        Ok(())
    }

    /// The last `lines` lines of a service's logs.
    async fn logs(&self, service: &str, lines: usize) -> Result<String, ProviderError>;

    /// Creates a named volume; returns its provider id.
    async fn create_volume(&self, name: &str) -> Result<String, ProviderError>;

    /// Deletes a named volume and its data.
    async fn delete_volume(&self, id: &str) -> Result<(), ProviderError>;

    /// Host path of a named volume (for mounts).
    fn volume_path(&self, name: &str) -> PathBuf;

    /// Called before `up` looks at a scope whose previous run died: waits
    /// until requests that run sent and the runtime is still finishing have
    /// landed, so that what they create is seen (and cleaned up) now.
    async fn settle(&self, _scope: &Scope) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Called once `down` has stopped every instance of the scope's
    /// project, while it removes `leaving` (those instances): frees what the
    /// provider set up for them that nobody else uses. `leaving` never
    /// counts as a user, even before its removal has finished.
    async fn down_complete(
        &self,
        _scope: &Scope,
        _leaving: &[String],
    ) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Runs `install` (`sh -c`) once per manifest hash for `spec`, under the
    /// global provisioning lock and sentinel of its shared directory. The
    /// process provider provisions the service's `path` on the host.
    async fn provision(
        &self,
        spec: &InstanceSpec,
        install: &str,
        manifests: &[PathBuf],
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Provisioned, ProviderError> {
        let argv = vec!["sh".to_string(), "-c".to_string(), install.to_string()];
        let opts = crate::repo::ProvisionOptions {
            capture: true,
            ..Default::default()
        };
        let done = crate::repo::provision(&spec.dir, &argv, manifests, &opts, cancel).await?;
        Ok(Provisioned { ran: done.ran })
    }

    /// For a recorded instance that is gone: the pid it had, when another
    /// process uses that pid now (a provider whose ids are pids).
    fn reused_pid(&self, _id: &str) -> Option<u32> {
        None
    }

    /// The runtime's stream of what happens to `scope`'s instances, when it
    /// has one (Docker's events, filtered by the scope's labels). None:
    /// watch each instance with [`ended`](Provider::ended).
    async fn events(&self, _scope: &Scope) -> Result<Option<EventStream>, ProviderError> {
        Ok(None)
    }

    /// Resolves when instance `id` ends (at once when it has ended), with
    /// how, for a provider that watches instances one by one (a process,
    /// through a pidfd opened on it and checked to be it). None when the
    /// provider reports through [`events`](Provider::events).
    fn ended(&self, _id: &str) -> Option<futures::future::BoxFuture<'static, Exit>> {
        None
    }

    /// Whether the runtime runs a service's health check itself and
    /// reports its verdicts in [`events`](Provider::events) (Docker's
    /// HEALTHCHECK); if not, a watcher probes running instances itself.
    fn reports_health(&self) -> bool {
        false
    }
}
