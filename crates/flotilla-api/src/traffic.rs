//! Routing-mesh resources: per-task weights (written to the task record, which every node's
//! mesh follows), per-task traffic summed over the meshes of all nodes, and the manager's own
//! node's Prometheus metrics.

use crate::body::StrictJsonBody;
use crate::error::{check_applied, ApiError};
use crate::tasks::resolve;
use crate::AppState;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flotilla_mesh::{BreakerState, MeshStats};
use flotilla_store::{Command, Expect, Op};
use flotilla_types::api::{
    BulkWeightRequest, ServiceTraffic, TaskTraffic, WeightRequest, WriteResponse,
};
use flotilla_types::{FieldError, NodeState, Task};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How often a weight write that lost a race with another task update is retried.
const WRITE_RETRIES: usize = 5;
/// An agent slower than this to report its mesh stats is listed as unreachable.
const AGENT_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_WEIGHT: u8 = 100;

fn check_weight(field: String, weight: u8) -> Result<(), ApiError> {
    if weight > MAX_WEIGHT {
        return Err(ApiError::invalid(
            format!("{field} {weight} is above {MAX_WEIGHT}"),
            vec![FieldError::new(field, "must be between 0 and 100")],
        ));
    }
    Ok(())
}

/// Writes `weights` (task id → weight) in one command, each task guarded by its version.
async fn write_weights(app: &AppState, weights: &BTreeMap<String, u8>) -> Result<u64, ApiError> {
    for _ in 0..WRITE_RETRIES {
        let tasks: Vec<Task> = weights
            .keys()
            .map(|id| resolve(app, id))
            .collect::<Result<_, _>>()?;
        let ops: Vec<Op> = tasks
            .into_iter()
            .zip(weights.values())
            .map(|(mut task, &weight)| {
                let expect = Expect::Version(task.meta.version);
                // 100 is the default; storing it as unset keeps task records unchanged.
                task.weight = (weight != MAX_WEIGHT).then_some(weight);
                Op::PutTask { task, expect }
            })
            .collect();
        match check_applied(app.store.write(Command::new(ops)).await?) {
            Ok(revision) => return Ok(revision),
            Err(ApiError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::Conflict(
        "the tasks kept changing while setting their weights; try again".into(),
    ))
}

/// `PUT /v1/tasks/{id}/weight`.
pub async fn set_weight(
    State(app): State<AppState>,
    Path(id): Path<String>,
    StrictJsonBody(req): StrictJsonBody<WeightRequest>,
) -> Result<Json<WriteResponse>, ApiError> {
    check_weight("weight".into(), req.weight)?;
    let task = resolve(&app, &id)?;
    let store_revision = write_weights(&app, &BTreeMap::from([(task.id, req.weight)])).await?;
    Ok(Json(WriteResponse { store_revision }))
}

/// `PUT /v1/services/{name}/weights`: every named task must belong to the service.
pub async fn set_weights(
    State(app): State<AppState>,
    Path(name): Path<String>,
    StrictJsonBody(req): StrictJsonBody<BulkWeightRequest>,
) -> Result<Json<WriteResponse>, ApiError> {
    if req.weights.is_empty() {
        return Err(ApiError::invalid(
            "weights is empty",
            vec![FieldError::new("weights", "name at least one task")],
        ));
    }
    let mut by_id = BTreeMap::new();
    for (key, &weight) in &req.weights {
        check_weight(format!("weights.{key}"), weight)?;
        let task = resolve(&app, key)?;
        if task.service != name {
            return Err(ApiError::invalid(
                format!("task {key} belongs to service {}, not {name}", task.service),
                vec![FieldError::new(
                    format!("weights.{key}"),
                    format!("not a task of service {name}"),
                )],
            ));
        }
        by_id.insert(task.id, weight);
    }
    let store_revision = write_weights(&app, &by_id).await?;
    Ok(Json(WriteResponse { store_revision }))
}

/// What an agent's `GET /mesh/stats` returns.
#[derive(serde::Deserialize)]
struct AgentMeshStats {
    stats: MeshStats,
}

/// What one node's agent says about its mesh.
enum NodeMesh {
    Stats(MeshStats),
    /// The agent answers but runs no mesh (`--no-mesh`): it serves no published port.
    None,
    Unreachable,
}

/// One node's mesh stats.
async fn node_stats(app: &AppState, node: &str, agent: &str) -> NodeMesh {
    let req = app.http.get(crate::nodes::agent_url(agent, "/mesh/stats"));
    let Ok(resp) = crate::agent_secret::authorize(app, node, req)
        .timeout(AGENT_TIMEOUT)
        .send()
        .await
    else {
        return NodeMesh::Unreachable;
    };
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return NodeMesh::None;
    }
    if !resp.status().is_success() {
        return NodeMesh::Unreachable;
    }
    match resp.json::<AgentMeshStats>().await {
        Ok(s) => NodeMesh::Stats(s.stats),
        Err(_) => NodeMesh::Unreachable,
    }
}

fn breaker_name(state: BreakerState) -> &'static str {
    match state {
        BreakerState::Closed => "closed",
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half_open",
    }
}

/// `GET /v1/services/{name}/traffic`: every ready node's mesh, per task of the service.
pub async fn traffic(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ServiceTraffic>, ApiError> {
    let (tasks, agents) = app.store.read(|s| {
        if !s.services.contains_key(&name) {
            return Err(ApiError::NotFound(format!(
                "service {name:?} does not exist"
            )));
        }
        let tasks: Vec<Task> = s.tasks_of(&name).cloned().collect();
        let agents: Vec<(String, String)> = s
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Ready)
            .filter_map(|n| Some((n.id.clone(), n.agent_addr.clone()?)))
            .collect();
        Ok((tasks, agents))
    })?;
    let answers = futures::future::join_all(
        agents
            .iter()
            .map(|(node, agent)| async { (node.clone(), node_stats(&app, node, agent).await) }),
    )
    .await;
    let mut out = ServiceTraffic {
        service: name.clone(),
        meshes: Some(0),
        ..ServiceTraffic::default()
    };
    let mut per_task: BTreeMap<String, TaskTraffic> = BTreeMap::new();
    for (node, stats) in answers {
        let stats = match stats {
            NodeMesh::Stats(stats) => stats,
            NodeMesh::None => continue,
            NodeMesh::Unreachable => {
                out.unreachable_nodes.push(node);
                continue;
            }
        };
        *out.meshes.get_or_insert(0) += 1;
        let Some(service) = stats.services.get(&name) else {
            continue;
        };
        // A task published on several ports has one backend per port on each node.
        let mut routed_here = BTreeSet::new();
        for b in &service.tasks {
            let t = per_task.entry(b.task_id.clone()).or_default();
            t.in_flight += b.in_flight;
            t.requests += b.requests;
            t.connections += b.connections;
            t.errors += b.errors.connect + b.errors.status_5xx + b.errors.timeout;
            t.p50_ms = t.p50_ms.max(b.latency.p50_ms);
            t.p90_ms = t.p90_ms.max(b.latency.p90_ms);
            t.p99_ms = t.p99_ms.max(b.latency.p99_ms);
            // The worst breaker of the node's backends for this task.
            let state = breaker_name(b.breaker);
            let entry = t
                .breakers
                .entry(node.clone())
                .or_insert_with(|| state.to_string());
            if entry == "closed" || state == "open" {
                *entry = state.to_string();
            }
            if b.weight > 0 && b.healthy {
                routed_here.insert(b.task_id.clone());
            }
        }
        for id in &routed_here {
            if let Some(t) = per_task.get_mut(id) {
                t.routed_by += 1;
            }
        }
    }
    for task in &tasks {
        if let Some(mut t) = per_task.remove(&task.id) {
            t.task_id = task.id.clone();
            t.weight = task.weight.unwrap_or(MAX_WEIGHT);
            out.tasks.push(t);
        } else if task.desired_state == flotilla_types::DesiredState::Running {
            out.tasks.push(TaskTraffic {
                task_id: task.id.clone(),
                weight: task.weight.unwrap_or(MAX_WEIGHT),
                ..TaskTraffic::default()
            });
        }
    }
    // Tasks the meshes still carry traffic for after their record was deleted.
    for (id, mut t) in per_task {
        t.task_id = id;
        out.tasks.push(t);
    }
    Ok(Json(out))
}

/// `GET /metrics`: the Prometheus metrics of this manager's own node's mesh.
pub async fn metrics(State(app): State<AppState>) -> Result<Response, ApiError> {
    let node_id = app.local_node.as_deref().ok_or_else(|| {
        ApiError::NotFound("this manager runs no agent, so it has no mesh metrics".into())
    })?;
    let agent = app
        .store
        .read(|s| s.nodes.get(node_id).and_then(|n| n.agent_addr.clone()))
        .ok_or_else(|| {
            ApiError::Unavailable(format!("node {node_id} has not registered its agent"))
        })?;
    let req = app.http.get(crate::nodes::agent_url(&agent, "/metrics"));
    let resp = crate::agent_secret::authorize(&app, node_id, req)
        .timeout(AGENT_TIMEOUT)
        .send()
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot reach the agent of {node_id}: {e}")))?;
    if !resp.status().is_success() {
        return Err(ApiError::Unavailable(format!(
            "the agent of {node_id} answered {} for /metrics",
            resp.status()
        )));
    }
    let text = resp
        .text()
        .await
        .map_err(|e| ApiError::Unavailable(format!("reading {node_id}'s metrics: {e}")))?;
    Ok(([("content-type", "text/plain; version=0.0.4")], text).into_response())
}
