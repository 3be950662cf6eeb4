//! Small filesystem helpers used across modules.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a unique temporary file in the same
/// directory, `fsync`, then `rename` over the target, then `fsync` of the
/// directory. Readers see either the old content or the new, never a torn file.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        uuid::Uuid::new_v4().simple()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(dir);
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Best-effort `fsync` of a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A `Stdio` that makes a child write to our stdout. Inside Node the standard
/// descriptors may be close-on-exec, so plain `Stdio::inherit()` can hand the
/// child a closed fd 1; a duplicate is installed as the child's fd 1 instead.
pub fn child_stdout() -> std::process::Stdio {
    dup_stdio(libc::STDOUT_FILENO)
}

/// Like [`child_stdout`], for stderr.
pub fn child_stderr() -> std::process::Stdio {
    dup_stdio(libc::STDERR_FILENO)
}

fn dup_stdio(fd: i32) -> std::process::Stdio {
    use std::os::fd::BorrowedFd;
    // SAFETY: fds 1 and 2 stay open for the life of the process.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    match fd.try_clone_to_owned() {
        Ok(owned) => std::process::Stdio::from(owned),
        Err(_) => std::process::Stdio::null(),
    }
}
