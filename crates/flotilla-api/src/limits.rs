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
        if let Err(reason) = per_service(limits, spec) {
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
    per_service(limits, &scaled).map_err(refused)?;
    total(limits, state, std::slice::from_ref(&scaled)).map_err(refused)
}

fn per_service(limits: &Limits, spec: &ServiceSpec) -> Result<(), String> {
    match spec.mode {
        ServiceMode::Replicated { replicas } if replicas > limits.max_tasks_per_service => {
            Err(format!(
                "{replicas} replicas is more than the cluster's limit of {} tasks per service \
                 (manager flag --max-tasks-per-service)",
                limits.max_tasks_per_service
            ))
        }
        _ => Ok(()),
    }
}

/// The tasks every service would ask for once `services` replace their namesakes.
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
    if sum > limits.max_tasks {
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
