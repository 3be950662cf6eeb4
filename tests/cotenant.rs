//! Hostile co-tenants of a shared repository or volume: symlinks, FIFOs and
//! hard links planted inside it never make nanokit write (or block) outside,
//! and are refused with `ENKFOREIGN`.
//!
//! Every case keeps an `outside` directory with a victim file and checks
//! that its whole tree (names, types, bytes) is exactly as it was.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nanokit::error::ErrorCode;
use nanokit::lock::{self, LockInfo, LockOptions};
use nanokit::repo::{self, Begin, InstallOptions, PackageSpec, ProvisionOptions};
use nanokit::sys::beneath::Dir;
use tokio_util::sync::CancellationToken;

const VICTIM: &[u8] = b"precious content that nanokit must never touch\n";

/// A directory outside the repo with one victim file.
struct Outside {
    dir: tempfile::TempDir,
    before: BTreeMap<PathBuf, String>,
}

impl Outside {
    fn new() -> Outside {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("victim"), VICTIM).unwrap();
        // A record of a dead holder on this host: unprotected code takes
        // such a lock over at once, writing through whatever link leads here.
        fs::write(dir.path().join("dead.lock"), dead_record()).unwrap();
        let before = snapshot(dir.path());
        Outside { dir, before }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn victim(&self) -> PathBuf {
        self.path().join("victim")
    }

    fn dead_lock(&self) -> PathBuf {
        self.path().join("dead.lock")
    }

    /// Panics if anything under the outside directory changed.
    fn assert_untouched(&self) {
        let now = snapshot(self.path());
        assert_eq!(now, self.before, "something was written outside the repo");
        assert_eq!(fs::read(self.victim()).unwrap(), VICTIM);
    }
}

/// Every entry under `dir`: its type and, for files, its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if m.is_dir() {
                out.insert(rel, "dir".into());
                stack.push(p);
            } else if m.is_file() {
                out.insert(
                    rel,
                    format!(
                        "file {:?}",
                        String::from_utf8_lossy(&fs::read(&p).unwrap_or_default())
                    ),
                );
            } else {
                out.insert(rel, format!("other {:?}", m.file_type()));
            }
        }
    }
    out
}

fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

fn dead_record() -> Vec<u8> {
    let info = LockInfo {
        token: "ghost".into(),
        host_id: lock::this_host().id.clone(),
        hostname: "here".into(),
        pid: dead_pid(),
        pid_start: None,
        holder: Some("ghost".into()),
        acquired_at_ms: 0,
        stale_ms: 50,
    };
    serde_json::to_vec(&info).unwrap()
}

fn install_opts() -> InstallOptions {
    InstallOptions {
        lock: LockOptions {
            stale: Duration::from_millis(100),
            timeout: Some(Duration::from_secs(20)),
            holder: Some("cotenant test".into()),
        },
        ..InstallOptions::default()
    }
}

/// A whole install with a custom installer (files written into staging).
async fn install(repo_dir: &Path, specifier: &str) -> Result<bool, repo::RepoError> {
    let spec = PackageSpec::parse(specifier).unwrap();
    match repo::begin_install(repo_dir, &spec, &install_opts(), &CancellationToken::new()).await? {
        Begin::AlreadyInstalled(_) => Ok(false),
        Begin::Started(txn) => {
            // A careful installer: it never follows a link either (one that
            // writes through a path, like npm, is the documented limit).
            let staging = txn.staging_dir().file_name().unwrap().to_owned();
            let made = (|| {
                let nm = Dir::root(repo_dir, false)?
                    .dirs(&Path::new(".staging").join(&staging), false)?
                    .dir("node_modules", true)?;
                let alias = spec.alias();
                let pkg = match alias.split_once('/') {
                    Some((scope, leaf)) => nm.dir(scope, true)?.dir(leaf, true)?,
                    None => nm.dir(&alias, true)?,
                };
                let name = format!("{{\"name\":\"{}\"}}", spec.name);
                pkg.atomic_write("package.json", name.as_bytes(), 0o644, None)?;
                nm.dir("hoisted-dep", true)?
                    .atomic_write("package.json", b"{}", 0o644, None)
            })();
            if let Err(e) = made {
                // The co-tenant moved the staging directory away meanwhile.
                return Err(repo::RepoError::InstallFailed {
                    spec: specifier.into(),
                    message: e.to_string(),
                });
            }
            txn.commit().await?;
            Ok(true)
        }
    }
}

fn err_code<E: ErrorCode + std::fmt::Display>(
    r: Result<impl std::fmt::Debug, E>,
) -> (String, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => (e.code().to_string(), e.to_string()),
    }
}

#[tokio::test]
async fn a_lock_file_symlinked_outside_is_refused_not_written_through() {
    let outside = Outside::new();
    let repo = tempfile::tempdir().unwrap();
    let spec = PackageSpec::parse("left-pad@1.3.0").unwrap();
    fs::create_dir_all(repo.path().join(".locks")).unwrap();
    symlink(
        outside.dead_lock(),
        repo.path()
            .join(".locks")
            .join(format!("{}.lock", spec.file_key())),
    )
    .unwrap();
    let (code, message) = err_code(install(repo.path(), "left-pad@1.3.0").await);
    assert_eq!(code, "ENKFOREIGN", "{message}");
    assert!(message.contains("symbolic link"), "{message}");
    assert!(
        message.contains(".locks"),
        "the message names the path: {message}"
    );
    outside.assert_untouched();
    assert!(!repo.path().join("node_modules").exists());
}

#[tokio::test]
async fn repo_folders_symlinked_outside_are_refused() {
    for folder in [
        ".locks",
        ".sentinels",
        "node_modules",
        ".staging",
        "package.json",
    ] {
        let outside = Outside::new();
        let repo = tempfile::tempdir().unwrap();
        let target = if folder == "package.json" {
            outside.victim()
        } else {
            outside.path().to_path_buf()
        };
        symlink(&target, repo.path().join(folder)).unwrap();
        let (code, message) = err_code(install(repo.path(), "left-pad@1.3.0").await);
        assert_eq!(code, "ENKFOREIGN", "{folder}: {message}");
        assert!(
            message.contains(folder),
            "{folder}: the message names it: {message}"
        );
        outside.assert_untouched();
        let spec = PackageSpec::parse("left-pad@1.3.0").unwrap();
        assert!(
            !repo::Repo::new(repo.path()).is_installed(&spec),
            "{folder}"
        );
        // The status refuses it too, without following it.
        if folder != "package.json" {
            let (code, message) = err_code(repo::status(repo.path()));
            assert_eq!(code, "ENKFOREIGN", "status with {folder}: {message}");
        }
        outside.assert_untouched();
    }
}

#[tokio::test]
async fn a_scope_folder_symlinked_outside_is_refused() {
    let outside = Outside::new();
    let repo = tempfile::tempdir().unwrap();
    fs::create_dir_all(repo.path().join("node_modules")).unwrap();
    symlink(outside.path(), repo.path().join("node_modules/@openfn")).unwrap();
    let (code, message) = err_code(install(repo.path(), "@openfn/language-http@7.2.0").await);
    assert_eq!(code, "ENKFOREIGN", "{message}");
    outside.assert_untouched();
}

#[tokio::test]
async fn a_hard_link_to_a_file_outside_is_refused_as_a_lock_file() {
    let outside = Outside::new();
    let repo = tempfile::tempdir().unwrap();
    let spec = PackageSpec::parse("left-pad@1.3.0").unwrap();
    fs::create_dir_all(repo.path().join(".locks")).unwrap();
    let lock = repo
        .path()
        .join(".locks")
        .join(format!("{}.lock", spec.file_key()));
    fs::hard_link(outside.dead_lock(), &lock).unwrap();
    let (code, message) = err_code(install(repo.path(), "left-pad@1.3.0").await);
    assert_eq!(code, "ENKFOREIGN", "{message}");
    assert!(message.contains("hard link"), "{message}");
    outside.assert_untouched();
}

#[tokio::test]
async fn installs_complete_normally_beside_the_checks() {
    let repo = tempfile::tempdir().unwrap();
    assert!(install(repo.path(), "left-pad@1.3.0").await.unwrap());
    assert!(install(repo.path(), "@openfn/language-http@7.2.0")
        .await
        .unwrap());
    assert!(!install(repo.path(), "left-pad@1.3.0").await.unwrap());
    let r = repo::Repo::new(repo.path());
    assert!(r.is_installed(&PackageSpec::parse("left-pad@1.3.0").unwrap()));
    assert!(repo
        .path()
        .join("node_modules/left-pad_1.3.0/node_modules/hoisted-dep/package.json")
        .is_file());
    let status = repo::status(repo.path()).unwrap();
    assert_eq!(status.installed.len(), 2);
    assert!(status.installed.iter().all(|p| p.verified));
}

#[test]
fn a_user_lock_path_that_is_a_symlink_is_an_error_not_a_target() {
    let outside = Outside::new();
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("job.lock");
    symlink(outside.dead_lock(), &link).unwrap();
    let opts = LockOptions {
        stale: Duration::from_millis(50),
        timeout: Some(Duration::from_millis(500)),
        holder: None,
    };
    let (c, m) = err_code(lock::try_acquire(&link, &opts));
    assert_eq!(c, "ENKFOREIGN", "{m}");
    assert!(m.contains("job.lock"), "{m}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (c, m) = err_code(rt.block_on(lock::acquire(&link, &opts, &CancellationToken::new())));
    assert_eq!(c, "ENKFOREIGN", "{m}");
    let (c, m) = err_code(lock::inspect(&link, Duration::from_secs(30)));
    assert_eq!(c, "ENKFOREIGN", "{m}");
    let (c, m) = err_code(lock::break_lock(&link));
    assert_eq!(c, "ENKFOREIGN", "{m}");
    outside.assert_untouched();
    // The parent directories of a user's path are the user's choice.
    let via = dir.path().join("via");
    symlink(outside.path(), &via).unwrap();
    let lease = lock::try_acquire(&via.join("mine.lock"), &opts)
        .unwrap()
        .unwrap();
    lease.release().unwrap();
    assert!(outside.path().join("mine.lock").is_file());
}

#[tokio::test]
async fn provisioning_lock_and_sentinel_links_are_refused() {
    let command = vec![
        "sh".to_string(),
        "-c".to_string(),
        "echo ran >> ran.txt".to_string(),
    ];
    let opts = ProvisionOptions {
        lock: LockOptions {
            stale: Duration::from_millis(50),
            timeout: Some(Duration::from_secs(5)),
            holder: None,
        },
        ..ProvisionOptions::default()
    };
    let cancel = CancellationToken::new();

    // The lock.
    let outside = Outside::new();
    let dir = tempfile::tempdir().unwrap();
    symlink(outside.dead_lock(), dir.path().join(".nk-install-lock")).unwrap();
    let (c, m) = err_code(repo::provision(dir.path(), &command, &[], &opts, &cancel).await);
    assert_eq!(c, "ENKFOREIGN", "{m}");
    assert!(
        !dir.path().join("ran.txt").exists(),
        "the command did not run"
    );
    outside.assert_untouched();

    // The sentinel, as a link and as a FIFO.
    let scratch = tempfile::tempdir().unwrap();
    let hash = repo::provision(scratch.path(), &command, &[], &opts, &cancel)
        .await
        .unwrap()
        .hash;
    for kind in ["link", "fifo"] {
        let outside = Outside::new();
        let dir = tempfile::tempdir().unwrap();
        let sentinel = dir.path().join(format!(".nk-installed-{hash}"));
        match kind {
            "link" => symlink(outside.victim(), &sentinel).unwrap(),
            _ => mkfifo(&sentinel),
        }
        let (c, m) = err_code(repo::provision(dir.path(), &command, &[], &opts, &cancel).await);
        assert_eq!(c, "ENKFOREIGN", "{kind}: {m}");
        assert!(m.contains(".nk-installed-"), "{m}");
        assert!(!dir.path().join("ran.txt").exists());
        outside.assert_untouched();
    }

    // Untouched by co-tenants, it runs once.
    let dir = tempfile::tempdir().unwrap();
    assert!(
        repo::provision(dir.path(), &command, &[], &opts, &cancel)
            .await
            .unwrap()
            .ran
    );
    assert!(
        !repo::provision(dir.path(), &command, &[], &opts, &cancel)
            .await
            .unwrap()
            .ran
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("ran.txt")).unwrap(),
        "ran\n"
    );
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success());
}

/// Runs this test binary's `child_entry` with `env`, killed after `deadline`:
/// a FIFO that blocks fails the test instead of hanging the runner.
fn run_child(env: &[(&str, &str)], deadline: Duration) -> (bool, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_entry",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            return (status.success(), text);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child was still blocked after {deadline:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn inspect_of_a_fifo_lock_path_never_blocks() {
    let dir = tempfile::tempdir().unwrap();
    // A user's lock path.
    let fifo = dir.path().join("job.lock");
    mkfifo(&fifo);
    let (ok, out) = run_child(
        &[("NK_CHILD", "inspect"), ("NK_PATH", fifo.to_str().unwrap())],
        Duration::from_secs(20),
    );
    assert!(ok, "{out}");
    assert!(out.contains("RESULT ENKFOREIGN"), "{out}");
    // A package lock inside a repo, through the repo's status.
    let repo = tempfile::tempdir().unwrap();
    fs::create_dir_all(repo.path().join(".locks")).unwrap();
    mkfifo(&repo.path().join(".locks/left-pad_1.3.0.lock"));
    let (ok, out) = run_child(
        &[
            ("NK_CHILD", "status"),
            ("NK_PATH", repo.path().to_str().unwrap()),
        ],
        Duration::from_secs(20),
    );
    assert!(ok, "{out}");
    assert!(out.contains("RESULT ENKFOREIGN"), "{out}");
    // And an install of that package.
    let (ok, out) = run_child(
        &[
            ("NK_CHILD", "install"),
            ("NK_PATH", repo.path().to_str().unwrap()),
        ],
        Duration::from_secs(20),
    );
    assert!(ok, "{out}");
    assert!(out.contains("RESULT ENKFOREIGN"), "{out}");
}

/// Not a test: what `run_child` and the co-tenant test run in a child
/// process (it does nothing unless `NK_CHILD` says what to do).
#[test]
#[ignore = "run by the other tests in a child process"]
fn child_entry() {
    let Ok(what) = std::env::var("NK_CHILD") else {
        return;
    };
    let path = PathBuf::from(std::env::var("NK_PATH").unwrap());
    let result = match what.as_str() {
        "inspect" => lock::inspect(&path, Duration::from_secs(30))
            .map(|_| ())
            .map_err(|e| e.code()),
        "status" => repo::status(&path).map(|_| ()).map_err(|e| e.code()),
        "install" => tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(install(&path, "left-pad@1.3.0"))
            .map(|_| ())
            .map_err(|e| e.code()),
        "swap" => {
            swap_until_stopped(&path);
            Ok(())
        }
        other => panic!("unknown child task {other}"),
    };
    match result {
        Ok(()) => println!("RESULT ok"),
        Err(code) => println!("RESULT {code}"),
    }
}

/// The co-tenant: keeps replacing each of the repo's folders by a symlink to
/// `NK_OUTSIDE` and putting it back, until `<repo>/stop` appears.
fn swap_until_stopped(repo: &Path) {
    let outside = PathBuf::from(std::env::var("NK_OUTSIDE").unwrap());
    let folders = [".locks", ".sentinels", "node_modules", ".staging"];
    let mut swaps = 0u64;
    while !repo.join("stop").exists() {
        for f in folders {
            let real = repo.join(f);
            let aside = repo.join(format!("{f}.aside"));
            if fs::rename(&real, &aside).is_ok() && symlink(&outside, &real).is_ok() {
                swaps += 1;
            }
            // Long enough for installs to meet it at any of their steps.
            std::thread::sleep(Duration::from_millis(2));
            // Put it back (the link may have been replaced meanwhile).
            if fs::symlink_metadata(&real).is_ok_and(|m| m.file_type().is_symlink()) {
                let _ = fs::remove_file(&real);
            }
            if fs::rename(&aside, &real).is_err() {
                // nanokit made a fresh folder there meanwhile: merge nothing,
                // just drop ours out of the way (it stays inside the repo).
                let _ = fs::rename(&aside, repo.join(format!("{f}.aside.{swaps}")));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    println!("SWAPS {swaps}");
}

#[test]
fn a_co_tenant_swapping_folders_for_links_during_installs_never_gets_a_write_outside() {
    let outside = Arc::new(Outside::new());
    let repo = tempfile::tempdir().unwrap();
    // The co-tenant, a separate process.
    let swapper = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_entry",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NK_CHILD", "swap")
        .env("NK_PATH", repo.path())
        .env("NK_OUTSIDE", outside.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Watch the outside tree at every instant, not only at the end.
    let watching = Arc::new(AtomicBool::new(true));
    let violation = Arc::new(std::sync::Mutex::new(None::<String>));
    let watcher = {
        let (outside, watching, violation) = (outside.clone(), watching.clone(), violation.clone());
        std::thread::spawn(move || {
            while watching.load(Ordering::Relaxed) {
                let now = snapshot(outside.path());
                if now != outside.before {
                    *violation.lock().unwrap() = Some(format!("{now:?}"));
                    return;
                }
                std::thread::yield_now();
            }
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    // Until the swaps were met (and refused) a few times; the cap only
    // guards against a swapper that never runs.
    for i in 0..5000 {
        if outcomes.get("ENKFOREIGN").copied().unwrap_or(0) >= 40 && i >= 200 {
            break;
        }
        let spec = format!("pkg{i}@1.0.{i}");
        let code = match rt.block_on(install(repo.path(), &spec)) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.code().to_string(),
        };
        *outcomes.entry(code).or_default() += 1;
        if violation.lock().unwrap().is_some() {
            break;
        }
    }
    fs::write(repo.path().join("stop"), "").unwrap();
    let out = swapper.wait_with_output().unwrap();
    watching.store(false, Ordering::Relaxed);
    watcher.join().unwrap();
    let swaps = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("install outcomes {outcomes:?}; co-tenant {}", swaps.trim());
    assert!(
        violation.lock().unwrap().is_none(),
        "a write landed outside the repo: {:?} (outcomes {outcomes:?})",
        violation.lock().unwrap()
    );
    outside.assert_untouched();
    assert!(swaps.contains("SWAPS "), "the swapper ran: {swaps}");
    // Every failure is a coded refusal or an I/O error from a folder that
    // moved away mid-install, never anything else.
    for code in outcomes.keys() {
        assert!(
            ["ok", "ENKFOREIGN", "ENKIO", "ENKINSTALL", "ENKLOCKLOST"].contains(&code.as_str()),
            "{outcomes:?}"
        );
    }
    assert!(
        outcomes.contains_key("ENKFOREIGN"),
        "the swaps were met and refused: {outcomes:?} {swaps}"
    );
}
