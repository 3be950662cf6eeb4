//! Who we are (host identity) and whether another process is still alive.
//!
//! Process ids are only comparable inside one pid namespace of one boot, so
//! the host id combines the kernel's boot id with the pid namespace inode.
//! Two containers on one host get different ids (and so never judge each
//! other's pids); a rebooted host gets a new id (its old locks are then
//! judged by staleness, like a foreign host's).
//!
//! Boot id, pid namespace and process start times come from `/proc` (Linux
//! only). Elsewhere the host id is unique to the process (so every other
//! holder is judged by staleness, as if on another host) and a pid's
//! liveness is `kill(pid, 0)` alone (a reused pid is not detected).

use std::fs;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// Identity of this host (more exactly: of this boot and pid namespace).
#[derive(Debug, Clone)]
pub struct HostIdentity {
    /// Stable for the lifetime of the boot and pid namespace; compared for equality only.
    pub id: String,
    /// Human-readable host name, for display.
    pub hostname: String,
    /// This process's id and start time (as recorded in lock files).
    pub pid: u32,
    pub pid_start: Option<u64>,
}

/// This process's host identity. `NANOKIT_HOST_ID` overrides the id (tests use
/// it to play a process on another host).
pub fn this_host() -> &'static HostIdentity {
    static HOST: OnceLock<HostIdentity> = OnceLock::new();
    HOST.get_or_init(|| {
        let hostname = hostname();
        let id = match std::env::var("NANOKIT_HOST_ID") {
            Ok(v) if !v.is_empty() => v,
            _ => {
                let (boot, pidns) = boot_and_pid_namespace();
                if boot.trim().is_empty() {
                    // No way to tell pid namespaces apart: make the id unique to
                    // this process so no other process ever judges our pid.
                    format!("unknown-{}", uuid::Uuid::new_v4().simple())
                } else {
                    let digest = Sha256::digest(format!("{}|{}", boot.trim(), pidns).as_bytes());
                    hex::encode(&digest[..12])
                }
            }
        };
        let pid = std::process::id();
        HostIdentity {
            id,
            hostname,
            pid,
            pid_start: process_start_time(pid),
        }
    })
}

/// The kernel's boot id and this process's pid namespace (empty if unknown).
#[cfg(target_os = "linux")]
fn boot_and_pid_namespace() -> (String, String) {
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let pidns = fs::read_link("/proc/self/ns/pid")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    (boot, pidns)
}

#[cfg(not(target_os = "linux"))]
fn boot_and_pid_namespace() -> (String, String) {
    (String::new(), String::new())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown".to_string()
    }
}

/// The start time of `pid`, recorded in lock files so that a reused pid is
/// not mistaken for the original holder.
pub fn process_start_time(pid: u32) -> Option<u64> {
    super::proc::stat(pid).map(|s| s.start_time)
}

/// Whether process `pid` (on this host) is alive and, when `start_time` is
/// known, is the same process that recorded it. Zombies count as dead.
pub fn process_alive(pid: u32, start_time: Option<u64>) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill with signal 0 performs only the existence/permission check.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    match super::proc::stat(pid) {
        Some(s) if s.state == 'Z' => false,
        Some(s) => start_time.is_none_or(|t| t == s.start_time),
        // No /proc (not Linux): trust kill().
        None => !std::path::Path::new("/proc/self/stat").exists(),
    }
}
