//! The reconcile pass against a real store through the shared [`Harness`]: placement order,
//! preemption, lost nodes, node-down verdicts, restart backoff and stop-first releases.
#![allow(clippy::unwrap_used)] // tests fail loudly on broken setup

use flotilla_controllers::harness::{running_over_time, AgentBehaviour, Harness};
use flotilla_store::{CommandResult, Expect, Op};
use flotilla_types::testing::{node, spec};
use flotilla_types::{
    Availability, DesiredState, MaxUnavailable, NodeState, RolloutPhase, ServiceSpec, Task,
    TaskState, TaskStatus, UpdateOrder,
};
use std::time::Duration;

const AGENT: AgentBehaviour = AgentBehaviour {
    healthy: true,
    fail_revision: None,
};

/// Steps until `done` holds (at most `steps` steps of `step_ms`).
async fn run_until(
    h: &mut Harness,
    steps: usize,
    step_ms: i64,
    done: impl Fn(&Harness) -> bool,
) -> bool {
    for _ in 0..steps {
        if done(h) {
            return true;
        }
        h.run(1, step_ms, AGENT).await;
    }
    done(h)
}

fn all_running(h: &Harness, service: &str, n: usize) -> bool {
    let live = h.live(service);
    live.len() == n && live.iter().all(|t| t.status.state == TaskState::Running)
}

/// One 2-core node full of four priority-100 `batch` tasks (500m each), all running.
async fn full_node(batch: ServiceSpec) -> Harness {
    let mut h = Harness::with_nodes([node("n1").cpu(2000).build()]).await;
    h.deploy(&[batch]).await;
    assert!(run_until(&mut h, 10, 100, |h| all_running(h, "batch", 4)).await);
    h
}

fn batch() -> ServiceSpec {
    spec("batch")
        .replicas(4)
        .reserve(500, 0)
        .priority(100)
        .build()
}

/// [`batch`] that may lose two tasks at once.
fn batch_budget_two() -> ServiceSpec {
    let mut s = batch();
    s.rollout.disruption.max_unavailable = Some(MaxUnavailable::Count(2));
    s
}

fn urgent() -> ServiceSpec {
    spec("urgent").reserve(1000, 0).priority(900).build()
}

fn unplaced(h: &Harness, service: &str) -> Vec<Task> {
    h.live(service)
        .into_iter()
        .filter(|t| t.node.is_none())
        .collect()
}

#[tokio::test]
async fn preemption_stops_victims_and_places_once_they_exit() {
    let mut h = full_node(batch_budget_two()).await;
    h.deploy(&[urgent()]).await;

    // Pass 1: two batch tasks are told to stop, with the reason; urgent waits for them,
    // nominated for the node.
    h.pass().await;
    let victims: Vec<Task> = h
        .tasks("batch")
        .into_iter()
        .filter(|t| t.desired_state == DesiredState::Shutdown)
        .collect();
    assert_eq!(victims.len(), 2, "{victims:?}");
    for v in &victims {
        assert_eq!(v.status.state, TaskState::Stopping);
        assert_eq!(
            v.status.message,
            "preempted by urgent.1 (priority 900 > 100)"
        );
    }
    let u = h.live("urgent");
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].node, None, "not assigned while the victims still run");
    let nomination = u[0].nomination.clone().expect("nominated");
    assert_eq!(nomination.node, "n1");
    let mut ids: Vec<String> = victims.iter().map(|v| v.id.clone()).collect();
    let mut got = nomination.victims.clone();
    ids.sort();
    got.sort();
    assert_eq!(got, ids);
    assert_eq!(
        u[0].status.message,
        format!(
            "preempting on node n1: waiting for 2 lower-priority tasks to stop ({})",
            nomination.victims.join(", ")
        )
    );

    // Pass 2: the victims are still stopping. Urgent keeps waiting; batch's replacements
    // find no room (the stopping tasks still hold it) and say why.
    h.advance(100);
    h.pass().await;
    assert_eq!(h.live("urgent")[0].node, None);
    let pending = unplaced(&h, "batch");
    assert_eq!(pending.len(), 2);
    for t in &pending {
        assert_eq!(t.status.message, "0/1 nodes: 1 insufficient cpu");
    }

    // The first victim exits; the second is still stopping. The room the first freed stays
    // reserved for urgent: batch's replacements must not take it.
    h.advance(50);
    h.report(
        &ids[0],
        TaskStatus::new(TaskState::Exited, h.now, "stopped"),
    )
    .await;
    h.advance(25);
    h.pass().await;
    assert_eq!(h.live("urgent")[0].node, None);
    assert_eq!(
        unplaced(&h, "batch").len(),
        2,
        "a replacement took the room reserved for the preemptor"
    );

    // The last victim exits: urgent gets the room, batch's replacements stay pending.
    h.advance(25);
    h.report(
        &ids[1],
        TaskStatus::new(TaskState::Exited, h.now, "stopped"),
    )
    .await;
    h.advance(100);
    h.pass().await;
    let u = h.live("urgent");
    assert_eq!(u[0].node.as_deref(), Some("n1"));
    assert_eq!(u[0].status.state, TaskState::Assigned);
    assert_eq!(
        u[0].nomination, None,
        "the nomination ends with the assignment"
    );
    assert_eq!(h.live("batch").len(), 4);
    assert_eq!(unplaced(&h, "batch").len(), 2);

    // Steady state: nothing else is preempted or moved.
    h.advance(100);
    let plan = h.plan();
    assert!(
        plan.batches.iter().flatten().all(|op| !matches!(op,
            Op::PutTask { task, .. } if task.desired_state == DesiredState::Shutdown)),
        "{plan:?}"
    );
}

#[tokio::test]
async fn preemption_honours_the_victims_disruption_budget() {
    // The default budget of 4 replicas is 1, and urgent needs two batch tasks gone.
    let h = full_node(batch()).await;
    h.deploy(&[urgent()]).await;
    h.pass().await;
    assert_eq!(h.live("batch").len(), 4, "nothing preempted");
    let u = h.live("urgent");
    assert_eq!(u[0].node, None);
    assert_eq!(u[0].status.message, "0/1 nodes: 1 insufficient cpu");

    // A budget of 2 with one replica already unavailable leaves room for one eviction only:
    // still not enough.
    let h = full_node(batch_budget_two()).await;
    let b = h.live("batch")[3].id.clone();
    h.report(&b, TaskStatus::new(TaskState::Starting, h.now, ""))
        .await;
    h.deploy(&[urgent()]).await;
    h.pass().await;
    assert!(h
        .tasks("batch")
        .iter()
        .all(|t| t.desired_state == DesiredState::Running));

    // Equal priority is never preempted.
    let mut h = full_node(batch()).await;
    h.deploy(&[spec("peer").reserve(1000, 0).priority(100).build()])
        .await;
    h.advance(100);
    h.pass().await;
    assert!(h
        .tasks("batch")
        .iter()
        .all(|t| t.desired_state == DesiredState::Running));
}

/// `urgent` is nominated on the full node n1; then n1 is removed and an empty node n2 with
/// `cpu` millicores joins.
async fn nominate_then_replace_node(cpu: u64) -> Harness {
    let h = full_node(batch_budget_two()).await;
    h.deploy(&[urgent()]).await;
    h.pass().await;
    assert!(h.live("urgent")[0].nomination.is_some());
    let version = h.read(|s| s.nodes["n1"].meta.version);
    h.must_write(vec![Op::DeleteNode {
        id: "n1".into(),
        expect: Expect::Version(version),
    }])
    .await;
    h.put_node(node("n2").cpu(cpu).heartbeat(h.now).build())
        .await;
    h
}

#[tokio::test]
async fn a_nomination_whose_node_went_away_is_placed_afresh() {
    // The node goes away while the victims stop; a new, empty node joins.
    let mut h = nominate_then_replace_node(2000).await;
    h.advance(100);
    h.pass().await;
    h.advance(100);
    h.pass().await;
    let u = h.live("urgent");
    assert_eq!(u[0].node.as_deref(), Some("n2"));
}

#[tokio::test]
async fn pending_tasks_are_placed_in_priority_order() {
    // Room for one of the three; `a-low` sorts first by name but `b-high` matters more.
    let h = Harness::with_nodes([node("n1").cpu(1000).build()]).await;
    h.deploy(&[
        spec("a-low").reserve(1000, 0).priority(10).build(),
        spec("b-high").reserve(1000, 0).priority(500).build(),
        spec("c-high").reserve(1000, 0).priority(500).build(),
    ])
    .await;
    h.pass().await;
    let placed: Vec<String> = h.read(|s| {
        s.tasks
            .values()
            .filter(|t| t.node.is_some())
            .map(|t| t.service.clone())
            .collect()
    });
    // Equal priorities keep name order: `b-high` before `c-high`.
    assert_eq!(placed, ["b-high"]);
    for s in ["a-low", "c-high"] {
        let t = h.live(s);
        assert_eq!(t[0].node, None);
        assert_eq!(t[0].status.message, "0/1 nodes: 1 insufficient cpu");
    }
}

#[tokio::test]
async fn tasks_of_a_removed_node_are_lost_and_replaced() {
    let mut h =
        Harness::with_nodes([node("n1").cpu(1000).build(), node("gone").cpu(1000).build()]).await;
    h.deploy(&[spec("web").replicas(2).reserve(600, 0).build()])
        .await;
    assert!(run_until(&mut h, 10, 100, |h| all_running(h, "web", 2)).await);
    let on_gone = h
        .live("web")
        .into_iter()
        .find(|t| t.node.as_deref() == Some("gone"))
        .unwrap();
    let version = h.read(|s| s.nodes["gone"].meta.version);
    h.must_write(vec![Op::DeleteNode {
        id: "gone".into(),
        expect: Expect::Version(version),
    }])
    .await;
    h.put_node(node("n3").cpu(1000).heartbeat(h.now).build())
        .await;
    h.pass().await;
    let lost = h.read(|s| s.tasks[&on_gone.id].clone());
    assert_eq!(lost.status.state, TaskState::Lost);
    assert_eq!(lost.desired_state, DesiredState::Shutdown);
    assert_eq!(
        lost.status.message,
        "node gone was removed from the cluster"
    );
    h.advance(100);
    h.pass().await;
    let live = h.live("web");
    assert_eq!(live.len(), 2, "{live:?}");
    assert!(live.iter().all(|t| t.node.as_deref() != Some("gone")));
}

/// Runs until every live task of `service` runs the spec's current template.
async fn until_released(h: &mut Harness, service: &str, replicas: usize) -> bool {
    let service = service.to_string();
    run_until(h, 400, 250, move |h| {
        let done = h.read(|s| {
            s.rollouts
                .get(&service)
                .is_none_or(|r| r.phase == RolloutPhase::Succeeded)
        });
        let current = h.read(|s| {
            let spec = &s.services[&service].spec;
            s.tasks_of(&service)
                .filter(|t| t.desired_state == DesiredState::Running)
                .all(|t| t.spec.task_template_eq(spec))
        });
        done && current && all_running(h, &service, replicas)
    })
    .await
}

#[tokio::test]
async fn restarts_do_not_count_towards_the_restart_backoff() {
    // Issue #21 item 4: after four `service restart`s, a `kill -9` waited 80 s (5 s × 2⁴):
    // the tasks the restarts stopped counted as failures.
    let mut h = Harness::with_nodes([node("n1").build()]).await;
    let mut web = spec("web").build();
    web.rollout.update.monitor = Duration::from_secs(1);
    h.deploy(&[web]).await;
    assert!(until_released(&mut h, "web", 1).await);
    for _ in 0..4 {
        h.restart("web").await;
        h.advance(100);
        assert!(until_released(&mut h, "web", 1).await);
    }
    assert!(
        h.tasks("web")
            .iter()
            .filter(|t| t.status.state.is_terminal())
            .count()
            >= 4
    );

    let victim = h.live("web")[0].clone();
    h.advance(1000);
    h.kill(&victim.id).await;
    h.pass().await;
    let next = h.live("web")[0].clone();
    assert_ne!(next.id, victim.id);
    assert_eq!(next.attempt, 1);
    assert_eq!(
        next.not_before,
        Some(h.now + 5000),
        "the first failure waits the policy's delay: {}",
        next.status.message
    );

    // Real failures still double the wait.
    assert!(run_until(&mut h, 100, 250, |h| all_running(h, "web", 1)).await);
    let second = h.live("web")[0].clone();
    h.advance(1000);
    h.kill(&second.id).await;
    h.pass().await;
    let third = h.live("web")[0].clone();
    assert_eq!(third.attempt, 2);
    assert_eq!(third.not_before, Some(h.now + 10_000));
}

#[tokio::test]
async fn stop_first_never_has_more_than_parallelism_replicas_down() {
    // Issue #21 item 5: with 4 replicas, stop-first stopped slot 1, created its replacement
    // and stopped slot 2 in the same pass, so 2 of 4 were down at once.
    let mut h = Harness::with_nodes([node("n1").cpu(8000).build()]).await;
    let mut v1 = spec("web").replicas(4).build();
    v1.rollout.update.order = UpdateOrder::StopFirst;
    v1.rollout.update.parallelism = 1;
    v1.rollout.update.monitor = Duration::from_secs(1);
    h.deploy(&[v1.clone()]).await;
    assert!(until_released(&mut h, "web", 4).await);

    h.advance(1000);
    let released_at = h.now;
    let mut v2 = v1;
    v2.command = Some(vec!["sleep".into(), "601".into()]);
    h.deploy(&[v2.clone()]).await;
    assert!(until_released(&mut h, "web", 4).await);
    let live = h.live("web");
    assert!(
        live.iter().all(|t| t.spec.task_template_eq(&v2)),
        "{live:?}"
    );

    let timeline = running_over_time(&h.tasks("web"));
    let during: Vec<&(i64, usize)> = timeline
        .iter()
        .filter(|(at, _)| *at >= released_at)
        .collect();
    assert!(!during.is_empty());
    for (at, running) in during {
        assert!(
            *running >= 3,
            "{} of 4 replicas down at {at} (parallelism 1): {timeline:?}",
            4 - running
        );
    }
}

#[tokio::test]
async fn a_heartbeat_landing_before_the_verdict_voids_it() {
    // Issue #21 item 7: under load a node was judged down while its heartbeat was queued;
    // the verdict was refused, but its tasks were lost and replaced anyway.
    let mut h = Harness::with_nodes([node("c1").build()]).await;
    h.cfg.node_grace = Duration::from_secs(5);
    h.cfg.active_since = h.now;
    h.deploy(&[spec("web").replicas(2).build()]).await;
    assert!(run_until(&mut h, 10, 100, |h| all_running(h, "web", 2)).await);
    h.heartbeat("c1").await;
    h.advance(6000);

    // The pass reads an overdue heartbeat; one lands before the pass's writes do.
    let plan = h.plan();
    assert!(plan
        .batches
        .iter()
        .flatten()
        .any(|op| matches!(op, Op::PutNode { node, .. } if node.state == NodeState::Down)));
    h.heartbeat("c1").await;
    let mut refused = 0;
    for batch in plan.batches {
        if !matches!(h.write(batch).await, CommandResult::Applied { .. }) {
            refused += 1;
        }
    }
    assert_eq!(refused, 1, "the verdict is refused");
    h.advance(100);
    h.pass().await;
    assert_eq!(h.read(|s| s.nodes["c1"].state), NodeState::Ready);
    let live = h.live("web");
    assert_eq!(live.len(), 2);
    assert!(
        live.iter().all(|t| t.status.state == TaskState::Running),
        "no task lost: {live:?}"
    );
    assert!(
        !h.events().iter().any(|e| e.message.contains("down")),
        "{:?}",
        h.events()
    );
}

#[tokio::test]
async fn a_node_down_verdict_is_an_event_and_its_tasks_are_lost_after_it() {
    let mut h = Harness::with_nodes([node("c1").build(), node("c2").build()]).await;
    h.cfg.node_grace = Duration::from_secs(5);
    h.cfg.active_since = h.now;
    h.deploy(&[spec("web").replicas(2).build()]).await;
    assert!(run_until(&mut h, 10, 100, |h| all_running(h, "web", 2)).await);
    let on_c1: Vec<String> = h
        .live("web")
        .iter()
        .filter(|t| t.node.as_deref() == Some("c1"))
        .map(|t| t.id.clone())
        .collect();
    assert!(!on_c1.is_empty());

    // c2 keeps sending heartbeats; c1 stops.
    for _ in 0..6 {
        h.advance(1000);
        h.heartbeat("c2").await;
    }
    h.pass().await;
    assert_eq!(h.read(|s| s.nodes["c1"].state), NodeState::Down);
    let events = h.events();
    assert!(
        events
            .iter()
            .any(|e| e.message.starts_with("node c1 down: no heartbeat for 6s")),
        "{events:?}"
    );
    h.advance(100);
    h.pass().await;
    for id in &on_c1 {
        let t = h.read(|s| s.tasks[id].clone());
        assert_eq!(t.status.state, TaskState::Lost);
        assert_eq!(t.status.message, "node c1 is down");
    }
    h.advance(100);
    h.pass().await;
    let live = h.live("web");
    assert_eq!(live.len(), 2);
    assert!(live.iter().all(|t| t.node.as_deref() == Some("c2")));
}

#[tokio::test]
async fn a_new_leader_gives_every_node_a_full_grace_period() {
    let mut h = Harness::with_nodes([node("c1").build()]).await;
    h.cfg.node_grace = Duration::from_secs(5);
    h.advance(60_000);
    // Leader since just now: c1's heartbeat is a minute old, but nobody was watching.
    h.cfg.active_since = h.now;
    h.advance(4_900);
    h.pass().await;
    assert_eq!(h.read(|s| s.nodes["c1"].state), NodeState::Ready);
    h.advance(100);
    h.pass().await;
    assert_eq!(h.read(|s| s.nodes["c1"].state), NodeState::Down);
}

#[tokio::test]
async fn a_drain_does_not_count_towards_the_restart_backoff() {
    let mut h = Harness::with_nodes([node("n1").build(), node("n2").build()]).await;
    h.deploy(&[spec("web").build()]).await;
    assert!(run_until(&mut h, 10, 250, |h| all_running(h, "web", 1)).await);
    let first = h.live("web")[0].clone();
    let from = first.node.clone().unwrap();
    let mut drained = h.read(|s| s.nodes[&from].clone());
    drained.availability = Availability::Drain;
    h.put_node(drained).await;
    assert!(
        run_until(&mut h, 40, 250, |h| {
            let moved = h.live("web");
            let old_done = h.read(|s| s.tasks[&first.id].status.state.is_terminal());
            old_done && moved.len() == 1 && all_running(h, "web", 1)
        })
        .await
    );

    let moved = h.live("web")[0].clone();
    h.advance(1000);
    h.kill(&moved.id).await;
    h.pass().await;
    let next = h.live("web")[0].clone();
    assert_eq!(next.attempt, 1);
    assert_eq!(
        next.not_before,
        Some(h.now + 5000),
        "{}",
        next.status.message
    );
}

#[tokio::test]
async fn a_nomination_that_fits_nowhere_ends_and_the_task_says_why() {
    // The node goes away and a node too small for urgent joins.
    let mut h = nominate_then_replace_node(500).await;
    for _ in 0..3 {
        h.advance(100);
        h.pass().await;
    }
    let u = h.live("urgent");
    assert_eq!(u[0].node, None);
    assert_eq!(u[0].nomination, None);
    assert_eq!(u[0].status.message, "0/1 nodes: 1 insufficient cpu");
}
