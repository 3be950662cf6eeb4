//! Change notification on directories (inotify): a task waits until
//! something in one of the watched directories is created, written,
//! renamed, removed or touched, and learns which directories changed. A
//! directory that does not exist yet is watched once it appears (the caller
//! asks again). Local changes only: a change made by another host on a
//! shared file system is not reported, so callers also look now and then.

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Watches directories (not recursively).
pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
    /// Watch descriptor → directory.
    dirs: HashMap<i32, PathBuf>,
    buf: Vec<MaybeUninit<u8>>,
}

impl DirWatch {
    pub fn new() -> io::Result<DirWatch> {
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
        // SAFETY: `fd` is an open descriptor that the AsyncFd owns (and
        // so keeps open, the same one) until it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(DirWatch {
            fd,
            dirs: HashMap::new(),
            buf: vec![MaybeUninit::uninit(); 16 * 1024],
        })
    }

    /// Whether `dir` is watched.
    pub fn watches(&self, dir: &Path) -> bool {
        self.dirs.values().any(|d| d == dir)
    }

    /// Watches `dir` (again: a no-op); an error when it does not exist.
    pub fn add(&mut self, dir: &Path) -> io::Result<()> {
        if self.watches(dir) {
            return Ok(());
        }
        let flags = WatchFlags::CREATE
            | WatchFlags::MODIFY
            | WatchFlags::ATTRIB
            | WatchFlags::CLOSE_WRITE
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO
            | WatchFlags::DELETE
            | WatchFlags::DELETE_SELF
            | WatchFlags::ONLYDIR;
        let wd = inotify::add_watch(self.fd.get_ref(), dir, flags)?;
        self.dirs.insert(wd, dir.to_path_buf());
        Ok(())
    }

    /// Waits for changes and returns the directories they happened in (each
    /// once). A directory that was deleted is no longer watched.
    pub async fn changed(&mut self) -> io::Result<Vec<PathBuf>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut out: Vec<PathBuf> = Vec::new();
            let mut gone = Vec::new();
            let mut reader = inotify::Reader::new(self.fd.get_ref(), &mut self.buf);
            loop {
                match reader.next() {
                    Ok(ev) => {
                        let wd = ev.wd();
                        if ev.events().contains(ReadFlags::IGNORED)
                            || ev.events().contains(ReadFlags::DELETE_SELF)
                        {
                            gone.push(wd);
                        }
                        if let Some(d) = self.dirs.get(&wd) {
                            if !out.contains(d) {
                                out.push(d.clone());
                            }
                        }
                    }
                    Err(rustix::io::Errno::AGAIN) => break,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            guard.clear_ready();
            for wd in gone {
                self.dirs.remove(&wd);
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn reports_the_directory_a_change_happened_in() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let mut w = DirWatch::new().unwrap();
        w.add(a.path()).unwrap();
        w.add(b.path()).unwrap();
        assert!(w.add(&a.path().join("missing")).is_err());
        std::fs::write(b.path().join("x"), "1").unwrap();
        let dirs = tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("a change is reported")
            .unwrap();
        assert_eq!(dirs, vec![b.path().to_path_buf()]);
        // A rename into the directory (an atomic write) is a change too.
        std::fs::write(b.path().join("t"), "2").unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), w.changed()).await;
        std::fs::rename(b.path().join("t"), a.path().join("state.json")).unwrap();
        let dirs = tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("a rename is reported")
            .unwrap();
        assert!(dirs.contains(&a.path().to_path_buf()), "{dirs:?}");
    }
}
