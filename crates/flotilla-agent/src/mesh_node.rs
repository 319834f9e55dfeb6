//! This node's part of the routing mesh: keeps a [`Mesh`] in step with the whole cluster,
//! answers discovery (`<SERVICE>_ADDR` variables and DNS), serves the mesh's stats, and drains a
//! task's traffic before the agent stops it.
//!
//! The node follows the manager's watch stream for every service, task and node, rebuilds the
//! [`RouteTable`] with [`RouteTable::from_cluster`] after each burst of changes and applies it.
//! So every node answers on every published port, whether or not it runs any of the tasks.

use crate::docker::ContainerDns;
use flotilla_client::{Client, Mirror};
use flotilla_mesh::{Mesh, MeshConfig, RouteTable};
use flotilla_types::{PortProtocol, Service, Task};
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Changes arriving within this window are folded into one table rebuild.
const DEBOUNCE: Duration = Duration::from_millis(30);
/// A port that failed to bind (held by something else on the host) is retried this often.
const BIND_RETRY: Duration = Duration::from_secs(5);
/// How often a draining task's traffic is checked.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// How long a starting task waits for the first cluster snapshot, so its `<SERVICE>_ADDR`
/// variables are complete.
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(5);
/// The name containers reach their host by: the docker driver maps it to the engine's bridge
/// gateway (`host-gateway`), an address of this host.
pub const CONTAINER_HOST: &str = "host.docker.internal";
/// This host's resolvers, which containers' other DNS queries are forwarded to.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Node-level mesh settings (from `flotilla up` / `flotilla agent` flags).
#[derive(Debug, Clone)]
pub struct MeshNodeConfig {
    /// Address published ports listen on.
    pub bind_ip: IpAddr,
    /// Where the DNS responder for `<service>.flotilla` listens; `None` runs none.
    pub dns_addr: Option<SocketAddr>,
    /// Open connections allowed per published port and on all together (0: the mesh's share
    /// of the descriptor budget).
    pub max_connections: usize,
    /// TCP connections idle this long are closed.
    pub tcp_idle_timeout: std::time::Duration,
}

impl Default for MeshNodeConfig {
    fn default() -> Self {
        let mesh = MeshConfig::default();
        MeshNodeConfig {
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dns_addr: None,
            max_connections: mesh.max_connections,
            tcp_idle_timeout: mesh.tcp_idle_timeout,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeshNodeError {
    #[error(
        "--mesh-bind {0}: the DNS responder answers with an IPv4 address; use an IPv4 bind address"
    )]
    Ipv6Dns(IpAddr),
    #[error("--dns-addr {addr}: cannot listen: {source}")]
    DnsBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The mesh of one node and what it knows about the cluster.
pub struct MeshNode {
    mesh: Mesh,
    cfg: MeshNodeConfig,
    /// Published services: name → first published port (what discovery hands out). Shared
    /// with the DNS responders.
    published: Arc<RwLock<BTreeMap<String, u16>>>,
    /// Bridge gateways a DNS responder for containers listens on (see [`ContainerDns`]).
    container_dns: tokio::sync::Mutex<BTreeSet<Ipv4Addr>>,
    /// Turns true once the first cluster snapshot was applied.
    synced: watch::Sender<bool>,
    /// Port problems of the last apply, shown in the stats (`conflicts`) and reported to the
    /// manager by the agent (the node's `port_conflicts`).
    conflicts: watch::Sender<Vec<String>>,
    /// Whether the loopback-only warning for containers was logged (it is, once per node).
    loopback_warned: AtomicBool,
}

impl MeshNode {
    pub fn new(cfg: MeshNodeConfig) -> Result<Arc<Self>, MeshNodeError> {
        if cfg.dns_addr.is_some() && cfg.bind_ip.is_ipv6() {
            return Err(MeshNodeError::Ipv6Dns(cfg.bind_ip));
        }
        Ok(Arc::new(MeshNode {
            mesh: Mesh::new(MeshConfig {
                bind_ip: cfg.bind_ip,
                max_connections: cfg.max_connections,
                tcp_idle_timeout: cfg.tcp_idle_timeout,
                ..MeshConfig::default()
            }),
            cfg,
            published: Arc::new(RwLock::new(BTreeMap::new())),
            container_dns: tokio::sync::Mutex::new(BTreeSet::new()),
            synced: watch::channel(false).0,
            conflicts: watch::channel(Vec::new()).0,
            loopback_warned: AtomicBool::new(false),
        }))
    }

    /// The address workloads on this node use to reach the mesh: the bind address, or loopback
    /// when the mesh listens on every interface.
    pub fn local_ip(&self) -> Ipv4Addr {
        match self.cfg.bind_ip {
            IpAddr::V4(ip) if !ip.is_unspecified() => ip,
            _ => Ipv4Addr::LOCALHOST,
        }
    }

    /// `<SERVICE>_ADDR=<mesh ip>:<published port>` for every published service (upper case,
    /// `-` → `_`). Waits briefly for the first cluster snapshot so a task started right after
    /// the agent sees every service.
    pub async fn discovery_env(&self) -> BTreeMap<String, String> {
        self.discovery_env_at(&self.local_ip().to_string()).await
    }

    /// [`MeshNode::discovery_env`] for a container on a bridge network: the mesh through the
    /// bridge gateway ([`CONTAINER_HOST`]) when it listens on every interface, else at its
    /// bind address (a loopback bind is out of a container's reach; this is logged once).
    pub async fn container_discovery_env(&self) -> BTreeMap<String, String> {
        let host = match self.cfg.bind_ip {
            ip if ip.is_unspecified() => CONTAINER_HOST.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
        let env = self.discovery_env_at(&host).await;
        self.warn_unreachable_once(&env);
        env
    }

    /// Logs, once per node, that containers cannot reach a mesh bound to loopback, when that
    /// matters: a container is handed addresses of published services. True if it logged.
    fn warn_unreachable_once(&self, env: &BTreeMap<String, String>) -> bool {
        let IpAddr::V4(v4) = self.cfg.bind_ip else {
            return false;
        };
        if !v4.is_loopback() || env.is_empty() || self.loopback_warned.swap(true, Ordering::Relaxed)
        {
            return false;
        }
        tracing::warn!(ip = %v4, "the mesh listens on loopback only; containers cannot reach the published services (use --mesh-bind 0.0.0.0)");
        true
    }

    async fn discovery_env_at(&self, host: &str) -> BTreeMap<String, String> {
        let mut synced = self.synced.subscribe();
        let _ = tokio::time::timeout(FIRST_SYNC_WAIT, synced.wait_for(|s| *s)).await;
        read(&self.published)
            .iter()
            .map(|(service, port)| (addr_variable(service), format!("{host}:{port}")))
            .collect()
    }

    /// Answers DNS on `socket`: published services with `answer_ip`, other names through
    /// `upstreams`.
    fn spawn_dns(
        &self,
        socket: tokio::net::UdpSocket,
        answer_ip: Ipv4Addr,
        upstreams: Vec<SocketAddr>,
    ) {
        let published = self.published.clone();
        let known = move |name: &str| read(&published).contains_key(name);
        tokio::spawn(async move {
            if let Err(e) = flotilla_mesh::dns::serve(socket, known, answer_ip, upstreams).await {
                tracing::error!(error = %e, "mesh DNS responder failed");
            }
        });
    }

    /// Follows the cluster until `shutdown`, then closes the mesh's listeners (open connections
    /// get the mesh's shutdown grace).
    pub async fn run(
        self: Arc<Self>,
        client: Client,
        node_id: String,
        mut shutdown: watch::Receiver<bool>,
    ) {
        if let Some(addr) = self.cfg.dns_addr {
            match tokio::net::UdpSocket::bind(addr).await {
                Ok(socket) => {
                    tracing::info!(%addr, "mesh DNS responder listening");
                    // Only the mesh's names here: this responder is no general resolver.
                    self.spawn_dns(socket, self.local_ip(), Vec::new());
                }
                Err(source) => {
                    let e = MeshNodeError::DnsBind { addr, source };
                    tracing::warn!(error = %e, "no mesh DNS on this node");
                }
            }
        }
        loop {
            match client.watch(None, None).await {
                Ok(stream) => self.follow(stream, &node_id, &mut shutdown).await,
                Err(e) => {
                    tracing::warn!(error = %e, "mesh cannot watch the cluster; keeps its last routes")
                }
            }
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
        }
        self.mesh.shutdown().await;
    }

    /// Applies one watch stream until it ends or shutdown.
    async fn follow(
        &self,
        mut stream: futures::stream::BoxStream<
            'static,
            Result<flotilla_types::api::WatchMessage, flotilla_client::ClientError>,
        >,
        node_id: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let mut mirror = Mirror::default();
        let mut applied: Option<RouteTable> = None;
        // When to rebuild after the first change of a burst, and when to retry failed binds.
        let mut rebuild_at: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        loop {
            let next = rebuild_at
                .into_iter()
                .chain(retry_at)
                .min()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(Ok(m)) => {
                        mirror.apply(m);
                        rebuild_at.get_or_insert_with(|| Instant::now() + DEBOUNCE);
                        continue;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "mesh watch failed");
                        return;
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(next) => {}
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return;
                    }
                    continue;
                }
            }
            let retrying = retry_at.take().is_some();
            rebuild_at = None;
            let services: Vec<Service> = mirror.services.values().cloned().collect();
            let tasks: Vec<Task> = mirror.tasks.values().cloned().collect();
            let nodes: Vec<_> = mirror.nodes.values().cloned().collect();
            let table = RouteTable::from_cluster(&services, &tasks, &nodes, node_id);
            *write(&self.published) = published_ports(&services);
            if !retrying && applied.as_ref() == Some(&table) {
                self.synced.send_replace(true);
                continue;
            }
            let conflicts = match self.mesh.apply(table.clone()).await {
                Ok(()) => Vec::new(),
                Err(e) => {
                    // A published port held by something else on this host, or claimed by two
                    // services: the other ports still serve; this one is retried.
                    tracing::warn!(error = %e, "some published ports are not served on this node");
                    retry_at = Some(Instant::now() + BIND_RETRY);
                    e.problems()
                }
            };
            self.conflicts.send_if_modified(|old| {
                let changed = *old != conflicts;
                *old = conflicts;
                changed
            });
            applied = Some(table);
            self.synced.send_replace(true);
        }
    }

    /// Follows the published ports this node's mesh cannot serve (empty when all are served).
    pub fn port_conflicts(&self) -> watch::Receiver<Vec<String>> {
        self.conflicts.subscribe()
    }

    /// Requests and connections in progress on a task through this node's mesh.
    pub fn in_flight(&self, task_id: &str) -> u64 {
        self.mesh.in_flight(task_id)
    }

    /// Waits until no node's mesh routes new work to `task` and none has any in flight on it,
    /// for at most the service's `drain_timeout`. Asks the manager, which sums every node's
    /// mesh. Returns early (false) when `shutdown` turns true.
    pub async fn drain(
        &self,
        client: &Client,
        task: &Task,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        if !task.spec.ports.iter().any(|p| p.published.is_some()) {
            return true;
        }
        let timeout = task.spec.mesh.drain_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let busy = match client.service_traffic(&task.service).await {
                Ok(traffic) => traffic
                    .tasks
                    .iter()
                    .find(|t| t.task_id == task.id)
                    .map(|t| (t.routed_by, t.in_flight)),
                Err(e) => {
                    // Without the cluster-wide view, this node's own mesh is the best we know.
                    tracing::debug!(error = %e, "traffic unavailable; using this node's mesh only");
                    Some((0, self.in_flight(&task.id))).filter(|(_, n)| *n > 0)
                }
            };
            match busy {
                None | Some((0, 0)) => return true,
                Some((routed_by, in_flight)) => {
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(
                            routed_by,
                            in_flight,
                            ?timeout,
                            "drain timeout over; stopping the task anyway"
                        );
                        return true;
                    }
                    tracing::debug!(routed_by, in_flight, "draining");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(DRAIN_POLL) => {}
                _ = shutdown.wait_for(|s| *s) => return false,
            }
        }
    }

    /// `GET /mesh/stats` (JSON: `MeshStats` plus port conflicts) and `GET /metrics`
    /// (Prometheus text), for the agent's HTTP server.
    pub fn routes(self: &Arc<Self>) -> axum::Router {
        use axum::extract::State;
        async fn stats(State(node): State<Arc<MeshNode>>) -> axum::Json<serde_json::Value> {
            axum::Json(serde_json::json!({
                "stats": node.mesh.stats(),
                "conflicts": *node.conflicts.borrow(),
            }))
        }
        async fn metrics(State(node): State<Arc<MeshNode>>) -> impl axum::response::IntoResponse {
            (
                [("content-type", "text/plain; version=0.0.4")],
                node.mesh.prometheus(),
            )
        }
        axum::Router::new()
            .route("/mesh/stats", axum::routing::get(stats))
            .route("/metrics", axum::routing::get(metrics))
            .with_state(self.clone())
    }
}

/// Containers resolve `<service>.flotilla` through a responder on their network's gateway,
/// which answers with the mesh address they reach (the gateway itself when the mesh listens on
/// every interface) and forwards every other name to this host's resolvers. The engine's
/// embedded DNS stays in front and still answers container names.
#[async_trait::async_trait]
impl ContainerDns for MeshNode {
    async fn serve_on(&self, gateway: Ipv4Addr) -> Option<Ipv4Addr> {
        let answer_ip = match self.cfg.bind_ip {
            ip if ip.is_unspecified() => gateway,
            IpAddr::V4(v4) if !v4.is_loopback() => v4,
            // Containers cannot reach the mesh (see `container_discovery_env`).
            _ => return None,
        };
        let mut served = self.container_dns.lock().await;
        if served.contains(&gateway) {
            return Some(gateway);
        }
        let addr = SocketAddr::from((gateway, 53));
        let socket = match tokio::net::UdpSocket::bind(addr).await {
            Ok(socket) => socket,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "no mesh DNS for containers on this network; they keep the engine's DNS");
                return None;
            }
        };
        let upstreams = match std::fs::read_to_string(RESOLV_CONF) {
            Ok(text) => flotilla_mesh::dns::nameservers(&text),
            Err(e) => {
                tracing::warn!(error = %e, file = RESOLV_CONF, "containers will resolve only mesh names");
                Vec::new()
            }
        };
        tracing::info!(%addr, ?upstreams, "mesh DNS responder for containers listening");
        self.spawn_dns(socket, answer_ip, upstreams);
        served.insert(gateway);
        Some(gateway)
    }
}

/// The lock only guards plain data, so a poisoned lock still holds a consistent value.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// Services with a published tcp port, each with its first one.
fn published_ports(services: &[Service]) -> BTreeMap<String, u16> {
    services
        .iter()
        .filter_map(|s| {
            let port = s
                .spec
                .ports
                .iter()
                .filter(|p| p.protocol == PortProtocol::Tcp && p.mode.is_ingress())
                .find_map(|p| p.published)?;
            Some((s.name.clone(), port))
        })
        .collect()
}

/// `web-api` → `WEB_API_ADDR`.
pub fn addr_variable(service: &str) -> String {
    format!("{}_ADDR", service.to_ascii_uppercase().replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_names() {
        assert_eq!(addr_variable("web-api"), "WEB_API_ADDR");
        assert_eq!(addr_variable("db"), "DB_ADDR");
    }

    #[test]
    fn local_ip_is_loopback_for_the_wildcard() {
        let node = MeshNode::new(MeshNodeConfig::default()).unwrap();
        assert_eq!(node.local_ip(), Ipv4Addr::LOCALHOST);
        let node = MeshNode::new(MeshNodeConfig {
            bind_ip: "127.0.0.2".parse().unwrap(),
            dns_addr: None,
            ..MeshNodeConfig::default()
        })
        .unwrap();
        assert_eq!(node.local_ip(), Ipv4Addr::new(127, 0, 0, 2));
        assert!(MeshNode::new(MeshNodeConfig {
            bind_ip: "::1".parse().unwrap(),
            dns_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..MeshNodeConfig::default()
        })
        .is_err());
    }

    /// The loopback warning comes once per node, and only when a container is handed
    /// addresses it cannot reach (#21: it came once per container, published ports or not).
    #[tokio::test]
    async fn loopback_warning_once_and_only_when_it_matters() {
        let node = MeshNode::new(MeshNodeConfig {
            bind_ip: "127.0.0.1".parse().unwrap(),
            dns_addr: None,
            ..MeshNodeConfig::default()
        })
        .unwrap();
        node.synced.send_replace(true);
        assert!(node.container_discovery_env().await.is_empty());
        assert!(
            !node.warn_unreachable_once(&BTreeMap::new()),
            "nothing published: nothing to warn about"
        );
        write(&node.published).insert("web".into(), 8080);
        let env = node.container_discovery_env().await;
        assert_eq!(env["WEB_ADDR"], "127.0.0.1:8080");
        assert!(
            node.loopback_warned.load(Ordering::Relaxed),
            "warned once a container got an unreachable address"
        );
        for _ in 0..50 {
            assert!(!node.warn_unreachable_once(&env), "warned twice");
        }
        let wildcard = MeshNode::new(MeshNodeConfig::default()).unwrap();
        assert!(!wildcard.warn_unreachable_once(&env));
    }
}
