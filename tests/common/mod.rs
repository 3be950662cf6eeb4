//! Helpers shared by the engine tests: a project in a temp dir, run with real
//! processes, torn down (every labelled process killed) on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nanokit::config::{self, Config, LoadOptions};
use nanokit::engine::{self, RunOptions};

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new(yml: &str) -> Project {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("nanokit.yml"), yml).expect("write yml");
        Project { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self) -> PathBuf {
        self.dir.path().join("nanokit.yml")
    }

    pub fn write(&self, yml: &str) {
        std::fs::write(self.file(), yml).expect("write yml");
    }

    pub fn config(&self) -> Config {
        config::load(&LoadOptions::new(self.file())).unwrap_or_else(|e| panic!("config: {e}"))
    }

    pub async fn up(&self, opts: RunOptions) -> Result<engine::Report, engine::EngineError> {
        let cfg = self.config();
        let p = engine::provider_for(&cfg).expect("provider");
        engine::up(Arc::new(cfg), p, opts).await
    }

    pub async fn down(&self) -> engine::Report {
        let cfg = self.config();
        let p = engine::provider_for(&cfg).expect("provider");
        engine::down(Arc::new(cfg), p, RunOptions::default())
            .await
            .expect("down")
    }

    pub fn state(&self) -> nanokit::state::State {
        let cfg = self.config();
        nanokit::state::read(&cfg.state_file, &cfg.name, &cfg.env).expect("state")
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(name)).unwrap_or_default()
    }

    pub fn args(&self, cmd: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        v.push("-f".into());
        v.push(self.file().to_string_lossy().into_owned());
        v
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        // Kill whatever still runs with this project's labels.
        if let Ok(cfg) = config::load(&LoadOptions::new(self.file())) {
            let scope = engine::scope(&cfg);
            for pid in labelled(&scope.state_id) {
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
        }
    }
}

/// Group leaders carrying `NK_STATE_ID=<id>`.
pub fn labelled(state_id: &str) -> Vec<u32> {
    let needle = format!("NK_STATE_ID={state_id}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pid) && f.first() != Some(&"Z")
            {
                out.push(pid);
            }
        }
    }
    out
}

/// A copy of `examples/<name>` in a new temp dir (without `.nanokit/`).
pub fn copy_example(name: &str) -> tempfile::TempDir {
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == ".nanokit") {
                continue;
            }
            if p.is_dir() {
                copy_dir(&p, &to.join(e.file_name()));
            } else {
                std::fs::copy(&p, to.join(e.file_name())).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(name),
        dir.path(),
    );
    dir
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Events recorded by an up/down run.
pub fn recorder() -> (engine::EventSink, Arc<std::sync::Mutex<Vec<engine::Event>>>) {
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = log.clone();
    (
        Arc::new(move |e: &engine::Event| l.lock().unwrap().push(e.clone())),
        log,
    )
}

pub mod watcher;
