//! End-to-end tests of node availability and failure: a manager (`flotilla up`) plus standalone
//! worker agents (`flotilla agent`), each a real process with its own data dir and port range,
//! on loopback. Worker loss, drains under load, pause, labels, auto-cordon, agent restarts and
//! `node maintain`.

mod common;

use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A short grace so a silent node is noticed quickly; agents heartbeat every 300ms.
const GRACE: &str = "2s";

fn web(replicas: u64, extra_flotilla: &str) -> String {
    format!(
        r#"services:
  web:
    command: ["flotilla", "demo-app"]
    ports: ["8080"]
    x-flotilla:
      healthcheck:
        http: /health
        interval: 300ms
        timeout: 1s
        retries: 2
{extra_flotilla}    deploy:
      replicas: {replicas}
"#
    )
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

fn is_ready(t: &Value) -> bool {
    t["status"]["state"] == "running" && t["status"]["health"] == "healthy"
}

fn pid(t: &Value) -> u64 {
    t["status"]["pid"].as_u64().expect("task has a pid")
}

/// Live tasks of `service` per node.
fn per_node(tasks: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in tasks {
        *m.entry(str_of(t, "node").to_string()).or_default() += 1;
    }
    m
}

/// Tasks with a process that may be alive (starting, running, stopping), any desired state.
fn active_tasks(c: &Cluster, service: &str) -> Vec<Value> {
    c.all_tasks(service)
        .into_iter()
        .filter(|t| {
            matches!(
                t["status"]["state"].as_str(),
                Some("starting" | "running" | "stopping")
            )
        })
        .collect()
}

/// The node `flotilla up` registered (the one that is not a standalone agent).
fn manager_node(c: &Cluster) -> String {
    let agents: BTreeSet<&str> = c.agents.iter().map(|a| a.name.as_str()).collect();
    c.json(&["node", "ls"])
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| str_of(n, "id").to_string())
        .find(|id| !agents.contains(id.as_str()))
        .expect("the manager's own node")
}

fn node_json(c: &Cluster, id: &str) -> Value {
    c.json(&["node", "ls"])
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no node {id}"))
}

fn set_availability(c: &Cluster, node: &str, availability: &str) {
    c.ok(&["node", "update", "--availability", availability, node]);
}

/// Deploys `web` (4 replicas, at most 2 per node) on the two agents only: the manager's node is
/// paused during the deploy and activated again afterwards.
fn two_per_agent(c: &Cluster) -> Vec<Value> {
    let manager = manager_node(c);
    set_availability(c, &manager, "pause");
    let out = c.deploy(
        "web.yaml",
        &web(4, "      placement:\n        max_per_node: 2\n"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let tasks = c.wait_ready("web", 4);
    assert_eq!(
        per_node(&tasks),
        BTreeMap::from([("b".to_string(), 2), ("c".to_string(), 2)])
    );
    set_availability(c, &manager, "active");
    tasks
}

/// A worker that goes silent (SIGSTOP: no heartbeats, workloads untouched) has its tasks
/// replaced on the other nodes; its workloads keep running meanwhile. When it comes back, its
/// stale tasks are stopped, so the service runs exactly its replica count.
#[test]
fn worker_loss_replaces_tasks_and_stale_ones_stop_when_it_returns() {
    let mut c = Cluster::start_with(&["--node-grace", GRACE]);
    c.add_agent("b");
    c.add_agent("c");
    let tasks = two_per_agent(&c);
    let on_b: Vec<&Value> = tasks.iter().filter(|t| t["node"] == "b").collect();
    let stale_pids: Vec<u64> = on_b.iter().map(|t| pid(t)).collect();

    c.freeze_agent("b", true);
    let frozen_at = Instant::now();
    c.wait_node("b", "down");
    let replaced = wait_for(
        "4 ready tasks without node b",
        Duration::from_secs(60),
        || {
            let live = c.live_tasks("web");
            (live.len() == 4 && live.iter().all(|t| is_ready(t) && t["node"] != "b"))
                .then_some(live)
        },
    );
    eprintln!(
        "worker loss: replacements ready {:?} after the agent froze (grace {GRACE})",
        frozen_at.elapsed()
    );
    assert_eq!(per_node(&replaced).get("c"), Some(&2), "c kept its tasks");
    for p in &stale_pids {
        assert!(
            pid_alive(*p),
            "a node cut off from the manager keeps its workload {p}"
        );
    }
    let lost = c
        .all_tasks("web")
        .into_iter()
        .filter(|t| t["node"] == "b" && t["status"]["state"] == "lost")
        .count();
    assert_eq!(lost, 2, "b's tasks are marked lost");

    c.freeze_agent("b", false);
    c.wait_node("b", "ready");
    wait_for(
        "b's stale workloads to stop",
        Duration::from_secs(60),
        || stale_pids.iter().all(|p| !pid_alive(*p)).then_some(()),
    );
    wait_for(
        "exactly 4 active tasks of web",
        Duration::from_secs(60),
        || (active_tasks(&c, "web").len() == 4).then_some(()),
    );
    let live = c.wait_ready("web", 4);
    assert!(live.iter().all(|t| t["node"] != "b"), "{live:?}");
}

/// One sample of what a client following `ps` saw.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ready: usize,
    answered: usize,
}

/// Draining a node under a steady stream of requests: every sample of `ps` shows at least
/// `replicas - max_unavailable` ready tasks and at least that many of them answer; the drained
/// node ends with nothing on it, and the service with all its replicas elsewhere.
#[test]
fn drain_under_load_respects_the_disruption_budget() {
    let mut c = Cluster::start_with(&["--node-grace", "5s"]);
    c.add_agent("b");
    c.add_agent("c");
    let manager = manager_node(&c);
    let out = c.deploy(
        "web.yaml",
        &web(
            4,
            "      placement:\n        max_per_node: 2\n      disruption:\n        max_unavailable: 1\n",
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let tasks = c.wait_ready("web", 4);
    let counts = per_node(&tasks);
    let (target, moving) = counts
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(node, n)| (node.clone(), *n))
        .expect("tasks on some node");
    assert!(moving >= 1);

    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let client = {
        let (stop, samples, addr) = (stop.clone(), samples.clone(), c.socket_addr());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let out = std::process::Command::new(BIN)
                    .args(["--addr", &addr, "ps", "web", "-o", "json"])
                    .output()
                    .expect("run ps");
                let Ok(Value::Array(tasks)) = serde_json::from_slice::<Value>(&out.stdout) else {
                    continue;
                };
                let ready: Vec<&Value> = tasks.iter().filter(|t| is_ready(t)).collect();
                let answered = ready
                    .iter()
                    .filter_map(|t| t["status"]["ports"][0]["host_port"].as_u64())
                    .filter(|port| {
                        http_get(*port as u16, "/").is_some_and(|(status, _)| status == 200)
                    })
                    .count();
                samples.lock().expect("samples").push(Sample {
                    ready: ready.len(),
                    answered,
                });
            }
        })
    };
    wait_for(
        "the client's first samples",
        Duration::from_secs(30),
        || (samples.lock().expect("samples").len() >= 3).then_some(()),
    );

    set_availability(&c, &target, "drain");
    wait_for(
        &format!("{target} to run nothing and web to be whole elsewhere"),
        Duration::from_secs(120),
        || {
            let on_target = c
                .all_tasks("web")
                .iter()
                .filter(|t| t["node"] == target.as_str())
                .any(|t| {
                    !matches!(
                        t["status"]["state"].as_str(),
                        Some("exited" | "failed" | "lost" | "rejected")
                    )
                });
            let live = c.live_tasks("web");
            (!on_target && live.len() == 4 && live.iter().all(is_ready)).then_some(())
        },
    );
    // A few more samples of the settled state.
    let seen = samples.lock().expect("samples").len();
    wait_for("samples after the drain", Duration::from_secs(30), || {
        (samples.lock().expect("samples").len() >= seen + 3).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    client.join().expect("client thread");

    let samples = samples.lock().expect("samples").clone();
    eprintln!(
        "drain under load: {} samples, {} requests answered",
        samples.len(),
        samples.iter().map(|s| s.answered).sum::<usize>()
    );
    let floor = 4 - 1;
    let low: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.ready < floor || s.answered < floor)
        .collect();
    assert!(
        low.is_empty(),
        "below {floor} ready/answering in {} of {} samples: {low:?}",
        low.len(),
        samples.len()
    );
    // Start-first: a replacement is ready before its old task stops, so `ps` never shows fewer
    // than all replicas ready.
    let dips: Vec<&Sample> = samples.iter().filter(|s| s.ready < 4).collect();
    assert!(dips.is_empty(), "fewer than 4 ready: {dips:?}");
    assert_eq!(str_of(&node_json(&c, &target), "availability"), "drain");
    let live = c.live_tasks("web");
    assert!(
        live.iter().all(|t| t["node"] != target.as_str()),
        "{live:?}"
    );
    if target != manager {
        assert!(
            c.agent(&target).pid().is_some(),
            "the drained agent itself keeps running"
        );
    }
    let events = c.ok(&["events"]);
    assert!(
        events.contains(&format!("node {target} availability drain")),
        "{events}"
    );
}

/// Pause keeps a node's tasks but sends it no new ones; labels are added, shown, used by
/// constraints and removed; bad updates are refused with the field named.
#[test]
fn pause_keeps_tasks_and_labels_steer_placement() {
    let mut c = Cluster::start();
    c.add_agent("b");
    let manager = manager_node(&c);
    set_availability(&c, &manager, "pause");
    let out = c.deploy("web.yaml", &web(2, ""));
    assert!(out.status.success(), "{}", stderr(&out));
    let before: BTreeSet<String> = c
        .wait_ready("web", 2)
        .iter()
        .map(|t| str_of(t, "id").to_string())
        .collect();

    // Swap roles: b paused keeps both tasks; new ones go to the manager's node only.
    set_availability(&c, &manager, "active");
    set_availability(&c, "b", "pause");
    c.ok(&["scale", "web=4"]);
    let tasks = c.wait_ready("web", 4);
    let on_b: BTreeSet<String> = tasks
        .iter()
        .filter(|t| t["node"] == "b")
        .map(|t| str_of(t, "id").to_string())
        .collect();
    assert_eq!(on_b, before, "paused b keeps exactly its old tasks");
    let table = c.ok(&["node", "ls"]);
    assert!(table.contains("pause"), "{table}");

    // Labels: add, see, place by constraint, remove.
    set_availability(&c, "b", "active");
    c.ok(&[
        "node",
        "update",
        "--label-add",
        "zone=blue",
        "--label-add",
        "disk=ssd",
        "b",
    ]);
    let b = node_json(&c, "b");
    assert_eq!(b["labels"]["zone"], "blue");
    assert_eq!(b["labels"]["disk"], "ssd");
    assert!(c.ok(&["node", "ls"]).contains("disk=ssd,zone=blue"));
    let pinned = "services:\n  pinned:\n    command: [\"sleep\", \"300\"]\n    deploy:\n      replicas: 2\n      placement:\n        constraints: [\"node.labels.zone==blue\"]\n";
    let out = c.deploy("pinned.yaml", pinned);
    assert!(out.status.success(), "{}", stderr(&out));
    let pinned_tasks = c.wait_ready("pinned", 2);
    assert!(
        pinned_tasks.iter().all(|t| t["node"] == "b"),
        "{pinned_tasks:?}"
    );

    c.ok(&["node", "update", "--label-rm", "zone", "b"]);
    let b = node_json(&c, "b");
    assert!(b["labels"]["zone"].is_null(), "{b}");
    assert_eq!(b["labels"]["disk"], "ssd");
    c.ok(&["scale", "-d", "pinned=3"]);
    let pending = wait_for("pinned.3 to stay pending", Duration::from_secs(30), || {
        c.live_tasks("pinned").into_iter().find(|t| {
            t["status"]["state"] == "pending" && !str_of(&t["status"], "message").is_empty()
        })
    });
    assert!(
        str_of(&pending["status"], "message").contains("zone"),
        "{pending}"
    );

    // Refusals name what is wrong.
    let bad = c.run(&["node", "update", "--label-add", "a b=1", "b"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("label_add.a b"), "{}", stderr(&bad));
    let bad = c.run(&[
        "node",
        "update",
        "--label-add",
        "x=1",
        "--label-rm",
        "x",
        "b",
    ]);
    assert!(stderr(&bad).contains("label_rm[0]"), "{}", stderr(&bad));
    let bad = c.run(&["node", "update", "--availability", "active", "nosuch"]);
    assert!(stderr(&bad).contains("not_found"), "{}", stderr(&bad));
    let bad = c.run(&["node", "update", "--availability", "sleep", "b"]);
    assert!(stderr(&bad).contains("sleep"), "{}", stderr(&bad));
    let bad = c.run(&["node", "update", "b"]);
    assert!(
        stderr(&bad).contains("needs --availability"),
        "{}",
        stderr(&bad)
    );
}

/// A node where tasks of several services keep failing to start is paused with the reason in
/// `node ls` and an event; it stays paused until an operator activates it.
#[test]
fn repeated_start_failures_pause_the_node() {
    let mut c = Cluster::start();
    c.add_agent("b");
    let broken = |name: &str| {
        format!(
            "  {name}:\n    command: [\"sleep\", \"300\"]\n    working_dir: /nonexistent/flotilla-test\n    deploy:\n      placement:\n        constraints: [\"node.id==b\"]\n      restart_policy:\n        delay: 100ms\n"
        )
    };
    let yaml = format!("services:\n{}{}", broken("bad1"), broken("bad2"));
    let path = c.write_file("bad.yaml", &yaml);
    // The deploy itself cannot converge; only the node's reaction matters here.
    c.run(&[
        "deploy",
        "-f",
        path.to_str().expect("utf8"),
        "--timeout",
        "1s",
    ]);

    let b = wait_for("b to be paused", Duration::from_secs(90), || {
        let b = node_json(&c, "b");
        (b["availability"] == "pause").then_some(b)
    });
    let reason = str_of(&b, "message");
    assert!(reason.starts_with("auto-paused"), "{reason}");
    assert!(reason.contains("2 services"), "{reason}");
    let table = c.ok(&["node", "ls"]);
    assert!(table.contains("auto-paused"), "{table}");
    let events = c.ok(&["events"]);
    assert!(
        events.contains("node b availability pause: auto-paused"),
        "{events}"
    );
    assert_eq!(
        str_of(&node_json(&c, &manager_node(&c)), "availability"),
        "active",
        "the last usable node is never paused"
    );

    // The operator removes the cause and re-enables the node by hand.
    c.ok(&["service", "rm", "bad1", "bad2"]);
    wait_for(
        "the failed tasks to be cleaned up",
        Duration::from_secs(30),
        || {
            let all = c.json(&["ps", "--all"]);
            let left = all.as_array()?.iter().any(|t| t["service"] != "ok");
            (!left).then_some(())
        },
    );
    set_availability(&c, "b", "active");
    let b = node_json(&c, "b");
    assert_eq!(b["availability"], "active");
    assert_eq!(str_of(&b, "message"), "");
    // It stays active: run a task there to see several controller passes go by.
    let out = c.deploy(
        "ok.yaml",
        "services:\n  ok:\n    command: [\"sleep\", \"300\"]\n    deploy:\n      placement:\n        constraints: [\"node.id==b\"]\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(node_json(&c, "b")["availability"], "active");
}

/// Restarting a standalone agent (even with SIGKILL) restarts no workload, and
/// `node maintain --then` drains the node, runs the command, and re-activates it.
#[test]
fn agent_restart_keeps_pids_and_maintain_cycles_the_node() {
    let mut c = Cluster::start();
    c.add_agent("b");
    let manager = manager_node(&c);
    set_availability(&c, &manager, "pause");
    let out = c.deploy("web.yaml", &web(2, ""));
    assert!(out.status.success(), "{}", stderr(&out));
    let before: BTreeMap<String, u64> = c
        .wait_ready("web", 2)
        .iter()
        .map(|t| (str_of(t, "id").to_string(), pid(t)))
        .collect();

    c.kill_agent("b");
    c.start_agent("b");
    let log_marker = "recovered tasks from a previous agent";
    wait_for("the new agent to re-adopt", Duration::from_secs(30), || {
        c.agent("b").log().contains(log_marker).then_some(())
    });
    let after: BTreeMap<String, u64> = c
        .wait_ready("web", 2)
        .iter()
        .map(|t| (str_of(t, "id").to_string(), pid(t)))
        .collect();
    assert_eq!(after, before, "same tasks, same pids");
    assert!(before.values().all(|p| pid_alive(*p)));

    // Maintenance: b drains onto the manager's node, the command runs, b comes back active.
    set_availability(&c, &manager, "active");
    let marker = c.dir.path().join("upgraded");
    let then = format!("echo $FLOTILLA_NODE > {}", marker.display());
    let out = c.ok(&[
        "node",
        "maintain",
        "b",
        "--then",
        &then,
        "--timeout",
        "120s",
    ]);
    assert!(out.contains("b: active again"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&marker).expect("--then ran").trim(),
        "b"
    );
    let live = c.wait_ready("web", 2);
    assert!(
        live.iter().all(|t| t["node"] == manager.as_str()),
        "{live:?}"
    );
    assert!(
        before.values().all(|p| !pid_alive(*p)),
        "b's old workloads stopped"
    );
    assert_eq!(node_json(&c, "b")["availability"], "active");

    // Without --then and without a terminal, maintain drains and says how to finish.
    let out = c.ok(&["node", "maintain", "b"]);
    assert!(
        out.contains("then run `flotilla node update --availability active b`"),
        "{out}"
    );
    assert_eq!(node_json(&c, "b")["availability"], "drain");
}

/// Benchmark for docs/BENCHMARKS.md: time from a worker's death (agent, shims and workloads
/// SIGKILLed) to all its replacements ready elsewhere, for a few `--node-grace` values.
/// `cargo test --release -p flotilla --test nodes -- --ignored --nocapture bench_worker_loss`
#[test]
#[ignore = "benchmark: run explicitly"]
fn bench_worker_loss() {
    for grace in ["1s", "3s", "5s"] {
        let mut c = Cluster::start_with(&["--node-grace", grace]);
        c.add_agent("b");
        c.add_agent("c");
        let tasks = two_per_agent(&c);
        let doomed: Vec<u64> = tasks.iter().filter(|t| t["node"] == "b").map(pid).collect();
        let started = Instant::now();
        c.kill_agent("b");
        let agent_dir = c.agent("b").data_dir.clone();
        sh(&format!("pkill -9 -f {}", agent_dir.display()));
        for p in &doomed {
            sh(&format!("kill -9 {p}"));
        }
        wait_for("4 ready tasks without b", Duration::from_secs(60), || {
            let live = c.live_tasks("web");
            (live.len() == 4 && live.iter().all(|t| is_ready(t) && t["node"] != "b")).then_some(())
        });
        println!(
            "bench worker-loss: --node-grace {grace}: 2 of 4 replicas replaced and healthy {} ms after the worker died",
            started.elapsed().as_millis()
        );
    }
}

/// Two agents on one host started as the README says, without `--task-ports` (#21): each takes
/// its own block of host ports, remembered in its data dir, so their tasks never get the same
/// port, and a 4-replica service runs without a task failing.
#[test]
fn agents_on_one_host_pick_distinct_task_ports_by_default() {
    let mut c = Cluster::start_with(&["--node-grace", GRACE]);
    c.add_agent_default_ports("b");
    c.add_agent_default_ports("c");
    let tasks = two_per_agent(&c);
    let block = |node: &str| -> (u16, u16) {
        let path = c.agent(node).data_dir.join("task-ports");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (a, b) = text.trim().split_once('-').expect("START-END");
        (a.parse().expect("start"), b.parse().expect("end"))
    };
    let (b1, b2) = (block("b"), block("c"));
    assert!(
        b1.1 <= b2.0 || b2.1 <= b1.0,
        "blocks overlap: {b1:?} {b2:?}"
    );
    let mut seen = BTreeSet::new();
    for t in &tasks {
        let port = t["status"]["ports"][0]["host_port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .expect("a host port");
        let (start, end) = block(str_of(t, "node"));
        assert!(start <= port && port < end, "{port} outside {start}-{end}");
        assert!(seen.insert(port), "host port {port} handed out twice");
    }
    let failed: Vec<Value> = c
        .all_tasks("web")
        .into_iter()
        .filter(|t| t["status"]["state"] == "failed")
        .collect();
    assert!(failed.is_empty(), "tasks failed: {failed:?}");
}
