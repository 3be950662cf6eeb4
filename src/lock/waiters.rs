//! Who waits for a lock, for display (`inspect`'s `waiters`). Each waiter
//! holds an exclusive open-file-description lock on one byte (its slot) of
//! `<lock>.waiters` while it waits; the kernel, or the NFS lock manager,
//! drops it when the waiter stops waiting or dies, however it dies, so the
//! count never includes a dead waiter and nothing is left to clean up. A
//! reader counts the slots held. No decision of the protocol depends on it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::AsRawFd;

use rustix::fs::OFlags;

use super::file::Target;
use crate::sys::beneath::Access;

/// Slots a waiter tries (and a reader scans): more waiters than this on one
/// lock are not counted.
const SLOTS: i64 = 4096;

/// A waiter's slot, held until dropped.
pub(super) struct Registration {
    _file: File,
}

fn waiters_name(lock_name: &OsStr) -> OsString {
    let mut name = lock_name.to_os_string();
    name.push(".waiters");
    name
}

fn range(kind: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

/// Takes a free slot of the lock's waiters file (made if missing). Best
/// effort: `None` when the file cannot be had or every slot is taken.
pub(super) fn register(target: Target<'_>) -> Option<Registration> {
    let (dir, name) = target.parent(false).ok()?;
    let file = dir
        .open_file(
            waiters_name(name),
            Access::ReadWriteCreate(0o644),
            OFlags::empty(),
        )
        .ok()?;
    for slot in 0..SLOTS {
        let fl = range(libc::F_WRLCK, slot, 1);
        // SAFETY: fcntl on a descriptor we own, with a valid flock.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
            return Some(Registration { _file: file });
        }
        let e = std::io::Error::last_os_error().raw_os_error();
        if !matches!(e, Some(libc::EAGAIN | libc::EACCES)) {
            return None;
        }
    }
    None
}

/// How many waiters hold a slot of the lock's waiters file now.
pub(super) fn count(target: Target<'_>) -> usize {
    let Ok((dir, name)) = target.parent(false) else {
        return 0;
    };
    let Ok(file) = dir.open_file(waiters_name(name), Access::Read, OFlags::empty()) else {
        return 0;
    };
    let mut n = 0;
    let mut start = 0;
    while start < SLOTS {
        // The first slot held at or after `start` (a read lock conflicts
        // with every waiter's write lock).
        let mut fl = range(libc::F_RDLCK, start, SLOTS - start);
        // SAFETY: fcntl on a descriptor we own, with a valid flock.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0
            || fl.l_type == libc::F_UNLCK as libc::c_short
        {
            break;
        }
        n += 1;
        start = fl.l_start + fl.l_len.max(1);
    }
    n
}
