//! Matches the tasks the manager assigned to this node against the runners that exist: starts
//! a runner for each new task, adopts the workloads a previous agent left, stops what the
//! cluster wants stopped, and removes what finished tasks left on the node (logs, stopped
//! container, task dir) once their records are deleted from the store — as Swarm keeps a
//! slot's task history with its logs.

use crate::driver::RecoveredTask;
use crate::runner::{report, run_task, Launch, RunnerCtx};
use flotilla_client::Mirror;
use flotilla_types::{now_ms, DesiredState, DriverKind, Task, TaskState, TaskStatus};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// A task with a runner on this node.
struct LocalTask {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
    driver: DriverKind,
}

pub(crate) struct Reconciler {
    ctx: RunnerCtx,
    local: BTreeMap<String, LocalTask>,
    /// Tasks whose runner ended: what their workload left (logs, stopped container, task dir)
    /// stays until their record is deleted from the store.
    finished: BTreeMap<String, DriverKind>,
    /// Found on the node at start-up and not yet matched to a task record.
    recovered: BTreeMap<String, (DriverKind, RecoveredTask)>,
    /// Tasks we already told the manager are not running here, so we say it once.
    reported_gone: BTreeSet<String>,
    first_snapshot_seen: bool,
    /// What to do with workloads found at start-up that the first snapshot does not know.
    unknown: UnknownWorkloads,
}

/// How the agent treats workloads found on the node at start-up whose tasks the cluster's
/// first snapshot does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownWorkloads {
    /// The store knew this node before (its record predates this agent's registration): a
    /// task it does not hold was deleted (a `service rm` while the agent was down, a
    /// collected record), so its workload is stopped and removed.
    StopIfNodeKnown {
        /// The store created this node's record at this agent's registration: it is new or
        /// lost its state, so it cannot tell a deleted task from one it never heard of.
        node_new_to_store: bool,
    },
    /// `--discard-unknown-workloads`: the operator accepts that they are stopped.
    Discard,
}

impl UnknownWorkloads {
    fn stop(self) -> bool {
        match self {
            UnknownWorkloads::StopIfNodeKnown { node_new_to_store } => !node_new_to_store,
            UnknownWorkloads::Discard => true,
        }
    }
}

impl Reconciler {
    pub(crate) fn new(
        ctx: RunnerCtx,
        recovered: BTreeMap<String, (DriverKind, RecoveredTask)>,
        unknown: UnknownWorkloads,
    ) -> Self {
        Reconciler {
            ctx,
            local: BTreeMap::new(),
            finished: BTreeMap::new(),
            recovered,
            reported_gone: BTreeSet::new(),
            first_snapshot_seen: false,
            unknown,
        }
    }

    /// Acts on the node's tasks in `mirror`, which must hold a whole snapshot.
    pub(crate) fn reconcile(&mut self, mirror: &Mirror) {
        self.prune(mirror);
        for task in mirror.tasks.values() {
            if task.node.as_deref() == Some(self.ctx.node.as_str()) {
                self.reconcile_task(task);
            }
        }
        // Runners whose task record disappeared: stop the workload.
        for (id, local) in &self.local {
            if !mirror.tasks.contains_key(id) {
                let _ = local.stop.send(true);
            }
        }
        if !self.first_snapshot_seen {
            self.first_snapshot_seen = true;
            self.stop_orphans(mirror);
        }
    }

    /// Notes the runners that ended, and removes what finished tasks left on the node once
    /// their records are gone from `mirror` (a whole snapshot).
    pub(crate) fn prune(&mut self, mirror: &Mirror) {
        let ended: Vec<String> = self
            .local
            .iter()
            .filter(|(_, t)| t.handle.is_finished())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ended {
            if let Some(t) = self.local.remove(&id) {
                self.finished.insert(id, t.driver);
            }
        }
        let deleted: Vec<String> = self
            .finished
            .keys()
            .filter(|id| !mirror.tasks.contains_key(*id))
            .cloned()
            .collect();
        for id in deleted {
            let Some(kind) = self.finished.remove(&id) else {
                continue;
            };
            let Some(driver) = self.ctx.drivers.get(&kind).cloned() else {
                continue;
            };
            self.reported_gone.remove(&id);
            let span = tracing::info_span!("prune", task = %id);
            tokio::spawn(
                async move {
                    match driver.remove(&id).await {
                        Ok(()) => tracing::debug!("removed a deleted task's leftovers"),
                        Err(e) => {
                            tracing::warn!(error = %e, "removing a deleted task's leftovers failed")
                        }
                    }
                }
                .instrument(span),
            );
        }
    }

    fn reconcile_task(&mut self, task: &Task) {
        // What an ended task left, found at start-up: kept for its logs. Its end is on record
        // already; reporting it again would rewrite it.
        let ended_and_recorded = task.status.state.is_terminal()
            && matches!(self.recovered.get(&task.id), Some((_, rec)) if rec.exited.is_some());
        if ended_and_recorded {
            if let Some((kind, _)) = self.recovered.remove(&task.id) {
                self.finished.insert(task.id.clone(), kind);
            }
            return;
        }
        // A task that ran here and ended is never started again (restarts are new tasks).
        let known_here = self.local.contains_key(&task.id) || self.finished.contains_key(&task.id);
        match task.desired_state {
            DesiredState::Running => {
                if known_here {
                    return;
                }
                if let Some((_, rec)) = self.recovered.remove(&task.id) {
                    self.spawn(task.clone(), Launch::Adopt(rec), false);
                } else if matches!(task.status.state, TaskState::Pending | TaskState::Assigned) {
                    self.spawn(task.clone(), Launch::Start, false);
                } else if task.status.state.is_active() {
                    self.report_gone(
                        task,
                        TaskState::Failed,
                        "the task's process is not on this node (lost across an agent restart)",
                    );
                }
            }
            // Ended here: nothing to stop, and its end was reported by its runner.
            DesiredState::Shutdown if self.finished.contains_key(&task.id) => {}
            DesiredState::Shutdown => {
                if let Some(local) = self.local.get(&task.id) {
                    let _ = local.stop.send(true);
                } else if let Some((_, rec)) = self.recovered.remove(&task.id) {
                    self.spawn(task.clone(), Launch::Adopt(rec), true);
                } else if matches!(task.status.state, TaskState::Pending | TaskState::Assigned) {
                    self.report_gone(task, TaskState::Exited, "cancelled before start");
                } else if task.status.state.is_active() {
                    self.report_gone(task, TaskState::Exited, "not running on this node");
                }
            }
        }
    }

    /// Workloads found at start-up that the cluster no longer knows (e.g. the service was
    /// removed while this agent was down): stop and remove them, unless the store met this
    /// node only now ([`UnknownWorkloads`]); then they keep running, untouched, and are
    /// reported.
    fn stop_orphans(&mut self, mirror: &Mirror) {
        let orphans: Vec<String> = self
            .recovered
            .keys()
            .filter(|id| !mirror.tasks.contains_key(*id))
            .cloned()
            .collect();
        if orphans.is_empty() {
            return;
        }
        if !self.unknown.stop() {
            let running = orphans
                .iter()
                .filter(|id| matches!(self.recovered.get(*id), Some((_, r)) if r.exited.is_none()))
                .count();
            tracing::error!(
                count = orphans.len(),
                running,
                tasks = %orphans.join(","),
                "the cluster's store does not know this node's workloads and met this node only \
                 now (a new or lost store?): leaving them running and untouched. Restore the \
                 store from a snapshot or a peer, or restart the node with \
                 --discard-unknown-workloads to stop them"
            );
            return;
        }
        for id in orphans {
            let Some((kind, rec)) = self.recovered.remove(&id) else {
                continue;
            };
            tracing::info!(task = %id, "stopping a workload the cluster no longer knows");
            let ctx = self.ctx.clone();
            tokio::spawn(async move {
                if let Some(driver) = ctx.drivers.get(&kind) {
                    if rec.exited.is_none() {
                        let _ = driver.stop(&rec.task_id, 15, Duration::from_secs(10)).await;
                    }
                    let _ = driver.remove(&rec.task_id).await;
                }
                for p in rec.ports {
                    ctx.ports.release(p.host_port);
                }
            });
        }
    }

    fn report_gone(&mut self, task: &Task, state: TaskState, why: &str) {
        if !self.reported_gone.insert(task.id.clone()) {
            return;
        }
        let mut status = TaskStatus::new(state, now_ms(), why);
        status.health = task.status.health;
        let ctx = self.ctx.clone();
        let id = task.id.clone();
        tokio::spawn(async move {
            report(&ctx, &id, status).await;
        });
    }

    fn spawn(&mut self, task: Task, launch: Launch, stop_now: bool) {
        let (stop_tx, stop_rx) = watch::channel(stop_now);
        let span = tracing::info_span!("task", service = %task.service, task = %task.id, node = %self.ctx.node);
        let driver = task.spec.driver;
        let handle = tokio::spawn(
            run_task(self.ctx.clone(), task.clone(), launch, stop_rx).instrument(span),
        );
        self.local.insert(
            task.id,
            LocalTask {
                stop: stop_tx,
                handle,
                driver,
            },
        );
    }

    /// Waits for every runner; they see the same shutdown signal and return without stopping
    /// workloads.
    pub(crate) async fn join(self) {
        for (_, t) in self.local {
            let _ = t.handle.await;
        }
    }
}
