//! The cluster membership routes (`/v1/cluster/*`, node removal and role changes): join,
//! certificate renewal, role changes, leaving, join tokens and CA rotation. Bodies are in
//! [`flotilla_types::cluster`].

use crate::{encode, Client, ClientError};
use flotilla_types::cluster::{
    AddManagerRequest, CaResponse, CaRotationStatus, JoinRequest, JoinResponse, LeaveRequest,
    LeaveResponse, ManagerInfo, MembershipStatus, RemoveNodeResponse, RenewRequest, RenewResponse,
    RoleChangeRequest, RoleChangeResponse, TokensResponse,
};

impl Client {
    /// `GET /v1/cluster/ca`: the trusted roots (served without authentication, for joiners).
    pub async fn cluster_ca(&self) -> Result<CaResponse, ClientError> {
        self.get("/v1/cluster/ca").await
    }

    /// `POST /v1/cluster/join`: a new node's first certificate, for its join token.
    pub async fn join_cluster(&self, req: &JoinRequest) -> Result<JoinResponse, ClientError> {
        self.post("/v1/cluster/join", req).await
    }

    /// `POST /v1/cluster/managers`: adds a joined manager to raft; answers the voters' raft ids.
    pub async fn add_manager(&self, req: &AddManagerRequest) -> Result<Vec<u64>, ClientError> {
        self.post("/v1/cluster/managers", req).await
    }

    /// `GET /v1/cluster/managers`: every manager, its address and raft standing.
    pub async fn cluster_managers(&self) -> Result<Vec<ManagerInfo>, ClientError> {
        self.get("/v1/cluster/managers").await
    }

    /// `POST /v1/cluster/renew`: a renewed certificate for the caller's own identity.
    pub async fn renew_certificate(
        &self,
        req: &RenewRequest,
    ) -> Result<RenewResponse, ClientError> {
        self.post("/v1/cluster/renew", req).await
    }

    /// `GET /v1/cluster/tokens`: both roles' join tokens.
    pub async fn join_tokens(&self) -> Result<TokensResponse, ClientError> {
        self.get("/v1/cluster/tokens").await
    }

    /// `POST /v1/cluster/tokens/{role}/rotate`: replaces `role`'s join token.
    pub async fn rotate_join_token(&self, role: &str) -> Result<TokensResponse, ClientError> {
        self.post(&format!("/v1/cluster/tokens/{}/rotate", encode(role)), &())
            .await
    }

    /// `GET /v1/cluster/membership`: what the cluster wants of the calling node.
    pub async fn membership(&self) -> Result<MembershipStatus, ClientError> {
        self.get("/v1/cluster/membership").await
    }

    /// `POST /v1/cluster/promote-self`: a promoted worker's manager certificate and secrets.
    pub async fn promote_self(&self, req: &RoleChangeRequest) -> Result<JoinResponse, ClientError> {
        self.post("/v1/cluster/promote-self", req).await
    }

    /// `POST /v1/cluster/demote-self`: a demoted manager's worker certificate.
    pub async fn demote_self(&self, req: &RoleChangeRequest) -> Result<RenewResponse, ClientError> {
        self.post("/v1/cluster/demote-self", req).await
    }

    /// `POST /v1/cluster/leave`: starts a node's departure (drain, or stop with `force`).
    pub async fn leave_cluster(&self, req: &LeaveRequest) -> Result<LeaveResponse, ClientError> {
        self.post("/v1/cluster/leave", req).await
    }

    /// `POST /v1/cluster/leave/complete`: a drained node asks to be removed.
    pub async fn complete_leave(&self) -> Result<RemoveNodeResponse, ClientError> {
        self.post("/v1/cluster/leave/complete", &()).await
    }

    /// `GET /v1/cluster/ca/status`: where a CA root rotation stands.
    pub async fn ca_rotation_status(&self) -> Result<CaRotationStatus, ClientError> {
        self.get("/v1/cluster/ca/status").await
    }

    /// `POST /v1/cluster/ca/rotate`: starts or advances a CA root rotation.
    pub async fn rotate_ca(&self) -> Result<CaRotationStatus, ClientError> {
        self.post("/v1/cluster/ca/rotate", &()).await
    }

    /// `DELETE /v1/nodes/{node}`: removes a node and revokes its certificate; `force` even
    /// while it is up.
    pub async fn remove_node(
        &self,
        node: &str,
        force: bool,
    ) -> Result<RemoveNodeResponse, ClientError> {
        let query = if force { "?force=true" } else { "" };
        let path = format!("/v1/nodes/{}{query}", encode(node));
        self.json(self.request(reqwest::Method::DELETE, &path))
            .await
    }

    /// `POST /v1/nodes/{node}/promote`: records that `node` is to become a manager.
    pub async fn promote_node(&self, node: &str) -> Result<RoleChangeResponse, ClientError> {
        self.post(&format!("/v1/nodes/{}/promote", encode(node)), &())
            .await
    }

    /// `POST /v1/nodes/{node}/demote`: records that `node` is to become a worker.
    pub async fn demote_node(&self, node: &str) -> Result<RoleChangeResponse, ClientError> {
        self.post(&format!("/v1/nodes/{}/demote", encode(node)), &())
            .await
    }
}
