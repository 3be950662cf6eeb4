//! `nanokit state …`: the key/value state store and its named locks from the
//! command line.

use clap::{Args, Subcommand};
use serde_json::json;

use super::{confirm, exit, CliError, CliResult, OutputFormat};
use crate::kv::{self, error::fmt_ms, Entry, KvError, OpenOptions, Store, Value};

const AFTER_HELP: &str = "\
Backends:
  embedded (default)  one SQLite file per agent in the state directory
                      ($NANOKIT_STATE_DIR, default ~/.nanokit/state/<agent>.db),
                      safe for many processes on this machine
  postgres            --state-url postgres://user:pass@host:port/db (or
                      $NANOKIT_STATE_URL): shared by many machines; lock
                      expiry follows the database's clock

Examples:
  nanokit state set package:installed:nginx 1.25
  nanokit state set config '{\"replicas\":3}' --json
  nanokit state get package:installed:nginx
  nanokit state list package: --output json
  nanokit state incr deploys
  nanokit state lock deploy --holder \"$(hostname)\" --timeout 300 --wait 60
  nanokit state unlock deploy --holder \"$(hostname)\"
  nanokit state delete config --yes

Errors print their code (ENKLOCKED, ENKNOTHOLDER, ENKKEY, ENKAGENT,
ENKSTATECORRUPT, ENKSTATEUNAVAILABLE, …) and exit with status 1.";

/// `nanokit state`: shared key/value state with named locks.
#[derive(Debug, Args)]
#[command(after_long_help = AFTER_HELP)]
pub struct StateArgs {
    /// Namespace of keys and locks: letters, digits, '.', '_', '-'.
    #[arg(long, global = true, env = "NANOKIT_STATE_AGENT", default_value = kv::DEFAULT_AGENT)]
    pub agent: String,

    /// Use the PostgreSQL backend at this URL (postgres://user:pass@host:port/db).
    #[arg(long, global = true, env = "NANOKIT_STATE_URL", hide_env_values = true)]
    pub state_url: Option<String>,

    /// Directory of the embedded databases (default ~/.nanokit/state).
    #[arg(long, global = true, env = "NANOKIT_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,

    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t)]
    pub output: OutputFormat,

    #[command(subcommand)]
    pub command: StateCommand,
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// List keys (with values) starting with PREFIX, or all keys.
    List {
        /// Only keys that start with this.
        prefix: Option<String>,
    },
    /// Show one key: its value, type, size and last write.
    Show { key: String },
    /// Print the value of KEY (text as is, JSON compact). Exit 1 when missing.
    Get { key: String },
    /// Set KEY to VALUE (a string; with --json, a JSON value).
    Set {
        key: String,
        value: String,
        /// Parse VALUE as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete KEY (asks for confirmation unless --yes).
    Delete {
        key: String,
        /// Do not ask.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Delete every key of the agent (asks unless --yes). Locks are kept.
    Clear {
        /// Do not ask.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Counts: keys, bytes, held locks, file size.
    Stats,
    /// Atomically add DELTA (default 1, may be negative) to the integer at KEY.
    Incr {
        key: String,
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        delta: i64,
    },
    /// Acquire the named lock NAME for --holder (fails with ENKLOCKED naming
    /// the current holder, after waiting up to --wait seconds).
    Lock {
        name: String,
        /// Who holds it (e.g. a hostname or job id); needed to unlock.
        #[arg(long)]
        holder: String,
        /// Seconds until the lock expires by itself.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        /// Seconds to wait for the current holder to release it.
        #[arg(long, default_value_t = 0.0)]
        wait: f64,
    },
    /// Release the lock NAME held by --holder, or clear it whoever holds it
    /// with --force (asks unless --yes).
    Unlock {
        name: String,
        /// The holder that acquired it.
        #[arg(long, required_unless_present = "force", conflicts_with = "force")]
        holder: Option<String>,
        /// Remove the lock whoever holds it (e.g. a stale lock of a dead job).
        #[arg(long)]
        force: bool,
        /// With --force: do not ask.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Show whether the lock NAME is held, by whom and until when.
    Locked { name: String },
}

/// Runs `nanokit state …`. With `--output json`, an error is also printed as
/// JSON on stdout, for scripts.
pub async fn run(args: StateArgs) -> CliResult {
    let result = run_inner(&args).await;
    if let (Err(e), OutputFormat::Json) = (&result, args.output) {
        outln!(
            "{}",
            json!({"error": {"code": e.code, "message": e.message}})
        );
    }
    result
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max - 1).collect::<String>())
    } else {
        flat
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Text(_) => "text",
        Value::Json(_) => "json",
    }
}

fn table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 2));
            }
        }
        outln!("{}", line.trim_end());
    }
}

async fn run_inner(args: &StateArgs) -> CliResult {
    let opts = OpenOptions {
        agent: Some(args.agent.clone()),
        state_dir: args.state_dir.clone(),
        // Some("") forces the embedded backend even if the variable is set in
        // a way clap did not see.
        url: Some(args.state_url.clone().unwrap_or_default()),
    };
    let json_out = args.output == OutputFormat::Json;
    let store = Store::open(&opts).await?;
    match &args.command {
        StateCommand::List { prefix } => list(&store, prefix.as_deref(), json_out).await?,
        StateCommand::Show { key } => show(&store, key, json_out).await?,
        StateCommand::Get { key } => get(&store, key, json_out).await?,
        StateCommand::Set { key, value, json } => set(&store, key, value, *json, json_out).await?,
        StateCommand::Delete { key, yes } => delete(&store, key, *yes, json_out).await?,
        StateCommand::Clear { yes } => clear(&store, *yes, json_out).await?,
        StateCommand::Stats => stats(&store, json_out).await?,
        StateCommand::Incr { key, delta } => incr(&store, key, *delta, json_out).await?,
        StateCommand::Lock {
            name,
            holder,
            timeout,
            wait,
        } => lock(&store, name, holder, *timeout, *wait, json_out).await?,
        StateCommand::Unlock {
            name,
            holder,
            force,
            yes,
        } => {
            if *force {
                force_unlock(&store, name, *yes, json_out).await?
            } else {
                unlock(
                    &store,
                    name,
                    holder.as_deref().unwrap_or_default(),
                    json_out,
                )
                .await?
            }
        }
        StateCommand::Locked { name } => locked(&store, name, json_out).await?,
    }
    Ok(exit::OK)
}

/// The result of one command; `run_inner` turns success into exit 0.
type Done = Result<(), CliError>;

async fn list(store: &Store, prefix: Option<&str>, json_out: bool) -> Done {
    let entries = store.list(prefix.unwrap_or("")).await?;
    if json_out {
        let v: Vec<_> = entries
            .into_iter()
            .map(|e| {
                json!({"key": e.key, "type": kind(&e.value), "value": e.value.into_json(), "updatedAt": fmt_ms(e.updated_at_ms)})
            })
            .collect();
        outln!("{}", serde_json::Value::Array(v));
    } else if entries.is_empty() {
        errln!(
            "(no keys{})",
            prefix
                .map(|p| format!(" starting with {p:?}"))
                .unwrap_or_default()
        );
    } else {
        let mut rows = vec![vec![
            "KEY".into(),
            "TYPE".into(),
            "UPDATED".into(),
            "VALUE".into(),
        ]];
        for e in &entries {
            rows.push(vec![
                one_line(&e.key, 60),
                kind(&e.value).into(),
                fmt_ms(e.updated_at_ms),
                one_line(&e.value.display_text(), 60),
            ]);
        }
        table(&rows);
    }
    Ok(())
}

/// The entry at `key`, or ENKNOTFOUND (exit 1) for `show` and `get`.
async fn entry(store: &Store, key: &str) -> Result<Entry, CliError> {
    store.get_entry(key).await?.ok_or_else(|| {
        CliError::new(
            "ENKNOTFOUND",
            format!("key {key:?} not found in agent {:?}", store.agent()),
        )
    })
}

async fn show(store: &Store, key: &str, json_out: bool) -> Done {
    let e = entry(store, key).await?;
    let bytes = e.value.display_text().len();
    if json_out {
        outln!(
            "{}",
            json!({"key": e.key, "type": kind(&e.value), "bytes": bytes, "updatedAt": fmt_ms(e.updated_at_ms), "value": e.value.into_json()})
        );
    } else {
        let pretty = match &e.value {
            Value::Text(s) => s.clone(),
            Value::Json(v) => serde_json::to_string_pretty(v).unwrap_or_default(),
        };
        outln!("key:      {}", e.key);
        outln!("type:     {}", kind(&e.value));
        outln!("bytes:    {bytes}");
        outln!("updated:  {}", fmt_ms(e.updated_at_ms));
        outln!("value:\n{pretty}");
    }
    Ok(())
}

async fn get(store: &Store, key: &str, json_out: bool) -> Done {
    let e = entry(store, key).await?;
    if json_out {
        outln!("{}", e.value.into_json());
    } else {
        outln!("{}", e.value.display_text());
    }
    Ok(())
}

async fn set(store: &Store, key: &str, value: &str, json: bool, json_out: bool) -> Done {
    let v = if json {
        Value::from_json(serde_json::from_str(value).map_err(|e| {
            CliError::from(KvError::Invalid(format!(
                "--json: the value is not valid JSON ({e})"
            )))
        })?)
    } else {
        Value::Text(value.to_string())
    };
    store.set(key, &v).await?;
    if json_out {
        outln!("{}", json!({"key": key, "set": true}));
    }
    Ok(())
}

async fn delete(store: &Store, key: &str, yes: bool, json_out: bool) -> Done {
    if !yes {
        confirm(&format!(
            "delete key {key:?} from agent {:?}?",
            store.agent()
        ))
        .await?;
    }
    let existed = store.delete(key).await?;
    if json_out {
        outln!("{}", json!({"key": key, "deleted": existed}));
    } else if !existed {
        errln!("key {key:?} did not exist");
    }
    Ok(())
}

async fn clear(store: &Store, yes: bool, json_out: bool) -> Done {
    if !yes {
        confirm(&format!(
            "delete every key of agent {:?} ({})?",
            store.agent(),
            store.backend()
        ))
        .await?;
    }
    let n = store.clear().await?;
    if json_out {
        outln!("{}", json!({"deleted": n}));
    } else {
        outln!("deleted {n} key(s)");
    }
    Ok(())
}

async fn stats(store: &Store, json_out: bool) -> Done {
    let s = store.stats().await?;
    if json_out {
        outln!("{}", serde_json::to_value(&s).unwrap_or_default());
    } else {
        let mut rows = vec![
            vec!["backend".to_string(), s.backend.clone()],
            vec!["agent".into(), s.agent.clone()],
            vec!["location".into(), s.location.clone()],
            vec!["keys".into(), s.keys.to_string()],
            vec!["value bytes".into(), s.value_bytes.to_string()],
            vec!["locks held".into(), s.locks.to_string()],
        ];
        if let Some(f) = s.file_bytes {
            rows.push(vec!["file bytes".into(), f.to_string()]);
        }
        table(&rows);
    }
    Ok(())
}

async fn incr(store: &Store, key: &str, delta: i64, json_out: bool) -> Done {
    let n = store.increment(key, delta).await?;
    if json_out {
        outln!("{}", json!({"key": key, "value": n}));
    } else {
        outln!("{n}");
    }
    Ok(())
}

async fn lock(
    store: &Store,
    name: &str,
    holder: &str,
    timeout: f64,
    wait: f64,
    json_out: bool,
) -> Done {
    let wait = kv::wait_duration(wait * 1000.0)?;
    let a = store.lock(name, holder, timeout, wait).await?;
    if json_out {
        outln!(
            "{}",
            json!({"name": a.name, "holder": a.holder, "expiresAt": fmt_ms(a.expires_at_ms)})
        );
    } else {
        outln!(
            "locked {:?} for {:?} until {}",
            a.name,
            a.holder,
            fmt_ms(a.expires_at_ms)
        );
    }
    Ok(())
}

/// `unlock --force`: removes the lock whoever holds it (asks unless `--yes`).
async fn force_unlock(store: &Store, name: &str, yes: bool, json_out: bool) -> Done {
    let info = store.is_locked(name).await?;
    let who = info.holder.as_deref().unwrap_or("nobody");
    if !yes {
        confirm(&format!(
            "remove lock {name:?} (held by {who:?}) of agent {:?}?",
            store.agent()
        ))
        .await?;
    }
    let prev = store.force_unlock(name).await?;
    if json_out {
        outln!(
            "{}",
            json!({"name": name, "unlocked": true, "previousHolder": prev})
        );
    } else {
        match prev {
            Some(h) => outln!("removed lock {name:?} held by {h:?}"),
            None => outln!("lock {name:?} was not held"),
        }
    }
    Ok(())
}

async fn unlock(store: &Store, name: &str, holder: &str, json_out: bool) -> Done {
    store.unlock(name, holder).await?;
    if json_out {
        outln!("{}", json!({"name": name, "unlocked": true}));
    } else {
        outln!("unlocked {name:?}");
    }
    Ok(())
}

async fn locked(store: &Store, name: &str, json_out: bool) -> Done {
    let i = store.is_locked(name).await?;
    if json_out {
        outln!(
            "{}",
            json!({"name": name, "locked": i.locked, "holder": i.holder, "expiresAt": i.expires_at_ms.map(fmt_ms)})
        );
    } else if i.locked {
        outln!(
            "{name:?} is locked by {:?} until {}",
            i.holder.unwrap_or_default(),
            i.expires_at_ms.map(fmt_ms).unwrap_or_default()
        );
    } else {
        outln!("{name:?} is not locked");
    }
    Ok(())
}
