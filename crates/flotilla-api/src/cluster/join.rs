//! Admission: the CA for joiners, joining with a token, adding a manager to raft, certificate
//! renewal, and the join tokens.

use super::records::{
    desired_role_key, issue_certificate, manager_key, now_secs, record_manager, record_of,
    revocation_key, ManagerRecord, Revocation,
};
use super::security::{pki_error, security};
use super::{peer_of, PeerIdentity};
use crate::body::JsonBody;
use crate::error::{check_applied, ApiError};
use crate::AppState;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use flotilla_pki::{JoinToken, NodeIdentity, Role};
use flotilla_store::{Command, Expect, Op, Store};
use flotilla_types::cluster::{
    AddManagerRequest, CaResponse, JoinRequest, JoinResponse, RenewRequest, RenewResponse,
    TokensResponse,
};
use flotilla_types::{now_ms, validate_name, FieldError};

pub(super) async fn ca(State(app): State<AppState>) -> Result<Json<CaResponse>, ApiError> {
    let sec = security(&app)?;
    Ok(Json(CaResponse {
        trust_pem: sec.ca().trust_pem(),
    }))
}

fn validate_join(req: &JoinRequest) -> Result<JoinToken, ApiError> {
    let mut fields = Vec::new();
    if let Err(reason) = validate_name(&req.node_name) {
        fields.push(FieldError::new("node_name", reason));
    }
    if let Some(addr) = &req.advertise_addr {
        if addr.parse::<std::net::SocketAddr>().is_err() {
            fields.push(FieldError::new(
                "advertise_addr",
                format!("{addr:?} is not IP:PORT"),
            ));
        }
    }
    if !req.csr_pem.contains("CERTIFICATE REQUEST") {
        fields.push(FieldError::new("csr_pem", "not a PEM certificate request"));
    }
    let token = req.token.parse::<JoinToken>();
    if let Err(e) = &token {
        fields.push(FieldError::new("token", e.to_string()));
    }
    match (fields.is_empty(), token) {
        (true, Ok(token)) => Ok(token),
        _ => Err(ApiError::invalid("invalid join request", fields)),
    }
}

#[tracing::instrument(skip_all, fields(node = %req.node_name))]
pub(super) async fn join(
    State(app): State<AppState>,
    JsonBody(req): JsonBody<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    let sec = security(&app)?;
    let token = validate_join(&req)?;
    // A cluster from before the PKI was replicated: put it in the store now, so every manager
    // honours the same tokens from here on.
    sec.publish(&app.store).await?;
    // A certificate issued in the same second as a removal would count as revoked.
    if let Some((rev, _)) = record_of::<Revocation>(&app.store, &revocation_key(&req.node_name)) {
        if now_secs() <= rev.revoked_at {
            let into_second = now_ms().rem_euclid(1000).unsigned_abs();
            tokio::time::sleep(std::time::Duration::from_millis(1010 - into_second)).await;
        }
    }
    let digest = sec.ca().signer.digest().map_err(pki_error)?;
    let role = sec.secrets().role_of(&token, &digest).map_err(|e| {
        tracing::warn!(error = %e, "join refused");
        pki_error(e)
    })?;
    let mut addresses = Vec::new();
    let raft_id = match role {
        Role::Manager => {
            let addr = req.advertise_addr.clone().ok_or_else(|| {
                ApiError::invalid(
                    "invalid join request",
                    vec![FieldError::new(
                        "advertise_addr",
                        "a manager must say where it serves (IP:PORT)",
                    )],
                )
            })?;
            if let Some((host, _)) = addr.rsplit_once(':') {
                addresses.push(host.to_string());
            }
            Some(new_manager_raft_id(&app.store, &addr)?)
        }
        Role::Worker => None,
    };
    let identity = NodeIdentity {
        node_id: req.node_name.clone(),
        role,
    };
    let (cert_pem, trust_pem) =
        issue_certificate(&app.store, sec, &req.csr_pem, &identity, &addresses).await?;
    tracing::info!(%role, ?raft_id, "node admitted; certificate issued");
    Ok(Json(JoinResponse {
        role: role.to_string(),
        cert_pem,
        trust_pem,
        raft_id,
        manager_secrets: (role == Role::Manager).then(|| sec.manager_secrets()),
    }))
}

#[tracing::instrument(skip_all, fields(raft_id = req.raft_id))]
pub(super) async fn add_manager(
    State(app): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    JsonBody(req): JsonBody<AddManagerRequest>,
) -> Result<Json<Vec<u64>>, ApiError> {
    security(&app)?;
    // Only the joining manager itself, holding its new manager certificate, may do this.
    let node = match peer_of(peer) {
        Some(id) if id.role == Role::Manager => id.node_id,
        _ => {
            return Err(ApiError::Unauthorized(
                "adding a manager needs the joining manager's certificate".into(),
            ))
        }
    };
    if req.advertise_addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::invalid(
            "invalid manager",
            vec![FieldError::new(
                "advertise_addr",
                format!("{:?} is not IP:PORT", req.advertise_addr),
            )],
        ));
    }
    app.store
        .add_manager(req.raft_id, &req.advertise_addr)
        .await?;
    record_manager(&app.store, &node, req.raft_id, &req.advertise_addr).await?;
    // A promoted worker has arrived: its promotion is no longer pending.
    if app
        .store
        .read(|s| s.records.contains_key(&desired_role_key(&node)))
    {
        let op = Op::DeleteRecord {
            key: desired_role_key(&node),
            expect: Expect::Any,
        };
        check_applied(app.store.write(Command::new(vec![op])).await?)?;
    }
    Ok(Json(
        app.store
            .members()
            .into_iter()
            .filter(|m| m.voter)
            .map(|m| m.raft_id)
            .collect(),
    ))
}

pub(super) async fn renew(
    State(app): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    JsonBody(req): JsonBody<RenewRequest>,
) -> Result<Json<RenewResponse>, ApiError> {
    let sec = security(&app)?;
    let identity = peer_of(peer).ok_or_else(|| {
        ApiError::Unauthorized("renewal needs the node's current certificate".into())
    })?;
    // A manager keeps the IP SAN of the address it serves at (ordinary TLS clients check it).
    let addresses: Vec<String> =
        record_of::<ManagerRecord>(&app.store, &manager_key(&identity.node_id))
            .filter(|_| identity.role == Role::Manager)
            .and_then(|(m, _)| m.addr.rsplit_once(':').map(|(host, _)| host.to_string()))
            .into_iter()
            .collect();
    let (cert_pem, trust_pem) =
        issue_certificate(&app.store, sec, &req.csr_pem, &identity, &addresses).await?;
    tracing::info!(node = %identity.node_id, "certificate renewed");
    Ok(Json(RenewResponse {
        cert_pem,
        trust_pem,
    }))
}

pub(super) async fn tokens(State(app): State<AppState>) -> Result<Json<TokensResponse>, ApiError> {
    Ok(Json(security(&app)?.tokens().map_err(pki_error)?))
}

pub(super) async fn rotate_token(
    State(app): State<AppState>,
    Path(role): Path<String>,
) -> Result<Json<TokensResponse>, ApiError> {
    let sec = security(&app)?;
    let role: Role = role.parse().map_err(|reason: String| {
        ApiError::invalid("invalid role", vec![FieldError::new("role", reason)])
    })?;
    // Through the store, so every manager refuses the old token, not just this one.
    let mut secrets = sec.manager_secrets();
    let mut join = sec.secrets().clone();
    join.rotate(role);
    secrets.join_secrets = join.to_file_contents();
    sec.store_secrets(&app.store, &secrets).await?;
    tracing::info!(%role, "join token rotated");
    Ok(Json(sec.tokens().map_err(pki_error)?))
}

/// The raft id for a manager about to serve at `addr` (joining or promoted): one above the
/// highest current member. A removed manager's id can come back (when it was the highest); its
/// certificate is revoked, so its old process cannot speak raft under that id again.
pub(super) fn new_manager_raft_id(store: &Store, addr: &str) -> Result<u64, ApiError> {
    let members = store.members();
    if let Some(existing) = members.iter().find(|m| m.addr == addr) {
        return Err(ApiError::Conflict(format!(
            "a manager (raft id {}) already serves at {addr}; remove it first with \
             `flotilla node rm`",
            existing.raft_id
        )));
    }
    Ok(members.iter().map(|m| m.raft_id).max().unwrap_or(0) + 1)
}
