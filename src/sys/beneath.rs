//! Files and directories beneath a trusted directory that co-tenants share.
//!
//! A shared package repository (or a provisioned volume) is writable by many
//! workers on many hosts, any of which may plant a symlink, a FIFO, a device
//! or a hard link at any path inside it, at any moment. What this module
//! guarantees, for every operation done through a [`Dir`]:
//!
//! * The trusted root is opened once, as given (its own path is the caller's
//!   choice and may go through symlinks). Everything beneath it is reached
//!   one component at a time relative to an open directory descriptor
//!   (`openat`/`mkdirat`/`renameat`/`unlinkat`/`fstatat`) with `O_NOFOLLOW`:
//!   a symlink is never followed, whenever it was planted.
//! * A component of the wrong type (a symlink, FIFO, socket, device, or a
//!   file where a directory belongs and the reverse) is refused with a
//!   [`Foreign`] error naming its path (code `ENKFOREIGN`). Files are opened
//!   with `O_NONBLOCK` and their type is checked with `fstat` before any read
//!   or write, so a FIFO never blocks the caller.
//! * A file opened for writing must have exactly one link: a hard link to a
//!   file elsewhere, planted in its place, is refused rather than written.
//! * New files appear whole: [`Dir::atomic_write`] writes a fresh file
//!   (`O_EXCL`, never an existing one) and renames it into place.
//! * [`Dir::remove_tree`] removes a tree one entry at a time relative to each
//!   directory's descriptor (`unlinkat`): a link inside the tree, or planted
//!   in place of one of its directories, is removed as itself, never
//!   followed, so nothing outside the tree is touched.
//!
//! What it cannot do: stop a co-tenant from replacing, deleting or renaming
//! entries (they own the directory as much as we do), or stop another program
//! handed a *path* (npm, an installer) from following what it finds there.

use std::ffi::{CStr, OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

/// The code of a [`Foreign`] refusal.
pub const FOREIGN_CODE: &str = "ENKFOREIGN";

/// Something nanokit did not make was found where it expects its own file or
/// directory. Carried inside an [`io::Error`] (see [`is_foreign`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "{} is {what}, not {expected}; nanokit never follows or opens such an entry in a shared directory (a co-tenant may have planted it): remove it, then retry",
    path.display()
)]
pub struct Foreign {
    /// The offending entry.
    pub path: PathBuf,
    /// What it is ("a symbolic link", "a FIFO", …).
    pub what: &'static str,
    /// What was expected there ("a directory", "a regular file").
    pub expected: &'static str,
}

/// Whether `e` is a [`Foreign`] refusal.
pub fn is_foreign(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Foreign>())
}

/// `ENKFOREIGN` for a foreign refusal, else `ENKIO`.
pub fn io_code(e: &io::Error) -> &'static str {
    if is_foreign(e) {
        FOREIGN_CODE
    } else {
        "ENKIO"
    }
}

/// A [`Foreign`] refusal of `path`, which is `what` instead of `expected`.
pub fn foreign(path: PathBuf, what: &'static str, expected: &'static str) -> io::Error {
    io::Error::other(Foreign {
        path,
        what,
        expected,
    })
}

/// What a file of type `ft` is, in words ("a FIFO").
pub fn describe(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown type",
    }
}

/// How [`Dir::open_file`] opens a file.
#[derive(Debug, Clone, Copy)]
pub enum Access {
    /// Read only; the file must exist.
    Read,
    /// Read and write, created (with this mode) if missing. The file must
    /// have exactly one link.
    ReadWriteCreate(u32),
    /// Write only, a new file (with this mode): `O_EXCL`, so an existing
    /// file or link there is an error, never opened.
    CreateNew(u32),
}

/// An open directory beneath a trusted root (or the root itself), and the
/// path it was reached by (for messages).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A single path component, or an error naming `parent/name`.
fn component<'a>(parent: &Path, name: &'a OsStr) -> io::Result<&'a OsStr> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{:?} is not a single file name (in {})",
                name,
                parent.display()
            ),
        ));
    }
    Ok(name)
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::CLOEXEC);

impl Dir {
    /// Opens the trusted root `path` (followed as given: it is the caller's
    /// choice), creating it and its parents first if `create`.
    pub fn root(path: &Path, create: bool) -> io::Result<Dir> {
        let path = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        let open = || {
            rustix::fs::open(
                path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
        };
        let fd = match open() {
            Err(rustix::io::Errno::NOENT) if create => {
                std::fs::create_dir_all(path)?;
                open()?
            }
            r => r?,
        };
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The path this directory was reached by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The same directory on a second descriptor (for another thread).
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// `path()/name`, for messages and for handing to other programs.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Refuses `name` as what it turned out to be (after an open said it is
    /// not what we asked for); `err` if it is what we asked for after all.
    fn refuse(&self, name: &OsStr, expected: &'static str, err: rustix::io::Errno) -> io::Error {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let ft = FileType::from_raw_mode(st.st_mode);
                if describe(ft) == expected {
                    err.into()
                } else {
                    foreign(self.join(name), describe(ft), expected)
                }
            }
            Err(_) => err.into(),
        }
    }

    /// The directory `name` inside this one (never a symlink), created if
    /// missing and `create`.
    pub fn dir(&self, name: impl AsRef<OsStr>, create: bool) -> io::Result<Dir> {
        let name = component(&self.path, name.as_ref())?;
        let open = || rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty());
        let fd = match open() {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o777)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                open().map_err(|e| self.refuse(name, "a directory", e))?
            }
            Err(e) => return Err(self.refuse(name, "a directory", e)),
        };
        // O_DIRECTORY | O_NOFOLLOW already guarantee it; checked once more
        // because it costs nothing next to the open.
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(foreign(
                self.join(name),
                describe(FileType::from_raw_mode(st.st_mode)),
                "a directory",
            ));
        }
        Ok(Dir {
            fd,
            path: self.join(name),
        })
    }

    /// Walks `rel` (relative, plain names only) one directory at a time.
    pub fn dirs(&self, rel: &Path, create: bool) -> io::Result<Dir> {
        let mut names = rel.components().map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a plain relative path", rel.display()),
            )),
        });
        let Some(first) = names.next() else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"));
        };
        let mut dir = self.dir(first?, create)?;
        for name in names {
            dir = dir.dir(name?, create)?;
        }
        Ok(dir)
    }

    /// Opens the regular file `name` in this directory: never a symlink
    /// (`O_NOFOLLOW`), never blocking on a FIFO or device (`O_NONBLOCK`),
    /// its type checked with `fstat` before it is returned. `extra` flags
    /// (such as `O_NOATIME`) are added; an `EPERM` caused by them is retried
    /// without them.
    pub fn open_file(
        &self,
        name: impl AsRef<OsStr>,
        access: Access,
        extra: OFlags,
    ) -> io::Result<File> {
        let name = component(&self.path, name.as_ref())?;
        let (flags, mode) = match access {
            Access::Read => (OFlags::RDONLY, 0),
            Access::ReadWriteCreate(mode) => (OFlags::RDWR | OFlags::CREATE, mode),
            Access::CreateNew(mode) => (OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, mode),
        };
        let flags = flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let open = |flags| rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(mode));
        let fd = match open(flags | extra) {
            Err(rustix::io::Errno::PERM) if !extra.is_empty() => open(flags),
            r => r,
        }
        .map_err(|e| self.refuse(name, "a regular file", e))?;
        let st = rustix::fs::fstat(&fd)?;
        let ft = FileType::from_raw_mode(st.st_mode);
        if ft != FileType::RegularFile {
            return Err(foreign(self.join(name), describe(ft), "a regular file"));
        }
        if !matches!(access, Access::Read) && st.st_nlink != 1 {
            return Err(foreign(
                self.join(name),
                "a file with more than one hard link",
                "a file of its own",
            ));
        }
        Ok(File::from(fd))
    }

    /// The whole content of the regular file `name` (see [`Dir::open_file`]).
    pub fn read_file(&self, name: impl AsRef<OsStr>) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let mut f = self.open_file(name, Access::Read, OFlags::empty())?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(buf)
    }

    /// `lstat` of `name` (never followed); `None` if it does not exist.
    pub fn stat(&self, name: impl AsRef<OsStr>) -> io::Result<Option<rustix::fs::Stat>> {
        let name = component(&self.path, name.as_ref())?;
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// What `name` is, without following it; `None` if it does not exist.
    pub fn file_type(&self, name: impl AsRef<OsStr>) -> io::Result<Option<FileType>> {
        Ok(self
            .stat(name)?
            .map(|st| FileType::from_raw_mode(st.st_mode)))
    }

    /// Whether the regular file `name` exists; anything else there is refused.
    pub fn has_file(&self, name: impl AsRef<OsStr>) -> io::Result<bool> {
        let name = name.as_ref();
        match self.file_type(name)? {
            None => Ok(false),
            Some(FileType::RegularFile) => Ok(true),
            Some(ft) => Err(foreign(self.join(name), describe(ft), "a regular file")),
        }
    }

    /// Removes the entry `name` (a file or a link, never what a link points
    /// to). Returns whether there was one.
    pub fn remove_file(&self, name: impl AsRef<OsStr>) -> io::Result<bool> {
        let name = component(&self.path, name.as_ref())?;
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the entry `name` and, if it is a directory, everything in it.
    /// Every entry is removed relative to its own directory's descriptor and
    /// never followed: a symlink (inside the tree, or swapped in for one of
    /// its directories meanwhile) is unlinked as itself. One descriptor is
    /// open per level of depth. Fails with `ENOTEMPTY` if someone adds an
    /// entry meanwhile (the caller may retry). Returns whether `name` existed.
    pub fn remove_tree(&self, name: impl AsRef<OsStr>) -> io::Result<bool> {
        struct Level {
            dir: Dir,
            name: OsString,
            pending: Vec<OsString>,
        }
        let name = component(&self.path, name.as_ref())?;
        // Opens `name` in `parent` as a directory to descend into, or removes
        // it as a non-directory; `None` when there is nothing to descend into.
        let enter = |parent: &Dir, name: &OsStr| -> io::Result<Option<Level>> {
            match parent.file_type(name)? {
                None => return Ok(None),
                Some(FileType::Directory) => match parent.dir(name, false) {
                    Ok(dir) => {
                        let pending = dir.entries()?;
                        return Ok(Some(Level {
                            dir,
                            name: name.to_os_string(),
                            pending,
                        }));
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    // Replaced by a link or a file meanwhile: unlinked below.
                    Err(e) if is_foreign(&e) => {}
                    Err(e) => return Err(e),
                },
                Some(_) => {}
            }
            parent.remove_file(name)?;
            Ok(None)
        };
        if self.file_type(name)?.is_none() {
            return Ok(false);
        }
        let mut stack: Vec<Level> = enter(self, name)?.into_iter().collect();
        while let Some(top) = stack.last_mut() {
            if let Some(child) = top.pending.pop() {
                if let Some(level) = enter(&top.dir, &child)? {
                    stack.push(level);
                }
                continue;
            }
            let done = stack.pop().expect("a level is open");
            let parent = stack.last().map_or(self, |l| &l.dir);
            match rustix::fs::unlinkat(&parent.fd, done.name.as_os_str(), AtFlags::REMOVEDIR) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Renames the entry `from` of this directory to `to` in `dest`. Neither
    /// name is followed: a symlink is moved or replaced as itself.
    pub fn rename(
        &self,
        from: impl AsRef<OsStr>,
        dest: &Dir,
        to: impl AsRef<OsStr>,
    ) -> io::Result<()> {
        let from = component(&self.path, from.as_ref())?;
        let to = component(&dest.path, to.as_ref())?;
        rustix::fs::renameat(&self.fd, from, &dest.fd, to).map_err(Into::into)
    }

    /// Makes `to` in `dest` a new hard link to the entry `from` of this
    /// directory (never following `from` if it is a symlink; `to` must not
    /// exist: an existing entry is `EEXIST`, never replaced).
    pub fn link(
        &self,
        from: impl AsRef<OsStr>,
        dest: &Dir,
        to: impl AsRef<OsStr>,
    ) -> io::Result<()> {
        let from = component(&self.path, from.as_ref())?;
        let to = component(&dest.path, to.as_ref())?;
        rustix::fs::linkat(&self.fd, from, &dest.fd, to, AtFlags::empty()).map_err(Into::into)
    }

    /// The names in this directory (without `.` and `..`), sorted.
    pub fn entries(&self) -> io::Result<Vec<OsString>> {
        let mut dir = rustix::fs::Dir::read_from(&self.fd)?;
        let mut names = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name: &CStr = entry.file_name();
            let bytes = name.to_bytes();
            if bytes != b"." && bytes != b".." {
                names.push(OsStr::from_bytes(bytes).to_os_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Writes `bytes` to `name` atomically: a fresh temporary file in this
    /// directory (`O_EXCL`: never an existing file or link), `fsync`, its
    /// modification time set to `mtime` if given, then `renameat` over
    /// `name` (which replaces a link there, never writes through it) and an
    /// `fsync` of the directory.
    pub fn atomic_write(
        &self,
        name: impl AsRef<OsStr>,
        bytes: &[u8],
        mode: u32,
        mtime: Option<SystemTime>,
    ) -> io::Result<()> {
        self.write_renamed(name.as_ref(), bytes, mode, mtime, true)
    }

    /// [`Dir::atomic_write`] without the two `fsync`s: the file appears
    /// whole, but a crash may lose it. For files that are cheap to lose
    /// (records inside a private staging directory, usage stamps).
    pub fn replace_file(&self, name: impl AsRef<OsStr>, bytes: &[u8], mode: u32) -> io::Result<()> {
        self.write_renamed(name.as_ref(), bytes, mode, None, false)
    }

    fn write_renamed(
        &self,
        name: &OsStr,
        bytes: &[u8],
        mode: u32,
        mtime: Option<SystemTime>,
        durable: bool,
    ) -> io::Result<()> {
        let name = component(&self.path, name)?;
        let tmp = format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            uuid::Uuid::new_v4().simple()
        );
        let result = (|| {
            let fd = rustix::fs::openat(
                &self.fd,
                tmp.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(mode),
            )?;
            let mut f = File::from(fd);
            f.write_all(bytes)?;
            if let Some(mtime) = mtime {
                f.set_modified(mtime)?;
            }
            if durable {
                f.sync_all()?;
            }
            drop(f);
            rustix::fs::renameat(&self.fd, tmp.as_str(), &self.fd, name)?;
            if durable {
                let _ = rustix::fs::fsync(&self.fd);
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&self.fd, tmp.as_str(), AtFlags::empty());
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_symlinked_directory_and_file_and_a_fifo() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), b"keep").unwrap();
        let root = Dir::root(tmp.path(), false).unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("d")).unwrap();
        let e = root.dir("d", true).unwrap_err();
        assert!(is_foreign(&e), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::os::unix::fs::symlink(outside.path().join("victim"), tmp.path().join("f")).unwrap();
        let e = root
            .open_file("f", Access::ReadWriteCreate(0o644), OFlags::empty())
            .unwrap_err();
        assert!(is_foreign(&e), "{e}");
        rustix::fs::mknodat(&root, "fifo", FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap();
        let e = root.read_file("fifo").unwrap_err();
        assert!(is_foreign(&e), "{e}");
        let e = root
            .open_file("fifo", Access::ReadWriteCreate(0o644), OFlags::empty())
            .unwrap_err();
        assert!(is_foreign(&e), "{e}");
        std::fs::hard_link(outside.path().join("victim"), tmp.path().join("h")).unwrap();
        let e = root
            .open_file("h", Access::ReadWriteCreate(0o644), OFlags::empty())
            .unwrap_err();
        assert!(is_foreign(&e), "{e}");
        root.atomic_write("f", b"new", 0o644, None).unwrap();
        assert_eq!(
            std::fs::read(outside.path().join("victim")).unwrap(),
            b"keep"
        );
        assert_eq!(root.read_file("f").unwrap(), b"new");
    }

    #[test]
    fn remove_tree_never_follows_a_link_inside_the_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("keep")).unwrap();
        std::fs::write(outside.path().join("keep/victim"), b"keep").unwrap();
        let t = tmp.path().join("t");
        std::fs::create_dir_all(t.join("a/b/c")).unwrap();
        std::fs::write(t.join("a/b/c/file"), b"x").unwrap();
        std::fs::write(t.join("top"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("keep"), t.join("a/link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("keep"), t.join("a/b/c/link")).unwrap();
        let root = Dir::root(tmp.path(), false).unwrap();
        rustix::fs::mknodat(
            &root,
            "t/fifo",
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        assert!(root.remove_tree("t").unwrap());
        assert!(!t.exists());
        assert_eq!(
            std::fs::read(outside.path().join("keep/victim")).unwrap(),
            b"keep"
        );
        assert!(!root.remove_tree("t").unwrap(), "nothing left to remove");
        // The top entry itself a link: removed as a link, its target kept.
        std::os::unix::fs::symlink(outside.path().join("keep"), tmp.path().join("l")).unwrap();
        assert!(root.remove_tree("l").unwrap());
        assert!(outside.path().join("keep/victim").exists());
        assert!(root.entries().unwrap().is_empty());
    }
}
