//! Abusive clients against a real `flotilla up` (#14): floods of idle connections and
//! slowloris on every kind of listener. The node must keep its tasks (health checks and task
//! control never compete with client connections) and cut slow clients off.
//!
//! The tests run `up` under a hard open-file limit of 1,024 (lowered in this test process and
//! inherited), so a thousand connections are a flood; the listeners size their caps from that
//! limit.
#![allow(clippy::unwrap_used)]

mod common;

use common::{free_port, wait_for, Cluster};
use nix::sys::resource::{setrlimit, Resource};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

/// The open-file limit `up` gets in these tests.
const FD_LIMIT: u64 = 1024;
/// Idle connections opened against a published port: each would cost the mesh two
/// descriptors (client and backend), well past `FD_LIMIT` without caps.
const FLOOD: usize = 800;
/// Far beyond the 10 s header timeout; only a server that never cuts the client off hits it.
const GENEROUS: Duration = Duration::from_secs(60);

/// Lowers this process's limit (soft and hard) before `up` is spawned, so `up` cannot raise
/// its own past it. Every test here wants the same, so running them in parallel is fine.
fn low_fd_limit() {
    setrlimit(Resource::RLIMIT_NOFILE, FD_LIMIT, FD_LIMIT).unwrap();
}

fn cluster() -> Cluster {
    low_fd_limit();
    Cluster::start_with(&["--mesh-bind", "127.0.0.1", "--node-name", "n1"])
}

/// A cluster running one task of `name`, published on a port (returned) with `protocol`
/// and answering through the mesh.
fn cluster_serving(name: &str, protocol: &str) -> (Cluster, u16) {
    let c = cluster();
    let port = free_port();
    deploy(&c, name, &service(name, port, protocol));
    c.wait_ready(name, 1);
    wait_for("the mesh to serve", Duration::from_secs(30), || {
        (get(port) == Ok(200)).then_some(())
    });
    (c, port)
}

fn service(name: &str, port: u16, protocol: &str) -> String {
    format!(
        r#"services:
  {name}:
    command: ["sh", "-c", "exec flotilla demo-app --version {name}"]
    ports: ["{port}:8080"]
    x-flotilla:
      driver: process
      ports: [{{published: {port}, protocol: {protocol}}}]
      healthcheck:
        http: /health
        interval: 500ms
        timeout: 500ms
        retries: 2
"#
    )
}

fn deploy(c: &Cluster, name: &str, yaml: &str) {
    let out = c.deploy(&format!("{name}.yaml"), yaml);
    assert!(
        out.status.success(),
        "deploy failed: {}\n{}",
        common::stdout(&out),
        common::stderr(&out)
    );
}

/// One HTTP/1.0 GET through `port`: the status, or why not.
fn get(port: u16) -> Result<u16, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .map_err(|e| format!("read: {e}"))?;
    buf.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {buf:?}"))
}

fn task_ids(c: &Cluster, service: &str) -> Vec<String> {
    let mut ids: Vec<String> = c
        .all_tasks(service)
        .iter()
        .filter_map(|t| t["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

/// Processes whose command line contains `pattern`.
fn processes(pattern: &str) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A flood of idle connections to a published TCP port neither kills nor replaces the healthy
/// task, the node stays manageable, the service answers once the flood is gone, and removing
/// the service leaves no process behind.
#[test]
fn idle_connection_flood_kills_no_task_and_leaves_no_process() {
    let name = "abuseidle";
    let (c, port) = cluster_serving(name, "tcp");
    let before = task_ids(&c, name);

    // Some connections may be refused outright (the kernel's backlog); that is fine.
    let flood: Vec<TcpStream> = (0..FLOOD)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(flood.len() > FLOOD / 2, "only {} connected", flood.len());
    // Many health-check periods (500 ms, 2 retries) while flooded; the node answers its API.
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        let tasks = c.live_tasks(name);
        assert_eq!(tasks.len(), 1, "{tasks:?}");
        assert_ne!(tasks[0]["status"]["health"], "unhealthy", "{tasks:?}");
    }
    assert_eq!(task_ids(&c, name), before, "the task was replaced");
    drop(flood);
    wait_for("the service to answer again", GENEROUS, || {
        (get(port) == Ok(200)).then_some(())
    });
    let log = c.up_log();
    assert!(
        log.contains("connection cap reached"),
        "the mesh never refused a connection:\n{}",
        common::tail(&log, 40)
    );
    assert!(
        !log.contains("Too many open files"),
        "{}",
        common::tail(&log, 40)
    );

    c.ok(&["service", "rm", name]);
    wait_for("the task's process to end", GENEROUS, || {
        processes(&format!("--version {name}"))
            .is_empty()
            .then_some(())
    });
}

/// Opens a connection that sends part of a request head and then nothing; returns whether
/// the server closed it (rather than our generous read timeout ending the wait).
fn slowloris_is_cut_off(port: u16) -> bool {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    s.set_read_timeout(Some(GENEROUS)).unwrap();
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => true,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
    }
}

/// The API, the agent's server and a published HTTP port close a client that never finishes
/// its request head; an idle keep-alive client on the API is closed as well.
#[test]
fn slowloris_is_cut_off_on_the_api_the_agent_and_the_mesh() {
    let name = "abuseslow";
    let (c, port) = cluster_serving(name, "http");
    let agent_addr = c.json(&["node", "ls"])[0]["agent_addr"]
        .as_str()
        .unwrap()
        .to_string();
    let agent_port: u16 = agent_addr
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in the agent address {agent_addr:?}"));
    // All at once: each waits out the header timeout.
    let waits: Vec<_> = [("mesh", port), ("API", c.api_port), ("agent", agent_port)]
        .into_iter()
        .map(|(listener, port)| {
            (
                listener,
                std::thread::spawn(move || slowloris_is_cut_off(port)),
            )
        })
        .collect();
    for (listener, wait) in waits {
        assert!(
            wait.join().unwrap(),
            "the {listener} listener kept a slowloris client"
        );
    }

    // A keep-alive client that goes quiet after a request.
    let mut idle = TcpStream::connect(("127.0.0.1", c.api_port)).unwrap();
    write!(idle, "GET /v1/nodes HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    idle.set_read_timeout(Some(GENEROUS)).unwrap();
    let mut all = Vec::new();
    let ended = idle.read_to_end(&mut all);
    let text = String::from_utf8_lossy(&all);
    assert!(ended.is_ok(), "the API kept an idle connection: {ended:?}");
    assert!(text.starts_with("HTTP/1.1 "), "{text}");
}
