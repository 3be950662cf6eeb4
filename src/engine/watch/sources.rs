//! What wakes the watcher, without polling: each instance's exit (a pidfd
//! per process), the runtime's event stream (Docker's, filtered by labels),
//! health probes of running processes at their check's `interval`, and
//! changes of nanokit.yml, its `.env` and the handed-over requests
//! (inotify, through `notify`).
//!
//! Every task here is tied to what it watches: per-instance tasks are
//! replaced as instances are, so open descriptors and tasks follow the
//! number of instances, not the number of restarts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, Notify};

use super::super::AbortOnDrop;
use crate::config::Healthcheck;
use crate::provider::{EventStream, Exit, InstanceEvent, InstanceSpec, Probe, Provider};

/// Something the watcher is told.
#[derive(Debug)]
pub(super) enum Input {
    /// Instance `id` ended.
    Exited { id: String, exit: Exit },
    /// The runtime's event stream told of an instance.
    Runtime(InstanceEvent),
    /// The runtime's event stream ended (the daemon restarted?).
    StreamLost(String),
    /// A health probe of a running instance.
    Probe {
        service: String,
        id: String,
        ok: bool,
        output: String,
        retries: u32,
    },
}

pub(super) type Sender = mpsc::Sender<Input>;

/// Forwards the runtime's event stream until it ends.
pub(super) fn forward(mut stream: EventStream, tx: Sender) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let why = loop {
            match stream.next().await {
                Some(Ok(e)) => {
                    if tx.send(Input::Runtime(e)).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => break e.to_string(),
                None => break "the runtime closed its event stream".to_string(),
            }
        };
        let _ = tx.send(Input::StreamLost(why)).await;
    }))
}

/// A running instance to watch.
pub(super) struct Watched {
    pub(super) service: String,
    pub(super) id: String,
    /// Probed at its interval by the watcher (the runtime does not report
    /// health itself).
    pub(super) probe: Option<(InstanceSpec, Healthcheck)>,
}

/// The per-instance tasks: one exit watch (and one prober) per instance.
#[derive(Default)]
pub(super) struct Watches {
    exits: HashMap<String, AbortOnDrop>,
    probes: HashMap<String, AbortOnDrop>,
}

impl Watches {
    /// Watches exactly `now`: ends the tasks of instances no longer there
    /// and starts those of new ones.
    pub(super) fn sync(&mut self, provider: &Arc<dyn Provider>, now: Vec<Watched>, tx: &Sender) {
        self.exits.retain(|id, _| now.iter().any(|w| &w.id == id));
        self.probes
            .retain(|id, _| now.iter().any(|w| &w.id == id && w.probe.is_some()));
        for w in now {
            if !self.exits.contains_key(&w.id) {
                if let Some(exited) = provider.ended(&w.id) {
                    let (tx, id) = (tx.clone(), w.id.clone());
                    let task = tokio::spawn(async move {
                        let exit = exited.await;
                        let _ = tx.send(Input::Exited { id, exit }).await;
                    });
                    self.exits.insert(w.id.clone(), AbortOnDrop(task));
                }
            }
            if let (Some((spec, check)), false) = (w.probe, self.probes.contains_key(&w.id)) {
                let task = tokio::spawn(probe(
                    provider.clone(),
                    w.service,
                    w.id.clone(),
                    spec,
                    check,
                    tx.clone(),
                ));
                self.probes.insert(w.id, AbortOnDrop(task));
            }
        }
    }
}

/// Runs `check` on instance `id` every `interval` (the first one interval
/// after it came up healthy) and reports each verdict.
async fn probe(
    provider: Arc<dyn Provider>,
    service: String,
    id: String,
    spec: InstanceSpec,
    check: Healthcheck,
    tx: Sender,
) {
    let every = check.interval.max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let argv = Probe::Command(check.test.clone());
    loop {
        ticks.tick().await;
        let (ok, output) = match provider.probe(&id, &spec, &argv, check.timeout).await {
            Ok(r) => (r.ok, r.output),
            Err(e) => (false, e.to_string()),
        };
        let verdict = Input::Probe {
            service: service.clone(),
            id: id.clone(),
            ok,
            output,
            retries: check.retries,
        };
        if tx.send(verdict).await.is_err() {
            return;
        }
    }
}

/// Changes of nanokit.yml and its `.env`, and new handed-over requests,
/// seen through inotify on their folders.
pub(super) struct Files {
    _watcher: notify::RecommendedWatcher,
    pub(super) config: Arc<Notify>,
    pub(super) requests: Arc<Notify>,
}

impl Files {
    /// Watches the folder of `config_file` (editors replace files by
    /// renaming) and `requests`.
    pub(super) fn start(config_file: &Path, requests: &Path) -> notify::Result<Files> {
        use notify::Watcher;
        let dir = config_file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let names: Vec<std::ffi::OsString> = [
            config_file.file_name().map(|n| n.to_os_string()),
            Some(".env".into()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let (config, req) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (c, r, req_dir) = (config.clone(), req.clone(), requests.to_path_buf());
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let Ok(ev) = res else { return };
                if matches!(ev.kind, notify::EventKind::Access(_)) {
                    return;
                }
                for p in &ev.paths {
                    if p.parent() == Some(req_dir.as_path()) {
                        r.notify_one();
                    } else if p.file_name().is_some_and(|n| names.iter().any(|x| x == n)) {
                        c.notify_one();
                    }
                }
            })?;
        watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        watcher.watch(requests, notify::RecursiveMode::NonRecursive)?;
        Ok(Files {
            _watcher: watcher,
            config,
            requests: req,
        })
    }
}

/// Caps a service log that a process writes to directly: past `max` bytes
/// its content moves to `<log>.1` (replacing the older one) and the log is
/// emptied in place (the service keeps its descriptor, opened to append:
/// its next line goes to the start). What the service writes during the
/// copy may be lost, as with logrotate's `copytruncate`.
pub(super) fn cap_log(log: &Path, max: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let mut old = log.as_os_str().to_owned();
    old.push(".1");
    let old = PathBuf::from(old);
    let mut from = std::fs::File::open(log)?;
    let mut to = crate::sys::private::open_append(&old)?;
    to.set_len(0)?;
    std::io::copy(&mut from, &mut to)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_past_its_cap_moves_aside_and_the_writer_goes_on_at_the_start() {
        use std::io::Write;
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join(".nanokit/logs/local/api.log");
        let mut writer = crate::sys::private::open_append(&log).unwrap();
        writer.write_all(&[b'a'; 300]).unwrap();
        assert!(!cap_log(&log, 1000).unwrap());
        writer.write_all(&[b'b'; 800]).unwrap();
        assert!(cap_log(&log, 1000).unwrap());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        let old = std::fs::read(t.path().join(".nanokit/logs/local/api.log.1")).unwrap();
        assert_eq!(old.len(), 1100);
        writer.write_all(b"next\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"next\n");
    }
}
