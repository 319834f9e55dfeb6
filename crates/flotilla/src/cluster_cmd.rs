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
    AddManagerRequest, CaResponse, JoinRequest, JoinResponse, ManagerInfo, RemoveNodeResponse,
    RenewRequest, RenewResponse, TokensResponse,
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
use std::time::Duration;
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
    /// Range host ports for task ports are taken from (START-END, end exclusive).
    #[arg(long, default_value = "20000-32000", value_parser = node_dir::parse_port_range)]
    pub task_ports: std::ops::Range<u16>,
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
    run_manager(
        node,
        &name,
        advertise,
        None,
        fresh.then_some(args.cert_validity),
    )
    .await
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

/// Runs a manager (store, mTLS API, loopback API, controllers, local agent) until a signal.
/// `join_via`: the manager to ask for a vote once this one serves (a manager joining).
/// `cert_validity`: set by a fresh `init`; otherwise the cluster's (store) value applies.
async fn run_manager(
    node: &NodeArgs,
    name: &str,
    advertise: SocketAddr,
    join_via: Option<&str>,
    cert_validity: Option<Duration>,
) -> anyhow::Result<ExitCode> {
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
    if join_via.is_none() && raft_id == 1 {
        store
            .bootstrap_single()
            .await
            .context("starting the raft group")?;
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
    crate::up::wait_for_signal().await;
    println!("shutting down; tasks keep running");
    let _ = stop_tx.send(true);
    let _ = renewal.await;
    let _ = worker.await;
    let _ = controllers.await;
    let _ = cluster_api.await;
    let _ = local_api.await;
    store.shutdown().await.context("stopping the store")?;
    Ok(ExitCode::SUCCESS)
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
    match creds.identity()?.role {
        Role::Manager => {
            let advertise = advertise(node)?;
            run_manager(
                node,
                &name,
                advertise,
                joined_now.then_some(args.manager.as_str()),
                None,
            )
            .await
        }
        Role::Worker => run_joined_worker(node, &name, &args.manager, creds, dir).await,
    }
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
        write_raft_id(&args.node.data_dir, raft_id)?;
    }
    NodeCredentials {
        cert_pem: response.cert_pem,
        key_pem: key.key_pem(),
        trust_pem: response.trust_pem,
    }
    .save(dir)?;
    println!("joined as {} {name}", response.role);
    Ok(())
}

async fn run_joined_worker(
    node: &NodeArgs,
    name: &str,
    manager: &str,
    creds: NodeCredentials,
    dir: PathBuf,
) -> anyhow::Result<ExitCode> {
    let tls = TlsIdentity::new(creds)?;
    let api = Client::with_tls(manager, tls.client_config()?)?;
    // Every manager seen last time, so a restart works when the one given here is gone.
    let mut known = vec![manager.to_string()];
    known.extend(read_known_managers(&node.data_dir));
    api.set_managers(&known)
        .with_context(|| format!("{}", node.data_dir.join(MANAGERS_FILE).display()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(follow_managers(
        api.clone(),
        node.data_dir.clone(),
        stop_rx.clone(),
    ));
    // Ends with the process; a renewal cut short leaves the old, still valid, files in place.
    tokio::spawn(renew_loop(tls.clone(), api.clone(), dir, stop_rx.clone()));
    let worker = tokio::spawn(run_worker(
        WorkerConfig {
            node_name: name.to_string(),
            data_dir: node.data_dir.clone(),
            api,
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
    crate::agent_cmd::serve_until_signal(worker, stop_tx).await
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

/// Keeps the worker's client pointed at every manager (`GET /v1/cluster/managers`), so its
/// heartbeats, watch and status reports move to another manager when the current one dies,
/// and saves the list for the next start. Failures are retried at the next tick (the client
/// has moved on by then).
async fn follow_managers(api: Client, data_dir: PathBuf, mut stop: watch::Receiver<bool>) {
    let path = data_dir.join(MANAGERS_FILE);
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
                    // Written whole and renamed: a crash never leaves half a list.
                    let tmp = data_dir.join(format!("{MANAGERS_FILE}.tmp"));
                    let written = std::fs::write(&tmp, addrs.join("\n") + "\n")
                        .and_then(|()| std::fs::rename(&tmp, &path));
                    match written {
                        Ok(()) => saved = addrs,
                        Err(e) => {
                            tracing::warn!(error = %e, path = %path.display(), "saving the managers")
                        }
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
