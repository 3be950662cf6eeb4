//! Looking after a state: its history (`infra state history`, `show`),
//! reading and replacing it whole (`pull`, `push`), and moving it to
//! another backend (`migrate`). Every change is made under the deploy lock,
//! through the same compare-and-swap writes as a run.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::backend::Holder;
use super::lock::{self, DeployLock};
use super::{Backend, Location, State, StateError, Store, StoreOptions};
use crate::config::{self, Config};

/// One kept revision, for `infra state history`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    pub serial: u64,
    /// When it was written (RFC 3339), who and with what.
    pub at: Option<String>,
    pub holder: Option<String>,
    pub command: Option<String>,
    /// What changed from the revision before it (`+api ~db -old`), when that
    /// one is kept.
    pub changes: Option<String>,
}

/// What changed between two states: services added, changed, removed.
pub fn summary(before: &State, after: &State) -> String {
    let mut parts = Vec::new();
    for (name, r) in &after.resources {
        match before.resources.get(name) {
            None => parts.push(format!("+{name}")),
            Some(b) if b != r => parts.push(format!("~{name}")),
            Some(_) => {}
        }
    }
    for name in before.resources.keys() {
        if !after.resources.contains_key(name) {
            parts.push(format!("-{name}"));
        }
    }
    for (name, v) in &after.volumes {
        if !before.volumes.contains_key(name) {
            parts.push(format!("+volume:{name}"));
        } else if before.volumes.get(name) != Some(v) {
            parts.push(format!("~volume:{name}"));
        }
    }
    for name in before.volumes.keys() {
        if !after.volumes.contains_key(name) {
            parts.push(format!("-volume:{name}"));
        }
    }
    if before.migrated_to != after.migrated_to && after.migrated_to.is_some() {
        parts.push(format!(
            "migrated to {}",
            after.migrated_to.as_deref().unwrap_or("")
        ));
    }
    if parts.is_empty() {
        "no change to services".into()
    } else {
        parts.join(" ")
    }
}

async fn backend_of(config: &Config) -> Result<(Arc<dyn Backend>, StoreOptions), StateError> {
    Ok((
        super::open(&Location::of(config)).await?,
        StoreOptions::of(config),
    ))
}

async fn revision(
    backend: &Arc<dyn Backend>,
    opts: &StoreOptions,
    project: &str,
    serial: u64,
) -> Result<Option<State>, StateError> {
    match backend.get_revision(serial).await? {
        Some(bytes) => Ok(Some(
            super::decode_stored(&bytes, &opts.codec, &backend.location(), project).await?,
        )),
        None => Ok(None),
    }
}

/// The last `limit` kept revisions of `config`'s state, newest first.
pub async fn history(config: &Config, limit: usize) -> Result<Vec<Revision>, StateError> {
    let (backend, opts) = backend_of(config).await?;
    let serials = backend.list_revisions().await?;
    let shown: Vec<u64> = serials.iter().rev().take(limit).copied().collect();
    let mut out = Vec::new();
    // Each revision and the one before it (when kept), oldest needed first.
    let mut previous: Option<(u64, State)> = None;
    let mut states = Vec::new();
    for &serial in shown.iter().rev() {
        if previous.is_none() && serials.contains(&(serial.wrapping_sub(1))) {
            if let Some(st) = revision(&backend, &opts, &config.name, serial - 1).await? {
                previous = Some((serial - 1, st));
            }
        }
        let Some(st) = revision(&backend, &opts, &config.name, serial).await? else {
            continue;
        };
        let changes = previous
            .as_ref()
            .filter(|(s, _)| *s + 1 == serial)
            .map(|(_, before)| summary(before, &st));
        states.push(Revision {
            serial,
            at: st.written.as_ref().map(|w| w.at.clone()),
            holder: st.written.as_ref().map(|w| {
                let user = if w.user.is_empty() {
                    String::new()
                } else {
                    format!("{}@", w.user)
                };
                format!("{user}{} pid {} ({})", w.host, w.pid, w.label)
            }),
            command: st.written.as_ref().map(|w| w.command.clone()),
            changes,
        });
        previous = Some((serial, st));
    }
    states.reverse();
    out.extend(states);
    Ok(out)
}

/// Kept revision `serial` of `config`'s state.
pub async fn show(config: &Config, serial: u64) -> Result<State, StateError> {
    let (backend, opts) = backend_of(config).await?;
    revision(&backend, &opts, &config.name, serial)
        .await?
        .ok_or_else(|| StateError::Read {
            location: backend.location(),
            detail: format!(
                "no revision {serial} is kept (see `nanokit infra state history`; the last {} are kept)",
                config.state_history
            ),
        })
}

/// The current state of `config` (`None` before the first write).
pub async fn pull(config: &Config) -> Result<Option<State>, StateError> {
    let (backend, opts) = backend_of(config).await?;
    let store = Store::open_with(backend, &config.name, &config.env, opts).await?;
    Ok(store.is_stored().then(|| store.state().clone()))
}

/// What `push` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "outcome")]
pub enum Pushed {
    /// The stored state is already this one.
    Unchanged {
        serial: u64,
    },
    Written {
        serial: u64,
    },
}

/// Replaces `config`'s state with `bytes` (a state as `pull` prints it, or
/// as stored: an envelope is opened with the configured key), under the
/// deploy lock. Refused, unless `force`, when its lineage differs from the
/// stored state's, or its serial is older, or equal with other content.
/// Forced, it is written with the stored serial + 1.
pub async fn push(
    config: &Config,
    bytes: &[u8],
    force: bool,
    cancel: &CancellationToken,
) -> Result<Pushed, StateError> {
    let opts = StoreOptions::of(config);
    let location = Location::of(config).display();
    let mut pushed =
        super::decode_stored(bytes, &opts.codec, "the pushed file", &config.name).await?;
    let (lock, mut store) =
        lock::lock_state(config, "nanokit infra state push", None, cancel).await?;
    let r = async {
        let cur = store.state().clone();
        if store.is_stored() {
            let refuse = |why: String| {
                Err(StateError::Refused {
                    location: location.clone(),
                    detail: why,
                })
            };
            if !force && pushed.lineage != cur.lineage {
                return refuse(format!(
                    "the pushed state's lineage {} is not the stored state's {} (another state history; --force replaces it anyway)",
                    pushed.lineage, cur.lineage
                ));
            }
            if !force && pushed.serial < cur.serial {
                return refuse(format!(
                    "the pushed state's serial {} is older than the stored state's {} (--force replaces it anyway)",
                    pushed.serial, cur.serial
                ));
            }
            let same = |s: &State| {
                let mut s = s.clone();
                s.written = None;
                s.epoch = 0;
                s
            };
            if pushed.serial == cur.serial && pushed.lineage == cur.lineage {
                if same(&pushed) == same(&cur) {
                    return Ok(Pushed::Unchanged { serial: cur.serial });
                }
                if !force {
                    return refuse(format!(
                        "the pushed state's serial {} is the stored state's, with other content (--force replaces it anyway)",
                        pushed.serial
                    ));
                }
            }
            if force && pushed.serial <= cur.serial {
                pushed.serial = cur.serial + 1;
            }
        }
        pushed.migrated_to = None;
        pushed.migrating_to = None;
        // Stamped with this lock's epoch (epochs count per store).
        pushed.epoch = 0;
        let serial = pushed.serial;
        store.replace(pushed).await?;
        Ok(Pushed::Written { serial })
    }
    .await;
    finish(lock, r).await
}

async fn finish<T>(lock: DeployLock, r: Result<T, StateError>) -> Result<T, StateError> {
    let released = lock.release().await;
    let v = r?;
    released?;
    Ok(v)
}

/// What `migrate` did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Migrated {
    pub from: String,
    pub to: String,
    pub serial: u64,
    pub lineage: String,
    pub revisions: usize,
}

/// The location `to` names for `config`: a URL of a known store, or a file
/// path (relative to the configuration's folder).
pub fn destination(config: &Config, to: &str) -> Result<Location, StateError> {
    match config::url_scheme(to) {
        Some(s) if config::STATE_SCHEMES.contains(&s) => Ok(if config::is_postgres_url(to) {
            Location::Postgres {
                url: to.to_string(),
                workspace: super::workspace(&config.name, &config.env),
            }
        } else {
            Location::Url(to.to_string())
        }),
        Some(s) => Err(StateError::Url {
            url: crate::pg::redact_url(to),
            detail: format!("unknown kind of state store `{s}://`: use a file path, or postgres://, s3://, gs://, vault://"),
        }),
        None => Ok(Location::File(config.dir.join(to))),
    }
}

/// Moves `config`'s state and its history to `to`, under both stores'
/// deploy locks: the destination gets the same lineage, serial and
/// revisions; the source is then marked migrated (a later run against it
/// fails naming `to`). Until that last write the source stays the state: a
/// migration stopped half way leaves it so, says so on its next run, and
/// may be run again. A destination that holds a state of its own is
/// refused unless `force`.
pub async fn migrate(
    config: &Config,
    to: &str,
    force: bool,
    cancel: &CancellationToken,
) -> Result<Migrated, StateError> {
    let src_loc = Location::of(config);
    let dst_loc = destination(config, to)?;
    if dst_loc == src_loc {
        return Err(StateError::Url {
            url: dst_loc.display(),
            detail: "the state is already there".into(),
        });
    }
    let label = "nanokit infra state migrate";
    let opts = StoreOptions::of(config);
    // The source, under its lock (also when it was marked migrated by an
    // earlier run: then this is a migration back, which is refused below).
    let src_backend = super::open(&src_loc).await?;
    let holder = Holder::this_run(label);
    let src_lock = lock::acquire(
        src_backend.clone(),
        &holder,
        lock::ttl(&src_loc),
        None,
        cancel,
    )
    .await?;
    let r = async {
        let mut src = Store::open_any(src_backend, &config.name, &config.env, opts.clone()).await?;
        src.fence(src_lock.epoch(), &holder)?;
        if let Some(went) = &src.state().migrated_to {
            return Err(StateError::Migrated {
                location: src.location(),
                to: went.clone(),
            });
        }
        if !src.is_stored() {
            return Err(StateError::Read {
                location: src.location(),
                detail: "there is no state here to migrate".into(),
            });
        }
        let dst_backend = super::open(&dst_loc).await?;
        let dst_lock = lock::acquire(
            dst_backend.clone(),
            &holder,
            lock::ttl(&dst_loc),
            None,
            cancel,
        )
        .await?;
        let r = copy(
            config,
            &mut src,
            &src_loc,
            dst_backend,
            &dst_lock,
            &dst_loc,
            force,
            &holder,
        )
        .await;
        let released = dst_lock.release().await;
        let m = r?;
        released?;
        Ok(m)
    }
    .await;
    finish(src_lock, r).await
}

#[allow(clippy::too_many_arguments)]
async fn copy(
    config: &Config,
    src: &mut Store,
    src_loc: &Location,
    dst_backend: Arc<dyn Backend>,
    dst_lock: &DeployLock,
    dst_loc: &Location,
    force: bool,
    holder: &Holder,
) -> Result<Migrated, StateError> {
    let opts = src.options().clone();
    let (from, to) = (src_loc.display(), dst_loc.display());
    let mut dst =
        Store::open_any(dst_backend.clone(), &config.name, &config.env, opts.clone()).await?;
    dst.fence(dst_lock.epoch(), holder)?;
    if dst.is_stored() && !force {
        let d = dst.state();
        // Stale copies this migration may replace: the state's own
        // (a migration back after it left), or an earlier, unfinished
        // migration's copy from here.
        let ours = d.lineage == src.state().lineage
            && (d.migrated_to.is_some() || d.migrated_from.as_deref() == Some(from.as_str()));
        if !ours {
            return Err(StateError::Refused {
                location: to.clone(),
                detail: format!(
                    "it already holds a state (lineage {}, serial {}); move it away, or migrate with --force to replace it",
                    d.lineage, d.serial
                ),
            });
        }
    }
    // 1. The source says a migration is under way (so that a stop half way
    //    is reported by its next run). The markers keep the serial: the
    //    destination gets the source's.
    let mut marked = src.state().clone();
    marked.migrating_to = Some(to.clone());
    src.replace(marked).await?;
    // 2. The history, as stored (sealed alike on both sides); then the
    //    state with its serial and lineage.
    let src_backend = src.backend().clone();
    let kept = src_backend.list_revisions().await?;
    for old in dst_backend.list_revisions().await? {
        if !kept.contains(&old) {
            dst_backend.delete_revision(old).await?;
        }
    }
    for &serial in &kept {
        if let Some(bytes) = src_backend.get_revision(serial).await? {
            dst_backend.put_revision(serial, &bytes).await?;
        }
    }
    let mut copy = src.state().clone();
    copy.migrating_to = None;
    copy.migrated_to = None;
    copy.migrated_from = Some(from.clone());
    // Stamped with the destination lock's epoch (epochs count per store).
    copy.epoch = 0;
    let (serial, lineage) = (copy.serial, copy.lineage.clone());
    dst.replace(copy).await?;
    pause_for_test();
    // 3. The source is marked migrated: from here on the destination is the
    //    state.
    let mut gone = src.state().clone();
    gone.migrating_to = None;
    gone.migrated_to = Some(to.clone());
    src.replace(gone).await?;
    Ok(Migrated {
        from,
        to,
        serial,
        lineage,
        revisions: kept.len(),
    })
}

/// For the test of a migration stopped half way (tests/state_manage.rs):
/// when `NANOKIT_TEST_STOP_IN_MIGRATE` names a file that exists, the file is
/// removed and this process stops itself (SIGSTOP) after the copy and
/// before the source is marked migrated.
fn pause_for_test() {
    if let Some(p) = std::env::var_os("NANOKIT_TEST_STOP_IN_MIGRATE") {
        if std::fs::remove_file(Path::new(&p)).is_ok() {
            // SAFETY: raising a signal in our own process.
            unsafe { libc::raise(libc::SIGSTOP) };
        }
    }
}
