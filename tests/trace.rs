//! Tracing of a real `up` / `down` of the example project: the OTLP/HTTP
//! export is received by a protobuf-decoding receiver on loopback, the span
//! tree is checked, a hook's TRACEPARENT is compared with its span, and the
//! local trace file is checked (written on failure, no secrets).

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
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (spans.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (s, r) = (s.clone(), r.clone());
                std::thread::spawn(move || serve(conn, &s, &r));
            }
        });
        Receiver {
            url,
            spans,
            requests,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

fn serve(conn: std::net::TcpStream, spans: &Mutex<Vec<Span>>, requests: &Mutex<Vec<String>>) {
    let mut out = conn.try_clone().unwrap();
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
        reader.read_exact(&mut body).unwrap();
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

const SECRET: &str = "tok-very-secret-4711";

/// examples/basic in a temp dir, with free ports, a secret in worker's env
/// and a worker poststart hook that records TRACEPARENT, prints the secret
/// and fails.
fn example() -> (tempfile::TempDir, LoadOptions) {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/basic");
    copy_dir(&src, dir.path());
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
