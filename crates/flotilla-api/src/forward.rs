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
    let is_write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let forwarded = req.headers().contains_key(&FORWARDED);
    let is_v1 = req.uri().path().starts_with("/v1/");
    let leader = app.store.current_leader();
    if !is_write || forwarded || !is_v1 || leader.is_none() || leader == Some(app.store.node_id()) {
        return next.run(req).await;
    }
    let leader_addr = app
        .store
        .members()
        .into_iter()
        .find(|m| Some(m.raft_id) == leader)
        .map(|m| m.addr);
    let Some(leader_addr) = leader_addr else {
        return next.run(req).await;
    };
    let client = match &app.leader_http {
        Some(c) => c.clone(),
        None => return next.run(req).await,
    };
    let original_peer = req
        .extensions()
        .get::<crate::cluster::PeerIdentity>()
        .and_then(|p| p.0.clone());
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_FORWARDED_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::invalid(
                "request body unreadable",
                vec![flotilla_types::FieldError::new("body", e.to_string())],
            )
            .into_response()
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let build = |leader_addr: &str| {
        let url = format!("https://{leader_addr}{path}");
        let mut outgoing = client
            .request(parts.method.clone(), &url)
            .header(FORWARDED, "1")
            .body(bytes.clone());
        if let Some(cert) = &original_peer {
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
    };
    let deadline = tokio::time::Instant::now() + LEADER_CHANGE_WAIT;
    let (mut leader, mut leader_addr) = (leader, leader_addr);
    let sent = loop {
        match build(&leader_addr).send().await {
            // The request never reached the leader (it crashed or is cut off; a dead host
            // takes the whole FORWARD_CONNECT_TIMEOUT): the write was not made, so sending it
            // again is safe. Send it to whoever raft names leader next: another manager once
            // one is elected, so the client sees one slower success instead of an error it
            // must retry itself; the same one again after a pause if it is merely slow to
            // accept connections.
            Err(e) if e.is_connect() && tokio::time::Instant::now() < deadline => {
                match next_leader(&app, leader, deadline).await {
                    Some((id, _)) if id == app.store.node_id() => {
                        // This manager was elected meanwhile: answer the write itself.
                        let mut req = Request::new(Body::from(bytes.clone()));
                        *req.method_mut() = parts.method.clone();
                        *req.uri_mut() = parts.uri.clone();
                        *req.version_mut() = parts.version;
                        *req.headers_mut() = parts.headers.clone();
                        *req.extensions_mut() = parts.extensions.clone();
                        return next.run(req).await;
                    }
                    Some((id, addr)) => {
                        if Some(id) != leader {
                            tracing::info!(failed = %leader_addr, leader = %addr, "leader changed; forwarding the write to the new leader");
                        } else {
                            tracing::debug!(leader = %addr, error = %e, "the leader did not accept a connection; trying again");
                        }
                        (leader, leader_addr) = (Some(id), addr);
                    }
                    None => break Err(e),
                }
            }
            other => break other,
        }
    };
    match sent {
        Ok(resp) => {
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
        Err(e) => ApiError::Unavailable(format!(
            "this manager is not the leader and forwarding to the leader at {leader_addr} \
             failed: {e}"
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
