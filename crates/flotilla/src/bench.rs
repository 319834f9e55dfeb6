//! `flotilla bench …`: the shipped benchmarks. The control-plane run uses hollow nodes (the
//! `sim` driver), which exist only for benchmarks and scale tests.

use crate::manager::{Manager, ManagerConfig};
use anyhow::{bail, Context};
use clap::Args;
use flotilla_agent::hollow::{FleetProgress, HollowFleet};
use flotilla_api::Limits;
use flotilla_client::Client;
use flotilla_controllers::ControllerConfig;
use flotilla_types::api::DeployRequest;
use flotilla_types::{DesiredState, DriverKind, ServiceMode, ServiceSpec, SpreadSpec, TaskState};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, Args)]
pub struct BenchSchedulerArgs {
    #[arg(long, default_value_t = 10_000)]
    pub nodes: usize,
    #[arg(long, default_value_t = 1_000_000)]
    pub tasks: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub fn scheduler(args: &BenchSchedulerArgs) -> anyhow::Result<ExitCode> {
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

#[derive(Debug, Args)]
pub struct BenchControlPlaneArgs {
    /// Hollow (simulated) nodes to register.
    #[arg(long, default_value_t = 10_000)]
    pub nodes: usize,
    /// Tasks to deploy, spread over `--services` services.
    #[arg(long, default_value_t = 100_000)]
    pub tasks: usize,
    #[arg(long, default_value_t = 100)]
    pub services: usize,
    /// Give up after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Tasks in each phase, read straight from the manager's store.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Phases {
    created: usize,
    placed: usize,
    running: usize,
}

/// The service mix: plain, zone-constrained, and hard zone spread.
fn bench_service(i: usize, replicas: u64) -> ServiceSpec {
    let mut s = ServiceSpec::process(&format!("svc-{i:04}"), vec!["sim".into()]);
    s.driver = DriverKind::Sim;
    s.mode = ServiceMode::Replicated { replicas };
    s.resources.reservations.cpu_millis = Some(10);
    s.resources.reservations.memory_bytes = Some(16 << 20);
    match i % 3 {
        1 => s.placement.constraints = vec!["node.labels.zone!=zone-7".into()],
        2 => {
            s.placement.spread = vec![SpreadSpec {
                label: "zone".into(),
                hard: true,
                max_skew: 1,
            }]
        }
        _ => {}
    }
    s
}

pub async fn control_plane(args: &BenchControlPlaneArgs) -> anyhow::Result<ExitCode> {
    if args.nodes == 0 || args.services == 0 || args.tasks < args.services {
        bail!("need --nodes >= 1, --services >= 1 and --tasks >= --services");
    }
    let dir = tempfile_dir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    // Every API request is authenticated, the benchmark's hollow nodes' too.
    let token = format!("{:032x}", rand::random::<u128>());
    let manager = Manager::start(ManagerConfig {
        data_dir: dir.clone(),
        raft_id: 1,
        advertise: listener.local_addr()?.to_string(),
        local_api: listener,
        token: Some(token.clone()),
        socket: crate::manager::ApiSocket::None,
        bootstrap: true,
        controllers: ControllerConfig {
            // Hollow nodes heartbeat rarely; the bench is about placement and status, not liveness.
            node_grace: Duration::from_secs(3600),
            ..ControllerConfig::default()
        },
        local_node: None,
        cluster: None,
        // Sized to the run, so any `--tasks` is measured rather than refused.
        limits: Limits {
            max_tasks_per_service: (args.tasks as u64).max(Limits::DEFAULT_MAX_TASKS_PER_SERVICE),
            max_tasks: (args.tasks as u64).max(Limits::DEFAULT_MAX_TASKS),
        },
    })
    .await?;
    let client = Client::new(&format!("http://{}", manager.api_addr), Some(token))?;
    let fleet = HollowFleet::new(client.clone(), args.nodes);

    println!(
        "control-plane bench: {} hollow nodes, {} tasks in {} services (sim driver; benchmark only)",
        args.nodes, args.tasks, args.services
    );
    let t0 = Instant::now();
    fleet.register().await.context("registering hollow nodes")?;
    let registered = t0.elapsed();
    println!(
        "registered {} nodes in {:.2}s",
        fleet.node_count(),
        registered.as_secs_f64()
    );

    let (progress_tx, _progress_rx) = watch::channel(FleetProgress::default());
    let stop = manager.stopping();
    let fleet_task = tokio::spawn(async move { fleet.run(progress_tx, stop).await });

    let per = (args.tasks / args.services) as u64;
    let extra = (args.tasks % args.services) as u64;
    let services: Vec<ServiceSpec> = (0..args.services)
        .map(|i| bench_service(i, per + u64::from((i as u64) < extra)))
        .collect();
    let t1 = Instant::now();
    client
        .deploy(&DeployRequest {
            services,
            dry_run: false,
            requested_by: "bench".into(),
        })
        .await?;
    let mut marks: [Option<Duration>; 3] = [None; 3];
    let store = manager.store.clone();
    loop {
        let p = store.read(|s| {
            let mut p = Phases::default();
            for t in s
                .tasks
                .values()
                .filter(|t| t.desired_state == DesiredState::Running)
            {
                p.created += 1;
                if t.node.is_some() {
                    p.placed += 1;
                }
                if t.status.state == TaskState::Running {
                    p.running += 1;
                }
            }
            p
        });
        for (i, n) in [p.created, p.placed, p.running].into_iter().enumerate() {
            if n >= args.tasks && marks[i].is_none() {
                marks[i] = Some(t1.elapsed());
            }
        }
        if marks[2].is_some() {
            break;
        }
        if t1.elapsed() > args.timeout {
            bail!("not all running within {:?}: {p:?}", args.timeout);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fmt =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2}s", d.as_secs_f64()));
    let total = marks[2].unwrap_or_default();
    println!(
        "deploy -> all created {} -> all placed {} -> all running {} ({:.0} tasks/s); store revision {}",
        fmt(marks[0]),
        fmt(marks[1]),
        fmt(marks[2]),
        args.tasks as f64 / total.as_secs_f64().max(1e-9),
        store.revision()
    );
    manager.signal_stop();
    let _ = fleet_task.await;
    manager.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("flotilla-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[derive(Debug, Args)]
pub struct BenchApiWritesArgs {
    /// Sequential writes to send (each waits for the previous one's answer).
    #[arg(long, default_value_t = 500)]
    pub count: usize,
    /// Service the writes update: created with 0 replicas, removed afterwards.
    #[arg(long, default_value = "bench-api-writes")]
    pub service: String,
}

/// `flotilla bench api-writes`: latency of acknowledged API writes against the manager at
/// `--addr`. Each write is a deploy that changes one environment variable of a service with no
/// tasks, so it measures the write path (API, raft replication to a quorum, fsync, apply) and
/// not the scheduler or agents. Run it on the leader's host for the raft path alone, or on a
/// follower's to include write forwarding.
pub async fn api_writes(c: &Client, args: &BenchApiWritesArgs) -> anyhow::Result<ExitCode> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let spec = |i: usize| {
        let mut s = ServiceSpec::process(&args.service, vec!["true".into()]);
        s.mode = ServiceMode::Replicated { replicas: 0 };
        s.environment.insert("BENCH_WRITE".into(), i.to_string());
        s
    };
    let mut latencies = Vec::with_capacity(args.count);
    let started = Instant::now();
    for i in 0..args.count {
        let req = DeployRequest {
            services: vec![spec(i)],
            dry_run: false,
            requested_by: "flotilla bench api-writes".into(),
        };
        let t = Instant::now();
        c.deploy(&req)
            .await
            .with_context(|| format!("write {} of {}", i + 1, args.count))?;
        latencies.push(t.elapsed());
    }
    let total = started.elapsed();
    if let Err(e) = c.remove_service(&args.service).await {
        eprintln!("warning: removing {}: {e}", args.service);
    }
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    println!(
        "{} writes in {:.2} s ({:.0} writes/s): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.count,
        total.as_secs_f64(),
        args.count as f64 / total.as_secs_f64(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0)
    );
    Ok(ExitCode::SUCCESS)
}
