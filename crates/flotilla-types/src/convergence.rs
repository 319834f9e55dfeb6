//! What "converged" means for a service, defined once. `flotilla deploy` and `flotilla scale`
//! wait for it, `service ls` shows its counts, and the rollout controller ends a release on it.
//!
//! A service has converged when every slot it wants filled runs a task of the current template
//! that is ready (running and, with a health check, healthy), no live task runs another template
//! and, where the caller asks for it, no surplus task is still live. Where the service publishes
//! a port through the mesh, callers that hand the service to clients also wait until every
//! node's mesh routes exactly those tasks ([`meshes_route_only`]).
//!
//! The restart decision of a slot whose task ended is here too ([`restart_attempt`]): the
//! controller acts on it, and the CLI reads from it whether the controller gave up.

use crate::api::ServiceTraffic;
use crate::{
    Availability, DesiredState, Node, NodeState, RestartCondition, ServiceMode, ServiceSpec, Task,
    TaskState, Timestamp,
};
use std::collections::BTreeSet;

/// Slots the service wants filled: its replicas, or for a global service one per node that is
/// ready, active and runs the service's driver.
pub fn desired_tasks<'a>(spec: &ServiceSpec, nodes: impl IntoIterator<Item = &'a Node>) -> u64 {
    match spec.mode {
        ServiceMode::Replicated { replicas } => replicas,
        ServiceMode::Global => nodes
            .into_iter()
            .filter(|n| global_eligible(spec, n))
            .count() as u64,
    }
}

/// Whether a global service wants a task on `node`.
pub fn global_eligible(spec: &ServiceSpec, node: &Node) -> bool {
    node.state == NodeState::Ready
        && node.availability == Availability::Active
        && node.drivers.contains(&spec.driver)
}

/// A task meant to run that has not ended: it holds its slot, or is about to.
pub fn is_live(t: &Task) -> bool {
    t.desired_state == DesiredState::Running && !t.status.state.is_terminal()
}

/// When a ready task counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// As soon as it is ready (`deploy`, `service ls`).
    Immediately,
    /// Once it has been ready for `ms` at `now` (a release's `monitor` period).
    After { now: Timestamp, ms: i64 },
}

impl Settle {
    /// Whether `t` is ready and has been for long enough.
    pub fn counts(self, t: &Task) -> bool {
        t.is_ready()
            && match self {
                Settle::Immediately => true,
                Settle::After { now, ms } => now - t.status.since >= ms,
            }
    }
}

/// Whether live tasks beyond the wanted count hold convergence back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surplus {
    /// The service has converged only with exactly the wanted number of live tasks, none still
    /// starting: what a deploy or a scale waits for.
    Blocks,
    /// Surplus tasks (being scaled away, or duplicates) do not matter: a release is done once
    /// enough new tasks count. The controller tracks replacements still under way per slot.
    Ignored,
}

/// How one task stands towards its service's convergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Live, of the current template, and counts as ready.
    Ready,
    /// Live, of the current template, not ready (yet).
    Starting,
    /// Live, of another template.
    Outdated,
    /// Ended, or being stopped.
    Gone,
}

/// Counts of a service's tasks towards convergence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Convergence {
    /// Slots the service wants filled ([`desired_tasks`]).
    pub desired: u64,
    /// Live tasks of the current template that count as ready.
    pub ready: u64,
    /// Live tasks of the current template not ready yet.
    pub starting: u64,
    /// Live tasks of another template.
    pub outdated: u64,
    /// Outdated tasks that are ready (they still serve, e.g. blue during a blue-green release).
    pub outdated_ready: u64,
    /// Live tasks whose process runs, of any template.
    pub running: u64,
}

impl Convergence {
    /// An empty count for a service that wants `desired` tasks; [`Convergence::add`] each task.
    pub fn new(desired: u64) -> Self {
        Convergence {
            desired,
            ..Convergence::default()
        }
    }

    /// Counts `tasks`; `is_current` says whether a task runs what the service wants now.
    pub fn count<'a>(
        desired: u64,
        tasks: impl IntoIterator<Item = &'a Task>,
        is_current: impl Fn(&Task) -> bool,
        settle: Settle,
    ) -> Self {
        let mut c = Convergence::new(desired);
        for t in tasks {
            c.add(t, is_current(t), settle);
        }
        c
    }

    /// Counts one task and says how it stands.
    pub fn add(&mut self, t: &Task, current: bool, settle: Settle) -> Standing {
        if !is_live(t) {
            return Standing::Gone;
        }
        if t.status.state == TaskState::Running {
            self.running += 1;
        }
        if !current {
            self.outdated += 1;
            if t.is_ready() {
                self.outdated_ready += 1;
            }
            return Standing::Outdated;
        }
        if settle.counts(t) {
            self.ready += 1;
            Standing::Ready
        } else {
            self.starting += 1;
            Standing::Starting
        }
    }

    /// Live tasks of any template.
    pub fn live(&self) -> u64 {
        self.ready + self.starting + self.outdated
    }

    /// Ready tasks of any template (what `service ls` shows as READY).
    pub fn ready_any(&self) -> u64 {
        self.ready + self.outdated_ready
    }

    /// Whether the service runs what it wants: enough ready current tasks, no outdated one,
    /// and with [`Surplus::Blocks`] no other live task either.
    pub fn converged(&self, surplus: Surplus) -> bool {
        self.outdated == 0
            && self.ready >= self.desired
            && match surplus {
                Surplus::Blocks => self.ready == self.desired && self.starting == 0,
                Surplus::Ignored => true,
            }
    }
}

/// Whether the service publishes a port that the nodes' meshes route. Host-mode ports are
/// bound by the tasks themselves: no mesh routes them, and there is nothing to wait for.
pub fn routed_by_mesh(spec: &ServiceSpec) -> bool {
    spec.ports
        .iter()
        .any(|p| p.published.is_some() && p.mode.is_ingress())
}

/// How many meshes must route a task: the meshes that answered (nodes without a mesh route
/// nothing); an older manager's report lacks that count, so then every ready node.
fn meshes_needed(traffic: &ServiceTraffic, ready_nodes: usize) -> u32 {
    traffic
        .meshes
        .unwrap_or_else(|| u32::try_from(ready_nodes).unwrap_or(u32::MAX))
}

/// Every node's mesh sends new work to each of `tasks` (ids). No answer from a node's agent
/// means not yet.
pub fn meshes_route_all<'a>(
    traffic: &ServiceTraffic,
    tasks: impl IntoIterator<Item = &'a str>,
    ready_nodes: usize,
) -> bool {
    if !traffic.unreachable_nodes.is_empty() {
        return false;
    }
    let needed = meshes_needed(traffic, ready_nodes);
    tasks.into_iter().all(|id| {
        traffic
            .tasks
            .iter()
            .any(|tt| tt.task_id == id && tt.routed_by >= needed)
    })
}

/// No node's mesh sends new work to a task other than `tasks` (ids), including tasks already
/// stopped or deleted that a mesh has not dropped yet.
pub fn meshes_route_none_but<'a>(
    traffic: &ServiceTraffic,
    tasks: impl IntoIterator<Item = &'a str>,
) -> bool {
    let keep: BTreeSet<&str> = tasks.into_iter().collect();
    !traffic
        .tasks
        .iter()
        .any(|tt| tt.routed_by > 0 && !keep.contains(tt.task_id.as_str()))
}

/// Every node's mesh routes each of `tasks` and nothing else: a client reaching the published
/// port gets one of them.
pub fn meshes_route_only(traffic: &ServiceTraffic, tasks: &[&str], ready_nodes: usize) -> bool {
    meshes_route_all(traffic, tasks.iter().copied(), ready_nodes)
        && meshes_route_none_but(traffic, tasks.iter().copied())
}

/// When a task started running (its first `running` status), if it did.
pub fn started_at(t: &Task) -> Option<Timestamp> {
    t.history
        .iter()
        .find(|h| h.state == TaskState::Running)
        .map(|h| h.at)
}

/// The restart decision for a slot whose newest ended task of the current template is `last`:
/// `Some(attempt)` for the replacement's attempt number, `None` when the restart policy leaves
/// the slot empty (the controller gave up; the dead task keeps desired `running`).
///
/// A lost task, or one we stopped ourselves (desired `shutdown`), is replaced at once with
/// attempt 0. Otherwise `condition` decides, and the attempt is `last.attempt + 1` (or 1 once the
/// task ran for at least `window`), which must not exceed `max_attempts`.
pub fn restart_attempt(spec: &ServiceSpec, last: &Task) -> Option<u32> {
    let policy = &spec.restart_policy;
    let lost = last.status.state == TaskState::Lost;
    let succeeded = last.status.state == TaskState::Exited && last.status.exit_code == Some(0);
    let stopped_by_us = last.desired_state == DesiredState::Shutdown && !lost;
    if lost || stopped_by_us {
        return Some(0);
    }
    let restart = match policy.condition {
        RestartCondition::None => false,
        RestartCondition::OnFailure => !succeeded,
        RestartCondition::Any => true,
    };
    if !restart {
        return None;
    }
    let ran = started_at(last).map_or(0, |s| last.status.since - s);
    let window_ms = policy
        .window
        .map(|w| i64::try_from(w.as_millis()).unwrap_or(i64::MAX));
    let window_passed = window_ms.is_some_and(|w| ran >= w);
    let attempt = if window_passed { 1 } else { last.attempt + 1 };
    if policy.max_attempts.is_some_and(|max| attempt > max) {
        return None;
    }
    Some(attempt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::TaskTraffic;
    use crate::{Health, Meta, TaskStatus};
    use std::time::Duration;

    fn task(id: &str, spec: &ServiceSpec, state: TaskState, since: Timestamp) -> Task {
        // Fields left out take their serde defaults: a fresh pending task of slot 1.
        let mut t: Task = serde_json::from_value(serde_json::json!({
            "id": id,
            "service": spec.name,
            "slot": 1,
            "revision": 1,
            "spec": spec,
            "node": "n1",
            "desired_state": DesiredState::Running,
            "status": TaskStatus::new(TaskState::Pending, 0, ""),
            "meta": Meta::default(),
        }))
        .expect("a task");
        t.record_status(TaskStatus::new(state, since, ""));
        t
    }

    fn spec(replicas: u64) -> ServiceSpec {
        let mut s = ServiceSpec::process("web", vec!["x".into()]);
        s.mode = ServiceMode::Replicated { replicas };
        s
    }

    #[test]
    fn converged_needs_every_slot_ready_and_nothing_outdated() {
        let s = spec(2);
        let mut other = s.clone();
        other.environment.insert("V".into(), "2".into());
        let a = task("a", &s, TaskState::Running, 0);
        let b = task("b", &s, TaskState::Starting, 0);
        let old = task("o", &other, TaskState::Running, 0);
        let count = |ts: &[&Task]| {
            Convergence::count(
                2,
                ts.iter().copied(),
                |t| t.spec.task_template_eq(&s),
                Settle::Immediately,
            )
        };
        let c = count(&[&a, &b]);
        assert_eq!((c.ready, c.starting, c.live()), (1, 1, 2));
        assert!(!c.converged(Surplus::Blocks));
        let mut b2 = b.clone();
        b2.record_status(TaskStatus::new(TaskState::Running, 0, ""));
        assert!(count(&[&a, &b2]).converged(Surplus::Blocks));
        let c = count(&[&a, &b2, &old]);
        assert_eq!((c.outdated, c.outdated_ready, c.ready_any()), (1, 1, 3));
        assert!(!c.converged(Surplus::Ignored));
        // A surplus current task (being scaled away) blocks a deploy, not a release.
        let extra = task("e", &s, TaskState::Starting, 0);
        let c = count(&[&a, &b2, &extra]);
        assert!(!c.converged(Surplus::Blocks));
        assert!(c.converged(Surplus::Ignored));
        // Ended and stopping tasks do not count.
        let mut dead = task("d", &s, TaskState::Failed, 0);
        dead.desired_state = DesiredState::Shutdown;
        assert!(count(&[&a, &b2, &dead]).converged(Surplus::Blocks));
    }

    #[test]
    fn settle_waits_for_the_monitor_period() {
        let s = spec(1);
        let t = task("a", &s, TaskState::Running, 1_000);
        assert!(!Settle::After {
            now: 1_500,
            ms: 1_000
        }
        .counts(&t));
        assert!(Settle::After {
            now: 2_000,
            ms: 1_000
        }
        .counts(&t));
        let mut checked = s.clone();
        checked.healthcheck = Some(crate::HealthCheck::with_defaults(crate::HealthTest::Tcp));
        let mut sick = task("b", &checked, TaskState::Running, 0);
        sick.status.health = Health::Starting;
        assert!(!Settle::Immediately.counts(&sick));
    }

    #[test]
    fn restart_decision_follows_the_policy() {
        let mut s = spec(1);
        s.restart_policy.condition = RestartCondition::OnFailure;
        s.restart_policy.max_attempts = Some(2);
        let mut failed = task("a", &s, TaskState::Running, 1_000);
        failed.record_status(TaskStatus {
            exit_code: Some(1),
            ..TaskStatus::new(TaskState::Failed, 2_000, "exited with code 1")
        });
        assert_eq!(restart_attempt(&s, &failed), Some(1));
        failed.attempt = 1;
        assert_eq!(restart_attempt(&s, &failed), Some(2));
        failed.attempt = 2;
        assert_eq!(restart_attempt(&s, &failed), None, "attempts exhausted");
        // Ran longer than the window: the count starts over.
        s.restart_policy.window = Some(Duration::from_millis(500));
        assert_eq!(restart_attempt(&s, &failed), Some(1));
        // Stopped by us: replaced whatever the policy.
        failed.desired_state = DesiredState::Shutdown;
        s.restart_policy.condition = RestartCondition::None;
        assert_eq!(restart_attempt(&s, &failed), Some(0));
        failed.desired_state = DesiredState::Running;
        assert_eq!(restart_attempt(&s, &failed), None);
        let mut ok = task("b", &spec(1), TaskState::Exited, 0);
        ok.status.exit_code = Some(0);
        let mut on_failure = spec(1);
        on_failure.restart_policy.condition = RestartCondition::OnFailure;
        assert_eq!(restart_attempt(&on_failure, &ok), None);
    }

    #[test]
    fn meshes_route_only_the_given_tasks() {
        let routed = |id: &str, by: u32| TaskTraffic {
            task_id: id.into(),
            routed_by: by,
            ..TaskTraffic::default()
        };
        let mut traffic = ServiceTraffic {
            service: "web".into(),
            tasks: vec![routed("a", 2), routed("b", 1)],
            unreachable_nodes: Vec::new(),
            meshes: Some(2),
        };
        assert!(
            !meshes_route_only(&traffic, &["a", "b"], 2),
            "b on one node only"
        );
        assert!(!meshes_route_only(&traffic, &["a"], 2), "b still gets work");
        traffic.tasks[1].routed_by = 2;
        assert!(meshes_route_only(&traffic, &["a", "b"], 2));
        assert!(
            !meshes_route_only(&traffic, &["a", "b", "c"], 2),
            "c not routed"
        );
        traffic.meshes = None;
        assert!(
            !meshes_route_only(&traffic, &["a", "b"], 3),
            "every ready node without a count"
        );
        traffic.unreachable_nodes.push("n3".into());
        traffic.meshes = Some(2);
        assert!(
            !meshes_route_only(&traffic, &["a", "b"], 2),
            "a node did not answer"
        );
    }
}
