//! Manifest provisioning: run an install command once per manifest hash in a
//! directory shared by many services or replicas (a volume).
//!
//! The global lock `<dir>/.nk-install-lock` serialises installers; the
//! sentinel `<dir>/.nk-installed-<hash>` records that the command succeeded
//! for exactly these manifests (and this command). Sentinels of other hashes
//! are removed *before* the command runs, so a crash mid-install never leaves
//! a sentinel that claims the directory's content.
//!
//! The directory is the caller's choice; the lock and sentinels inside it may
//! be replaced by co-tenants of the volume. The lock file is never followed
//! (see [`crate::lock`]), sentinels are looked at without following them and
//! written as fresh files renamed into place: a link, FIFO or device planted
//! at either is refused (`ENKFOREIGN`), never written through or blocked on.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{io_err, RepoError};
use crate::lock::{self, LockError, LockOptions};
use crate::sys::beneath::Dir;

/// Options of [`provision`].
#[derive(Debug, Clone, Default)]
pub struct ProvisionOptions {
    pub lock: LockOptions,
    /// Working directory of the command (default: the provisioned directory).
    pub cwd: Option<PathBuf>,
    /// Capture the command's output (returned, and quoted on failure) instead
    /// of letting it through to our stdout/stderr.
    pub capture: bool,
}

/// What [`provision`] did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionOutcome {
    /// True if this call ran the command; false if the sentinel was there.
    pub ran: bool,
    /// The manifest hash (the sentinel is `.nk-installed-<hash>`).
    pub hash: String,
    #[serde(serialize_with = "as_ms")]
    pub waited: Duration,
    #[serde(serialize_with = "as_ms")]
    pub duration: Duration,
    /// The command's combined output, when captured and run.
    pub output: Option<String>,
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// The sentinel name prefix.
pub const SENTINEL_PREFIX: &str = ".nk-installed-";

/// Hash of the manifests' names and contents and of the command.
pub fn manifest_hash(command: &[String], manifests: &[PathBuf]) -> Result<String, RepoError> {
    let mut h = Sha256::new();
    h.update(b"nanokit-provision-v1\0");
    for arg in command {
        h.update(arg.as_bytes());
        h.update(b"\0");
    }
    for path in manifests {
        let bytes = fs::read(path).map_err(|e| {
            RepoError::Provision(format!("cannot read the manifest {}: {e}", path.display()))
        })?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        h.update(b"\x01");
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(hex::encode(&h.finalize()[..12]))
}

/// How an install command ended, as [`provision_with`]'s runner reports it.
#[derive(Debug, Clone)]
pub struct InstallRun {
    pub success: bool,
    /// Exit status in words (`exit status: 1`), for the error message.
    pub status: String,
    /// Combined output, when captured.
    pub output: Option<String>,
}

/// Runs `command` in `dir` unless `<dir>/.nk-installed-<hash of manifests>`
/// exists, under the global lock `<dir>/.nk-install-lock`, then writes the
/// sentinel. Concurrent callers on the same directory run it once; the
/// others wait and skip.
pub async fn provision(
    dir: &Path,
    command: &[String],
    manifests: &[PathBuf],
    opts: &ProvisionOptions,
    cancel: &CancellationToken,
) -> Result<ProvisionOutcome, RepoError> {
    let cwd = opts.cwd.clone().unwrap_or_else(|| dir.to_path_buf());
    let capture = opts.capture;
    provision_with(dir, command, manifests, opts, cancel, |hash| async move {
        run_on_host(dir, &cwd, command, &hash, capture).await
    })
    .await
}

async fn run_on_host(
    dir: &Path,
    cwd: &Path,
    command: &[String],
    hash: &str,
    capture_output: bool,
) -> Result<InstallRun, RepoError> {
    use crate::sys::command::{capture_file, read_capture, GroupChild};
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .current_dir(cwd)
        .env("NANOKIT_PROVISION_DIR", dir)
        .env("NANOKIT_PROVISION_HASH", hash)
        .stdin(Stdio::null());
    // Captured output goes to an unlinked temporary file, not a pipe: a
    // straggler holding a pipe open can never block us.
    let mut capture = None;
    if capture_output {
        let cannot = |e| RepoError::Provision(format!("cannot capture the output: {e}"));
        let file = capture_file().map_err(cannot)?;
        cmd.stdout(file.try_clone().map_err(cannot)?)
            .stderr(file.try_clone().map_err(cannot)?);
        capture = Some(file);
    } else {
        cmd.stdout(crate::sys::fs::child_stdout())
            .stderr(crate::sys::fs::child_stderr());
    }
    // Own process group, killed with us and when this future is dropped.
    let mut child = GroupChild::spawn(cmd)
        .map_err(|e| RepoError::Provision(format!("cannot run {:?}: {e}", command[0])))?;
    let status = child
        .wait()
        .await
        .map_err(|e| RepoError::Provision(format!("waiting for {:?}: {e}", command[0])))?;
    let output = capture.map(read_capture);
    Ok(InstallRun {
        success: status.success(),
        status: status.to_string(),
        output,
    })
}

/// [`provision`] with the command run by `run` (given the manifest hash),
/// called only while holding the lock and only when the sentinel is
/// missing: e.g. in a container that mounts the directory. `dir` must be
/// reachable from this host (the lock and sentinel live there).
pub async fn provision_with<F, Fut>(
    dir: &Path,
    command: &[String],
    manifests: &[PathBuf],
    opts: &ProvisionOptions,
    cancel: &CancellationToken,
    run: F,
) -> Result<ProvisionOutcome, RepoError>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<InstallRun, RepoError>>,
{
    let start = Instant::now();
    if command.is_empty() {
        return Err(RepoError::Provision("no command to run was given".into()));
    }
    let hash = manifest_hash(command, manifests)?;
    let root = Dir::root(dir, true).map_err(io_err("create", dir))?;
    let sentinel_name = format!("{SENTINEL_PREFIX}{hash}");
    let sentinel = dir.join(&sentinel_name);
    let installed = || {
        root.has_file(&sentinel_name)
            .map_err(io_err("check the sentinel", &sentinel))
    };
    let skip = |waited| ProvisionOutcome {
        ran: false,
        hash: hash.clone(),
        waited,
        duration: start.elapsed(),
        output: None,
    };
    if installed()? {
        return Ok(skip(Duration::ZERO));
    }
    let mut lock_opts = opts.lock.clone();
    lock_opts
        .holder
        .get_or_insert_with(|| format!("provision {}", command.join(" ")));
    // A foreign sentinel makes `installed` fail: keep waiting, the check
    // after taking the lock reports it.
    let lease = lock::acquire_unless(&dir.join(".nk-install-lock"), &lock_opts, cancel, || {
        installed().unwrap_or(false)
    })
    .await?;
    let waited = start.elapsed();
    let Some(lease) = lease else {
        return Ok(skip(waited));
    };
    if installed()? {
        lease.release()?;
        return Ok(skip(waited));
    }
    remove_sentinels(&root)?;

    let install_span = tracing::info_span!("install", nanokit.provision.hash = %hash);
    let outcome = async {
        tokio::select! {
            r = run(hash.clone()) => r,
            _ = cancel.cancelled() => Err(LockError::Aborted { path: dir.join(".nk-install-lock") }.into()),
        }
    }
    .instrument(install_span.clone())
    .await?;
    if !outcome.success {
        crate::trace::fail(
            &install_span,
            &format!("the install command failed ({})", outcome.status),
        );
    }
    let text = outcome.output;
    if !outcome.success {
        let tail = text
            .as_deref()
            .map(|t| format!(": {}", crate::sys::command::tail(t, 20)))
            .unwrap_or_default();
        return Err(RepoError::Provision(format!(
            "the install command `{}` failed ({}){tail}; no sentinel was written, the next run retries",
            command.join(" "),
            outcome.status
        )));
    }
    if lease.is_lost() {
        return Err(LockError::Lost {
            path: dir.join(".nk-install-lock"),
        }
        .into());
    }
    let record = serde_json::json!({
        "hash": hash,
        "command": command,
        "manifests": manifests,
        "installedAtMs": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
    });
    root.atomic_write(&sentinel_name, record.to_string().as_bytes(), 0o644, None)
        .map_err(io_err("write the sentinel", &sentinel))?;
    lease.release()?;
    Ok(ProvisionOutcome {
        ran: true,
        hash,
        waited,
        duration: start.elapsed(),
        output: text,
    })
}

/// Removes every sentinel entry (a link is removed as itself).
fn remove_sentinels(root: &Dir) -> Result<(), RepoError> {
    for name in root.entries().map_err(io_err("list", root.path()))? {
        if name.to_string_lossy().starts_with(SENTINEL_PREFIX) {
            root.remove_file(&name)
                .map_err(io_err("remove the old sentinel", &root.join(&name)))?;
        }
    }
    Ok(())
}
