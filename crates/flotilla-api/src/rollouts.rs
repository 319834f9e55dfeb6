//! Release controls: a service's rollout (status, pause, resume, promote, abort), restart and
//! rollback. The controllers do the work; these handlers only record what the operator asked
//! for in the replicated store, with optimistic concurrency.

use crate::body::StrictJsonBody;
use crate::error::{check_applied, ApiError};
use crate::AppState;
use axum::extract::{Path, State};
use axum::Json;
use flotilla_controllers::deploy::{restart_rollout, write_ops};
use flotilla_store::{ClusterState, Command, Expect, Op};
use flotilla_types::api::{DeployResponse, PlanAction, PlanEntry};
use flotilla_types::release::RollbackRequest;
use flotilla_types::{now_ms, Rollout, RolloutAction, Strategy};
use serde::Deserialize;

/// How often a write that lost an optimistic-concurrency race is retried before giving up.
const WRITE_RETRIES: usize = 5;

/// `POST /v1/services/{name}/rollout` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action: RolloutAction,
}

fn service_missing(name: &str) -> ApiError {
    ApiError::NotFound(format!("service {name:?} does not exist"))
}

pub async fn get_rollout(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Rollout>, ApiError> {
    app.store.read(|s| {
        if !s.services.contains_key(&name) {
            return Err(service_missing(&name));
        }
        s.rollouts
            .get(&name)
            .cloned()
            .map(Json)
            .ok_or_else(|| ApiError::NotFound(format!("service {name:?} has had no rollout")))
    })
}

/// Writes `ops` built from a fresh read until no other writer interferes.
async fn write_retrying<T>(
    app: &AppState,
    mut build: impl FnMut(&ClusterState) -> Result<(Vec<Op>, T), ApiError>,
) -> Result<(u64, T), ApiError> {
    for _ in 0..WRITE_RETRIES {
        let (ops, out) = app.store.read(&mut build)?;
        match check_applied(app.store.write(Command::new(ops)).await?) {
            Ok(revision) => return Ok((revision, out)),
            Err(ApiError::Conflict(reason)) => {
                tracing::debug!(%reason, "rollout control raced another write; retrying");
            }
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::Conflict(
        "the rollout kept changing; try again".into(),
    ))
}

pub async fn control(
    State(app): State<AppState>,
    Path(name): Path<String>,
    StrictJsonBody(req): StrictJsonBody<ActionRequest>,
) -> Result<Json<Rollout>, ApiError> {
    let (_, rollout) = write_retrying(&app, |s| {
        if !s.services.contains_key(&name) {
            return Err(service_missing(&name));
        }
        let Some(current) = s.rollouts.get(&name).filter(|r| r.is_active()) else {
            return Err(ApiError::Conflict(format!(
                "service {name:?} has no rollout in progress"
            )));
        };
        let mut r = current.clone();
        match req.action {
            RolloutAction::Pause => {
                r.paused = true;
                r.reason = "paused by the operator".into();
            }
            RolloutAction::Resume => {
                r.paused = false;
                r.reason.clear();
                r.resumed_at = now_ms();
                r.failures_acknowledged = r.failed;
            }
            RolloutAction::Promote => {
                if r.strategy == Strategy::Rolling {
                    return Err(ApiError::Conflict(
                        "a rolling update has nothing to promote".into(),
                    ));
                }
                r.promote_requested = true;
            }
            RolloutAction::Abort => r.abort_requested = true,
        }
        tracing::info!(service = %name, action = ?req.action, "rollout control");
        let op = Op::PutRollout {
            rollout: r.clone(),
            expect: Expect::Version(current.meta.version),
        };
        Ok((vec![op], r))
    })
    .await?;
    Ok(Json(rollout))
}

/// `POST /v1/services/{name}/restart`: every task replaced by a fresh one of the same revision,
/// rolling and drained, with the service's `update_config`.
pub async fn restart(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Rollout>, ApiError> {
    let (_, rollout) = write_retrying(&app, |s| {
        let service = s
            .services
            .get(&name)
            .ok_or_else(|| service_missing(&name))?;
        let existing = s.rollouts.get(&name);
        if let Some(r) = existing.filter(|r| r.is_active()) {
            return Err(ApiError::Conflict(format!(
                "a {} of service {name:?} to revision {} is in progress; wait for it or abort it",
                r.strategy.as_str(),
                r.to_revision
            )));
        }
        let (r, op) = restart_rollout(service, existing, now_ms());
        Ok((vec![op], r))
    })
    .await?;
    Ok(Json(rollout))
}

/// `POST /v1/services/{name}/rollback`: deploys a kept revision's spec as a new revision; the
/// controllers release it with the service's strategy.
pub async fn rollback(
    State(app): State<AppState>,
    Path(name): Path<String>,
    StrictJsonBody(req): StrictJsonBody<RollbackRequest>,
) -> Result<Json<DeployResponse>, ApiError> {
    let by = if req.requested_by.is_empty() {
        "api".to_string()
    } else {
        req.requested_by.clone()
    };
    let (store_revision, entry) = write_retrying(&app, |s| {
        let service = s
            .services
            .get(&name)
            .ok_or_else(|| service_missing(&name))?;
        let target = match req.to {
            Some(n) => s.revisions.get(&(name.clone(), n)).ok_or_else(|| {
                ApiError::invalid(
                    format!("service {name:?} has no revision {n}"),
                    vec![flotilla_types::FieldError::new(
                        "to",
                        format!("revision {n} is not kept (see `flotilla service history {name}`)"),
                    )],
                )
            })?,
            // The newest earlier revision that runs something different.
            None => s
                .revisions_of(&name)
                .filter(|r| r.number < service.revision)
                .filter(|r| !r.spec.task_template_eq(&service.spec))
                .last()
                .ok_or_else(|| {
                    ApiError::Conflict(format!(
                        "service {name:?} has no earlier revision to roll back to"
                    ))
                })?,
        };
        if target.number == service.revision {
            return Err(ApiError::Conflict(format!(
                "service {name:?} is already at revision {}",
                target.number
            )));
        }
        let entry = PlanEntry {
            service: name.clone(),
            action: PlanAction::Update,
            revision: s.revisions_of(&name).map(|r| r.number).max().unwrap_or(0) + 1,
            change: format!("rollback to revision {}", target.number),
        };
        let ops = write_ops(s, &target.spec, &entry, &by, now_ms());
        Ok((ops, entry))
    })
    .await?;
    Ok(Json(DeployResponse {
        plan: vec![entry],
        dry_run: false,
        store_revision,
    }))
}
