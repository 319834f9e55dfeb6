//! L7 proxying: requests are routed by Host and path, balanced per request, retried on another
//! backend when that is safe, and answered with the service's fallback when no backend can take
//! them.
//!
//! Everything a client connection needs runs in its own task: its backend connections are
//! driven by the request future and the response body rather than by tasks of their own, so a
//! request costs no wake-ups of other tasks (hyper's pooled client would add two or three).

use crate::balancer::{BackendState, InFlight, Pool};
use crate::metrics::ErrorClass;
use crate::routes::{match_route, PortPlan};
use crate::runtime::{Routing, ServiceEntry};
use crate::{MeshConfig, Shared};
use bytes::Bytes;
use flotilla_types::release::CanaryMatch;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::{poll_fn, Future};
use std::net::{IpAddr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

type UpstreamBody = Either<Full<Bytes>, Incoming>;
type UpstreamConn = http1::Connection<TokioIo<tokio::net::TcpStream>, UpstreamBody>;

/// Backend connections most recently used by one client connection, kept for its next requests.
const MAX_UPSTREAMS_PER_CLIENT: usize = 4;

/// What one client connection keeps between its requests. HTTP/1 handles a connection's
/// requests one after another, so the locks here are never contended.
pub(crate) struct ClientConn {
    shared: Arc<Shared>,
    /// The routing snapshot and its generation, refreshed when `Mesh::apply` swaps in a new
    /// one. Taken out by the request in progress (so no shared reference count is touched per
    /// request) and put back when routing is done.
    routing: Mutex<Option<(u64, Arc<Routing>)>>,
    upstreams: Mutex<Vec<Upstream>>,
}

/// An HTTP/1 connection to a backend, used by one client connection. Reusing it directly (as
/// linkerd2-proxy keeps a client per endpoint) skips a shared pool's lock.
struct Upstream {
    addr: SocketAddr,
    sender: http1::SendRequest<UpstreamBody>,
    /// `None` once the connection ended (closed by the backend or failed).
    conn: Option<Pin<Box<UpstreamConn>>>,
    idle_since: Instant,
}

impl Upstream {
    /// Lets the connection make progress (write the request, read the response and its body);
    /// wakes the calling task when it can make more.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = self.conn.as_mut() {
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                if let Err(e) = result {
                    tracing::debug!(addr = %self.addr, error = %e, "backend connection ended with error");
                }
                // Dropping the connection fails a request still waiting on it.
                self.conn = None;
            }
        }
    }

    /// Sends `req` and waits for the response head, driving the connection meanwhile.
    async fn exchange(&mut self, req: Request<UpstreamBody>) -> Exchange {
        let ready = poll_fn(|cx| {
            self.drive(cx);
            if self.conn.is_none() {
                return Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|r| r.is_ok())
        })
        .await;
        if !ready {
            return Exchange::NotSent(req);
        }
        let mut response = pin!(self.sender.try_send_request(req));
        let result = poll_fn(|cx| {
            self.drive(cx);
            response.as_mut().poll(cx)
        })
        .await;
        match result {
            Ok(resp) => Exchange::Response(resp),
            Err(mut e) => match e.take_message() {
                Some(req) => Exchange::NotSent(req),
                None => Exchange::Failed(e.into_error()),
            },
        }
    }
}

/// How one exchange on a backend connection went.
enum Exchange {
    Response(Response<Incoming>),
    /// The connection closed before the request went out: it can go on a new one.
    NotSent(Request<UpstreamBody>),
    /// The exchange failed after the request (or part of it) may have been sent.
    Failed(hyper::Error),
}

/// Why a request did not get a response from a backend.
enum SendError {
    /// Nothing reached the backend (refused, unreachable, connect timeout).
    Connect(String),
    /// The exchange failed after the request (or part of it) may have been sent.
    Exchange(hyper::Error),
}

impl ClientConn {
    fn new(shared: Arc<Shared>) -> Self {
        ClientConn {
            shared,
            routing: Mutex::new(None),
            upstreams: Mutex::new(Vec::new()),
        }
    }

    /// The current routing snapshot, held by this request until the guard drops.
    fn routing(&self) -> RoutingGuard<'_> {
        let cached = self
            .routing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut cached =
            cached.unwrap_or_else(|| (self.shared.routing_generation(), self.shared.routing()));
        self.shared.refresh_routing(&mut cached);
        RoutingGuard {
            home: &self.routing,
            snapshot: Some(cached),
        }
    }

    fn take(&self, addr: SocketAddr, max_idle: std::time::Duration) -> Option<Upstream> {
        let mut conns = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        let i = conns.iter().position(|u| u.addr == addr)?;
        let up = conns.swap_remove(i);
        (up.conn.is_some() && !up.sender.is_closed() && up.idle_since.elapsed() < max_idle)
            .then_some(up)
    }

    fn put(&self, mut up: Upstream) {
        if up.conn.is_none() {
            return;
        }
        up.idle_since = Instant::now();
        let mut conns = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() >= MAX_UPSTREAMS_PER_CLIENT {
            conns.remove(0);
        }
        conns.push(up);
    }

    /// Sends `req` to `addr` on this client connection's connection to it, or on a new one.
    /// The response comes with the connection it arrived on, which the response body drives
    /// and then hands back.
    async fn send(
        &self,
        cfg: &MeshConfig,
        addr: SocketAddr,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Upstream), SendError> {
        if let Some(mut up) = self.take(addr, cfg.pool_idle_timeout) {
            match up.exchange(req).await {
                Exchange::Response(resp) => return Ok((resp, up)),
                Exchange::NotSent(back) => req = back,
                Exchange::Failed(e) => return Err(SendError::Exchange(e)),
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
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        let mut up = Upstream {
            addr,
            sender,
            conn: Some(Box::pin(conn)),
            idle_since: Instant::now(),
        };
        match up.exchange(req).await {
            Exchange::Response(resp) => Ok((resp, up)),
            Exchange::NotSent(_) => Err(SendError::Connect(
                "backend closed the connection at once".to_string(),
            )),
            Exchange::Failed(e) => Err(SendError::Exchange(e)),
        }
    }
}

/// A request's routing snapshot; returned to its client connection on drop.
struct RoutingGuard<'a> {
    home: &'a Mutex<Option<(u64, Arc<Routing>)>>,
    snapshot: Option<(u64, Arc<Routing>)>,
}

impl std::ops::Deref for RoutingGuard<'_> {
    type Target = Routing;

    fn deref(&self) -> &Routing {
        // Only `drop` empties it.
        &self
            .snapshot
            .as_ref()
            .expect("snapshot present until drop")
            .1
    }
}

impl Drop for RoutingGuard<'_> {
    fn drop(&mut self) {
        *self.home.lock().unwrap_or_else(|e| e.into_inner()) = self.snapshot.take();
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
    let client = Arc::new(ClientConn::new(shared.clone()));
    let service = hyper::service::service_fn(move |req| {
        let client = client.clone();
        async move { Ok::<_, Infallible>(handle(&client, port, peer, req).await) }
    });
    let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
    let mut drain = pin!(shared.drain.cancelled());
    let mut kill = pin!(shared.kill.cancelled());
    // Polling a waiting cancellation future takes its token's lock, which every connection on
    // every core shares; doing that on each wake-up (several per request) made the lock a hot
    // spot. The future keeps the waker it was last polled with, so it is polled again only
    // when the token fired or the task's waker changed.
    let mut registered: Option<std::task::Waker> = None;
    let mut draining = false;
    let result = poll_fn(|cx| {
        if !draining {
            let stale = registered.as_ref().is_none_or(|w| !w.will_wake(cx.waker()));
            if stale || shared.drain.is_cancelled() {
                registered = Some(cx.waker().clone());
                if drain.as_mut().poll(cx).is_ready() {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
        if draining && kill.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        conn.as_mut().poll(cx)
    })
    .await;
    if let Err(e) = result {
        // Garbage, timeouts and clients going away end up here; none of them matter to others.
        tracing::debug!(error = %e, "http connection ended with error");
    }
}

/// The body of a response to a client: streamed from a backend, or produced by the mesh itself.
pub(crate) enum ProxyBody {
    Backend(BackendBody),
    Local(Full<Bytes>),
}

/// A backend's response body. It drives the backend connection it comes from, keeps the
/// request counted as in flight until it is fully sent or abandoned, and hands the connection
/// back to its client connection once the body is complete (a connection whose body was cut
/// short is closed, as it cannot be reused).
pub(crate) struct BackendBody {
    body: Incoming,
    upstream: Option<Upstream>,
    home: Arc<ClientConn>,
    _in_flight: InFlight,
}

impl BackendBody {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // Data the connection already read comes first; otherwise let it read more and look again.
        let mut polled = Pin::new(&mut self.body).poll_frame(cx);
        if polled.is_pending() {
            if let Some(up) = self.upstream.as_mut() {
                up.drive(cx);
            }
            polled = Pin::new(&mut self.body).poll_frame(cx);
        }
        if let Poll::Ready(None) = polled {
            self.give_back();
        }
        polled
    }

    fn give_back(&mut self) {
        if let Some(up) = self.upstream.take() {
            self.home.put(up);
        }
    }
}

impl Drop for BackendBody {
    fn drop(&mut self) {
        // A body with nothing left to read (e.g. empty, which hyper never polls) is complete.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Backend(backend) => backend.poll_frame(cx),
            ProxyBody::Local(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never: Infallible| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Backend(backend) => backend.body.is_end_stream(),
            ProxyBody::Local(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Backend(backend) => backend.body.size_hint(),
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
    client: &Arc<ClientConn>,
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
    let shared = &client.shared;
    if head_bytes > shared.cfg.max_header_bytes {
        return local(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request headers are too large\n",
        );
    }
    let (mut parts, body) = req.into_parts();
    let routing = client.routing();
    let Some(PortPlan::Http { routes }) = routing.ports.get(&port) else {
        return local(StatusCode::NOT_FOUND, "no http service on this port\n");
    };
    let host = request_host(&parts);
    let Some(route) = match_route(routes, host, parts.uri.path()) else {
        return local(StatusCode::NOT_FOUND, "no route matches this request\n");
    };
    let Some((service, pool)) = routing.target(&route.service, port) else {
        return local(StatusCode::NOT_FOUND, "no route matches this request\n");
    };
    let forwarded = forwarded_values(&parts.headers, peer, host);
    strip_hop_by_hop(&mut parts.headers);
    for (name, value) in forwarded.into_iter().flatten() {
        parts.headers.insert(name, value);
    }
    proxy(client, service, pool, port, parts, body).await
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

/// The request of one attempt, carrying `body`. The headers are moved into the last attempt
/// that can be made and copied only while a later one is still possible.
fn upstream_request<B>(
    parts: &mut Parts,
    keep: bool,
    backend_authority: &hyper::http::uri::Authority,
    body: B,
) -> Result<Request<B>, ()> {
    // Origin form on the wire; the client's Host is kept (or the backend's when it sent none).
    let uri = if parts.uri.scheme().is_none() && parts.uri.authority().is_none() {
        parts.uri.clone()
    } else {
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
        Uri::from_parts({
            let mut p = hyper::http::uri::Parts::default();
            p.path_and_query = Some(pq);
            p
        })
        .map_err(|_| ())?
    };
    let mut headers = if keep {
        parts.headers.clone()
    } else {
        std::mem::take(&mut parts.headers)
    };
    if !headers.contains_key(header::HOST) {
        if let Ok(host) = HeaderValue::from_str(backend_authority.as_str()) {
            headers.insert(header::HOST, host);
        }
    }
    let mut upstream = Request::new(body);
    *upstream.method_mut() = parts.method.clone();
    *upstream.uri_mut() = uri;
    *upstream.headers_mut() = headers;
    Ok(upstream)
}

/// The answer when no backend could take a request: the service's fallback.
fn no_backend(service: &ServiceEntry) -> Response<ProxyBody> {
    service.counters.error(ErrorClass::BreakerOpen);
    let fallback = &service.spec.fallback;
    let status = StatusCode::from_u16(fallback.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    local(status, fallback.body.clone())
}

/// The `Set-Cookie` value pinning the client to `backend`, unless it already is.
fn sticky_cookie(
    service: &ServiceEntry,
    sticky_task: Option<&str>,
    backend: &BackendState,
) -> Option<String> {
    let name = service.spec.sticky_cookie.as_deref()?;
    (sticky_task != Some(backend.task_id.as_str()))
        .then(|| format!("{name}={}; Path=/; HttpOnly", backend.task_id))
}

async fn proxy(
    client: &Arc<ClientConn>,
    service: &ServiceEntry,
    pool: &Pool,
    port: u16,
    mut parts: Parts,
    body: Incoming,
) -> Response<ProxyBody> {
    let shared = &client.shared;
    service.counters.requests.fetch_add(1, Ordering::Relaxed);
    service.budget.deposit();
    let sticky_task = service
        .spec
        .sticky_cookie
        .as_deref()
        .and_then(|name| cookie_value(&parts.headers, name));
    // Chosen testers reach the canary at any step; without a usable canary backend the
    // request is balanced as usual.
    let canary_pool = service
        .canary
        .as_ref()
        .filter(|(matching, _)| canary_matches(matching, &parts.headers))
        .and_then(|(_, pools)| pools.get(&port));
    let mut outbound = match read_body(body, &parts.headers, shared.cfg.max_replay_body_bytes).await
    {
        Ok(outbound) => outbound,
        Err(reason) => return local(StatusCode::BAD_REQUEST, reason),
    };
    let idempotent = is_idempotent(&parts.method);
    // Backends that failed this request; stays empty (unallocated) while the first attempt
    // succeeds.
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempted = false;
    let mut failure = StatusCode::BAD_GATEWAY;
    loop {
        let sticky = match (&sticky_task, attempted) {
            (Some(task), false) => pool.sticky(task),
            _ => None,
        };
        let Some(attempt) = sticky
            .or_else(|| canary_pool.and_then(|p| p.pick(&tried)))
            .or_else(|| pool.pick(&tried))
        else {
            break;
        };
        attempted = true;
        let backend = attempt.backend.clone();
        let replayable = matches!(outbound, Outbound::Replayable(_));
        let body = match &mut outbound {
            Outbound::Replayable(bytes) => Either::Left(Full::new(bytes.clone())),
            Outbound::Streaming(stream) => match stream.take() {
                Some(stream) => Either::Right(stream),
                None => break,
            },
        };
        // Another attempt can only follow when the body can be sent again and another backend
        // might take it; only then are the headers copied rather than moved.
        let others = pool.len() + canary_pool.map_or(0, Pool::len) > tried.len() + 1;
        let keep_headers = replayable && others;
        let Ok(upstream) = upstream_request(&mut parts, keep_headers, &backend.authority, body)
        else {
            return local(StatusCode::BAD_REQUEST, "request target is not valid\n");
        };
        backend.counters.requests.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight::new(backend.clone());
        let started = Instant::now();
        let sent = tokio::time::timeout(
            shared.cfg.response_timeout,
            client.send(&shared.cfg, backend.addr, upstream),
        )
        .await;
        let (class, retryable) = match sent {
            Ok(Ok((resp, up))) => {
                let rtt = started.elapsed();
                backend.observe(rtt);
                service.counters.latency.record(rtt);
                let server_error = resp.status().is_server_error();
                attempt.settle(!server_error);
                if server_error {
                    backend.counters.error(ErrorClass::Status5xx);
                    service.counters.error(ErrorClass::Status5xx);
                }
                let set_cookie = sticky_cookie(service, sticky_task.as_deref(), &backend);
                return relay(resp, up, client, in_flight, set_cookie);
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
        tried.push(backend.addr);
        attempt.settle(false);
        backend.counters.error(class);
        service.counters.error(class);
        // Kept headers mean the body is replayable and another backend may take it (moved
        // ones, that none could).
        if !(keep_headers && retryable && service.budget.withdraw()) {
            return local(failure, "upstream request failed\n");
        }
    }
    if !attempted {
        return no_backend(service);
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
    upstream: Upstream,
    home: &Arc<ClientConn>,
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
        ProxyBody::Backend(BackendBody {
            body,
            upstream: Some(upstream),
            home: home.clone(),
            _in_flight: in_flight,
        }),
    )
}

/// The requested host without port or brackets: from an absolute URI, else `Host`. Compared
/// case-insensitively by the routes.
fn request_host(parts: &Parts) -> Option<&str> {
    let raw = match parts.uri.authority() {
        Some(authority) => authority.host(),
        None => {
            let value = parts.headers.get(header::HOST)?.to_str().ok()?;
            match value.strip_prefix('[') {
                // An IPv6 literal: `[::1]:8080`.
                Some(v6) => v6.split(']').next()?,
                None => value.split(':').next()?,
            }
        }
    };
    let raw = raw.trim_matches(['[', ']']);
    (!raw.is_empty()).then_some(raw)
}

/// Headers that describe one connection and must not be forwarded (RFC 9110 §7.6.1), plus the
/// legacy ones proxies still meet.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes [`HOP_BY_HOP`] headers and those the `Connection` header lists.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Nearly no message has any: one look at each name is cheaper than hashing eight of them.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// `X-Forwarded-For` and `Forwarded` (RFC 7239) with the client appended, and
/// `X-Forwarded-Proto`, to be set on the upstream request.
fn forwarded_values(
    headers: &HeaderMap,
    peer: SocketAddr,
    host: Option<&str>,
) -> [Option<(HeaderName, HeaderValue)>; 3] {
    let (mut prior_xff, mut prior_forwarded) = (None, None);
    // One pass over the (few) headers instead of hashing both names.
    for (name, value) in headers {
        if *name == X_FORWARDED_FOR {
            prior_xff = prior_xff.or_else(|| value.to_str().ok());
        } else if *name == header::FORWARDED {
            prior_forwarded = prior_forwarded.or_else(|| value.to_str().ok());
        }
    }
    let ip = peer.ip().to_canonical();
    let mut xff = String::with_capacity(prior_xff.map_or(0, |p| p.len() + 2) + 40);
    if let Some(prior) = prior_xff {
        xff.push_str(prior);
        xff.push_str(", ");
    }
    push_ip(&mut xff, ip);
    let mut forwarded = String::with_capacity(
        prior_forwarded.map_or(0, |p| p.len() + 2) + 64 + host.map_or(0, str::len),
    );
    if let Some(prior) = prior_forwarded {
        forwarded.push_str(prior);
        forwarded.push_str(", ");
    }
    forwarded.push_str("for=");
    match ip {
        IpAddr::V4(_) => push_ip(&mut forwarded, ip),
        IpAddr::V6(_) => {
            forwarded.push_str("\"[");
            push_ip(&mut forwarded, ip);
            forwarded.push_str("]\"");
        }
    }
    forwarded.push_str(";proto=http");
    // Only a plain host name goes into the quoted string (no quote or backslash can end it).
    if let Some(host) = host.filter(|h| {
        h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~:%!$&'()*+,;=".contains(&b))
    }) {
        forwarded.push_str(";host=\"");
        forwarded.extend(host.chars().map(|c| c.to_ascii_lowercase()));
        forwarded.push('"');
    }
    // `from_maybe_shared` takes the string's buffer as is (no copy).
    let value = |s: String| HeaderValue::from_maybe_shared(Bytes::from(s)).ok();
    [
        value(xff).map(|v| (X_FORWARDED_FOR, v)),
        value(forwarded).map(|v| (header::FORWARDED, v)),
        Some((X_FORWARDED_PROTO, HeaderValue::from_static("http"))),
    ]
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Appends `ip` in its usual text form; IPv4 (nearly every client) without the formatting
/// machinery, which cost more than the rest of the header building together.
fn push_ip(buf: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push('.');
                }
                if octet >= 100 {
                    buf.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    buf.push(char::from(b'0' + octet / 10 % 10));
                }
                buf.push(char::from(b'0' + octet % 10));
            }
        }
        // Writing into a String cannot fail.
        IpAddr::V6(v6) => {
            let _ = write!(buf, "{v6}");
        }
    }
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
        let values = forwarded_values(&headers, "[::1]:5".parse().unwrap(), Some("Web.example"));
        for (name, value) in values.into_iter().flatten() {
            headers.insert(name, value);
        }
        assert_eq!(headers["x-forwarded-for"], "1.1.1.1, ::1");
        assert_eq!(
            headers[header::FORWARDED],
            "for=\"[::1]\";proto=http;host=\"web.example\""
        );
    }

    #[test]
    fn ipv4_text_form() {
        for ip in ["0.0.0.0", "10.20.3.255", "192.168.100.9", "127.0.0.1"] {
            let mut buf = String::new();
            push_ip(&mut buf, ip.parse().unwrap());
            assert_eq!(buf, ip);
        }
    }

    #[test]
    fn request_host_without_port() {
        let parts = |uri: &str, host: Option<&str>| {
            let mut req = Request::builder().uri(uri);
            if let Some(host) = host {
                req = req.header(header::HOST, host);
            }
            req.body(()).unwrap().into_parts().0
        };
        let p = parts("/x", Some("Web.Example:8080"));
        assert_eq!(request_host(&p), Some("Web.Example"));
        let p = parts("/x", Some("[::1]:80"));
        assert_eq!(request_host(&p), Some("::1"));
        let p = parts("http://api.example/x", Some("other"));
        assert_eq!(request_host(&p), Some("api.example"));
        assert_eq!(request_host(&parts("/x", None)), None);
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
