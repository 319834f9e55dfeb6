//! A test harness in the manner of Nomad's scheduler `Harness` (feature `test-support`): a real
//! store (redb + a single-voter raft) under a fake clock. Passes run the real
//! [`reconcile_with_traffic`] and write their batches the way the runner does, deploys and
//! restarts build their writes with [`crate::deploy`] like the API, and a simulated agent
//! reports task states through the ops real agents use. Everything is applied by the store's
//! own state machine, so tests see exactly what the cluster would.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: broken setup fails loudly

use crate::deploy::{deploy_ops, restart_rollout};
use crate::reconcile::{reconcile_with_traffic, ControllerConfig, Plan};
use crate::rollout::TrafficView;
use flotilla_store::{ClusterState, Command, CommandResult, Expect, Op, Store, StoreConfig};
use flotilla_types::{
    DesiredState, Event, Health, Node, ServiceSpec, Task, TaskState, TaskStatus, Timestamp,
};
use std::time::Duration;
use tempfile::TempDir;

/// Where the fake clock starts.
pub const T0: Timestamp = 1_700_000_000_000;

pub struct Harness {
    pub store: Store,
    _dir: TempDir,
    /// The fake clock: every write, pass and report happens at this time.
    pub now: Timestamp,
    pub cfg: ControllerConfig,
    /// What the meshes report to releases that wait on traffic.
    pub traffic: TrafficView,
}

/// How the simulated agent answers.
#[derive(Debug, Clone, Copy)]
pub struct AgentBehaviour {
    /// Tasks with a health check report healthy once running (else they stay `starting`).
    pub healthy: bool,
    /// Tasks of this revision fail to start.
    pub fail_revision: Option<u64>,
}

impl Default for AgentBehaviour {
    fn default() -> Self {
        AgentBehaviour {
            healthy: true,
            fail_revision: None,
        }
    }
}

impl Harness {
    /// An empty cluster. Node heartbeats are not simulated, so the grace is a day unless a
    /// test sets `cfg.node_grace`.
    pub async fn new() -> Harness {
        let dir = TempDir::new().unwrap();
        let store = Store::open(StoreConfig {
            data_dir: dir.path().join("data"),
            node_id: 1,
            advertise_addr: "127.0.0.1:1".into(),
        })
        .await
        .unwrap();
        store.bootstrap_single().await.unwrap();
        Harness {
            store,
            _dir: dir,
            now: T0,
            cfg: ControllerConfig {
                node_grace: Duration::from_secs(86_400),
                ..ControllerConfig::default()
            },
            traffic: TrafficView::new(),
        }
    }

    /// A cluster of `nodes`, which last sent a heartbeat now.
    pub async fn with_nodes(nodes: impl IntoIterator<Item = Node>) -> Harness {
        let h = Harness::new().await;
        for mut node in nodes {
            node.last_heartbeat = h.now;
            h.put_node(node).await;
        }
        h
    }

    pub async fn write(&self, ops: Vec<Op>) -> CommandResult {
        self.store
            .write(Command { ops, at: self.now })
            .await
            .unwrap()
    }

    /// Writes `ops`, which must apply.
    pub async fn must_write(&self, ops: Vec<Op>) -> u64 {
        match self.write(ops).await {
            CommandResult::Applied { revision } => revision,
            other => panic!("write refused: {other:?}"),
        }
    }

    pub async fn put_node(&self, node: Node) {
        let expect = self
            .store
            .read(|s| s.nodes.get(&node.id).map(|n| n.meta.version))
            .map_or(Expect::Absent, Expect::Version);
        self.must_write(vec![Op::PutNode { node, expect }]).await;
    }

    /// The node's heartbeat, as the API writes it.
    pub async fn heartbeat(&self, node: &str) {
        self.must_write(vec![Op::NodeHeartbeat {
            id: node.to_string(),
            at: self.now,
        }])
        .await;
    }

    pub fn state(&self) -> ClusterState {
        self.store.read(Clone::clone)
    }

    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        self.store.read(f)
    }

    /// Every event so far, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.store.events(0, usize::MAX).unwrap()
    }

    pub fn advance(&mut self, ms: i64) {
        self.now += ms;
    }

    /// Deploys `specs` as the API's `POST /v1/deploy` does.
    pub async fn deploy(&self, specs: &[ServiceSpec]) {
        let (_, ops) = self.read(|s| deploy_ops(s, specs, "test", self.now));
        if !ops.is_empty() {
            self.must_write(ops).await;
        }
    }

    /// `flotilla service restart`, as the API writes it.
    pub async fn restart(&self, service: &str) {
        let op = self.read(|s| {
            let svc = s.services.get(service).expect("service exists");
            restart_rollout(svc, s.rollouts.get(service), self.now).1
        });
        self.must_write(vec![op]).await;
    }

    /// The plan of one controller pass, not written.
    pub fn plan(&self) -> Plan {
        self.read(|s| reconcile_with_traffic(s, self.now, &self.cfg, &self.traffic))
    }

    /// One controller pass, its batches written like the runner writes them (each on its
    /// own; a refused batch is left for the next pass). Returns the results in order.
    pub async fn pass(&self) -> Vec<CommandResult> {
        self.pass_with(&self.traffic).await
    }

    /// [`Harness::pass`] with `traffic` as what the meshes report.
    pub async fn pass_with(&self, traffic: &TrafficView) -> Vec<CommandResult> {
        let plan = self.read(|s| reconcile_with_traffic(s, self.now, &self.cfg, traffic));
        let mut results = Vec::new();
        for batch in plan.batches {
            results.push(self.write(batch).await);
        }
        results
    }

    /// An agent status report for task `id`.
    pub async fn report(&self, id: &str, status: TaskStatus) -> CommandResult {
        let node = self
            .read(|s| s.tasks.get(id).and_then(|t| t.node.clone()))
            .expect("the task is assigned");
        self.write(vec![Op::SetTaskStatus {
            id: id.to_string(),
            node,
            status,
        }])
        .await
    }

    /// The workload of task `id` dies (`kill -9`): the agent reports it failed.
    pub async fn kill(&self, id: &str) {
        let mut status = TaskStatus::new(TaskState::Failed, self.now, "killed by signal 9");
        status.exit_code = Some(137);
        self.report(id, status).await;
    }

    /// One step of every node's agent, as the real one moves: an assigned task starts
    /// (`starting`) and is `running` by the next step (unless its `not_before` is still
    /// ahead); a task told to stop reports `stopping`, then `exited` by the next step.
    pub async fn agent(&self, how: AgentBehaviour) {
        let state = self.state();
        for t in state.tasks.values() {
            if t.node.is_none() {
                continue;
            }
            if let Some(status) = self.agent_step(t, how) {
                self.report(&t.id, status).await;
            }
        }
    }

    fn agent_step(&self, t: &Task, how: AgentBehaviour) -> Option<TaskStatus> {
        let at = |state, message: &str| Some(TaskStatus::new(state, self.now, message));
        if t.desired_state == DesiredState::Shutdown {
            return match t.status.state {
                TaskState::Pending | TaskState::Assigned => at(TaskState::Exited, "not started"),
                TaskState::Starting | TaskState::Running => at(TaskState::Stopping, "stopping"),
                TaskState::Stopping => at(TaskState::Exited, "stopped"),
                _ => None,
            };
        }
        match t.status.state {
            TaskState::Assigned if t.not_before.is_none_or(|nb| nb <= self.now) => {
                if how.fail_revision == Some(t.revision) {
                    return at(TaskState::Failed, "exit code 1");
                }
                at(TaskState::Starting, "")
            }
            TaskState::Starting => {
                let mut st = TaskStatus::new(TaskState::Running, self.now, "");
                if t.spec.healthcheck.is_some() {
                    st.health = if how.healthy {
                        Health::Healthy
                    } else {
                        Health::Starting
                    };
                }
                Some(st)
            }
            _ => None,
        }
    }

    /// Steps the cluster `steps` times, `step_ms` apart: a pass, then the agents.
    pub async fn run(&mut self, steps: usize, step_ms: i64, how: AgentBehaviour) {
        for _ in 0..steps {
            self.pass().await;
            self.agent(how).await;
            self.advance(step_ms);
        }
    }

    /// Live tasks (desired running, not finished) of `service`.
    pub fn live(&self, service: &str) -> Vec<Task> {
        self.read(|s| {
            s.tasks_of(service)
                .filter(|t| {
                    t.desired_state == DesiredState::Running && !t.status.state.is_terminal()
                })
                .cloned()
                .collect()
        })
    }

    /// Every task of `service`, finished ones included.
    pub fn tasks(&self, service: &str) -> Vec<Task> {
        self.read(|s| s.tasks_of(service).cloned().collect())
    }
}

/// From the tasks' recorded histories: the times at which the number of `running` tasks
/// changed, with that number. Transitions at the same instant are applied together.
pub fn running_over_time(tasks: &[Task]) -> Vec<(Timestamp, usize)> {
    let mut changes: Vec<(Timestamp, i64)> = Vec::new();
    for t in tasks {
        let mut running = false;
        for h in &t.history {
            let now_running = h.state == TaskState::Running;
            if now_running != running {
                changes.push((h.at, if now_running { 1 } else { -1 }));
                running = now_running;
            }
        }
    }
    changes.sort();
    let mut out: Vec<(Timestamp, usize)> = Vec::new();
    let mut count = 0i64;
    for (at, delta) in changes {
        count += delta;
        let n = usize::try_from(count.max(0)).unwrap_or(0);
        match out.last_mut() {
            Some(last) if last.0 == at => last.1 = n,
            _ => out.push((at, n)),
        }
    }
    out
}
