//! Write forwarding: on a cluster manager that is not the raft leader, every write request is
//! replayed on the leader over mutual TLS (this manager's certificate authenticates it there)
//! and the leader's answer is returned as is. Reads stay local.

use crate::error::ApiError;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Marks a forwarded request so a leader that lost leadership meanwhile answers it itself
/// rather than bouncing it on.
pub(crate) const FORWARDED: HeaderName = HeaderName::from_static("x-flotilla-forwarded");
/// On a forwarded request, the original caller's client certificate as
/// `ROLE/NODE-ID/ISSUED-AT` (absent when the caller had none: loopback or bearer token). The
/// leader believes it only from a peer holding a manager certificate (see `auth.rs`).
pub(crate) const FORWARDED_PEER: HeaderName = HeaderName::from_static("x-flotilla-peer");
/// Bodies of write requests are small JSON documents; anything larger is refused, not buffered.
const MAX_FORWARDED_BODY: usize = 16 * 1024 * 1024;

pub async fn forward_writes(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let Some((leader, leader_addr, client)) = forward_target(&app, &req) else {
        return next.run(req).await;
    };
    let write = match Buffered::read(req).await {
        Ok(w) => w,
        Err(refused) => return refused,
    };
    match send_to_leader(&app, &client, &write, leader, leader_addr).await {
        Sent::Answered(resp, addr) => relay(resp, &addr).await,
        Sent::Failed(e, addr) => ApiError::Unavailable(format!(
            "this manager is not the leader and forwarding to the leader at {addr} failed: {e}"
        ))
        .into_response(),
        // This manager was elected meanwhile: it answers the write itself.
        Sent::LeaderHere => next.run(write.into_request()).await,
    }
}

/// The leader (raft id, address) a request goes to and the mTLS client to send it with; `None`
/// when this manager answers it itself: a read, an already forwarded request, a route outside
/// `/v1/`, no known leader, or this manager leads.
fn forward_target(app: &AppState, req: &Request) -> Option<(u64, String, reqwest::Client)> {
    let is_write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let forwarded = req.headers().contains_key(&FORWARDED);
    let is_v1 = req.uri().path().starts_with("/v1/");
    if !is_write || forwarded || !is_v1 {
        return None;
    }
    let leader = app
        .store
        .current_leader()
        .filter(|l| *l != app.store.node_id())?;
    let addr = app
        .store
        .members()
        .into_iter()
        .find(|m| m.raft_id == leader)?
        .addr;
    Some((leader, addr, app.leader_http.clone()?))
}

/// A write request read whole, so it can be sent (again) to the leader or answered here.
struct Buffered {
    parts: axum::http::request::Parts,
    bytes: axum::body::Bytes,
    /// The caller's client certificate, passed on in [`FORWARDED_PEER`].
    original_peer: Option<crate::cluster::PeerCert>,
}

impl Buffered {
    async fn read(req: Request) -> Result<Buffered, Response> {
        let original_peer = req
            .extensions()
            .get::<crate::cluster::PeerIdentity>()
            .and_then(|p| p.0.clone());
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, MAX_FORWARDED_BODY)
            .await
            .map_err(|e| {
                ApiError::invalid(
                    "request body unreadable",
                    vec![flotilla_types::FieldError::new("body", e.to_string())],
                )
                .into_response()
            })?;
        Ok(Buffered {
            parts,
            bytes,
            original_peer,
        })
    }

    /// The request to send to the leader at `leader_addr`.
    fn outgoing(&self, client: &reqwest::Client, leader_addr: &str) -> reqwest::RequestBuilder {
        let parts = &self.parts;
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let url = format!("https://{leader_addr}{path}");
        let mut outgoing = client
            .request(parts.method.clone(), &url)
            .header(FORWARDED, "1")
            .body(self.bytes.clone());
        if let Some(cert) = &self.original_peer {
            outgoing = outgoing.header(
                FORWARDED_PEER,
                format!(
                    "{}/{}/{}",
                    cert.identity.role, cert.identity.node_id, cert.issued_at
                ),
            );
        }
        for name in [
            axum::http::header::CONTENT_TYPE,
            axum::http::header::AUTHORIZATION,
        ] {
            if let Some(v) = parts.headers.get(&name) {
                outgoing = outgoing.header(name, v.clone());
            }
        }
        tracing::debug!(%url, method = %parts.method, "forwarding a write to the leader");
        outgoing
    }

    /// The request again, for this manager's own handlers.
    fn into_request(self) -> Request {
        let mut req = Request::new(Body::from(self.bytes));
        *req.method_mut() = self.parts.method;
        *req.uri_mut() = self.parts.uri;
        *req.version_mut() = self.parts.version;
        *req.headers_mut() = self.parts.headers;
        *req.extensions_mut() = self.parts.extensions;
        req
    }
}

/// How a forwarded write ended; the address is the leader's last tried.
enum Sent {
    Answered(reqwest::Response, String),
    Failed(reqwest::Error, String),
    /// This manager became the leader while the write waited for one.
    LeaderHere,
}

/// Sends the write to the leader. A request that never reached it (it crashed or is cut off;
/// a dead host takes the whole [`FORWARD_CONNECT_TIMEOUT`]) was not made, so sending it again
/// is safe: to whoever raft names leader next, another manager once one is elected, so the
/// client sees one slower success instead of an error it must retry itself; the same one again
/// after a pause if it is merely slow to accept connections.
async fn send_to_leader(
    app: &AppState,
    client: &reqwest::Client,
    write: &Buffered,
    leader: u64,
    leader_addr: String,
) -> Sent {
    let deadline = tokio::time::Instant::now() + LEADER_CHANGE_WAIT;
    let (mut leader, mut leader_addr) = (leader, leader_addr);
    loop {
        let e = match write.outgoing(client, &leader_addr).send().await {
            Ok(resp) => return Sent::Answered(resp, leader_addr),
            Err(e) if e.is_connect() && tokio::time::Instant::now() < deadline => e,
            Err(e) => return Sent::Failed(e, leader_addr),
        };
        match next_leader(app, Some(leader), deadline).await {
            Some((id, _)) if id == app.store.node_id() => return Sent::LeaderHere,
            Some((id, addr)) => {
                if id != leader {
                    tracing::info!(failed = %leader_addr, leader = %addr, "leader changed; forwarding the write to the new leader");
                } else {
                    tracing::debug!(leader = %addr, error = %e, "the leader did not accept a connection; trying again");
                }
                (leader, leader_addr) = (id, addr);
            }
            None => return Sent::Failed(e, leader_addr),
        }
    }
}

/// The leader's answer, returned as is (status, content type, body).
async fn relay(resp: reqwest::Response, leader_addr: &str) -> Response {
    let mut builder = Response::builder().status(resp.status());
    if let Some(ct) = resp.headers().get(axum::http::header::CONTENT_TYPE) {
        builder = builder.header(axum::http::header::CONTENT_TYPE, ct.clone());
    }
    match resp.bytes().await {
        Ok(body) => builder
            .body(Body::from(body))
            .unwrap_or_else(|e| ApiError::Internal(e.to_string()).into_response()),
        Err(e) => ApiError::Unavailable(format!(
            "the leader at {leader_addr} failed mid-answer: {e}"
        ))
        .into_response(),
    }
}

/// How long a forwarded write that could not reach the leader waits for a new one.
const LEADER_CHANGE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long forwarding waits for a connection (TCP and TLS) to the leader. A killed leader's
/// host answers nothing, so every attempt to reach it costs this much: short enough that a
/// write waiting on it moves to the newly elected leader soon after the election (~1.3 s after
/// the leader died), long enough for a busy leader's TLS handshake (milliseconds; connections
/// are kept alive, so this is rare). A failed attempt is retried, so a slow one only costs time.
pub(crate) const FORWARD_CONNECT_TIMEOUT: std::time::Duration =
    std::time::Duration::from_millis(400);
/// After a failed connection to a leader raft still names, the pause before trying it again
/// (unless raft names another one first).
const RECONNECT_PAUSE: std::time::Duration = std::time::Duration::from_millis(150);

/// The leader to send to after a connection to `old` failed: a newly elected one as soon as
/// raft knows it (with its address), else `old` again after [`RECONNECT_PAUSE`]; `None` at
/// `deadline` or when no leader is known.
async fn next_leader(
    app: &AppState,
    old: Option<u64>,
    deadline: tokio::time::Instant,
) -> Option<(u64, String)> {
    let retry_old_at = tokio::time::Instant::now() + RECONNECT_PAUSE;
    loop {
        let now = tokio::time::Instant::now();
        let leader = app.store.current_leader();
        let wanted = match leader {
            Some(id) if Some(id) != old => Some(id),
            Some(id) if now >= retry_old_at => Some(id),
            _ => None,
        };
        if let Some(id) = wanted {
            if let Some(m) = app.store.members().into_iter().find(|m| m.raft_id == id) {
                return Some((id, m.addr));
            }
        }
        if now >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}
