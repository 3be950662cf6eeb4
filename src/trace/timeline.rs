//! `nanokit timeline`: a run's trace as a self-contained HTML Gantt chart
//! (no scripts, no external resources) and a text summary of the slowest
//! steps.

use std::fmt::Write as _;

use super::file::{SpanRecord, TraceFile};

/// Spans that are waiting, not working (drawn hatched).
fn is_wait(s: &SpanRecord) -> bool {
    matches!(
        s.name.as_str(),
        "dependencies" | "lock.wait" | "deploy_lock" | "concurrency"
    )
}

/// The service a span belongs to (its own `nanokit.service`, or its
/// parent's).
pub fn service_of(t: &TraceFile, s: &SpanRecord) -> Option<String> {
    s.attr("nanokit.service").map(str::to_string).or_else(|| {
        let parent = s.parent_span_id.as_deref()?;
        let p = t.spans.iter().find(|x| x.span_id == parent)?;
        service_of(t, p)
    })
}

/// A step's name, with the replica it ran for when the service has
/// several (`create #2`).
fn step_name(s: &SpanRecord) -> String {
    let num = |k: &str| s.attributes.get(k).and_then(|v| v.as_u64());
    match (num("nanokit.replica"), num("nanokit.replicas")) {
        (Some(r), Some(n)) if r > 0 && n > 1 => format!("{} #{r}", s.name),
        _ => s.name.clone(),
    }
}

/// `api › health`, or the name alone outside services.
pub fn label(t: &TraceFile, s: &SpanRecord) -> String {
    if s.name == "service" {
        return format!("service {}", s.attr("nanokit.service").unwrap_or("?"));
    }
    match service_of(t, s) {
        Some(svc) => format!("{svc} › {}", step_name(s)),
        None => step_name(s),
    }
}

fn secs(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else {
        format!("{ms:.0}ms")
    }
}

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// The steps (every span but the run and the per-service spans), slowest first.
pub fn slowest(t: &TraceFile, n: usize) -> Vec<&SpanRecord> {
    let root = t.root().map(|r| r.span_id.clone());
    let mut steps: Vec<&SpanRecord> = t
        .spans
        .iter()
        .filter(|s| Some(&s.span_id) != root.as_ref() && s.name != "service")
        .collect();
    steps.sort_by(|a, b| b.duration_ms().total_cmp(&a.duration_ms()));
    steps.truncate(n);
    steps
}

/// The critical path: the spans the run's end waited on, in start order.
/// As Jaeger draws it: from the root, the child that ended last, then, in
/// the time before that child began, the child that ended last before it,
/// and so on down every level; a dependency wait (`dependencies`, with
/// `nanokit.waits_for`) continues in the service it waited for that ended
/// last.
pub fn critical_path(t: &TraceFile) -> Vec<&SpanRecord> {
    let mut out = Vec::new();
    if let Some(root) = t.root() {
        let mut seen = std::collections::HashSet::new();
        critical_walk(t, root, root.end_unix_nano, &mut out, &mut seen);
    }
    out.sort_by_key(|s| (s.start_unix_nano, std::cmp::Reverse(s.end_unix_nano)));
    out
}

fn critical_walk<'a>(
    t: &'a TraceFile,
    s: &'a SpanRecord,
    until: u64,
    out: &mut Vec<&'a SpanRecord>,
    seen: &mut std::collections::HashSet<&'a str>,
) {
    if !seen.insert(s.span_id.as_str()) {
        return;
    }
    out.push(s);
    let mut kids: Vec<&SpanRecord> = t.children(&s.span_id).collect();
    kids.sort_by_key(|k| std::cmp::Reverse(k.end_unix_nano));
    let mut cursor = until.min(s.end_unix_nano);
    for k in kids {
        if cursor <= s.start_unix_nano {
            break;
        }
        if k.start_unix_nano >= cursor {
            continue;
        }
        critical_walk(t, k, cursor, out, seen);
        cursor = k.start_unix_nano;
    }
    if !is_wait(s) {
        return;
    }
    let Some(waited) = s.attr("nanokit.waits_for") else {
        return;
    };
    let names: Vec<&str> = waited.split(',').map(str::trim).collect();
    let gate = t
        .spans
        .iter()
        .filter(|x| {
            x.name == "service"
                && x.end_unix_nano <= s.end_unix_nano
                && x.attr("nanokit.service")
                    .is_some_and(|n| names.contains(&n))
        })
        .max_by_key(|x| x.end_unix_nano);
    if let Some(gate) = gate {
        critical_walk(t, gate, s.end_unix_nano, out, seen);
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// The terminal summary: outcome, slowest steps, failures.
pub fn summary(t: &TraceFile, top: usize) -> String {
    let total = (t.end_unix_nano.saturating_sub(t.start_unix_nano)) as f64 / 1e6;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "nanokit {} of {} ({}), {}: {} in {}, {} spans, trace {}",
        t.command,
        t.project.as_deref().unwrap_or("?"),
        t.env,
        t.started_at,
        if t.outcome == "ok" { "ok" } else { "FAILED" },
        secs(total),
        t.spans.len(),
        t.trace_id
    );
    let slow = slowest(t, top);
    if !slow.is_empty() {
        let _ = writeln!(o, "Slowest steps:");
        let width = slow
            .iter()
            .map(|s| label(t, s).chars().count())
            .max()
            .unwrap_or(0);
        for s in slow {
            let mut line = format!("  {:>8}  {:<width$}", secs(s.duration_ms()), label(t, s));
            if is_wait(s) {
                if let Some(w) = s.attr("nanokit.waits_for") {
                    let _ = write!(line, "  (waiting for {w})");
                } else {
                    line.push_str("  (waiting)");
                }
            }
            if s.failed() {
                line.push_str("  FAILED");
            }
            let _ = writeln!(o, "{}", line.trim_end());
        }
    }
    let failed = failed_steps(t);
    if !failed.is_empty() {
        let _ = writeln!(o, "Failures:");
        for s in failed {
            let msg = s
                .attr("error")
                .or(s.status_message.as_deref())
                .unwrap_or("");
            let _ = writeln!(o, "  {}: {}", label(t, s), first_line(msg));
        }
    }
    o
}

/// A tick spacing giving about 8 ticks over `total_ms`.
fn tick_ms(total_ms: f64) -> f64 {
    let raw = (total_ms / 8.0).max(1.0);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

const CSS: &str = r#"
:root{--bg:#fff;--fg:#1d2330;--muted:#6b7385;--grid:#eceef3;--step:#3b82f6;--svc:#1e3a8a;--root:#64748b;--wait:#f59e0b;--fail:#dc2626;--skip:#a3a3a3}
*{box-sizing:border-box}
body{margin:0;padding:24px 28px;font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
h1{font-size:18px;margin:0 0 4px}
.meta{color:var(--muted);margin-bottom:14px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px;color:#fff}
.badge.ok{background:#16a34a}.badge.failed{background:var(--fail)}
.legend{display:flex;gap:14px;margin:8px 0 14px;color:var(--muted)}
.legend i{display:inline-block;width:14px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.chart{border:1px solid var(--grid);border-radius:6px;overflow:hidden}
.row{display:grid;grid-template-columns:300px 1fr;min-height:22px;border-top:1px solid var(--grid)}
.row:first-child{border-top:0}
.row.service{background:#f7f8fb}
.label{padding:3px 8px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;border-right:1px solid var(--grid)}
.label .dur{color:var(--muted);margin-left:6px;font-size:11px}
.row.service .label{font-weight:600}
.track{position:relative}
.tick{position:absolute;top:0;bottom:0;border-left:1px dashed var(--grid)}
.axis .track{height:22px}
.axis .tick span{position:absolute;top:3px;left:3px;color:var(--muted);font-size:11px}
.axis .tick.end span{left:auto;right:3px}
.bar{position:absolute;top:4px;height:14px;min-width:2px;border-radius:3px;background:var(--step)}
.bar.root{background:var(--root)}
.bar.service{background:var(--svc)}
.bar.wait{background:repeating-linear-gradient(45deg,var(--wait),var(--wait) 4px,#fcd34d 4px,#fcd34d 8px)}
.bar.skipped{background:var(--skip)}
.bar.failed{background:var(--fail);outline:2px solid #7f1d1d}
.bar.critical{box-shadow:0 0 0 2px #111827}
.bar .mark{position:absolute;left:100%;margin-left:4px;top:-2px;color:var(--fail);font-weight:700;white-space:nowrap}
h2{font-size:15px;margin:22px 0 8px}
table{border-collapse:collapse}
td,th{padding:3px 10px;text-align:left;border-bottom:1px solid var(--grid)}
td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#fef2f2;border:1px solid #fecaca;padding:8px 10px;border-radius:4px;white-space:pre-wrap;margin:4px 0 12px}
"#;

/// Where a moment of the run falls on the chart, in percent of its width.
struct Scale {
    t0: u64,
    total_ms: f64,
}

impl Scale {
    fn pct(&self, ns: u64) -> f64 {
        ns.saturating_sub(self.t0) as f64 / 1e6 / self.total_ms * 100.0
    }
}

/// The steps that failed (not the run and not the per-service spans).
fn failed_steps(t: &TraceFile) -> Vec<&SpanRecord> {
    let root_id = t.root().map(|r| r.span_id.as_str());
    t.spans
        .iter()
        .filter(|s| s.failed() && s.name != "service" && Some(s.span_id.as_str()) != root_id)
        .collect()
}

/// Renders the trace as one self-contained HTML page: header, the chart
/// (axis, then one row per span in tree order), slowest steps, failures.
pub fn html(t: &TraceFile) -> String {
    let t0 = t.start_unix_nano;
    let scale = Scale {
        t0,
        total_ms: (t.end_unix_nano.saturating_sub(t0) as f64 / 1e6).max(1.0),
    };
    let mut o = String::new();
    html_header(&mut o, t, scale.total_ms);
    o.push_str("<div class=\"chart\" id=\"chart\">");
    html_axis(&mut o, scale.total_ms);
    let root_id = t.root().map(|r| r.span_id.as_str());
    let critical: std::collections::HashSet<&str> = critical_path(t)
        .iter()
        .map(|s| s.span_id.as_str())
        .collect();
    for (depth, s) in t.tree() {
        let is_root = Some(s.span_id.as_str()) == root_id;
        let on_path = critical.contains(s.span_id.as_str());
        html_span_row(&mut o, t, s, depth, is_root, on_path, &scale);
    }
    o.push_str("</div>");
    html_slowest(&mut o, t);
    html_failures(&mut o, t);
    o.push_str("</body></html>\n");
    o
}

/// `<head>` with the styles, the title line with the outcome badge, the run's
/// facts and the legend.
fn html_header(o: &mut String, t: &TraceFile, total_ms: f64) {
    let title = format!(
        "nanokit {} · {} ({})",
        t.command,
        t.project.as_deref().unwrap_or("?"),
        t.env
    );
    let _ = write!(
        o,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{CSS}</style></head><body>",
        esc(&title)
    );
    let _ = write!(
        o,
        "<h1>{} <span class=\"badge {}\" id=\"outcome\">{}</span></h1><div class=\"meta\">started {} · {} · {} spans · trace <code>{}</code> · run <code>{}</code></div>",
        esc(&title),
        if t.outcome == "ok" { "ok" } else { "failed" },
        if t.outcome == "ok" { "ok" } else { "failed" },
        esc(&t.started_at),
        secs(total_ms),
        t.spans.len(),
        esc(&t.trace_id),
        esc(&t.run)
    );
    o.push_str("<div class=\"legend\"><span><i style=\"background:var(--svc)\"></i>service</span><span><i style=\"background:var(--step)\"></i>step</span><span><i style=\"background:var(--wait)\"></i>waiting (dependencies, locks)</span><span><i style=\"background:var(--fail)\"></i>failed</span><span><i style=\"background:var(--skip)\"></i>skipped</span><span><i style=\"box-shadow:0 0 0 2px #111827\"></i>critical path</span></div>");
}

/// The chart's first row: round time ticks over the whole run.
fn html_axis(o: &mut String, total_ms: f64) {
    let step = tick_ms(total_ms);
    let mut ticks = String::new();
    let mut x = 0.0;
    while x <= total_ms + 0.001 {
        let at = x / total_ms * 100.0;
        let _ = write!(
            ticks,
            "<div class=\"tick{}\" style=\"left:{at:.3}%\"><span>{}</span></div>",
            // Labels near the right edge go left of their tick.
            if at > 92.0 { " end" } else { "" },
            secs(x)
        );
        x += step;
    }
    let _ = write!(
        o,
        "<div class=\"row axis\"><div class=\"label\">span</div><div class=\"track\">{ticks}</div></div>"
    );
}

/// One chart row: the span's name indented by its depth, and its bar, classed
/// by kind (root, service, wait, step) and outcome, with the details as tooltip.
fn html_span_row(
    o: &mut String,
    t: &TraceFile,
    s: &SpanRecord,
    depth: usize,
    is_root: bool,
    on_path: bool,
    scale: &Scale,
) {
    let mut classes = vec!["bar"];
    if is_root {
        classes.push("root");
    } else if s.name == "service" {
        classes.push("service");
    } else if is_wait(s) {
        classes.push("wait");
    } else {
        classes.push("step");
    }
    if on_path {
        classes.push("critical");
    }
    let skipped = s.attr("nanokit.outcome") == Some("skipped");
    if skipped {
        classes.push("skipped");
    }
    if s.failed() {
        classes.push("failed");
    }
    let row_class = if s.name == "service" {
        "row service"
    } else {
        "row"
    };
    let left = scale.pct(s.start_unix_nano);
    let width = (scale.pct(s.end_unix_nano) - left).max(0.0);
    let mut tip = format!("{} — {}", label(t, s), secs(s.duration_ms()));
    if let Some(w) = s.attr("nanokit.waits_for") {
        let _ = write!(tip, " (waiting for {w})");
    }
    if let Some(e) = s.attr("error").or(s.status_message.as_deref()) {
        let _ = write!(tip, "\n{e}");
    }
    let name = if is_root {
        format!("nanokit {}", t.command)
    } else if s.name == "service" {
        s.attr("nanokit.service").unwrap_or("?").to_string()
    } else {
        step_name(s)
    };
    let mark = if s.failed() {
        "<span class=\"mark\">✖ failed</span>".to_string()
    } else if skipped {
        "<span class=\"mark\" style=\"color:var(--muted)\">skipped</span>".to_string()
    } else {
        String::new()
    };
    let _ = write!(
        o,
        "<div class=\"{row_class}\"><div class=\"label\" style=\"padding-left:{}px\">{}<span class=\"dur\">{}</span></div><div class=\"track\"><div class=\"{}\" data-span-id=\"{}\" data-name=\"{}\" data-service=\"{}\" data-status=\"{}\" style=\"left:{left:.3}%;width:{width:.3}%\" title=\"{}\">{mark}</div></div></div>",
        8 + depth * 16,
        esc(&name),
        secs(s.duration_ms()),
        classes.join(" "),
        esc(&s.span_id),
        esc(&s.name),
        esc(&service_of(t, s).unwrap_or_default()),
        esc(&s.status),
        esc(&tip),
    );
}

/// The table of the ten slowest steps.
fn html_slowest(o: &mut String, t: &TraceFile) {
    o.push_str("<h2>Slowest steps</h2><table id=\"slowest\"><tr><th>duration</th><th>step</th><th></th></tr>");
    for s in slowest(t, 10) {
        let _ = write!(
            o,
            "<tr><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            secs(s.duration_ms()),
            esc(&label(t, s)),
            if s.failed() {
                "failed"
            } else if is_wait(s) {
                "waiting"
            } else {
                ""
            }
        );
    }
    o.push_str("</table>");
}

/// Each failed step with its whole error message; nothing when none failed.
fn html_failures(o: &mut String, t: &TraceFile) {
    let failed = failed_steps(t);
    if failed.is_empty() {
        return;
    }
    o.push_str("<h2>Failures</h2><div id=\"failures\">");
    for s in failed {
        let _ = write!(
            o,
            "<div><b>{}</b><pre>{}</pre></div>",
            esc(&label(t, s)),
            esc(s
                .attr("error")
                .or(s.status_message.as_deref())
                .unwrap_or(""))
        );
    }
    o.push_str("</div>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn span(
        id: &str,
        parent: Option<&str>,
        name: &str,
        s: u64,
        e: u64,
        svc: Option<&str>,
        err: bool,
    ) -> SpanRecord {
        let mut attributes = BTreeMap::new();
        if let Some(svc) = svc {
            attributes.insert("nanokit.service".into(), svc.into());
        }
        if err {
            attributes.insert("error".into(), "hook poststart `exit 3` failed <b>".into());
        }
        SpanRecord {
            span_id: id.into(),
            parent_span_id: parent.map(Into::into),
            name: name.into(),
            start_unix_nano: s * 1_000_000,
            end_unix_nano: e * 1_000_000,
            status: if err { "error" } else { "unset" }.into(),
            status_message: None,
            attributes,
            events: vec![],
        }
    }

    fn sample() -> TraceFile {
        TraceFile {
            version: 1,
            run: "r".into(),
            command: "up".into(),
            project: Some("p".into()),
            env: "local".into(),
            file: "nanokit.yml".into(),
            trace_id: "t".into(),
            started_at: "now".into(),
            start_unix_nano: 0,
            end_unix_nano: 3_000_000_000,
            outcome: "failed".into(),
            error: Some("x".into()),
            spans: vec![
                span("1", None, "run", 0, 3000, None, true),
                span("2", Some("1"), "service", 10, 2000, Some("api"), false),
                span("3", Some("2"), "health", 100, 1900, Some("api"), false),
                span("4", Some("1"), "service", 20, 2900, Some("worker"), true),
                span(
                    "5",
                    Some("4"),
                    "dependencies",
                    20,
                    2000,
                    Some("worker"),
                    false,
                ),
                span(
                    "6",
                    Some("4"),
                    "poststart",
                    2100,
                    2900,
                    Some("worker"),
                    true,
                ),
            ],
        }
    }

    #[test]
    fn html_has_one_bar_per_span_and_marks_failures_escaped() {
        let t = sample();
        let h = html(&t);
        assert_eq!(h.matches("class=\"bar ").count(), t.spans.len());
        assert_eq!(h.matches(" failed\" data-span-id").count(), 3);
        assert!(h.contains("&lt;b&gt;"), "error text is escaped");
        assert!(!h.contains("<script"), "no scripts");
    }

    #[test]
    fn summary_lists_slowest_steps_first() {
        let s = summary(&sample(), 2);
        let lines: Vec<&str> = s.lines().collect();
        assert!(lines[2].contains("worker › dependencies"), "{s}");
        assert!(lines[3].contains("api › health"), "{s}");
        assert!(s.contains("worker › poststart: hook poststart"), "{s}");
    }

    #[test]
    fn the_critical_path_follows_the_last_child_and_the_awaited_service() {
        let t = sample();
        let ids: Vec<&str> = critical_path(&t)
            .iter()
            .map(|s| s.span_id.as_str())
            .collect();
        // run → worker (ends last) → its poststart, then its wait; before
        // worker began, api had begun (but not its health check).
        assert_eq!(ids, ["1", "2", "4", "5", "6"], "{ids:?}");
        let mut t = sample();
        t.spans[4]
            .attributes
            .insert("nanokit.waits_for".into(), "api".into());
        let ids: Vec<&str> = critical_path(&t)
            .iter()
            .map(|s| s.span_id.as_str())
            .collect();
        // The wait names api: the path continues in api and its health
        // (in start order).
        assert_eq!(ids, ["1", "2", "4", "5", "3", "6"], "{ids:?}");
        // A wait on nothing recorded does not add the other service.
        let mut t = sample();
        t.spans
            .push(span("7", Some("2"), "hook", 1950, 1990, Some("api"), false));
        t.spans[4]
            .attributes
            .insert("nanokit.waits_for".into(), "db".into());
        let ids: Vec<&str> = critical_path(&t)
            .iter()
            .map(|s| s.span_id.as_str())
            .collect();
        assert!(!ids.contains(&"7") && !ids.contains(&"3"), "{ids:?}");
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_ms(3000.0), 500.0);
        assert_eq!(tick_ms(80.0), 10.0);
    }

    #[test]
    fn replicas_are_numbered_only_when_there_are_several() {
        let mut one = span("a", None, "create", 0, 1, Some("api"), false);
        one.attributes.insert("nanokit.replica".into(), 1.into());
        one.attributes.insert("nanokit.replicas".into(), 1.into());
        assert_eq!(step_name(&one), "create");
        let mut two = one.clone();
        two.attributes.insert("nanokit.replica".into(), 2.into());
        two.attributes.insert("nanokit.replicas".into(), 2.into());
        assert_eq!(step_name(&two), "create #2");
        let mut kept = two.clone();
        kept.attributes.insert("nanokit.replica".into(), 0.into());
        assert_eq!(step_name(&kept), "create");
    }
}
