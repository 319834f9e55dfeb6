//! Synthetic throughput benchmark: a generated cluster (zones, racks, disk and gpu labels, a few
//! drained or down nodes) and services mixing every placement syntax, placed one task per
//! [`schedule`] call so each call can be timed. The scheduler itself reads no clock; only this
//! harness does.

use crate::schedule::{schedule, PlacementRequest};
use crate::snapshot::ClusterSnapshot;
use flotilla_types::{
    AffinitySpec, Availability, DriverKind, Node, NodeResources, NodeRole, NodeState,
    PlacementStrategy, ResourceAmounts, ServiceSpec, SpreadSpec,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Zones in the generated cluster.
const ZONES: usize = 8;
/// Racks per zone.
const RACKS_PER_ZONE: usize = 16;
/// Tasks per generated service (the last may have fewer).
const TASKS_PER_SERVICE: usize = 10_000;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchConfig {
    pub nodes: usize,
    pub tasks: usize,
    /// Varies node labels and drained/down nodes; the same seed gives the same cluster.
    pub seed: u64,
}

/// What was measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    pub nodes: usize,
    pub services: usize,
    /// Tasks placed.
    pub placements: usize,
    /// Tasks that could not be placed.
    pub failures: usize,
    /// Time spent inside `schedule` only (snapshot building excluded).
    pub elapsed: Duration,
    pub per_sec: f64,
    /// Per-placement latency percentiles.
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} placements ({} failed) of {} services on {} nodes in {:.3}s: {:.0} placements/s, p50 {:?}, p99 {:?}, max {:?}",
            self.placements,
            self.failures,
            self.services,
            self.nodes,
            self.elapsed.as_secs_f64(),
            self.per_sec,
            self.p50,
            self.p99,
            self.max
        )
    }
}

/// splitmix64: a tiny seeded generator for the synthetic cluster.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn cluster(nodes: usize, seed: u64) -> Vec<Node> {
    let mut rng = seed;
    (0..nodes)
        .map(|i| {
            let zone = i % ZONES;
            let rack = (i / ZONES) % RACKS_PER_ZONE;
            let roll = splitmix(&mut rng) % 100;
            let mut labels = BTreeMap::from([
                ("rack".to_string(), format!("rack-{zone}-{rack}")),
                (
                    "disk".to_string(),
                    if roll < 50 { "ssd" } else { "hdd" }.to_string(),
                ),
            ]);
            if roll.is_multiple_of(10) {
                labels.insert("gpu".to_string(), "true".to_string());
            }
            let mut node = Node::new(
                &format!("node-{i:05}"),
                NodeResources {
                    cpu_millis: 32_000,
                    memory_bytes: 128 << 30,
                },
            );
            node.hostname = format!("host-{i:05}");
            if i < 3 {
                node.role = NodeRole::Manager;
            }
            if roll == 98 {
                node.availability = Availability::Drain;
            }
            if roll == 99 {
                node.state = NodeState::Down;
            }
            node.labels = labels;
            node.zone = Some(format!("zone-{zone}"));
            node.drivers = vec![DriverKind::Sim];
            node
        })
        .collect()
}

/// Service `i`, cycling through the placement syntaxes.
fn service(i: usize) -> ServiceSpec {
    let mut s = ServiceSpec::process(&format!("svc-{i}"), vec!["true".to_string()]);
    s.driver = DriverKind::Sim;
    s.resources.reservations = ResourceAmounts {
        cpu_millis: Some(100),
        memory_bytes: Some(256 << 20),
        pids: None,
    };
    let p = &mut s.placement;
    match i % 6 {
        0 => {}
        1 => p.constraints = vec!["node.labels.disk==ssd".to_string()],
        2 => {
            p.spread = vec![SpreadSpec {
                label: "zone".to_string(),
                hard: true,
                max_skew: 1,
            }]
        }
        3 => {
            s.environment
                .insert("constraint:rack!".to_string(), "rack-0-*".to_string());
            p.affinities = vec![AffinitySpec {
                service: "svc-0".to_string(),
                weight: -20,
                hard: false,
            }];
        }
        4 => {
            p.strategy = PlacementStrategy::Binpack;
            p.max_per_node = Some(8);
        }
        _ => {
            p.preferences = vec!["spread=node.labels.rack".to_string()];
            s.environment
                .insert("availability:az".to_string(), "=3".to_string());
        }
    }
    s
}

/// Generates the cluster and services of `cfg` and times placing every task.
pub fn run(cfg: &BenchConfig) -> BenchReport {
    let nodes = cluster(cfg.nodes, cfg.seed);
    let services: Vec<ServiceSpec> = (0..cfg.tasks.div_ceil(TASKS_PER_SERVICE))
        .map(service)
        .collect();
    let mut snapshot = ClusterSnapshot::new(&nodes, std::iter::empty(), 0);
    let mut latencies: Vec<Duration> = Vec::with_capacity(cfg.tasks);
    let mut failures = 0;
    let mut elapsed = Duration::ZERO;
    // Round-robin over services, as a pass reconciling many services would.
    for t in 0..cfg.tasks {
        let spec = &services[t % services.len()];
        let req = PlacementRequest::new(spec, 1);
        let start = Instant::now();
        let result = schedule(&mut snapshot, &req);
        let took = start.elapsed();
        elapsed += took;
        latencies.push(took);
        if result.is_err() {
            failures += 1;
        }
    }
    latencies.sort_unstable();
    let pct = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    BenchReport {
        nodes: cfg.nodes,
        services: services.len(),
        placements: cfg.tasks - failures,
        failures,
        elapsed,
        per_sec: if elapsed.is_zero() {
            0.0
        } else {
            cfg.tasks as f64 / elapsed.as_secs_f64()
        },
        p50: pct(0.50),
        p99: pct(0.99),
        max: latencies.last().copied().unwrap_or_default(),
    }
}
