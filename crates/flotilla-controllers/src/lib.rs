//! Level-triggered, idempotent controllers that drive tasks toward their services' specs.
//!
//! In the style of kube-runtime: [`reconcile::reconcile`] is a pure function from the current
//! [`ClusterState`](flotilla_store::ClusterState) and the time to the store [`Op`](flotilla_store::Op)s
//! that move the cluster one step closer to what is wanted, plus when to look again. It never
//! remembers anything between passes; everything it needs is in the state (task history, restart
//! timestamps, node heartbeats). [`runner::ControllerRunner`] calls it whenever the store changes
//! or a requeue time arrives, and writes the ops with optimistic concurrency, so a conflicting
//! write just means "look again".
//!
//! [`deploy`] builds what a deploy or restart writes (plan entries, revisions), shared by the API
//! and the tests; `harness` (feature `test-support`) runs all of this against a real store
//! under a fake clock.
#![forbid(unsafe_code)]

pub mod cordon;
pub mod deploy;
pub mod drain;
#[cfg(any(test, feature = "test-support"))]
pub mod harness;
mod liveness;
mod preempt;
pub mod reconcile;
pub mod rollout;
pub mod runner;

pub use reconcile::{reconcile, reconcile_with_traffic, ControllerConfig, Plan};
pub use rollout::{ReleaseGuard, TrafficView};
pub use runner::{ControllerRunner, TrafficSource};
