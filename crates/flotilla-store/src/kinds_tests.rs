//! Store tests of the generic object model: the generic ops, and the namespace and config kinds
//! through every layer (apply, redb, reopen, snapshots, change feed, watch changes).

use crate::storage::{Shared, StateMachine};
use crate::tests::{applied, build_snapshot, config, install, normal_entry, open_leader};
use crate::{AnyKey, AnyObject, Change, Command, CommandResult, Expect, Op, Record, Store};
use flotilla_types::api::WatchChange;
use flotilla_types::{Config, Namespace, Revision, Service, ServiceSpec};
use openraft::storage::RaftStateMachine;
use std::time::Duration;
use tempfile::TempDir;

fn put(object: impl Into<AnyObject>, expect: Expect) -> Op {
    Op::Put {
        object: object.into(),
        expect,
    }
}

fn at(ops: Vec<Op>, at: i64) -> Command {
    Command { ops, at }
}

async fn write(store: &Store, cmd: Command) -> CommandResult {
    store.write(cmd).await.expect("write")
}

fn labelled_config(name: &str, data: &str) -> Config {
    let mut c = Config::new(name, data);
    c.labels.insert("app".into(), "web".into());
    c
}

#[tokio::test]
async fn namespaces_and_configs_are_put_versioned_and_deleted() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;
    let ops = vec![
        put(Namespace::new("team-a"), Expect::Absent),
        put(
            labelled_config("nginx", "worker_processes 1;"),
            Expect::Absent,
        ),
    ];
    let r1 = applied(write(&store, at(ops, 1_000)).await);
    let (ns, cfg) = store.read(|s| (s.namespaces["team-a"].clone(), s.configs["nginx"].clone()));
    assert_eq!((ns.meta.version, ns.meta.created_at), (r1, 1_000));
    assert_eq!(cfg.meta.version, r1);
    assert_eq!(cfg.labels["app"], "web");

    // A second create conflicts; an update at the right version keeps created_at.
    let again = write(
        &store,
        at(vec![put(Namespace::new("team-a"), Expect::Absent)], 2_000),
    );
    match again.await {
        CommandResult::Conflict {
            op_index: 0,
            reason,
        } => {
            assert!(
                reason.contains("namespace \"team-a\" already exists"),
                "{reason}"
            )
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let update = put(
        Config::new("nginx", "worker_processes 2;"),
        Expect::Version(r1),
    );
    let r2 = applied(write(&store, at(vec![update], 3_000)).await);
    let cfg = store.read(|s| s.configs["nginx"].clone());
    assert_eq!(cfg.data, "worker_processes 2;");
    assert_eq!(cfg.meta.version, r2);
    assert_eq!((cfg.meta.created_at, cfg.meta.updated_at), (1_000, 3_000));
    let stale = put(Config::new("nginx", "x"), Expect::Version(r1));
    assert!(matches!(
        write(&store, at(vec![stale], 4_000)).await,
        CommandResult::Conflict { .. }
    ));

    let delete = |key: AnyKey| Op::Delete {
        key,
        expect: Expect::Any,
    };
    applied(
        write(
            &store,
            Command::new(vec![delete(AnyKey::Config("nginx".into()))]),
        )
        .await,
    );
    assert!(store.read(|s| s.configs.is_empty() && s.namespaces.len() == 1));
    match write(
        &store,
        Command::new(vec![delete(AnyKey::Config("nginx".into()))]),
    )
    .await
    {
        CommandResult::NotFound { reason, .. } => {
            assert_eq!(reason, "config \"nginx\" does not exist")
        }
        other => panic!("expected not found, got {other:?}"),
    }
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn generic_ops_behave_like_the_kinds_own_ops() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;
    let spec = ServiceSpec::process("web", vec!["sleep".into(), "60".into()]);
    let web = Service {
        name: "web".into(),
        spec: spec.clone(),
        revision: 1,
        meta: Default::default(),
    };
    let revision = Revision {
        service: "web".into(),
        number: 1,
        spec,
        created_at: 1,
        created_by: "test".into(),
        change: "created".into(),
    };
    let ops = vec![put(web, Expect::Absent), put(revision.clone(), Expect::Any)];
    applied(write(&store, Command::new(ops)).await);
    // Revisions stay immutable through the generic put.
    match write(&store, Command::new(vec![put(revision, Expect::Any)])).await {
        CommandResult::Conflict { reason, .. } => assert_eq!(
            reason,
            "revision 1 of service \"web\" already exists (revisions are immutable)"
        ),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let delete = Op::Delete {
        key: AnyKey::Service("web".into()),
        expect: Expect::Exists,
    };
    applied(write(&store, Command::new(vec![delete])).await);
    // The same events as PutService and DeleteService.
    let messages: Vec<_> = store
        .events(0, 10)
        .expect("events")
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert_eq!(
        messages,
        ["service web created (revision 1)", "service web removed"]
    );
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn new_kinds_reach_subscribers_and_watch_changes() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;
    let mut rx = store.subscribe();
    let record = Record {
        key: "pki".into(),
        value: serde_json::json!({"ca": "secret"}),
        meta: Default::default(),
    };
    let ops = vec![
        put(Namespace::new("team-a"), Expect::Absent),
        put(Config::new("nginx", "a"), Expect::Absent),
        put(Config::new("nginx", "b"), Expect::Any),
        Op::PutRecord {
            record,
            expect: Expect::Absent,
        },
    ];
    let rev = applied(write(&store, Command::new(ops)).await);
    let batch = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a batch in time")
        .expect("batch");
    assert_eq!(batch.revision, rev);
    // One change per touched object, with its final value.
    let watch: Vec<_> = batch.changes.iter().map(Change::to_watch).collect();
    match &watch[..] {
        [Some(WatchChange::Namespace {
            name,
            object: Some(_),
        }), Some(WatchChange::Config {
            object: Some(c), ..
        }), None] => {
            assert_eq!(name, "team-a");
            assert_eq!(c.data, "b");
        }
        other => panic!("unexpected watch changes {other:?}"),
    }
    assert!(matches!(&batch.changes[2], Change::Record { key, .. } if key == "pki"));
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn new_kinds_survive_reopen_and_travel_in_snapshots() {
    let dir = TempDir::new().expect("tempdir");
    let store = open_leader(dir.path()).await;
    let ops = vec![
        put(Namespace::new("team-a"), Expect::Absent),
        put(Namespace::new("team-b"), Expect::Absent),
        put(
            labelled_config("nginx", "worker_processes 1;"),
            Expect::Absent,
        ),
    ];
    let rev = applied(write(&store, Command::new(ops)).await);
    let before = store.read(|s| s.clone());
    store.shutdown().await.expect("shutdown");
    drop(store);

    let store = Store::open(config(dir.path())).await.expect("reopen");
    store.bootstrap_single().await.expect("bootstrap");
    assert_eq!(
        store.read(|s| (s.namespaces.clone(), s.configs.clone())),
        (before.namespaces.clone(), before.configs.clone())
    );
    let snapshot = build_snapshot(&store, rev).await;
    let source = store.read(|s| s.clone());
    store.shutdown().await.expect("shutdown");

    let other = TempDir::new().expect("tempdir");
    let path = other.path().join("store.redb");
    let (shared, applied_state) = Shared::open(&path, 100).expect("open");
    let mut sm = StateMachine::new(shared.clone(), applied_state);
    install(&mut sm, &snapshot).await;
    assert_eq!(
        shared.read(|s| s.configs["nginx"].labels["app"].clone()),
        "web"
    );
    assert_eq!(shared.read(|s| s.clone()), source);
    drop((sm, shared));
    // Installed on disk, in the kinds' own tables.
    let (reopened, _) = Shared::open(&path, 100).expect("reopen");
    assert_eq!(reopened.read(|s| s.clone()), source);
}

/// A snapshot from before namespaces and configs existed (no such fields) still installs.
#[tokio::test]
async fn snapshots_from_before_a_kind_existed_install() {
    let dir = TempDir::new().expect("tempdir");
    let (shared, applied_state) = Shared::open(&dir.path().join("store.redb"), 100).expect("open");
    let mut sm = StateMachine::new(shared.clone(), applied_state);
    let old = br#"{"services":[],"revisions":[],"tasks":[],"nodes":[],"events":[]}"#;
    let meta = openraft::SnapshotMeta {
        last_log_id: Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(1, 1),
            5,
        )),
        last_membership: Default::default(),
        snapshot_id: "5-old".into(),
    };
    let mut data = sm.begin_receiving_snapshot().await.expect("begin");
    data.get_mut().extend_from_slice(old);
    sm.install_snapshot(&meta, data).await.expect("install");
    assert!(shared.read(|s| s.revision == 5 && s.namespaces.is_empty() && s.configs.is_empty()));
}

/// The commands of one raft batch share a redb transaction: their writes reach the tables in
/// order, so a later command's delete or update of the same object wins on disk too.
#[tokio::test]
async fn a_batch_of_commands_writes_each_object_last_value_to_disk() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("store.redb");
    let (shared, applied_state) = Shared::open(&path, 100).expect("open");
    let mut sm = StateMachine::new(shared.clone(), applied_state);
    let delete = Op::Delete {
        key: AnyKey::Config("a".into()),
        expect: Expect::Exists,
    };
    let entries = vec![
        normal_entry(1, at(vec![put(Config::new("a", "1"), Expect::Absent)], 1)),
        normal_entry(2, at(vec![put(Config::new("b", "1"), Expect::Absent)], 2)),
        normal_entry(3, at(vec![delete], 3)),
        normal_entry(
            4,
            at(vec![put(Config::new("b", "2"), Expect::Version(2))], 4),
        ),
    ];
    let results = sm.apply(entries).await.expect("apply");
    assert!(results
        .iter()
        .all(|r| matches!(r, CommandResult::Applied { .. })));
    let in_memory = shared.read(|s| s.configs.clone());
    drop((sm, shared));
    let (reopened, _) = Shared::open(&path, 100).expect("reopen");
    let on_disk = reopened.read(|s| s.configs.clone());
    assert_eq!(on_disk, in_memory);
    assert_eq!(on_disk.keys().collect::<Vec<_>>(), ["b"]);
    assert_eq!(
        (on_disk["b"].data.as_str(), on_disk["b"].meta.version),
        ("2", 4)
    );
}

/// A data dir written before namespaces and configs existed (no tables for them) opens, and
/// the existing kinds are read from their tables under the names they always had.
#[test]
fn a_data_dir_from_before_the_new_kinds_opens() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("store.redb");
    {
        let db = redb::Database::create(&path).expect("create");
        let txn = db.begin_write().expect("begin");
        {
            let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("services");
            let mut services = txn.open_table(table).expect("services table");
            let spec = ServiceSpec::process("web", vec!["sleep".into(), "60".into()]);
            let web = Service {
                name: "web".into(),
                spec,
                revision: 1,
                meta: Default::default(),
            };
            let json = serde_json::to_vec(&web).expect("encode");
            services.insert("web", json.as_slice()).expect("insert");
            let records: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("records");
            let record = br#"{"key":"pki","value":{"ca":"x"}}"#;
            let mut records = txn.open_table(records).expect("records table");
            records.insert("pki", record.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let (shared, _) = Shared::open(&path, 100).expect("open an older data dir");
    let (services, records, namespaces) = shared.read(|s| {
        (
            s.services.keys().cloned().collect::<Vec<_>>(),
            s.records.keys().cloned().collect::<Vec<_>>(),
            s.namespaces.len(),
        )
    });
    assert_eq!(
        (services, records, namespaces),
        (vec!["web".to_string()], vec!["pki".to_string()], 0)
    );
}
