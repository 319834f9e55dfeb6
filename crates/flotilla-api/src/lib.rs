//! The manager's HTTP API (axum): JSON resources with typed errors and resource versions, plus
//! NDJSON watch and event streams so agents, the CLI and controllers follow changes without
//! polling.
//!
//! Routes are listed in [`flotilla_types::api`]. Reads come from the local store's applied
//! state; writes go through raft ([`flotilla_store::Store::write`]). Requests from loopback are
//! trusted like a local Docker socket; any other peer must present the bearer token.
#![forbid(unsafe_code)]

mod auth;
mod body;
mod error;
mod nodes;
mod raft;
mod services;
mod streams;
mod tasks;

pub use error::ApiError;
pub use services::summarize;

use axum::routing::{get, post, put};
use axum::Router;
use flotilla_store::Store;
use std::net::SocketAddr;
use std::sync::Arc;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// Bearer token required from non-loopback peers. `None` refuses every non-loopback request.
    pub token: Option<Arc<str>>,
    /// Used to reach agents (log streaming).
    pub http: reqwest::Client,
}

impl AppState {
    pub fn new(store: Store, token: Option<String>) -> Self {
        AppState {
            store,
            token: token.map(Arc::from),
            http: reqwest::Client::new(),
        }
    }
}

/// The full API router.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/status", get(services::status))
        .route("/deploy", post(services::deploy))
        .route("/services", get(services::list))
        .route(
            "/services/{name}",
            get(services::inspect).delete(services::remove),
        )
        .route("/services/{name}/scale", post(services::scale))
        .route("/services/{name}/revisions", get(services::revisions))
        .route("/tasks", get(tasks::list))
        .route("/tasks/{id}", get(tasks::get_task))
        .route("/tasks/{id}/status", put(tasks::report_status))
        .route("/tasks/{id}/logs", get(tasks::logs))
        .route("/nodes", get(nodes::list))
        .route("/nodes/register", post(nodes::register))
        .route("/nodes/{id}/heartbeat", post(nodes::heartbeat))
        .route("/events", get(streams::events))
        .route("/watch", get(streams::watch));
    Router::new()
        .nest("/v1", v1)
        .nest("/raft", raft::routes())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
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
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
