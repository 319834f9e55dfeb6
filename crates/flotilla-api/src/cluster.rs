//! Cluster membership over the API: serving the CA to joiners, admitting nodes with join tokens
//! (issuing their certificates), adding managers to raft, showing and rotating tokens, renewing
//! certificates. Only managers started with `flotilla init` or `join` have this
//! ([`ClusterSecurity`]); a plain `flotilla up` answers these routes with 404.

use crate::body::JsonBody;
use crate::error::{check_applied, ApiError};
use crate::AppState;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use flotilla_types::cluster::{
    AddManagerRequest, CaResponse, CaRotationStatus, JoinRequest, JoinResponse, LeaveRequest,
    LeaveResponse, ManagerInfo, ManagerSecrets, MembershipStatus, RemoveNodeResponse, RenewRequest,
    RenewResponse, RoleChangeRequest, RoleChangeResponse, TokensResponse,
};
use flotilla_pki::{
    CaBundle, JoinSecrets, JoinToken, NodeIdentity, PkiError, Role, TlsIdentity, NODE_CERT_VALIDITY,
};
use flotilla_store::{Command, Expect, Op, Record, Store};
use flotilla_types::{now_ms, validate_name, Availability, DesiredState, FieldError, NodeState};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// A verified client certificate: who it names and when the CA signed it (seconds since the
/// epoch, see [`flotilla_pki::issued_at_of`]; revocations compare against it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub identity: NodeIdentity,
    pub issued_at: u64,
}

/// The client certificate of the connection a request came on (absent without TLS or without
/// a client certificate). Inserted by [`crate::serve_tls`]; on a forwarded request the auth
/// layer replaces it with the original caller's.
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Option<PeerCert>);

/// The client certificate's identity, if the request came over TLS with one.
pub fn peer_of(ext: Option<Extension<PeerIdentity>>) -> Option<NodeIdentity> {
    ext.and_then(|Extension(PeerIdentity(cert))| cert.map(|c| c.identity))
}

/// Store record holding the cluster PKI ([`ManagerSecrets`]): every manager follows it, so a
/// rotated token or CA is honoured by whichever manager leads.
pub const PKI_RECORD: &str = "pki";

/// Store record key of a removed node's revocation ([`Revocation`]).
pub fn revocation_key(node: &str) -> String {
    format!("revoked/{node}")
}

/// Store record key naming a manager's raft id ([`ManagerRecord`]).
fn manager_key(node: &str) -> String {
    format!("manager/{node}")
}

/// `flotilla node rm` or `flotilla leave` removed `node`: certificates the CA signed for it up
/// to and including `revoked_at` (epoch seconds) are refused. A node that joins again later
/// gets a newer one.
pub use flotilla_types::cluster::RevokedNode as Revocation;

/// Store record key of a pending role change ([`DesiredRole`]).
fn desired_role_key(node: &str) -> String {
    format!("desired-role/{node}")
}

/// Store record key of a pending `flotilla leave` ([`LeaveRequest`]).
fn leaving_key(node: &str) -> String {
    format!("leaving/{node}")
}

/// `flotilla node promote|demote` asked `node` to take `role`; the node carries it out itself
/// (it polls `GET /v1/cluster/membership`), as a Swarm node does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DesiredRole {
    /// `manager` or `worker`.
    pub role: String,
    /// Demotions: the raft id the node voted under, so a retried demotion finds it after the
    /// manager record is gone.
    #[serde(default)]
    pub raft_id: Option<u64>,
}

/// Which raft member a manager node is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManagerRecord {
    pub raft_id: u64,
    pub addr: String,
}

fn now_secs() -> u64 {
    (now_ms() / 1000).max(0).unsigned_abs()
}

fn record_of<T: serde::de::DeserializeOwned>(store: &Store, key: &str) -> Option<(T, u64)> {
    let record = store.read(|s| s.records.get(key).cloned())?;
    match serde_json::from_value(record.value) {
        Ok(value) => Some((value, record.meta.version)),
        Err(e) => {
            tracing::error!(key, error = %e, "unreadable store record");
            None
        }
    }
}

fn put_record(key: &str, value: &impl Serialize, expect: Expect) -> Result<Op, ApiError> {
    Ok(Op::PutRecord {
        record: Record {
            key: key.to_string(),
            value: serde_json::to_value(value)
                .map_err(|e| ApiError::Internal(format!("encoding record {key}: {e}")))?,
            meta: Default::default(),
        },
        expect,
    })
}

/// Refuses `cert` if its node was removed after the certificate was issued.
pub fn check_not_revoked(store: &Store, cert: &PeerCert) -> Result<(), ApiError> {
    match record_of::<Revocation>(store, &revocation_key(&cert.identity.node_id)) {
        Some((rev, _)) if cert.issued_at <= rev.revoked_at => Err(ApiError::Forbidden(format!(
            "the certificate of node {} was revoked: the node was removed from the cluster \
             (`flotilla node rm` or `flotilla leave`); join it again with a join token to get a \
             new one",
            cert.identity.node_id
        ))),
        _ => Ok(()),
    }
}

/// Writes the manager record for raft member `raft_id` (idempotent).
pub async fn record_manager(
    store: &Store,
    node: &str,
    raft_id: u64,
    addr: &str,
) -> Result<(), ApiError> {
    let key = manager_key(node);
    if let Some((existing, _)) = record_of::<ManagerRecord>(store, &key) {
        if existing.raft_id == raft_id && existing.addr == addr {
            return Ok(());
        }
    }
    let op = put_record(
        &key,
        &ManagerRecord {
            raft_id,
            addr: addr.to_string(),
        },
        Expect::Any,
    )?;
    check_applied(store.write(Command::new(vec![op])).await?)?;
    Ok(())
}

const SECRETS_FILE: &str = "join-secrets";

/// A manager's share of the cluster PKI: the CA (to sign), the join secrets (to admit), and its
/// own TLS identity. Kept in `dir`, readable only by root.
pub struct ClusterSecurity {
    dir: PathBuf,
    ca: Mutex<CaBundle>,
    secrets: Mutex<JoinSecrets>,
    /// Version of the [`PKI_RECORD`] the two above were last loaded from (0: local files only).
    synced: Mutex<u64>,
    /// How long the certificates this cluster issues are valid.
    cert_validity: Mutex<std::time::Duration>,
    pub tls: Arc<TlsIdentity>,
}

impl ClusterSecurity {
    pub fn new(dir: PathBuf, ca: CaBundle, secrets: JoinSecrets, tls: Arc<TlsIdentity>) -> Self {
        ClusterSecurity {
            dir,
            ca: Mutex::new(ca),
            secrets: Mutex::new(secrets),
            synced: Mutex::new(0),
            cert_validity: Mutex::new(NODE_CERT_VALIDITY),
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

    /// Deletes the CA and join secrets from `dir` (what [`ClusterSecurity::save`] wrote): a
    /// manager turning into a worker keeps only its own certificate.
    pub fn forget(dir: &std::path::Path) -> Result<(), PkiError> {
        CaBundle::remove(dir)?;
        flotilla_pki::remove_file(&dir.join(SECRETS_FILE))
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

    /// Loads the cluster's current PKI from the store when it changed since the last call, and
    /// keeps the local copy in `DATA_DIR/pki` in step (what a restarted or recovered manager
    /// starts from).
    pub fn sync(&self, store: &Store) -> Result<(), ApiError> {
        let Some((secrets, version)) = record_of::<ManagerSecrets>(store, PKI_RECORD) else {
            return Ok(());
        };
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if *synced == version {
            return Ok(());
        }
        let ca = CaBundle::from_pem(
            &secrets.ca_cert_pem,
            &secrets.ca_key_pem,
            &secrets.previous_roots_pem,
        )
        .map_err(pki_error)?;
        let join = JoinSecrets::from_file_contents(&secrets.join_secrets).map_err(pki_error)?;
        ClusterSecurity::save(&self.dir, &ca, &join).map_err(pki_error)?;
        *self.ca() = ca;
        *self.secrets() = join;
        *self.cert_validity.lock().unwrap_or_else(|p| p.into_inner()) = secrets
            .node_cert_validity_secs
            .map_or(NODE_CERT_VALIDITY, std::time::Duration::from_secs);
        *synced = version;
        Ok(())
    }

    /// Puts this manager's PKI into the store if the store has none yet (a new cluster, or one
    /// from before the PKI was replicated). Must run on the leader.
    pub async fn publish(&self, store: &Store) -> Result<(), ApiError> {
        if store.read(|s| s.records.contains_key(PKI_RECORD)) {
            return self.sync(store);
        }
        let op = put_record(PKI_RECORD, &self.manager_secrets(), Expect::Absent)?;
        match check_applied(store.write(Command::new(vec![op])).await?) {
            Ok(_) | Err(ApiError::Conflict(_)) => self.sync(store),
            Err(e) => Err(e),
        }
    }

    /// Replaces the PKI record with `secrets` (compare-and-set on the version read before).
    async fn store_secrets(&self, store: &Store, secrets: &ManagerSecrets) -> Result<(), ApiError> {
        let op = put_pki_op(store, secrets)?;
        check_applied(store.write(Command::new(vec![op])).await?)?;
        self.sync(store)
    }

    fn manager_secrets(&self) -> ManagerSecrets {
        let ca = self.ca();
        ManagerSecrets {
            ca_cert_pem: ca.signer.cert_pem().to_string(),
            ca_key_pem: ca.signer.key_pem(),
            previous_roots_pem: ca.previous_roots.concat(),
            join_secrets: self.secrets().to_file_contents(),
            node_cert_validity_secs: Some(self.cert_validity().as_secs()),
        }
    }

    /// How long node certificates issued now are valid.
    pub fn cert_validity(&self) -> std::time::Duration {
        *self.cert_validity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the validity of certificates issued from now on (`flotilla init --cert-validity`,
    /// before [`ClusterSecurity::publish`]); the store's value wins once there is one.
    pub fn set_cert_validity(&self, validity: std::time::Duration) {
        *self.cert_validity.lock().unwrap_or_else(|p| p.into_inner()) = validity;
    }
}

/// Replaces the PKI record with `secrets`, compare-and-set on the version read now.
fn put_pki_op(store: &Store, secrets: &ManagerSecrets) -> Result<Op, ApiError> {
    let expect = store
        .read(|s| s.records.get(PKI_RECORD).map(|r| r.meta.version))
        .map_or(Expect::Absent, Expect::Version);
    put_record(PKI_RECORD, secrets, expect)
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

/// The cluster PKI, brought up to date with the store.
fn security(app: &AppState) -> Result<&Arc<ClusterSecurity>, ApiError> {
    let sec = app.cluster.as_ref().ok_or_else(|| {
        ApiError::NotFound(
            "this manager runs without cluster security (started with `flotilla up`); use \
             `flotilla init` to start a cluster"
                .into(),
        )
    })?;
    sec.sync(&app.store)?;
    Ok(sec)
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ca", get(ca))
        .route("/join", post(join))
        .route("/managers", post(add_manager).get(list_managers))
        .route("/renew", post(renew))
        .route("/tokens", get(tokens))
        .route("/tokens/{role}/rotate", post(rotate_token))
        .route("/membership", get(membership))
        .route("/promote-self", post(promote_self))
        .route("/demote-self", post(demote_self))
        .route("/leave", post(leave))
        .route("/leave/complete", post(leave_complete))
        .route("/ca/status", get(ca_status))
        .route("/ca/rotate", post(rotate_ca))
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
    let cert_pem = sec
        .ca()
        .signer
        .issue(&req.csr_pem, &identity, &addresses, sec.cert_validity())
        .map_err(pki_error)?;
    tracing::info!(%role, ?raft_id, "node admitted; certificate issued");
    // Bound first: a lock guard in a struct literal would live until `manager_secrets` locks
    // the CA again, deadlocking this thread.
    let trust_pem = sec.ca().trust_pem();
    record_issued(&app.store, sec, &req.node_name, &trust_pem).await?;
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

async fn renew(
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
    let cert_pem = sec
        .ca()
        .signer
        .issue(&req.csr_pem, &identity, &addresses, sec.cert_validity())
        .map_err(pki_error)?;
    tracing::info!(node = %identity.node_id, "certificate renewed");
    let trust_pem = sec.ca().trust_pem();
    record_issued(&app.store, sec, &identity.node_id, &trust_pem).await?;
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
    // Through the store, so every manager refuses the old token, not just this one.
    let mut secrets = sec.manager_secrets();
    let mut join = sec.secrets().clone();
    join.rotate(role);
    secrets.join_secrets = join.to_file_contents();
    sec.store_secrets(&app.store, &secrets).await?;
    tracing::info!(%role, "join token rotated");
    Ok(Json(sec.tokens().map_err(pki_error)?))
}

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

/// `GET /v1/cluster/managers`: raft members with their node names.
async fn list_managers(State(app): State<AppState>) -> Json<Vec<ManagerInfo>> {
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
fn voter_count_warnings(voters: usize) -> Vec<String> {
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

/// The calling node's certificate identity, required by the self-service membership routes.
fn caller(peer: Option<Extension<PeerIdentity>>, what: &str) -> Result<NodeIdentity, ApiError> {
    peer_of(peer)
        .ok_or_else(|| ApiError::Unauthorized(format!("{what} needs the node's own certificate")))
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
async fn demote(
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
async fn membership(
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

/// The raft id for a manager about to serve at `addr` (joining or promoted): one above the
/// highest current member. A removed manager's id can come back (when it was the highest); its
/// certificate is revoked, so its old process cannot speak raft under that id again.
fn new_manager_raft_id(store: &Store, addr: &str) -> Result<u64, ApiError> {
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

/// `POST /v1/cluster/promote-self`: a worker whose promotion is pending gets its manager
/// certificate, a raft id and the manager secrets (as a manager joining with a token would).
#[tracing::instrument(skip_all)]
async fn promote_self(
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
    let cert_pem = sec
        .ca()
        .signer
        .issue(
            &req.csr_pem,
            &identity,
            &[addr.ip().to_string()],
            sec.cert_validity(),
        )
        .map_err(pki_error)?;
    tracing::info!(node = %me.node_id, raft_id, "promoted; manager certificate issued");
    let trust_pem = sec.ca().trust_pem();
    record_issued(&app.store, sec, &me.node_id, &trust_pem).await?;
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
async fn demote_self(
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
    let cert_pem = sec
        .ca()
        .signer
        .issue(&req.csr_pem, &identity, &[], sec.cert_validity())
        .map_err(pki_error)?;
    tracing::info!(node = %me.node_id, "demoted; worker certificate issued");
    let trust_pem = sec.ca().trust_pem();
    record_issued(&app.store, sec, &me.node_id, &trust_pem).await?;
    Ok(Json(RenewResponse {
        cert_pem,
        trust_pem,
    }))
}

/// `POST /v1/cluster/leave` (`flotilla leave` on the node): records the request, drains the
/// node (or, with `force`, shuts its tasks down at once) and demotes it first if it is a
/// manager. The node carries out the rest itself: it waits until it runs nothing, then asks
/// for its removal ([`leave_complete`]) and exits. The last manager leaves only with `force`,
/// which dissolves the cluster.
#[tracing::instrument(skip_all)]
async fn leave(
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
async fn leave_complete(
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

/// Every removed node, for agent servers to refuse.
fn revocations(store: &Store) -> Vec<Revocation> {
    store.read(|s| {
        s.records
            .range("revoked/".to_string().."revoked0".to_string())
            .filter_map(|(_, r)| serde_json::from_value(r.value.clone()).ok())
            .collect()
    })
}

/// Store record key of what a node's latest certificate was issued under ([`Issued`]).
fn issued_key(node: &str) -> String {
    format!("issued/{node}")
}

/// The signing root and trust bundle a node's latest certificate came with: how a CA root
/// rotation knows who has caught up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Issued {
    /// SHA-256 of the root that signed it.
    signer: String,
    trust_pem: String,
}

async fn record_issued(
    store: &Store,
    sec: &ClusterSecurity,
    node: &str,
    trust_pem: &str,
) -> Result<(), ApiError> {
    let issued = Issued {
        signer: sec.ca().signer.digest().map_err(pki_error)?,
        trust_pem: trust_pem.to_string(),
    };
    if record_of::<Issued>(store, &issued_key(node)).is_some_and(|(i, _)| i == issued) {
        return Ok(());
    }
    let op = put_record(&issued_key(node), &issued, Expect::Any)?;
    check_applied(store.write(Command::new(vec![op])).await?)?;
    Ok(())
}

/// Store record of a CA root rotation under way: the next root, trusted but not yet signing.
const CA_ROTATION_RECORD: &str = "ca-rotation";

#[derive(Clone, Serialize, Deserialize)]
struct CaRotation {
    /// `trust` or `sign`.
    phase: String,
    next_cert_pem: String,
    next_key_pem: String,
}

/// Nodes whose latest certificate is not from the signing root with the current trust
/// bundle (or, in the `trust` phase, not with the current bundle): they renew on their own
/// within a second or two of a change (`GET /v1/cluster/membership` shows the bundle).
fn lagging_nodes(store: &Store, sec: &ClusterSecurity, need_signer: bool) -> Vec<String> {
    let (signer, trust) = {
        let ca = sec.ca();
        (ca.signer.digest().unwrap_or_default(), ca.trust_pem())
    };
    let mut nodes: std::collections::BTreeSet<String> =
        store.read(|s| s.nodes.keys().cloned().collect());
    nodes.extend(store.read(|s| {
        s.records
            .range("manager/".to_string().."manager0".to_string())
            .map(|(k, _)| k.trim_start_matches("manager/").to_string())
            .collect::<Vec<_>>()
    }));
    nodes
        .into_iter()
        .filter(|n| match record_of::<Issued>(store, &issued_key(n)) {
            Some((i, _)) => i.trust_pem != trust || (need_signer && i.signer != signer),
            None => true,
        })
        .collect()
}

fn rotation_status(
    store: &Store,
    sec: &ClusterSecurity,
    completed: bool,
) -> Result<CaRotationStatus, ApiError> {
    let phase = record_of::<CaRotation>(store, CA_ROTATION_RECORD).map(|(r, _)| r.phase);
    let ca = sec.ca();
    let signing_root = ca.signer.digest().map_err(pki_error)?;
    let trusted_roots = 1 + ca.previous_roots.len();
    drop(ca);
    Ok(CaRotationStatus {
        waiting_for: match phase.as_deref() {
            Some(p) => lagging_nodes(store, sec, p == "sign"),
            None => Vec::new(),
        },
        phase,
        completed,
        signing_root,
        trusted_roots,
    })
}

/// `GET /v1/cluster/ca/status`.
async fn ca_status(State(app): State<AppState>) -> Result<Json<CaRotationStatus>, ApiError> {
    let sec = security(&app)?;
    Ok(Json(rotation_status(&app.store, sec, false)?))
}

/// `POST /v1/cluster/ca/rotate`: one step of a CA root rotation, in three steps so no node
/// ever meets a certificate it does not trust: (1) `trust`: a new root is trusted next to the
/// old one, which still signs; every node renews to get the new bundle. (2) `sign`: once all
/// have it, the new root signs; every node renews onto it. (3) once all have, the old root is
/// dropped (nodes renew once more to drop it from their bundle) and join tokens change, as they
/// name the signing root. A step is taken only when no node lags behind the current one.
#[tracing::instrument(skip_all)]
async fn rotate_ca(State(app): State<AppState>) -> Result<Json<CaRotationStatus>, ApiError> {
    let sec = security(&app)?;
    let rotation = record_of::<CaRotation>(&app.store, CA_ROTATION_RECORD);
    let expect = rotation
        .as_ref()
        .map_or(Expect::Absent, |(_, v)| Expect::Version(*v));
    let mut secrets = sec.manager_secrets();
    let mut ca = CaBundle::from_pem(
        &secrets.ca_cert_pem,
        &secrets.ca_key_pem,
        &secrets.previous_roots_pem,
    )
    .map_err(pki_error)?;
    let (record_op, completed) = match rotation {
        None => {
            let cluster = sec.tls.identity().node_id.clone();
            let next = flotilla_pki::CaSigner::generate(&cluster).map_err(pki_error)?;
            ca.trust_next(&next);
            let record = CaRotation {
                phase: "trust".into(),
                next_cert_pem: next.cert_pem().to_string(),
                next_key_pem: next.key_pem(),
            };
            tracing::info!("CA root rotation started: the new root is trusted");
            (put_record(CA_ROTATION_RECORD, &record, expect)?, false)
        }
        Some((r, _)) if !lagging_nodes(&app.store, sec, r.phase == "sign").is_empty() => {
            return Ok(Json(rotation_status(&app.store, sec, false)?));
        }
        Some((mut r, _)) if r.phase == "trust" => {
            let next = flotilla_pki::CaSigner::from_pem(&r.next_cert_pem, &r.next_key_pem)
                .map_err(pki_error)?;
            ca.rotate_to(next);
            r.phase = "sign".into();
            tracing::info!("CA root rotation: the new root signs");
            (put_record(CA_ROTATION_RECORD, &r, expect)?, false)
        }
        Some(_) => {
            ca.retire_old_roots();
            tracing::info!("CA root rotation completed: the old root is no longer trusted");
            (
                Op::DeleteRecord {
                    key: CA_ROTATION_RECORD.into(),
                    expect,
                },
                true,
            )
        }
    };
    secrets.ca_cert_pem = ca.signer.cert_pem().to_string();
    secrets.ca_key_pem = ca.signer.key_pem();
    secrets.previous_roots_pem = ca.previous_roots.concat();
    let ops = vec![put_pki_op(&app.store, &secrets)?, record_op];
    check_applied(app.store.write(Command::new(ops)).await?)?;
    sec.sync(&app.store)?;
    Ok(Json(rotation_status(&app.store, sec, completed)?))
}
