//! The deterministic heart of the state machine: checking a [`Command`]'s preconditions and
//! working out the objects and events it produces, without touching disk.
//!
//! Several commands of one raft batch are applied in a single redb transaction, and the in-memory
//! [`ClusterState`] is only updated once that transaction commits. So a command sees the state
//! through two [`Overlay`]s: the writes of earlier commands in the batch, then its own earlier ops.

use crate::events::{self, Events};
use crate::ops::{Change, ClusterState, Command, CommandResult, Expect, Op, Record};
use flotilla_types::{Event, Node, NodeState, Revision, Rollout, Service, Task, Timestamp};
use std::collections::BTreeMap;

/// Pending writes not yet in the [`ClusterState`]; `None` marks a deletion.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    services: BTreeMap<String, Option<Service>>,
    revisions: BTreeMap<(String, u64), Option<Revision>>,
    tasks: BTreeMap<String, Option<Task>>,
    nodes: BTreeMap<String, Option<Node>>,
    rollouts: BTreeMap<String, Option<Rollout>>,
    records: BTreeMap<String, Option<Record>>,
}

impl Overlay {
    /// Layers `later` on top of `self`: its writes win.
    pub(crate) fn merge(&mut self, later: Overlay) {
        self.services.extend(later.services);
        self.revisions.extend(later.revisions);
        self.tasks.extend(later.tasks);
        self.nodes.extend(later.nodes);
        self.rollouts.extend(later.rollouts);
        self.records.extend(later.records);
    }

    /// Moves every pending write into `state`.
    pub(crate) fn apply_to(self, state: &mut ClusterState) {
        fn put<K: Ord, V>(base: &mut BTreeMap<K, V>, writes: BTreeMap<K, Option<V>>) {
            for (key, value) in writes {
                match value {
                    Some(v) => {
                        base.insert(key, v);
                    }
                    None => {
                        base.remove(&key);
                    }
                }
            }
        }
        put(&mut state.services, self.services);
        put(&mut state.revisions, self.revisions);
        let indexed = state.task_index.len == state.tasks.len();
        for (id, value) in self.tasks {
            match value {
                Some(t) => {
                    if indexed && !state.tasks.contains_key(&id) {
                        state.task_index.insert(&t.service, &id);
                    }
                    state.tasks.insert(id, t);
                }
                None => {
                    if let Some(old) = state.tasks.remove(&id) {
                        if indexed {
                            state.task_index.remove(&old.service, &id);
                        }
                    }
                }
            }
        }
        put(&mut state.nodes, self.nodes);
        put(&mut state.rollouts, self.rollouts);
        put(&mut state.records, self.records);
    }
}

/// Looks `key` up in the command's own writes, then the batch's, then the applied state.
fn layered<'a, K: Ord, V>(
    key: &K,
    own: &'a BTreeMap<K, Option<V>>,
    batch: &'a BTreeMap<K, Option<V>>,
    base: &'a BTreeMap<K, V>,
) -> Option<&'a V> {
    match own.get(key).or_else(|| batch.get(key)) {
        Some(pending) => pending.as_ref(),
        None => base.get(key),
    }
}

/// What applying one command produced.
pub(crate) struct Outcome {
    pub result: CommandResult,
    /// Present only when the command applied.
    pub applied: Option<AppliedCommand>,
}

pub(crate) struct AppliedCommand {
    pub writes: Overlay,
    /// One entry per touched object, in first-touch order, with its final value.
    pub changes: Vec<Change>,
    pub events: Vec<Event>,
}

/// Why an op was refused.
enum Refusal {
    Conflict(String),
    NotFound(String),
}

/// Identifies a touched object, to report each once in [`AppliedCommand::changes`].
enum Touched {
    Service(String),
    Revision(String, u64),
    Task(String),
    Node(String),
    Rollout(String),
    Record(String),
}

/// Applies `cmd` at log index `index` on top of `base` + `batch`. Deterministic: depends only on
/// its inputs.
pub(crate) fn apply_command(
    base: &ClusterState,
    batch: &Overlay,
    cmd: &Command,
    index: u64,
) -> Outcome {
    let mut exec = Exec {
        base,
        batch,
        own: Overlay::default(),
        touched: Vec::new(),
        events: Events::new(index, cmd.at),
        index,
        at: cmd.at,
    };
    for (op_index, op) in cmd.ops.iter().enumerate() {
        if let Err(refusal) = exec.op(op) {
            let result = match refusal {
                Refusal::Conflict(reason) => CommandResult::Conflict { op_index, reason },
                Refusal::NotFound(reason) => CommandResult::NotFound { op_index, reason },
            };
            return Outcome {
                result,
                applied: None,
            };
        }
    }
    let changes = exec.changes();
    Outcome {
        result: CommandResult::Applied { revision: index },
        applied: Some(AppliedCommand {
            writes: exec.own,
            changes,
            events: exec.events.into_vec(),
        }),
    }
}

/// Checks `expect` against the current version of `what` (`None` when it does not exist).
fn check(expect: Expect, current: Option<u64>, what: &str) -> Result<(), Refusal> {
    match (expect, current) {
        (Expect::Any, _) | (Expect::Absent, None) | (Expect::Exists, Some(_)) => Ok(()),
        (Expect::Absent, Some(found)) => Err(Refusal::Conflict(format!(
            "{what} already exists at version {found} (expected it to be absent)"
        ))),
        (Expect::Exists, None) => Err(Refusal::NotFound(format!(
            "{what} does not exist (expected it to exist)"
        ))),
        (Expect::Version(wanted), None) => Err(Refusal::NotFound(format!(
            "{what} does not exist (expected version {wanted})"
        ))),
        (Expect::Version(wanted), Some(found)) if wanted != found => Err(Refusal::Conflict(
            format!("{what} is at version {found}, expected version {wanted}"),
        )),
        (Expect::Version(_), Some(_)) => Ok(()),
    }
}

fn missing(what: &str) -> Refusal {
    Refusal::NotFound(format!("{what} does not exist"))
}

struct Exec<'a> {
    base: &'a ClusterState,
    batch: &'a Overlay,
    own: Overlay,
    touched: Vec<Touched>,
    events: Events,
    index: u64,
    at: Timestamp,
}

impl Exec<'_> {
    fn service(&self, name: &str) -> Option<&Service> {
        let key = name.to_string();
        layered(
            &key,
            &self.own.services,
            &self.batch.services,
            &self.base.services,
        )
    }

    fn revision_exists(&self, service: &str, number: u64) -> bool {
        let key = (service.to_string(), number);
        layered(
            &key,
            &self.own.revisions,
            &self.batch.revisions,
            &self.base.revisions,
        )
        .is_some()
    }

    fn task(&self, id: &str) -> Option<&Task> {
        let key = id.to_string();
        layered(&key, &self.own.tasks, &self.batch.tasks, &self.base.tasks)
    }

    fn node(&self, id: &str) -> Option<&Node> {
        let key = id.to_string();
        layered(&key, &self.own.nodes, &self.batch.nodes, &self.base.nodes)
    }

    fn rollout(&self, service: &str) -> Option<&Rollout> {
        let key = service.to_string();
        layered(
            &key,
            &self.own.rollouts,
            &self.batch.rollouts,
            &self.base.rollouts,
        )
    }

    fn record(&self, key: &str) -> Option<&Record> {
        let key = key.to_string();
        layered(
            &key,
            &self.own.records,
            &self.batch.records,
            &self.base.records,
        )
    }

    fn put_record(&mut self, key: String, value: Option<Record>) {
        if !self.own.records.contains_key(&key) {
            self.touched.push(Touched::Record(key.clone()));
        }
        self.own.records.insert(key, value);
    }

    fn put_rollout(&mut self, service: String, value: Option<Rollout>) {
        if !self.own.rollouts.contains_key(&service) {
            self.touched.push(Touched::Rollout(service.clone()));
        }
        self.own.rollouts.insert(service, value);
    }

    /// `meta` for an object written now, keeping `created_at` of the version it replaces.
    fn meta(&self, old_created_at: Option<Timestamp>) -> flotilla_types::Meta {
        flotilla_types::Meta {
            version: self.index,
            created_at: old_created_at.unwrap_or(self.at),
            updated_at: self.at,
        }
    }

    fn put_service(&mut self, name: String, value: Option<Service>) {
        if !self.own.services.contains_key(&name) {
            self.touched.push(Touched::Service(name.clone()));
        }
        self.own.services.insert(name, value);
    }

    fn put_revision(&mut self, revision: Revision) {
        let key = (revision.service.clone(), revision.number);
        if !self.own.revisions.contains_key(&key) {
            self.touched.push(Touched::Revision(key.0.clone(), key.1));
        }
        self.own.revisions.insert(key, Some(revision));
    }

    fn put_task(&mut self, id: String, value: Option<Task>) {
        if !self.own.tasks.contains_key(&id) {
            self.touched.push(Touched::Task(id.clone()));
        }
        self.own.tasks.insert(id, value);
    }

    fn put_node(&mut self, id: String, value: Option<Node>) {
        if !self.own.nodes.contains_key(&id) {
            self.touched.push(Touched::Node(id.clone()));
        }
        self.own.nodes.insert(id, value);
    }

    fn op(&mut self, op: &Op) -> Result<(), Refusal> {
        match op {
            Op::PutService { service, expect } => {
                let what = format!("service {:?}", service.name);
                let old = self.service(&service.name).cloned();
                check(*expect, old.as_ref().map(|s| s.meta.version), &what)?;
                let mut new = service.clone();
                new.meta = self.meta(old.as_ref().map(|s| s.meta.created_at));
                events::service(&mut self.events, old.as_ref(), Some(&new));
                self.put_service(new.name.clone(), Some(new));
            }
            Op::DeleteService { name, expect } => {
                let what = format!("service {name:?}");
                let old = self.service(name).cloned().ok_or_else(|| missing(&what))?;
                check(*expect, Some(old.meta.version), &what)?;
                events::service(&mut self.events, Some(&old), None);
                self.put_service(name.clone(), None);
            }
            Op::PutRevision { revision } => {
                if self.revision_exists(&revision.service, revision.number) {
                    return Err(Refusal::Conflict(format!(
                        "revision {} of service {:?} already exists (revisions are immutable)",
                        revision.number, revision.service
                    )));
                }
                self.put_revision(revision.clone());
            }
            Op::PutTask { task, expect } => {
                let what = format!("task {:?}", task.id);
                let old = self.task(&task.id).cloned();
                check(*expect, old.as_ref().map(|t| t.meta.version), &what)?;
                let mut new = task.clone();
                new.meta = self.meta(old.as_ref().map(|t| t.meta.created_at));
                events::task(&mut self.events, old.as_ref(), Some(&new));
                self.put_task(new.id.clone(), Some(new));
            }
            Op::SetTaskStatus { id, node, status } => {
                let what = format!("task {id:?}");
                let old = self.task(id).ok_or_else(|| missing(&what))?;
                if old.node.as_deref() != Some(node.as_str()) {
                    return Err(Refusal::Conflict(format!(
                        "{what} ({}) is assigned to node {}, not {node:?}",
                        old.name(),
                        old.node
                            .as_deref()
                            .map_or_else(|| "none".to_string(), |n| format!("{n:?}")),
                    )));
                }
                let old = old.clone();
                let mut new = old.clone();
                new.record_status(status.clone());
                new.meta = self.meta(Some(old.meta.created_at));
                events::task(&mut self.events, Some(&old), Some(&new));
                self.put_task(id.clone(), Some(new));
            }
            Op::SetTaskDesired {
                id,
                desired,
                expect,
            } => {
                let what = format!("task {id:?}");
                let old = self.task(id).ok_or_else(|| missing(&what))?;
                check(*expect, Some(old.meta.version), &what)?;
                let mut new = old.clone();
                new.desired_state = *desired;
                new.meta = self.meta(Some(old.meta.created_at));
                self.put_task(id.clone(), Some(new));
            }
            Op::DeleteTask { id, expect } => {
                let what = format!("task {id:?}");
                let version = self.task(id).map(|t| t.meta.version);
                check(*expect, Some(version.ok_or_else(|| missing(&what))?), &what)?;
                self.put_task(id.clone(), None);
            }
            Op::PutNode { node, expect } => {
                let what = format!("node {:?}", node.id);
                let old = self.node(&node.id).cloned();
                check(*expect, old.as_ref().map(|n| n.meta.version), &what)?;
                let mut new = node.clone();
                new.meta = self.meta(old.as_ref().map(|n| n.meta.created_at));
                events::node(&mut self.events, old.as_ref(), Some(&new));
                self.put_node(new.id.clone(), Some(new));
            }
            Op::NodeHeartbeat { id, at } => {
                let what = format!("node {id:?}");
                let old = self.node(id).cloned().ok_or_else(|| missing(&what))?;
                let mut new = old.clone();
                new.last_heartbeat = *at;
                new.meta = self.meta(Some(old.meta.created_at));
                if new.state == NodeState::Down {
                    new.state = NodeState::Ready;
                    new.message.clear();
                }
                events::node(&mut self.events, Some(&old), Some(&new));
                self.put_node(id.clone(), Some(new));
            }
            Op::DeleteNode { id, expect } => {
                let what = format!("node {id:?}");
                let old = self.node(id).cloned().ok_or_else(|| missing(&what))?;
                check(*expect, Some(old.meta.version), &what)?;
                events::node(&mut self.events, Some(&old), None);
                self.put_node(id.clone(), None);
            }
            Op::PutRollout { rollout, expect } => {
                let what = format!("rollout of service {:?}", rollout.service);
                let old = self.rollout(&rollout.service).cloned();
                check(*expect, old.as_ref().map(|r| r.meta.version), &what)?;
                let mut new = rollout.clone();
                new.meta = self.meta(old.as_ref().map(|r| r.meta.created_at));
                events::rollout(&mut self.events, old.as_ref(), Some(&new));
                self.put_rollout(new.service.clone(), Some(new));
            }
            Op::DeleteRollout { service, expect } => {
                let what = format!("rollout of service {service:?}");
                let version = self.rollout(service).map(|r| r.meta.version);
                check(*expect, Some(version.ok_or_else(|| missing(&what))?), &what)?;
                self.put_rollout(service.clone(), None);
            }
            Op::PutRecord { record, expect } => {
                let what = format!("record {:?}", record.key);
                let old = self.record(&record.key).cloned();
                check(*expect, old.as_ref().map(|r| r.meta.version), &what)?;
                let mut new = record.clone();
                new.meta = self.meta(old.as_ref().map(|r| r.meta.created_at));
                self.put_record(new.key.clone(), Some(new));
            }
            Op::DeleteRecord { key, expect } => {
                let what = format!("record {key:?}");
                let version = self.record(key).map(|r| r.meta.version);
                check(*expect, Some(version.ok_or_else(|| missing(&what))?), &what)?;
                self.put_record(key.clone(), None);
            }
        }
        Ok(())
    }

    /// The final value of every touched object, in first-touch order.
    fn changes(&self) -> Vec<Change> {
        self.touched
            .iter()
            .map(|touched| match touched {
                Touched::Service(name) => Change::Service {
                    name: name.clone(),
                    object: self.own.services.get(name).cloned().flatten(),
                },
                Touched::Revision(service, number) => Change::Revision {
                    service: service.clone(),
                    number: *number,
                    object: self
                        .own
                        .revisions
                        .get(&(service.clone(), *number))
                        .cloned()
                        .flatten(),
                },
                Touched::Task(id) => Change::Task {
                    id: id.clone(),
                    object: self.own.tasks.get(id).cloned().flatten(),
                },
                Touched::Node(id) => Change::Node {
                    id: id.clone(),
                    object: self.own.nodes.get(id).cloned().flatten(),
                },
                Touched::Rollout(service) => Change::Rollout {
                    service: service.clone(),
                    object: self.own.rollouts.get(service).cloned().flatten(),
                },
                Touched::Record(key) => Change::Record {
                    key: key.clone(),
                    object: self.own.records.get(key).cloned().flatten(),
                },
            })
            .collect()
    }
}
