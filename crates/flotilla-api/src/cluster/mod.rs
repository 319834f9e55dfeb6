//! Cluster membership over the API: serving the CA to joiners, admitting nodes with join tokens
//! (issuing their certificates), adding managers to raft, changing roles, leaving, showing and
//! rotating tokens, renewing certificates and rotating the CA root. Only managers started with
//! `flotilla init` or `join` have this ([`ClusterSecurity`]); a plain `flotilla up` answers
//! these routes with 404.
//!
//! One file per protocol step: `security.rs` (the PKI a manager holds), `join.rs` (admission,
//! renewal, tokens), `roles.rs` (promotion and demotion), `leave.rs` (leaving and removal) and
//! `ca_rotation.rs`; `records.rs` holds the store records they share.

mod ca_rotation;
mod join;
mod leave;
mod records;
mod roles;
mod security;

pub use leave::{forget_lost_managers, remove_node};
pub use records::{
    check_not_revoked, record_manager, revocation_key, DesiredRole, ManagerRecord, Revocation,
    PKI_RECORD,
};
pub use roles::{demote_node, promote_node};
pub use security::ClusterSecurity;

use crate::error::ApiError;
use crate::AppState;
use axum::routing::{get, post};
use axum::{Extension, Router};
use ca_rotation::{ca_status, rotate_ca};
use flotilla_pki::NodeIdentity;
use join::{add_manager, ca, join, renew, rotate_token, tokens};
use leave::{leave, leave_complete};
use roles::{demote_self, list_managers, membership, promote_self};

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

/// The calling node's certificate identity, required by the self-service membership routes.
fn caller(peer: Option<Extension<PeerIdentity>>, what: &str) -> Result<NodeIdentity, ApiError> {
    peer_of(peer)
        .ok_or_else(|| ApiError::Unauthorized(format!("{what} needs the node's own certificate")))
}
