//! Leaving: `flotilla leave` (drain, then the node asks for its removal), `flotilla node rm`,
//! and removing lost managers after a forced new cluster.

use super::records::{
    desired_role_key, issued_key, leaving_key, manager_key, now_secs, put_record, record_of,
    revocation_key, ManagerRecord, Revocation,
};
use super::roles::{demote, voter_count_warnings};
use super::security::security;
use super::{caller, peer_of, PeerIdentity};
use crate::body::JsonBody;
use crate::error::{check_applied, ApiError};
use crate::AppState;
use axum::extract::{Path, RawQuery, State};
use axum::{Extension, Json};
use flotilla_pki::Role;
use flotilla_store::{Command, Expect, Op, Store};
use flotilla_types::cluster::{LeaveRequest, LeaveResponse, RemoveNodeResponse};
use flotilla_types::{Availability, DesiredState, FieldError, NodeState};

/// `DELETE /v1/nodes/{id}[?force=true]` (`flotilla node rm`): removes a node from the cluster.
/// Its certificate is revoked (every manager then refuses it, see [`check_not_revoked`]), its
/// record is deleted (controllers replace its tasks elsewhere) and, for a manager, it leaves
/// the raft membership. Like Swarm, a node still heartbeating is removed only with `force`.
#[tracing::instrument(skip_all, fields(node = %id))]
pub async fn remove_node(
    State(app): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<RemoveNodeResponse>, ApiError> {
    let mut force = false;
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=').unwrap_or((pair, "true")) {
            ("force", "true" | "1") => force = true,
            ("force", "false" | "0") => force = false,
            ("force", other) => {
                return Err(ApiError::invalid(
                    "invalid query",
                    vec![FieldError::new(
                        "force",
                        format!("{other:?} is not true or false"),
                    )],
                ))
            }
            (name, _) => {
                return Err(ApiError::invalid(
                    "invalid query",
                    vec![FieldError::new(name, "unknown parameter (only force)")],
                ))
            }
        }
    }
    let node = app.store.read(|s| s.nodes.get(&id).cloned());
    let manager = record_of::<ManagerRecord>(&app.store, &manager_key(&id));
    if node.is_none() && manager.is_none() {
        return Err(ApiError::NotFound(format!("no node {id:?}")));
    }
    if let Some(node) = &node {
        if node.state == NodeState::Ready && !force {
            return Err(ApiError::Conflict(format!(
                "node {id} is ready (its agent still heartbeats): stop it first or run \
                 `flotilla leave` on it, or remove it anyway with --force"
            )));
        }
    }
    let was_manager = manager.is_some();
    if let Some((manager, _)) = &manager {
        if app
            .store
            .members()
            .iter()
            .any(|m| m.raft_id == manager.raft_id)
        {
            if manager.raft_id == app.store.node_id() {
                return Err(ApiError::Conflict(format!(
                    "node {id} is the raft leader: stop it (another manager takes over) or \
                     demote it first, then remove it from another manager"
                )));
            }
            app.store.remove_manager(manager.raft_id).await?;
        }
    }
    check_applied(
        app.store
            .write(Command::new(removal_ops(&app.store, &id)?))
            .await?,
    )?;
    tracing::info!(
        was_manager,
        force,
        "node removed; its certificate is revoked"
    );
    Ok(Json(RemoveNodeResponse {
        node: id,
        was_manager,
    }))
}

/// One command that takes `id` out of the cluster: revokes its certificates, deletes its node
/// record (its tasks are then replaced elsewhere) and every membership record naming it.
fn removal_ops(store: &Store, id: &str) -> Result<Vec<Op>, ApiError> {
    let mut ops = vec![put_record(
        &revocation_key(id),
        &Revocation {
            node: id.to_string(),
            revoked_at: now_secs(),
        },
        Expect::Any,
    )?];
    if store.read(|s| s.nodes.contains_key(id)) {
        ops.push(Op::DeleteNode {
            id: id.to_string(),
            expect: Expect::Any,
        });
    }
    for key in [
        manager_key(id),
        desired_role_key(id),
        leaving_key(id),
        issued_key(id),
        crate::agent_secret::record_key(id),
    ] {
        if store.read(|s| s.records.contains_key(&key)) {
            ops.push(Op::DeleteRecord {
                key,
                expect: Expect::Any,
            });
        }
    }
    Ok(ops)
}

/// After `flotilla init --force-new-cluster` made this manager the only raft member: removes
/// every other recorded manager as `flotilla node rm --force` would ([`removal_ops`]), so a
/// lost manager restarted with its old data is refused instead of rejoining, and must join
/// again. Returns their names. Must run on the leader.
pub async fn forget_lost_managers(store: &Store) -> Result<Vec<String>, ApiError> {
    let members: std::collections::BTreeSet<u64> =
        store.members().into_iter().map(|m| m.raft_id).collect();
    let lost: Vec<String> = store.read(|s| {
        s.records
            .range("manager/".to_string().."manager0".to_string())
            .filter_map(|(key, r)| {
                let m: ManagerRecord = serde_json::from_value(r.value.clone()).ok()?;
                (!members.contains(&m.raft_id))
                    .then(|| key.trim_start_matches("manager/").to_string())
            })
            .collect()
    });
    let mut ops = Vec::new();
    for name in &lost {
        ops.extend(removal_ops(store, name)?);
    }
    if !ops.is_empty() {
        check_applied(store.write(Command::new(ops)).await?)?;
    }
    Ok(lost)
}

/// `POST /v1/cluster/leave` (`flotilla leave` on the node): records the request, drains the
/// node (or, with `force`, shuts its tasks down at once) and demotes it first if it is a
/// manager. The node carries out the rest itself: it waits until it runs nothing, then asks
/// for its removal ([`leave_complete`]) and exits. The last manager leaves only with `force`,
/// which dissolves the cluster.
#[tracing::instrument(skip_all)]
pub(super) async fn leave(
    State(app): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    JsonBody(req): JsonBody<LeaveRequest>,
) -> Result<Json<LeaveResponse>, ApiError> {
    security(&app)?;
    let id = match (peer_of(peer), req.node.clone()) {
        (Some(me), None) => me.node_id,
        (Some(me), Some(node)) if node == me.node_id || me.role == Role::Manager => node,
        (Some(me), Some(node)) => {
            return Err(ApiError::Forbidden(format!(
                "node {} may only ask for itself to leave, not {node}",
                me.node_id
            )))
        }
        // The local CLI on a manager (loopback) or a forwarded request without certificate.
        (None, Some(node)) => node,
        (None, None) => {
            return Err(ApiError::invalid(
                "invalid leave request",
                vec![FieldError::new("node", "which node is leaving")],
            ))
        }
    };
    let node = app.store.read(|s| s.nodes.get(&id).cloned());
    let manager = record_of::<ManagerRecord>(&app.store, &manager_key(&id));
    if node.is_none() && manager.is_none() {
        return Err(ApiError::NotFound(format!("no node {id:?}")));
    }
    let mut ops = vec![put_record(
        &leaving_key(&id),
        &LeaveRequest {
            node: Some(id.clone()),
            force: req.force,
        },
        Expect::Any,
    )?];
    if let Some(mut node) = node.filter(|n| n.availability != Availability::Drain) {
        node.availability = Availability::Drain;
        node.message = "leaving the cluster (`flotilla leave`)".into();
        ops.push(Op::PutNode {
            node,
            expect: Expect::Any,
        });
    }
    if req.force {
        let running: Vec<String> = app.store.read(|s| {
            s.tasks_on(&id)
                .filter(|t| t.desired_state == DesiredState::Running)
                .map(|t| t.id.clone())
                .collect()
        });
        ops.extend(running.into_iter().map(|task| Op::SetTaskDesired {
            id: task,
            desired: DesiredState::Shutdown,
            expect: Expect::Any,
        }));
    }
    let mut warnings = Vec::new();
    match &manager {
        Some((m, _))
            if app.store.voters().len() == 1 && app.store.voters().contains(&m.raft_id) =>
        {
            if !req.force {
                return Err(ApiError::Conflict(format!(
                    "node {id} is the last manager: leaving would dissolve the cluster. Promote \
                     another node first (`flotilla node promote NODE`), or dissolve it with \
                     `flotilla leave --force` (every task stops)"
                )));
            }
            check_applied(app.store.write(Command::new(ops)).await?)?;
            warnings.push(format!(
                "{id} was the last manager: the cluster is dissolved once its tasks have stopped"
            ));
        }
        Some((m, _)) => {
            let voters = demote(&app, &id, m.raft_id, req.force, ops).await?;
            warnings.extend(voter_count_warnings(voters.len()));
        }
        None => {
            check_applied(app.store.write(Command::new(ops)).await?)?;
        }
    }
    tracing::info!(node = %id, force = req.force, "leave requested");
    Ok(Json(LeaveResponse {
        node: id,
        was_manager: manager.is_some(),
        warnings,
    }))
}

/// `POST /v1/cluster/leave/complete`: a leaving worker that runs nothing any more is removed
/// (its certificate revoked, its node record deleted), as `flotilla node rm` would.
#[tracing::instrument(skip_all)]
pub(super) async fn leave_complete(
    State(app): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
) -> Result<Json<RemoveNodeResponse>, ApiError> {
    security(&app)?;
    let me = caller(peer, "leaving")?;
    let id = me.node_id;
    if record_of::<LeaveRequest>(&app.store, &leaving_key(&id)).is_none() {
        return Err(ApiError::Conflict(format!(
            "node {id} has not asked to leave (`flotilla leave`)"
        )));
    }
    if me.role == Role::Manager
        || record_of::<ManagerRecord>(&app.store, &manager_key(&id)).is_some()
    {
        return Err(ApiError::Conflict(format!(
            "node {id} is still a manager: it leaves once demoted"
        )));
    }
    check_applied(
        app.store
            .write(Command::new(removal_ops(&app.store, &id)?))
            .await?,
    )?;
    tracing::info!(node = %id, "node left; its certificate is revoked");
    Ok(Json(RemoveNodeResponse {
        node: id,
        was_manager: false,
    }))
}
