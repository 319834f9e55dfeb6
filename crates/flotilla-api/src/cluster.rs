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
use flotilla_pki::wire::{
    AddManagerRequest, CaResponse, JoinRequest, JoinResponse, ManagerInfo, ManagerSecrets,
    RemoveNodeResponse, RenewRequest, RenewResponse, TokensResponse,
};
use flotilla_pki::{
    CaBundle, JoinSecrets, JoinToken, NodeIdentity, PkiError, Role, TlsIdentity, NODE_CERT_VALIDITY,
};
use flotilla_store::{Command, Expect, Op, Record, Store};
use flotilla_types::{now_ms, validate_name, FieldError, NodeState};
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

/// `flotilla node rm` was run for `node`: certificates the CA signed for it up to and including
/// `revoked_at` (epoch seconds) are refused. A node that joins again later gets a newer one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Revocation {
    pub node: String,
    pub revoked_at: u64,
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
             (`flotilla node rm`); join it again with a join token to get a new one",
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
        let expect = store
            .read(|s| s.records.get(PKI_RECORD).map(|r| r.meta.version))
            .map_or(Expect::Absent, Expect::Version);
        let op = put_record(PKI_RECORD, secrets, expect)?;
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
        .issue(&req.csr_pem, &identity, &addresses, sec.cert_validity())
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
    let mut ops = vec![put_record(
        &revocation_key(&id),
        &Revocation {
            node: id.clone(),
            revoked_at: now_secs(),
        },
        Expect::Any,
    )?];
    if node.is_some() {
        ops.push(Op::DeleteNode {
            id: id.clone(),
            expect: Expect::Any,
        });
    }
    if was_manager {
        ops.push(Op::DeleteRecord {
            key: manager_key(&id),
            expect: Expect::Any,
        });
    }
    check_applied(app.store.write(Command::new(ops)).await?)?;
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
