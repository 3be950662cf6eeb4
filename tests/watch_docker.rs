//! `nanokit watch` on the Docker provider against a real daemon: a
//! container removed (`docker rm -f`), stopped (`docker stop`) or whose
//! main process is SIGKILLed is restored, seen through Docker's event
//! stream; `unless-stopped` leaves what a user stopped alone; Docker's own
//! health verdict restarts an unhealthy container. Needs
//! `NANOKIT_TEST_DOCKER=1` (`eval "$(bash scripts/docker-test-env.sh)"`);
//! without it, outside CI, every test is ignored (SKIPPED).

mod common;
mod services;

use std::process::Command;

use common::watcher::Watcher;
use common::Project;
use serde_json::Value;

fn docker(args: &[&str]) -> String {
    let o = Command::new("docker").args(args).output().expect("docker");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A Docker project with a name of its own, its containers removed on drop.
struct DProject {
    p: Project,
    name: String,
}

impl DProject {
    fn new(prefix: &str, services: &str) -> DProject {
        services::require_docker();
        let name = format!("tw{prefix}{:05x}", fastrand::u32(..0x10_0000));
        let p = Project::new(&format!(
            "name: {name}\ninfra: {{ provider: docker }}\nservices:\n{services}"
        ));
        DProject { p, name }
    }

    /// The id of `service`'s running container (recorded in state).
    fn container(&self, service: &str) -> String {
        let v: Value = serde_json::from_slice(
            &std::fs::read(self.p.path().join(".nanokit/state.json")).unwrap(),
        )
        .unwrap();
        v["resources"][service]["provider_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no container recorded for {service}: {v}"))
            .to_string()
    }

    fn running(&self, id: &str) -> bool {
        docker(&["inspect", "-f", "{{.State.Running}}", id]) == "true"
    }

    fn watch(&self) -> Watcher {
        let mut w = Watcher::start(&self.p.file(), &[], &[]);
        w.until_event("leadershipAcquired", None);
        let done = w.until_event("passFinished", None);
        assert_eq!(done["outcome"], "ok", "{}", w.recent());
        w
    }
}

impl Drop for DProject {
    fn drop(&mut self) {
        let ids = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=nk-project={}", self.name),
        ]);
        let ids: Vec<&str> = ids.lines().filter(|l| !l.is_empty()).collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            docker(&args);
        }
    }
}

fn is(kind: &'static str, service: &'static str) -> impl Fn(&Value) -> bool {
    move |e: &Value| e["type"] == kind && e["service"] == service
}

/// Waits until `service` is restored by the pass its end started (not by
/// the full check): restarted, its pass finished.
fn restored(w: &mut Watcher, service: &'static str) {
    let pass = w.until("pass started", |e| e["type"] == "passStarted");
    assert_eq!(pass["reason"], "restart", "{}", w.recent());
    assert_eq!(pass["services"], serde_json::json!([service]));
    w.until("restarted", is("restarted", service));
    w.until("pass finished", |e| e["type"] == "passFinished");
}

const WEB: &str = "  web:\n    image: nk-busybox:latest\n    start: \"exec httpd -f -p 8080\"\n    expose: 8080\n";
const IDLE: &str = "  idle:\n    image: nk-busybox:latest\n    start: \"exec sleep 600\"\n";

#[test]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
fn removed_stopped_and_killed_containers_are_restored() {
    let p = DProject::new("restore", &format!("{WEB}{IDLE}"));
    let mut w = p.watch();
    let idle = p.container("idle");
    // docker rm -f
    let web = p.container("web");
    docker(&["rm", "-f", &web]);
    let exited = w.until("web exited", is("serviceExited", "web"));
    assert!(
        matches!(exited["exit"]["kind"].as_str(), Some("stopped" | "removed")),
        "a user's removal: {exited}"
    );
    restored(&mut w, "web");
    let web2 = p.container("web");
    assert_ne!(web2, web);
    assert!(p.running(&web2));
    // docker stop
    docker(&["stop", "-t", "1", &web2]);
    let exited = w.until("web exited", is("serviceExited", "web"));
    assert_eq!(exited["exit"]["kind"], "stopped", "{exited}");
    restored(&mut w, "web");
    let web3 = p.container("web");
    assert!(p.running(&web3) && web3 != web2);
    // SIGKILL of the container's main process, from the host.
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &web3]);
    let pid: i32 = pid.parse().unwrap();
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let exited = w.until("web exited", is("serviceExited", "web"));
    assert_eq!(exited["exit"]["kind"], "exited", "{exited}");
    assert_eq!(exited["exit"]["code"], 137, "{exited}");
    restored(&mut w, "web");
    let web4 = p.container("web");
    assert!(p.running(&web4) && web4 != web3);
    assert_eq!(p.container("idle"), idle, "idle was left alone");
    // One container per service, none left over.
    let all = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=nk-project={}", p.name),
    ]);
    assert_eq!(all.lines().count(), 2, "{all}");
}

#[test]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
fn unless_stopped_leaves_a_users_docker_stop_alone_but_restores_a_crash() {
    let p = DProject::new(
        "unless",
        &format!("{WEB}    restart: unless-stopped\n{IDLE}    restart: unless-stopped\n"),
    );
    let mut w = p.watch();
    let idle = p.container("idle");
    let pid: i32 = docker(&["inspect", "-f", "{{.State.Pid}}", &idle])
        .parse()
        .unwrap();
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    restored(&mut w, "idle");
    let web = p.container("web");
    docker(&["stop", "-t", "1", &web]);
    let held = w.until("web held", is("held", "web"));
    assert!(
        held["reason"].as_str().unwrap().contains("unless-stopped"),
        "{held}"
    );
    assert!(!p.running(&web));
    let status: Value = serde_json::from_slice(
        &std::fs::read(p.p.path().join(".nanokit/watch/status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(status["services"]["web"]["health"], "down", "{status}");
}

#[test]
#[cfg_attr(
    not(nk_docker),
    ignore = "SKIPPED: needs NANOKIT_TEST_DOCKER (eval \"$(bash scripts/docker-test-env.sh)\")"
)]
fn dockers_unhealthy_verdict_restarts_the_container() {
    let p = DProject::new(
        "health",
        "  web:\n    image: nk-busybox:latest\n    start: \"rm -f /tmp/broken; exec sleep 600\"\n    healthcheck: { test: \"test ! -f /tmp/broken\", interval: 200ms, retries: 2 }\n",
    );
    let mut w = p.watch();
    let web = p.container("web");
    docker(&["exec", &web, "touch", "/tmp/broken"]);
    let exited = w.until("web unhealthy", is("serviceExited", "web"));
    assert_eq!(exited["exit"]["kind"], "unhealthy", "{exited}");
    restored(&mut w, "web");
    let web2 = p.container("web");
    assert_ne!(web2, web);
    assert!(p.running(&web2));
}
