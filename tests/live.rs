//! A health verdict is about one live instance (engine/live.rs), with real
//! processes: two copies of `examples/basic` on the same ports, the second
//! started while the first runs, through the `nanokit` command.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A copy of examples/basic, run with `vars`; brought down (and every
/// process it labelled killed) on drop.
struct Copy {
    dir: tempfile::TempDir,
    vars: Vec<(String, String)>,
}

impl Copy {
    fn new(vars: &[(&str, String)]) -> Copy {
        Copy {
            dir: common::copy_example("basic"),
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("nanokit.yml")
    }

    /// `nanokit <cmd> -f <copy>`: (exit code, stderr).
    fn nanokit(&self, cmd: &[&str]) -> (Option<i32>, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_nanokit"))
            .args(cmd)
            .arg("-f")
            .arg(self.file())
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .env("NANOKIT_TRACE", "off")
            .output()
            .expect("run nanokit");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn state(&self) -> serde_json::Value {
        let s = std::fs::read_to_string(self.dir.path().join(".nanokit/state.json")).unwrap();
        serde_json::from_str(&s).unwrap()
    }

    /// The pid of `service`'s recorded instance.
    fn pid(&self, service: &str) -> u32 {
        let id = self.state()["resources"][service]["provider_id"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                self.state()["resources"][service]["instances"][0]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("no instance of {service}: {}", self.state()));
        id.split('@').next().unwrap().parse().unwrap()
    }

    fn status(&self, service: &str) -> String {
        self.state()["resources"][service]["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn log(&self, service: &str) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!(".nanokit/logs/local/{service}.log")),
        )
        .unwrap_or_default()
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        let _ = self.nanokit(&["down"]);
        let cfg = nanokit::config::load(&nanokit::config::LoadOptions {
            file: self.file(),
            env: "local".into(),
            vars: Some(self.vars.iter().cloned().collect()),
        });
        if let Ok(cfg) = cfg {
            for pid in common::labelled(&nanokit::engine::scope(&cfg).state_id) {
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
        }
    }
}

/// The process group of `pid`.
fn group_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn ports() -> Vec<(&'static str, String)> {
    vec![
        ("DB_PORT", common::free_port().to_string()),
        ("API_PORT", common::free_port().to_string()),
    ]
}

/// The case: a second copy of the example while the first runs.
/// Its `db` port is bound already, so `db` is refused before it starts,
/// naming the first copy's process; what depends on it never starts.
#[test]
fn a_port_bound_before_start_is_refused_naming_its_holder() {
    let vars = ports();
    let first = Copy::new(&vars);
    let (code, err) = first.nanokit(&["up"]);
    assert_eq!(code, Some(0), "{err}");
    let db = first.pid("db");

    let second = Copy::new(&vars);
    let (code, err) = second.nanokit(&["up"]);
    assert_eq!(code, Some(1), "{err}");
    let db_port = &vars[0].1;
    let line = err
        .lines()
        .find(|l| l.starts_with("error[ENKFAILED]: db failed"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains(&format!("port {db_port} is already allocated"))
            && line.contains(" (node db.js) in ")
            && line.contains(&first.dir.path().join("db").display().to_string())
            && line.contains("service `db` of nanokit project `basic`"),
        "{line}"
    );
    // The holder named is the first copy's db (its `node`, in the group of
    // the `sh` that nanokit started).
    let holder: u32 = line
        .split("held by pid ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(group_of(holder), Some(db), "{line}");
    assert!(
        err.contains("error[ENKFAILED]: api skipped")
            && err.contains("error[ENKFAILED]: worker skipped"),
        "{err}"
    );
    // Reported before the start: the second db never ran.
    assert!(
        !second.log("db").contains("nanokit: starting"),
        "{}",
        second.log("db")
    );
    // Nothing of it was started, so nothing is recorded (as for api and
    // worker, which were skipped).
    assert!(
        second.state()["resources"].get("db").is_none(),
        "{}",
        second.state()
    );
    // The first copy is untouched.
    assert!(alive(db) && first.status("db") == "healthy");
}

/// The second copy's `api` declares a free `port` but listens on the first
/// copy's (its env sets PORT): it exits at once with EADDRINUSE, while its
/// HTTP check (`fetch` on PORT) is answered by the first copy's api. It is
/// not healthy: `up` fails it quoting its log. (Whether it exits before its
/// check passes, which fails it at once, or after, when `up` has released
/// `worker` already, depends on how fast node starts; either way it fails.)
#[test]
fn an_instance_that_exited_is_not_healthy_though_another_process_answers_its_check() {
    let vars = ports();
    let first = Copy::new(&vars);
    let (code, err) = first.nanokit(&["up"]);
    assert_eq!(code, Some(0), "{err}");

    let mut vars2 = ports();
    vars2.push(("HELD_PORT", vars[1].1.clone()));
    let second = Copy::new(&vars2);
    let yml = std::fs::read_to_string(second.file()).unwrap();
    let anchor = "      DB_URL: http://127.0.0.1:${DB_PORT:-7101}\n";
    assert!(
        yml.contains(anchor),
        "examples/basic/nanokit.yml changed shape"
    );
    std::fs::write(
        second.file(),
        yml.replace(anchor, &format!("{anchor}      PORT: ${{HELD_PORT}}\n")),
    )
    .unwrap();
    let (code, err) = second.nanokit(&["up"]);
    assert_eq!(code, Some(1), "{err}");
    let api = err
        .split("error[ENKFAILED]: ")
        .find(|l| l.starts_with("api failed"))
        .unwrap_or_else(|| panic!("api did not fail: {err}"));
    assert!(
        api.contains("exited") && api.contains("EADDRINUSE"),
        "{api}"
    );
    assert_eq!(second.status("api"), "failed");
    assert_eq!(second.status("db"), "healthy");
}

/// Stopping an instance stops all of it: its leader `sh` dies at once, the
/// `node` under it only once the kernel has freed its memory (here 512 MB,
/// tens of ms), and until then it still listens on the port. A restart
/// must not start the new instance before (it would be refused: "port …
/// is already allocated").
#[test]
fn a_restart_waits_until_every_process_of_the_old_instance_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port().to_string();
    std::fs::write(
        dir.path().join("big.js"),
        "const big = Buffer.alloc(512 * 1024 * 1024, 1)\n\
         require('net').createServer().listen(Number(process.argv[2]), '127.0.0.1', () => console.log('listening'))\n\
         setInterval(() => big[0]++, 1 << 30)\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("nanokit.yml"),
        "name: slowexit\ninfra:\n  provider: process\nservices:\n  big:\n    start: node big.js ${BIG_PORT}\n    port: ${BIG_PORT}\n",
    )
    .unwrap();
    let nanokit = |cmd: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nanokit"))
            .args(cmd)
            .arg("-f")
            .arg(dir.path().join("nanokit.yml"))
            .env("BIG_PORT", &port)
            .env("NANOKIT_TRACE", "off")
            .output()
            .expect("run nanokit");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let pid = |what: &str| -> u32 {
        let s: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(".nanokit/state.json")).unwrap(),
        )
        .unwrap();
        s["resources"]["big"]["provider_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {s}"))
            .split('@')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (code, err) = nanokit(&["up"]);
    assert_eq!(code, Some(0), "{err}");
    let first = pid("after up");
    for round in 0..3 {
        let (code, err) = nanokit(&["restart", "big"]);
        assert_eq!(code, Some(0), "restart {round}: {err}");
    }
    assert_ne!(pid("after the restarts"), first);
    // Gone, or a zombie its parent (init, once `up` exited) has not reaped.
    let stat = std::fs::read_to_string(format!("/proc/{first}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty()
            || stat
                .rsplit_once(')')
                .unwrap()
                .1
                .trim_start()
                .starts_with('Z'),
        "{stat}"
    );
    let (code, err) = nanokit(&["down", "--yes"]);
    assert_eq!(code, Some(0), "{err}");
}
