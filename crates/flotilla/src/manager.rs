//! The one place a manager is assembled: store, API servers (the local Unix socket, plain
//! HTTP with a token and, in a secure cluster, mutual TLS), the controllers with their view of the meshes, and the node whose
//! agent runs alongside. `flotilla up`, `init`, `join`, a promoted worker and the control-plane
//! benchmark all start their manager here, so every one of them gets the same parts.

use anyhow::{bail, Context};
use flotilla_api::cluster::ClusterSecurity;
use flotilla_api::AppState;
use flotilla_controllers::{ControllerConfig, ControllerRunner};
use flotilla_pki::{NodeCredentials, Role, TlsIdentity};
use flotilla_store::network::HttpNetwork;
use flotilla_store::{Store, StoreConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Releases read the meshes' traffic through the manager's own API, which sums every node's.
struct ApiTraffic {
    client: flotilla_client::Client,
}

impl flotilla_controllers::runner::TrafficSource for ApiTraffic {
    fn traffic<'a>(
        &'a self,
        service: &'a str,
    ) -> futures::future::BoxFuture<'a, Option<flotilla_types::api::ServiceTraffic>> {
        Box::pin(async move {
            match self.client.service_traffic(service).await {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::debug!(%service, error = %e, "no mesh traffic for the release");
                    None
                }
            }
        })
    }
}

/// The mutual-TLS side of a cluster manager (`init`/`join`): its listener and the cluster PKI
/// (whose `tls` is this node's own certificate, renewed in place).
pub struct ClusterServing {
    pub listener: TcpListener,
    pub security: Arc<ClusterSecurity>,
}

impl ClusterServing {
    /// Loads this node's manager certificate and its share of the cluster PKI from `pki_dir`.
    /// `cert_validity`: set by a fresh `init`; otherwise the cluster's (store) value applies.
    pub fn load(
        pki_dir: PathBuf,
        listener: TcpListener,
        cert_validity: Option<Duration>,
    ) -> anyhow::Result<ClusterServing> {
        let tls = TlsIdentity::new(NodeCredentials::load(&pki_dir)?)?;
        if tls.identity().role != Role::Manager {
            bail!(
                "{} holds a worker certificate; run `flotilla join` with a worker's options \
                 instead",
                pki_dir.display()
            );
        }
        let security = Arc::new(ClusterSecurity::load(pki_dir, tls)?);
        if let Some(validity) = cert_validity {
            security.set_cert_validity(validity);
        }
        Ok(ClusterServing { listener, security })
    }
}

/// Everything a manager is made of; [`Manager::open`] and [`OpenManager::serve`] build it.
pub struct ManagerConfig {
    /// The store lives in `data_dir/store`.
    pub data_dir: PathBuf,
    pub raft_id: u64,
    /// Where the other managers reach this one's raft (and cluster API).
    pub advertise: String,
    /// The plain-HTTP API; the controllers read the meshes' traffic through it.
    pub local_api: TcpListener,
    /// Bearer token every peer of the plain API must present (DATA_DIR/api-token).
    pub token: Option<String>,
    /// Where the local administrators' Unix socket is served.
    pub socket: ApiSocket,
    /// Start a single-voter raft group if the store has none (a first or forced manager).
    pub bootstrap: bool,
    pub controllers: ControllerConfig,
    /// The node whose agent runs in this process (its mesh metrics are served at `/metrics`).
    pub local_node: Option<String>,
    /// `None` for `flotilla up` and the benchmark.
    pub cluster: Option<ClusterServing>,
    /// Bounds on the tasks deploys and scales may ask for.
    pub limits: flotilla_api::Limits,
}

/// Where a manager serves its Unix socket (see `flotilla_api::serve_unix`).
#[derive(Clone, Debug)]
pub enum ApiSocket {
    /// `/run/flotilla/flotilla.sock`, or `DATA_DIR/flotilla.sock` where that cannot be served
    /// (not root, `/run` read-only, or another manager holds it).
    Default,
    /// `--socket PATH`: there or nowhere.
    At(PathBuf),
    /// No socket (the control-plane benchmark).
    None,
}

impl ApiSocket {
    /// `--socket`: the path given, or the default.
    pub fn from_flag(flag: Option<&Path>) -> ApiSocket {
        flag.map_or(ApiSocket::Default, |p| ApiSocket::At(p.to_path_buf()))
    }

    /// Binds the socket; `None` for [`ApiSocket::None`].
    fn bind(&self, data_dir: &Path) -> anyhow::Result<Option<(tokio::net::UnixListener, PathBuf)>> {
        let path = match self {
            ApiSocket::None => return Ok(None),
            ApiSocket::At(path) => path.clone(),
            ApiSocket::Default => {
                let default = Path::new(flotilla_client::DEFAULT_SOCKET);
                match flotilla_api::bind_unix(default) {
                    Ok(listener) => return Ok(Some((listener, default.to_path_buf()))),
                    Err(e) => {
                        let fallback = data_dir.join("flotilla.sock");
                        tracing::info!(error = %e, fallback = %fallback.display(), "API socket");
                        fallback
                    }
                }
            }
        };
        let listener = flotilla_api::bind_unix(&path).with_context(|| "--socket")?;
        Ok(Some((listener, path)))
    }
}

/// A manager whose store is open (and bootstrapped if asked) but which serves nothing yet:
/// a forced new cluster removes its lost managers here, before anyone can write.
pub struct OpenManager {
    pub store: Store,
    cfg: ManagerConfig,
}

pub struct Manager {
    pub store: Store,
    /// The plain-HTTP API's address.
    pub api_addr: SocketAddr,
    /// Where the Unix-socket API is served, if it is.
    pub socket: Option<PathBuf>,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<std::io::Result<()>>>,
    controllers: JoinHandle<()>,
}

impl Manager {
    /// Opens and serves in one go.
    pub async fn start(cfg: ManagerConfig) -> anyhow::Result<Manager> {
        Manager::open(cfg).await?.serve()
    }

    /// Opens the store under `data_dir/store` (raft over mTLS in a cluster) and bootstraps it
    /// if the config asks.
    pub async fn open(cfg: ManagerConfig) -> anyhow::Result<OpenManager> {
        let store_cfg = StoreConfig {
            data_dir: cfg.data_dir.join("store"),
            node_id: cfg.raft_id,
            advertise_addr: cfg.advertise.clone(),
        };
        let store = match &cfg.cluster {
            Some(c) => {
                let network = HttpNetwork::with_tls(c.security.tls.client_config()?)
                    .context("building the raft client")?;
                Store::open_with_network(store_cfg, network).await
            }
            None => Store::open(store_cfg).await,
        }
        .context("opening the store")?;
        if cfg.bootstrap {
            store
                .bootstrap_single()
                .await
                .context("starting the raft group")?;
        }
        // The store (with the CA key in a cluster) was just created: keep it private.
        crate::private_files::make_private(&cfg.data_dir)?;
        Ok(OpenManager { store, cfg })
    }

    /// A receiver that turns true when the manager stops; other components share it.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Tells everything that follows [`Manager::stopping`] to stop.
    pub fn signal_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops the API servers and controllers, then the store. Components started beside the
    /// manager on [`Manager::stopping`] should have ended first.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.signal_stop();
        let _ = self.controllers.await;
        for server in self.servers {
            let _ = server.await;
        }
        self.store.shutdown().await.context("stopping the store")
    }
}

impl OpenManager {
    /// Serves the API(s) and runs the controllers, which observe the meshes through the plain
    /// API.
    pub fn serve(self) -> anyhow::Result<Manager> {
        let OpenManager { store, cfg } = self;
        let api_addr = cfg.local_api.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let mut state = AppState::new(store.clone(), cfg.token.clone()).with_limits(cfg.limits);
        if let Some(node) = cfg.local_node {
            state = state.with_local_node(node);
        }
        let mut servers = Vec::new();
        if let Some(cluster) = cfg.cluster {
            let tls = cluster.security.tls.clone();
            state = state.with_cluster(cluster.security)?;
            servers.push(tokio::spawn(flotilla_api::serve_tls(
                cluster.listener,
                state.clone(),
                tls,
                stopped(&stop_rx),
            )));
        }
        let socket = match cfg.socket.bind(&cfg.data_dir)? {
            Some((listener, path)) => {
                servers.push(tokio::spawn(flotilla_api::serve_unix(
                    listener,
                    path.clone(),
                    state.clone(),
                    stopped(&stop_rx),
                )));
                Some(path)
            }
            None => None,
        };
        servers.push(tokio::spawn(flotilla_api::serve(
            cfg.local_api,
            state,
            stopped(&stop_rx),
        )));
        let traffic = ApiTraffic {
            client: flotilla_client::Client::new(
                &format!("http://{}", own_api(api_addr)),
                cfg.token,
            )
            .context("a client of the manager's own API")?,
        };
        let controllers = tokio::spawn(
            ControllerRunner::new(store.clone(), cfg.controllers)
                .with_traffic(Arc::new(traffic))
                .run(stop_rx),
        );
        Ok(Manager {
            store,
            api_addr,
            socket,
            stop,
            servers,
            controllers,
        })
    }
}

/// Where this process reaches its own plain API (loopback for a wildcard listener).
fn own_api(api_addr: SocketAddr) -> SocketAddr {
    if api_addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], api_addr.port()))
    } else {
        api_addr
    }
}

fn stopped(rx: &watch::Receiver<bool>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// Most finished tasks a slot may keep: each is a store record every manager holds.
const MAX_TASK_HISTORY: usize = 100;

/// `--task-history N`: finished tasks kept per replica slot, 0 to keep none.
pub fn parse_task_history(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of finished tasks, e.g. 5"))?;
    if n > MAX_TASK_HISTORY {
        return Err(format!(
            "{n}: at most {MAX_TASK_HISTORY} finished tasks per slot"
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_history_is_a_bounded_count() {
        assert_eq!(parse_task_history("5"), Ok(5));
        assert_eq!(parse_task_history("0"), Ok(0));
        assert!(parse_task_history("-1").is_err());
        assert!(parse_task_history("five").is_err());
        assert!(parse_task_history("101")
            .unwrap_err()
            .contains("at most 100"));
    }
}
