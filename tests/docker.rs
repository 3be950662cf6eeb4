//! The Docker provider against a real daemon. Needs `NANOKIT_TEST_DOCKER=1`
//! (printed by `eval "$(bash scripts/docker-test-env.sh)"`, which also builds
//! the local images `nk-busybox` and `nk-node`); without it, outside CI,
//! every test is *ignored* with a `SKIPPED:` reason. With it, or in CI, they
//! run, and a daemon that does not answer fails them (tests/services/mod.rs).
//!
//! Each test uses a project name of its own, so they run concurrently
//! without colliding, and removes every container and volume labelled with
//! it when it ends (also on failure). Multi-process cases re-run this test
//! binary as child processes (the ignored `child_cli` test).

mod common;
mod services;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Project;
use nanokit::engine::plan::ActionKind;
use nanokit::engine::{self, Phase, RunOptions};

fn docker(args: &[&str]) -> String {
    let o = Command::new("docker").args(args).output().expect("docker");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Removes everything labelled with `project` (containers, volumes).
fn sweep(project: &str) {
    let ids = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=nk-project={project}"),
    ]);
    let ids: Vec<&str> = ids.lines().filter(|l| !l.is_empty()).collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids);
        docker(&args);
    }
    let vols = docker(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("label=nk-project={project}"),
    ]);
    for v in vols.lines().filter(|l| !l.is_empty()) {
        docker(&["volume", "rm", "-f", v]);
    }
}

/// A project with a unique name, swept on drop.
struct DProject {
    p: Project,
    name: String,
    extra_volumes: Vec<String>,
}

impl DProject {
    /// `yml` uses `NAME` for the project name.
    fn new(prefix: &str, yml: &str) -> DProject {
        let name = format!("t{prefix}{:05x}", fastrand::u32(..0x10_0000));
        let p = Project::new(&yml.replace("NAME", &name));
        DProject {
            p,
            name,
            extra_volumes: Vec::new(),
        }
    }
    /// A project on the Docker provider: `body` follows `name: NAME` and
    /// `infra: { provider: docker }`. Panics without Docker.
    fn docker(prefix: &str, body: &str) -> DProject {
        services::require_docker();
        DProject::new(
            prefix,
            &format!("name: NAME\ninfra: {{ provider: docker }}\n{body}"),
        )
    }
    fn write(&self, yml: &str) {
        self.p.write(&yml.replace("NAME", &self.name));
    }
    /// Containers of this project: name → labels (JSON).
    fn containers(&self) -> Vec<(String, serde_json::Value)> {
        let ids = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=nk-project={}", self.name),
            "--filter",
            "label=nk-service",
        ]);
        ids.lines()
            .filter(|l| !l.is_empty())
            .map(|id| {
                let j: serde_json::Value =
                    serde_json::from_str(&docker(&["inspect", id])).expect("inspect json");
                (
                    j[0]["Name"]
                        .as_str()
                        .unwrap()
                        .trim_start_matches('/')
                        .to_string(),
                    j[0].clone(),
                )
            })
            .collect()
    }
    /// The name of `service`'s (one) container.
    fn container_of(&self, service: &str) -> String {
        self.containers()
            .into_iter()
            .find(|(_, j)| j["Config"]["Labels"]["nk-service"] == service)
            .unwrap_or_else(|| panic!("no container of {service}"))
            .0
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.containers().into_iter().map(|c| c.0).collect();
        v.sort();
        v
    }
    async fn up(&self, opts: RunOptions) -> engine::Report {
        self.p.up(opts).await.expect("up")
    }
}

impl Drop for DProject {
    fn drop(&mut self) {
        sweep(&self.name);
        for v in &self.extra_volumes {
            docker(&["volume", "rm", "-f", v]);
        }
    }
}

fn ok(r: &engine::Report) {
    assert!(r.failures().is_empty(), "failures: {:#?}", r.failures());
}

fn action<'a>(r: &'a engine::Report, svc: &str) -> &'a nanokit::engine::plan::Action {
    r.plan
        .actions
        .iter()
        .find(|a| a.service == svc)
        .expect("action")
}

fn quick() -> RunOptions {
    RunOptions {
        stop_grace: Duration::from_secs(1),
        health_timeout: Duration::from_secs(20),
        ..RunOptions::default()
    }
}

fn volume_dir(volume: &str) -> std::path::PathBuf {
    docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", volume]).into()
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn create_observe_update_delete_with_names_labels_and_limits() {
    services::require_docker();
    let yml = r#"
name: NAME
infra: { provider: docker }
volumes: { data: }
services:
  web:
    image: nk-busybox:latest
    start: "exec httpd -f -p 8080"
    expose: 8080
  worker:
    image: nk-busybox:latest
    start: "exec sleep 600"
    instances: 2
    depends_on: [web]
    env: { FOO: "1" }
    cpu: 0.5
    memory: 64mb
    volumes: ["data:/data"]
    healthcheck: { test: "test -d /data", interval: 200ms, retries: 5 }
"#;
    let p = DProject::new("life", yml);
    let r = p.up(quick()).await;
    ok(&r);
    let n = &p.name;
    assert_eq!(
        p.names(),
        [
            format!("nk-{n}-local-web"),
            format!("nk-{n}-local-worker-1"),
            format!("nk-{n}-local-worker-2")
        ]
    );
    let cs = p.containers();
    let (w1_name, w1) = cs.iter().find(|c| c.0.ends_with("worker-1")).unwrap();
    let labels = &w1["Config"]["Labels"];
    assert_eq!(labels["nk-project"], n.as_str());
    assert_eq!(labels["nk-env"], "local");
    assert_eq!(labels["nk-service"], "worker");
    assert_eq!(labels["nk-replica"], "1");
    assert_eq!(labels["nk-config-hash"].as_str().unwrap().len(), 64);
    assert_eq!(w1["HostConfig"]["Memory"], 64 * 1024 * 1024);
    assert_eq!(w1["HostConfig"]["NanoCpus"], 500_000_000i64);
    assert!(w1["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "FOO=1"));
    assert!(w1["NetworkSettings"]["Networks"]["nanokit-net-local"].is_object());
    // The container carries the check as its Docker HEALTHCHECK, and
    // Docker's own verdict (which nanokit does not wait for) comes to agree.
    let hc = &w1["Config"]["Healthcheck"];
    assert_eq!(
        hc["Test"],
        serde_json::json!(["CMD", "sh", "-c", "test -d /data"])
    );
    assert_eq!(hc["Interval"], 200_000_000i64);
    assert_eq!(hc["Retries"], 5);
    let seen = wait_docker_health(w1_name, "healthy", Duration::from_secs(20));
    assert_eq!(seen, "healthy");
    // Observe: by label, all three.
    let cfg = p.p.config();
    let provider = engine::provider_for(&cfg).unwrap();
    let seen = provider.observe(&engine::scope(&cfg)).await.unwrap();
    assert_eq!(seen.len(), 3);
    let st = p.p.state();
    assert_eq!(st.resources["worker"].ids().len(), 2);
    let web_id = st.resources["web"].provider_id.clone().unwrap();
    // No change: untouched.
    let r = p.up(quick()).await;
    assert!(r.plan.actions.iter().all(|a| a.action == ActionKind::Noop));
    // Update the worker only.
    p.write(&yml.replace("FOO: \"1\"", "FOO: \"2\""));
    let r = p.up(quick()).await;
    ok(&r);
    assert_eq!(action(&r, "worker").action, ActionKind::Update);
    assert_eq!(action(&r, "worker").reasons, ["env.FOO changed"]);
    assert_eq!(action(&r, "web").action, ActionKind::Noop);
    let st2 = p.p.state();
    assert_eq!(
        st2.resources["web"].provider_id.as_deref(),
        Some(web_id.as_str())
    );
    for old in st.resources["worker"].ids() {
        assert!(!st2.resources["worker"].ids().contains(&old));
    }
    assert_eq!(p.names().len(), 3);
    // Delete.
    p.p.down().await;
    assert!(p.names().is_empty());
    assert!(p.p.state().resources.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn health_wait_port_probe_and_health_failure_with_last_output() {
    services::require_docker();
    let port = common::free_port();
    let p = DProject::new(
        "health",
        &format!(
            r#"
name: NAME
infra: {{ provider: docker }}
services:
  slow:
    image: nk-busybox:latest
    start: "sleep 1; touch /tmp/ready; exec sleep 600"
    healthcheck: {{ test: "test -f /tmp/ready", interval: 200ms, retries: 20 }}
  web:
    image: nk-busybox:latest
    start: "sleep 1; exec httpd -f -p 8080"
    port: {port}
    expose: 8080
  bad:
    image: nk-busybox:latest
    start: "exec sleep 600"
    healthcheck: {{ test: "echo not-ready-yet-output; exit 1", interval: 200ms, retries: 2 }}
  after_bad:
    image: nk-busybox:latest
    start: "exec sleep 600"
    depends_on: [bad]
"#
        ),
    );
    let t0 = Instant::now();
    let r = p.p.up(quick()).await.expect("up");
    let res = |s: &str| r.results.iter().find(|x| x.service == s).unwrap().clone();
    assert_eq!(res("slow").outcome, Phase::Healthy);
    assert!(res("slow").elapsed_ms >= 1000, "{:?}", res("slow"));
    assert_eq!(res("web").outcome, Phase::Healthy);
    assert!(
        res("web").elapsed_ms >= 900,
        "port probe waited for httpd: {:?}",
        res("web")
    );
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("published port");
    let bad = res("bad");
    assert_eq!(bad.outcome, Phase::Failed);
    let e = bad.error.unwrap();
    assert!(e.contains("not-ready-yet-output"), "{e}");
    assert!(e.contains("unhealthy"), "{e}");
    assert_eq!(res("after_bad").outcome, Phase::Skipped);
    assert!(t0.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn container_hooks_run_inside_and_their_failure_shows_output() {
    let p = DProject::docker(
        "hooks",
        r#"
services:
  svc:
    image: nk-busybox:latest
    path: .
    start: "exec sleep 600"
    hooks:
      prestart: "echo host-prestart >> ev"
      prestart_container: "echo inside-$NK_SERVICE > /tmp/marker; cat /tmp/marker >> /app/ev"
      poststart: "echo host-poststart >> ev"
      prestop: "echo inside-prestop >> /app/ev"
      poststop: "echo host-poststop >> ev"
"#,
    );
    ok(&p.up(quick()).await);
    let (name, _) = p.containers().remove(0);
    assert_eq!(docker(&["exec", &name, "cat", "/tmp/marker"]), "inside-svc");
    p.p.down().await;
    assert_eq!(
        p.p.read("ev").lines().collect::<Vec<_>>(),
        [
            "host-prestart",
            "inside-svc",
            "host-poststart",
            "inside-prestop",
            "host-poststop"
        ]
    );
    let with_hook = |hook: &str| {
        format!(
            r#"
name: NAME
infra: {{ provider: docker }}
services:
  svc:
    image: nk-busybox:latest
    start: "exec sleep 600"
    hooks:
      prestart_container: "{hook}"
"#
        )
    };
    // A failing container hook fails the service with its output.
    p.write(&with_hook("echo boom-from-inside; exit 3"));
    let r = p.p.up(quick()).await.unwrap();
    let f = r.failures();
    assert_eq!(f.len(), 1);
    let e = f[0].error.clone().unwrap();
    assert!(
        e.contains("boom-from-inside") && e.contains("exit code 3"),
        "{e}"
    );
    // A container hook that outlives its timeout is killed, with its children.
    p.write(&with_hook(
        "echo started-slow; sleep 300 & sleep 301; echo never",
    ));
    let r =
        p.p.up(RunOptions {
            hook_timeout: Duration::from_secs(1),
            ..quick()
        })
        .await
        .unwrap();
    let e = r.failures()[0].error.clone().unwrap();
    assert!(
        e.contains("started-slow") && e.contains("timed out after 1s (it was killed)"),
        "{e}"
    );
    let (name, _) = p.containers().remove(0);
    let ps = docker(&["exec", &name, "ps", "-o", "args"]);
    assert!(
        !ps.contains("sleep 30"),
        "the hook's processes are gone: {ps}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn targeted_up_leaves_the_others_alone() {
    services::require_docker();
    let yml = r#"
name: NAME
infra: { provider: docker }
services:
  a: { image: "nk-busybox:latest", start: "exec sleep 600", env: { V: "1" } }
  b: { image: "nk-busybox:latest", start: "exec sleep 600", env: { V: "1" } }
"#;
    let p = DProject::new("target", yml);
    ok(&p.up(quick()).await);
    let before = p.p.state();
    p.write(&yml.replace("V: \"1\"", "V: \"2\""));
    let r = p
        .up(RunOptions {
            targets: vec!["b".into()],
            ..quick()
        })
        .await;
    ok(&r);
    assert_eq!(r.plan.actions.len(), 1);
    let after = p.p.state();
    assert_eq!(
        after.resources["a"].provider_id,
        before.resources["a"].provider_id
    );
    assert_ne!(
        after.resources["b"].provider_id,
        before.resources["b"].provider_id
    );
    assert_eq!(p.names().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn rolling_starts_new_replicas_before_stopping_old_ones_recreate_does_not() {
    services::require_docker();
    // Every instance appends `start <hostname>` to a host file when it
    // starts and `stop <hostname>` in its prestop hook.
    let yml = r#"
name: NAME
infra: { provider: docker }
services:
  roll:
    image: nk-busybox:latest
    path: .
    updateStrategy: rolling
    instances: 2
    start: "echo start-roll >> /app/ev; exec sleep 600"
    env: { V: "1" }
    healthcheck: { test: "true", interval: 200ms }
    hooks: { prestop: "echo stop-roll >> /app/ev" }
  re:
    image: nk-busybox:latest
    path: .
    instances: 2
    start: "echo start-re >> /app/re; exec sleep 600"
    env: { V: "1" }
    healthcheck: { test: "true", interval: 200ms }
    hooks: { prestop: "echo stop-re >> /app/re" }
"#;
    let p = DProject::new("roll", yml);
    ok(&p.up(quick()).await);
    std::fs::write(p.p.path().join("ev"), "").unwrap();
    std::fs::write(p.p.path().join("re"), "").unwrap();
    p.write(&yml.replace("V: \"1\"", "V: \"2\""));
    ok(&p.up(quick()).await);
    assert_eq!(
        p.p.read("ev").lines().collect::<Vec<_>>(),
        ["start-roll", "stop-roll", "start-roll", "stop-roll"],
        "rolling: each new replica is up before an old one stops"
    );
    assert_eq!(
        p.p.read("re").lines().collect::<Vec<_>>(),
        ["stop-re", "stop-re", "start-re", "start-re"],
        "recreate: stop all, then start"
    );
    let st = p.p.state();
    let hash = &st.resources["roll"].config_hash;
    let cs = p.containers();
    assert_eq!(cs.len(), 4);
    for (_, c) in cs
        .iter()
        .filter(|c| c.1["Config"]["Labels"]["nk-service"] == "roll")
    {
        assert_eq!(c["Config"]["Labels"]["nk-config-hash"], hash.as_str());
    }
    let mut replicas: Vec<String> = cs
        .iter()
        .filter(|c| c.1["Config"]["Labels"]["nk-service"] == "roll")
        .map(|c| {
            c.1["Config"]["Labels"]["nk-replica"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    replicas.sort();
    assert_eq!(replicas, ["1", "2"]);
    // A rolling update whose new replica fails keeps the old ones serving.
    let before = st.resources["roll"].ids();
    p.write(&yml.replace("V: \"1\"", "V: \"3\"").replace(
        "test: \"true\", interval: 200ms }\n    hooks: { prestop: \"echo stop-roll",
        "test: \"false\", interval: 200ms, retries: 1 }\n    hooks: { prestop: \"echo stop-roll",
    ));
    let r = p.p.up(quick()).await.unwrap();
    let f = r.failures();
    assert!(f.iter().any(|x| x.service == "roll"), "{f:?}");
    assert!(f[0].error.as_ref().unwrap().contains("keep running"));
    let st = p.p.state();
    assert_eq!(st.resources["roll"].ids(), before);
    assert_eq!(
        p.containers()
            .iter()
            .filter(|c| c.1["Config"]["Labels"]["nk-service"] == "roll")
            .count(),
        2
    );
}

const SHARED: &str = r#"
name: NAME
infra: { provider: docker }
volumes:
  deps: { name: VOLNAME }
runtimes:
  app:
    image: nk-busybox:latest
    path: .
    volumes: ["deps:/deps"]
    # Needs what the install produced: proves the install ran first.
    start: "test -f /deps/done && exec sleep 600"
    provisioning:
      image: nk-node:latest
      install: "node -e \"require('fs').appendFileSync('/deps/installs.log', 'run\\n')\"; sleep SLEEP; echo ok > /deps/done"
services:
  a: { runtime: app }
  b: { runtime: app }
  c: { runtime: app }
"#;

fn shared_yml(vol: &str, sleep: &str) -> String {
    SHARED.replace("VOLNAME", vol).replace("SLEEP", sleep)
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn three_services_on_one_volume_install_once_and_reinstall_once_on_manifest_change() {
    services::require_docker();
    let vol = format!("nk-test-deps-{:06x}", fastrand::u32(..0x100_0000));
    let mut p = DProject::new("prov", &shared_yml(&vol, "2"));
    p.extra_volumes.push(vol.clone());
    std::fs::write(p.p.path().join("package.json"), r#"{"dependencies":{}}"#).unwrap();
    let (sink, events) = common::recorder();
    let r = p
        .up(RunOptions {
            events: Some(sink),
            ..quick()
        })
        .await;
    ok(&r);
    let dir = volume_dir(&vol);
    assert_eq!(
        std::fs::read_to_string(dir.join("installs.log")).unwrap(),
        "run\n"
    );
    let skipped = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.message.as_deref() == Some("already installed"))
        .count();
    assert_eq!(skipped, 2, "the two others skip");
    let sentinels = |d: &std::path::Path| {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".nk-installed-")
            })
            .count()
    };
    assert_eq!(sentinels(&dir), 1);
    assert!(
        dir.join(".nk-install-lock").exists(),
        "the lock lives on the volume"
    );
    // The installer image had node; the services' image does not.
    let (c, _) = p.containers().remove(0);
    assert!(docker(&["exec", &c, "sh", "-c", "command -v node || echo none"]).ends_with("none"));
    // A manifest change: every service updates, exactly one reinstall.
    std::fs::write(
        p.p.path().join("package.json"),
        r#"{"dependencies":{"x":"1"}}"#,
    )
    .unwrap();
    let r = p.up(quick()).await;
    ok(&r);
    assert!(r
        .plan
        .actions
        .iter()
        .all(|a| a.action == ActionKind::Update));
    assert_eq!(
        std::fs::read_to_string(dir.join("installs.log")).unwrap(),
        "run\nrun\n"
    );
    assert_eq!(sentinels(&dir), 1);
    // No installer container is left.
    assert!(docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=nk-install-target={vol}")
    ])
    .is_empty());
}

/// Runs `nanokit <args>` in a child process (this test binary).
fn spawn_cli(args: &[String], envs: &[(&str, &str)]) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_cli",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("NK_CHILD_ARGS", serde_json::to_string(args).unwrap())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn child")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "run as a child process by the multi-process tests"]
async fn child_cli() {
    let args: Vec<String> = serde_json::from_str(&std::env::var("NK_CHILD_ARGS").unwrap()).unwrap();
    let code = nanokit::cli::run(args).await;
    std::process::exit(code);
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn two_concurrent_up_processes_on_projects_sharing_a_volume_install_once() {
    services::require_docker();
    let vol = format!("nk-test-deps-{:06x}", fastrand::u32(..0x100_0000));
    let mut p1 = DProject::new("conc", &shared_yml(&vol, "2"));
    let p2 = DProject::new("conc", &shared_yml(&vol, "2"));
    p1.extra_volumes.push(vol.clone());
    for p in [&p1, &p2] {
        std::fs::write(p.p.path().join("package.json"), "{}").unwrap();
    }
    let children: Vec<_> = [&p1, &p2]
        .iter()
        .map(|p| spawn_cli(&p.p.args(&["up"]), &[]))
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        std::fs::read_to_string(volume_dir(&vol).join("installs.log")).unwrap(),
        "run\n",
        "two runs, six services, one install"
    );
    assert_eq!(p1.names().len() + p2.names().len(), 6);
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn a_killed_installer_is_recovered_by_the_next_run() {
    services::require_docker();
    let vol = format!("nk-test-deps-{:06x}", fastrand::u32(..0x100_0000));
    let yml = format!(
        r#"
name: NAME
infra: {{ provider: docker }}
volumes:
  deps: {{ name: {vol} }}
services:
  a:
    image: nk-busybox:latest
    volumes: ["deps:/deps"]
    start: "test -f /deps/done && exec sleep 600"
    provisioning:
      install: "if [ -f /deps/attempt ]; then echo second >> /deps/log; else touch /deps/attempt; echo first >> /deps/log; sleep 60; fi; touch /deps/done"
"#
    );
    let mut p = DProject::new("kill", &yml);
    p.extra_volumes.push(vol.clone());
    let mut child = spawn_cli(&p.p.args(&["up"]), &[]);
    // Wait until the installer is mid-install, then SIGKILL nanokit.
    let t0 = Instant::now();
    loop {
        let dir = volume_dir(&vol);
        if !dir.as_os_str().is_empty() && dir.join("attempt").exists() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the install never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Its installer container still runs, orphaned.
    assert!(!docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=nk-install-target={vol}")
    ])
    .is_empty());
    let t1 = Instant::now();
    let r = p.up(quick()).await;
    ok(&r);
    assert!(
        t1.elapsed() < Duration::from_secs(30),
        "took over the dead holder's lock at once"
    );
    let dir = volume_dir(&vol);
    assert_eq!(
        std::fs::read_to_string(dir.join("log")).unwrap(),
        "first\nsecond\n"
    );
    assert!(docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=nk-install-target={vol}")
    ])
    .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn drift_after_docker_rm_and_stop_is_detected_and_restored() {
    let p = DProject::docker(
        "drift",
        r#"
services:
  a: { image: "nk-busybox:latest", start: "exec sleep 600" }
  b: { image: "nk-busybox:latest", start: "exec sleep 600" }
  c: { image: "nk-busybox:latest", start: "exec sleep 600" }
  d: { image: "nk-busybox:latest", start: "exec sleep 600", instances: 2 }
"#,
    );
    ok(&p.up(quick()).await);
    assert_eq!(nanokit::cli::run(p.p.args(&["drift"])).await, 0);
    let n = &p.name;
    docker(&["rm", "-f", &format!("nk-{n}-local-a")]);
    docker(&["stop", "-t", "0", &format!("nk-{n}-local-b")]);
    docker(&["stop", "-t", "0", &format!("nk-{n}-local-d-2")]);
    let cfg = p.p.config();
    // `status` counts every replica: none running is dead, some is degraded.
    let rows = nanokit::engine::status_of(&cfg).await.unwrap();
    let row = |svc: &str| rows.iter().find(|r| r.service == svc).unwrap();
    assert_eq!((row("a").status.as_str(), row("a").running), ("dead", 0));
    assert_eq!((row("b").status.as_str(), row("b").alive), ("dead", false));
    assert_eq!((row("c").status.as_str(), row("c").running), ("healthy", 1));
    let d = row("d");
    assert_eq!(
        (d.status.as_str(), d.running, d.instances.len(), d.alive),
        ("degraded", 1, 2, false)
    );
    let provider = engine::provider_for(&cfg).unwrap();
    let report = nanokit::engine::drift::detect(&cfg, provider.as_ref())
        .await
        .unwrap();
    let kinds: Vec<(String, nanokit::engine::drift::DriftKind)> = report
        .items
        .iter()
        .map(|i| (i.service.clone(), i.kind))
        .collect();
    assert!(
        kinds.contains(&("a".into(), nanokit::engine::drift::DriftKind::Gone)),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("b".into(), nanokit::engine::drift::DriftKind::Stopped)),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("d".into(), nanokit::engine::drift::DriftKind::Stopped)),
        "{kinds:?}"
    );
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    assert_eq!(nanokit::cli::run(p.p.args(&["drift"])).await, 2);
    assert_eq!(
        nanokit::cli::run(p.p.args(&["drift", "--restore"])).await,
        0
    );
    assert_eq!(nanokit::cli::run(p.p.args(&["drift"])).await, 0);
    assert_eq!(p.names().len(), 5);
    let rows = nanokit::engine::status_of(&cfg).await.unwrap();
    assert!(
        rows.iter()
            .all(|r| r.status == "healthy" && r.alive && r.running == r.instances.len()),
        "{rows:?}"
    );
    // A container of this project whose service left the configuration is
    // an orphan: reported, then removed by `up`.
    p.write(
        r#"
name: NAME
infra: { provider: docker }
services:
  a: { image: "nk-busybox:latest", start: "exec sleep 600" }
  b: { image: "nk-busybox:latest", start: "exec sleep 600" }
  d: { image: "nk-busybox:latest", start: "exec sleep 600", instances: 2 }
"#,
    );
    std::fs::remove_file(p.p.config().state_file).unwrap();
    let cfg = p.p.config();
    let report = nanokit::engine::drift::detect(&cfg, provider.as_ref())
        .await
        .unwrap();
    assert!(
        report
            .items
            .iter()
            .any(|i| i.service == "c" && i.detail.contains("orphan")),
        "{:?}",
        report.items
    );
    ok(&p.up(quick()).await);
    assert_eq!(p.names().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn lost_state_json_adopts_running_containers_by_label() {
    let p = DProject::docker(
        "adopt",
        r#"
services:
  a: { image: "nk-busybox:latest", start: "exec sleep 600", instances: 2 }
  b: { image: "nk-busybox:latest", start: "exec sleep 600", depends_on: [a] }
"#,
    );
    ok(&p.up(quick()).await);
    let before: Vec<String> = p
        .containers()
        .into_iter()
        .map(|c| c.1["Id"].as_str().unwrap().to_string())
        .collect();
    std::fs::remove_file(p.p.config().state_file).unwrap();
    let r = p.up(quick()).await;
    ok(&r);
    assert_eq!(action(&r, "a").keep.len(), 2);
    assert!(action(&r, "a").stop.is_empty());
    let mut after: Vec<String> = p
        .containers()
        .into_iter()
        .map(|c| c.1["Id"].as_str().unwrap().to_string())
        .collect();
    let mut before = before;
    before.sort();
    after.sort();
    assert_eq!(before, after, "adopted, not duplicated");
    let r = p.up(quick()).await;
    assert!(r.plan.actions.iter().all(|a| a.action == ActionKind::Noop));
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn sigkilled_up_at_random_moments_converges_without_duplicates() {
    let p = DProject::docker(
        "crash",
        r#"
services:
  db: { image: "nk-busybox:latest", start: "exec sleep 600", healthcheck: { test: "true", interval: 100ms } }
  api:
    image: nk-busybox:latest
    start: "exec sleep 600"
    instances: 2
    depends_on: [db]
    healthcheck: { test: "true", interval: 100ms }
  web: { image: "nk-busybox:latest", start: "exec sleep 600", depends_on: [api] }
"#,
    );
    let n = p.name.clone();
    for trial in 0..10 {
        // Alternate a changed configuration so kills land in updates too.
        let cfg_src = std::fs::read_to_string(p.p.file()).unwrap();
        let v = format!("V{trial}");
        let src = match cfg_src.find("env:") {
            Some(_) => cfg_src.replace(&format!("V{}", trial - 1), &v),
            None => cfg_src.replace(
                "depends_on: [api] }",
                &format!("depends_on: [api], env: {{ X: {v} }} }}"),
            ),
        };
        std::fs::write(p.p.file(), src).unwrap();
        let mut child = spawn_cli(&p.p.args(&["up"]), &[]);
        std::thread::sleep(Duration::from_millis(fastrand::u64(50..1500)));
        let _ = child.kill();
        let _ = child.wait();
        let r =
            p.p.up(quick())
                .await
                .unwrap_or_else(|e| panic!("trial {trial}: {e}"));
        ok(&r);
        let cs = p.containers();
        let mut keys: Vec<(String, String)> = cs
            .iter()
            .map(|c| {
                let l = &c.1["Config"]["Labels"];
                (
                    l["nk-service"].as_str().unwrap().to_string(),
                    l["nk-replica"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        keys.sort();
        let seen: Vec<String> = cs
            .iter()
            .map(|c| {
                format!(
                    "{} {} hash={} created={}",
                    c.0,
                    c.1["State"]["Status"],
                    c.1["Config"]["Labels"]["nk-config-hash"],
                    c.1["Created"]
                )
            })
            .collect();
        assert_eq!(
            keys,
            [("api", "1"), ("api", "2"), ("db", "1"), ("web", "1")]
                .map(|(a, b)| (a.to_string(), b.to_string())),
            "trial {trial}: no duplicates; containers: {seen:#?}; state: {:?}; run: {:#?}",
            p.p.state().resources.get("web"),
            r.results
        );
        // Nothing of this project's name without our labels.
        let all = docker(&[
            "ps",
            "-a",
            "--format",
            "{{.Names}}",
            "--filter",
            &format!("name=nk-{n}-"),
        ]);
        let unlabelled: Vec<&str> = all
            .lines()
            .filter(|l| !cs.iter().any(|c| c.0 == *l))
            .collect();
        assert!(unlabelled.is_empty(), "trial {trial}: {unlabelled:?}");
        assert!(
            p.p.state()
                .resources
                .values()
                .all(|r| r.status == nanokit::state::Status::Healthy),
            "trial {trial}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn bad_input_fails_with_the_service_named_and_leaves_nothing_unrecorded() {
    services::require_docker();
    // A missing image.
    let p = DProject::new(
        "bad",
        r#"
name: NAME
infra: { provider: docker }
services:
  ghost: { image: "nk-no-such-image:1", start: "sleep 1" }
"#,
    );
    let r = p.p.up(quick()).await.unwrap();
    let e = r.failures()[0].error.clone().unwrap();
    assert!(
        e.contains("service `ghost`") && e.contains("nk-no-such-image:1"),
        "{e}"
    );
    assert!(p.names().is_empty());
    assert_eq!(nanokit::cli::run(p.p.args(&["up"])).await, 1);
    // A port already in use.
    let busy = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    p.write(&format!(
        "name: NAME\ninfra: {{ provider: docker }}\nservices:\n  web: {{ image: \"nk-busybox:latest\", start: \"exec httpd -f -p 80\", port: {port}, expose: 80 }}\n"
    ));
    let r = p.p.up(quick()).await.unwrap();
    let e = r.failures()[0].error.clone().unwrap();
    assert!(
        e.contains("service `web`") && e.contains(&port.to_string()),
        "{e}"
    );
    assert!(
        p.names().is_empty(),
        "the container that could not start was removed"
    );
    // Refused before it started: nothing of it is recorded.
    assert!(!p.p.state().resources.contains_key("web"));
    drop(busy);
    // An invalid volume spec.
    p.write("name: NAME\ninfra: { provider: docker }\nservices:\n  w: { image: \"nk-busybox:latest\", volumes: [\"./x:relative\"] }\n");
    let e = nanokit::config::load(&nanokit::config::LoadOptions::new(p.p.file())).unwrap_err();
    assert!(
        e.to_string().contains("service `w`") && e.to_string().contains("absolute"),
        "{e}"
    );
    assert_eq!(nanokit::cli::run(p.p.args(&["up"])).await, 1);
    // An unreachable daemon (in a child: DOCKER_HOST is process-wide).
    p.write("name: NAME\ninfra: { provider: docker }\nservices:\n  w: { image: \"nk-busybox:latest\" }\n");
    let out = spawn_cli(
        &p.p.args(&["up"]),
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    )
    .wait_with_output()
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("ENKUNREACHABLE") && text.contains("nonexistent"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn the_docker_example_comes_up_healthy_and_goes_down() {
    services::require_docker();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/docker");
    let yml = std::fs::read_to_string(src.join("nanokit.yml"))
        .unwrap()
        .replace("name: dockerdemo", "name: NAME")
        .replace("${WEB_PORT:-8088}", &common::free_port().to_string());
    let p = DProject::new("example", &yml);
    std::fs::create_dir_all(p.p.path().join("app")).unwrap();
    for f in ["package.json", "server.js"] {
        std::fs::copy(src.join("app").join(f), p.p.path().join("app").join(f)).unwrap();
    }
    ok(&p.up(quick()).await);
    assert_eq!(p.names().len(), 4);
    let r = p.up(quick()).await;
    assert!(r.plan.actions.iter().all(|a| a.action == ActionKind::Noop));
    p.p.down().await;
    assert!(p.names().is_empty());
}

/// An env of its own (its network is shared by every project of the env)
/// for projects of one service, each with a provider of its own per run.
struct OwnEnv {
    env: String,
    network: String,
    yml: String,
}

impl OwnEnv {
    fn new(prefix: &str) -> OwnEnv {
        services::require_docker();
        let env = format!("{prefix}{:05x}", fastrand::u32(..0x10_0000));
        let yml = format!(
            r#"
name: NAME
infra: {{ provider: docker }}
services:
  s: {{ image: "nk-busybox:latest", start: "exec sleep 600" }}
environments:
  {env}: {{}}
"#
        );
        OwnEnv {
            network: format!("nanokit-net-{env}"),
            env,
            yml,
        }
    }
    fn project(&self, prefix: &str) -> DProject {
        DProject::new(prefix, &self.yml)
    }
    fn config(&self, p: &DProject) -> std::sync::Arc<nanokit::config::Config> {
        let mut o = nanokit::config::LoadOptions::new(p.p.file());
        o.env = self.env.clone();
        std::sync::Arc::new(nanokit::config::load(&o).expect("config"))
    }
    async fn up(&self, p: &DProject) -> engine::Report {
        let cfg = self.config(p);
        let provider = engine::provider_for(&cfg).expect("provider");
        engine::up(cfg, provider, quick()).await.expect("up")
    }
    async fn down(&self, p: &DProject) -> engine::Report {
        let cfg = self.config(p);
        let provider = engine::provider_for(&cfg).expect("provider");
        engine::down(cfg, provider, quick()).await.expect("down")
    }
    /// The ids of the networks named as the env's.
    fn networks(&self) -> Vec<String> {
        let filter = format!("name=^{}$", self.network);
        docker(&["network", "ls", "-q", "--no-trunc", "--filter", &filter])
            .lines()
            .map(str::to_string)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn down_removes_the_env_network_once_no_container_of_the_env_is_left() {
    let env = OwnEnv::new("nt");
    let a = env.project("neta");
    let b = env.project("netb");
    let network_exists = || !env.networks().is_empty();

    ok(&env.up(&a).await);
    ok(&env.up(&b).await);
    assert!(network_exists());
    ok(&env.down(&a).await);
    assert!(network_exists(), "project b still has a container on it");
    ok(&env.down(&b).await);
    assert!(
        !network_exists(),
        "the last container of the env is gone, so is its network"
    );
    // And the next up makes it again.
    ok(&env.up(&a).await);
    assert!(network_exists());
    ok(&env.down(&a).await);
    assert!(!network_exists());
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn concurrent_ups_of_one_env_end_on_one_network() {
    // Engine 20.10 (API 1.41) accepts a second network of the same name: six
    // runs that each find the env's network missing and create it at once
    // must still end with one network, every container on it.
    let env = OwnEnv::new("nr");
    let projects: Vec<DProject> = (0..6).map(|_| env.project("race")).collect();
    for r in futures::future::join_all(projects.iter().map(|p| env.up(p))).await {
        ok(&r);
    }
    let left = env.networks();
    assert_eq!(left.len(), 1, "networks named {}: {left:?}", env.network);
    for p in &projects {
        let (name, j) = p.containers().into_iter().next().expect("a container");
        let on = j["NetworkSettings"]["Networks"][&env.network]["NetworkID"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(on, left[0], "{name} is not on the env's network");
    }
    for r in futures::future::join_all(projects.iter().map(|p| env.down(p))).await {
        ok(&r);
    }
    assert!(
        env.networks().is_empty(),
        "the env's network outlived its last container"
    );
}

/// Docker events of a project's containers, streamed from the moment of
/// [`Events::watch`]. (`docker events --since` run afterwards replays only
/// the daemon's in-memory log of its last 256 events, which the suite's
/// concurrent tests overrun within seconds: every probe is an exec, three
/// events.)
struct Events {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Events {
    /// Starts streaming `project`'s container events, one line each in the
    /// Go template `format`.
    fn watch(project: &str, format: &str) -> Events {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let mut child = Command::new("docker")
            .args(["events", "--since"])
            .arg(format!("{}.{:09}", t.as_secs(), t.subsec_nanos()))
            .args(["--filter", &format!("label=nk-project={project}")])
            .args(["--filter", "type=container", "--format", format])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("docker events");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l.trim().to_string()).is_err() {
                    break;
                }
            }
        });
        Events { child, lines }
    }

    /// The events, oldest first, up to the first one starting with `last`
    /// (or all that came within 10 s).
    fn until(mut self, last: &str) -> Vec<String> {
        let by = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while let Ok(l) = self
            .lines
            .recv_timeout(by.saturating_duration_since(Instant::now()))
        {
            let done = l.starts_with(last);
            seen.push(l);
            if done {
                break;
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        seen
    }
}

/// Docker's own health status of `container` once it is `want`, or the
/// last one seen when `within` is spent.
fn wait_docker_health(container: &str, want: &str, within: Duration) -> String {
    let until = Instant::now() + within;
    loop {
        let seen = docker(&["inspect", "-f", "{{.State.Health.Status}}", container]);
        if seen == want || Instant::now() >= until {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// nanokit runs the check itself from the start: `db`'s check passes at
/// once, so `db` is reported healthy and `app` starts while Docker's own
/// HEALTHCHECK (first run one 60 s interval after start) still says
/// `starting`, as `docker inspect` and the event stream show.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn a_passing_check_releases_dependents_before_dockers_first_verdict() {
    let p = DProject::docker(
        "fastcheck",
        r#"
services:
  db:
    image: nk-busybox:latest
    start: "exec sleep 600"
    healthcheck: { test: "true", interval: 60s, retries: 3 }
  app:
    image: nk-busybox:latest
    start: "exec sleep 600"
    depends_on: [db]
"#,
    );
    let watch = Events::watch(&p.name, "{{.Status}} {{.Actor.Attributes.name}}");
    let cancel = tokio_util::sync::CancellationToken::new();
    {
        // A guard: waiting for Docker's verdict would take a minute.
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(40)).await;
            cancel.cancel();
        });
    }
    let r = p.up(RunOptions { cancel, ..quick() }).await;
    ok(&r);
    assert!(r.results.iter().all(|x| x.outcome == Phase::Healthy));
    let (db, app) = (p.container_of("db"), p.container_of("app"));
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Health.Status}}", &db]),
        "starting",
        "Docker has judged db already: the test proves nothing"
    );
    let events = watch.until(&format!("start {app}"));
    let app_start = events
        .iter()
        .position(|e| *e == format!("start {app}"))
        .unwrap_or_else(|| panic!("no start event of {app}: {events:#?}"));
    assert!(
        !events[..app_start]
            .iter()
            .any(|e| e.starts_with("health_status") && e.ends_with(&db)),
        "{events:#?}"
    );
    assert_eq!(
        p.p.state().resources["db"].status,
        nanokit::state::Status::Healthy
    );
}

/// A check that keeps failing fails the service once `retries` failures
/// counted after `start_period`, with the last probe's output (each of
/// nanokit's probes numbers itself; Docker's own, which lack the NK_*
/// variables nanokit passes to its execs, do nothing); failures in the start period
/// do not count. (The interval leaves the fast probes a second before the
/// first counted one: with 300 ms, execs slowed by a loaded daemon left
/// room for none, and Docker's verdict came first.)
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn health_failures_count_after_the_start_period_and_report_the_last_output() {
    let p = DProject::docker(
        "retries",
        r#"
services:
  late:
    image: nk-busybox:latest
    start: "sleep 2; touch /tmp/ready; exec sleep 600"
    healthcheck: { test: "test -f /tmp/ready", interval: 200ms, retries: 1, start_period: 10s }
  bad:
    image: nk-busybox:latest
    start: "exec sleep 600"
    healthcheck:
      test: "[ -n \"$$NK_CONFIG_HASH\" ] || exit 1; n=$$(cat /tmp/n 2>/dev/null || echo 0); n=$$((n+1)); echo $$n > /tmp/n; echo probe-$$n; exit 1"
      interval: 1s
      retries: 3
"#,
    );
    let r = p.up(quick()).await;
    let res = |s: &str| r.results.iter().find(|x| x.service == s).unwrap().clone();
    assert_eq!(res("late").outcome, Phase::Healthy, "{:?}", res("late"));
    let bad = res("bad");
    assert_eq!(bad.outcome, Phase::Failed);
    let e = bad.error.unwrap();
    // Failed by nanokit's count or by Docker's (whichever comes first; they
    // count alike), quoting nanokit's last probe either way.
    assert!(
        e.contains("is unhealthy: 3 failure(s) counted")
            || e.contains("is unhealthy, as the runtime's own check reports"),
        "{e}"
    );
    let bad_c = p.container_of("bad");
    let env = docker(&["inspect", "-f", "{{.Config.Env}}", &bad_c]);
    assert!(!env.contains("NK_CONFIG_HASH"), "the test's premise: {env}");
    let n = docker(&["exec", &bad_c, "cat", "/tmp/n"]);
    assert!(
        e.contains(&format!("probe-{n}\n")),
        "the error quotes another probe than the last ({n}): {e}"
    );
    // A probe at the start and 3 counted ones a second apart would be 4;
    // the fast probes (100 ms apart, backing off) add several more before
    // the first counted one, even when a loaded daemon makes each exec slow.
    assert!(
        n.parse::<u32>().unwrap() >= 6,
        "no fast probes before the counted ones: {n}"
    );
}

/// A check that hangs is cut at `timeout`, its process is killed, and the
/// service fails saying so. (Only nanokit's probes hang: Docker's own, which
/// lack the NK_* variables of nanokit's execs, exit at once; Docker 20.10
/// does not kill a timed-out probe of its own.)
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn a_hanging_check_is_cut_at_its_timeout() {
    let p = DProject::docker(
        "hang",
        r#"
services:
  hang:
    image: nk-busybox:latest
    start: "exec sleep 600"
    healthcheck:
      test: ["CMD", "sh", "-c", "[ -n \"$$NK_CONFIG_HASH\" ] && exec sleep 97; exit 1"]
      interval: 200ms
      timeout: 300ms
      retries: 2
"#,
    );
    let r = p.up(quick()).await;
    let res = &r.results[0];
    assert_eq!(res.outcome, Phase::Failed);
    let e = res.error.clone().unwrap();
    assert!(e.contains("timed out after 300ms (it was killed)"), "{e}");
    let top = docker(&["top", &p.container_of("hang")]);
    assert!(
        !top.contains("sleep 97"),
        "a timed-out probe still runs:\n{top}"
    );
}

/// `down` stops dependents first: a service gets its SIGTERM only after the
/// process of each service that depends on it has exited (though Docker may
/// still be tearing that container down). `b` takes 300 ms to exit after its
/// SIGTERM; `a` records when its own SIGTERM arrives (the kernel's uptime,
/// the same clock in every container).
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn down_signals_a_dependency_only_after_its_dependents_exited() {
    let p = DProject::docker(
        "order",
        r#"
volumes: { marks: }
services:
  a:
    image: nk-busybox:latest
    start: "trap 'cut -d\\  -f1 /proc/uptime > /marks/a.term; exit 0' TERM; sleep 600 & wait"
    volumes: ["marks:/marks"]
  b:
    image: nk-busybox:latest
    start: "trap 'sleep 0.3; cut -d\\  -f1 /proc/uptime > /marks/b.exit; exit 0' TERM; sleep 600 & wait"
    volumes: ["marks:/marks"]
    depends_on: [a]
"#,
    );
    ok(&p.up(quick()).await);
    let d = p.p.down().await;
    assert!(d.failures().is_empty(), "{:?}", d.results);
    assert!(
        p.names().is_empty(),
        "down left containers: {:?}",
        p.names()
    );
    let dir = volume_dir(&format!("nk-{}-local-marks", p.name));
    let read = |f: &str| -> f64 {
        let s = std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        s.trim().parse().unwrap_or_else(|_| panic!("{f}: {s:?}"))
    };
    let (b_exit, a_term) = (read("b.exit"), read("a.term"));
    assert!(
        a_term >= b_exit,
        "a got SIGTERM {:.2} s before b had exited",
        b_exit - a_term
    );
}

/// The image `nk-busybox-usr1`: nk-busybox whose STOPSIGNAL is SIGUSR1
/// (built from it, offline; `docker commit --change` cannot set it).
fn usr1_image() -> &'static str {
    let image = "nk-busybox-usr1:latest";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM nk-busybox:latest\nSTOPSIGNAL SIGUSR1\n",
    )
    .unwrap();
    let built = Command::new("docker")
        .args(["build", "-q", "-t", image])
        .arg(dir.path())
        .output()
        .expect("docker build");
    assert!(
        built.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    image
}

/// [`Events`] of `project` as `action service exit-code` lines, the exit
/// code empty but for `die`.
fn watch_actions(project: &str) -> Events {
    Events::watch(
        project,
        r#"{{.Action}} {{index .Actor.Attributes "nk-service"}} {{.Actor.Attributes.exitCode}}"#,
    )
}

/// `down` stops a container as `docker stop` would: with the image's
/// STOPSIGNAL, and with SIGKILL once the grace period is over. On the
/// Docker host nanokit delivers the signal itself, so the daemon logs no
/// `kill` for a container that exits on it.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn down_sends_the_images_stop_signal_and_kills_after_the_grace_period() {
    let image = usr1_image();
    let p = DProject::docker(
        "stopsig",
        &format!(
            r#"
volumes: {{ marks: }}
services:
  usr1:
    image: {image}
    start: "trap 'echo USR1 > /marks/usr1; exit 0' USR1; trap 'echo TERM > /marks/usr1; exit 0' TERM; sleep 600 & wait"
    volumes: ["marks:/marks"]
  stubborn:
    image: nk-busybox:latest
    start: "trap 'echo TERM > /marks/stubborn' TERM; i=0; while :; do i=$((i+1)); echo $i > /marks/beat; sleep 0.05; done"
    volumes: ["marks:/marks"]
    depends_on: [a]
  a:
    image: nk-busybox:latest
    start: "trap 'b=$(cat /marks/beat); sleep 0.3; [ \"$b\" = \"$(cat /marks/beat)\" ] && echo gone > /marks/a.saw || echo alive > /marks/a.saw; exit 0' TERM; sleep 600 & wait"
    volumes: ["marks:/marks"]
"#
        ),
    );
    ok(&p.up(quick()).await);
    let watch = watch_actions(&p.name);
    let d = p.p.down().await;
    assert!(d.failures().is_empty(), "{:?}", d.results);
    assert!(p.names().is_empty(), "down left {:?}", p.names());
    let dir = volume_dir(&format!("nk-{}-local-marks", p.name));
    let mark = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    assert_eq!(mark("usr1").trim(), "USR1", "usr1 got the wrong signal");
    assert_eq!(mark("stubborn").trim(), "TERM", "stubborn got no SIGTERM");
    // `a` goes last: its dependent `stubborn` is stopped first.
    let events = watch.until("destroy a");
    assert!(events.contains(&"die usr1 0".to_string()), "{events:?}");
    assert!(
        events.contains(&"die stubborn 137".to_string()),
        "stubborn was not SIGKILLed: {events:?}"
    );
    assert_eq!(
        mark("a.saw").trim(),
        "gone",
        "a got SIGTERM while its dependent stubborn still ran"
    );
    assert!(
        !events.iter().any(|e| e.starts_with("kill usr1")),
        "the daemon signalled usr1, not nanokit: {events:?}"
    );
}

/// A container given a restart policy behind nanokit's back (`docker
/// update --restart always`) is stopped through the daemon, which then
/// knows it was stopped on purpose: `down` never has Docker restart it.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn down_never_has_docker_restart_a_container() {
    let p = DProject::docker(
        "restart",
        r#"
services:
  r:
    image: nk-busybox:latest
    start: "trap 'exit 0' TERM; sleep 600 & wait"
"#,
    );
    ok(&p.up(quick()).await);
    docker(&["update", "--restart", "always", &p.container_of("r")]);
    let watch = watch_actions(&p.name);
    let d = p.p.down().await;
    assert!(d.failures().is_empty(), "{:?}", d.results);
    assert!(p.names().is_empty(), "down left {:?}", p.names());
    let events = watch.until("destroy r");
    assert!(events.iter().any(|e| e.starts_with("die r")), "{events:?}");
    assert!(
        !events
            .iter()
            .any(|e| e.starts_with("start r") || e.starts_with("restart r")),
        "Docker restarted r during down: {events:?}"
    );
}

/// A host `port` that a process on this host already listens on is
/// reported before the container is created, naming that process (here
/// this test); so is one that another project's container publishes,
/// naming the container (Compose: "port is already allocated").
/// Nothing is created for the refused service.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn a_host_port_taken_is_reported_before_the_container_is_created() {
    let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let body = format!(
        "services:\n  web:\n    image: nk-busybox:latest\n    start: \"exec httpd -f -p 80\"\n    expose: 80\n    port: {port}\n"
    );
    let p = DProject::docker("porttaken", &body);
    let r = p.up(quick()).await;
    let err = r.results[0].error.clone().unwrap_or_default();
    assert_eq!(r.results[0].outcome, Phase::Failed, "{err}");
    assert!(
        err.contains(&format!("port {port} is already allocated"))
            && err.contains(&format!("held by pid {} (", std::process::id())),
        "{err}"
    );
    assert!(p.names().is_empty(), "created {:?}", p.names());

    // Published by another project's container instead.
    drop(held);
    let first = DProject::docker("portfirst", &body);
    ok(&first.up(quick()).await);
    let r = p.up(quick()).await;
    let err = r.results[0].error.clone().unwrap_or_default();
    assert_eq!(r.results[0].outcome, Phase::Failed, "{err}");
    assert!(
        err.contains(&format!("port {port} is already allocated: used by container nk-{}-local-web (service `web` of nanokit project `{}`", first.name, first.name)),
        "{err}"
    );
    assert!(p.names().is_empty(), "created {:?}", p.names());
    assert_eq!(first.names().len(), 1);
}

/// A container whose check passes and which then exits while `up` goes on
/// (1.5 s after its start; its dependent takes 3 s to become ready, and
/// the margin leaves a loaded daemon time for the first check) is not reported
/// healthy: `up` fails it, quoting its log, and records the failure. One
/// that exits while its check still fails fails at once, quoting its log.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn a_container_that_exits_after_its_check_passed_fails_the_up_quoting_its_log() {
    let p = DProject::docker(
        "exitlate",
        r#"
services:
  a:
    image: nk-busybox:latest
    start: "sleep 1.5; echo 'fatal: lost the database' >&2; exit 3"
    healthcheck: { test: "true", interval: 1s, retries: 3 }
  b:
    image: nk-busybox:latest
    start: "sleep 3; touch /tmp/ok; exec sleep 600"
    healthcheck: { test: "test -f /tmp/ok", interval: 1s, retries: 5 }
    depends_on: [a]
  c:
    image: nk-busybox:latest
    start: "sleep 0.3; echo 'boom: no config' >&2; exit 2"
    healthcheck: { test: "test -f /never", interval: 60s, retries: 3 }
"#,
    );
    // c's failure is seen when it exits (Docker's wait), not after the
    // minutes its counted failures would take: a guard cancels at 20 s.
    let cancel = tokio_util::sync::CancellationToken::new();
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            cancel.cancel();
        });
    }
    let r = p.up(RunOptions { cancel, ..quick() }).await;
    let c = r.results.iter().find(|x| x.service == "c").unwrap();
    assert_eq!(c.outcome, Phase::Failed, "c: {:?}", c);
    let err = c.error.clone().unwrap();
    assert!(
        err.contains("exited while starting") && err.contains("boom: no config"),
        "{err}"
    );
    let a = r.results.iter().find(|x| x.service == "a").unwrap();
    let b = r.results.iter().find(|x| x.service == "b").unwrap();
    assert_eq!(b.outcome, Phase::Healthy, "{:?}", b.error);
    assert_eq!(a.outcome, Phase::Failed, "a: {:?}", a);
    let err = a.error.clone().unwrap();
    assert!(
        err.contains("exited after its health check passed")
            && err.contains("fatal: lost the database"),
        "{err}"
    );
    assert_eq!(
        p.p.state().resources["a"].status,
        nanokit::state::Status::Failed
    );
}

/// While a container starts (before failures count), its check runs in a
/// loop inside it, every 20 ms, within one exec, instead of one Docker exec
/// per probe (each 50–500 ms on a busy daemon): `late` becomes ready 1.5 s
/// after its start and its dependent starts after exactly one exec.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
async fn a_starting_container_is_checked_in_one_looped_exec() {
    let p = DProject::docker(
        "looped",
        r#"
services:
  late:
    image: nk-busybox:latest
    start: "sleep 1.5; touch /tmp/ready; exec sleep 600"
    healthcheck: { test: ["CMD", "test", "-f", "/tmp/ready"], interval: 60s, retries: 3 }
  next:
    image: nk-busybox:latest
    start: "exec sleep 600"
    depends_on: [late]
"#,
    );
    let watch = watch_actions(&p.name);
    ok(&p.up(quick()).await);
    let events = watch.until("start next");
    let execs: Vec<&String> = events
        .iter()
        .filter(|e| e.starts_with("exec_start") && e.contains(" late"))
        .collect();
    assert_eq!(execs.len(), 1, "{events:#?}");
    assert!(execs[0].contains("nanokit-probe"), "{execs:?}");
}
