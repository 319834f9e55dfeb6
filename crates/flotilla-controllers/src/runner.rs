//! Drives [`reconcile`](crate::reconcile::reconcile) on the leader: after every store change,
//! at the requeue time a pass asked for, and at least once a second as a resync.

use crate::reconcile::{reconcile, ControllerConfig};
use flotilla_store::{Command, CommandResult, Store};
use flotilla_types::now_ms;
use std::time::Duration;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;

/// Longest time between two passes, even when nothing changed.
const RESYNC: Duration = Duration::from_secs(1);
/// Changes arriving within this long after the first are handled in one pass.
const DEBOUNCE: Duration = Duration::from_millis(5);

pub struct ControllerRunner {
    store: Store,
    cfg: ControllerConfig,
}

impl ControllerRunner {
    pub fn new(store: Store, cfg: ControllerConfig) -> Self {
        ControllerRunner { store, cfg }
    }

    /// Runs until `shutdown` turns true. Only the raft leader reconciles; followers wait.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.store.subscribe();
        let mut was_leader = false;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let leader = self.store.current_leader() == Some(self.store.node_id());
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
                let now = now_ms();
                let plan = self.store.read(|state| reconcile(state, now, &self.cfg));
                let mut conflicted = false;
                for batch in plan.batches {
                    let span = tracing::debug_span!("controller_write", ops = batch.len());
                    let _enter = span.enter();
                    match self.store.write(Command::new(batch)).await {
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
                    tokio::time::sleep(DEBOUNCE).await;
                    // Level-triggered: what changed does not matter, only that something did.
                    while let Ok(_) | Err(TryRecvError::Lagged(_)) = changes.try_recv() {}
                }
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}
