//! L4 proxying: each client connection is joined to one backend connection, optionally
//! announced with a PROXY protocol v2 header carrying the client address.

use crate::balancer::InFlight;
use crate::metrics::ErrorClass;
use crate::routes::PortPlan;
use crate::Shared;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

pub(crate) async fn serve_connection(
    shared: Arc<Shared>,
    mut client: TcpStream,
    peer: SocketAddr,
    port: u16,
) {
    let routing = shared.routing();
    let Some(PortPlan::Tcp {
        service,
        proxy_protocol,
    }) = routing.ports.get(&port)
    else {
        return;
    };
    let proxy_protocol = *proxy_protocol;
    let Some((entry, pool)) = routing.target(service, port) else {
        return;
    };
    entry.counters.connections.fetch_add(1, Ordering::Relaxed);
    entry.budget.deposit();
    let mut tried = Vec::new();
    let (mut upstream, backend) = loop {
        let Some(attempt) = pool.pick(&tried) else {
            if tried.is_empty() {
                entry.counters.error(ErrorClass::BreakerOpen);
            }
            tracing::debug!(service = %entry.name, tried = tried.len(), "no backend for connection");
            return;
        };
        let backend = attempt.backend.clone();
        tried.push(backend.addr);
        backend.counters.connections.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let class = match tokio::time::timeout(
            shared.cfg.connect_timeout,
            TcpStream::connect(backend.addr),
        )
        .await
        {
            Ok(Ok(stream)) => {
                attempt.settle(true);
                let rtt = started.elapsed();
                backend.observe(rtt);
                entry.counters.latency.record(rtt);
                break (stream, backend);
            }
            Ok(Err(e)) => {
                tracing::debug!(task = %backend.task_id, addr = %backend.addr, error = %e, "backend connect failed");
                ErrorClass::Connect
            }
            Err(_) => ErrorClass::Timeout,
        };
        attempt.settle(false);
        backend.counters.error(class);
        entry.counters.error(class);
        if !entry.budget.withdraw() {
            return;
        }
    };
    drop(routing);
    let _in_flight = InFlight::new(backend.clone());
    if let Err(e) = upstream.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
    if proxy_protocol {
        let local = match client.local_addr() {
            Ok(local) => local,
            Err(_) => return,
        };
        if upstream
            .write_all(&proxy_v2_header(peer, local))
            .await
            .is_err()
        {
            return;
        }
    }
    let active = AtomicBool::new(false);
    let (mut client, mut upstream) = (
        Touching::new(&mut client, &active),
        Touching::new(&mut upstream, &active),
    );
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    let idle = shared.cfg.tcp_idle_timeout;
    loop {
        tokio::select! {
            copied = &mut copy => {
                if let Err(e) = copied {
                    tracing::debug!(task = %backend.task_id, error = %e, "tcp proxy ended with error");
                }
                return;
            }
            _ = tokio::time::sleep(idle) => {
                // Checked once per period rather than re-armed per read, which keeps the
                // data path free of timer work; an idle connection lives 1-2 periods.
                if !active.swap(false, Ordering::Relaxed) {
                    tracing::debug!(task = %backend.task_id, ?idle, "idle tcp connection closed");
                    return;
                }
            }
            _ = shared.kill.cancelled() => return,
        }
    }
}

/// A stream that notes in a shared flag that bytes moved, for the idle timeout.
struct Touching<'a, S> {
    inner: &'a mut S,
    active: &'a AtomicBool,
}

impl<'a, S> Touching<'a, S> {
    fn new(inner: &'a mut S, active: &'a AtomicBool) -> Self {
        Touching { inner, active }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Touching<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.active.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Touching<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// The PROXY protocol v2 signature.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY v2 `PROXY` command for a TCP connection from `source` to `dest`. Mixed families are
/// sent as IPv6 with the IPv4 address mapped, as the format needs one family for both.
pub(crate) fn proxy_v2_header(source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(52);
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21); // version 2, PROXY command
    let (src_ip, dst_ip) = (source.ip().to_canonical(), dest.ip().to_canonical());
    match (src_ip, dst_ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&dest.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_layout() {
        let h = proxy_v2_header(
            "10.0.0.1:4000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[10, 0, 0, 1]);
        assert_eq!(&h[20..24], &[10, 0, 0, 2]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 4000);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 80);
        assert_eq!(h.len(), 28);
        let v6 = proxy_v2_header("[::1]:1".parse().unwrap(), "10.0.0.2:80".parse().unwrap());
        assert_eq!((v6[13], v6.len()), (0x21, 16 + 36));
    }
}
