//! Cluster membership over the API: serving the CA to joiners, admitting nodes with join tokens
//! (issuing their certificates), adding managers to raft, showing and rotating tokens, renewing
//! certificates. Only managers started with `flotilla init` or `join` have this
//! ([`ClusterSecurity`]); a plain `flotilla up` answers these routes with 404.

use crate::body::JsonBody;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use flotilla_pki::wire::{
    AddManagerRequest, CaResponse, JoinRequest, JoinResponse, ManagerSecrets, RenewRequest,
    RenewResponse, TokensResponse,
};
use flotilla_pki::{
    CaBundle, JoinSecrets, JoinToken, NodeIdentity, PkiError, Role, TlsIdentity, NODE_CERT_VALIDITY,
};
use flotilla_types::{validate_name, FieldError};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// The identity in the client certificate of the connection a request came on (absent without
/// TLS or without a client certificate). Inserted by [`crate::serve_tls`].
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Option<NodeIdentity>);

/// The client certificate's identity, if the request came over TLS with one.
pub fn peer_of(ext: Option<Extension<PeerIdentity>>) -> Option<NodeIdentity> {
    ext.and_then(|Extension(PeerIdentity(id))| id)
}

const SECRETS_FILE: &str = "join-secrets";

/// A manager's share of the cluster PKI: the CA (to sign), the join secrets (to admit), and its
/// own TLS identity. Kept in `dir`, readable only by root.
pub struct ClusterSecurity {
    dir: PathBuf,
    ca: Mutex<CaBundle>,
    secrets: Mutex<JoinSecrets>,
    pub tls: Arc<TlsIdentity>,
}

impl ClusterSecurity {
    pub fn new(dir: PathBuf, ca: CaBundle, secrets: JoinSecrets, tls: Arc<TlsIdentity>) -> Self {
        ClusterSecurity {
            dir,
            ca: Mutex::new(ca),
            secrets: Mutex::new(secrets),
            tls,
        }
    }

    /// Loads what `flotilla init` or a manager `join` saved in `dir`.
    pub fn load(dir: PathBuf, tls: Arc<TlsIdentity>) -> Result<Self, PkiError> {
        let ca = CaBundle::load(&dir)?;
        let path = dir.join(SECRETS_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| PkiError::Io {
            path: path.clone(),
            source,
        })?;
        let secrets = JoinSecrets::from_file_contents(&text)?;
        Ok(Self::new(dir, ca, secrets, tls))
    }

    /// Writes the CA and secrets to `dir` (the secrets file mode 0600).
    pub fn save(
        dir: &std::path::Path,
        ca: &CaBundle,
        secrets: &JoinSecrets,
    ) -> Result<(), PkiError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        ca.save(dir)?;
        let path = dir.join(SECRETS_FILE);
        let io = |source| PkiError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        file.write_all(secrets.to_file_contents().as_bytes())
            .map_err(io)?;
        file.sync_all().map_err(io)
    }

    fn ca(&self) -> MutexGuard<'_, CaBundle> {
        // Poisoning means a panic mid-update of plain data that is re-saved whole; keep going.
        self.ca.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn secrets(&self) -> MutexGuard<'_, JoinSecrets> {
        self.secrets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current join tokens.
    pub fn tokens(&self) -> Result<TokensResponse, PkiError> {
        let digest = self.ca().signer.digest()?;
        let secrets = self.secrets();
        Ok(TokensResponse {
            worker: secrets.token(Role::Worker, &digest).to_string(),
            manager: secrets.token(Role::Manager, &digest).to_string(),
        })
    }

    fn manager_secrets(&self) -> ManagerSecrets {
        let ca = self.ca();
        ManagerSecrets {
            ca_cert_pem: ca.signer.cert_pem().to_string(),
            ca_key_pem: ca.signer.key_pem(),
            previous_roots_pem: ca.previous_roots.concat(),
            join_secrets: self.secrets().to_file_contents(),
        }
    }
}

fn pki_error(e: PkiError) -> ApiError {
    match e {
        PkiError::BadToken(reason) => ApiError::Unauthorized(format!("join refused: {reason}")),
        PkiError::Rcgen(_) | PkiError::BadCertificate { .. } | PkiError::BadKey(_) => {
            ApiError::invalid(
                "invalid certificate request",
                vec![FieldError::new("csr_pem", e.to_string())],
            )
        }
        other => ApiError::Internal(other.to_string()),
    }
}

fn security(app: &AppState) -> Result<&Arc<ClusterSecurity>, ApiError> {
    app.cluster.as_ref().ok_or_else(|| {
        ApiError::NotFound(
            "this manager runs without cluster security (started with `flotilla up`); use \
             `flotilla init` to start a cluster"
                .into(),
        )
    })
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ca", get(ca))
        .route("/join", post(join))
        .route("/managers", post(add_manager))
        .route("/renew", post(renew))
        .route("/tokens", get(tokens))
        .route("/tokens/{role}/rotate", post(rotate_token))
}

async fn ca(State(app): State<AppState>) -> Result<Json<CaResponse>, ApiError> {
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
async fn join(
    State(app): State<AppState>,
    JsonBody(req): JsonBody<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    let sec = security(&app)?;
    let token = validate_join(&req)?;
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
            // Raft ids only grow, so a removed manager's id is never reused.
            let members = app.store.members();
            if let Some(existing) = members.iter().find(|m| m.addr == addr) {
                return Err(ApiError::Conflict(format!(
                    "a manager (raft id {}) already serves at {addr}; remove it first with \
                     `flotilla node rm`",
                    existing.raft_id
                )));
            }
            Some(members.iter().map(|m| m.raft_id).max().unwrap_or(0) + 1)
        }
        Role::Worker => None,
    };
    let identity = NodeIdentity {
        node_id: req.node_name.clone(),
        role,
    };
    let cert_pem = sec
        .ca()
        .signer
        .issue(&req.csr_pem, &identity, &addresses, NODE_CERT_VALIDITY)
        .map_err(pki_error)?;
    tracing::info!(%role, ?raft_id, "node admitted; certificate issued");
    // Bound first: a lock guard in a struct literal would live until `manager_secrets` locks
    // the CA again, deadlocking this thread.
    let trust_pem = sec.ca().trust_pem();
    Ok(Json(JoinResponse {
        role: role.to_string(),
        cert_pem,
        trust_pem,
        raft_id,
        manager_secrets: (role == Role::Manager).then(|| sec.manager_secrets()),
    }))
}

#[tracing::instrument(skip_all, fields(raft_id = req.raft_id))]
async fn add_manager(
    State(app): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    JsonBody(req): JsonBody<AddManagerRequest>,
) -> Result<Json<Vec<u64>>, ApiError> {
    security(&app)?;
    // Only the joining manager itself, holding its new manager certificate, may do this.
    match peer_of(peer) {
        Some(id) if id.role == Role::Manager => {}
        _ => {
            return Err(ApiError::Unauthorized(
                "adding a manager needs the joining manager's certificate".into(),
            ))
        }
    }
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
    Ok(Json(
        app.store
            .members()
            .into_iter()
            .filter(|m| m.voter)
            .map(|m| m.raft_id)
            .collect(),
    ))
}

async fn renew(
    State(app): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    JsonBody(req): JsonBody<RenewRequest>,
) -> Result<Json<RenewResponse>, ApiError> {
    let sec = security(&app)?;
    let identity = peer_of(peer).ok_or_else(|| {
        ApiError::Unauthorized("renewal needs the node's current certificate".into())
    })?;
    let cert_pem = sec
        .ca()
        .signer
        .issue(&req.csr_pem, &identity, &[], NODE_CERT_VALIDITY)
        .map_err(pki_error)?;
    tracing::info!(node = %identity.node_id, "certificate renewed");
    let trust_pem = sec.ca().trust_pem();
    Ok(Json(RenewResponse {
        cert_pem,
        trust_pem,
    }))
}

async fn tokens(State(app): State<AppState>) -> Result<Json<TokensResponse>, ApiError> {
    Ok(Json(security(&app)?.tokens().map_err(pki_error)?))
}

async fn rotate_token(
    State(app): State<AppState>,
    Path(role): Path<String>,
) -> Result<Json<TokensResponse>, ApiError> {
    let sec = security(&app)?;
    let role: Role = role.parse().map_err(|reason: String| {
        ApiError::invalid("invalid role", vec![FieldError::new("role", reason)])
    })?;
    {
        let ca = sec.ca();
        let mut secrets = sec.secrets();
        secrets.rotate(role);
        ClusterSecurity::save(&sec.dir, &ca, &secrets).map_err(pki_error)?;
    }
    tracing::info!(%role, "join token rotated");
    Ok(Json(sec.tokens().map_err(pki_error)?))
}
