//! The release state machine: `(state, service, traffic, now) -> what this pass may do`.
//!
//! A service whose revision changed while it still runs tasks of another template gets a
//! [`Rollout`] in the store. Each pass reads it, moves it on (phase changes, weights, analysis,
//! failure handling) and tells the slot reconciler how far it may go: how many slots may start
//! replacing, whether a slot's old task may be retired, and which mesh weight every task should
//! have. Everything it needs is in the store or in the traffic the meshes report, so another
//! manager resumes a rollout exactly where a failed one left it.
//!
//! A failure returns the service to the previous revision *as a new revision* (Swarm's way):
//! the old tasks, still running beside the new ones in blue-green and canary, become current
//! again, get their weight back in the same write that retires the new ones, and so some
//! version always receives traffic.

use flotilla_store::{ClusterState, Expect, Op};
use flotilla_types::api::ServiceTraffic;
use flotilla_types::convergence::{
    is_live, meshes_route_all, meshes_route_none_but, routed_by_mesh, Convergence, Settle,
    Standing, Surplus,
};
use flotilla_types::release::AnalysisResult;
use flotilla_types::release::FailureAction;
use flotilla_types::{
    DesiredState, Health, NodeState, Revision, Rollout, RolloutKind, RolloutPhase, Service,
    Strategy, Task, TaskState, Timestamp, UpdateOrder,
};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The meshes' view of each service's tasks, by service name (see
/// `GET /v1/services/{name}/traffic`). Services absent here have no data.
pub type TrafficView = BTreeMap<String, ServiceTraffic>;

/// Longest wait for every node's mesh to route the new tasks before a blue-green fails.
const MESH_SYNC_TIMEOUT_MS: i64 = 60_000;
/// Without traffic data (meshes not reporting) a traffic step waits this long instead of
/// observing the meshes directly.
const NO_DATA_SETTLE_MS: i64 = 3_000;

/// The global release guard: when the cluster's task starts fail too often, every rollout
/// pauses (a cluster-wide problem is no time to replace healthy tasks).
#[derive(Debug, Clone)]
pub struct ReleaseGuard {
    pub window: Duration,
    /// Fewer start outcomes than this in the window say nothing.
    pub min_starts: usize,
    /// Lowest acceptable share of successful starts, in percent.
    pub min_success_percent: u32,
}

impl Default for ReleaseGuard {
    fn default() -> Self {
        ReleaseGuard {
            window: Duration::from_secs(60),
            min_starts: 6,
            min_success_percent: 50,
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `Some(reason)` when task starts since `since` (within the guard's window) fail too often.
/// Failures of a single service are that service's own rollout's business (its failure
/// policy), so the guard needs failures in at least two services.
pub fn guard_tripped(
    state: &ClusterState,
    guard: &ReleaseGuard,
    now: Timestamp,
    since: Timestamp,
) -> Option<String> {
    let from = since.max(now - ms(guard.window));
    let mut ok = 0usize;
    let mut failed_services = BTreeSet::new();
    let mut failed = 0usize;
    for t in state.tasks.values() {
        let started = t
            .history
            .iter()
            .find(|h| h.state == TaskState::Running)
            .map(|h| h.at);
        match started {
            Some(at) if at >= from => ok += 1,
            Some(_) => {}
            None if matches!(t.status.state, TaskState::Failed | TaskState::Rejected)
                && t.status.since >= from =>
            {
                failed += 1;
                failed_services.insert(t.service.as_str());
            }
            None => {}
        }
    }
    let total = ok + failed;
    if total < guard.min_starts || failed_services.len() < 2 {
        return None;
    }
    let percent = ok * 100 / total;
    (percent < guard.min_success_percent as usize).then(|| {
        format!(
            "release guard: only {ok} of {total} task starts succeeded in the last {}s (services {}); all rollouts paused",
            guard.window.as_secs(),
            failed_services.into_iter().collect::<Vec<_>>().join(", ")
        )
    })
}

/// When a slot's outdated task may be stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retire {
    /// No rollout: as soon as the slot's current task is ready.
    WhenReady,
    /// Rolling: once the current task counts (ready for `monitor`).
    WhenCounted,
    /// Blue-green / canary before scale-down: never, the old tasks carry traffic.
    Never,
    /// Scale-down: now.
    Now,
}

/// What the release allows one reconcile pass of a service to do.
#[derive(Debug)]
pub struct Release {
    /// Writes to the rollout (and, for a rollback, the service and a revision).
    pub ops: Vec<Op>,
    /// The service is being returned to an earlier revision this pass: touch no task.
    pub halt: bool,
    pub requeue_at: Option<Timestamp>,
    restart_at: Option<Timestamp>,
    /// Slots that may start replacing their task now.
    start_budget: usize,
    stop_first: bool,
    retire: Retire,
    monitor_ms: i64,
    /// Mesh weight wanted for current and outdated live tasks; `None` leaves them alone.
    current_weight: Option<u8>,
    outdated_weight: Option<u8>,
    /// Blue-green shrink: replica slots whose old (blue) task may stop now so that green
    /// tasks waiting for a host port can take its place.
    shrink: BTreeSet<u64>,
}

impl Release {
    /// Whether `t` runs what the service wants now (template, and for a restart, freshness).
    pub fn is_current(&self, service: &Service, t: &Task) -> bool {
        t.spec.task_template_eq(&service.spec)
            && self.restart_at.is_none_or(|at| t.meta.created_at >= at)
    }

    /// Takes one slot from the budget of slots that may start replacing now.
    pub fn take_start(&mut self) -> bool {
        if self.start_budget == 0 {
            return false;
        }
        self.start_budget -= 1;
        true
    }

    /// Counts `n` slots that are being refilled as in progress: they use up the budget of
    /// slots that may start replacing now.
    pub fn reserve_starts(&mut self, n: usize) {
        self.start_budget = self.start_budget.saturating_sub(n);
    }

    pub fn stop_first(&self) -> bool {
        self.stop_first
    }

    /// Whether the outdated tasks of a slot whose current task is `current` may stop now.
    pub fn may_retire(&self, current: &Task, now: Timestamp) -> bool {
        if current.slot.is_some_and(|s| self.shrink.contains(&s)) {
            return true;
        }
        match self.retire {
            Retire::WhenReady => current.is_ready(),
            Retire::WhenCounted => Settle::After {
                now,
                ms: self.monitor_ms,
            }
            .counts(current),
            Retire::Never => false,
            Retire::Now => true,
        }
    }

    /// The weight a newly created task of the current template starts with.
    pub fn new_task_weight(&self) -> Option<u8> {
        self.current_weight.filter(|w| *w < 100)
    }

    /// The weight `t` should have, when it differs from what it has.
    pub fn weight_change(&self, is_current: bool, t: &Task) -> Option<Option<u8>> {
        let want = if is_current {
            self.current_weight
        } else {
            self.outdated_weight
        }?;
        let want = (want < 100).then_some(want);
        (t.weight.filter(|w| *w < 100) != want).then_some(want)
    }
}

/// Whether a placement failure (`0/3 nodes: 2 host port 80 in use, 1 …`) names host ports as
/// the only reason no node fits, so stopping the old task of the slot makes room.
fn blocked_by_host_ports(message: &str) -> bool {
    message.split_once(": ").is_some_and(|(_, reasons)| {
        reasons.split(", ").all(|r| {
            r.split_once(' ')
                .is_some_and(|(_, why)| why.starts_with("host port"))
        })
    })
}

fn failed(t: &Task) -> bool {
    matches!(t.status.state, TaskState::Failed | TaskState::Rejected)
        || t.status.health == Health::Unhealthy
}

/// Everything one service's release decision needs.
pub struct ReleaseInput<'a> {
    pub state: &'a ClusterState,
    pub service: &'a Service,
    pub now: Timestamp,
    /// Slots the service wants filled (replicas, or eligible nodes of a global service).
    pub wanted: usize,
    pub ready_nodes: usize,
    pub traffic: Option<&'a ServiceTraffic>,
    pub guard: &'a ReleaseGuard,
}

/// Moves the service's rollout on and says what the pass may do.
pub fn plan(input: &ReleaseInput) -> Release {
    let mut release = Release {
        ops: Vec::new(),
        halt: false,
        requeue_at: None,
        restart_at: None,
        start_budget: usize::MAX,
        stop_first: false,
        retire: Retire::WhenReady,
        monitor_ms: 0,
        current_weight: None,
        outdated_weight: None,
        shrink: BTreeSet::new(),
    };
    let Some((rollout, expect)) = current_rollout(input) else {
        return release;
    };
    release.restart_at = rollout.restart_at;
    let mut machine = Machine {
        input,
        before: rollout.clone(),
        rollout,
        release,
    };
    machine.step();
    machine.finish(expect)
}

/// The rollout this pass works on: the stored one, or a new one when the service moved to a
/// revision its tasks do not run yet. `None` when nothing is being released.
fn current_rollout(input: &ReleaseInput) -> Option<(Rollout, Expect)> {
    let service = input.service;
    let stored = input.state.rollouts.get(&service.name);
    let expect = stored.map_or(Expect::Absent, |r| Expect::Version(r.meta.version));
    if let Some(r) = stored.filter(|r| r.to_revision == service.revision) {
        return r.is_active().then(|| (r.clone(), expect));
    }
    // The service moved on: a release is needed only if live tasks run another template.
    let outdated_from = input
        .state
        .tasks_of(&service.name)
        .filter(|t| is_live(t) && !t.spec.task_template_eq(&service.spec))
        .map(|t| t.revision)
        .max();
    let Some(from) = outdated_from else {
        if let Some(r) = stored.filter(|r| r.is_active()) {
            // Nothing left to replace for the newer revision: the old rollout is moot.
            let mut done = r.clone();
            done.phase = RolloutPhase::Superseded;
            done.finished_at = Some(input.now);
            done.reason = format!("revision {} needs no task changes", service.revision);
            return Some((done, expect));
        }
        return None;
    };
    let mut reason = String::new();
    if let Some(r) = stored.filter(|r| r.is_active()) {
        reason = format!("supersedes the rollout to revision {}", r.to_revision);
    }
    let spec = &service.spec.rollout;
    let rollout = Rollout::new(
        &service.name,
        RolloutKind::Update,
        spec.strategy,
        spec.update.clone(),
        from,
        service.revision,
        input.now,
        reason,
    );
    Some((rollout, expect))
}

/// One slot's replacement as the rollout sees it.
#[derive(Debug, Default)]
struct SlotProgress {
    /// Runs a new task that counts.
    done: bool,
    /// Runs a new task that does not count yet.
    starting: bool,
    /// An old task is stopping (stop-first).
    stopping: bool,
}

/// Counts of the service's tasks as the rollout sees them: the shared convergence counts
/// (a new task counts once ready for `monitor`) plus what only a release tracks.
#[derive(Debug, Default)]
struct Census {
    counts: Convergence,
    failed: u64,
    /// Slots with a replacement under way.
    in_progress: usize,
    /// When the last counted new task started counting.
    last_counted_at: Option<Timestamp>,
    /// When the next not-yet-counted ready task will count.
    next_count_at: Option<Timestamp>,
}

struct Machine<'a> {
    input: &'a ReleaseInput<'a>,
    before: Rollout,
    rollout: Rollout,
    release: Release,
}

impl Machine<'_> {
    fn requeue(&mut self, at: Timestamp) {
        let at = at.max(self.input.now + 50);
        self.release.requeue_at = Some(self.release.requeue_at.map_or(at, |r| r.min(at)));
    }

    fn enter(&mut self, phase: RolloutPhase) {
        tracing::info!(service = %self.rollout.service, from = self.rollout.phase.as_str(), to = phase.as_str(), "rollout phase");
        self.rollout.phase = phase;
        self.rollout.phase_since = self.input.now;
        if phase.is_terminal() {
            self.rollout.finished_at = Some(self.input.now);
        }
    }

    fn is_current(&self, t: &Task) -> bool {
        t.spec.task_template_eq(&self.input.service.spec)
            && self
                .rollout
                .restart_at
                .is_none_or(|at| t.meta.created_at >= at)
    }

    fn census(&self) -> Census {
        let monitor = ms(self.rollout.config.monitor);
        let now = self.input.now;
        let settle = Settle::After { now, ms: monitor };
        let mut c = Census {
            counts: Convergence::new(self.input.wanted as u64),
            ..Census::default()
        };
        let mut slots: BTreeMap<(Option<u64>, Option<&str>), SlotProgress> = BTreeMap::new();
        for t in self.input.state.tasks_of(&self.input.service.name) {
            let key = (
                t.slot,
                if t.slot.is_none() {
                    t.node.as_deref()
                } else {
                    None
                },
            );
            let slot = slots.entry(key).or_default();
            let current = self.is_current(t);
            let new = t.meta.created_at >= self.rollout.started_at;
            if current && new && failed(t) {
                c.failed += 1;
            }
            match c.counts.add(t, current, settle) {
                Standing::Ready => {
                    slot.done = true;
                    if new {
                        let at = t.status.since + monitor;
                        c.last_counted_at = Some(c.last_counted_at.map_or(at, |l| l.max(at)));
                    }
                }
                Standing::Starting => {
                    slot.starting = true;
                    if t.is_ready() {
                        let at = t.status.since + monitor;
                        c.next_count_at = Some(c.next_count_at.map_or(at, |n| n.min(at)));
                    }
                }
                Standing::Outdated => {}
                Standing::Gone => {
                    // An old task stopping (stop-first) holds its slot's replacement back.
                    if !current
                        && t.desired_state == DesiredState::Shutdown
                        && !t.status.state.is_terminal()
                    {
                        slot.stopping = true;
                    }
                }
            }
        }
        c.in_progress = slots
            .values()
            .filter(|s| s.starting || (!s.done && s.stopping))
            .count();
        c
    }

    fn step(&mut self) {
        let now = self.input.now;
        let c = self.census();
        let counted = usize::try_from(c.counts.ready).unwrap_or(usize::MAX);
        let outdated_live = usize::try_from(c.counts.outdated).unwrap_or(usize::MAX);
        let (in_progress, last_counted_at, next_count_at) =
            (c.in_progress, c.last_counted_at, c.next_count_at);
        self.rollout.failed = self.rollout.failed.max(c.failed);
        self.rollout.updated = counted as u64;
        if let Some(at) = next_count_at {
            self.requeue(at);
        }
        self.release.monitor_ms = ms(self.rollout.config.monitor);

        if self.rollout.phase.is_terminal() {
            return;
        }
        if self.rollout.abort_requested {
            self.revert("aborted by the operator".into());
            return;
        }
        if self.check_failures() {
            return;
        }
        if !self.rollout.paused {
            if let Some(reason) = guard_tripped(
                self.input.state,
                self.input.guard,
                now,
                self.rollout.resumed_at,
            ) {
                self.rollout.paused = true;
                self.rollout.reason = reason;
            }
        }
        let wanted = self.input.wanted;
        match self.rollout.strategy {
            Strategy::Rolling => {
                self.release.retire = Retire::WhenCounted;
                self.release.stop_first = self.rollout.config.order == UpdateOrder::StopFirst;
                // Old tasks keep whatever weight they have: they leave through the drain.
                self.release.current_weight = Some(100);
                self.rollout.new_weight = 100;
                let parallelism = match self.rollout.config.parallelism {
                    0 => usize::MAX,
                    n => usize::try_from(n).unwrap_or(usize::MAX),
                };
                let delay_until = last_counted_at.map(|at| at + ms(self.rollout.config.delay));
                self.release.start_budget = if self.rollout.paused {
                    0
                } else if in_progress == 0 && delay_until.is_some_and(|d| d > now) {
                    if let Some(d) = delay_until {
                        self.requeue(d);
                    }
                    0
                } else {
                    parallelism.saturating_sub(in_progress)
                };
                if c.counts.converged(Surplus::Ignored) && in_progress == 0 {
                    // Every task is replaced; the release ends once the meshes agree (the
                    // same wait as blue-green's routing step), so a caller that sees it
                    // succeed never reaches an old task again.
                    if self.rollout.phase != RolloutPhase::Routing {
                        self.enter(RolloutPhase::Routing);
                    }
                    self.await_meshes_only_new();
                } else if self.rollout.phase == RolloutPhase::Routing {
                    // A new task died and is being replaced: back to replacing it.
                    self.enter(RolloutPhase::Replacing);
                }
            }
            Strategy::BlueGreen | Strategy::Canary => {
                self.traffic_shift(counted, wanted, outdated_live)
            }
        }
    }

    /// Applies the failure policy; returns true when the rollout was reverted.
    fn check_failures(&mut self) -> bool {
        let fresh = self
            .rollout
            .failed
            .saturating_sub(self.rollout.failures_acknowledged);
        if fresh == 0 {
            return false;
        }
        let wanted = self.input.wanted.max(1) as f64;
        let ratio = self.rollout.failed as f64 / wanted;
        let shifting = self.rollout.strategy != Strategy::Rolling
            && self.rollout.phase != RolloutPhase::ScalingDown;
        if !shifting && ratio <= self.rollout.config.max_failure_ratio.as_f64() {
            return false;
        }
        let reason = format!(
            "{} of {} new tasks failed{}",
            self.rollout.failed,
            self.input.wanted,
            self.last_failure()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        );
        let action = if shifting {
            // Blue still serves: any failure sends all traffic back to it.
            FailureAction::Rollback
        } else {
            self.rollout.config.failure_action
        };
        match action {
            FailureAction::Continue => {
                self.rollout.failures_acknowledged = self.rollout.failed;
                false
            }
            FailureAction::Pause => {
                self.pause(reason);
                false
            }
            FailureAction::Rollback => {
                self.revert(reason);
                true
            }
        }
    }

    fn last_failure(&self) -> Option<String> {
        self.input
            .state
            .tasks_of(&self.input.service.name)
            .filter(|t| self.is_current(t) && failed(t))
            .max_by_key(|t| t.status.since)
            .map(|t| format!("{}: {}", t.name(), t.status.message))
    }

    fn pause(&mut self, reason: String) {
        self.rollout.paused = true;
        self.rollout.reason = reason;
        self.rollout.failures_acknowledged = self.rollout.failed;
    }

    /// Returns the service to the rollout's previous revision as a new revision; an automatic
    /// rollback or a restart that fails pauses instead (there is nothing older to go to).
    fn revert(&mut self, reason: String) {
        let service = self.input.service;
        let from = self
            .input
            .state
            .revisions
            .get(&(service.name.clone(), self.rollout.from_revision))
            .cloned();
        let Some(from) = from.filter(|_| self.rollout.kind == RolloutKind::Update) else {
            self.pause(format!("{reason}; cannot roll back further, paused"));
            self.rollout.abort_requested = false;
            return;
        };
        let number = self
            .input
            .state
            .revisions_of(&service.name)
            .map(|r| r.number)
            .max()
            .unwrap_or(0)
            .max(service.revision)
            + 1;
        tracing::warn!(service = %service.name, from = self.rollout.to_revision, to = from.number, %reason, "rolling back");
        let mut reverted = service.clone();
        reverted.spec = from.spec.clone();
        reverted.revision = number;
        let failed_spec = &service.spec.rollout;
        // The failed rollout is recorded as rolled back through the new rollout's reason (one
        // rollout object per service).
        let mut back = Rollout::new(
            &service.name,
            RolloutKind::AutoRollback,
            Strategy::Rolling,
            failed_spec.rollback.clone(),
            self.rollout.to_revision,
            number,
            self.input.now,
            format!(
                "revision {} rolled back to revision {}: {reason}",
                self.rollout.to_revision, from.number
            ),
        );
        back.new_weight = 100;
        if self.rollout.shrunk > 0 {
            // Shrunk blue-green: green holds the host ports of the blue tasks it replaced, so
            // a start-first restore of those would wait forever. Stop green first.
            back.config.order = UpdateOrder::StopFirst;
            back.reason = format!(
                "{}; restoring {} shrunk blue task(s), stop-first",
                back.reason, self.rollout.shrunk
            );
        }
        self.release.ops.push(Op::PutService {
            service: reverted,
            expect: Expect::Version(service.meta.version),
        });
        self.release.ops.push(Op::PutRevision {
            revision: Revision {
                service: service.name.clone(),
                number,
                spec: from.spec,
                created_at: self.input.now,
                created_by: "flotilla-controller".into(),
                change: format!(
                    "rollback of revision {} to revision {}: {reason}",
                    self.rollout.to_revision, from.number
                ),
            },
        });
        self.rollout = back;
        self.release.halt = true;
    }

    /// Blue-green and canary: new tasks beside the old, traffic moved by weights.
    fn traffic_shift(&mut self, counted: usize, wanted: usize, outdated_live: usize) {
        let now = self.input.now;
        let r = &self.rollout;
        let since = r.phase_since;
        let paused = r.paused;
        self.release.start_budget = usize::MAX;
        self.release.retire = Retire::Never;
        let canary = self.input.service.spec.rollout.canary.clone();
        let steps = canary.effective_steps();
        if self.rollout.promote_requested
            && self.rollout.strategy == Strategy::Canary
            && self.rollout.phase == RolloutPhase::CanaryStep
        {
            self.rollout.promote_requested = false;
            self.rollout.new_weight = 100;
            self.enter(RolloutPhase::ScalingDown);
        }
        match self.rollout.phase {
            RolloutPhase::Replacing | RolloutPhase::StartingNew => {
                self.set_weights(0);
                if !paused && self.rollout.strategy == Strategy::BlueGreen {
                    self.shrink_for_host_ports(wanted);
                }
                if !paused && counted >= wanted && self.all_new_ready() {
                    match self.rollout.strategy {
                        Strategy::Canary => self.enter_canary_step(0, &steps),
                        _ => {
                            self.set_weights(100);
                            self.enter(RolloutPhase::Routing);
                        }
                    }
                }
            }
            RolloutPhase::Routing => {
                self.set_weights(100);
                match self.meshes_route_new() {
                    Wait::Done if !paused => self.enter(RolloutPhase::DrainingOld),
                    Wait::Done => {}
                    Wait::Pending => {
                        if now - since > MESH_SYNC_TIMEOUT_MS {
                            self.revert(format!(
                                "not every node's mesh routed the new tasks within {}s",
                                MESH_SYNC_TIMEOUT_MS / 1000
                            ));
                            return;
                        }
                        self.requeue(now + 250);
                    }
                }
            }
            RolloutPhase::DrainingOld => {
                self.set_weights_split(100, 0);
                let timeout = ms(self.input.service.spec.mesh.drain_timeout);
                let drained = matches!(self.old_drained(), Wait::Done) || now - since >= timeout;
                if drained && !paused {
                    if self.input.service.spec.rollout.blue_green.auto_promote {
                        self.enter(RolloutPhase::ScalingDown);
                    } else {
                        self.enter(RolloutPhase::AwaitingPromotion);
                    }
                } else {
                    self.requeue(now + 250);
                }
            }
            RolloutPhase::AwaitingPromotion => {
                self.set_weights_split(100, 0);
                if self.rollout.promote_requested {
                    self.rollout.promote_requested = false;
                    self.enter(RolloutPhase::ScalingDown);
                }
            }
            RolloutPhase::CanaryStep => self.canary_step(&steps),
            RolloutPhase::ScalingDown => {
                self.set_weights_split(100, 0);
                let delay = match self.rollout.strategy {
                    Strategy::BlueGreen => {
                        ms(self.input.service.spec.rollout.blue_green.scale_down_delay)
                    }
                    _ => 0,
                };
                if now - since >= delay {
                    self.release.retire = Retire::Now;
                    if outdated_live == 0 {
                        self.release.current_weight = Some(100);
                        self.await_meshes_only_new();
                    }
                } else {
                    self.requeue(since + delay);
                }
            }
            RolloutPhase::Succeeded | RolloutPhase::RolledBack | RolloutPhase::Superseded => {}
        }
    }

    /// The last step of every strategy: succeeds once every ready node's mesh routes every new
    /// task and no old one. Meshes that never agree pause the rollout rather than roll back:
    /// every task already runs the new revision.
    fn await_meshes_only_new(&mut self) {
        let now = self.input.now;
        let routed = match self.meshes_route_new() {
            Wait::Done => self.old_unrouted(),
            Wait::Pending => Wait::Pending,
        };
        match routed {
            Wait::Done => self.enter(RolloutPhase::Succeeded),
            Wait::Pending if now - self.rollout.phase_since > MESH_SYNC_TIMEOUT_MS => {
                if !self.rollout.paused {
                    // A resume waits a full period again.
                    self.rollout.phase_since = now;
                    self.pause(format!(
                        "every task runs the new revision, but not every node's mesh routed only the new tasks within {}s",
                        MESH_SYNC_TIMEOUT_MS / 1000
                    ));
                }
            }
            Wait::Pending => self.requeue(now + 250),
        }
    }

    /// New tasks at `w`, old ones at `100 - w`.
    fn set_weights(&mut self, w: u8) {
        let old = if self.rollout.strategy == Strategy::Canary {
            100 - w.min(100)
        } else {
            100
        };
        self.set_weights_split(w, old);
    }

    fn set_weights_split(&mut self, new: u8, old: u8) {
        self.release.current_weight = Some(new);
        self.release.outdated_weight = Some(old);
        self.rollout.new_weight = new;
    }

    /// Blue-green with host-mode ports: a green task that no node can take only because blue
    /// holds the host port would wait forever beside blue. Stops blue tasks of such slots, as
    /// many as the disruption budget allows (slots without a ready task count against it), so
    /// green takes their place; the next passes repeat it until green runs the full count.
    /// Blue stops gracefully (SIGTERM and the grace period); the mesh drain does not apply, a
    /// host-mode port is reached directly. The count goes into the rollout (and its events).
    fn shrink_for_host_ports(&mut self, wanted: usize) {
        let service = self.input.service;
        if !service.spec.ports.iter().any(|p| p.host_port().is_some()) {
            return;
        }
        let mut blue_slots = BTreeSet::new();
        let mut green_ready = BTreeSet::new();
        let mut ready_slots = BTreeSet::new();
        let mut blocked = 0;
        for t in self.input.state.tasks_of(&service.name) {
            let (Some(slot), true) = (t.slot, is_live(t)) else {
                continue;
            };
            let current = self.is_current(t);
            if t.is_ready() {
                ready_slots.insert(slot);
                if current {
                    green_ready.insert(slot);
                }
            }
            if !current {
                blue_slots.insert(slot);
            } else if t.node.is_none()
                && t.status.state == TaskState::Pending
                && blocked_by_host_ports(&t.status.message)
            {
                blocked += 1;
            }
        }
        if blocked == 0 {
            return;
        }
        let allowed = usize::try_from(
            service
                .spec
                .rollout
                .disruption
                .allowed(u64::try_from(wanted).unwrap_or(u64::MAX)),
        )
        .unwrap_or(usize::MAX);
        let unavailable = wanted.saturating_sub(ready_slots.len());
        let room = allowed.saturating_sub(unavailable);
        // Any blue task frees a port for whichever green task the scheduler puts there; blue
        // beside a ready green goes first (its slot loses nothing).
        let (surplus, needed): (Vec<u64>, Vec<u64>) = blue_slots
            .into_iter()
            .partition(|s| green_ready.contains(s));
        let mut stopped = 0;
        for slot in surplus.into_iter().chain(needed).take(blocked.min(room)) {
            tracing::info!(service = %service.name, slot, "blue-green: shrinking blue so green can take its host port");
            self.release.shrink.insert(slot);
            stopped += 1;
        }
        self.rollout.shrunk += stopped;
    }

    /// Every new task is ready (and none still starting), so traffic may move to them.
    fn all_new_ready(&self) -> bool {
        self.new_live().all(Task::is_ready)
    }

    /// Waits for traffic data: no published port means no mesh to wait for; no data means a
    /// short settle instead.
    fn without_data(&self) -> Option<Wait> {
        if !routed_by_mesh(&self.input.service.spec) {
            return Some(Wait::Done);
        }
        if self.input.traffic.is_none() {
            let settled = self.input.now - self.rollout.phase_since >= NO_DATA_SETTLE_MS;
            return Some(if settled { Wait::Done } else { Wait::Pending });
        }
        None
    }

    /// Every ready node's mesh routes every new task.
    fn meshes_route_new(&self) -> Wait {
        if let Some(w) = self.without_data() {
            return w;
        }
        let Some(traffic) = self.input.traffic else {
            return Wait::Pending;
        };
        Wait::from(meshes_route_all(
            traffic,
            self.new_live().map(|t| t.id.as_str()),
            self.input.ready_nodes,
        ))
    }

    /// The live tasks of the current template.
    fn new_live(&self) -> impl Iterator<Item = &Task> {
        self.input
            .state
            .tasks_of(&self.input.service.name)
            .filter(|t| is_live(t) && self.is_current(t))
    }

    /// No node routes new work to an old task and none has requests in flight on it.
    fn old_drained(&self) -> Wait {
        if let Some(w) = self.without_data() {
            return w;
        }
        let Some(traffic) = self.input.traffic else {
            return Wait::Pending;
        };
        let busy = self
            .input
            .state
            .tasks_of(&self.input.service.name)
            .filter(|t| is_live(t) && !self.is_current(t))
            .any(|t| {
                traffic
                    .tasks
                    .iter()
                    .any(|tt| tt.task_id == t.id && (tt.routed_by > 0 || tt.in_flight > 0))
            });
        if busy {
            Wait::Pending
        } else {
            Wait::Done
        }
    }

    /// No node's mesh sends new work to a task other than the live new ones, including tasks
    /// already stopped or deleted that a mesh has not dropped yet.
    fn old_unrouted(&self) -> Wait {
        if let Some(w) = self.without_data() {
            return w;
        }
        let Some(traffic) = self.input.traffic else {
            return Wait::Pending;
        };
        Wait::from(meshes_route_none_but(
            traffic,
            self.new_live().map(|t| t.id.as_str()),
        ))
    }

    /// Sums of the new tasks' request and error counters, and their worst p99.
    fn new_counters(&self) -> Option<(u64, u64, f64)> {
        let traffic = self.input.traffic?;
        let new: BTreeSet<&str> = self
            .input
            .state
            .tasks_of(&self.input.service.name)
            .filter(|t| self.is_current(t))
            .map(|t| t.id.as_str())
            .collect();
        let mut sums = (0u64, 0u64, 0f64);
        for t in traffic
            .tasks
            .iter()
            .filter(|t| new.contains(t.task_id.as_str()))
        {
            sums.0 += t.requests;
            sums.1 += t.errors;
            sums.2 = sums.2.max(t.p99_ms);
        }
        Some(sums)
    }

    fn enter_canary_step(&mut self, index: u32, steps: &[flotilla_types::release::CanaryStep]) {
        let weight = steps.get(index as usize).map_or(100, |s| s.weight);
        self.rollout.step = index;
        let (requests, errors, _) = self.new_counters().unwrap_or_default();
        self.rollout.baseline_requests = requests;
        self.rollout.baseline_errors = errors;
        self.set_weights(weight);
        self.enter(RolloutPhase::CanaryStep);
    }

    fn canary_step(&mut self, steps: &[flotilla_types::release::CanaryStep]) {
        let now = self.input.now;
        let index = self.rollout.step;
        let Some(step) = steps.get(index as usize).cloned() else {
            self.enter(RolloutPhase::ScalingDown);
            return;
        };
        self.set_weights(step.weight);
        let analysis = self.input.service.spec.rollout.canary.analysis.clone();
        let interval = ms(analysis.interval);
        let last = self
            .rollout
            .analysis
            .iter()
            .rev()
            .find(|a| a.step == index && a.at >= self.rollout.phase_since)
            .map(|a| a.at);
        let step_end = step.pause.map(|p| self.rollout.phase_since + ms(p));
        let due = last.map_or(self.rollout.phase_since + interval, |l| l + interval);
        let at_end = step_end.is_some_and(|e| now >= e);
        let needs_analysis = step.weight < 100 || step.pause.is_some_and(|p| !p.is_zero());
        if needs_analysis
            && (now >= due || (at_end && last.is_none_or(|l| l < step_end.unwrap_or(l))))
        {
            if let Some(result) = self.analyse(index, &analysis) {
                let passed = result.passed;
                let message = result.message.clone();
                self.rollout.analysis.push(result);
                let excess = self
                    .rollout
                    .analysis
                    .len()
                    .saturating_sub(flotilla_types::release::ANALYSIS_HISTORY);
                self.rollout.analysis.drain(..excess);
                if !passed {
                    self.revert(format!(
                        "canary analysis failed at step {} (weight {}%): {message}",
                        index + 1,
                        step.weight
                    ));
                    return;
                }
            }
        }
        if self.rollout.paused {
            return;
        }
        match step_end {
            Some(end) if now >= end => {
                if index as usize + 1 >= steps.len() {
                    self.rollout.new_weight = 100;
                    self.enter(RolloutPhase::ScalingDown);
                } else {
                    self.enter_canary_step(index + 1, steps);
                }
            }
            Some(end) => self.requeue(end.min(due)),
            // No pause: wait for `flotilla rollout promote`.
            None => self.requeue(due),
        }
    }

    /// One analysis of the new tasks' traffic since the step began; `None` when the mesh
    /// reports nothing (no published port, or no data yet).
    fn analyse(
        &self,
        step: u32,
        spec: &flotilla_types::release::AnalysisSpec,
    ) -> Option<AnalysisResult> {
        // Request counts, 5xx answers and latencies exist only where the mesh speaks HTTP; a
        // TCP port's canary moves on its weights and pauses alone.
        let mesh = &self.input.service.spec.mesh;
        let http = !mesh.routes.is_empty()
            || mesh
                .ports
                .iter()
                .any(|p| p.protocol == flotilla_types::mesh::MeshProtocol::Http);
        if !http {
            return None;
        }
        let (requests, errors, p99) = self.new_counters()?;
        let requests = requests.saturating_sub(self.rollout.baseline_requests);
        let errors = errors.saturating_sub(self.rollout.baseline_errors);
        let min_rate = spec.success_rate.as_f64();
        let success_rate = (requests > 0)
            .then(|| 100.0 * requests.saturating_sub(errors) as f64 / requests as f64);
        let mut problems = Vec::new();
        if let Some(rate) = success_rate.filter(|r| *r < min_rate) {
            problems.push(format!("success rate {rate:.1}% < {min_rate}%"));
        }
        if requests > 0 && p99 > spec.p99_ms as f64 {
            problems.push(format!("p99 {p99:.0}ms > {}ms", spec.p99_ms));
        }
        let passed = problems.is_empty();
        let message = if passed {
            match success_rate {
                Some(rate) => format!("{requests} requests, success {rate:.1}%, p99 {p99:.0}ms"),
                None => "no requests to the canary yet".to_string(),
            }
        } else {
            format!(
                "{} ({requests} requests, {errors} errors)",
                problems.join(", ")
            )
        };
        Some(AnalysisResult {
            at: self.input.now,
            step,
            requests,
            errors,
            success_rate,
            p99_ms: p99,
            passed,
            message,
        })
    }

    fn finish(mut self, expect: Expect) -> Release {
        if self.rollout != self.before || expect == Expect::Absent {
            self.release.ops.push(Op::PutRollout {
                rollout: self.rollout.clone(),
                expect,
            });
        }
        self.release
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Done,
    Pending,
}

impl From<bool> for Wait {
    fn from(done: bool) -> Self {
        if done {
            Wait::Done
        } else {
            Wait::Pending
        }
    }
}

/// Number of ready nodes (every one runs a mesh that must route new tasks).
pub fn ready_nodes(nodes: &[flotilla_types::Node]) -> usize {
    nodes.iter().filter(|n| n.state == NodeState::Ready).count()
}
