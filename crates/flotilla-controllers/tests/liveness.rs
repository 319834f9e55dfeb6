//! Node-down verdicts through the shared [`Harness`]: when too many nodes look down at once
//! (the whole cluster's majority, or a whole zone), their tasks are kept rather than replaced,
//! and one event says so per episode.
#![allow(clippy::unwrap_used)] // tests fail loudly on broken setup

use flotilla_controllers::harness::{AgentBehaviour, Harness};
use flotilla_types::testing::{node, spec};
use flotilla_types::{Event, Node, NodeState, TaskState};
use std::collections::BTreeMap;
use std::time::Duration;

/// `nodes`, a 5 s grace, and `service` running (each task needs most of a node, so every node
/// holds one).
async fn running(nodes: Vec<Node>, service: flotilla_types::ServiceSpec) -> Harness {
    let mut h = Harness::with_nodes(nodes).await;
    h.cfg.node_grace = Duration::from_secs(5);
    let want = match service.mode {
        flotilla_types::ServiceMode::Replicated { replicas } => replicas as usize,
        flotilla_types::ServiceMode::Global => h.read(|s| s.nodes.len()),
    };
    let name = service.name.clone();
    h.deploy(&[service]).await;
    for _ in 0..10 {
        h.pass().await;
        h.agent(AgentBehaviour::default()).await;
        h.advance(100);
    }
    let live = h.live(&name);
    assert_eq!(live.len(), want);
    assert!(live.iter().all(|t| t.status.state == TaskState::Running));
    h
}

/// Ten seconds in which only `alive` send heartbeats, a pass and an agent step each second.
async fn silence(h: &mut Harness, alive: &[&str]) {
    for _ in 0..10 {
        h.advance(1000);
        for n in alive {
            h.heartbeat(n).await;
        }
        h.pass().await;
        h.agent(AgentBehaviour::default()).await;
    }
}

/// Task id → node of the live tasks of `service`.
fn placement(h: &Harness, service: &str) -> BTreeMap<String, Option<String>> {
    h.live(service)
        .into_iter()
        .map(|t| (t.id, t.node))
        .collect()
}

fn episodes(h: &Harness) -> Vec<Event> {
    h.events()
        .into_iter()
        .filter(|e| e.kind == "cluster")
        .collect()
}

fn web(replicas: u64) -> flotilla_types::ServiceSpec {
    spec("web").replicas(replicas).reserve(1500, 0).build()
}

#[tokio::test]
async fn most_nodes_going_silent_at_once_keeps_their_tasks_and_says_so_once() {
    let nodes = vec![node("n1").build(), node("n2").build(), node("n3").build()];
    let mut h = running(nodes, web(3)).await;
    let before = placement(&h, "web");

    silence(&mut h, &["n1"]).await;
    let states = h.read(|s| s.nodes.values().map(|n| n.state).collect::<Vec<_>>());
    assert_eq!(states, [NodeState::Ready, NodeState::Down, NodeState::Down]);
    assert_eq!(placement(&h, "web"), before, "no task lost or replaced");
    let began = episodes(&h);
    assert_eq!(began.len(), 1, "one event per episode: {began:?}");
    assert_eq!(began[0].action, "began");
    assert_eq!(began[0].level, flotilla_types::EventLevel::Warning);
    assert!(began[0].message.contains("n2, n3"), "{}", began[0].message);

    // They come back: the nodes are ready, the episode ends, and nothing was restarted.
    silence(&mut h, &["n1", "n2", "n3"]).await;
    assert!(h.read(|s| s.nodes.values().all(|n| n.state == NodeState::Ready)));
    assert_eq!(placement(&h, "web"), before);
    let all = episodes(&h);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[1].action, "ended");
}

#[tokio::test]
async fn one_dead_worker_of_three_is_still_replaced() {
    let nodes = vec![node("n1").build(), node("n2").build(), node("n3").build()];
    let mut h = running(nodes, spec("web").replicas(3).build()).await;
    let on_n3: Vec<String> = h
        .live("web")
        .into_iter()
        .filter(|t| t.node.as_deref() == Some("n3"))
        .map(|t| t.id)
        .collect();

    silence(&mut h, &["n1", "n2"]).await;
    assert_eq!(h.read(|s| s.nodes["n3"].state), NodeState::Down);
    for id in &on_n3 {
        assert_eq!(h.read(|s| s.tasks[id].status.state), TaskState::Lost);
    }
    let live = h.live("web");
    assert_eq!(live.len(), 3);
    assert!(live.iter().all(|t| t.node.as_deref() != Some("n3")));
    assert!(episodes(&h).is_empty());
}

#[tokio::test]
async fn a_zone_going_dark_keeps_its_global_tasks() {
    let nodes = vec![
        node("a1").zone("a").build(),
        node("a2").zone("a").build(),
        node("b1").zone("b").build(),
        node("b2").zone("b").build(),
        node("b3").zone("b").build(),
    ];
    let mut h = running(nodes, spec("agent").global().build()).await;
    let before = placement(&h, "agent");

    // Two of five nodes is no cluster-wide disruption, but it is all of zone a.
    silence(&mut h, &["b1", "b2", "b3"]).await;
    assert_eq!(h.read(|s| s.nodes["a1"].state), NodeState::Down);
    assert_eq!(h.read(|s| s.nodes["a2"].state), NodeState::Down);
    assert_eq!(placement(&h, "agent"), before, "not lost, not stopped");
    assert_eq!(episodes(&h).len(), 1);
}

#[tokio::test]
async fn removing_a_held_node_replaces_its_tasks() {
    let nodes = ["n1", "n2", "n3", "n4"].map(|n| node(n).build()).to_vec();
    let mut h = running(nodes, web(4)).await;
    silence(&mut h, &["n1"]).await;
    let on = |h: &Harness, n: &str| -> Vec<String> {
        h.tasks("web")
            .into_iter()
            .filter(|t| t.node.as_deref() == Some(n))
            .map(|t| t.id)
            .collect()
    };
    let (on_n2, on_n4) = (on(&h, "n2"), on(&h, "n4"));
    assert_eq!((on_n2.len(), on_n4.len()), (1, 1));

    // The operator gives up on n4 (`node rm`): its task is lost and replaced, while n2 and n3
    // (2 of the 3 nodes left) still hold theirs.
    h.must_write(vec![flotilla_store::Op::DeleteNode {
        id: "n4".into(),
        expect: flotilla_store::Expect::Exists,
    }])
    .await;
    h.pass().await;
    h.pass().await;
    assert_eq!(h.read(|s| s.tasks[&on_n4[0]].status.state), TaskState::Lost);
    assert_eq!(
        h.read(|s| s.tasks[&on_n2[0]].status.state),
        TaskState::Running
    );
    let live = h.live("web");
    assert_eq!(live.len(), 4, "a replacement is created");
    assert!(!live.iter().any(|t| t.id == on_n4[0]));
}
