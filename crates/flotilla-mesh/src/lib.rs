//! The routing mesh: every node answers on every published port and forwards each connection
//! (TCP) or request (HTTP) to a healthy task, balanced by weight and load, with draining,
//! retries and circuit breakers.
//!
//! [`Mesh::apply`] takes a complete [`RouteTable`] (usually [`RouteTable::from_cluster`]) and
//! swaps it in without dropping connections. [`dns::serve`] answers `<service>.flotilla` lookups
//! with the mesh address, and [`bench`] compares the mesh with a direct connection.
#![forbid(unsafe_code)]

mod balancer;
pub mod bench;
mod breaker;
mod budget;
pub mod conn_limits;
pub mod dns;
mod http_proxy;
mod listener;
mod metrics;
mod routes;
mod runtime;
mod tcp_proxy;
mod workers;

pub use metrics::{
    BreakerState, ClientConnections, ErrorCounts, LatencySummary, MeshStats, ServiceStats,
    TaskStats,
};
pub use routes::{Backend, RouteTable, ServicePort, ServiceRoutes};

use listener::Listener;
use runtime::{Registry, Routing};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Node-level settings of the mesh (per-service settings live in `MeshSpec`).
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Address every published port listens on.
    pub bind_ip: IpAddr,
    /// Longest wait for a backend to accept a connection before trying another.
    pub connect_timeout: Duration,
    /// Longest wait for a backend's response headers.
    pub response_timeout: Duration,
    /// A client must send complete request headers within this time (slowloris defence).
    pub header_read_timeout: Duration,
    /// Largest request head accepted; bigger ones get 431. At least 8 KiB (smaller is raised).
    pub max_header_bytes: usize,
    /// Request bodies up to this size are buffered so the request can be retried elsewhere;
    /// larger or unsized bodies are streamed and never retried.
    pub max_replay_body_bytes: usize,
    /// How long an idle connection to a backend is reused (connections are kept per client
    /// connection, for its next requests).
    pub pool_idle_timeout: Duration,
    /// How long [`Mesh::shutdown`] lets open connections finish before cutting them.
    pub shutdown_grace: Duration,
    /// Threads that run connections, each with its own event loop (0: one per core).
    pub workers: usize,
    /// Open client connections allowed per published port, and on all of them together;
    /// further ones are closed at once. 0: the mesh's share of the descriptor budget (see
    /// [`conn_limits`]).
    pub max_connections: usize,
    /// A TCP connection with no bytes in either direction for this long is closed.
    pub tcp_idle_timeout: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_replay_body_bytes: 64 * 1024,
            pool_idle_timeout: Duration::from_secs(90),
            shutdown_grace: Duration::from_secs(30),
            workers: 0,
            max_connections: 0,
            tcp_idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// hyper refuses read buffers below this size.
const MIN_HEADER_BYTES: usize = 8 * 1024;

impl MeshConfig {
    /// Checks settings that come from users (flags, config files) before [`Mesh::new`].
    pub fn validate(&self) -> Result<(), MeshError> {
        for (field, value) in [
            ("connect_timeout", self.connect_timeout),
            ("response_timeout", self.response_timeout),
            ("header_read_timeout", self.header_read_timeout),
            ("tcp_idle_timeout", self.tcp_idle_timeout),
        ] {
            if value.is_zero() {
                return Err(MeshError::Config {
                    field,
                    reason: "must be longer than 0s".to_string(),
                });
            }
        }
        if self.max_header_bytes < MIN_HEADER_BYTES {
            return Err(MeshError::Config {
                field: "max_header_bytes",
                reason: format!(
                    "{} is below the {MIN_HEADER_BYTES}-byte minimum",
                    self.max_header_bytes
                ),
            });
        }
        Ok(())
    }
}

/// Why (part of) a route update could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot listen on port {port}: {source}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    /// Two services claim the port incompatibly, or it cannot be published at all.
    #[error("port {port} is not served: {reason}")]
    PortRejected { port: u16, reason: String },
    #[error("mesh config {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("{}", join_errors(.0))]
    Several(Vec<MeshError>),
}

impl MeshError {
    /// One line per problem (a [`MeshError::Several`] is split up), for reports that list them.
    pub fn problems(&self) -> Vec<String> {
        match self {
            MeshError::Several(errors) => errors.iter().flat_map(MeshError::problems).collect(),
            other => vec![other.to_string()],
        }
    }
}

fn join_errors(errors: &[MeshError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// State shared by the mesh handle, its listeners and every proxied connection.
pub(crate) struct Shared {
    pub cfg: MeshConfig,
    routing: RwLock<Arc<Routing>>,
    /// Bumped after every swap of `routing`, so a connection can keep its snapshot and check
    /// one atomic per request instead of taking the lock (whose reader count every connection
    /// on every core would otherwise write to).
    routing_generation: AtomicU64,
    registry: Mutex<Registry>,
    /// Cancelled on shutdown: HTTP connections finish their current request and close.
    pub drain: CancellationToken,
    /// Cancelled when the shutdown grace is over: every connection is cut.
    pub kill: CancellationToken,
    pub connections: TaskTracker,
    pub workers: workers::Workers,
    /// Client connections open on all published ports together.
    pub gate: Arc<conn_limits::ConnGate>,
    /// Connections refused by a port's own cap (the ports' gates come and go).
    pub port_refusals: AtomicU64,
}

impl Shared {
    /// Client connections open, allowed and refused on all published ports together; refusals
    /// by a port's own cap count too.
    fn client_connections(&self) -> ClientConnections {
        let listeners_refused = self.port_refusals.load(Ordering::Relaxed);
        ClientConnections {
            open: self.gate.open() as u64,
            cap: self.gate.cap() as u64,
            refused: self.gate.refused() + listeners_refused,
        }
    }

    /// The current snapshot's generation (see [`Shared::refresh_routing`]).
    pub fn routing_generation(&self) -> u64 {
        self.routing_generation.load(Ordering::Acquire)
    }

    /// Refreshes a cached snapshot if a newer one was swapped in since `cached.0`.
    pub fn refresh_routing(&self, cached: &mut (u64, Arc<Routing>)) {
        let generation = self.routing_generation();
        if cached.0 != generation {
            // Read the generation before the snapshot: a swap in between only makes the next
            // request refresh once more.
            *cached = (generation, self.routing());
        }
    }

    /// The current routing snapshot.
    pub fn routing(&self) -> Arc<Routing> {
        // The lock only guards an Arc swap, so a poisoned lock still holds a whole snapshot.
        self.routing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The mesh proxy of one node.
pub struct Mesh {
    shared: Arc<Shared>,
    listeners: tokio::sync::Mutex<BTreeMap<u16, Listener>>,
}

impl Mesh {
    /// A mesh with no listeners yet. `max_header_bytes` below 8 KiB is raised to 8 KiB; use
    /// [`MeshConfig::validate`] to reject such settings instead.
    pub fn new(mut cfg: MeshConfig) -> Self {
        cfg.max_header_bytes = cfg.max_header_bytes.max(MIN_HEADER_BYTES);
        if cfg.max_connections == 0 {
            cfg.max_connections = conn_limits::ListenerKind::Mesh.default_cap();
        }
        Mesh {
            shared: Arc::new(Shared {
                routing: RwLock::new(Arc::new(Routing::default())),
                routing_generation: AtomicU64::new(0),
                registry: Mutex::new(Registry::default()),
                drain: CancellationToken::new(),
                kill: CancellationToken::new(),
                connections: TaskTracker::new(),
                workers: workers::Workers::start(cfg.workers),
                gate: conn_limits::ConnGate::new("mesh", cfg.max_connections),
                port_refusals: AtomicU64::new(0),
                cfg,
            }),
            listeners: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Hot update: opens listeners for new published ports, closes removed ones (their open
    /// connections finish), and swaps backends, weights and routes without dropping
    /// connections. Bind errors and port conflicts are returned, naming the port, but do not
    /// affect other ports; a port that failed to bind is retried on the next `apply`.
    pub async fn apply(&self, table: RouteTable) -> Result<(), MeshError> {
        let (plans, mut errors) = routes::plan_ports(&table);
        let mut listeners = self.listeners.lock().await;
        let routing = self.shared.registry().build(&table, plans);
        let wanted: Vec<u16> = routing.ports.keys().copied().collect();
        *self
            .shared
            .routing
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(routing);
        self.shared
            .routing_generation
            .fetch_add(1, Ordering::Release);
        let removed: Vec<u16> = listeners
            .keys()
            .filter(|p| !wanted.contains(p))
            .copied()
            .collect();
        for port in removed {
            if let Some(listener) = listeners.remove(&port) {
                listener.close().await;
                tracing::info!(port, "mesh listener closed");
            }
        }
        for port in wanted {
            if listeners.contains_key(&port) {
                continue;
            }
            match Listener::bind(&self.shared, port) {
                Ok(listener) => {
                    tracing::info!(port, addr = %listener.local_addr, "mesh listener open");
                    listeners.insert(port, listener);
                }
                Err(source) => {
                    tracing::warn!(port, error = %source, "mesh listener failed to bind");
                    errors.push(MeshError::Bind { port, source });
                }
            }
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(MeshError::Several(errors)),
        }
    }

    /// Counters, latency and breaker state per service and per task.
    pub fn stats(&self) -> MeshStats {
        let mut stats = self.shared.registry().stats();
        stats.clients = self.shared.client_connections();
        stats
    }

    /// Requests and connections in progress on a task, including after it left the table, so
    /// a controller can wait for zero before stopping it.
    pub fn in_flight(&self, task_id: &str) -> u64 {
        self.shared.registry().in_flight(task_id)
    }

    /// [`Mesh::stats`] in the Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let stats = self.stats();
        let mut text = metrics::prometheus(&stats);
        text.push_str(&stats.clients.prometheus());
        text
    }

    /// Stops accepting, lets open connections finish for up to `shutdown_grace`, then cuts them.
    pub async fn shutdown(&self) {
        let mut listeners = self.listeners.lock().await;
        for (_, listener) in std::mem::take(&mut *listeners) {
            listener.close().await;
        }
        self.shared.drain.cancel();
        self.shared.connections.close();
        let grace = self.shared.cfg.shutdown_grace;
        if tokio::time::timeout(grace, self.shared.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.shared.connections.len(),
                "mesh shutdown grace over; cutting connections"
            );
            self.shared.kill.cancel();
            self.shared.connections.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_field() {
        assert!(MeshConfig::default().validate().is_ok());
        let cfg = MeshConfig {
            header_read_timeout: Duration::ZERO,
            ..MeshConfig::default()
        };
        let err = cfg.validate().unwrap_err();
        assert!(matches!(
            err,
            MeshError::Config {
                field: "header_read_timeout",
                ..
            }
        ));
        let cfg = MeshConfig {
            max_header_bytes: 100,
            ..MeshConfig::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_header_bytes"));
    }
}
