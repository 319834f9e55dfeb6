//! The write vocabulary of the store and the in-memory view of what it holds.

use flotilla_types::{
    DesiredState, Event, Node, Revision, Rollout, Service, Task, TaskStatus, Timestamp,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A precondition on the current version of the object an [`Op`] touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// No precondition.
    Any,
    /// The object must not exist.
    Absent,
    /// The object must exist with exactly this `meta.version`.
    Version(u64),
    /// The object must exist (any version).
    Exists,
}

/// One change inside a [`Command`]. `meta` fields of written objects are set by the state
/// machine (`version` = log index, `updated_at` = command time, `created_at` kept or set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    PutService {
        service: Service,
        expect: Expect,
    },
    DeleteService {
        name: String,
        expect: Expect,
    },
    /// Revisions are immutable: fails if `(service, number)` exists.
    PutRevision {
        revision: Revision,
    },
    PutTask {
        task: Task,
        expect: Expect,
    },
    /// Merges an agent's status report into the task (appending history). Fails if the task
    /// does not exist or is assigned to another node.
    SetTaskStatus {
        id: String,
        node: String,
        status: TaskStatus,
    },
    SetTaskDesired {
        id: String,
        desired: DesiredState,
        expect: Expect,
    },
    DeleteTask {
        id: String,
        expect: Expect,
    },
    PutNode {
        node: Node,
        expect: Expect,
    },
    NodeHeartbeat {
        id: String,
        at: Timestamp,
    },
    DeleteNode {
        id: String,
        expect: Expect,
    },
    /// The release of `rollout.service`; at most one per service, so a new one replaces it.
    PutRollout {
        rollout: Rollout,
        expect: Expect,
    },
    DeleteRollout {
        service: String,
        expect: Expect,
    },
}

/// An atomic batch of ops: either all apply or none do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub ops: Vec<Op>,
    /// Wall-clock time chosen by the proposer, used for `meta` timestamps and events.
    pub at: Timestamp,
}

impl Command {
    pub fn new(ops: Vec<Op>) -> Self {
        Command {
            ops,
            at: flotilla_types::now_ms(),
        }
    }
}

/// The outcome of applying a [`Command`], returned to the writer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Applied {
        revision: u64,
    },
    /// A precondition failed; nothing was applied.
    Conflict {
        op_index: usize,
        reason: String,
    },
    /// An op named an object that does not exist; nothing was applied.
    NotFound {
        op_index: usize,
        reason: String,
    },
}

/// What a reader sees: every object, indexed for the lookups controllers and the API make.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Log index of the last applied entry.
    pub revision: u64,
    pub services: BTreeMap<String, Service>,
    /// Keyed by (service, revision number).
    pub revisions: BTreeMap<(String, u64), Revision>,
    pub tasks: BTreeMap<String, Task>,
    pub nodes: BTreeMap<String, Node>,
    /// Keyed by service name.
    #[serde(default)]
    pub rollouts: BTreeMap<String, Rollout>,
}

impl ClusterState {
    pub fn tasks_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks.values().filter(move |t| t.service == service)
    }

    pub fn tasks_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks
            .values()
            .filter(move |t| t.node.as_deref() == Some(node))
    }

    pub fn revisions_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Revision> + 'a {
        self.revisions
            .range((service.to_string(), 0)..=(service.to_string(), u64::MAX))
            .map(|(_, r)| r)
    }
}

/// One object that changed in an applied command; `None` means deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Change {
    Service {
        name: String,
        object: Option<Service>,
    },
    Revision {
        service: String,
        number: u64,
        object: Option<Revision>,
    },
    Task {
        id: String,
        object: Option<Task>,
    },
    Node {
        id: String,
        object: Option<Node>,
    },
    Rollout {
        service: String,
        object: Option<Rollout>,
    },
}

/// Everything one applied command changed, in order, plus the events it produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeBatch {
    pub revision: u64,
    pub changes: Vec<Change>,
    pub events: Vec<Event>,
}
