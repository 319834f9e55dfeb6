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
//! | `PUT /v1/tasks/{id}/status` | [`TaskStatusReport`] → [`WriteResponse`] (agents) |
//! | `GET /v1/nodes` | → `Vec<Node>` |
//! | `POST /v1/nodes/register` | [`NodeRegistration`] → `Node` (agents) |
//! | `POST /v1/nodes/{id}/heartbeat` | [`Heartbeat`] → [`WriteResponse`] (agents) |
//! | `GET /v1/events?since=REV&follow=bool` | → NDJSON of `Event` |
//! | `GET /v1/watch?kind=task&node=N` | → NDJSON of [`WatchMessage`]: a snapshot, then changes |
//! | `GET /v1/status` | → [`ClusterStatus`] |

use crate::spec::{FieldError, ServiceSpec};
use crate::state::{Node, NodeResources, Revision, Service, Task, TaskStatus};
use crate::DriverKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    #[serde(default)]
    pub agent_addr: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub at: crate::state::Timestamp,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub store_revision: u64,
    pub leader: Option<u64>,
    pub node_id: u64,
    pub version: String,
}
