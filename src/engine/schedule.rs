//! The DAG scheduler: each node runs as soon as every node it waits for
//! ended well, at most `limit` at a time; a node whose wait failed is
//! skipped, and nothing new starts once the run is cancelled.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::instrument::WithSubscriber;
use tracing::{info_span, Instrument, Span};

use super::report::{StepError, StepResult};
use crate::trace;

#[derive(Clone, Copy, PartialEq)]
enum Done {
    Pending,
    Ok,
    NotOk,
}

/// Runs `work` for every node, each after the nodes in its `waits` ended
/// well, at most `limit` at a time. A node whose wait failed is skipped.
pub(super) async fn schedule<F, Fut>(
    nodes: Vec<(String, Vec<String>)>,
    limit: usize,
    cancel: CancellationToken,
    on_skip: impl Fn(&str, String) + Send + Sync + 'static,
    work: F,
) -> Vec<(String, StepResult, u64)>
where
    F: Fn(String, Instant) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = StepResult> + Send + 'static,
{
    let mut senders = HashMap::new();
    let mut receivers = HashMap::new();
    for (n, _) in &nodes {
        let (tx, rx) = watch::channel(Done::Pending);
        senders.insert(n.clone(), tx);
        receivers.insert(n.clone(), rx);
    }
    let sem = Arc::new(Semaphore::new(limit.max(1)));
    let work = Arc::new(work);
    let on_skip = Arc::new(on_skip);
    let mut set = tokio::task::JoinSet::new();
    for (name, waits) in nodes {
        let tx = senders.remove(&name).expect("sender");
        let rxs: Vec<(String, watch::Receiver<Done>)> = waits
            .iter()
            .filter_map(|w| receivers.get(w).map(|r| (w.clone(), r.clone())))
            .collect();
        let sem = sem.clone();
        let work = work.clone();
        let on_skip = on_skip.clone();
        let cancel = cancel.clone();
        let span = info_span!("service", nanokit.service = %name);
        let task = async move {
            let deps = rxs
                .iter()
                .map(|(d, _)| d.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let wait = async {
                for (dep, mut rx) in rxs {
                    let v = rx.wait_for(|d| *d != Done::Pending).await.map(|d| *d);
                    if let Ok(Done::NotOk) | Err(_) = v {
                        return Some(dep);
                    }
                }
                None
            };
            let failed_dep = if deps.is_empty() {
                wait.await
            } else {
                let s =
                    info_span!("dependencies", nanokit.service = %name, nanokit.waits_for = %deps);
                wait.instrument(s).await
            };
            if let Some(dep) = failed_dep {
                let why = format!("skipped: `{dep}` did not come up");
                trace::set(&Span::current(), "nanokit.outcome", "skipped");
                trace::set(&Span::current(), "nanokit.skip_reason", why.clone());
                on_skip(&name, why.clone());
                let _ = tx.send(Done::NotOk);
                return (name, Err(StepError::Skipped(why)), 0);
            }
            let _permit = match sem.try_acquire() {
                Ok(p) => p,
                Err(_) => sem
                    .acquire()
                    .instrument(info_span!("concurrency", nanokit.service = %name))
                    .await
                    .expect("semaphore"),
            };
            if cancel.is_cancelled() {
                trace::set(&Span::current(), "nanokit.outcome", "cancelled");
                let _ = tx.send(Done::NotOk);
                return (name, Err(StepError::Cancelled), 0);
            }
            let started_work = Instant::now();
            let r = work(name.clone(), started_work).await;
            match &r {
                Ok(p) => trace::set(&Span::current(), "nanokit.outcome", p.as_str()),
                Err(StepError::Cancelled) => {
                    trace::set(&Span::current(), "nanokit.outcome", "cancelled")
                }
                Err(e) => {
                    trace::set(&Span::current(), "nanokit.outcome", "failed");
                    trace::fail(&Span::current(), &e.to_string());
                }
            }
            let _ = tx.send(if r.is_ok() { Done::Ok } else { Done::NotOk });
            (name, r, started_work.elapsed().as_millis() as u64)
        };
        // Awaited inside, so the span is dropped while the run's subscriber
        // is the default (a span's parent is released through the default).
        set.spawn(async move { task.instrument(span).await }.with_current_subscriber());
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::engine::report::Phase;

    fn nodes(spec: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        spec.iter()
            .map(|(n, w)| (n.to_string(), w.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    async fn run(
        spec: &[(&str, &[&str])],
        cancel: CancellationToken,
    ) -> BTreeMap<String, StepResult> {
        let out = schedule(
            nodes(spec),
            2,
            cancel,
            |_, _| {},
            |name, _| async move {
                match name.as_str() {
                    "bad" => Err(StepError::failed("boom")),
                    _ => Ok(Phase::Healthy),
                }
            },
        )
        .await;
        out.into_iter().map(|(n, r, _)| (n, r)).collect()
    }

    #[tokio::test]
    async fn a_failed_node_skips_what_waits_for_it_and_nothing_else() {
        let r = run(
            &[
                ("bad", &[]),
                ("after", &["bad"]),
                ("later", &["after"]),
                ("free", &[]),
            ],
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r["bad"], Err(StepError::failed("boom")));
        assert_eq!(
            r["after"],
            Err(StepError::Skipped("skipped: `bad` did not come up".into()))
        );
        assert_eq!(
            r["later"],
            Err(StepError::Skipped(
                "skipped: `after` did not come up".into()
            ))
        );
        assert_eq!(r["free"], Ok(Phase::Healthy));
    }

    #[tokio::test]
    async fn nothing_starts_once_the_run_is_cancelled() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let r = run(&[("a", &[]), ("b", &["a"])], cancel).await;
        assert_eq!(r["a"], Err(StepError::Cancelled));
        assert!(r["b"].is_err(), "{:?}", r["b"]);
    }
}
