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
const FORWARDED: HeaderName = HeaderName::from_static("x-flotilla-forwarded");
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
    let url = format!("https://{leader_addr}{path}");
    let mut outgoing = client
        .request(parts.method.clone(), &url)
        .header(FORWARDED, "1")
        .body(bytes);
    for name in [
        axum::http::header::CONTENT_TYPE,
        axum::http::header::AUTHORIZATION,
    ] {
        if let Some(v) = parts.headers.get(&name) {
            outgoing = outgoing.header(name, v.clone());
        }
    }
    tracing::debug!(%url, method = %parts.method, "forwarding a write to the leader");
    match outgoing.send().await {
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
