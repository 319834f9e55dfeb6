//! Typed spec and state objects shared by every Flotilla crate.
//!
//! `spec` holds what users ask for (a normalised form of a Compose service), `state` holds what the
//! cluster records about it (services, revisions, tasks, nodes, events), and `object` the
//! [`Object`] trait every stored kind implements (`namespace` and `config` are kinds of their
//! own). Everything here is plain data with serde derives: no I/O, so the scheduler, store,
//! controllers, API and CLI all agree on one vocabulary.
#![forbid(unsafe_code)]

pub mod api;
pub mod cluster;
pub mod config;
pub mod container;
pub mod convergence;
pub mod field_error;
pub mod mesh;
pub mod namespace;
pub mod object;
pub mod privilege;
pub mod release;
pub mod rollout;
pub mod spec;
pub mod spec_bounds;
mod spec_validate;
pub mod state;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
#[cfg(any(test, feature = "test-support"))]
pub mod tmpfs;
pub mod units;

pub use config::Config;
pub use container::ContainerSpec;
pub use mesh::MeshSpec;
pub use namespace::Namespace;
pub use object::Object;
pub use release::{
    Rollout, RolloutAction, RolloutKind, RolloutPhase, Strategy, UpdateConfig, UpdateOrder,
};
pub use rollout::{DisruptionBudget, MaxUnavailable, RolloutSpec};
pub use spec::*;
pub use state::*;
