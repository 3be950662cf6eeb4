//! PlanEngine: actions and reasons against real state; plan output never
//! shows env values; deleting a volume needs --force.

mod common;

use common::Project;
use nanokit::engine::plan::{ActionKind, PlanOptions};
use nanokit::engine::{self, EngineError, RunOptions};

async fn plan(p: &Project) -> nanokit::engine::plan::Plan {
    let cfg = p.config();
    let provider = engine::provider_for(&cfg).unwrap();
    engine::make_plan(&cfg, provider.as_ref(), &PlanOptions::default())
        .await
        .unwrap()
}

const V1: &str = r#"
name: planner
volumes:
  data: {}
services:
  a:
    start: "exec sleep 600"
    env: { SECRET: hunter2-value, KEEP: same }
    volumes: ["data:/data"]
  b:
    start: "exec sleep 600"
    depends_on: [a]
  c:
    start: "exec sleep 600"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn create_update_delete_noop_with_reasons() {
    let p = Project::new(V1);
    let first = plan(&p).await;
    assert!(first
        .actions
        .iter()
        .all(|a| a.action == ActionKind::Create && a.reasons == ["new service"]));
    assert_eq!(first.volumes[0].action, ActionKind::Create);
    p.up(RunOptions::default()).await.unwrap();
    let same = plan(&p).await;
    assert!(!same.has_changes(), "{}", same.render());
    // Config hashes are stable across loads.
    assert_eq!(
        same.actions[0].config_hash,
        plan(&p).await.actions[0].config_hash
    );

    let v2 = V1
        .replace("SECRET: hunter2-value", "SECRET: hunter3-value")
        .replace("KEEP: same }", "KEEP: same, NEW: x }")
        .replace("  c:\n    start: \"exec sleep 600\"\n", "")
        .replace(
            "    depends_on: [a]\n",
            "    depends_on: [a]\n    port: 9\n",
        );
    p.write(&v2);
    let pl = plan(&p).await;
    let get = |n: &str| pl.actions.iter().find(|a| a.service == n).unwrap();
    assert_eq!(get("a").action, ActionKind::Update);
    assert_eq!(get("a").reasons, ["env.NEW added", "env.SECRET changed"]);
    assert_eq!(get("b").action, ActionKind::Update);
    assert_eq!(get("b").reasons, ["expose added", "port added"]);
    assert_eq!(get("c").action, ActionKind::Delete);
    let text = pl.render();
    assert!(
        text.contains("~ a (update)\n    env.NEW added\n    env.SECRET changed"),
        "{text}"
    );
    assert!(text.contains("- c (delete)"), "{text}");
    assert!(
        !text.contains("hunter"),
        "a secret value leaked into the plan"
    );
    let json = serde_json::to_string(&pl).unwrap();
    assert!(
        !json.contains("hunter"),
        "a secret value leaked into the saved plan"
    );
    let state_text = std::fs::read_to_string(p.config().state_file).unwrap();
    assert!(
        !state_text.contains("hunter"),
        "a secret value leaked into state"
    );
    p.down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_volume_needs_force() {
    let p = Project::new(V1);
    p.up(RunOptions::default()).await.unwrap();
    let vol = p.config().volume_dir("data");
    assert!(vol.is_dir());
    std::fs::write(vol.join("precious"), "data").unwrap();
    p.write(
        &V1.replace("volumes:\n  data: {}\n", "")
            .replace("    volumes: [\"data:/data\"]\n", ""),
    );
    let pl = plan(&p).await;
    assert_eq!(pl.volumes.len(), 1);
    assert_eq!(pl.volumes[0].action, ActionKind::Delete);
    assert!(pl.volumes[0].needs_force);
    assert_eq!(pl.blocked(false), ["data"]);
    assert!(pl.render().contains("needs --force"));
    let e = p.up(RunOptions::default()).await.unwrap_err();
    assert!(matches!(e, EngineError::NeedsForce(_)), "{e}");
    assert!(vol.join("precious").exists(), "refused up must not delete");
    p.up(RunOptions {
        force: true,
        ..RunOptions::default()
    })
    .await
    .unwrap();
    assert!(!vol.exists());
    assert!(p.state().volumes.is_empty());
    p.down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_plan_saves_latest_json_and_detailed_exitcode() {
    let p = Project::new(V1);
    assert_eq!(
        nanokit::cli::run(p.args(&["plan", "--detailed-exitcode"])).await,
        2
    );
    let saved: nanokit::engine::plan::Plan = serde_json::from_slice(
        &std::fs::read(p.path().join(".nanokit/plans/latest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved.actions.len(), 3);
    assert_eq!(nanokit::cli::run(p.args(&["up"])).await, 0);
    assert_eq!(
        nanokit::cli::run(p.args(&["plan", "--detailed-exitcode"])).await,
        0
    );
    assert_eq!(nanokit::cli::run(p.args(&["plan"])).await, 0);
    assert_eq!(
        nanokit::cli::run(p.args(&["status", "--output", "json"])).await,
        0
    );
    assert_eq!(nanokit::cli::run(p.args(&["down"])).await, 0);
}

/// `restart` replaces the running instances of the services named (with
/// the reason in the plan), leaves what they depend on and what depends on
/// them running, and refuses a service that is not in the configuration.
#[tokio::test(flavor = "multi_thread")]
async fn restart_replaces_only_the_services_named() {
    let p = Project::new(V1);
    p.up(RunOptions::default()).await.unwrap();
    let ids = |p: &Project| {
        p.state()
            .resources
            .iter()
            .map(|(n, r)| (n.clone(), r.provider_id.clone().unwrap()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let before = ids(&p);
    let cfg = p.config();
    let provider = engine::provider_for(&cfg).unwrap();
    let opts = PlanOptions {
        targets: vec!["a".into()],
        restart: vec!["a".into()],
    };
    let pl = engine::make_plan(&cfg, provider.as_ref(), &opts)
        .await
        .unwrap();
    let get = |n: &str| pl.actions.iter().find(|a| a.service == n).unwrap();
    assert_eq!(get("a").action, ActionKind::Update);
    assert_eq!(get("a").reasons, ["restart requested"]);
    assert_eq!(get("a").stop, [before["a"].clone()]);
    assert_eq!(pl.actions.len(), 1, "only a: {}", pl.render());
    let report = engine::restart(
        std::sync::Arc::new(cfg),
        provider,
        vec!["a".into()],
        RunOptions::default(),
    )
    .await
    .unwrap();
    assert!(report.failures().is_empty());
    let after = ids(&p);
    assert_ne!(after["a"], before["a"], "a runs as a new instance");
    assert_eq!(
        after["b"], before["b"],
        "b, which depends on a, kept running"
    );
    assert_eq!(after["c"], before["c"]);
    let cfg = p.config();
    let provider = engine::provider_for(&cfg).unwrap();
    let e = engine::restart(
        std::sync::Arc::new(cfg),
        provider,
        vec!["nope".into()],
        RunOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, EngineError::Plan(_)), "{e}");
    p.down().await;
}
