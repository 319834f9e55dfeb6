//! Cluster membership and security end to end: real `flotilla init` / `join` processes on
//! loopback, mutual TLS between them, real kills. One cluster serves every check, in an order
//! where each step starts from what the previous one left (wall time stays small).
mod common;

use common::{free_port, load_report, stderr, stdout, tail, wait_for, BIN};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

/// One `flotilla init` or `flotilla join` process.
struct Member {
    name: String,
    data_dir: PathBuf,
    listen: String,
    /// Loopback plain-HTTP API (managers only).
    api: Option<String>,
    log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Member {
    fn pki(&self, file: &str) -> PathBuf {
        self.data_dir.join("pki").join(file)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        self.child = Some(
            Command::new(BIN)
                .args(&self.args)
                .env("FLOTILLA_LOG", "info,openraft=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log"))
                .stderr(log)
                .spawn()
                .expect("spawn flotilla"),
        );
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// This node's API socket (served while it is a manager), as a local administrator uses it.
    fn socket(&self) -> PathBuf {
        self.data_dir.join("flotilla.sock")
    }

    /// The CLI against this manager's Unix socket.
    fn cli(&self, args: &[&str]) -> Output {
        assert!(self.api.is_some(), "{} is not a manager", self.name);
        Command::new(BIN)
            .args(["--addr", &format!("unix://{}", self.socket().display())])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run flotilla")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "flotilla {args:?} on {} failed: {}{}",
            self.name,
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).expect("JSON")
    }

    /// `curl` against `target`'s cluster (mTLS) API with this node's certificate.
    fn curl_as(&self, target: &Member, method: &str, path: &str, body: &str) -> (u16, String) {
        curl(
            Some(self),
            &[
                "-X",
                method,
                "-H",
                "content-type: application/json",
                "-d",
                body,
            ],
            &format!("https://{}{path}", target.listen),
        )
    }
}

/// `curl` over TLS (any server certificate), presenting `cert`'s node certificate if given:
/// (HTTP status, body), or (0, curl's own complaint) when no answer came (refused connection or
/// handshake).
fn curl(cert: Option<&Member>, extra: &[&str], url: &str) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-k",
        "--http1.1",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(m) = cert {
        cmd.arg("--cert")
            .arg(m.pki("node.crt"))
            .arg("--key")
            .arg(m.pki("node.key"));
    }
    let out = cmd.args(extra).arg(url).output().expect("run curl");
    let text = stdout(&out);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let code = code.trim().parse().unwrap_or(0);
    if code == 0 {
        (0, stderr(&out))
    } else {
        (code, body.to_string())
    }
}

struct Fleet {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    next_ports: u16,
}

impl Fleet {
    fn new() -> Fleet {
        Fleet {
            dir: tempfile::Builder::new()
                .prefix("fltc")
                .tempdir()
                .expect("tempdir"),
            members: Vec::new(),
            next_ports: 36000 + (std::process::id() % 40) as u16 * 100,
        }
    }

    fn add(&mut self, name: &str, command: &[&str], manager: bool) -> usize {
        let data_dir = self.dir.path().join(name);
        let listen = format!("127.0.0.1:{}", free_port());
        let api = manager.then(|| format!("127.0.0.1:{}", free_port()));
        let ports = format!("{}-{}", self.next_ports, self.next_ports + 10);
        self.next_ports += 10;
        let mut args: Vec<String> = command.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen-addr".into(),
            listen.clone(),
            "--node-name".into(),
            name.into(),
            "--node-grace".into(),
            "4s".into(),
            "--task-ports".into(),
            ports,
        ]);
        if let Some(api) = &api {
            args.extend(["--api-addr".into(), api.clone()]);
        }
        // Its own socket, not /run/flotilla/flotilla.sock, which parallel tests would share.
        args.extend([
            "--socket".into(),
            data_dir.join("flotilla.sock").display().to_string(),
        ]);
        let mut m = Member {
            name: name.into(),
            log: self.dir.path().join(format!("{name}.log")),
            data_dir,
            listen,
            api,
            args,
            child: None,
        };
        m.spawn();
        self.members.push(m);
        self.members.len() - 1
    }

    fn get(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.name == name)
            .expect("member")
    }

    fn get_mut(&mut self, name: &str) -> &mut Member {
        self.members
            .iter_mut()
            .find(|m| m.name == name)
            .expect("member")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for m in &self.members {
                eprintln!("---- {} log ----\n{}", m.name, tail(&m.log(), 60));
            }
        }
        for m in &mut self.members {
            m.kill();
        }
        // Task shims outlive their agents by design; they run under this test's temp dir.
        let _ = Command::new("pkill")
            .arg("-9")
            .arg("-f")
            .arg(self.dir.path())
            .status();
    }
}

fn node_roles(m: &Member) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = m
        .json(&["node", "ls"])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap_or_default().to_string(),
                n["role"].as_str().unwrap_or_default().to_string(),
                n["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn managers(m: &Member) -> Vec<Value> {
    assert!(m.api.is_some(), "{} is not a manager", m.name);
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--unix-socket"])
        .arg(m.socket())
        .arg("http://localhost/v1/cluster/managers")
        .output()
        .expect("curl");
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn voters(m: &Member) -> usize {
    managers(m)
        .iter()
        .filter(|v| v["voter"].as_bool() == Some(true))
        .count()
}

fn wait_ready_nodes(m: &Member, want: &[(&str, &str)]) {
    wait_for(&format!("nodes {want:?} ready"), LONG, || {
        let roles = node_roles(m);
        want.iter()
            .all(|(name, role)| {
                roles
                    .iter()
                    .any(|(n, r, s)| n == name && r == role && s == "ready")
            })
            .then_some(())
    });
}

fn processes_matching(pattern: &str) -> usize {
    let out = Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .expect("pgrep");
    stdout(&out).lines().count()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p.display().to_string()
}

/// The join token for `role` (`manager` or `worker`), once manager `m` serves it.
fn join_token(m: &Member, role: &str) -> String {
    wait_for(
        &format!("{} to serve its join tokens", m.name),
        LONG,
        || {
            let out = m.cli(&["token", "show", role]);
            out.status
                .success()
                .then(|| stdout(&out).trim().to_string())
        },
    )
}

/// Deploys `service`: `replicas` tasks running `sleep MARKER`, through manager `m`. Returns
/// the marker (unique to this test process), which finds the tasks' processes.
fn deploy_sleepers(fleet: &Fleet, m: &str, service: &str, replicas: u32, base: u32) -> String {
    let marker = format!("{}", base + std::process::id() % 10000);
    let compose = write(
        fleet.dir.path(),
        &format!("{service}.yaml"),
        &format!(
            "services:\n  {service}:\n    command: [\"sleep\", \"{marker}\"]\n    deploy:\n      \
             replicas: {replicas}\n"
        ),
    );
    fleet
        .get(m)
        .ok(&["deploy", "-f", &compose, "--timeout", "60s"]);
    marker
}

#[test]
fn membership_security_quorum_and_removal() {
    let mut fleet = Fleet::new();
    // Short-lived certificates: every node must renew its own during the test (item 6).
    fleet.add("m1", &["init", "--cert-validity", "60s"], true);
    let m1_listen = fleet.get("m1").listen.clone();
    let manager_token = join_token(fleet.get("m1"), "manager");
    let worker_token = join_token(fleet.get("m1"), "worker");

    // m2 joins through the leader; m3 through m2, a follower: its join and its request to
    // become a voter are forwarded to the leader.
    fleet.add("m2", &["join", "--token", &manager_token, &m1_listen], true);
    wait_for("m2 to vote", LONG, || {
        (voters(fleet.get("m1")) == 2).then_some(())
    });
    let m2_listen = fleet.get("m2").listen.clone();
    fleet.add("m3", &["join", "--token", &manager_token, &m2_listen], true);
    fleet.add("w1", &["join", "--token", &worker_token, &m1_listen], false);
    wait_for("3 voting managers", LONG, || {
        (voters(fleet.get("m1")) == 3).then_some(())
    });

    // 1. Roles come from the certificates.
    wait_ready_nodes(
        fleet.get("m1"),
        &[
            ("m1", "manager"),
            ("m2", "manager"),
            ("m3", "manager"),
            ("w1", "worker"),
        ],
    );
    let names: Vec<String> = managers(fleet.get("m2"))
        .iter()
        .filter_map(|m| m["node"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names.len(), 3, "managers with names: {names:?}");

    // A worker certificate is refused on manager-only routes, with the reason.
    let (w1, m1) = (fleet.get("w1"), fleet.get("m1"));
    let (code, body) = w1.curl_as(m1, "POST", "/raft/vote", "{}");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("worker certificate"), "{body}");
    assert!(body.contains("managers only"), "{body}");
    let (code, body) = w1.curl_as(m1, "POST", "/v1/cluster/managers", "{}");
    assert_eq!(code, 403, "{body}");
    let (code, body) = w1.curl_as(m1, "GET", "/v1/cluster/tokens", "");
    assert_eq!(code, 403, "{body}");
    let (code, body) = w1.curl_as(m1, "POST", "/v1/cluster/tokens/worker/rotate", "{}");
    assert_eq!(code, 403, "{body}");
    // ...and may register and heartbeat only as itself.
    let (code, body) = w1.curl_as(m1, "POST", "/v1/nodes/m2/heartbeat", r#"{"at":0}"#);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("only register and heartbeat as itself"),
        "{body}"
    );
    // A manager certificate may read the tokens.
    let (code, body) = fleet.get("m2").curl_as(m1, "GET", "/v1/cluster/tokens", "");
    assert_eq!(code, 200, "{body}");

    // 4. Token rotation goes through the store: rotated on a follower, every manager refuses
    // the old token and shows the new one.
    let rotated = fleet.get("m3").ok(&["token", "rotate", "worker"]);
    let new_worker_token = rotated
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert_ne!(new_worker_token, worker_token);
    for m in ["m1", "m2", "m3"] {
        wait_for(&format!("{m} to show the rotated token"), LONG, || {
            let shown = fleet.get(m).ok(&["token", "show", "worker"]);
            (shown.trim() == new_worker_token).then_some(())
        });
    }
    let w2_data = fleet.dir.path().join("w2-refused");
    let refused = Command::new(BIN)
        .args([
            "join",
            "--token",
            &worker_token,
            &m2_listen,
            "--node-name",
            "w2",
        ])
        .arg("--data-dir")
        .arg(&w2_data)
        .args(["--listen-addr", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .output()
        .expect("run join");
    assert!(!refused.status.success(), "a rotated token was accepted");
    let why = stderr(&refused);
    assert!(
        why.contains("not valid (wrong token, or it was rotated)"),
        "{why}"
    );
    // Through m2, a follower.
    fleet.add(
        "w2",
        &["join", "--token", &new_worker_token, &m2_listen],
        false,
    );
    wait_ready_nodes(fleet.get("m2"), &[("w2", "worker")]);

    // A service whose tasks must survive the loss of quorum.
    let marker = deploy_sleepers(&fleet, "m1", "keep", 3, 80000);
    let pattern = format!("^sleep {marker}$");
    wait_for("3 keep tasks running", LONG, || {
        (processes_matching(&pattern) == 3).then_some(())
    });

    // 5. Quorum loss: with m2 and m3 killed, writes on m1 fail fast and say how many managers
    // are reachable; running tasks keep running.
    fleet.get_mut("m2").kill();
    fleet.get_mut("m3").kill();
    assert_quorum_lost(fleet.get("m1"), &["scale", "keep=2"]);
    // All three, including those whose agents died with m2 and m3 (shims outlive agents).
    assert_eq!(
        processes_matching(&pattern),
        3,
        "tasks stopped without quorum"
    );

    // m2 comes back (restart from its data dir): writes work again.
    fleet.get_mut("m2").spawn();
    // (3 → 2 is a real write; scaling to the current count would write nothing.)
    wait_for("writes to succeed with 2 of 3 managers", LONG, || {
        fleet
            .get("m1")
            .cli(&["scale", "-d", "keep=2"])
            .status
            .success()
            .then_some(())
    });

    // 2. `node rm`: a live node needs --force; a dead manager leaves raft; removed nodes'
    // certificates are refused everywhere.
    wait_ready_nodes(fleet.get("m1"), &[("w1", "worker")]);
    let out = fleet.get("m1").cli(&["node", "rm", "w1"]);
    assert!(
        !out.status.success(),
        "removed a ready node without --force: {} {:?}",
        stdout(&out),
        node_roles(fleet.get("m1"))
    );
    assert!(stderr(&out).contains("is ready"), "{}", stderr(&out));
    let removed = fleet.get("m2").ok(&["node", "rm", "--force", "w1"]);
    assert!(removed.contains("removed node w1"), "{removed}");
    let (code, body) = fleet
        .get("w1")
        .curl_as(fleet.get("m1"), "GET", "/v1/nodes", "");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("was revoked"), "{body}");
    let (code, body) = fleet.get("w1").curl_as(
        fleet.get("m2"),
        "POST",
        "/v1/nodes/w1/heartbeat",
        r#"{"at":0}"#,
    );
    assert_eq!(code, 403, "{body}");
    wait_for("w1 to stay out of node ls", LONG, || {
        (!node_roles(fleet.get("m1"))
            .iter()
            .any(|(n, _, _)| n == "w1"))
        .then_some(())
    });

    // m3 is down; removing it shrinks raft to 2 voters and revokes it.
    wait_for("m3 down", LONG, || {
        node_roles(fleet.get("m1"))
            .iter()
            .any(|(n, _, s)| n == "m3" && s == "down")
            .then_some(())
    });
    let removed = fleet.get("m1").ok(&["node", "rm", "m3"]);
    assert!(removed.contains("raft managers"), "{removed}");
    wait_for("2 voters", LONG, || {
        (voters(fleet.get("m1")) == 2).then_some(())
    });
    let (code, body) = fleet
        .get("m3")
        .curl_as(fleet.get("m1"), "POST", "/raft/vote", "{}");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("was revoked"), "{body}");

    // Unknown nodes and bad flags get clear errors.
    let out = fleet.get("m1").cli(&["node", "rm", "nosuch"]);
    assert!(
        stderr(&out).contains("no node \"nosuch\""),
        "{}",
        stderr(&out)
    );

    // Certificates renew before they expire (after two thirds of their 60 s), and the renewed
    // ones work.
    let first_m1 = std::fs::read_to_string(fleet.get("m1").pki("node.crt")).expect("m1 cert");
    let first_w2 = std::fs::read_to_string(fleet.get("w2").pki("node.crt")).expect("w2 cert");
    wait_for(
        "m1 and w2 to renew their certificates",
        Duration::from_secs(120),
        || {
            let m1 = std::fs::read_to_string(fleet.get("m1").pki("node.crt")).ok()?;
            let w2 = std::fs::read_to_string(fleet.get("w2").pki("node.crt")).ok()?;
            (m1 != first_m1 && w2 != first_w2).then_some(())
        },
    );
    let (code, body) = fleet
        .get("w2")
        .curl_as(fleet.get("m1"), "GET", "/v1/nodes", "");
    assert_eq!(code, 200, "{body}");
    assert!(fleet.get("w2").log().contains("certificate renewed"));
    wait_ready_nodes(fleet.get("m2"), &[("m1", "manager"), ("w2", "worker")]);

    // 7. Agent servers are mTLS: a manager proxies the logs of a task on another node through
    // that node's agent with its (renewed) manager certificate...
    // (Only live nodes: the removed w1 and the dead m3 serve nothing, and their tasks may
    // still be listed as running, so two more replicas go where they can be reached.)
    fleet.get("m1").ok(&["scale", "-d", "keep=4"]);
    let tasks: Vec<(String, String)> = wait_for("keep tasks running on live nodes", LONG, || {
        let running: Vec<(String, String)> = fleet
            .get("m1")
            .json(&["ps", "keep"])
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|t| t["status"]["state"] == "running")
            .filter(|t| ["m1", "m2", "w2"].iter().any(|n| t["node"] == *n))
            .filter_map(|t| Some((t["id"].as_str()?.into(), t["node"].as_str()?.into())))
            .collect();
        (!running.is_empty()).then_some(running)
    });
    for (task, node) in &tasks {
        let via = if node == "m1" { "m2" } else { "m1" };
        fleet.get(via).ok(&["logs", task]);
    }
    // ...while no certificate, a worker's certificate or plain HTTP get nothing from it.
    let agent_addr = |node: &str| {
        fleet
            .get("m1")
            .json(&["node", "ls"])
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .find(|n| n["id"] == node)
            .and_then(|n| n["agent_addr"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let w2_agent = agent_addr("w2");
    assert!(w2_agent.starts_with("https://"), "w2 agent at {w2_agent:?}");
    let probe = format!("{w2_agent}/tasks/nosuch/stats");
    let (code, body) = curl(Some(fleet.get("m2")), &[], &probe);
    assert_eq!(code, 404, "a manager certificate was not admitted: {body}");
    for cert in [None, Some(fleet.get("w2"))] {
        let (code, body) = curl(cert, &[], &probe);
        assert_eq!(code, 0, "admitted without a manager certificate: {body}");
    }
    let plain = probe.replacen("https://", "http://", 1);
    let (code, body) = curl(Some(fleet.get("m2")), &[], &plain);
    assert_eq!(code, 0, "plain HTTP answered: {body}");

    // Live agents stop their tasks; those of the killed m3 and the removed w1 cannot (their
    // shims outlive them by design) and go with the fleet's cleanup.
    fleet.get("m1").ok(&["service", "rm", "keep"]);
}

/// Kills (`pkill -9 -f`) every process whose command line holds the pattern when dropped:
/// the demo apps of a killed manager's task shims outlive both (a workload runs in its own
/// process group), and their command lines do not name the fleet's temp dir. Declared before
/// the fleet, so it runs after the fleet stopped every agent that could restart them.
struct KillMatching(String);

impl Drop for KillMatching {
    fn drop(&mut self) {
        let _ = Command::new("pkill").args(["-9", "-f", &self.0]).status();
    }
}

/// Tests that put load on their cluster take turns, so two never compete for the cores.
static LOAD_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn load_turn() -> std::sync::MutexGuard<'static, ()> {
    LOAD_TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// `flotilla bench load` at 200 requests/s against `url`, until stopped by [`load_report`].
fn start_load(url: &str) -> Child {
    Command::new(BIN)
        .args(["bench", "load", "--url", url, "--rate", "200"])
        .args(["--duration", "180s", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the load")
}

/// The version the demo app behind `ip:port` (a node's mesh) reports.
fn version_via(ip: &str, port: u16) -> Option<String> {
    let (status, body) = common::http_get_from(ip, port, "/", &[])?;
    (status == 200).then_some(())?;
    serde_json::from_str::<Value>(&body).ok()?["version"]
        .as_str()
        .map(str::to_string)
}

/// Issue 7: killing the leader manager (`kill -9`) mid blue-green ends with green or blue
/// serving, never neither. Three managers, each with its own mesh on its own loopback address;
/// the load goes through a surviving manager's mesh. The rollout controller's state is in the
/// replicated store, so the new leader resumes the rollout and finishes it (or rolls it back);
/// the running tasks keep serving throughout. The load is split at the new leader's election:
/// before it, a request in flight when the leader died may fail (a handful at most); after
/// it, none may.
#[test]
fn killing_the_leader_mid_blue_green_leaves_a_version_serving() {
    // Every demo app's command line carries `tag` (its version string).
    let _turn = load_turn();
    let tag = format!("lk{}x{}", std::process::id(), free_port());
    let _workloads = KillMatching(tag.clone());
    let mut fleet = Fleet::new();
    let mesh_ip = |name: &str| format!("127.0.0.{}", &name[1..]);
    fleet.add("m1", &["init", "--mesh-bind", "127.0.0.1"], true);
    let m1_listen = fleet.get("m1").listen.clone();
    let token = wait_for("m1 to serve its join tokens", LONG, || {
        let out = fleet.get("m1").cli(&["token", "show", "manager"]);
        out.status
            .success()
            .then(|| stdout(&out).trim().to_string())
    });
    for (name, voting) in [("m2", 2), ("m3", 3)] {
        let ip = mesh_ip(name);
        fleet.add(
            name,
            &["join", "--token", &token, &m1_listen, "--mesh-bind", &ip],
            true,
        );
        wait_for(&format!("{voting} voting managers"), LONG, || {
            (voters(fleet.get("m1")) == voting).then_some(())
        });
    }
    wait_ready_nodes(
        fleet.get("m1"),
        &[("m1", "manager"), ("m2", "manager"), ("m3", "manager")],
    );

    let port = free_port();
    let (v1, v2) = (format!("v1-{tag}"), format!("v2-{tag}"));
    let bg = "      strategy: blue-green\n      blue_green:\n        scale_down_delay: 3s\n";
    let web = |version: &str| demo_web(port, version, "", bg);
    let v1_file = write(fleet.dir.path(), "v1.yaml", &web(&v1));
    let v2_file = write(fleet.dir.path(), "v2.yaml", &web(&v2));
    fleet
        .get("m1")
        .ok(&["deploy", "-f", &v1_file, "--timeout", "60s"]);

    let leader = wait_for("a leader", LONG, || {
        managers(fleet.get("m2"))
            .iter()
            .find(|m| m["leader"] == true)
            .and_then(|m| m["node"].as_str().map(str::to_string))
    });
    let via = ["m1", "m2", "m3"]
        .into_iter()
        .find(|m| *m != leader)
        .expect("a follower")
        .to_string();
    let other = ["m1", "m2", "m3"]
        .into_iter()
        .find(|m| *m != leader && *m != via)
        .expect("a second follower")
        .to_string();
    for m in [&via, &other] {
        wait_for(&format!("{m}'s mesh to serve v1"), LONG, || {
            (0..5)
                .all(|_| version_via(&mesh_ip(m), port).as_deref() == Some(v1.as_str()))
                .then_some(())
        });
    }

    let url = format!("http://{}:{port}/", mesh_ip(&via));
    let before = start_load(&url);
    std::thread::sleep(Duration::from_secs(1));
    fleet.get(&via).ok(&["deploy", "-f", &v2_file, "--detach"]);
    // Green is up and traffic is moving (or has moved) to it; blue still runs.
    let mid = [
        "routing",
        "draining_old",
        "awaiting_promotion",
        "scaling_down",
    ];
    let status = wait_for("the blue-green rollout to reach a mid step", LONG, || {
        let out = fleet
            .get(&via)
            .cli(&["rollout", "status", "web", "-o", "json"]);
        let r: Value = serde_json::from_slice(&out.stdout).ok()?;
        if r["to_revision"] != 2 {
            return None;
        }
        let phase = r["phase"].as_str().unwrap_or_default();
        assert!(
            !matches!(phase, "succeeded" | "rolled_back" | "superseded"),
            "the rollout ended before the leader could be killed: {r:#}"
        );
        mid.contains(&phase).then_some(r)
    });
    fleet.get_mut(&leader).kill();
    eprintln!("killed leader {leader} in phase {}", status["phase"]);

    let new_leader = wait_for("a new leader", LONG, || {
        managers(fleet.get(&via))
            .iter()
            .find(|m| m["leader"] == true)
            .and_then(|m| m["node"].as_str().map(str::to_string))
            .filter(|n| *n != leader)
    });
    // The loads overlap: some load runs at every moment.
    let after = start_load(&url);
    std::thread::sleep(Duration::from_millis(500));
    let report_before = load_report(before);

    let done = wait_for("the rollout to end on a surviving manager", LONG, || {
        let out = fleet
            .get(&via)
            .cli(&["rollout", "status", "web", "-o", "json"]);
        let r: Value = serde_json::from_slice(&out.stdout).ok()?;
        matches!(r["phase"].as_str(), Some("succeeded" | "rolled_back")).then_some(r)
    });
    let rolled_back = done["phase"] == "rolled_back" || done["kind"] == "auto_rollback";
    let expected = if rolled_back { &v1 } else { &v2 };
    // Exactly one version on the published port, through both surviving meshes.
    for m in [&via, &other] {
        for i in 0..20 {
            let got = version_via(&mesh_ip(m), port);
            assert_eq!(
                got.as_deref(),
                Some(expected.as_str()),
                "request {i} through {m}'s mesh after the rollout ended: {done:#}"
            );
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let report_after = load_report(after);
    eprintln!(
        "new leader {new_leader}; rollout {}; before the election: {report_before:#}\nafter: {report_after:#}",
        done["phase"]
    );

    for report in [&report_before, &report_after] {
        assert!(report["sent"].as_u64().unwrap_or(0) >= 100, "{report:#}");
        let versions = report["versions"].as_object().cloned().unwrap_or_default();
        assert!(
            versions.keys().all(|v| *v == v1 || *v == v2),
            "unexpected versions: {report:#}"
        );
    }
    assert!(
        report_before["failed"].as_u64().unwrap_or(u64::MAX) <= 5,
        "more than a handful of requests failed around the leader's death: {report_before:#}"
    );
    assert_eq!(
        report_after["failed"], 0,
        "requests failed after the new leader was elected: {report_after:#}"
    );

    // Live agents stop their tasks; the killed leader's go with the cleanup.
    fleet.get(&via).ok(&["service", "rm", "web"]);
}

/// A worker follows every manager, not only the one it joined through: with that manager
/// killed, the worker's heartbeats, task watch and status reports move to another one, so the
/// node stays ready and takes new tasks; restarted, it finds the managers from its data dir.
#[test]
fn worker_fails_over_when_its_manager_dies() {
    let mut fleet = Fleet::new();
    three_managers(&mut fleet);
    let worker_token = join_token(fleet.get("m1"), "worker");
    let m2_listen = fleet.get("m2").listen.clone();
    fleet.add("w1", &["join", "--token", &worker_token, &m2_listen], false);
    wait_ready_nodes(fleet.get("m1"), &[("w1", "worker")]);
    // The worker has learnt (and saved) every manager before the one it joined through dies.
    let saved = fleet.get("w1").data_dir.join("managers");
    wait_for("w1 to save the 3 managers", LONG, || {
        let text = std::fs::read_to_string(&saved).ok()?;
        (text.lines().count() == 3).then_some(())
    });

    fleet.get_mut("m2").kill();
    wait_for("m2 down", LONG, || {
        node_roles(fleet.get("m1"))
            .iter()
            .any(|(n, _, s)| n == "m2" && s == "down")
            .then_some(())
    });
    // m2 was down for longer than the grace period; w1 heartbeats elsewhere meanwhile.
    wait_ready_nodes(fleet.get("m1"), &[("w1", "worker")]);

    // A new task is placed on w1 and reported running: the watch and status reports moved too.
    let marker = format!("{}", 70000 + std::process::id() % 10000);
    let compose = write(
        fleet.dir.path(),
        "pinned.yaml",
        &format!(
            "services:\n  pinned:\n    command: [\"sleep\", \"{marker}\"]\n    deploy:\n      \
             placement:\n        constraints: [\"node.id==w1\"]\n"
        ),
    );
    fleet
        .get("m3")
        .ok(&["deploy", "-f", &compose, "--timeout", "60s"]);
    let running_on_w1 = |fleet: &Fleet| {
        fleet
            .get("m1")
            .json(&["ps", "pinned"])
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .any(|t| t["node"] == "w1" && t["status"]["state"] == "running")
    };
    wait_for("the pinned task running on w1", LONG, || {
        running_on_w1(&fleet).then_some(())
    });
    let pattern = format!("^sleep {marker}$");
    assert_eq!(processes_matching(&pattern), 1, "the task's process");

    // Restarted with only the dead m2 on its command line, w1 uses the saved managers.
    fleet.get_mut("w1").kill();
    wait_for("w1 down", LONG, || {
        node_roles(fleet.get("m1"))
            .iter()
            .any(|(n, _, s)| n == "w1" && s == "down")
            .then_some(())
    });
    fleet.get_mut("w1").spawn();
    wait_ready_nodes(fleet.get("m1"), &[("w1", "worker")]);
    fleet.get("m1").ok(&["service", "rm", "pinned"]);
    wait_for("the pinned task to stop", LONG, || {
        (processes_matching(&pattern) == 0).then_some(())
    });
}

/// Starts m1 (`init`), then m2 and m3 joining through it, and waits until all three vote.
fn three_managers(fleet: &mut Fleet) {
    fleet.add("m1", &["init"], true);
    let m1_listen = fleet.get("m1").listen.clone();
    let manager_token = join_token(fleet.get("m1"), "manager");
    fleet.add("m2", &["join", "--token", &manager_token, &m1_listen], true);
    wait_for("m2 to vote", LONG, || {
        (voters(fleet.get("m1")) == 2).then_some(())
    });
    fleet.add("m3", &["join", "--token", &manager_token, &m1_listen], true);
    wait_for("3 voting managers", LONG, || {
        (voters(fleet.get("m1")) == 3).then_some(())
    });
}

/// Waits until manager `m`, the only one of three left, refuses the write `args` because the
/// quorum is lost, and checks that the error says how many managers it reaches.
fn assert_quorum_lost(m: &Member, args: &[&str]) {
    let message = wait_for(&format!("{} to report lost quorum", m.name), LONG, || {
        let out = m.cli(args);
        let text = stderr(&out);
        (!out.status.success() && text.contains("quorum lost")).then_some(text)
    });
    assert!(
        message.contains("quorum lost: 1 of 3 managers reachable, 2 needed"),
        "{message}"
    );
}

/// `flotilla init --force-new-cluster`: two of three managers are lost for good (`kill -9`),
/// so quorum can never come back. The survivor, a follower, restarts from its data dir as a
/// one-manager cluster with every acknowledged write; a lost manager started again with its
/// old data is refused rather than rejoining; a new manager joins as usual.
#[test]
fn force_new_cluster_recovers_from_the_last_manager() {
    let marker = format!("{}", 60000 + std::process::id() % 10000);
    let _workloads = KillMatching(format!("sleep {marker}"));
    let mut fleet = Fleet::new();
    three_managers(&mut fleet);

    // Acknowledged writes, made through every manager (the followers forward them).
    let mut acknowledged = Vec::new();
    for (i, via) in ["m1", "m2", "m3", "m1", "m2", "m3"].iter().enumerate() {
        let name = format!("s{i}");
        let compose = write(
            fleet.dir.path(),
            &format!("{name}.yaml"),
            &format!("services:\n  {name}:\n    command: [\"sleep\", \"{marker}\"]\n"),
        );
        fleet.get(via).ok(&["deploy", "-d", "-f", &compose]);
        acknowledged.push(name);
    }
    let service_names = |m: &Member| -> Vec<String> {
        let mut names: Vec<String> = m
            .json(&["service", "ls"])
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect();
        names.sort();
        names
    };
    wait_for("m3 to have applied every write", LONG, || {
        (service_names(fleet.get("m3")) == acknowledged).then_some(())
    });

    // m1 and m2 are lost for good; m3 alone has no quorum and says so.
    fleet.get_mut("m1").kill();
    fleet.get_mut("m2").kill();
    assert_quorum_lost(fleet.get("m3"), &["scale", "s0=2"]);

    // Recovery: m3 restarts from its data dir as the only manager.
    let m3 = fleet.get_mut("m3");
    m3.kill();
    // `join --token T ADDR` becomes `init --force-new-cluster`; the node options stay.
    m3.args.splice(
        0..4,
        ["init".to_string(), "--force-new-cluster".to_string()],
    );
    m3.spawn();
    wait_for("m3 to serve the recovered state", LONG, || {
        let out = fleet.get("m3").cli(&["service", "ls", "-o", "json"]);
        out.status.success().then_some(())
    });
    let log = fleet.get("m3").log();
    assert!(log.contains("forced a new cluster"), "{}", tail(&log, 20));
    assert!(
        log.contains("removed the lost managers m1, m2"),
        "{}",
        tail(&log, 20)
    );
    assert_eq!(service_names(fleet.get("m3")), acknowledged);
    assert_eq!(voters(fleet.get("m3")), 1);
    fleet.get("m3").ok(&["scale", "-d", "s0=2"]);
    wait_for("the lost managers to leave node ls", LONG, || {
        let roles = node_roles(fleet.get("m3"));
        (!roles.iter().any(|(n, _, _)| n == "m1" || n == "m2")).then_some(())
    });

    // m1 comes back with its old data: it is not let back in (its certificate is revoked),
    // and the one-manager cluster carries on.
    fleet.get_mut("m1").spawn();
    let (code, body) = fleet
        .get("m1")
        .curl_as(fleet.get("m3"), "POST", "/raft/vote", "{}");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("was revoked"), "{body}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(voters(fleet.get("m3")), 1);
    fleet.get("m3").ok(&["scale", "-d", "s1=2"]);
    fleet.get_mut("m1").kill();

    // A new manager joins the recovered cluster and gets all of its state.
    let m3_listen = fleet.get("m3").listen.clone();
    let token = fleet
        .get("m3")
        .ok(&["token", "show", "manager"])
        .trim()
        .to_string();
    fleet.add("m4", &["join", "--token", &token, &m3_listen], true);
    wait_for("m4 to vote", LONG, || {
        (voters(fleet.get("m3")) == 2).then_some(())
    });
    wait_for("m4 to have the recovered services", LONG, || {
        (service_names(fleet.get("m4")) == acknowledged).then_some(())
    });
    // A write through m4 is forwarded to m3 and needs both: the cluster is whole again.
    fleet.get("m4").ok(&["scale", "-d", "s2=2"]);
    let scaled = fleet.get("m3").json(&["service", "inspect", "s2"]);
    assert!(scaled.to_string().contains("\"replicas\":2"), "{scaled}");
}

/// The running task of `service` on `node`: (task id, pid).
fn task_on(m: &Member, service: &str, node: &str) -> Option<(String, u64)> {
    m.json(&["ps", service])
        .as_array()?
        .iter()
        .find(|t| t["node"] == node && t["status"]["state"] == "running")
        .and_then(|t| Some((t["id"].as_str()?.to_string(), t["status"]["pid"].as_u64()?)))
}

/// A copy of `name`'s current certificate and key, as a [`Member`] that runs nothing (to
/// present that certificate after the node has left).
fn keep_certificate(fleet: &Fleet, name: &str) -> Member {
    let dir = fleet.dir.path().join(format!("{name}-old-{}", free_port()));
    std::fs::create_dir_all(dir.join("pki")).expect("mkdir");
    for f in ["node.crt", "node.key"] {
        std::fs::copy(fleet.get(name).pki(f), dir.join("pki").join(f)).expect("copy cert");
    }
    Member {
        name: format!("{name}-old"),
        log: dir.join("log"),
        data_dir: dir,
        listen: String::new(),
        api: None,
        args: Vec::new(),
        child: None,
    }
}

/// `flotilla leave` for the node running on `m`'s data dir (a manager's goes through its
/// loopback API).
fn leave(m: &Member, extra: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    if m.api.is_some() {
        cmd.args(["--addr", &format!("unix://{}", m.socket().display())]);
    }
    cmd.arg("leave")
        .arg("--data-dir")
        .arg(&m.data_dir)
        .args(["--timeout", "60s"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run flotilla leave")
}

fn exited(m: &mut Member) -> bool {
    m.child
        .as_mut()
        .is_some_and(|c| c.try_wait().ok().flatten().is_some())
}

/// `flotilla node promote|demote` and `flotilla leave`, in place as in Swarm: a worker becomes
/// a manager (learner, then voter) and back without restarting its tasks; the leader can be
/// demoted; unsafe demotions are refused with the reason; `leave` drains the node first, then
/// removes it and stops its process, a manager being demoted first; the old certificate of a
/// node that left is refused.
#[test]
fn promote_demote_and_leave_in_place() {
    let mut fleet = Fleet::new();
    fleet.add("m1", &["init"], true);
    let m1_listen = fleet.get("m1").listen.clone();
    let worker_token = join_token(fleet.get("m1"), "worker");
    // Workers get a loopback API address too: they serve it once promoted.
    for w in ["w1", "w2", "w3"] {
        fleet.add(w, &["join", "--token", &worker_token, &m1_listen], true);
    }
    wait_ready_nodes(
        fleet.get("m1"),
        &[("w1", "worker"), ("w2", "worker"), ("w3", "worker")],
    );
    deploy_sleepers(&fleet, "m1", "spread", 4, 50000);
    let w1_task = wait_for("a spread task on w1", LONG, || {
        task_on(fleet.get("m1"), "spread", "w1")
    });

    // Promotion: w1 gets a manager certificate, starts its manager and votes; 2 managers is
    // allowed with a warning. Its task keeps running (same task, same process).
    let out = fleet.get("m1").cli(&["node", "promote", "w1"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("w1 is a manager now"),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("even number"), "{}", stderr(&out));
    assert_eq!(voters(fleet.get("m1")), 2);
    assert!(fleet.get("w1").pki("ca.key").exists());
    wait_ready_nodes(fleet.get("w1"), &[("w1", "manager"), ("m1", "manager")]);
    assert_eq!(
        task_on(fleet.get("w1"), "spread", "w1"),
        Some(w1_task.clone())
    );
    let out = fleet.get("m1").cli(&["node", "promote", "w2"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    assert_eq!(voters(fleet.get("w1")), 3);
    let out = fleet.get("m1").cli(&["node", "promote", "w2"]);
    assert!(
        stdout(&out).contains("already a manager"),
        "{}",
        stdout(&out)
    );

    // With w2 down, demoting m1 would leave {w1, w2} with one reachable: refused.
    fleet.get_mut("w2").kill();
    wait_for("w2 down", LONG, || {
        node_roles(fleet.get("m1"))
            .iter()
            .any(|(n, _, s)| n == "w2" && s == "down")
            .then_some(())
    });
    let out = fleet.get("m1").cli(&["node", "demote", "m1"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("would not have a quorum"),
        "{}",
        stderr(&out)
    );
    assert_eq!(voters(fleet.get("m1")), 3);
    fleet.get_mut("w2").spawn();
    wait_ready_nodes(fleet.get("m1"), &[("w2", "manager")]);

    // Demotion of a follower: w1 leaves raft and runs on as a worker, task untouched, with no
    // CA key or raft state left on it.
    // (Once raft reaches the restarted w2 again, the leader counts it.)
    let out = wait_for("w2 reachable in raft: w1 demoted", LONG, || {
        let out = fleet.get("m1").cli(&["node", "demote", "w1"]);
        (out.status.success() || !stderr(&out).contains("would not have a quorum")).then_some(out)
    });
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("w1 is a worker now"),
        "{}",
        stdout(&out)
    );
    assert_eq!(voters(fleet.get("m1")), 2);
    assert!(!fleet.get("w1").pki("ca.key").exists());
    assert!(!fleet.get("w1").data_dir.join("store").exists());
    assert_eq!(task_on(fleet.get("m1"), "spread", "w1"), Some(w1_task));

    // Demotion of the leader (m1, asked on w2): raft elects w2; the last manager cannot go.
    let out = fleet.get("w2").cli(&["node", "demote", "m1"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    wait_ready_nodes(fleet.get("w2"), &[("m1", "worker"), ("w2", "manager")]);
    assert_eq!(voters(fleet.get("w2")), 1);
    let out = fleet.get("w2").cli(&["node", "demote", "w2"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("last manager"), "{}", stderr(&out));
    // Writes still work with the new single manager.
    fleet.get("w2").ok(&["scale", "-d", "spread=3"]);

    // A worker leaves: drained (its task moves first), removed, its process exits, and its
    // old certificate is refused.
    let ghost = keep_certificate(&fleet, "w3");
    let out = leave(fleet.get("w3"), &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("w3 left the cluster"),
        "{}",
        stdout(&out)
    );
    wait_for("w3's process to exit", LONG, || {
        exited(fleet.get_mut("w3")).then_some(())
    });
    assert!(!node_roles(fleet.get("w2"))
        .iter()
        .any(|(n, _, _)| n == "w3"));
    let (code, body) = ghost.curl_as(fleet.get("w2"), "GET", "/v1/nodes", "");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("was revoked"), "{body}");
    let again = leave(fleet.get("w3"), &[]);
    assert!(!again.status.success());

    // A manager leaves: m1 is promoted again, then `leave` demotes it, drains it and stops it.
    // The last manager may not leave without --force.
    fleet.get("w2").ok(&["node", "promote", "m1"]);
    assert_eq!(voters(fleet.get("w2")), 2);
    fleet.get("w2").ok(&["scale", "-d", "spread=2"]);
    let m1_manager_cert = keep_certificate(&fleet, "m1");
    let out = leave(fleet.get("m1"), &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("demoted"), "{}", stdout(&out));
    wait_for("m1's process to exit", LONG, || {
        exited(fleet.get_mut("m1")).then_some(())
    });
    assert_eq!(voters(fleet.get("w2")), 1);
    assert!(!node_roles(fleet.get("w2"))
        .iter()
        .any(|(n, _, _)| n == "m1"));
    let out = leave(fleet.get("w2"), &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("last manager"), "{}", stderr(&out));
    // Agent servers refuse the removed manager's certificate too (in the handshake), while a
    // live manager's is admitted.
    let w1_agent = fleet.get("w2").json(&["node", "inspect", "w1"])["agent_addr"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(w1_agent.starts_with("https://"), "w1 agent at {w1_agent:?}");
    let probe = format!("{w1_agent}/tasks/nosuch/stats");
    let (code, body) = curl(Some(fleet.get("w2")), &[], &probe);
    assert_eq!(code, 404, "a manager certificate was not admitted: {body}");
    wait_for(
        "w1's agent server to refuse m1's revoked certificate",
        LONG,
        || {
            let (code, _) = curl(Some(&m1_manager_cert), &[], &probe);
            (code == 0).then_some(())
        },
    );
    // CA root rotation: every node renews onto the new root, the old one is dropped, the
    // cluster keeps working, and a node joins with the new token (the old one names the old
    // root and is refused).
    let old_root = std::fs::read_to_string(fleet.get("w2").pki("ca.crt")).expect("ca.crt");
    let rotated = fleet.get("w2").ok(&["ca", "rotate", "--timeout", "60s"]);
    assert!(rotated.contains("rotation completed"), "{rotated}");
    let new_token = rotated
        .lines()
        .find_map(|l| l.strip_prefix("new worker join token:"))
        .expect("new worker token")
        .trim()
        .to_string();
    let new_root = std::fs::read_to_string(fleet.get("w2").pki("ca.crt")).expect("ca.crt");
    assert_ne!(old_root, new_root);
    for node in ["w1", "w2"] {
        wait_for(&format!("{node} to trust only the new root"), LONG, || {
            let trust = std::fs::read_to_string(fleet.get(node).pki("trust.pem")).ok()?;
            (trust.trim() == new_root.trim()).then_some(())
        });
    }
    assert!(fleet
        .get("w2")
        .ok(&["ca", "status"])
        .contains("no rotation under way"));
    let w2_listen = fleet.get("w2").listen.clone();
    let stale = Command::new(BIN)
        .args([
            "join",
            "--token",
            &worker_token,
            &w2_listen,
            "--node-name",
            "w5",
        ])
        .arg("--data-dir")
        .arg(fleet.dir.path().join("w5-refused"))
        .args(["--listen-addr", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .output()
        .expect("run join");
    assert!(
        !stale.status.success(),
        "a token naming the old root was accepted"
    );
    fleet.add("w4", &["join", "--token", &new_token, &w2_listen], true);
    wait_ready_nodes(
        fleet.get("w2"),
        &[("w1", "worker"), ("w4", "worker"), ("w2", "manager")],
    );
    fleet.get("w2").ok(&["scale", "-d", "spread=3"]);
    // Nothing was lost on the way: every replica runs.
    wait_for("3 spread tasks running", LONG, || {
        let running = fleet
            .get("w2")
            .json(&["ps", "spread"])
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|t| t["status"]["state"] == "running" && t["desired_state"] == "running")
            .count();
        (running == 3).then_some(())
    });
    fleet.get("w2").ok(&["service", "rm", "spread"]);

    // The last manager leaves only with --force, which dissolves the cluster: its tasks stop,
    // its process exits, its store is kept aside and its credentials are gone.
    let out = leave(fleet.get("w2"), &["--force"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    wait_for("w2's process to exit", LONG, || {
        exited(fleet.get_mut("w2")).then_some(())
    });
    let w2 = fleet.get("w2");
    assert!(!w2.pki("node.crt").exists());
    let kept = std::fs::read_dir(&w2.data_dir)
        .expect("w2 data dir")
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("store.dissolved-")
        });
    assert!(kept, "the dissolved cluster's store was not kept");
}

/// Issue 12: an `init` manager serves its own node's mesh metrics at `/metrics`, as `up` does
/// (the manager knows the node whose agent runs in its process).
#[test]
fn an_init_manager_serves_its_mesh_metrics() {
    let mut fleet = Fleet::new();
    fleet.add("m1", &["init", "--mesh-bind", "127.0.0.1"], true);
    let worker_token = join_token(fleet.get("m1"), "worker");
    wait_ready_nodes(fleet.get("m1"), &[("m1", "manager")]);
    // Issue 13: `init` writing to a log says where the join tokens are instead of printing them.
    let log = fleet.get("m1").log();
    assert!(!log.contains(&worker_token), "{}", tail(&log, 20));
    assert!(
        log.contains("flotilla token show worker"),
        "{}",
        tail(&log, 20)
    );
    let api = fleet.get("m1").api.clone().expect("a manager");
    let (host, port) = api.rsplit_once(':').expect("IP:PORT");
    let port: u16 = port.parse().expect("a port");
    // Like every TCP request, a scrape needs the API token.
    let token = std::fs::read_to_string(fleet.get("m1").data_dir.join("api-token"))
        .expect("the manager's api-token");
    let bearer = format!("Authorization: Bearer {}", token.trim());
    let metrics = wait_for("the manager's /metrics", LONG, || {
        let (status, body) = common::http_get_from(host, port, "/metrics", &[&bearer])?;
        assert_ne!(status, 404, "GET /metrics on an init manager: {body}");
        (status == 200).then_some(body)
    });
    assert!(
        metrics.contains("# TYPE flotilla_mesh_requests_total counter"),
        "{metrics}"
    );
}

/// A demo-app service `web` at `version` published on `port` through the meshes, released
/// with `release` (the `x-flotilla` strategy lines).
fn demo_web(port: u16, version: &str, app_args: &str, release: &str) -> String {
    format!(
        r#"services:
  web:
    command: ["sh", "-c", "exec flotilla demo-app --version {version} {app_args}"]
    x-flotilla:
      driver: process
      ports: [{{published: {port}, protocol: http}}]
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

/// Issue 12: releases that observe the meshes work on an `init` + `join` cluster, not only on
/// `up`: the managers' controllers read every node's mesh traffic. An erroring canary is
/// aborted by its analysis at the first step (without the traffic it would pass on its pauses
/// alone), then a blue-green release moves every mesh to green with no failed request.
#[test]
fn canary_analysis_and_blue_green_on_an_init_and_join_cluster() {
    let _turn = load_turn();
    let tag = format!("cr{}x{}", std::process::id(), free_port());
    let _workloads = KillMatching(tag.clone());
    let mut fleet = Fleet::new();
    fleet.add("m1", &["init", "--mesh-bind", "127.0.0.1"], true);
    let m1_listen = fleet.get("m1").listen.clone();
    let token = join_token(fleet.get("m1"), "worker");
    fleet.add(
        "w2",
        &[
            "join",
            "--token",
            &token,
            &m1_listen,
            "--mesh-bind",
            "127.0.0.2",
        ],
        false,
    );
    wait_ready_nodes(fleet.get("m1"), &[("m1", "manager"), ("w2", "worker")]);
    let m1 = fleet.get("m1");
    let port = free_port();
    let meshes = ["127.0.0.1", "127.0.0.2"];
    let serves = |version: &str| {
        meshes
            .iter()
            .all(|ip| (0..5).all(|_| version_via(ip, port).as_deref() == Some(version)))
    };
    let canary =
        "      strategy: canary\n      canary:\n        steps: [{weight: 10, pause: 20s}, \
                  {weight: 50, pause: 20s}]\n        analysis: {interval: 2s}\n";
    let (v1, v2, v3) = (
        format!("v1-{tag}"),
        format!("v2-{tag}"),
        format!("v3-{tag}"),
    );
    let v1_file = write(
        fleet.dir.path(),
        "v1.yaml",
        &demo_web(port, &v1, "", canary),
    );
    m1.ok(&["deploy", "-f", &v1_file, "--timeout", "60s"]);
    wait_for("both meshes to serve v1", LONG, || {
        serves(&v1).then_some(())
    });

    // The erroring canary, under load through the worker's mesh.
    let url = format!("http://127.0.0.2:{port}/");
    let v2_file = write(
        fleet.dir.path(),
        "v2.yaml",
        &demo_web(port, &v2, "--error-rate 0.2", canary),
    );
    let load = start_load(&url);
    std::thread::sleep(Duration::from_secs(1));
    let out = m1.cli(&["deploy", "-f", &v2_file, "--timeout", "120s"]);
    let report = load_report(load);
    let status = m1.json(&["rollout", "status", "web"]);
    assert!(
        !out.status.success(),
        "the erroring canary should fail: {}\n{status:#}\n{report:#}",
        stdout(&out)
    );
    let reason = status["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("canary analysis failed at step 1"),
        "{status:#}"
    );
    // The rollback has ended once only the three v1 tasks are left.
    wait_for("the rollback to v1 to end", LONG, || {
        let phase = m1.json(&["rollout", "status", "web"])["phase"].clone();
        let tasks = m1
            .json(&["ps", "web"])
            .as_array()
            .cloned()
            .unwrap_or_default();
        let v1_only = tasks.len() == 3
            && tasks.iter().all(|t| {
                t["status"]["state"] == "running" && t["spec"].to_string().contains(v1.as_str())
            });
        (matches!(phase.as_str(), Some("succeeded" | "rolled_back")) && v1_only).then_some(())
    });
    wait_for("both meshes to serve v1 again", LONG, || {
        serves(&v1).then_some(())
    });

    // Blue-green under load: the release returns once every node's mesh routes green.
    let bg = "      strategy: blue-green\n      blue_green:\n        scale_down_delay: 1s\n";
    let v3_file = write(fleet.dir.path(), "v3.yaml", &demo_web(port, &v3, "", bg));
    let load = start_load(&url);
    std::thread::sleep(Duration::from_secs(1));
    m1.ok(&["deploy", "-f", &v3_file, "--timeout", "120s"]);
    for ip in meshes {
        for i in 0..20 {
            assert_eq!(
                version_via(ip, port).as_deref(),
                Some(v3.as_str()),
                "request {i} through the mesh on {ip} after the blue-green returned"
            );
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let report = load_report(load);
    assert!(report["sent"].as_u64().unwrap_or(0) >= 200, "{report:#}");
    assert_eq!(report["failed"], 0, "failed requests: {report:#}");
    assert_eq!(m1.json(&["rollout", "status", "web"])["phase"], "succeeded");
    m1.ok(&["service", "rm", "web"]);
}

/// Issue 12 item 5: `up --demo` prints the published URL (through the node's mesh) first,
/// before the replicas' private host ports.
#[test]
fn up_demo_prints_the_published_url_first() {
    let c = common::Cluster::start_with(&["--demo", "--mesh-bind", "127.0.0.9"]);
    let printed = wait_for("up --demo to say where the demo answers", LONG, || {
        let log = c.up_log();
        let (_, after) = log.split_once("demo is ready")?;
        after.contains("try:").then(|| after.to_string())
    });
    let urls: Vec<&str> = printed
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("http://")))
        .collect();
    assert_eq!(
        urls.first().copied(),
        Some("http://127.0.0.9:8080/"),
        "{printed}"
    );
    assert_eq!(
        urls.len(),
        4,
        "the published URL, then 3 replicas: {printed}"
    );
    c.ok(&["service", "rm", "demo"]);
}

/// Issue 21 item 8: a standalone `flotilla agent` following an `up` manager registers without a
/// certificate and is a worker; only the node whose agent runs in the manager's process is a
/// manager.
#[test]
fn a_standalone_agent_is_a_worker() {
    let mut c = common::Cluster::start_with(&["--no-mesh", "--node-name", "main"]);
    c.add_agent_with("side", &["--no-mesh"]);
    let side = c.wait_node("side", "ready");
    assert_eq!(side["role"], "worker", "{side:#}");
    let main = c.wait_node("main", "ready");
    assert_eq!(main["role"], "manager", "{main:#}");
    let inspect = c.ok(&["node", "inspect", "side"]);
    assert!(inspect.contains("Role:          Worker"), "{inspect}");
}

/// Issue 12 item 4: `--task-history N` reaches the controllers through the manager builder:
/// with 1, a crash-looping slot keeps one finished task beside its current one (the default
/// keeps 5).
#[test]
fn task_history_flag_bounds_the_finished_tasks_kept() {
    let c = common::Cluster::start_with(&["--no-mesh", "--task-history", "1"]);
    let file = c.write_file(
        "crash.yaml",
        "services:\n  crash:\n    command: [\"sh\", \"-c\", \"sleep 0.1; exit 3\"]\n    deploy:\n      \
         restart_policy: {condition: any, delay: 100ms}\n",
    );
    c.ok(&["deploy", "-f", file.to_str().expect("utf8"), "--detach"]);
    let tasks = wait_for("the slot's sixth attempt", LONG, || {
        let tasks = c.all_tasks("crash");
        tasks
            .iter()
            .any(|t| t["attempt"].as_u64().unwrap_or(0) >= 5)
            .then_some(tasks)
    });
    // One finished task and the current one; a third while a replacement is being recorded.
    assert!(
        tasks.len() <= 3,
        "{} tasks kept for one slot: {tasks:#?}",
        tasks.len()
    );
    c.ok(&["service", "rm", "crash"]);
}

/// Sends `signal` (`STOP`, `CONT`) to `m`'s process.
fn signal(m: &Member, signal: &str) {
    let pid = m.child.as_ref().expect("running").id().to_string();
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {}", m.name);
}

/// The tasks of `service` as `m` lists them: (id, node, state, pid), sorted.
fn task_table(m: &Member, service: &str) -> Vec<(String, String, String, u64)> {
    let mut v: Vec<_> = m
        .json(&["ps", service])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|t| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            let pid = t["status"]["pid"].as_u64().unwrap_or_default();
            (s(&t["id"]), s(&t["node"]), s(&t["status"]["state"]), pid)
        })
        .collect();
    v.sort();
    v
}

/// Issue #14 item 5: a control-plane outage must not become a node-down verdict or a restart
/// storm. Two of three managers are frozen (`SIGSTOP`: no heartbeats, no raft) for 20 s with
/// tasks running; once they resume and quorum is back, the leader gives every node a full
/// grace period, so no node is ever judged down and no task is lost or replaced.
#[test]
fn a_quorum_outage_replaces_no_task_and_downs_no_node() {
    let mut fleet = Fleet::new();
    three_managers(&mut fleet);
    let marker = deploy_sleepers(&fleet, "m1", "steady", 3, 90000);
    let _workloads = KillMatching(format!("sleep {marker}"));
    let m1 = fleet.get("m1");
    let before = wait_for("3 running tasks with pids", LONG, || {
        let t = task_table(m1, "steady");
        (t.len() == 3 && t.iter().all(|(_, _, s, pid)| s == "running" && *pid > 0)).then_some(t)
    });

    signal(fleet.get("m2"), "STOP");
    signal(fleet.get("m3"), "STOP");
    let probe = ["node", "update", "--label-add", "outage=1", "m1"];
    assert_quorum_lost(fleet.get("m1"), &probe);
    std::thread::sleep(Duration::from_secs(20));
    signal(fleet.get("m2"), "CONT");
    signal(fleet.get("m3"), "CONT");
    let m1 = fleet.get("m1");
    wait_for("quorum back (a write through m1 applies)", LONG, || {
        m1.cli(&probe).status.success().then_some(())
    });
    // Heartbeats were stale by more than the 4 s grace when quorum came back; wait out two
    // graces from then, the window in which a stale verdict would land.
    std::thread::sleep(Duration::from_secs(8));

    let roles = node_roles(m1);
    assert!(
        roles.iter().all(|(_, _, state)| state == "ready"),
        "{roles:?}"
    );
    let events = m1.ok(&["events", "-o", "json"]);
    let downs: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("\"kind\":\"node\"") && l.contains(" down"))
        .collect();
    assert!(downs.is_empty(), "nodes were judged down: {downs:?}");
    assert_eq!(task_table(m1, "steady"), before, "no task lost or replaced");
    assert_eq!(processes_matching(&format!("^sleep {marker}$")), 3);
}
