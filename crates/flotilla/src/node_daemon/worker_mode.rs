//! A node running as a worker: its agent follows every manager over mTLS until a signal, a
//! promotion (the node then runs its manager in the same process) or `flotilla leave`.

use super::admission;
use super::manager_mode::ManagerStart;
use super::membership::{
    follow_cluster_pki, live_tasks_on, promote_self, renew_loop, MEMBERSHIP_POLL,
};
use super::{advertise, Next};
use crate::agent_cmd::{run_worker, WorkerConfig};
use crate::cluster_args::NodeArgs;
use crate::node_dir;
use anyhow::Context;
use flotilla_client::Client;
use flotilla_pki::{NodeCredentials, NodeKey, Role, TlsIdentity};
use flotilla_types::cluster::JoinResponse;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Runs a worker until a signal, a promotion (it then runs as a manager) or `flotilla leave`.
pub(super) async fn run_joined_worker(
    node: &NodeArgs,
    name: &str,
    manager: &str,
) -> anyhow::Result<Next> {
    let dir = node_dir::pki_dir(&node.data_dir);
    let tls = TlsIdentity::new(NodeCredentials::load(&dir)?)?;
    let api = Client::with_tls(manager, tls.client_config()?)?;
    // Every manager seen last time, so a restart works when the one given here is gone.
    let mut known = vec![manager.to_string()];
    known.extend(node_dir::read_known_managers(&node.data_dir));
    api.set_managers(&known)
        .with_context(|| format!("{}", node.data_dir.join(node_dir::MANAGERS_FILE).display()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let following = tokio::spawn(follow_managers(
        api.clone(),
        node.data_dir.clone(),
        stop_rx.clone(),
    ));
    // Stopped before a promotion saves its certificate, so the two never write at once.
    let renewal = tokio::spawn(renew_loop(tls.clone(), api.clone(), dir, stop_rx.clone()));
    let mut worker = tokio::spawn(run_worker(
        WorkerConfig {
            node_name: name.to_string(),
            data_dir: node.data_dir.clone(),
            api: api.clone(),
            task_ports: node.common.task_ports.clone(),
            heartbeat: (node.node_grace / 4).max(Duration::from_millis(250)),
            mesh: node.mesh.config(),
            // Other nodes reach this worker's tasks where they would reach the worker.
            advertise_ip: node.mesh.advertise_ip.or_else(|| {
                node.advertise_addr
                    .map(|a| a.ip())
                    .or(Some(node.listen_addr.ip()))
                    .filter(|ip| !ip.is_unspecified())
            }),
            agent_tls: Some(tls.agent_server_config()?),
            discard_unknown_workloads: node.common.discard_unknown_workloads,
        },
        stop_rx,
    ));
    println!(
        "flotilla worker {name} following https://{manager} (and the other managers) over mTLS"
    );
    let change = tokio::select! {
        result = &mut worker => {
            let _ = stop_tx.send(true);
            result.context("the agent crashed")??;
            return Ok(Next::Exit);
        }
        _ = crate::up::wait_for_signal() => None,
        change = watch_worker_membership(&api, &tls, node) => Some(change),
    };
    match &change {
        None => {
            println!("stopping the agent; tasks keep running and are re-adopted by the next agent")
        }
        Some(WorkerChange::Promoted { .. }) => {
            println!("promoted: this node starts its manager; tasks keep running")
        }
        Some(WorkerChange::Left) => println!("left the cluster; stopping"),
    }
    let _ = stop_tx.send(true);
    worker.await.context("the agent crashed")??;
    let _ = renewal.await;
    let _ = following.await;
    match change {
        None => Ok(Next::Exit),
        Some(WorkerChange::Promoted {
            response,
            key,
            advertise,
        }) => {
            admission::save_admission(
                &node.data_dir,
                &node_dir::pki_dir(&node.data_dir),
                *response,
                &key,
            )?;
            Ok(Next::Manager(ManagerStart {
                advertise,
                join_via: Some(api.base()),
                cert_validity: None,
                forced: false,
            }))
        }
        Some(WorkerChange::Left) => {
            node_dir::forget_cluster(&node.data_dir)?;
            Ok(Next::Exit)
        }
    }
}

/// Why a worker stops being one.
enum WorkerChange {
    /// `flotilla node promote`: the manager certificate (for `key`) and secrets, and where the
    /// manager will serve.
    Promoted {
        response: Box<JoinResponse>,
        key: Box<NodeKey>,
        advertise: SocketAddr,
    },
    /// `flotilla leave`: drained, then removed (its certificate revoked).
    Left,
}

/// Where a promoted worker serves as a manager: `--advertise-addr`, a non-wildcard
/// `--listen-addr`, or the node's `--advertise-ip` with the `--listen-addr` port.
fn promotion_advertise(node: &NodeArgs) -> Option<SocketAddr> {
    advertise(node).ok().or_else(|| {
        node.mesh
            .advertise_ip
            .map(|ip| SocketAddr::new(ip, node.listen_addr.port()))
    })
}

/// Polls what the cluster wants of this worker until it is to become a manager, or has left:
/// once `flotilla leave` is asked, waits until the drain (or, forced, the stop) has emptied
/// the node, then asks for its removal.
async fn watch_worker_membership(
    api: &Client,
    tls: &Arc<TlsIdentity>,
    node: &NodeArgs,
) -> WorkerChange {
    let dir = node_dir::pki_dir(&node.data_dir);
    let name = tls.identity().node_id.as_str();
    let mut reported: Option<usize> = None;
    let mut complained = false;
    loop {
        tokio::time::sleep(MEMBERSHIP_POLL).await;
        let status = match api.membership().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "asking for this node's membership; retrying");
                continue;
            }
        };
        follow_cluster_pki(tls, api, &dir, &status).await;
        if status.leaving.is_some() {
            let Some(live) = live_tasks_on(api, name).await else {
                continue;
            };
            if reported != Some(live) {
                println!("leaving: {live} tasks still on this node");
                reported = Some(live);
            }
            if live > 0 {
                continue;
            }
            match api.complete_leave().await {
                Ok(_) => return WorkerChange::Left,
                Err(e) => tracing::warn!(error = %e, "asking to be removed; retrying"),
            }
            continue;
        }
        if status.role == Role::Manager.as_str() {
            let Some(advertise) = promotion_advertise(node) else {
                if !complained {
                    tracing::error!(
                        "this node is being promoted but has no address to serve the cluster API \
                         at: restart it with --advertise-addr IP:PORT"
                    );
                    complained = true;
                }
                continue;
            };
            match promote_self(api, name, advertise).await {
                Ok((response, key)) => {
                    return WorkerChange::Promoted {
                        response: Box::new(response),
                        key: Box::new(key),
                        advertise,
                    }
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "promotion; retrying"),
            }
        }
    }
}

/// Keeps the worker's client pointed at every manager (`GET /v1/cluster/managers`), so its
/// heartbeats, watch and status reports move to another manager when the current one dies,
/// and saves the list for the next start. Failures are retried at the next tick (the client
/// has moved on by then).
async fn follow_managers(api: Client, data_dir: PathBuf, mut stop: watch::Receiver<bool>) {
    let mut saved = node_dir::read_known_managers(&data_dir);
    loop {
        match api.cluster_managers().await {
            Ok(list) => {
                let mut addrs: Vec<String> = list.into_iter().map(|m| m.addr).collect();
                addrs.sort();
                if let Err(e) = api.set_managers(&addrs) {
                    tracing::warn!(error = %e, "a manager advertises an unusable address");
                } else if addrs != saved && !addrs.is_empty() {
                    match node_dir::save_known_managers(&data_dir, &addrs) {
                        Ok(()) => saved = addrs,
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "saving the managers"),
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "listing the managers failed; retrying"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
