//! What both modes of a node keep doing while they run: following the cluster's PKI (revoked
//! certificates, CA roots), renewing their certificate, and changing their own role.

use anyhow::Context;
use flotilla_client::Client;
use flotilla_pki::{NodeCredentials, NodeKey, TlsIdentity};
use flotilla_types::cluster::{
    JoinResponse, MembershipStatus, RenewRequest, RenewResponse, RoleChangeRequest,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often a node asks the managers what they want of it (`GET /v1/cluster/membership`).
pub(super) const MEMBERSHIP_POLL: Duration = Duration::from_secs(1);

/// Keeps this node's TLS identity in step with the cluster: the revocation list goes to its
/// agent server (which refuses removed nodes' certificates; managers check the store, an agent
/// has none), and a changed set of trusted roots (a CA root rotation) means renewing now.
pub(super) async fn follow_cluster_pki(
    tls: &Arc<TlsIdentity>,
    api: &Client,
    dir: &Path,
    status: &MembershipStatus,
) {
    tls.set_revocations(
        status
            .revoked
            .iter()
            .map(|r| (r.node.clone(), r.revoked_at))
            .collect(),
    );
    if !status.trust_pem.is_empty() && status.trust_pem != tls.credentials().trust_pem {
        match renew_once(tls, api, dir).await {
            Ok(()) => tracing::info!("certificate renewed for the cluster's new CA roots"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "renewal for new CA roots failed"),
        }
    }
}

/// Tasks on `node` not yet in a terminal state, if the managers answer.
pub(super) async fn live_tasks_on(api: &Client, node: &str) -> Option<usize> {
    match api.tasks(None, Some(node)).await {
        Ok(tasks) => Some(
            tasks
                .iter()
                .filter(|t| !t.status.state.is_terminal())
                .count(),
        ),
        Err(e) => {
            tracing::debug!(error = %e, "listing this node's tasks; retrying");
            None
        }
    }
}

/// Asks for this node's manager certificate (`advertise`: where it will serve) and secrets.
/// Returns the answer and the fresh key the certificate is for.
pub(super) async fn promote_self(
    api: &Client,
    name: &str,
    advertise: SocketAddr,
) -> anyhow::Result<(JoinResponse, NodeKey)> {
    let key = NodeKey::generate()?;
    let response = api
        .promote_self(&RoleChangeRequest {
            csr_pem: key.csr_pem(name)?,
            advertise_addr: Some(advertise.to_string()),
        })
        .await
        .context("asking for a manager's certificate")?;
    Ok((response, key))
}

/// Asks for this node's worker certificate; returns it with the fresh key it is for.
pub(super) async fn demote_self(
    api: &Client,
    name: &str,
) -> anyhow::Result<(RenewResponse, NodeKey)> {
    let key = NodeKey::generate()?;
    let response = api
        .demote_self(&RoleChangeRequest {
            csr_pem: key.csr_pem(name)?,
            advertise_addr: None,
        })
        .await
        .context("asking for a worker's certificate")?;
    Ok((response, key))
}

/// Renews this node's certificate through the managers once less than a third of its lifetime
/// is left: a fresh key, a CSR, `POST /v1/cluster/renew` (authenticated by the current
/// certificate), then the new credentials are swapped in for new connections
/// ([`TlsIdentity::replace`]) and saved for restarts. Failures are retried at the next tick; the
/// old certificate stays in use meanwhile.
pub(super) async fn renew_loop(
    tls: Arc<TlsIdentity>,
    api: Client,
    dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let creds = tls.credentials();
        let tick = creds
            .lifetime()
            .map(|l| (l / 10).clamp(Duration::from_secs(1), Duration::from_secs(60)))
            .unwrap_or(Duration::from_secs(60));
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(tick) => {}
        }
        if !creds
            .needs_renewal(std::time::SystemTime::now())
            .unwrap_or(true)
        {
            continue;
        }
        match renew_once(&tls, &api, &dir).await {
            Ok(()) => tracing::info!(node = %tls.identity().node_id, "certificate renewed"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "certificate renewal failed; retrying")
            }
        }
    }
}

pub(super) async fn renew_once(
    tls: &Arc<TlsIdentity>,
    api: &Client,
    dir: &Path,
) -> anyhow::Result<()> {
    let name = tls.identity().node_id.clone();
    let key = NodeKey::generate()?;
    let renewed = api
        .renew_certificate(&RenewRequest {
            csr_pem: key.csr_pem(&name)?,
        })
        .await
        .context("asking a manager for a renewed certificate")?;
    let creds = NodeCredentials {
        cert_pem: renewed.cert_pem,
        key_pem: key.key_pem(),
        trust_pem: renewed.trust_pem,
    };
    tls.replace(creds.clone())
        .context("the renewed certificate is not usable")?;
    creds.save(dir)?;
    Ok(())
}
