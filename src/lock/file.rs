//! The lock file itself: its identity, opening it beneath its parent without
//! following links, this process's cache of open lock files, and the brief
//! kernel-lock section every compare-and-swap runs in.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsString};
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{io_err, LockError};
use crate::sys;
use crate::sys::beneath::{Access, Dir};

/// Identity of one lock file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(m: &Metadata) -> Self {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }

    /// The identity of the file at `path`, asking for nothing else (see
    /// [`sys::fs::stat`]: the lock's own writes stay cheap).
    fn at(path: &CStr) -> io::Result<FileId> {
        let s = sys::fs::stat(path, sys::fs::StatFields::ID)?;
        Ok(FileId {
            dev: s.dev,
            ino: s.ino,
        })
    }
}

/// What a waiter saw of a lock file: any change is progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Observation {
    pub(super) id: FileId,
    pub(super) mtime: (i64, i64),
    pub(super) size: u64,
}

impl Observation {
    pub(super) fn of(m: &Metadata) -> Self {
        Observation {
            id: FileId::of(m),
            mtime: (m.mtime(), m.mtime_nsec()),
            size: m.len(),
        }
    }
}

/// A lock file's path, and how many of its last components lock users make
/// (and so co-tenants may have replaced): those are opened one at a time
/// without following symlinks; the rest is the caller's choice, followed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Target<'a> {
    pub(super) path: &'a Path,
    /// At least 1: the lock file itself.
    pub(super) owned: usize,
}

impl<'a> Target<'a> {
    /// A user's lock path: only its last component is never followed.
    pub(super) fn user(path: &'a Path) -> Target<'a> {
        Target { path, owned: 1 }
    }

    /// The directory holding the lock file, reached from the trusted part
    /// without following anything, and the file's name. With `create`,
    /// missing directories are made.
    pub(super) fn parent(&self, create: bool) -> io::Result<(Dir, &'a std::ffi::OsStr)> {
        let name = self.path.file_name().expect("validated: names a file");
        let root = self
            .path
            .ancestors()
            .nth(self.owned)
            .expect("validated: the path has this many components");
        let mut dir = Dir::root(root, create)?;
        let rel = self.path.strip_prefix(root).expect("an ancestor");
        if let Some(middle) = rel.parent().filter(|m| !m.as_os_str().is_empty()) {
            dir = dir.dirs(middle, create)?;
        }
        Ok((dir, name))
    }

    /// Opens the lock file (see [`Dir::open_file`]).
    pub(super) fn open(&self, access: Access) -> io::Result<File> {
        let (dir, name) = self.parent(matches!(access, Access::ReadWriteCreate(_)))?;
        dir.open_file(name, access, NOATIME)
    }
}

/// The brief kernel lock on an open lock file, released on drop. Every read
/// that decides a write, and that write, happen inside one section.
pub(super) struct Section<'f> {
    file: &'f File,
    _local: MutexGuard<'f, ()>,
}

impl<'f> Section<'f> {
    /// Enters the section, waiting up to `wait` for another process's
    /// (brief) one; `None` if it stayed busy.
    pub(super) fn enter(
        path: &Path,
        lock_file: &'f LockFile,
        wait: Duration,
    ) -> Result<Option<Section<'f>>, LockError> {
        let local = lock_file.local.lock().unwrap_or_else(|e| e.into_inner());
        let file = &lock_file.file;
        let mut start = None;
        loop {
            // SAFETY: flock on a valid descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(Section {
                    file,
                    _local: local,
                }));
            }
            let err = io::Error::last_os_error();
            if !matches!(err.raw_os_error(), Some(libc::EWOULDBLOCK | libc::EINTR)) {
                return Err(io_err("lock", path)(err));
            }
            if start.get_or_insert_with(Instant::now).elapsed() >= wait {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Drop for Section<'_> {
    fn drop(&mut self) {
        // SAFETY: unlocking our own descriptor.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// `O_NOATIME`: only the file's owner (or a privileged process) may use it.
#[cfg(any(target_os = "linux", target_os = "android"))]
const NOATIME: rustix::fs::OFlags = rustix::fs::OFlags::NOATIME;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const NOATIME: rustix::fs::OFlags = rustix::fs::OFlags::empty();

/// An open lock file and the identity it had when opened. This process
/// uses one per path (see [`OpenFiles`]), and `local` serialises its
/// sections: on NFS, `flock` is emulated with POSIX locks, which do not
/// exclude threads of one process (and closing any descriptor of the file
/// would drop them, another reason for one descriptor per file).
pub(super) struct LockFile {
    pub(super) file: File,
    id: FileId,
    /// The path it was opened at, for the identity checks.
    c_path: CString,
    local: Mutex<()>,
}

impl LockFile {
    /// Opens (creating if needed, with its directories) the lock file,
    /// refusing anything but a regular file of its own (see [`Target`]).
    fn open(target: Target<'_>) -> Result<LockFile, LockError> {
        let path = target.path;
        let file = target
            .open(Access::ReadWriteCreate(0o644))
            .map_err(io_err("open the lock file", path))?;
        let id = FileId::of(&file.metadata().map_err(io_err("stat", path))?);
        Ok(LockFile {
            file,
            id,
            c_path: sys::fs::c_path(path).map_err(io_err("open", path))?,
            local: Mutex::new(()),
        })
    }

    /// Whether `path` still names this file (it was not deleted, or replaced
    /// by hand, since it was opened).
    pub(super) fn is_at(&self, path: &Path) -> Result<bool, LockError> {
        match FileId::at(&self.c_path) {
            Ok(id) => Ok(id == self.id),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("stat", path)(e)),
        }
    }

    /// Whether this file is still linked: not deleted, nor replaced by a
    /// rename over it. Cheaper than [`LockFile::is_at`] (no path walk), but
    /// blind to the file, or a directory above it, being renamed away.
    pub(super) fn is_linked(&self, path: &Path) -> Result<bool, LockError> {
        match sys::fs::stat_file(&self.file, sys::fs::StatFields::LINKS) {
            Ok(s) => Ok(s.links > 0),
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => Ok(false),
            Err(e) => Err(io_err("stat", path)(e)),
        }
    }
}

/// This process's open lock files, reused across acquisitions: opening and
/// closing cost more than the rest of an uncontended acquire + release. The
/// caller checks [`LockFile::is_at`] inside its section before trusting one.
/// Keyed by the path's bytes (hashing a `Path` goes component by component).
pub(super) struct OpenFiles(Mutex<HashMap<OsString, Arc<LockFile>>>);

/// Files beyond this many that no lease uses are closed.
const OPEN_FILES_KEPT: usize = 64;

pub(super) static OPEN_FILES: std::sync::LazyLock<OpenFiles> =
    std::sync::LazyLock::new(|| OpenFiles(Mutex::default()));

impl OpenFiles {
    pub(super) fn get(&self, target: Target<'_>) -> Result<Arc<LockFile>, LockError> {
        let path = target.path;
        if let Some(f) = self.lock().get(path.as_os_str()) {
            return Ok(f.clone());
        }
        let file = Arc::new(LockFile::open(target)?);
        let mut files = self.lock();
        if files.len() >= OPEN_FILES_KEPT {
            files.retain(|_, f| Arc::strong_count(f) > 1);
        }
        files.insert(path.as_os_str().to_owned(), file.clone());
        Ok(file)
    }

    /// Drops `file` from the cache (it no longer is the file at `path`).
    pub(super) fn forget(&self, path: &Path, file: &Arc<LockFile>) {
        let mut files = self.lock();
        if files
            .get(path.as_os_str())
            .is_some_and(|f| Arc::ptr_eq(f, file))
        {
            files.remove(path.as_os_str());
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<OsString, Arc<LockFile>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
