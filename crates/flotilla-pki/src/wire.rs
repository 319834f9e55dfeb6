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
    /// [`crate::JoinSecrets::to_file_contents`].
    pub join_secrets: String,
    /// How long node certificates are valid (`flotilla init --cert-validity`); absent:
    /// [`crate::NODE_CERT_VALIDITY`].
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
