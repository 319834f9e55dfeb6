//! Authentication and authorisation:
//! - a peer with a cluster client certificate (TLS, see [`crate::serve_tls`]) is who its
//!   certificate says, from any address including loopback: a manager may call everything, a
//!   worker only what an agent needs ([`worker_may_call`]); a removed node's certificate is
//!   refused ([`crate::cluster::check_not_revoked`]). On a write a follower forwarded, the
//!   forwarding manager vouches for the original caller's certificate (`x-flotilla-peer`);
//! - a request over the manager's Unix socket ([`crate::serve_unix`]) is an administrator's:
//!   the socket's owner, group and mode are the credential, exactly like Docker's socket;
//! - every TCP request without a certificate, from any address (loopback included), needs
//!   `Authorization: Bearer <token>` (the scheme is case-insensitive), except the two join
//!   routes, which authenticate with the join token in the body.
//!
//! No peer is ever trusted for its address.

use crate::cluster::{check_not_revoked, PeerCert, PeerIdentity};
use crate::error::ApiError;
use crate::forward::{FORWARDED, FORWARDED_PEER};
use crate::AppState;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flotilla_pki::{NodeIdentity, Role};
use std::net::SocketAddr;

/// What an agent calls: read its assignments, register, heartbeat, report task status.
fn worker_may_call(method: &Method, path: &str) -> bool {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        // Every read but the secrets: the join tokens, and the store backup (which holds the
        // CA key, the join secrets and every agent's secret).
        (&Method::GET, ["v1", "cluster", "tokens", ..] | ["v1", "snapshot", ..]) => false,
        (&Method::GET, ["v1", ..]) => true,
        (&Method::POST, ["v1", "nodes", "register"]) => true,
        (&Method::POST, ["v1", "nodes", _, "heartbeat"]) => true,
        (&Method::PUT, ["v1", "tasks", "status"]) => true,
        (&Method::PUT, ["v1", "tasks", _, "status"]) => true,
        (&Method::POST, ["v1", "cluster", "renew"]) => true,
        // Carrying out its own promotion or `flotilla leave` (the handlers check it is asked).
        (&Method::POST, ["v1", "cluster", "promote-self" | "leave"]) => true,
        (&Method::POST, ["v1", "cluster", "leave", "complete"]) => true,
        _ => false,
    }
}

/// Routes a node without credentials calls while joining; the join token in the body is checked
/// by the handler.
fn is_join_route(method: &Method, path: &str) -> bool {
    matches!(
        (method, path),
        (&Method::GET, "/v1/cluster/ca") | (&Method::POST, "/v1/cluster/join")
    )
}

/// Marks a request that came over the manager's Unix socket (set by [`crate::serve_unix`],
/// never from anything a client sends).
#[derive(Clone, Copy, Debug)]
pub struct LocalSocket;

pub async fn require_auth(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if req.extensions().get::<LocalSocket>().is_some() {
        return next.run(req).await;
    }
    let presented = req
        .extensions()
        .get::<PeerIdentity>()
        .and_then(|p| p.0.clone());
    if let Some(cert) = presented {
        if let Err(e) = check_not_revoked(&state.store, &cert) {
            return e.into_response();
        }
        let mut caller = cert;
        if caller.identity.role == Role::Manager && req.headers().contains_key(&FORWARDED) {
            // A write another manager forwarded: it authorised the caller already and says
            // whose certificate (if any) it came with.
            let original = match req.headers().get(&FORWARDED_PEER).map(parse_forwarded_peer) {
                None => None,
                Some(Ok(original)) => Some(original),
                Some(Err(e)) => return e.into_response(),
            };
            req.extensions_mut().insert(PeerIdentity(original.clone()));
            match original {
                Some(original) => {
                    if let Err(e) = check_not_revoked(&state.store, &original) {
                        return e.into_response();
                    }
                    caller = original;
                }
                None => return next.run(req).await,
            }
        }
        let identity = &caller.identity;
        if identity.role == Role::Manager || worker_may_call(req.method(), req.uri().path()) {
            return next.run(req).await;
        }
        return ApiError::Forbidden(format!(
            "node {} holds a worker certificate; {} {} is for managers only",
            identity.node_id,
            req.method(),
            req.uri().path()
        ))
        .into_response();
    }
    if is_join_route(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    match check_token(state.token.as_deref(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            let from = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(p)| p.ip().to_string());
            tracing::debug!(peer = from.as_deref().unwrap_or("?"), error = %e, "refused");
            e.into_response()
        }
    }
}

/// Checks the bearer token of a request without a certificate. Every refusal says which
/// credential was missing or wrong.
fn check_token(expected: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(ApiError::Unauthorized(
            "authentication required: send Authorization: Bearer <token> (--token or \
             FLOTILLA_TOKEN; the token is in the manager's DATA_DIR/api-token), present a \
             cluster client certificate, or use the manager's Unix socket"
                .into(),
        ));
    };
    let given = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| {
            ApiError::Unauthorized(
                "the Authorization header must be `Bearer <token>` (the API token)".into(),
            )
        })?;
    let Some(expected) = expected else {
        return Err(ApiError::Unauthorized(
            "this manager has no API token: use its Unix socket or a cluster client certificate"
                .into(),
        ));
    };
    if constant_time_eq(expected.as_bytes(), given.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized(
            "invalid API token in the Authorization header".into(),
        ))
    }
}

/// Reads `ROLE/NODE-ID/ISSUED-AT` (see [`FORWARDED_PEER`]).
fn parse_forwarded_peer(value: &axum::http::HeaderValue) -> Result<PeerCert, ApiError> {
    let bad = || {
        ApiError::Forbidden(format!(
            "malformed {FORWARDED_PEER} header on a forwarded request"
        ))
    };
    let text = value.to_str().map_err(|_| bad())?;
    let mut parts = text.splitn(3, '/');
    let (Some(role), Some(node_id), Some(issued_at)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    Ok(PeerCert {
        identity: NodeIdentity {
            node_id: node_id.to_string(),
            role: role.parse().map_err(|_| bad())?,
        },
        issued_at: issued_at.parse().map_err(|_| bad())?,
    })
}

/// Compares without an early exit so response timing does not reveal the token prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(
                axum::http::header::AUTHORIZATION,
                a.parse().expect("header value"),
            );
        }
        h
    }

    fn refusal(expected: Option<&str>, auth: Option<&str>) -> String {
        match check_token(expected, &headers(auth)) {
            Err(ApiError::Unauthorized(m)) => m,
            other => panic!("expected a 401 for {auth:?}, got {other:?}"),
        }
    }

    /// A worker certificate reads what its agent needs, never the join tokens or the store
    /// backup: either would hand a compromised worker the cluster's keys.
    #[test]
    fn workers_read_no_secrets() {
        assert!(worker_may_call(&Method::GET, "/v1/watch"));
        assert!(worker_may_call(&Method::GET, "/v1/services/web/traffic"));
        for path in [
            "/v1/snapshot",
            "/v1/cluster/tokens",
            "/v1/cluster/tokens/worker",
        ] {
            assert!(!worker_may_call(&Method::GET, path), "{path}");
        }
        assert!(!worker_may_call(&Method::POST, "/v1/deploy"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for scheme in ["Bearer", "bearer", "BEARER"] {
            let header = format!("{scheme} s3cret");
            assert!(
                check_token(Some("s3cret"), &headers(Some(&header))).is_ok(),
                "{header}"
            );
        }
    }

    #[test]
    fn refusals_name_the_missing_or_wrong_credential() {
        assert!(refusal(Some("s3cret"), None).contains("Authorization: Bearer <token>"));
        assert!(refusal(Some("s3cret"), Some("Basic czNjcmV0")).contains("Bearer <token>"));
        assert!(refusal(Some("s3cret"), Some("Bearer wrong")).contains("invalid API token"));
        assert!(refusal(None, Some("Bearer s3cret")).contains("no API token"));
    }
}
