//! Private files of a project's `.nanokit/` folder: every folder nanokit
//! creates there is 0700 and every file 0600 (state, plans, hook logs,
//! traces, timeline pages, the deploy lock), since they can quote commands,
//! output and errors of the services. Folders and files left with wider
//! modes by older versions are tightened the first time a process writes
//! under that `.nanokit` (the whole tree, once per process; the content of
//! a volume's folder is the service's data and is left as it is).
//!
//! Only folders at or below a `.nanokit` folder are ever tightened: a state
//! file configured elsewhere (`infra.state: states/prod.json`) gets new
//! folders 0700, but nanokit never changes the mode of a folder it did not
//! create outside `.nanokit`. Symbolic links are never followed to change
//! a mode.

use std::collections::HashSet;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The mode of every folder nanokit creates under `.nanokit/`.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file nanokit writes under `.nanokit/`.
pub const FILE_MODE: u32 = 0o600;

/// The name of the project's work folder.
const WORK_DIR: &str = ".nanokit";

/// Creates `dir` (and missing parents) with mode 0700, and tightens to 0700
/// every existing folder from `dir` up to the enclosing `.nanokit`.
pub fn dir(dir: &Path) -> io::Result<()> {
    if !dir.is_dir() {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)?;
    }
    let Some(depth) = dir
        .ancestors()
        .position(|a| a.file_name().is_some_and(|n| n == WORK_DIR))
    else {
        return Ok(());
    };
    for a in dir.ancestors().take(depth + 1) {
        tighten(a, DIR_MODE)?;
    }
    if let Some(root) = dir.ancestors().nth(depth) {
        sweep_once(root);
    }
    Ok(())
}

/// Tightens everything under the `.nanokit` folder `root`, once per
/// process (best effort: what cannot be changed is left for the next run).
fn sweep_once(root: &Path) {
    static SWEPT: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    let key = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let first = SWEPT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key);
    if first {
        sweep(root, 0);
    }
}

/// `depth` 0 is `.nanokit`; `volumes/<env>/<volume>` (depth 3 under
/// `volumes`) is tightened but not entered.
fn sweep(dir: &Path, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let in_volumes = dir
        .ancestors()
        .take(depth + 1)
        .any(|a| a.file_name().is_some_and(|n| n == "volumes"))
        && depth >= 2;
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        let p = e.path();
        if t.is_dir() {
            let _ = tighten(&p, DIR_MODE);
            if !in_volumes {
                sweep(&p, depth + 1);
            }
        } else if t.is_file() && !in_volumes {
            let _ = tighten(&p, FILE_MODE);
        }
    }
}

/// Sets `path`'s mode to `mode` when it is a folder or file (not a link)
/// with any other bit set.
fn tighten(path: &Path, mode: u32) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_symlink() && m.permissions().mode() & 0o777 != mode => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets an open file's mode to 0600 when it has any other bit.
pub fn tighten_file(f: &File) -> io::Result<()> {
    let m = f.metadata()?;
    if m.permissions().mode() & 0o777 != FILE_MODE {
        f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    }
    Ok(())
}

/// Opens `path` for appending (a log), creating it 0600 and its folder 0700;
/// an existing file is tightened to 0600.
pub fn open_append(path: &Path) -> io::Result<File> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        dir(d)?;
    }
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)?;
    tighten_file(&f)?;
    Ok(f)
}

/// Makes sure `path` exists as a 0600 file in a 0700 folder, without
/// changing its content (a lock file another module opens).
pub fn touch(path: &Path) -> io::Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        dir(d)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() || !m.is_file() => return Ok(()),
        _ => {}
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    tighten_file(&f)
}

/// Writes `bytes` to `path` atomically as a 0600 file, its folder 0700.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        dir(d)?;
    }
    crate::sys::fs::atomic_write(path, bytes, FILE_MODE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_private_and_tightens_inside_the_work_dir_only() {
        let t = tempfile::tempdir().unwrap();
        let project = t.path().join("p");
        std::fs::create_dir(&project).unwrap();
        std::fs::set_permissions(&project, std::fs::Permissions::from_mode(0o755)).unwrap();
        let old = project.join(".nanokit/logs");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        let log = old.join("a.log");
        std::fs::write(&log, "x").unwrap();
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(open_append(&log).unwrap());
        assert_eq!(mode(&log), 0o600);
        assert_eq!(mode(&old), 0o700);
        assert_eq!(mode(&project.join(".nanokit")), 0o700);
        assert_eq!(mode(&project), 0o755, "the project folder is not touched");
        write(&project.join(".nanokit/plans/latest.json"), b"{}").unwrap();
        assert_eq!(mode(&project.join(".nanokit/plans")), 0o700);
        assert_eq!(mode(&project.join(".nanokit/plans/latest.json")), 0o600);
    }
}
