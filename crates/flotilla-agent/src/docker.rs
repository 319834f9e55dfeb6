//! The docker driver: runs each task as a container on the local Docker Engine.
//!
//! Ownership lives in the engine, not in agent files: every container carries the labels
//! [`LABEL_SERVICE`], [`LABEL_TASK`], [`LABEL_REVISION`], [`LABEL_NODE`], [`LABEL_SLOT`] and
//! [`LABEL_OWNER`] (this agent instance; lookups filter on it), so a
//! restarted agent finds its tasks again by listing containers. Exits and image health changes
//! come from the engine's event stream, which one background task follows for the driver's whole
//! life; [`Driver::wait`] resolves as soon as a `die` event arrives.

use crate::docker_create;
use crate::docker_network::{self, ServiceNetwork};
use crate::driver::{
    Driver, DriverError, ExecOutput, ExitInfo, LogStream, RecoveredTask, RunningTask,
    EXEC_OUTPUT_LIMIT,
};
use crate::shim::ExitRecord;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerInspectResponse, ContainerSummary, ContainerUpdateBody, HealthStatusEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, ListImagesOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StatsOptionsBuilder,
};
use bollard::Docker;
use flotilla_types::api::TaskStats;
use flotilla_types::container::PullPolicy;
use flotilla_types::{now_ms, DriverKind, Health, PortBinding, Resources, Task, Timestamp};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

pub const LABEL_SERVICE: &str = "io.flotilla.service";
pub const LABEL_TASK: &str = "io.flotilla.task";
pub const LABEL_REVISION: &str = "io.flotilla.revision";
pub const LABEL_NODE: &str = "io.flotilla.node";
pub const LABEL_SLOT: &str = "io.flotilla.slot";
/// The agent instance that owns a container. Node names are chosen by people and repeat across
/// clusters sharing one engine (every test cluster has an `n1`), so the driver finds, adopts and
/// removes only containers carrying its own owner key, never by node name alone.
pub const LABEL_OWNER: &str = "io.flotilla.owner";

/// How long engine detection waits for an answer to its ping.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a registry pull may take before the start fails.
const PULL_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause before following the event stream again after it broke.
const EVENTS_RETRY: Duration = Duration::from_secs(1);

/// The container name of a task: `flotilla-<service>-<slot or node>-<task_id>`.
pub fn container_name(task: &Task) -> String {
    let place = match (task.slot, &task.node) {
        (Some(slot), _) => slot.to_string(),
        (None, Some(node)) => node.clone(),
        (None, None) => "any".to_string(),
    };
    // The engine allows [a-zA-Z0-9][a-zA-Z0-9_.-]*; node names may hold other characters.
    let place: String = place
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("flotilla-{}-{place}-{}", task.spec.name, task.id)
}

pub use crate::docker_network::network_name;

/// Per-task notifications fed by the event stream.
#[derive(Default)]
struct Watchers {
    /// Bumped on every `die` of the task's container (and after the stream reconnects, when
    /// events may have been missed), so waiters look at the container again.
    exits: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Image health check results of tasks whose service defines no check of its own.
    health: Mutex<HashMap<String, watch::Sender<Health>>>,
}

impl Watchers {
    fn exit_receiver(&self, task_id: &str) -> watch::Receiver<u64> {
        let mut exits = self.exits.lock().unwrap_or_else(|p| p.into_inner());
        exits
            .entry(task_id.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn bump(&self, task_id: &str) {
        let exits = self.exits.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = exits.get(task_id) {
            tx.send_modify(|n| *n += 1);
        }
    }

    fn bump_all(&self) {
        let exits = self.exits.lock().unwrap_or_else(|p| p.into_inner());
        for tx in exits.values() {
            tx.send_modify(|n| *n += 1);
        }
    }

    fn set_health(&self, task_id: &str, health: Health) {
        let watchers = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = watchers.get(task_id) {
            tx.send_replace(health);
        }
    }

    fn forget(&self, task_id: &str) {
        self.exits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(task_id);
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(task_id);
    }
}

/// A DNS server for the containers of one service network, reached at the network's gateway
/// (an address of this host): the routing mesh's responder, so `<service>.flotilla` resolves
/// inside containers.
#[async_trait::async_trait]
pub trait ContainerDns: Send + Sync {
    /// Makes sure a DNS server answers on `gateway`; the address to give containers as their
    /// DNS server, or `None` when there is none (containers keep the engine's default DNS).
    async fn serve_on(&self, gateway: std::net::Ipv4Addr) -> Option<std::net::Ipv4Addr>;
}

/// Runs tasks as containers on the local Docker Engine.
pub struct DockerDriver {
    docker: Docker,
    node: String,
    /// Value of [`LABEL_OWNER`] on this agent's containers and networks.
    owner: String,
    watchers: Arc<Watchers>,
    /// Serialises creating and removing service networks: the engine (API 1.41) would happily
    /// create two networks of the same name for two concurrent starts.
    networks: tokio::sync::Mutex<()>,
    events: JoinHandle<()>,
    /// Where containers send DNS queries (see [`DockerDriver::set_container_dns`]).
    container_dns: std::sync::OnceLock<Arc<dyn ContainerDns>>,
}

impl Drop for DockerDriver {
    fn drop(&mut self) {
        self.events.abort();
    }
}

impl DockerDriver {
    /// Connects to the engine at `DOCKER_HOST` (default `/var/run/docker.sock`) and pings it.
    /// `Ok(None)` when no engine answers: the node then simply has no docker driver.
    /// `owner` identifies this agent instance among all users of the engine (see [`LABEL_OWNER`]).
    pub async fn detect(node: &str, owner: &str) -> Result<Option<Self>, DriverError> {
        let docker = match Docker::connect_with_defaults() {
            Ok(d) => d,
            Err(e) => {
                tracing::info!(error = %e, "no docker engine configured");
                return Ok(None);
            }
        };
        match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::info!(error = %e, "docker engine unreachable; docker driver disabled");
                return Ok(None);
            }
            Err(_) => {
                tracing::info!("docker engine did not answer a ping; docker driver disabled");
                return Ok(None);
            }
        }
        // Speak the engine's API version, which may be older than bollard's default.
        let docker = tokio::time::timeout(PING_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| DriverError::Invalid {
                field: "docker".into(),
                reason: "the engine answered a ping but not a version request".into(),
            })??;
        Ok(Some(Self::with_client(docker, node, owner)))
    }

    /// A driver for this node using an already connected client.
    pub fn with_client(docker: Docker, node: &str, owner: &str) -> Self {
        let watchers = Arc::new(Watchers::default());
        let span = tracing::info_span!("docker_events", node = %node);
        let events = tokio::spawn(
            follow_events(docker.clone(), owner.to_string(), watchers.clone()).instrument(span),
        );
        DockerDriver {
            docker,
            node: node.to_string(),
            owner: owner.to_string(),
            watchers,
            networks: tokio::sync::Mutex::new(()),
            events,
            container_dns: std::sync::OnceLock::new(),
        }
    }

    /// Gives containers started from now on `dns` as their DNS server (the engine's embedded
    /// DNS still answers container names and forwards everything else there). Set once;
    /// later calls are ignored.
    pub fn set_container_dns(&self, dns: Arc<dyn ContainerDns>) {
        let _ = self.container_dns.set(dns);
    }

    /// The engine client, for callers that need more than the driver offers.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// Tags of the images present on the node (`name:tag`).
    pub async fn images(&self) -> Result<Vec<String>, DriverError> {
        image_tags(&self.docker).await
    }

    /// The node's image tags, now and after every image event (pull, import, load, tag,
    /// untag, delete), so the node record the scheduler's image preference reads stays current
    /// instead of frozen at registration. The follower stops once every receiver is dropped.
    pub async fn watch_images(&self) -> watch::Receiver<Vec<String>> {
        let initial = self.images().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list the engine's images");
            Vec::new()
        });
        let (tx, rx) = watch::channel(initial);
        let span = tracing::info_span!("docker_images", node = %self.node);
        tokio::spawn(follow_images(self.docker.clone(), tx).instrument(span));
        rx
    }

    /// This agent's containers (running or not) that also carry `label` (`KEY=VALUE`), if given.
    async fn owned_containers(
        &self,
        label: Option<String>,
    ) -> Result<Vec<ContainerSummary>, DriverError> {
        let mut labels = vec![format!("{LABEL_OWNER}={}", self.owner)];
        labels.extend(label);
        let filters = HashMap::from([("label", labels)]);
        Ok(self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await?)
    }

    /// The container of a task on this node, inspected.
    async fn find(&self, task_id: &str) -> Result<ContainerInspectResponse, DriverError> {
        let list = self
            .owned_containers(Some(format!("{LABEL_TASK}={task_id}")))
            .await?;
        let id = list
            .into_iter()
            .find_map(|c| c.id)
            .ok_or_else(|| DriverError::NotFound(task_id.to_string()))?;
        match self.docker.inspect_container(&id, None).await {
            Ok(c) => Ok(c),
            Err(e) if is_status(&e, 404) => Err(DriverError::NotFound(task_id.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// The container of a task that still runs; `NotRunning` once it exited.
    async fn find_running(&self, task_id: &str) -> Result<ContainerInspectResponse, DriverError> {
        let c = self.find(task_id).await?;
        match exit_of(&c) {
            Some(_) => Err(DriverError::NotRunning(task_id.to_string())),
            None => Ok(c),
        }
    }

    /// Makes sure `image` is on the node, pulling it when the policy allows.
    async fn ensure_image(
        &self,
        task: &Task,
        image: &str,
        policy: PullPolicy,
    ) -> Result<(), DriverError> {
        let present = match self.docker.inspect_image(image).await {
            Ok(_) => true,
            Err(e) if is_status(&e, 404) => false,
            Err(e) => return Err(e.into()),
        };
        let must_pull = match policy {
            PullPolicy::Never => false,
            PullPolicy::Missing => !present,
            PullPolicy::Always => true,
        };
        if !must_pull {
            return if present {
                Ok(())
            } else {
                Err(DriverError::StartFailed {
                    task: task.id.clone(),
                    reason: format!(
                        "image {image} not present on node {} and pull_policy is never",
                        self.node
                    ),
                })
            };
        }
        match self.pull(image).await {
            Ok(()) => Ok(()),
            Err(reason) if present => {
                tracing::warn!(%image, %reason, "pull failed; using the local copy");
                Ok(())
            }
            Err(reason) => Err(DriverError::StartFailed {
                task: task.id.clone(),
                reason: format!(
                    "image {image} not present on node {} and pull failed: {reason}",
                    self.node
                ),
            }),
        }
    }

    async fn pull(&self, image: &str) -> Result<(), String> {
        let options = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let mut progress = self.docker.create_image(Some(options), None, None);
        let pulling = async {
            while let Some(step) = progress.next().await {
                step.map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        match tokio::time::timeout(PULL_TIMEOUT, pulling).await {
            Ok(result) => result,
            Err(_) => Err(format!("no result within {PULL_TIMEOUT:?}")),
        }
    }

    /// The service's network (see [`crate::docker_network`]), created if missing.
    async fn ensure_network(&self, task: &Task) -> Result<ServiceNetwork, DriverError> {
        let service = task.spec.name.as_str();
        let _guard = self.networks.lock().await;
        let labels = HashMap::from([
            (LABEL_SERVICE.to_string(), service.to_string()),
            (LABEL_NODE.to_string(), self.node.clone()),
            (LABEL_OWNER.to_string(), self.owner.clone()),
        ]);
        docker_network::ensure(&self.docker, service, &task.id, labels).await
    }

    /// Creates the container `name` on the service network. Another agent sharing the engine
    /// may remove the network between our finding it and the create (its last container
    /// went); then the network is found or made again, once.
    async fn create_on_network(
        &self,
        task: &Task,
        name: &str,
        mut body: bollard::models::ContainerCreateBody,
    ) -> Result<bollard::models::ContainerCreateResponse, DriverError> {
        let mut retried = false;
        loop {
            let network = self.ensure_network(task).await?;
            docker_create::attach_network(&mut body, &network.id, &task.spec.name);
            if let (Some(dns), Some(gateway)) = (self.container_dns.get(), network.gateway) {
                if let Some(server) = dns.serve_on(gateway).await {
                    body.host_config.get_or_insert_with(Default::default).dns =
                        Some(vec![server.to_string()]);
                }
            }
            let options = CreateContainerOptionsBuilder::default().name(name).build();
            match self
                .docker
                .create_container(Some(options), body.clone())
                .await
            {
                Err(e)
                    if is_status(&e, 404) && !retried && engine_message(&e).contains("network") =>
                {
                    tracing::info!(error = %engine_message(&e), "service network went away; finding it again");
                    retried = true;
                }
                other => return Ok(other?),
            }
        }
    }

    /// Removes the service's network once no container of the service is left on the node.
    async fn release_network(&self, service: &str) -> Result<(), DriverError> {
        let _guard = self.networks.lock().await;
        let left = self
            .owned_containers(Some(format!("{LABEL_SERVICE}={service}")))
            .await?;
        if !left.is_empty() {
            return Ok(());
        }
        docker_network::release(&self.docker, service).await
    }

    /// Waits for the container to stop running, looking again at every `die` event.
    async fn wait_exit(&self, task_id: &str) -> Result<ExitInfo, DriverError> {
        // Subscribe before looking, so a die between the look and the wait is not missed.
        let mut changed = self.watchers.exit_receiver(task_id);
        loop {
            let c = self.find(task_id).await?;
            if let Some(exit) = exit_of(&c) {
                return Ok(exit);
            }
            if changed.changed().await.is_err() {
                return Err(DriverError::NotFound(task_id.to_string()));
            }
        }
    }

    async fn remove_container(&self, id: &str) -> Result<(), DriverError> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 404: already gone; 409: a removal is already in progress.
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn kill(&self, id: &str, signal: i32) -> Result<(), DriverError> {
        let options = KillContainerOptionsBuilder::default()
            .signal(&signal.to_string())
            .build();
        match self.docker.kill_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 409: not running (it exited meanwhile), which is what a kill wants.
            Err(e) if is_status(&e, 409) || is_status(&e, 404) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Sets cpu, memory and pids limits and reservations on a create or update body.
/// The engine's form of Flotilla's resources. Swap is capped at the memory limit so the limit
/// means the same as for a process task.
pub(crate) fn limits_update(resources: &Resources) -> Result<ContainerUpdateBody, DriverError> {
    let invalid = |field: &str, reason: String| DriverError::Invalid {
        field: format!("deploy.resources.{field}"),
        reason,
    };
    let as_i64 = |field: &str, v: u64| {
        i64::try_from(v).map_err(|_| invalid(field, format!("{v} is too large")))
    };
    let l = resources.limits;
    let r = resources.reservations;
    for (which, a) in [("limits", l), ("reservations", r)] {
        if a.memory_bytes.is_some_and(|m| m < 6 << 20) {
            // The engine refuses limits below 6MiB.
            return Err(invalid(
                &format!("{which}.memory"),
                "must be at least 6MiB for a container".into(),
            ));
        }
        if a.cpu_millis == Some(0) {
            return Err(invalid(
                &format!("{which}.cpus"),
                "must be greater than 0".into(),
            ));
        }
    }
    if matches!((r.memory_bytes, l.memory_bytes), (Some(r), Some(l)) if r > l) {
        return Err(invalid(
            "reservations.memory",
            "reservation is larger than the limit".into(),
        ));
    }
    let memory = l
        .memory_bytes
        .map(|m| as_i64("limits.memory", m))
        .transpose()?;
    Ok(ContainerUpdateBody {
        nano_cpus: l
            .cpu_millis
            .map(|m| as_i64("limits.cpus", m.saturating_mul(1_000_000)))
            .transpose()?,
        memory,
        memory_swap: memory,
        memory_reservation: r
            .memory_bytes
            .map(|m| as_i64("reservations.memory", m))
            .transpose()?,
        // 1024 shares are one cpu's worth; the kernel's minimum is 2.
        cpu_shares: r
            .cpu_millis
            .map(|m| as_i64("reservations.cpus", (m.saturating_mul(1024) / 1000).max(2)))
            .transpose()?,
        pids_limit: l.pids.map(|p| as_i64("limits.pids", p)).transpose()?,
        ..Default::default()
    })
}

/// Whether an engine error is an HTTP answer with this status.
pub(crate) fn is_status(e: &bollard::errors::Error, code: u16) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code, .. } if *status_code == code)
}

/// The engine's message of an error, without bollard's wrapping.
fn engine_message(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

fn parse_time(text: Option<&str>) -> Option<Timestamp> {
    let t = chrono::DateTime::parse_from_rfc3339(text?).ok()?;
    // The engine writes 0001-01-01 for "never".
    (t.timestamp() > 0).then(|| t.timestamp_millis())
}

/// The exit of a container that is no longer running; `None` while it runs (or is created but
/// not started yet, which only happens inside `start`).
fn exit_of(c: &ContainerInspectResponse) -> Option<ExitInfo> {
    let state = c.state.as_ref()?;
    if state.running == Some(true) || state.restarting == Some(true) {
        return None;
    }
    let code = state.exit_code.and_then(|c| i32::try_from(c).ok());
    // The engine only reports a status; like a shell, 128+N means death by signal N.
    let signal = code.filter(|c| (129..=192).contains(c)).map(|c| c - 128);
    let record = ExitRecord {
        code,
        signal,
        oom_killed: state.oom_killed == Some(true),
        at: parse_time(state.finished_at.as_deref()).unwrap_or_else(now_ms),
    };
    let limit = memory_limit(c);
    let mut exit = ExitInfo::from_record(&record, limit);
    if let Some(err) = state.error.as_deref().filter(|e| !e.is_empty()) {
        exit.message = format!("{}: {err}", exit.message);
    }
    Some(exit)
}

/// The host ports a container publishes, from its configuration (valid even when stopped).
/// The container's main process, while it has one.
fn pid_of(c: &ContainerInspectResponse) -> Option<u32> {
    c.state
        .as_ref()
        .and_then(|s| s.pid)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)
}

/// The container's memory limit, if it has one.
fn memory_limit(c: &ContainerInspectResponse) -> Option<u64> {
    c.host_config
        .as_ref()
        .and_then(|h| h.memory)
        .and_then(|m| u64::try_from(m).ok())
        .filter(|m| *m > 0)
}

fn published_ports(c: &ContainerInspectResponse) -> Vec<PortBinding> {
    let mut ports: Vec<PortBinding> = c
        .host_config
        .as_ref()
        .and_then(|h| h.port_bindings.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|(key, bindings)| {
            let target = key.split('/').next()?.parse::<u16>().ok()?;
            let host_port = bindings
                .as_ref()?
                .iter()
                .find_map(|b| b.host_port.as_deref()?.parse::<u16>().ok())?;
            Some(PortBinding { target, host_port })
        })
        .collect();
    ports.sort_by_key(|p| p.target);
    ports
}

fn label<'a>(c: &'a ContainerInspectResponse, key: &str) -> Option<&'a str> {
    c.config
        .as_ref()?
        .labels
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn health_from_engine(status: Option<HealthStatusEnum>) -> Option<Health> {
    match status? {
        HealthStatusEnum::STARTING => Some(Health::Starting),
        HealthStatusEnum::HEALTHY => Some(Health::Healthy),
        HealthStatusEnum::UNHEALTHY => Some(Health::Unhealthy),
        HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
    }
}

async fn image_tags(docker: &Docker) -> Result<Vec<String>, DriverError> {
    let images = docker
        .list_images(Some(ListImagesOptionsBuilder::default().build()))
        .await?;
    let mut tags: Vec<String> = images
        .into_iter()
        .flat_map(|i| i.repo_tags)
        .filter(|t| t != "<none>:<none>")
        .collect();
    tags.sort();
    tags.dedup();
    Ok(tags)
}

/// Publishes the image tags on `tx` after every image event until every receiver is gone.
async fn follow_images(docker: Docker, tx: watch::Sender<Vec<String>>) {
    let publish = |tags: Vec<String>| {
        tx.send_if_modified(|current| {
            let changed = *current != tags;
            *current = tags;
            changed
        })
    };
    loop {
        let filters = HashMap::from([("type", vec!["image".to_string()])]);
        let mut events = docker.events(Some(
            EventsOptionsBuilder::default().filters(&filters).build(),
        ));
        // Images may have changed while the stream was down.
        if let Ok(tags) = image_tags(&docker).await {
            publish(tags);
        }
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                event = events.next() => match event {
                    Some(Ok(_)) => match image_tags(&docker).await {
                        Ok(tags) => {
                            if publish(tags) {
                                tracing::debug!("the node's images changed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot list the engine's images"),
                    },
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "docker image event stream failed; reconnecting");
                        break;
                    }
                    None => break,
                },
            }
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(EVENTS_RETRY) => {}
        }
    }
}

/// Follows the engine's container events for this agent's containers until aborted.
async fn follow_events(docker: Docker, owner: String, watchers: Arc<Watchers>) {
    loop {
        let filters = HashMap::from([
            ("type", vec!["container".to_string()]),
            ("label", vec![format!("{LABEL_OWNER}={owner}")]),
        ]);
        let mut events = docker.events(Some(
            EventsOptionsBuilder::default().filters(&filters).build(),
        ));
        // Events may have been missed while the stream was down: waiters look again.
        watchers.bump_all();
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "docker event stream failed; reconnecting");
                    break;
                }
            };
            let action = event.action.unwrap_or_default();
            let Some(task_id) = event
                .actor
                .and_then(|a| a.attributes)
                .and_then(|mut attrs| attrs.remove(LABEL_TASK))
            else {
                continue;
            };
            if action == "die" {
                tracing::debug!(task = %task_id, "container died");
                watchers.bump(&task_id);
            } else if let Some(status) = action.strip_prefix("health_status: ") {
                let health = match status.trim() {
                    "healthy" => Health::Healthy,
                    "unhealthy" => Health::Unhealthy,
                    _ => Health::Starting,
                };
                watchers.set_health(&task_id, health);
            }
        }
        tokio::time::sleep(EVENTS_RETRY).await;
    }
}

/// Reads the engine's multiplexed output to the end, keeping at most `cap` bytes.
async fn collect_output(
    mut output: std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
    >,
    cap: usize,
) -> Result<String, DriverError> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(chunk) = output.next().await {
        let (buf, bytes) = match chunk? {
            LogOutput::StdErr { message } => (&mut err, message),
            LogOutput::StdOut { message } | LogOutput::Console { message } => (&mut out, message),
            LogOutput::StdIn { .. } => continue,
        };
        let room = cap.saturating_sub(buf.len());
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
    out.extend_from_slice(&err);
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[async_trait::async_trait]
impl Driver for DockerDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Docker
    }

    #[tracing::instrument(skip_all, fields(task = %task.id, service = %task.spec.name, node = %self.node))]
    async fn start(&self, task: &Task, ports: &[PortBinding]) -> Result<RunningTask, DriverError> {
        let body = docker_create::create_body(task, ports, &self.node, &self.owner)?;
        match self.find(&task.id).await {
            Ok(_) => return Err(DriverError::AlreadyExists(task.id.clone())),
            Err(DriverError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let image = body.image.clone().unwrap_or_default();
        self.ensure_image(task, &image, task.spec.container.pull_policy)
            .await?;
        let name = container_name(task);
        let created = match self.create_on_network(task, &name, body).await {
            Ok(c) => c,
            Err(DriverError::Engine(e)) => {
                let reason = format!("cannot create container {name}: {}", engine_message(&e));
                if let Err(cleanup) = self.release_network(&task.spec.name).await {
                    tracing::warn!(error = %cleanup, "releasing the service network failed");
                }
                return Err(DriverError::StartFailed {
                    task: task.id.clone(),
                    reason,
                });
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            let reason = format!("cannot start container {name}: {}", engine_message(&e));
            // The task never ran: leave nothing behind so the id can be retried.
            if let Err(cleanup) = self.remove(&task.id).await {
                tracing::warn!(error = %cleanup, "cleanup after failed start failed");
            }
            return Err(DriverError::StartFailed {
                task: task.id.clone(),
                reason,
            });
        }
        let inspected = self.docker.inspect_container(&created.id, None).await?;
        let pid = pid_of(&inspected);
        tracing::info!(container = %created.id, ?pid, "container started");
        Ok(RunningTask {
            pid,
            container_id: Some(created.id),
        })
    }

    async fn recover(&self) -> Result<Vec<RecoveredTask>, DriverError> {
        let list = self.owned_containers(None).await?;
        let mut recovered = Vec::new();
        for summary in list {
            let Some(id) = summary.id else { continue };
            let c = match self.docker.inspect_container(&id, None).await {
                Ok(c) => c,
                Err(e) if is_status(&e, 404) => continue,
                Err(e) => return Err(e.into()),
            };
            let Some(task_id) = label(&c, LABEL_TASK).map(str::to_string) else {
                continue;
            };
            let exited = exit_of(&c);
            let pid = pid_of(&c).filter(|_| exited.is_none());
            tracing::info!(task = %task_id, container = %id, exited = exited.is_some(), "recovered container");
            recovered.push(RecoveredTask {
                task_id,
                pid,
                container_id: Some(id),
                ports: published_ports(&c),
                exited,
            });
        }
        recovered.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        Ok(recovered)
    }

    #[tracing::instrument(skip(self))]
    async fn wait(&self, task_id: &str) -> Result<ExitInfo, DriverError> {
        self.wait_exit(task_id).await
    }

    #[tracing::instrument(skip(self))]
    async fn stop(
        &self,
        task_id: &str,
        signal: i32,
        grace: Duration,
    ) -> Result<ExitInfo, DriverError> {
        if nix::sys::signal::Signal::try_from(signal).is_err() {
            return Err(DriverError::Invalid {
                field: "signal".into(),
                reason: format!("{signal} is not a signal number"),
            });
        }
        let c = self.find(task_id).await?;
        if let Some(exit) = exit_of(&c) {
            return Ok(exit);
        }
        let id = c.id.clone().unwrap_or_default();
        self.kill(&id, signal).await?;
        match tokio::time::timeout(grace, self.wait_exit(task_id)).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::info!(?grace, "container outlived its grace period; killing it");
                self.kill(&id, libc::SIGKILL).await?;
                self.wait_exit(task_id).await
            }
        }
    }

    #[tracing::instrument(skip(self))]
    async fn remove(&self, task_id: &str) -> Result<(), DriverError> {
        let c = match self.find(task_id).await {
            Ok(c) => c,
            Err(DriverError::NotFound(_)) => {
                self.watchers.forget(task_id);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let service = label(&c, LABEL_SERVICE).map(str::to_string);
        self.remove_container(c.id.as_deref().unwrap_or_default())
            .await?;
        self.watchers.forget(task_id);
        if let Some(service) = service {
            self.release_network(&service).await?;
        }
        tracing::info!("container removed");
        Ok(())
    }

    #[tracing::instrument(skip(self, limits))]
    async fn update_resources(&self, task_id: &str, limits: &Resources) -> Result<(), DriverError> {
        let update = limits_update(limits)?;
        let c = self.find_running(task_id).await?;
        let id = c.id.unwrap_or_default();
        self.docker
            .update_container(&id, update)
            .await
            .map_err(|e| DriverError::Refused {
                task: task_id.to_string(),
                reason: format!("the engine refused the new limits: {}", engine_message(&e)),
            })?;
        tracing::info!(container = %id, "resources updated in place");
        Ok(())
    }

    #[tracing::instrument(skip(self, timeout))]
    async fn exec(
        &self,
        task_id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, DriverError> {
        crate::driver::require_program(argv)?;
        let c = self.find_running(task_id).await?;
        let id = c.id.unwrap_or_default();
        let exec = self
            .docker
            .create_exec(
                &id,
                CreateExecOptions {
                    cmd: Some(argv.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await?;
        let run = async {
            match self
                .docker
                .start_exec(&exec.id, Some(StartExecOptions::default()))
                .await?
            {
                StartExecResults::Attached { output, .. } => {
                    collect_output(output, EXEC_OUTPUT_LIMIT).await
                }
                StartExecResults::Detached => Ok(String::new()),
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(output) => {
                let output = output?;
                let inspect = self.docker.inspect_exec(&exec.id).await?;
                Ok(ExecOutput {
                    exit_code: inspect.exit_code.and_then(|c| i32::try_from(c).ok()),
                    output,
                    timed_out: false,
                })
            }
            // The engine offers no way to kill an exec; it ends with the container at the latest.
            Err(_) => Ok(ExecOutput::timed_out()),
        }
    }

    async fn logs(
        &self,
        task_id: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<LogStream, DriverError> {
        let c = self.find(task_id).await?;
        let id = c.id.unwrap_or_default();
        let tail = tail.map_or_else(|| "all".to_string(), |n| n.to_string());
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .follow(follow)
            .tail(&tail)
            .build();
        let stream = self
            .docker
            .logs(&id, Some(options))
            .map(|chunk| chunk.map(|o| o.into_bytes()).map_err(DriverError::from));
        Ok(stream.boxed())
    }

    #[tracing::instrument(skip(self))]
    async fn stats(&self, task_id: &str) -> Result<TaskStats, DriverError> {
        let c = self.find_running(task_id).await?;
        let id = c.id.clone().unwrap_or_default();
        // Not one-shot: the engine then samples twice, a second apart, so the cpu rate is real.
        let options = StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(false)
            .build();
        let sample = self
            .docker
            .stats(&id, Some(options))
            .next()
            .await
            .ok_or_else(|| DriverError::NotRunning(task_id.to_string()))??;
        let cpu = sample.cpu_stats.unwrap_or_default();
        let pre = sample.precpu_stats.unwrap_or_default();
        let total = |s: &bollard::models::ContainerCpuStats| {
            s.cpu_usage
                .as_ref()
                .and_then(|u| u.total_usage)
                .unwrap_or(0)
        };
        let cpu_delta = total(&cpu).saturating_sub(total(&pre)) as f64;
        let system_delta = cpu
            .system_cpu_usage
            .unwrap_or(0)
            .saturating_sub(pre.system_cpu_usage.unwrap_or(0)) as f64;
        let cpus = f64::from(cpu.online_cpus.unwrap_or(1).max(1));
        let cpu_percent = if system_delta > 0.0 {
            cpu_delta / system_delta * cpus * 100.0
        } else {
            0.0
        };
        let memory = sample.memory_stats.unwrap_or_default();
        // Like `docker stats`: page cache the kernel can drop at will is not "used".
        let cache = memory
            .stats
            .as_ref()
            .and_then(|s| {
                s.get("total_inactive_file")
                    .or_else(|| s.get("inactive_file"))
            })
            .copied()
            .unwrap_or(0);
        let limit = memory_limit(&c);
        Ok(TaskStats {
            task_id: task_id.to_string(),
            cpu_percent,
            cpu_total_nanos: total(&cpu),
            memory_bytes: memory.usage.unwrap_or(0).saturating_sub(cache),
            memory_limit_bytes: limit,
            at: now_ms(),
        })
    }

    async fn native_health(&self, task_id: &str) -> Option<watch::Receiver<Health>> {
        let c = self.find(task_id).await.ok()?;
        let health = c.state.as_ref()?.health.as_ref()?;
        let initial = health_from_engine(health.status)?;
        let rx = {
            let mut watchers = self
                .watchers
                .health
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let tx = watchers
                .entry(task_id.to_string())
                .or_insert_with(|| watch::channel(initial).0);
            tx.subscribe()
        };
        // A change between the first look and the subscription would otherwise be lost.
        if let Some(now) = self
            .find(task_id)
            .await
            .ok()
            .and_then(|c| c.state?.health?.status)
            .and_then(|s| health_from_engine(Some(s)))
        {
            self.watchers.set_health(task_id, now);
        }
        Some(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_types::ServiceSpec;

    fn task(slot: Option<u64>, node: Option<&str>) -> Task {
        let spec = ServiceSpec::process("web", vec!["x".into()]);
        let mut t = Task::new(&spec, 3, slot, 0);
        t.id = "0123abcd".into();
        t.node = node.map(str::to_string);
        t
    }

    #[test]
    fn names_follow_the_scheme() {
        assert_eq!(
            container_name(&task(Some(2), Some("n1"))),
            "flotilla-web-2-0123abcd"
        );
        assert_eq!(
            container_name(&task(None, Some("host:a b"))),
            "flotilla-web-host_a_b-0123abcd"
        );
        assert_eq!(network_name("web"), "flotilla-web");
    }

    #[test]
    fn limits_translate_to_engine_units() {
        let mut r = Resources::default();
        r.limits.cpu_millis = Some(500);
        r.limits.memory_bytes = Some(64 << 20);
        r.reservations.cpu_millis = Some(250);
        r.limits.pids = Some(100);
        let u = limits_update(&r).unwrap();
        assert_eq!(u.nano_cpus, Some(500_000_000));
        assert_eq!(u.memory, Some(64 << 20));
        assert_eq!(u.memory_swap, Some(64 << 20));
        assert_eq!(u.cpu_shares, Some(256));
        assert_eq!(u.pids_limit, Some(100));
        r.limits.memory_bytes = Some(1);
        let e = limits_update(&r).unwrap_err().to_string();
        assert!(e.contains("deploy.resources.limits.memory"), "{e}");
    }
}
