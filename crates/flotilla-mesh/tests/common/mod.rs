//! Real backends and clients on 127.0.0.1 for the mesh tests.

use bytes::Bytes;
use flotilla_mesh::{Backend, Mesh, MeshConfig, RouteTable, ServicePort, ServiceRoutes};
use flotilla_types::mesh::{MeshPort, MeshProtocol, MeshSpec};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A port the kernel just handed out and released, for use as a published port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn mesh() -> Mesh {
    Mesh::new(MeshConfig {
        bind_ip: Ipv4Addr::LOCALHOST.into(),
        header_read_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        shutdown_grace: Duration::from_secs(5),
        ..MeshConfig::default()
    })
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// An HTTP backend answering with its name. `/slow` waits until `release` is notified.
/// Response headers echo what the mesh forwarded.
pub struct TestBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    pub release: Arc<Notify>,
    stop: CancellationToken,
}

impl TestBackend {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let release = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let (n, h, r, s) = (
            name.to_string(),
            hits.clone(),
            release.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok(c) => c, Err(_) => return },
                };
                let (n, h, r, s) = (n.clone(), h.clone(), r.clone(), s.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (n, h, r) = (n.clone(), h.clone(), r.clone());
                            async move {
                                h.fetch_add(1, Ordering::SeqCst);
                                if req.uri().path() == "/slow" {
                                    r.notified().await;
                                }
                                let echo = |name: &str| {
                                    req.headers()
                                        .get(name)
                                        .map(|v| v.to_str().unwrap_or("").to_string())
                                        .unwrap_or_default()
                                };
                                let resp = Response::builder()
                                    .header("x-backend", n.as_str())
                                    .header("x-seen-xff", echo("x-forwarded-for"))
                                    .header("x-seen-forwarded", echo("forwarded"))
                                    .header("x-seen-path", req.uri().path())
                                    .status(if req.uri().path() == "/fail" {
                                        500
                                    } else {
                                        200
                                    })
                                    .body(Full::new(Bytes::from(n)))
                                    .unwrap();
                                Ok::<_, Infallible>(resp)
                            }
                        });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = s.cancelled() => {}
                    }
                });
            }
        });
        TestBackend {
            name: name.to_string(),
            addr,
            hits,
            release,
            stop,
        }
    }

    /// Kills the backend: no more accepts, open connections are cut.
    pub fn kill(&self) {
        self.stop.cancel();
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn backend(&self, weight: u8) -> Backend {
        Backend {
            task_id: self.name.clone(),
            addr: self.addr,
            weight,
            healthy: true,
            current: true,
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn http_port(published: u16) -> MeshPort {
    MeshPort {
        published,
        protocol: MeshProtocol::Http,
        proxy_protocol: false,
    }
}

/// A table with one HTTP service on `port`.
pub fn http_table(service: &str, port: u16, backends: Vec<Backend>) -> RouteTable {
    let mut table = RouteTable::default();
    table.services.insert(
        service.to_string(),
        ServiceRoutes {
            spec: MeshSpec {
                ports: vec![http_port(port)],
                ..MeshSpec::default()
            },
            ports: vec![ServicePort {
                published: port,
                backends,
            }],
            canary: None,
        },
    );
    table
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

/// A keep-alive HTTP/1.1 client connection.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { sender }
    }

    pub async fn try_get(&mut self, path: &str, headers: &[(&str, &str)]) -> hyper::Result<Reply> {
        let mut req = Request::get(path);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req = req.header("host", "test.local");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.sender.ready().await?;
        let resp = self
            .sender
            .send_request(req.body(Empty::new()).unwrap())
            .await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.try_get(path, headers).await.unwrap()
    }
}

/// One GET on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    Client::connect(addr).await.get(path, headers).await
}

/// Polls `check` until it holds, failing after a generous deadline.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
