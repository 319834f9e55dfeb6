//! The write vocabulary of the store and the in-memory view of what it holds.

use crate::kinds::{AnyKey, AnyObject, Change};
use flotilla_types::{
    Config, DesiredState, Event, Meta, Namespace, Node, Revision, Rollout, Service, Task,
    TaskStatus, Timestamp,
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
// Ops carry whole objects by value; a task is only a little larger than a revision.
#[allow(clippy::large_enum_variant)]
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
    PutRecord {
        record: Record,
        expect: Expect,
    },
    DeleteRecord {
        key: String,
        expect: Expect,
    },
    /// Writes an object of any kind, as the kind's own put op would (kinds without one, such
    /// as namespaces and configs, are written only this way).
    Put {
        object: AnyObject,
        expect: Expect,
    },
    /// Deletes an object of any kind; fails if it does not exist.
    Delete {
        key: AnyKey,
        expect: Expect,
    },
}

/// A small cluster-wide record that only managers read, such as the cluster PKI (CA and join
/// secrets) or a certificate revocation. The store keeps it opaque (the API owns the
/// encoding). It is never sent on watch streams, and `Debug` redacts the value because it may
/// hold private keys.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub key: String,
    pub value: serde_json::Value,
    #[serde(default)]
    pub meta: Meta,
}

flotilla_types::object_keyed_by!(Record, "record", key);

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("key", &self.key)
            .field("value", &"<redacted>")
            .field("meta", &self.meta)
            .finish()
    }
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

/// What a reader sees: every object, indexed for the lookups controllers and the API make. One
/// field per kind, named as in the kinds list (`kinds.rs`).
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
    /// Keyed by [`Record::key`].
    #[serde(default)]
    pub records: BTreeMap<String, Record>,
    /// Keyed by name.
    #[serde(default)]
    pub namespaces: BTreeMap<String, Namespace>,
    /// Keyed by name.
    #[serde(default)]
    pub configs: BTreeMap<String, Config>,
    /// Task ids by service, kept in step with `tasks` by the store so [`ClusterState::tasks_of`]
    /// does not scan every task (controllers ask once or more per service per pass).
    #[serde(skip)]
    pub task_index: TaskIndex,
}

/// Task ids per service: derived from [`ClusterState::tasks`], never serialised, and equal to
/// any other index (two states with the same tasks are the same state). A service never
/// changes under a task id, so only insertions and removals touch it. Code that edits `tasks`
/// directly (tests) without the index is still served correctly: [`ClusterState::tasks_of`]
/// scans when the index does not account for every task.
#[derive(Debug, Clone, Default)]
pub struct TaskIndex {
    by_service: BTreeMap<String, std::collections::BTreeSet<String>>,
    pub(crate) len: usize,
}

impl PartialEq for TaskIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl TaskIndex {
    /// Indexes every task of `tasks`.
    pub fn build(tasks: &BTreeMap<String, Task>) -> TaskIndex {
        let mut index = TaskIndex::default();
        for t in tasks.values() {
            index.insert(&t.service, &t.id);
        }
        index
    }

    pub(crate) fn insert(&mut self, service: &str, id: &str) {
        let ids = match self.by_service.get_mut(service) {
            Some(ids) => ids,
            None => self.by_service.entry(service.to_string()).or_default(),
        };
        if ids.insert(id.to_string()) {
            self.len += 1;
        }
    }

    pub(crate) fn remove(&mut self, service: &str, id: &str) {
        if let Some(ids) = self.by_service.get_mut(service) {
            if ids.remove(id) {
                self.len -= 1;
            }
            if ids.is_empty() {
                self.by_service.remove(service);
            }
        }
    }
}

impl ClusterState {
    /// Tasks of `service`, in id order.
    pub fn tasks_of<'a>(&'a self, service: &'a str) -> Box<dyn Iterator<Item = &'a Task> + 'a> {
        if self.task_index.len != self.tasks.len() {
            return Box::new(self.tasks.values().filter(move |t| t.service == service));
        }
        match self.task_index.by_service.get(service) {
            Some(ids) => Box::new(ids.iter().filter_map(|id| self.tasks.get(id))),
            None => Box::new(std::iter::empty()),
        }
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

/// Everything one applied command changed, in order, plus the events it produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeBatch {
    pub revision: u64,
    pub changes: Vec<Change>,
    pub events: Vec<Event>,
}
