//! Drives [`reconcile`](crate::reconcile::reconcile) on the leader: after every store change,
//! at the requeue time a pass asked for, and at least once a second as a resync.

use crate::reconcile::{reconcile_with_traffic, services_needing_traffic, ControllerConfig};
use crate::rollout::TrafficView;
use flotilla_store::{Command, CommandResult, Store};
use flotilla_types::api::ServiceTraffic;
use flotilla_types::now_ms;
use futures::future::BoxFuture;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;

/// Longest time between two passes, even when nothing changed.
const RESYNC: Duration = Duration::from_secs(1);
/// Changes arriving within this long after the first are handled in one pass.
const DEBOUNCE: Duration = Duration::from_millis(5);
/// Longest wait for changes to settle before the next pass. A pass over 100,000 tasks holds
/// the state's read lock for its whole length (a second or more on a loaded 2-core machine);
/// waiting as long again keeps applies (which need the write lock) from stalling behind
/// back-to-back passes.
const MAX_SETTLE: Duration = Duration::from_secs(2);
/// Batches proposed at once. Each write waits for the ones ahead of it to commit and apply, so
/// proposing a 100-service deploy's 100 batches all at once made the last ones time out (10 s)
/// although raft applied them later, after the controller had been told they failed.
const WRITE_CONCURRENCY: usize = 8;

/// Where releases read what the meshes see (`GET /v1/services/{name}/traffic`, summed over
/// every node). `None` when it cannot be had right now.
pub trait TrafficSource: Send + Sync {
    fn traffic<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Option<ServiceTraffic>>;
}

pub struct ControllerRunner {
    store: Store,
    cfg: ControllerConfig,
    traffic: Option<Arc<dyn TrafficSource>>,
}

impl ControllerRunner {
    pub fn new(store: Store, cfg: ControllerConfig) -> Self {
        ControllerRunner {
            store,
            cfg,
            traffic: None,
        }
    }

    /// Lets blue-green and canary releases observe the meshes.
    pub fn with_traffic(mut self, source: Arc<dyn TrafficSource>) -> Self {
        self.traffic = Some(source);
        self
    }

    async fn observe(&self) -> TrafficView {
        let mut view = TrafficView::new();
        let Some(source) = &self.traffic else {
            return view;
        };
        for service in self.store.read(services_needing_traffic) {
            if let Some(t) = source.traffic(&service).await {
                view.insert(service, t);
            }
        }
        view
    }

    /// Runs until `shutdown` turns true. Only the raft leader reconciles; followers wait.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.store.subscribe();
        let mut was_leader = false;
        let mut settle = DEBOUNCE;
        loop {
            if *shutdown.borrow() {
                return;
            }
            // Only a leader with quorum acts. One that lost quorum could not write heartbeats
            // either: when it regains quorum it counts as newly active, so every node gets a
            // full grace period from then before it can be judged down.
            let leader = self.store.current_leader() == Some(self.store.node_id())
                && self.store.check_quorum().is_ok();
            if leader && !was_leader {
                self.cfg.active_since = now_ms();
                tracing::info!(
                    node = self.store.node_id(),
                    "controllers active on this manager"
                );
            }
            was_leader = leader;
            let mut wait = RESYNC;
            if leader {
                let traffic = self.observe().await;
                let now = now_ms();
                let started = std::time::Instant::now();
                let plan = self
                    .store
                    .read(|state| reconcile_with_traffic(state, now, &self.cfg, &traffic));
                // A pass holds the state's read lock; under a storm of changes, waiting at least
                // as long as a pass took before the next keeps writers from queueing behind us.
                settle = started.elapsed().clamp(DEBOUNCE, MAX_SETTLE);
                // Batches are independent (one per service), so they are proposed together and
                // raft commits them in one go.
                let writes = plan.batches.into_iter().map(|batch| {
                    let store = self.store.clone();
                    async move { store.write(Command::new(batch)).await }
                });
                let results: Vec<_> = futures::stream::iter(writes)
                    .buffer_unordered(WRITE_CONCURRENCY)
                    .collect()
                    .await;
                let mut conflicted = false;
                for result in results {
                    match result {
                        Ok(CommandResult::Applied { .. }) => {}
                        Ok(CommandResult::Conflict { reason, .. })
                        | Ok(CommandResult::NotFound { reason, .. }) => {
                            tracing::debug!(%reason, "controller write raced another writer; re-reading");
                            conflicted = true;
                        }
                        Err(err) => {
                            tracing::warn!(%err, "controller write failed");
                            conflicted = true;
                        }
                    }
                }
                if conflicted {
                    wait = Duration::from_millis(20);
                } else if let Some(at) = plan.requeue_at {
                    let ms = (at - now_ms()).clamp(0, RESYNC.as_millis() as i64);
                    wait = wait.min(Duration::from_millis(ms as u64));
                }
            }
            tokio::select! {
                r = changes.recv() => {
                    if let Err(RecvError::Closed) = r {
                        // Installing a raft snapshot closes subscriptions; follow the new state.
                        changes = self.store.subscribe();
                        continue;
                    }
                    tokio::time::sleep(settle).await;
                    // Level-triggered: what changed does not matter, only that something did.
                    while let Ok(_) | Err(TryRecvError::Lagged(_)) = changes.try_recv() {}
                }
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}
