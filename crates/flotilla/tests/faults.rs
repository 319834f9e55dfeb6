//! Fault injection on one machine (issue #14): a lost or empty store with workloads running,
//! and a full disk under the store (a small tmpfs data dir).

mod common;

use common::*;
use flotilla_types::tmpfs::Tmpfs;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn pids(tasks: &[Value]) -> Vec<u64> {
    tasks
        .iter()
        .map(|t| t["status"]["pid"].as_u64().expect("task has a pid"))
        .collect()
}

fn store_file(data_dir: &Path) -> PathBuf {
    data_dir.join("store").join("store.redb")
}

/// `flotilla up` on `data_dir` as an operator would run it; returns whether it started (it
/// is then stopped) and what it printed. An `up` that refuses exits at once.
fn up_once(data_dir: &Path, extra: &[&str]) -> (bool, String) {
    up_once_until(data_dir, extra, || true)
}

/// [`up_once`], but a started `up` runs until `done` holds.
fn up_once_until(data_dir: &Path, extra: &[&str], done: impl Fn() -> bool) -> (bool, String) {
    let mut args = vec![
        "up".to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--api-addr".into(),
        format!("127.0.0.1:{}", free_port()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    node_once(&args, data_dir, "flotilla is up", done)
}

/// Runs a node command (`up`, `init`) until it exits or has printed `started` and `done`
/// holds (then it is stopped); returns whether it started and what it printed.
fn node_once(
    args: &[String],
    data_dir: &Path,
    started: &str,
    done: impl Fn() -> bool,
) -> (bool, String) {
    let log = data_dir.with_extension("once.log");
    let file = std::fs::File::create(&log).expect("log file");
    let mut child = Command::new(BIN)
        .args(args)
        .env("FLOTILLA_LOG", "warn")
        .stdout(file.try_clone().expect("clone log"))
        .stderr(file)
        .spawn()
        .expect("run flotilla");
    let exited = wait_for("flotilla to exit or start", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        match child.try_wait() {
            Ok(Some(_)) => Some(true),
            _ if text.contains(started) && done() => Some(false),
            _ => None,
        }
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    (!exited, std::fs::read_to_string(&log).unwrap_or_default())
}

/// `flotilla init` restarting the first manager of a secure cluster on an emptied store
/// refuses too, instead of bootstrapping a new, empty cluster.
#[test]
fn init_refuses_an_empty_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("m1");
    let args: Vec<String> = [
        "init",
        "--data-dir",
        data.to_str().expect("utf8 path"),
        "--listen-addr",
        &format!("127.0.0.1:{}", free_port()),
        "--api-addr",
        &format!("127.0.0.1:{}", free_port()),
        "--node-name",
        "m1",
        "--task-ports",
        "29990-30000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (started, out) = node_once(&args, &data, "flotilla manager m1", || true);
    assert!(started, "{out}");
    std::fs::File::create(store_file(&data)).expect("truncate the store");
    let (started, out) = node_once(&args, &data, "flotilla manager m1", || true);
    assert!(!started, "init started on an empty store:\n{out}");
    assert!(out.contains("is empty (0 bytes)"), "{out}");
}

/// An emptied (then a deleted) store with workloads running: `up` refuses to start a new
/// cluster over them, says how to recover, and the workloads keep running.
#[test]
fn up_refuses_an_empty_or_missing_store_and_workloads_keep_running() {
    let mut c = Cluster::start_with(&["--demo"]);
    let running = pids(&c.wait_ready("demo", 3));
    c.kill_up();
    let file = store_file(&c.data_dir());
    std::fs::File::create(&file).expect("truncate the store");

    let (ok, out) = up_once(&c.data_dir(), &[]);
    assert!(!ok, "up started on an empty store:\n{out}");
    assert!(out.contains("is empty (0 bytes)"), "{out}");
    assert!(out.contains("snapshot restore"), "{out}");
    std::fs::remove_file(&file).expect("remove the store");
    let (ok, out) = up_once(&c.data_dir(), &[]);
    assert!(!ok, "up started on a missing store:\n{out}");
    assert!(out.contains("is missing"), "{out}");
    for pid in &running {
        assert!(pid_alive(*pid), "workload {pid} was stopped");
    }
    // The operator gives up on the old cluster: a new store, whose agent stops them.
    let (started, out) = up_once_until(&c.data_dir(), &["--discard-unknown-workloads"], || {
        running.iter().all(|p| !pid_alive(*p))
    });
    assert!(started, "{out}");
}

/// A cluster with a worker `w1` running two workloads (their pids), its agent then killed.
fn workloads_on_a_stopped_agent() -> (Cluster, Vec<u64>) {
    let mut c = Cluster::start();
    c.add_agent("w1");
    let out = c.deploy(
        "pinned.yaml",
        "services:\n  pinned:\n    command: [\"sleep\", \"3600\"]\n    deploy:\n      replicas: 2\n      placement:\n        constraints: [\"node.id==w1\"]\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let running = pids(&c.wait_ready("pinned", 2));
    c.kill_agent("w1");
    (c, running)
}

/// A worker whose tasks a brand-new store does not know (the cluster was re-created from
/// nothing) leaves them running and reports them instead of stopping them.
#[test]
fn an_agent_keeps_workloads_a_new_store_does_not_know() {
    let (mut c, running) = workloads_on_a_stopped_agent();
    c.kill_up();
    // A new cluster on the manager's side: nothing of the old store is left.
    std::fs::remove_dir_all(c.data_dir()).expect("wipe the manager's data dir");
    c.spawn_up();
    c.start_agent("w1");
    wait_for(
        "the agent to report the unknown workloads",
        Duration::from_secs(60),
        || {
            c.agent("w1")
                .log()
                .contains("does not know this node's workloads")
                .then_some(())
        },
    );
    for pid in &running {
        assert!(pid_alive(*pid), "workload {pid} was stopped");
    }
    kill_tasks(&c.agent("w1").data_dir);
}

/// The other side of the rule: a store that knew the node deleted a task while its agent
/// was down (`service rm`), so the restarted agent stops that workload.
#[test]
fn an_agent_stops_workloads_a_known_store_deleted() {
    let (mut c, running) = workloads_on_a_stopped_agent();
    c.ok(&["service", "rm", "pinned"]);
    c.start_agent("w1");
    wait_for(
        "the deleted tasks' workloads to stop",
        Duration::from_secs(60),
        || running.iter().all(|p| !pid_alive(*p)).then_some(()),
    );
}

/// SIGKILLs the workloads and shims of the process tasks under an agent's data dir.
fn kill_tasks(data_dir: &Path) {
    let tasks = data_dir.join("agent").join("process").join("tasks");
    for dir in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
        let state: Value = std::fs::read_to_string(dir.path().join("state.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        for key in ["pid", "shim_pid"] {
            if let Some(pid) = state[key].as_u64() {
                sh(&format!("kill -9 {pid}"));
            }
        }
    }
}

fn status(c: &Cluster) -> Value {
    let (_, body) = http_get_from("127.0.0.1", c.api_port, "/v1/status", &[&c.bearer()])
        .expect("GET /v1/status");
    serde_json::from_str(&body).expect("status JSON")
}

/// The store's disk fills up: writes fail with "disk full", reads keep working, `/v1/status`
/// says so; once space is freed writes work again without a restart.
#[test]
fn a_full_disk_refuses_writes_and_raft_resumes_when_space_returns() {
    let mut c = Cluster::start();
    c.kill_up();
    let data = c.data_dir();
    let saved = data.with_extension("saved");
    std::fs::rename(&data, &saved).expect("move the data dir aside");
    let Some(fs) = Tmpfs::mount(&data, "96m") else {
        return;
    };
    sh(&format!("cp -a {}/. {}", saved.display(), data.display()));
    c.spawn_up();
    let small = "services:\n  s1:\n    command: [\"sleep\", \"3600\"]\n";
    assert!(c.deploy("s1.yaml", small).status.success());

    // Leave the store 4 MiB, under the 16 MiB it needs to count the disk as usable.
    let fill = data.join("fill");
    let size = fs.available().saturating_sub(4 << 20);
    assert!(sh(&format!("fallocate -l {size} {}", fill.display()))
        .status
        .success());
    let out = c.run(&["scale", "s1=2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a write succeeded on a full disk");
    assert!(err.contains("disk full"), "{err}");
    assert!(
        c.run(&["service", "ls"]).status.success(),
        "reads must keep working"
    );
    let degraded = status(&c)["degraded"].clone();
    assert!(degraded.to_string().contains("disk full"), "{degraded}");

    std::fs::remove_file(&fill).expect("free the space");
    wait_for("writes to work again", Duration::from_secs(60), || {
        c.run(&["scale", "s1=2"]).status.success().then_some(())
    });
    c.wait_ready("s1", 2);
    assert!(status(&c).get("degraded").is_none(), "{}", status(&c));
    // The cluster stops its workloads before the tmpfs under them goes.
    drop(c);
    drop(fs);
}

/// `flotilla snapshot save` on a running cluster, the store then lost: `snapshot restore`
/// into the stopped node's data dir brings the services back, and the workloads that kept
/// running are re-adopted, not restarted.
#[test]
fn a_lost_store_comes_back_from_a_saved_snapshot() {
    let mut c = Cluster::start_with(&["--demo"]);
    let running = pids(&c.wait_ready("demo", 3));
    let backup = c.data_dir().with_extension("backup.json");
    let saved = c.ok(&["snapshot", "save", backup.to_str().expect("utf8 path")]);
    assert!(saved.contains("saved the store at revision"), "{saved}");
    // The backup holds the CA key and the tokens: owner-only, like the data dir.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&backup)
            .expect("backup written")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "backup mode {mode:o}");
    c.kill_up();
    std::fs::remove_dir_all(c.data_dir().join("store")).expect("lose the store");

    let addr = format!("127.0.0.1:{}", c.api_port);
    let restored = c.ok(&[
        "snapshot",
        "restore",
        backup.to_str().expect("utf8 path"),
        "--data-dir",
        c.data_dir().to_str().expect("utf8 path"),
        "--advertise-addr",
        &addr,
    ]);
    assert!(restored.contains("restored revision"), "{restored}");
    c.spawn_up();
    let after = pids(&c.wait_ready("demo", 3));
    let (mut before, mut after) = (running, after);
    before.sort_unstable();
    after.sort_unstable();
    assert_eq!(
        before, after,
        "the workloads were restarted, not re-adopted"
    );
}
