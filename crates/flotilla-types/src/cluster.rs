//! Request and response bodies of the cluster membership API (`/v1/cluster/*`), shared by the
//! manager's handlers and the joining node.

use serde::{Deserialize, Serialize};

/// `GET /v1/cluster/ca`: the trusted roots, signing root first. Served without authentication;
/// the joiner checks it against the digest in its token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaResponse {
    pub trust_pem: String,
}

/// `POST /v1/cluster/join`: a new node asks for its first certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The join token (`FLTKN-1-…`); its secret decides the role.
    pub token: String,
    pub node_name: String,
    /// Where a manager will serve (`HOST:PORT`); ignored for workers.
    #[serde(default)]
    pub advertise_addr: Option<String>,
    /// PEM certificate signing request for the node's locally generated key.
    pub csr_pem: String,
}

/// What a joined node receives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinResponse {
    /// `manager` or `worker`.
    pub role: String,
    pub cert_pem: String,
    pub trust_pem: String,
    /// Managers only: the raft id to run the store under.
    #[serde(default)]
    pub raft_id: Option<u64>,
    /// Managers only: the CA signing material and join secrets, so any manager can admit nodes
    /// once it leads.
    #[serde(default)]
    pub manager_secrets: Option<ManagerSecrets>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct ManagerSecrets {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    /// Roots from before a rotation, still trusted.
    pub previous_roots_pem: String,
    /// `flotilla_pki::JoinSecrets::to_file_contents`.
    pub join_secrets: String,
    /// How long node certificates are valid (`flotilla init --cert-validity`); absent:
    /// `flotilla_pki::NODE_CERT_VALIDITY`.
    #[serde(default)]
    pub node_cert_validity_secs: Option<u64>,
}

impl std::fmt::Debug for ManagerSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ManagerSecrets(<redacted>)")
    }
}

/// `POST /v1/cluster/managers`: a joined manager, already serving, asks to become a voter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddManagerRequest {
    pub raft_id: u64,
    pub advertise_addr: String,
}

/// `GET /v1/cluster/tokens` and `POST /v1/cluster/tokens/{role}/rotate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokensResponse {
    pub worker: String,
    pub manager: String,
}

/// `POST /v1/cluster/renew`: a node with a valid certificate asks for a fresh one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewRequest {
    pub csr_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewResponse {
    pub cert_pem: String,
    pub trust_pem: String,
}

/// `DELETE /v1/nodes/{id}` (`flotilla node rm`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveNodeResponse {
    pub node: String,
    /// The node was a manager and left the raft membership.
    pub was_manager: bool,
}

/// `GET /v1/cluster/managers`: the raft members as this manager sees them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManagerInfo {
    pub raft_id: u64,
    pub addr: String,
    /// False while a joining manager is still a learner.
    pub voter: bool,
    /// The node name, when the cluster recorded it at join time.
    #[serde(default)]
    pub node: Option<String>,
    pub leader: bool,
}

/// `GET /v1/cluster/membership`: what the cluster wants of the calling node (by its
/// certificate). A node polls it to carry out `flotilla node promote|demote` and `flotilla
/// leave` itself, in place.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembershipStatus {
    /// The role the node should hold: `manager` or `worker`. Differs from the certificate's
    /// while a promotion or demotion is pending.
    pub role: String,
    /// Set once `flotilla leave` was asked for this node.
    #[serde(default)]
    pub leaving: Option<LeaveRequest>,
    /// The cluster's trusted roots now (signing root first): a node whose bundle differs
    /// renews at once (CA root rotation).
    #[serde(default)]
    pub trust_pem: String,
    /// Removed nodes: the node's agent server refuses their certificates too.
    #[serde(default)]
    pub revoked: Vec<RevokedNode>,
}

/// `POST /v1/cluster/promote-self` (a worker whose promotion is pending) and
/// `POST /v1/cluster/demote-self` (a manager whose demotion is pending): a CSR for the new
/// role's certificate. The answer is a [`JoinResponse`] for a promotion (raft id and manager
/// secrets included), a [`RenewResponse`] for a demotion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoleChangeRequest {
    pub csr_pem: String,
    /// Promotion only: where the new manager will serve (`IP:PORT`).
    #[serde(default)]
    pub advertise_addr: Option<String>,
}

/// `POST /v1/nodes/{id}/promote|demote`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoleChangeResponse {
    pub node: String,
    /// The role the node is being given.
    pub role: String,
    /// Raft voters after the change, as far as it has happened.
    pub voters: Vec<u64>,
    /// Nothing to do: the node holds that role already.
    #[serde(default)]
    pub unchanged: bool,
    /// Advice the operator should see (an even number of managers, more than 7).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// `POST /v1/cluster/leave`: take a node out of the cluster. From a node's certificate it
/// names that node; from the local CLI (loopback) `node` says which.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaveRequest {
    #[serde(default)]
    pub node: Option<String>,
    /// Managers: leave even if the cluster loses quorum, and the last manager may leave
    /// (the cluster is dissolved). Everyone: stop the node's tasks now instead of waiting for
    /// the zero-downtime drain.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaveResponse {
    pub node: String,
    /// The node was a manager: it is demoted first (it leaves the raft voters).
    pub was_manager: bool,
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// A removed node (`flotilla node rm` or `leave`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokedNode {
    pub node: String,
    /// Certificates of `node` issued at or before this second (epoch) are refused.
    pub revoked_at: u64,
}

/// `POST /v1/cluster/ca/rotate` (`flotilla ca rotate`, which repeats it until `completed`):
/// starts a CA root rotation, or moves it on once every node has caught up with the current
/// step; answers where it stands. `GET /v1/cluster/ca/status` only reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaRotationStatus {
    /// `trust` (every node is to trust the new root), `sign` (the new root signs; every node
    /// is to renew onto it), or none (no rotation under way).
    #[serde(default)]
    pub phase: Option<String>,
    /// This call finished a rotation: only the new root is trusted now.
    #[serde(default)]
    pub completed: bool,
    /// SHA-256 of the signing root (join tokens name it).
    pub signing_root: String,
    /// Roots trusted now (the signing one included).
    pub trusted_roots: usize,
    /// Nodes that have not caught up with the current step yet.
    pub waiting_for: Vec<String>,
}
