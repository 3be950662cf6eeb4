//! Small filesystem helpers used across modules.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a unique temporary file in the same
/// directory, `fsync`, then `rename` over the target, then `fsync` of the
/// directory. Readers see either the old content or the new, never a torn file.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    Staged::new(path, bytes, mode)?.commit()
}

/// New content for a file, written and synced beside it under a temporary
/// name, not yet visible at its path: [`Staged::commit`] renames it into
/// place (one `rename`, which the caller may put wherever it must be
/// atomic with something else). Dropped uncommitted, it is removed.
#[derive(Debug)]
pub struct Staged {
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
    /// The written file, open: its inode stays allocated while it is held.
    file: Option<File>,
}

impl Staged {
    pub fn new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<Staged> {
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            uuid::Uuid::new_v4().simple()
        ));
        let mut staged = Staged {
            tmp,
            path: path.to_path_buf(),
            file: None,
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&staged.tmp)?;
        // From here on, dropping `staged` removes the temporary file.
        let written = f.write_all(bytes).and_then(|()| f.sync_all());
        staged.file = Some(f);
        written.map(|()| staged)
    }

    /// Renames the content into place and syncs the directory.
    pub fn commit(mut self) -> io::Result<()> {
        self.commit_keep().map(drop)
    }

    /// [`Staged::commit`], keeping the written file open.
    pub fn commit_keep(&mut self) -> io::Result<File> {
        fs::rename(&self.tmp, &self.path)?;
        let file = self.file.take().expect("committed once");
        sync_dir(self.path.parent().unwrap_or_else(|| Path::new(".")));
        Ok(file)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Best-effort `fsync` of a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// What [`stat`] reports: only the fields asked for are meaningful.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Seconds and nanoseconds.
    pub mtime: (i64, u32),
    /// Hard links: 0 once the file was deleted or replaced.
    pub links: u32,
}

/// What [`stat`] should ask the filesystem for (`statx` mask bits; ignored
/// where there is no `statx`, which reports every field).
#[derive(Debug, Clone, Copy)]
pub struct StatFields(u32);

#[cfg(target_os = "linux")]
mod mask {
    use rustix::fs::StatxFlags as F;
    pub const INO: u32 = F::INO.bits();
    pub const SIZE: u32 = F::SIZE.bits();
    pub const MTIME: u32 = F::MTIME.bits();
    pub const NLINK: u32 = F::NLINK.bits();
}
#[cfg(not(target_os = "linux"))]
mod mask {
    pub const INO: u32 = 0;
    pub const SIZE: u32 = 0;
    pub const MTIME: u32 = 0;
    pub const NLINK: u32 = 0;
}

impl StatFields {
    /// Device and inode: which file the path names (always reported).
    pub const ID: StatFields = StatFields(mask::INO);
    pub const SIZE: StatFields = StatFields(mask::SIZE);
    pub const MTIME: StatFields = StatFields(mask::MTIME);
    pub const LINKS: StatFields = StatFields(mask::NLINK);

    pub const fn and(self, other: StatFields) -> StatFields {
        StatFields(self.0 | other.0)
    }
}

/// `stat` asking only for `fields`. Cheaper than [`fs::metadata`] where it
/// matters: asking for a file's times makes Linux give its next write a
/// fine-grained time stamp (an inode update per write, with multigrain time
/// stamps), and on NFS may cost a round trip to the server.
///
/// The `statx` system call is made directly (rustix), not through glibc's
/// wrapper, which only exists from glibc 2.28: the shipped binaries run on
/// glibc 2.17. Kernels older than 4.11 have no `statx`: there it is `fstatat`.
#[cfg(target_os = "linux")]
pub fn stat(path: &std::ffi::CStr, fields: StatFields) -> io::Result<Stat> {
    statx(rustix::fs::CWD, path, rustix::fs::AtFlags::empty(), fields)
}

/// [`stat`] of an open file.
#[cfg(target_os = "linux")]
pub fn stat_file(file: &File, fields: StatFields) -> io::Result<Stat> {
    statx(file, c"", rustix::fs::AtFlags::EMPTY_PATH, fields)
}

#[cfg(target_os = "linux")]
fn statx<Fd: std::os::fd::AsFd>(
    dirfd: Fd,
    path: &std::ffi::CStr,
    flags: rustix::fs::AtFlags,
    fields: StatFields,
) -> io::Result<Stat> {
    let stx = match rustix::fs::statx(
        &dirfd,
        path,
        flags | rustix::fs::AtFlags::STATX_SYNC_AS_STAT,
        rustix::fs::StatxFlags::from_bits_retain(fields.0),
    ) {
        Ok(stx) => stx,
        // Linux < 4.11: no statx; fstatat reports every field.
        Err(rustix::io::Errno::NOSYS) => {
            let st = rustix::fs::statat(&dirfd, path, flags)?;
            return Ok(Stat {
                dev: st.st_dev,
                ino: st.st_ino,
                size: st.st_size as u64,
                mtime: (st.st_mtime, st.st_mtime_nsec as u32),
                links: st.st_nlink as u32,
            });
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Stat {
        dev: rustix::fs::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        ino: stx.stx_ino,
        size: stx.stx_size,
        mtime: (stx.stx_mtime.tv_sec, stx.stx_mtime.tv_nsec),
        links: stx.stx_nlink,
    })
}

#[cfg(not(target_os = "linux"))]
pub fn stat(path: &std::ffi::CStr, _fields: StatFields) -> io::Result<Stat> {
    use std::os::unix::ffi::OsStrExt;
    Ok(Stat::of(&fs::metadata(std::ffi::OsStr::from_bytes(
        path.to_bytes(),
    ))?))
}

#[cfg(not(target_os = "linux"))]
pub fn stat_file(file: &File, _fields: StatFields) -> io::Result<Stat> {
    Ok(Stat::of(&file.metadata()?))
}

#[cfg(not(target_os = "linux"))]
impl Stat {
    fn of(m: &fs::Metadata) -> Stat {
        use std::os::unix::fs::MetadataExt;
        Stat {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec() as u32),
            links: m.nlink() as u32,
        }
    }
}

/// `path` as a C string (paths cannot contain NUL bytes; one that does is
/// reported as not found by the callers' stats).
pub fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::from)
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
