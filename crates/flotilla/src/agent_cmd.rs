//! `flotilla agent`: a worker node. Runs only the agent, following a manager's API: registers,
//! heartbeats, runs the tasks assigned to this node. Stopping it leaves the workloads running;
//! the next agent on the same data dir re-adopts them.
//!
//! [`run_worker`] is the reusable entry point for anything that runs a worker (a joined node, a
//! test cluster); [`run`] is the command-line wrapper.

use crate::node_dir;
use anyhow::Context;
use clap::Args;
use flotilla_agent::agent::{Agent, AgentConfig};
use flotilla_agent::mesh_node::MeshNodeConfig;
use flotilla_client::Client;
use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// API address of the manager to follow (http://HOST:PORT), or several separated by
    /// commas: the agent moves to the next when one cannot be reached. A non-loopback manager
    /// needs the token (--token / FLOTILLA_TOKEN).
    #[arg(long, env = "FLOTILLA_MANAGER")]
    pub manager: String,
    /// This node's name (default: the host name; remembered in DATA_DIR/node-id).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Where task state and logs live. One agent (or `up`) per data dir.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value_os_t = node_dir::default_data_dir())]
    pub data_dir: PathBuf,
    /// Range host ports for task ports are taken from (START-END, end exclusive). Default: a
    /// 500-port block of 20000-32000 picked by the node's name, remembered in DATA_DIR/task-ports.
    #[arg(long, value_parser = node_dir::parse_port_range)]
    pub task_ports: Option<Range<u16>>,
    /// How often to heartbeat. Keep it well under the managers' --node-grace (default 3s).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// Stop workloads found on this node whose tasks the cluster does not know, even when its
    /// store meets this node for the first time (a new or lost store). Without it they are
    /// left running and reported (docs/OPERATIONS.md, "When things go wrong").
    #[arg(long)]
    pub discard_unknown_workloads: bool,
    #[command(flatten)]
    pub mesh: crate::mesh_cmd::MeshArgs,
}

/// Everything a worker needs.
pub struct WorkerConfig {
    pub node_name: String,
    pub data_dir: PathBuf,
    pub api: Client,
    /// `None`: the node's default block (see [`node_dir::task_ports`]).
    pub task_ports: Option<Range<u16>>,
    pub heartbeat: Duration,
    /// The node's routing mesh; `None` runs none.
    pub mesh: Option<MeshNodeConfig>,
    /// The IP other nodes' meshes reach this node's tasks at.
    pub advertise_ip: Option<std::net::IpAddr>,
    /// Cluster nodes: the mTLS config of the agent server (see `AgentConfig::agent_tls`).
    pub agent_tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// `--discard-unknown-workloads` (see `AgentConfig::discard_unknown_workloads`).
    pub discard_unknown_workloads: bool,
}

/// Runs a worker until `shutdown` turns true. The caller holds the data-dir lock.
pub async fn run_worker(cfg: WorkerConfig, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    if cfg.heartbeat.is_zero() {
        anyhow::bail!("--heartbeat must be longer than 0s");
    }
    let task_ports = node_dir::task_ports(cfg.task_ports, &cfg.data_dir, &cfg.node_name)?;
    let agent = Agent::new(AgentConfig {
        node_id: cfg.node_name,
        api: cfg.api,
        state_dir: cfg.data_dir.join("agent"),
        heartbeat: cfg.heartbeat,
        task_ports,
        mesh: cfg.mesh,
        advertise_ip: cfg.advertise_ip,
        agent_tls: cfg.agent_tls,
        discard_unknown_workloads: cfg.discard_unknown_workloads,
    })
    .await
    .context("starting the agent")?;
    agent.run(shutdown).await;
    Ok(())
}

pub async fn run(args: &AgentArgs, token: Option<String>) -> anyhow::Result<ExitCode> {
    let _lock = node_dir::lock(&args.data_dir)?;
    let node_name = node_dir::node_name(args.node_name.as_deref(), &args.data_dir)?;
    let managers: Vec<String> = args
        .manager
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    let first = managers
        .first()
        .ok_or_else(|| anyhow::anyhow!("--manager: no address given"))?;
    let api = Client::new(first, token).context("--manager")?;
    api.set_managers(&managers).context("--manager")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let worker = tokio::spawn(run_worker(
        WorkerConfig {
            node_name: node_name.clone(),
            data_dir: args.data_dir.clone(),
            api,
            task_ports: args.task_ports.clone(),
            heartbeat: args.heartbeat,
            mesh: args.mesh.config(),
            advertise_ip: args.mesh.advertise_ip,
            // A standalone agent has no node certificate: plain HTTP on loopback.
            agent_tls: None,
            discard_unknown_workloads: args.discard_unknown_workloads,
        },
        stop_rx,
    ));
    println!(
        "flotilla agent: node {node_name}, manager {}, data in {}",
        args.manager,
        args.data_dir.display()
    );
    serve_until_signal(worker, stop_tx).await
}

/// Runs a worker agent until it fails or SIGINT/SIGTERM arrives; then stops it, leaving its
/// workloads running for the next agent to re-adopt.
pub async fn serve_until_signal(
    mut worker: tokio::task::JoinHandle<anyhow::Result<()>>,
    stop_tx: watch::Sender<bool>,
) -> anyhow::Result<ExitCode> {
    tokio::select! {
        result = &mut worker => {
            result.context("the agent crashed")??;
            return Ok(ExitCode::SUCCESS);
        }
        _ = crate::up::wait_for_signal() => {}
    }
    println!("stopping the agent; tasks keep running and are re-adopted by the next agent");
    let _ = stop_tx.send(true);
    worker.await.context("the agent crashed")??;
    Ok(ExitCode::SUCCESS)
}
