//! End-to-end acceptance of the docker driver: real `flotilla up`, the real CLI, real containers
//! on the local Docker Engine (no registry: the image comes from `flotilla demo-image`).
//!
//! Without an engine every test prints `SKIP: no Docker Engine: …` and passes, unless
//! `FLOTILLA_REQUIRE_DOCKER=1`, which turns that into a failure.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

fn host_port(t: &Value) -> u16 {
    t["status"]["ports"][0]["host_port"]
        .as_u64()
        .expect("task has a host port") as u16
}

fn container_id(t: &Value) -> String {
    t["status"]["container_id"]
        .as_str()
        .expect("task has a container id")
        .to_string()
}

fn inspect(container: &str, format: &str) -> String {
    let out = sh(&format!("docker inspect --format '{format}' {container}"));
    assert!(out.status.success(), "docker inspect: {}", stderr(&out));
    stdout(&out).trim().to_string()
}

const DEMO: &str = r#"
services:
  web:
    image: flotilla-demo:latest
    command: ["demo-app", "--version", "v1"]
    ports: ["8080"]
    x-flotilla:
      healthcheck:
        http: /health
        interval: 500ms
        timeout: 2s
        retries: 3
    deploy:
      replicas: 3
      resources:
        limits:
          memory: 64m
      restart_policy:
        delay: 200ms
"#;

/// Three healthy containers answer on their host ports; a `docker kill` is replaced; an agent
/// restart re-adopts the containers; raising a memory limit keeps the container; `top` shows
/// usage against the limit.
#[test]
fn demo_image_runs_heals_readopts_and_resizes() {
    if !docker_available() {
        return;
    }
    let _leftovers = DockerLeftovers(&["web"]);
    let mut c = Cluster::start();
    let out = c.deploy("demo.yaml", DEMO);
    assert!(
        out.status.success(),
        "deploy: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let tasks = c.wait_ready("web", 3);
    let mut ports = BTreeSet::new();
    for t in &tasks {
        let (status, body) = http_get(host_port(t), "/").expect("container answers");
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!(v["version"], "v1");
        assert_eq!(v["task"], t["id"], "FLOTILLA_TASK_ID reaches the container");
        ports.insert(host_port(t));
        let id = container_id(t);
        assert_eq!(
            inspect(&id, "{{index .Config.Labels \"io.flotilla.task\"}}"),
            t["id"].as_str().unwrap_or_default()
        );
        assert_eq!(
            inspect(&id, "{{.HostConfig.Memory}}"),
            (64u64 << 20).to_string()
        );
        // Joined by id: a name can be ambiguous when agents sharing the engine raced (#21).
        let network = sh("docker network inspect --format '{{.Id}}' flotilla-web");
        assert_eq!(
            inspect(&id, "{{.HostConfig.NetworkMode}}"),
            stdout(&network).trim()
        );
    }
    assert_eq!(ports.len(), 3, "each container has its own host port");

    // docker kill behind Flotilla's back: the die event fails the task and a replacement comes.
    let victim = tasks[0].clone();
    let killed = sh(&format!("docker kill {}", container_id(&victim)));
    assert!(killed.status.success(), "{}", stderr(&killed));
    let after = wait_for("a replacement container", Duration::from_secs(90), || {
        let t = c.wait_ready("web", 3);
        (!t.iter().any(|x| x["id"] == victim["id"])).then_some(t)
    });
    let dead = c
        .all_tasks("web")
        .into_iter()
        .find(|t| t["id"] == victim["id"])
        .expect("killed task kept in history");
    assert_eq!(dead["status"]["state"], "failed", "{dead}");
    assert_eq!(dead["status"]["exit_code"], 137, "{dead}");

    // Restart the agent (and manager): the same containers keep running and are re-adopted.
    let before: BTreeSet<String> = after.iter().map(container_id).collect();
    c.kill_up();
    c.spawn_up();
    // The store still says "running" right away; wait for the new agent to have re-adopted.
    wait_for(
        "the agent to recover the containers",
        Duration::from_secs(60),
        || {
            c.up_log()
                .contains("recovered tasks from a previous agent count=3")
                .then_some(())
        },
    );
    let readopted = c.wait_ready("web", 3);
    // The killed task's container was kept for its logs; the new agent leaves its record be.
    let dead_after = c
        .all_tasks("web")
        .into_iter()
        .find(|t| t["id"] == victim["id"])
        .expect("killed task still in history");
    assert_eq!(dead_after["status"], dead["status"], "{dead_after}");
    let now: BTreeSet<String> = readopted.iter().map(container_id).collect();
    assert_eq!(
        before, now,
        "container ids unchanged across the agent restart"
    );
    for id in &now {
        assert_eq!(inspect(id, "{{.State.Running}}"), "true");
    }

    // Raise the memory limit in place: same container, same start time, new limit.
    let target = container_id(&readopted[0]);
    let started = inspect(&target, "{{.State.StartedAt}}");
    c.ok(&[
        "service",
        "update-resources",
        "web",
        "--memory",
        "128m",
        "--cpus",
        "0.5",
    ]);
    assert_eq!(
        inspect(&target, "{{.HostConfig.Memory}}"),
        (128u64 << 20).to_string()
    );
    assert_eq!(inspect(&target, "{{.HostConfig.NanoCpus}}"), "500000000");
    assert_eq!(inspect(&target, "{{.State.StartedAt}}"), started);
    assert_eq!(inspect(&target, "{{.Id}}"), target);

    let top = c.ok(&["top", "web"]);
    assert_eq!(top.matches("/ 128MiB").count(), 3, "{top}");
    let stats = c.json(&["top", "web"]);
    assert_eq!(stats.as_array().map(Vec::len), Some(3), "{stats}");
    assert!(
        stats[0]["memory_bytes"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );

    // Logs come from the engine.
    let logs = c.ok(&["logs", "web", "--tail", "50"]);
    assert!(logs.contains("listening"), "{logs}");

    // Removing the service removes its containers and, with the last one, its network.
    c.ok(&["service", "rm", "web"]);
    wait_for("the containers to go", Duration::from_secs(60), || {
        let out = sh(&format!(
            "docker ps -aq --filter label=io.flotilla.service=web {}",
            owner_filter(&c)
        ));
        stdout(&out).trim().is_empty().then_some(())
    });
    wait_for("the network to go", Duration::from_secs(30), || {
        let out = sh("docker network ls -q --filter name=^flotilla-web$");
        stdout(&out).trim().is_empty().then_some(())
    });
}

const CRASH: &str = r#"
services:
  crash:
    image: flotilla-demo:latest
    entrypoint: ["/bin/sh", "-c"]
    command: ["echo crashed-because-of-reasons; exit 3"]
    deploy:
      restart_policy:
        delay: 100ms
"#;

/// `docker ps` filter for this cluster's own containers: another cluster sharing the engine may
/// run a service of the same name (its agent has another owner key).
fn owner_filter(c: &Cluster) -> String {
    let path = c.data_dir().join("agent").join("owner");
    let owner =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    format!("--filter label=io.flotilla.owner={}", owner.trim())
}

/// Task ids of this cluster's containers of `service` on the engine, stopped ones included.
fn containers_of(c: &Cluster, service: &str) -> BTreeSet<String> {
    let out = sh(&format!(
        "docker ps -a --filter label=io.flotilla.service={service} {} --format '{{{{.Label \"io.flotilla.task\"}}}}'",
        owner_filter(c)
    ));
    assert!(out.status.success(), "docker ps: {}", stderr(&out));
    stdout(&out).lines().map(str::to_string).collect()
}

/// A container that crashes at start stays on its node, stopped, with its output, as long as
/// its task is in the slot's history, so `flotilla logs` shows why it crashed (#12: the
/// container was removed and logs answered 404). The containers of tasks the history drops,
/// and with `service rm` all of them, are removed.
#[test]
fn crashed_containers_keep_their_logs_until_their_tasks_are_deleted() {
    if !docker_available() {
        return;
    }
    let _leftovers = DockerLeftovers(&["crash"]);
    let c = Cluster::start();
    let file = c.write_file("crash.yaml", CRASH);
    c.ok(&[
        "deploy",
        "-f",
        file.to_str().unwrap_or_default(),
        "--detach",
    ]);
    let failed = wait_for("a crashed task", Duration::from_secs(60), || {
        c.all_tasks("crash")
            .into_iter()
            .find(|t| t["status"]["state"] == "failed")
    });
    assert_eq!(failed["status"]["exit_code"], 3, "{failed}");
    let logs = wait_for(
        "the crash output in the logs",
        Duration::from_secs(60),
        || {
            let out = c.run(&["logs", "crash"]);
            let text = stdout(&out);
            (out.status.success() && text.contains("crashed-because-of-reasons")).then_some(text)
        },
    );
    assert!(logs.contains(" | crashed-because-of-reasons"), "{logs}");
    let one = c.ok(&["logs", failed["id"].as_str().unwrap_or_default()]);
    assert_eq!(one.trim(), "crashed-because-of-reasons");

    // Crash on until the store has dropped tasks from the history; their containers go, the
    // others stay.
    let mut seen = BTreeSet::new();
    wait_for(
        "dropped tasks' containers to go",
        Duration::from_secs(120),
        || {
            let current: BTreeSet<String> = c
                .all_tasks("crash")
                .iter()
                .filter_map(|t| t["id"].as_str().map(str::to_string))
                .collect();
            seen.extend(current.iter().cloned());
            let containers = containers_of(&c, "crash");
            let dropped: Vec<&String> = seen.difference(&current).collect();
            (dropped.len() >= 2
                && dropped.iter().all(|id| !containers.contains(*id))
                && containers.iter().any(|id| current.contains(id)))
            .then_some(())
        },
    );

    c.ok(&["service", "rm", "crash"]);
    wait_for("the containers to go", Duration::from_secs(60), || {
        containers_of(&c, "crash").is_empty().then_some(())
    });
    wait_for("the network to go", Duration::from_secs(30), || {
        let out = sh("docker network ls -q --filter name=^flotilla-crash$");
        stdout(&out).trim().is_empty().then_some(())
    });
}

/// A missing image, an unknown capability and an impossible memory limit each give a clear
/// reason and never hang.
#[test]
fn bad_container_specs_fail_clearly() {
    if !docker_available() {
        return;
    }
    let _leftovers = DockerLeftovers(&["ghost", "caps", "tiny"]);
    let c = Cluster::start();

    let ghost = c.write_file(
        "ghost.yaml",
        "services:\n  ghost:\n    image: flotilla-no-such-image:v0\n    pull_policy: never\n    deploy:\n      restart_policy:\n        condition: none\n",
    );
    c.ok(&[
        "deploy",
        "-f",
        ghost.to_str().unwrap_or_default(),
        "--detach",
    ]);
    let failed = wait_for("the ghost task to fail", Duration::from_secs(60), || {
        c.all_tasks("ghost")
            .into_iter()
            .find(|t| t["status"]["state"] == "failed")
    });
    let message = failed["status"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("image flotilla-no-such-image:v0 not present on node"),
        "{message}"
    );

    let out = c.deploy(
        "caps.yaml",
        "services:\n  caps:\n    image: flotilla-demo:latest\n    cap_add: [NET_ADMIN, NET_MAGIC]\n",
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("services.caps.cap_add[1]") && stderr(&out).contains("NET_MAGIC"),
        "{}",
        stderr(&out)
    );

    let out = c.deploy(
        "tiny.yaml",
        "services:\n  tiny:\n    image: flotilla-demo:latest\n    deploy:\n      resources:\n        limits:\n          memory: 1b\n",
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("services.tiny.deploy.resources.limits.memory"),
        "{}",
        stderr(&out)
    );
}

/// #21 item 9: a second `demo-image` with the same binary leaves the image as it is: same id,
/// and no untagged image of the same recipe left behind.
#[test]
fn demo_image_builds_only_when_the_binary_changed() {
    if !docker_available() {
        return;
    }
    let tag = format!("flotilla-demo-idempotence:{}", std::process::id());
    struct RemoveImage(String);
    impl Drop for RemoveImage {
        fn drop(&mut self) {
            sh(&format!("docker rmi {} >/dev/null 2>&1", self.0));
        }
    }
    let _cleanup = RemoveImage(tag.clone());
    let build = || {
        let out = std::process::Command::new(BIN)
            .args(["demo-image", "--tag", &tag])
            .output()
            .expect("run flotilla demo-image");
        assert!(out.status.success(), "demo-image: {}", stderr(&out));
        assert_eq!(stdout(&out).trim(), tag);
        inspect(&tag, "{{.Id}}")
    };
    let first = build();
    let digest = inspect(
        &tag,
        "{{index .Config.Labels \"io.flotilla.recipe-sha256\"}}",
    );
    assert_eq!(digest.len(), 64, "label {digest:?}");
    // Untagged images of this very recipe (another user of the engine may have left some,
    // e.g. by retagging flotilla-demo:latest): the second call must add none.
    let dangling = || {
        let out = sh(&format!(
            "docker images -q --no-trunc --filter dangling=true --filter label=io.flotilla.recipe-sha256={digest}"
        ));
        stdout(&out)
    };
    let before = dangling();
    let second = build();
    assert_eq!(first, second, "the second call rebuilt the image");
    assert_eq!(dangling(), before, "the second call left an untagged image");

    // Another image under the tag (no recipe label): rebuilt, and the image it replaced, now
    // untagged, is removed.
    let other = sh(&format!(
        "tar -cf - --files-from /dev/null | docker import - {tag}"
    ));
    assert!(other.status.success(), "docker import: {}", stderr(&other));
    // The import untagged this test's first image: remove it, as nobody else will.
    sh(&format!("docker rmi {first} >/dev/null 2>&1"));
    let replaced = inspect(&tag, "{{.Id}}");
    assert_ne!(replaced, first);
    let rebuilt = build();
    assert_ne!(
        rebuilt, replaced,
        "an image without the recipe label was kept"
    );
    let gone = sh(&format!("docker image inspect {replaced}"));
    assert!(!gone.status.success(), "the replaced image is still there");
}
