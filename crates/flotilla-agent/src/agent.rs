//! The agent's control loop: registers the node, follows the tasks assigned to it over the
//! manager's watch stream, and runs each through a driver, reporting every state and health
//! change back.
//!
//! Each task gets its own runner (`runner`) that owns its lifecycle; the
//! `reconciler` starts, stops and prunes them as the node's task records change.
//! Stopping the agent ends the runners but **not** the workloads: the next agent re-adopts them
//! through [`Driver::recover`].

use crate::docker::DockerDriver;
use crate::driver::{Driver, DriverError};
use crate::mesh_node::{MeshNode, MeshNodeConfig, MeshNodeError};
use crate::ports::PortAllocator;
use crate::process::ProcessDriver;
use crate::reconciler::{Reconciler, UnknownWorkloads};
use crate::runner::{until_true, RunnerCtx};
use flotilla_client::{Client, Mirror};
use flotilla_mesh::conn_limits::{
    accept_loop, http_server, ConnGate, ListenerKind, HEADER_READ_TIMEOUT,
};
use flotilla_types::api::{Heartbeat, NodeRegistration};
use flotilla_types::{now_ms, DriverKind, NodeResources};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::Instrument;

/// How often the leftovers of tasks whose records were deleted are looked for, besides at
/// every change of the node's tasks.
const PRUNE_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("driver: {0}")]
    Driver(#[from] DriverError),
    #[error("port allocator: {0}")]
    Ports(#[from] crate::ports::PortError),
    #[error("cannot find the flotilla executable to run shims: {0}")]
    Exe(std::io::Error),
    #[error("cannot listen for log requests: {0}")]
    Listen(std::io::Error),
    #[error("mesh: {0}")]
    Mesh(#[from] MeshNodeError),
    #[error(transparent)]
    Secret(#[from] crate::agent_auth::SecretError),
    #[error("{path}: {source}")]
    StateFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct AgentConfig {
    /// This node's id, as registered with the manager.
    pub node_id: String,
    pub api: Client,
    /// Where drivers keep task state (`<state_dir>/process/tasks/...`).
    pub state_dir: PathBuf,
    pub heartbeat: Duration,
    /// Host ports for task ports are taken from this range.
    pub task_ports: std::ops::Range<u16>,
    /// The routing mesh of this node; `None` runs none (published ports are not served here).
    pub mesh: Option<MeshNodeConfig>,
    /// The IP other nodes' meshes reach this node's tasks at; `None`: the agent's own address
    /// (loopback, so only nodes on the same host reach them).
    pub advertise_ip: Option<std::net::IpAddr>,
    /// Cluster nodes: serve the agent server (logs, stats, resources, mesh stats) over this
    /// mTLS config on `advertise_ip`, so managers on other hosts reach it and nobody else does.
    /// `None` (`flotilla up`): plain HTTP on loopback, where only this host's manager is.
    pub agent_tls: Option<Arc<rustls::ServerConfig>>,
    /// Stop workloads found on the node whose tasks the cluster does not know even when the
    /// store met this node only now (`--discard-unknown-workloads`); see
    /// `UnknownWorkloads` in `reconciler.rs`.
    pub discard_unknown_workloads: bool,
}

pub struct Agent {
    cfg: AgentConfig,
    drivers: BTreeMap<DriverKind, Arc<dyn Driver>>,
    ports: Arc<PortAllocator>,
    log_listener: tokio::net::TcpListener,
    mesh: Option<Arc<MeshNode>>,
    /// Container images on this node, kept current from the engine's image events and
    /// re-reported by the heartbeat loop; `None` without a docker engine.
    images: Option<watch::Receiver<Vec<String>>>,
    /// Who the agent server answers: managers only, by mTLS or by bearer secret.
    auth: ServerAuth,
}

impl Agent {
    pub async fn new(cfg: AgentConfig) -> Result<Self, AgentError> {
        let exe = std::env::current_exe().map_err(AgentError::Exe)?;
        let process: Arc<dyn Driver> =
            Arc::new(ProcessDriver::new(cfg.state_dir.join("process"), exe)?);
        let mut drivers = BTreeMap::from([(DriverKind::Process, process)]);
        let mut images = None;
        let owner = owner_key(&cfg.state_dir)?;
        let mesh = cfg.mesh.clone().map(MeshNode::new).transpose()?;
        match DockerDriver::detect(&cfg.node_id, &owner).await {
            Ok(Some(docker)) => {
                tracing::info!("docker engine found; docker driver enabled");
                // Containers resolve `<service>.flotilla` through the mesh's DNS.
                if let Some(mesh) = &mesh {
                    docker.set_container_dns(mesh.clone());
                }
                // Advertised so the scheduler prefers nodes holding an image.
                images = Some(docker.watch_images().await);
                drivers.insert(DriverKind::Docker, Arc::new(docker) as Arc<dyn Driver>);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "docker engine unusable; docker driver disabled"),
        }
        let ports = Arc::new(PortAllocator::new(cfg.task_ports.clone())?);
        // Without TLS the server has no authentication, so it must stay on loopback.
        let bind_ip = match (&cfg.agent_tls, cfg.advertise_ip) {
            (Some(_), Some(ip)) => ip,
            _ => std::net::Ipv4Addr::LOCALHOST.into(),
        };
        let log_listener = tokio::net::TcpListener::bind((bind_ip, 0))
            .await
            .map_err(AgentError::Listen)?;
        let auth = match &cfg.agent_tls {
            Some(tls) => ServerAuth::Mtls(tls.clone()),
            None => {
                ServerAuth::Bearer(crate::agent_auth::load_or_create_secret(&cfg.state_dir)?.into())
            }
        };
        Ok(Agent {
            cfg,
            drivers,
            ports,
            log_listener,
            mesh,
            images,
            auth,
        })
    }

    fn registration(&self) -> NodeRegistration {
        NodeRegistration {
            id: self.cfg.node_id.clone(),
            hostname: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| self.cfg.node_id.clone()),
            resources: node_resources(),
            drivers: self.drivers.keys().copied().collect(),
            labels: BTreeMap::new(),
            engine_labels: BTreeMap::new(),
            images: self
                .images
                .as_ref()
                .map(|rx| rx.borrow().clone())
                .unwrap_or_default(),
            agent_addr: self
                .log_listener
                .local_addr()
                .ok()
                .map(|a| match self.cfg.agent_tls {
                    Some(_) => format!("https://{a}"),
                    None => a.to_string(),
                }),
            advertise_ip: self.cfg.advertise_ip,
            port_conflicts: Vec::new(),
            agent_secret: match &self.auth {
                ServerAuth::Bearer(secret) => Some(secret.to_string()),
                ServerAuth::Mtls(_) => None,
            },
        }
    }

    /// Runs until `shutdown` turns true. Workloads keep running afterwards.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let span = tracing::info_span!("agent", node = %self.cfg.node_id);
        async move {
            let reg = self.registration();
            let client = self.cfg.api.clone();
            let node_new_to_store = loop {
                match client.register_node(&reg).await {
                    // A record created by this registration: updated when it was created.
                    Ok(node) => break node.meta.created_at == node.meta.updated_at,
                    Err(e) => tracing::warn!(error = %e, "registering with the manager failed; retrying"),
                }
                if sleep_or_shutdown(Duration::from_secs(1), &mut shutdown).await {
                    return;
                }
            };
            let mut recovered = BTreeMap::new();
            for driver in self.drivers.values() {
                match driver.recover().await {
                    Ok(tasks) => {
                        for t in tasks {
                            for p in &t.ports {
                                if let Err(e) = self.ports.reserve(p.host_port) {
                                    tracing::warn!(task = %t.task_id, error = %e, "recovered port already held");
                                }
                            }
                            recovered.insert(t.task_id.clone(), (driver.kind(), t));
                        }
                    }
                    Err(e) => tracing::error!(driver = %driver.kind(), error = %e, "recovering tasks failed"),
                }
            }
            // `count`: running workloads to re-adopt; `finished`: ended ones kept for their logs.
            let finished = recovered.values().filter(|(_, t)| t.exited.is_some()).count();
            let count = recovered.len() - finished;
            tracing::info!(count, finished, "recovered tasks from a previous agent");

            let conflicts = self.mesh.as_ref().map(|m| m.port_conflicts());
            let reported = Reported { port_conflicts: conflicts, images: self.images.clone() };
            let heartbeat = tokio::spawn(heartbeat_loop(client.clone(), reg, reported, self.cfg.heartbeat, shutdown.clone()));
            let logs = tokio::spawn(serve_logs(self.log_listener, self.auth.clone(), self.drivers.clone(), self.mesh.clone(), shutdown.clone()));
            let mesh = self.mesh.clone().map(|m| {
                tokio::spawn(m.run(client.clone(), self.cfg.node_id.clone(), shutdown.clone()).in_current_span())
            });
            let ctx = RunnerCtx {
                client: client.clone(),
                node: self.cfg.node_id.clone(),
                drivers: self.drivers.clone(),
                ports: self.ports.clone(),
                shutdown: shutdown.clone(),
                mesh: self.mesh.clone(),
            };
            let unknown = if self.cfg.discard_unknown_workloads {
                UnknownWorkloads::Discard
            } else {
                UnknownWorkloads::StopIfNodeKnown { node_new_to_store }
            };
            let mut state = Reconciler::new(ctx, recovered, unknown);
            // Runners that end after the last change still get their leftovers pruned.
            let mut prune_tick = tokio::time::interval(PRUNE_EVERY);
            loop {
                match client.watch(Some("task"), Some(&self.cfg.node_id)).await {
                    Ok(mut stream) => {
                        let mut mirror = Mirror::default();
                        // Until the first message (a snapshot) the mirror knows no task.
                        let mut synced = false;
                        loop {
                            tokio::select! {
                                msg = stream.next() => match msg {
                                    Some(Ok(m)) => {
                                        mirror.apply(m);
                                        synced = true;
                                        state.reconcile(&mirror);
                                    }
                                    Some(Err(e)) => {
                                        tracing::warn!(error = %e, "task watch failed");
                                        break;
                                    }
                                    None => break,
                                },
                                _ = prune_tick.tick(), if synced => state.prune(&mirror),
                                _ = shutdown.changed() => {}
                            }
                            if *shutdown.borrow() {
                                break;
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot watch tasks; workloads keep running"),
                }
                if sleep_or_shutdown(Duration::from_millis(500), &mut shutdown).await {
                    break;
                }
            }
            state.join().await;
            let _ = heartbeat.await;
            let _ = logs.await;
            if let Some(mesh) = mesh {
                let _ = mesh.await;
            }
        }
        .instrument(span)
        .await
    }
}

/// File in the state dir holding this agent's owner key (see `docker::LABEL_OWNER`).
const OWNER_FILE: &str = "owner";

/// This agent instance's owner key: random on first start, then read back, so an agent restarted
/// or upgraded on the same state dir re-adopts its containers and nobody else's.
fn owner_key(state_dir: &std::path::Path) -> Result<String, AgentError> {
    let path = state_dir.join(OWNER_FILE);
    let io = |source| AgentError::StateFile {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    std::fs::create_dir_all(state_dir).map_err(io)?;
    let key = format!("{:016x}", rand::random::<u64>());
    // Written whole to a temp file and renamed, so a crash never leaves a half-written key.
    let tmp = state_dir.join(format!("{OWNER_FILE}.tmp"));
    std::fs::write(&tmp, format!("{key}\n")).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(key)
}

/// Sleeps; returns true if shutdown was requested meanwhile.
pub(crate) async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.changed() => {}
    }
    *shutdown.borrow()
}

fn node_resources() -> NodeResources {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    NodeResources {
        cpu_millis: cpus * 1000,
        memory_bytes: memory,
    }
}

/// Facts about the node that change while the agent runs and belong in its node record.
struct Reported {
    /// Published ports the mesh cannot serve (`node ls`/`inspect`).
    port_conflicts: Option<watch::Receiver<Vec<String>>>,
    /// Image tags present on the node (the scheduler's image preference).
    images: Option<watch::Receiver<Vec<String>>>,
}

/// Takes `rx`'s value into `field` if it changed since last seen; true if it did.
fn take_changed(rx: Option<&mut watch::Receiver<Vec<String>>>, field: &mut Vec<String>) -> bool {
    match rx.filter(|rx| rx.has_changed().unwrap_or(false)) {
        Some(rx) => {
            *field = rx.borrow_and_update().clone();
            true
        }
        None => false,
    }
}

async fn heartbeat_loop(
    client: Client,
    mut reg: NodeRegistration,
    mut reported: Reported,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    // A manager that accepts the connection but never answers must not hold heartbeats past
    // the node's grace period (the node would be marked down and its tasks replaced): give up
    // on it after two intervals, which also moves the shared client to the next manager.
    let client = client.with_request_timeouts(every * 2, every * 2);
    let mut reregister = false;
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        // Changed facts go into the node record by registering again, which refreshes only
        // what the agent reports (operators' availability and labels are kept).
        reregister |= take_changed(reported.port_conflicts.as_mut(), &mut reg.port_conflicts);
        reregister |= take_changed(reported.images.as_mut(), &mut reg.images);
        if reregister {
            match client.register_node(&reg).await {
                Ok(_) => {
                    reregister = false;
                    tracing::info!(
                        conflicts = ?reg.port_conflicts,
                        images = reg.images.len(),
                        "reported changed port conflicts or images"
                    )
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reporting changed node facts failed; retrying")
                }
            }
        }
        // Sent on a fixed beat, without waiting for the previous answer: under a big deploy a
        // heartbeat's write queues behind the controller's, and waiting for it stretched the
        // beat to interval + write latency, until the node looked overdue to its own manager.
        // Each request gives up after two intervals, so at most a few are in flight.
        while in_flight.try_join_next().is_some() {}
        in_flight.spawn(heartbeat_once(client.clone(), reg.clone()));
        if sleep_or_shutdown(every, &mut shutdown).await {
            return;
        }
    }
}

/// One heartbeat; registers the node again when the manager no longer knows it.
async fn heartbeat_once(client: Client, reg: NodeRegistration) {
    match client.heartbeat(&reg.id, &Heartbeat { at: now_ms() }).await {
        Ok(_) => {}
        Err(e) if e.code() == Some("not_found") => {
            // The node record is gone (removed, or a fresh store): register again.
            if let Err(e) = client.register_node(&reg).await {
                tracing::warn!(error = %e, "re-registering failed");
            }
        }
        Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
    }
}

/// How the agent server tells its manager from anyone else who connects.
#[derive(Clone)]
enum ServerAuth {
    /// Cluster nodes: TLS whose config accepts only manager certificates.
    Mtls(Arc<rustls::ServerConfig>),
    /// Loopback plain HTTP: every request must carry this bearer secret.
    Bearer(Arc<str>),
}

/// Serves `GET /tasks/{id}/logs?follow=&tail=`, `GET /tasks/{id}/stats` and
/// `POST /tasks/{id}/resources` (a `Resources` body) for the manager to proxy, to the manager
/// only (see [`ServerAuth`]).
async fn serve_logs(
    listener: tokio::net::TcpListener,
    auth: ServerAuth,
    drivers: BTreeMap<DriverKind, Arc<dyn Driver>>,
    mesh: Option<Arc<MeshNode>>,
    mut shutdown: watch::Receiver<bool>,
) {
    use axum::extract::{Path, Query, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};

    #[derive(serde::Deserialize)]
    struct LogQuery {
        #[serde(default)]
        follow: bool,
        tail: Option<usize>,
    }
    type Drivers = Arc<BTreeMap<DriverKind, Arc<dyn Driver>>>;
    async fn logs(
        State(drivers): State<Drivers>,
        Path(id): Path<String>,
        Query(q): Query<LogQuery>,
    ) -> Response {
        for d in drivers.values() {
            match d.logs(&id, q.tail, q.follow).await {
                Ok(stream) => {
                    let body = axum::body::Body::from_stream(
                        stream.map(|r| r.map_err(std::io::Error::other)),
                    );
                    return ([("content-type", "text/plain; charset=utf-8")], body).into_response();
                }
                Err(DriverError::NotFound(_)) => continue,
                Err(e) => {
                    return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                }
            }
        }
        (
            StatusCode::NOT_FOUND,
            format!("no logs for task {id} on this node"),
        )
            .into_response()
    }
    async fn stats(State(drivers): State<Drivers>, Path(id): Path<String>) -> Response {
        for d in drivers.values() {
            match d.stats(&id).await {
                Ok(stats) => return axum::Json(stats).into_response(),
                Err(DriverError::NotFound(_)) => continue,
                Err(e) => return driver_error_response(e),
            }
        }
        (
            StatusCode::NOT_FOUND,
            format!("task {id} is not on this node"),
        )
            .into_response()
    }
    async fn update_resources(
        State(drivers): State<Drivers>,
        Path(id): Path<String>,
        axum::Json(limits): axum::Json<flotilla_types::Resources>,
    ) -> Response {
        for d in drivers.values() {
            match d.update_resources(&id, &limits).await {
                Ok(()) => return StatusCode::NO_CONTENT.into_response(),
                Err(DriverError::NotFound(_)) => continue,
                Err(e) => return driver_error_response(e),
            }
        }
        (
            StatusCode::NOT_FOUND,
            format!("task {id} is not on this node"),
        )
            .into_response()
    }
    fn driver_error_response(e: DriverError) -> Response {
        let status = match e {
            DriverError::Invalid { .. } => StatusCode::BAD_REQUEST,
            DriverError::NotRunning(_) | DriverError::Refused { .. } => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, e.to_string()).into_response()
    }
    let app = axum::Router::new()
        .route("/tasks/{id}/logs", axum::routing::get(logs))
        .route("/tasks/{id}/stats", axum::routing::get(stats))
        .route(
            "/tasks/{id}/resources",
            axum::routing::post(update_resources),
        )
        .with_state(Arc::new(drivers));
    let app = match mesh {
        Some(mesh) => app.merge(mesh.routes()),
        None => app,
    };
    // Without mTLS every request must carry the node's agent secret (the mesh routes too).
    let (tls, app) = match auth {
        ServerAuth::Mtls(tls) => (Some(tls), app),
        ServerAuth::Bearer(secret) => (
            None,
            app.layer(axum::middleware::from_fn(move |req, next| {
                crate::agent_auth::require_secret(secret.clone(), req, next)
            })),
        ),
    };
    let gate = ConnGate::new("agent server", ListenerKind::AgentServer.default_cap());
    let stopped = async move {
        let _ = until_true(&mut shutdown).await;
    };
    match tls {
        Some(tls) => serve_mtls(listener, tls, app, gate, stopped).await,
        None => serve_plain(listener, app, gate, stopped).await,
    }
}

/// Serves `app` over plain HTTP until `stopped` resolves.
async fn serve_plain(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    gate: Arc<ConnGate>,
    stopped: impl std::future::Future<Output = ()>,
) {
    accept_loop(listener, gate, stopped, move |tcp, peer| {
        serve_http(hyper_util::rt::TokioIo::new(tcp), peer, app.clone())
    })
    .await;
}

/// A client that has not finished the TLS handshake by then is dropped, so half-open
/// connections cannot pile up.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` over TLS until `stopped` resolves. The config decides who may connect (on
/// cluster nodes: managers only); each handshake runs in its own task so a slow client holds
/// up nobody else.
async fn serve_mtls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    gate: Arc<ConnGate>,
    stopped: impl std::future::Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    accept_loop(listener, gate, stopped, move |tcp, peer| {
        let acceptor = acceptor.clone();
        let app = app.clone();
        async move {
            let stream =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "agent server: TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "agent server: TLS handshake timed out");
                        return;
                    }
                };
            serve_http(hyper_util::rt::TokioIo::new(stream), peer, app).await;
        }
    })
    .await;
}

/// Serves one connection with the shared header (and keep-alive idle) timeout.
async fn serve_http<I>(io: I, peer: std::net::SocketAddr, app: axum::Router)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let builder = http_server(HEADER_READ_TIMEOUT);
    if let Err(e) = builder.serve_connection_with_upgrades(io, service).await {
        tracing::debug!(%peer, error = %e, "agent server: connection ended with an error");
    }
}
