//! Node liveness: a node whose heartbeat is overdue is judged down, and the tasks of a node
//! recorded down (or removed) are lost, so their slots are refilled elsewhere.
//!
//! Unless too many nodes look down at once (Kubernetes' full-disruption mode): then the cause
//! is more likely the network or the control plane than the nodes, and replacing every task
//! would turn the outage into a restart storm. The rule ([`disrupted`]), applied to the whole
//! cluster and to each zone: at least two nodes down, and more than half of them. A single
//! node, or one dead worker of three, is still judged as usual. The nodes are marked down,
//! but their tasks are kept (not lost, not replaced) until the disruption ends; one event says
//! so when it begins ([`DISRUPTION_RECORD`]), another when it ends.

use crate::reconcile::{ms, ControllerConfig, Plan};
use flotilla_store::{ClusterState, Expect, Op, Record};
use flotilla_types::{DesiredState, Node, NodeState, TaskState, TaskStatus, Timestamp};
use std::collections::{BTreeMap, BTreeSet};

/// The record that marks a disruption in progress. It lives in the store, so a new leader
/// neither repeats the event nor misses the end; the store narrates `episode/` records.
pub const DISRUPTION_RECORD: &str = "episode/node-disruption";

/// What a pass concluded about the nodes.
#[derive(Debug, Default)]
pub(crate) struct Verdicts {
    /// Nodes down after this pass (recorded so, or judged so now).
    pub down: BTreeSet<String>,
    /// Down nodes whose tasks are kept, because too many nodes are down at once.
    pub held: BTreeSet<String>,
}

/// Judges nodes down, decides whether a disruption holds their tasks, and marks the tasks of
/// down nodes that are not held (and of removed nodes) lost.
pub(crate) fn nodes_pass(
    state: &ClusterState,
    now: Timestamp,
    cfg: &ControllerConfig,
    plan: &mut Plan,
) -> Verdicts {
    let down = judge_nodes(state, now, cfg, plan);
    let held = held_nodes(state.nodes.values(), &down);
    disruption_episode(state, &down, &held, plan);
    lose_tasks(state, now, &held, plan);
    Verdicts { down, held }
}

/// Marks nodes whose heartbeat is overdue as down. Returns every node that is down.
fn judge_nodes(
    state: &ClusterState,
    now: Timestamp,
    cfg: &ControllerConfig,
    plan: &mut Plan,
) -> BTreeSet<String> {
    let grace = ms(cfg.node_grace);
    let judging = now - cfg.active_since >= grace;
    let mut down = BTreeSet::new();
    for node in state.nodes.values() {
        let overdue = now - node.last_heartbeat >= grace;
        if node.state == NodeState::Down {
            down.insert(node.id.clone());
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
            down.insert(node.id.clone());
        } else {
            let due = if judging {
                node.last_heartbeat + grace
            } else {
                cfg.active_since + grace
            };
            plan.requeue(due.max(now + 100));
        }
    }
    down
}

/// Whether `down` of `total` nodes being down at once is a disruption rather than node
/// failures: at least two down, and more than half.
pub(crate) fn disrupted(down: usize, total: usize) -> bool {
    down >= 2 && down * 2 > total
}

/// The down nodes whose tasks are kept: all of them when the cluster is disrupted, else those
/// of each disrupted zone.
pub(crate) fn held_nodes<'a>(
    nodes: impl Iterator<Item = &'a Node>,
    down: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut zones: BTreeMap<&str, (usize, Vec<&str>)> = BTreeMap::new();
    let (mut total, mut all_down) = (0, Vec::new());
    for n in nodes {
        total += 1;
        let is_down = down.contains(&n.id);
        if is_down {
            all_down.push(n.id.as_str());
        }
        if let Some(zone) = &n.zone {
            let z = zones.entry(zone.as_str()).or_default();
            z.0 += 1;
            if is_down {
                z.1.push(n.id.as_str());
            }
        }
    }
    if disrupted(all_down.len(), total) {
        return all_down.into_iter().map(str::to_string).collect();
    }
    zones
        .into_values()
        .filter(|(total, down)| disrupted(down.len(), *total))
        .flat_map(|(_, down)| down)
        .map(str::to_string)
        .collect()
}

/// Records a disruption when one begins (the store narrates it as a warning), and removes the
/// record when it ends: one event each way per episode, not one per pass.
fn disruption_episode(
    state: &ClusterState,
    down: &BTreeSet<String>,
    held: &BTreeSet<String>,
    plan: &mut Plan,
) {
    let recorded = state.records.contains_key(DISRUPTION_RECORD);
    if held.is_empty() {
        if recorded {
            tracing::info!("node disruption over: tasks of down nodes are replaced again");
            plan.push(vec![Op::DeleteRecord {
                key: DISRUPTION_RECORD.to_string(),
                expect: Expect::Exists,
            }]);
        }
        return;
    }
    if recorded {
        return;
    }
    let names: Vec<&str> = held.iter().map(String::as_str).collect();
    let message = format!(
        "{} of {} nodes are down at once ({}): more likely a network or control-plane \
         outage than node failures, so their tasks are kept, not replaced, until they \
         report again or are removed (`node rm`)",
        down.len(),
        state.nodes.len(),
        names.join(", ")
    );
    tracing::warn!(%message, "node disruption");
    plan.push(vec![Op::PutRecord {
        record: Record {
            key: DISRUPTION_RECORD.to_string(),
            value: serde_json::json!({ "message": message }),
            meta: Default::default(),
        },
        expect: Expect::Absent,
    }]);
}

/// Marks lost the tasks of nodes recorded down (unless held) or removed.
fn lose_tasks(state: &ClusterState, now: Timestamp, held: &BTreeSet<String>, plan: &mut Plan) {
    for task in state.tasks.values() {
        let Some(node) = &task.node else { continue };
        // A removed node (`node rm`) has no record left to go down, and will never report
        // again: its tasks are lost at once, or its replicas would never be replaced.
        let stored = state.nodes.get(node);
        let removed = stored.is_none();
        let stored_down = stored.is_some_and(|n| n.state == NodeState::Down);
        let lost = removed || (stored_down && !held.contains(node));
        if !lost || task.status.state.is_terminal() {
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
}

#[cfg(test)]
mod tests {
    use super::disrupted;

    #[test]
    fn the_disruption_rule_spares_single_failures_in_small_clusters() {
        // (down, total, disrupted)
        let table = [
            (1, 1, false), // a lone node going silent is judged as usual
            (1, 2, false),
            (2, 2, true),
            (1, 3, false), // one dead worker of three is replaced
            (2, 3, true),
            (2, 4, false),
            (3, 5, true),
            (50, 100, false),
            (51, 100, true),
        ];
        for (down, total, want) in table {
            assert_eq!(disrupted(down, total), want, "{down} of {total} down");
        }
    }
}
