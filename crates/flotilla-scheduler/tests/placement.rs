mod common;

use common::{node, reserve, spec, task, GIB};
use flotilla_scheduler::{
    compile, schedule, ClusterSnapshot, OvercommitRatios, PlacementFailure, PlacementRequest,
    SnapshotError, PENALTY_HALF_LIFE_MS,
};
use flotilla_types::{
    AffinitySpec, Availability, DriverKind, Node, NodeRole, NodeState, PlacementStrategy, PortMode,
    PortProtocol, PortSpec, ResourceAmounts, ServiceSpec, SpreadSpec, Task,
};
use std::collections::{BTreeMap, BTreeSet};

/// n1: manager, zone a, ssd, engine label storage=fast; n2: zone b, hdd; n3: zone a, ssd;
/// n4: hostname web-4, zone c, no disk label.
fn four_nodes() -> Vec<Node> {
    let mut n1 = node("n1", "a", 4000, 8 * GIB);
    n1.role = NodeRole::Manager;
    n1.labels.insert("disk".into(), "ssd".into());
    n1.engine_labels.insert("storage".into(), "fast".into());
    let mut n2 = node("n2", "b", 4000, 8 * GIB);
    n2.labels.insert("disk".into(), "hdd".into());
    let mut n3 = node("n3", "a", 4000, 8 * GIB);
    n3.labels.insert("disk".into(), "ssd".into());
    let mut n4 = node("n4", "c", 4000, 8 * GIB);
    n4.hostname = "web-4".into();
    vec![n1, n2, n3, n4]
}

/// Places up to one task per node and returns the nodes used, successful or not.
fn nodes_taken(nodes: &[Node], tasks: &[Task], mut s: ServiceSpec) -> BTreeSet<String> {
    s.placement.max_per_node = Some(1);
    let mut snap = ClusterSnapshot::new(nodes, tasks, 0);
    let placed = match schedule(&mut snap, &PlacementRequest::new(&s, nodes.len())) {
        Ok(p) => p,
        Err(f) => f.placed,
    };
    placed.into_iter().map(|p| p.node).collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn with_constraint(c: &str) -> ServiceSpec {
    let mut s = spec("web");
    s.placement.constraints = vec![c.to_string()];
    s
}

fn with_env(k: &str, v: &str) -> ServiceSpec {
    let mut s = spec("web");
    s.environment.insert(k.to_string(), v.to_string());
    s
}

fn with_label(k: &str, v: &str) -> ServiceSpec {
    let mut s = spec("web");
    s.labels.insert(k.to_string(), v.to_string());
    s
}

#[test]
fn every_constraint_form_filters_the_right_nodes() {
    let cases: Vec<(&str, ServiceSpec, &[&str])> = vec![
        (
            "label ==",
            with_constraint("node.labels.zone==a"),
            &["n1", "n3"],
        ),
        (
            "label !=",
            with_constraint("node.labels.zone!=a"),
            &["n2", "n4"],
        ),
        (
            "hostname",
            with_constraint("node.hostname==host-n2"),
            &["n2"],
        ),
        ("id", with_constraint("node.id==n3"), &["n3"]),
        ("role", with_constraint("node.role==manager"), &["n1"]),
        (
            "engine label",
            with_constraint("engine.labels.storage==fast"),
            &["n1"],
        ),
        (
            "missing label satisfies !=",
            with_constraint("node.labels.disk!=ssd"),
            &["n2", "n4"],
        ),
        (
            "swarm-mode glob",
            with_constraint("node.hostname==host-n*"),
            &["n1", "n2", "n3"],
        ),
        (
            "classic key only",
            with_env("constraint:zone==a", ""),
            &["n1", "n3"],
        ),
        (
            "classic split at =",
            with_env("constraint:zone", "=b"),
            &["n2"],
        ),
        (
            "classic != split",
            with_env("constraint:zone!", "a"),
            &["n2", "n4"],
        ),
        (
            "classic node glob",
            with_env("constraint:node==web-*", ""),
            &["n4"],
        ),
        (
            "classic node id",
            with_env("constraint:node==n2", ""),
            &["n2"],
        ),
        (
            "classic node regex",
            with_env("constraint:node==/^host-n[12]$/", ""),
            &["n1", "n2"],
        ),
        (
            "classic engine label fallback",
            with_env("constraint:storage==fast", ""),
            &["n1"],
        ),
        (
            "swarm constraints label",
            with_label("com.docker.swarm.constraints", r#"["disk==ssd","zone!=b"]"#),
            &["n1", "n3"],
        ),
        (
            "constraint label",
            with_label("constraint:disk", "=ssd"),
            &["n1", "n3"],
        ),
        (
            "soft never fails",
            with_env("constraint:zone==~nowhere", ""),
            &["n1", "n2", "n3", "n4"],
        ),
        (
            "soft != never fails",
            with_constraint("node.labels.zone!=~a"),
            &["n1", "n2", "n3", "n4"],
        ),
    ];
    let nodes = four_nodes();
    for (name, s, want) in cases {
        assert_eq!(nodes_taken(&nodes, &[], s), set(want), "case {name}");
    }
}

#[test]
fn soft_constraints_rank_but_do_not_filter() {
    let nodes = four_nodes();
    for (s, want) in [
        (with_env("constraint:zone==~b", ""), "n2"),
        (with_label("constraint:node", "=~web-*"), "n4"),
        (with_constraint("node.labels.disk==~hdd"), "n2"),
    ] {
        let mut snap = ClusterSnapshot::new(&nodes, [], 0);
        let placed = schedule(&mut snap, &PlacementRequest::new(&s, 1)).unwrap();
        assert_eq!(placed[0].node, want, "{:?}", s.environment);
    }
    // `!=~`: the two zone-a nodes are used last.
    let s = with_constraint("node.labels.zone!=~a");
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    let placed = schedule(&mut snap, &PlacementRequest::new(&s, 2)).unwrap();
    let got: BTreeSet<String> = placed.into_iter().map(|p| p.node).collect();
    assert_eq!(got, set(&["n2", "n4"]));
}

#[test]
fn affinity_forms_follow_other_services() {
    let nodes = four_nodes();
    let mut db = spec("db");
    db.image = Some("redis:7".into());
    let tasks = vec![task("db1", &db, "n2")];
    let xf = |weight: i32, hard: bool| {
        let mut s = spec("web");
        s.placement.affinities = vec![AffinitySpec {
            service: "db".into(),
            weight,
            hard,
        }];
        s
    };
    let cases: Vec<(&str, ServiceSpec, &[&str])> = vec![
        (
            "hard co-locate",
            with_env("affinity:service==db", ""),
            &["n2"],
        ),
        (
            "hard avoid",
            with_env("affinity:service!=db", ""),
            &["n1", "n3", "n4"],
        ),
        (
            "glob service",
            with_env("affinity:service==d*", ""),
            &["n2"],
        ),
        (
            "container alias",
            with_env("affinity:container", "=db"),
            &["n2"],
        ),
        (
            "image glob",
            with_env("affinity:image==redis*", ""),
            &["n2"],
        ),
        (
            "image avoid",
            with_env("affinity:image!=redis:7", ""),
            &["n1", "n3", "n4"],
        ),
        (
            "affinities label",
            with_label("com.docker.swarm.affinities", r#"["service!=db"]"#),
            &["n1", "n3", "n4"],
        ),
        ("x-flotilla hard attract", xf(10, true), &["n2"]),
        ("x-flotilla hard repel", xf(-10, true), &["n1", "n3", "n4"]),
        (
            "soft never fails",
            with_env("affinity:service==~nothing", ""),
            &["n1", "n2", "n3", "n4"],
        ),
    ];
    for (name, s, want) in cases {
        assert_eq!(nodes_taken(&nodes, &tasks, s), set(want), "case {name}");
    }
    for (s, first) in [
        (with_env("affinity:service==~db", ""), "n2"),
        (xf(50, false), "n2"),
    ] {
        let mut snap = ClusterSnapshot::new(&nodes, &tasks, 0);
        let placed = schedule(&mut snap, &PlacementRequest::new(&s, 1)).unwrap();
        assert_eq!(placed[0].node, first);
    }
    // Soft anti-affinity: n2 is used only once every other node has a task.
    for s in [with_env("affinity:service!=~db", ""), xf(-50, false)] {
        let mut snap = ClusterSnapshot::new(&nodes, &tasks, 0);
        let placed = schedule(&mut snap, &PlacementRequest::new(&s, 3)).unwrap();
        assert!(placed.iter().all(|p| p.node != "n2"), "{placed:?}");
    }
}

#[test]
fn failure_message_counts_each_filter() {
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| node(&format!("b{i}"), "b", 4000, GIB / 2))
        .collect();
    nodes.extend((1..=2).map(|i| node(&format!("a{i}"), "a", 4000, 8 * GIB)));
    let mut s = reserve(spec("web"), 100, GIB);
    s.placement.constraints = vec!["node.labels.zone==b".into()];
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    let err = schedule(&mut snap, &PlacementRequest::new(&s, 2)).unwrap_err();
    assert_eq!(
        err.reason,
        "0/5 nodes: 3 insufficient memory, 2 violate node.labels.zone==b"
    );
    assert_eq!(err.unplaced, 2);
    assert!(err.placed.is_empty());
    assert_eq!(
        err.counts,
        BTreeMap::from([
            ("insufficient memory".to_string(), 3),
            ("violate node.labels.zone==b".to_string(), 2)
        ])
    );
    assert_eq!(err.to_string(), err.reason);
}

#[test]
fn node_state_availability_and_driver_filters() {
    let mut down = node("down", "a", 4000, 8 * GIB);
    down.state = NodeState::Down;
    let mut drained = node("drained", "a", 4000, 8 * GIB);
    drained.availability = Availability::Drain;
    let mut paused = node("paused", "a", 4000, 8 * GIB);
    paused.availability = Availability::Pause;
    let mut nodocker = node("nodocker", "a", 4000, 8 * GIB);
    nodocker.drivers = vec![DriverKind::Process];
    let nodes = vec![down, drained, paused, nodocker];
    let mut s = spec("web");
    s.driver = DriverKind::Docker;
    s.image = Some("nginx".into());
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    let err = schedule(&mut snap, &PlacementRequest::new(&s, 1)).unwrap_err();
    assert_eq!(
        err.reason,
        "0/4 nodes: 1 missing driver docker, 1 node down, 1 node draining, 1 node paused"
    );
    // The same spec fits once a node is Ready, Active and has the driver.
    let mut ok = node("ok", "a", 4000, 8 * GIB);
    ok.drivers.push(DriverKind::Docker);
    let mut all = nodes.clone();
    all.push(ok);
    let mut snap = ClusterSnapshot::new(&all, [], 0);
    let placed = schedule(&mut snap, &PlacementRequest::new(&s, 1)).unwrap();
    assert_eq!(placed[0].node, "ok");
}

#[test]
fn partial_success_reports_what_was_placed_and_accounting_carries_over() {
    let nodes = vec![node("n1", "a", 1000, 8 * GIB)];
    let s = reserve(spec("web"), 400, GIB);
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    let err = schedule(&mut snap, &PlacementRequest::new(&s, 3)).unwrap_err();
    assert_eq!(err.placed.len(), 2);
    assert_eq!(err.unplaced, 1);
    assert_eq!(err.reason, "0/1 nodes: 1 insufficient cpu");
    // The two placed tasks still hold their cpu in this snapshot.
    let other = reserve(spec("other"), 300, GIB);
    let err = schedule(&mut snap, &PlacementRequest::new(&other, 1)).unwrap_err();
    assert_eq!(err.reason, "0/1 nodes: 1 insufficient cpu");
    let small = reserve(spec("small"), 200, GIB);
    assert!(schedule(&mut snap, &PlacementRequest::new(&small, 1)).is_ok());
}

#[test]
fn existing_tasks_hold_resources_but_terminal_ones_do_not() {
    let nodes = vec![node("n1", "a", 1000, 8 * GIB)];
    let big = reserve(spec("big"), 800, GIB);
    let running = task("t1", &big, "n1");
    let mut failed = task("t2", &big, "n1");
    failed.status.state = flotilla_types::TaskState::Failed;
    let s = reserve(spec("web"), 400, GIB);
    let mut snap = ClusterSnapshot::new(&nodes, [&failed], 0);
    assert!(schedule(&mut snap, &PlacementRequest::new(&s, 1)).is_ok());
    let mut snap = ClusterSnapshot::new(&nodes, [&running], 0);
    let err = schedule(&mut snap, &PlacementRequest::new(&s, 1)).unwrap_err();
    assert_eq!(err.reason, "0/1 nodes: 1 insufficient cpu");
}

#[test]
fn limits_overcommit_up_to_the_ratio() {
    let nodes = vec![node("n1", "a", 1000, 8 * GIB)];
    let mut s = reserve(spec("web"), 100, 64 << 20);
    s.resources.limits = ResourceAmounts {
        cpu_millis: Some(1000),
        memory_bytes: None,
        pids: None,
    };
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    let err = schedule(&mut snap, &PlacementRequest::new(&s, 3)).unwrap_err();
    assert_eq!(err.placed.len(), 2, "default limit ratio is 2.0");
    assert_eq!(err.reason, "0/1 nodes: 1 cpu limits over overcommit ratio");

    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    snap.set_overcommit(OvercommitRatios {
        reservation: 1.0,
        limit: 3.0,
    })
    .unwrap();
    assert_eq!(
        schedule(&mut snap, &PlacementRequest::new(&s, 3))
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        snap.set_overcommit(OvercommitRatios {
            reservation: 0.5,
            limit: 2.0
        }),
        Err(SnapshotError::BadRatio {
            field: "reservation",
            value: 0.5
        })
    );
    assert!(snap
        .set_overcommit(OvercommitRatios {
            reservation: 1.0,
            limit: f64::NAN
        })
        .is_err());
}

#[test]
fn spread_strategy_spreads_and_binpack_packs() {
    let nodes: Vec<Node> = (1..=3)
        .map(|i| node(&format!("n{i}"), "a", 4000, 8 * GIB))
        .collect();
    let s = reserve(spec("web"), 100, 64 << 20);
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    let placed = schedule(&mut snap, &PlacementRequest::new(&s, 6)).unwrap();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for p in &placed {
        *per_node.entry(p.node.clone()).or_default() += 1;
    }
    assert_eq!(
        per_node.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2]
    );

    let mut b = s.clone();
    b.placement.strategy = PlacementStrategy::Binpack;
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    let placed = schedule(&mut snap, &PlacementRequest::new(&b, 6)).unwrap();
    let used: BTreeSet<String> = placed.into_iter().map(|p| p.node).collect();
    assert_eq!(used.len(), 1);
}

#[test]
fn binpack_prefers_the_fuller_node() {
    let nodes = vec![
        node("n1", "a", 4000, 8 * GIB),
        node("n2", "a", 4000, 8 * GIB),
    ];
    let filler = reserve(spec("filler"), 2000, 2 * GIB);
    let tasks = [task("f", &filler, "n2")];
    let mut b = reserve(spec("web"), 100, 64 << 20);
    b.placement.strategy = PlacementStrategy::Binpack;
    let mut snap = ClusterSnapshot::new(&nodes, &tasks, 0);
    assert_eq!(
        schedule(&mut snap, &PlacementRequest::new(&b, 1)).unwrap()[0].node,
        "n2"
    );
    let s = reserve(spec("web2"), 100, 64 << 20);
    assert_eq!(
        schedule(&mut snap, &PlacementRequest::new(&s, 1)).unwrap()[0].node,
        "n1"
    );
}

#[test]
fn max_per_node_takes_the_tighter_limit() {
    let nodes = vec![
        node("n1", "a", 4000, 8 * GIB),
        node("n2", "a", 4000, 8 * GIB),
    ];
    let mut s = spec("web");
    s.placement.max_replicas_per_node = Some(3);
    s.placement.max_per_node = Some(1);
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    let err = schedule(&mut snap, &PlacementRequest::new(&s, 3)).unwrap_err();
    assert_eq!(err.placed.len(), 2);
    assert_eq!(err.reason, "0/2 nodes: 2 max 1 tasks per node");
}

#[test]
fn availability_zones_hard_and_best_effort() {
    // Zone a has three nodes, b and c one each.
    let nodes = vec![
        node("a1", "a", 4000, 8 * GIB),
        node("a2", "a", 4000, 8 * GIB),
        node("a3", "a", 4000, 8 * GIB),
        node("b1", "b", 4000, 8 * GIB),
        node("c1", "c", 4000, 8 * GIB),
    ];
    let zone_of = |id: &str| id[..1].to_string();
    let s = with_env("availability:az", "=3");
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    let placed = schedule(&mut snap, &PlacementRequest::new(&s, 3)).unwrap();
    let zones: BTreeSet<String> = placed.iter().map(|p| zone_of(&p.node)).collect();
    assert_eq!(zones.len(), 3, "{placed:?}");

    let two_zones = &nodes[..4];
    let mut snap = ClusterSnapshot::new(two_zones, [], 0);
    let err = schedule(&mut snap, &PlacementRequest::new(&s, 3)).unwrap_err();
    assert_eq!(
        err.reason,
        "0/4 nodes: 4 violate availability:az==3 (only 2 zones have eligible nodes)"
    );

    let soft = with_env("availability:az==~3", "");
    let mut snap = ClusterSnapshot::new(two_zones, [], 0);
    let placed = schedule(&mut snap, &PlacementRequest::new(&soft, 3)).unwrap();
    let zones: BTreeSet<String> = placed.iter().map(|p| zone_of(&p.node)).collect();
    assert_eq!(zones.len(), 2);
}

#[test]
fn preferences_and_hard_spread_balance_zones() {
    let nodes = vec![
        node("a1", "a", 4000, 8 * GIB),
        node("a2", "a", 4000, 8 * GIB),
        node("a3", "a", 4000, 8 * GIB),
        node("b1", "b", 4000, 8 * GIB),
    ];
    let count_b = |placed: &[flotilla_scheduler::Placement]| {
        placed.iter().filter(|p| p.node.starts_with('b')).count()
    };
    let mut pref = spec("web");
    pref.placement.preferences = vec!["spread=node.labels.zone".into()];
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    let placed = schedule(&mut snap, &PlacementRequest::new(&pref, 4)).unwrap();
    assert_eq!(count_b(&placed), 2, "{placed:?}");

    let mut hard = spec("api");
    hard.placement.spread = vec![SpreadSpec {
        label: "zone".into(),
        hard: true,
        max_skew: 1,
    }];
    hard.placement.max_per_node = Some(1);
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    // b1 takes one task, so zone a may hold at most two.
    let err = schedule(&mut snap, &PlacementRequest::new(&hard, 4)).unwrap_err();
    assert_eq!(count_b(&err.placed), 1);
    assert_eq!(err.placed.len(), 3);
    assert_eq!(
        err.reason,
        "0/4 nodes: 3 max 1 tasks per node, 1 violate spread over zone (max_skew 1)"
    );
}

#[test]
fn pinned_placement_checks_only_that_node() {
    let nodes = four_nodes();
    let s = with_constraint("node.labels.zone==a");
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    let mut req = PlacementRequest::new(&s, 1);
    req.pin_to = Some("web-4");
    let err = schedule(&mut snap, &req).unwrap_err();
    assert_eq!(err.reason, "0/1 nodes: 1 violate node.labels.zone==a");
    req.pin_to = Some("n3");
    assert_eq!(schedule(&mut snap, &req).unwrap()[0].node, "n3");
    req.pin_to = Some("ghost");
    let err = schedule(&mut snap, &req).unwrap_err();
    assert!(
        err.reason.contains("unknown node \"ghost\""),
        "{}",
        err.reason
    );
}

#[test]
fn preemption_evicts_the_fewest_lowest_priority_tasks() {
    let nodes = vec![node("n1", "a", 4000, 8 * GIB)];
    let batch = reserve(spec("batch"), 1000, GIB);
    let mut mid = reserve(spec("mid"), 1000, GIB);
    mid.placement.priority = 100;
    let tasks = vec![
        task("b1", &batch, "n1"),
        task("b2", &batch, "n1"),
        task("b3", &batch, "n1"),
        task("m1", &mid, "n1"),
    ];
    let mut urgent = reserve(spec("urgent"), 2000, GIB);
    urgent.placement.priority = 500;

    // With room in batch's budget, two batch tasks go.
    let mut snap = ClusterSnapshot::new(&nodes, &tasks, 0);
    snap.set_disruption_budget("batch", 5);
    let placed = schedule(&mut snap, &PlacementRequest::new(&urgent, 1)).unwrap();
    let mut ev = placed[0].evictions.clone();
    ev.sort();
    assert_eq!(
        ev,
        vec!["b1", "b2"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    );
    // The freed cores went to `urgent`: the node is exactly full again.
    let one = reserve(spec("one"), 1000, GIB);
    let err = schedule(&mut snap, &PlacementRequest::new(&one, 1)).unwrap_err();
    assert_eq!(err.reason, "0/1 nodes: 1 insufficient cpu");

    // Default budget (1): one batch task and the priority-100 task.
    let mut snap = ClusterSnapshot::new(&nodes, &tasks, 0);
    let placed = schedule(&mut snap, &PlacementRequest::new(&urgent, 1)).unwrap();
    let ev = &placed[0].evictions;
    assert_eq!(ev.len(), 2);
    assert!(ev.contains(&"m1".to_string()), "{ev:?}");
    // Budgets are spent: nothing else of batch or mid may be evicted in this pass.
    let err = schedule(&mut snap, &PlacementRequest::new(&urgent, 1)).unwrap_err();
    assert_eq!(err.reason, "0/1 nodes: 1 insufficient cpu");

    // Equal or higher priority is never preempted.
    let mut peer = reserve(spec("peer"), 2000, GIB);
    peer.placement.priority = 100;
    let mut snap = ClusterSnapshot::new(&nodes, [&tasks[3], &tasks[0], &tasks[1]], 0);
    snap.set_disruption_budget("batch", 0);
    let err = schedule(&mut snap, &PlacementRequest::new(&peer, 1)).unwrap_err();
    assert_eq!(err.reason, "0/1 nodes: 1 insufficient cpu");
    let zero = reserve(spec("zero"), 2000, GIB);
    let mut snap = ClusterSnapshot::new(&nodes, &tasks, 0);
    assert!(schedule(&mut snap, &PlacementRequest::new(&zero, 1)).is_err());
}

/// A task on its way out keeps its resources until it exits, but cannot be preempted again.
#[test]
fn stopping_tasks_hold_resources_but_are_not_victims() {
    let nodes = vec![node("n1", "a", 2000, 8 * GIB)];
    let batch = reserve(spec("batch"), 1000, GIB);
    let mut stopping = task("b1", &batch, "n1");
    stopping.desired_state = flotilla_types::DesiredState::Shutdown;
    let running = task("b2", &batch, "n1");
    let mut urgent = reserve(spec("urgent"), 1000, GIB);
    urgent.placement.priority = 500;

    let mut snap = ClusterSnapshot::new(&nodes, [&running], 0);
    snap.set_disruption_budget("batch", 5);
    snap.hold_stopping(&stopping);
    let placed = schedule(&mut snap, &PlacementRequest::new(&urgent, 1)).unwrap();
    assert_eq!(placed[0].evictions, vec!["b2".to_string()]);

    // Once it has exited, it holds nothing.
    let mut exited = stopping.clone();
    exited.status.state = flotilla_types::TaskState::Exited;
    let mut snap = ClusterSnapshot::new(&nodes, [&running], 0);
    snap.hold_stopping(&exited);
    let placed = schedule(&mut snap, &PlacementRequest::new(&urgent, 1)).unwrap();
    assert!(placed[0].evictions.is_empty(), "{placed:?}");
}

#[test]
fn preemption_picks_the_node_needing_fewest_evictions() {
    let nodes = vec![
        node("n1", "a", 2000, 8 * GIB),
        node("n2", "a", 2000, 8 * GIB),
    ];
    let small = reserve(spec("small"), 500, GIB);
    let big = reserve(spec("big"), 2000, GIB);
    let tasks = vec![
        task("s1", &small, "n1"),
        task("s2", &small, "n1"),
        task("s3", &small, "n1"),
        task("s4", &small, "n1"),
        task("g1", &big, "n2"),
    ];
    let mut urgent = reserve(spec("urgent"), 1000, GIB);
    urgent.placement.priority = 10;
    let mut snap = ClusterSnapshot::new(&nodes, &tasks, 0);
    snap.set_disruption_budget("small", 4);
    let placed = schedule(&mut snap, &PlacementRequest::new(&urgent, 1)).unwrap();
    assert_eq!(placed[0].node, "n2");
    assert_eq!(placed[0].evictions, vec!["g1".to_string()]);
}

#[test]
fn start_failures_steer_placement_away_and_decay() {
    // n1 is emptier, so it wins when nothing failed.
    let nodes = vec![
        node("n1", "a", 4000, 8 * GIB),
        node("n2", "a", 4000, 8 * GIB),
    ];
    let filler = reserve(spec("filler"), 1000, GIB);
    let tasks = [task("f", &filler, "n2")];
    let s = reserve(spec("web"), 100, 64 << 20);
    let place = |now: i64, failures: &[(&str, i64)]| {
        let mut snap = ClusterSnapshot::new(&nodes, &tasks, now);
        for (n, at) in failures {
            snap.record_start_failure("web", n, *at);
        }
        schedule(&mut snap, &PlacementRequest::new(&s, 1)).unwrap()[0]
            .node
            .clone()
    };
    assert_eq!(place(0, &[]), "n1");
    assert_eq!(place(0, &[("n1", 0)]), "n2");
    // Retries a little later still avoid n1; by hostname works too.
    assert_eq!(place(10_000, &[("host-n1", 0)]), "n2");
    // Twenty half-lives later the penalty is gone.
    assert_eq!(place(20 * PENALTY_HALF_LIFE_MS, &[("n1", 0)]), "n1");
    // The heavier penalty loses when both nodes failed.
    assert_eq!(place(1000, &[("n1", 0), ("n1", 500), ("n2", 0)]), "n2");
    // Other services are unaffected.
    let mut snap = ClusterSnapshot::new(&nodes, &tasks, 0);
    snap.record_start_failure("other", "n1", 0);
    snap.record_start_failure("web", "no-such-node", 0);
    assert_eq!(
        schedule(&mut snap, &PlacementRequest::new(&s, 1)).unwrap()[0].node,
        "n1"
    );

    // A penalised node that is the only feasible one is still used.
    let only = vec![node("n1", "a", 4000, 8 * GIB)];
    let mut snap = ClusterSnapshot::new(&only, [], 0);
    snap.record_start_failure("web", "n1", 0);
    assert_eq!(
        schedule(&mut snap, &PlacementRequest::new(&s, 1)).unwrap()[0].node,
        "n1"
    );
}

#[test]
fn start_failures_are_avoided_in_a_large_sampled_cluster() {
    let nodes: Vec<Node> = (0..1000)
        .map(|i| node(&format!("n{i}"), "a", 4000, 8 * GIB))
        .collect();
    let s = spec("web");
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    for n in &nodes[..999] {
        snap.record_start_failure("web", &n.id, 0);
    }
    // Penalised candidates do not use up the sample, so the one clean node is found.
    let placed = schedule(&mut snap, &PlacementRequest::new(&s, 1)).unwrap();
    assert_eq!(placed[0].node, "n999");
}

fn field_errors(s: &ServiceSpec) -> Vec<(String, String)> {
    compile(s)
        .expect_err("the spec should be rejected")
        .into_iter()
        .map(|e| (e.field, e.reason))
        .collect()
}

#[test]
fn bad_placement_input_names_the_field() {
    let cases: Vec<(ServiceSpec, &str, &str)> = vec![
        (
            with_constraint("zone=a"),
            "services.web.deploy.placement.constraints[0]",
            "no operator",
        ),
        (
            with_constraint("node.color==red"),
            "services.web.deploy.placement.constraints[0]",
            "unknown attribute",
        ),
        (
            with_constraint("node.role==boss"),
            "services.web.deploy.placement.constraints[0]",
            "manager",
        ),
        (
            with_constraint("node.labels.zone=="),
            "services.web.deploy.placement.constraints[0]",
            "no value",
        ),
        (
            with_constraint("==a"),
            "services.web.deploy.placement.constraints[0]",
            "no key",
        ),
        (
            with_env("constraint:node==/[/", ""),
            "services.web.environment.constraint:node==/[/",
            "regular expression",
        ),
        (
            with_env("constraint:node==[", ""),
            "services.web.environment.constraint:node==[",
            "glob",
        ),
        (
            with_env("affinity:host==a", ""),
            "services.web.environment.affinity:host==a",
            "unknown affinity key",
        ),
        (
            with_env("availability:az!=3", ""),
            "services.web.environment.availability:az!=3",
            "not !=",
        ),
        (
            with_env("availability:az==many", ""),
            "services.web.environment.availability:az==many",
            "zone count",
        ),
        (
            with_label("com.docker.swarm.constraints", "zone==a"),
            "services.web.labels.com.docker.swarm.constraints",
            "JSON list",
        ),
        (
            with_label("com.docker.swarm.affinities", r#"["service"]"#),
            "services.web.labels.com.docker.swarm.affinities[0]",
            "no operator",
        ),
    ];
    for (s, field, reason) in cases {
        let errs = field_errors(&s);
        assert!(
            errs.iter().any(|(f, r)| f == field && r.contains(reason)),
            "{field}: {errs:?}"
        );
    }

    let mut s = spec("web");
    s.placement.preferences = vec!["pack=node.labels.zone".into()];
    s.placement.spread = vec![
        SpreadSpec {
            label: " ".into(),
            hard: true,
            max_skew: 1,
        },
        SpreadSpec {
            label: "zone".into(),
            hard: true,
            max_skew: 0,
        },
    ];
    s.placement.affinities = vec![
        AffinitySpec {
            service: "db".into(),
            weight: 0,
            hard: false,
        },
        AffinitySpec {
            service: "db".into(),
            weight: 101,
            hard: false,
        },
        AffinitySpec {
            service: "/(/".into(),
            weight: 5,
            hard: false,
        },
    ];
    s.placement.max_per_node = Some(0);
    s.placement.priority = 1001;
    let errs = field_errors(&s);
    let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        vec![
            "services.web.deploy.placement.preferences[0]",
            "services.web.x-flotilla.placement.spread[0].label",
            "services.web.x-flotilla.placement.spread[1].max_skew",
            "services.web.x-flotilla.placement.affinities[0].weight",
            "services.web.x-flotilla.placement.affinities[1].weight",
            "services.web.x-flotilla.placement.affinities[2].service",
            "services.web.x-flotilla.placement.max_per_node",
            "services.web.x-flotilla.placement.priority",
        ]
    );

    // schedule() reports the same problems instead of placing anything.
    let nodes = four_nodes();
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    let err: PlacementFailure = schedule(
        &mut snap,
        &PlacementRequest::new(&with_constraint("zone=a"), 2),
    )
    .unwrap_err();
    assert_eq!(err.unplaced, 2);
    assert!(
        err.reason
            .starts_with("invalid placement: services.web.deploy.placement.constraints[0]"),
        "{}",
        err.reason
    );
}

#[test]
fn docker_zero_max_replicas_means_unlimited() {
    let nodes = vec![node("n1", "a", 4000, 8 * GIB)];
    let mut s = spec("web");
    s.placement.max_replicas_per_node = Some(0);
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    assert_eq!(
        schedule(&mut snap, &PlacementRequest::new(&s, 3))
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn a_changed_spec_is_recompiled() {
    let nodes = four_nodes();
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    let a = with_constraint("node.id==n1");
    assert_eq!(
        schedule(&mut snap, &PlacementRequest::new(&a, 1)).unwrap()[0].node,
        "n1"
    );
    let b = with_constraint("node.id==n2");
    assert_eq!(
        schedule(&mut snap, &PlacementRequest::new(&b, 1)).unwrap()[0].node,
        "n2"
    );
}

#[test]
fn same_inputs_give_same_placements() {
    let nodes: Vec<Node> = (0..200)
        .map(|i| node(&format!("n{i}"), ["a", "b", "c"][i % 3], 4000, 8 * GIB))
        .collect();
    let s = reserve(spec("web"), 100, GIB);
    let run = || {
        let mut snap = ClusterSnapshot::new(&nodes, [], 0);
        schedule(&mut snap, &PlacementRequest::new(&s, 50)).unwrap()
    };
    assert_eq!(run(), run());
}

#[test]
fn bench_places_every_task_of_a_small_cluster() {
    let report = flotilla_scheduler::bench::run(&flotilla_scheduler::bench::BenchConfig {
        nodes: 300,
        tasks: 20_000,
        seed: 7,
    });
    assert_eq!(report.failures, 0, "{report}");
    assert_eq!(report.placements, 20_000);
    assert_eq!(report.services, 2);
    assert!(report.p50 <= report.p99 && report.p99 <= report.max);
}

/// A node that already holds the task's image wins over equally loaded nodes without it, but
/// spreading still comes first.
#[test]
fn nodes_holding_the_image_are_preferred() {
    let mut holder = node("b", "z1", 4000, 8 * GIB);
    holder.images = vec!["web:2".to_string()];
    let nodes = vec![
        node("a", "z1", 4000, 8 * GIB),
        holder,
        node("c", "z1", 4000, 8 * GIB),
    ];
    let mut s = spec("web");
    s.image = Some("web:2".into());
    let mut snap = ClusterSnapshot::new(&nodes, std::iter::empty(), 0);
    let first = schedule(&mut snap, &PlacementRequest::new(&s, 1)).expect("placed");
    assert_eq!(first[0].node, "b");
    let second = schedule(&mut snap, &PlacementRequest::new(&s, 1)).expect("placed");
    assert_ne!(second[0].node, "b", "spreading outweighs the image");
    // The preference is what chose b: with b holding nothing, the same request goes elsewhere.
    let plain: Vec<_> = nodes
        .iter()
        .cloned()
        .map(|mut n| {
            n.images.clear();
            n
        })
        .collect();
    let mut fresh = ClusterSnapshot::new(&plain, std::iter::empty(), 0);
    let without = schedule(&mut fresh, &PlacementRequest::new(&s, 1)).expect("placed");
    assert_ne!(without[0].node, "b");
}

fn host_port(
    mut s: ServiceSpec,
    published: u16,
    protocol: PortProtocol,
    mode: PortMode,
) -> ServiceSpec {
    s.ports.push(PortSpec {
        target: 80,
        published: Some(published),
        protocol,
        mode,
    });
    s
}

/// (case, resident on n1, web's spec, tasks of web, nodes placed, failure reason)
type HostPortCase = (
    &'static str,
    Option<ServiceSpec>,
    ServiceSpec,
    usize,
    &'static [&'static str],
    Option<&'static str>,
);

/// A host-mode published port is bound on the node itself: one holder per node, whatever the
/// service, while ingress ports (served by the mesh) and other ports/protocols do not collide.
#[test]
fn host_ports_allow_one_holder_per_node() {
    use PortMode::{Host, Ingress};
    use PortProtocol::{Tcp, Udp};
    let nodes: Vec<Node> = (1..=3)
        .map(|i| node(&format!("n{i}"), "a", 4000, 8 * GIB))
        .collect();
    let cases: Vec<HostPortCase> = vec![
        (
            "own tasks: at most one per node",
            None,
            host_port(spec("web"), 8080, Tcp, Host),
            4,
            &["n1", "n2", "n3"],
            Some("0/3 nodes: 3 host port 8080 in use"),
        ),
        (
            "another service holds the port on n1",
            Some(host_port(spec("other"), 8080, Tcp, Host)),
            host_port(spec("web"), 8080, Tcp, Host),
            3,
            &["n2", "n3"],
            Some("0/3 nodes: 3 host port 8080 in use"),
        ),
        (
            "an ingress port of another service does not hold the node port",
            Some(host_port(spec("other"), 8080, Tcp, Ingress)),
            host_port(spec("web"), 8080, Tcp, Host),
            3,
            &["n1", "n2", "n3"],
            None,
        ),
        (
            "udp and tcp are different ports",
            Some(host_port(spec("other"), 8080, Udp, Host)),
            host_port(spec("web"), 8080, Tcp, Host),
            3,
            &["n1", "n2", "n3"],
            None,
        ),
        (
            "a different host port does not collide",
            Some(host_port(spec("other"), 8081, Tcp, Host)),
            host_port(spec("web"), 8080, Tcp, Host),
            3,
            &["n1", "n2", "n3"],
            None,
        ),
        (
            "udp is named in the reason",
            None,
            host_port(spec("web"), 5353, Udp, Host),
            4,
            &["n1", "n2", "n3"],
            Some("0/3 nodes: 3 host port 5353/udp in use"),
        ),
        (
            "ingress ports place freely",
            None,
            host_port(spec("web"), 8080, Tcp, Ingress),
            6,
            &["n1", "n2", "n3"],
            None,
        ),
    ];
    for (name, resident, web, count, want_nodes, want_reason) in cases {
        let tasks: Vec<Task> = resident.iter().map(|s| task("r1", s, "n1")).collect();
        let mut snap = ClusterSnapshot::new(&nodes, &tasks, 0);
        let (placed, reason) = match schedule(&mut snap, &PlacementRequest::new(&web, count)) {
            Ok(p) => (p, None),
            Err(f) => (f.placed, Some(f.reason)),
        };
        let got: BTreeSet<String> = placed.iter().map(|p| p.node.clone()).collect();
        assert_eq!(got, set(want_nodes), "{name}");
        assert_eq!(reason.as_deref(), want_reason, "{name}");
    }
}

/// A stopping task keeps its port bound until it exits; a finished one holds nothing; evicting a
/// holder (preemption) frees the port.
#[test]
fn host_ports_follow_stopping_finished_and_evicted_tasks() {
    let nodes = vec![node("n1", "a", 2000, 8 * GIB)];
    let web = host_port(spec("web"), 8080, PortProtocol::Tcp, PortMode::Host);
    let mut stopping = task("w1", &web, "n1");
    stopping.desired_state = flotilla_types::DesiredState::Shutdown;
    let mut snap = ClusterSnapshot::new(&nodes, [], 0);
    snap.hold_stopping(&stopping);
    let err = schedule(&mut snap, &PlacementRequest::new(&web, 1)).unwrap_err();
    assert_eq!(err.reason, "0/1 nodes: 1 host port 8080 in use");

    let mut exited = stopping.clone();
    exited.status.state = flotilla_types::TaskState::Exited;
    let mut snap = ClusterSnapshot::new(&nodes, [&exited], 0);
    snap.hold_stopping(&exited);
    assert!(schedule(&mut snap, &PlacementRequest::new(&web, 1)).is_ok());

    // A low-priority holder evicted for cpu gives its port back to the pass.
    let batch = host_port(
        reserve(spec("batch"), 2000, GIB),
        9090,
        PortProtocol::Tcp,
        PortMode::Host,
    );
    let mut urgent = reserve(spec("urgent"), 2000, GIB);
    urgent.placement.priority = 500;
    let resident = task("b1", &batch, "n1");
    let mut snap = ClusterSnapshot::new(&nodes, [&resident], 0);
    let placed = schedule(&mut snap, &PlacementRequest::new(&urgent, 1)).unwrap();
    assert_eq!(placed[0].evictions, vec!["b1".to_string()]);
    let small = host_port(spec("small"), 9090, PortProtocol::Tcp, PortMode::Host);
    assert!(schedule(&mut snap, &PlacementRequest::new(&small, 1)).is_ok());
}
