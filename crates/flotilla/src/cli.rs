//! Command-line definitions and dispatch.

use crate::output::Format;
use crate::{deploy, listing, up};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use flotilla_client::{Client, ADDR_ENV, DEFAULT_ADDR, TOKEN_ENV};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Flotilla: a container orchestrator with zero-downtime releases"
)]
pub struct Cli {
    /// API address of a manager (http://HOST:PORT).
    #[arg(long, global = true, env = ADDR_ENV, default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// Bearer token for a non-loopback API.
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
    /// Deploy a Compose file and wait until it has converged.
    Deploy(deploy::DeployArgs),
    /// Manage services.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// List tasks (of one service, or all).
    Ps(listing::PsArgs),
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
    /// List a service's revisions.
    History {
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List nodes.
    Ls(OutputArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Pure placement throughput of the scheduler on a synthetic cluster.
    Scheduler(BenchSchedulerArgs),
}

#[derive(Debug, Args)]
pub struct BenchSchedulerArgs {
    #[arg(long, default_value_t = 10_000)]
    pub nodes: usize,
    #[arg(long, default_value_t = 1_000_000)]
    pub tasks: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
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

pub fn run_shim_exec(raw: &RawArgs) -> ExitCode {
    use flotilla_agent::trampoline::{run_exec_trampoline, ExecTrampolineArgs, EXEC_FAILED_STATUS};
    let err = match ExecTrampolineArgs::parse(&raw.args) {
        Ok(args) => run_exec_trampoline(args),
        Err(e) => e,
    };
    eprintln!("flotilla shim-exec: {err}");
    ExitCode::from(u8::try_from(EXEC_FAILED_STATUS).unwrap_or(127))
}

/// The API client for the global flags.
pub fn client(cli: &Cli) -> anyhow::Result<Client> {
    Client::new(&cli.addr, cli.token.clone()).context("invalid --addr")
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Up(args) => up::run(args).await,
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
        Command::Ps(args) => listing::ps(&client(&cli)?, args).await,
        Command::Scale(args) => {
            let c = client(&cli)?;
            for (name, n) in &args.targets {
                c.scale(name, *n).await?;
                println!("{name} scaled to {n}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs(args) => listing::logs(&client(&cli)?, args).await,
        Command::Events(args) => listing::events(&client(&cli)?, args).await,
        Command::Node(NodeCommand::Ls(out)) => listing::node_ls(&client(&cli)?, *out).await,
        Command::DemoApp(args) => demo_app(args).await,
        Command::Bench(BenchCommand::Scheduler(args)) => bench_scheduler(args),
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
    flotilla_demo::run(cfg).await?;
    Ok(ExitCode::SUCCESS)
}

fn bench_scheduler(args: &BenchSchedulerArgs) -> anyhow::Result<ExitCode> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let report = flotilla_scheduler::bench::run(&flotilla_scheduler::bench::BenchConfig {
        nodes: args.nodes,
        tasks: args.tasks,
        seed: args.seed,
    });
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}
