//! Authentication: loopback peers are trusted (like a local Docker socket); everyone else needs
//! `Authorization: Bearer <token>`. The API is never open to the network without it.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;

pub async fn require_auth(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if peer.ip().is_loopback() {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match (&state.token, presented) {
        (Some(expected), Some(given)) if constant_time_eq(expected.as_bytes(), given.as_bytes()) => {
            next.run(req).await
        }
        (None, _) => ApiError::Unauthorized(format!(
            "requests from {} are refused: this manager has no API token configured for non-loopback clients",
            peer.ip()
        ))
        .into_response(),
        (_, None) => ApiError::Unauthorized(
            "authentication required: send Authorization: Bearer <token> (FLOTILLA_TOKEN)".into(),
        )
        .into_response(),
        (_, Some(_)) => ApiError::Unauthorized("invalid API token".into()).into_response(),
    }
}

/// Compares without an early exit so response timing does not reveal the token prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
