//! Command-line definitions and dispatch.

use crate::output::Format;
use crate::{
    agent_cmd, bench, cluster_admin, cluster_args, deploy, docker_cmd, listing, load, mesh_cmd,
    node_daemon, nodes_cmd, rollout_cmd, up,
};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use flotilla_client::{Client, ADDR_ENV, DEFAULT_ADDR, DEFAULT_SOCKET, SOCKET_ENV, TOKEN_ENV};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Flotilla: a container orchestrator with zero-downtime releases"
)]
pub struct Cli {
    /// API address of a manager: http://HOST:PORT (with --token), or unix:///PATH for its
    /// socket. Without it (and FLOTILLA_SOCKET): /run/flotilla/flotilla.sock if it exists,
    /// else http://127.0.0.1:7450.
    #[arg(long, global = true, env = ADDR_ENV)]
    pub addr: Option<String>,
    /// The manager's Unix socket, used when --addr is not given.
    #[arg(long = "api-socket", global = true, env = SOCKET_ENV)]
    pub api_socket: Option<PathBuf>,
    /// Bearer token for the API over TCP (a manager's DATA_DIR/api-token).
    #[arg(long, global = true, env = TOKEN_ENV, hide_env_values = true)]
    pub token: Option<String>,
    /// More logging (-v info, -vv debug). FLOTILLA_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a single-node cluster (manager + agent) in the foreground.
    Up(up::UpArgs),
    /// Start a secure cluster: this node becomes its first manager (mTLS on --listen-addr).
    Init(cluster_args::InitArgs),
    /// Join a cluster as a worker or manager, depending on the token.
    Join(cluster_args::JoinArgs),
    /// Take the node running on this machine out of its cluster: drain, demote a manager
    /// first, then remove it (its certificate is revoked) and stop it.
    Leave(cluster_args::LeaveArgs),
    /// Show or rotate the join tokens.
    #[command(subcommand)]
    Token(cluster_args::TokenCommand),
    /// The cluster CA: rotate its root, or show a rotation's progress.
    #[command(subcommand)]
    Ca(cluster_args::CaCommand),
    /// Back up the store of a running manager, or restore a backup into a stopped node.
    #[command(subcommand)]
    Snapshot(crate::snapshot_cmd::SnapshotCommand),
    /// Run a worker node: only the agent, following a manager (--manager URL).
    Agent(agent_cmd::AgentArgs),
    /// Deploy a Compose file and wait until it has converged.
    Deploy(deploy::DeployArgs),
    /// Manage services.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Follow or steer a service's release: status, pause, resume, promote, abort.
    #[command(subcommand)]
    Rollout(rollout_cmd::RolloutCommand),
    /// Return a service to an earlier revision (a new revision, released with its strategy).
    Rollback(rollout_cmd::RollbackArgs),
    /// List tasks (of one service, or all).
    Ps(listing::PsArgs),
    /// Manage tasks.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Set replica counts: `flotilla scale web=5 api=2`.
    Scale(ScaleArgs),
    /// Print a task's output, or every live task's of a service.
    Logs(listing::LogsArgs),
    /// Print cluster events.
    Events(listing::EventsArgs),
    /// Manage nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The demo HTTP app used by the README, examples and tests.
    DemoApp(DemoAppArgs),
    /// Build the local image flotilla-demo:latest (busybox + this binary) on the Docker Engine.
    DemoImage(docker_cmd::DemoImageArgs),
    /// Cpu and memory use of a service's running tasks.
    Top(docker_cmd::TopArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Per-task supervisor (started by the agent).
    #[command(hide = true)]
    Shim(RawArgs),
    /// Cgroup-joining exec trampoline (started by the shim).
    #[command(hide = true, name = "shim-exec")]
    ShimExec(RawArgs),
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// List services with their task counts.
    Ls(OutputArgs),
    /// Show a service's spec, revision and tasks.
    Inspect {
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Remove a service; its tasks are stopped.
    Rm { names: Vec<String> },
    /// Change the cpu/memory limits of a service's running tasks in place (no restart).
    UpdateResources(docker_cmd::UpdateResourcesArgs),
    /// Replace every task with a fresh one of the same revision, rolling and drained.
    Restart(rollout_cmd::RestartArgs),
    /// List a service's revisions.
    History {
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Set the mesh weights of several tasks in one step: `flotilla service weights web web.1=0 web.2=100`.
    Weights(mesh_cmd::ServiceWeightsArgs),
    /// Per-task mesh traffic over all nodes: weight, in-flight, requests, errors, latency, breakers.
    Traffic {
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Set a task's share of mesh traffic (0 drains it, 100 is the default).
    Weight(mesh_cmd::WeightArgs),
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List nodes.
    Ls(OutputArgs),
    /// Show one node: addresses, resources, labels, and published ports its mesh cannot serve.
    Inspect {
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Change a node's availability (active, pause, drain) or labels.
    Update(nodes_cmd::UpdateArgs),
    /// Drain a node, wait until it runs nothing, let it be upgraded, then re-activate it.
    Maintain(nodes_cmd::MaintainArgs),
    /// Remove a node from the cluster and revoke its certificate (a manager also leaves raft).
    Rm(cluster_args::RmArgs),
    /// Make workers managers, in place (they join raft; use 1, 3, 5 or 7 managers).
    Promote(cluster_args::RoleChangeArgs),
    /// Make managers workers, in place (they leave raft and keep their tasks).
    Demote(cluster_args::RoleChangeArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Pure placement throughput of the scheduler on a synthetic cluster.
    Scheduler(bench::BenchSchedulerArgs),
    /// API + store + controllers + scheduler driven by hollow (simulated) nodes.
    ControlPlane(bench::BenchControlPlaneArgs),
    /// The routing mesh against a direct connection (or, with --serve, a mesh for other tools).
    Mesh(mesh_cmd::BenchMeshArgs),
    /// Constant-rate HTTP load: successes, failures by kind, latency percentiles.
    Load(load::LoadArgs),
    /// Latency of sequential API writes against the manager at --addr (p50/p90/p99).
    ApiWrites(bench::BenchApiWritesArgs),
}

#[derive(Debug, Args, Clone, Copy)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// SERVICE=REPLICAS pairs.
    #[arg(required = true, value_parser = parse_scale)]
    pub targets: Vec<(String, u64)>,
    /// Return once the change is accepted, without waiting for convergence.
    #[arg(short, long)]
    pub detach: bool,
    /// Give up waiting after this long (e.g. 90s, 5m).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

fn parse_scale(s: &str) -> Result<(String, u64), String> {
    let (name, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected SERVICE=REPLICAS, e.g. web=3"))?;
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: replicas {n:?} is not a non-negative whole number"))?;
    if name.is_empty() {
        return Err(format!("{s:?}: the service name is empty"));
    }
    Ok((name.to_string(), n))
}

#[derive(Debug, Args)]
pub struct DemoAppArgs {
    /// What `GET /` reports as the version.
    #[arg(long = "version", default_value = "v1")]
    pub app_version: String,
    /// Make `/health` answer 503.
    #[arg(long)]
    pub fail_health: bool,
    /// Fraction of `GET /` requests answered 500 (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Delay every `GET /` response by this many milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency: u64,
    /// Exit with code 3 after this many seconds (simulated crash).
    #[arg(long)]
    pub exit_after: Option<f64>,
    /// Allocate and hold this many MiB (for memory-limit tests).
    #[arg(long, default_value_t = 0)]
    pub alloc_mb: u64,
    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: std::net::IpAddr,
}

/// Arguments passed through untouched to the shim or trampoline, which parse them themselves
/// (they run before any runtime exists and must stay small).
#[derive(Debug, Args)]
pub struct RawArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run_shim(raw: &RawArgs) -> ExitCode {
    let result =
        flotilla_agent::shim::ShimArgs::parse(&raw.args).and_then(flotilla_agent::shim::run_shim);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flotilla shim: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn run_shim_exec(_raw: &RawArgs) -> ExitCode {
    use flotilla_agent::trampoline::{
        run_exec_trampoline, ExecTrampolineArgs, EXEC_FAILED_STATUS, EXEC_SUBCOMMAND,
    };
    // clap swallows a leading `--`, which is the trampoline's first argument when no cgroup or
    // user flags precede it (a host where cgroups are read-only, e.g. inside a container), so
    // parse the raw arguments after the subcommand instead.
    let args: Vec<String> = std::env::args()
        .skip_while(|a| a != EXEC_SUBCOMMAND)
        .skip(1)
        .collect();
    let err = match ExecTrampolineArgs::parse(&args) {
        Ok(args) => run_exec_trampoline(args),
        Err(e) => e,
    };
    eprintln!("flotilla shim-exec: {err}");
    ExitCode::from(u8::try_from(EXEC_FAILED_STATUS).unwrap_or(127))
}

/// The API client for the global flags.
pub fn client(cli: &Cli) -> anyhow::Result<Client> {
    let addr = api_address(
        cli.addr.as_deref(),
        cli.api_socket.as_deref(),
        Path::new(DEFAULT_SOCKET),
    );
    Client::new(&addr, cli.token.clone()).with_context(|| format!("invalid --addr {addr}"))
}

/// Where the CLI reaches a manager, like Docker: `--addr`/FLOTILLA_ADDR if given, else the
/// socket named by `--api-socket`/FLOTILLA_SOCKET, else `default_socket` if it exists, else
/// the default TCP address.
fn api_address(addr: Option<&str>, socket: Option<&Path>, default_socket: &Path) -> String {
    if let Some(addr) = addr.filter(|a| !a.trim().is_empty()) {
        return addr.to_string();
    }
    match socket {
        Some(path) => format!("{}{}", flotilla_client::UNIX_SCHEME, path.display()),
        None if default_socket.exists() => {
            format!(
                "{}{}",
                flotilla_client::UNIX_SCHEME,
                default_socket.display()
            )
        }
        None => DEFAULT_ADDR.to_string(),
    }
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Agent(args) => agent_cmd::run(args, cli.token.clone()).await,
        Command::Init(args) => node_daemon::init(args).await,
        Command::Join(args) => node_daemon::join(args).await,
        Command::Leave(args) => cluster_admin::leave(&client(&cli)?, args).await,
        Command::Snapshot(cmd) => crate::snapshot_cmd::run(&client(&cli)?, cmd).await,
        Command::Token(cmd) => cluster_admin::token(&client(&cli)?, cmd).await,
        Command::Ca(cmd) => cluster_admin::ca(&client(&cli)?, cmd).await,
        Command::Deploy(args) => deploy::run(&cli, args).await,
        Command::Service(ServiceCommand::Ls(out)) => {
            listing::service_ls(&client(&cli)?, *out).await
        }
        Command::Service(ServiceCommand::Inspect { name, out }) => {
            listing::service_inspect(&client(&cli)?, name, *out).await
        }
        Command::Service(ServiceCommand::Rm { names }) => {
            if names.is_empty() {
                bail!("service rm needs at least one service name");
            }
            let c = client(&cli)?;
            for n in names {
                c.remove_service(n).await?;
                println!("{n}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Service(ServiceCommand::History { name, out }) => {
            listing::service_history(&client(&cli)?, name, *out).await
        }
        Command::Service(ServiceCommand::Weights(args)) => {
            mesh_cmd::service_weights(&client(&cli)?, args).await
        }
        Command::Service(ServiceCommand::Traffic { name, out }) => {
            mesh_cmd::service_traffic(&client(&cli)?, name, out.format).await
        }
        Command::Task(TaskCommand::Weight(args)) => {
            mesh_cmd::task_weight(&client(&cli)?, args).await
        }
        Command::Ps(args) => listing::ps(&client(&cli)?, args).await,
        Command::Scale(args) => deploy::scale(&client(&cli)?, args).await,
        Command::Logs(args) => listing::logs(&client(&cli)?, args).await,
        Command::Events(args) => listing::events(&client(&cli)?, args).await,
        Command::Node(NodeCommand::Ls(out)) => listing::node_ls(&client(&cli)?, *out).await,
        Command::Node(NodeCommand::Inspect { id, out }) => {
            listing::node_inspect(&client(&cli)?, id, *out).await
        }
        Command::Node(NodeCommand::Update(args)) => nodes_cmd::update(&client(&cli)?, args).await,
        Command::Node(NodeCommand::Maintain(args)) => {
            nodes_cmd::maintain(&client(&cli)?, args).await
        }
        Command::Node(NodeCommand::Rm(args)) => cluster_admin::node_rm(&client(&cli)?, args).await,
        Command::Node(NodeCommand::Promote(args)) => {
            cluster_admin::node_role(&client(&cli)?, args, flotilla_pki::Role::Manager).await
        }
        Command::Node(NodeCommand::Demote(args)) => {
            cluster_admin::node_role(&client(&cli)?, args, flotilla_pki::Role::Worker).await
        }
        Command::DemoApp(args) => demo_app(args).await,
        Command::DemoImage(args) => docker_cmd::demo_image(args).await,
        Command::Top(args) => docker_cmd::top(&client(&cli)?, args).await,
        Command::Service(ServiceCommand::UpdateResources(args)) => {
            docker_cmd::update_resources(&client(&cli)?, args).await
        }
        Command::Bench(BenchCommand::Scheduler(args)) => bench::scheduler(args),
        Command::Bench(BenchCommand::ControlPlane(args)) => bench::control_plane(args).await,
        Command::Bench(BenchCommand::Mesh(args)) => mesh_cmd::bench(args).await,
        Command::Bench(BenchCommand::Load(args)) => load::run(args).await,
        Command::Bench(BenchCommand::ApiWrites(args)) => {
            bench::api_writes(&client(&cli)?, args).await
        }
        Command::Rollout(cmd) => rollout_cmd::rollout(&client(&cli)?, cmd).await,
        Command::Rollback(args) => rollout_cmd::rollback(&client(&cli)?, args).await,
        Command::Service(ServiceCommand::Restart(args)) => {
            rollout_cmd::restart(&client(&cli)?, args).await
        }
        Command::Shim(_) | Command::ShimExec(_) => unreachable_subcommand(),
    }
}

/// `main` handles these before a runtime exists.
fn unreachable_subcommand() -> anyhow::Result<ExitCode> {
    bail!("internal: shim subcommands are handled before dispatch")
}

async fn demo_app(args: &DemoAppArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..=1.0).contains(&args.error_rate) {
        bail!("--error-rate {} must be between 0 and 1", args.error_rate);
    }
    let exit_after = match args.exit_after {
        Some(s) if !(s.is_finite() && s >= 0.0) => {
            bail!("--exit-after {s} must be a non-negative number of seconds")
        }
        Some(s) => Some(std::time::Duration::from_secs_f64(s)),
        None => None,
    };
    let cfg = flotilla_demo::DemoConfig {
        port: args.port,
        version: args.app_version.clone(),
        task_id: std::env::var("FLOTILLA_TASK_ID").unwrap_or_else(|_| "local".into()),
        fail_health: args.fail_health,
        error_rate: args.error_rate,
        latency: std::time::Duration::from_millis(args.latency),
        exit_after,
        alloc_mb: args.alloc_mb,
    };
    flotilla_demo::run_on(args.bind, cfg).await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_prefers_addr_then_the_socket_then_tcp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let present = dir.path().join("flotilla.sock");
        std::fs::write(&present, "").expect("a stand-in socket");
        let absent = dir.path().join("none.sock");
        let given = Path::new("/x/given.sock");
        assert_eq!(
            api_address(Some("http://h:1"), Some(given), &present),
            "http://h:1"
        );
        assert_eq!(
            api_address(None, Some(given), &present),
            "unix:///x/given.sock"
        );
        assert_eq!(
            api_address(None, None, &present),
            format!("unix://{}", present.display())
        );
        assert_eq!(api_address(None, None, &absent), DEFAULT_ADDR);
    }
}
