//! Service resources: deploy (create/update with revisions), list, inspect, scale, remove.

use crate::body::StrictJsonBody;
use crate::error::{check_applied, ApiError};
use crate::AppState;
use axum::extract::{Path, State};
use axum::Json;
use flotilla_controllers::deploy::{deploy_ops, plan_for, write_ops};
use flotilla_store::{ClusterState, Command, Expect, Op};
use flotilla_types::api::{
    ClusterStatus, DeployRequest, DeployResponse, ScaleRequest, ServiceDetail, ServiceSummary,
    WriteResponse,
};
use flotilla_types::convergence::{desired_tasks, Convergence, Settle};
use flotilla_types::{
    now_ms, DriverKind, FieldError, Revision, Service, ServiceMode, MAX_REPLICAS,
};

/// How often a write that lost an optimistic-concurrency race is retried before giving up.
const WRITE_RETRIES: usize = 5;

pub async fn status(State(app): State<AppState>) -> Json<ClusterStatus> {
    Json(ClusterStatus {
        store_revision: app.store.revision(),
        leader: app.store.current_leader(),
        node_id: app.store.node_id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        degraded: app.store.degraded(),
    })
}

pub async fn deploy(
    State(app): State<AppState>,
    StrictJsonBody(req): StrictJsonBody<DeployRequest>,
) -> Result<Json<DeployResponse>, ApiError> {
    if req.services.is_empty() {
        return Err(ApiError::invalid(
            "a deploy needs at least one service",
            vec![FieldError::new("services", "is empty")],
        ));
    }
    flotilla_scheduler::validate_stack(&req.services)
        .map_err(|fields| ApiError::invalid("the services are not valid", fields))?;
    app.store
        .read(|state| crate::limits::check_deploy(&app.limits, state, &req.services))?;
    let by = if req.requested_by.is_empty() {
        "api"
    } else {
        req.requested_by.as_str()
    };
    for _ in 0..WRITE_RETRIES {
        let at = now_ms();
        let (plan, ops) = app
            .store
            .read(|state| deploy_ops(state, &req.services, by, at));
        if req.dry_run || ops.is_empty() {
            return Ok(Json(DeployResponse {
                plan,
                dry_run: req.dry_run,
                store_revision: if req.dry_run { 0 } else { app.store.revision() },
            }));
        }
        match check_applied(app.store.write(Command { ops, at }).await?) {
            Ok(store_revision) => {
                return Ok(Json(DeployResponse {
                    plan,
                    dry_run: false,
                    store_revision,
                }))
            }
            Err(ApiError::Conflict(reason)) => {
                tracing::debug!(%reason, "deploy raced another write; retrying");
            }
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::Conflict(
        "the services kept changing while deploying; try again".into(),
    ))
}

/// Counts for `service ls`.
pub fn summarize(state: &ClusterState, service: &Service) -> ServiceSummary {
    let spec = &service.spec;
    let counts = Convergence::count(
        desired_tasks(spec, state.nodes.values()),
        state.tasks_of(&service.name),
        |t| t.spec.task_template_eq(spec),
        Settle::Immediately,
    );
    let image_or_command = match spec.driver {
        DriverKind::Docker => spec.image.clone().unwrap_or_default(),
        _ => spec
            .entrypoint
            .iter()
            .chain(spec.command.iter())
            .flatten()
            .cloned()
            .collect::<Vec<_>>()
            .join(" "),
    };
    let ports = spec
        .ports
        .iter()
        .map(|p| match p.published {
            Some(pub_port) => format!("{pub_port}->{}", p.target),
            None => p.target.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    ServiceSummary {
        name: service.name.clone(),
        driver: spec.driver,
        mode: match spec.mode {
            ServiceMode::Replicated { .. } => "replicated".into(),
            ServiceMode::Global => "global".into(),
        },
        desired: counts.desired,
        running: counts.running,
        // Tasks of every revision: blue still serves during a blue-green release.
        ready: counts.ready_any(),
        revision: service.revision,
        image_or_command,
        ports,
    }
}

pub async fn list(State(app): State<AppState>) -> Json<Vec<ServiceSummary>> {
    Json(
        app.store
            .read(|s| s.services.values().map(|svc| summarize(s, svc)).collect()),
    )
}

pub async fn inspect(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ServiceDetail>, ApiError> {
    app.store
        .read(|s| {
            let service = s.services.get(&name)?;
            let mut tasks: Vec<_> = s.tasks_of(&name).cloned().collect();
            tasks.sort_by_key(|t| (t.slot, t.meta.created_at));
            Some(ServiceDetail {
                summary: summarize(s, service),
                service: service.clone(),
                tasks,
            })
        })
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("service {name:?} does not exist")))
}

pub async fn revisions(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Revision>>, ApiError> {
    let revs: Vec<Revision> = app.store.read(|s| s.revisions_of(&name).cloned().collect());
    if revs.is_empty() {
        return Err(ApiError::NotFound(format!(
            "service {name:?} has no revisions"
        )));
    }
    Ok(Json(revs))
}

pub async fn remove(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<WriteResponse>, ApiError> {
    // "Does not exist" is decided by the state machine in log order, not by this read: the
    // local state may lag the log (a new leader still applying its predecessor's last entries),
    // and answering from it would contradict an acknowledged create (found by the multi-host
    // linearizability test).
    let expect = app
        .store
        .read(|s| s.services.get(&name).map(|svc| svc.meta.version))
        .map_or(Expect::Exists, Expect::Version);
    let result = app
        .store
        .write(Command::new(vec![Op::DeleteService { name, expect }]))
        .await?;
    Ok(Json(WriteResponse {
        store_revision: check_applied(result)?,
    }))
}

pub async fn scale(
    State(app): State<AppState>,
    Path(name): Path<String>,
    StrictJsonBody(req): StrictJsonBody<ScaleRequest>,
) -> Result<Json<WriteResponse>, ApiError> {
    if req.replicas > MAX_REPLICAS {
        return Err(ApiError::invalid(
            format!(
                "replicas {} is more than the maximum of {MAX_REPLICAS}",
                req.replicas
            ),
            vec![FieldError::new(
                "replicas",
                format!("must be at most {MAX_REPLICAS}"),
            )],
        ));
    }
    for _ in 0..WRITE_RETRIES {
        let at = now_ms();
        let ops = app.store.read(|s| {
            let svc = s
                .services
                .get(&name)
                .ok_or_else(|| ApiError::NotFound(format!("service {name:?} does not exist")))?;
            if svc.spec.mode == ServiceMode::Global {
                return Err(ApiError::invalid(
                    format!("service {name:?} is global: it runs one task per node and cannot be scaled"),
                    vec![FieldError::new("replicas", "not allowed for a global service")],
                ));
            }
            crate::limits::check_scale(&app.limits, s, &svc.spec, req.replicas)?;
            let mut spec = svc.spec.clone();
            spec.mode = ServiceMode::Replicated { replicas: req.replicas };
            let entry = plan_for(s, &spec);
            Ok(write_ops(s, &spec, &entry, "scale", at))
        })?;
        if ops.is_empty() {
            return Ok(Json(WriteResponse {
                store_revision: app.store.revision(),
            }));
        }
        match check_applied(app.store.write(Command { ops, at }).await?) {
            Ok(store_revision) => return Ok(Json(WriteResponse { store_revision })),
            Err(ApiError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::Conflict(format!(
        "service {name:?} kept changing; try again"
    )))
}
