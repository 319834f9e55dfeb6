//! The replicated store: an `openraft` state machine whose log and state are persisted in `redb`.
//!
//! Every change is a [`Command`]: a batch of [`Op`]s with preconditions, applied atomically and
//! deterministically on every manager. Readers take the in-memory [`ClusterState`] (kept in step
//! with the redb tables) and follow changes through [`Store::subscribe`]. A write is acknowledged
//! only after its log entry is fsynced and applied, so it survives `kill -9`.
#![forbid(unsafe_code)]

mod apply;
mod coalesce;
mod error;
mod events;
mod kinds;
mod log_writer;
mod membership;
pub mod network;
mod ops;
mod storage;
mod store;
#[cfg(test)]
mod tests;

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
