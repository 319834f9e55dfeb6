//! End-to-end tests of workload isolation (issue #13): a real `flotilla up`, real process tasks
//! calling their node's agent server from inside, real cgroup limits.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

/// The address (`HOST:PORT`) of the agent server of `up`'s own node.
fn agent_addr(c: &Cluster) -> String {
    let nodes = c.json(&["node", "ls"]);
    nodes[0]["agent_addr"]
        .as_str()
        .unwrap_or_else(|| panic!("the node has no agent address: {nodes}"))
        .to_string()
}

/// A task's stats as the manager proxies them from the agent.
fn stats(c: &Cluster, task: &str) -> Value {
    let token = std::fs::read_to_string(c.data_dir().join("api-token")).unwrap_or_default();
    let bearer = format!("Authorization: Bearer {}", token.trim());
    let path = format!("/v1/tasks/{task}/stats");
    let (status, body) =
        http_get_from("127.0.0.1", c.api_port, &path, &[&bearer]).expect("API reachable");
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: bad JSON ({e}): {body}"))
}

/// A workload running as `nobody` with a 16 MiB limit calls its own agent's server on loopback:
/// logs, stats, a resource update raising its limit to 8 GiB, and the mesh endpoints. Every
/// call is refused (401), its limit is unchanged afterwards, and the manager — which holds the
/// node's agent secret — still reads its logs and stats through the same server.
#[test]
fn a_workload_cannot_use_its_agents_server() {
    let c = Cluster::start();
    let agent = agent_addr(&c);
    // The node's secret is private to root, and no API reader sees it.
    let secret_file = c.data_dir().join("agent").join("agent-secret");
    let secret = std::fs::read_to_string(&secret_file).expect("the agent's secret file");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&secret_file)
            .expect("secret file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let nodes = c.ok(&["node", "ls", "-o", "json"]);
    assert!(
        !nodes.contains(secret.trim()),
        "node ls shows the agent secret"
    );
    let base = format!("http://{agent}");
    let script = format!(
        r#"id=$FLOTILLA_TASK_ID
echo "uid=$(id -u)"
for p in tasks/$id/logs tasks/$id/stats mesh/stats metrics; do
  echo "GET /$p -> $(curl -s -o /dev/null -w '%{{http_code}}' {base}/$p)"
done
echo "POST resources -> $(curl -s -o /dev/null -w '%{{http_code}}' -X POST \
  -H 'content-type: application/json' \
  -d '{{"limits":{{"memory_bytes":8589934592}}}}' {base}/tasks/$id/resources)"
echo probes done
exec sleep 1000
"#
    );
    let indented: String = script.lines().map(|l| format!("        {l}\n")).collect();
    let out = c.deploy(
        "escape.yaml",
        &format!(
            "services:\n  escape:\n    user: nobody\n    command:\n      - sh\n      - -c\n      - |\n{indented}    deploy:\n      resources:\n        limits: {{memory: 16M}}\n"
        ),
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let task = c.wait_ready("escape", 1)[0]["id"]
        .as_str()
        .expect("task id")
        .to_string();
    let logs = wait_for("the workload's probes", Duration::from_secs(60), || {
        let out = c.run(&["logs", &task]);
        let text = stdout(&out);
        text.contains("probes done").then_some(text)
    });
    assert!(logs.contains("uid=65534"), "{logs}");
    let calls: Vec<&str> = logs.lines().filter(|l| l.contains(" -> ")).collect();
    assert_eq!(calls.len(), 5, "{logs}");
    for call in calls {
        assert!(
            call.ends_with("-> 401") || call.ends_with("-> 403"),
            "the agent answered a workload: {call}\n{logs}"
        );
    }
    let limit = stats(&c, &task)["memory_limit_bytes"].as_u64();
    assert_eq!(limit, Some(16 << 20), "the workload changed its own limit");
}

/// A process task without `user:` runs as an unprivileged user; `user: root` is explicit.
#[test]
fn process_tasks_run_unprivileged_unless_root_is_asked_for() {
    let c = Cluster::start();
    let out = c.deploy(
        "users.yaml",
        "services:\n  plain:\n    command: [\"sh\", \"-c\", \"echo uid=$(id -u); exec sleep 1000\"]\n  admin:\n    user: root\n    command: [\"sh\", \"-c\", \"echo uid=$(id -u); exec sleep 1000\"]\n",
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let uid_of = |service: &str| {
        wait_for(
            &format!("the uid {service} prints"),
            Duration::from_secs(60),
            || {
                let text = stdout(&c.run(&["logs", service]));
                // `logs SERVICE` may prefix each line with the task's name.
                text.lines()
                    .find_map(|l| l.split("uid=").nth(1))
                    .and_then(|u| u.trim().parse::<u32>().ok())
            },
        )
    };
    if nix::unistd::Uid::effective().is_root() {
        assert_ne!(uid_of("plain"), 0, "a task without `user:` ran as root");
    }
    assert_eq!(uid_of("admin"), 0);
}
