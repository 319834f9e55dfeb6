//! End-to-end acceptance tests of the single-node core: real `flotilla up`, real processes,
//! real cgroups, real sockets, real SIGKILLs.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

fn ids(tasks: &[Value]) -> BTreeSet<String> {
    tasks
        .iter()
        .map(|t| t["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn pid(t: &Value) -> u64 {
    t["status"]["pid"].as_u64().expect("task has a pid")
}

fn host_port(t: &Value) -> u16 {
    t["status"]["ports"][0]["host_port"]
        .as_u64()
        .expect("task has a host port") as u16
}

/// `flotilla up --demo` serves 3 healthy replicas, each answering on its own host port with its
/// version and task id, inside a cgroup with the demo's 64MiB memory limit.
#[test]
fn demo_serves_three_healthy_replicas() {
    let c = Cluster::start_with(&["--demo"]);
    let tasks = c.wait_ready("demo", 3);
    let mut seen = BTreeSet::new();
    for t in &tasks {
        let (status, body) = http_get(host_port(t), "/").expect("replica answers");
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!(v["version"], "v1");
        assert_eq!(v["task"], t["id"]);
        seen.insert(host_port(t));
        assert_eq!(http_get(host_port(t), "/health").map(|r| r.0), Some(200));
    }
    assert_eq!(seen.len(), 3, "each replica has its own host port");

    // The memory limit from deploy.resources is in the task's cgroup.
    let cg =
        std::fs::read_to_string(format!("/proc/{}/cgroup", pid(&tasks[0]))).expect("cgroup file");
    assert!(
        cg.contains(&format!(
            "flotilla/{}",
            tasks[0]["id"].as_str().unwrap_or_default()
        )),
        "{cg}"
    );
    let limit_file = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        format!(
            "/sys/fs/cgroup/flotilla/{}/memory.max",
            tasks[0]["id"].as_str().unwrap_or_default()
        )
    } else {
        format!(
            "/sys/fs/cgroup/memory/flotilla/{}/memory.limit_in_bytes",
            tasks[0]["id"].as_str().unwrap_or_default()
        )
    };
    let limit = std::fs::read_to_string(&limit_file).expect("memory limit file");
    assert_eq!(limit.trim(), (64u64 << 20).to_string());

    // ps shows node, state, health, host ports and pid.
    let table = c.ok(&["ps", "demo"]);
    assert_eq!(table.matches("healthy").count(), 3, "{table}");
    assert!(table.contains("pid "), "{table}");
    assert!(table.contains("->8080"), "{table}");

    // Logs come from the task's rotating log file through the API.
    let logs = c.ok(&["logs", "demo", "--tail", "50"]);
    assert!(logs.contains("listening"), "{logs}");
}

/// SIGKILL a task's process: the exit is recorded and a replacement becomes healthy.
#[test]
fn killed_task_is_replaced() {
    let c = Cluster::start_with(&["--demo"]);
    let before = c.wait_ready("demo", 3);
    let victim = &before[0];
    sh(&format!("kill -9 {}", pid(victim)));
    let after = wait_for("a replacement", Duration::from_secs(60), || {
        let t = c.wait_ready("demo", 3);
        (!ids(&t).contains(victim["id"].as_str().unwrap_or_default())).then_some(t)
    });
    assert_eq!(after.len(), 3);
    let history = c.all_tasks("demo");
    let dead = history
        .iter()
        .find(|t| t["id"] == victim["id"])
        .expect("killed task kept in history");
    assert_eq!(dead["status"]["state"], "failed");
    assert_eq!(dead["status"]["exit_code"], 137);
    assert!(
        dead["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("signal 9"),
        "{dead}"
    );
    // The replacement took the same slot.
    assert!(after.iter().any(|t| t["slot"] == victim["slot"]));
}

/// Scaling up and down converges, and only the surplus slots are stopped.
#[test]
fn scale_up_and_down() {
    let c = Cluster::start_with(&["--demo"]);
    c.wait_ready("demo", 3);
    c.ok(&["scale", "demo=5"]);
    c.wait_ready("demo", 5);
    c.ok(&["scale", "demo=1"]);
    let one = c.wait_ready("demo", 1);
    assert_eq!(one[0]["slot"], 1);
    let ls = c.json(&["service", "ls"]);
    assert_eq!(ls[0]["desired"], 1);
    // Scale changes are revisions too, but not rollouts: slot 1 kept its task.
    let revs = c.json(&["service", "history", "demo"]);
    assert_eq!(revs.as_array().map(Vec::len), Some(3));
    assert_eq!(revs[2]["change"], "replicas 5 -> 1");
    let bad = c.run(&["scale", "demo=-1"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("not a non-negative whole number"),
        "{}",
        stderr(&bad)
    );
    let missing = c.run(&["scale", "nope=2"]);
    assert!(
        stderr(&missing).contains("does not exist"),
        "{}",
        stderr(&missing)
    );
}

/// A task failing its health check is killed and restarted per its restart policy; the delay
/// doubles with each consecutive failure, and after max_attempts the slot is left alone and
/// `deploy` reports the failure.
#[test]
fn unhealthy_task_restarts_with_backoff_until_max_attempts() {
    let c = Cluster::start();
    let out = c.deploy(
        "sick.yaml",
        r#"
services:
  sick:
    command: ["flotilla", "demo-app", "--fail-health"]
    ports: ["8080"]
    x-flotilla:
      healthcheck: {http: /health, interval: 300ms, timeout: 1s, retries: 2}
    deploy:
      restart_policy: {condition: on-failure, delay: 200ms, max_attempts: 3}
"#,
    );
    assert!(
        !out.status.success(),
        "deploy of a never-healthy service must fail"
    );
    assert!(
        stdout(&out).contains("will not be restarted"),
        "{}",
        stdout(&out)
    );
    let tasks = wait_for("all attempts to finish", Duration::from_secs(60), || {
        let t = c.all_tasks("sick");
        (t.len() == 4 && t.iter().all(|t| t["status"]["state"] == "failed")).then_some(t)
    });
    let mut tasks = tasks;
    tasks.sort_by_key(|t| t["attempt"].as_u64());
    for (i, t) in tasks.iter().enumerate() {
        assert_eq!(t["attempt"].as_u64(), Some(i as u64));
        assert!(
            t["status"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("health check failed"),
            "{t}"
        );
    }
    // Backoff is recorded in the schedule: each restart was held back twice as long as the one
    // before (200ms, 400ms, 800ms after the previous failure).
    let delays: Vec<i64> = tasks
        .windows(2)
        .map(|w| {
            w[1]["not_before"].as_i64().expect("restart has not_before")
                - w[0]["status"]["since"].as_i64().unwrap_or(0)
        })
        .collect();
    assert_eq!(delays, vec![200, 400, 800]);
}

/// Bad Compose files are rejected with field-level messages, nothing panics, and the cluster is
/// unchanged.
#[test]
fn invalid_compose_files_are_rejected_without_changing_state() {
    let c = Cluster::start();
    let cases: &[(&str, &str, &str)] = &[
        ("yaml syntax", "services:\n  web: [unclosed\n", "invalid YAML"),
        ("replicas wrong type", "services:\n  w:\n    command: x\n    deploy: {replicas: three}\n", "services.w.deploy.replicas"),
        ("negative replicas", "services:\n  w:\n    command: x\n    deploy: {replicas: -1}\n", "services.w.deploy.replicas"),
        ("unknown driver", "services:\n  w:\n    command: x\n    x-flotilla: {driver: vm}\n", "driver"),
        ("memory lots", "services:\n  w:\n    command: x\n    deploy: {resources: {limits: {memory: lots}}}\n", "services.w.deploy.resources.limits.memory"),
        ("port 70000", "services:\n  w:\n    command: x\n    ports: [\"70000:80\"]\n", "services.w.ports"),
        ("depends_on cycle", "services:\n  a:\n    command: x\n    depends_on: [b]\n  b:\n    command: x\n    depends_on: [a]\n", "cycle"),
        ("unknown dependency", "services:\n  a:\n    command: x\n    depends_on: [ghost]\n", "services.a.depends_on"),
        ("no services", "name: empty\n", "services"),
        ("services is a list", "services: [a, b]\n", "services"),
        ("bad name", "services:\n  Web!:\n    command: x\n", "Web!"),
        ("no command for a process", "services:\n  w:\n    x-flotilla: {driver: process}\n", "services.w.command"),
        ("bad duration", "services:\n  w:\n    command: x\n    stop_grace_period: 10 parsecs\n", "services.w.stop_grace_period"),
        ("cpus many", "services:\n  w:\n    command: x\n    deploy: {resources: {limits: {cpus: many}}}\n", "services.w.deploy.resources.limits.cpus"),
        ("unknown key", "services:\n  w:\n    command: x\n    replicaz: 3\n", "services.w.replicaz"),
        ("bad restart condition", "services:\n  w:\n    command: x\n    deploy: {restart_policy: {condition: sometimes}}\n", "services.w.deploy.restart_policy.condition"),
        ("http check without ports", "services:\n  w:\n    command: x\n    x-flotilla: {healthcheck: {http: /h}}\n", "healthcheck"),
        ("reservation over limit", "services:\n  w:\n    command: x\n    deploy: {resources: {limits: {memory: 64m}, reservations: {memory: 128m}}}\n", "reservations.memory"),
        ("bad mode", "services:\n  w:\n    command: x\n    deploy: {mode: sometimes}\n", "services.w.deploy.mode"),
        ("bad healthcheck test", "services:\n  w:\n    command: x\n    healthcheck: {test: [\"FOO\", \"x\"]}\n", "services.w.healthcheck.test"),
    ];
    assert!(cases.len() >= 15);
    for (name, yaml, needle) in cases {
        let out = c.deploy("bad.yaml", yaml);
        let err = stderr(&out);
        assert!(!out.status.success(), "{name}: accepted\n{err}");
        assert!(!err.contains("panicked"), "{name}: panicked\n{err}");
        assert!(
            err.contains(needle),
            "{name}: error does not mention {needle:?}:\n{err}"
        );
        assert!(
            err.contains("bad.yaml"),
            "{name}: error does not name the file:\n{err}"
        );
    }
    // A missing file is an error too.
    let out = c.run(&["deploy", "-f", "/nonexistent/compose.yaml"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/compose.yaml"),
        "{}",
        stderr(&out)
    );
    // The API rejects a bad body with the field named, whatever the client.
    let ls = c.json(&["service", "ls"]);
    assert_eq!(ls, Value::Array(vec![]), "nothing was created");
    // --dry-run validates and plans without changing anything.
    let good = c.write_file(
        "good.yaml",
        "services:\n  web:\n    command: [\"flotilla\", \"demo-app\"]\n    deploy: {replicas: 2}\n",
    );
    let plan = c.ok(&[
        "deploy",
        "--dry-run",
        "-f",
        good.to_str().unwrap_or_default(),
    ]);
    assert!(plan.contains("web: would create"), "{plan}");
    assert_eq!(c.json(&["service", "ls"]), Value::Array(vec![]));
}

/// SIGKILL `flotilla up` and start it again on the same data dir: services, revisions and task
/// records are all there, and running tasks are re-adopted, not restarted.
#[test]
fn crash_of_flotilla_keeps_state_and_readopts_tasks() {
    let mut c = Cluster::start_with(&["--demo"]);
    c.wait_ready("demo", 3);
    c.ok(&["scale", "demo=4"]);
    let before = c.wait_ready("demo", 4);
    let revisions_before = c.json(&["service", "history", "demo"]);
    let all_before = c.all_tasks("demo");

    c.kill_up();
    // The workloads outlive the crash.
    for t in &before {
        assert!(pid_alive(pid(t)), "task {} died with flotilla", t["id"]);
        assert_eq!(http_get(host_port(t), "/").map(|r| r.0), Some(200));
    }
    c.spawn_up();
    let after = c.wait_ready("demo", 4);
    assert_eq!(ids(&before), ids(&after), "same tasks after restart");
    for t in &after {
        let old = before
            .iter()
            .find(|b| b["id"] == t["id"])
            .expect("same task");
        assert_eq!(
            pid(t),
            pid(old),
            "task {} was restarted instead of re-adopted",
            t["id"]
        );
    }
    assert_eq!(c.json(&["service", "history", "demo"]), revisions_before);
    let all_after = c.all_tasks("demo");
    assert!(
        all_after.len() >= all_before.len(),
        "task records were lost"
    );
    // The cluster still works after the restart.
    c.ok(&["scale", "demo=2"]);
    c.wait_ready("demo", 2);
}

/// cgroup limits are real: a task allocating past its memory limit is OOM-killed and reported.
#[test]
fn memory_limit_oom_kills_and_is_reported() {
    let c = Cluster::start();
    let hog = c.write_file(
        "hog.yaml",
        r#"
services:
  hog:
    command: ["flotilla", "demo-app", "--alloc-mb", "256"]
    ports: ["8080"]
    deploy:
      resources: {limits: {memory: 32m}}
      restart_policy: {condition: none}
"#,
    );
    c.ok(&["deploy", "--detach", "-f", hog.to_str().unwrap_or_default()]);
    let t = wait_for("the OOM kill", Duration::from_secs(60), || {
        c.all_tasks("hog")
            .into_iter()
            .find(|t| t["status"]["state"] == "failed")
    });
    assert_eq!(t["status"]["oom_killed"], true, "{t}");
    assert!(
        t["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("OOM"),
        "{t}"
    );
}

/// depends_on with service_healthy: the dependent's first task is created only after its
/// dependency is healthy.
#[test]
fn depends_on_waits_for_healthy_dependency() {
    let c = Cluster::start();
    let out = c.deploy(
        "stack.yaml",
        r#"
services:
  db:
    command: ["flotilla", "demo-app", "--version", "db"]
    ports: ["8080"]
    x-flotilla:
      healthcheck: {http: /health, interval: 500ms, timeout: 1s, retries: 2, start_period: 1s}
  web:
    command: ["flotilla", "demo-app", "--version", "web"]
    # A task port, so demo-app listens on the port the agent hands it (PORT) rather than its
    # default 8080, which other tests' meshes publish at the same time.
    ports: ["8080"]
    depends_on:
      db: {condition: service_healthy}
"#,
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let db = c.wait_ready("db", 1);
    let web = c.wait_ready("web", 1);
    let healthy_at = db[0]["history"]
        .as_array()
        .and_then(|h| h.iter().find(|e| e["health"] == "healthy"))
        .and_then(|e| e["at"].as_i64())
        .expect("db became healthy");
    let web_created = web[0]["meta"]["created_at"].as_i64().expect("created_at");
    assert!(
        web_created >= healthy_at,
        "web created at {web_created}, before db was healthy at {healthy_at}"
    );
}

/// Events record what happened.
#[test]
fn events_record_service_and_task_changes() {
    let c = Cluster::start_with(&["--demo"]);
    c.wait_ready("demo", 3);
    let ev = c.ok(&["events", "-o", "json"]);
    let events: Vec<Value> = ev
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(events
        .iter()
        .any(|e| e["kind"] == "service" && e["object"] == "demo"));
    let running = events
        .iter()
        .filter(|e| {
            e["kind"] == "task"
                && e["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("running")
        })
        .count();
    assert!(running >= 3, "{ev}");
}

/// The API is never open to the network without authentication: every TCP peer needs the
/// bearer token from DATA_DIR/api-token, loopback included.
#[test]
fn remote_api_requires_token() {
    let Some(ip) = external_ipv4() else {
        eprintln!("SKIP remote_api_requires_token: this machine has no non-loopback IPv4 address");
        return;
    };
    let c = Cluster::start_public();
    let token = c.token();
    let token = token.as_str();
    let (status, body) =
        http_get_from(&ip, c.api_port, "/v1/services", &[]).expect("API reachable");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("authentication required"), "{body}");
    let (status, body) =
        http_get_from("127.0.0.1", c.api_port, "/v1/services", &[]).expect("API reachable");
    assert_eq!(status, 401, "loopback is not trusted: {body}");
    // The scheme is case-insensitive (RFC 9110).
    let lowercase = format!("Authorization: bearer {token}");
    let (status, body) =
        http_get_from(&ip, c.api_port, "/v1/services", &[&lowercase]).expect("API reachable");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get_from(
        &ip,
        c.api_port,
        "/v1/services",
        &["Authorization: Bearer wrong"],
    )
    .expect("API reachable");
    assert_eq!(status, 401);
    assert!(body.contains("invalid API token"), "{body}");
    let bearer = format!("Authorization: Bearer {token}");
    let (status, _) =
        http_get_from(&ip, c.api_port, "/v1/services", &[&bearer]).expect("API reachable");
    assert_eq!(status, 200);
    // The CLI says what is wrong, and works with FLOTILLA_TOKEN.
    let remote = format!("http://{ip}:{}", c.api_port);
    let out = c.run(&["--addr", &remote, "service", "ls"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unauthorized"), "{}", stderr(&out));
    let out = c.run(&["--addr", &remote, "--token", token, "service", "ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Removing a service stops its tasks.
#[test]
fn service_rm_stops_tasks() {
    let c = Cluster::start_with(&["--demo"]);
    let tasks = c.wait_ready("demo", 3);
    c.ok(&["service", "rm", "demo"]);
    wait_for("tasks to stop", Duration::from_secs(30), || {
        tasks.iter().all(|t| !pid_alive(pid(t))).then_some(())
    });
    let missing = c.run(&["service", "inspect", "demo"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("does not exist"));
}

/// When no node fits, the task stays pending and says why, counted per filter, in `ps`,
/// `service inspect` and events.
#[test]
fn unplaceable_task_explains_why() {
    let c = Cluster::start();
    let f = c.write_file(
        "zoned.yaml",
        "services:\n  zoned:\n    command: [\"flotilla\", \"demo-app\"]\n    deploy:\n      placement:\n        constraints: [\"node.labels.zone==b\"]\n",
    );
    let out = c.run(&[
        "deploy",
        "-f",
        f.to_str().unwrap_or_default(),
        "--timeout",
        "3s",
    ]);
    assert!(
        !out.status.success(),
        "a deploy that cannot place must not report success"
    );
    let expected = "0/1 nodes: 1 violate node.labels.zone==b";
    let task = wait_for("the placement explanation", Duration::from_secs(30), || {
        c.live_tasks("zoned")
            .into_iter()
            .find(|t| t["status"]["message"] == expected)
    });
    assert_eq!(task["status"]["state"], "pending");
    assert!(task["node"].is_null());
    assert!(c.ok(&["ps", "zoned"]).contains(expected));
    assert!(c.ok(&["service", "inspect", "zoned"]).contains(expected));
    let events = c.ok(&["events"]);
    assert!(
        events.contains(&format!("zoned.1 pending: {expected}")),
        "{events}"
    );
}

/// A host-mode port is a node resource: the one task the node can hold binds the published port
/// itself (the mesh, bound on 127.0.0.1, does not listen on it, or the task could not bind it),
/// and the second replica stays pending, saying why.
#[test]
fn host_mode_port_binds_on_the_node_and_holds_one_task_per_node() {
    let c = Cluster::start_with(&["--mesh-bind", "127.0.0.1"]);
    let port = free_port();
    let yaml = format!(
        "services:\n  edge:\n    command: [\"flotilla\", \"demo-app\"]\n    ports:\n      - {{target: 8080, published: {port}, mode: host}}\n    deploy:\n      replicas: 2\n"
    );
    let f = c.write_file("edge.yaml", &yaml);
    let out = c.run(&[
        "deploy",
        "-f",
        f.to_str().unwrap_or_default(),
        "--timeout",
        "3s",
    ]);
    assert!(
        !out.status.success(),
        "a deploy with a replica that cannot be placed must not report success"
    );
    let expected = format!("0/1 nodes: 1 host port {port} in use");
    let (running, pending) = wait_for(
        "one running task and one explained pending one",
        Duration::from_secs(60),
        || {
            let live = c.live_tasks("edge");
            let running = live
                .iter()
                .find(|t| t["status"]["state"] == "running")?
                .clone();
            let pending = live
                .iter()
                .find(|t| t["status"]["state"] == "pending" && t["status"]["message"] == expected)?
                .clone();
            (live.len() == 2).then_some((running, pending))
        },
    );
    assert!(pending["node"].is_null(), "{pending:#}");
    // The task was given the published port itself, and answers on it directly.
    assert_eq!(host_port(&running), port, "{running:#}");
    let (status, body) = wait_for("the task on its host port", Duration::from_secs(30), || {
        http_get(port, "/")
    });
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["task"], running["id"]);
    assert!(c.ok(&["ps", "edge"]).contains(&expected));
    assert!(
        c.ok(&["events"]).contains(&format!("pending: {expected}")),
        "events explain the pending task"
    );
}

/// A priority-900 service that fits only by evicting priority-100 tasks on the one (full) node:
/// the scheduler picks the victims within their disruption budget, the controller stops them
/// with the reason in events, starts the urgent task once they are gone, and the victims'
/// replacements stay pending saying why. Nothing else of `batch` is touched.
#[test]
fn higher_priority_service_preempts_lower_priority_tasks() {
    let c = Cluster::start();
    let nodes = c.json(&["node", "ls"]);
    let cpu = nodes[0]["resources"]["cpu_millis"]
        .as_u64()
        .expect("the node reports its cpus");
    let cpus = |millis: u64| format!("{}.{:03}", millis / 1000, millis % 1000);
    let service = |name: &str, replicas: u64, millis: u64, extra: &str| {
        format!(
            "services:\n  {name}:\n    command: [\"sleep\", \"600\"]\n    deploy:\n      replicas: {replicas}\n      resources:\n        reservations:\n          cpus: \"{}\"\n    x-flotilla:\n{extra}",
            cpus(millis)
        )
    };
    // Four quarter-node tasks fill the node; two may be disrupted at once.
    let batch = service(
        "batch",
        4,
        cpu / 4,
        "      priority: 100\n      disruption:\n        max_unavailable: 2\n",
    );
    let out = c.deploy("batch.yaml", &batch);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = c.wait_ready("batch", 4);

    let urgent = service("urgent", 1, cpu / 2, "      priority: 900\n");
    let out = c.deploy("urgent.yaml", &urgent);
    assert!(out.status.success(), "{}", stderr(&out));
    let urgent_task = c.wait_ready("urgent", 1).remove(0);

    // Exactly two batch tasks were preempted: their processes are gone, the other two still
    // run the same pids.
    let all = c.all_tasks("batch");
    let preempted: Vec<&Value> = before
        .iter()
        .filter(|t| {
            all.iter()
                .any(|a| a["id"] == t["id"] && a["desired_state"] == "shutdown")
        })
        .collect();
    assert_eq!(preempted.len(), 2, "{all:#?}");
    for t in &preempted {
        wait_for("a preempted task to exit", Duration::from_secs(30), || {
            (!pid_alive(pid(t))).then_some(())
        });
    }
    let untouched: Vec<&Value> = before
        .iter()
        .filter(|t| !preempted.iter().any(|p| p["id"] == t["id"]))
        .collect();
    assert_eq!(untouched.len(), 2);
    assert!(untouched.iter().all(|t| pid_alive(pid(t))));

    // The victims' replacements wait, and say why.
    let expected = "0/1 nodes: 1 insufficient cpu";
    let pending = wait_for(
        "batch's replacements to explain",
        Duration::from_secs(30),
        || {
            let live = c.live_tasks("batch");
            let waiting: Vec<Value> = live
                .into_iter()
                .filter(|t| t["status"]["state"] == "pending" && t["status"]["message"] == expected)
                .collect();
            (waiting.len() == 2).then_some(waiting)
        },
    );
    assert!(pending.iter().all(|t| t["node"].is_null()));
    assert!(c.ok(&["ps", "batch"]).contains(expected));

    let events = c.ok(&["events"]);
    let urgent_name = "urgent.1";
    assert!(
        events.contains(&format!("preempted by {urgent_name} (priority 900 > 100)")),
        "{events}"
    );
    assert!(
        events.contains(&format!("{urgent_name} pending: preempting on node")),
        "{events}"
    );
    assert!(events.contains(&format!("pending: {expected}")), "{events}");
    assert_eq!(urgent_task["node"], nodes[0]["id"]);
}

/// A watch stream's heartbeat keeps its schedule while changes the watcher filters out keep
/// arriving (here the node's own heartbeats, several a second, on a `kind=service` watch):
/// without it the agent's client takes a silent stream for a dead manager.
#[test]
fn watch_heartbeats_arrive_between_filtered_out_changes() {
    let c = Cluster::start();
    let out = sh(&format!(
        "curl -sN --max-time 12 -H '{}' 'http://127.0.0.1:{}/v1/watch?kind=service'",
        c.bearer(),
        c.api_port
    ));
    let body = stdout(&out);
    assert!(
        body.lines().any(|l| l.contains("\"heartbeat\"")),
        "no heartbeat in 12 s of a service watch:\n{}",
        tail(&body, 5)
    );
}

/// Issue 13: a local user who is not root gets nothing: the TCP API answers 401 (no trust by
/// address), the Unix socket refuses to connect (mode 0660, root's), and the data dir with the
/// store and the token is private. Root uses the socket with no token.
#[test]
fn unprivileged_local_users_get_nothing() {
    let c = Cluster::start();
    let user = format!("flt{}", std::process::id());
    let added = sh(&format!("useradd --no-create-home --system {user}"));
    assert!(added.status.success(), "useradd: {}", stderr(&added));
    struct DelUser(String);
    impl Drop for DelUser {
        fn drop(&mut self) {
            sh(&format!("userdel {}", self.0));
        }
    }
    let _user = DelUser(user.clone());
    let as_user = |cmd: &str| sh(&format!("runuser -u {user} -- sh -c \"{cmd}\" 2>&1"));

    let tcp = as_user(&format!(
        "curl -s -w '\\n%{{http_code}}' http://127.0.0.1:{}/v1/services",
        c.api_port
    ));
    let text = stdout(&tcp);
    assert!(text.trim_end().ends_with("401"), "{text}");
    assert!(text.contains("authentication required"), "{text}");

    // Only the socket's own mode stands in the way: let anyone through the data dir.
    let data = c.data_dir();
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    };
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("api-token")), 0o600);
    assert_eq!(mode(&data.join("store")), 0o700);
    for f in std::fs::read_dir(data.join("store")).expect("store dir") {
        let f = f.expect("entry").path();
        if f.is_file() {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    }
    assert_eq!(mode(&c.socket()), 0o660);
    sh(&format!(
        "chmod 0711 {} {}",
        c.dir.path().display(),
        data.display()
    ));
    let socket = as_user(&format!(
        "{BIN} --addr unix://{} service ls",
        c.socket().display()
    ));
    sh(&format!("chmod 0700 {}", data.display()));
    assert!(!socket.status.success(), "{}", stdout(&socket));
    assert!(
        stdout(&socket).contains("Permission denied (os error 13)"),
        "{}",
        stdout(&socket)
    );

    // Root: the CLI over the socket, no token.
    let out = std::process::Command::new(BIN)
        .args(["service", "ls"])
        .env("FLOTILLA_SOCKET", c.socket())
        .env_remove("FLOTILLA_ADDR")
        .env_remove("FLOTILLA_TOKEN")
        .output()
        .expect("run flotilla");
    assert!(out.status.success(), "{}", stderr(&out));
}
