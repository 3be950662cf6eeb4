//! Tracing of a real `up` / `down` of the example project: the OTLP/HTTP
//! export is received by a protobuf-decoding receiver on loopback, the span
//! tree is checked, a hook's TRACEPARENT is compared with its span, and the
//! local trace file is checked (written on failure, no secrets). OTLP over
//! https: the same receiver behind rustls with the test PKI
//! (scripts/test-certs.sh), the `nanokit` binary run with the
//! `OTEL_EXPORTER_OTLP_*` TLS and header variables.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use nanokit::config::{self, LoadOptions};
use nanokit::engine::{self, Phase, RunOptions};
use nanokit::trace::{self, Export, RunMeta, Settings, TraceFile};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{status::StatusCode, Span};
use prost::Message;

/// A minimal OTLP/HTTP receiver: decodes every `POST /v1/traces` body as an
/// `ExportTraceServiceRequest` and keeps the spans.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<Vec<String>>>,
    /// The headers of every request (names lower-cased).
    headers: Arc<Mutex<Vec<HashMap<String, String>>>>,
}

impl Receiver {
    fn start() -> Receiver {
        Receiver::serving(None)
    }

    /// An https receiver on 127.0.0.1 with the test PKI's loopback.pem
    /// (SAN localhost and 127.0.0.1), requiring a client certificate of
    /// the test CA when `client_ca`.
    fn start_tls(client_ca: bool) -> Receiver {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let dir = certs();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("loopback.pem"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("loopback-key.pem")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if client_ca {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = Arc::new(builder.with_single_cert(chain, key).unwrap());
        Receiver::serving(Some(config))
    }

    fn serving(tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}/v1/traces", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let headers = Arc::new(Mutex::new(Vec::new()));
        let (s, r, h) = (spans.clone(), requests.clone(), headers.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (s, r, h, tls) = (s.clone(), r.clone(), h.clone(), tls.clone());
                std::thread::spawn(move || match tls {
                    None => serve(conn, &s, &r, &h),
                    Some(config) => {
                        let Ok(session) = rustls::ServerConnection::new(config) else {
                            return;
                        };
                        serve(rustls::StreamOwned::new(session, conn), &s, &r, &h)
                    }
                });
            }
        });
        Receiver {
            url,
            spans,
            requests,
            headers,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

fn serve<S: Read + Write>(
    conn: S,
    spans: &Mutex<Vec<Span>>,
    requests: &Mutex<Vec<String>>,
    all_headers: &Mutex<Vec<HashMap<String, String>>>,
) {
    let mut reader = BufReader::new(conn);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        all_headers.lock().unwrap().push(headers.clone());
        requests.lock().unwrap().push(format!(
            "{} {}",
            request_line.trim_end(),
            headers.get("content-type").cloned().unwrap_or_default()
        ));
        let status = match ExportTraceServiceRequest::decode(&body[..]) {
            Ok(req) => {
                let mut all = spans.lock().unwrap();
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        all.extend(ss.spans);
                    }
                }
                "200 OK"
            }
            Err(_) => "400 Bad Request",
        };
        let out = reader.get_mut();
        let _ = write!(
            out,
            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
        );
        let _ = out.flush();
    }
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(v) => Some(v.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            Value::BoolValue(b) => Some(b.to_string()),
            other => Some(format!("{other:?}")),
        }
    })
}

const SECRET: &str = "tok-very-secret-4711";

/// examples/basic in a temp dir, with free ports, a secret in worker's env
/// and a worker poststart hook that records TRACEPARENT, prints the secret
/// and fails.
fn example() -> (tempfile::TempDir, LoadOptions) {
    let dir = common::copy_example("basic");
    let file = dir.path().join("nanokit.yml");
    let yml = std::fs::read_to_string(&file).unwrap();
    let anchor = "      INTERVAL_MS: ${WORKER_INTERVAL_MS:-1000}\n";
    assert!(
        yml.contains(anchor),
        "examples/basic/nanokit.yml changed shape"
    );
    let yml = yml.replace(
        anchor,
        &format!(
            "{anchor}      SECRET_TOKEN: {SECRET}\n    hooks:\n      poststart: 'echo \"$TRACEPARENT\" > traceparent.txt; echo \"token $SECRET_TOKEN\"; exit 3'\n"
        ),
    );
    std::fs::write(&file, yml).unwrap();
    let mut vars: HashMap<String, String> = std::env::vars().collect();
    vars.insert("DB_PORT".into(), common::free_port().to_string());
    vars.insert("API_PORT".into(), common::free_port().to_string());
    let mut opts = LoadOptions::new(file);
    opts.vars = Some(vars);
    (dir, opts)
}

async fn traced(
    command: &'static str,
    load: &LoadOptions,
    url: &str,
) -> (
    Result<engine::Report, engine::EngineError>,
    Option<trace::RunTrace>,
) {
    let meta = RunMeta {
        command,
        file: load.file.clone(),
        env: "local".into(),
    };
    let settings = Settings {
        export: Export::To(url.to_string()),
        ..Settings::default()
    };
    trace::record_run(meta, settings, async {
        let cfg = nanokit::engine::load_config(|| config::load(load))?;
        let provider = engine::provider_for(&cfg)?;
        let cfg = Arc::new(cfg);
        if command == "up" {
            engine::up(cfg, provider, RunOptions::default()).await
        } else {
            engine::down(cfg, provider, RunOptions::default()).await
        }
    })
    .await
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn up_of_the_example_exports_its_span_tree_over_otlp_and_hooks_join_it() {
    let receiver = Receiver::start();
    let (dir, load) = example();
    let (r, run) = traced("up", &load, &receiver.url).await;
    let report = r.expect("up runs (worker's hook fails inside it)");
    let run = run.expect("a trace");
    let outcome: BTreeMap<&str, Phase> = report
        .results
        .iter()
        .map(|r| (r.service.as_str(), r.outcome))
        .collect();
    assert_eq!(outcome["db"], Phase::Healthy, "{:?}", report.results);
    assert_eq!(outcome["api"], Phase::Healthy, "{:?}", report.results);
    assert_eq!(outcome["worker"], Phase::Failed, "{:?}", report.results);

    // The export arrived, decoded, before record_run returned.
    let spans = receiver.spans();
    assert!(!spans.is_empty(), "nothing exported");
    for req in receiver.requests.lock().unwrap().iter() {
        assert!(
            req.starts_with("POST /v1/traces ") && req.ends_with("application/x-protobuf"),
            "{req}"
        );
    }
    assert!(spans.iter().all(|s| hex(&s.trace_id) == run.trace_id));
    let by_id: HashMap<String, &Span> = spans.iter().map(|s| (hex(&s.span_id), s)).collect();
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root");
    let root = roots[0];
    assert_eq!(root.name, "nanokit up");
    assert_eq!(attr(root, "nanokit.project").as_deref(), Some("basic"));
    assert_eq!(attr(root, "nanokit.env").as_deref(), Some("local"));
    assert_eq!(attr(root, "nanokit.provider").as_deref(), Some("process"));
    assert_eq!(attr(root, "nanokit.outcome").as_deref(), Some("failed"));
    assert_eq!(
        root.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    // Every other span's parent was exported too.
    for s in &spans {
        if !s.parent_span_id.is_empty() {
            assert!(
                by_id.contains_key(&hex(&s.parent_span_id)),
                "{} has a parent that was not exported",
                s.name
            );
        }
    }
    let children = |parent: &Span| -> Vec<&Span> {
        let mut v: Vec<&Span> = spans
            .iter()
            .filter(|s| s.parent_span_id == parent.span_id)
            .collect();
        v.sort_by_key(|s| s.start_time_unix_nano);
        v
    };
    let names = |v: &[&Span]| v.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    let top = children(root);
    for stage in ["config.load", "graph", "deploy_lock", "plan"] {
        assert!(
            names(&top).contains(&stage.to_string()),
            "{stage} in {:?}",
            names(&top)
        );
    }
    let service = |name: &str| -> &Span {
        top.iter()
            .copied()
            .find(|s| s.name == "service" && attr(s, "nanokit.service").as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no service span for {name}: {:?}", names(&top)))
    };
    // db: created, then healthy; no dependency wait.
    let db = service("db");
    assert_eq!(attr(db, "nanokit.action").as_deref(), Some("create"));
    assert_eq!(attr(db, "nanokit.outcome").as_deref(), Some("healthy"));
    assert_eq!(names(&children(db)), ["create", "health"]);
    // api: waits for db, migrates in its prestart hook, starts, health, poststart.
    let api = service("api");
    assert_eq!(
        names(&children(api)),
        ["dependencies", "prestart", "create", "health", "poststart"]
    );
    let api_steps = children(api);
    assert_eq!(
        attr(api_steps[0], "nanokit.waits_for").as_deref(),
        Some("db")
    );
    assert!(
        api_steps[0].end_time_unix_nano >= db.end_time_unix_nano - 50_000_000,
        "api's dependency wait ends when db is healthy"
    );
    assert_eq!(
        attr(api_steps[1], "nanokit.hook").as_deref(),
        Some("prestart")
    );
    assert_eq!(attr(api_steps[1], "nanokit.site").as_deref(), Some("host"));
    assert_eq!(
        attr(api_steps[2], "nanokit.provider").as_deref(),
        Some("process")
    );
    for w in api_steps.windows(2) {
        assert!(
            w[0].end_time_unix_nano <= w[1].start_time_unix_nano,
            "steps in order"
        );
    }
    // worker: its poststart hook fails; the error is on the hook span, the
    // service span and the root, without the secret.
    let worker = service("worker");
    assert_eq!(
        names(&children(worker)),
        ["dependencies", "create", "health", "poststart"]
    );
    let hook = children(worker)[3];
    let status = hook.status.as_ref().expect("status");
    assert_eq!(status.code, StatusCode::Error as i32);
    assert!(
        status.message.contains("hook poststart"),
        "{}",
        status.message
    );
    let err = attr(hook, "error").expect("error attribute");
    assert!(err.contains("exit code 3"), "{err}");
    assert!(err.contains("token ***"), "secret not redacted: {err}");
    assert_eq!(
        worker.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    assert_eq!(attr(worker, "nanokit.outcome").as_deref(), Some("failed"));
    let all = format!("{spans:?}");
    assert!(!all.contains(SECRET), "the secret was exported");

    // The hook saw TRACEPARENT naming its own span.
    let tp = std::fs::read_to_string(dir.path().join("traceparent.txt"))
        .expect("the hook wrote traceparent.txt");
    assert_eq!(
        tp.trim(),
        format!("00-{}-{}-01", run.trace_id, hex(&hook.span_id))
    );

    // The same trace was written locally, although the run failed.
    let file = run.file.clone().expect("trace file written");
    assert!(file.starts_with(dir.path().join(".nanokit/traces")));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(SECRET), "the secret is in the trace file");
    let local = TraceFile::read(&file).unwrap();
    assert_eq!(local.outcome, "failed");
    assert_eq!(local.trace_id, run.trace_id);
    assert_eq!(local.project.as_deref(), Some("basic"));
    assert_eq!(local.spans.len(), spans.len());
    let html = nanokit::trace::timeline::html(&local);
    assert_eq!(html.matches("class=\"bar ").count(), spans.len());
    let summary = nanokit::trace::timeline::summary(&local, 5);
    assert!(
        summary.contains("worker › poststart: hook poststart"),
        "{summary}"
    );

    // Teardown is traced too.
    let (r, down) = traced("down", &load, &receiver.url).await;
    let report = r.expect("down");
    assert!(report.failures().is_empty(), "{:?}", report.results);
    let down = down.expect("trace");
    let spans = receiver.spans();
    let droot = spans
        .iter()
        .find(|s| s.name == "nanokit down" && hex(&s.trace_id) == down.trace_id)
        .expect("down root");
    let dservices: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == droot.span_id && s.name == "service")
        .collect();
    assert_eq!(dservices.len(), 3);
    let api = dservices
        .iter()
        .find(|s| attr(s, "nanokit.service").as_deref() == Some("api"))
        .unwrap();
    assert_eq!(attr(api, "nanokit.action").as_deref(), Some("delete"));
    let steps: Vec<String> = spans
        .iter()
        .filter(|s| s.parent_span_id == api.span_id)
        .map(|s| s.name.clone())
        .collect();
    assert!(steps.contains(&"stop".to_string()), "{steps:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_fails_before_starting_still_writes_its_trace_and_export_failures_do_not_fail_it(
) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nanokit.yml");
    std::fs::write(
        &file,
        "name: broken\nservices:\n  a:\n    port: nope\n    start: x\n",
    )
    .unwrap();
    // Nothing listens on this port: the export fails, the run is unaffected.
    let dead = format!("http://127.0.0.1:{}/v1/traces", common::free_port());
    let load = LoadOptions::new(file.clone());
    let (r, run) = traced("up", &load, &dead).await;
    let e = r.expect_err("config error");
    assert_eq!(nanokit::error::ErrorCode::code(&e), "ENKCONFIG", "{e}");
    let run = run.expect("trace");
    let t = TraceFile::read(&run.file.expect("file written")).unwrap();
    assert_eq!(t.outcome, "failed");
    let load_span = t
        .spans
        .iter()
        .find(|s| s.name == "config.load")
        .expect("config.load");
    assert!(load_span.failed());
    assert!(
        t.error
            .as_deref()
            .unwrap_or("")
            .contains("`port` must be a whole number"),
        "{:?}",
        t.error
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn provisioning_records_its_lock_wait_and_install_separately() {
    let p = common::Project::new(
        "name: prov\nservices:\n  svc:\n    start: \"exec sleep 600\"\n    provisioning:\n      install: \"sleep 0.2\"\n",
    );
    let load = LoadOptions::new(p.file());
    let (r, run) = trace::record_run(
        RunMeta {
            command: "up",
            file: p.file(),
            env: "local".into(),
        },
        Settings {
            export: Export::Off,
            ..Settings::default()
        },
        async {
            let cfg = nanokit::engine::load_config(|| config::load(&load))?;
            let provider = engine::provider_for(&cfg)?;
            engine::up(Arc::new(cfg), provider, RunOptions::default()).await
        },
    )
    .await;
    assert!(r.expect("up").failures().is_empty());
    let t = TraceFile::read(&run.unwrap().file.unwrap()).unwrap();
    let prov = t
        .spans
        .iter()
        .find(|s| s.name == "provisioning")
        .expect("provisioning span");
    assert_eq!(prov.attr("nanokit.service"), Some("svc"));
    let steps: Vec<&str> = t.children(&prov.span_id).map(|s| s.name.as_str()).collect();
    assert_eq!(steps, ["lock.wait", "install"]);
    let install = t.children(&prov.span_id).nth(1).unwrap();
    assert!(install.duration_ms() >= 150.0, "{}", install.duration_ms());
    p.down().await;
}

// ---- OTLP over https (the `nanokit` binary, so the variables are its own) ----

/// The test PKI's directory: `NANOKIT_TEST_CERTS`, else made (or reused) by
/// scripts/test-certs.sh.
fn certs() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("NANOKIT_TEST_CERTS").filter(|d| !d.is_empty()) {
            return d.into();
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-certs.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .output()
            .expect("run scripts/test-certs.sh");
        assert!(
            out.status.success(),
            "scripts/test-certs.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        let dir = line
            .trim()
            .strip_prefix("export NANOKIT_TEST_CERTS=")
            .expect("the script's export line")
            .trim_matches('\'');
        dir.into()
    })
    .clone()
}

fn cert(name: &str) -> String {
    certs().join(name).display().to_string()
}

/// The output of one `nanokit` command.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `nanokit <cmd> -f <project>` with `vars` and no other OTEL_* variable.
fn nanokit(p: &common::Project, cmd: &str, vars: &[(&str, String)]) -> Ran {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_nanokit"));
    c.args(p.args(&[cmd]));
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") || k == "NANOKIT_TRACE" || k == "TRACEPARENT" {
            c.env_remove(k);
        }
    }
    for (k, v) in vars {
        c.env(k, v);
    }
    let out = c.output().expect("run nanokit");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn small_project() -> common::Project {
    common::Project::new(&format!(
        "name: otlptls{:05x}\nservices:\n  s:\n    start: \"exec sleep 600\"\n",
        fastrand::u32(..0x10_0000)
    ))
}

/// The warnings about OpenTelemetry in `stderr`.
fn otel_warnings(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("OpenTelemetry"))
        .collect()
}

const AUTH: &str = "Bearer sekrit-otlp-4711";

#[test]
fn an_up_exports_over_https_with_the_test_ca_a_client_certificate_and_headers() {
    // The receiver requires a client certificate of the test CA.
    let receiver = Receiver::start_tls(true);
    let p = small_project();
    let vars = [
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            receiver.url.replace("127.0.0.1", "localhost"),
        ),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", cert("ca.pem")),
        ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert("client.pem")),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", cert("client-key.pem")),
        // URL-encoded, as the spec says.
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "authorization=Bearer%20sekrit-otlp-4711,x-team=infra".to_string(),
        ),
        ("NANOKIT_LOG", "debug".to_string()),
    ];
    let up = nanokit(&p, "up", &vars);
    assert_eq!(up.code, Some(0), "{}{}", up.stdout, up.stderr);
    assert!(otel_warnings(&up.stderr).is_empty(), "{}", up.stderr);
    let spans = receiver.spans();
    let root = spans
        .iter()
        .find(|s| s.parent_span_id.is_empty())
        .unwrap_or_else(|| panic!("no root span received over https: {}", up.stderr));
    assert_eq!(root.name, "nanokit up");
    assert!(spans
        .iter()
        .any(|s| s.name == "service" && attr(s, "nanokit.service").as_deref() == Some("s")));
    let headers = receiver.headers.lock().unwrap().clone();
    assert!(!headers.is_empty());
    for h in &headers {
        assert_eq!(
            h.get("authorization").map(String::as_str),
            Some(AUTH),
            "{h:?}"
        );
        assert_eq!(h.get("x-team").map(String::as_str), Some("infra"), "{h:?}");
    }
    // The header's value is never printed, even with debug logging.
    for out in [&up.stdout, &up.stderr] {
        assert!(!out.contains("sekrit-otlp-4711"), "{out}");
    }
    let down = nanokit(&p, "down", &vars);
    assert_eq!(down.code, Some(0), "{}{}", down.stdout, down.stderr);
    assert!(receiver.spans().iter().any(|s| s.name == "nanokit down"));
}

#[test]
fn with_the_wrong_ca_an_up_succeeds_with_one_warning_however_many_batches_fail() {
    let receiver = Receiver::start_tls(false);
    let p = small_project();
    let vars = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url.clone()),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", cert("other-ca.pem")),
        // One span per export: every span is a failed export of its own.
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1".to_string()),
        ("OTEL_BSP_SCHEDULE_DELAY", "10".to_string()),
    ];
    let up = nanokit(&p, "up", &vars);
    assert_eq!(up.code, Some(0), "{}{}", up.stdout, up.stderr);
    let warnings = otel_warnings(&up.stderr);
    assert_eq!(warnings.len(), 1, "{}", up.stderr);
    assert!(
        warnings[0].contains("not trusted") && warnings[0].contains("other-ca.pem"),
        "{}",
        warnings[0]
    );
    assert!(warnings[0].contains(&receiver.url), "{}", warnings[0]);
    assert!(receiver.spans().is_empty());
    assert!(p.path().join(".nanokit/traces").read_dir().unwrap().count() >= 1);
    // Without a CA variable the system's store is used: the test CA is not in it.
    let down = nanokit(&p, "down", &vars[..1]);
    assert_eq!(down.code, Some(0), "{}{}", down.stdout, down.stderr);
    let warnings = otel_warnings(&down.stderr);
    assert_eq!(warnings.len(), 1, "{}", down.stderr);
    assert!(warnings[0].contains("system's CA store"), "{}", warnings[0]);
}

#[test]
fn the_traces_forms_win_over_the_general_ones() {
    let receiver = Receiver::start_tls(false);
    let p = small_project();
    let vars = [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:9".to_string(),
        ),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url.clone()),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", cert("other-ca.pem")),
        ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", cert("ca.pem")),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-which=general".to_string()),
        (
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "x-which=traces".to_string(),
        ),
    ];
    let up = nanokit(&p, "up", &vars);
    assert_eq!(up.code, Some(0), "{}{}", up.stdout, up.stderr);
    assert!(otel_warnings(&up.stderr).is_empty(), "{}", up.stderr);
    assert!(receiver.spans().iter().any(|s| s.name == "nanokit up"));
    for h in receiver.headers.lock().unwrap().iter() {
        assert_eq!(
            h.get("x-which").map(String::as_str),
            Some("traces"),
            "{h:?}"
        );
    }
    assert_eq!(nanokit(&p, "down", &[]).code, Some(0));
}

#[test]
fn an_unusable_tls_file_turns_export_off_with_one_warning_and_the_deploy_goes_on() {
    let receiver = Receiver::start_tls(false);
    let p = small_project();
    let missing = p.path().join("no-such-ca.pem").display().to_string();
    let up = nanokit(
        &p,
        "up",
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url.clone()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", missing.clone()),
        ],
    );
    assert_eq!(up.code, Some(0), "{}{}", up.stdout, up.stderr);
    let warnings = otel_warnings(&up.stderr);
    assert_eq!(warnings.len(), 1, "{}", up.stderr);
    assert!(
        warnings[0].contains("export is off")
            && warnings[0].contains(&missing)
            && warnings[0].contains("OTEL_EXPORTER_OTLP_CERTIFICATE"),
        "{}",
        warnings[0]
    );
    // A client certificate without its key.
    let down = nanokit(
        &p,
        "down",
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url.clone()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", cert("ca.pem")),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert("client.pem")),
        ],
    );
    assert_eq!(down.code, Some(0), "{}{}", down.stdout, down.stderr);
    let warnings = otel_warnings(&down.stderr);
    assert_eq!(warnings.len(), 1, "{}", down.stderr);
    assert!(
        warnings[0].contains("OTEL_EXPORTER_OTLP_CLIENT_KEY is not"),
        "{}",
        warnings[0]
    );
    assert!(receiver.spans().is_empty());
}
