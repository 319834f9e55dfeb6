//! The manager's HTTP API (axum), and only that: JSON resources with typed errors and resource
//! versions, NDJSON watch and event streams so agents, the CLI and controllers follow changes
//! without polling, and the cluster membership routes (`cluster/`). Assembling a manager around
//! it (store, controllers, agent) is the `flotilla` binary's `manager.rs`.
//!
//! Routes are listed in [`flotilla_types::api`]. Reads come from the local store's applied
//! state; writes go through raft ([`flotilla_store::Store::write`]). Requests on the Unix
//! socket ([`serve_unix`]) are trusted like a local Docker socket (its file mode is the
//! credential); every TCP peer, loopback included, must present the bearer token or, on a
//! cluster manager served with [`serve_tls`], a client certificate issued by the cluster CA
//! (whose role decides what it may call, see `auth.rs`).
#![forbid(unsafe_code)]

mod agent_secret;
mod auth;
mod body;
pub mod cluster;
mod error;
mod forward;
mod limits;
mod nodes;
mod plain_serve;
mod query;
mod raft;
mod rollouts;
mod services;
mod snapshot;
mod streams;
mod tasks;
mod tls_serve;
mod traffic;
mod unix_serve;

pub use error::ApiError;
pub use limits::Limits;
pub use services::summarize;
pub use tls_serve::serve_tls;
pub use unix_serve::{bind_unix, serve_unix, SocketError, SOCKET_GROUP};

use axum::routing::{get, post, put};
use axum::Router;
use flotilla_store::Store;
use std::sync::Arc;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// Bearer token required from TCP peers without a certificate. `None` refuses them all
    /// (the Unix socket and certificates still work).
    pub token: Option<Arc<str>>,
    /// Used to reach agents (logs, stats, resources, mesh stats). On cluster managers it
    /// presents the manager's node certificate, which `https://` agent servers require.
    pub http: reqwest::Client,
    /// The cluster PKI on managers started by `flotilla init`/`join`; `None` for `flotilla up`.
    pub cluster: Option<Arc<cluster::ClusterSecurity>>,
    /// mTLS client for forwarding writes to the leader (cluster managers only).
    pub leader_http: Option<reqwest::Client>,
    /// The node whose agent runs in this process, for `GET /metrics`; `None` when there is none.
    pub local_node: Option<String>,
    /// Bounds on the tasks deploys and scales may ask for.
    pub limits: Limits,
}

impl AppState {
    pub fn new(store: Store, token: Option<String>) -> Self {
        AppState {
            store,
            token: token.map(Arc::from),
            http: reqwest::Client::builder()
                .pool_idle_timeout(flotilla_types::api::CLIENT_POOL_IDLE)
                .build()
                .unwrap_or_default(),
            cluster: None,
            leader_http: None,
            local_node: None,
            limits: Limits::default(),
        }
    }

    /// Replaces the default task limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Names the node whose agent runs alongside this manager (serves its mesh metrics).
    pub fn with_local_node(mut self, node: String) -> Self {
        self.local_node = Some(node);
        self
    }

    /// Enables the cluster routes and certificate authentication.
    pub fn with_cluster(
        mut self,
        security: Arc<cluster::ClusterSecurity>,
    ) -> Result<Self, flotilla_pki::PkiError> {
        let tls = security.tls.client_config()?;
        self.leader_http = Some(
            reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .pool_idle_timeout(flotilla_types::api::CLIENT_POOL_IDLE)
                .connect_timeout(forward::FORWARD_CONNECT_TIMEOUT)
                .build()
                .map_err(|e| {
                    flotilla_pki::PkiError::BadKey(format!("building the TLS client: {e}"))
                })?,
        );
        // Built once; the certificate resolver follows renewals of `security.tls`.
        self.http = reqwest::Client::builder()
            .use_preconfigured_tls(security.tls.agent_client_config()?)
            .pool_idle_timeout(flotilla_types::api::CLIENT_POOL_IDLE)
            .build()
            .map_err(|e| {
                flotilla_pki::PkiError::BadKey(format!("building the agent TLS client: {e}"))
            })?;
        self.cluster = Some(security);
        Ok(self)
    }
}

/// The full API router.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/status", get(services::status))
        .route("/snapshot", get(snapshot::snapshot))
        .route("/deploy", post(services::deploy))
        .route("/services", get(services::list))
        .route(
            "/services/{name}",
            get(services::inspect).delete(services::remove),
        )
        .route("/services/{name}/scale", post(services::scale))
        .route("/services/{name}/revisions", get(services::revisions))
        .route(
            "/services/{name}/rollout",
            get(rollouts::get_rollout).post(rollouts::control),
        )
        .route("/services/{name}/restart", post(rollouts::restart))
        .route("/services/{name}/rollback", post(rollouts::rollback))
        .route("/services/{name}/weights", put(traffic::set_weights))
        .route("/services/{name}/traffic", get(traffic::traffic))
        .route("/tasks", get(tasks::list))
        .route("/tasks/status", put(tasks::report_bulk_status))
        .route("/tasks/{id}", get(tasks::get_task))
        .route("/tasks/{id}/status", put(tasks::report_status))
        .route("/tasks/{id}/logs", get(tasks::logs))
        .route("/tasks/{id}/stats", get(tasks::stats))
        .route("/tasks/{id}/resources", post(tasks::update_resources))
        .route("/tasks/{id}/weight", put(traffic::set_weight))
        .route("/nodes", get(nodes::list))
        .route("/nodes/register", post(nodes::register))
        .route(
            "/nodes/{id}",
            get(nodes::get_node)
                .patch(nodes::update)
                .delete(cluster::remove_node),
        )
        .route("/nodes/{id}/heartbeat", post(nodes::heartbeat))
        .route("/nodes/{id}/promote", post(cluster::promote_node))
        .route("/nodes/{id}/demote", post(cluster::demote_node))
        .route("/events", get(streams::events))
        .route("/watch", get(streams::watch))
        .nest("/cluster", cluster::routes());
    Router::new()
        .nest("/v1", v1)
        .nest("/raft", raft::routes())
        .route("/metrics", get(traffic::metrics))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        // Runs after authentication (layers wrap outward): only authorised writes are forwarded.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            forward::forward_writes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_auth,
        ))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    plain_serve::serve_plain(listener, router(state), shutdown).await;
    Ok(())
}
