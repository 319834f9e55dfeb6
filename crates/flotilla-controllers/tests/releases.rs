//! The release state machine against a real store (redb + single-voter raft). Each test plays
//! the agents' part by reporting task states through the same ops agents use, advances a
//! simulated clock, and checks after every pass that some version can take traffic.
#![allow(clippy::unwrap_used)] // tests fail loudly on broken setup

use flotilla_controllers::harness::{Harness, T0};
use flotilla_controllers::TrafficView;
use flotilla_store::{Command, Expect, Op, Store, StoreConfig};
use flotilla_types::api::{ServiceTraffic, TaskTraffic};
use flotilla_types::release::{CanaryStep, FailureAction};
use flotilla_types::testing::node;
use flotilla_types::{
    DesiredState, Health, Meta, NodeRole, PortSpec, RolloutKind, RolloutPhase, ServiceMode,
    ServiceSpec, Strategy, Task, TaskState, TaskStatus, Timestamp, UpdateOrder,
};
use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::time::Duration;
use tempfile::TempDir;

/// The shared harness, with this file's agent (tasks start and stop in one step).
struct Cluster(Harness);

impl Deref for Cluster {
    type Target = Harness;
    fn deref(&self) -> &Harness {
        &self.0
    }
}

impl DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut Harness {
        &mut self.0
    }
}

impl Cluster {
    async fn new() -> Cluster {
        Cluster(
            Harness::with_nodes([node("n1")
                .role(NodeRole::Manager)
                .cpu(64_000)
                .memory(64 << 30)
                .build()])
            .await,
        )
    }

    /// Deploys `spec` as the service's next revision, as the API does.
    async fn deploy(&self, spec: ServiceSpec) {
        self.0.deploy(&[spec]).await;
    }

    /// One controller pass with what the meshes report.
    async fn pass(&self, traffic: &TrafficView) {
        self.0.pass_with(traffic).await;
    }

    /// The agent's part: assigned tasks start (healthy when `healthy`), tasks told to stop
    /// exit. `fail` names tasks (by revision) whose start fails instead.
    async fn agent(&self, healthy: bool, fail_revision: Option<u64>) {
        let state = self.state();
        for t in state.tasks.values() {
            let Some(node) = &t.node else { continue };
            let mut status = None;
            if t.desired_state == DesiredState::Shutdown && !t.status.state.is_terminal() {
                status = Some(TaskStatus::new(TaskState::Exited, self.now, "stopped"));
            } else if t.desired_state == DesiredState::Running
                && t.status.state == TaskState::Assigned
            {
                let mut st = if fail_revision == Some(t.revision) {
                    TaskStatus::new(TaskState::Failed, self.now, "exit code 1")
                } else {
                    TaskStatus::new(TaskState::Running, self.now, "")
                };
                if t.spec.healthcheck.is_some() && st.state == TaskState::Running {
                    st.health = if healthy {
                        Health::Healthy
                    } else {
                        Health::Starting
                    };
                }
                status = Some(st);
            }
            if let Some(status) = status {
                self.write(vec![Op::SetTaskStatus {
                    id: t.id.clone(),
                    node: node.clone(),
                    status,
                }])
                .await;
            }
        }
    }

    /// Live, ready tasks the mesh would send new requests to.
    fn serving(&self, service: &str) -> Vec<Task> {
        self.live(service)
            .into_iter()
            .filter(|t| t.is_ready() && t.weight.unwrap_or(100) > 0)
            .collect()
    }
}

fn app(version: &str, replicas: u64) -> ServiceSpec {
    let mut spec = ServiceSpec::process(
        "web",
        vec![
            "flotilla".into(),
            "demo-app".into(),
            format!("--version={version}"),
        ],
    );
    spec.mode = ServiceMode::Replicated { replicas };
    spec.rollout.update.monitor = Duration::from_secs(1);
    spec
}

/// Published on 18080, where the mesh speaks HTTP (so it has request metrics).
fn published(mut spec: ServiceSpec) -> ServiceSpec {
    spec.ports.push(PortSpec {
        target: 8080,
        published: Some(18080),
        protocol: Default::default(),
        mode: Default::default(),
    });
    spec.mesh.ports.push(flotilla_types::mesh::MeshPort {
        published: 18080,
        protocol: flotilla_types::mesh::MeshProtocol::Http,
        proxy_protocol: false,
    });
    spec
}

fn version_of(t: &Task) -> String {
    t.spec.command.as_ref().unwrap()[2].clone()
}

/// Traffic the mesh of the one node reports: every live, ready, weighted task is routed, with
/// `requests`/`errors` per second for tasks running `erroring`.
fn traffic_for(c: &Cluster, erroring: Option<(&str, u64, u64)>) -> TrafficView {
    let tasks = c
        .live("web")
        .into_iter()
        .map(|t| {
            let routed = t.is_ready() && t.weight.unwrap_or(100) > 0;
            // Counters grow with the clock: `r` requests and `e` errors per second.
            let secs = u64::try_from((c.now - T0) / 1000).unwrap_or(0);
            let (requests, errors) = match erroring {
                Some((v, r, e)) if version_of(&t).ends_with(v) => (r * secs, e * secs),
                _ => (0, 0),
            };
            TaskTraffic {
                task_id: t.id.clone(),
                weight: t.weight.unwrap_or(100),
                routed_by: u32::from(routed),
                requests,
                errors,
                ..TaskTraffic::default()
            }
        })
        .collect();
    BTreeMap::from([(
        "web".to_string(),
        ServiceTraffic {
            service: "web".into(),
            tasks,
            unreachable_nodes: Vec::new(),
            meshes: Some(1),
        },
    )])
}

/// Runs passes (agent, controller, 250ms of simulated time) until `done`, checking after each
/// that some task serves; returns the number of passes.
async fn drive(
    c: &mut Cluster,
    fail_revision: Option<u64>,
    traffic: impl Fn(&Cluster) -> TrafficView,
    mut check: impl FnMut(&Cluster),
    done: impl Fn(&Cluster) -> bool,
) -> usize {
    for i in 0..400 {
        c.agent(true, fail_revision).await;
        let view = traffic(c);
        c.pass(&view).await;
        assert!(
            !c.serving("web").is_empty(),
            "pass {i}: no task would receive traffic: {:#?}",
            c.live("web")
        );
        check(c);
        if done(c) {
            return i;
        }
        c.advance(250);
    }
    panic!(
        "did not converge; rollout: {:#?}",
        c.state().rollouts.get("web")
    );
}

async fn start_v1(c: &mut Cluster, spec: ServiceSpec) {
    let replicas = spec.mode.replicas().unwrap_or(0) as usize;
    c.deploy(spec).await;
    for _ in 0..4 {
        c.pass(&TrafficView::new()).await;
        c.agent(true, None).await;
        c.advance(100);
    }
    assert_eq!(c.serving("web").len(), replicas, "{:#?}", c.live("web"));
}

fn succeeded(c: &Cluster) -> bool {
    c.state()
        .rollouts
        .get("web")
        .is_some_and(|r| r.phase == RolloutPhase::Succeeded)
}

#[tokio::test]
async fn rolling_start_first_replaces_one_at_a_time_without_losing_capacity() {
    let mut c = Cluster::new().await;
    start_v1(&mut c, app("v1", 3)).await;
    c.deploy(app("v2", 3)).await;
    drive(
        &mut c,
        None,
        |_| TrafficView::new(),
        |c| {
            let live = c.live("web");
            let starting = live
                .iter()
                .filter(|t| version_of(t).ends_with("v2") && !t.is_ready())
                .count();
            assert!(starting <= 1, "parallelism 1 broken: {live:#?}");
            let ready = live.iter().filter(|t| t.is_ready()).count();
            assert!(ready >= 3, "start-first lowered capacity to {ready}");
        },
        succeeded,
    )
    .await;
    let live = c.live("web");
    assert_eq!(live.len(), 3);
    assert!(live.iter().all(|t| version_of(t).ends_with("v2")));
}

/// A rolling update ends only once every mesh routes the new tasks and no old one: a mesh that
/// still routes a stopped v1 task holds the rollout in `routing`.
#[tokio::test]
async fn rolling_succeeds_only_once_no_mesh_routes_an_old_task() {
    let mut c = Cluster::new().await;
    start_v1(&mut c, published(app("v1", 3))).await;
    let old: Vec<String> = c.live("web").iter().map(|t| t.id.clone()).collect();
    c.deploy(published(app("v2", 3))).await;
    // One node's mesh keeps routing the first v1 task for a while after it stopped.
    let stale_until = std::cell::Cell::new(None::<Timestamp>);
    let passes_in_routing = std::cell::Cell::new(0usize);
    drive(
        &mut c,
        None,
        |c| {
            let mut view = traffic_for(c, None);
            let routing = c
                .state()
                .rollouts
                .get("web")
                .is_some_and(|r| r.phase == RolloutPhase::Routing);
            if routing && stale_until.get().is_none() {
                stale_until.set(Some(c.now + 2_000));
            }
            if stale_until.get().is_none_or(|until| c.now < until) {
                if let Some(t) = view.get_mut("web") {
                    t.tasks.push(TaskTraffic {
                        task_id: old[0].clone(),
                        routed_by: 1,
                        ..TaskTraffic::default()
                    });
                }
            }
            view
        },
        |c| {
            let s = c.state();
            let Some(r) = s.rollouts.get("web") else {
                return;
            };
            if r.phase == RolloutPhase::Routing {
                passes_in_routing.set(passes_in_routing.get() + 1);
            }
            if r.phase == RolloutPhase::Succeeded {
                let until = stale_until.get().expect("the rollout went through routing");
                assert!(
                    c.now >= until,
                    "succeeded while a mesh still routed {}",
                    old[0]
                );
            }
        },
        succeeded,
    )
    .await;
    assert!(passes_in_routing.get() > 0);
    assert!(c.live("web").iter().all(|t| version_of(t).ends_with("v2")));
}

#[tokio::test]
async fn rolling_stop_first_stops_the_old_task_before_starting_its_replacement() {
    let mut c = Cluster::new().await;
    start_v1(&mut c, app("v1", 3)).await;
    let mut v2 = app("v2", 3);
    v2.rollout.update.order = UpdateOrder::StopFirst;
    c.deploy(v2).await;
    drive(
        &mut c,
        None,
        |_| TrafficView::new(),
        |c| {
            let live = c.live("web").len();
            assert!(live <= 3, "stop-first ran {live} tasks at once");
        },
        succeeded,
    )
    .await;
    assert!(c.live("web").iter().all(|t| version_of(t).ends_with("v2")));
}

#[tokio::test]
async fn a_failing_rolling_update_is_rolled_back_automatically() {
    let mut c = Cluster::new().await;
    start_v1(&mut c, app("v1", 3)).await;
    let mut v2 = app("v2", 3);
    v2.rollout.update.failure_action = FailureAction::Rollback;
    c.deploy(v2).await;
    drive(
        &mut c,
        Some(2),
        |_| TrafficView::new(),
        |_| {},
        |c| {
            let s = c.state();
            s.rollouts.get("web").is_some_and(|r| {
                r.kind == RolloutKind::AutoRollback && r.phase == RolloutPhase::Succeeded
            })
        },
    )
    .await;
    let s = c.state();
    let r = &s.rollouts["web"];
    assert_eq!(r.from_revision, 2);
    assert_eq!(s.services["web"].revision, 3);
    assert!(
        r.reason.contains("rolled back to revision 1"),
        "{}",
        r.reason
    );
    assert!(c.live("web").iter().all(|t| version_of(t).ends_with("v1")));
    assert_eq!(c.live("web").len(), 3);
    // The failed v2 tasks are acknowledged (no longer meant to run).
    c.pass(&TrafficView::new()).await;
    let s = c.state();
    let stale: Vec<&Task> = s
        .tasks_of("web")
        .filter(|t| t.desired_state == DesiredState::Running && t.status.state.is_terminal())
        .collect();
    assert!(stale.is_empty(), "{stale:#?}");
}

#[tokio::test]
async fn blue_green_moves_traffic_only_once_green_is_ready_and_routed() {
    let mut c = Cluster::new().await;
    start_v1(&mut c, published(app("v1", 3))).await;
    let mut v2 = published(app("v2", 3));
    v2.rollout.strategy = Strategy::BlueGreen;
    v2.rollout.blue_green.scale_down_delay = Duration::from_secs(2);
    c.deploy(v2).await;
    let mut phases = Vec::new();
    drive(
        &mut c,
        None,
        |c| traffic_for(c, None),
        |c| {
            let s = c.state();
            let r = &s.rollouts["web"];
            if phases.last() != Some(&r.phase) {
                phases.push(r.phase);
            }
            for t in c.live("web") {
                let green = version_of(&t).ends_with("v2");
                if green && r.phase == RolloutPhase::StartingNew {
                    assert_eq!(
                        t.weight,
                        Some(0),
                        "green took traffic before all were ready"
                    );
                }
            }
        },
        succeeded,
    )
    .await;
    assert_eq!(
        phases,
        [
            RolloutPhase::StartingNew,
            RolloutPhase::Routing,
            RolloutPhase::DrainingOld,
            RolloutPhase::ScalingDown,
            RolloutPhase::Succeeded
        ]
    );
    let live = c.live("web");
    assert_eq!(live.len(), 3);
    assert!(live
        .iter()
        .all(|t| version_of(t).ends_with("v2") && t.weight.is_none()));
}

#[tokio::test]
async fn blue_green_without_auto_promote_waits_for_promotion() {
    let mut c = Cluster::new().await;
    start_v1(&mut c, published(app("v1", 2))).await;
    let mut v2 = published(app("v2", 2));
    v2.rollout.strategy = Strategy::BlueGreen;
    v2.rollout.blue_green.auto_promote = false;
    v2.rollout.blue_green.scale_down_delay = Duration::ZERO;
    c.deploy(v2).await;
    drive(
        &mut c,
        None,
        |c| traffic_for(c, None),
        |_| {},
        |c| c.state().rollouts["web"].phase == RolloutPhase::AwaitingPromotion,
    )
    .await;
    // Held: more passes change nothing, blue still runs at weight 0.
    for _ in 0..8 {
        c.advance(1000);
        c.pass(&traffic_for(&c, None)).await;
    }
    assert_eq!(
        c.state().rollouts["web"].phase,
        RolloutPhase::AwaitingPromotion
    );
    assert_eq!(c.live("web").len(), 4);
    let mut r = c.state().rollouts["web"].clone();
    let version = r.meta.version;
    r.promote_requested = true;
    c.write(vec![Op::PutRollout {
        rollout: r,
        expect: Expect::Version(version),
    }])
    .await;
    drive(&mut c, None, |c| traffic_for(c, None), |_| {}, succeeded).await;
    assert!(c.live("web").iter().all(|t| version_of(t).ends_with("v2")));
}

#[tokio::test]
async fn canary_with_errors_is_aborted_at_the_first_step_and_blue_keeps_serving() {
    let mut c = Cluster::new().await;
    start_v1(&mut c, published(app("v1", 2))).await;
    let mut v2 = published(app("v2", 2));
    v2.rollout.strategy = Strategy::Canary;
    v2.rollout.canary.steps = vec![
        CanaryStep {
            weight: 10,
            pause: Some(Duration::from_secs(30)),
        },
        CanaryStep {
            weight: 50,
            pause: Some(Duration::from_secs(30)),
        },
    ];
    v2.rollout.canary.analysis.interval = Duration::from_secs(2);
    c.deploy(v2).await;
    let mut max_weight = 0;
    drive(
        &mut c,
        None,
        // The canary answers 20 of 100 requests with errors.
        |c| traffic_for(c, Some(("v2", 100, 20))),
        |c| {
            for t in c.live("web") {
                if version_of(&t).ends_with("v2") {
                    max_weight = max_weight.max(t.weight.unwrap_or(100));
                }
            }
        },
        |c| c.state().rollouts["web"].kind == RolloutKind::AutoRollback,
    )
    .await;
    let s = c.state();
    let r = &s.rollouts["web"];
    assert!(
        r.reason.contains("canary analysis failed at step 1"),
        "{}",
        r.reason
    );
    assert!(max_weight <= 10, "the canary got weight {max_weight}");
    // Next passes retire the canaries and give blue its full weight back.
    drive(&mut c, None, |c| traffic_for(c, None), |_| {}, succeeded).await;
    let live = c.live("web");
    assert_eq!(live.len(), 2);
    assert!(live
        .iter()
        .all(|t| version_of(t).ends_with("v1") && t.weight.is_none()));
}

#[tokio::test]
async fn canary_with_good_metrics_walks_its_steps_to_full_weight() {
    let mut c = Cluster::new().await;
    start_v1(&mut c, published(app("v1", 2))).await;
    let mut v2 = published(app("v2", 2));
    v2.rollout.strategy = Strategy::Canary;
    v2.rollout.canary.steps = vec![CanaryStep {
        weight: 25,
        pause: Some(Duration::from_secs(4)),
    }];
    v2.rollout.canary.analysis.interval = Duration::from_secs(1);
    c.deploy(v2).await;
    let mut weights = Vec::new();
    drive(
        &mut c,
        None,
        |c| traffic_for(c, Some(("v2", 1000, 0))),
        |c| {
            // The weight the canary tasks actually carry (what the meshes route by).
            let w = c
                .live("web")
                .iter()
                .filter(|t| version_of(t).ends_with("v2"))
                .map(|t| t.weight.unwrap_or(100))
                .max()
                .unwrap_or(0);
            if weights.last() != Some(&w) {
                weights.push(w);
            }
        },
        succeeded,
    )
    .await;
    assert_eq!(weights, [0, 25, 100]);
    let r = &c.state().rollouts["web"];
    assert!(r.analysis.iter().all(|a| a.passed), "{:#?}", r.analysis);
    assert!(!r.analysis.is_empty());
    assert!(c.live("web").iter().all(|t| version_of(t).ends_with("v2")));
}

#[tokio::test]
async fn restart_replaces_every_task_with_a_fresh_one_of_the_same_revision() {
    let mut c = Cluster::new().await;
    start_v1(&mut c, app("v1", 3)).await;
    let before: Vec<String> = c.live("web").into_iter().map(|t| t.id).collect();
    c.restart("web").await;
    c.advance(1);
    drive(&mut c, None, |_| TrafficView::new(), |_| {}, succeeded).await;
    let live = c.live("web");
    assert_eq!(live.len(), 3);
    assert!(live
        .iter()
        .all(|t| !before.contains(&t.id) && t.revision == 1));
}

#[tokio::test]
async fn rollouts_survive_a_store_reopen() {
    let dir = TempDir::new().unwrap();
    let cfg = || StoreConfig {
        data_dir: dir.path().join("data"),
        node_id: 1,
        advertise_addr: "127.0.0.1:1".into(),
    };
    let store = Store::open(cfg()).await.unwrap();
    store.bootstrap_single().await.unwrap();
    let r = flotilla_types::Rollout::new(
        "web",
        RolloutKind::Update,
        Strategy::BlueGreen,
        Default::default(),
        1,
        2,
        T0,
        String::new(),
    );
    store
        .write(Command::new(vec![Op::PutRollout {
            rollout: r,
            expect: Expect::Absent,
        }]))
        .await
        .unwrap();
    store.shutdown().await.unwrap();
    drop(store);
    let store = Store::open(cfg()).await.unwrap();
    let back = store.read(|s| s.rollouts.get("web").cloned()).unwrap();
    assert_eq!(back.strategy, Strategy::BlueGreen);
    assert_eq!(back.phase, RolloutPhase::StartingNew);
    store.shutdown().await.unwrap();
}

/// `ports: [{target: 8080, published: 18080, mode: host}]`: one task per node can hold it.
fn host_port(mut spec: ServiceSpec) -> ServiceSpec {
    spec.ports.push(PortSpec {
        target: 8080,
        published: Some(18080),
        protocol: Default::default(),
        mode: flotilla_types::PortMode::Host,
    });
    spec
}

impl Cluster {
    /// A second node like `n1`, so two tasks can hold the same host port.
    async fn add_node(&self, id: &str) {
        let mut node = self.state().nodes["n1"].clone();
        node.id = id.into();
        node.hostname = id.into();
        node.meta = Meta::default();
        self.write(vec![Op::PutNode {
            node,
            expect: Expect::Absent,
        }])
        .await;
    }

    fn rollout_events(&self) -> Vec<String> {
        self.store
            .events(0, 10_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "rollout")
            .map(|e| format!("{} {}", e.action, e.message))
            .collect()
    }
}

/// Runs passes until `done` like [`drive`], but a host port is reached directly, not through
/// the mesh weights: returns the most slots that lacked a ready task after any pass.
async fn drive_host_ports(
    c: &mut Cluster,
    replicas: usize,
    fail_revision: Option<u64>,
    done: impl Fn(&Cluster) -> bool,
) -> usize {
    let mut most_unavailable = 0;
    for _ in 0..400 {
        c.agent(true, fail_revision).await;
        let view = traffic_for(c, None);
        c.pass(&view).await;
        let ready = c.live("web").iter().filter(|t| t.is_ready()).count();
        most_unavailable = most_unavailable.max(replicas.saturating_sub(ready));
        if done(c) {
            return most_unavailable;
        }
        c.advance(250);
    }
    panic!(
        "did not converge; rollout: {:#?}",
        c.state().rollouts.get("web")
    );
}

#[tokio::test]
async fn blue_green_with_host_ports_shrinks_blue_within_the_budget_and_restores() {
    let mut c = Cluster::new().await;
    c.add_node("n2").await;
    start_v1(&mut c, host_port(app("v1", 2))).await;
    let mut v2 = host_port(app("v2", 2));
    v2.rollout.strategy = Strategy::BlueGreen;
    c.deploy(v2).await;
    // Both nodes hold the port: every green task needs a blue one gone first, and the
    // default budget (1 of 2) lets one go at a time.
    let most_unavailable = drive_host_ports(&mut c, 2, None, succeeded).await;
    assert_eq!(
        most_unavailable, 1,
        "the budget allows one task down at a time"
    );
    let s = c.state();
    assert_eq!(s.rollouts["web"].shrunk, 2);
    let live = c.live("web");
    assert_eq!(live.len(), 2, "{live:#?}");
    assert!(live.iter().all(|t| version_of(t).ends_with("v2")));
    let nodes: std::collections::BTreeSet<_> = live.iter().map(|t| t.node.clone()).collect();
    assert_eq!(nodes.len(), 2, "one task per node holds the host port");
    let events = c.rollout_events();
    assert!(
        events.iter().any(|e| e.starts_with("shrink ")),
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| e.starts_with("restore ")),
        "{events:#?}"
    );
}

/// One node, one replica: blue must stop before green can start. Green never starts, so blue
/// is restored (stop-first) and the reason says so.
#[tokio::test]
async fn blue_green_with_host_ports_restores_blue_when_green_fails() {
    let mut c = Cluster::new().await;
    start_v1(&mut c, host_port(app("v1", 1))).await;
    let mut v2 = host_port(app("v2", 1));
    v2.rollout.strategy = Strategy::BlueGreen;
    c.deploy(v2).await;
    drive_host_ports(&mut c, 1, Some(2), |c| {
        c.state().rollouts.get("web").is_some_and(|r| {
            r.kind == RolloutKind::AutoRollback && r.phase == RolloutPhase::Succeeded
        })
    })
    .await;
    let s = c.state();
    let r = &s.rollouts["web"];
    assert!(
        r.reason.contains("restoring 1 shrunk blue task"),
        "{}",
        r.reason
    );
    let live = c.live("web");
    assert_eq!(live.len(), 1, "{live:#?}");
    assert!(version_of(&live[0]).ends_with("v1") && live[0].is_ready());
    let events = c.rollout_events();
    assert!(
        events.iter().any(|e| e.starts_with("shrink ")),
        "{events:#?}"
    );
}
