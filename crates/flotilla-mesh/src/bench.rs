//! Measures what the mesh costs: the same keep-alive HTTP load against a local backend, once
//! directly and once through the mesh, in one run: either as fast as the connections go
//! (throughput) or at a fixed request rate (latency at a given load, see [`BenchConfig::rate`]).

use crate::metrics::{Histogram, LatencySummary};
use crate::{Backend, Mesh, MeshConfig, MeshError, RouteTable, ServicePort, ServiceRoutes};
use bytes::Bytes;
use flotilla_types::mesh::{MeshPort, MeshProtocol, MeshSpec};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

/// The load to apply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchConfig {
    /// Concurrent keep-alive connections, each sending one request at a time.
    pub connections: usize,
    /// How long each of the two measurements runs.
    pub duration: Duration,
    /// Size of the backend's response body.
    pub response_bytes: usize,
    /// Requests per second over all connections; `None` sends back to back. At a fixed rate
    /// each connection sends on its own schedule (requests/s ÷ connections), so the latency
    /// is that of a given load rather than of saturation; a request due while the previous one
    /// on its connection is still out waits for it and its latency counts from when it was
    /// due (no coordinated omission).
    #[serde(default)]
    pub rate: Option<u64>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            connections: 32,
            duration: Duration::from_secs(5),
            response_bytes: 64,
            rate: None,
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    pub requests: u64,
    pub errors: u64,
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Direct and through-the-mesh results side by side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub config: BenchConfig,
    pub direct: LoadReport,
    pub mesh: LoadReport,
    /// Mesh throughput over direct throughput.
    pub throughput_ratio: f64,
    /// Latency the mesh adds at the 99th percentile.
    pub added_p99_ms: f64,
}

/// Why one load connection stopped early.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Request(#[from] hyper::http::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("benchmark socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("benchmark mesh: {0}")]
    Mesh(#[from] MeshError),
    #[error("connections and rate must be at least 1 and duration longer than 0s")]
    BadConfig,
}

/// Starts a local backend and a mesh in front of it on 127.0.0.1, then measures both.
pub async fn run(cfg: &BenchConfig) -> Result<BenchReport, BenchError> {
    if cfg.connections == 0 || cfg.duration.is_zero() || cfg.rate == Some(0) {
        return Err(BenchError::BadConfig);
    }
    let backend_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let backend = backend_listener.local_addr()?;
    let backend_task = tokio::spawn(serve_backend(
        backend_listener,
        Bytes::from(vec![b'x'; cfg.response_bytes]),
    ));
    // Ask the kernel for a free port, then hand it to the mesh as the published port.
    let mesh_port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let mesh = start_mesh(backend, SocketAddr::from((Ipv4Addr::LOCALHOST, mesh_port))).await?;
    let direct = load(backend, cfg).await;
    let through = load(SocketAddr::from((Ipv4Addr::LOCALHOST, mesh_port)), cfg).await;
    mesh.shutdown().await;
    backend_task.abort();
    Ok(BenchReport {
        config: cfg.clone(),
        throughput_ratio: if direct.requests_per_sec > 0.0 {
            through.requests_per_sec / direct.requests_per_sec
        } else {
            0.0
        },
        added_p99_ms: through.p99_ms - direct.p99_ms,
        direct,
        mesh: through,
    })
}

/// Runs a mesh on `listen` forwarding HTTP to `backend` until Ctrl-C (for comparisons with
/// other proxies, see `scripts/bench-mesh-nginx.sh`).
pub async fn serve_mesh_for(backend: SocketAddr, listen: SocketAddr) -> Result<(), BenchError> {
    let mesh = start_mesh(backend, listen).await?;
    tokio::signal::ctrl_c().await?;
    mesh.shutdown().await;
    Ok(())
}

async fn start_mesh(backend: SocketAddr, listen: SocketAddr) -> Result<Mesh, BenchError> {
    let mesh = Mesh::new(MeshConfig {
        bind_ip: listen.ip(),
        ..MeshConfig::default()
    });
    let mut table = RouteTable::default();
    table.services.insert(
        "bench".to_string(),
        ServiceRoutes {
            spec: MeshSpec {
                ports: vec![MeshPort {
                    published: listen.port(),
                    protocol: MeshProtocol::Http,
                    proxy_protocol: false,
                }],
                ..MeshSpec::default()
            },
            ports: vec![ServicePort {
                published: listen.port(),
                backends: vec![Backend {
                    task_id: "bench-backend".to_string(),
                    addr: backend,
                    weight: 100,
                    healthy: true,
                    current: true,
                }],
            }],
            canary: None,
        },
    );
    mesh.apply(table).await?;
    Ok(mesh)
}

/// A minimal HTTP/1.1 server answering every request with `body`: the benchmark's backend.
pub async fn serve_backend(listener: TcpListener, body: Bytes) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Measures an HTTP server at `target` (another proxy, for comparisons) with `cfg`'s load.
pub async fn measure(target: SocketAddr, cfg: &BenchConfig) -> Result<LoadReport, BenchError> {
    if cfg.connections == 0 || cfg.duration.is_zero() || cfg.rate == Some(0) {
        return Err(BenchError::BadConfig);
    }
    Ok(load(target, cfg).await)
}

/// `cfg.connections` keep-alive connections sending GETs for `cfg.duration`, back to back or
/// on the fixed-rate schedule.
async fn load(target: SocketAddr, cfg: &BenchConfig) -> LoadReport {
    let latency = Arc::new(Histogram::default());
    let requests = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + cfg.duration;
    // Per connection: the time between its requests, and where its schedule starts (spread
    // evenly so the connections do not fire together).
    let period = cfg
        .rate
        .map(|rate| Duration::from_secs_f64(cfg.connections as f64 / rate as f64));
    let workers: Vec<_> = (0..cfg.connections)
        .map(|i| {
            let (latency, requests, errors) = (latency.clone(), requests.clone(), errors.clone());
            let schedule = period.map(|p| Schedule {
                next: started + p.mul_f64(i as f64 / cfg.connections as f64),
                period: p,
            });
            tokio::spawn(async move {
                let mut schedule = schedule;
                while Instant::now() < deadline {
                    let driven =
                        drive_connection(target, deadline, &mut schedule, &latency, &requests);
                    if let Err(e) = driven.await {
                        tracing::debug!(%target, error = %e, "bench connection failed");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let summary: LatencySummary = latency.summary();
    let requests = requests.load(Ordering::Relaxed);
    LoadReport {
        requests,
        errors: errors.load(Ordering::Relaxed),
        requests_per_sec: requests as f64 / elapsed,
        p50_ms: summary.p50_ms,
        p99_ms: summary.p99_ms,
    }
}

/// When a fixed-rate connection sends its next request.
struct Schedule {
    next: Instant,
    period: Duration,
}

/// One connection's requests until the deadline or the first error.
async fn drive_connection(
    target: SocketAddr,
    deadline: Instant,
    schedule: &mut Option<Schedule>,
    latency: &Histogram,
    requests: &AtomicU64,
) -> Result<(), LoadError> {
    let stream = match TcpStream::connect(target).await {
        Ok(stream) => stream,
        Err(e) => {
            // Back off a little so a dead target does not make the worker spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            return Err(e.into());
        }
    };
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let host = target.to_string();
    while Instant::now() < deadline {
        let req = Request::get("/")
            .header(hyper::header::HOST, host.as_str())
            .body(Empty::<Bytes>::new());
        let req = req?;
        let sent = match schedule {
            Some(schedule) => {
                let due = schedule.next;
                if due >= deadline {
                    return Ok(());
                }
                schedule.next += schedule.period;
                if Instant::now() >= due {
                    // Held up by the previous response: the wait is part of the latency.
                    due
                } else {
                    // The timer wakes up to a millisecond late; that is not the server's doing.
                    tokio::time::sleep_until(due.into()).await;
                    Instant::now()
                }
            }
            None => Instant::now(),
        };
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        resp.into_body().collect().await?;
        latency.record(sent.elapsed());
        requests.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
