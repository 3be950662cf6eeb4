//! The content-addressed store `<repo>/.store`: the bytes of each file once,
//! hard-linked read-only into every published package that has them.
//!
//! Guarantees:
//! * A file enters the store as `files/<its SHA-256 in hex>` (`-x`
//!   appended for an executable) only after whoever places it made it
//!   read-only (0444, or 0555), hashed its bytes and synced them. It appears
//!   under its hash complete, by one `link` that never replaces an existing
//!   name: of two installers placing the same file at once, one places it
//!   and the other checks and uses that one.
//! * Store files are never opened for writing, truncated or renamed over;
//!   only gc removes one, once no package links to it.
//! * A file found under a hash name is linked into a package only after it
//!   was opened without following a link or blocking, and proved to be a
//!   regular read-only file whose bytes hash to its name. A planted link,
//!   FIFO, device, writable file or a file whose content differs is refused
//!   (`ENKFOREIGN`), never linked. What is linked is the very inode that was
//!   checked (linked through its open descriptor).
//! * Where a hard link cannot be made (another file system under `.store`,
//!   no hard links, too many links to one file, another user's file), the
//!   package keeps its own read-only copy; this is logged once per process.
//!
//! See docs/repo-protocol.md ("The content-addressed store") for why.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::sys::beneath::{describe, foreign, Access, Dir};

/// The store's directory under the repo root.
pub const STORE_DIR: &str = ".store";
/// Its files, in one directory: no shard directories (they would cost a
/// block each for a small repo; ext4 and NFS servers index large
/// directories), read in full only by gc and status.
const FILES: &str = "files";

const CONTENT_MISMATCH: &str = "a file whose content does not match its hash name";
const STORE_FILE: &str = "a read-only store file";

/// What [`Store::intern`] did with the files of one tree.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Interned {
    /// Regular files in the tree.
    pub files: u64,
    /// Files that entered the store from this tree.
    pub placed: u64,
    /// Files replaced by a link to the store's copy.
    pub reused: u64,
    /// Files kept as the package's own copy (no hard link was possible).
    pub copies: u64,
}

/// The store of one repo, opened beneath its root.
pub struct Store {
    files: Dir,
}

/// One file of a tree as hashed in the first pass.
#[derive(Debug, Clone)]
struct Hashed {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
    size: u64,
    /// `<hex>` or `<hex>-x`.
    name: String,
}

impl Hashed {
    fn same_file(&self, st: &Stat) -> bool {
        self.dev == st.st_dev
            && self.ino == st.st_ino
            && self.ctime == (st.st_ctime, st.st_ctime_nsec as i64)
            && self.size == st.st_size as u64
    }
}

/// Whether linking failed because hard links are not possible here (as
/// opposed to a name that exists or a file that went away).
fn cannot_link(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::EPERM | libc::EMLINK | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// Logs, once per process, that packages keep their own copies.
fn say_copies_once(path: &Path, e: &io::Error) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        // On stderr too: from JS, nanokit's log goes nowhere by default.
        eprintln!(
            "nanokit: warning: cannot hard-link files into the package store {} ({e}); packages keep their own read-only copies, so they share no disk (said once per process)",
            path.display()
        );
        tracing::warn!(store = %path.display(), error = %e,
            "cannot hard-link files into the package store; packages keep their own copies");
    }
}

/// Makes `to` in `dest` a hard link to the open `file` itself (not to
/// whatever its name points to now), through `/proc/self/fd`.
fn link_open(file: &File, dest: &Dir, to: &str) -> io::Result<()> {
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    rustix::fs::linkat(
        rustix::fs::CWD,
        proc_path.as_str(),
        dest,
        to,
        AtFlags::SYMLINK_FOLLOW,
    )
    .map_err(Into::into)
}

/// SHA-256 of the whole content of `file`, read from its start.
fn hash_file(file: &mut File) -> io::Result<(String, u64)> {
    thread_local! {
        // One buffer per thread, not one zeroed allocation per file.
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 128 * 1024]);
    }
    file.rewind()?;
    BUF.with_borrow_mut(|buf| {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let n = file.read(buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok((hex::encode(hasher.finalize()), size))
    })
}

fn mode_of(exec: bool) -> u32 {
    if exec {
        0o555
    } else {
        0o444
    }
}

/// The store name of a file with hash `hex`.
fn store_name(hex: &str, exec: bool) -> String {
    if exec {
        format!("{hex}-x")
    } else {
        hex.to_string()
    }
}

/// Visits every entry beneath `tree` depth first, handing each to `visit`
/// with the directory holding it and that directory's path relative to
/// `tree`; directories are visited, then entered (never through a link).
pub(crate) fn walk(
    tree: &Dir,
    visit: &mut dyn FnMut(&Dir, &Path, &OsStr, &Stat) -> io::Result<()>,
) -> io::Result<()> {
    struct Level {
        dir: Dir,
        rel: PathBuf,
        pending: Vec<OsString>,
    }
    let mut stack = vec![Level {
        dir: tree.try_clone()?,
        rel: PathBuf::new(),
        pending: tree.entries()?,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.pending.pop() else {
            stack.pop();
            continue;
        };
        let Some(st) = top.dir.stat(&name)? else {
            continue;
        };
        visit(&top.dir, &top.rel, &name, &st)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            let dir = top.dir.dir(&name, false)?;
            let rel = top.rel.join(&name);
            let pending = dir.entries()?;
            stack.push(Level { dir, rel, pending });
        }
    }
    Ok(())
}

impl Store {
    /// The store of the repo whose root is `root` (created if `create`).
    pub fn open(root: &Dir, create: bool) -> io::Result<Store> {
        let files = root.dir(STORE_DIR, create)?.dir(FILES, create)?;
        Ok(Store { files })
    }

    /// Makes every regular file beneath `tree` (a staged package) a
    /// read-only hard link to its store copy, placing into the store what
    /// it lacks. Symbolic links are kept as they are; a FIFO, socket or
    /// device is refused.
    pub fn intern(&self, tree: &Dir) -> io::Result<(Interned, TreeRecord)> {
        let mut hashed: HashMap<(PathBuf, OsString), Hashed> = HashMap::new();
        let mut any_new = false;
        let mut record = TreeRecord::default();
        walk(tree, &mut |dir, rel, name, st| {
            let path = rel.join(name).to_string_lossy().into_owned();
            match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => {}
                FileType::Directory => {
                    record.dirs.push(path);
                    return Ok(());
                }
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
                    record
                        .links
                        .push((path, target.to_string_lossy().into_owned()));
                    return Ok(());
                }
                other => {
                    return Err(foreign(
                        dir.join(name),
                        describe(other),
                        "a regular file, directory or symbolic link",
                    ))
                }
            }
            let (_, h) = prepare(dir, name)?;
            if self.files.stat(&h.name)?.is_none() {
                any_new = true;
            }
            hashed.insert((rel.to_path_buf(), name.to_os_string()), h);
            Ok(())
        })?;
        // What enters the store must be on disk before its name is: one
        // sync of the file system instead of one per file.
        if any_new {
            rustix::fs::syncfs(tree)?;
        }
        let mut stats = Interned::default();
        walk(tree, &mut |dir, rel, name, st| {
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                return Ok(());
            }
            let key = (rel.to_path_buf(), name.to_os_string());
            let known = hashed.get(&key).cloned();
            let stored = self.link_in(dir, name, known, &mut stats)?;
            record
                .files
                .push((rel.join(name).to_string_lossy().into_owned(), stored));
            Ok(())
        })?;
        Ok((stats, record))
    }

    /// Links the file `name` of `dir` (hashed as `known` in the first pass)
    /// to its store copy, placing it there if absent.
    fn link_in(
        &self,
        dir: &Dir,
        name: &OsStr,
        known: Option<Hashed>,
        stats: &mut Interned,
    ) -> io::Result<String> {
        stats.files += 1;
        let mut file = dir.open_file(name, Access::Read, OFlags::empty())?;
        let st = rustix::fs::fstat(&file)?;
        // Changed since it was hashed (or new): hash it again.
        let h = match known.filter(|h| h.same_file(&st)) {
            Some(h) => h,
            None => {
                let (f, h) = prepare(dir, name)?;
                file = f;
                h
            }
        };
        let shard = &self.files;
        let in_shard = h.name.as_str();
        for _ in 0..3 {
            match link_open(&file, shard, in_shard) {
                Ok(()) => {
                    stats.placed += 1;
                    return Ok(h.name);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    match self.reuse(dir, name, shard, in_shard, &h) {
                        Ok(true) => {
                            stats.reused += 1;
                            return Ok(h.name);
                        }
                        // Removed meanwhile (gc): place ours after all.
                        Ok(false) => continue,
                        Err(e) if cannot_link(&e) => {
                            say_copies_once(shard.path(), &e);
                            stats.copies += 1;
                            return Ok(h.name);
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if cannot_link(&e) => {
                    say_copies_once(shard.path(), &e);
                    stats.copies += 1;
                    return Ok(h.name);
                }
                Err(e) => return Err(e),
            }
        }
        // The name keeps appearing and vanishing: keep our own copy.
        stats.copies += 1;
        Ok(h.name)
    }

    /// Replaces `name` of `dir` with a link to the store file `in_shard`,
    /// after checking it is what its name says. `Ok(false)` if it vanished.
    fn reuse(
        &self,
        dir: &Dir,
        name: &OsStr,
        shard: &Dir,
        in_shard: &str,
        h: &Hashed,
    ) -> io::Result<bool> {
        let Some(stored) = checked(shard, in_shard, Some(h.size))? else {
            return Ok(false);
        };
        // Link exactly the inode just checked, beside ours, then over ours.
        let tmp = format!(
            ".{}.nk-link.{:016x}",
            name.to_string_lossy(),
            fastrand::u64(..)
        );
        match link_open(&stored, dir, &tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        if let Err(e) = dir.rename(&tmp, dir, name) {
            let _ = dir.remove_file(&tmp);
            return Err(e);
        }
        Ok(true)
    }

    /// Removes store files that no package links to (and anything in the
    /// store that is not a store file: links, FIFOs, stray names), unless
    /// `dry_run`. Returns what was (or would be) removed.
    pub fn collect_garbage(&self, dry_run: bool) -> io::Result<Usage> {
        let mut removed = Usage::default();
        for name in self.files.entries()? {
            let Some(st) = self.files.stat(&name)? else {
                continue;
            };
            let regular = FileType::from_raw_mode(st.st_mode) == FileType::RegularFile;
            if regular && st.st_nlink > 1 {
                continue;
            }
            removed.files += 1;
            if regular {
                removed.bytes += st.st_size as u64;
            }
            if !dry_run {
                self.files.remove_tree(&name)?;
            }
        }
        Ok(removed)
    }

    /// Files and bytes in the store, and those no package links to.
    pub fn usage(&self) -> io::Result<StoreUsage> {
        let mut u = StoreUsage::default();
        walk(&self.files, &mut |_, _, _, st| {
            if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile {
                u.files += 1;
                u.bytes += st.st_size as u64;
                if st.st_nlink <= 1 {
                    u.unreferenced_files += 1;
                    u.unreferenced_bytes += st.st_size as u64;
                }
            }
            Ok(())
        })?;
        Ok(u)
    }
}

/// The store file `in_shard` of `shard`, opened and checked to be what its
/// name says (a regular read-only file of the mode its name gives, of
/// `size` if known, whose bytes hash to its name); `None` if it is not
/// there. Anything else is refused (`ENKFOREIGN`).
fn checked(shard: &Dir, in_shard: &str, size: Option<u64>) -> io::Result<Option<File>> {
    let path = shard.join(in_shard);
    let mut stored = match shard.open_file(in_shard, Access::Read, OFlags::empty()) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        r => r?,
    };
    let st = rustix::fs::fstat(&stored)?;
    let exec = in_shard.ends_with("-x");
    if st.st_mode & 0o7777 != mode_of(exec) {
        return Err(foreign(
            path,
            "a file that is not read-only (or of another mode than its name says)",
            STORE_FILE,
        ));
    }
    if size.is_some_and(|s| s != st.st_size as u64) {
        return Err(foreign(path, CONTENT_MISMATCH, STORE_FILE));
    }
    let (hex, _) = hash_file(&mut stored)?;
    if store_name(&hex, exec) != in_shard {
        return Err(foreign(path, CONTENT_MISMATCH, STORE_FILE));
    }
    Ok(Some(stored))
}

/// Whether `name` is a store name: 64 hex digits, `-x` for an executable.
fn valid_store_name(name: &str) -> bool {
    let hex = name.strip_suffix("-x").unwrap_or(name);
    hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The shape of a package's tree as interned: enough to build it again from
/// the store by links alone (`.store/index/<key>.json`).
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
pub struct TreeRecord {
    /// Directories, relative to the package, parents first.
    pub dirs: Vec<String>,
    /// Symbolic links and their targets.
    pub links: Vec<(String, String)>,
    /// Regular files and their store names.
    pub files: Vec<(String, String)>,
}

/// `rel` split into its parent's components and its name, if it is a plain
/// relative path (no `..`, no root, not empty).
fn plain(rel: &str) -> Option<(PathBuf, OsString)> {
    let p = Path::new(rel);
    let ok = p
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    let name = p.file_name()?.to_os_string();
    (ok && !rel.is_empty()).then(|| (p.parent().unwrap_or(Path::new("")).to_path_buf(), name))
}

const INDEX: &str = "index";

impl Store {
    /// Records the tree of the package with file key `key`.
    pub fn write_record(&self, root: &Dir, key: &str, record: &TreeRecord) -> io::Result<()> {
        let index = root.dir(STORE_DIR, true)?.dir(INDEX, true)?;
        let bytes = serde_json::to_vec(record).expect("a tree record serialises");
        index.replace_file(format!("{key}.json"), &bytes, 0o644)
    }

    /// The recorded tree of `key`, if any (and readable).
    pub fn read_record(root: &Dir, key: &str) -> Option<TreeRecord> {
        let bytes = root
            .dir(STORE_DIR, false)
            .ok()?
            .dir(INDEX, false)
            .ok()?
            .read_file(format!("{key}.json"))
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Removes the record of `key` (none is fine).
    pub fn remove_record(root: &Dir, key: &str) {
        if let Ok(index) = root.dir(STORE_DIR, false).and_then(|d| d.dir(INDEX, false)) {
            let _ = index.remove_file(format!("{key}.json"));
        }
    }

    /// Builds `record`'s tree in the empty directory `dest` by links to the
    /// store alone, each store file checked as [`Store::intern`] checks
    /// what it reuses. `Ok(false)` when a file is missing from the store or
    /// cannot be linked (the caller installs instead); a malformed record is
    /// an error, as is a store file that is not what its name says.
    pub fn replay(&self, record: &TreeRecord, dest: &Dir) -> io::Result<bool> {
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a malformed tree record: {what}"),
            )
        };
        let parent_of = |rel: &Path| -> io::Result<Dir> {
            if rel.as_os_str().is_empty() {
                dest.try_clone()
            } else {
                dest.dirs(rel, false)
            }
        };
        for d in &record.dirs {
            plain(d).ok_or_else(|| bad(d))?;
            dest.dirs(Path::new(d), true)?;
        }
        for (rel, target) in &record.links {
            let (parent, name) = plain(rel).ok_or_else(|| bad(rel))?;
            rustix::fs::symlinkat(target.as_str(), &parent_of(&parent)?, name.as_os_str())?;
        }
        for (rel, stored) in &record.files {
            let (parent, name) = plain(rel).ok_or_else(|| bad(rel))?;
            if !valid_store_name(stored) {
                return Err(bad(stored));
            }
            let Some(file) = checked(&self.files, stored, None)? else {
                return Ok(false);
            };
            let name = name.to_str().ok_or_else(|| bad(rel))?;
            match link_open(&file, &parent_of(&parent)?, name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound || cannot_link(&e) => {
                    return Ok(false)
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// Files and their bytes.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub files: u64,
    pub bytes: u64,
}

/// What the store holds.
#[derive(Debug, Default, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreUsage {
    pub files: u64,
    pub bytes: u64,
    /// Files no package links to (removed by gc).
    pub unreferenced_files: u64,
    pub unreferenced_bytes: u64,
}

/// Bytes of the regular files beneath `tree` counted once per link
/// (`logical`: what separate copies would take) and once per file
/// (`physical`: what they take on disk).
pub fn sharing(tree: &Dir) -> io::Result<(u64, u64)> {
    let mut seen = HashSet::new();
    let (mut logical, mut physical) = (0u64, 0u64);
    walk(tree, &mut |_, _, _, st| {
        if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile {
            logical += st.st_size as u64;
            if seen.insert((st.st_dev, st.st_ino)) {
                physical += st.st_size as u64;
            }
        }
        Ok(())
    })?;
    Ok((logical, physical))
}

/// Opens the staged file `name` of `dir`, makes it read-only and hashes
/// it. A file that is not a file of its own (more than one link: a hard
/// link in the tarball, or planted) is first replaced by a private copy, so
/// that no other file's mode is ever changed.
fn prepare(dir: &Dir, name: &OsStr) -> io::Result<(File, Hashed)> {
    let mut file = dir.open_file(name, Access::Read, OFlags::empty())?;
    let mut st = rustix::fs::fstat(&file)?;
    if st.st_nlink != 1 {
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        dir.atomic_write(name, &bytes, st.st_mode & 0o777, None)?;
        file = dir.open_file(name, Access::Read, OFlags::empty())?;
        st = rustix::fs::fstat(&file)?;
        if st.st_nlink != 1 {
            return Err(foreign(
                dir.join(name),
                "a file with more than one hard link",
                "a file of its own",
            ));
        }
    }
    let exec = st.st_mode & 0o111 != 0;
    let mode = mode_of(exec);
    if st.st_mode & 0o7777 != mode {
        // Read-only before hashing: nobody opens it for writing after this.
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))?;
        st = rustix::fs::fstat(&file)?;
    }
    let (hex, size) = hash_file(&mut file)?;
    if size != st.st_size as u64 {
        return Err(io::Error::other(format!(
            "{} changed while it was being hashed",
            dir.join(name).display()
        )));
    }
    let h = Hashed {
        dev: st.st_dev,
        ino: st.st_ino,
        ctime: (st.st_ctime, st.st_ctime_nsec as i64),
        size,
        name: store_name(&hex, exec),
    };
    Ok((file, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tree(root: &Path, files: &[(&str, &str)]) {
        for (rel, body) in files {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
    }

    #[test]
    fn two_trees_share_inodes_and_files_become_read_only() {
        let t = tempfile::tempdir().unwrap();
        let root = Dir::root(t.path(), false).unwrap();
        let store = Store::open(&root, true).unwrap();
        tree(
            &t.path().join("a"),
            &[("x.js", "same"), ("d/y.js", "a-only")],
        );
        tree(&t.path().join("b"), &[("x.js", "same"), ("z.js", "b-only")]);
        let (a, record) = store.intern(&root.dir("a", false).unwrap()).unwrap();
        assert_eq!(record.dirs, vec!["d".to_string()]);
        assert_eq!(record.files.len(), 2);
        assert_eq!((a.files, a.placed, a.reused, a.copies), (2, 2, 0, 0));
        let (b, _) = store.intern(&root.dir("b", false).unwrap()).unwrap();
        assert_eq!((b.files, b.placed, b.reused, b.copies), (2, 1, 1, 0));
        let ax = std::fs::metadata(t.path().join("a/x.js")).unwrap();
        let bx = std::fs::metadata(t.path().join("b/x.js")).unwrap();
        assert_eq!(ax.ino(), bx.ino());
        assert_eq!(ax.mode() & 0o777, 0o444);
        assert_eq!(ax.nlink(), 3, "a, b and the store");
        let usage = store.usage().unwrap();
        assert_eq!((usage.files, usage.unreferenced_files), (3, 0));
        // The record builds a's tree again by links alone.
        std::fs::create_dir(t.path().join("a2")).unwrap();
        assert!(store
            .replay(&record, &root.dir("a2", false).unwrap())
            .unwrap());
        let a2 = std::fs::metadata(t.path().join("a2/d/y.js")).unwrap();
        assert_eq!(
            a2.ino(),
            std::fs::metadata(t.path().join("a/d/y.js")).unwrap().ino()
        );
        std::fs::remove_dir_all(t.path().join("a2")).unwrap();
        std::fs::remove_dir_all(t.path().join("b")).unwrap();
        assert_eq!(store.usage().unwrap().unreferenced_files, 1);
        let gone = store.collect_garbage(false).unwrap();
        assert_eq!(gone, Usage { files: 1, bytes: 6 });
        assert_eq!(store.usage().unwrap().files, 2);
    }

    #[test]
    fn a_planted_entry_under_a_hash_name_is_refused_not_linked() {
        let t = tempfile::tempdir().unwrap();
        let root = Dir::root(t.path(), false).unwrap();
        let store = Store::open(&root, true).unwrap();
        let hex = hex::encode(Sha256::digest(b"body"));
        let shard = t.path().join(".store/files");
        std::fs::create_dir_all(&shard).unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, "body").unwrap();
        for (what, plant) in [
            ("symbolic link", 0),
            ("FIFO", 1),
            ("does not match", 2),
            ("not read-only", 3),
        ] {
            let at = shard.join(&hex);
            let _ = std::fs::remove_file(&at);
            match plant {
                0 => std::os::unix::fs::symlink(&outside, &at).unwrap(),
                1 => rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &at,
                    FileType::Fifo,
                    Mode::from_raw_mode(0o444),
                    0,
                )
                .unwrap(),
                2 => {
                    std::fs::write(&at, "bodz").unwrap();
                    std::fs::set_permissions(
                        &at,
                        std::os::unix::fs::PermissionsExt::from_mode(0o444),
                    )
                    .unwrap();
                }
                _ => std::fs::write(&at, "body").unwrap(),
            }
            let pkg = t.path().join("pkg");
            let _ = std::fs::remove_dir_all(&pkg);
            tree(&pkg, &[("f.js", "body")]);
            let e = store.intern(&root.dir("pkg", false).unwrap()).unwrap_err();
            assert!(crate::sys::beneath::is_foreign(&e), "{what}: {e}");
            assert!(e.to_string().contains(what), "{what}: {e}");
            let f = std::fs::metadata(pkg.join("f.js")).unwrap();
            assert_eq!(f.nlink(), 1, "{what}: never linked");
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"body");
    }
}
