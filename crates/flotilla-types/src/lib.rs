//! Typed spec and state objects shared by every Flotilla crate.
//!
//! `spec` holds what users ask for (a normalised form of a Compose service), `state` holds what the
//! cluster records about it (services, revisions, tasks, nodes, events). Everything here is plain
//! data with serde derives: no I/O, so the scheduler, store, controllers, API and CLI all agree on
//! one vocabulary.
#![forbid(unsafe_code)]

pub mod api;
pub mod container;
pub mod mesh;
pub mod release;
pub mod rollout;
pub mod spec;
pub mod state;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod units;

pub use container::ContainerSpec;
pub use mesh::MeshSpec;
pub use release::{
    Rollout, RolloutAction, RolloutKind, RolloutPhase, Strategy, UpdateConfig, UpdateOrder,
};
pub use rollout::{DisruptionBudget, MaxUnavailable, RolloutSpec};
pub use spec::*;
pub use state::*;
