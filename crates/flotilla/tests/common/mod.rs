//! Test harness: real `flotilla up` processes on loopback, driven through the real CLI.
#![allow(dead_code)]

use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// Each cluster in this test binary gets its own slice of host ports for tasks, so parallel
/// tests never race for the same port.
static NEXT_SLICE: AtomicU16 = AtomicU16::new(0);
/// Same for the port ranges of standalone agents (`Cluster::add_agent`), in their own region.
static NEXT_AGENT_SLICE: AtomicU16 = AtomicU16::new(0);

/// A port nothing listens on now, never the same one twice in this test process: the kernel
/// may hand a just-released ephemeral port to the next `bind(0)`, and two clusters of parallel
/// tests once got the same API port that way.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind ephemeral port");
        let port = l.local_addr().expect("local addr").port();
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if seen.insert(port) {
            return port;
        }
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A minimal HTTP/1.0 GET: (status, body), or None if the connection failed.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_from("127.0.0.1", port, path, &[])
}

/// GET with extra header lines (`"Authorization: Bearer x"`) against `host`.
pub fn http_get_from(host: &str, port: u16, path: &str, headers: &[&str]) -> Option<(u16, String)> {
    let mut s = TcpStream::connect((host, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n{extra}\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub api_port: u16,
    pub task_ports: (u16, u16),
    child: Option<Child>,
    extra_args: Vec<String>,
    /// Interface the API binds to.
    pub api_host: String,
    /// Standalone worker agents (`flotilla agent`) following this cluster's manager.
    pub agents: Vec<AgentNode>,
}

/// A `flotilla agent` process: one worker node with its own name, data dir and port range.
pub struct AgentNode {
    pub name: String,
    pub data_dir: PathBuf,
    pub task_ports: (u16, u16),
    log: PathBuf,
    child: Option<Child>,
    stopped: bool,
    /// Extra `flotilla agent` arguments (e.g. `--mesh-bind 127.0.0.2`).
    extra_args: Vec<String>,
}

impl AgentNode {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Cluster {
    pub fn start() -> Cluster {
        Self::start_with(&[])
    }

    /// A cluster whose API listens on every interface.
    pub fn start_public() -> Cluster {
        Self::start_on("0.0.0.0", &[])
    }

    pub fn start_with(extra: &[&str]) -> Cluster {
        Self::start_on("127.0.0.1", extra)
    }

    fn start_on(host: &str, extra: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("flt")
            .tempdir()
            .expect("tempdir");
        let slice =
            NEXT_SLICE.fetch_add(1, Ordering::SeqCst) + (std::process::id() % 20) as u16 * 7;
        let start = 21000 + (slice % 50) * 200;
        let mut c = Cluster {
            dir,
            api_port: free_port(),
            task_ports: (start, start + 200),
            child: None,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            api_host: host.into(),
            agents: Vec::new(),
        };
        c.spawn_up();
        c
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The TCP API, which needs [`Cluster::token`].
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// This cluster's API socket: its own (`up --socket`), not /run/flotilla/flotilla.sock,
    /// which parallel tests would share.
    pub fn socket(&self) -> PathBuf {
        self.data_dir().join("flotilla.sock")
    }

    /// The socket as a CLI address (`--addr` / FLOTILLA_ADDR).
    pub fn socket_addr(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The API token `up` keeps in DATA_DIR/api-token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("api-token"))
            .expect("the api-token of a started cluster")
            .trim()
            .to_string()
    }

    /// `Authorization` header line for [`http_get_from`].
    pub fn bearer(&self) -> String {
        format!("Authorization: Bearer {}", self.token())
    }

    /// Starts `flotilla up` (again) on this cluster's data dir and waits for its API. The API
    /// port comes from `free_port`, which another test (or a task) may take before `up` binds
    /// it; then `up` exits and another cluster would answer on that port, so a start that lost
    /// the race is retried on a fresh port.
    pub fn spawn_up(&mut self) {
        for _ in 0..5 {
            if self.try_spawn_up() {
                return;
            }
            eprintln!(
                "flotilla up could not listen on {}; retrying on another port",
                self.api_port
            );
            self.api_port = free_port();
        }
        panic!("flotilla up could not bind an API port:\n{}", self.up_log());
    }

    /// One start of `flotilla up`; false if it exited because its API port was taken.
    fn try_spawn_up(&mut self) -> bool {
        let log_offset = self.up_log().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("up.log"))
            .expect("open up.log");
        let child = Command::new(BIN)
            .arg("up")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--api-addr")
            .arg(format!("{}:{}", self.api_host, self.api_port))
            .arg("--task-ports")
            .arg(format!("{}-{}", self.task_ports.0, self.task_ports.1))
            .arg("--socket")
            .arg(self.socket())
            .args(&self.extra_args)
            .env("FLOTILLA_LOG", "info,openraft=warn")
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn flotilla up");
        self.child = Some(child);
        // The socket is this cluster's own, so whoever answers on it is this `up`.
        let addr = self.socket_addr();
        // `up` says "flotilla is up: …, API http://HOST:PORT" once it holds the port; only this
        // start's part of the (appended) log counts.
        let started = format!(", API http://{}:{}", self.api_host, self.api_port);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.up_log();
            let this_start = log.get(log_offset..).unwrap_or_default();
            // Ours exited: never mistake whoever else holds the port for this cluster.
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let taken = format!("{}: cannot listen", self.api_port);
                if this_start.contains(&taken) && this_start.contains("Address already in use") {
                    self.child = None;
                    return false;
                }
                panic!("flotilla up exited ({status}) before its API answered:\n{log}");
            }
            let answered = this_start.contains(&started)
                && Command::new(BIN)
                    .args(["--addr", &addr, "node", "ls", "-o", "json"])
                    .output()
                    .ok()
                    .and_then(|out| serde_json::from_slice::<Value>(&out.stdout).ok())
                    .and_then(|nodes| nodes.as_array().map(|n| !n.is_empty()))
                    .unwrap_or(false);
            if answered {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after 60s waiting for the API to answer:\n{}",
                self.up_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts a standalone agent named `name` against this cluster's manager and waits until
    /// the node is registered and ready. Its heartbeat is 300ms, so run the cluster with a short
    /// `--node-grace` to see failures quickly.
    pub fn add_agent(&mut self, name: &str) -> &AgentNode {
        self.add_agent_with(name, &[])
    }

    /// [`Cluster::add_agent`] with extra `flotilla agent` arguments.
    pub fn add_agent_with(&mut self, name: &str, extra: &[&str]) -> &AgentNode {
        let slice =
            NEXT_AGENT_SLICE.fetch_add(1, Ordering::SeqCst) + (std::process::id() % 20) as u16 * 5;
        let start = 11000 + (slice % 90) * 100;
        self.push_agent(name, extra, (start, start + 100));
        self.start_agent(name);
        self.agent(name)
    }

    fn push_agent(&mut self, name: &str, extra: &[&str], task_ports: (u16, u16)) {
        self.agents.push(AgentNode {
            name: name.to_string(),
            data_dir: self.dir.path().join(format!("agent-{name}")),
            task_ports,
            log: self.dir.path().join(format!("agent-{name}.log")),
            child: None,
            stopped: false,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        });
    }

    /// [`Cluster::add_agent`] without `--task-ports`, as an operator following the README
    /// starts it: the agent picks its own range.
    pub fn add_agent_default_ports(&mut self, name: &str) -> &AgentNode {
        self.push_agent(name, &[], (0, 0));
        self.start_agent(name);
        self.agent(name)
    }

    pub fn agent(&self, name: &str) -> &AgentNode {
        self.agents
            .iter()
            .find(|a| a.name == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    fn agent_mut(&mut self, name: &str) -> &mut AgentNode {
        self.agents
            .iter_mut()
            .find(|a| a.name == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    /// (Re)starts the agent process of an added agent and waits for its node to be ready.
    pub fn start_agent(&mut self, name: &str) {
        let addr = self.addr();
        let token = self.token();
        let a = self.agent_mut(name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.log)
            .expect("open agent log");
        let child = Command::new(BIN)
            .args([
                "agent",
                "--manager",
                &addr,
                "--node-name",
                name,
                "--heartbeat",
                "300ms",
            ])
            .arg("--data-dir")
            .arg(&a.data_dir)
            // An empty range: the agent's default (see `add_agent_default_ports`).
            .args(
                (a.task_ports.0 < a.task_ports.1)
                    .then(|| format!("--task-ports={}-{}", a.task_ports.0, a.task_ports.1)),
            )
            .args(&a.extra_args)
            // Agents authenticate with the API token, as an operator starts them.
            .env("FLOTILLA_TOKEN", token)
            .env("FLOTILLA_LOG", "info")
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn flotilla agent");
        a.child = Some(child);
        self.wait_node(name, "ready");
    }

    /// Waits until `node ls` shows `name` in `state` (`ready` or `down`).
    pub fn wait_node(&self, name: &str, state: &str) -> Value {
        wait_for(
            &format!("node {name} to be {state}"),
            Duration::from_secs(60),
            || {
                let nodes = self.json(&["node", "ls"]);
                nodes
                    .as_array()?
                    .iter()
                    .find(|n| n["id"] == name && n["state"] == state)
                    .cloned()
            },
        )
    }

    /// SIGKILLs an agent process; its shims and workloads stay.
    pub fn kill_agent(&mut self, name: &str) {
        let a = self.agent_mut(name);
        if let Some(mut c) = a.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOPs (`frozen = true`) or SIGCONTs an agent: a frozen agent sends no heartbeats,
    /// but its workloads keep running.
    pub fn freeze_agent(&mut self, name: &str, frozen: bool) {
        let a = self.agent_mut(name);
        let pid = a.pid().expect("agent is running");
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
        a.stopped = frozen;
    }

    /// SIGKILLs the `flotilla up` process (manager and agent), leaving shims and workloads.
    pub fn kill_up(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn up_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    /// The CLI as a local administrator runs it: over the manager's Unix socket.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("FLOTILLA_ADDR", self.socket_addr())
            .stdin(Stdio::null())
            .output()
            .expect("run flotilla")
    }

    /// Runs a command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "flotilla {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON ({e}): {out}"))
    }

    /// Tasks of `service` meant to be running (what `ps` shows).
    pub fn live_tasks(&self, service: &str) -> Vec<Value> {
        self.json(&["ps", service])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn all_tasks(&self, service: &str) -> Vec<Value> {
        self.json(&["ps", service, "--all"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `service` has exactly `n` live tasks, all running and healthy (or without a
    /// check), and returns them.
    pub fn wait_ready(&self, service: &str, n: usize) -> Vec<Value> {
        wait_for(
            &format!("{n} ready tasks of {service}"),
            Duration::from_secs(90),
            || {
                let tasks = self.live_tasks(service);
                let ready = tasks
                    .iter()
                    .filter(|t| {
                        t["status"]["state"] == "running"
                            && (t["spec"]["healthcheck"].is_null()
                                || t["status"]["health"] == "healthy")
                    })
                    .count();
                (tasks.len() == n && ready == n).then_some(tasks)
            },
        )
    }

    /// Writes `yaml` to a file in the test dir and returns its path.
    pub fn write_file(&self, name: &str, yaml: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, yaml).expect("write compose file");
        p
    }

    pub fn deploy(&self, name: &str, yaml: &str) -> Output {
        let p = self.write_file(name, yaml);
        self.run(&[
            "deploy",
            "-f",
            p.to_str().expect("utf8 path"),
            "--timeout",
            "90s",
        ])
    }

    fn cleanup(&mut self) {
        if self.child.is_none() {
            return;
        }
        // Frozen agents must run again to stop their workloads.
        for a in &mut self.agents {
            if let (true, Some(pid)) = (a.stopped, a.pid()) {
                let _ = Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
                a.stopped = false;
            }
        }
        // Stop every workload through the cluster, so nothing outlives the test.
        if let Ok(services) =
            serde_json::from_slice::<Value>(&self.run(&["service", "ls", "-o", "json"]).stdout)
        {
            for s in services.as_array().into_iter().flatten() {
                if let Some(name) = s["name"].as_str() {
                    let _ = self.run(&["service", "rm", name]);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let out = self.run(&["ps", "--all", "-o", "json"]);
            let active = serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .map(|ts| {
                    ts.iter()
                        .filter(|t| {
                            matches!(
                                t["status"]["state"].as_str(),
                                Some("starting" | "running" | "stopping")
                            )
                        })
                        .count()
                })
                .unwrap_or(0);
            if active == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.kill_up();
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = Command::new("pkill")
                .arg("-9")
                .arg("-f")
                .arg(&a.data_dir)
                .status();
        }
        // Last resort for shims of a test that failed midway.
        let _ = Command::new("pkill")
            .arg("-9")
            .arg("-f")
            .arg(self.data_dir())
            .status();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.cleanup();
        if std::thread::panicking() {
            eprintln!(
                "---- flotilla up log ({}) ----\n{}",
                self.dir.path().display(),
                tail(&self.up_log(), 80)
            );
            for a in &self.agents {
                eprintln!("---- agent {} log ----\n{}", a.name, tail(&a.log(), 40));
            }
        }
    }
}

static DEMO_IMAGE: std::sync::Once = std::sync::Once::new();

/// True when an engine answers; builds `flotilla-demo:latest` once per test binary.
pub fn docker_available() -> bool {
    let out = sh("docker version --format '{{.Server.Version}}' 2>&1");
    if !out.status.success() {
        let why = format!("`docker version` failed: {}", stdout(&out).trim());
        assert!(
            std::env::var("FLOTILLA_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "FLOTILLA_REQUIRE_DOCKER=1 but there is no Docker Engine: {why}"
        );
        eprintln!("SKIP: no Docker Engine: {why}");
        return false;
    }
    DEMO_IMAGE.call_once(|| {
        let out = std::process::Command::new(BIN)
            .arg("demo-image")
            .output()
            .expect("run flotilla demo-image");
        assert!(out.status.success(), "demo-image failed: {}", stderr(&out));
        assert_eq!(stdout(&out).trim(), "flotilla-demo:latest");
    });
    true
}

/// Removes whatever containers and networks of `services` a failed test left behind.
pub struct DockerLeftovers(pub &'static [&'static str]);

impl Drop for DockerLeftovers {
    fn drop(&mut self) {
        for s in self.0 {
            sh(&format!(
                "docker ps -aq --filter label=io.flotilla.service={s} | xargs -r docker rm -f; docker network rm flotilla-{s} 2>/dev/null"
            ));
        }
    }
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

pub fn sh(cmd: &str) -> Output {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("sh")
}

/// A non-loopback IPv4 address of this machine, if it has one.
pub fn external_ipv4() -> Option<String> {
    let out = sh("hostname -I");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|a| {
            a.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| !ip.is_loopback())
        })
        .map(str::to_string)
}

/// Stops a `flotilla bench load` child (SIGTERM makes it report what it sent) and parses its
/// JSON report.
pub fn load_report(child: Child) -> Value {
    let stopped = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(
        stopped.is_ok_and(|s| s.success()),
        "could not stop the load"
    );
    let out = child.wait_with_output().expect("load finished");
    assert!(out.status.success(), "bench load: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("load JSON")
}
