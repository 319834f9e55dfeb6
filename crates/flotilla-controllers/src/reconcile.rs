//! The pure reconcile pass: `(state, now) -> ops`.
//!
//! Each service is reduced to *slots*: replica numbers `1..=replicas` for a replicated service, or
//! eligible nodes for a global one. Every slot should hold exactly one live task (desired
//! `running`) of the current task template. A slot whose task died gets a replacement according
//! to the restart policy; a slot whose task runs an outdated template gets a new task first and
//! loses the old one once the new one is ready (start-first, one slot at a time).

use flotilla_scheduler::{schedule, ClusterSnapshot, PlacementRequest};
use flotilla_store::{ClusterState, Expect, Op};
use flotilla_types::{
    new_task_id, Availability, DependencyCondition, DesiredState, Meta, Node, NodeState,
    RestartCondition, Service, ServiceMode, Task, TaskState, TaskStatus, Timestamp,
};
use std::collections::BTreeMap;
use std::time::Duration;

/// Tunables of the controllers.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A node whose last heartbeat is older than this is marked down and its tasks lost.
    pub node_grace: Duration,
    /// Terminal tasks kept per slot for `ps` history; older ones are deleted.
    pub task_history_per_slot: usize,
    /// When this controller became active. Nodes are not judged down before `node_grace` has
    /// passed since then, so a manager restart does not declare every node dead.
    pub active_since: Timestamp,
    /// A task that ran at least this long resets the restart backoff.
    pub backoff_reset_after: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            node_grace: Duration::from_secs(5),
            task_history_per_slot: 5,
            active_since: 0,
            backoff_reset_after: Duration::from_secs(60),
        }
    }
}

/// What one pass wants done.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    /// Independent batches: each is written as one atomic command, so a conflict in one
    /// (say, an agent's status report racing a task update) does not hold back the others.
    pub batches: Vec<Vec<Op>>,
    /// The earliest time something is due (a restart delay, a heartbeat deadline).
    pub requeue_at: Option<Timestamp>,
}

impl Plan {
    fn requeue(&mut self, at: Timestamp) {
        self.requeue_at = Some(self.requeue_at.map_or(at, |r| r.min(at)));
    }

    fn push(&mut self, batch: Vec<Op>) {
        if !batch.is_empty() {
            self.batches.push(batch);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// One reconcile pass over the whole cluster.
pub fn reconcile(state: &ClusterState, now: Timestamp, cfg: &ControllerConfig) -> Plan {
    let mut plan = Plan::default();
    let down_nodes = nodes_pass(state, now, cfg, &mut plan);

    let nodes: Vec<Node> = state
        .nodes
        .values()
        .map(|n| {
            let mut n = n.clone();
            if down_nodes.contains_key(&n.id) {
                n.state = NodeState::Down;
            }
            n
        })
        .collect();
    let holding = state.tasks.values().filter(|t| {
        t.node.is_some()
            && !t.status.state.is_terminal()
            && t.desired_state == DesiredState::Running
    });
    let mut snapshot = ClusterSnapshot::new(&nodes, holding, now);
    for t in state.tasks.values() {
        if let (Some(node), true) = (&t.node, is_recent_start_failure(t, now)) {
            snapshot.record_start_failure(&t.service, node, t.status.since);
        }
    }

    for service in state.services.values() {
        let mut batch = Vec::new();
        let mut ctx = ServiceCtx {
            state,
            service,
            now,
            cfg,
            nodes: &nodes,
            snapshot: &mut snapshot,
            plan_requeue: None,
            ops: &mut batch,
        };
        ctx.run();
        if let Some(at) = ctx.plan_requeue {
            plan.requeue(at);
        }
        plan.push(batch);
    }

    orphans_pass(state, &mut plan);
    plan
}

/// Marks nodes whose heartbeat is overdue as down, and their tasks as lost. Returns the nodes
/// that are down after this pass.
fn nodes_pass(
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
            let mut n = node.clone();
            n.state = NodeState::Down;
            n.message = format!(
                "no heartbeat for {}s (grace {}s)",
                (now - node.last_heartbeat) / 1000,
                cfg.node_grace.as_secs()
            );
            plan.push(vec![Op::PutNode {
                node: n,
                expect: Expect::Version(node.meta.version),
            }]);
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
        if !down.contains_key(node) || task.status.state.is_terminal() {
            continue;
        }
        let mut t = task.clone();
        t.desired_state = DesiredState::Shutdown;
        t.record_status(TaskStatus::new(
            TaskState::Lost,
            now,
            format!("node {node} is down"),
        ));
        plan.push(vec![Op::PutTask {
            task: t,
            expect: Expect::Version(task.meta.version),
        }]);
    }
    down
}

/// Tasks of services that no longer exist: stop the live ones, delete the finished ones.
fn orphans_pass(state: &ClusterState, plan: &mut Plan) {
    let mut batch = Vec::new();
    for task in state.tasks.values() {
        if state.services.contains_key(&task.service) {
            continue;
        }
        if task.status.state.is_terminal()
            || (task.node.is_none() && !task.status.state.is_active())
        {
            batch.push(Op::DeleteTask {
                id: task.id.clone(),
                expect: Expect::Version(task.meta.version),
            });
        } else if task.desired_state == DesiredState::Running {
            batch.push(Op::SetTaskDesired {
                id: task.id.clone(),
                desired: DesiredState::Shutdown,
                expect: Expect::Version(task.meta.version),
            });
        }
    }
    plan.push(batch);
}

/// A failure to start (never reached `running`) in the last ten minutes: the scheduler should
/// avoid that node for this service for a while.
fn is_recent_start_failure(t: &Task, now: Timestamp) -> bool {
    matches!(t.status.state, TaskState::Failed | TaskState::Rejected)
        && now - t.status.since < 600_000
        && !t.history.iter().any(|h| h.state == TaskState::Running)
}

/// When the task first reached `running`, from its history.
fn started_at(t: &Task) -> Option<Timestamp> {
    t.history
        .iter()
        .find(|h| h.state == TaskState::Running)
        .map(|h| h.at)
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SlotKey {
    Replica(u64),
    Node(String),
}

struct ServiceCtx<'a> {
    state: &'a ClusterState,
    service: &'a Service,
    now: Timestamp,
    cfg: &'a ControllerConfig,
    nodes: &'a [Node],
    snapshot: &'a mut ClusterSnapshot,
    plan_requeue: Option<Timestamp>,
    ops: &'a mut Vec<Op>,
}

impl ServiceCtx<'_> {
    fn requeue(&mut self, at: Timestamp) {
        self.plan_requeue = Some(self.plan_requeue.map_or(at, |r| r.min(at)));
    }

    fn run(&mut self) {
        let mut slots: BTreeMap<SlotKey, Vec<&Task>> = BTreeMap::new();
        let mut has_any_task = false;
        for t in self.state.tasks_of(&self.service.name) {
            has_any_task = true;
            let key = match (t.slot, &t.node) {
                (Some(s), _) => SlotKey::Replica(s),
                (None, Some(n)) => SlotKey::Node(n.clone()),
                // A global task without a node was never placed; treat it as its own slot so
                // it gets cleaned up.
                (None, None) => SlotKey::Node(String::new()),
            };
            slots.entry(key).or_default().push(t);
        }
        for tasks in slots.values_mut() {
            tasks.sort_by(|a, b| (a.meta.created_at, &a.id).cmp(&(b.meta.created_at, &b.id)));
        }

        let wanted: Vec<SlotKey> = match self.service.spec.mode {
            ServiceMode::Replicated { replicas } => (1..=replicas).map(SlotKey::Replica).collect(),
            ServiceMode::Global => self
                .nodes
                .iter()
                .filter(|n| self.global_eligible(n))
                .map(|n| SlotKey::Node(n.id.clone()))
                .collect(),
        };

        // First start waits for dependencies; once a service has run, its replacements don't.
        let gated = if has_any_task {
            None
        } else {
            self.dependency_gate()
        };
        if let Some(reason) = &gated {
            tracing::debug!(service = %self.service.name, %reason, "waiting for dependencies");
            self.requeue(self.now + 1000);
        }

        let mut updating_slots = 0usize;
        for key in &wanted {
            let tasks = slots.get(key).map(Vec::as_slice).unwrap_or(&[]);
            let live = tasks.iter().filter(|t| {
                t.desired_state == DesiredState::Running && !t.status.state.is_terminal()
            });
            let (current, outdated): (Vec<&&Task>, Vec<&&Task>) =
                live.partition(|t| t.spec.task_template_eq(&self.service.spec));
            if !current.is_empty() && !outdated.is_empty() {
                updating_slots += 1;
            }
        }

        for key in &wanted {
            let tasks = slots.remove(key).unwrap_or_default();
            self.reconcile_slot(key, &tasks, gated.is_some(), &mut updating_slots);
        }
        // Slots no longer wanted: scaled away, or a node that left global eligibility.
        for (key, tasks) in slots {
            for t in &tasks {
                if t.desired_state == DesiredState::Running && !t.status.state.is_terminal() {
                    self.shutdown(t);
                }
            }
            self.collect_garbage(&key, &tasks);
        }
    }

    fn global_eligible(&self, n: &Node) -> bool {
        n.state == NodeState::Ready
            && n.availability == Availability::Active
            && n.drivers.contains(&self.service.spec.driver)
    }

    /// `Some(reason)` while a dependency is not yet started/healthy.
    fn dependency_gate(&self) -> Option<String> {
        for (dep, cond) in &self.service.spec.depends_on {
            if !self.state.services.contains_key(dep) {
                return Some(format!("dependency {dep} does not exist"));
            }
            let satisfied = self.state.tasks_of(dep).any(|t| match cond {
                DependencyCondition::ServiceStarted => t.status.state == TaskState::Running,
                DependencyCondition::ServiceHealthy => {
                    t.status.state == TaskState::Running
                        && (t.spec.healthcheck.is_none()
                            || t.status.health == flotilla_types::Health::Healthy)
                }
            });
            if !satisfied {
                let what = match cond {
                    DependencyCondition::ServiceStarted => "started",
                    DependencyCondition::ServiceHealthy => "healthy",
                };
                return Some(format!("waiting for {dep} to be {what}"));
            }
        }
        None
    }

    fn shutdown(&mut self, t: &Task) {
        if t.node.is_none() && !t.status.state.is_active() {
            // Never reached a node: nothing to stop, finish it here.
            let mut done = t.clone();
            done.desired_state = DesiredState::Shutdown;
            done.record_status(TaskStatus::new(
                TaskState::Exited,
                self.now,
                "cancelled before start",
            ));
            self.ops.push(Op::PutTask {
                task: done,
                expect: Expect::Version(t.meta.version),
            });
        } else {
            self.ops.push(Op::SetTaskDesired {
                id: t.id.clone(),
                desired: DesiredState::Shutdown,
                expect: Expect::Version(t.meta.version),
            });
        }
    }

    fn reconcile_slot(
        &mut self,
        key: &SlotKey,
        tasks: &[&Task],
        gated: bool,
        updating_slots: &mut usize,
    ) {
        let spec = &self.service.spec;
        let live: Vec<&Task> = tasks
            .iter()
            .copied()
            .filter(|t| t.desired_state == DesiredState::Running && !t.status.state.is_terminal())
            .collect();
        let (current, outdated): (Vec<&Task>, Vec<&Task>) =
            live.iter().partition(|t| t.spec.task_template_eq(spec));

        if current.len() > 1 {
            // Duplicates (e.g. after a manager failover replayed a creation): keep the oldest.
            for t in &current[1..] {
                self.shutdown(t);
            }
        }
        if let Some(cur) = current.first() {
            if !outdated.is_empty() && cur.is_ready() {
                for t in &outdated {
                    self.shutdown(t);
                }
                *updating_slots = updating_slots.saturating_sub(1);
            }
            if cur.node.is_none() {
                self.place_existing(cur);
            }
        } else if !gated {
            let is_update = !outdated.is_empty();
            // Start-first rolling update, one slot at a time.
            if !is_update || *updating_slots == 0 {
                if let Some(task) = self.next_task(key, tasks) {
                    if is_update {
                        *updating_slots += 1;
                    }
                    // The dead tasks this one replaces are acknowledged by setting them to
                    // desired shutdown. A dead task the policy does not replace keeps desired
                    // `running`, which is how the next pass knows it already decided.
                    for t in tasks {
                        if t.desired_state == DesiredState::Running && t.status.state.is_terminal()
                        {
                            self.ops.push(Op::SetTaskDesired {
                                id: t.id.clone(),
                                desired: DesiredState::Shutdown,
                                expect: Expect::Version(t.meta.version),
                            });
                        }
                    }
                    self.create(task, key);
                }
            }
        }
        self.collect_garbage(key, tasks);
    }

    /// The replacement (or first) task for a slot, honouring the restart policy; `None` when the
    /// policy says the slot stays empty.
    fn next_task(&mut self, key: &SlotKey, tasks: &[&Task]) -> Option<Task> {
        let spec = &self.service.spec;
        let policy = &spec.restart_policy;
        // The newest finished task of the current template decides restart behaviour; tasks of
        // older templates failing is not this template's fault.
        let last = tasks
            .iter()
            .rev()
            .find(|t| t.status.state.is_terminal() && t.spec.task_template_eq(spec))
            .copied();
        let mut attempt = 0;
        let mut not_before = None;
        if let Some(last) = last {
            let lost = last.status.state == TaskState::Lost;
            let succeeded =
                last.status.state == TaskState::Exited && last.status.exit_code == Some(0);
            // Desired shutdown on a finished task means we stopped it (scale-down, update) or
            // already replaced it; either way its exit says nothing about this template.
            let stopped_by_us = last.desired_state == DesiredState::Shutdown && !lost;
            let restart = lost
                || stopped_by_us
                || match policy.condition {
                    RestartCondition::None => false,
                    RestartCondition::OnFailure => !succeeded,
                    RestartCondition::Any => true,
                };
            if !restart {
                return None;
            }
            if !lost && !stopped_by_us {
                let ran = started_at(last).map_or(0, |s| last.status.since - s);
                let window_passed = policy.window.is_some_and(|w| ran >= ms(w));
                attempt = if window_passed { 1 } else { last.attempt + 1 };
                if policy.max_attempts.is_some_and(|max| attempt > max) {
                    tracing::info!(service = %self.service.name, ?key, attempt, "restart attempts exhausted");
                    return None;
                }
                let streak = tasks
                    .iter()
                    .rev()
                    .filter(|t| t.status.state.is_terminal())
                    .take_while(|t| {
                        let ran = started_at(t).map_or(0, |s| t.status.since - s);
                        ran < ms(self
                            .cfg
                            .backoff_reset_after
                            .max(policy.window.unwrap_or_default()))
                    })
                    .count();
                let delay =
                    policy.backoff(u32::try_from(streak.saturating_sub(1)).unwrap_or(u32::MAX));
                let due = last.status.since + ms(delay);
                if due > self.now {
                    not_before = Some(due);
                    self.requeue(due);
                }
            }
        }
        let now = self.now;
        Some(Task {
            id: new_task_id(),
            service: self.service.name.clone(),
            slot: match key {
                SlotKey::Replica(s) => Some(*s),
                SlotKey::Node(_) => None,
            },
            revision: self.service.revision,
            spec: spec.clone(),
            node: None,
            desired_state: DesiredState::Running,
            status: TaskStatus::new(
                TaskState::Pending,
                now,
                match not_before {
                    Some(at) => format!("restart delayed {}ms (attempt {attempt})", at - now),
                    None => String::new(),
                },
            ),
            history: Vec::new(),
            attempt,
            not_before,
            weight: None,
            meta: Meta::default(),
        })
    }

    fn create(&mut self, mut task: Task, key: &SlotKey) {
        task.record_status(task.status.clone());
        match key {
            SlotKey::Node(node) => {
                task.node = Some(node.clone());
                task.record_status(TaskStatus::new(
                    TaskState::Assigned,
                    self.now,
                    format!("assigned to {node}"),
                ));
            }
            SlotKey::Replica(_) => self.try_place(&mut task),
        }
        self.ops.push(Op::PutTask {
            task,
            expect: Expect::Absent,
        });
    }

    /// Pending tasks that could not be placed on an earlier pass get another try.
    fn place_existing(&mut self, t: &Task) {
        let mut task = t.clone();
        self.try_place(&mut task);
        if task.node.is_some() || task.status.message != t.status.message {
            self.ops.push(Op::PutTask {
                task,
                expect: Expect::Version(t.meta.version),
            });
        } else {
            self.requeue(self.now + 2000);
        }
    }

    fn try_place(&mut self, task: &mut Task) {
        let req = PlacementRequest::new(&self.service.spec, 1);
        match schedule(self.snapshot, &req) {
            Ok(placements) if !placements.is_empty() => {
                let node = placements[0].node.clone();
                task.node = Some(node.clone());
                task.record_status(TaskStatus::new(
                    TaskState::Assigned,
                    self.now,
                    format!("assigned to {node}"),
                ));
            }
            Ok(_) => {}
            Err(failure) => {
                if task.status.message != failure.reason {
                    let mut st = task.status.clone();
                    st.message = failure.reason.clone();
                    task.status = st;
                }
                tracing::info!(service = %self.service.name, task = %task.id, reason = %failure.reason, "task not placed");
            }
        }
    }

    /// Deletes finished tasks beyond the per-slot history limit, oldest first.
    fn collect_garbage(&mut self, _key: &SlotKey, tasks: &[&Task]) {
        let finished: Vec<&&Task> = tasks
            .iter()
            .filter(|t| t.status.state.is_terminal() && t.desired_state == DesiredState::Shutdown)
            .collect();
        let excess = finished
            .len()
            .saturating_sub(self.cfg.task_history_per_slot);
        for t in finished.into_iter().take(excess) {
            self.ops.push(Op::DeleteTask {
                id: t.id.clone(),
                expect: Expect::Version(t.meta.version),
            });
        }
    }
}
