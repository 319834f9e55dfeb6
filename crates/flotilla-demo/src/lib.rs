//! The demo HTTP app built into the flotilla binary (`flotilla demo-app`): a tiny web service whose
//! failures (bad health, errors, latency, crashes, memory growth) can be switched on from the
//! command line to exercise Flotilla's health checks, restarts and resource limits.
#![forbid(unsafe_code)]

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long in-flight requests may take to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// `alloc_mb` grows by one MiB per step with this pause, so a cgroup memory limit is hit
/// gradually and the OOM killer (not an allocation failure) ends the process.
const ALLOC_STEP_PAUSE: Duration = Duration::from_millis(10);
const MIB: usize = 1 << 20;
/// Pages are at least this large on every Linux platform; touching one byte per page commits it.
const PAGE: usize = 4096;
/// The exit code of a simulated crash (`exit_after`).
pub const CRASH_EXIT_CODE: i32 = 3;

/// What the demo app does. The caller resolves flags and environment (`$PORT`,
/// `$FLOTILLA_TASK_ID`) into this.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoConfig {
    pub port: u16,
    /// Reported by `GET /`; lets a rollout be watched from the outside.
    pub version: String,
    pub task_id: String,
    /// Answer `GET /health` with 503.
    pub fail_health: bool,
    /// Probability (0..=1) that `GET /` answers 500.
    pub error_rate: f64,
    /// Delay before every `GET /` response.
    pub latency: Duration,
    /// Exit with [`CRASH_EXIT_CODE`] after this long.
    pub exit_after: Option<Duration>,
    /// Allocate and hold this many MiB after start.
    pub alloc_mb: u64,
}

impl DemoConfig {
    pub fn validate(&self) -> Result<(), DemoError> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(DemoError::ErrorRate(self.error_rate));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("--error-rate must be a number from 0 to 1, got {0}")]
    ErrorRate(f64),
    #[error("cannot listen on {ip}:{port}: {source}")]
    Bind {
        ip: std::net::IpAddr,
        port: u16,
        source: std::io::Error,
    },
    #[error("cannot read the listening address: {0}")]
    LocalAddr(std::io::Error),
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(std::io::Error),
}

/// Runs the app until SIGTERM or SIGINT, then drains in-flight requests and returns. With
/// `exit_after` set the process exits with [`CRASH_EXIT_CODE`] instead, on purpose.
pub async fn run(cfg: DemoConfig) -> Result<(), DemoError> {
    run_on(std::net::Ipv4Addr::UNSPECIFIED.into(), cfg).await
}

/// [`run`], listening on `ip` only (tests use it to prove which address reaches a task).
pub async fn run_on(ip: std::net::IpAddr, cfg: DemoConfig) -> Result<(), DemoError> {
    cfg.validate()?;
    let listener = TcpListener::bind((ip, cfg.port))
        .await
        .map_err(|source| DemoError::Bind {
            ip,
            port: cfg.port,
            source,
        })?;
    let port = listener.local_addr().map_err(DemoError::LocalAddr)?.port();
    println!("demo-app {} listening on {port}", cfg.version);

    if let Some(after) = cfg.exit_after {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            eprintln!(
                "demo-app: simulated crash after {}ms, exiting with code {CRASH_EXIT_CODE}",
                after.as_millis()
            );
            // The point of the flag is an abrupt, non-zero exit, so skip the graceful path.
            std::process::exit(CRASH_EXIT_CODE);
        });
    }
    if cfg.alloc_mb > 0 {
        tokio::spawn(hold_memory(cfg.alloc_mb));
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DemoError::Signal)?;
    let stop = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    serve(listener, cfg, stop).await
}

/// Serves HTTP/1.1 on `listener` until `shutdown` completes, then stops accepting and waits up to
/// 30s for in-flight requests to finish.
pub async fn serve(
    listener: TcpListener,
    cfg: DemoConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DemoError> {
    cfg.validate()?;
    let app = Arc::new(App {
        hostname: hostname(),
        cfg,
    });
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Typically EMFILE or a connection reset before accept: transient, so
                        // keep serving rather than take the whole app down.
                        eprintln!("demo-app: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let app = Arc::clone(&app);
                let service = hyper::service::service_fn(move |req| {
                    let app = Arc::clone(&app);
                    async move { Ok::<_, Infallible>(app.respond(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    // Client disconnects mid-request are normal for a demo under load tests.
                    let _ = conn.await;
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!(
            "demo-app: requests still running after {}s; exiting anyway",
            DRAIN_TIMEOUT.as_secs()
        );
    }
    Ok(())
}

struct App {
    cfg: DemoConfig,
    hostname: String,
}

impl App {
    async fn respond(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n");
        }
        match req.uri().path() {
            "/" => {
                if !self.cfg.latency.is_zero() {
                    tokio::time::sleep(self.cfg.latency).await;
                }
                if rand::random::<f64>() < self.cfg.error_rate {
                    return text(StatusCode::INTERNAL_SERVER_ERROR, "injected error\n");
                }
                let body = serde_json::json!({
                    "version": self.cfg.version,
                    "task": self.cfg.task_id,
                    "hostname": self.hostname,
                });
                let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                resp
            }
            "/health" if self.cfg.fail_health => {
                text(StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
            }
            "/health" => text(StatusCode::OK, "ok"),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

/// The kernel's hostname (the container's, under Docker).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Grows resident memory by `mb` MiB, one MiB at a time, and holds it until the task is dropped.
async fn hold_memory(mb: u64) {
    let mut held = Vec::new();
    for _ in 0..mb {
        held.push(touched_mebibyte());
        tokio::time::sleep(ALLOC_STEP_PAUSE).await;
    }
    println!("demo-app holding {mb} MiB");
    // `held` lives in this future's state, so the memory stays charged while it is pending.
    std::future::pending::<()>().await;
}

/// One MiB with every page written, so it is resident (and charged to the cgroup), not just
/// reserved.
fn touched_mebibyte() -> Vec<u8> {
    let mut block = vec![0u8; MIB];
    for offset in (0..MIB).step_by(PAGE) {
        block[offset] = 1;
    }
    // Keeps the optimiser from dropping writes nobody reads.
    std::hint::black_box(&mut block);
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mebibyte_is_touched_on_every_page() {
        let block = touched_mebibyte();
        assert_eq!(block.len(), MIB);
        assert!(block.chunks(PAGE).all(|page| page[0] == 1));
    }

    #[test]
    fn error_rate_is_checked() {
        let mut cfg = DemoConfig {
            port: 0,
            version: "v1".into(),
            task_id: "t".into(),
            fail_health: false,
            error_rate: 0.5,
            latency: Duration::ZERO,
            exit_after: None,
            alloc_mb: 0,
        };
        assert!(cfg.validate().is_ok());
        for bad in [-0.1, 1.5, f64::NAN] {
            cfg.error_rate = bad;
            let err = cfg.validate().unwrap_err();
            assert!(err.to_string().contains("--error-rate"), "{err}");
        }
    }
}
