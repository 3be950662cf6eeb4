//! Lifecycle hooks: `sh -c` commands run in order, stopping at the first
//! failure, on the host (in the project directory, with the service's env)
//! or inside an instance through the provider. Their output goes to the
//! service's log, masked.

use std::time::Instant;

use tracing::info_span;

use super::report::{Phase, StepError};
use super::run::Run;
use crate::config::{Hook, Service};
use crate::provider::{self, InstanceSpec, ProviderError};
use crate::sys::command::{self, tail};
use crate::trace;

/// Where a lifecycle hook runs.
#[derive(Clone, Copy)]
pub(super) enum HookSite<'a> {
    /// On the host, in the project directory.
    Host,
    /// Inside the instance with this provider id.
    Instance(&'a str),
}

impl Run {
    /// Runs lifecycle hooks (`sh -c`, in order, stopping at the first
    /// failure): on the host in the project directory with the service's env,
    /// or inside the instance through the provider.
    pub(super) async fn hooks(
        &self,
        site: HookSite<'_>,
        svc: &Service,
        spec: &InstanceSpec,
        hook: Hook,
        started: Instant,
    ) -> Result<(), StepError> {
        let which = hook.name();
        for (i, cmd) in svc.hooks.of(hook).iter().enumerate() {
            self.emit(
                &svc.name,
                Phase::Hook,
                started,
                Some(format!("{which}: {cmd}")),
            );
            let span = info_span!(
                "hook",
                otel.name = which,
                nanokit.service = %svc.name,
                nanokit.hook = which,
                nanokit.hook_index = i,
                nanokit.site = if matches!(site, HookSite::Host) { "host" } else { "instance" },
            );
            trace::set(&span, "nanokit.command", self.mask.mask(cmd));
            trace::step_masked(span, &self.mask, async {
                let argv = vec!["sh".to_string(), "-c".to_string(), cmd.clone()];
                let out = match site {
                    HookSite::Host => {
                        let mut env = spec.env.clone();
                        env.extend(provider::command_labels(&spec.labels));
                        trace::propagate(&mut env);
                        command::run(&argv, &self.config.dir, &env, self.opts.hook_timeout)
                            .await
                            .map_err(ProviderError::from)
                    }
                    HookSite::Instance(id) => {
                        let mut spec = spec.clone();
                        trace::propagate(&mut spec.env);
                        self.provider
                            .exec(id, &spec, &argv, self.opts.hook_timeout)
                            .await
                    }
                }
                .map_err(|e| StepError::failed(format!("hook {which} `{cmd}`: {e}")))?;
                append_log(
                    &spec.log_file,
                    &self
                        .mask
                        .mask(&format!("--- hook {which}: {cmd} ---\n{}", out.output)),
                );
                if !out.success() {
                    return Err(StepError::failed(format!(
                        "hook {which} `{cmd}` failed ({}):\n{}",
                        out.exit_text(),
                        indent(&tail(&out.output, 20))
                    )));
                }
                Ok(())
            })
            .await?;
        }
        Ok(())
    }
}

/// `s` with every line indented by four spaces.
pub(super) fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Appends `text` (already masked) to a log under `.nanokit/logs` (0600).
pub(super) fn append_log(path: &std::path::Path, text: &str) {
    use std::io::Write;
    if let Ok(mut f) = crate::sys::private::open_append(path) {
        let _ = f.write_all(text.as_bytes());
        if !text.ends_with('\n') {
            let _ = f.write_all(b"\n");
        }
    }
}
