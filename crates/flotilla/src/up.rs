//! `flotilla up`: one process running a manager (store, API, controllers) and an agent.

use crate::manager::{ApiSocket, Manager, ManagerConfig};
use crate::node_dir;
use anyhow::{bail, Context};
use clap::Args;
use flotilla_agent::agent::{Agent, AgentConfig};
use flotilla_client::Client;
use flotilla_controllers::ControllerConfig;
use flotilla_types::api::{DeployRequest, ServiceDetail};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The demo stack `--demo` deploys; the same file as examples/demo/compose.yaml.
const DEMO_COMPOSE: &str = include_str!("../../../examples/demo/compose.yaml");

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the store, task state and logs live.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value_os_t = node_dir::default_data_dir())]
    pub data_dir: PathBuf,
    /// Address the TCP API listens on. Every client, loopback included, must present the token
    /// in DATA_DIR/api-token; local administrators use the Unix socket (--socket) instead.
    #[arg(long, default_value = "127.0.0.1:7450")]
    pub api_addr: SocketAddr,
    /// Deploy the demo app (3 replicas of `flotilla demo-app`) and print where to reach it.
    #[arg(long)]
    pub demo: bool,
    /// A node silent for this long is marked down and its tasks replaced. 3s keeps the time
    /// from a worker's death to healthy replacements under 5s (docs/BENCHMARKS.md).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub node_grace: Duration,
    #[command(flatten)]
    pub common: crate::node_flags::NodeFlags,
    #[command(flatten)]
    pub mesh: crate::mesh_cmd::MeshArgs,
}

pub async fn run(args: &UpArgs) -> anyhow::Result<ExitCode> {
    // One `up` per data dir: a second one would fight over the store and the tasks.
    let _lock = node_dir::lock(&args.data_dir)?;
    let node_name = node_dir::node_name(args.common.node_name.as_deref(), &args.data_dir)?;
    let token = node_dir::api_token(&args.data_dir)?;

    let listener = tokio::net::TcpListener::bind(args.api_addr)
        .await
        .with_context(|| format!("--api-addr {}: cannot listen", args.api_addr))?;
    let api_addr = listener.local_addr()?;
    crate::store_guard::check_before_bootstrap(
        &args.data_dir,
        args.common.discard_unknown_workloads,
    )?;

    let manager = Manager::start(ManagerConfig {
        data_dir: args.data_dir.clone(),
        raft_id: 1,
        advertise: api_addr.to_string(),
        local_api: listener,
        token: Some(token.clone()),
        socket: ApiSocket::from_flag(args.common.socket.as_deref()),
        bootstrap: true,
        controllers: ControllerConfig {
            node_grace: args.node_grace,
            task_history_per_slot: args.common.task_history,
            ..ControllerConfig::default()
        },
        local_node: Some(node_name.clone()),
        cluster: None,
        limits: args.common.limits.limits(),
    })
    .await?;
    let stop_rx = manager.stopping();
    let api_url = format!("http://{api_addr}");
    let agent = Agent::new(AgentConfig {
        node_id: node_name.clone(),
        // The in-process agent authenticates like any other client.
        api: Client::new(&api_url, Some(token.clone()))?,
        state_dir: args.data_dir.join("agent"),
        heartbeat: (args.node_grace / 4).max(Duration::from_millis(250)),
        task_ports: node_dir::task_ports(
            args.common.task_ports.clone(),
            &args.data_dir,
            &node_name,
        )?,
        mesh: args.mesh.config(),
        advertise_ip: args.mesh.advertise_ip,
        agent_tls: None,
        discard_unknown_workloads: args.common.discard_unknown_workloads,
    })
    .await
    .context("starting the agent")?;
    let agent = tokio::spawn(agent.run(stop_rx.clone()));

    println!(
        "flotilla is up: node {node_name}, API {api_url}{}, data in {}",
        manager
            .socket
            .as_ref()
            .map(|p| format!(" and unix://{}", p.display()))
            .unwrap_or_default(),
        args.data_dir.display()
    );
    if args.demo {
        if let Err(e) = deploy_demo(&api_url, &token, args.mesh.config().map(|m| m.bind_ip)).await {
            eprintln!("demo deploy failed: {e:#}");
        }
    }

    wait_for_signal().await;
    println!("shutting down; tasks keep running and are re-adopted by the next `flotilla up`");
    manager.signal_stop();
    let _ = agent.await;
    manager.stop().await?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Deploys the demo (unless it exists), waits for its replicas, then prints where it answers:
/// the published URL through this node's mesh first (`mesh`: its bind address, `None` with
/// `--no-mesh`), then each replica's private host port.
async fn deploy_demo(api_url: &str, token: &str, mesh: Option<IpAddr>) -> anyhow::Result<()> {
    let compose =
        flotilla_compose::parse_str(DEMO_COMPOSE, "examples/demo/compose.yaml", Path::new("."))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let client = Client::new(api_url, Some(token.to_string()))?;
    // A restart of `up --demo` leaves an existing demo (perhaps scaled) as it is.
    if client.service("demo").await.is_err() {
        client
            .deploy(&DeployRequest {
                services: compose.services,
                dry_run: false,
                requested_by: "flotilla up --demo".into(),
            })
            .await?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let detail = client.service("demo").await?;
        if detail.summary.ready >= detail.summary.desired && detail.summary.desired > 0 {
            print_demo(&detail, mesh);
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the demo did not become ready within 2 minutes; see `flotilla ps demo -a`");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn print_demo(detail: &ServiceDetail, mesh: Option<IpAddr>) {
    println!("demo is ready ({} replicas):", detail.summary.ready);
    let published = detail
        .service
        .spec
        .ports
        .iter()
        .filter(|p| p.mode.is_ingress())
        .filter_map(|p| p.published);
    match mesh {
        Some(ip) => {
            // A wildcard mesh answers on loopback too.
            let ip = if ip.is_unspecified() {
                IpAddr::from([127, 0, 0, 1])
            } else {
                ip
            };
            for port in published {
                println!(
                    "  http://{}/   (the mesh balances over every replica)",
                    SocketAddr::new(ip, port)
                );
            }
        }
        None => {
            println!("  (no mesh on this node, --no-mesh: the published port is not served here)")
        }
    }
    println!("  each replica on its own host port:");
    for t in detail
        .tasks
        .iter()
        .filter(|t| t.is_ready() && t.desired_state == flotilla_types::DesiredState::Running)
    {
        for p in &t.status.ports {
            println!("    {}  http://127.0.0.1:{}/", t.name(), p.host_port);
        }
    }
    println!("try: flotilla ps demo   |   flotilla scale demo=5");
}
