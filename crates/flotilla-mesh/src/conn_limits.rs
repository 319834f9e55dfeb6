//! Connection hygiene shared by every listener of the process (API, mTLS, agent servers, mesh):
//! per-listener connection caps kept with one atomic counter, the file-descriptor budget those
//! caps are derived from, and the HTTP server settings that bound header reads and idle
//! keep-alive.
//!
//! The budget: after [`raise_fd_limit`] the soft `RLIMIT_NOFILE` is split into a reserve for
//! the agent's own work (health checks, shim control, the store, Docker) that client
//! connections never reach, and shares of the rest for each kind of listener, so a flood of
//! idle connections is refused at the listener instead of starving the agent.

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// A client must send a complete request head within this time; for HTTP/1 the same timer
/// runs while a keep-alive connection waits for its next request, so it is the idle timeout
/// too (slowloris and idle-connection defence).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 connections are pinged this often when quiet...
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// ...and closed when a ping is not answered within this time.
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The smallest reserve of descriptors kept for the agent's own work.
const MIN_FD_RESERVE: u64 = 256;
/// Used when the limit cannot be read.
const FALLBACK_FD_LIMIT: u64 = 1024;

/// The kinds of listener that share the descriptor budget, each with its share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// All published mesh ports together; each connection holds two descriptors (client and
    /// backend), so it gets half the budget in descriptors, a quarter in connections.
    Mesh,
    /// The cluster API (plain or TLS): a quarter of the budget.
    Api,
    /// The agent's log/stats/mesh-metrics server: an eighth of the budget.
    AgentServer,
}

impl ListenerKind {
    /// The default connection cap for this kind under the current descriptor limit.
    pub fn default_cap(self) -> usize {
        cap_for(self, fd_limit())
    }
}

fn cap_for(kind: ListenerKind, fd_limit: u64) -> usize {
    let budget = fd_limit.saturating_sub(fd_reserve(fd_limit));
    let cap = match kind {
        ListenerKind::Mesh => budget / 4,
        ListenerKind::Api => budget / 4,
        ListenerKind::AgentServer => budget / 8,
    };
    usize::try_from(cap.max(1)).unwrap_or(usize::MAX)
}

/// Descriptors kept out of every listener's reach: a quarter of the limit, at least 256.
pub fn fd_reserve(fd_limit: u64) -> u64 {
    (fd_limit / 4).max(MIN_FD_RESERVE).min(fd_limit)
}

/// The process's current soft `RLIMIT_NOFILE`.
pub fn fd_limit() -> u64 {
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => soft,
        Err(_) => FALLBACK_FD_LIMIT,
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as long-running servers do at start.
/// Returns the (old, new) soft limit.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    // An unlimited hard limit cannot be set as the soft one: the kernel's ceiling is nr_open.
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map_or(hard, |nr_open| hard.min(nr_open));
    if soft >= ceiling {
        return Ok((soft, soft));
    }
    setrlimit(Resource::RLIMIT_NOFILE, ceiling, hard).map_err(std::io::Error::from)?;
    Ok((soft, ceiling))
}

/// Whether `e` means this process (or the system) ran out of descriptors or memory: the
/// failure is the node's, not that of whatever it tried to reach.
pub fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM on Linux.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Whether `error` or one of its causes is [resource exhaustion](is_resource_exhaustion);
/// errors passed on as text keep only the message, so that is checked too.
pub fn caused_by_exhaustion(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(is_resource_exhaustion)
        {
            return true;
        }
        let text = e.to_string();
        if text.contains("Too many open files") || text.contains("os error 24") {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Counts one listener's open connections against its cap. Admission is one atomic add, so it
/// costs nothing measurable on the mesh's hot path.
#[derive(Debug)]
pub struct ConnGate {
    name: &'static str,
    cap: usize,
    open: AtomicUsize,
    refused: AtomicU64,
}

impl ConnGate {
    /// A gate admitting at most `cap` connections at once (0 is treated as 1).
    pub fn new(name: &'static str, cap: usize) -> Arc<Self> {
        Arc::new(ConnGate {
            name,
            cap: cap.max(1),
            open: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// A permit for one more connection, or `None` when the listener is full: the caller
    /// closes the connection at once. Refusals are logged at 1, 2, 4, 8... so a flood does not
    /// flood the log too.
    pub fn admit(self: &Arc<Self>) -> Option<ConnPermit> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.cap {
            self.open.fetch_sub(1, Ordering::Relaxed);
            let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    listener = self.name,
                    cap = self.cap,
                    refused,
                    "connection cap reached; refusing new connections"
                );
            }
            return None;
        }
        Some(ConnPermit(self.clone()))
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections refused since the start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnPermit(Arc<ConnGate>);

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An HTTP/1 + HTTP/2 connection builder with the header read (and HTTP/1 keep-alive idle)
/// timeout and HTTP/2 keep-alive pings, for every HTTP listener that serves one connection
/// per task.
pub fn http_server(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    builder
}

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts connections on `listener` until `shutdown` resolves, admits each through `gate`
/// (closing it at once over the cap) and runs `serve_one` for it in its own task. Returning
/// ends every open connection too: a server stopped in place must not keep serving long-lived
/// streams.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    gate: Arc<ConnGate>,
    shutdown: impl Future<Output = ()>,
    serve_one: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    let (_open, closed) = tokio::sync::watch::channel(());
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let Some(permit) = gate.admit() else {
            continue;
        };
        let connection = serve_one(tcp, peer);
        let mut closed = closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                _ = closed.changed() => tracing::debug!(%peer, "server stopped; connection closed"),
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_refuses_past_its_cap_and_frees_on_drop() {
        let gate = ConnGate::new("test", 2);
        let a = gate.admit().expect("first");
        let _b = gate.admit().expect("second");
        assert!(gate.admit().is_none());
        assert_eq!((gate.open(), gate.refused()), (2, 1));
        drop(a);
        let c = gate.admit();
        assert!(c.is_some(), "a freed place is given again");
        assert_eq!(gate.open(), 2);
        drop(c);
        assert_eq!(gate.open(), 1);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let ceiling = hard.min(1 << 20);
        let lowered = ceiling - ceiling / 8;
        setrlimit(Resource::RLIMIT_NOFILE, lowered, hard).unwrap();
        let (old, new) = raise_fd_limit().unwrap();
        assert_eq!(old, lowered);
        assert!(new > lowered && new <= hard, "{new}");
        assert_eq!(fd_limit(), new);
    }

    #[test]
    fn caps_leave_the_reserve_free() {
        for limit in [1024u64, 4096, 65536, 1 << 20] {
            let reserve = fd_reserve(limit);
            assert!(reserve >= MIN_FD_RESERVE);
            let fds = 2 * cap_for(ListenerKind::Mesh, limit) as u64
                + cap_for(ListenerKind::Api, limit) as u64
                + cap_for(ListenerKind::AgentServer, limit) as u64;
            assert!(fds + reserve <= limit, "limit {limit}: {fds} + {reserve}");
        }
        assert_eq!(cap_for(ListenerKind::Mesh, 1024), 192);
    }
}
