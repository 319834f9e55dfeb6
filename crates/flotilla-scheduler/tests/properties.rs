//! Invariants that must hold for any cluster and any sequence of requests.
mod common;

use common::{node, reserve, spec, task, GIB};
use flotilla_scheduler::{schedule, ClusterSnapshot, Placement, PlacementRequest};
use flotilla_types::{Node, ResourceAmounts, ServiceSpec, SpreadSpec, Task};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const ZONES: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
struct Svc {
    cpu: u64,
    mem_mib: u64,
    limit_factor: u64,
    max_per_node: Option<u64>,
    spread_skew: Option<u32>,
    count: usize,
    priority: u32,
}

fn node_strategy() -> impl Strategy<Value = (usize, u64, u64)> {
    (0..ZONES.len(), 500u64..4000, 1u64..8)
}

fn svc_strategy() -> impl Strategy<Value = Svc> {
    (
        0u64..1500,
        4u64..2048,
        1u64..4,
        proptest::option::of(1u64..4),
        proptest::option::of(1u32..3),
        1usize..20,
        0u32..3,
    )
        .prop_map(
            |(cpu, mem_mib, limit_factor, max_per_node, spread_skew, count, priority)| Svc {
                cpu,
                mem_mib,
                limit_factor,
                max_per_node,
                spread_skew,
                count,
                priority,
            },
        )
}

fn build(i: usize, s: &Svc) -> ServiceSpec {
    let mut spec = spec(&format!("svc{i}"));
    if s.cpu > 0 {
        spec = reserve(spec, s.cpu, s.mem_mib << 20);
        spec.resources.limits = ResourceAmounts {
            cpu_millis: Some(s.cpu * s.limit_factor),
            memory_bytes: Some((s.mem_mib << 20) * s.limit_factor),
            pids: None,
        };
    }
    spec.placement.max_per_node = s.max_per_node;
    spec.placement.priority = s.priority;
    if let Some(k) = s.spread_skew {
        spec.placement.spread = vec![SpreadSpec {
            label: "zone".into(),
            hard: true,
            max_skew: k,
        }];
    }
    spec
}

fn cluster(shape: &[(usize, u64, u64)]) -> Vec<Node> {
    shape
        .iter()
        .enumerate()
        .map(|(i, (z, cpu, mem))| node(&format!("n{i}"), ZONES[*z], *cpu, mem * GIB))
        .collect()
}

/// Residents of priority 0 that fit their node (the snapshot only accounts them; it is the
/// test's job to start from a valid cluster).
fn residents(nodes: &[Node], sizes: &[(usize, u64)]) -> Vec<Task> {
    let mut used: BTreeMap<String, u64> = BTreeMap::new();
    let mut out = Vec::new();
    for (k, (n, cpu)) in sizes.iter().enumerate() {
        let node = &nodes[n % nodes.len()];
        let u = used.entry(node.id.clone()).or_default();
        if *u + cpu > node.resources.cpu_millis {
            continue;
        }
        *u += cpu;
        let s = reserve(spec("resident"), *cpu, 4 << 20);
        out.push(task(&format!("r{k}"), &s, &node.id));
    }
    out
}

/// What a request placed, checking the success/failure bookkeeping on the way.
fn placed(
    count: usize,
    r: Result<Vec<Placement>, flotilla_scheduler::PlacementFailure>,
) -> Vec<Placement> {
    match r {
        Ok(p) => {
            assert_eq!(p.len(), count);
            p
        }
        Err(f) => {
            assert_eq!(f.placed.len() + f.unplaced, count);
            assert!(f.unplaced > 0);
            assert!(f.reason.starts_with("0/"), "{}", f.reason);
            f.placed
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn no_node_is_overcommitted(
        shape in proptest::collection::vec(node_strategy(), 1..10),
        sizes in proptest::collection::vec((0usize..10, 100u64..2000), 0..12),
        svcs in proptest::collection::vec(svc_strategy(), 1..5),
    ) {
        let nodes = cluster(&shape);
        let tasks = residents(&nodes, &sizes);
        let mut snap = ClusterSnapshot::new(&nodes, &tasks, 0);
        snap.set_disruption_budget("resident", 3);
        // Per node: (reserved cpu, reserved mem, limit cpu, limit mem).
        let mut use_of: BTreeMap<String, [u64; 4]> = BTreeMap::new();
        let mut live: BTreeMap<String, (String, [u64; 4])> = BTreeMap::new();
        for t in &tasks {
            let d = [t.spec.resources.reservations.cpu_millis.unwrap_or(0),
                     t.spec.resources.reservations.memory_bytes.unwrap_or(0),
                     t.spec.resources.reservations.cpu_millis.unwrap_or(0),
                     t.spec.resources.reservations.memory_bytes.unwrap_or(0)];
            live.insert(t.id.clone(), (t.node.clone().unwrap_or_default(), d));
        }
        for (i, s) in svcs.iter().enumerate() {
            let spec = build(i, s);
            let d = [spec.resources.reservations.cpu_millis.unwrap_or(0),
                     spec.resources.reservations.memory_bytes.unwrap_or(0),
                     spec.resources.limits.cpu_millis.unwrap_or(0),
                     spec.resources.limits.memory_bytes.unwrap_or(0)];
            for (k, p) in placed(s.count, schedule(&mut snap, &PlacementRequest::new(&spec, s.count))).into_iter().enumerate() {
                for e in &p.evictions {
                    let (n, _) = live.remove(e).expect("evicted a task that was live");
                    prop_assert_eq!(&n, &p.node, "eviction on another node");
                }
                live.insert(format!("{i}-{k}"), (p.node.clone(), d));
            }
        }
        for (n, d) in live.values() {
            let u = use_of.entry(n.clone()).or_default();
            for j in 0..4 { u[j] += d[j]; }
        }
        for node in &nodes {
            let u = use_of.get(&node.id).copied().unwrap_or_default();
            prop_assert!(u[0] <= node.resources.cpu_millis, "cpu reservations on {}: {:?}", node.id, u);
            prop_assert!(u[1] <= node.resources.memory_bytes, "memory reservations on {}", node.id);
            prop_assert!(u[2] <= 2 * node.resources.cpu_millis, "cpu limits on {}", node.id);
            prop_assert!(u[3] <= 2 * node.resources.memory_bytes, "memory limits on {}", node.id);
        }
    }

    #[test]
    fn hard_spread_and_max_per_node_always_hold(
        shape in proptest::collection::vec(node_strategy(), 1..12),
        svcs in proptest::collection::vec(svc_strategy(), 1..5),
    ) {
        let nodes = cluster(&shape);
        let zones: BTreeSet<&str> = shape.iter().map(|(z, _, _)| ZONES[*z]).collect();
        let zone_of: BTreeMap<String, &str> =
            nodes.iter().zip(&shape).map(|(n, (z, _, _))| (n.id.clone(), ZONES[*z])).collect();
        let mut snap = ClusterSnapshot::new(&nodes, [], 0);
        for (i, s) in svcs.iter().enumerate() {
            let spec = build(i, s);
            let mut per_node: BTreeMap<String, u64> = BTreeMap::new();
            let mut per_zone: BTreeMap<&str, u32> = zones.iter().map(|z| (*z, 0)).collect();
            // Place one at a time so the skew is checked after every placement.
            for _ in 0..s.count {
                let got = placed(1, schedule(&mut snap, &PlacementRequest::new(&spec, 1)));
                let Some(p) = got.first() else { break };
                *per_node.entry(p.node.clone()).or_default() += 1;
                *per_zone.entry(zone_of[&p.node]).or_default() += 1;
                if let Some(max) = s.max_per_node {
                    prop_assert!(per_node[&p.node] <= max, "{} has {} > {max}", p.node, per_node[&p.node]);
                }
                if let Some(k) = s.spread_skew {
                    let hi = per_zone.values().max().copied().unwrap_or(0);
                    let lo = per_zone.values().min().copied().unwrap_or(0);
                    prop_assert!(hi - lo <= k, "zones {per_zone:?} skew over {k}");
                }
            }
        }
    }
}

/// A service for the host-port property: which host port (of two, tcp) it binds, if any, how
/// many tasks it asks for, its priority and cpu (so preemption also moves ports around).
fn host_port_svc() -> impl Strategy<Value = (Option<u16>, usize, u32, u64)> {
    (
        proptest::option::of(8080u16..8082),
        1usize..8,
        0u32..3,
        0u64..1500,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn no_node_holds_a_host_port_twice(
        shape in proptest::collection::vec(node_strategy(), 1..8),
        held in proptest::collection::vec((0usize..8, 8080u16..8082), 0..6),
        svcs in proptest::collection::vec(host_port_svc(), 1..6),
    ) {
        use flotilla_types::{PortMode, PortProtocol, PortSpec};
        let with_port = |mut s: ServiceSpec, port: u16| {
            s.ports.push(PortSpec {
                target: 80,
                published: Some(port),
                protocol: PortProtocol::Tcp,
                mode: PortMode::Host,
            });
            s
        };
        let nodes = cluster(&shape);
        // Start from a valid cluster: at most one resident per (node, port).
        let mut tasks = Vec::new();
        let mut live: BTreeMap<String, (String, Option<u16>)> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for (k, (n, port)) in held.iter().enumerate() {
            let node = &nodes[n % nodes.len()].id;
            if seen.insert((node.clone(), *port)) {
                let t = task(&format!("r{k}"), &with_port(reserve(spec("resident"), 100, 4 << 20), *port), node);
                live.insert(t.id.clone(), (node.clone(), Some(*port)));
                tasks.push(t);
            }
        }
        let mut snap = ClusterSnapshot::new(&nodes, &tasks, 0);
        snap.set_disruption_budget("resident", 3);
        for (i, (port, count, priority, cpu)) in svcs.iter().enumerate() {
            let mut s = spec(&format!("svc{i}"));
            if *cpu > 0 {
                s = reserve(s, *cpu, 4 << 20);
            }
            s.placement.priority = *priority;
            if let Some(p) = port {
                s = with_port(s, *p);
            }
            let got = placed(*count, schedule(&mut snap, &PlacementRequest::new(&s, *count)));
            for (k, p) in got.into_iter().enumerate() {
                for e in &p.evictions {
                    prop_assert!(live.remove(e).is_some(), "evicted a task that was not live");
                }
                live.insert(format!("{i}-{k}"), (p.node.clone(), *port));
            }
        }
        let mut holders: BTreeMap<(String, u16), usize> = BTreeMap::new();
        for (node, port) in live.values() {
            if let Some(p) = port {
                *holders.entry((node.clone(), *p)).or_default() += 1;
            }
        }
        for ((node, port), n) in holders {
            prop_assert!(n <= 1, "{node} holds host port {port} {n} times");
        }
    }
}
