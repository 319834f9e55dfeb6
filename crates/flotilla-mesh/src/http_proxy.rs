//! L7 proxying: requests are routed by Host and path, balanced per request, retried on another
//! backend when that is safe, and answered with the service's fallback when no backend can take
//! them.

use crate::balancer::{InFlight, Pool};
use crate::metrics::ErrorClass;
use crate::routes::{match_route, PortPlan};
use crate::runtime::ServiceEntry;
use crate::{MeshConfig, Shared};
use bytes::Bytes;
use flotilla_types::release::CanaryMatch;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

type UpstreamBody = Either<Full<Bytes>, Incoming>;

/// Backend connections most recently used by one client connection, kept for its next requests.
const MAX_UPSTREAMS_PER_CLIENT: usize = 4;

/// The upstream HTTP/1 connections of one client connection, by backend address. A client
/// connection's requests come one after another, so one connection per backend is enough, and
/// reusing it directly (as linkerd2-proxy keeps a client per endpoint) skips a shared pool's
/// lock and the task a pooled client spawns per request to hand its connection back.
#[derive(Default)]
pub(crate) struct Upstreams {
    conns: std::sync::Mutex<Vec<Upstream>>,
}

struct Upstream {
    addr: SocketAddr,
    sender: http1::SendRequest<UpstreamBody>,
    idle_since: Instant,
}

/// Why a request did not get a response from a backend.
enum SendError {
    /// Nothing reached the backend (refused, unreachable, connect timeout).
    Connect(String),
    /// The exchange failed after the request (or part of it) may have been sent.
    Exchange(hyper::Error),
}

impl Upstreams {
    fn take(&self, addr: SocketAddr, max_idle: std::time::Duration) -> Option<Upstream> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let i = conns.iter().position(|u| u.addr == addr)?;
        let up = conns.swap_remove(i);
        (!up.sender.is_closed() && up.idle_since.elapsed() < max_idle).then_some(up)
    }

    fn put(&self, addr: SocketAddr, sender: http1::SendRequest<UpstreamBody>) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() >= MAX_UPSTREAMS_PER_CLIENT {
            conns.remove(0);
        }
        conns.push(Upstream {
            addr,
            sender,
            idle_since: Instant::now(),
        });
    }

    /// Sends `req` to `addr` on this client connection's connection to it, or on a new one.
    async fn send(
        &self,
        cfg: &MeshConfig,
        addr: SocketAddr,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, SendError> {
        if let Some(mut up) = self.take(addr, cfg.pool_idle_timeout) {
            if up.sender.ready().await.is_ok() {
                match up.sender.try_send_request(req).await {
                    Ok(resp) => {
                        self.put(addr, up.sender);
                        return Ok(resp);
                    }
                    Err(mut e) => match e.take_message() {
                        // The connection closed before the request went out: use a new one.
                        Some(back) => req = back,
                        None => return Err(SendError::Exchange(e.into_error())),
                    },
                }
            }
        }
        let stream =
            match tokio::time::timeout(cfg.connect_timeout, tokio::net::TcpStream::connect(addr))
                .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(SendError::Connect(e.to_string())),
                Err(_) => return Err(SendError::Connect("connect timed out".to_string())),
            };
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        // Ends when the client connection drops its sender (and the backend is idle) or the
        // backend closes.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "backend connection ended with error");
            }
        });
        let resp = sender
            .send_request(req)
            .await
            .map_err(SendError::Exchange)?;
        self.put(addr, sender);
        Ok(resp)
    }
}

/// Serves one client connection until it closes, the header timeout fires, or the mesh shuts
/// down.
pub(crate) async fn serve_connection(
    shared: Arc<Shared>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    port: u16,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.cfg.header_read_timeout)
        .max_buf_size(shared.cfg.max_header_bytes);
    let handler = shared.clone();
    let upstreams = Arc::new(Upstreams::default());
    let service = hyper::service::service_fn(move |req| {
        let shared = handler.clone();
        let upstreams = upstreams.clone();
        async move { Ok::<_, Infallible>(handle(&shared, &upstreams, port, peer, req).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shared.drain.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => result,
                _ = shared.kill.cancelled() => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        // Garbage, timeouts and clients going away end up here; none of them matter to others.
        tracing::debug!(error = %e, "http connection ended with error");
    }
}

/// The body of a response to a client: streamed from a backend (keeping the request counted as
/// in flight until it is fully sent or abandoned), or produced by the mesh itself.
pub(crate) enum ProxyBody {
    Backend {
        body: Incoming,
        _in_flight: InFlight,
    },
    Local(Full<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Backend { body, .. } => Pin::new(body).poll_frame(cx),
            ProxyBody::Local(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never: Infallible| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Backend { body, .. } => body.is_end_stream(),
            ProxyBody::Local(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Backend { body, .. } => body.size_hint(),
            ProxyBody::Local(full) => full.size_hint(),
        }
    }
}

fn local(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Local(Full::new(body.into())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn handle(
    shared: &Shared,
    upstreams: &Upstreams,
    port: u16,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    // hyper's buffer limit is only checked between reads, so a large head that arrives in one
    // read slips through; measure the parsed head instead.
    let head_bytes: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if head_bytes > shared.cfg.max_header_bytes {
        return local(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request headers are too large\n",
        );
    }
    let routing = shared.routing();
    let Some(PortPlan::Http { routes }) = routing.ports.get(&port) else {
        return local(StatusCode::NOT_FOUND, "no http service on this port\n");
    };
    let host = request_host(&req);
    let Some(route) = match_route(routes, host.as_deref(), req.uri().path()) else {
        return local(StatusCode::NOT_FOUND, "no route matches this request\n");
    };
    let Some((service, pool)) = routing.target(&route.service, port) else {
        return local(StatusCode::NOT_FOUND, "no route matches this request\n");
    };
    proxy(shared, upstreams, service, pool, port, peer, host, req).await
}

/// The request body as it will be sent upstream.
enum Outbound {
    /// Fully read (small or empty): can be sent again to another backend.
    Replayable(Bytes),
    /// Streamed from the client: usable once.
    Streaming(Option<Incoming>),
}

/// Methods that may be repeated without changing the outcome (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

#[allow(clippy::too_many_arguments)]
async fn proxy(
    shared: &Shared,
    upstreams: &Upstreams,
    service: &ServiceEntry,
    pool: &Pool,
    port: u16,
    peer: SocketAddr,
    host: Option<String>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    service.counters.requests.fetch_add(1, Ordering::Relaxed);
    service.budget.deposit();
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    add_forwarded(&mut headers, peer, host.as_deref());
    let sticky_task = service
        .spec
        .sticky_cookie
        .as_deref()
        .and_then(|name| cookie_value(&headers, name));
    // Chosen testers reach the canary at any step; without a usable canary backend the
    // request is balanced as usual.
    let canary_pool = service
        .canary
        .as_ref()
        .filter(|(matching, _)| canary_matches(matching, &headers))
        .and_then(|(_, pools)| pools.get(&port));
    let mut outbound = match read_body(body, &headers, shared.cfg.max_replay_body_bytes).await {
        Ok(outbound) => outbound,
        Err(reason) => return local(StatusCode::BAD_REQUEST, reason),
    };
    let idempotent = is_idempotent(&parts.method);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let mut tried = Vec::new();
    let mut failure = StatusCode::BAD_GATEWAY;
    loop {
        let sticky = match (&sticky_task, tried.is_empty()) {
            (Some(task), true) => pool.sticky(task),
            _ => None,
        };
        let Some(attempt) = sticky
            .or_else(|| canary_pool.and_then(|p| p.pick(&tried)))
            .or_else(|| pool.pick(&tried))
        else {
            break;
        };
        let backend = attempt.backend.clone();
        tried.push(backend.addr);
        let body = match &mut outbound {
            Outbound::Replayable(bytes) => Either::Left(Full::new(bytes.clone())),
            Outbound::Streaming(stream) => match stream.take() {
                Some(stream) => Either::Right(stream),
                None => break,
            },
        };
        // Origin form on the wire; the client's Host is kept (or the backend's when it sent none).
        let uri = match Uri::builder().path_and_query(path_and_query).build() {
            Ok(uri) => uri,
            Err(_) => return local(StatusCode::BAD_REQUEST, "request target is not valid\n"),
        };
        let mut upstream = Request::new(body);
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = uri;
        *upstream.headers_mut() = headers.clone();
        if !upstream.headers().contains_key(header::HOST) {
            if let Ok(host) = HeaderValue::from_str(backend.authority.as_str()) {
                upstream.headers_mut().insert(header::HOST, host);
            }
        }
        backend.counters.requests.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight::new(backend.clone());
        let started = Instant::now();
        let sent = tokio::time::timeout(
            shared.cfg.response_timeout,
            upstreams.send(&shared.cfg, backend.addr, upstream),
        )
        .await;
        let (class, retryable) = match sent {
            Ok(Ok(resp)) => {
                let rtt = started.elapsed();
                backend.observe(rtt);
                service.counters.latency.record(rtt);
                let server_error = resp.status().is_server_error();
                attempt.settle(!server_error);
                if server_error {
                    backend.counters.error(ErrorClass::Status5xx);
                    service.counters.error(ErrorClass::Status5xx);
                }
                let set_cookie = service
                    .spec
                    .sticky_cookie
                    .as_deref()
                    .filter(|_| sticky_task.as_deref() != Some(backend.task_id.as_str()))
                    .map(|name| format!("{name}={}; Path=/; HttpOnly", backend.task_id));
                return relay(resp, in_flight, set_cookie);
            }
            // Nothing reached the backend, so any request may go elsewhere.
            Ok(Err(SendError::Connect(e))) => {
                tracing::debug!(task = %backend.task_id, addr = %backend.addr, error = %e, "backend connect failed");
                (ErrorClass::Connect, true)
            }
            Ok(Err(SendError::Exchange(e))) => {
                tracing::debug!(task = %backend.task_id, addr = %backend.addr, error = %e, "backend exchange failed");
                failure = StatusCode::BAD_GATEWAY;
                (ErrorClass::Status5xx, idempotent)
            }
            Err(_) => {
                failure = StatusCode::GATEWAY_TIMEOUT;
                (ErrorClass::Timeout, idempotent)
            }
        };
        attempt.settle(false);
        backend.counters.error(class);
        service.counters.error(class);
        let replayable = matches!(outbound, Outbound::Replayable(_));
        if !(retryable && replayable && service.budget.withdraw()) {
            return local(failure, "upstream request failed\n");
        }
    }
    if tried.is_empty() {
        service.counters.error(ErrorClass::BreakerOpen);
        let fallback = &service.spec.fallback;
        let status =
            StatusCode::from_u16(fallback.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return local(status, fallback.body.clone());
    }
    local(failure, "upstream request failed\n")
}

/// Reads a small body into memory (so it can be replayed) or leaves it streaming.
async fn read_body(
    body: Incoming,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Outbound, &'static str> {
    if body.is_end_stream() {
        return Ok(Outbound::Replayable(Bytes::new()));
    }
    let small = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|len| len <= limit);
    if !small {
        return Ok(Outbound::Streaming(Some(body)));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(Outbound::Replayable(collected.to_bytes())),
        Err(_) => Err("request body could not be read\n"),
    }
}

fn relay(
    resp: Response<Incoming>,
    in_flight: InFlight,
    set_cookie: Option<String>,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(value) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        parts.headers.append(header::SET_COOKIE, value);
    }
    Response::from_parts(
        parts,
        ProxyBody::Backend {
            body,
            _in_flight: in_flight,
        },
    )
}

/// The requested host, lowercase and without port: from an absolute URI, else `Host`.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().authority() {
        Some(authority) => authority.host().to_string(),
        None => {
            let value = req.headers().get(header::HOST)?.to_str().ok()?;
            value.parse::<Uri>().ok()?.host()?.to_string()
        }
    };
    Some(raw.trim_matches(['[', ']']).to_ascii_lowercase())
}

/// Headers that describe one connection and must not be forwarded (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Appends the client to `X-Forwarded-For` and `Forwarded` (RFC 7239).
fn add_forwarded(headers: &mut HeaderMap, peer: SocketAddr, host: Option<&str>) {
    let ip = peer.ip().to_canonical();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip.to_string(),
    };
    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut element = format!("for={node};proto=http");
    if let Some(host) = host {
        element.push_str(&format!(";host=\"{host}\""));
    }
    let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {element}"),
        None => element,
    };
    for (name, value) in [
        (HeaderName::from_static("x-forwarded-for"), xff),
        (header::FORWARDED, forwarded),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
}

/// Whether the request carries the canary's header or cookie (with its value, if one is set).
fn canary_matches(matching: &CanaryMatch, headers: &HeaderMap) -> bool {
    let value_ok = |v: &str| {
        matching
            .value
            .as_deref()
            .is_none_or(|want| v.trim() == want)
    };
    let by_header = matching.header.as_deref().is_some_and(|name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(value_ok)
    });
    by_header
        || matching
            .cookie
            .as_deref()
            .and_then(|name| cookie_value(headers, name))
            .is_some_and(|v| value_ok(&v))
}

/// The value of cookie `name`, if the request carries it.
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_headers_append() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        add_forwarded(
            &mut headers,
            "[::1]:5".parse().unwrap(),
            Some("web.example"),
        );
        assert_eq!(headers["x-forwarded-for"], "1.1.1.1, ::1");
        assert_eq!(
            headers[header::FORWARDED],
            "for=\"[::1]\";proto=http;host=\"web.example\""
        );
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn canary_match_by_header_or_cookie() {
        let m = CanaryMatch {
            header: Some("X-Canary".into()),
            cookie: Some("canary".into()),
            value: Some("yes".into()),
        };
        let with = |name: &'static str, value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(value));
            h
        };
        assert!(canary_matches(&m, &with("x-canary", "yes")));
        assert!(!canary_matches(&m, &with("x-canary", "no")));
        assert!(canary_matches(&m, &with("cookie", "a=1; canary=yes")));
        assert!(!canary_matches(&m, &with("cookie", "canary=nope")));
        assert!(!canary_matches(&m, &HeaderMap::new()));
        let any = CanaryMatch { value: None, ..m };
        assert!(canary_matches(&any, &with("x-canary", "whatever")));
    }

    #[test]
    fn cookie_lookup() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; lb=task7"));
        assert_eq!(cookie_value(&headers, "lb").as_deref(), Some("task7"));
        assert_eq!(cookie_value(&headers, "x"), None);
    }
}
