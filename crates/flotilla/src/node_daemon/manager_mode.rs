//! A node running as a manager: the manager itself (assembled by [`crate::manager`]), the
//! node's own agent, certificate renewal, and the watch on this manager's membership, until a
//! signal, a demotion (the node carries on as a worker) or the last manager's forced leave.

use super::admission::print_join_commands;
use super::membership::{
    demote_self, follow_cluster_pki, live_tasks_on, renew_loop, MEMBERSHIP_POLL,
};
use super::Next;
use crate::agent_cmd::{run_worker, WorkerConfig};
use crate::cluster_args::NodeArgs;
use crate::manager::{ApiSocket, ClusterServing, Manager, ManagerConfig};
use crate::node_dir;
use anyhow::{anyhow, bail, Context};
use flotilla_api::cluster::ClusterSecurity;
use flotilla_client::Client;
use flotilla_controllers::ControllerConfig;
use flotilla_pki::{NodeCredentials, Role, TlsIdentity};
use flotilla_store::{Store, StoreConfig};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How a node starts its manager.
pub(super) struct ManagerStart {
    /// Where other nodes reach this manager.
    pub advertise: SocketAddr,
    /// The manager to ask for a vote once this one serves (a manager joining or promoted).
    pub join_via: Option<String>,
    /// Set by a fresh `init`; otherwise the cluster's (store) value applies.
    pub cert_validity: Option<Duration>,
    /// After `init --force-new-cluster`: this manager is the only voter; it removes the lost
    /// managers before serving.
    pub forced: bool,
}

/// A running manager node: the manager and what runs beside it on its stop signal.
struct RunningManager {
    manager: Manager,
    tls: Arc<TlsIdentity>,
    security: Arc<ClusterSecurity>,
    raft_id: u64,
    beside: Vec<JoinHandle<()>>,
}

/// Runs a manager (store, mTLS API, loopback API, controllers, local agent) until a signal,
/// a demotion or, for the last manager, `flotilla leave --force`; answers what the node runs
/// next.
pub(super) async fn run_manager(
    node: &NodeArgs,
    name: &str,
    start: &ManagerStart,
) -> anyhow::Result<Next> {
    let running = start_manager(node, name, start).await?;
    let advertise = start.advertise;
    println!(
        "flotilla manager {name} (raft id {}) serving https://{advertise}, local API http://{}",
        running.raft_id, node.api_addr
    );
    if start.join_via.is_none() {
        announce_cluster(node, name, &running, advertise).await?;
    }
    let peers = Client::with_tls(&advertise.to_string(), running.tls.client_config()?)?;
    let dir = node_dir::pki_dir(&node.data_dir);
    let store = running.manager.store.clone();
    let change = tokio::select! {
        _ = crate::up::wait_for_signal() => None,
        change = watch_manager_membership(&store, &peers, &running.tls, advertise, &dir) => Some(change),
    };
    match &change {
        None => println!("shutting down; tasks keep running"),
        Some(ManagerChange::Demoted { .. }) => {
            println!("demoted: stopping the manager; this node carries on as a worker")
        }
        Some(ManagerChange::Dissolved) => println!("the last manager left: dissolving the cluster"),
    }
    running.manager.signal_stop();
    for task in running.beside {
        let _ = task.await;
    }
    running.manager.stop().await?;
    after_manager(&node.data_dir, change)
}

/// Loads this node's manager identity, binds both listeners, starts the manager through the
/// one builder, joins raft if asked, and starts the node's agent and certificate renewal.
async fn start_manager(
    node: &NodeArgs,
    name: &str,
    start: &ManagerStart,
) -> anyhow::Result<RunningManager> {
    let cluster_listener = tokio::net::TcpListener::bind(node.listen_addr)
        .await
        .with_context(|| format!("--listen-addr {}: cannot listen", node.listen_addr))?;
    let cluster = ClusterServing::load(
        node_dir::pki_dir(&node.data_dir),
        cluster_listener,
        start.cert_validity,
    )?;
    let security = cluster.security.clone();
    let tls = security.tls.clone();
    let raft_id = node_dir::read_raft_id(&node.data_dir)?;
    if !node.api_addr.ip().is_loopback() {
        bail!("--api-addr {} must be a loopback address", node.api_addr);
    }
    let local_listener = tokio::net::TcpListener::bind(node.api_addr)
        .await
        .with_context(|| format!("--api-addr {}: cannot listen", node.api_addr))?;
    let bootstrap = start.join_via.is_none() && (raft_id == 1 || start.forced);
    if bootstrap {
        crate::store_guard::check_before_bootstrap(
            &node.data_dir,
            node.common.discard_unknown_workloads,
        )?;
    }
    let opened = Manager::open(ManagerConfig {
        data_dir: node.data_dir.clone(),
        raft_id,
        advertise: start.advertise.to_string(),
        local_api: local_listener,
        // The plain API is loopback only, and still needs the token (or the Unix socket).
        token: Some(node_dir::api_token(&node.data_dir)?),
        socket: ApiSocket::from_flag(node.common.socket.as_deref()),
        bootstrap,
        controllers: ControllerConfig {
            node_grace: node.node_grace,
            task_history_per_slot: node.common.task_history,
            ..ControllerConfig::default()
        },
        local_node: Some(name.to_string()),
        cluster: Some(cluster),
        limits: node.common.limits.limits(),
    })
    .await?;
    if start.forced {
        forget_lost_managers(&opened.store).await?;
    }
    let manager = opened.serve()?;
    if let Some(via) = &start.join_via {
        join_raft(&tls, via, raft_id, start.advertise).await?;
    }
    let beside = start_beside(node, name, &tls, start.advertise, &manager)?;
    Ok(RunningManager {
        manager,
        tls,
        security,
        raft_id,
        beside,
    })
}

/// After a forced new cluster: the lost managers leave the store and lose their certificates.
async fn forget_lost_managers(store: &Store) -> anyhow::Result<()> {
    let lost = flotilla_api::cluster::forget_lost_managers(store)
        .await
        .context("removing the lost managers")?;
    if !lost.is_empty() {
        println!(
            "removed the lost managers {}: their certificates are revoked",
            lost.join(", ")
        );
    }
    Ok(())
}

/// Asks the manager at `via` to add this one to raft (a learner, then a voter).
async fn join_raft(
    tls: &Arc<TlsIdentity>,
    via: &str,
    raft_id: u64,
    advertise: SocketAddr,
) -> anyhow::Result<()> {
    let voters = Client::with_tls(via, tls.client_config()?)?
        .add_manager(&flotilla_types::cluster::AddManagerRequest {
            raft_id,
            advertise_addr: advertise.to_string(),
        })
        .await
        .context("asking the leader to add this manager to raft")?;
    println!("joined as manager (raft id {raft_id}); voters now {voters:?}");
    Ok(())
}

/// The node's own agent, which talks to its own cluster API like any other node, and the
/// renewal of its certificate; both stop with the manager.
fn start_beside(
    node: &NodeArgs,
    name: &str,
    tls: &Arc<TlsIdentity>,
    advertise: SocketAddr,
    manager: &Manager,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let own_api = || -> anyhow::Result<Client> {
        Ok(Client::with_tls(
            &advertise.to_string(),
            tls.client_config()?,
        )?)
    };
    let worker = run_worker(
        WorkerConfig {
            node_name: name.to_string(),
            data_dir: node.data_dir.clone(),
            api: own_api()?,
            task_ports: node.common.task_ports.clone(),
            heartbeat: (node.node_grace / 4).max(Duration::from_millis(250)),
            mesh: node.mesh.config(),
            advertise_ip: Some(node.mesh.advertise_ip.unwrap_or(advertise.ip())),
            agent_tls: Some(tls.agent_server_config()?),
            discard_unknown_workloads: node.common.discard_unknown_workloads,
        },
        manager.stopping(),
    );
    let worker = tokio::spawn(async move {
        if let Err(e) = worker.await {
            tracing::error!(error = %format!("{e:#}"), "the manager's agent stopped");
        }
    });
    let renewal = tokio::spawn(renew_loop(
        tls.clone(),
        own_api()?,
        node_dir::pki_dir(&node.data_dir),
        manager.stopping(),
    ));
    Ok(vec![worker, renewal])
}

/// A manager that did not join through another: the first one publishes the cluster PKI into
/// the store, and the join commands are printed.
async fn announce_cluster(
    node: &NodeArgs,
    name: &str,
    running: &RunningManager,
    advertise: SocketAddr,
) -> anyhow::Result<()> {
    if running.raft_id == 1 {
        publish_pki(
            &running.manager.store,
            &running.security,
            name,
            running.raft_id,
            advertise,
        )
        .await;
    }
    let local = Client::new(
        &format!("http://{}", node.api_addr),
        Some(node_dir::api_token(&node.data_dir)?),
    )?;
    if let Ok(tokens) = local.join_tokens().await {
        print_join_commands(&tokens, advertise);
    }
    Ok(())
}

/// Carries out a manager's end on its data dir: a demoted manager keeps only a worker's
/// certificate and its managers list; the dissolved cluster's last state is kept aside.
fn after_manager(data_dir: &Path, change: Option<ManagerChange>) -> anyhow::Result<Next> {
    match change {
        None => Ok(Next::Exit),
        Some(ManagerChange::Demoted { creds, managers }) => {
            // A worker keeps no CA key, join secrets or raft state: the managers left hold them.
            let dir = node_dir::pki_dir(data_dir);
            creds.save(&dir)?;
            ClusterSecurity::forget(&dir)?;
            node_dir::remove_raft_state(data_dir, None)?;
            node_dir::save_known_managers(data_dir, &managers)?;
            let manager = managers
                .first()
                .cloned()
                .ok_or_else(|| anyhow!("demoted, but no other manager is known to follow"))?;
            Ok(Next::Worker { manager })
        }
        Some(ManagerChange::Dissolved) => {
            let kept = node_dir::remove_raft_state(data_dir, Some("dissolved"))?;
            node_dir::forget_cluster(data_dir)?;
            println!(
                "left the cluster; it is dissolved. Its last state is kept in {}",
                kept.map_or_else(|| "nothing".into(), |p| p.display().to_string())
            );
            Ok(Next::Exit)
        }
    }
}

/// Rewrites the stopped store's membership so this manager is its only voter
/// ([`Store::force_new_cluster`]); [`run_manager`] then removes the lost managers.
pub(super) async fn force_new_cluster(
    node: &NodeArgs,
    advertise: SocketAddr,
) -> anyhow::Result<()> {
    let raft_id = node_dir::read_raft_id(&node.data_dir)?;
    let forced = Store::force_new_cluster(&StoreConfig {
        data_dir: node.data_dir.join("store"),
        node_id: raft_id,
        advertise_addr: advertise.to_string(),
    })
    .await
    .context("forcing a new cluster")?;
    match forced {
        Some(f) => println!(
            "forced a new cluster: raft id {raft_id} is now the only manager (was one of raft \
             ids {:?}); kept every log entry before index {} (new term {}). The other \
             managers are removed: never start them with their old data; they must join again",
            f.previous_members, f.index, f.term
        ),
        None => println!("raft id {raft_id} is already the only manager; starting it"),
    }
    Ok(())
}

/// Why a manager stops being one.
enum ManagerChange {
    /// `flotilla node demote` or `leave`: the worker certificate to carry on with and the
    /// managers to follow.
    Demoted {
        creds: NodeCredentials,
        managers: Vec<String>,
    },
    /// `flotilla leave --force` on the last manager: its tasks have stopped.
    Dissolved,
}

/// Asks the other managers (this one's store may be cut off from raft once it is removed)
/// what the cluster wants of this manager, until it is to become a worker or, as the last
/// manager, to leave.
async fn watch_manager_membership(
    store: &Store,
    peers: &Client,
    tls: &Arc<TlsIdentity>,
    advertise: SocketAddr,
    dir: &Path,
) -> ManagerChange {
    let name = tls.identity().node_id.as_str();
    loop {
        tokio::time::sleep(MEMBERSHIP_POLL).await;
        let others: Vec<String> = store
            .members()
            .into_iter()
            .filter(|m| m.raft_id != store.node_id())
            .map(|m| m.addr)
            .collect();
        let ask = if others.is_empty() {
            vec![advertise.to_string()]
        } else {
            others.clone()
        };
        if let Err(e) = peers.set_managers(&ask) {
            tracing::warn!(error = %e, "a manager advertises an unusable address");
            continue;
        }
        let status = match peers.membership().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "asking for this node's membership; retrying");
                continue;
            }
        };
        follow_cluster_pki(tls, peers, dir, &status).await;
        if status.role == Role::Worker.as_str() {
            match demote_self(peers, name).await {
                Ok((response, key)) => {
                    return ManagerChange::Demoted {
                        creds: NodeCredentials {
                            cert_pem: response.cert_pem,
                            key_pem: key.key_pem(),
                            trust_pem: response.trust_pem,
                        },
                        managers: others,
                    }
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "demotion; retrying"),
            }
            continue;
        }
        // The last manager, leaving with --force once its tasks (told to stop) have stopped.
        if status.leaving.is_some()
            && others.is_empty()
            && live_tasks_on(peers, name).await == Some(0)
        {
            return ManagerChange::Dissolved;
        }
    }
}

/// Puts the cluster PKI and this first manager's raft id into the store (once; later starts
/// find them there). Retried briefly because a restarted first manager may not lead yet; if
/// another manager leads, that cluster has them already.
async fn publish_pki(
    store: &Store,
    security: &ClusterSecurity,
    name: &str,
    raft_id: u64,
    advertise: SocketAddr,
) {
    for _ in 0..20 {
        let done = async {
            security.publish(store).await?;
            flotilla_api::cluster::record_manager(store, name, raft_id, &advertise.to_string())
                .await
        }
        .await;
        match done {
            Ok(()) => return,
            Err(e) => tracing::debug!(error = %e, "publishing the cluster PKI; retrying"),
        }
        if store.current_leader().is_some_and(|l| l != store.node_id()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tracing::warn!("could not put the cluster PKI into the store; joins still use the local copy");
}
