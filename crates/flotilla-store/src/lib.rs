//! The replicated store: an `openraft` state machine whose log and state are persisted in `redb`.
//!
//! Every change is a [`Command`]: a batch of [`Op`]s with preconditions, applied atomically and
//! deterministically on every manager. Readers take the in-memory [`ClusterState`] (kept in step
//! with the redb tables) and follow changes through [`Store::subscribe`]. A write is acknowledged
//! only after its log entry is fsynced and applied, so it survives `kill -9`.
#![forbid(unsafe_code)]

mod ops;
pub use ops::*;

// The `Store` type (open, bootstrap, write, read, subscribe, events) is implemented in `store.rs`
// and re-exported here.
