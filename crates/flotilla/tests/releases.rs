//! Releases under load, through real `flotilla up` processes and the mesh's published port:
//! every path ends on the right version with zero failed requests, a never-healthy version is
//! rolled back without ever taking traffic, an erroring canary is aborted at its first step,
//! and the global guard pauses every rollout when task starts fail across the cluster. The
//! process driver always; the docker driver too where an engine answers.
//!
//! The load is `flotilla bench load` at 200 requests/s, open loop, started before the release
//! and stopped (SIGTERM, which makes it report) a moment after the release command returned.
//! Tests take turns with the load (a shared lock) so two of them never compete for the
//! machine's cores.

mod common;

use common::*;
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

static LOAD_TURN: Mutex<()> = Mutex::new(());

const RATE: &str = "200";
/// An upper bound only: the load is stopped once the release has returned.
const LOAD_AT_MOST: &str = "180s";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    Process,
    Docker,
}

impl Driver {
    /// The service's name. Docker containers are visible engine-wide, and other test binaries
    /// clean up containers of their services by name (`DockerLeftovers`), so the docker
    /// variant's name is its own.
    fn service(self) -> &'static str {
        match self {
            Driver::Process => "web",
            Driver::Docker => "web-releases",
        }
    }
}

fn release_cluster() -> Cluster {
    Cluster::start_with(&["--mesh-bind", "127.0.0.1", "--node-name", "n1"])
}

/// A cluster whose node name no other cluster on this engine uses: the docker driver finds
/// its containers by node name, so a concurrent test cluster's node `n1` would adopt (and
/// remove) them when its agent starts.
fn docker_release_cluster() -> Cluster {
    let node = format!("releases-docker-{}", std::process::id());
    Cluster::start_with(&["--mesh-bind", "127.0.0.1", "--node-name", &node])
}

/// A demo-app service `web` at `version`, published on `port`, with frequent health checks
/// that tolerate a slow answer (a loaded CI machine must not make healthy tasks unhealthy).
fn web(port: u16, version: &str, app_args: &str, release: &str) -> String {
    web_on(Driver::Process, port, version, app_args, release)
}

fn web_on(driver: Driver, port: u16, version: &str, app_args: &str, release: &str) -> String {
    let run = match driver {
        Driver::Process => format!(
            "    command: [\"sh\", \"-c\", \"exec flotilla demo-app --version {version} {app_args}\"]\n    x-flotilla:\n      driver: process\n"
        ),
        Driver::Docker => {
            let args: String = app_args
                .split_whitespace()
                .map(|a| format!(", \"{a}\""))
                .collect();
            format!(
                "    image: flotilla-demo:latest\n    command: [\"demo-app\", \"--version\", \"{version}\"{args}]\n    x-flotilla:\n"
            )
        }
    };
    let name = driver.service();
    format!(
        r#"services:
  {name}:
{run}      ports: [{{published: {port}, protocol: http}}]
      healthcheck:
        http: /health
        interval: 300ms
        timeout: 2s
        retries: 3
{release}    ports: ["{port}:8080"]
    deploy:
      replicas: 3
      update_config:
        monitor: 1s
        failure_action: rollback
"#
    )
}

fn start_load(port: u16) -> Child {
    Command::new(BIN)
        .args([
            "bench",
            "load",
            "--url",
            &format!("http://127.0.0.1:{port}/"),
            "--rate",
            RATE,
            "--duration",
            LOAD_AT_MOST,
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the load")
}

fn version_served(port: u16) -> String {
    let (status, body) = http_get(port, "/").expect("GET / through the mesh");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).expect("demo JSON")["version"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Asserts the mesh serves only `version` right now: a release command returns once every
/// node's mesh routes only the new tasks, so no request may reach an old one afterwards.
fn assert_serves_now(port: u16, version: &str) {
    for i in 0..30 {
        let got = version_served(port);
        assert_eq!(got, version, "request {i} after the release returned");
    }
}

/// Waits until the mesh serves `version` (after a failed release, whose rollback continues
/// after the command returned).
fn wait_serves(port: u16, version: &str) {
    wait_for(
        &format!("the mesh to serve {version}"),
        Duration::from_secs(60),
        || (version_served(port) == version).then_some(()),
    );
    assert_serves_now(port, version);
}

/// Deploys v1 and waits until the mesh serves it.
fn start_v1(c: &Cluster, port: u16, release: &str) {
    start_version(c, Driver::Process, port, "v1", release);
}

fn start_version(c: &Cluster, driver: Driver, port: u16, version: &str, release: &str) {
    let out = c.deploy("v1.yaml", &web_on(driver, port, version, "", release));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    c.wait_ready(driver.service(), 3);
    wait_for("the mesh to serve v1", Duration::from_secs(30), || {
        (0..5)
            .all(|_| http_get(port, "/").is_some_and(|(s, _)| s == 200))
            .then_some(())
    });
}

/// Runs `release` under load; returns its output and the load's report.
fn under_load(
    port: u16,
    release: impl FnOnce() -> std::process::Output,
) -> (std::process::Output, Value) {
    let _turn = LOAD_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let load = start_load(port);
    // The load is running before the release starts and goes on a moment after it returned.
    std::thread::sleep(Duration::from_secs(1));
    let out = release();
    std::thread::sleep(Duration::from_secs(1));
    (out, load_report(load))
}

fn assert_no_failures(report: &Value) {
    assert!(report["sent"].as_u64().unwrap_or(0) >= 200, "{report:#}");
    assert_eq!(report["failed"], 0, "failed requests: {report:#}");
}

fn rolling_case(order: &str) {
    let c = release_cluster();
    let port = free_port();
    start_v1(&c, port, "");
    let (out, report) = under_load(port, || {
        c.deploy(
            "v2.yaml",
            &web(port, "v2", "", "").replace(
                "monitor: 1s",
                &format!("monitor: 1s\n        order: {order}"),
            ),
        )
    });
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_no_failures(&report);
    assert_serves_now(port, "v2");
    assert_eq!(c.json(&["rollout", "status", "web"])["phase"], "succeeded");
}

#[test]
fn rolling_start_first_under_load_has_no_failed_requests() {
    rolling_case("start-first");
}

#[test]
fn rolling_stop_first_under_load_has_no_failed_requests() {
    rolling_case("stop-first");
}

/// A node running no mesh (`--no-mesh`) routes nothing, so a release does not wait for it: a
/// rolling update with tasks on both nodes still ends, on the new version.
#[test]
fn a_node_without_a_mesh_does_not_hold_a_release_back() {
    let mut c = release_cluster();
    c.add_agent_with("bare", &["--no-mesh"]);
    let port = free_port();
    start_v1(&c, port, "");
    let nodes: std::collections::BTreeSet<String> = c
        .live_tasks("web")
        .iter()
        .filter_map(|t| t["node"].as_str().map(str::to_string))
        .collect();
    assert_eq!(nodes.len(), 2, "tasks on both nodes: {nodes:?}");
    let out = c.deploy("v2.yaml", &web(port, "v2", "", ""));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_serves_now(port, "v2");
    assert_eq!(c.json(&["rollout", "status", "web"])["phase"], "succeeded");
}

#[test]
fn blue_green_under_load_has_no_failed_requests() {
    let c = release_cluster();
    let port = free_port();
    let bg = "      strategy: blue-green\n      blue_green:\n        scale_down_delay: 1s\n";
    start_v1(&c, port, bg);
    let (out, report) = under_load(port, || c.deploy("v2.yaml", &web(port, "v2", "", bg)));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_no_failures(&report);
    assert_serves_now(port, "v2");
}

#[test]
fn canary_to_full_weight_under_load_has_no_failed_requests() {
    let c = release_cluster();
    let port = free_port();
    let canary = "      strategy: canary\n      canary:\n        steps: [{weight: 20, pause: 3s}, {weight: 60, pause: 3s}]\n        analysis: {interval: 1s}\n";
    start_v1(&c, port, canary);
    let (out, report) = under_load(port, || c.deploy("v2.yaml", &web(port, "v2", "", canary)));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_no_failures(&report);
    assert!(
        report["versions"]["v2"].as_u64().unwrap_or(0) > 0,
        "{report:#}"
    );
    assert_serves_now(port, "v2");
    let status = c.json(&["rollout", "status", "web"]);
    assert!(
        status["analysis"].as_array().is_some_and(|a| !a.is_empty()),
        "{status:#}"
    );
}

#[test]
fn restart_under_load_has_no_failed_requests() {
    let c = release_cluster();
    let port = free_port();
    start_v1(&c, port, "");
    let before: Vec<String> = c
        .live_tasks("web")
        .iter()
        .map(|t| t["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let (out, report) = under_load(port, || c.run(&["service", "restart", "web"]));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_no_failures(&report);
    let after = c.wait_ready("web", 3);
    assert!(after
        .iter()
        .all(|t| !before.contains(&t["id"].as_str().unwrap_or_default().to_string())));
    assert_serves_now(port, "v1");
}

#[test]
fn rollback_under_load_has_no_failed_requests() {
    let c = release_cluster();
    let port = free_port();
    start_v1(&c, port, "");
    let out = c.deploy("v2.yaml", &web(port, "v2", "", ""));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_serves_now(port, "v2");
    let (out, report) = under_load(port, || c.run(&["rollback", "web"]));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_no_failures(&report);
    assert_serves_now(port, "v1");
    assert_eq!(
        c.json(&["service", "inspect", "web"])["service"]["revision"],
        3
    );
}

#[test]
fn a_never_healthy_version_is_rolled_back_and_never_takes_traffic() {
    let c = release_cluster();
    let port = free_port();
    start_v1(&c, port, "");
    let (out, report) = under_load(port, || {
        c.deploy("v2.yaml", &web(port, "v2", "--fail-health", ""))
    });
    assert!(
        !out.status.success(),
        "deploy should fail: {}",
        stdout(&out)
    );
    assert_no_failures(&report);
    assert_eq!(
        report["versions"]["v2"],
        Value::Null,
        "v2 answered: {report:#}"
    );
    let status = c.json(&["rollout", "status", "web"]);
    assert_eq!(status["kind"], "auto_rollback", "{status:#}");
    c.wait_ready("web", 3);
    wait_serves(port, "v1");
}

#[test]
fn an_erroring_canary_is_aborted_at_its_first_step() {
    let c = release_cluster();
    let port = free_port();
    let canary = "      strategy: canary\n      canary:\n        steps: [{weight: 10, pause: 20s}, {weight: 50, pause: 20s}]\n        analysis: {interval: 2s}\n";
    start_v1(&c, port, canary);
    let (out, report) = under_load(port, || {
        c.deploy("v2.yaml", &web(port, "v2", "--error-rate 0.2", canary))
    });
    let status = c.json(&["rollout", "status", "web"]);
    assert!(
        !out.status.success(),
        "deploy should fail: {}\n{status:#}\n{report:#}",
        stdout(&out)
    );
    let reason = status["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("canary analysis failed at step 1"),
        "{status:#}"
    );
    // The canary had 10% of the traffic and failed 20% of it: about 2% of what it saw while it
    // served; allow for the mesh's retries and scheduling noise, but never the canary's whole
    // share.
    let sent = report["sent"].as_u64().unwrap_or(0);
    let failed = report["failed"].as_u64().unwrap_or(0);
    assert!(failed * 10 <= sent, "failed {failed} of {sent}: {report:#}");
    c.wait_ready("web", 3);
    wait_serves(port, "v1");
}

/// The docker driver through every release path, on one cluster and one service (containers
/// start slower than processes; one cluster keeps the wall time down): rolling start-first and
/// stop-first, blue-green, canary to 100%, restart and rollback, each under load with zero failed
/// requests and ending on the right version.
#[test]
fn docker_releases_under_load_have_no_failed_requests() {
    if !docker_available() {
        return;
    }
    let _leftovers = DockerLeftovers(&["web-releases"]);
    let c = docker_release_cluster();
    let port = free_port();
    let d = Driver::Docker;
    let name = d.service();
    start_version(&c, d, port, "v1", "");
    let release = |file: &str, version: &str, strategy: &str| {
        let yaml = web_on(d, port, version, "", strategy);
        let (out, report) = under_load(port, || c.deploy(file, &yaml));
        assert!(
            out.status.success(),
            "{version}: {}\n{}",
            stdout(&out),
            stderr(&out)
        );
        assert_no_failures(&report);
        assert_serves_now(port, version);
        report
    };
    let start_first = web_on(d, port, "v2", "", "")
        .replace("monitor: 1s", "monitor: 1s\n        order: start-first");
    let (out, report) = under_load(port, || c.deploy("v2.yaml", &start_first));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_no_failures(&report);
    assert_serves_now(port, "v2");
    let stop_first = web_on(d, port, "v2s", "", "")
        .replace("monitor: 1s", "monitor: 1s\n        order: stop-first");
    let (out, report) = under_load(port, || c.deploy("v2s.yaml", &stop_first));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_no_failures(&report);
    assert_serves_now(port, "v2s");

    release(
        "v3.yaml",
        "v3",
        "      strategy: blue-green\n      blue_green:\n        scale_down_delay: 1s\n",
    );
    let report = release(
        "v4.yaml",
        "v4",
        "      strategy: canary\n      canary:\n        steps: [{weight: 20, pause: 3s}, {weight: 60, pause: 3s}]\n        analysis: {interval: 1s}\n",
    );
    assert!(
        report["versions"]["v3"].as_u64().unwrap_or(0) > 0
            && report["versions"]["v4"].as_u64().unwrap_or(0) > 0,
        "the canary shared the traffic: {report:#}"
    );

    let before: Vec<Value> = c.live_tasks(name).iter().map(|t| t["id"].clone()).collect();
    let (out, report) = under_load(port, || c.run(&["service", "restart", name]));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_no_failures(&report);
    assert_serves_now(port, "v4");
    let after = c.wait_ready(name, 3);
    assert!(
        after.iter().all(|t| !before.contains(&t["id"])),
        "restart left an old container: {after:#?}"
    );

    let (out, report) = under_load(port, || c.run(&["rollback", name]));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_no_failures(&report);
    assert_serves_now(port, "v3");
}

/// The global guard: when task starts fail across the cluster (two services whose new version
/// cannot start), every rollout in flight pauses, a healthy one too, and events say why.
#[test]
fn failing_task_starts_across_the_cluster_pause_every_rollout() {
    let c = release_cluster();
    // `c` is a healthy release held in flight by a long delay between its batches.
    let stack = |a_b: &str, c_cmd: &str| {
        let svc = |name: &str, cmd: &str, replicas: u32, update: &str| {
            format!(
                "  {name}:\n    command: {cmd}\n    x-flotilla:\n      driver: process\n    deploy:\n      replicas: {replicas}\n      restart_policy:\n        delay: 100ms\n      update_config:\n{update}"
            )
        };
        let failing = "        failure_action: continue\n";
        let slow = "        parallelism: 1\n        delay: 10m\n";
        format!(
            "services:\n{}{}{}",
            svc("a", a_b, 2, failing),
            svc("b", a_b, 2, failing),
            svc("c", c_cmd, 3, slow)
        )
    };
    let out = c.deploy(
        "v1.yaml",
        &stack("[\"sleep\", \"600\"]", "[\"sleep\", \"600\"]"),
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    for s in ["a", "b", "c"] {
        c.wait_ready(s, if s == "c" { 3 } else { 2 });
    }
    let v2 = c.write_file(
        "v2.yaml",
        &stack(
            "[\"/nonexistent/flotilla-guard-test\"]",
            "[\"sleep\", \"601\"]",
        ),
    );
    c.ok(&["deploy", "-f", v2.to_str().unwrap_or_default(), "--detach"]);
    for s in ["a", "b", "c"] {
        let status = wait_for(
            &format!("the guard to pause {s}'s rollout"),
            Duration::from_secs(90),
            || {
                // 404 until the controllers have seen the new revision.
                let out = c.run(&["rollout", "status", s, "-o", "json"]);
                let r: Value = serde_json::from_slice(&out.stdout).ok()?;
                (r["paused"] == true).then_some(r)
            },
        );
        let reason = status["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("release guard:"), "{s}: {status:#}");
        assert!(reason.contains("a, b"), "{s}: {status:#}");
    }
    // The healthy release stopped where it was: its old tasks still run.
    let old_c = c
        .live_tasks("c")
        .iter()
        .filter(|t| t["spec"]["command"][1] == "600")
        .count();
    assert!(old_c >= 1, "{:#?}", c.live_tasks("c"));
    let events = c.ok(&["events"]);
    assert!(
        events.contains("c: rollout paused: release guard:"),
        "{events}"
    );
}

/// One node, one replica, a host-mode port: only one task can hold the port, so blue-green
/// shrinks blue to nothing, starts green in its place and ends on v2 with one replica, which
/// answers directly on the host port (no mesh listens there). The events say so.
#[test]
fn blue_green_with_a_host_port_shrinks_blue_and_ends_on_the_new_version() {
    let c = release_cluster();
    let port = free_port();
    let yaml = |version: &str| {
        format!(
            "services:\n  edge:\n    command: [\"flotilla\", \"demo-app\", \"--version\", \"{version}\"]\n    ports:\n      - {{target: 8080, published: {port}, mode: host}}\n    x-flotilla:\n      strategy: blue-green\n      blue_green:\n        scale_down_delay: 1s\n    deploy:\n      replicas: 1\n"
        )
    };
    let serves = |version: &str| {
        wait_for(
            &format!("{version} on the host port"),
            Duration::from_secs(30),
            || {
                let (status, body) = http_get(port, "/")?;
                let v: Value = serde_json::from_str(&body).ok()?;
                (status == 200 && v["version"] == version).then_some(())
            },
        )
    };
    let out = c.deploy("v1.yaml", &yaml("v1"));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    serves("v1");
    let out = c.deploy("v2.yaml", &yaml("v2"));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    serves("v2");
    let status = c.json(&["rollout", "status", "edge"]);
    assert_eq!(status["phase"], "succeeded", "{status:#}");
    assert_eq!(status["shrunk"], 1, "{status:#}");
    let live = c.live_tasks("edge");
    assert_eq!(live.len(), 1, "{live:#?}");
    assert_eq!(live[0]["revision"], 2, "{live:#?}");
    let events = c.ok(&["events"]);
    assert!(
        events.contains("edge: shrink: stopped 1 blue task"),
        "{events}"
    );
    assert!(
        events.contains("edge: restore: green runs the full count"),
        "{events}"
    );
}
