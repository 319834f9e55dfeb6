//! One task's life on this node, run by its own tokio task: launch (wait out the restart delay,
//! allocate host ports, start; or adopt a workload a previous agent started), supervise (report
//! running, watch health, notice the exit or a stop request), finish (report the end, release
//! the ports).
//!
//! A finished task's logs and its stopped container or task dir stay on the node, so `flotilla
//! logs` can show why it ended; the agent removes them once the task record is deleted from the
//! store (see `agent::Reconciler::prune`).

use crate::driver::{Driver, DriverError, ExitInfo, RecoveredTask};
use crate::health::{HealthMonitor, HealthReport};
use crate::mesh_node::MeshNode;
use crate::ports::PortAllocator;
use flotilla_client::{Client, ClientError};
use flotilla_mesh::conn_limits::caused_by_exhaustion;
use flotilla_types::api::TaskStatusReport;
use flotilla_types::{
    now_ms, signal_number, DriverKind, Health, PortBinding, Task, TaskState, TaskStatus,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// What every task runner needs.
#[derive(Clone)]
pub(crate) struct RunnerCtx {
    pub client: Client,
    pub node: String,
    pub drivers: BTreeMap<DriverKind, Arc<dyn Driver>>,
    pub ports: Arc<PortAllocator>,
    pub shutdown: watch::Receiver<bool>,
    pub mesh: Option<Arc<MeshNode>>,
}

/// How a runner gets its workload.
pub(crate) enum Launch {
    Start,
    Adopt(RecoveredTask),
}

/// A workload that runs (just started or adopted).
struct Launched {
    ports: Vec<PortBinding>,
    pid: Option<u32>,
    container_id: Option<String>,
}

/// One task's whole life on this node.
pub(crate) async fn run_task(
    ctx: RunnerCtx,
    task: Task,
    launch: Launch,
    mut stop: watch::Receiver<bool>,
) {
    let Some(driver) = ctx.drivers.get(&task.spec.driver).cloned() else {
        let why = format!("this node has no {} driver", task.spec.driver);
        let status = TaskStatus::new(TaskState::Rejected, now_ms(), why);
        report(&ctx, &task.id, status).await;
        return;
    };
    let Some(launched) = launch_task(&ctx, driver.as_ref(), &task, launch, &mut stop).await else {
        return;
    };
    let ports = launched.ports.clone();
    let Some(end) = supervise(&ctx, &driver, &task, launched, stop).await else {
        // The agent is going away; the workload stays and will be re-adopted.
        return;
    };
    report(&ctx, &task.id, end).await;
    finish(&ctx, &ports);
}

/// Starts the task's workload, or takes over the one a previous agent left. `None` when there
/// is nothing to supervise (cancelled, failed to start, found exited, shutting down); the
/// outcome was then reported.
async fn launch_task(
    ctx: &RunnerCtx,
    driver: &dyn Driver,
    task: &Task,
    launch: Launch,
    stop: &mut watch::Receiver<bool>,
) -> Option<Launched> {
    match launch {
        Launch::Adopt(rec) => {
            if let Some(exit) = rec.exited {
                let status = exit_status(&exit, stop_requested(stop), &rec.ports);
                report(ctx, &task.id, status).await;
                finish(ctx, &rec.ports);
                return None;
            }
            tracing::info!(pid = ?rec.pid, "re-adopted running task");
            Some(Launched {
                ports: rec.ports,
                pid: rec.pid,
                container_id: rec.container_id,
            })
        }
        Launch::Start => start_task(ctx, driver, task, stop).await,
    }
}

/// Waits out the restart delay, allocates host ports and starts the workload.
async fn start_task(
    ctx: &RunnerCtx,
    driver: &dyn Driver,
    task: &Task,
    stop: &mut watch::Receiver<bool>,
) -> Option<Launched> {
    let mut shutdown = ctx.shutdown.clone();
    if let Some(at) = task.not_before {
        let wait = Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = until_true(stop) => {}
            _ = until_true(&mut shutdown) => return None,
        }
    }
    let failed = |state, message: String| TaskStatus::new(state, now_ms(), message);
    if stop_requested(stop) {
        let status = failed(TaskState::Exited, "cancelled before start".into());
        report(ctx, &task.id, status).await;
        return None;
    }
    if !report(ctx, &task.id, failed(TaskState::Starting, String::new())).await {
        return None;
    }
    let ports = match ctx.ports.allocate(&task.spec.ports) {
        Ok(p) => p,
        Err(e) => {
            let status = failed(TaskState::Failed, format!("no host port: {e}"));
            report(ctx, &task.id, status).await;
            return None;
        }
    };
    let started = match &ctx.mesh {
        Some(mesh) => {
            driver
                .start(&with_discovery(task, mesh).await, &ports)
                .await
        }
        None => driver.start(task, &ports).await,
    };
    match started {
        Ok(running) => Some(Launched {
            ports,
            pid: running.pid,
            container_id: running.container_id,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "start failed");
            report(ctx, &task.id, failed(TaskState::Failed, e.to_string())).await;
            finish(ctx, &ports);
            None
        }
    }
}

/// Reports the task running and watches it until it ends: its exit, a failed health check
/// (which kills it) or a stop request. Returns its final status; `None` when the agent shuts
/// down (the workload keeps running).
async fn supervise(
    ctx: &RunnerCtx,
    driver: &Arc<dyn Driver>,
    task: &Task,
    launched: Launched,
    mut stop: watch::Receiver<bool>,
) -> Option<TaskStatus> {
    let mut shutdown = ctx.shutdown.clone();
    let mut status = running_status(task, &launched);
    if task.status.state != TaskState::Running
        || task.status.pid != status.pid
        || task.status.container_id != status.container_id
        || task.status.ports != status.ports
    {
        report(ctx, &task.id, status.clone()).await;
    }
    let ports = launched.ports;
    let (health_tx, mut health_rx) = mpsc::unbounded_channel::<HealthReport>();
    let _monitor = watch_health(driver, task, &ports, health_tx).await;
    let wait = driver.wait(&task.id);
    tokio::pin!(wait);
    // `stop` is borrowed by the select's wait branch; this clone answers "was stop asked?".
    let stop_seen = stop.clone();
    let mut end = loop {
        tokio::select! {
            exit = &mut wait => {
                break match exit {
                    Ok(exit) => exit_status(&exit, stop_requested(&stop_seen), &ports),
                    Err(e) => TaskStatus::new(TaskState::Failed, now_ms(), format!("lost track of the task: {e}")),
                };
            }
            Some(hr) = health_rx.recv() => {
                if let Some(end) = on_health(ctx, driver.as_ref(), task, &mut status, hr).await {
                    break end;
                }
            }
            _ = until_true(&mut stop) => {
                break stop_task(ctx, driver.as_ref(), task, &status, &mut shutdown).await?;
            }
            _ = until_true(&mut shutdown) => return None,
        }
    };
    if end.health == Health::None && task.spec.healthcheck.is_some() {
        end.health = status.health;
    }
    Some(end)
}

/// The `running` status of a launched task. A re-adopted task keeps the health it had; health
/// checks resume and correct it.
fn running_status(task: &Task, launched: &Launched) -> TaskStatus {
    let mut status = TaskStatus::new(TaskState::Running, now_ms(), "");
    status.pid = launched.pid;
    status.container_id = launched.container_id.clone();
    status.ports = launched.ports.clone();
    status.health = match (&task.spec.healthcheck, task.status.health) {
        (None, _) => Health::None,
        (Some(_), Health::Healthy) if task.status.state == TaskState::Running => Health::Healthy,
        (Some(_), _) => Health::Starting,
    };
    status
}

/// Starts the service's health check, or relays the image's own one when the service has none.
async fn watch_health(
    driver: &Arc<dyn Driver>,
    task: &Task,
    ports: &[PortBinding],
    reports: mpsc::UnboundedSender<HealthReport>,
) -> Option<HealthMonitor> {
    match task.spec.healthcheck.clone() {
        Some(hc) => Some(HealthMonitor::spawn(
            task.id.clone(),
            hc,
            ports.to_vec(),
            driver.clone(),
            reports,
        )),
        None => driver
            .native_health(&task.id)
            .await
            .map(|native| HealthMonitor::forward(task.id.clone(), native, reports)),
    }
}

/// Reports a change of health; an unhealthy task is killed, and its final status returned.
async fn on_health(
    ctx: &RunnerCtx,
    driver: &dyn Driver,
    task: &Task,
    status: &mut TaskStatus,
    hr: HealthReport,
) -> Option<TaskStatus> {
    // The monitor's first report is `starting`; keep an adopted task's known health.
    if hr.health == status.health
        || (hr.health == Health::Starting && status.health != Health::None)
    {
        return None;
    }
    status.health = hr.health;
    status.message = match hr.health {
        Health::Unhealthy => format!("unhealthy: {}", hr.message),
        _ => String::new(),
    };
    status.since = hr.at;
    report(ctx, &task.id, status.clone()).await;
    if hr.health != Health::Unhealthy {
        return None;
    }
    tracing::info!(reason = %hr.message, "health check failed; killing the task");
    let mut end = match stop_retrying(driver, task, &mut ctx.shutdown.clone()).await? {
        Ok(exit) => exit_status(&exit, false, &status.ports),
        Err(e) => TaskStatus::new(TaskState::Failed, now_ms(), e.to_string()),
    };
    end.state = TaskState::Failed;
    end.health = Health::Unhealthy;
    end.message = format!("health check failed: {}", hr.message);
    Some(end)
}

/// Stops the task on request: reports `stopping`, lets the mesh drain its connections, then
/// signals it. `None` when the agent shuts down meanwhile.
async fn stop_task(
    ctx: &RunnerCtx,
    driver: &dyn Driver,
    task: &Task,
    status: &TaskStatus,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<TaskStatus> {
    let mut stopping = status.clone();
    stopping.state = TaskState::Stopping;
    stopping.since = now_ms();
    stopping.message = "stopping".into();
    report(ctx, &task.id, stopping).await;
    // No new work reaches the task once it is stopping; let what is in flight finish before
    // the signal.
    if let Some(mesh) = &ctx.mesh {
        if !mesh.drain(&ctx.client, task, shutdown).await {
            return None;
        }
    }
    Some(match stop_retrying(driver, task, shutdown).await? {
        Ok(exit) => exit_status(&exit, true, &status.ports),
        Err(e) => TaskStatus::new(TaskState::Exited, now_ms(), format!("stop: {e}")),
    })
}

/// The first pause before stopping again a task whose supervisor could not be reached; each
/// next one doubles, up to [`STOP_RETRY_MAX`].
const STOP_RETRY_FIRST: Duration = Duration::from_millis(200);
const STOP_RETRY_MAX: Duration = Duration::from_secs(5);

/// Stops the task, retrying while its supervisor cannot be reached (e.g. the agent is out of
/// file descriptors): giving up would report the task ended while its process runs on,
/// untracked and holding its ports. `None` when the agent shuts down meanwhile; the task is
/// re-adopted, and stopped, by the next agent.
async fn stop_retrying(
    driver: &dyn Driver,
    task: &Task,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Result<ExitInfo, DriverError>> {
    let (signal, grace) = stop_signal(task);
    let mut pause = STOP_RETRY_FIRST;
    loop {
        match driver.stop(&task.id, signal, grace).await {
            Err(e)
                if matches!(e, DriverError::ShimUnavailable { .. }) || caused_by_exhaustion(&e) =>
            {
                tracing::warn!(error = %e, retry_in = ?pause, "cannot reach the task to stop it; retrying");
            }
            done => return Some(done),
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = until_true(shutdown) => return None,
        }
        pause = (pause * 2).min(STOP_RETRY_MAX);
    }
}

/// The signal that stops the task (`stop_signal`, default SIGTERM) and how long it gets.
fn stop_signal(task: &Task) -> (i32, Duration) {
    let signal = task
        .spec
        .stop_signal
        .as_deref()
        .and_then(signal_number)
        .unwrap_or(15);
    (signal, task.spec.stop_grace_period)
}

/// Releases the host ports a finished task held. Its logs and its stopped container or task
/// dir stay until the task record is deleted (`Reconciler::prune` removes them then).
fn finish(ctx: &RunnerCtx, ports: &[PortBinding]) {
    for p in ports {
        ctx.ports.release(p.host_port);
    }
}

/// Sends a status report, retrying while the manager is unreachable. Returns false when the
/// manager will never accept it (task deleted or moved) or the agent is shutting down.
pub(crate) async fn report(ctx: &RunnerCtx, task_id: &str, status: TaskStatus) -> bool {
    let body = TaskStatusReport {
        node: ctx.node.clone(),
        status,
    };
    let mut delay = Duration::from_millis(100);
    let mut shutdown = ctx.shutdown.clone();
    loop {
        match ctx.client.report_status(task_id, &body).await {
            Ok(_) => return true,
            Err(ClientError::Api { body: err, .. })
                if err.code == "not_found" || err.code == "conflict" =>
            {
                tracing::info!(reason = %err.message, "manager no longer tracks this task here");
                return false;
            }
            Err(e) => tracing::debug!(error = %e, "status report failed; retrying"),
        }
        if crate::agent::sleep_or_shutdown(delay, &mut shutdown).await {
            return false;
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

fn exit_status(exit: &ExitInfo, stopping: bool, ports: &[PortBinding]) -> TaskStatus {
    let clean = exit.code == Some(0) && !exit.oom_killed;
    let state = if stopping || clean {
        TaskState::Exited
    } else {
        TaskState::Failed
    };
    let message = if stopping {
        format!("stopped ({})", exit.message)
    } else {
        exit.message.clone()
    };
    let mut s = TaskStatus::new(state, exit.at, message);
    s.exit_code = exit.code;
    s.oom_killed = exit.oom_killed;
    s.ports = ports.to_vec();
    s
}

/// Whether `stop` turned true (or the channel closed) — then the task must stop.
fn stop_requested(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

/// Resolves once the flag is true (or its sender is gone). Holds no guard across the await, so
/// it can sit in a `select!` inside a `Send` future.
pub(crate) async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The task with `<SERVICE>_ADDR` variables for every published service added to its
/// environment (the service's own variables win). Process tasks share the node's network
/// namespace and use the mesh's local address; containers go through the bridge gateway.
async fn with_discovery(task: &Task, mesh: &MeshNode) -> Task {
    let mut task = task.clone();
    let env = match task.spec.driver {
        DriverKind::Process => mesh.discovery_env().await,
        DriverKind::Docker => mesh.container_discovery_env().await,
        DriverKind::Sim => BTreeMap::new(),
    };
    for (key, value) in env {
        task.spec.environment.entry(key).or_insert(value);
    }
    task
}
