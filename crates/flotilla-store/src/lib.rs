//! The replicated store: the one place cluster state lives, an `openraft` state machine whose log
//! and state are persisted in `redb`.
//!
//! **Object model.** The store holds objects of several kinds: services, revisions, tasks, nodes,
//! rollouts, records, namespaces and configs. Each kind is a type implementing
//! [`flotilla_types::Object`] (its key, kind name and meta) and the store's `Kind` trait (its
//! redb table, its events, its watch change), and is listed once in `kinds.rs`; ops, apply,
//! storage, snapshots and the change feed handle every kind through these traits. A kind's
//! objects are a map by key in [`ClusterState`] (`state.services`, `state.configs`, ...), each
//! stamped with a `Meta` whose `version` is the log index of its last write.
//!
//! **Writes.** Every change is a [`Command`]: a batch of [`Op`]s with preconditions ([`Expect`]),
//! applied atomically and deterministically on every manager. [`Op::Put`] and [`Op::Delete`]
//! write any kind; the kind-specific ops (`PutService`, `SetTaskStatus`, ...) reduce to the same
//! generic put, delete and update. A write is acknowledged only after its log entry is fsynced
//! and applied, so it survives `kill -9`.
//!
//! **Reads.** Readers take the in-memory [`ClusterState`] (kept in step with the redb tables)
//! and follow changes through [`Store::subscribe`]: one [`ChangeBatch`] per applied command, a
//! [`Change`] per touched object, plus the [`flotilla_types::Event`]s worded in `events.rs`.
#![forbid(unsafe_code)]

mod apply;
mod backup;
mod coalesce;
pub mod disk;
#[cfg(test)]
mod disk_tests;
mod error;
mod events;
mod kinds;
#[cfg(test)]
mod kinds_tests;
mod log_writer;
mod membership;
pub mod network;
mod ops;
mod storage;
mod store;
#[cfg(test)]
mod tests;

pub use backup::{Restored, StoreBackup, BACKUP_FORMAT};
pub use error::StoreError;
pub use kinds::{AnyKey, AnyObject, Change, Objects};
pub use membership::{ForcedCluster, Member};
pub use ops::*;
pub use store::{Store, StoreConfig};

openraft::declare_raft_types!(
    /// The raft types of the Flotilla store: commands in, command results out.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The raft node type of the store.
pub type Raft = openraft::Raft<TypeConfig>;
