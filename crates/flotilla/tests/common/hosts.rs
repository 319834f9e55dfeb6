//! Multi-host test harness: the project's own `flotilla` binary in Docker containers on a private
//! Docker network, one container per host, each with its own IP. Managers start with
//! `flotilla init` / `flotilla join --token … --advertise-addr <container IP>`, workers with
//! `flotilla join --token …`. Faults are real: `docker kill`, `docker start`,
//! `docker network disconnect|connect`.
//!
//! The image is built locally from this test binary's `flotilla` and busybox
//! (`flotilla demo-image --tag …`, i.e. `flotilla_agent::docker_image::ImageRecipe::demo`):
//! there is no registry. Everything a `Hosts` creates (containers, network, image, shared dir)
//! carries the run's unique name and is removed on drop, also when the test panics.
//!
//! Each container runs `/bin/sh` as PID 1 with a loop that (re)starts the node, so an agent or
//! manager process can be killed and restarted *inside* its host while its workloads (children
//! of their shims, re-parented to PID 1) keep running, as on a real machine with systemd.
//! Workers run `--privileged` so the process driver can create cgroups for its tasks.
#![allow(dead_code)]

use crate::common::{sh, stderr, stdout, tail, wait_for, BIN};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Port of the mTLS cluster API in every container.
pub const CLUSTER_PORT: u16 = 7451;

/// Docker clusters are heavy (5 debug-build nodes); one at a time per test binary keeps them
/// from starving each other on a small CI machine.
pub static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

static NEXT: AtomicU32 = AtomicU32::new(0);

/// True when a Docker Engine answers. Without one, prints a visible SKIP and returns false, or
/// panics when `FLOTILLA_REQUIRE_DOCKER=1`.
pub fn docker_available(test: &str) -> bool {
    let out = sh("docker version --format '{{.Server.Version}}' 2>&1");
    if out.status.success() {
        return true;
    }
    let why = format!("`docker version` failed: {}", stdout(&out).trim());
    assert!(
        std::env::var("FLOTILLA_REQUIRE_DOCKER").as_deref() != Ok("1"),
        "FLOTILLA_REQUIRE_DOCKER=1 but there is no Docker Engine: {why}"
    );
    eprintln!("SKIP {test}: no Docker Engine: {why}");
    false
}

/// Runs `docker ARGS`, returning its output.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker")
}

/// Runs `docker ARGS` that must succeed; returns trimmed stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out).trim().to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Manager,
    Worker,
}

/// One container = one host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name, also the flotilla node name (`m1`, `w2`).
    pub name: String,
    /// Docker container name (unique per run).
    pub container: String,
    pub ip: String,
    pub role: Role,
}

impl Host {
    pub fn cluster_addr(&self) -> String {
        format!("{}:{CLUSTER_PORT}", self.ip)
    }
}

/// A cluster of containers on a private network.
pub struct Hosts {
    /// Unique prefix of every Docker object of this run.
    pub run: String,
    pub network: String,
    pub image: String,
    /// The network's /24 prefix, e.g. `10.213.7`.
    subnet: String,
    /// Host dir mounted at `/shared` in every container (compose files).
    pub shared: tempfile::TempDir,
    pub hosts: Vec<Host>,
    pub worker_token: String,
    pub manager_token: String,
    /// Containers currently cut off from the network.
    partitioned: Vec<String>,
    next_ip: u8,
}

impl Hosts {
    /// Builds the image, creates the network and starts `managers` managers and `workers`
    /// workers, waiting until every node is ready.
    pub fn start(managers: usize, workers: usize) -> Hosts {
        assert!(managers >= 1);
        let run = format!(
            "flt-mh-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let shared = tempfile::Builder::new()
            .prefix("flt-mh")
            .tempdir()
            .expect("tempdir");
        let mut h = Hosts {
            network: run.clone(),
            image: format!("{run}:test"),
            run,
            subnet: String::new(),
            shared,
            hosts: Vec::new(),
            worker_token: String::new(),
            manager_token: String::new(),
            partitioned: Vec::new(),
            next_ip: 10,
        };
        // From here on, Drop removes whatever was created.
        let out = Command::new(BIN)
            .args(["demo-image", "--tag", &h.image])
            .output()
            .expect("run flotilla demo-image");
        assert!(
            out.status.success(),
            "building the test image: {}",
            stderr(&out)
        );
        h.create_network();
        h.add_node("m1", Role::Manager);
        let tokens = wait_for(
            "m1 to print its join tokens",
            Duration::from_secs(60),
            || {
                let w = h.cli_output("m1", &["token", "show", "worker"]);
                let m = h.cli_output("m1", &["token", "show", "manager"]);
                (w.status.success() && m.status.success())
                    .then(|| (stdout(&w).trim().to_string(), stdout(&m).trim().to_string()))
            },
        );
        (h.worker_token, h.manager_token) = tokens;
        for i in 2..=managers {
            h.add_node(&format!("m{i}"), Role::Manager);
            // Membership changes go one at a time: wait until this manager is a voter that
            // knows the leader before adding the next.
            h.wait_leader_known(&format!("m{i}"));
        }
        for i in 1..=workers {
            h.add_node(&format!("w{i}"), Role::Worker);
        }
        for host in h.hosts.clone() {
            h.wait_node_state(&host.name, "ready");
        }
        h
    }

    /// A free /24 in 10.200.0.0/13; retried when it overlaps a network of someone else.
    fn create_network(&mut self) {
        let seed = std::process::id() as usize * 31 + NEXT.load(Ordering::SeqCst) as usize * 7;
        for attempt in 0..40 {
            let n = seed + attempt * 13;
            let subnet = format!("10.{}.{}", 200 + (n / 256) % 8, n % 256);
            let out = docker(&[
                "network",
                "create",
                "--driver",
                "bridge",
                "--subnet",
                &format!("{subnet}.0/24"),
                "--label",
                "io.flotilla.test=multihost",
                &self.network,
            ]);
            if out.status.success() {
                self.subnet = subnet;
                return;
            }
            if !stderr(&out).contains("overlap") {
                panic!("docker network create: {}", stderr(&out));
            }
        }
        panic!("no free /24 for the test network");
    }

    /// The command line (inside the container) that starts this node; the shell loop
    /// restarts it whenever the process exits, like a service manager would.
    fn node_command(&self, host: &Host, token: Option<&str>) -> String {
        let common = format!(
            "--data-dir /data --node-name {} --node-grace 3s --listen-addr 0.0.0.0:{CLUSTER_PORT}",
            host.name
        );
        let cmd = match (host.name.as_str(), host.role) {
            ("m1", _) => format!(
                "/flotilla init {common} --advertise-addr {}",
                host.cluster_addr()
            ),
            (_, Role::Manager) => format!(
                "FLOTILLA_JOIN_TOKEN={} /flotilla join {} {common} --advertise-addr {}",
                token.unwrap_or(&self.manager_token),
                self.host("m1").cluster_addr(),
                host.cluster_addr()
            ),
            (_, Role::Worker) => format!(
                "FLOTILLA_JOIN_TOKEN={} /flotilla join {} {common} --advertise-addr {}",
                token.unwrap_or(&self.worker_token),
                self.host("m1").cluster_addr(),
                host.cluster_addr()
            ),
        };
        format!("while :; do {cmd}; echo \"node exited: $?\"; sleep 0.3; done")
    }

    fn next_ip(&mut self) -> String {
        self.next_ip += 1;
        format!("{}.{}", self.subnet, self.next_ip)
    }

    /// Starts a node's container; the node (re)starts inside it in a loop.
    pub fn add_node(&mut self, name: &str, role: Role) -> Host {
        let host = Host {
            name: name.to_string(),
            container: format!("{}-{name}", self.run),
            ip: self.next_ip(),
            role,
        };
        self.hosts.push(host.clone());
        let command = self.node_command(&host, None);
        self.run_container(&host, &command);
        host
    }

    /// Starts a container on the network running `command` with `/bin/sh -c`.
    fn run_container(&self, host: &Host, command: &str) {
        let shared = format!("{}:/shared", self.shared.path().display());
        docker_ok(&[
            "run",
            "-d",
            "--name",
            &host.container,
            "--hostname",
            &host.name,
            "--network",
            &self.network,
            "--ip",
            &host.ip,
            "--label",
            "io.flotilla.test=multihost",
            "-v",
            &shared,
            "-e",
            "FLOTILLA_LOG=info,openraft=warn",
            "--entrypoint",
            "/bin/sh",
            &self.image,
            "-c",
            command,
        ]);
    }

    /// Runs `join` with `token` from a fresh container (which is removed again) and returns
    /// its output; for testing refused joins.
    pub fn try_join(&mut self, name: &str, token: &str) -> (bool, String) {
        let host = Host {
            name: name.to_string(),
            container: format!("{}-{name}", self.run),
            ip: self.next_ip(),
            role: Role::Worker,
        };
        let cmd = format!(
            "FLOTILLA_JOIN_TOKEN={token} timeout 60 /flotilla join {} --data-dir /data \
             --node-name {name}",
            self.host("m1").cluster_addr()
        );
        self.hosts.push(host.clone());
        self.run_container(&host, &cmd);
        let code = docker_ok(&["wait", &host.container]);
        let logs = self.logs(name);
        docker(&["rm", "-f", &host.container]);
        self.hosts.retain(|h| h.name != name);
        (code == "0", logs)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    pub fn managers(&self) -> Vec<Host> {
        self.hosts
            .iter()
            .filter(|h| h.role == Role::Manager)
            .cloned()
            .collect()
    }

    /// What other threads need to run commands on the hosts while this `Hosts` injects
    /// faults.
    pub fn view(&self) -> Exec {
        Exec {
            containers: self
                .hosts
                .iter()
                .map(|h| (h.name.clone(), h.container.clone()))
                .collect(),
            shared: self.shared.path().to_path_buf(),
        }
    }

    /// `docker exec HOST ARGS`.
    pub fn exec(&self, name: &str, args: &[&str]) -> Output {
        self.view().exec(name, args)
    }

    /// The flotilla CLI run inside `name` against its loopback API (see [`Exec::cli_output`]).
    pub fn cli_output(&self, name: &str, args: &[&str]) -> Output {
        self.view().cli_output(name, args)
    }

    /// A CLI call that must succeed; returns stdout.
    pub fn cli(&self, name: &str, args: &[&str]) -> String {
        let out = self.cli_output(name, args);
        assert!(
            out.status.success(),
            "flotilla {args:?} on {name} failed: {}{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    pub fn json(&self, name: &str, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.cli(name, &a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON ({e}): {out}"))
    }

    /// `GET /v1/status` of a manager's loopback API: `(this raft id, leader raft id)`.
    pub fn status(&self, name: &str) -> Option<(u64, Option<u64>)> {
        let v = self.view().api_get(name, &["/v1/status"]).pop()??;
        Some((v["node_id"].as_u64()?, v["leader"].as_u64()))
    }

    fn wait_leader_known(&self, name: &str) {
        wait_for(
            &format!("{name} to know the raft leader"),
            Duration::from_secs(60),
            || self.status(name)?.1,
        );
    }

    /// The host whose manager is the raft leader, as all reachable managers agree.
    pub fn leader(&self) -> Option<Host> {
        let ids: BTreeMap<u64, Host> = self
            .managers()
            .into_iter()
            .filter(|h| !self.partitioned.contains(&h.container))
            .filter_map(|h| Some((self.status(&h.name)?.0, h)))
            .collect();
        let leaders: Vec<u64> = ids
            .values()
            .filter_map(|h| self.status(&h.name)?.1)
            .collect();
        let first = *leaders.first()?;
        if leaders.iter().any(|l| *l != first) {
            return None;
        }
        ids.get(&first).cloned()
    }

    pub fn wait_leader(&self) -> Host {
        wait_for("a raft leader", Duration::from_secs(60), || self.leader())
    }

    /// Waits until `node ls` (asked on any answering manager) shows `name` in `state`.
    pub fn wait_node_state(&self, name: &str, state: &str) -> Value {
        wait_for(
            &format!("node {name} to be {state}"),
            Duration::from_secs(90),
            || {
                let nodes = self.any_manager_json(&["node", "ls"])?;
                nodes
                    .as_array()?
                    .iter()
                    .find(|n| n["id"] == name && n["state"] == state)
                    .cloned()
            },
        )
    }

    /// A JSON CLI answer from the first manager that gives one.
    pub fn any_manager_json(&self, args: &[&str]) -> Option<Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        self.managers()
            .iter()
            .filter(|h| !self.partitioned.contains(&h.container))
            .find_map(|h| {
                let out = self.cli_output(&h.name, &a);
                out.status
                    .success()
                    .then(|| serde_json::from_slice(&out.stdout).ok())
                    .flatten()
            })
    }

    /// Writes a compose file into the shared dir; returns its path inside the containers.
    pub fn write_shared(&self, file: &str, yaml: &str) -> String {
        self.view().write_shared(file, yaml)
    }

    /// SIGKILLs the whole host (every process in the container).
    pub fn kill(&self, name: &str) {
        docker_ok(&["kill", &self.host(name).container]);
    }

    /// Starts a killed host again; its node restarts from its data dir.
    pub fn start_host(&self, name: &str) {
        docker_ok(&["start", &self.host(name).container]);
    }

    /// Cuts `name` off the network (its only interface besides loopback).
    pub fn partition(&mut self, name: &str) {
        let c = self.host(name).container.clone();
        docker_ok(&["network", "disconnect", "-f", &self.network, &c]);
        self.partitioned.push(c);
    }

    /// Reconnects a partitioned host with its old IP.
    pub fn heal(&mut self, name: &str) {
        let h = self.host(name).clone();
        docker_ok(&[
            "network",
            "connect",
            "--ip",
            &h.ip,
            &self.network,
            &h.container,
        ]);
        self.partitioned.retain(|c| *c != h.container);
    }

    pub fn is_partitioned(&self, name: &str) -> bool {
        self.partitioned.contains(&self.host(name).container)
    }

    /// Kills the flotilla node process inside its host (not the host): the shell loop starts it
    /// again, as a service manager restarting a crashed agent would.
    pub fn restart_node_process(&self, name: &str) {
        // The node is the `flotilla init|join` child of PID 1; shims and workloads run
        // `flotilla shim …` or their own programs and are left alone.
        let out = self.exec(
            name,
            &[
                "sh",
                "-c",
                "for p in /proc/[0-9]*; do c=$(tr '\\000' ' ' < $p/cmdline 2>/dev/null); \
                 case \"$c\" in '/flotilla init '*|'/flotilla join '*) kill -9 ${p#/proc/};; esac; done",
            ],
        );
        assert!(
            out.status.success(),
            "killing the node process: {}",
            stderr(&out)
        );
    }

    pub fn logs(&self, name: &str) -> String {
        let out = docker(&["logs", &self.host(name).container]);
        format!("{}{}", stdout(&out), stderr(&out))
    }

    /// Waits until `service` has exactly `n` live tasks, all running and healthy (or without a
    /// check), as seen from any manager; returns them.
    pub fn wait_ready(&self, service: &str, n: usize) -> Vec<Value> {
        wait_for(
            &format!("{n} ready tasks of {service}"),
            Duration::from_secs(90),
            || {
                let tasks = self.any_manager_json(&["ps", service])?;
                let tasks = tasks.as_array()?.clone();
                let ready = tasks.iter().filter(|t| is_ready(t)).count();
                (tasks.len() == n && ready == n).then_some(tasks)
            },
        )
    }
}

/// Runs commands on the hosts by container name; cheap to clone into writer threads.
#[derive(Debug, Clone)]
pub struct Exec {
    containers: BTreeMap<String, String>,
    shared: std::path::PathBuf,
}

impl Exec {
    /// `docker exec HOST ARGS`.
    pub fn exec(&self, name: &str, args: &[&str]) -> Output {
        let container = self
            .containers
            .get(name)
            .unwrap_or_else(|| panic!("no host {name}"));
        let mut a = vec!["exec", container.as_str()];
        a.extend_from_slice(args);
        docker(&a)
    }

    /// The flotilla CLI run inside `name` as root with no address: it uses the manager's Unix
    /// socket, /run/flotilla/flotilla.sock. Bounded by `timeout 20` so a CLI stuck on a cut-off
    /// host cannot hang the test.
    pub fn cli_output(&self, name: &str, args: &[&str]) -> Output {
        let mut a = vec!["timeout", "20", "/flotilla"];
        a.extend_from_slice(args);
        self.exec(name, &a)
    }

    /// `GET` of each of `paths` on the loopback API of `name` with its API token, in one
    /// `docker exec`: the JSON body of each 2xx answer. (busybox's static wget crashes in this image; raw HTTP/1.0
    /// through nc works.)
    pub fn api_get(&self, name: &str, paths: &[&str]) -> Vec<Option<Value>> {
        let script: String = paths
            .iter()
            .map(|p| {
                format!(
                    "printf 'GET {p} HTTP/1.0\\r\\nAuthorization: Bearer %s\\r\\n\\r\\n' \"$(cat /data/api-token)\" | timeout 3 nc 127.0.0.1 7450; echo; echo @@END@@;"
                )
            })
            .collect();
        let out = self.exec(name, &["sh", "-c", &script]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut answers: Vec<Option<Value>> = text
            .split("@@END@@")
            .take(paths.len())
            .map(|part| {
                let (head, body) = part.split_once("\r\n\r\n")?;
                let ok = head.split_whitespace().nth(1)?.starts_with('2');
                ok.then(|| serde_json::from_str(body.trim()).ok()).flatten()
            })
            .collect();
        answers.resize(paths.len(), None);
        answers
    }

    /// Writes a file into the shared dir; returns its path inside the containers.
    pub fn write_shared(&self, file: &str, text: &str) -> String {
        std::fs::write(self.shared.join(file), text).expect("write shared file");
        format!("/shared/{file}")
    }
}

/// Running, and healthy if the task has a check.
pub fn is_ready(t: &Value) -> bool {
    t["status"]["state"] == "running"
        && (t["spec"]["healthcheck"].is_null() || t["status"]["health"] == "healthy")
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // FLOTILLA_MH_LOGS=1 prints every host's log also when the test passes.
        if std::thread::panicking() || std::env::var("FLOTILLA_MH_LOGS").as_deref() == Ok("1") {
            for h in &self.hosts {
                eprintln!(
                    "---- host {} ({}) log ----\n{}",
                    h.name,
                    h.ip,
                    tail(&self.logs(&h.name), 60)
                );
            }
        }
        let names: Vec<String> = self.hosts.iter().map(|h| h.container.clone()).collect();
        if !names.is_empty() {
            let mut a = vec!["rm", "-f", "-v"];
            a.extend(names.iter().map(String::as_str));
            docker(&a);
        }
        // Anything of this run that a failed step left behind, e.g. a `try_join` container.
        sh(&format!(
            "docker ps -aq --filter name={} | xargs -r docker rm -f -v >/dev/null 2>&1",
            self.run
        ));
        docker(&["network", "rm", &self.network]);
        docker(&["image", "rm", "-f", &self.image]);
    }
}
