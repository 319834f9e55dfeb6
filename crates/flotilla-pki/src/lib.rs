//! The cluster's public-key infrastructure, and only that: a built-in certificate authority that
//! issues every node a certificate naming its id and role, the rustls configurations for mutual
//! TLS between nodes, and the join tokens that let a new node obtain its first certificate. The
//! membership API's request and response bodies are in `flotilla_types::cluster`.
//!
//! **Identity in certificates.** A node certificate carries exactly one SAN URI of the form
//! `flotilla://<role>/<node-id>` (role `manager` or `worker`); the subject's CN (node id) and OU
//! (role) repeat it for humans. Only the SAN URI is authoritative ([`identity_of`]).
//!
//! **Trust.** Peers verify the certificate chain against the cluster's trusted roots but not the
//! host name: nodes are addressed by IP and move between addresses, so the identity is the SAN URI
//! (as in Docker Swarm, which checks CN/OU rather than names).
//!
//! **Root rotation** ([`CaBundle::rotate`]): a new root is generated and trusted *alongside* the
//! old one; new certificates are signed by the new root; once every node has renewed
//! ([`NodeCredentials::needs_renewal`] or an explicit renewal) the old root is dropped with
//! [`CaBundle::retire_old_roots`].
#![forbid(unsafe_code)]

mod ca;
mod tls;
mod token;

pub use ca::{
    identity_of, issued_at_of, remove_file, CaBundle, CaSigner, NodeCredentials, NodeIdentity,
    NodeKey, Role, CA_VALIDITY, NODE_CERT_VALIDITY,
};
pub use tls::{bootstrap_client_config, fetched_ca_matches, pinned_client_config, TlsIdentity};
pub use token::{JoinSecrets, JoinToken, TOKEN_PREFIX};

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating or signing a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("certificate {what}: {reason}")]
    BadCertificate { what: String, reason: String },
    #[error("private key: {0}")]
    BadKey(String),
    #[error("join token: {0}")]
    BadToken(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}
