//! What a run tells its caller: progress events, each service's result, the
//! report, and the typed outcome of one step ([`StepError`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::plan::{ActionKind, Plan};
use crate::trace::{Masker, RunOutcome};

/// Progress of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Waiting,
    Stopping,
    Stopped,
    Starting,
    Hook,
    Provisioning,
    Health,
    Healthy,
    Unchanged,
    Failed,
    Skipped,
    Deleted,
    Cancelled,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Starting => "starting",
            Phase::Hook => "hook",
            Phase::Provisioning => "provisioning",
            Phase::Health => "health",
            Phase::Healthy => "healthy",
            Phase::Unchanged => "unchanged",
            Phase::Failed => "failed",
            Phase::Skipped => "skipped",
            Phase::Deleted => "deleted",
            Phase::Cancelled => "cancelled",
        }
    }
}

/// A progress event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub service: String,
    pub phase: Phase,
    /// Milliseconds since this service's work began.
    pub elapsed_ms: u64,
    pub message: Option<String>,
}

pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// Why one service's step did not end well. Decides control flow: a
/// cancelled step is not recorded as failed, a skipped one never ran.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The run was cancelled (Ctrl-C, a lost deploy lease) before or while
    /// this step ran.
    #[error("cancelled")]
    Cancelled,
    /// Not run: what it waits for did not come up.
    #[error("{0}")]
    Skipped(String),
    /// The step failed; the message says how (commands, output, the last
    /// probe), masked before it is recorded or shown.
    #[error("{0}")]
    Failed(String),
}

impl StepError {
    /// A failure with this message.
    pub fn failed(message: impl Into<String>) -> StepError {
        StepError::Failed(message.into())
    }

    /// This error with `mask`'s secrets masked in its message.
    pub fn masked(self, mask: &Masker) -> StepError {
        match self {
            StepError::Cancelled => StepError::Cancelled,
            StepError::Skipped(m) => StepError::Skipped(mask.mask(&m)),
            StepError::Failed(m) => StepError::Failed(mask.mask(&m)),
        }
    }

    /// The same kind of error with `context: ` before its message.
    pub fn context(self, context: impl std::fmt::Display) -> StepError {
        match self {
            StepError::Failed(m) => StepError::Failed(format!("{context}: {m}")),
            other => other,
        }
    }
}

impl From<crate::state::StateError> for StepError {
    fn from(e: crate::state::StateError) -> Self {
        StepError::Failed(e.to_string())
    }
}

impl From<crate::provider::ProviderError> for StepError {
    fn from(e: crate::provider::ProviderError) -> Self {
        StepError::Failed(e.to_string())
    }
}

/// What one step ended with.
pub type StepResult = Result<Phase, StepError>;

/// How one service ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceResult {
    pub service: String,
    pub action: ActionKind,
    pub outcome: Phase,
    pub error: Option<String>,
    pub elapsed_ms: u64,
}

/// The result of `up` / `down`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub plan: Plan,
    pub results: Vec<ServiceResult>,
}

impl Report {
    pub fn failures(&self) -> Vec<&ServiceResult> {
        self.results
            .iter()
            .filter(|r| matches!(r.outcome, Phase::Failed | Phase::Skipped | Phase::Cancelled))
            .collect()
    }

    /// One line per failed, skipped or cancelled service (`api failed: …`);
    /// None when every service came through.
    pub fn failure_summary(&self) -> Option<String> {
        let f = self.failures();
        (!f.is_empty()).then(|| {
            f.iter()
                .map(|f| {
                    format!(
                        "{} {}: {}",
                        f.service,
                        f.outcome.as_str(),
                        f.error.as_deref().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
    }
}

impl<E: std::fmt::Display> RunOutcome for Result<Report, E> {
    fn failure(&self) -> Option<String> {
        match self {
            Err(e) => Some(e.to_string()),
            Ok(r) => r.failure_summary(),
        }
    }
}

/// The result of one service from how its step ended.
pub(super) fn to_result(action: ActionKind, name: String, r: StepResult, ms: u64) -> ServiceResult {
    let (outcome, error) = match r {
        Ok(p) => (p, None),
        Err(StepError::Cancelled) => (Phase::Cancelled, None),
        Err(StepError::Skipped(why)) => (Phase::Skipped, Some(why)),
        Err(StepError::Failed(e)) => (Phase::Failed, Some(e)),
    };
    ServiceResult {
        service: name,
        action,
        outcome,
        error,
        elapsed_ms: ms,
    }
}

impl crate::trace::StepFailure for StepError {
    fn is_cancelled(&self) -> bool {
        *self == StepError::Cancelled
    }
}
