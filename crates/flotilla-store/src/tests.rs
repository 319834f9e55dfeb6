//! Tests against real redb files in temporary directories and a real (single-voter) raft node.

use super::*;
use crate::storage::{LogStore, Shared, StateMachine, CHANGE_RING_CAPACITY, CHANGE_RING_MAX_BYTES};
use flotilla_types::testing;
use flotilla_types::{
    DesiredState, EventLevel, Health, Meta, Node, NodeState, Revision, Service, ServiceMode,
    ServiceSpec, Task, TaskState, TaskStatus,
};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{Entry, EntryPayload, LogId, StorageError};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub(crate) fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        data_dir: dir.join("data"),
        node_id: 1,
        advertise_addr: "127.0.0.1:1".to_string(),
    }
}

pub(crate) async fn open_leader(dir: &Path) -> Store {
    let store = Store::open(config(dir)).await.expect("open store");
    store.bootstrap_single().await.expect("bootstrap");
    store
}

fn spec(name: &str, replicas: u64) -> ServiceSpec {
    let mut spec = ServiceSpec::process(name, vec!["sleep".to_string(), "60".to_string()]);
    spec.mode = ServiceMode::Replicated { replicas };
    spec
}

pub(crate) fn service(name: &str, replicas: u64, revision: u64) -> Service {
    Service {
        name: name.to_string(),
        spec: spec(name, replicas),
        revision,
        meta: Meta::default(),
    }
}

fn task(id: &str, service: &str, slot: u64, node: Option<&str>) -> Task {
    let mut t = testing::task(id, &spec(service, 1))
        .slot(Some(slot))
        .status(TaskState::Assigned, 1)
        .build();
    t.node = node.map(str::to_string);
    t
}

fn node(id: &str, state: NodeState) -> Node {
    testing::node(id)
        .hostname(&format!("{id}.local"))
        .memory(1 << 30)
        .state(state)
        .build()
}

fn at(ops: Vec<Op>, at: i64) -> Command {
    Command { ops, at }
}

pub(crate) fn applied(result: CommandResult) -> u64 {
    match result {
        CommandResult::Applied { revision } => revision,
        other => panic!("expected Applied, got {other:?}"),
    }
}

async fn put_service(store: &Store, name: &str, replicas: u64, expect: Expect) -> CommandResult {
    let cmd = Command::new(vec![Op::PutService {
        service: service(name, replicas, 1),
        expect,
    }]);
    store.write(cmd).await.expect("write")
}

#[tokio::test]
async fn create_read_update_sets_versions_and_timestamps() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;

    let put = |replicas, expect, when| {
        at(
            vec![Op::PutService {
                service: service("web", replicas, 1),
                expect,
            }],
            when,
        )
    };
    let r1 = applied(
        store
            .write(put(1, Expect::Absent, 1000))
            .await
            .expect("create"),
    );
    let created = store.read(|s| s.services["web"].clone());
    assert_eq!(
        created.meta,
        Meta {
            version: r1,
            created_at: 1000,
            updated_at: 1000
        }
    );
    assert_eq!(store.revision(), r1);

    let r2 = applied(
        store
            .write(put(3, Expect::Version(r1), 2000))
            .await
            .expect("update"),
    );
    assert!(r2 > r1);
    let updated = store.read(|s| s.services["web"].clone());
    assert_eq!(
        updated.meta,
        Meta {
            version: r2,
            created_at: 1000,
            updated_at: 2000
        }
    );
    assert_eq!(updated.spec.mode.replicas(), Some(3));
    assert_eq!(store.revision(), r2);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn failed_preconditions_leave_state_unchanged() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;
    let r1 = applied(put_service(&store, "web", 1, Expect::Absent).await);
    let before = store.read(|s| s.services.clone());

    match put_service(&store, "web", 5, Expect::Absent).await {
        CommandResult::Conflict {
            op_index: 0,
            reason,
        } => {
            assert!(reason.contains("\"web\" already exists"), "{reason}");
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    match put_service(&store, "web", 5, Expect::Version(r1 + 100)).await {
        CommandResult::Conflict {
            op_index: 0,
            reason,
        } => {
            assert!(reason.contains(&format!("at version {r1}")), "{reason}");
            assert!(
                reason.contains(&format!("expected version {}", r1 + 100)),
                "{reason}"
            );
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    match put_service(&store, "api", 5, Expect::Version(r1)).await {
        CommandResult::NotFound {
            op_index: 0,
            reason,
        } => {
            assert!(reason.contains("\"api\" does not exist"), "{reason}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    let delete_missing = Command::new(vec![Op::DeleteService {
        name: "api".to_string(),
        expect: Expect::Any,
    }]);
    assert!(matches!(
        store.write(delete_missing).await.expect("write"),
        CommandResult::NotFound { op_index: 0, .. }
    ));
    assert_eq!(store.read(|s| s.services.clone()), before);
    store.shutdown().await.expect("shutdown");
}

/// Concurrent coalesced writes may share a raft entry, but each keeps its own result: one
/// refused command does not refuse the others, and competing creates still admit exactly one.
#[tokio::test]
async fn coalesced_writes_keep_their_own_results() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;
    let mut writes = Vec::new();
    for i in 0..40 {
        // Every fourth write competes to create "shared"; the rest create their own service.
        let name = if i % 4 == 0 {
            "shared".to_string()
        } else {
            format!("own-{i}")
        };
        let store = store.clone();
        writes.push(tokio::spawn(async move {
            let cmd = Command::new(vec![Op::PutService {
                service: service(&name, 1, 1),
                expect: Expect::Absent,
            }]);
            (name, store.write_coalesced(cmd).await.expect("write"))
        }));
    }
    let mut shared_created = 0;
    for w in writes {
        match w.await.expect("join") {
            (name, CommandResult::Applied { .. }) if name == "shared" => shared_created += 1,
            (_, CommandResult::Applied { .. }) => {}
            (name, CommandResult::Conflict { op_index: 0, .. }) if name == "shared" => {}
            (name, other) => panic!("write for {name}: unexpected {other:?}"),
        }
    }
    assert_eq!(shared_created, 1);
    assert_eq!(store.read(|s| s.services.len()), 31);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn commands_apply_all_or_nothing_and_see_their_own_writes() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;
    let mut changes = store.subscribe();

    // The second op fails, so the first must not apply either.
    let failing = Command::new(vec![
        Op::PutService {
            service: service("a", 1, 1),
            expect: Expect::Absent,
        },
        Op::DeleteService {
            name: "b".to_string(),
            expect: Expect::Any,
        },
    ]);
    match store.write(failing).await.expect("write") {
        CommandResult::NotFound { op_index: 1, .. } => {}
        other => panic!("expected NotFound at op 1, got {other:?}"),
    }
    assert!(store.read(|s| s.services.is_empty()));
    assert!(
        changes.try_recv().is_err(),
        "a refused command must not publish a batch"
    );

    // Later ops see earlier ops of the same command: the task created by op 1 is updated by op 2.
    let revision = Revision {
        service: "a".to_string(),
        number: 1,
        spec: spec("a", 1),
        created_at: 5,
        created_by: "test".to_string(),
        change: "created".to_string(),
    };
    let ok = Command::new(vec![
        Op::PutService {
            service: service("a", 1, 1),
            expect: Expect::Absent,
        },
        Op::PutRevision {
            revision: revision.clone(),
        },
        Op::PutTask {
            task: task("t1", "a", 1, None),
            expect: Expect::Absent,
        },
        Op::SetTaskDesired {
            id: "t1".to_string(),
            desired: DesiredState::Shutdown,
            expect: Expect::Exists,
        },
    ]);
    let rev = applied(store.write(ok).await.expect("write"));
    let batch = changes.try_recv().expect("batch for the applied command");
    assert_eq!(batch.revision, rev);
    assert_eq!(
        batch.changes.len(),
        3,
        "one change per touched object: {:?}",
        batch.changes
    );
    match &batch.changes[2] {
        Change::Task {
            key,
            object: Some(t),
        } => {
            assert_eq!(key, "t1");
            assert_eq!(t.desired_state, DesiredState::Shutdown);
            assert_eq!(t.meta.version, rev);
        }
        other => panic!("expected the task change, got {other:?}"),
    }
    store.read(|s| {
        assert_eq!(s.tasks["t1"].desired_state, DesiredState::Shutdown);
        assert_eq!(s.revisions_of("a").collect::<Vec<_>>(), vec![&revision]);
    });

    // Revisions are immutable.
    let again = Command::new(vec![Op::PutRevision { revision }]);
    match store.write(again).await.expect("write") {
        CommandResult::Conflict {
            op_index: 0,
            reason,
        } => {
            assert!(
                reason.contains("revision 1 of service \"a\" already exists"),
                "{reason}"
            )
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn task_status_appends_history_and_checks_the_node() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;
    let create = Command::new(vec![Op::PutTask {
        task: task("t1", "web", 2, Some("n1")),
        expect: Expect::Absent,
    }]);
    applied(store.write(create).await.expect("create"));

    let report = |node: &str, status: TaskStatus| {
        Command::new(vec![Op::SetTaskStatus {
            id: "t1".to_string(),
            node: node.to_string(),
            status,
        }])
    };
    let r1 = applied(
        store
            .write(report("n1", TaskStatus::new(TaskState::Running, 10, "")))
            .await
            .expect("running"),
    );
    let mut failed = TaskStatus::new(TaskState::Failed, 20, "exit code 1");
    failed.exit_code = Some(1);
    let r2 = applied(store.write(report("n1", failed)).await.expect("failed"));

    let t = store.read(|s| s.tasks["t1"].clone());
    assert_eq!(t.status.state, TaskState::Failed);
    assert_eq!(t.meta.version, r2);
    let states: Vec<_> = t.history.iter().map(|h| h.state).collect();
    assert_eq!(states, vec![TaskState::Running, TaskState::Failed]);
    assert_eq!(t.history[1].exit_code, Some(1));

    let events: Vec<_> = store
        .events(0, 100)
        .expect("events")
        .into_iter()
        .filter(|e| e.action == "state")
        .collect();
    let messages: Vec<_> = events
        .iter()
        .map(|e| (e.revision, e.message.as_str()))
        .collect();
    assert_eq!(
        messages,
        vec![(r1, "web.2 running"), (r2, "web.2 failed: exit code 1")]
    );
    assert_eq!(events[1].level, EventLevel::Warning);
    assert_eq!(events[1].kind, "task");
    assert_eq!(events[1].object, "t1");

    match store
        .write(report("n2", TaskStatus::new(TaskState::Running, 30, "")))
        .await
        .expect("write")
    {
        CommandResult::Conflict {
            op_index: 0,
            reason,
        } => {
            assert!(
                reason.contains("assigned to node \"n1\", not \"n2\""),
                "{reason}"
            )
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(store.read(|s| s.tasks["t1"].clone()), t);
    let missing = Command::new(vec![Op::SetTaskStatus {
        id: "nope".to_string(),
        node: "n1".to_string(),
        status: TaskStatus::new(TaskState::Running, 30, ""),
    }]);
    assert!(matches!(
        store.write(missing).await.expect("write"),
        CommandResult::NotFound { op_index: 0, .. }
    ));
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn events_describe_service_and_node_lifecycles() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;
    let write = |ops| async { applied(store.write(Command::new(ops)).await.expect("write")) };
    write(vec![Op::PutService {
        service: service("web", 1, 1),
        expect: Expect::Absent,
    }])
    .await;
    write(vec![Op::PutService {
        service: service("web", 3, 1),
        expect: Expect::Any,
    }])
    .await;
    write(vec![Op::PutService {
        service: service("web", 3, 2),
        expect: Expect::Any,
    }])
    .await;
    write(vec![Op::DeleteService {
        name: "web".to_string(),
        expect: Expect::Exists,
    }])
    .await;
    write(vec![Op::PutNode {
        node: node("n1", NodeState::Ready),
        expect: Expect::Absent,
    }])
    .await;
    let mut down = node("n1", NodeState::Down);
    down.message = "missed heartbeats".to_string();
    write(vec![Op::PutNode {
        node: down,
        expect: Expect::Exists,
    }])
    .await;
    let beat = write(vec![Op::NodeHeartbeat {
        id: "n1".to_string(),
        at: 777,
    }])
    .await;
    write(vec![Op::DeleteNode {
        id: "n1".to_string(),
        expect: Expect::Version(beat),
    }])
    .await;

    let seen: Vec<_> = store
        .events(0, 100)
        .expect("events")
        .into_iter()
        .map(|e| (e.kind, e.action, e.message))
        .collect();
    let expected = [
        ("service", "created", "service web created (revision 1)"),
        (
            "service",
            "scaled",
            "service web scaled from 1 to 3 replicas",
        ),
        ("service", "updated", "service web updated to revision 2"),
        ("service", "removed", "service web removed"),
        ("node", "created", "node n1 (n1.local) registered"),
        ("node", "state", "node n1 down: missed heartbeats"),
        ("node", "state", "node n1 ready"),
        ("node", "removed", "node n1 removed"),
    ];
    let expected: Vec<_> = expected
        .iter()
        .map(|(k, a, m)| (k.to_string(), a.to_string(), m.to_string()))
        .collect();
    assert_eq!(seen, expected);
    store.shutdown().await.expect("shutdown");
}

/// `tasks_of` answers from the per-service index the store keeps in step with every write,
/// and after a reopen; a state edited behind the index's back is still answered (by a scan).
#[tokio::test]
async fn tasks_of_follows_writes_deletes_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = |state: &ClusterState, service: &str| -> Vec<String> {
        state.tasks_of(service).map(|t| t.id.clone()).collect()
    };
    let store = open_leader(dir.path()).await;
    let puts = ["a1", "b1", "a2", "b2", "a3"].map(|id| Op::PutTask {
        task: task(id, &id[..1], 1, None),
        expect: Expect::Absent,
    });
    applied(store.write(at(puts.to_vec(), 1)).await.expect("write"));
    applied(
        store
            .write(at(
                vec![Op::DeleteTask {
                    id: "a2".into(),
                    expect: Expect::Any,
                }],
                2,
            ))
            .await
            .expect("write"),
    );
    let state = store.read(Clone::clone);
    assert_eq!(state.task_index.len, state.tasks.len());
    assert_eq!(ids(&state, "a"), ["a1", "a3"]);
    assert_eq!(ids(&state, "b"), ["b1", "b2"]);
    assert!(ids(&state, "c").is_empty());
    store.shutdown().await.expect("shutdown");
    drop(store);

    let store = open_leader(dir.path()).await;
    let mut state = store.read(Clone::clone);
    assert_eq!(ids(&state, "a"), ["a1", "a3"]);
    state.tasks.insert("a9".into(), task("a9", "a", 2, None));
    assert_eq!(ids(&state, "a"), ["a1", "a3", "a9"]);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn heartbeat_marks_a_down_node_ready() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;
    let register = Command::new(vec![Op::PutNode {
        node: node("n1", NodeState::Down),
        expect: Expect::Absent,
    }]);
    applied(store.write(register).await.expect("register"));
    let beat = Command::new(vec![Op::NodeHeartbeat {
        id: "n1".to_string(),
        at: 4242,
    }]);
    let rev = applied(store.write(beat).await.expect("heartbeat"));
    let n = store.read(|s| s.nodes["n1"].clone());
    assert_eq!(n.state, NodeState::Ready);
    assert_eq!(n.last_heartbeat, 4242);
    assert_eq!(n.meta.version, rev);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn subscribers_and_changes_since_follow_applied_commands() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;
    let mut rx = store.subscribe();
    let mut revisions = Vec::new();
    for name in ["a", "b", "c"] {
        revisions.push(applied(put_service(&store, name, 1, Expect::Absent).await));
    }
    for (rev, name) in revisions.iter().zip(["a", "b", "c"]) {
        let batch = rx.recv().await.expect("batch");
        assert_eq!(batch.revision, *rev);
        assert!(
            matches!(&batch.changes[..], [Change::Service { key, object: Some(_) }] if key == name)
        );
        assert_eq!(batch.events.len(), 1);
    }

    let all = store.changes_since(0).expect("ring covers a fresh store");
    assert_eq!(
        all.iter().map(|b| b.revision).collect::<Vec<_>>(),
        revisions
    );
    let tail = store.changes_since(revisions[0]).expect("in ring");
    assert_eq!(
        tail.iter().map(|b| b.revision).collect::<Vec<_>>(),
        revisions[1..]
    );
    assert_eq!(store.changes_since(revisions[2]).expect("in ring"), vec![]);
    store.shutdown().await.expect("shutdown");
    drop(store);

    // After a restart the ring starts empty: older revisions need a full resync.
    let store = open_leader(dir.path()).await;
    assert!(store.revision() >= revisions[2]);
    assert!(store.changes_since(revisions[0]).is_none());
    assert_eq!(store.changes_since(store.revision()), Some(vec![]));
    store.shutdown().await.expect("shutdown");
}

/// Feeds entries straight to the storage layer, the way openraft does, in one apply call.
pub(crate) fn normal_entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(cmd),
    }
}

/// Few but large batches are bounded by bytes, not only by count: 80 writes of a 1 MiB node
/// must not all stay in memory for replay.
#[tokio::test]
async fn change_ring_is_bounded_in_bytes() {
    let dir = TempDir::new().expect("tempdir");
    let (shared, applied_state) =
        Shared::open(&dir.path().join("store.redb"), 100).expect("open storage");
    let mut sm = StateMachine::new(shared.clone(), applied_state);
    let big = "x".repeat(1 << 20);
    let total = 80u64;
    let entries: Vec<_> = (1..=total)
        .map(|i| {
            let mut n = node(&format!("n{i}"), NodeState::Ready);
            n.labels.insert("big".into(), big.clone());
            let ops = vec![Op::PutNode {
                node: n,
                expect: Expect::Absent,
            }];
            normal_entry(i, at(ops, 1))
        })
        .collect();
    sm.apply(entries).await.expect("apply");
    assert!(
        shared.changes_since(0).is_none(),
        "the oldest large batches were evicted"
    );
    let kept = (0..total)
        .find_map(|since| shared.changes_since(since))
        .expect("the newest batches can be replayed");
    assert!(!kept.is_empty());
    assert_eq!(kept.last().map(|b| b.revision), Some(total));
    assert!(
        kept.len() <= CHANGE_RING_MAX_BYTES / (1 << 20),
        "{} batches of 1 MiB kept",
        kept.len()
    );
}

#[tokio::test]
async fn change_ring_forgets_the_oldest_batches() {
    let dir = TempDir::new().expect("tempdir");
    let (shared, applied_state) =
        Shared::open(&dir.path().join("store.redb"), 100).expect("open storage");
    let mut sm = StateMachine::new(shared.clone(), applied_state);
    let total = CHANGE_RING_CAPACITY as u64 + 10;
    let entries: Vec<_> = (1..=total)
        .map(|i| {
            let ops = vec![Op::PutNode {
                node: node(&format!("n{i}"), NodeState::Ready),
                expect: Expect::Absent,
            }];
            normal_entry(i, at(ops, 1))
        })
        .collect();
    let results = sm.apply(entries).await.expect("apply");
    assert_eq!(results.len(), total as usize);
    assert_eq!(
        shared.read(|s| (s.revision, s.nodes.len())),
        (total, total as usize)
    );
    assert!(
        shared.changes_since(5).is_none(),
        "evicted batches cannot be replayed"
    );
    let floor = total - CHANGE_RING_CAPACITY as u64;
    let replay = shared
        .changes_since(floor)
        .expect("ring holds everything above the floor");
    assert_eq!(replay.len(), CHANGE_RING_CAPACITY);
    assert_eq!(replay[0].revision, floor + 1);
    // Only the newest 100 events are kept.
    let events = shared.events(0, usize::MAX).expect("events");
    assert_eq!(events.len(), 100);
    assert_eq!(events[0].revision, total - 99);
}

#[tokio::test]
async fn events_survive_reopen_and_are_trimmed_to_the_newest() {
    let dir = TempDir::new().expect("tempdir");
    let store = Store::open_with_retention(config(dir.path()), 5)
        .await
        .expect("open");
    store.bootstrap_single().await.expect("bootstrap");
    let mut revisions = Vec::new();
    for i in 0..8 {
        revisions.push(applied(
            put_service(&store, &format!("s{i}"), 1, Expect::Absent).await,
        ));
    }
    let events = store.events(0, 100).expect("events");
    assert_eq!(
        events.iter().map(|e| e.revision).collect::<Vec<_>>(),
        revisions[3..]
    );
    store.shutdown().await.expect("shutdown");
    drop(store);

    let store = open_leader(dir.path()).await;
    let events = store.events(0, 100).expect("events");
    assert_eq!(
        events.iter().map(|e| e.revision).collect::<Vec<_>>(),
        revisions[3..]
    );
    assert_eq!(events[0].message, "service s3 created (revision 1)");
    let page = store.events(revisions[4], 2).expect("events");
    assert_eq!(
        page.iter().map(|e| e.revision).collect::<Vec<_>>(),
        revisions[5..7]
    );
    assert_eq!(store.events(u64::MAX, 10).expect("events"), vec![]);
    store.shutdown().await.expect("shutdown");
}

#[test]
fn acknowledged_writes_survive_dropping_without_shutdown() {
    let dir = TempDir::new().expect("tempdir");
    let acked: Vec<u64> = {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let revs = rt.block_on(async {
            let store = open_leader(dir.path()).await;
            let mut revs = Vec::new();
            for i in 0..20 {
                revs.push(applied(
                    put_service(&store, &format!("s{i}"), 1, Expect::Absent).await,
                ));
            }
            revs
        });
        // Dropping the runtime kills the raft task mid-flight: no shutdown, no final flush.
        drop(rt);
        revs
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = Store::open(config(dir.path())).await.expect("reopen");
        // The state machine is not fsynced on its own: what it lacks is replayed from the
        // (durable) log once this node leads again, before `bootstrap_single` returns.
        store.bootstrap_single().await.expect("leader again");
        assert!(store.revision() >= acked[19]);
        for (i, rev) in acked.iter().enumerate() {
            let name = format!("s{i}");
            let version = store.read(|s| s.services.get(&name).map(|svc| svc.meta.version));
            assert_eq!(version, Some(*rev), "service {name}");
        }
        applied(put_service(&store, "after", 1, Expect::Absent).await);
        store.shutdown().await.expect("shutdown");
    });
}

const CRASH_DIR_ENV: &str = "FLOTILLA_STORE_CRASH_DIR";

/// Child half of [`acknowledged_writes_survive_sigkill`]: writes until killed, printing each
/// acknowledged revision. Does nothing unless run by that test.
#[test]
#[ignore = "helper process for acknowledged_writes_survive_sigkill"]
fn crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = open_leader(Path::new(&dir)).await;
        for i in 0.. {
            let rev = applied(put_service(&store, &format!("s{i}"), 1, Expect::Absent).await);
            println!("ACK {i} {rev}");
        }
    });
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = TempDir::new().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Process::new(exe)
        .args([
            "--exact",
            "tests::crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() < 30 {
        assert!(
            Instant::now() < deadline,
            "child acknowledged only {} writes",
            acked.len()
        );
        let line = lines
            .next()
            .expect("child exited early")
            .expect("read child output");
        if let Some(rest) = line.strip_prefix("ACK ") {
            let mut parts = rest.split(' ').map(|p| p.parse::<u64>().expect("number"));
            acked.push((
                parts.next().expect("index"),
                parts.next().expect("revision"),
            ));
        }
    }
    child.kill().expect("SIGKILL child");
    // Acks the child printed before dying are acknowledged writes too.
    for line in lines.map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("ACK ") {
            let mut parts = rest.split(' ').map(|p| p.parse::<u64>().expect("number"));
            acked.push((
                parts.next().expect("index"),
                parts.next().expect("revision"),
            ));
        }
    }
    child.wait().expect("reap child");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = Store::open(config(dir.path()))
            .await
            .expect("reopen after kill");
        store.bootstrap_single().await.expect("leader after crash");
        let last = acked.last().expect("acks").1;
        assert!(
            store.revision() >= last,
            "revision {} < acked {last}",
            store.revision()
        );
        for (i, rev) in &acked {
            let version =
                store.read(|s| s.services.get(&format!("s{i}")).map(|svc| svc.meta.version));
            assert_eq!(version, Some(*rev), "acked write s{i}");
        }
        store.shutdown().await.expect("shutdown");
    });
}

#[tokio::test]
async fn writes_without_a_leader_are_unavailable() {
    let dir = TempDir::new().expect("tempdir");
    let store = Store::open(config(dir.path())).await.expect("open");
    match put_service_result(&store).await {
        Err(StoreError::Unavailable(reason)) => assert!(reason.contains("no leader"), "{reason}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    store.shutdown().await.expect("shutdown");
}

async fn put_service_result(store: &Store) -> Result<CommandResult, StoreError> {
    store
        .write(Command::new(vec![Op::PutService {
            service: service("web", 1, 1),
            expect: Expect::Any,
        }]))
        .await
}

#[tokio::test]
async fn open_rejects_a_malformed_advertise_addr() {
    let dir = TempDir::new().expect("tempdir");
    let mut cfg = config(dir.path());
    for bad in [" ", "host", "host:port", ":7420", "host:70000"] {
        cfg.advertise_addr = bad.to_string();
        match Store::open(cfg.clone()).await {
            Err(StoreError::Config(reason)) => {
                assert!(reason.contains("advertise_addr"), "{reason}")
            }
            Err(other) => panic!("{bad:?}: expected Config error, got {other:?}"),
            Ok(_) => panic!("{bad:?}: expected Config error, got a store"),
        }
    }
}

#[tokio::test]
async fn snapshots_carry_the_whole_state_to_another_store() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;
    let revision = Revision {
        service: "web".to_string(),
        number: 1,
        spec: spec("web", 2),
        created_at: 1,
        created_by: "test".to_string(),
        change: "created".to_string(),
    };
    let mut t = task("t1", "web", 1, Some("n1"));
    t.status.health = Health::Starting;
    let cmd = Command::new(vec![
        Op::PutService {
            service: service("web", 2, 1),
            expect: Expect::Absent,
        },
        Op::PutRevision { revision },
        Op::PutTask {
            task: t,
            expect: Expect::Absent,
        },
        Op::PutNode {
            node: node("n1", NodeState::Ready),
            expect: Expect::Absent,
        },
    ]);
    let rev = applied(store.write(cmd).await.expect("write"));
    let snapshot = build_snapshot(&store, rev).await;
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(rev));
    let source_state = store.read(|s| s.clone());
    store.shutdown().await.expect("shutdown");

    let other = TempDir::new().expect("tempdir");
    let (shared, applied_state) =
        Shared::open(&other.path().join("store.redb"), 100).expect("open");
    let mut sm = StateMachine::new(shared.clone(), applied_state);
    let mut closed = shared.subscribe();
    install(&mut sm, &snapshot).await;
    assert_eq!(shared.read(|s| s.clone()), source_state);
    // One event for the task's creation, one for its state change.
    assert_eq!(shared.events(0, 100).expect("events").len(), 3);
    assert!(shared.changes_since(rev - 1).is_none());
    assert!(matches!(
        closed.try_recv(),
        Err(tokio::sync::broadcast::error::TryRecvError::Closed)
    ));
    let (last, _) = sm.applied_state().await.expect("applied state");
    assert_eq!(last.map(|l| l.index), Some(rev));
    drop(sm);
    drop(shared);

    // The installed state is on disk, not just in memory.
    let (reopened, reopened_applied) =
        Shared::open(&other.path().join("store.redb"), 100).expect("reopen");
    assert_eq!(reopened.read(|s| s.clone()), source_state);
    let current = StateMachine::new(reopened, reopened_applied)
        .get_current_snapshot()
        .await
        .expect("current snapshot");
    assert_eq!(current.map(|s| s.meta), Some(snapshot.meta));
}

/// Builds fresh storage in its own temporary directory for the openraft conformance suite.
struct SuiteBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for SuiteBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = TempDir::new().map_err(|e| {
            StorageError::from_io_error(
                openraft::ErrorSubject::Store,
                openraft::ErrorVerb::Write,
                e,
            )
        })?;
        let (shared, applied_state) =
            Shared::open(&dir.path().join("store.redb"), 100).map_err(|e| {
                StorageError::from(openraft::StorageIOError::<u64>::write(
                    openraft::AnyError::new(&e),
                ))
            })?;
        Ok((
            dir,
            LogStore::new(shared.clone()),
            StateMachine::new(shared, applied_state),
        ))
    }
}

#[test]
fn openraft_storage_conformance() {
    Suite::test_all(SuiteBuilder).expect("openraft storage suite");
}

#[tokio::test]
async fn snapshot_builder_reads_a_consistent_view() {
    let dir = TempDir::new().expect("tempdir");
    let (shared, applied_state) = Shared::open(&dir.path().join("store.redb"), 100).expect("open");
    let mut sm = StateMachine::new(shared.clone(), applied_state);
    let put = |i: u64| {
        normal_entry(
            i,
            at(
                vec![Op::PutNode {
                    node: node(&format!("n{i}"), NodeState::Ready),
                    expect: Expect::Absent,
                }],
                1,
            ),
        )
    };
    sm.apply(vec![put(1), put(2)]).await.expect("apply");
    let mut builder = sm.get_snapshot_builder().await;
    // Applied after the builder was made: must not leak into the snapshot.
    sm.apply(vec![put(3)]).await.expect("apply");
    let snapshot = builder.build_snapshot().await.expect("build");
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(2));
    let body: serde_json::Value =
        serde_json::from_slice(snapshot.snapshot.get_ref()).expect("snapshot is JSON");
    assert_eq!(body["nodes"].as_array().map(Vec::len), Some(2));
}

/// Serves a store's raft RPC the way the API crate does, on an already-bound listener.
fn serve_raft(listener: tokio::net::TcpListener, raft: Raft) -> tokio::task::JoinHandle<()> {
    use axum::extract::State;
    use axum::routing::post;
    use axum::Json;
    use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
    let app =
        axum::Router::new()
            .route(
                network::APPEND_PATH,
                post(
                    |State(raft): State<Raft>,
                     Json(req): Json<AppendEntriesRequest<TypeConfig>>| async move {
                        Json(raft.append_entries(req).await)
                    },
                ),
            )
            .route(
                network::VOTE_PATH,
                post(
                    |State(raft): State<Raft>, Json(req): Json<VoteRequest<u64>>| async move {
                        Json(raft.vote(req).await)
                    },
                ),
            )
            .route(
                network::SNAPSHOT_PATH,
                post(
                    |State(raft): State<Raft>,
                     Json(req): Json<InstallSnapshotRequest<TypeConfig>>| async move {
                        Json(raft.install_snapshot(req).await)
                    },
                ),
            )
            .with_state(raft);
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve raft RPC");
    })
}

/// Opens a store on an ephemeral port and serves its raft RPC there.
async fn open_served(dir: &Path, node_id: u64) -> (Store, String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    let cfg = StoreConfig {
        data_dir: dir.join(format!("node{node_id}")),
        node_id,
        advertise_addr: addr.clone(),
    };
    let store = Store::open(cfg).await.expect("open store");
    let server = serve_raft(listener, store.raft().clone());
    (store, addr, server)
}

async fn wait_for_revision(store: &Store, revision: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.revision() < revision {
        assert!(
            Instant::now() < deadline,
            "node {} stuck at revision {}",
            store.node_id(),
            store.revision()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Has `store` build a snapshot and waits until one covers at least `rev`.
async fn wait_for_snapshot(store: &Store, rev: u64) {
    let raft = store.raft();
    raft.trigger().snapshot().await.expect("trigger snapshot");
    raft.wait(Some(Duration::from_secs(30)))
        .metrics(
            |m| m.snapshot.map(|l| l.index) >= Some(rev),
            "snapshot built",
        )
        .await
        .expect("snapshot built");
}

/// A snapshot of `store` covering at least `rev`.
pub(crate) async fn build_snapshot(store: &Store, rev: u64) -> openraft::Snapshot<TypeConfig> {
    wait_for_snapshot(store, rev).await;
    store
        .raft()
        .get_snapshot()
        .await
        .expect("get snapshot")
        .expect("a snapshot exists")
}

/// Installs `snapshot` into the state machine `sm`, as a follower receiving it would.
pub(crate) async fn install(sm: &mut StateMachine, snapshot: &openraft::Snapshot<TypeConfig>) {
    let mut data = sm.begin_receiving_snapshot().await.expect("begin");
    *data = std::io::Cursor::new(snapshot.snapshot.get_ref().clone());
    sm.install_snapshot(&snapshot.meta, data)
        .await
        .expect("install");
}

/// Builds a snapshot on `leader` covering at least `rev` and purges the log up to it, so a new
/// member can only catch up through the snapshot. Returns the snapshot's index.
async fn snapshot_and_purge(leader: &Store, rev: u64) -> u64 {
    wait_for_snapshot(leader, rev).await;
    let raft = leader.raft();
    let snapshot_index = raft.metrics().borrow().snapshot.map_or(0, |l| l.index);
    raft.trigger()
        .purge_log(snapshot_index)
        .await
        .expect("purge");
    raft.wait(Some(Duration::from_secs(30)))
        .metrics(
            |m| m.purged.map(|l| l.index) >= Some(snapshot_index),
            "log purged",
        )
        .await
        .expect("log purged");
    snapshot_index
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicates_over_http_and_sends_snapshots_to_new_members() {
    let dir = TempDir::new().expect("tempdir");
    let (leader, leader_addr, leader_server) = open_served(dir.path(), 1).await;
    let (follower, follower_addr, follower_server) = open_served(dir.path(), 2).await;
    leader.bootstrap_single().await.expect("bootstrap");
    leader
        .raft()
        .add_learner(2, openraft::BasicNode::new(&follower_addr), true)
        .await
        .expect("add learner");
    leader
        .raft()
        .change_membership([1, 2], false)
        .await
        .expect("promote to voter");

    let rev = applied(put_service(&leader, "web", 2, Expect::Absent).await);
    wait_for_revision(&follower, rev).await;
    assert_eq!(follower.read(|s| s.services["web"].meta.version), rev);
    assert_eq!(follower.current_leader(), Some(1));
    match put_service_result(&follower).await {
        Err(StoreError::NotLeader {
            leader_id,
            leader_addr: addr,
        }) => {
            assert_eq!(leader_id, Some(1));
            assert_eq!(addr.as_deref(), Some(leader_addr.as_str()));
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }

    // Compact the leader's log so a new member can only catch up through a snapshot.
    let snapshot_index = snapshot_and_purge(&leader, rev).await;

    let (learner, learner_addr, learner_server) = open_served(dir.path(), 3).await;
    leader
        .raft()
        .add_learner(3, openraft::BasicNode::new(&learner_addr), true)
        .await
        .expect("add learner from snapshot");
    wait_for_revision(&learner, snapshot_index).await;
    // The state is installed before openraft publishes the snapshot in the metrics; wait for
    // those too (a learner that caught up some other way never gets there).
    learner
        .raft()
        .wait(Some(Duration::from_secs(30)))
        .metrics(
            |m| m.snapshot.map(|l| l.index) == Some(snapshot_index),
            "the learner caught up from a snapshot",
        )
        .await
        .expect("the learner caught up from a snapshot");
    assert_eq!(
        learner.read(|s| s.services.clone()),
        leader.read(|s| s.services.clone())
    );
    assert!(learner
        .events(0, 10)
        .expect("events")
        .iter()
        .any(|e| e.object == "web"));

    for store in [&learner, &follower, &leader] {
        store.shutdown().await.expect("shutdown");
    }
    for server in [learner_server, follower_server, leader_server] {
        server.abort();
    }
}

#[tokio::test]
async fn availability_and_label_changes_produce_events_with_the_reason() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;
    let put = |n: Node| {
        Command::new(vec![Op::PutNode {
            node: n,
            expect: Expect::Any,
        }])
    };
    applied(
        store
            .write(put(node("n1", NodeState::Ready)))
            .await
            .expect("register"),
    );
    let mut paused = node("n1", NodeState::Ready);
    paused.availability = flotilla_types::Availability::Pause;
    paused.message = "auto-paused: 5 tasks failed".into();
    applied(store.write(put(paused)).await.expect("pause"));
    let mut labelled = node("n1", NodeState::Ready);
    labelled.labels.insert("zone".into(), "a".into());
    applied(
        store
            .write(put(labelled))
            .await
            .expect("activate and label"),
    );

    let seen: Vec<_> = store
        .events(0, 100)
        .expect("events")
        .into_iter()
        .filter(|e| e.action != "created")
        .map(|e| (e.level, e.action, e.message))
        .collect();
    assert_eq!(
        seen,
        [
            (
                EventLevel::Warning,
                "availability".to_string(),
                "node n1 availability pause: auto-paused: 5 tasks failed".to_string()
            ),
            (
                EventLevel::Info,
                "availability".to_string(),
                "node n1 availability active".to_string()
            ),
            (
                EventLevel::Info,
                "labels".to_string(),
                "node n1 labels: zone=a".to_string()
            ),
        ]
    );
    store.shutdown().await.expect("shutdown");
}

/// [`Store::force_new_cluster`] once the dropped store's raft tasks have let go of the file
/// (in a process of its own, as `flotilla init` runs it, it is free at once).
async fn force_once_released(cfg: &StoreConfig) -> Option<ForcedCluster> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Store::force_new_cluster(cfg).await {
            Ok(forced) => return forced,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "the store file is still open; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("forcing a new cluster: {e}"),
        }
    }
}

/// `flotilla init --force-new-cluster` at the store level: a follower that caught up through a
/// snapshot is the only survivor of three; rewritten as a one-voter cluster it keeps every
/// write, elects itself and takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_new_cluster_keeps_the_state_of_the_last_survivor() {
    let dir = TempDir::new().expect("tempdir");
    let (leader, _, leader_server) = open_served(dir.path(), 1).await;
    let (second, second_addr, second_server) = open_served(dir.path(), 2).await;
    leader.bootstrap_single().await.expect("bootstrap");
    leader
        .add_manager(2, &second_addr)
        .await
        .expect("add manager 2");
    let rev = applied(put_service(&leader, "before-snapshot", 1, Expect::Absent).await);
    snapshot_and_purge(&leader, rev).await;
    // The survivor joins after the purge, so it starts from an installed snapshot.
    let (third, third_addr, third_server) = open_served(dir.path(), 3).await;
    leader
        .add_manager(3, &third_addr)
        .await
        .expect("add manager 3");
    let rev = applied(put_service(&leader, "after-snapshot", 2, Expect::Absent).await);
    wait_for_revision(&third, rev).await;
    let services = third.read(|s| s.services.clone());
    assert_eq!(services.len(), 2);

    // Managers 1 and 2 are gone for good; 3 alone has no quorum.
    for (store, server) in [(leader, leader_server), (second, second_server)] {
        store.shutdown().await.expect("shutdown");
        server.abort();
    }
    third.shutdown().await.expect("shutdown");
    third_server.abort();
    drop(third);

    let cfg = StoreConfig {
        data_dir: dir.path().join("node3"),
        node_id: 3,
        advertise_addr: "127.0.0.1:3".to_string(),
    };
    let forced = force_once_released(&cfg)
        .await
        .expect("the membership changed");
    assert_eq!(forced.previous_members, vec![1, 2, 3]);
    assert!(
        forced.index > rev,
        "{forced:?} keeps everything up to {rev}"
    );
    let store = Store::open(cfg.clone()).await.expect("reopen");
    store.bootstrap_single().await.expect("elected alone");
    assert_eq!(
        store.members(),
        vec![Member {
            raft_id: 3,
            addr: "127.0.0.1:3".into(),
            voter: true
        }]
    );
    assert_eq!(store.read(|s| s.services.clone()), services);
    applied(put_service(&store, "recovered", 1, Expect::Absent).await);
    store.shutdown().await.expect("shutdown");
    drop(store);

    // Run again (e.g. the recovery command repeated): nothing left to change.
    assert_eq!(force_once_released(&cfg).await, None);
    let store = Store::open(cfg).await.expect("reopen");
    store.bootstrap_single().await.expect("elected alone again");
    assert_eq!(store.read(|s| s.services.len()), 3);
    store.shutdown().await.expect("shutdown");
}
