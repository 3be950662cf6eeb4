//! The local trace file of one run: `.nanokit/traces/<run>.json`.
//!
//! The same spans the OTLP exporter sends, in a small JSON shape that
//! `nanokit timeline` renders. It holds only what nanokit put on its spans
//! (names, times, ids, nanokit.* attributes, errors), with every secret
//! masked (see [`super::mask`]); never env values or the state. Written
//! 0600 in a 0700 folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanId, Status};
use opentelemetry_sdk::trace::SpanData;
use serde::{Deserialize, Serialize};

use super::RunMeta;

/// Format version of the trace file.
pub const VERSION: u32 = 1;

/// One recorded run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceFile {
    pub version: u32,
    pub run: String,
    /// `up` or `down`.
    pub command: String,
    pub project: Option<String>,
    pub env: String,
    /// The nanokit.yml of the run.
    pub file: String,
    pub trace_id: String,
    /// RFC 3339, for display.
    pub started_at: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// `ok` or `failed`.
    pub outcome: String,
    pub error: Option<String>,
    /// Parents before children, siblings by start time.
    pub spans: Vec<SpanRecord>,
}

/// One span.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpanRecord {
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// `unset`, `ok` or `error`.
    pub status: String,
    pub status_message: Option<String>,
    pub attributes: BTreeMap<String, serde_json::Value>,
    pub events: Vec<EventRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    pub name: String,
    pub time_unix_nano: u64,
    pub attributes: BTreeMap<String, serde_json::Value>,
}

impl SpanRecord {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).and_then(|v| v.as_str())
    }

    pub fn duration_ms(&self) -> f64 {
        self.end_unix_nano.saturating_sub(self.start_unix_nano) as f64 / 1e6
    }

    pub fn failed(&self) -> bool {
        self.status == "error"
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `20250102T030405.678Z` (UTC), for run names that sort by time (also two
/// runs within one second).
pub fn compact_utc(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_millis(t).to_string(); // 2025-01-02T03:04:05.678Z
    s.chars().filter(|c| *c != '-' && *c != ':').collect()
}

fn value(v: &opentelemetry::Value) -> serde_json::Value {
    use opentelemetry::Value as V;
    match v {
        V::Bool(b) => (*b).into(),
        V::I64(i) => (*i).into(),
        V::F64(f) => serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into),
        V::String(s) => s.as_str().into(),
        other => other.to_string().into(),
    }
}

fn attrs<'a>(
    kvs: impl Iterator<Item = &'a opentelemetry::KeyValue>,
) -> BTreeMap<String, serde_json::Value> {
    kvs.map(|kv| (kv.key.as_str().to_string(), value(&kv.value)))
        .collect()
}

impl TraceFile {
    /// Builds the file from the run's ended spans.
    pub fn from_spans(
        run: &str,
        meta: &RunMeta,
        trace_id: &str,
        failure: Option<&str>,
        spans: Vec<SpanData>,
    ) -> TraceFile {
        let mut records: Vec<SpanRecord> = spans
            .into_iter()
            .map(|s| {
                let (status, status_message) = match &s.status {
                    Status::Unset => ("unset", None),
                    Status::Ok => ("ok", None),
                    Status::Error { description } => ("error", Some(description.to_string())),
                };
                SpanRecord {
                    span_id: s.span_context.span_id().to_string(),
                    parent_span_id: (s.parent_span_id != SpanId::INVALID)
                        .then(|| s.parent_span_id.to_string()),
                    name: s.name.to_string(),
                    start_unix_nano: nanos(s.start_time),
                    end_unix_nano: nanos(s.end_time),
                    status: status.into(),
                    status_message,
                    attributes: attrs(s.attributes.iter()),
                    events: s
                        .events
                        .iter()
                        .map(|e| EventRecord {
                            name: e.name.to_string(),
                            time_unix_nano: nanos(e.timestamp),
                            attributes: attrs(e.attributes.iter()),
                        })
                        .collect(),
                }
            })
            .collect();
        order(&mut records);
        let ids: std::collections::HashSet<String> =
            records.iter().map(|r| r.span_id.clone()).collect();
        // The root: the span whose parent is not in this run.
        let root = records
            .iter()
            .find(|r| r.parent_span_id.as_ref().is_none_or(|p| !ids.contains(p)));
        let start = records.iter().map(|r| r.start_unix_nano).min().unwrap_or(0);
        let end = records
            .iter()
            .map(|r| r.end_unix_nano)
            .max()
            .unwrap_or(start);
        TraceFile {
            version: VERSION,
            run: run.to_string(),
            command: meta.command.to_string(),
            project: records
                .iter()
                .find_map(|r| r.attr("nanokit.project").map(str::to_string)),
            env: meta.env.clone(),
            file: meta.file.to_string_lossy().into_owned(),
            trace_id: trace_id.to_string(),
            started_at: humantime::format_rfc3339_millis(
                UNIX_EPOCH
                    + std::time::Duration::from_nanos(root.map_or(start, |r| r.start_unix_nano)),
            )
            .to_string(),
            start_unix_nano: start,
            end_unix_nano: end,
            outcome: if failure.is_some() { "failed" } else { "ok" }.into(),
            error: failure.map(|f| {
                root.and_then(|r| r.attr("error").map(str::to_string))
                    .unwrap_or_else(|| f.to_string())
            }),
            spans: records,
        }
    }

    /// Writes `<dir>/<run>.json` atomically (0600: errors can quote hook
    /// output).
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join(format!("{}.json", self.run));
        let mut bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        crate::sys::private::write(&path, &bytes)?;
        Ok(path)
    }

    pub fn read(path: &Path) -> Result<TraceFile, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not a nanokit trace file: {e}", path.display()))
    }

    /// The span's children, in start order.
    pub fn children<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a SpanRecord> + 'a {
        self.spans
            .iter()
            .filter(move |s| s.parent_span_id.as_deref() == Some(id))
    }

    /// The root span of the run.
    pub fn root(&self) -> Option<&SpanRecord> {
        let ids: std::collections::HashSet<&str> =
            self.spans.iter().map(|s| s.span_id.as_str()).collect();
        self.spans
            .iter()
            .find(|s| s.parent_span_id.as_deref().is_none_or(|p| !ids.contains(p)))
    }

    /// Every span with its depth below the root, depth-first in start order.
    pub fn tree(&self) -> Vec<(usize, &SpanRecord)> {
        let mut out = Vec::new();
        fn walk<'a>(
            t: &'a TraceFile,
            s: &'a SpanRecord,
            d: usize,
            out: &mut Vec<(usize, &'a SpanRecord)>,
        ) {
            out.push((d, s));
            for c in t.children(&s.span_id) {
                walk(t, c, d + 1, out);
            }
        }
        if let Some(root) = self.root() {
            walk(self, root, 0, &mut out);
        }
        out
    }
}

/// Sorts spans by start time (parents start before their children).
fn order(records: &mut [SpanRecord]) {
    records.sort_by(|a, b| {
        a.start_unix_nano
            .cmp(&b.start_unix_nano)
            .then(b.end_unix_nano.cmp(&a.end_unix_nano))
    });
}

/// The trace files in `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Deletes the oldest trace files of `command` in `dir` beyond the newest
/// `keep` (run names sort by time). Returns how many it deleted.
pub fn prune(dir: &Path, command: &str, keep: usize) -> usize {
    let infix = format!("-{command}-");
    let mine: Vec<PathBuf> = list(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(&infix))
        })
        .collect();
    let excess = mine.len().saturating_sub(keep);
    mine.iter()
        .take(excess)
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count()
}

/// Finds a run's trace: a path, a run name, a prefix of one, or a trace id
/// prefix; none: the latest run.
pub fn find(dir: &Path, run: Option<&str>) -> Result<PathBuf, String> {
    let files = list(dir);
    let Some(run) = run else {
        return files.last().cloned().ok_or_else(|| {
            format!(
                "no traces in {} yet: every `nanokit up` / `down` writes one",
                dir.display()
            )
        });
    };
    let as_path = Path::new(run);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    let name = run.trim_end_matches(".json");
    let matches: Vec<&PathBuf> = files
        .iter()
        .filter(|p| {
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            stem.starts_with(name)
                || stem
                    .rsplit('-')
                    .next()
                    .is_some_and(|id| name.len() >= 4 && name.starts_with(id))
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(format!(
            "no trace `{run}` in {} (see `nanokit timeline --list`)",
            dir.display()
        )),
        many => Err(format!(
            "`{run}` matches {} traces in {}; give more of the name",
            many.len(),
            dir.display()
        )),
    }
}
