//! Role changes: `flotilla node promote|demote` record them; the node polls its membership and
//! asks for its certificate in the new role itself, as a Swarm node does.

use super::join::new_manager_raft_id;
use super::records::{
    desired_role_key, issue_certificate, leaving_key, manager_key, put_record, record_of,
    revocations, DesiredRole, ManagerRecord,
};
use super::security::security;
use super::{caller, PeerIdentity};
use crate::body::JsonBody;
use crate::error::{check_applied, ApiError};
use crate::AppState;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use flotilla_pki::{NodeIdentity, Role};
use flotilla_store::{Command, Expect, Op, Store};
use flotilla_types::cluster::{
    JoinResponse, LeaveRequest, ManagerInfo, MembershipStatus, RenewResponse, RoleChangeRequest,
    RoleChangeResponse,
};
use flotilla_types::{FieldError, NodeState};

/// `GET /v1/cluster/managers`: raft members with their node names.
pub(super) async fn list_managers(State(app): State<AppState>) -> Json<Vec<ManagerInfo>> {
    let names: std::collections::BTreeMap<u64, String> = app.store.read(|s| {
        s.records
            .range("manager/".to_string().."manager0".to_string())
            .filter_map(|(key, r)| {
                let m: ManagerRecord = serde_json::from_value(r.value.clone()).ok()?;
                Some((m.raft_id, key.trim_start_matches("manager/").to_string()))
            })
            .collect()
    });
    let leader = app.store.current_leader();
    Json(
        app.store
            .members()
            .into_iter()
            .map(|m| ManagerInfo {
                raft_id: m.raft_id,
                node: names.get(&m.raft_id).cloned(),
                leader: Some(m.raft_id) == leader,
                addr: m.addr,
                voter: m.voter,
            })
            .collect(),
    )
}

/// Advice on a number of voters: 2k managers tolerate no more failures than 2k-1, and more
/// than 7 slow every write for no useful gain (Swarm warns the same way).
pub(super) fn voter_count_warnings(voters: usize) -> Vec<String> {
    let mut warnings = Vec::new();
    if voters > 1 && voters.is_multiple_of(2) {
        warnings.push(format!(
            "the cluster now has {voters} managers: an even number tolerates no more manager \
             failures than {} (a quorum is {}); use 1, 3, 5 or 7",
            voters - 1,
            voters / 2 + 1
        ));
    }
    if voters > 7 {
        warnings.push(format!(
            "the cluster now has {voters} managers: more than 7 slows every write; 1, 3, 5 or 7 \
             are supported"
        ));
    }
    warnings
}

fn pending_role(store: &Store, node: &str) -> Option<DesiredRole> {
    record_of::<DesiredRole>(store, &desired_role_key(node)).map(|(d, _)| d)
}

/// `POST /v1/nodes/{id}/promote` (`flotilla node promote`): the worker is asked to become a
/// manager. It notices within a second or two, gets a manager certificate
/// ([`promote_self`]), starts the manager's components in place and joins raft as a learner,
/// then as a voter ([`add_manager`]). Its tasks keep running.
#[tracing::instrument(skip_all, fields(node = %id))]
pub async fn promote_node(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RoleChangeResponse>, ApiError> {
    security(&app)?;
    let node = app
        .store
        .read(|s| s.nodes.get(&id).cloned())
        .ok_or_else(|| ApiError::NotFound(format!("no node {id:?}")))?;
    let voters: Vec<u64> = app.store.voters().into_iter().collect();
    let response = |unchanged, warnings| RoleChangeResponse {
        node: id.clone(),
        role: Role::Manager.to_string(),
        voters: voters.clone(),
        unchanged,
        warnings,
    };
    if record_of::<ManagerRecord>(&app.store, &manager_key(&id)).is_some() {
        return Ok(Json(response(true, Vec::new())));
    }
    let op = put_record(
        &desired_role_key(&id),
        &DesiredRole {
            role: Role::Manager.to_string(),
            raft_id: None,
        },
        Expect::Any,
    )?;
    check_applied(app.store.write(Command::new(vec![op])).await?)?;
    let mut warnings = voter_count_warnings(voters.len() + 1);
    if node.state != NodeState::Ready {
        warnings.push(format!(
            "node {id} is down: it becomes a manager once its agent is back"
        ));
    }
    tracing::info!("promotion requested");
    Ok(Json(response(false, warnings)))
}

/// `POST /v1/nodes/{id}/demote` (`flotilla node demote`): the manager leaves the raft voters
/// now; it then notices, gets a worker certificate ([`demote_self`]) and carries on as a worker
/// with its tasks. Refused for the last manager and when the managers left would not have a
/// quorum.
#[tracing::instrument(skip_all, fields(node = %id))]
pub async fn demote_node(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RoleChangeResponse>, ApiError> {
    security(&app)?;
    let Some((manager, _)) = record_of::<ManagerRecord>(&app.store, &manager_key(&id)) else {
        if app.store.read(|s| s.nodes.contains_key(&id)) {
            return Ok(Json(RoleChangeResponse {
                node: id,
                role: Role::Worker.to_string(),
                voters: app.store.voters().into_iter().collect(),
                unchanged: true,
                warnings: Vec::new(),
            }));
        }
        return Err(ApiError::NotFound(format!("no node {id:?}")));
    };
    let voters = demote(&app, &id, manager.raft_id, false, Vec::new()).await?;
    Ok(Json(RoleChangeResponse {
        node: id,
        role: Role::Worker.to_string(),
        warnings: voter_count_warnings(voters.len()),
        voters,
        unchanged: false,
    }))
}

/// Takes manager `id` (raft member `raft_id`) out of the voters and records that it is to be a
/// worker (with `extra` in the same command). The order matters: the record first, so a
/// manager that is already out of raft always finds out what it is to become. Unsafe removals
/// (the last manager, a quorum lost) are refused; `force` lets a quorum-risking one through.
pub(super) async fn demote(
    app: &AppState,
    id: &str,
    raft_id: u64,
    force: bool,
    extra: Vec<Op>,
) -> Result<Vec<u64>, ApiError> {
    if let Some(risk) = app.store.removal_risk(raft_id) {
        let last = app.store.voters().len() == 1;
        if !force || last {
            return Err(ApiError::Conflict(format!(
                "cannot demote {id}: {risk}. Promote another node first (`flotilla node promote \
                 NODE`) or bring the unreachable managers back{}",
                if last {
                    ""
                } else {
                    "; `flotilla leave --force` on the node ignores this"
                }
            )));
        }
        tracing::warn!(node = id, %risk, "demoting anyway (--force)");
    }
    let mut ops = vec![
        put_record(
            &desired_role_key(id),
            &DesiredRole {
                role: Role::Worker.to_string(),
                raft_id: Some(raft_id),
            },
            Expect::Any,
        )?,
        Op::DeleteRecord {
            key: manager_key(id),
            expect: Expect::Any,
        },
    ];
    ops.extend(extra);
    check_applied(app.store.write(Command::new(ops)).await?)?;
    if app.store.members().iter().any(|m| m.raft_id == raft_id) {
        // On the leader demoting itself this commits, then openraft steps it down and the
        // others elect a new leader.
        app.store.remove_manager(raft_id).await?;
    }
    tracing::info!(node = id, raft_id, "manager demoted");
    Ok(app.store.voters().into_iter().collect())
}

/// `GET /v1/cluster/membership`: what the cluster wants of the calling node.
pub(super) async fn membership(
    State(app): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
) -> Result<Json<MembershipStatus>, ApiError> {
    let sec = security(&app)?;
    let me = caller(peer, "reading the node's membership")?;
    let role = pending_role(&app.store, &me.node_id)
        .map(|d| d.role)
        .unwrap_or_else(|| me.role.to_string());
    let leaving = record_of::<LeaveRequest>(&app.store, &leaving_key(&me.node_id)).map(|(l, _)| l);
    let trust_pem = sec.ca().trust_pem();
    Ok(Json(MembershipStatus {
        role,
        leaving,
        trust_pem,
        revoked: revocations(&app.store),
    }))
}

/// `POST /v1/cluster/promote-self`: a worker whose promotion is pending gets its manager
/// certificate, a raft id and the manager secrets (as a manager joining with a token would).
#[tracing::instrument(skip_all)]
pub(super) async fn promote_self(
    State(app): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    JsonBody(req): JsonBody<RoleChangeRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    let sec = security(&app)?;
    let me = caller(peer, "a promotion")?;
    if pending_role(&app.store, &me.node_id).is_none_or(|d| d.role != Role::Manager.as_str()) {
        return Err(ApiError::Conflict(format!(
            "node {} is not being promoted (run `flotilla node promote {}` on a manager)",
            me.node_id, me.node_id
        )));
    }
    let addr = req
        .advertise_addr
        .as_deref()
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .ok_or_else(|| {
            ApiError::invalid(
                "invalid promotion",
                vec![FieldError::new(
                    "advertise_addr",
                    "a manager must say where it serves (IP:PORT): start the node with \
                     --advertise-addr or a non-wildcard --listen-addr",
                )],
            )
        })?;
    let raft_id = new_manager_raft_id(&app.store, &addr.to_string())?;
    let identity = NodeIdentity {
        node_id: me.node_id.clone(),
        role: Role::Manager,
    };
    let (cert_pem, trust_pem) = issue_certificate(
        &app.store,
        sec,
        &req.csr_pem,
        &identity,
        &[addr.ip().to_string()],
    )
    .await?;
    tracing::info!(node = %me.node_id, raft_id, "promoted; manager certificate issued");
    Ok(Json(JoinResponse {
        role: Role::Manager.to_string(),
        cert_pem,
        trust_pem,
        raft_id: Some(raft_id),
        manager_secrets: Some(sec.manager_secrets()),
    }))
}

/// `POST /v1/cluster/demote-self`: a manager whose demotion is pending gets its worker
/// certificate. If its removal from raft did not happen (the demoting call failed half way)
/// it happens here, with the same safety checks.
#[tracing::instrument(skip_all)]
pub(super) async fn demote_self(
    State(app): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    JsonBody(req): JsonBody<RoleChangeRequest>,
) -> Result<Json<RenewResponse>, ApiError> {
    let sec = security(&app)?;
    let me = caller(peer, "a demotion")?;
    let Some(pending) = pending_role(&app.store, &me.node_id)
        .filter(|d| d.role == Role::Worker.as_str() && me.role == Role::Manager)
    else {
        return Err(ApiError::Conflict(format!(
            "node {} is not being demoted",
            me.node_id
        )));
    };
    if let Some(raft_id) = pending.raft_id {
        if app.store.members().iter().any(|m| m.raft_id == raft_id) {
            let force = record_of::<LeaveRequest>(&app.store, &leaving_key(&me.node_id))
                .is_some_and(|(l, _)| l.force);
            if let Some(risk) = app.store.removal_risk(raft_id).filter(|_| !force) {
                return Err(ApiError::Conflict(format!(
                    "cannot demote {}: {risk}",
                    me.node_id
                )));
            }
            app.store.remove_manager(raft_id).await?;
        }
    }
    let identity = NodeIdentity {
        node_id: me.node_id.clone(),
        role: Role::Worker,
    };
    let (cert_pem, trust_pem) =
        issue_certificate(&app.store, sec, &req.csr_pem, &identity, &[]).await?;
    tracing::info!(node = %me.node_id, "demoted; worker certificate issued");
    Ok(Json(RenewResponse {
        cert_pem,
        trust_pem,
    }))
}
