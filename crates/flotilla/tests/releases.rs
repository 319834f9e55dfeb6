//! Releases under load, through real `flotilla up` processes and the mesh's published port:
//! every path ends on the right version with zero failed requests, a never-healthy version is
//! rolled back without ever taking traffic, and an erroring canary is aborted at its first step.
//!
//! The load is `flotilla bench load` at 200 requests/s, open loop, started before the release
//! and running past its end. Tests take turns with the load (a shared lock) so two of them never
//! compete for the machine's cores.

mod common;

use common::*;
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

static LOAD_TURN: Mutex<()> = Mutex::new(());

const RATE: &str = "200";
/// Long enough to outlast each release below (they take a few seconds each).
const LOAD_FOR: &str = "30s";

fn release_cluster() -> Cluster {
    Cluster::start_with(&["--mesh-bind", "127.0.0.1", "--node-name", "n1"])
}

/// A demo-app service `web` at `version`, published on `port`, with fast health checks.
fn web(port: u16, version: &str, app_args: &str, release: &str) -> String {
    format!(
        r#"services:
  web:
    command: ["sh", "-c", "exec flotilla demo-app --version {version} {app_args}"]
    ports: ["{port}:8080"]
    x-flotilla:
      driver: process
      ports: [{{published: {port}, protocol: http}}]
      healthcheck:
        http: /health
        interval: 300ms
        timeout: 500ms
        retries: 2
{release}    deploy:
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
            LOAD_FOR,
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the load")
}

fn load_report(child: Child) -> Value {
    let out = child.wait_with_output().expect("load finished");
    assert!(out.status.success(), "bench load: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("load JSON")
}

fn version_served(port: u16) -> String {
    let (status, body) = http_get(port, "/").expect("GET / through the mesh");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).expect("demo JSON")["version"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Asserts the mesh ends up serving `version`. `deploy` returns once the store has converged;
/// each node's mesh applies that a moment later, so the check polls rather than samples once.
fn assert_serves(port: u16, version: &str) {
    let mut last = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        last = version_served(port);
        if last == version {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("the mesh still serves {last:?}, expected {version:?}");
}

/// Deploys v1 and waits until the mesh serves it.
fn start_v1(c: &Cluster, port: u16, release: &str) {
    let out = c.deploy("v1.yaml", &web(port, "v1", "", release));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    c.wait_ready("web", 3);
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
    // The load is running before the release starts.
    std::thread::sleep(Duration::from_secs(1));
    let out = release();
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
    assert_serves(port, "v2");
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

#[test]
fn blue_green_under_load_has_no_failed_requests() {
    let c = release_cluster();
    let port = free_port();
    let bg = "      strategy: blue-green\n      blue_green:\n        scale_down_delay: 1s\n";
    start_v1(&c, port, bg);
    let (out, report) = under_load(port, || c.deploy("v2.yaml", &web(port, "v2", "", bg)));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_no_failures(&report);
    assert_serves(port, "v2");
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
    assert_serves(port, "v2");
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
    assert_serves(port, "v1");
}

#[test]
fn rollback_under_load_has_no_failed_requests() {
    let c = release_cluster();
    let port = free_port();
    start_v1(&c, port, "");
    let out = c.deploy("v2.yaml", &web(port, "v2", "", ""));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_serves(port, "v2");
    let (out, report) = under_load(port, || c.run(&["rollback", "web"]));
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_no_failures(&report);
    assert_serves(port, "v1");
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
    assert_serves(port, "v1");
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
    assert_serves(port, "v1");
}
