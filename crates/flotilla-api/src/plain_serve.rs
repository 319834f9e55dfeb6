//! Serving the API over plain HTTP, and serving one API connection (plain or TLS) with the
//! header (and keep-alive idle) timeout every listener shares.

use crate::cluster::PeerIdentity;
use axum::extract::ConnectInfo;
use flotilla_mesh::conn_limits::HEADER_READ_TIMEOUT;
use flotilla_mesh::conn_limits::{accept_loop, http_server, ConnGate, ListenerKind};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use tower::ServiceExt;

/// Serves `app` on `listener` until `shutdown` resolves; open connections end with it.
pub(crate) async fn serve_plain(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let gate = ConnGate::new("api", ListenerKind::Api.default_cap());
    accept_loop(listener, gate, shutdown, move |tcp, peer| {
        serve_connection(tcp, peer, app.clone(), None)
    })
    .await;
}

/// Serves one connection from `peer` until it closes or a timeout ends it. Each request
/// carries the peer address and, over TLS, the client certificate's identity.
pub(crate) async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    app: axum::Router,
    identity: Option<PeerIdentity>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            if let Some(identity) = &identity {
                req.extensions_mut().insert(identity.clone());
            }
            app.clone().oneshot(req.map(axum::body::Body::new))
        });
    let builder = http_server(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    if let Err(e) = connection.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
