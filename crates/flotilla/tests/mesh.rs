//! Acceptance tests of the routing mesh through real `flotilla up` / `flotilla agent` processes:
//! published ports on every node, several listeners, HTTP routes, health, weights, draining,
//! breakers, connect retries, hostile clients, discovery and metrics.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A single-node cluster whose mesh listens on loopback only.
fn mesh_cluster() -> Cluster {
    Cluster::start_with(&["--mesh-bind", "127.0.0.1", "--node-name", "n1"])
}

/// One HTTP/1.0 request to `ip:port`: (status, body), or an error text.
fn request(
    ip: &str,
    port: u16,
    path: &str,
    host: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(
        &format!("{ip}:{port}").parse().map_err(|e| format!("{e}"))?,
        timeout,
    )
    .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .map_err(|e| format!("read: {e}"))?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {buf:?}"))?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    request(
        "127.0.0.1",
        port,
        path,
        "localhost",
        Duration::from_secs(10),
    )
}

/// The task id a demo-app answer names.
fn task_of(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["task"].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn id(t: &Value) -> String {
    t["id"].as_str().unwrap_or_default().to_string()
}

fn demo_service(
    name: &str,
    published: u16,
    replicas: u32,
    extra_args: &str,
    x_flotilla: &str,
) -> String {
    format!(
        r#"services:
  {name}:
    command: ["sh", "-c", "exec flotilla demo-app --version {name} {extra_args}"]
    ports: ["{published}:8080"]
    x-flotilla:
      driver: process
      healthcheck:
        http: /health
        interval: 500ms
        timeout: 500ms
        retries: 2
{x_flotilla}    deploy:
      replicas: {replicas}
"#
    )
}

fn deploy_ok(c: &Cluster, file: &str, yaml: &str) {
    let out = c.deploy(file, yaml);
    assert!(
        out.status.success(),
        "deploy failed: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
}

/// Waits until `n` requests in a row through `port` succeed (the mesh has the backends).
fn wait_served(port: u16, ip: &str) {
    wait_for(
        &format!("{ip}:{port} to serve"),
        Duration::from_secs(30),
        || {
            (0..5)
                .all(|_| {
                    matches!(
                        request(ip, port, "/", "localhost", Duration::from_secs(5)),
                        Ok((200, _))
                    )
                })
                .then_some(())
        },
    );
}

fn traffic(c: &Cluster, service: &str) -> Vec<Value> {
    c.json(&["service", "traffic", service])["tasks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// When a request started and how it ended.
type Sample = (Instant, Result<(u16, String), String>);

/// Requests sent at a steady rate from a background thread: (start time, outcome).
struct Load {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Sample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, every: Duration, timeout: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (stop.clone(), results.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                let outcome = request("127.0.0.1", port, "/", "localhost", timeout);
                r.lock().expect("load results lock").push((at, outcome));
                std::thread::sleep(every);
            }
        });
        Load {
            stop,
            results,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("load thread");
        }
        std::mem::take(&mut *self.results.lock().expect("load results lock"))
    }
}

fn failures(results: &[Sample], after: Instant) -> Vec<String> {
    results
        .iter()
        .filter(|(at, _)| *at >= after)
        .filter_map(|(_, r)| match r {
            Ok((200, _)) => None,
            Ok((status, body)) => Some(format!("{status}: {body}")),
            Err(e) => Some(e.clone()),
        })
        .collect()
}

/// A 3-replica service answers on its published port on every node, including a node that runs
/// none of its tasks; a service with two published ports answers on both.
#[test]
fn published_ports_answer_on_every_node_and_every_listener() {
    let mut c = mesh_cluster();
    c.add_agent_with("n2", &["--mesh-bind", "127.0.0.2"]);
    let (web, first, second) = (free_port(), free_port(), free_port());
    let yaml = format!(
        r#"services:
  web:
    command: ["flotilla", "demo-app", "--version", "web"]
    ports: ["{web}:8080"]
    x-flotilla:
      driver: process
    deploy:
      replicas: 3
      placement:
        constraints: ["node.id==n2"]
  two:
    command: ["sh", "-c", "flotilla demo-app --port $FLOTILLA_PORT_8080 --version first & exec flotilla demo-app --port $FLOTILLA_PORT_9090 --version second"]
    ports: ["{first}:8080", "{second}:9090"]
    x-flotilla:
      driver: process
"#
    );
    deploy_ok(&c, "web.yaml", &yaml);
    let tasks = c.wait_ready("web", 3);
    assert!(tasks.iter().all(|t| t["node"] == "n2"), "{tasks:?}");
    for ip in ["127.0.0.1", "127.0.0.2"] {
        wait_served(web, ip);
        let mut seen = BTreeSet::new();
        for _ in 0..30 {
            let (status, body) =
                request(ip, web, "/", "localhost", Duration::from_secs(5)).unwrap();
            assert_eq!(status, 200, "{body}");
            seen.insert(task_of(&body));
        }
        assert!(seen.len() >= 2, "{ip}: requests went to {seen:?} only");
    }
    for (port, version) in [(first, "first"), (second, "second")] {
        wait_served(port, "127.0.0.1");
        let (_, body) = get(port, "/").unwrap();
        assert!(body.contains(version), "{port}: {body}");
        let (_, body) =
            request("127.0.0.2", port, "/", "localhost", Duration::from_secs(5)).unwrap();
        assert!(body.contains(version), "{port} on n2: {body}");
    }
}

/// Host and path routes on one shared HTTP port send each request to the right service.
#[test]
fn http_routes_pick_the_right_service() {
    let c = mesh_cluster();
    let port = free_port();
    let http = format!("      ports: [{{published: {port}, protocol: http}}]\n");
    let yaml = format!(
        "{}{}",
        demo_service(
            "api",
            port,
            1,
            "",
            &format!("{http}      routes:\n        - {{host: api.test, port: {port}}}\n        - {{path_prefix: /api-only, port: {port}}}\n")
        ),
        demo_service("www", port, 1, "", &format!("{http}      routes: [{{port: {port}}}]\n"))
            .trim_start_matches("services:\n")
    );
    deploy_ok(&c, "routes.yaml", &yaml);
    c.wait_ready("api", 1);
    c.wait_ready("www", 1);
    wait_served(port, "127.0.0.1");
    for (host, version) in [
        ("api.test", "\"api\""),
        ("www.test", "\"www\""),
        ("API.TEST:80", "\"api\""),
    ] {
        let (status, body) = request("127.0.0.1", port, "/", host, Duration::from_secs(5)).unwrap();
        assert_eq!(status, 200);
        assert!(body.contains(version), "Host {host}: {body}");
    }
    // The demo app answers 404 for other paths; the mesh's per-service counters show who got it.
    let requests = |svc: &str| -> u64 {
        traffic(&c, svc)
            .iter()
            .map(|t| t["requests"].as_u64().unwrap_or(0))
            .sum()
    };
    let (api_before, www_before) = (requests("api"), requests("www"));
    for _ in 0..5 {
        let (status, _) = get(port, "/api-only/x").unwrap();
        assert_eq!(status, 404);
    }
    assert_eq!(requests("api"), api_before + 5);
    assert_eq!(requests("www"), www_before);
}

/// A task that stops answering is detected by its health check; once `ps` shows it unhealthy,
/// not one request fails.
#[test]
fn unhealthy_task_stops_receiving_requests() {
    let c = mesh_cluster();
    let port = free_port();
    deploy_ok(&c, "h.yaml", &demo_service("h", port, 3, "", ""));
    let tasks = c.wait_ready("h", 3);
    wait_served(port, "127.0.0.1");
    let victim = &tasks[0];
    let pid = victim["status"]["pid"].as_u64().unwrap();
    let load = Load::start(port, Duration::from_millis(20), Duration::from_secs(3));
    std::thread::sleep(Duration::from_secs(1));
    // A stopped process accepts connections (the kernel does) but never answers.
    sh(&format!("pkill -STOP -P {pid}; kill -STOP {pid}"));
    let detected = wait_for(
        "the task to be marked unhealthy",
        Duration::from_secs(30),
        || {
            c.all_tasks("h")
                .iter()
                .any(|t| t["id"] == victim["id"] && t["status"]["health"] == "unhealthy")
                .then(Instant::now)
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let results = load.finish();
    sh(&format!("kill -CONT {pid}; pkill -CONT -P {pid}"));
    let after = failures(&results, detected);
    assert!(results.iter().filter(|(at, _)| *at >= detected).count() > 20);
    assert!(
        after.is_empty(),
        "requests failed after the task was marked unhealthy: {after:?}"
    );
}

/// Weight 0 takes a task out of the balancing; its slow in-flight request still completes
/// before the task is stopped (with SIGKILL, so nothing but the mesh's draining saves it).
#[test]
fn weight_zero_gets_no_requests_and_in_flight_requests_finish_before_stop() {
    let c = mesh_cluster();
    let port = free_port();
    deploy_ok(&c, "w.yaml", &demo_service("w", port, 2, "", ""));
    let tasks = c.wait_ready("w", 2);
    wait_served(port, "127.0.0.1");
    let (drained, kept) = (id(&tasks[0]), id(&tasks[1]));
    c.ok(&["task", "weight", &drained, "0"]);
    let ps = c.ok(&["ps", "w"]);
    assert!(ps.contains("weight 0"), "{ps}");
    wait_for(
        "the mesh to take the weight",
        Duration::from_secs(10),
        || {
            traffic(&c, "w")
                .iter()
                .any(|t| id_of(t) == drained && t["routed_by"] == 0)
                .then_some(())
        },
    );
    for _ in 0..30 {
        let (status, body) = get(port, "/").unwrap();
        assert_eq!(status, 200);
        assert_eq!(task_of(&body), kept, "a request reached the weight-0 task");
    }
    // Bad weights are refused, naming the field.
    let out = c.run(&["task", "weight", &drained, "101"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("0..=100") || stderr(&out).contains("101"),
        "{}",
        stderr(&out)
    );

    let (status, body) = api_put(
        &c,
        &format!("/v1/tasks/{drained}/weight"),
        r#"{"weight": 101}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"weight\""), "{body}");
    let (status, body) = api_put(
        &c,
        "/v1/services/w/weights",
        &format!(r#"{{"weights": {{"{drained}": 100, "{kept}": 100}}}}"#),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = api_put(
        &c,
        "/v1/services/nope/weights",
        &format!(r#"{{"weights": {{"{drained}": 5}}}}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains(&format!("weights.{drained}")), "{body}");
    assert!(
        !c.ok(&["ps", "w"]).contains("weight "),
        "weights back to 100 are not shown"
    );

    // Draining: a 4s request is in flight when the service is scaled to zero.
    let slow = free_port();
    let yaml = demo_service(
        "slow",
        slow,
        1,
        "--latency 4000",
        "      drain_timeout: 30s\n",
    )
    .replace("    deploy:", "    stop_signal: SIGKILL\n    deploy:");
    deploy_ok(&c, "slow.yaml", &yaml);
    let task = c.wait_ready("slow", 1).remove(0);
    wait_for(
        "the slow service to be routed",
        Duration::from_secs(30),
        || {
            traffic(&c, "slow")
                .iter()
                .any(|t| t["routed_by"] == 1)
                .then_some(())
        },
    );
    let in_flight = std::thread::spawn(move || get(slow, "/"));
    wait_for(
        "the request to be in flight",
        Duration::from_secs(10),
        || {
            traffic(&c, "slow")
                .iter()
                .any(|t| t["in_flight"] == 1)
                .then_some(())
        },
    );
    c.ok(&["scale", "slow=0"]);
    let answer = in_flight.join().expect("load thread");
    assert!(
        matches!(&answer, Ok((200, body)) if body.contains(id(&task).as_str())),
        "{answer:?}"
    );
    let done = wait_for("the drained task to stop", Duration::from_secs(30), || {
        c.all_tasks("slow")
            .into_iter()
            .find(|t| t["id"] == task["id"] && t["status"]["state"] == "exited")
    });
    assert!(
        done["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("stopped"),
        "{done}"
    );
}

fn id_of(t: &Value) -> String {
    t["task_id"].as_str().unwrap_or_default().to_string()
}

/// A task answering 500s trips its breaker and traffic goes to the others; when it recovers
/// (it answers 200 after 10s) the breaker closes and it serves again.
#[test]
fn breaker_opens_on_errors_and_closes_after_recovery() {
    let c = mesh_cluster();
    let port = free_port();
    let yaml = format!(
        r#"services:
  flaky:
    command: ["sh", "-c", "if [ \"$FLOTILLA_SLOT\" = 1 ]; then flotilla demo-app --error-rate 1 --exit-after 10; fi; exec flotilla demo-app"]
    ports: ["{port}:8080"]
    x-flotilla:
      driver: process
      ports: [{{published: {port}, protocol: http}}]
      breaker: {{consecutive_failures: 3, open_for: 1s}}
    deploy:
      replicas: 3
"#
    );
    deploy_ok(&c, "flaky.yaml", &yaml);
    let tasks = c.wait_ready("flaky", 3);
    let bad = id(tasks.iter().find(|t| t["slot"] == 1).unwrap());
    let load = Load::start(port, Duration::from_millis(20), Duration::from_secs(5));
    wait_for(
        "the breaker of slot 1 to open",
        Duration::from_secs(10),
        || {
            traffic(&c, "flaky")
                .iter()
                .any(|t| id_of(t) == bad && t["breakers"]["n1"] != "closed")
                .then_some(())
        },
    );
    let ps = c.ok(&["ps", "flaky"]);
    assert!(ps.contains("breaker "), "{ps}");
    let opened = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let served_while_open: Vec<String> = load
        .results
        .lock()
        .expect("load results lock")
        .iter()
        .filter(|(at, _)| *at >= opened)
        .filter_map(|(_, r)| {
            r.as_ref()
                .ok()
                .filter(|(s, _)| *s == 200)
                .map(|(_, b)| task_of(b))
        })
        .collect();
    assert!(served_while_open.len() > 10, "{served_while_open:?}");
    // After recovery: closed again and answering.
    wait_for(
        "the breaker to close and slot 1 to serve",
        Duration::from_secs(40),
        || {
            let closed = traffic(&c, "flaky")
                .iter()
                .any(|t| id_of(t) == bad && t["breakers"]["n1"] == "closed");
            let results = load.results.lock().expect("load results lock");
            let recent = results
                .iter()
                .rev()
                .take(30)
                .any(|(_, r)| matches!(r, Ok((200, b)) if task_of(b) == bad));
            (closed && recent).then_some(())
        },
    );
    let results = load.finish();
    assert!(
        results.iter().all(|(_, r)| r.is_ok()),
        "the client saw connection errors"
    );
}

/// SIGKILLing a task under steady load fails no GET: connect errors are retried elsewhere.
#[test]
fn killing_a_task_mid_load_fails_no_request() {
    let c = mesh_cluster();
    let port = free_port();
    deploy_ok(
        &c,
        "k.yaml",
        &demo_service(
            "k",
            port,
            3,
            "",
            &format!("      ports: [{{published: {port}, protocol: http}}]\n"),
        ),
    );
    let tasks = c.wait_ready("k", 3);
    wait_served(port, "127.0.0.1");
    let load = Load::start(port, Duration::from_millis(10), Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    let pid = tasks[0]["status"]["pid"].as_u64().unwrap();
    sh(&format!("pkill -9 -P {pid}; kill -9 {pid}"));
    let killed = Instant::now();
    // Enough requests after the kill to have met the dead task, however slow the machine is.
    let sent_after = |load: &Load| {
        let results = load.results.lock().expect("load results lock");
        results.iter().filter(|(at, _)| *at >= killed).count()
    };
    wait_for(
        "100 requests after the kill",
        Duration::from_secs(60),
        || (sent_after(&load) >= 100).then_some(()),
    );
    let results = load.finish();
    let start = results[0].0;
    let failed = failures(&results, start);
    assert!(
        failed.is_empty(),
        "{} of {} GETs failed: {failed:?}",
        failed.len(),
        results.len()
    );
}

/// Garbage, slowloris, oversized headers and clients vanishing mid-request neither crash nor
/// stall the mesh for a well-behaved client.
#[test]
fn hostile_clients_do_not_stall_the_mesh() {
    let c = mesh_cluster();
    let port = free_port();
    deploy_ok(
        &c,
        "b.yaml",
        &demo_service(
            "b",
            port,
            2,
            "",
            &format!("      ports: [{{published: {port}, protocol: http}}]\n"),
        ),
    );
    c.wait_ready("b", 2);
    wait_served(port, "127.0.0.1");
    let connect = || TcpStream::connect(("127.0.0.1", port)).unwrap();
    // Slowloris: 50 connections that never finish their headers.
    let slow: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = connect();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    // Garbage.
    let mut g = connect();
    g.write_all(&[0xde, 0xad, 0xbe, 0xef, b'\r', b'\n', b'\r', b'\n'])
        .unwrap();
    g.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = Vec::new();
    let _ = g.read_to_end(&mut answer);
    assert!(
        answer.is_empty() || String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    // Oversized headers get 431.
    let mut big = connect();
    let huge = "a".repeat(200 * 1024);
    let _ = write!(big, "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n");
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = Vec::new();
    let _ = big.read_to_end(&mut answer);
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&answer).lines().next()
    );
    // Disconnect mid-request, many times.
    for _ in 0..50 {
        let mut s = connect();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHo");
    }
    // A normal client is served promptly throughout.
    for _ in 0..20 {
        let (status, _) =
            request("127.0.0.1", port, "/", "localhost", Duration::from_secs(2)).unwrap();
        assert_eq!(status, 200);
    }
    drop(slow);
    let out = c.ok(&["node", "ls"]);
    assert!(out.contains("ready"), "{out}");
}

/// A raw `PUT` to the manager's API: (status, body).
fn api_put(c: &Cluster, path: &str, json: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", c.api_port)).expect("connect to the API");
    write!(
        s,
        "PUT {path} HTTP/1.0\r\nHost: localhost\r\n{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
        c.bearer(),
        json.len()
    )
    .expect("send");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        buf.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

/// Minimal DNS A query for `name`; returns the first answer's IPv4 address.
fn dns_lookup(server: &str, name: &str) -> Option<std::net::Ipv4Addr> {
    let sock = UdpSocket::bind("127.0.0.1:0").ok()?;
    sock.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    sock.send_to(&q, server).ok()?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).ok()?;
    let ancount = u16::from_be_bytes([buf[6], buf[7]]);
    (ancount > 0 && n >= 4)
        .then(|| std::net::Ipv4Addr::new(buf[n - 4], buf[n - 3], buf[n - 2], buf[n - 1]))
}

/// Tasks find published services through `<SERVICE>_ADDR` and DNS; the manager serves its
/// node's mesh metrics at /metrics.
#[test]
fn discovery_env_dns_and_metrics() {
    let dns_port = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let dns = format!("127.0.0.1:{dns_port}");
    let c = Cluster::start_with(&[
        "--mesh-bind",
        "127.0.0.1",
        "--node-name",
        "n1",
        "--dns-addr",
        &dns,
    ]);
    let port = free_port();
    let yaml = format!(
        r#"services:
  my-db:
    command: ["flotilla", "demo-app"]
    ports: ["{port}:8080"]
    x-flotilla:
      driver: process
  client:
    command: ["sh", "-c", "echo \"found=$MY_DB_ADDR\"; exec sleep 600"]
    depends_on: [my-db]
    x-flotilla:
      driver: process
"#
    );
    deploy_ok(&c, "d.yaml", &yaml);
    c.wait_ready("client", 1);
    let logs = wait_for("the client's output", Duration::from_secs(20), || {
        let l = c.ok(&["logs", "client"]);
        l.contains("found=").then_some(l)
    });
    assert!(logs.contains(&format!("found=127.0.0.1:{port}")), "{logs}");
    let ip = wait_for("a DNS answer", Duration::from_secs(10), || {
        dns_lookup(&dns, "my-db.flotilla")
    });
    assert_eq!(ip, std::net::Ipv4Addr::LOCALHOST);
    assert_eq!(
        dns_lookup(&dns, "my-db.internal"),
        Some(std::net::Ipv4Addr::LOCALHOST)
    );
    assert_eq!(dns_lookup(&dns, "nothing.flotilla"), None);

    wait_served(port, "127.0.0.1");
    let metrics = wait_for("metrics", Duration::from_secs(10), || {
        let (status, body) = http_get_from("127.0.0.1", c.api_port, "/metrics", &[&c.bearer()])?;
        (status == 200 && body.contains("flotilla_mesh_requests_total")).then_some(body)
    });
    assert!(metrics.contains("service=\"my-db\""), "{metrics}");
}

/// Cross-host routing: n2 advertises 127.0.0.3 and its task listens on that address only, so
/// n1's mesh reaches it only through the advertised IP (its agent address is 127.0.0.1). Then a
/// published port held by another program on n2 shows in `node ls`/`node inspect` until freed.
#[test]
fn advertised_ip_reaches_other_nodes_and_port_conflicts_show_on_the_node() {
    let mut c = mesh_cluster();
    c.add_agent_with(
        "n2",
        &["--mesh-bind", "127.0.0.2", "--advertise-ip", "127.0.0.3"],
    );
    let node = c.json(&["node", "inspect", "n2"]);
    assert_eq!(node["advertise_ip"], "127.0.0.3", "{node}");

    let (far, held) = (free_port(), free_port());
    // Something else already listens on n2's mesh address at `held`.
    let blocker = std::net::TcpListener::bind(("127.0.0.2", held)).unwrap();
    let yaml = format!(
        r#"services:
  far:
    command: ["sh", "-c", "exec flotilla demo-app --bind 127.0.0.3 --version far"]
    ports: ["{far}:8080"]
    x-flotilla:
      driver: process
    deploy:
      placement:
        constraints: ["node.id==n2"]
  near:
    command: ["flotilla", "demo-app", "--version", "near"]
    ports: ["{held}:8080"]
    x-flotilla:
      driver: process
    deploy:
      placement:
        constraints: ["node.id==n1"]
"#
    );
    deploy_ok(&c, "far.yaml", &yaml);
    let tasks = c.wait_ready("far", 1);
    assert_eq!(tasks[0]["node"], "n2", "{tasks:?}");
    wait_served(far, "127.0.0.1");
    let (status, body) = get(far, "/").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("far"), "{body}");

    let conflict = format!("port {held}");
    let node = wait_for(
        "n2 to report its port conflict",
        Duration::from_secs(30),
        || {
            let node = c.json(&["node", "inspect", "n2"]);
            let conflicts = node["port_conflicts"].as_array()?.clone();
            conflicts
                .iter()
                .any(|m| m.as_str().unwrap_or_default().contains(&conflict))
                .then_some(node)
        },
    );
    assert_eq!(
        node["port_conflicts"].as_array().unwrap().len(),
        1,
        "{node}"
    );
    let ls = c.ok(&["node", "ls"]);
    let row = ls
        .lines()
        .find(|l| l.starts_with("n2 "))
        .unwrap_or_default();
    assert!(row.contains(&conflict), "node ls does not show it:\n{ls}");
    let text = c.ok(&["node", "inspect", "n2"]);
    assert!(
        text.contains("NOT SERVED") && text.contains(&conflict),
        "{text}"
    );
    // n1 serves the port; only n2 cannot.
    wait_served(held, "127.0.0.1");

    // Once the port is free the mesh binds it on its next retry and the report clears.
    drop(blocker);
    wait_for("n2's conflict to clear", Duration::from_secs(30), || {
        let node = c.json(&["node", "inspect", "n2"]);
        node.get("port_conflicts").is_none().then_some(())
    });
    wait_served(held, "127.0.0.2");
    let ls = c.ok(&["node", "ls"]);
    assert!(!ls.contains(&conflict), "{ls}");
}

/// The version a demo-app answer names.
fn version_of(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["version"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A canary held at weight 10 (its step has no pause, so it waits for `rollout promote`) gets
/// every request carrying the match header or cookie; other requests keep the weights.
#[test]
fn canary_match_sends_chosen_requests_to_the_canary_at_any_weight() {
    let c = mesh_cluster();
    let port = free_port();
    let web = |version: &str| {
        format!(
            r#"services:
  web:
    command: ["sh", "-c", "exec flotilla demo-app --version {version}"]
    ports: ["{port}:8080"]
    x-flotilla:
      driver: process
      ports: [{{published: {port}, protocol: http}}]
      healthcheck: {{http: /health, interval: 300ms, timeout: 500ms, retries: 2}}
      strategy: canary
      canary:
        steps: [{{weight: 10}}]
        analysis: {{interval: 1h}}
        match: {{header: X-Canary, cookie: canary, value: "yes"}}
    deploy:
      replicas: 2
"#
        )
    };
    deploy_ok(&c, "v1.yaml", &web("v1"));
    c.wait_ready("web", 2);
    let v2 = c.write_file("v2.yaml", &web("v2"));
    let out = c.run(&["deploy", "-f", v2.to_str().unwrap(), "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the canary step", Duration::from_secs(60), || {
        // 404 until the controller has started the rollout.
        let out = c.run(&["rollout", "status", "web", "-o", "json"]);
        let status: Value = serde_json::from_slice(&out.stdout).ok()?;
        (status["phase"] == "canary_step").then_some(())
    });
    let versions = |headers: &[&str]| -> Vec<String> {
        (0..40)
            .map(|_| {
                let (status, body) =
                    http_get_from("127.0.0.1", port, "/", headers).expect("GET through the mesh");
                assert_eq!(status, 200, "{body}");
                version_of(&body)
            })
            .collect()
    };
    // Every node's mesh has the canary's tasks once a matched request reaches v2.
    wait_for(
        "the mesh to route the canary",
        Duration::from_secs(30),
        || {
            versions(&["X-Canary: yes"])
                .iter()
                .all(|v| v == "v2")
                .then_some(())
        },
    );
    for headers in [["X-Canary: yes"], ["Cookie: a=1; canary=yes"]] {
        let got = versions(&headers);
        assert!(got.iter().all(|v| v == "v2"), "{headers:?}: {got:?}");
    }
    // Unmatched requests (no header, or another value) follow the 10% weight.
    for headers in [&[][..], &["X-Canary: no"][..]] {
        let got = versions(headers);
        let old = got.iter().filter(|v| *v == "v1").count();
        assert!(
            old > 20,
            "{headers:?}: only {old} of 40 went to v1: {got:?}"
        );
    }
    assert_eq!(
        c.json(&["rollout", "status", "web"])["phase"],
        "canary_step"
    );
}

/// Containers get `<SERVICE>_ADDR` pointing at the node's mesh through the bridge gateway:
/// from inside a client container, the address flotilla gave it reaches the published
/// service (a process task) through the mesh.
#[test]
fn containers_reach_the_mesh_through_the_bridge_gateway() {
    if !docker_available() {
        return;
    }
    let _leftovers = DockerLeftovers(&["meshclient"]);
    // The mesh on every interface (the default), so the bridge gateway reaches it.
    let c = Cluster::start_with(&["--node-name", "n1"]);
    let port = free_port();
    let yaml = format!(
        r#"services:
  meshweb:
    command: ["flotilla", "demo-app", "--version", "meshweb"]
    ports: ["{port}:8080"]
    x-flotilla:
      driver: process
  meshclient:
    image: flotilla-demo:latest
    command: ["demo-app", "--version", "client"]
    depends_on: [meshweb]
"#
    );
    deploy_ok(&c, "d.yaml", &yaml);
    wait_served(port, "127.0.0.1");
    // A container that went away meanwhile (the engine is shared) is replaced; try its successor.
    let report: Value = wait_for(
        "a load run inside the client",
        Duration::from_secs(60),
        || {
            let client = c.wait_ready("meshclient", 1);
            let container = client[0]["status"]["container_id"].as_str()?.to_string();
            let env = sh(&format!(
            "docker inspect --format '{{{{range .Config.Env}}}}{{{{println .}}}}{{{{end}}}}' {container}"
        ));
            let env = stdout(&env);
            let addr = env.lines().find_map(|l| l.strip_prefix("MESHWEB_ADDR="))?;
            assert_eq!(addr, format!("host.docker.internal:{port}"));
            let out = sh(&format!(
            "docker exec {container} /flotilla bench load --url http://{addr}/ --rate 20 --duration 1s -o json"
        ));
            if !out.status.success() {
                eprintln!("bench load in {container}: {}", stderr(&out));
                return None;
            }
            serde_json::from_slice(&out.stdout).ok()
        },
    );
    assert_eq!(report["failed"], 0, "{report}");
    assert!(
        report["versions"]["meshweb"].as_u64().unwrap_or(0) > 0,
        "{report}"
    );
}

/// Containers resolve `<service>.flotilla` through the mesh's DNS responder on their network's
/// gateway (their DNS server), get the gateway back, and reach the service by that name through
/// the mesh; unknown mesh names fail to resolve.
#[test]
fn containers_resolve_services_by_name_through_the_mesh_dns() {
    if !docker_available() {
        return;
    }
    let _leftovers = DockerLeftovers(&["dnsclient"]);
    // The mesh on every interface (the default), so the bridge gateway reaches it.
    let c = Cluster::start_with(&["--node-name", "n1"]);
    let port = free_port();
    let yaml = format!(
        r#"services:
  dnsweb:
    command: ["flotilla", "demo-app", "--version", "dnsweb"]
    ports: ["{port}:8080"]
    x-flotilla:
      driver: process
  dnsclient:
    image: flotilla-demo:latest
    command: ["demo-app", "--version", "client"]
    depends_on: [dnsweb]
"#
    );
    deploy_ok(&c, "d.yaml", &yaml);
    wait_served(port, "127.0.0.1");
    // A container that went away meanwhile (the engine is shared) is replaced; try its successor.
    let found = wait_for(
        "a lookup and a request by name inside the client",
        Duration::from_secs(60),
        || {
            let client = c.wait_ready("dnsclient", 1);
            let container = client[0]["status"]["container_id"].as_str()?.to_string();
            let dns = sh(&format!(
                "docker inspect --format '{{{{range .HostConfig.Dns}}}}{{{{.}}}}{{{{end}}}}' {container}"
            ));
            let server = stdout(&dns).trim().to_string();
            let lookup = sh(&format!(
                "docker exec {container} nslookup -type=a dnsweb.flotilla"
            ));
            if !lookup.status.success() {
                eprintln!(
                    "nslookup in {container}: {}{}",
                    stdout(&lookup),
                    stderr(&lookup)
                );
                return None;
            }
            let get = sh(&format!(
                "docker exec {container} wget -qO- http://dnsweb.flotilla:{port}/"
            ));
            if !get.status.success() {
                eprintln!("wget in {container}: {}", stderr(&get));
                return None;
            }
            let missing = sh(&format!(
                "docker exec {container} nslookup -type=a nothing.flotilla"
            ));
            assert!(
                !missing.status.success(),
                "an unknown service resolved: {}",
                stdout(&missing)
            );
            Some((container, server, stdout(&lookup), stdout(&get)))
        },
    );
    let (container, server, lookup, body) = found;
    // Other names still resolve, relayed to this host's resolvers (checked when the host
    // itself resolves this one; test machines may have no outside DNS).
    let outside = "deb.debian.org";
    let on_host = sh(&format!("timeout 5 getent hosts {outside}"));
    if let Some(ip) = stdout(&on_host).split_whitespace().next() {
        let inside = sh(&format!(
            "docker exec {container} nslookup -type=a {outside}"
        ));
        assert!(
            inside.status.success() && stdout(&inside).contains(ip),
            "{outside} resolves in the container as on the host ({ip}): {}{}",
            stdout(&inside),
            stderr(&inside)
        );
    } else {
        eprintln!("the host does not resolve {outside}; outside names not checked");
    }
    let gateway: std::net::Ipv4Addr = server
        .parse()
        .unwrap_or_else(|_| panic!("the container's DNS server is one gateway IP: {server:?}"));
    let gateway = gateway.to_string();
    assert!(
        lookup
            .lines()
            .skip_while(|l| !l.contains("dnsweb.flotilla"))
            .any(|l| l.starts_with("Address") && l.split_whitespace().last() == Some(&gateway)),
        "dnsweb.flotilla resolves to the gateway {gateway}: {lookup}"
    );
    let v: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["version"], "dnsweb", "{body}");
}
