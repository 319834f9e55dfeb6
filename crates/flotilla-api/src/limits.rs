//! Cluster-wide bounds on what one request may ask the manager to hold: tasks per service, tasks
//! in total, and drivers only benchmarks use. Every task a service asks for becomes a record in
//! the store and in every manager's memory, so a deploy or scale past these is refused up front,
//! with a message naming the limit and the flag that changes it.

use crate::error::ApiError;
use flotilla_store::ClusterState;
use flotilla_types::convergence::desired_tasks;
use flotilla_types::{DriverKind, FieldError, ServiceMode, ServiceSpec};

/// The limits a manager enforces; set by `--max-tasks-per-service` and `--max-tasks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tasks one replicated service may ask for.
    pub max_tasks_per_service: u64,
    /// Most tasks all services together may ask for.
    pub max_tasks: u64,
}

impl Limits {
    /// Fits a manager with a few GiB of memory (about 2 KiB per task record, kept in memory on
    /// every manager and in each watcher's view).
    pub const DEFAULT_MAX_TASKS_PER_SERVICE: u64 = 10_000;
    pub const DEFAULT_MAX_TASKS: u64 = 100_000;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tasks_per_service: Limits::DEFAULT_MAX_TASKS_PER_SERVICE,
            max_tasks: Limits::DEFAULT_MAX_TASKS,
        }
    }
}

/// Checks the services of a deploy against the limits and the cluster; each problem is named by
/// the service's place in the request (`services[0].mode.replicas`).
pub fn check_deploy(
    limits: &Limits,
    state: &ClusterState,
    services: &[ServiceSpec],
) -> Result<(), ApiError> {
    let mut fields = Vec::new();
    for (i, spec) in services.iter().enumerate() {
        if let Err(reason) = per_service(limits, state, spec) {
            fields.push(FieldError::new(
                format!("services[{i}].mode.replicas"),
                reason,
            ));
        }
        if let Err(reason) = sim_allowed(state, spec.driver) {
            fields.push(FieldError::new(format!("services[{i}].driver"), reason));
        }
    }
    if let Err(reason) = total(limits, state, services) {
        fields.push(FieldError::new("services", reason));
    }
    if fields.is_empty() {
        return Ok(());
    }
    let message = match fields.as_slice() {
        [one] => format!("deploy refused: {one}"),
        _ => "deploy refused: the services exceed the cluster's limits".to_string(),
    };
    Err(ApiError::invalid(message, fields))
}

/// Checks `service` scaled to `replicas` against the limits.
pub fn check_scale(
    limits: &Limits,
    state: &ClusterState,
    service: &ServiceSpec,
    replicas: u64,
) -> Result<(), ApiError> {
    let mut scaled = service.clone();
    scaled.mode = ServiceMode::Replicated { replicas };
    let refused = |reason: String| {
        ApiError::invalid(
            format!("scale refused: {reason}"),
            vec![FieldError::new("replicas", reason)],
        )
    };
    per_service(limits, state, &scaled).map_err(refused)?;
    total(limits, state, std::slice::from_ref(&scaled)).map_err(refused)
}

/// A service over the limit (deployed before the limit was lowered) may still shrink.
fn per_service(limits: &Limits, state: &ClusterState, spec: &ServiceSpec) -> Result<(), String> {
    let now = state
        .services
        .get(&spec.name)
        .map_or(0, |svc| desired_tasks(&svc.spec, state.nodes.values()));
    match spec.mode {
        ServiceMode::Replicated { replicas }
            if replicas > limits.max_tasks_per_service && replicas > now =>
        {
            Err(format!(
                "{replicas} replicas is more than the cluster's limit of {} tasks per service \
                 (manager flag --max-tasks-per-service)",
                limits.max_tasks_per_service
            ))
        }
        _ => Ok(()),
    }
}

/// The tasks every service would ask for once `services` replace their namesakes. A cluster
/// over the limit may still shrink.
fn total(limits: &Limits, state: &ClusterState, services: &[ServiceSpec]) -> Result<(), String> {
    let desired = |spec: &ServiceSpec| desired_tasks(spec, state.nodes.values());
    let others: u64 = state
        .services
        .values()
        .filter(|svc| !services.iter().any(|s| s.name == svc.name))
        .map(|svc| desired(&svc.spec))
        .fold(0, u64::saturating_add);
    let asked = services.iter().map(desired).fold(0, u64::saturating_add);
    let sum = others.saturating_add(asked);
    let now = state
        .services
        .values()
        .map(|svc| desired(&svc.spec))
        .fold(0, u64::saturating_add);
    if sum > limits.max_tasks && sum > now {
        return Err(format!(
            "the cluster's services would ask for {sum} tasks ({others} by other services), more \
             than the cluster's limit of {} tasks (manager flag --max-tasks)",
            limits.max_tasks
        ));
    }
    Ok(())
}

/// The sim driver "runs" tasks without running anything; it is for benchmarks on hollow nodes.
/// Anywhere else its tasks would stay pending forever, so it is refused unless a node offers it.
fn sim_allowed(state: &ClusterState, driver: DriverKind) -> Result<(), String> {
    if driver != DriverKind::Sim || state.nodes.values().any(|n| n.drivers.contains(&driver)) {
        return Ok(());
    }
    Err(
        "the sim driver is for benchmarks on hollow nodes, and no node offers it; use process \
         or docker"
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_types::testing::{node, spec};
    use flotilla_types::{Meta, Service};

    fn state_with(services: &[ServiceSpec]) -> ClusterState {
        let mut state = ClusterState::default();
        let n = node("n1").build();
        state.nodes.insert(n.id.clone(), n);
        for s in services {
            state.services.insert(
                s.name.clone(),
                Service {
                    name: s.name.clone(),
                    spec: s.clone(),
                    revision: 1,
                    meta: Meta::default(),
                },
            );
        }
        state
    }

    const SMALL: Limits = Limits {
        max_tasks_per_service: 10,
        max_tasks: 15,
    };

    #[test]
    fn growing_past_a_limit_is_refused_naming_its_flag() {
        let state = state_with(&[spec("a").replicas(8).build()]);
        let err = check_scale(&SMALL, &state, &spec("b").build(), 11).expect_err("per service");
        assert!(err.to_string().contains("--max-tasks-per-service"), "{err}");
        let err = check_scale(&SMALL, &state, &spec("b").build(), 8).expect_err("total");
        assert!(err.to_string().contains("--max-tasks"), "{err}");
        assert!(check_scale(&SMALL, &state, &spec("b").build(), 7).is_ok());
    }

    #[test]
    fn a_service_over_a_lowered_limit_may_still_shrink() {
        let state = state_with(&[spec("a").replicas(30).build()]);
        let a = spec("a").replicas(30).build();
        assert!(check_scale(&SMALL, &state, &a, 20).is_ok());
        assert!(check_scale(&SMALL, &state, &a, 31).is_err());
    }

    #[test]
    fn sim_needs_a_node_that_offers_it() {
        let state = state_with(&[]);
        let sim = spec("s").driver(DriverKind::Sim).build();
        let err = check_deploy(&Limits::default(), &state, std::slice::from_ref(&sim))
            .expect_err("no sim node");
        assert!(err.to_string().contains("sim driver"), "{err}");
        let mut hollow = state_with(&[]);
        let n = node("h").drivers(&[DriverKind::Sim]).build();
        hollow.nodes.insert(n.id.clone(), n);
        assert!(check_deploy(&Limits::default(), &hollow, &[sim]).is_ok());
    }
}
