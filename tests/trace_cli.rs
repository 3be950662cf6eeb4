//! The CLI's arrangement: a process-wide subscriber (NANOKIT_LOG logging)
//! and each run's own scoped subscriber. Runs must record every service
//! (regression: services' tasks panicked in the subscriber and their
//! results were lost).

mod common;

use std::sync::Arc;

use nanokit::config::{self, LoadOptions};
use nanokit::engine::{self, Phase, RunOptions};
use nanokit::trace::{self, Export, RunMeta, Settings};

async fn up(file: &std::path::Path) -> engine::Report {
    let meta = RunMeta {
        command: "up",
        file: file.to_path_buf(),
        env: "local".into(),
    };
    let settings = Settings {
        export: Export::Off,
        log_to_stderr: true,
        ..Settings::default()
    };
    let (r, t) = trace::record_run(meta, settings, async {
        let cfg =
            nanokit::engine::load_config(|| config::load(&LoadOptions::new(file.to_path_buf())))?;
        let provider = engine::provider_for(&cfg)?;
        engine::up(Arc::new(cfg), provider, RunOptions::default()).await
    })
    .await;
    assert!(t.expect("trace").file.is_some());
    r.expect("up")
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_under_the_cli_subscriber_record_every_service() {
    trace::init_global(true);
    let p = common::Project::new(
        "name: clisub\nservices:\n  a:\n    start: \"exec sleep 600\"\n  b:\n    start: \"exec sleep 600\"\n    depends_on: [a]\n",
    );
    let first = up(&p.file()).await;
    assert_eq!(first.results.len(), 2, "{:?}", first.results);
    assert!(first.results.iter().all(|r| r.outcome == Phase::Healthy));
    let again = up(&p.file()).await;
    assert_eq!(again.results.len(), 2, "{:?}", again.results);
    assert!(again.results.iter().all(|r| r.outcome == Phase::Unchanged));
    p.down().await;
}
