//! Node liveness: a node whose heartbeat is overdue is judged down, and the tasks of a node
//! recorded down (or removed) are lost, so their slots are refilled elsewhere.

use crate::reconcile::{ms, ControllerConfig, Plan};
use flotilla_store::{ClusterState, Expect, Op};
use flotilla_types::{DesiredState, NodeState, TaskState, TaskStatus, Timestamp};
use std::collections::BTreeMap;

/// Marks nodes whose heartbeat is overdue as down, and their tasks as lost. Returns the nodes
/// that are down after this pass.
pub(crate) fn nodes_pass(
    state: &ClusterState,
    now: Timestamp,
    cfg: &ControllerConfig,
    plan: &mut Plan,
) -> BTreeMap<String, ()> {
    let grace = ms(cfg.node_grace);
    let judging = now - cfg.active_since >= grace;
    let mut down = BTreeMap::new();
    for node in state.nodes.values() {
        let overdue = now - node.last_heartbeat >= grace;
        if node.state == NodeState::Down {
            down.insert(node.id.clone(), ());
        } else if overdue && judging {
            // The verdict is written alone, guarded by the version this pass read: a heartbeat
            // that lands first (say, one queued behind a deploy's writes) voids it. Its tasks
            // are lost only by a later pass that reads the verdict from the store.
            let mut n = node.clone();
            n.state = NodeState::Down;
            n.message = format!(
                "no heartbeat for {}s (grace {}s)",
                (now - node.last_heartbeat) / 1000,
                cfg.node_grace.as_secs()
            );
            tracing::warn!(node = %node.id, reason = %n.message, "judging a node down");
            plan.push(vec![Op::PutNode {
                node: n,
                expect: Expect::Version(node.meta.version),
            }]);
            // Nothing new is placed there in this pass.
            down.insert(node.id.clone(), ());
        } else {
            let due = if judging {
                node.last_heartbeat + grace
            } else {
                cfg.active_since + grace
            };
            plan.requeue(due.max(now + 100));
        }
    }
    for task in state.tasks.values() {
        let Some(node) = &task.node else { continue };
        // A removed node (`node rm`) has no record left to go down, and will never report
        // again: its tasks are lost at once, or its replicas would never be replaced.
        let stored = state.nodes.get(node);
        let removed = stored.is_none();
        let stored_down = stored.is_some_and(|n| n.state == NodeState::Down);
        if !(removed || stored_down) || task.status.state.is_terminal() {
            continue;
        }
        let mut t = task.clone();
        t.desired_state = DesiredState::Shutdown;
        let why = if removed {
            format!("node {node} was removed from the cluster")
        } else {
            format!("node {node} is down")
        };
        t.record_status(TaskStatus::new(TaskState::Lost, now, why));
        plan.push(vec![Op::PutTask {
            task: t,
            expect: Expect::Version(task.meta.version),
        }]);
    }
    down
}
