//! Serving the API over TLS, recording each connection's client-certificate identity so the
//! auth layer can authorise by role.

use crate::cluster::{PeerCert, PeerIdentity};
use crate::{router, AppState};
use axum::extract::ConnectInfo;
use flotilla_mesh::conn_limits::HEADER_READ_TIMEOUT;
use flotilla_mesh::conn_limits::{accept_loop, http_server, ConnGate, ListenerKind};
use flotilla_pki::{identity_of, issued_at_of, TlsIdentity};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

/// A client that has not finished the TLS handshake by then is dropped, so half-open
/// connections cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the API over TLS on `listener` until `shutdown` resolves. Client certificates are
/// optional at the TLS layer; a presented one must chain to the cluster CA. Connections past
/// the API's cap are closed at once; request heads must arrive within the header timeout.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    state: AppState,
    tls: Arc<TlsIdentity>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let config = tls
        .server_config()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let app = router(state);
    let gate = ConnGate::new("api (tls)", ListenerKind::Api.default_cap());
    // A manager demoted in place stops here, which ends every open connection too: it must not
    // keep serving long-lived watch streams from its stopped store.
    accept_loop(listener, gate, shutdown, move |tcp, peer| {
        let acceptor = acceptor.clone();
        let app = app.clone();
        async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|der| {
                    Some(PeerCert {
                        identity: identity_of(der).ok()?,
                        issued_at: issued_at_of(der).ok()?,
                    })
                });
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    req.extensions_mut().insert(PeerIdentity(identity.clone()));
                    app.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            let builder = http_server(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
    })
    .await;
    Ok(())
}
