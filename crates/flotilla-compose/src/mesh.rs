//! The routing-mesh keys of `x-flotilla` (`ports`, `routes`, `sticky_cookie`, `balancer`,
//! `drain_timeout`, `breaker`, `fallback`, `retry_budget_percent`) → [`MeshSpec`].
//!
//! Shapes and types are checked here with field paths; cross-checks against the service's
//! Compose `ports` are `MeshSpec::validate`'s job, run by `ServiceSpec::validate`.

use crate::document::Node;
use crate::report::Report;
use flotilla_types::mesh::{
    BalancerKind, BreakerSpec, FallbackSpec, HttpRoute, MeshPort, MeshProtocol, MeshSpec,
};

/// The `x-flotilla` keys this module reads.
pub(crate) const MESH_KEYS: &[&str] = &[
    "ports",
    "routes",
    "sticky_cookie",
    "balancer",
    "drain_timeout",
    "breaker",
    "fallback",
    "retry_budget_percent",
];

/// Reads one of [`MESH_KEYS`] (`key`, at field path `field`) into `mesh`.
pub(crate) fn read_key(r: &mut Report, field: &str, key: &str, node: &Node, mesh: &mut MeshSpec) {
    match key {
        "ports" => mesh.ports = r.list_of(field, node, mesh_port),
        "routes" => mesh.routes = r.list_of(field, node, route),
        "sticky_cookie" => mesh.sticky_cookie = r.string(field, node),
        "balancer" => {
            mesh.balancer = match r.string(field, node).as_deref() {
                Some("p2c") => BalancerKind::P2c,
                Some("round_robin") => BalancerKind::RoundRobin,
                Some(other) => {
                    r.error(
                        field,
                        format!("unknown balancer {other:?} (expected p2c or round_robin)"),
                    );
                    mesh.balancer
                }
                None => mesh.balancer,
            }
        }
        "drain_timeout" => {
            if let Some(d) = r.duration(field, node) {
                mesh.drain_timeout = d;
            }
        }
        "breaker" => mesh.breaker = breaker(r, field, node),
        "fallback" => mesh.fallback = fallback(r, field, node),
        "retry_budget_percent" => {
            if let Some(p) = percent(r, field, node) {
                mesh.retry_budget_percent = p;
            }
        }
        other => r.error(field, format!("{other} is not a mesh key")),
    }
}

/// A port number 1..=65535.
fn port(r: &mut Report, field: &str, node: &Node) -> Option<u16> {
    let value = r.uint(field, node)?;
    match u16::try_from(value) {
        Ok(p) if p > 0 => Some(p),
        _ => {
            r.error(field, format!("{value} is not a port (1..=65535)"));
            None
        }
    }
}

/// 0..=100.
fn percent(r: &mut Report, field: &str, node: &Node) -> Option<u8> {
    let value = r.uint(field, node)?;
    match u8::try_from(value) {
        Ok(p) if p <= 100 => Some(p),
        _ => {
            r.error(field, format!("{value} is outside 0..=100"));
            None
        }
    }
}

/// `{published: 8080, protocol: http, proxy_protocol: false}`.
fn mesh_port(r: &mut Report, field: &str, node: &Node) -> Option<MeshPort> {
    let entries = r.mapping(field, node)?;
    let mut published = None;
    let mut protocol = MeshProtocol::Tcp;
    let mut proxy_protocol = false;
    let mut ok = true;
    for (key, value) in entries {
        let at = format!("{field}.{key}");
        match key.as_str() {
            "published" => {
                published = port(r, &at, value);
                ok &= published.is_some();
            }
            "protocol" => match r.string(&at, value).as_deref() {
                Some("tcp") => protocol = MeshProtocol::Tcp,
                Some("http") => protocol = MeshProtocol::Http,
                Some(other) => {
                    r.error(
                        &at,
                        format!("unknown protocol {other:?} (expected tcp or http)"),
                    );
                    ok = false;
                }
                None => ok = false,
            },
            "proxy_protocol" => match r.boolean(&at, value) {
                Some(b) => proxy_protocol = b,
                None => ok = false,
            },
            _ => {
                r.error(
                    &at,
                    "unknown key (expected published, protocol or proxy_protocol)",
                );
                ok = false;
            }
        }
    }
    if published.is_none() && !entries.iter().any(|(k, _)| k == "published") {
        r.error(&format!("{field}.published"), "is required");
    }
    Some(MeshPort {
        published: published?,
        protocol,
        proxy_protocol,
    })
    .filter(|_| ok)
}

/// `{host: api.example.com, path_prefix: /api, port: 8080}`.
fn route(r: &mut Report, field: &str, node: &Node) -> Option<HttpRoute> {
    let entries = r.mapping(field, node)?;
    let mut host = None;
    let mut path_prefix = "/".to_string();
    let mut listener = None;
    let mut ok = true;
    for (key, value) in entries {
        let at = format!("{field}.{key}");
        match key.as_str() {
            "host" => {
                host = r.string(&at, value);
                ok &= host.is_some();
            }
            "path_prefix" => match r.string(&at, value) {
                Some(p) => path_prefix = p,
                None => ok = false,
            },
            "port" => {
                listener = port(r, &at, value);
                ok &= listener.is_some();
            }
            _ => {
                r.error(&at, "unknown key (expected host, path_prefix or port)");
                ok = false;
            }
        }
    }
    if listener.is_none() && !entries.iter().any(|(k, _)| k == "port") {
        r.error(&format!("{field}.port"), "is required");
    }
    Some(HttpRoute {
        host,
        path_prefix,
        port: listener?,
    })
    .filter(|_| ok)
}

/// `{consecutive_failures, min_success_percent, window_requests, open_for}`.
fn breaker(r: &mut Report, field: &str, node: &Node) -> BreakerSpec {
    let mut spec = BreakerSpec::default();
    r.keys(field, node, |r, key, at, value| match key {
        "consecutive_failures" => {
            if let Some(n) = r.uint32(at, value) {
                spec.consecutive_failures = n;
            }
        }
        "min_success_percent" => {
            if let Some(p) = percent(r, at, value) {
                spec.min_success_percent = p;
            }
        }
        "window_requests" => {
            if let Some(n) = r.uint32(at, value) {
                spec.window_requests = n;
            }
        }
        "open_for" => {
            if let Some(d) = r.duration(at, value) {
                spec.open_for = d;
            }
        }
        _ => r.error(
            at,
            "unknown key (expected consecutive_failures, min_success_percent, window_requests or open_for)",
        ),
    });
    spec
}

/// `{status: 503, body: "..."}`.
fn fallback(r: &mut Report, field: &str, node: &Node) -> FallbackSpec {
    let mut spec = FallbackSpec::default();
    r.keys(field, node, |r, key, at, value| match key {
        "status" => {
            if let Some(status) = r.uint(at, value) {
                match u16::try_from(status) {
                    Ok(s) => spec.status = s,
                    Err(_) => r.error(at, format!("{status} is not an HTTP status")),
                }
            }
        }
        "body" => {
            if let Some(body) = r.string(at, value) {
                spec.body = body;
            }
        }
        _ => r.error(at, "unknown key (expected status or body)"),
    });
    spec
}
