//! Request and response bodies of the manager's HTTP API, shared by the server and the client.
//!
//! Routes (all JSON; errors are [`ApiErrorBody`] with a matching HTTP status):
//!
//! | method & path | body → response |
//! |---|---|
//! | `POST /v1/deploy` | [`DeployRequest`] → [`DeployResponse`] (`dry_run` changes nothing) |
//! | `GET /v1/services` | → `Vec<ServiceSummary>` |
//! | `GET /v1/services/{name}` | → [`ServiceDetail`] |
//! | `DELETE /v1/services/{name}` | → [`WriteResponse`] |
//! | `POST /v1/services/{name}/scale` | [`ScaleRequest`] → [`WriteResponse`] |
//! | `GET /v1/services/{name}/revisions` | → `Vec<Revision>` |
//! | `GET /v1/tasks?service=S&node=N` | → `Vec<Task>` |
//! | `GET /v1/tasks/{id}` | → `Task` |
//! | `GET /v1/tasks/{id}/logs?follow=bool&tail=N` | → `text/plain` stream (proxied to the node's agent) |
//! | `GET /v1/tasks/{id}/stats` | → [`TaskStats`] (proxied to the node's agent) |
//! | `POST /v1/tasks/{id}/resources` | `Resources` → 204 (proxied; changes cpu/memory limits in place) |
//! | `PUT /v1/tasks/{id}/status` | [`TaskStatusReport`] → [`WriteResponse`] (agents) |
//! | `PUT /v1/tasks/status` | [`BulkStatusReport`] → [`BulkStatusResponse`] (agents with many tasks) |
//! | `GET /v1/nodes` | → `Vec<Node>` |
//! | `POST /v1/nodes/register` | [`NodeRegistration`] → `Node` (agents) |
//! | `POST /v1/nodes/{id}/heartbeat` | [`Heartbeat`] → [`WriteResponse`] (agents) |
//! | `GET /v1/nodes/{id}` | → `Node` |
//! | `PATCH /v1/nodes/{id}` | [`NodeUpdate`] → `Node` (availability, labels) |
//! | `GET /v1/events?since=REV&follow=bool` | → NDJSON of `Event` |
//! | `GET /v1/watch?kind=task&node=N` (`kind`: one of [`WATCH_KINDS`] or `all`) | → NDJSON of [`WatchMessage`]: a snapshot, then changes |
//! | `GET /v1/status` | → [`ClusterStatus`] |
//! | `PUT /v1/tasks/{id}/weight` | [`WeightRequest`] → [`WriteResponse`] (mesh weight 0..=100) |
//! | `PUT /v1/services/{name}/weights` | [`BulkWeightRequest`] → [`WriteResponse`] (several tasks at once) |
//! | `GET /v1/services/{name}/traffic` | → [`ServiceTraffic`] (mesh stats of every node, per task) |
//! | `GET /v1/services/{name}/rollout` | → `Rollout` (the service's latest release) |
//! | `POST /v1/services/{name}/rollout` | [`crate::RolloutAction`] as `{"action": …}` → `Rollout` |
//! | `POST /v1/services/{name}/restart` | → `Rollout` (fresh tasks of the same revision, rolling) |
//! | `POST /v1/services/{name}/rollback` | [`crate::release::RollbackRequest`] → [`DeployResponse`] |
//! | `GET /metrics` | → Prometheus text of the manager's own node's mesh |

use crate::spec::{FieldError, ServiceSpec};
use crate::state::{Node, NodeResources, Revision, Service, Task, TaskStatus};
use crate::DriverKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How long an HTTP client of Flotilla's own servers keeps an idle pooled connection. The API,
/// agent and raft servers close a keep-alive connection that sends nothing for 10 s (their
/// header read timeout, `flotilla_mesh::conn_limits::HEADER_READ_TIMEOUT`), so a client must
/// drop it well before: reusing one just as the server closes it fails the request.
pub const CLIENT_POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(4);

/// Body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// Stable machine-readable code: `invalid`, `not_found`, `conflict`, `unauthorized`,
    /// `unavailable`, `internal`.
    pub code: String,
    pub message: String,
    /// Field-level problems, for `invalid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRequest {
    /// The services of one Compose file, already parsed and normalised by the client.
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub dry_run: bool,
    /// Who asks (`user@host`), recorded in revisions.
    #[serde(default)]
    pub requested_by: String,
}

/// What a deploy does (or would do) to one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanAction {
    Create,
    Update,
    Scale,
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanEntry {
    pub service: String,
    pub action: PlanAction,
    /// The revision the service will be at.
    pub revision: u64,
    /// Human summary of the change.
    pub change: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployResponse {
    pub plan: Vec<PlanEntry>,
    pub dry_run: bool,
    /// Store revision of the write (0 for a dry run).
    pub store_revision: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleRequest {
    pub replicas: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteResponse {
    pub store_revision: u64,
}

/// One row of `service ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub name: String,
    pub driver: DriverKind,
    pub mode: String,
    /// Desired task count (global: eligible nodes).
    pub desired: u64,
    pub running: u64,
    /// Running and passing health checks (equals `running` without a check).
    pub ready: u64,
    pub revision: u64,
    pub image_or_command: String,
    pub ports: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDetail {
    pub service: Service,
    pub summary: ServiceSummary,
    pub tasks: Vec<Task>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatusReport {
    pub node: String,
    pub status: TaskStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub id: String,
    pub hostname: String,
    pub resources: NodeResources,
    pub drivers: Vec<DriverKind>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub engine_labels: BTreeMap<String, String>,
    /// Container images present on the node (`repo:tag`).
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default)]
    pub agent_addr: Option<String>,
    /// The IP other nodes' meshes reach this node's tasks at; must not be a wildcard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_ip: Option<std::net::IpAddr>,
    /// Published ports this node's mesh cannot serve right now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_conflicts: Vec<String>,
    /// The bearer secret the agent's plain-HTTP server requires (agents without mTLS). The
    /// manager keeps it in a managers-only record, never in the node object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_secret: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub at: crate::state::Timestamp,
}

/// Many status reports in one write, for nodes that run many tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkStatusReport {
    pub node: String,
    pub reports: Vec<TaskStatusUpdate>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatusUpdate {
    pub task: String,
    pub status: TaskStatus,
}

/// Which reports were applied; the others name why not (task gone, or on another node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkStatusResponse {
    pub store_revision: u64,
    pub applied: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<FieldError>,
}

/// An operator's change to a node: `flotilla node update`. Fields left out stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability: Option<crate::state::Availability>,
    /// Labels to set (replacing a value already there).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub label_add: BTreeMap<String, String>,
    /// Label keys to remove; removing an absent key is not an error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label_rm: Vec<String>,
}

/// One line of a watch stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum WatchMessage {
    /// Everything that matches the filter, as of `revision`. Sent first, and again whenever the
    /// watcher fell too far behind for incremental changes.
    Snapshot {
        revision: u64,
        tasks: Vec<Task>,
        services: Vec<Service>,
        nodes: Vec<Node>,
        /// Releases of the services (with `kind=service` or all).
        #[serde(default)]
        rollouts: Vec<crate::release::Rollout>,
        /// With `kind=namespace` or all.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        namespaces: Vec<crate::Namespace>,
        /// With `kind=config` or all.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        configs: Vec<crate::Config>,
    },
    /// Objects that changed at `revision`; a `None` object means it was deleted.
    Change {
        revision: u64,
        changes: Vec<WatchChange>,
    },
    /// Sent periodically so clients can tell a quiet stream from a dead one.
    Heartbeat { revision: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WatchChange {
    Task {
        id: String,
        object: Option<Task>,
    },
    Service {
        name: String,
        object: Option<Service>,
    },
    Node {
        id: String,
        object: Option<Node>,
    },
    Revision {
        service: String,
        number: u64,
        object: Option<Revision>,
    },
    Rollout {
        service: String,
        object: Option<crate::release::Rollout>,
    },
    Namespace {
        name: String,
        object: Option<crate::Namespace>,
    },
    Config {
        name: String,
        object: Option<crate::Config>,
    },
}

/// The values of `kind` a watch accepts (besides `all`), one per group of kinds.
pub const WATCH_KINDS: [&str; 5] = ["task", "service", "node", "namespace", "config"];

impl WatchChange {
    /// The watch `kind` that carries this change: revisions and rollouts come with services.
    pub fn watch_kind(&self) -> &'static str {
        match self {
            WatchChange::Task { .. } => "task",
            WatchChange::Service { .. }
            | WatchChange::Revision { .. }
            | WatchChange::Rollout { .. } => "service",
            WatchChange::Node { .. } => "node",
            WatchChange::Namespace { .. } => "namespace",
            WatchChange::Config { .. } => "config",
        }
    }

    /// Names the changed object: its kind and key, unique across kinds.
    pub fn object_key(&self) -> (&'static str, &str, u64) {
        match self {
            WatchChange::Task { id, .. } => ("task", id, 0),
            WatchChange::Service { name, .. } => ("service", name, 0),
            WatchChange::Node { id, .. } => ("node", id, 0),
            WatchChange::Revision {
                service, number, ..
            } => ("revision", service, *number),
            WatchChange::Rollout { service, .. } => ("rollout", service, 0),
            WatchChange::Namespace { name, .. } => ("namespace", name, 0),
            WatchChange::Config { name, .. } => ("config", name, 0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub store_revision: u64,
    pub leader: Option<u64>,
    pub node_id: u64,
    pub version: String,
    /// Why this manager is not fully working ("disk full", "raft stopped: ..."); empty when
    /// healthy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
}

/// A task's resource usage at one moment, as `flotilla top` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStats {
    pub task_id: String,
    /// Share of one cpu used over the sampling interval (100.0 = one full core).
    pub cpu_percent: f64,
    /// Total cpu time used since the task started, in nanoseconds.
    pub cpu_total_nanos: u64,
    pub memory_bytes: u64,
    /// The memory limit in force, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    pub at: crate::state::Timestamp,
}

/// `PUT /v1/tasks/{id}/weight`: the task's share of mesh traffic, 0 (drained) to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightRequest {
    pub weight: u8,
}

/// `PUT /v1/services/{name}/weights`: several tasks of one service in one atomic write (releases
/// shift traffic with it). Keys are task ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkWeightRequest {
    pub weights: BTreeMap<String, u8>,
}

/// `GET /v1/services/{name}/traffic`: what every node's mesh knows about a service's tasks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceTraffic {
    pub service: String,
    pub tasks: Vec<TaskTraffic>,
    /// Ready nodes whose agent did not answer; their traffic is missing from the sums.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable_nodes: Vec<String>,
    /// Ready nodes whose mesh answered. Nodes running no mesh (`--no-mesh`) are neither counted
    /// here nor unreachable: releases wait for these meshes only. `None` from an older manager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meshes: Option<u32>,
}

/// One task, summed over the meshes of all nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskTraffic {
    pub task_id: String,
    /// The weight in the task record (100 unless set).
    pub weight: u8,
    /// Requests and connections in progress, over all nodes.
    pub in_flight: u64,
    /// Nodes whose mesh still sends this task new work (in the table, healthy, weight > 0).
    /// Draining waits for this and `in_flight` to reach 0.
    pub routed_by: u32,
    /// Circuit-breaker state per node: `closed`, `open` or `half_open`.
    pub breakers: BTreeMap<String, String>,
    pub requests: u64,
    pub connections: u64,
    /// Connect errors, 5xx answers and timeouts.
    pub errors: u64,
    /// Latency percentiles of the node that saw the slowest (per-node histograms do not add up).
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}
