//! Pure placement: a function from a cluster snapshot and a request to placements.
//!
//! No I/O, no clocks (time is an input), no randomness beyond a seeded generator: the same
//! snapshot and request always give the same answer. In the spirit of Nomad's scheduler, one
//! placement runs in three stages:
//!
//! 1. **Feasibility filters.** *Static* filters depend only on the node and the spec — node state
//!    Ready, availability Active (Pause and Drain take no new tasks), driver present, hard
//!    constraints — and are evaluated once per service per snapshot, leaving a list of eligible
//!    nodes. *Dynamic* filters depend on what nodes hold now: max tasks per node, hard
//!    (anti-)affinities, hard topology spread (`max_skew` over the least used eligible domain,
//!    like Kubernetes' `DoNotSchedule`), hard `availability:az==N`, host-mode published ports
//!    (one live or stopping holder per node and protocol, the service's own tasks included: "host
//!    port 8080 in use"), and resources: reservations
//!    against capacity × the reservation overcommit ratio, limits against capacity × the limit
//!    ratio (see [`OvercommitRatios`]).
//! 2. **Ranking.** Feasible nodes get a score in tiers: a start-failure penalty (decaying with a
//!    60 s half-life) outweighs preferences (soft constraints `==~`/`!=~`, soft affinities),
//!    which outweigh spreading (spread rules, `deploy.placement.preferences`), which outweighs
//!    the strategy: `spread` (fewest tasks of the service, then least loaded) or `binpack` (most
//!    loaded).
//! 3. **Selection.** Nodes are not all scored. The eligible list is walked in a pseudo-random
//!    order (random start, stride coprime with the length; xorshift seeded from the service name
//!    and the placement count) until `max(log2 N, 16)` *clean* feasible candidates (no penalty,
//!    every preference met) were seen, or four times that many feasible ones; the best scored
//!    candidate wins. Only a failed placement walks every node, and then the walk doubles as the
//!    explanation: per-filter rejection counts such as
//!    `0/5 nodes: 3 insufficient memory, 2 violate node.labels.zone==b`.
//!
//! If nothing fits and the service has a priority above 0, nodes rejected only for resources are
//! considered for preemption of strictly lower-priority tasks present in the snapshot, within a
//! per-service disruption budget (default 1 per pass); see [`schedule`].
//!
//! Every placement syntax (Swarm-mode constraints and preferences, classic Swarm / Alibaba
//! `constraint:` / `affinity:` / `availability:` entries and `com.docker.swarm.*` labels,
//! `x-flotilla.placement`) compiles into one [`CompiledPlacement`] via [`compile`].
#![forbid(unsafe_code)]

pub mod bench;
mod constraint;
mod schedule;
mod snapshot;

pub use constraint::{
    compile, node_zone, Affinity, AffinityTarget, CompiledPlacement, Constraint, Demand, NodeAttr,
    SpreadRule, ValueMatcher, ZoneRequirement, MAX_AFFINITY_WEIGHT, MAX_PRIORITY,
};
pub use schedule::{schedule, Placement, PlacementFailure, PlacementRequest, MIN_CANDIDATES};
pub use snapshot::{
    ClusterSnapshot, OvercommitRatios, SnapshotError, DEFAULT_DISRUPTION_BUDGET,
    PENALTY_HALF_LIFE_MS,
};

/// Everything a set of services must satisfy before it is stored: each spec's own invariants,
/// the `depends_on` graph ([`flotilla_types::validate_stack`]), and every placement expression
/// compiling ([`compile`]). The Compose loader and the API both call this, so a file that
/// validates offline is accepted by a manager and vice versa.
pub fn validate_stack(
    services: &[flotilla_types::ServiceSpec],
) -> Result<(), Vec<flotilla_types::FieldError>> {
    let mut errors = flotilla_types::validate_stack(services)
        .err()
        .unwrap_or_default();
    for spec in services {
        if let Err(mut e) = compile(spec) {
            errors.append(&mut e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}
