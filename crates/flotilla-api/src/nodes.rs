//! Node resources: agents register and heartbeat; operators list.

use crate::body::JsonBody;
use crate::error::{check_applied, ApiError};
use crate::AppState;
use axum::extract::{Path, State};
use axum::Json;
use flotilla_store::{Command, Expect, Op};
use flotilla_types::api::{Heartbeat, NodeRegistration, WriteResponse};
use flotilla_types::{now_ms, validate_name, FieldError, Meta, Node, NodeRole, NodeState};

pub async fn list(State(app): State<AppState>) -> Json<Vec<Node>> {
    Json(app.store.read(|s| s.nodes.values().cloned().collect()))
}

fn validate_registration(reg: &NodeRegistration) -> Result<(), ApiError> {
    let mut fields = Vec::new();
    if let Err(reason) = validate_name(&reg.id) {
        fields.push(FieldError::new("id", reason));
    }
    if reg.hostname.trim().is_empty() {
        fields.push(FieldError::new("hostname", "must not be empty"));
    }
    if reg.drivers.is_empty() {
        fields.push(FieldError::new(
            "drivers",
            "a node must offer at least one driver",
        ));
    }
    if let Some(addr) = &reg.agent_addr {
        if addr.parse::<std::net::SocketAddr>().is_err() {
            fields.push(FieldError::new(
                "agent_addr",
                format!("{addr:?} is not HOST:PORT"),
            ));
        }
    }
    if fields.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid("invalid node registration", fields))
    }
}

/// Creates the node, or refreshes what the agent reports while keeping what operators set
/// (availability, labels).
pub async fn register(
    State(app): State<AppState>,
    JsonBody(reg): JsonBody<NodeRegistration>,
) -> Result<Json<Node>, ApiError> {
    validate_registration(&reg)?;
    for _ in 0..5 {
        let now = now_ms();
        let existing = app.store.read(|s| s.nodes.get(&reg.id).cloned());
        let node = Node {
            id: reg.id.clone(),
            hostname: reg.hostname.clone(),
            role: existing.as_ref().map_or(NodeRole::Manager, |n| n.role),
            availability: existing
                .as_ref()
                .map(|n| n.availability)
                .unwrap_or_default(),
            state: NodeState::Ready,
            labels: existing
                .as_ref()
                .map(|n| n.labels.clone())
                .unwrap_or_else(|| reg.labels.clone()),
            engine_labels: reg.engine_labels.clone(),
            zone: existing.as_ref().and_then(|n| n.zone.clone()),
            resources: reg.resources,
            drivers: reg.drivers.clone(),
            agent_addr: reg.agent_addr.clone(),
            last_heartbeat: now,
            message: String::new(),
            meta: existing.as_ref().map(|n| n.meta).unwrap_or(Meta::default()),
        };
        let expect = existing
            .as_ref()
            .map_or(Expect::Absent, |n| Expect::Version(n.meta.version));
        let result = app
            .store
            .write(Command {
                ops: vec![Op::PutNode { node, expect }],
                at: now,
            })
            .await?;
        match check_applied(result) {
            Ok(_) => {
                let node = app.store.read(|s| s.nodes.get(&reg.id).cloned());
                return node
                    .map(Json)
                    .ok_or_else(|| ApiError::Internal("node vanished after registration".into()));
            }
            Err(ApiError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::Conflict(format!(
        "node {} kept changing during registration",
        reg.id
    )))
}

pub async fn heartbeat(
    State(app): State<AppState>,
    Path(id): Path<String>,
    JsonBody(hb): JsonBody<Heartbeat>,
) -> Result<Json<WriteResponse>, ApiError> {
    tracing::trace!(node = %id, agent_time = hb.at, "heartbeat");
    let result = app
        .store
        .write(Command::new(vec![Op::NodeHeartbeat {
            id,
            // The manager's clock judges liveness, so skew between agents and managers cannot
            // make a node look dead or alive; the agent's own time is only logged.
            at: now_ms(),
        }]))
        .await?;
    Ok(Json(WriteResponse {
        store_revision: check_applied(result)?,
    }))
}
