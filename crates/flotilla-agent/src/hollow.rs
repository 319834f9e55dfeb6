//! Hollow nodes: **for scale tests and benchmarks only.** A [`HollowFleet`] registers N
//! simulated nodes with a manager and plays their agents: it follows the task watch stream like
//! real agents do, "runs" every task assigned to its nodes with the [`SimDriver`], and reports
//! status through the real API (per-node bulk reports). Like Kubernetes' kubemark, it lets the
//! whole control plane — API, store, controllers, scheduler — be driven at scale on one machine.

use crate::driver::Driver;
use crate::sim::SimDriver;
use flotilla_client::{Client, ClientError, Mirror};
use flotilla_types::api::{BulkStatusReport, NodeRegistration, TaskStatusUpdate, WatchMessage};
use flotilla_types::{now_ms, DesiredState, DriverKind, NodeResources, TaskState, TaskStatus};
use futures::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Zones the generated nodes are spread over.
const ZONES: usize = 8;
/// Most reports gathered into one batch cycle. Each node's reports in a cycle go out as one
/// request (one raft command): with 20,000, a 10,000-node fleet sent every node's ten reports
/// over five cycles, 50,000 commands for 100,000 tasks.
const BATCH: usize = 200_000;
/// Concurrent requests to the manager.
const CONCURRENCY: usize = 64;
/// How long a report round waits for more reports after the first: every request is one raft
/// command (an fsync of its own when commands trickle in), so a node's reports should go
/// together rather than one or two at a time.
const GATHER: Duration = Duration::from_millis(20);

/// Simulated nodes and their agent. Not for production use.
pub struct HollowFleet {
    client: Client,
    nodes: Vec<NodeRegistration>,
    driver: Arc<SimDriver>,
}

/// What the fleet has seen, for progress reporting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetProgress {
    /// Tasks the fleet runs and has reported running.
    pub running: usize,
    /// Tasks assigned to the fleet's nodes that are meant to run.
    pub assigned: usize,
}

impl HollowFleet {
    /// `count` nodes named `hollow-00000`…, spread over zones, each offering 16 cpus and 64GiB.
    pub fn new(client: Client, count: usize) -> Self {
        let nodes = (0..count)
            .map(|i| NodeRegistration {
                id: format!("hollow-{i:05}"),
                hostname: format!("hollow-{i:05}.sim"),
                resources: NodeResources {
                    cpu_millis: 16_000,
                    memory_bytes: 64 << 30,
                },
                drivers: vec![DriverKind::Sim],
                labels: BTreeMap::from([
                    ("zone".to_string(), format!("zone-{}", i % ZONES)),
                    ("rack".to_string(), format!("rack-{}", i % (ZONES * 8))),
                ]),
                engine_labels: BTreeMap::new(),
                images: Vec::new(),
                agent_addr: None,
                advertise_ip: None,
                port_conflicts: Vec::new(),
                agent_secret: None,
            })
            .collect();
        HollowFleet {
            client,
            nodes,
            driver: Arc::new(SimDriver::new()),
        }
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Registers every node with the manager.
    pub async fn register(&self) -> Result<(), ClientError> {
        futures::stream::iter(self.nodes.iter().map(|n| self.client.register_node(n)))
            .buffer_unordered(CONCURRENCY)
            .try_for_each(|_| async { Ok(()) })
            .await
    }

    /// Plays the nodes' agents until `shutdown`, publishing progress after every change.
    pub async fn run(
        &self,
        progress: watch::Sender<FleetProgress>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ClientError> {
        let ours: HashSet<&str> = self.nodes.iter().map(|n| n.id.as_str()).collect();
        let (report_tx, report_rx) = mpsc::unbounded_channel::<(String, TaskStatusUpdate)>();
        let reporter = tokio::spawn(report_loop(
            self.client.clone(),
            report_rx,
            shutdown.clone(),
        ));
        let mut stream = self.client.watch(Some("task"), None).await?;
        let mut mirror = Mirror::default();
        // Tasks started here and whether their `running` report went out.
        let mut started: HashMap<String, bool> = HashMap::new();
        // Progress is kept up to date per changed task: recounting the whole mirror after every
        // message is quadratic at 100k tasks.
        let mut assigned: HashSet<String> = HashSet::new();
        let mut running = 0usize;
        loop {
            let msg = tokio::select! {
                m = stream.next() => match m {
                    Some(m) => m?,
                    None => break,
                },
                _ = shutdown.changed() => break,
            };
            let changed: Vec<String> = match &msg {
                WatchMessage::Snapshot { tasks, .. } => {
                    tasks.iter().map(|t| t.id.clone()).collect()
                }
                WatchMessage::Change { changes, .. } => changes
                    .iter()
                    .filter_map(|c| match c {
                        flotilla_types::api::WatchChange::Task { id, .. } => Some(id.clone()),
                        _ => None,
                    })
                    .collect(),
                WatchMessage::Heartbeat { .. } => Vec::new(),
            };
            if matches!(msg, WatchMessage::Snapshot { .. }) {
                // A snapshot lists every task there is; recount from it.
                assigned.clear();
            }
            mirror.apply(msg);
            for id in changed {
                let Some(task) = mirror.tasks.get(&id) else {
                    assigned.remove(&id);
                    if let Some(reported) = started.remove(&id) {
                        running -= usize::from(reported);
                        let _ = self.driver.remove(&id).await;
                    }
                    continue;
                };
                let Some(node) = task.node.as_deref().filter(|n| ours.contains(n)) else {
                    assigned.remove(&id);
                    continue;
                };
                if task.desired_state == DesiredState::Running {
                    assigned.insert(id.clone());
                } else {
                    assigned.remove(&id);
                }
                let wants_start = task.desired_state == DesiredState::Running
                    && !started.contains_key(&id)
                    && !task.status.state.is_terminal();
                let wants_stop = task.desired_state == DesiredState::Shutdown
                    && started.contains_key(&id)
                    && task.status.state.is_active();
                if wants_start && self.driver.start(task, &[]).await.is_ok() {
                    started.insert(id.clone(), false);
                    let mut status = TaskStatus::new(TaskState::Running, now_ms(), "");
                    status.health = if task.spec.healthcheck.is_some() {
                        flotilla_types::Health::Healthy
                    } else {
                        flotilla_types::Health::None
                    };
                    let _ = report_tx.send((
                        node.to_string(),
                        TaskStatusUpdate {
                            task: id.clone(),
                            status,
                        },
                    ));
                } else if wants_stop {
                    if let Ok(exit) = self.driver.stop(&id, 15, Duration::ZERO).await {
                        let mut status = TaskStatus::new(TaskState::Exited, exit.at, "stopped");
                        status.exit_code = exit.code;
                        let _ = report_tx.send((
                            node.to_string(),
                            TaskStatusUpdate {
                                task: id.clone(),
                                status,
                            },
                        ));
                    }
                    let _ = self.driver.remove(&id).await;
                    if let Some(reported) = started.remove(&id) {
                        running -= usize::from(reported);
                    }
                }
                if task.status.state == TaskState::Running {
                    if let Some(reported) = started.get_mut(&id) {
                        running += usize::from(!*reported);
                        *reported = true;
                    }
                }
            }
            progress.send_replace(FleetProgress {
                running,
                assigned: assigned.len(),
            });
        }
        drop(report_tx);
        let _ = reporter.await;
        Ok(())
    }
}

/// Gathers reports for a moment and sends one bulk request per node, many at once. A report
/// that fails (a busy manager times writes out) is retried until it is taken or the fleet
/// stops: the fleet reports a task once, so a dropped `running` would leave it assigned forever.
async fn report_loop(
    client: Client,
    mut rx: mpsc::UnboundedReceiver<(String, TaskStatusUpdate)>,
    shutdown: watch::Receiver<bool>,
) {
    while let Some(first) = rx.recv().await {
        tokio::time::sleep(GATHER).await;
        let mut by_node: HashMap<String, Vec<TaskStatusUpdate>> = HashMap::new();
        by_node.entry(first.0).or_default().push(first.1);
        let mut n = 1;
        while n < BATCH {
            match rx.try_recv() {
                Ok((node, r)) => {
                    by_node.entry(node).or_default().push(r);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        let requests = by_node.into_iter().map(|(node, reports)| {
            let client = client.clone();
            let shutdown = shutdown.clone();
            async move {
                let bulk = BulkStatusReport { node, reports };
                for attempt in 0u32.. {
                    match client.report_statuses(&bulk).await {
                        Ok(_) => return,
                        Err(e) if *shutdown.borrow() => {
                            tracing::debug!(error = %e, "hollow status report dropped at shutdown");
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, attempt, "hollow status report failed");
                            let backoff = 50u64 << attempt.min(5);
                            tokio::time::sleep(Duration::from_millis(backoff)).await;
                        }
                    }
                }
            }
        });
        futures::stream::iter(requests)
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
    }
}
