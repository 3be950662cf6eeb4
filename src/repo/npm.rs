//! nanokit's own installer: `npm install` into an attempt's staging
//! directory (or, where npm's configuration and the package's tree allow,
//! the direct installer of [`super::direct`], which gives the same tree
//! without starting npm), retried after transient failures, within a bounded
//! number of installers per repo and host.
//!
//! Guarantees:
//! * A transient failure (npm's code `ECONNRESET`, `ETIMEDOUT`,
//!   `ESOCKETTIMEDOUT`, `EAI_AGAIN`, or an HTTP 5xx or 429 answer) is
//!   retried with exponential backoff and jitter, at most `attempts` times in
//!   all and never starting an attempt that would end its wait past
//!   `budget`; a permanent one (`E404`, `ETARGET`, `EINTEGRITY`, a bad
//!   tarball, anything unknown) is not retried. The final `ENKINSTALL` names
//!   every attempt with npm's code, and quotes npm's last lines.
//! * The package lock is held across retries (waiters keep waiting); each
//!   attempt starts from an empty staging tree.
//! * At most `max_concurrent` installers run at once per repo and host,
//!   across processes: each holds one of that many lease locks
//!   (`.locks/.installers/<host>/<n>.lock`) while it installs and publishes,
//!   and gives it up while it waits to retry. Waiters for a package another
//!   process installs wait on the package lock, never for a slot.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::direct::{self, Direct};
use super::options::{NpmOptions, RetryOptions};
use super::{installer, io_err, InstallTxn, OwnerRecord, RepoError};
use crate::lock::{self, Lease, LockError, LockOptions};
use crate::sys::beneath::Access;

/// The default bound on concurrent installers: this host's cores.
pub fn default_max_concurrent() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// npm's error code in its log (`npm error code E404`; `npm ERR! code …`
/// before npm 10), the last one if several.
pub fn npm_code(log: &str) -> Option<String> {
    log.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            l.strip_prefix("npm error code ")
                .or_else(|| l.strip_prefix("npm ERR! code "))
        })
        .filter_map(|rest| rest.split_whitespace().next())
        .next_back()
        .map(str::to_string)
}

/// Whether npm's error `code` may go away by itself (a network hiccup, an
/// overloaded registry), so that the install is worth retrying.
pub fn transient(code: &str) -> bool {
    matches!(
        code,
        "ECONNRESET" | "ETIMEDOUT" | "ESOCKETTIMEDOUT" | "EAI_AGAIN" | "E429"
    ) || code
        .strip_prefix("E5")
        .is_some_and(|d| d.len() == 2 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// The wait before retry number `n` (1 for the first retry).
fn backoff(retry: &RetryOptions, n: u32) -> Duration {
    let base = retry.first_delay.saturating_mul(1 << (n - 1).min(16));
    base.mul_f64(0.5 + fastrand::f64())
}

/// The host part of installer slot paths: installers on one machine share
/// its cores whatever their container (the kernel's boot id, not the pid
/// namespace). `NANOKIT_HOST_ID` overrides it, as for locks.
fn slot_host() -> &'static str {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| match std::env::var("NANOKIT_HOST_ID") {
        Ok(v) if !v.is_empty() => v.replace(['/', '.'], "_"),
        _ => {
            use sha2::{Digest, Sha256};
            let boot =
                std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
            if boot.trim().is_empty() {
                crate::sys::host::this_host().id.clone()
            } else {
                hex::encode(&Sha256::digest(boot.trim().as_bytes())[..12])
            }
        }
    })
}

/// `.locks/.installers`, where the slots of every host live.
pub const SLOTS_DIR: &str = ".locks/.installers";

/// Takes one of the `max` installer slots of `repo_dir` on this host,
/// waiting (polling every 10–30 ms) while all are held.
pub async fn installer_slot(
    repo_dir: &Path,
    max: usize,
    holder: &str,
    cancel: &CancellationToken,
) -> Result<Lease, RepoError> {
    let max = max.max(1);
    let opts = LockOptions {
        timeout: Some(Duration::ZERO),
        holder: Some(holder.to_string()),
        ..LockOptions::default()
    };
    let dir = Path::new(SLOTS_DIR).join(slot_host());
    loop {
        let first = fastrand::usize(..max);
        for i in (first..max).chain(0..first) {
            let rel = dir.join(format!("{i}.lock"));
            match lock::acquire_in(repo_dir, &rel, &opts, cancel).await {
                Ok(lease) => return Ok(lease),
                Err(LockError::Locked { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10 + fastrand::u64(..20))) => {}
            _ = cancel.cancelled() => {
                return Err(LockError::Aborted { path: repo_dir.join(&dir) }.into());
            }
        }
    }
}

/// How one attempt failed.
struct Failure {
    /// Who ran: `npm install` or nanokit's direct installer.
    installer: String,
    /// npm's code, if it printed one.
    code: Option<String>,
    /// The exit status in words.
    status: String,
    /// npm's last lines.
    tail: String,
}

impl Failure {
    fn transient(&self) -> bool {
        self.code.as_deref().is_some_and(transient)
    }

    fn describe(&self) -> String {
        match &self.code {
            Some(c) if transient(c) => format!("{c} (transient)"),
            Some(c) => format!("{c} (permanent)"),
            None => format!("{} without an npm error code", self.status),
        }
    }
}

const LOG: &str = ".nanokit-installer.log";

impl InstallTxn {
    /// Runs nanokit's npm installer into the staging directory, retrying
    /// transient failures (see the module's guarantees), within an
    /// installer slot that stays held until the commit ends. Returns the
    /// number of attempts.
    #[tracing::instrument(name = "npm install", level = "info", skip_all, fields(nanokit.package = %self.spec))]
    pub async fn run_npm(
        &mut self,
        npm: &NpmOptions,
        max_concurrent: usize,
        cancel: &CancellationToken,
    ) -> Result<u32, RepoError> {
        let started = Instant::now();
        let mut tried: Vec<String> = Vec::new();
        let retry = npm.retry;
        for attempt in 1u32.. {
            self.hold_slot(max_concurrent, cancel).await?;
            let failure = match self.install_once(npm).await? {
                None => return Ok(attempt),
                Some(f) => f,
            };
            tried.push(format!("attempt {attempt}: {}", failure.describe()));
            let delay = backoff(&retry, attempt);
            let last = !failure.transient()
                || attempt >= retry.attempts
                || started.elapsed() + delay > retry.budget;
            if last {
                let why = if failure.transient() {
                    format!(
                        "giving up (at most {} attempts within {})",
                        retry.attempts,
                        humantime::format_duration(retry.budget)
                    )
                } else {
                    "not retried: the error is permanent".to_string()
                };
                return Err(RepoError::InstallFailed {
                    spec: self.spec.to_string(),
                    message: format!(
                        "{} ran {attempt} time(s) in {:.1} s ({}); {why}. {}'s last lines:\n{}",
                        failure.installer,
                        started.elapsed().as_secs_f64(),
                        tried.join(", "),
                        failure.installer,
                        failure.tail
                    ),
                });
            }
            tracing::warn!(spec = %self.spec, attempt, error = %failure.describe(), delay_ms = delay.as_millis() as u64,
                "npm install failed transiently; retrying after a backoff");
            // Others may install meanwhile; the package lock stays ours.
            self.slot = None;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => {
                    return Err(LockError::Aborted { path: self.repo.lock_path(&self.spec) }.into());
                }
            }
            self.clean_staging()?;
        }
        unreachable!("the loop returns")
    }

    /// Holds one of the repo's installer slots on this host until the
    /// transaction ends (commit or abort), if it does not hold one yet.
    pub async fn hold_slot(
        &mut self,
        max_concurrent: usize,
        cancel: &CancellationToken,
    ) -> Result<(), RepoError> {
        if self.slot.is_none() {
            let holder = format!("installing {}", self.spec);
            self.slot =
                Some(installer_slot(&self.repo.dir, max_concurrent, &holder, cancel).await?);
        }
        Ok(())
    }

    /// Empties the staging directory for the next attempt (keeps the owner
    /// record and the minimal `package.json`).
    pub(super) fn clean_staging(&self) -> Result<(), RepoError> {
        let staging = self
            .open_staging()
            .map_err(io_err("open the staging directory", &self.staging))?;
        for name in staging.entries().map_err(io_err("list", &self.staging))? {
            if name != installer::OWNER_FILE && name != "package.json" {
                installer::remove_tree(&staging, &name);
            }
        }
        Ok(())
    }

    /// One attempt: nanokit's direct installer where npm's configuration
    /// allows it and the tree needs nothing more (see [`direct`]), else npm.
    /// `Some` describes how it failed.
    async fn install_once(&self, npm: &NpmOptions) -> Result<Option<Failure>, RepoError> {
        let Some(registry) = direct::registry_for(npm) else {
            return self.npm_once(npm).await;
        };
        let package = self
            .create_staged_package()
            .map_err(io_err("create the package directory in", &self.staging))?;
        match direct::install(&registry, &self.spec, package).await {
            Ok(Direct::Done { packages }) => {
                tracing::info!(spec = %self.spec, packages, "installed without npm");
                Ok(None)
            }
            Ok(Direct::Unsupported(why)) => {
                tracing::info!(spec = %self.spec, %why, "npm installs this package");
                self.clean_staging()?;
                self.npm_once(npm).await
            }
            Err(e) => Ok(Some(Failure {
                installer: "nanokit's direct installer".into(),
                code: Some(e.code),
                status: "failed".into(),
                tail: e.message,
            })),
        }
    }

    /// One npm run; `Some` describes how it failed.
    async fn npm_once(&self, npm: &NpmOptions) -> Result<Option<Failure>, RepoError> {
        let failed = |message: String| RepoError::InstallFailed {
            spec: self.spec.to_string(),
            message,
        };
        // npm's messages go to a file in the staging directory, not a pipe:
        // nothing can block on a pipe held open by a straggler.
        let log_path = self.staging.join(LOG);
        let staging = self
            .open_staging()
            .map_err(io_err("open the staging directory", &self.staging))?;
        let log = staging
            .open_file(LOG, Access::CreateNew(0o644), rustix::fs::OFlags::empty())
            .map_err(io_err("create", &log_path))?;
        let mut cmd = std::process::Command::new(&npm.npm);
        cmd.arg("install")
            .arg(self.spec.npm_install_arg())
            .args(["--no-audit", "--no-fund", "--no-package-lock", "--no-save"])
            .args(["--loglevel", "error"])
            // nanokit retries (with its own bounded backoff), not npm.
            .arg("--fetch-retries=0")
            .args(&npm.extra_args)
            .current_dir(&self.staging)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        tracing::info!(spec = %self.spec, staging = %self.staging.display(), "running npm install");
        // Own process group, killed with us (and when this future is dropped).
        let mut child = crate::sys::command::GroupChild::spawn(cmd)
            .map_err(|e| failed(format!("could not run {}: {e}", npm.npm.display())))?;
        if let Some(token) = self.lease.as_ref().map(|l| l.token().to_string()) {
            let mut record = OwnerRecord::ours(&token);
            record.installer_pid = Some(child.pid());
            record.installer_start = crate::sys::host::process_start_time(child.pid());
            if let Err(e) = record.write(&staging) {
                tracing::warn!(error = %e, "cannot record the installer's pid");
            }
        }
        let status = child
            .wait()
            .await
            .map_err(|e| failed(format!("waiting for {}: {e}", npm.npm.display())))?;
        if status.success() {
            return Ok(None);
        }
        let text = staging.read_file(LOG).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        Ok(Some(Failure {
            installer: format!("{} install", npm.npm.display()),
            code: npm_code(&text),
            status: status.to_string(),
            tail: crate::sys::command::tail(&text, 20),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_what_is_retried() {
        let log = "npm error code E500\nnpm error 500 Internal Server Error - GET http://x/y\n";
        assert_eq!(npm_code(log).as_deref(), Some("E500"));
        assert_eq!(
            npm_code("npm ERR! code ECONNRESET\nnpm ERR! errno ECONNRESET").as_deref(),
            Some("ECONNRESET")
        );
        assert_eq!(npm_code("something else"), None);
        for t in [
            "E500",
            "E503",
            "E429",
            "ECONNRESET",
            "ETIMEDOUT",
            "EAI_AGAIN",
        ] {
            assert!(transient(t), "{t}");
        }
        for p in [
            "E404",
            "ETARGET",
            "EINTEGRITY",
            "TAR_BAD_ARCHIVE",
            "E5",
            "E5000",
            "E403",
        ] {
            assert!(!transient(p), "{p}");
        }
        let r = RetryOptions::default();
        for n in 1..=3 {
            let d = backoff(&r, n);
            let base = Duration::from_secs(1 << (n - 1));
            assert!(d >= base / 2 && d <= base * 3 / 2, "{n}: {d:?}");
        }
    }
}
