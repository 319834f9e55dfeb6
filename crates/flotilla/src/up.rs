//! `flotilla up`: one process running a manager (store, API, controllers) and an agent.

use anyhow::{bail, Context};
use clap::Args;
use flotilla_agent::agent::{Agent, AgentConfig};
use flotilla_api::AppState;
use flotilla_client::Client;
use flotilla_controllers::{ControllerConfig, ControllerRunner};
use flotilla_store::{Store, StoreConfig};
use flotilla_types::api::DeployRequest;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::watch;

/// The demo stack `--demo` deploys; the same file as examples/demo/compose.yaml.
const DEMO_COMPOSE: &str = include_str!("../../../examples/demo/compose.yaml");

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the store, task state and logs live.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Address the API listens on. Non-loopback clients must present the token in DATA_DIR/api-token.
    #[arg(long, default_value = "127.0.0.1:7450")]
    pub api_addr: SocketAddr,
    /// Deploy the demo app (3 replicas of `flotilla demo-app`) and print where to reach it.
    #[arg(long)]
    pub demo: bool,
    /// This node's name (default: the host name; remembered in DATA_DIR/node-id).
    #[arg(long)]
    pub node_name: Option<String>,
    /// A node silent for this long is marked down and its tasks replaced.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub node_grace: Duration,
    /// Range host ports for task ports are taken from (START-END, end exclusive).
    #[arg(long, default_value = "20000-32000", value_parser = parse_port_range)]
    pub task_ports: std::ops::Range<u16>,
}

fn parse_port_range(s: &str) -> Result<std::ops::Range<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected START-END, e.g. 20000-32000"))?;
    let start: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: start {a:?} is not a port number"))?;
    let end: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: end {b:?} is not a port number"))?;
    if start == 0 || start >= end {
        return Err(format!("{s:?}: need 0 < START < END"));
    }
    Ok(start..end)
}

fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/var/lib/flotilla")
    } else {
        std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".local/share/flotilla"))
            .unwrap_or_else(|| PathBuf::from("flotilla-data"))
    }
}

/// Reads a small identity file, creating it with `make()` the first time.
fn load_or_create(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) | Err(_) => {
            let v = make();
            std::fs::write(path, format!("{v}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(v)
        }
    }
}

fn sanitize_node_name(raw: &str) -> String {
    let s: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let s = s.trim_matches('-').to_string();
    if s.is_empty() {
        "node-1".into()
    } else {
        s
    }
}

pub async fn run(args: &UpArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("--data-dir {}: cannot create", args.data_dir.display()))?;
    // One `up` per data dir: a second one would fight over the store and the tasks.
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(args.data_dir.join("lock"))
        .context("opening the data-dir lock")?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| {
            anyhow::anyhow!(
                "--data-dir {}: another flotilla is using it ({e})",
                args.data_dir.display()
            )
        })?;

    let node_name = match &args.node_name {
        Some(n) => {
            flotilla_types::validate_name(n).map_err(|r| anyhow::anyhow!("--node-name: {r}"))?;
            n.clone()
        }
        None => load_or_create(&args.data_dir.join("node-id"), || {
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default();
            sanitize_node_name(&host)
        })?,
    };
    let token = load_or_create(&args.data_dir.join("api-token"), || {
        format!("{:032x}", rand::random::<u128>())
    })?;

    let listener = tokio::net::TcpListener::bind(args.api_addr)
        .await
        .with_context(|| format!("--api-addr {}: cannot listen", args.api_addr))?;
    let api_addr = listener.local_addr()?;

    let store = Store::open(StoreConfig {
        data_dir: args.data_dir.join("store"),
        node_id: 1,
        advertise_addr: api_addr.to_string(),
    })
    .await
    .context("opening the store")?;
    store
        .bootstrap_single()
        .await
        .context("starting the raft group")?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let api = tokio::spawn(flotilla_api::serve(
        listener,
        AppState::new(store.clone(), Some(token)),
        {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        },
    ));
    let controllers = tokio::spawn(
        ControllerRunner::new(
            store.clone(),
            ControllerConfig {
                node_grace: args.node_grace,
                ..ControllerConfig::default()
            },
        )
        .run(stop_rx.clone()),
    );
    let api_url = format!("http://{api_addr}");
    let agent = Agent::new(AgentConfig {
        node_id: node_name.clone(),
        api: Client::new(&api_url, None)?,
        state_dir: args.data_dir.join("agent"),
        heartbeat: (args.node_grace / 4).max(Duration::from_millis(250)),
        task_ports: args.task_ports.clone(),
    })
    .await
    .context("starting the agent")?;
    let agent = tokio::spawn(agent.run(stop_rx.clone()));

    println!(
        "flotilla is up: node {node_name}, API {api_url}, data in {}",
        args.data_dir.display()
    );
    if args.demo {
        if let Err(e) = deploy_demo(&api_url).await {
            eprintln!("demo deploy failed: {e:#}");
        }
    }

    wait_for_signal().await;
    println!("shutting down; tasks keep running and are re-adopted by the next `flotilla up`");
    let _ = stop_tx.send(true);
    let _ = agent.await;
    let _ = controllers.await;
    let _ = api.await;
    store.shutdown().await.context("stopping the store")?;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
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

async fn deploy_demo(api_url: &str) -> anyhow::Result<()> {
    let compose =
        flotilla_compose::parse_str(DEMO_COMPOSE, "examples/demo/compose.yaml", Path::new("."))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let client = Client::new(api_url, None)?;
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
    // Wait for the replicas to be ready, then say where they answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let detail = client.service("demo").await?;
        if detail.summary.ready >= detail.summary.desired && detail.summary.desired > 0 {
            println!("demo is ready ({} replicas):", detail.summary.ready);
            for t in detail.tasks.iter().filter(|t| {
                t.is_ready() && t.desired_state == flotilla_types::DesiredState::Running
            }) {
                for p in &t.status.ports {
                    println!("  {}  http://127.0.0.1:{}/", t.name(), p.host_port);
                }
            }
            println!("try: flotilla ps demo   |   flotilla scale demo=5");
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the demo did not become ready within 2 minutes; see `flotilla ps demo -a`");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
