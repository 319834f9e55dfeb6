//! The routing mesh on the command line: the node flags `up` and `agent` share, `flotilla task
//! weight`, `flotilla service traffic` and `flotilla bench mesh`.

use crate::output::Format;
use anyhow::{bail, Context};
use clap::Args;
use flotilla_agent::mesh_node::MeshNodeConfig;
use flotilla_client::Client;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

/// Node flags of the routing mesh.
#[derive(Debug, Args, Clone)]
pub struct MeshArgs {
    /// Address every published port listens on. Nodes sharing a host need distinct addresses
    /// (e.g. 127.0.0.2).
    #[arg(long, default_value = "0.0.0.0")]
    pub mesh_bind: IpAddr,
    /// Run no routing mesh on this node: published ports are not served here.
    #[arg(long)]
    pub no_mesh: bool,
    /// Answer DNS queries for `<service>.flotilla` / `<service>.internal` on this UDP address
    /// (e.g. 127.0.0.1:5353) with the node's mesh address.
    #[arg(long)]
    pub dns_addr: Option<SocketAddr>,
    /// The IP other nodes' meshes reach this node's tasks at (this host's address on the
    /// network between nodes). Default: the IP of --advertise-addr for `init`/`join`; for
    /// `up`/`agent`, none, so only nodes on the same host reach this node's tasks.
    #[arg(long, value_parser = parse_advertise_ip)]
    pub advertise_ip: Option<IpAddr>,
    /// Open client connections allowed per published port (and on all of them together);
    /// more are closed at once. 0: a share of the process's file-descriptor limit that leaves
    /// a reserve for health checks and task control.
    #[arg(long, default_value_t = 0)]
    pub mesh_max_connections: usize,
    /// Close a TCP connection through the mesh after this long without traffic.
    #[arg(long, default_value = "1h", value_parser = parse_positive_duration)]
    pub mesh_tcp_idle_timeout: Duration,
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err("must be longer than 0s".to_string());
    }
    Ok(d)
}

fn parse_advertise_ip(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("{ip} is not an address other nodes can reach"));
    }
    Ok(ip)
}

impl MeshArgs {
    /// The agent's mesh settings; `None` with `--no-mesh`.
    pub fn config(&self) -> Option<MeshNodeConfig> {
        (!self.no_mesh).then_some(MeshNodeConfig {
            bind_ip: self.mesh_bind,
            dns_addr: self.dns_addr,
            max_connections: self.mesh_max_connections,
            tcp_idle_timeout: self.mesh_tcp_idle_timeout,
        })
    }
}

#[derive(Debug, Args)]
pub struct WeightArgs {
    /// Task id, unique id prefix or name (`web.2`).
    pub task: String,
    /// Share of mesh traffic, 0 (no new requests: drained) to 100.
    #[arg(value_parser = clap::value_parser!(u8).range(0..=100))]
    pub weight: u8,
}

pub async fn task_weight(client: &Client, args: &WeightArgs) -> anyhow::Result<ExitCode> {
    client.set_task_weight(&args.task, args.weight).await?;
    println!("{} weight {}", args.task, args.weight);
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct ServiceWeightsArgs {
    pub service: String,
    /// TASK=WEIGHT pairs, written in one step (`web.1=0 web.2=100`).
    #[arg(required = true, value_parser = parse_task_weight)]
    pub weights: Vec<(String, u8)>,
}

fn parse_task_weight(s: &str) -> Result<(String, u8), String> {
    let (task, weight) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected TASK=WEIGHT, e.g. web.1=0"))?;
    let weight: u8 =
        weight.parse().ok().filter(|w| *w <= 100).ok_or_else(|| {
            format!("{s:?}: weight {weight:?} is not a whole number from 0 to 100")
        })?;
    if task.is_empty() {
        return Err(format!("{s:?}: the task is empty"));
    }
    Ok((task.to_string(), weight))
}

pub async fn service_weights(
    client: &Client,
    args: &ServiceWeightsArgs,
) -> anyhow::Result<ExitCode> {
    let weights: BTreeMap<String, u8> = args.weights.iter().cloned().collect();
    client.set_task_weights(&args.service, weights).await?;
    for (task, weight) in &args.weights {
        println!("{task} weight {weight}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn service_traffic(
    client: &Client,
    service: &str,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let traffic = client.service_traffic(service).await?;
    if format == Format::Json {
        crate::output::json(&traffic)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<18} {:>6} {:>9} {:>9} {:>7} {:>8} {:>8} {:>8}  BREAKERS",
        "TASK", "WEIGHT", "IN-FLIGHT", "REQUESTS", "ERRORS", "P50 ms", "P90 ms", "P99 ms"
    );
    for t in &traffic.tasks {
        let breakers: Vec<String> = t
            .breakers
            .iter()
            .map(|(node, state)| format!("{node}:{state}"))
            .collect();
        println!(
            "{:<18} {:>6} {:>9} {:>9} {:>7} {:>8.2} {:>8.2} {:>8.2}  {}",
            t.task_id,
            t.weight,
            t.in_flight,
            t.requests,
            t.errors,
            t.p50_ms,
            t.p90_ms,
            t.p99_ms,
            breakers.join(" ")
        );
    }
    if !traffic.unreachable_nodes.is_empty() {
        println!("unreachable: {}", traffic.unreachable_nodes.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct BenchMeshArgs {
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// How long each measurement (direct, through the mesh) runs.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Instead of measuring, run a mesh on --listen in front of this HTTP backend until Ctrl-C
    /// (for comparisons with other proxies: scripts/bench-mesh-nginx.sh).
    #[arg(long, requires = "listen")]
    pub serve: Option<SocketAddr>,
    /// Where the mesh listens with --serve.
    #[arg(long, requires = "serve")]
    pub listen: Option<SocketAddr>,
    /// Send this many requests per second (over all connections) instead of as many as they
    /// can: latency at a given load rather than at saturation.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: Option<u64>,
    /// Measure these HTTP servers (NAME=IP:PORT, e.g. `nginx=127.0.0.1:8081`) one after the
    /// other with the same load, instead of the built-in backend and mesh.
    #[arg(long = "target", value_parser = parse_target, conflicts_with = "serve")]
    pub targets: Vec<(String, SocketAddr)>,
}

fn parse_target(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=IP:PORT, e.g. nginx=127.0.0.1:8081"))?;
    let addr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Ok((name.to_string(), addr))
}

fn print_load_table(rows: &[(&str, &flotilla_mesh::bench::LoadReport)]) {
    println!(
        "{:<8} {:>12} {:>10} {:>10} {:>8}",
        "target", "req/s", "p50 ms", "p99 ms", "errors"
    );
    for (name, r) in rows {
        println!(
            "{:<8} {:>12.0} {:>10.3} {:>10.3} {:>8}",
            name, r.requests_per_sec, r.p50_ms, r.p99_ms, r.errors
        );
    }
}

pub async fn bench(args: &BenchMeshArgs) -> anyhow::Result<ExitCode> {
    if let (Some(backend), Some(listen)) = (args.serve, args.listen) {
        println!("mesh on {listen} -> {backend}; Ctrl-C stops it");
        flotilla_mesh::bench::serve_mesh_for(backend, listen)
            .await
            .context("serving the mesh")?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.duration.is_zero() {
        bail!("--duration must be longer than 0s");
    }
    let cfg = flotilla_mesh::bench::BenchConfig {
        connections: args.connections,
        duration: args.duration,
        rate: args.rate,
        ..flotilla_mesh::bench::BenchConfig::default()
    };
    let pace = match cfg.rate {
        Some(rate) => format!("{rate} requests/s"),
        None => "back to back".to_string(),
    };
    if !args.targets.is_empty() {
        println!(
            "{} connections, {pace}, {:?} each",
            cfg.connections, cfg.duration
        );
        let mut reports = Vec::new();
        for (name, addr) in &args.targets {
            let report = flotilla_mesh::bench::measure(*addr, &cfg)
                .await
                .with_context(|| format!("measuring {name} at {addr}"))?;
            reports.push((name.as_str(), report));
        }
        let rows: Vec<_> = reports.iter().map(|(n, r)| (*n, r)).collect();
        print_load_table(&rows);
        return Ok(ExitCode::SUCCESS);
    }
    let report = flotilla_mesh::bench::run(&cfg).await?;
    println!(
        "{} connections, {pace}, {:?} each, {}-byte responses",
        report.config.connections, report.config.duration, report.config.response_bytes
    );
    print_load_table(&[("direct", &report.direct), ("mesh", &report.mesh)]);
    println!(
        "mesh/direct throughput: {:.2}x, added p99: {:.3} ms",
        report.throughput_ratio, report.added_p99_ms
    );
    Ok(ExitCode::SUCCESS)
}

/// What `ps` shows about each task's mesh state: its weight when not 100, and any breaker that
/// is not closed (`node:open`). Traffic of services the API cannot report is left out.
pub async fn ps_notes(client: &Client, tasks: &[flotilla_types::Task]) -> BTreeMap<String, String> {
    let mut notes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in tasks {
        if let Some(w) = t.weight.filter(|w| *w != 100) {
            notes
                .entry(t.id.clone())
                .or_default()
                .push(format!("weight {w}"));
        }
    }
    let published: std::collections::BTreeSet<&str> = tasks
        .iter()
        .filter(|t| t.spec.ports.iter().any(|p| p.published.is_some()))
        .map(|t| t.service.as_str())
        .collect();
    for service in published {
        let Ok(traffic) = client.service_traffic(service).await else {
            continue;
        };
        for t in traffic.tasks {
            for (node, state) in t.breakers.iter().filter(|(_, s)| *s != "closed") {
                notes
                    .entry(t.task_id.clone())
                    .or_default()
                    .push(format!("breaker {state}@{node}"));
            }
        }
    }
    notes
        .into_iter()
        .map(|(id, parts)| (id, parts.join(", ")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_weight_pairs() {
        assert_eq!(parse_task_weight("web.1=0"), Ok(("web.1".into(), 0)));
        assert!(parse_task_weight("web.1=101")
            .unwrap_err()
            .contains("0 to 100"));
        assert!(parse_task_weight("web.1")
            .unwrap_err()
            .contains("TASK=WEIGHT"));
        assert!(parse_task_weight("=5").unwrap_err().contains("empty"));
    }

    #[test]
    fn bench_targets() {
        assert_eq!(
            parse_target("nginx=127.0.0.1:8081"),
            Ok(("nginx".into(), "127.0.0.1:8081".parse().unwrap()))
        );
        assert!(parse_target("127.0.0.1:8081")
            .unwrap_err()
            .contains("NAME="));
    }
}
