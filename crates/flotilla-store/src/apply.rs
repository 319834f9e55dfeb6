//! The deterministic heart of the state machine: checking a [`Command`]'s preconditions and
//! working out the objects and events it produces, without touching disk.
//!
//! Several commands of one raft batch are applied in a single redb transaction, and the in-memory
//! [`ClusterState`] is only updated once that transaction commits. So a command sees the state
//! through two [`Overlay`]s: the writes of earlier commands in the batch, then its own earlier ops.
//! Every op reduces to three generic steps on a [`Kind`]: read the current object, check the
//! precondition, write the new one (stamping its meta and narrating its events).

use crate::events::Events;
use crate::kinds::{Change, Kind, ObjectVisitor, Overlay};
use crate::ops::{ClusterState, Command, CommandResult, Expect, Op};
use flotilla_types::{
    DesiredState, Event, Meta, Node, NodeState, Service, Task, TaskStatus, Timestamp,
};

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
    let mut changes = exec.touched;
    for change in &mut changes {
        change.settle(&exec.own);
    }
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

/// The object at `key` as a command sees it: its own writes, then the batch's, then the applied
/// state. A free function, so the borrow covers only these and not the events added meanwhile.
fn current<'a, K: Kind>(
    own: &'a Overlay,
    batch: &'a Overlay,
    base: &'a ClusterState,
    key: &K::Key,
) -> Option<&'a K> {
    match K::writes(own)
        .get(key)
        .or_else(|| K::writes(batch).get(key))
    {
        Some(pending) => pending.as_ref(),
        None => K::all(base).get(key),
    }
}

/// Stamps `meta` on an object written at log `index` and time `at`, keeping `created_at` of the
/// version it replaces.
fn stamp<K: Kind>(new: &mut K, old: Option<&K>, index: u64, at: Timestamp) {
    new.set_meta(Meta {
        version: index,
        created_at: old.map_or(at, |o| o.meta().created_at),
        updated_at: at,
    });
}

struct Exec<'a> {
    base: &'a ClusterState,
    batch: &'a Overlay,
    own: Overlay,
    /// Every touched object once, in first-touch order; settled to final values at the end.
    touched: Vec<Change>,
    events: Events,
    index: u64,
    at: Timestamp,
}

impl Exec<'_> {
    fn op(&mut self, op: &Op) -> Result<(), Refusal> {
        match op {
            Op::PutService { service, expect } => self.put(service, *expect),
            Op::DeleteService { name, expect } => self.delete::<Service>(name, *expect),
            Op::PutRevision { revision } => self.put(revision, Expect::Any),
            Op::PutTask { task, expect } => self.put(task, *expect),
            Op::SetTaskStatus { id, node, status } => self.set_task_status(id, node, status),
            Op::SetTaskDesired {
                id,
                desired,
                expect,
            } => self.set_task_desired(id, *desired, *expect),
            Op::DeleteTask { id, expect } => self.delete::<Task>(id, *expect),
            Op::PutNode { node, expect } => self.put(node, *expect),
            Op::NodeHeartbeat { id, at } => self.node_heartbeat(id, *at),
            Op::DeleteNode { id, expect } => self.delete::<Node>(id, *expect),
            Op::PutRollout { rollout, expect } => self.put(rollout, *expect),
            Op::DeleteRollout { service, expect } => {
                self.delete::<flotilla_types::Rollout>(service, *expect)
            }
            Op::PutRecord { record, expect } => self.put(record, *expect),
            Op::DeleteRecord { key, expect } => self.delete::<crate::Record>(key, *expect),
            Op::Put { object, expect } => object.visit(&mut Generic {
                exec: self,
                expect: *expect,
            }),
            Op::Delete { key, expect } => key.visit(&mut Generic {
                exec: self,
                expect: *expect,
            }),
        }
    }

    /// Records the object's value at the end of this command so far (`None` = deleted).
    fn write<K: Kind>(&mut self, key: K::Key, value: Option<K>) {
        let writes = K::writes_mut(&mut self.own);
        if !writes.contains_key(&key) {
            self.touched.push(K::change(key.clone(), None));
        }
        writes.insert(key, value);
    }

    /// Creates or replaces `object` if `expect` holds (and the kind is not immutable).
    fn put<K: Kind>(&mut self, object: &K, expect: Expect) -> Result<(), Refusal> {
        let key = object.key();
        let what = K::describe(&key);
        let old = current::<K>(&self.own, self.batch, self.base, &key);
        if K::IMMUTABLE && old.is_some() {
            return Err(Refusal::Conflict(format!(
                "{what} already exists ({}s are immutable)",
                K::KIND
            )));
        }
        check(expect, old.map(|o| o.meta().version), &what)?;
        let mut new = object.clone();
        stamp(&mut new, old, self.index, self.at);
        K::narrate(&mut self.events, old, Some(&new));
        self.write(key, Some(new));
        Ok(())
    }

    /// Deletes the object at `key`, which must exist, if `expect` holds.
    fn delete<K: Kind>(&mut self, key: &K::Key, expect: Expect) -> Result<(), Refusal> {
        let what = K::describe(key);
        let old = current::<K>(&self.own, self.batch, self.base, key);
        let old = old.ok_or_else(|| missing(&what))?;
        check(expect, Some(old.meta().version), &what)?;
        K::narrate(&mut self.events, Some(old), None);
        self.write::<K>(key.clone(), None);
        Ok(())
    }

    /// Changes the existing object at `key` with `change`, which may refuse.
    fn update<K: Kind>(
        &mut self,
        key: &K::Key,
        change: impl FnOnce(&K, &mut K, &str) -> Result<(), Refusal>,
    ) -> Result<(), Refusal> {
        let what = K::describe(key);
        let old = current::<K>(&self.own, self.batch, self.base, key);
        let old = old.ok_or_else(|| missing(&what))?;
        let mut new = old.clone();
        change(old, &mut new, &what)?;
        stamp(&mut new, Some(old), self.index, self.at);
        K::narrate(&mut self.events, Some(old), Some(&new));
        self.write(key.clone(), Some(new));
        Ok(())
    }

    /// Merges an agent's report, only from the node the task is assigned to.
    fn set_task_status(
        &mut self,
        id: &String,
        node: &str,
        status: &TaskStatus,
    ) -> Result<(), Refusal> {
        self.update::<Task>(id, |old, new, what| {
            if old.node.as_deref() != Some(node) {
                return Err(Refusal::Conflict(format!(
                    "{what} ({}) is assigned to node {}, not {node:?}",
                    old.name(),
                    old.node
                        .as_deref()
                        .map_or_else(|| "none".to_string(), |n| format!("{n:?}")),
                )));
            }
            new.record_status(status.clone());
            Ok(())
        })
    }

    fn set_task_desired(
        &mut self,
        id: &String,
        desired: DesiredState,
        expect: Expect,
    ) -> Result<(), Refusal> {
        self.update::<Task>(id, |old, new, what| {
            check(expect, Some(old.meta.version), what)?;
            new.desired_state = desired;
            Ok(())
        })
    }

    /// A heartbeat brings a node that was down back to ready.
    fn node_heartbeat(&mut self, id: &String, at: Timestamp) -> Result<(), Refusal> {
        self.update::<Node>(id, |_, new, _| {
            new.last_heartbeat = at;
            if new.state == NodeState::Down {
                new.state = NodeState::Ready;
                new.message.clear();
            }
            Ok(())
        })
    }
}

/// [`Op::Put`] and [`Op::Delete`]: the generic put and delete, for whichever kind they name.
struct Generic<'e, 'a> {
    exec: &'e mut Exec<'a>,
    expect: Expect,
}

impl ObjectVisitor for Generic<'_, '_> {
    type Out = Result<(), Refusal>;

    fn object<K: Kind>(&mut self, object: &K) -> Self::Out {
        self.exec.put(object, self.expect)
    }

    fn key<K: Kind>(&mut self, key: &K::Key) -> Self::Out {
        self.exec.delete::<K>(key, self.expect)
    }
}
