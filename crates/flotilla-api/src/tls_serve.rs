//! Serving the API over TLS, recording each connection's client-certificate identity so the
//! auth layer can authorise by role.

use crate::cluster::{PeerCert, PeerIdentity};
use crate::plain_serve::serve_connection;
use crate::{router, AppState};
use flotilla_mesh::conn_limits::{accept_loop, ConnGate, ListenerKind};
use flotilla_pki::{identity_of, issued_at_of, TlsIdentity};
use std::sync::Arc;
use std::time::Duration;

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
            serve_connection(stream, peer, app, Some(PeerIdentity(identity))).await;
        }
    })
    .await;
    Ok(())
}
