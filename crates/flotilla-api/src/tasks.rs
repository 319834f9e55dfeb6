//! Task resources: listing, status reports from agents, and log streaming (proxied to the agent
//! of the task's node).

use crate::body::JsonBody;
use crate::error::{check_applied, ApiError};
use crate::query::Query;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use flotilla_store::{Command, Op};
use flotilla_types::api::TaskStats;
use flotilla_types::api::{BulkStatusReport, BulkStatusResponse, TaskStatusReport, WriteResponse};
use flotilla_types::{Resources, Task};
use futures::TryStreamExt;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct TaskFilter {
    pub service: Option<String>,
    pub node: Option<String>,
}

pub async fn list(State(app): State<AppState>, Query(f): Query<TaskFilter>) -> Json<Vec<Task>> {
    let mut tasks: Vec<Task> = app.store.read(|s| {
        s.tasks
            .values()
            .filter(|t| f.service.as_ref().is_none_or(|svc| &t.service == svc))
            .filter(|t| f.node.as_ref().is_none_or(|n| t.node.as_ref() == Some(n)))
            .cloned()
            .collect()
    });
    tasks.sort_by(|a, b| {
        (&a.service, a.slot, &a.node, a.meta.created_at).cmp(&(
            &b.service,
            b.slot,
            &b.node,
            b.meta.created_at,
        ))
    });
    Json(tasks)
}

/// Finds a task by full id, unique id prefix, or `service.slot` name (the live one).
pub(crate) fn resolve(app: &AppState, key: &str) -> Result<Task, ApiError> {
    app.store.read(|s| {
        if let Some(t) = s.tasks.get(key) {
            return Ok(t.clone());
        }
        let by_name: Vec<&Task> = s
            .tasks
            .values()
            .filter(|t| t.name() == key && t.desired_state == flotilla_types::DesiredState::Running)
            .collect();
        if let [t] = by_name.as_slice() {
            return Ok((*t).clone());
        }
        let by_prefix: Vec<&Task> = s.tasks.values().filter(|t| t.id.starts_with(key)).collect();
        match by_prefix.as_slice() {
            [t] => Ok((*t).clone()),
            [] => Err(ApiError::NotFound(format!("task {key:?} does not exist"))),
            _ => Err(ApiError::invalid(
                format!(
                    "task id prefix {key:?} is ambiguous ({} tasks match)",
                    by_prefix.len()
                ),
                vec![],
            )),
        }
    })
}

pub async fn get_task(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Task>, ApiError> {
    resolve(&app, &id).map(Json)
}

pub async fn report_status(
    State(app): State<AppState>,
    Path(id): Path<String>,
    JsonBody(report): JsonBody<TaskStatusReport>,
) -> Result<Json<WriteResponse>, ApiError> {
    let result = app
        .store
        .write_coalesced(Command::new(vec![Op::SetTaskStatus {
            id,
            node: report.node,
            status: report.status,
        }]))
        .await?;
    Ok(Json(WriteResponse {
        store_revision: check_applied(result)?,
    }))
}

/// Applies the reports that name a task on `node`; a report for a task that is gone or moved
/// is returned as rejected rather than failing the rest (one atomic command would).
pub async fn report_bulk_status(
    State(app): State<AppState>,
    JsonBody(bulk): JsonBody<BulkStatusReport>,
) -> Result<Json<BulkStatusResponse>, ApiError> {
    for _ in 0..3 {
        let (ops, rejected) = app.store.read(|s| {
            let mut ops = Vec::with_capacity(bulk.reports.len());
            let mut rejected = Vec::new();
            for (i, r) in bulk.reports.iter().enumerate() {
                match s.tasks.get(&r.task) {
                    Some(t) if t.node.as_deref() == Some(bulk.node.as_str()) => {
                        ops.push(Op::SetTaskStatus {
                            id: r.task.clone(),
                            node: bulk.node.clone(),
                            status: r.status.clone(),
                        })
                    }
                    Some(_) => rejected.push(flotilla_types::FieldError::new(
                        format!("reports[{i}]"),
                        format!("task {} is not assigned to node {}", r.task, bulk.node),
                    )),
                    None => rejected.push(flotilla_types::FieldError::new(
                        format!("reports[{i}]"),
                        format!("task {} does not exist", r.task),
                    )),
                }
            }
            (ops, rejected)
        });
        let applied = ops.len();
        if ops.is_empty() {
            return Ok(Json(BulkStatusResponse {
                store_revision: app.store.revision(),
                applied,
                rejected,
            }));
        }
        // Every agent reports on its own; coalesced, many nodes' reports share one raft entry
        // (one fsync) instead of one each.
        match check_applied(app.store.write_coalesced(Command::new(ops)).await?) {
            Ok(store_revision) => {
                return Ok(Json(BulkStatusResponse {
                    store_revision,
                    applied,
                    rejected,
                }))
            }
            // A task was deleted or moved between the read and the write: filter again.
            Err(ApiError::Conflict(_) | ApiError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::Conflict(
        "tasks kept changing while applying the reports; send them again".into(),
    ))
}

#[derive(Debug, Deserialize)]
pub struct LogQuery {
    #[serde(default)]
    pub follow: bool,
    pub tail: Option<usize>,
}

pub async fn logs(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let (task, node_id, agent) = task_agent(&app, &id, "logs")?;
    let mut url = crate::nodes::agent_url(
        &agent,
        &format!("/tasks/{}/logs?follow={}", task.id, q.follow),
    );
    if let Some(n) = q.tail {
        url.push_str(&format!("&tail={n}"));
    }
    let req = crate::agent_secret::authorize(&app, &node_id, app.http.get(&url));
    let resp = req.send().await.map_err(|e| {
        ApiError::Unavailable(format!(
            "cannot reach the agent of node {node_id} at {agent}: {e}"
        ))
    })?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(if status.as_u16() == 404 {
            ApiError::NotFound(format!(
                "node {node_id} has no logs for task {}: {text}",
                task.id
            ))
        } else {
            ApiError::Unavailable(format!("agent on {node_id} answered {status}: {text}"))
        });
    }
    let stream = resp.bytes_stream().map_err(std::io::Error::other);
    Response::builder()
        .header("content-type", "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// The task `key` names, its node and the address of that node's agent; `what` ("logs",
/// "stats") names the request in errors.
fn task_agent(app: &AppState, key: &str, what: &str) -> Result<(Task, String, String), ApiError> {
    let task = resolve(app, key)?;
    let node_id = task.node.clone().ok_or_else(|| {
        ApiError::NotFound(format!(
            "task {} was never placed on a node, so it has no {what}",
            task.id
        ))
    })?;
    let agent = app
        .store
        .read(|s| s.nodes.get(&node_id).and_then(|n| n.agent_addr.clone()))
        .ok_or_else(|| ApiError::Unavailable(format!("node {node_id} does not serve {what}")))?;
    Ok((task, node_id, agent))
}

/// Maps an agent's non-success answer to an API error.
async fn agent_failure(resp: reqwest::Response, node_id: &str, task_id: &str) -> ApiError {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    match status.as_u16() {
        404 => ApiError::NotFound(format!("task {task_id} is not on node {node_id}: {text}")),
        400 => ApiError::invalid(text, vec![]),
        409 => ApiError::Conflict(text),
        _ => ApiError::Unavailable(format!("agent on {node_id} answered {status}: {text}")),
    }
}

/// `GET /v1/tasks/{id}/stats`: cpu and memory use, from the agent of the task's node.
pub async fn stats(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TaskStats>, ApiError> {
    let (task, node_id, agent) = task_agent(&app, &id, "stats")?;
    let url = crate::nodes::agent_url(&agent, &format!("/tasks/{}/stats", task.id));
    let req = crate::agent_secret::authorize(&app, &node_id, app.http.get(&url));
    let resp = req.send().await.map_err(|e| {
        ApiError::Unavailable(format!(
            "cannot reach the agent of node {node_id} at {agent}: {e}"
        ))
    })?;
    if !resp.status().is_success() {
        return Err(agent_failure(resp, &node_id, &task.id).await);
    }
    resp.json::<TaskStats>()
        .await
        .map(Json)
        .map_err(|e| ApiError::Unavailable(format!("agent on {node_id} sent bad stats: {e}")))
}

/// `POST /v1/tasks/{id}/resources`: changes a running task's cpu/memory limits in place.
pub async fn update_resources(
    State(app): State<AppState>,
    Path(id): Path<String>,
    JsonBody(resources): JsonBody<Resources>,
) -> Result<axum::http::StatusCode, ApiError> {
    let (task, node_id, agent) = task_agent(&app, &id, "resource updates")?;
    let url = crate::nodes::agent_url(&agent, &format!("/tasks/{}/resources", task.id));
    let req = app.http.post(&url).json(&resources);
    let resp = crate::agent_secret::authorize(&app, &node_id, req)
        .send()
        .await
        .map_err(|e| {
            ApiError::Unavailable(format!(
                "cannot reach the agent of node {node_id} at {agent}: {e}"
            ))
        })?;
    if !resp.status().is_success() {
        return Err(agent_failure(resp, &node_id, &task.id).await);
    }
    Ok(axum::http::StatusCode::NO_CONTENT)
}
