//! The observed-state vocabulary: services, revisions, tasks, nodes and events as the store keeps
//! them.

use crate::spec::{DriverKind, ServiceSpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Milliseconds since the Unix epoch. Wall-clock timestamps are chosen by the proposer of a write,
/// never by the state machine, so every replica applies identical values.
pub type Timestamp = i64;

/// Now, as a [`Timestamp`].
pub fn now_ms() -> Timestamp {
    chrono::Utc::now().timestamp_millis()
}

/// Renders a [`Timestamp`] as RFC 3339 for humans.
pub fn format_ts(ts: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(ts)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| ts.to_string())
}

/// Bookkeeping on every stored object. `version` is the store revision (raft log index) of the
/// write that last changed the object; clients send it back for optimistic concurrency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub version: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A service: its current spec and the revision that spec belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub spec: ServiceSpec,
    /// Number of the [`Revision`] holding `spec`.
    pub revision: u64,
    pub meta: Meta,
}

/// An immutable, numbered snapshot of a service spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    pub service: String,
    pub number: u64,
    pub spec: ServiceSpec,
    pub created_at: Timestamp,
    /// Who asked for it (user name, `cli@host`, or a controller).
    pub created_by: String,
    /// A one-line description of what changed relative to the previous revision.
    pub change: String,
}

/// Whether the orchestrator wants a task running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    Running,
    Shutdown,
}

/// Lifecycle of a task. `Pending` waits for placement, `Assigned` for its node's agent.
/// `Exited`, `Failed`, `Rejected`, `Lost` and `Shutdown` are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Pending,
    Assigned,
    Starting,
    Running,
    Stopping,
    /// Stopped on request (desired shutdown) or exited with code 0.
    Exited,
    /// Exited non-zero, was killed, failed its health check, or could not start.
    Failed,
    /// The node refused the task (e.g. its driver is missing).
    Rejected,
    /// The node running it went away.
    Lost,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Exited | TaskState::Failed | TaskState::Rejected | TaskState::Lost
        )
    }

    /// Whether a process may exist for the task on its node.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            TaskState::Starting | TaskState::Running | TaskState::Stopping
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Stopping => "stopping",
            TaskState::Exited => "exited",
            TaskState::Failed => "failed",
            TaskState::Rejected => "rejected",
            TaskState::Lost => "lost",
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Result of a task's health check. `None` when the service has no check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    #[default]
    None,
    /// In `start_period`, or no result yet.
    Starting,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::None => "-",
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// A target port and the host port it was given on the task's node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortBinding {
    pub target: u16,
    pub host_port: u16,
}

/// What the agent last reported about a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub state: TaskState,
    #[serde(default)]
    pub health: Health,
    /// When `state` was entered.
    pub since: Timestamp,
    /// Why the task is in this state ("exit code 137", "OOM killed", "health check failed: …").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub oom_killed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortBinding>,
}

impl TaskStatus {
    pub fn new(state: TaskState, at: Timestamp, message: impl Into<String>) -> Self {
        TaskStatus {
            state,
            health: Health::None,
            since: at,
            message: message.into(),
            exit_code: None,
            oom_killed: false,
            pid: None,
            container_id: None,
            ports: Vec::new(),
        }
    }
}

/// One line of a task's history: a state or health transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTransition {
    pub at: Timestamp,
    pub state: TaskState,
    pub health: Health,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// Most history entries kept per task; older ones are dropped first.
pub const TASK_HISTORY_LIMIT: usize = 32;

/// One scheduled instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub service: String,
    /// Replica slot (1-based) of a replicated service; `None` for a global service's task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u64>,
    /// The service revision this task runs.
    pub revision: u64,
    /// The spec of that revision, copied so agents need nothing else to run the task.
    pub spec: ServiceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub desired_state: DesiredState,
    pub status: TaskStatus,
    #[serde(default)]
    pub history: Vec<TaskTransition>,
    /// How many tasks before this one ran in the same slot within the restart window.
    #[serde(default)]
    pub attempt: u32,
    /// The agent must not start the task before this time (restart backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Timestamp>,
    /// Share of its service's traffic the mesh sends here, 0..=100; `None` means 100. Releases
    /// and draining set it; 0 means no new connections or requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// Set while the task is pending on a node where lower-priority tasks are being preempted
    /// for it: it is assigned there once they have all exited. Older records have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nomination: Option<Box<Nomination>>,
    pub meta: Meta,
}

/// A pending task's claim on a node whose lower-priority tasks (`victims`) are stopping to
/// make room for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nomination {
    pub node: String,
    /// Ids of the tasks being preempted.
    pub victims: Vec<String>,
}

impl Nomination {
    /// The task's pending message while it waits (`ps`, events):
    /// `preempting on node N: waiting for 2 lower-priority tasks to stop (ID1, ID2)`.
    pub fn message(&self) -> String {
        let n = self.victims.len();
        format!(
            "preempting on node {}: waiting for {n} lower-priority task{} to stop ({})",
            self.node,
            if n == 1 { "" } else { "s" },
            self.victims.join(", ")
        )
    }
}

impl Task {
    /// A new, pending task of `spec` at `revision`, in replica `slot` (`None` for a global
    /// service), created `now`.
    pub fn new(spec: &ServiceSpec, revision: u64, slot: Option<u64>, now: Timestamp) -> Task {
        Task {
            id: new_task_id(),
            service: spec.name.clone(),
            slot,
            revision,
            spec: spec.clone(),
            node: None,
            desired_state: DesiredState::Running,
            status: TaskStatus::new(TaskState::Pending, now, ""),
            history: Vec::new(),
            attempt: 0,
            not_before: None,
            weight: None,
            nomination: None,
            meta: Meta::default(),
        }
    }

    /// Whether the task was told to stop before it ended (a release, a drain, a scale-down,
    /// a preemption, a lost node), rather than exiting or failing on its own. Only the latter
    /// count towards restart backoff.
    pub fn stopped_on_purpose(&self) -> bool {
        let ran = self.history.iter().any(|h| h.state == TaskState::Running);
        self.status.state == TaskState::Lost
            || self.history.iter().any(|h| h.state == TaskState::Stopping)
            // Exited without ever running: cancelled before it started.
            || (self.status.state == TaskState::Exited && !ran)
    }

    /// A human name in Swarm's style: `web.2` or, for a global task, `web.<node>`.
    pub fn name(&self) -> String {
        match (self.slot, &self.node) {
            (Some(slot), _) => format!("{}.{slot}", self.service),
            (None, Some(node)) => format!("{}.{node}", self.service),
            (None, None) => format!("{}.{}", self.service, self.id),
        }
    }

    /// Applies a reported status, appending to the history when state or health changed.
    pub fn record_status(&mut self, status: TaskStatus) {
        let changed = status.state != self.status.state || status.health != self.status.health;
        if changed {
            self.history.push(TaskTransition {
                at: status.since,
                state: status.state,
                health: status.health,
                message: status.message.clone(),
                exit_code: status.exit_code,
            });
            if self.history.len() > TASK_HISTORY_LIMIT {
                let excess = self.history.len() - TASK_HISTORY_LIMIT;
                self.history.drain(..excess);
            }
        }
        self.status = status;
    }

    /// Running and, when the service has a health check, healthy.
    pub fn is_ready(&self) -> bool {
        self.status.state == TaskState::Running
            && (self.spec.healthcheck.is_none() || self.status.health == Health::Healthy)
    }
}

/// Makes a fresh task id: 16 lowercase hex characters.
pub fn new_task_id() -> String {
    let n: u64 = rand::random();
    format!("{n:016x}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    Manager,
    Worker,
}

/// Swarm's node availability: `pause` takes no new tasks, `drain` moves tasks away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    #[default]
    Active,
    Pause,
    Drain,
}

impl Availability {
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Active => "active",
            Availability::Pause => "pause",
            Availability::Drain => "drain",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Ready,
    Down,
}

/// Capacity a node offers to the scheduler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeResources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// A machine running an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub hostname: String,
    pub role: NodeRole,
    #[serde(default)]
    pub availability: Availability,
    pub state: NodeState,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub engine_labels: BTreeMap<String, String>,
    /// Container images present on the node; the scheduler prefers nodes that hold a task's
    /// image, so it starts without a pull.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub resources: NodeResources,
    pub drivers: Vec<DriverKind>,
    /// Where the agent serves logs and stats: `host:port` (plain HTTP, loopback) or
    /// `https://host:port` (cluster nodes: mTLS, manager certificates only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_addr: Option<String>,
    /// The IP other nodes' meshes reach this node's tasks at (`--advertise-ip`, or the IP of
    /// a joined node's `--advertise-addr`); without it, the IP of `agent_addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_ip: Option<std::net::IpAddr>,
    /// Published ports this node's mesh cannot serve (held by another program, claimed twice),
    /// as its agent last reported them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_conflicts: Vec<String>,
    pub last_heartbeat: Timestamp,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub meta: Meta,
}

impl Node {
    /// A ready, active worker `id` with `resources` that runs processes, before its first
    /// heartbeat; callers set what else they know.
    pub fn new(id: &str, resources: NodeResources) -> Node {
        Node {
            id: id.to_string(),
            hostname: id.to_string(),
            role: NodeRole::Worker,
            availability: Availability::Active,
            state: NodeState::Ready,
            labels: BTreeMap::new(),
            engine_labels: BTreeMap::new(),
            images: Vec::new(),
            zone: None,
            resources,
            drivers: vec![DriverKind::Process],
            agent_addr: None,
            advertise_ip: None,
            port_conflicts: Vec::new(),
            last_heartbeat: 0,
            message: String::new(),
            meta: Meta::default(),
        }
    }
}

/// How important an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventLevel {
    Info,
    Warning,
}

/// Something that happened, as shown by `flotilla events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Store revision of the write that produced it; events are ordered by it.
    pub revision: u64,
    pub at: Timestamp,
    pub level: EventLevel,
    /// `service`, `task` or `node`.
    pub kind: String,
    /// Name or id of the object.
    pub object: String,
    /// Short verb: `created`, `updated`, `removed`, `state`, `health`, `scaled`.
    pub action: String,
    pub message: String,
}
