//! Tracing of reconciliations: OpenTelemetry spans, OTLP export, and a
//! local trace file per `up` / `down`.
//!
//! The engine is instrumented with plain `tracing` spans (see
//! the engine, `crate::repo`, `crate::lock`). What records them:
//!
//! - **A run** (`up` / `down`, CLI or JS API) goes through [`record_run`]: it
//!   builds a tracer provider for that run alone with two processors, a
//!   collector that keeps every span of the run for the local trace file
//!   (`.nanokit/traces/<run>.json`, written whether the run succeeds or
//!   fails), and, when `OTEL_EXPORTER_OTLP_ENDPOINT` /
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, a batch OTLP/HTTP
//!   (protobuf) exporter, `http://` or `https://` (rustls; the TLS and
//!   header variables: `trace/otlp.rs`). The run's future runs under a scoped
//!   `tracing` dispatcher, so concurrent runs in one process never mix their
//!   spans.
//! - **Outside runs** (JS `install`, `createLockedHandlers`, `provision`,
//!   lock waits; other CLI commands) spans are exported only when the OTLP
//!   variables are set ([`init_global`]). When they are not, no subscriber
//!   listens to them: each span costs one atomic load of `tracing`'s cached
//!   max level.
//!
//! `NANOKIT_TRACE=off` turns all of it off (no trace file, no export, no
//! `TRACEPARENT` in hooks). Export failures are logged (one warning saying
//! why, not one per batch), never returned.

pub(crate) mod file;
pub(crate) mod mask;
mod otlp;
pub mod timeline;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{Status, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanProcessor};
use tracing::instrument::WithSubscriber;
use tracing::{Dispatch, Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

pub use file::{SpanRecord, TraceFile};
pub use mask::Masker;

/// The name of the instrumentation scope of every nanokit span.
pub const SCOPE: &str = "nanokit";

/// Whether tracing is switched off with `NANOKIT_TRACE=off` (also `0`,
/// `false`, `none`). Read once per process.
pub fn disabled() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| {
        std::env::var("NANOKIT_TRACE").is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "off" | "0" | "false" | "none" | "no"
            )
        })
    })
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether the standard OpenTelemetry variables ask for a trace exporter
/// (and `OTEL_SDK_DISABLED` does not forbid it).
pub fn otlp_configured() -> bool {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return false;
    }
    env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
}

/// Where a run's spans go besides the local trace file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Export {
    /// OTLP/HTTP when the standard variables are set, else nowhere.
    #[default]
    FromEnv,
    /// OTLP/HTTP (protobuf) to this traces URL, e.g.
    /// `http://127.0.0.1:4318/v1/traces` (other `OTEL_EXPORTER_OTLP_*`
    /// settings still apply).
    To(String),
    /// Nowhere.
    Off,
}

/// How [`record_run`] records.
#[derive(Debug, Clone)]
pub struct Settings {
    pub export: Export,
    /// Write `.nanokit/traces/<run>.json`.
    pub local_file: bool,
    /// Also print `tracing` log events to stderr, filtered by `NANOKIT_LOG`
    /// (default `warn`): the CLI's logging while the run's dispatcher is active.
    pub log_to_stderr: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            export: Export::FromEnv,
            local_file: true,
            log_to_stderr: false,
        }
    }
}

/// The OTLP exporter `endpoint` (else the variables) asks for, and where its
/// transport failures are recorded; None (after one warning) when it
/// cannot be set up, e.g. a TLS file that cannot be read.
fn otlp_exporter(endpoint: Option<&str>) -> Option<(opentelemetry_otlp::SpanExporter, Exporting)> {
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    let target = endpoint.map(str::to_string).or_else(|| {
        [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|v| !v.trim().is_empty()))
    })?;
    // A collector that is down must not hold up a deploy for long.
    let timeout = otlp::timeout(Duration::from_secs(5));
    let (client, diag) = match otlp::client(&target, timeout) {
        Ok(c) => c,
        Err(e) => {
            warn_once(&format!(
                "nanokit: OpenTelemetry export is off: {e}; the deploy goes on without it"
            ));
            return None;
        }
    };
    let mut b = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(client)
        .with_timeout(timeout);
    if let Some(e) = endpoint {
        b = b.with_endpoint(e);
    }
    match b.build() {
        Ok(e) => Some((
            e,
            Exporting {
                endpoint: otlp::shown(&target),
                diag,
            },
        )),
        Err(e) => {
            warn_once(&format!(
                "nanokit: OpenTelemetry export is off: cannot set up the OTLP exporter: {e}"
            ));
            None
        }
    }
}

/// An exporter's target and its last transport failure, for the one
/// warning a failed export gets.
#[derive(Debug, Clone)]
struct Exporting {
    endpoint: String,
    diag: otlp::Diag,
}

impl Exporting {
    fn warn(&self, e: &opentelemetry_sdk::error::OTelSdkError) {
        let why = self
            .diag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| e.to_string());
        warn_once(&format!(
            "nanokit: OpenTelemetry export to {} failed: {why}; the spans were not sent (the deploy is not affected)",
            self.endpoint
        ));
    }
}

fn warn_once(msg: &str) {
    use std::io::Write;
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.iter().any(|m| m == msg) {
        seen.push(msg.to_string());
        let _ = writeln!(std::io::stderr(), "{msg}");
    }
}

fn resource() -> opentelemetry_sdk::Resource {
    let mut b = opentelemetry_sdk::Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        b = b.with_service_name("nanokit");
    }
    b.with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ))
    .build()
}

/// Values that must never leave the process in a span (see [`mask`]):
/// filled by [`add_run_secrets`] with the run's [`Masker`], applied by
/// [`Redacting`] to every span of the run before it is kept or exported.
type Secrets = Arc<std::sync::RwLock<Masker>>;

tokio::task_local! {
    static RUN_SECRETS: Secrets;
}

fn scrub(text: &str, secrets: &Masker) -> Option<String> {
    secrets.mask_opt(text)
}

fn scrub_kv(kv: &mut opentelemetry::KeyValue, secrets: &Masker) {
    match &kv.value {
        opentelemetry::Value::String(v) => {
            if let Some(clean) = scrub(v.as_str(), secrets) {
                kv.value = opentelemetry::Value::String(clean.into());
            }
        }
        opentelemetry::Value::Array(opentelemetry::Array::String(items)) => {
            let clean: Vec<opentelemetry::StringValue> = items
                .iter()
                .map(|v| secrets.mask(v.as_str()).into())
                .collect();
            kv.value = opentelemetry::Value::Array(opentelemetry::Array::String(clean));
        }
        _ => {}
    }
}

/// A span processor that redacts the run's secrets, then hands on.
#[derive(Debug)]
struct Redacting<P> {
    inner: P,
    secrets: Secrets,
}

impl<P: SpanProcessor> SpanProcessor for Redacting<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, mut span: SpanData) {
        let secrets = self
            .secrets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !secrets.is_empty() {
            if let Some(clean) = scrub(&span.name, &secrets) {
                span.name = clean.into();
            }
            for kv in &mut span.attributes {
                scrub_kv(kv, &secrets);
            }
            for e in &mut span.events.events {
                for kv in &mut e.attributes {
                    scrub_kv(kv, &secrets);
                }
                if let Some(clean) = scrub(&e.name, &secrets) {
                    e.name = clean.into();
                }
            }
            if let Status::Error { description } = &span.status {
                if let Some(clean) = scrub(description, &secrets) {
                    span.status = Status::error(clean);
                }
            }
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Keeps every ended span of one run (for the local trace file).
#[derive(Debug, Clone, Default)]
struct Collector(Arc<Mutex<Vec<SpanData>>>);

impl SpanProcessor for Collector {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(span);
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(SCOPE))
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_level(false)
        .with_tracked_inactivity(false)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
}

fn stderr_layer<S>() -> impl Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("NANOKIT_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt::layer()
        .with_writer(mask::MaskedStderr::default)
        .with_target(false)
        .with_filter(filter)
}

static GLOBAL: OnceLock<Option<(SdkTracerProvider, Exporting)>> = OnceLock::new();

/// Installs the process-wide subscriber: NANOKIT_LOG logging to stderr when
/// `log_to_stderr` (the CLI), and an OTLP exporter when the standard
/// variables ask for one. Without either, nothing is installed and spans
/// outside runs cost nothing. Idempotent (the first call decides).
pub fn init_global(log_to_stderr: bool) {
    GLOBAL.get_or_init(|| {
        let provider = (!disabled() && otlp_configured())
            .then(|| otlp_exporter(None))
            .flatten()
            .map(|(exporter, exporting)| {
                let p = SdkTracerProvider::builder()
                    .with_resource(resource())
                    .with_batch_exporter(exporter)
                    .build();
                (p, exporting)
            });
        let registry = tracing_subscriber::registry();
        let _ = match (provider.as_ref().map(|p| &p.0), log_to_stderr) {
            (Some(p), true) => tracing::subscriber::set_global_default(
                registry.with(otel_layer(p)).with(stderr_layer()),
            ),
            (Some(p), false) => {
                tracing::subscriber::set_global_default(registry.with(otel_layer(p)))
            }
            (None, true) => tracing::subscriber::set_global_default(registry.with(stderr_layer())),
            (None, false) => Ok(()),
        };
        provider
    });
}

/// Whether the process-wide OTLP exporter is on (see [`init_global`]).
pub fn exporting_global() -> bool {
    matches!(GLOBAL.get(), Some(Some(_)))
}

/// Exports the spans the process-wide exporter still holds (blocking, bounded
/// by the exporter's timeout). Errors are logged, never returned.
pub fn flush_global() {
    if let Some(Some((p, exporting))) = GLOBAL.get() {
        if let Err(e) = p.force_flush() {
            exporting.warn(&e);
        }
    }
}

/// The W3C `traceparent` of the current span, when a trace is being recorded.
pub fn traceparent() -> Option<String> {
    let cx = Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Adds `TRACEPARENT` (the current span) to a child's environment.
pub fn propagate(env: &mut BTreeMap<String, String>) {
    if let Some(tp) = traceparent() {
        env.insert("TRACEPARENT".into(), tp);
    }
}

/// Sets an attribute on `span` (nothing when the span is not recorded).
pub fn set(span: &Span, key: &'static str, value: impl Into<opentelemetry::Value>) {
    if !span.is_disabled() {
        span.set_attribute(key, value);
    }
}

/// Marks `span` failed with `message` (status ERROR, `error` attribute).
pub fn fail(span: &Span, message: &str) {
    if !span.is_disabled() {
        let first = message.lines().next().unwrap_or("").to_string();
        span.set_attribute("error", message.to_string());
        span.set_status(Status::error(first));
    }
}

/// An error a traced step can end with: a cancelled step is recorded as
/// `cancelled`, any other as `failed` with its message.
pub trait StepFailure: std::fmt::Display {
    fn is_cancelled(&self) -> bool;
}

/// Runs `fut` inside `span` and records its outcome on it.
pub async fn step<T, E: StepFailure>(
    span: Span,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    step_masked(span, &Masker::default(), fut).await
}

/// [`step`], with `mask`'s secrets masked in a recorded error (hook and
/// probe output may print them). The run's `Redacting` processor masks
/// every span again; this keeps them out of spans recorded outside a run.
pub async fn step_masked<T, E: StepFailure>(
    span: Span,
    mask: &Masker,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let r = fut.instrument(span.clone()).await;
    match &r {
        Ok(_) => set(&span, "nanokit.outcome", "ok"),
        Err(e) if e.is_cancelled() => set(&span, "nanokit.outcome", "cancelled"),
        Err(e) => {
            set(&span, "nanokit.outcome", "failed");
            if !span.is_disabled() {
                fail(&span, &mask.mask(&e.to_string()));
            }
        }
    }
    r
}

/// Adds `mask`'s secrets to those of the run this task belongs to (nothing
/// outside runs): every span of the run is masked with them.
pub fn add_run_secrets(mask: &Masker) {
    let _ = RUN_SECRETS.try_with(|s| {
        let mut s = s.write().unwrap_or_else(|e| e.into_inner());
        *s = s.merged(mask);
    });
}

/// The masker of the run this task belongs to (empty outside runs, or
/// before the run's configuration is loaded).
pub fn run_masker() -> Masker {
    RUN_SECRETS
        .try_with(|s| s.read().unwrap_or_else(|e| e.into_inner()).clone())
        .unwrap_or_default()
}

/// What a traced run was, for naming its trace.
#[derive(Debug, Clone)]
pub struct RunMeta {
    /// `up` or `down`.
    pub command: &'static str,
    /// The nanokit.yml (its directory holds `.nanokit/traces`).
    pub file: PathBuf,
    pub env: String,
}

/// The trace of a finished run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunTrace {
    /// `<UTC time>-<command>-<first 8 hex digits of the trace id>`.
    pub run: String,
    pub trace_id: String,
    /// The local trace file, when it was written.
    pub file: Option<PathBuf>,
}

/// How a run ended, for the root span.
pub trait RunOutcome {
    /// None when everything went well; else what failed.
    fn failure(&self) -> Option<String>;
}

/// The directory of a project's traces: `.nanokit/traces` beside the file.
pub fn traces_dir(file: &Path) -> PathBuf {
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty());
    dir.unwrap_or(Path::new("."))
        .join(".nanokit")
        .join("traces")
}

/// A tracer provider for one run: the collector of its local trace file,
/// and the OTLP exporter `export` asks for (returned when there is one),
/// both behind the run's secret masking.
fn run_provider(
    export: &Export,
    collector: &Collector,
    secrets: &Secrets,
) -> (SdkTracerProvider, Option<Exporting>) {
    let mut builder = SdkTracerProvider::builder()
        .with_resource(resource())
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
        .with_span_processor(Redacting {
            inner: collector.clone(),
            secrets: secrets.clone(),
        });
    let exporter = match export {
        Export::Off => None,
        Export::FromEnv => otlp_configured().then(|| otlp_exporter(None)).flatten(),
        Export::To(url) => otlp_exporter(Some(url)),
    };
    let exporting = exporter.as_ref().map(|(_, x)| x.clone());
    if let Some((e, _)) = exporter {
        builder = builder.with_span_processor(Redacting {
            inner: opentelemetry_sdk::trace::BatchSpanProcessor::builder(e).build(),
            secrets: secrets.clone(),
        });
    }
    (builder.build(), exporting)
}

/// The root span `nanokit <command>` of a run, a child of the caller's
/// trace when nanokit itself runs in one (a hook of another run, a CI job).
fn root_span(meta: &RunMeta) -> Span {
    let span = tracing::info_span!(
        "run",
        otel.name = format!("nanokit {}", meta.command),
        nanokit.command = meta.command,
        nanokit.env = %meta.env,
    );
    if let Some(parent) = std::env::var("TRACEPARENT")
        .ok()
        .and_then(|v| parse_traceparent(&v))
    {
        let _ = span.set_parent(parent);
    }
    span
}

/// Delivers the batch before returning (a CLI exits right after); bounded
/// by the exporter's timeout, and failures are only reported.
async fn flush(provider: SdkTracerProvider, exporting: Option<Exporting>) {
    let flush = tokio::task::spawn_blocking(move || {
        let r = match &exporting {
            Some(x) => provider.force_flush().map_err(|e| (x.clone(), e)),
            None => Ok(()),
        };
        let _ = provider.shutdown();
        r
    });
    if let Ok(Err((x, e))) = flush.await {
        x.warn(&e);
    }
}

/// Runs one `up` / `down` (`fut`: config load included) as a trace with a
/// root span `nanokit <command>`, writes the local trace file (also when the
/// run fails) and exports to OTLP when configured. Returns the run's result
/// and its trace (None when tracing is off).
pub async fn record_run<T, F>(meta: RunMeta, settings: Settings, fut: F) -> (T, Option<RunTrace>)
where
    F: Future<Output = T>,
    T: RunOutcome,
{
    if disabled() {
        return (fut.await, None);
    }
    let collector = Collector::default();
    let secrets = Secrets::default();
    let (provider, exporting) = run_provider(&settings.export, &collector, &secrets);
    let dispatch = if settings.log_to_stderr {
        Dispatch::new(
            tracing_subscriber::registry()
                .with(otel_layer(&provider))
                .with(stderr_layer()),
        )
    } else {
        Dispatch::new(tracing_subscriber::registry().with(otel_layer(&provider)))
    };
    let started = SystemTime::now();
    let root = tracing::dispatcher::with_default(&dispatch, || root_span(&meta));
    let trace_id = {
        let cx = root.context();
        let id = cx.span().span_context().trace_id();
        id.to_string()
    };
    // The instrumented future is awaited (and so dropped) inside the run's
    // dispatcher: a closing span releases its parent through the default
    // subscriber, which must be this run's.
    let inner = {
        let root = root.clone();
        async move { fut.instrument(root).await }
    };
    let out = RUN_SECRETS
        .scope(secrets.clone(), inner.with_subscriber(dispatch))
        .await;
    let masker = secrets.read().unwrap_or_else(|e| e.into_inner()).clone();
    let failure = out.failure().map(|f| masker.mask(&f));
    match &failure {
        Some(f) => {
            set(&root, "nanokit.outcome", "failed");
            fail(&root, f);
        }
        None => set(&root, "nanokit.outcome", "ok"),
    }
    drop(root);
    let run = format!(
        "{}-{}-{}",
        file::compact_utc(started),
        meta.command,
        &trace_id[..8.min(trace_id.len())]
    );
    let spans = std::mem::take(&mut *collector.0.lock().unwrap_or_else(|e| e.into_inner()));
    let mut written = None;
    if settings.local_file {
        // Spans were masked as they ended (`Redacting`), the failure above.
        let trace = TraceFile::from_spans(&run, &meta, &trace_id, failure.as_deref(), spans);
        let dir = traces_dir(&meta.file);
        match trace.write(&dir) {
            Ok(p) => written = Some(p),
            Err(e) => warn_once(&format!(
                "nanokit: cannot write the trace to {}: {e}",
                dir.display()
            )),
        }
    }
    flush(provider, exporting).await;
    (
        out,
        Some(RunTrace {
            run,
            trace_id,
            file: written,
        }),
    )
}

/// Parses a W3C `traceparent` (version 00) into a remote parent context.
pub fn parse_traceparent(v: &str) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    let parts: Vec<&str> = v.trim().split('-').collect();
    if parts.len() < 4 || parts[0].len() != 2 || parts[0] == "ff" {
        return None;
    }
    if parts[1].len() != 32 || parts[2].len() != 16 || parts[3].len() != 2 {
        return None;
    }
    let trace_id = TraceId::from_hex(parts[1]).ok()?;
    let span_id = SpanId::from_hex(parts[2]).ok()?;
    let flags = u8::from_str_radix(parts[3], 16).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    sc.is_valid()
        .then(|| opentelemetry::Context::new().with_remote_span_context(sc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_traceparent() {
        let cx = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        let span = cx.span();
        let sc = span.span_context();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote());
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(parse_traceparent("garbage").is_none());
    }
}
