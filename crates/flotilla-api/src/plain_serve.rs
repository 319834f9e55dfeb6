//! Serving the API over plain HTTP, with the same connection cap and header (and keep-alive
//! idle) timeout as the TLS listener.

use axum::extract::ConnectInfo;
use flotilla_mesh::conn_limits::HEADER_READ_TIMEOUT;
use flotilla_mesh::conn_limits::{accept_loop, http_server, ConnGate, ListenerKind};
use hyper_util::rt::TokioIo;
use tower::ServiceExt;

/// Serves `app` on `listener` until `shutdown` resolves; open connections end with it.
pub(crate) async fn serve_plain(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let gate = ConnGate::new("api", ListenerKind::Api.default_cap());
    accept_loop(listener, gate, shutdown, move |tcp, peer| {
        let app = app.clone();
        async move {
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    app.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            let builder = http_server(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
    })
    .await;
}
