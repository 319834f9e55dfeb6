//! The store records cluster membership keeps: the PKI, manager raft ids, revocations, pending
//! role changes and departures, and the certificates issued to each node.

use super::security::{pki_error, ClusterSecurity};
use super::PeerCert;
use crate::error::{check_applied, ApiError};
use flotilla_pki::NodeIdentity;
use flotilla_store::{Command, Expect, Op, Record, Store};
use flotilla_types::now_ms;
use serde::{Deserialize, Serialize};

/// Store record holding the cluster PKI ([`ManagerSecrets`]): every manager follows it, so a
/// rotated token or CA is honoured by whichever manager leads.
pub const PKI_RECORD: &str = "pki";

/// Store record key of a removed node's revocation ([`Revocation`]).
pub fn revocation_key(node: &str) -> String {
    format!("revoked/{node}")
}

/// Store record key naming a manager's raft id ([`ManagerRecord`]).
pub(super) fn manager_key(node: &str) -> String {
    format!("manager/{node}")
}

/// `flotilla node rm` or `flotilla leave` removed `node`: certificates the CA signed for it up
/// to and including `revoked_at` (epoch seconds) are refused. A node that joins again later
/// gets a newer one.
pub use flotilla_types::cluster::RevokedNode as Revocation;

/// Store record key of a pending role change ([`DesiredRole`]).
pub(super) fn desired_role_key(node: &str) -> String {
    format!("desired-role/{node}")
}

/// Store record key of a pending `flotilla leave` ([`LeaveRequest`]).
pub(super) fn leaving_key(node: &str) -> String {
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

pub(super) fn now_secs() -> u64 {
    (now_ms() / 1000).max(0).unsigned_abs()
}

pub(super) fn record_of<T: serde::de::DeserializeOwned>(
    store: &Store,
    key: &str,
) -> Option<(T, u64)> {
    let record = store.read(|s| s.records.get(key).cloned())?;
    match serde_json::from_value(record.value) {
        Ok(value) => Some((value, record.meta.version)),
        Err(e) => {
            tracing::error!(key, error = %e, "unreadable store record");
            None
        }
    }
}

pub(super) fn put_record(
    key: &str,
    value: &impl Serialize,
    expect: Expect,
) -> Result<Op, ApiError> {
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

/// Every removed node, for agent servers to refuse.
pub(super) fn revocations(store: &Store) -> Vec<Revocation> {
    store.read(|s| {
        s.records
            .range("revoked/".to_string().."revoked0".to_string())
            .filter_map(|(_, r)| serde_json::from_value(r.value.clone()).ok())
            .collect()
    })
}

/// Store record key of what a node's latest certificate was issued under ([`Issued`]).
pub(super) fn issued_key(node: &str) -> String {
    format!("issued/{node}")
}

/// The signing root and trust bundle a node's latest certificate came with: how a CA root
/// rotation knows who has caught up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct Issued {
    /// SHA-256 of the root that signed it.
    pub(super) signer: String,
    pub(super) trust_pem: String,
}

pub(super) async fn record_issued(
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

/// Signs `csr_pem` for `identity` (IP SANs `addresses`) for the cluster's certificate validity
/// and records what signed it; answers the certificate and the trusted roots to send with it.
pub(super) async fn issue_certificate(
    store: &Store,
    sec: &ClusterSecurity,
    csr_pem: &str,
    identity: &NodeIdentity,
    addresses: &[String],
) -> Result<(String, String), ApiError> {
    let cert_pem = sec
        .ca()
        .signer
        .issue(csr_pem, identity, addresses, sec.cert_validity())
        .map_err(pki_error)?;
    // Bound first: a lock guard held across the call below would deadlock on the CA lock.
    let trust_pem = sec.ca().trust_pem();
    record_issued(store, sec, &identity.node_id, &trust_pem).await?;
    Ok((cert_pem, trust_pem))
}
