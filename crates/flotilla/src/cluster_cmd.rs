//! `flotilla init`, `flotilla join` and `flotilla token`: a secure multi-node cluster.
//!
//! `init` creates the cluster CA and join secrets in `DATA_DIR/pki`, issues this node a manager
//! certificate, bootstraps raft (id 1) and serves the API over mutual TLS on `--listen-addr`
//! (plus plain HTTP on loopback `--api-addr` for the local CLI, as `up` does). `join` pins the
//! CA from the token, gets a certificate for a key generated here, then runs either a manager
//! (raft learner, then voter) or a worker agent (B's [`crate::agent_cmd::run_worker`]) over
//! mTLS. Both commands restart a node from its data dir when run again.

use crate::agent_cmd::{run_worker, WorkerConfig};
use crate::node_dir;
use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use flotilla_api::cluster::ClusterSecurity;
use flotilla_api::AppState;
use flotilla_client::Client;
use flotilla_controllers::{ControllerConfig, ControllerRunner};
use flotilla_pki::wire::{
    AddManagerRequest, CaResponse, JoinRequest, JoinResponse, LeaveRequest, LeaveResponse,
    ManagerInfo, MembershipStatus, RemoveNodeResponse, RenewRequest, RenewResponse,
    RoleChangeRequest, RoleChangeResponse, TokensResponse,
};
use flotilla_pki::{
    bootstrap_client_config, fetched_ca_matches, pinned_client_config, CaBundle, JoinSecrets,
    JoinToken, NodeCredentials, NodeIdentity, NodeKey, Role, TlsIdentity,
};
use flotilla_store::network::HttpNetwork;
use flotilla_store::{Store, StoreConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, Args, Clone)]
pub struct NodeArgs {
    /// Where the store, certificates, task state and logs live.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value_os_t = node_dir::default_data_dir())]
    pub data_dir: PathBuf,
    /// Address the cluster (mTLS) API listens on.
    #[arg(long, default_value = "0.0.0.0:7451")]
    pub listen_addr: SocketAddr,
    /// Address other nodes reach this one at (IP:PORT). Default: --listen-addr, which must then
    /// not be a wildcard.
    #[arg(long)]
    pub advertise_addr: Option<SocketAddr>,
    /// Plain-HTTP API for the local CLI, loopback only (managers only).
    #[arg(long, default_value = "127.0.0.1:7450")]
    pub api_addr: SocketAddr,
    /// This node's name (default: the host name; remembered in DATA_DIR/node-id).
    #[arg(long)]
    pub node_name: Option<String>,
    /// A node silent for this long is marked down and its tasks replaced.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub node_grace: Duration,
    /// Range host ports for task ports are taken from (START-END, end exclusive). Default: a
    /// 500-port block of 20000-32000 picked by the node's name, remembered in DATA_DIR/task-ports.
    #[arg(long, value_parser = node_dir::parse_port_range)]
    pub task_ports: Option<std::ops::Range<u16>>,
    #[command(flatten)]
    pub mesh: crate::mesh_cmd::MeshArgs,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// How long node certificates are valid; every node renews its own once less than a third
    /// is left. At least 30s (short values are for tests).
    #[arg(long, default_value = "90days", value_parser = humantime::parse_duration)]
    pub cert_validity: Duration,
    /// Disaster recovery: restart this manager from its data dir as the only manager of the
    /// cluster, keeping its state, after the other managers were lost for good (quorum can
    /// never come back). The lost managers are removed and must join again with fresh data.
    /// See docs/OPERATIONS.md before using it.
    #[arg(long)]
    pub force_new_cluster: bool,
}

/// Below this, renewals (every tenth of the validity, after two thirds) would crowd each other.
const MIN_CERT_VALIDITY: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// A join token printed by `flotilla init` or `flotilla token show`.
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN", hide_env_values = true)]
    pub token: String,
    /// A manager's cluster address (IP:PORT).
    pub manager: String,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// The node to remove (its name, as `flotilla node ls` shows it).
    pub node: String,
    /// Remove the node even though it is still up (its agent keeps running but is refused).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print the join command for a role.
    Show { role: RoleArg },
    /// Replace a role's join token; the old one is refused from now on.
    Rotate { role: RoleArg },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RoleArg {
    Worker,
    Manager,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Worker => Role::Worker,
            RoleArg::Manager => Role::Manager,
        }
    }
}

const RAFT_ID_FILE: &str = "raft-id";

fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

fn advertise(node: &NodeArgs) -> anyhow::Result<SocketAddr> {
    let addr = node.advertise_addr.unwrap_or(node.listen_addr);
    if addr.ip().is_unspecified() {
        bail!(
            "--advertise-addr is required when --listen-addr is {} (other nodes need a \
             reachable IP:PORT)",
            node.listen_addr
        );
    }
    Ok(addr)
}

pub async fn init(args: &InitArgs) -> anyhow::Result<ExitCode> {
    let node = &args.node;
    if args.cert_validity < MIN_CERT_VALIDITY {
        bail!(
            "--cert-validity {}: must be at least {}",
            humantime::format_duration(args.cert_validity),
            humantime::format_duration(MIN_CERT_VALIDITY)
        );
    }
    let _lock = node_dir::lock(&node.data_dir)?;
    let name = node_dir::node_name(node.node_name.as_deref(), &node.data_dir)?;
    let advertise = advertise(node)?;
    let dir = pki_dir(&node.data_dir);
    let fresh = !NodeCredentials::exists(&dir);
    if args.force_new_cluster {
        if fresh {
            bail!(
                "--force-new-cluster: {} holds no cluster to recover (no certificates in {})",
                node.data_dir.display(),
                dir.display()
            );
        }
        force_new_cluster(node, advertise).await?;
        return run_node(
            node,
            &name,
            Next::Manager {
                advertise,
                join_via: None,
                cert_validity: None,
                forced: true,
            },
        )
        .await;
    }
    if fresh {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = CaBundle::generate(&name)?;
        let secrets = JoinSecrets::generate();
        let key = NodeKey::generate()?;
        let identity = NodeIdentity {
            node_id: name.clone(),
            role: Role::Manager,
        };
        let cert_pem = ca.signer.issue(
            &key.csr_pem(&name)?,
            &identity,
            &[advertise.ip().to_string()],
            args.cert_validity,
        )?;
        ClusterSecurity::save(&dir, &ca, &secrets)?;
        NodeCredentials {
            cert_pem,
            key_pem: key.key_pem(),
            trust_pem: ca.trust_pem(),
        }
        .save(&dir)?;
        write_raft_id(&node.data_dir, 1)?;
        println!(
            "initialised a new cluster; CA and certificates in {}",
            dir.display()
        );
    }
    run_node(
        node,
        &name,
        Next::Manager {
            advertise,
            join_via: None,
            cert_validity: fresh.then_some(args.cert_validity),
            forced: false,
        },
    )
    .await
}

/// What a node process runs next when one of its modes ends: a promotion turns a worker into
/// a manager and a demotion a manager into a worker in the same process (as in Swarm), with
/// the tasks left running and re-adopted by the new mode's agent.
enum Next {
    Exit,
    /// [`run_manager`]'s arguments.
    Manager {
        advertise: SocketAddr,
        join_via: Option<String>,
        cert_validity: Option<Duration>,
        forced: bool,
    },
    Worker {
        /// The manager to follow first (the others are learnt from it).
        manager: String,
    },
}

async fn run_node(node: &NodeArgs, name: &str, mut next: Next) -> anyhow::Result<ExitCode> {
    loop {
        next = match next {
            Next::Exit => return Ok(ExitCode::SUCCESS),
            Next::Manager {
                advertise,
                join_via,
                cert_validity,
                forced,
            } => {
                run_manager(
                    node,
                    name,
                    advertise,
                    join_via.as_deref(),
                    cert_validity,
                    forced,
                )
                .await?
            }
            Next::Worker { manager } => run_joined_worker(node, name, &manager).await?,
        };
    }
}

/// How often a node asks the managers what they want of it (`GET /v1/cluster/membership`).
const MEMBERSHIP_POLL: Duration = Duration::from_secs(1);

/// Rewrites the stopped store's membership so this manager is its only voter
/// ([`Store::force_new_cluster`]); [`run_manager`] then removes the lost managers.
async fn force_new_cluster(node: &NodeArgs, advertise: SocketAddr) -> anyhow::Result<()> {
    let raft_id = read_raft_id(&node.data_dir)?;
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

fn write_raft_id(data_dir: &Path, id: u64) -> anyhow::Result<()> {
    std::fs::write(data_dir.join(RAFT_ID_FILE), format!("{id}\n"))
        .with_context(|| format!("writing {}", data_dir.join(RAFT_ID_FILE).display()))
}

fn read_raft_id(data_dir: &Path) -> anyhow::Result<u64> {
    let path = data_dir.join(RAFT_ID_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (is this a manager's data dir?)", path.display()))?;
    text.trim()
        .parse()
        .map_err(|_| anyhow!("{}: {:?} is not a raft id", path.display(), text.trim()))
}

/// Runs a manager (store, mTLS API, loopback API, controllers, local agent) until a signal,
/// a demotion or, for the last manager, `flotilla leave --force`.
/// `join_via`: the manager to ask for a vote once this one serves (a manager joining).
/// `cert_validity`: set by a fresh `init`; otherwise the cluster's (store) value applies.
/// `forced`: after `init --force-new-cluster` (this manager is the only voter; it waits for its
/// own leadership and removes the lost managers).
async fn run_manager(
    node: &NodeArgs,
    name: &str,
    advertise: SocketAddr,
    join_via: Option<&str>,
    cert_validity: Option<Duration>,
    forced: bool,
) -> anyhow::Result<Next> {
    let dir = pki_dir(&node.data_dir);
    let tls = TlsIdentity::new(NodeCredentials::load(&dir)?)?;
    if tls.identity().role != Role::Manager {
        bail!(
            "{} holds a worker certificate; run `flotilla join` with a worker's options instead",
            dir.display()
        );
    }
    let security = Arc::new(ClusterSecurity::load(dir.clone(), tls.clone())?);
    if let Some(validity) = cert_validity {
        security.set_cert_validity(validity);
    }
    let raft_id = read_raft_id(&node.data_dir)?;
    let cluster_listener = tokio::net::TcpListener::bind(node.listen_addr)
        .await
        .with_context(|| format!("--listen-addr {}: cannot listen", node.listen_addr))?;
    if !node.api_addr.ip().is_loopback() {
        bail!("--api-addr {} must be a loopback address", node.api_addr);
    }
    let local_listener = tokio::net::TcpListener::bind(node.api_addr)
        .await
        .with_context(|| format!("--api-addr {}: cannot listen", node.api_addr))?;

    let store = Store::open_with_network(
        StoreConfig {
            data_dir: node.data_dir.join("store"),
            node_id: raft_id,
            advertise_addr: advertise.to_string(),
        },
        HttpNetwork::with_tls(tls.client_config()?).context("building the raft client")?,
    )
    .await
    .context("opening the store")?;
    if join_via.is_none() && (raft_id == 1 || forced) {
        store
            .bootstrap_single()
            .await
            .context("starting the raft group")?;
    }
    if forced {
        let lost = flotilla_api::cluster::forget_lost_managers(&store)
            .await
            .context("removing the lost managers")?;
        if !lost.is_empty() {
            println!(
                "removed the lost managers {}: their certificates are revoked",
                lost.join(", ")
            );
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |rx: &watch::Receiver<bool>| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let state = AppState::new(store.clone(), None).with_cluster(security.clone())?;
    let cluster_api = tokio::spawn(flotilla_api::serve_tls(
        cluster_listener,
        state.clone(),
        tls.clone(),
        stopped(&stop_rx),
    ));
    let local_api = tokio::spawn(flotilla_api::serve(
        local_listener,
        state,
        stopped(&stop_rx),
    ));
    if let Some(manager) = join_via {
        let client = Client::with_tls(manager, tls.client_config()?)?;
        let voters: Vec<u64> = client
            .post_json(
                "/v1/cluster/managers",
                &AddManagerRequest {
                    raft_id,
                    advertise_addr: advertise.to_string(),
                },
            )
            .await
            .context("asking the leader to add this manager to raft")?;
        println!("joined as manager (raft id {raft_id}); voters now {voters:?}");
    }
    let controllers = tokio::spawn(
        ControllerRunner::new(
            store.clone(),
            ControllerConfig {
                node_grace: node.node_grace,
                ..ControllerConfig::default()
            },
        )
        .run(stop_rx.clone()),
    );
    // The manager's own agent talks to its own cluster API like any other node.
    let worker = tokio::spawn(run_worker(
        WorkerConfig {
            node_name: name.to_string(),
            data_dir: node.data_dir.clone(),
            api: Client::with_tls(&advertise.to_string(), tls.client_config()?)?,
            task_ports: node.task_ports.clone(),
            heartbeat: (node.node_grace / 4).max(Duration::from_millis(250)),
            mesh: node.mesh.config(),
            advertise_ip: Some(node.mesh.advertise_ip.unwrap_or(advertise.ip())),
            agent_tls: Some(tls.agent_server_config()?),
        },
        stop_rx.clone(),
    ));
    let renewal = tokio::spawn(renew_loop(
        tls.clone(),
        Client::with_tls(&advertise.to_string(), tls.client_config()?)?,
        dir,
        stop_rx.clone(),
    ));
    println!(
        "flotilla manager {name} (raft id {raft_id}) serving https://{advertise}, local API \
         http://{}",
        node.api_addr
    );
    if join_via.is_none() && raft_id == 1 {
        publish_pki(&store, &security, name, raft_id, advertise).await;
    }
    if join_via.is_none() {
        if let Ok(tokens) = Client::new(&format!("http://{}", node.api_addr), None)?
            .get_json::<TokensResponse>("/v1/cluster/tokens")
            .await
        {
            print_join_commands(&tokens, advertise);
        }
    }
    let peers = Client::with_tls(&advertise.to_string(), tls.client_config()?)?;
    let dir = pki_dir(&node.data_dir);
    let change = tokio::select! {
        _ = crate::up::wait_for_signal() => None,
        change = watch_manager_membership(&store, &peers, &tls, advertise, &dir) => Some(change),
    };
    match &change {
        None => println!("shutting down; tasks keep running"),
        Some(ManagerChange::Demoted { .. }) => {
            println!("demoted: stopping the manager; this node carries on as a worker")
        }
        Some(ManagerChange::Dissolved) => println!("the last manager left: dissolving the cluster"),
    }
    let _ = stop_tx.send(true);
    let _ = renewal.await;
    let _ = worker.await;
    let _ = controllers.await;
    let _ = cluster_api.await;
    let _ = local_api.await;
    store.shutdown().await.context("stopping the store")?;
    let data_dir = &node.data_dir;
    match change {
        None => Ok(Next::Exit),
        Some(ManagerChange::Demoted { creds, managers }) => {
            // A worker keeps no CA key, join secrets or raft state: the managers left hold them.
            creds.save(&pki_dir(data_dir))?;
            ClusterSecurity::forget(&pki_dir(data_dir))?;
            remove_raft_state(data_dir, None)?;
            save_known_managers(data_dir, &managers)?;
            let manager = managers
                .first()
                .cloned()
                .ok_or_else(|| anyhow!("demoted, but no other manager is known to follow"))?;
            Ok(Next::Worker { manager })
        }
        Some(ManagerChange::Dissolved) => {
            let kept = remove_raft_state(data_dir, Some("dissolved"))?;
            forget_cluster(data_dir)?;
            println!(
                "left the cluster; it is dissolved. Its last state is kept in {}",
                kept.map_or_else(|| "nothing".into(), |p| p.display().to_string())
            );
            Ok(Next::Exit)
        }
    }
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
        let status: MembershipStatus = match peers.get_json("/v1/cluster/membership").await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "asking for this node's membership; retrying");
                continue;
            }
        };
        follow_cluster_pki(tls, peers, dir, &status).await;
        if status.role == Role::Worker.as_str() {
            match change_role::<RenewResponse>(peers, name, None).await {
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

/// Keeps this node's TLS identity in step with the cluster: the revocation list goes to its
/// agent server (which refuses removed nodes' certificates; managers check the store, an agent
/// has none), and a changed set of trusted roots (a CA root rotation) means renewing now.
async fn follow_cluster_pki(
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
async fn live_tasks_on(api: &Client, node: &str) -> Option<usize> {
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

/// Asks for this node's certificate in its new role: a manager's (`advertise`: where it will
/// serve) through `promote-self`, a worker's through `demote-self`. Returns the answer and the
/// fresh key the certificate is for.
async fn change_role<T: serde::de::DeserializeOwned>(
    api: &Client,
    name: &str,
    advertise: Option<SocketAddr>,
) -> anyhow::Result<(T, NodeKey)> {
    let key = NodeKey::generate()?;
    let path = if advertise.is_some() {
        "/v1/cluster/promote-self"
    } else {
        "/v1/cluster/demote-self"
    };
    let response = api
        .post_json(
            path,
            &RoleChangeRequest {
                csr_pem: key.csr_pem(name)?,
                advertise_addr: advertise.map(|a| a.to_string()),
            },
        )
        .await
        .with_context(|| format!("POST {path}"))?;
    Ok((response, key))
}

/// Removes a former manager's raft id and store. `keep_as`: rename the store to
/// `store.KEEP_AS-SECONDS` instead (returned), for a dissolved cluster's last state.
fn remove_raft_state(data_dir: &Path, keep_as: Option<&str>) -> anyhow::Result<Option<PathBuf>> {
    flotilla_pki::remove_file(&data_dir.join(RAFT_ID_FILE))?;
    let store = data_dir.join("store");
    if !store.exists() {
        return Ok(None);
    }
    match keep_as {
        Some(suffix) => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let kept = data_dir.join(format!("store.{suffix}-{secs}"));
            std::fs::rename(&store, &kept)
                .with_context(|| format!("moving {} aside", store.display()))?;
            Ok(Some(kept))
        }
        None => {
            std::fs::remove_dir_all(&store)
                .with_context(|| format!("removing {}", store.display()))?;
            Ok(None)
        }
    }
}

/// Deletes a node's credentials and manager list once it has left: the next `flotilla join`
/// on this data dir joins afresh with a token (the old certificate is revoked anyway).
fn forget_cluster(data_dir: &Path) -> anyhow::Result<()> {
    let dir = pki_dir(data_dir);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    flotilla_pki::remove_file(&data_dir.join(MANAGERS_FILE))?;
    Ok(())
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

/// Renews this node's certificate through the managers once less than a third of its lifetime
/// is left: a fresh key, a CSR, `POST /v1/cluster/renew` (authenticated by the current
/// certificate), then the new credentials are swapped in for new connections
/// ([`TlsIdentity::replace`]) and saved for restarts. Failures are retried at the next tick; the
/// old certificate stays in use meanwhile.
async fn renew_loop(
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

async fn renew_once(tls: &Arc<TlsIdentity>, api: &Client, dir: &Path) -> anyhow::Result<()> {
    let name = tls.identity().node_id.clone();
    let key = NodeKey::generate()?;
    let renewed: RenewResponse = api
        .post_json(
            "/v1/cluster/renew",
            &RenewRequest {
                csr_pem: key.csr_pem(&name)?,
            },
        )
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

/// `flotilla node rm NODE [--force]`.
pub async fn node_rm(client: &Client, args: &RmArgs) -> anyhow::Result<ExitCode> {
    let path = format!(
        "/v1/nodes/{}{}",
        args.node,
        if args.force { "?force=true" } else { "" }
    );
    let removed: RemoveNodeResponse = client.delete_json(&path).await?;
    println!(
        "removed node {}{}; its certificate is revoked",
        removed.node,
        if removed.was_manager {
            " (and from the raft managers)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn print_join_commands(tokens: &TokensResponse, advertise: SocketAddr) {
    println!(
        "to add a worker:  flotilla join --token {} {advertise}",
        tokens.worker
    );
    println!(
        "to add a manager: flotilla join --token {} {advertise} --advertise-addr IP:PORT",
        tokens.manager
    );
}

pub async fn join(args: &JoinArgs) -> anyhow::Result<ExitCode> {
    let node = &args.node;
    let _lock = node_dir::lock(&node.data_dir)?;
    let name = node_dir::node_name(node.node_name.as_deref(), &node.data_dir)?;
    let dir = pki_dir(&node.data_dir);
    let joined_now = !NodeCredentials::exists(&dir);
    if joined_now {
        obtain_credentials(args, &name, &dir).await?;
    }
    let creds = NodeCredentials::load(&dir)?;
    let first = match creds.identity()?.role {
        Role::Manager => Next::Manager {
            advertise: advertise(node)?,
            join_via: joined_now.then(|| args.manager.clone()),
            cert_validity: None,
            forced: false,
        },
        Role::Worker => Next::Worker {
            manager: args.manager.clone(),
        },
    };
    run_node(node, &name, first).await
}

/// The join handshake: pin the CA from the token, send a CSR with the token, save what comes
/// back.
async fn obtain_credentials(args: &JoinArgs, name: &str, dir: &Path) -> anyhow::Result<()> {
    let token: JoinToken = args.token.parse().context("--token")?;
    let bootstrap = Client::with_tls(&args.manager, bootstrap_client_config()?)?;
    let ca: CaResponse = bootstrap
        .get_json("/v1/cluster/ca")
        .await
        .context("fetching the cluster CA")?;
    fetched_ca_matches(&ca.trust_pem, &token.ca_digest)?;
    let pinned = Client::with_tls(&args.manager, pinned_client_config(&ca.trust_pem)?)?;
    let key = NodeKey::generate()?;
    let advertise = args
        .node
        .advertise_addr
        .or((!args.node.listen_addr.ip().is_unspecified()).then_some(args.node.listen_addr));
    let response: JoinResponse = pinned
        .post_json(
            "/v1/cluster/join",
            &JoinRequest {
                token: args.token.trim().to_string(),
                node_name: name.to_string(),
                advertise_addr: advertise.map(|a| a.to_string()),
                csr_pem: key.csr_pem(name)?,
            },
        )
        .await
        .context("join refused")?;
    let role = response.role.clone();
    save_admission(&args.node.data_dir, dir, response, &key)?;
    println!("joined as {role} {name}");
    Ok(())
}

/// Saves what a manager answered to a join or a promotion: the certificate for `key`, and for
/// a manager the CA, join secrets and raft id.
fn save_admission(
    data_dir: &Path,
    dir: &Path,
    response: JoinResponse,
    key: &NodeKey,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(secrets) = &response.manager_secrets {
        let raft_id = response.raft_id.ok_or_else(|| {
            anyhow!("the manager admitted this node as a manager without a raft id")
        })?;
        let ca = CaBundle::from_pem(
            &secrets.ca_cert_pem,
            &secrets.ca_key_pem,
            &secrets.previous_roots_pem,
        )?;
        ClusterSecurity::save(
            dir,
            &ca,
            &JoinSecrets::from_file_contents(&secrets.join_secrets)?,
        )?;
        write_raft_id(data_dir, raft_id)?;
    }
    NodeCredentials {
        cert_pem: response.cert_pem,
        key_pem: key.key_pem(),
        trust_pem: response.trust_pem,
    }
    .save(dir)?;
    Ok(())
}

/// Runs a worker until a signal, a promotion (it then runs as a manager) or `flotilla leave`.
async fn run_joined_worker(node: &NodeArgs, name: &str, manager: &str) -> anyhow::Result<Next> {
    let dir = pki_dir(&node.data_dir);
    let tls = TlsIdentity::new(NodeCredentials::load(&dir)?)?;
    let api = Client::with_tls(manager, tls.client_config()?)?;
    // Every manager seen last time, so a restart works when the one given here is gone.
    let mut known = vec![manager.to_string()];
    known.extend(read_known_managers(&node.data_dir));
    api.set_managers(&known)
        .with_context(|| format!("{}", node.data_dir.join(MANAGERS_FILE).display()))?;
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
            task_ports: node.task_ports.clone(),
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
            save_admission(&node.data_dir, &pki_dir(&node.data_dir), *response, &key)?;
            Ok(Next::Manager {
                advertise,
                join_via: Some(api.base()),
                cert_validity: None,
                forced: false,
            })
        }
        Some(WorkerChange::Left) => {
            forget_cluster(&node.data_dir)?;
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
    let dir = pki_dir(&node.data_dir);
    let name = tls.identity().node_id.as_str();
    let mut reported: Option<usize> = None;
    let mut complained = false;
    loop {
        tokio::time::sleep(MEMBERSHIP_POLL).await;
        let status: MembershipStatus = match api.get_json("/v1/cluster/membership").await {
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
            match api
                .post_json::<_, RemoveNodeResponse>("/v1/cluster/leave/complete", &())
                .await
            {
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
            match change_role(api, name, Some(advertise)).await {
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

/// A worker's list of manager addresses, one per line, rewritten as the cluster changes.
const MANAGERS_FILE: &str = "managers";

fn read_known_managers(data_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(data_dir.join(MANAGERS_FILE))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Writes the managers file whole and renames it into place: a crash never leaves half a list.
fn save_known_managers(data_dir: &Path, addrs: &[String]) -> anyhow::Result<()> {
    let path = data_dir.join(MANAGERS_FILE);
    let tmp = data_dir.join(format!("{MANAGERS_FILE}.tmp"));
    std::fs::write(&tmp, addrs.join("\n") + "\n")
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

/// Keeps the worker's client pointed at every manager (`GET /v1/cluster/managers`), so its
/// heartbeats, watch and status reports move to another manager when the current one dies,
/// and saves the list for the next start. Failures are retried at the next tick (the client
/// has moved on by then).
async fn follow_managers(api: Client, data_dir: PathBuf, mut stop: watch::Receiver<bool>) {
    let mut saved = read_known_managers(&data_dir);
    loop {
        match api
            .get_json::<Vec<ManagerInfo>>("/v1/cluster/managers")
            .await
        {
            Ok(list) => {
                let mut addrs: Vec<String> = list.into_iter().map(|m| m.addr).collect();
                addrs.sort();
                if let Err(e) = api.set_managers(&addrs) {
                    tracing::warn!(error = %e, "a manager advertises an unusable address");
                } else if addrs != saved && !addrs.is_empty() {
                    match save_known_managers(&data_dir, &addrs) {
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

/// `flotilla token show|rotate ROLE`, against the manager at `--addr`.
pub async fn token(client: &Client, cmd: &TokenCommand) -> anyhow::Result<ExitCode> {
    let (role, tokens): (Role, TokensResponse) = match cmd {
        TokenCommand::Show { role } => {
            ((*role).into(), client.get_json("/v1/cluster/tokens").await?)
        }
        TokenCommand::Rotate { role } => {
            let role: Role = (*role).into();
            let tokens = client
                .post_json(&format!("/v1/cluster/tokens/{role}/rotate"), &())
                .await?;
            println!("rotated the {role} join token; the previous one is refused from now on");
            (role, tokens)
        }
    };
    println!(
        "{}",
        match role {
            Role::Worker => tokens.worker,
            Role::Manager => tokens.manager,
        }
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct RoleChangeArgs {
    /// The nodes to promote or demote (names, as `flotilla node ls` shows them).
    #[arg(required = true)]
    pub nodes: Vec<String>,
    /// Return once the change is recorded, without waiting for the node to carry it out.
    #[arg(long)]
    pub detach: bool,
    /// Give up waiting for a node after this long (the change still happens when it can).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `flotilla node promote|demote NODE...`: records the change, then waits until the node has
/// carried it out (a voter in raft, or a ready worker).
pub async fn node_role(
    client: &Client,
    args: &RoleChangeArgs,
    role: Role,
) -> anyhow::Result<ExitCode> {
    let verb = match role {
        Role::Manager => "promote",
        Role::Worker => "demote",
    };
    for node in &args.nodes {
        let changed: RoleChangeResponse = client
            .post_json(&format!("/v1/nodes/{node}/{verb}"), &())
            .await
            .with_context(|| format!("{verb} {node}"))?;
        if changed.unchanged {
            println!("node {node} is already a {role}");
            continue;
        }
        for warning in &changed.warnings {
            eprintln!("warning: {warning}");
        }
        println!("node {node}: {verb}d to {role}");
        if args.detach {
            continue;
        }
        let deadline = Instant::now() + args.timeout;
        loop {
            match role_carried_out(client, node, role).await {
                Ok(true) => break,
                Ok(false) => {}
                // The manager asked was the one demoted: its local API is gone with it.
                Err(e) if role == Role::Worker && e.code().is_none() => {
                    println!(
                        "node {node}: the manager answering this CLI was the one demoted and \
                         stopped serving; follow it on another manager (`flotilla node ls`)"
                    );
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "waiting for the node"),
            }
            if Instant::now() > deadline {
                bail!(
                    "node {node} has not become a {role} after {}: is it up (`flotilla node ls`)? \
                     It carries the change out once it is; see its log",
                    humantime::format_duration(args.timeout)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        println!("node {node} is a {role} now");
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether `node` holds `role` now: a raft voter, or a ready worker out of raft.
async fn role_carried_out(
    client: &Client,
    node: &str,
    role: Role,
) -> Result<bool, flotilla_client::ClientError> {
    let managers: Vec<ManagerInfo> = client.get_json("/v1/cluster/managers").await?;
    let voting = managers
        .iter()
        .any(|m| m.voter && m.node.as_deref() == Some(node));
    Ok(match role {
        Role::Manager => voting,
        Role::Worker => {
            let n = client.node(node).await?;
            !voting
                && n.role == flotilla_types::NodeRole::Worker
                && n.state == flotilla_types::NodeState::Ready
        }
    })
}

#[derive(Debug, Args)]
pub struct LeaveArgs {
    /// The data dir of the node that leaves (a node running on this machine).
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value_os_t = node_dir::default_data_dir())]
    pub data_dir: PathBuf,
    /// Managers: leave even if the managers left lose quorum; the last manager leaves too,
    /// dissolving the cluster. Everyone: stop the node's tasks now instead of waiting for a
    /// zero-downtime drain.
    #[arg(long)]
    pub force: bool,
    /// Give up waiting after this long (the node keeps leaving on its own).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `flotilla leave`, run on the node: asks the managers to let it leave (a manager through its
/// local API, a worker with its own certificate), then waits until the node's process, which
/// drains, asks for its removal and exits, is gone.
pub async fn leave(local: &Client, args: &LeaveArgs) -> anyhow::Result<ExitCode> {
    let dir = pki_dir(&args.data_dir);
    if !NodeCredentials::exists(&dir) {
        bail!(
            "{} holds no cluster certificate: no node of a cluster uses --data-dir {}",
            dir.display(),
            args.data_dir.display()
        );
    }
    let running = || node_dir::lock(&args.data_dir).is_err();
    if !running() {
        bail!(
            "no flotilla node is running on --data-dir {}: start it again (the same `flotilla \
             init` or `join` command) so it can drain and leave, or remove it from a manager \
             with `flotilla node rm NODE`",
            args.data_dir.display()
        );
    }
    let creds = NodeCredentials::load(&dir)?;
    let me = creds.identity()?;
    let client = match me.role {
        // A manager's CLI has its loopback API (--addr).
        Role::Manager => local.clone(),
        Role::Worker => {
            let known = read_known_managers(&args.data_dir);
            let first = known.first().ok_or_else(|| {
                anyhow!(
                    "{} lists no managers",
                    args.data_dir.join(MANAGERS_FILE).display()
                )
            })?;
            let client = Client::with_tls(first, TlsIdentity::new(creds)?.client_config()?)?;
            client.set_managers(&known)?;
            client
        }
    };
    let request = LeaveRequest {
        node: Some(me.node_id.clone()),
        force: args.force,
    };
    // The saved list may name managers that are gone; the client moves past those.
    let mut attempts = client.managers().len();
    let left: LeaveResponse = loop {
        attempts -= 1;
        match client.post_json("/v1/cluster/leave", &request).await {
            Err(flotilla_client::ClientError::Connect { .. }) if attempts > 0 => continue,
            done => break done.context("asking the managers to let this node leave")?,
        }
    };
    for warning in &left.warnings {
        eprintln!("warning: {warning}");
    }
    let node = &left.node;
    if left.was_manager {
        println!("{node}: demoted (it left the raft voters)");
    }
    println!(
        "{node}: {}; it leaves once it runs nothing",
        if args.force {
            "stopping its tasks"
        } else {
            "draining (each task moves once its replacement is ready)"
        }
    );
    let deadline = Instant::now() + args.timeout;
    while running() {
        if Instant::now() > deadline {
            bail!(
                "{node} is still leaving after {}: its tasks may have nowhere to go (see \
                 `flotilla ps` and `flotilla events` on a manager). It leaves on its own once \
                 they have moved; `flotilla leave --force` stops them now",
                humantime::format_duration(args.timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if NodeCredentials::exists(&dir) {
        bail!("the node stopped before it had left (stopped by hand?); start it again and rerun `flotilla leave`");
    }
    println!("{node} left the cluster; its certificate is revoked");
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Where a CA root rotation stands.
    Status,
    /// Rotate the CA root: the new root is trusted next to the old one, every node renews onto
    /// it, then the old root is dropped. Join tokens change (they name the root).
    Rotate {
        /// Give up waiting after this long (rerun to carry on where it stands).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn print_rotation(status: &flotilla_pki::wire::CaRotationStatus) {
    let phase = match status.phase.as_deref() {
        Some("trust") => "step 1/2: every node is to trust the new root (the old one signs)",
        Some("sign") => "step 2/2: the new root signs; every node is to renew onto it",
        Some(other) => other,
        None => "no rotation under way",
    };
    println!(
        "CA root {} ({} trusted); {phase}{}",
        &status.signing_root[..status.signing_root.len().min(16)],
        status.trusted_roots,
        if status.waiting_for.is_empty() {
            String::new()
        } else {
            format!("; waiting for {}", status.waiting_for.join(", "))
        }
    );
}

/// `flotilla ca status|rotate`.
pub async fn ca(client: &Client, cmd: &CaCommand) -> anyhow::Result<ExitCode> {
    use flotilla_pki::wire::CaRotationStatus;
    match cmd {
        CaCommand::Status => {
            print_rotation(
                &client
                    .get_json::<CaRotationStatus>("/v1/cluster/ca/status")
                    .await?,
            );
        }
        CaCommand::Rotate { timeout } => {
            let deadline = Instant::now() + *timeout;
            let mut last: Option<(Option<String>, Vec<String>)> = None;
            loop {
                let status: CaRotationStatus =
                    client.post_json("/v1/cluster/ca/rotate", &()).await?;
                if status.completed {
                    print_rotation(&status);
                    println!("rotation completed; the old root is no longer trusted");
                    let tokens: TokensResponse = client.get_json("/v1/cluster/tokens").await?;
                    println!("new worker join token:  {}", tokens.worker);
                    println!("new manager join token: {}", tokens.manager);
                    break;
                }
                let now = (status.phase.clone(), status.waiting_for.clone());
                if last.as_ref() != Some(&now) {
                    print_rotation(&status);
                    last = Some(now);
                }
                if Instant::now() > deadline {
                    bail!(
                        "the rotation is still waiting for {} after {} (down nodes renew once \
                         back; remove those that will not come back with `flotilla node rm`). \
                         Run `flotilla ca rotate` again to carry on",
                        status.waiting_for.join(", "),
                        humantime::format_duration(*timeout)
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
