//! The pure reconcile pass: `(state, now) -> ops`.
//!
//! Each service is reduced to *slots*: replica numbers `1..=replicas` for a replicated service, or
//! eligible nodes for a global one. Every slot should hold exactly one live task (desired
//! `running`) of the current task template. A slot whose task died gets a replacement according
//! to the restart policy. A slot whose task runs an outdated template is replaced as the
//! service's release ([`crate::rollout`]) allows: rolling batches, or blue-green and canary
//! traffic shifts.

use crate::cordon::{cordon_pass, is_start_failure};
use crate::drain::{self, SlotMove, SlotTasks};
use crate::liveness::nodes_pass;
use crate::preempt::{set_preemption_budgets, settle_nominations};
use crate::rollout::{self, Release, ReleaseGuard, ReleaseInput, TrafficView};
use flotilla_scheduler::{schedule, ClusterSnapshot, Placement, PlacementRequest};
use flotilla_store::{ClusterState, Expect, Op};
use flotilla_types::convergence::{restart_attempt, started_at};
use flotilla_types::{
    Availability, DependencyCondition, DesiredState, Node, NodeState, Nomination, Service,
    ServiceMode, Task, TaskState, TaskStatus, Timestamp,
};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    /// When task starts fail cluster-wide, rollouts pause.
    pub release_guard: ReleaseGuard,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            node_grace: Duration::from_secs(5),
            task_history_per_slot: 5,
            active_since: 0,
            backoff_reset_after: Duration::from_secs(60),
            release_guard: ReleaseGuard::default(),
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
    pub(crate) fn requeue(&mut self, at: Timestamp) {
        self.requeue_at = Some(self.requeue_at.map_or(at, |r| r.min(at)));
    }

    pub(crate) fn push(&mut self, batch: Vec<Op>) {
        if !batch.is_empty() {
            self.batches.push(batch);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// One reconcile pass over the whole cluster, without mesh traffic data.
pub fn reconcile(state: &ClusterState, now: Timestamp, cfg: &ControllerConfig) -> Plan {
    reconcile_with_traffic(state, now, cfg, &TrafficView::new())
}

/// One reconcile pass over the whole cluster; `traffic` is what the meshes report for services
/// whose release waits on them.
pub fn reconcile_with_traffic(
    state: &ClusterState,
    now: Timestamp,
    cfg: &ControllerConfig,
    traffic: &TrafficView,
) -> Plan {
    let mut plan = Plan::default();
    let verdicts = nodes_pass(state, now, cfg, &mut plan);

    // The pass's view of the nodes: borrowed from the state, copied only where this pass sees
    // them differently (marked down, auto-paused). Copying every node on every pass made
    // registering 10,000 nodes quadratic.
    let mut nodes: Vec<Cow<'_, Node>> = state
        .nodes
        .values()
        .map(|n| {
            if n.state != NodeState::Down && verdicts.down.contains(&n.id) {
                let mut n = n.clone();
                n.state = NodeState::Down;
                Cow::Owned(n)
            } else {
                Cow::Borrowed(n)
            }
        })
        .collect();
    plan.push(cordon_pass(state, &mut nodes, now));
    let ready_nodes = nodes.iter().filter(|n| n.state == NodeState::Ready).count();
    let holding = state.tasks.values().filter(|t| {
        t.node.is_some()
            && !t.status.state.is_terminal()
            && t.desired_state == DesiredState::Running
    });
    let mut snapshot = ClusterSnapshot::new(nodes.iter().map(|n| &**n), holding, now);
    let mut nominated = Vec::new();
    // Tasks by service, from one scan: `ClusterState::tasks_of` looks each task up by id, and
    // at 100 services × 1,000 tasks those lookups dominated the pass.
    let mut by_service: HashMap<&str, Vec<&Task>> = HashMap::new();
    for t in state.tasks.values() {
        by_service.entry(t.service.as_str()).or_default().push(t);
        if let (Some(node), true) = (&t.node, is_recent_start_failure(t, now)) {
            snapshot.record_start_failure(&t.service, node, t.status.since);
        }
        if t.desired_state == DesiredState::Shutdown {
            snapshot.hold_stopping(t);
        } else if t.node.is_none() && t.status.state == TaskState::Pending {
            if let Some(n) = &t.nomination {
                nominated.push((t, &**n));
            }
        }
    }
    if state
        .services
        .values()
        .any(|s| s.spec.placement.priority > 0)
    {
        set_preemption_budgets(state, &mut snapshot);
    }
    // Before anything else is placed, so the room the victims freed goes to the task they made
    // way for, not to whichever service sorts first (say, the victims' own replacements).
    let nominations = settle_nominations(state, &mut snapshot, &nominated);

    // Pending tasks are placed in priority order (highest `x-flotilla.priority` first, by name
    // among equals): what this pass places first gets the room, and preemption only evicts
    // tasks that were already placed, so a low-priority service sorting first by name would
    // otherwise take the last room from a higher-priority one.
    let mut by_priority: Vec<&Service> = state.services.values().collect();
    by_priority.sort_by_key(|s| std::cmp::Reverse(s.spec.placement.priority));
    for service in by_priority {
        let mut batch = Vec::new();
        let mut ctx = ServiceCtx {
            state,
            service,
            now,
            cfg,
            nodes: &nodes,
            ready_nodes,
            by_service: &by_service,
            snapshot: &mut snapshot,
            plan_requeue: None,
            ops: &mut batch,
            traffic,
            nominations: &nominations,
            held: &verdicts.held,
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

/// Services whose rollout waits on mesh traffic (blue-green and canary in progress, and a
/// rolling one waiting for the meshes to route only its new tasks).
pub fn services_needing_traffic(state: &ClusterState) -> Vec<String> {
    state
        .rollouts
        .values()
        .filter(|r| {
            r.is_active()
                && (r.strategy != flotilla_types::Strategy::Rolling
                    || r.phase == flotilla_types::RolloutPhase::Routing)
        })
        .filter(|r| state.services.contains_key(&r.service))
        .map(|r| r.service.clone())
        .collect()
}

/// Tasks and rollouts of services that no longer exist: stop the live tasks, delete the finished
/// ones and the rollouts.
fn orphans_pass(state: &ClusterState, plan: &mut Plan) {
    let mut batch = Vec::new();
    for r in state.rollouts.values() {
        if !state.services.contains_key(&r.service) {
            batch.push(Op::DeleteRollout {
                service: r.service.clone(),
                expect: Expect::Version(r.meta.version),
            });
        }
    }
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
    is_start_failure(t) && now - t.status.since < 600_000
}

/// Meant to run and not finished.
pub(crate) fn is_live(t: &Task) -> bool {
    t.desired_state == DesiredState::Running && !t.status.state.is_terminal()
}

/// When the task first reached `running`, from its history.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SlotKey {
    Replica(u64),
    Node(String),
}

struct ServiceCtx<'a, 'n> {
    state: &'a ClusterState,
    service: &'a Service,
    now: Timestamp,
    cfg: &'a ControllerConfig,
    nodes: &'a [Cow<'n, Node>],
    /// Nodes in state ready, for releases.
    ready_nodes: usize,
    /// Every task, by service, in id order (as `ClusterState::tasks_of` yields them).
    by_service: &'a HashMap<&'a str, Vec<&'a Task>>,
    snapshot: &'a mut ClusterSnapshot<'n>,
    plan_requeue: Option<Timestamp>,
    ops: &'a mut Vec<Op>,
    traffic: &'a TrafficView,
    nominations: &'a BTreeMap<String, Option<Placement>>,
    /// Down nodes whose tasks are kept during a disruption ([`crate::liveness`]).
    held: &'a BTreeSet<String>,
}

impl<'a> ServiceCtx<'a, '_> {
    fn requeue(&mut self, at: Timestamp) {
        self.plan_requeue = Some(self.plan_requeue.map_or(at, |r| r.min(at)));
    }

    fn tasks_of(&self, service: &str) -> impl Iterator<Item = &'a Task> + 'a {
        let by_service: &'a HashMap<&'a str, Vec<&'a Task>> = self.by_service;
        by_service
            .get(service)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .copied()
    }

    fn run(&mut self) {
        let mut slots: BTreeMap<SlotKey, Vec<&Task>> = BTreeMap::new();
        let mut has_any_task = false;
        for t in self.tasks_of(&self.service.name) {
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

        // Paused nodes keep the global tasks they have but get no new ones (Swarm's pause), and
        // so do down nodes during a disruption: their tasks are kept, not stopped.
        let mut keep_only = BTreeSet::new();
        let wanted: Vec<SlotKey> = match self.service.spec.mode {
            ServiceMode::Replicated { replicas } => (1..=replicas).map(SlotKey::Replica).collect(),
            ServiceMode::Global => self
                .nodes
                .iter()
                .filter_map(|n| {
                    let key = SlotKey::Node(n.id.clone());
                    if self.global_eligible(n) {
                        return Some(key);
                    }
                    let paused =
                        n.state == NodeState::Ready && n.availability == Availability::Pause;
                    let kept = (paused || self.held.contains(&n.id))
                        && slots
                            .get(&key)
                            .is_some_and(|ts| ts.iter().any(|t| is_live(t)));
                    kept.then(|| {
                        keep_only.insert(key.clone());
                        key
                    })
                })
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

        let mut release = rollout::plan(&ReleaseInput {
            state: self.state,
            service: self.service,
            now: self.now,
            wanted: wanted.len(),
            ready_nodes: self.ready_nodes,
            traffic: self.traffic.get(&self.service.name),
            guard: &self.cfg.release_guard,
        });
        self.ops.append(&mut release.ops);
        if let Some(at) = release.requeue_at {
            self.requeue(at);
        }
        if release.halt {
            // The service itself is being rewritten (a rollback); the next pass works on it.
            return;
        }

        if release.stop_first() {
            // A stop-first slot whose old task has exited is down until its replacement
            // counts; the release's census (taken before this pass creates that
            // replacement) does not see it yet, so it takes its share of the budget here.
            // Otherwise the next slot was stopped in the same pass.
            let empty = wanted
                .iter()
                .filter(|k| {
                    slots
                        .get(*k)
                        .is_none_or(|ts| ts.iter().all(|t| t.status.state.is_terminal()))
                })
                .count();
            release.reserve_starts(empty);
        }
        let mut moves = self.drain_moves(&wanted, &slots);
        for key in &wanted {
            let tasks = slots.remove(key).unwrap_or_default();
            let moving = match key {
                SlotKey::Replica(n) => moves.remove(n),
                SlotKey::Node(_) => None,
            };
            let hold = gated.is_some() || keep_only.contains(key);
            self.reconcile_slot(key, &tasks, hold, &mut release, moving.as_ref());
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
        self.weights_pass(&release);
    }

    /// Sets the mesh weight the release wants on every live task this pass does not otherwise
    /// write (one op per task per batch keeps the batch's version checks valid).
    fn weights_pass(&mut self, release: &Release) {
        let touched: BTreeSet<&str> = self
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::PutTask { task, .. } => Some(task.id.as_str()),
                Op::SetTaskDesired { id, .. } | Op::DeleteTask { id, .. } => Some(id.as_str()),
                _ => None,
            })
            .collect();
        let mut changes = Vec::new();
        for t in self.tasks_of(&self.service.name) {
            if !is_live(t) || touched.contains(t.id.as_str()) {
                continue;
            }
            let current = release.is_current(self.service, t);
            if let Some(weight) = release.weight_change(current, t) {
                let mut task = t.clone();
                task.weight = weight;
                changes.push(Op::PutTask {
                    task,
                    expect: Expect::Version(t.meta.version),
                });
            }
        }
        self.ops.extend(changes);
    }

    /// The drain's plan for the replica slots that have a task on a draining node.
    fn drain_moves<'t>(
        &self,
        wanted: &[SlotKey],
        slots: &BTreeMap<SlotKey, Vec<&'t Task>>,
    ) -> BTreeMap<u64, SlotMove<'t>> {
        let ServiceMode::Replicated { replicas } = self.service.spec.mode else {
            return BTreeMap::new();
        };
        let draining: BTreeSet<&str> = self
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Ready && n.availability == Availability::Drain)
            .map(|n| n.id.as_str())
            .collect();
        if draining.is_empty() {
            return BTreeMap::new();
        }
        let spec = &self.service.spec;
        let slot_tasks: Vec<SlotTasks<'t>> = wanted
            .iter()
            .filter_map(|key| match key {
                SlotKey::Replica(n) => Some(*n),
                SlotKey::Node(_) => None,
            })
            .map(|n| {
                let live: Vec<&'t Task> = slots
                    .get(&SlotKey::Replica(n))
                    .map(|ts| ts.iter().copied().filter(|t| is_live(t)).collect())
                    .unwrap_or_default();
                SlotTasks {
                    slot: n,
                    outdated_ready: live
                        .iter()
                        .any(|t| !t.spec.task_template_eq(spec) && t.is_ready()),
                    current: live
                        .into_iter()
                        .filter(|t| t.spec.task_template_eq(spec))
                        .collect(),
                }
            })
            .collect();
        let budget = spec.rollout.disruption.allowed(replicas);
        drain::plan(&slot_tasks, budget, |node| draining.contains(node))
            .into_iter()
            .map(|m| (m.slot, m))
            .collect()
    }

    fn global_eligible(&self, n: &Node) -> bool {
        flotilla_types::convergence::global_eligible(&self.service.spec, n)
    }

    /// `Some(reason)` while a dependency is not yet started/healthy.
    fn dependency_gate(&self) -> Option<String> {
        for (dep, cond) in &self.service.spec.depends_on {
            if !self.state.services.contains_key(dep) {
                return Some(format!("dependency {dep} does not exist"));
            }
            let satisfied = self.tasks_of(dep).any(|t| match cond {
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

    /// `hold` forbids new tasks (dependencies not met, or a paused node's global slot);
    /// `moving` is the drain's plan when a task of this slot is on a draining node.
    fn reconcile_slot(
        &mut self,
        key: &SlotKey,
        tasks: &[&Task],
        hold: bool,
        release: &mut Release,
        moving: Option<&SlotMove>,
    ) {
        // Tasks leaving a draining node are the drain's business, not duplicates to weed out.
        let live: Vec<&Task> = tasks
            .iter()
            .copied()
            .filter(|t| is_live(t) && !moving.is_some_and(|m| m.involves(&t.id)))
            .collect();
        if let Some(m) = moving {
            for t in &m.retire {
                tracing::info!(service = %self.service.name, task = %t.id, node = ?t.node, "drain: stopping a task whose replacement is ready");
                self.shutdown(t);
            }
        }
        let (current, outdated): (Vec<&Task>, Vec<&Task>) = live
            .iter()
            .partition(|t| release.is_current(self.service, t));

        if current.len() > 1 {
            // Duplicates (e.g. after a manager failover replayed a creation): keep the oldest.
            for t in &current[1..] {
                self.shutdown(t);
            }
        }
        if let Some(cur) = current.first() {
            // A dead task of an older template (say, a failed release that was rolled back) is
            // acknowledged once its slot runs the current one again, so `ps` stops listing it.
            for t in tasks {
                if t.desired_state == DesiredState::Running
                    && t.status.state.is_terminal()
                    && !release.is_current(self.service, t)
                {
                    self.ops.push(Op::SetTaskDesired {
                        id: t.id.clone(),
                        desired: DesiredState::Shutdown,
                        expect: Expect::Version(t.meta.version),
                    });
                }
            }
            if !outdated.is_empty() && release.may_retire(cur, self.now) {
                for t in &outdated {
                    tracing::info!(service = %self.service.name, task = %t.id, replacement = %cur.id, "release: retiring an outdated task (drained before it stops)");
                    self.shutdown(t);
                }
            }
            if cur.node.is_none() {
                self.place_existing(cur);
            }
        } else if let Some(m) = moving.filter(|m| m.is_moving()) {
            // A task on a draining node serves the slot until the budget lets it move.
            if m.replace {
                tracing::info!(service = %self.service.name, slot = ?key, "drain: starting a replacement");
                self.replace(key, tasks, release.new_task_weight());
            }
        } else if !hold {
            if outdated.is_empty() {
                // Stop-first: the replacement waits until the old task has stopped.
                let old_stopping = tasks.iter().any(|t| {
                    t.desired_state == DesiredState::Shutdown
                        && !t.status.state.is_terminal()
                        && !release.is_current(self.service, t)
                });
                if !(release.stop_first() && old_stopping) {
                    self.replace(key, tasks, release.new_task_weight());
                }
            } else if release.take_start() {
                if release.stop_first() {
                    for t in &outdated {
                        tracing::info!(service = %self.service.name, task = %t.id, "release: stop-first, draining and stopping the old task");
                        self.shutdown(t);
                    }
                } else {
                    self.replace(key, tasks, release.new_task_weight());
                }
            }
        }
        self.collect_garbage(key, tasks);
    }

    /// Creates the slot's next task, at mesh weight `weight`, if the restart policy allows one.
    fn replace(&mut self, key: &SlotKey, tasks: &[&Task], weight: Option<u8>) {
        let Some(mut task) = self.next_task(key, tasks) else {
            return;
        };
        task.weight = weight;
        // The dead tasks this one replaces are acknowledged by setting them to desired
        // shutdown. A dead task the policy does not replace keeps desired `running`, which is
        // how the next pass knows it already decided.
        for t in tasks {
            if t.desired_state == DesiredState::Running && t.status.state.is_terminal() {
                self.ops.push(Op::SetTaskDesired {
                    id: t.id.clone(),
                    desired: DesiredState::Shutdown,
                    expect: Expect::Version(t.meta.version),
                });
            }
        }
        self.create(task, key);
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
            let Some(next) = restart_attempt(spec, last) else {
                tracing::info!(service = %self.service.name, ?key, "restart policy leaves the slot empty");
                return None;
            };
            attempt = next;
            if next > 0 {
                // The backoff doubles with each consecutive short-lived task that ended on its
                // own. A task stopped on purpose (a release, a restart, a drain, a scale-down)
                // did not fail: it ends the streak, like a long run does.
                let reset_after = ms(self
                    .cfg
                    .backoff_reset_after
                    .max(policy.window.unwrap_or_default()));
                let streak = tasks
                    .iter()
                    .rev()
                    .filter(|t| t.status.state.is_terminal())
                    .take_while(|t| {
                        let ran = started_at(t).map_or(0, |s| t.status.since - s);
                        !t.stopped_on_purpose() && ran < reset_after
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
        let slot = match key {
            SlotKey::Replica(s) => Some(*s),
            SlotKey::Node(_) => None,
        };
        let mut task = Task::new(spec, self.service.revision, slot, self.now);
        if let Some(at) = not_before {
            task.status.message =
                format!("restart delayed {}ms (attempt {attempt})", at - self.now);
        }
        task.attempt = attempt;
        task.not_before = not_before;
        Some(task)
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
        match self.nominations.get(&t.id) {
            // Preempted tasks are still stopping; their exit is a store change, which
            // triggers the next pass.
            Some(None) => {
                self.requeue(self.now + 1000);
                return;
            }
            Some(Some(p)) => self.take(&mut task, p.clone()),
            None => self.try_place(&mut task),
        }
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
            Ok(mut placements) if !placements.is_empty() => {
                self.take(task, placements.swap_remove(0));
            }
            Ok(_) => {}
            Err(failure) => {
                // A nomination whose node no longer fits and that fits nowhere else is over;
                // the task waits like any other pending task, and says why.
                task.nomination = None;
                if task.status.message != failure.reason {
                    let mut st = task.status.clone();
                    st.message = failure.reason.clone();
                    task.status = st;
                }
                tracing::info!(service = %self.service.name, task = %task.id, reason = %failure.reason, "task not placed");
            }
        }
    }

    /// Acts on a placement: assigns the task, or, when lower-priority tasks must make way
    /// first, stops them and leaves the task pending, nominated for that node, until they
    /// have exited (see [`Nomination`]). The snapshot already counts the task on the node, so
    /// nothing else placed in this pass takes the room.
    fn take(&mut self, task: &mut Task, p: Placement) {
        if p.evictions.is_empty() {
            task.nomination = None;
            task.node = Some(p.node.clone());
            task.record_status(TaskStatus::new(
                TaskState::Assigned,
                self.now,
                format!("assigned to {}", p.node),
            ));
            return;
        }
        let priority = self.service.spec.placement.priority;
        for id in &p.evictions {
            let Some(victim) = self.state.tasks.get(id) else {
                continue;
            };
            tracing::info!(service = %self.service.name, task = %task.id, victim = %id, victim_service = %victim.service, node = %p.node, "preempting a lower-priority task");
            let mut v = victim.clone();
            v.desired_state = DesiredState::Shutdown;
            let mut status = v.status.clone();
            status.state = TaskState::Stopping;
            status.since = self.now;
            status.message = format!(
                "preempted by {} (priority {priority} > {})",
                task.name(),
                victim.spec.placement.priority
            );
            v.record_status(status);
            self.ops.push(Op::PutTask {
                task: v,
                expect: Expect::Version(victim.meta.version),
            });
        }
        let nomination = Nomination {
            node: p.node,
            victims: p.evictions,
        };
        task.status.message = nomination.message();
        task.nomination = Some(Box::new(nomination));
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
