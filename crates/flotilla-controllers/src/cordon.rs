//! Auto-cordon: a node that keeps failing to start tasks (disk full, a port stuck, a broken
//! runtime) is set to availability `pause`, so no new tasks are sent there. Its running tasks
//! stay. Only an operator re-enables it (`flotilla node update --availability active`).

use flotilla_store::{ClusterState, Expect, Op};
use flotilla_types::{Availability, Node, NodeState, Task, TaskState, Timestamp};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

/// Failures older than this do not count.
pub const START_FAILURE_WINDOW_MS: i64 = 120_000;
/// This many start failures within the window pause the node...
pub const START_FAILURE_LIMIT: usize = 5;
/// ...when they come from at least this many services. One broken service fails on every node
/// and says nothing about the node (the scheduler already steers that service away).
pub const START_FAILURE_SERVICES: usize = 2;

/// Prefix of the reason `node ls` shows for a node this pass paused.
pub const AUTO_PAUSE_PREFIX: &str = "auto-paused";

/// A task that failed or was rejected without ever running.
pub fn is_start_failure(t: &Task) -> bool {
    matches!(t.status.state, TaskState::Failed | TaskState::Rejected)
        && !t.history.iter().any(|h| h.state == TaskState::Running)
}

/// Pauses every ready, active node with too many recent start failures, as long as another
/// ready, active node remains (cordoning the last one would only stop healthy services from
/// being replaced). `nodes` is the pass's view of the nodes (down nodes already marked),
/// borrowed from the state where unchanged; the paused ones are updated in place (copied) so
/// this pass places nothing on them.
pub fn cordon_pass(state: &ClusterState, nodes: &mut [Cow<'_, Node>], now: Timestamp) -> Vec<Op> {
    let usable = |n: &Node| n.state == NodeState::Ready && n.availability == Availability::Active;
    let mut remaining = nodes.iter().filter(|n| usable(n)).count();
    let mut ops = Vec::new();
    // One scan of the tasks, not one per node: at 10,000 nodes and 100,000 tasks a scan per
    // node made every pass take seconds.
    let mut recent: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    for t in state.tasks.values() {
        if let Some(node) = t.node.as_deref() {
            if is_start_failure(t) && now - t.status.since < START_FAILURE_WINDOW_MS {
                recent.entry(node).or_default().push(t);
            }
        }
    }
    for node in nodes.iter_mut() {
        if !usable(node) || remaining <= 1 {
            continue;
        }
        let mut failures = recent.remove(node.id.as_str()).unwrap_or_default();
        let services: BTreeSet<&str> = failures.iter().map(|t| t.service.as_str()).collect();
        if failures.len() < START_FAILURE_LIMIT || services.len() < START_FAILURE_SERVICES {
            continue;
        }
        failures.sort_by_key(|t| t.status.since);
        let last = failures
            .last()
            .map(|t| format!("; last: {}: {}", t.name(), t.status.message))
            .unwrap_or_default();
        let Some(stored) = state.nodes.get(&node.id) else {
            continue;
        };
        let mut paused = stored.clone();
        paused.availability = Availability::Pause;
        paused.message = format!(
            "{AUTO_PAUSE_PREFIX}: {} tasks of {} services failed to start here within {}s{last}",
            failures.len(),
            services.len(),
            START_FAILURE_WINDOW_MS / 1000,
        );
        tracing::warn!(node = %node.id, reason = %paused.message, "pausing a node that keeps failing to start tasks");
        node.to_mut().availability = Availability::Pause;
        remaining -= 1;
        ops.push(Op::PutNode {
            node: paused,
            expect: Expect::Version(stored.meta.version),
        });
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_types::testing;
    use flotilla_types::{DesiredState, ServiceSpec, TaskStatus};

    const NOW: Timestamp = 1_000_000;

    fn node(id: &str) -> Node {
        testing::node(id).heartbeat(NOW).version(7).build()
    }

    fn failed(id: &str, service: &str, node: &str, at: Timestamp, ran: bool) -> Task {
        let spec = ServiceSpec::process(service, vec!["x".into()]);
        let mut t = testing::task(id, &spec)
            .on(node)
            .desired(DesiredState::Shutdown)
            .status(TaskState::Pending, at - 10)
            .build();
        if ran {
            t.record_status(TaskStatus::new(TaskState::Running, at - 5, ""));
        }
        t.record_status(TaskStatus::new(
            TaskState::Failed,
            at,
            "chdir: no such file",
        ));
        t
    }

    /// The pass's view of `nodes`.
    fn view(nodes: &[Node]) -> Vec<Cow<'_, Node>> {
        nodes.iter().map(Cow::Borrowed).collect()
    }

    fn state(tasks: Vec<Task>, nodes: &[Node]) -> ClusterState {
        ClusterState {
            tasks: tasks.into_iter().map(|t| (t.id.clone(), t)).collect(),
            nodes: nodes.iter().map(|n| (n.id.clone(), n.clone())).collect(),
            ..ClusterState::default()
        }
    }

    fn failures(n: usize, services: &[&str], node: &str, at: Timestamp) -> Vec<Task> {
        (0..n)
            .map(|i| {
                failed(
                    &format!("{node}{i}"),
                    services[i % services.len()],
                    node,
                    at,
                    false,
                )
            })
            .collect()
    }

    #[test]
    fn repeated_failures_across_services_pause_the_node_with_a_reason() {
        let stored = vec![node("a"), node("b")];
        let s = state(failures(5, &["api", "web"], "b", NOW - 1000), &stored);
        let mut nodes = view(&stored);
        let ops = cordon_pass(&s, &mut nodes, NOW);
        assert_eq!(ops.len(), 1);
        let Op::PutNode { node, expect } = &ops[0] else {
            panic!("expected PutNode, got {ops:?}");
        };
        assert_eq!(node.id, "b");
        assert_eq!(node.availability, Availability::Pause);
        assert!(
            node.message.starts_with(AUTO_PAUSE_PREFIX),
            "{}",
            node.message
        );
        assert!(
            node.message.contains("5 tasks of 2 services"),
            "{}",
            node.message
        );
        assert!(
            node.message.contains("chdir: no such file"),
            "{}",
            node.message
        );
        assert_eq!(*expect, Expect::Version(7));
        assert_eq!(
            nodes[1].availability,
            Availability::Pause,
            "this pass sees it too"
        );
    }

    #[test]
    fn too_few_old_single_service_or_ran_failures_do_not_count() {
        let cases: Vec<(&str, Vec<Task>)> = vec![
            (
                "four failures",
                failures(4, &["api", "web"], "b", NOW - 1000),
            ),
            ("one service", failures(8, &["web"], "b", NOW - 1000)),
            (
                "too old",
                failures(6, &["api", "web"], "b", NOW - START_FAILURE_WINDOW_MS - 1),
            ),
            (
                "they ran first",
                (0..6)
                    .map(|i| failed(&i.to_string(), ["a", "b"][i % 2], "b", NOW - 10, true))
                    .collect(),
            ),
        ];
        for (what, tasks) in cases {
            let nodes = vec![node("a"), node("b")];
            let s = state(tasks, &nodes);
            assert!(cordon_pass(&s, &mut view(&nodes), NOW).is_empty(), "{what}");
        }
    }

    #[test]
    fn the_last_usable_node_is_never_paused() {
        let nodes = vec![node("a"), node("b")];
        let mut tasks = failures(5, &["api", "web"], "a", NOW - 1000);
        tasks.extend(failures(5, &["api", "web"], "b", NOW - 1000));
        let s = state(tasks, &nodes);
        assert_eq!(cordon_pass(&s, &mut view(&nodes), NOW).len(), 1);

        let alone = vec![node("b")];
        let s = state(failures(9, &["api", "web"], "b", NOW - 1000), &alone);
        assert!(cordon_pass(&s, &mut view(&alone), NOW).is_empty());
    }

    #[test]
    fn paused_and_down_nodes_are_left_alone() {
        let mut paused = node("b");
        paused.availability = Availability::Pause;
        let mut down = node("c");
        down.state = NodeState::Down;
        let nodes = vec![node("a"), paused, down];
        let mut tasks = failures(5, &["api", "web"], "b", NOW - 1000);
        tasks.extend(failures(5, &["api", "web"], "c", NOW - 1000));
        let s = state(tasks, &nodes);
        assert!(cordon_pass(&s, &mut view(&nodes), NOW).is_empty());
    }
}
