//! Routing-mesh settings of a service (`x-flotilla.ports`, `x-flotilla.routes`, breakers).
//!
//! Every field has a default, so a service with Compose `ports` and no `x-flotilla` mesh keys is
//! served as plain TCP with the defaults below.

use crate::spec::{FieldError, PortProtocol, PortSpec};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How the mesh exposes and protects a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshSpec {
    /// `x-flotilla.ports[]`: per published port, how the mesh speaks on it. Published ports not
    /// listed here are proxied as plain TCP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<MeshPort>,
    /// `x-flotilla.routes`: HTTP routes on shared listener ports. An HTTP port of a service with
    /// no route for it gets the catch-all route (any host, prefix `/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<HttpRoute>,
    /// `x-flotilla.sticky_cookie`: cookie name pinning an HTTP client to one task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_cookie: Option<String>,
    #[serde(default)]
    pub balancer: BalancerKind,
    /// How long a stopping task is kept for in-flight requests before it is stopped anyway.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    #[serde(default)]
    pub breaker: BreakerSpec,
    #[serde(default)]
    pub fallback: FallbackSpec,
    /// Retries allowed on top of normal traffic, in percent of requests (20 = 20% extra).
    #[serde(default = "default_retry_budget_percent")]
    pub retry_budget_percent: u8,
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_retry_budget_percent() -> u8 {
    20
}

impl Default for MeshSpec {
    fn default() -> Self {
        MeshSpec {
            ports: Vec::new(),
            routes: Vec::new(),
            sticky_cookie: None,
            balancer: BalancerKind::default(),
            drain_timeout: default_drain_timeout(),
            breaker: BreakerSpec::default(),
            fallback: FallbackSpec::default(),
            retry_budget_percent: default_retry_budget_percent(),
        }
    }
}

/// One `x-flotilla.ports[]` entry, matched to a Compose `ports` entry by `published`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshPort {
    pub published: u16,
    #[serde(default)]
    pub protocol: MeshProtocol,
    /// Send a PROXY protocol v2 header to the backend (TCP only) so it sees the client address.
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// What the mesh speaks on a published port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeshProtocol {
    /// L4: bytes are copied to one backend per connection.
    #[default]
    Tcp,
    /// L7: each request is routed and balanced on its own.
    Http,
}

/// One `x-flotilla.routes` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRoute {
    /// Exact `Host` to match (without port, case-insensitive); `None` matches any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix; the longest matching prefix wins across services on the same port.
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// The published (listener) port the route lives on.
    pub port: u16,
}

fn default_path_prefix() -> String {
    "/".to_string()
}

/// `x-flotilla.balancer`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    /// Power of two choices over peak-EWMA latency, weighted.
    #[default]
    P2c,
    /// Smooth weighted round robin.
    RoundRobin,
}

/// `x-flotilla.breaker`: per-task circuit breaker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerSpec {
    /// Opens after this many failures (connect errors, 5xx, timeouts) in a row.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// Opens when the success rate over the last `window_requests` falls below this percentage.
    #[serde(default = "default_min_success_percent")]
    pub min_success_percent: u8,
    #[serde(default = "default_window_requests")]
    pub window_requests: u32,
    /// First open period; it doubles each time a half-open probe fails.
    #[serde(default = "default_open_for", with = "humantime_serde")]
    pub open_for: Duration,
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_min_success_percent() -> u8 {
    50
}
fn default_window_requests() -> u32 {
    20
}
fn default_open_for() -> Duration {
    Duration::from_secs(5)
}

impl Default for BreakerSpec {
    fn default() -> Self {
        BreakerSpec {
            consecutive_failures: default_consecutive_failures(),
            min_success_percent: default_min_success_percent(),
            window_requests: default_window_requests(),
            open_for: default_open_for(),
        }
    }
}

/// `x-flotilla.fallback`: the answer when no task can take a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FallbackSpec {
    #[serde(default = "default_fallback_status")]
    pub status: u16,
    #[serde(default = "default_fallback_body")]
    pub body: String,
}

fn default_fallback_status() -> u16 {
    503
}
fn default_fallback_body() -> String {
    "no healthy backend\n".to_string()
}

impl Default for FallbackSpec {
    fn default() -> Self {
        FallbackSpec {
            status: default_fallback_status(),
            body: default_fallback_body(),
        }
    }
}

impl MeshSpec {
    pub fn is_default(&self) -> bool {
        *self == MeshSpec::default()
    }

    /// How the mesh speaks on `published`: the `x-flotilla.ports` entry, or plain TCP.
    pub fn port(&self, published: u16) -> MeshPort {
        self.ports
            .iter()
            .find(|p| p.published == published)
            .cloned()
            .unwrap_or(MeshPort {
                published,
                protocol: MeshProtocol::Tcp,
                proxy_protocol: false,
            })
    }

    /// Checks the mesh settings against the service's Compose `ports`. Field paths are
    /// `services.<service>.x-flotilla.<field>`.
    pub fn validate(&self, service: &str, ports: &[PortSpec]) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let at = |field: &str| format!("services.{service}.x-flotilla.{field}");
        // Host-mode ports are bound by the tasks on their nodes; the mesh never serves them.
        let published_tcp = |port: u16| {
            ports.iter().any(|p| {
                p.published == Some(port) && p.protocol == PortProtocol::Tcp && p.mode.is_ingress()
            })
        };
        for (i, port) in self.ports.iter().enumerate() {
            if !published_tcp(port.published) {
                errs.push(FieldError::new(
                    at(&format!("ports[{i}].published")),
                    format!(
                        "{} is not a published tcp port in the service's ports (host-mode ports bypass the mesh)",
                        port.published
                    ),
                ));
            }
            if port.proxy_protocol && port.protocol == MeshProtocol::Http {
                errs.push(FieldError::new(
                    at(&format!("ports[{i}].proxy_protocol")),
                    "PROXY protocol is for tcp ports; http ports send X-Forwarded-For and Forwarded",
                ));
            }
            if self.ports[..i]
                .iter()
                .any(|p| p.published == port.published)
            {
                errs.push(FieldError::new(
                    at(&format!("ports[{i}].published")),
                    format!("port {} is listed twice", port.published),
                ));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if self.port(route.port).protocol != MeshProtocol::Http || !published_tcp(route.port) {
                errs.push(FieldError::new(
                    at(&format!("routes[{i}].port")),
                    format!(
                        "{} must be a published port declared with protocol http in x-flotilla.ports",
                        route.port
                    ),
                ));
            }
            if !route.path_prefix.starts_with('/') {
                errs.push(FieldError::new(
                    at(&format!("routes[{i}].path_prefix")),
                    format!("{:?} must start with '/'", route.path_prefix),
                ));
            }
            if let Some(host) = &route.host {
                let ok = !host.is_empty()
                    && host.len() <= 253
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
                if !ok {
                    errs.push(FieldError::new(
                        at(&format!("routes[{i}].host")),
                        format!("{host:?} is not a host name (letters, digits, '-' and '.')"),
                    ));
                }
            }
        }
        if let Some(cookie) = &self.sticky_cookie {
            // RFC 6265 cookie-name is an HTTP token.
            let ok = !cookie.is_empty()
                && cookie
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
            if !ok {
                errs.push(FieldError::new(
                    at("sticky_cookie"),
                    format!("{cookie:?} is not a valid cookie name"),
                ));
            }
        }
        let b = &self.breaker;
        if b.consecutive_failures == 0 {
            errs.push(FieldError::new(
                at("breaker.consecutive_failures"),
                "must be at least 1",
            ));
        }
        if b.min_success_percent > 100 {
            errs.push(FieldError::new(
                at("breaker.min_success_percent"),
                "must be between 0 and 100",
            ));
        }
        if b.window_requests == 0 {
            errs.push(FieldError::new(
                at("breaker.window_requests"),
                "must be at least 1",
            ));
        }
        if b.open_for.is_zero() {
            errs.push(FieldError::new(
                at("breaker.open_for"),
                "must be longer than 0s",
            ));
        }
        if !(100..=599).contains(&self.fallback.status) {
            errs.push(FieldError::new(
                at("fallback.status"),
                format!("{} is not an HTTP status (100..=599)", self.fallback.status),
            ));
        }
        if self.retry_budget_percent > 100 {
            errs.push(FieldError::new(
                at("retry_budget_percent"),
                "must be between 0 and 100",
            ));
        }
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(published: u16, target: u16) -> PortSpec {
        PortSpec {
            target,
            published: Some(published),
            protocol: PortProtocol::Tcp,
            mode: Default::default(),
        }
    }

    #[test]
    fn defaults_round_trip_and_are_default() {
        let spec: MeshSpec = serde_json::from_str("{}").unwrap();
        assert!(spec.is_default());
        assert_eq!(spec.drain_timeout, Duration::from_secs(30));
        assert_eq!(spec.breaker.consecutive_failures, 5);
        assert_eq!(spec.fallback.status, 503);
        let route: HttpRoute = serde_json::from_str(r#"{"port": 80}"#).unwrap();
        assert_eq!(route.path_prefix, "/");
    }

    #[test]
    fn validate_names_fields() {
        let spec = MeshSpec {
            ports: vec![MeshPort {
                published: 8080,
                protocol: MeshProtocol::Http,
                proxy_protocol: false,
            }],
            routes: vec![
                HttpRoute {
                    host: None,
                    path_prefix: "api".into(),
                    port: 8080,
                },
                HttpRoute {
                    host: Some("bad host".into()),
                    path_prefix: "/".into(),
                    port: 9999,
                },
            ],
            sticky_cookie: Some("a b".into()),
            ..MeshSpec::default()
        };
        let errs = spec.validate("web", &[tcp(8080, 80)]);
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "services.web.x-flotilla.routes[0].path_prefix",
                "services.web.x-flotilla.routes[1].port",
                "services.web.x-flotilla.routes[1].host",
                "services.web.x-flotilla.sticky_cookie",
            ]
        );
        assert!(MeshSpec::default().validate("web", &[]).is_empty());
    }
}
