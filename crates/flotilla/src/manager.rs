//! A manager's moving parts — store, API server, controllers — started and stopped together.
//! `flotilla up` and the control-plane benchmark both run one.

use anyhow::Context;
use flotilla_api::AppState;
use flotilla_controllers::{ControllerConfig, ControllerRunner};
use flotilla_store::{Store, StoreConfig};
use std::net::SocketAddr;
use std::path::Path;
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

pub struct Manager {
    pub store: Store,
    pub api_addr: SocketAddr,
    stop: watch::Sender<bool>,
    api: JoinHandle<std::io::Result<()>>,
    controllers: JoinHandle<()>,
}

impl Manager {
    /// Opens the store under `data_dir/store`, starts a single-voter raft group if new, serves
    /// the API on `listener` and runs the controllers. `local_node` names the node whose agent
    /// runs in this process (its mesh metrics are served at `/metrics`).
    pub async fn start(
        data_dir: &Path,
        listener: tokio::net::TcpListener,
        token: Option<String>,
        controllers: ControllerConfig,
        local_node: Option<String>,
    ) -> anyhow::Result<Manager> {
        let api_addr = listener.local_addr()?;
        let store = Store::open(StoreConfig {
            data_dir: data_dir.join("store"),
            node_id: 1,
            advertise_addr: api_addr.to_string(),
        })
        .await
        .context("opening the store")?;
        store
            .bootstrap_single()
            .await
            .context("starting the raft group")?;
        let (stop, stop_rx) = watch::channel(false);
        // The controllers' view of the meshes comes through this manager's own API.
        let own_api = if api_addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], api_addr.port()))
        } else {
            api_addr
        };
        let traffic = ApiTraffic {
            client: flotilla_client::Client::new(&format!("http://{own_api}"), token.clone())
                .context("a client of the manager's own API")?,
        };
        let mut state = AppState::new(store.clone(), token);
        if let Some(node) = local_node {
            state = state.with_local_node(node);
        }
        let api = tokio::spawn(flotilla_api::serve(listener, state, {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }));
        let controllers = tokio::spawn(
            ControllerRunner::new(store.clone(), controllers)
                .with_traffic(std::sync::Arc::new(traffic))
                .run(stop_rx),
        );
        Ok(Manager {
            store,
            api_addr,
            stop,
            api,
            controllers,
        })
    }

    /// A receiver that turns true when the manager stops; other components share it.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Tells everything that follows [`Manager::stopping`] to stop.
    pub fn signal_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops the API and controllers, then the store.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.signal_stop();
        let _ = self.controllers.await;
        let _ = self.api.await;
        self.store.shutdown().await.context("stopping the store")
    }
}
