//! One accepting socket per published port. The protocol is looked up per connection in the
//! current routing snapshot, so a port switching between TCP and HTTP needs no rebind.

use crate::conn_limits::{ConnGate, ConnPermit};
use crate::routes::PortPlan;
use crate::{http_proxy, tcp_proxy, Shared};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Pending connections the kernel queues per port.
const BACKLOG: u32 = 1024;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

pub(crate) struct Listener {
    pub local_addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Listener {
    /// Binds `bind_ip:port` and starts accepting.
    pub fn bind(shared: &Arc<Shared>, port: u16) -> io::Result<Self> {
        let addr = SocketAddr::new(shared.cfg.bind_ip, port);
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // Lets a port be re-bound at once after a close while old connections sit in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(BACKLOG)?;
        let local_addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let gate = ConnGate::new("mesh port", shared.cfg.max_connections);
        let task = tokio::spawn(
            accept_loop(listener, port, shared.clone(), gate, stop.clone())
                .instrument(tracing::info_span!("mesh_listener", port)),
        );
        Ok(Listener {
            local_addr,
            stop,
            task,
        })
    }

    /// Stops accepting and waits until the socket is closed; accepted connections carry on.
    pub async fn close(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "mesh accept loop ended abnormally");
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    port: u16,
    shared: Arc<Shared>,
    gate: Arc<ConnGate>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        // Over a cap the connection is closed at once (dropped), before it costs a backend
        // connection: a flood of idle clients must not use up the descriptors the node needs.
        let Some(permits) = admit(&gate, &shared) else {
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, %peer, "set_nodelay failed");
        }
        let is_http = match shared.routing().ports.get(&port) {
            Some(PortPlan::Http { .. }) => true,
            Some(PortPlan::Tcp { .. }) => false,
            // The port is being closed; refuse the straggler.
            None => continue,
        };
        let span = tracing::debug_span!("mesh_conn", port, %peer);
        let Some(worker) = shared.workers.next() else {
            let conn = serve(shared.clone(), stream, peer, port, is_http);
            shared.connections.spawn(
                async move {
                    conn.await;
                    drop(permits);
                }
                .instrument(span),
            );
            continue;
        };
        // The socket moves to the worker's own event loop.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, %peer, "connection not handed to a worker");
                continue;
            }
        };
        let conn_shared = shared.clone();
        shared.connections.spawn_on(
            async move {
                match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => serve(conn_shared, stream, peer, port, is_http).await,
                    Err(e) => tracing::debug!(error = %e, "connection not registered"),
                }
                drop(permits);
            }
            .instrument(span),
            worker,
        );
    }
}

/// Permits from the port's gate and the mesh-wide one, or `None` when either is full.
fn admit(port: &Arc<ConnGate>, shared: &Shared) -> Option<(ConnPermit, ConnPermit)> {
    let Some(on_port) = port.admit() else {
        shared.port_refusals.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    Some((on_port, shared.gate.admit()?))
}

async fn serve(
    shared: Arc<Shared>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    port: u16,
    is_http: bool,
) {
    if is_http {
        http_proxy::serve_connection(shared, stream, peer, port).await;
    } else {
        tcp_proxy::serve_connection(shared, stream, peer, port).await;
    }
}
