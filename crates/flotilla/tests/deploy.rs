//! What `flotilla deploy` and `flotilla scale` report, through real `flotilla up` processes and
//! the mesh's published port: they return once the service can take requests (every task
//! ready, every node's mesh routing them), and they say FAILED only when the controller gave up.

mod common;

use common::*;

fn mesh_cluster() -> Cluster {
    Cluster::start_with(&["--mesh-bind", "127.0.0.1", "--node-name", "n1"])
}

/// A demo-app service published through the mesh on `port`, ready once `/health` answers.
fn published(name: &str, port: u16, replicas: u32) -> String {
    format!(
        r#"services:
  {name}:
    command: ["flotilla", "demo-app"]
    ports: ["{port}:8080"]
    x-flotilla:
      healthcheck: {{http: /health, interval: 300ms, timeout: 2s, retries: 3}}
    deploy:
      replicas: {replicas}
"#
    )
}

/// A CI script's `flotilla deploy && curl`: the request right after the deploy returned must be
/// served, for a new service (deploy/rm cycles) and after a scale-up from zero. Before the
/// deploy waited for the meshes, the first request after a create was reset about half the time.
#[test]
fn the_first_request_after_deploy_or_scale_is_served() {
    let c = mesh_cluster();
    let port = free_port();
    let yaml = published("ci", port, 1);
    let mut failures = Vec::new();
    for i in 0..50 {
        if i % 2 == 0 {
            let out = c.deploy("ci.yaml", &yaml);
            assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        } else {
            c.ok(&["scale", "ci=2"]);
        }
        match http_get(port, "/") {
            Some((200, _)) => {}
            other => failures.push(format!("cycle {i}: {other:?}")),
        }
        if i % 2 == 0 {
            c.ok(&["scale", "ci=0"]);
        } else {
            c.ok(&["service", "rm", "ci"]);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 50 failed: {failures:?}",
        failures.len()
    );
}

/// Every replica's first start fails (exit 1); the restart policy replaces each one and the
/// deploy succeeds. The CLI must not report the dead tasks as given up while the controller
/// replaces them.
#[test]
fn a_task_that_fails_once_and_is_replaced_does_not_fail_the_deploy() {
    let c = Cluster::start();
    let marks = c.data_dir().with_file_name("marks");
    std::fs::create_dir_all(&marks).expect("marks dir");
    let m = marks.display();
    let script = format!(
        "mkdir {m}/1 2>/dev/null && exit 1; mkdir {m}/2 2>/dev/null && exit 1; \
         mkdir {m}/3 2>/dev/null && exit 1; exec flotilla demo-app"
    );
    let out = c.deploy(
        "once.yaml",
        &format!(
            r#"services:
  once:
    command: ["sh", "-c", "{script}"]
    # The marks dir is in the test's root-only temp dir.
    user: root
    ports: ["8080"]
    x-flotilla:
      healthcheck: {{http: /health, interval: 300ms, timeout: 2s, retries: 3}}
    deploy:
      replicas: 3
      restart_policy: {{condition: on-failure, delay: 100ms, max_attempts: 2}}
"#
        ),
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("once: 3 task(s) ready"),
        "{}",
        stdout(&out)
    );
    let failed = c
        .all_tasks("once")
        .iter()
        .filter(|t| t["status"]["state"] == "failed")
        .count();
    assert_eq!(failed, 3, "every replica failed once");
}

/// A global service wants a task only on nodes that are ready, active and run its driver, the
/// same count `service ls` shows: a paused node does not hold its deploy back (the CLI once
/// counted every node and waited for a task that would never come).
#[test]
fn a_global_deploy_does_not_wait_for_a_paused_node() {
    let mut c = Cluster::start();
    c.add_agent("b");
    c.ok(&["node", "update", "--availability", "pause", "b"]);
    let file = c.write_file(
        "global.yaml",
        r#"services:
  everywhere:
    command: ["flotilla", "demo-app"]
    ports: ["8080"]
    deploy:
      mode: global
"#,
    );
    let out = c.run(&[
        "deploy",
        "-f",
        file.to_str().expect("utf8 path"),
        "--timeout",
        "60s",
    ]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("everywhere: 1 task(s) ready"),
        "{}",
        stdout(&out)
    );
    assert_eq!(c.json(&["service", "ls"])[0]["desired"], 1);
}
