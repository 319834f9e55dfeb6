//! `x-flotilla` routing-mesh keys: accepted forms land in `ServiceSpec.mesh`; bad ones are
//! rejected naming the field.

use flotilla_compose::{parse_str, ComposeError};
use flotilla_types::mesh::{BalancerKind, HttpRoute, MeshPort, MeshProtocol};
use std::path::Path;
use std::time::Duration;

fn web(extra: &str) -> String {
    format!("services:\n  web:\n    command: [sleep, \"100\"]\n    ports: [\"8080:80\", \"9090:90\"]\n{extra}")
}

#[test]
fn every_mesh_key_is_read() {
    let yaml = web(r#"    x-flotilla:
      ports:
        - {published: 8080, protocol: http}
        - {published: 9090, proxy_protocol: true}
      routes:
        - {host: api.example.com, path_prefix: /api, port: 8080}
        - {port: 8080}
      sticky_cookie: flt
      balancer: round_robin
      drain_timeout: 12s
      breaker: {consecutive_failures: 3, min_success_percent: 40, window_requests: 10, open_for: 2s}
      fallback: {status: 502, body: "try later"}
      retry_budget_percent: 5
"#);
    let file = parse_str(&yaml, "c.yaml", Path::new(".")).unwrap();
    assert!(file.warnings.is_empty(), "{:?}", file.warnings);
    let mesh = &file.services[0].mesh;
    assert_eq!(
        mesh.ports,
        [
            MeshPort {
                published: 8080,
                protocol: MeshProtocol::Http,
                proxy_protocol: false
            },
            MeshPort {
                published: 9090,
                protocol: MeshProtocol::Tcp,
                proxy_protocol: true
            },
        ]
    );
    assert_eq!(
        mesh.routes,
        [
            HttpRoute {
                host: Some("api.example.com".into()),
                path_prefix: "/api".into(),
                port: 8080
            },
            HttpRoute {
                host: None,
                path_prefix: "/".into(),
                port: 8080
            },
        ]
    );
    assert_eq!(mesh.sticky_cookie.as_deref(), Some("flt"));
    assert_eq!(mesh.balancer, BalancerKind::RoundRobin);
    assert_eq!(mesh.drain_timeout, Duration::from_secs(12));
    assert_eq!(mesh.breaker.consecutive_failures, 3);
    assert_eq!(mesh.breaker.min_success_percent, 40);
    assert_eq!(mesh.breaker.window_requests, 10);
    assert_eq!(mesh.breaker.open_for, Duration::from_secs(2));
    assert_eq!(mesh.fallback.status, 502);
    assert_eq!(mesh.fallback.body, "try later");
    assert_eq!(mesh.retry_budget_percent, 5);
}

#[test]
fn no_mesh_keys_means_defaults() {
    let file = parse_str(&web(""), "c.yaml", Path::new(".")).unwrap();
    assert!(file.services[0].mesh.is_default());
}

fn error_fields(yaml: &str) -> Vec<(String, String)> {
    match parse_str(yaml, "c.yaml", Path::new(".")) {
        Err(ComposeError::Invalid { errors, .. }) => {
            errors.into_iter().map(|e| (e.field, e.reason)).collect()
        }
        other => panic!("expected invalid, got {other:?}"),
    }
}

#[test]
fn bad_mesh_settings_name_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("      ports: {published: 8080}\n", "services.web.x-flotilla.ports", "expected a list"),
        ("      ports: [{protocol: http}]\n", "services.web.x-flotilla.ports[0].published", "is required"),
        ("      ports: [{published: 70000}]\n", "services.web.x-flotilla.ports[0].published", "not a port"),
        ("      ports: [{published: 8080, protocol: udp}]\n", "services.web.x-flotilla.ports[0].protocol", "unknown protocol"),
        ("      ports: [{published: 8080, colour: red}]\n", "services.web.x-flotilla.ports[0].colour", "unknown key"),
        ("      ports: [{published: 7777}]\n", "services.web.x-flotilla.ports[0].published", "not a published tcp port"),
        ("      ports: [{published: 8080, protocol: http, proxy_protocol: true}]\n", "services.web.x-flotilla.ports[0].proxy_protocol", "PROXY protocol"),
        ("      routes: [{path_prefix: /}]\n", "services.web.x-flotilla.routes[0].port", "is required"),
        ("      routes: [{port: 8080}]\n", "services.web.x-flotilla.routes[0].port", "protocol http"),
        ("      ports: [{published: 8080, protocol: http}]\n      routes: [{port: 8080, path_prefix: api}]\n", "services.web.x-flotilla.routes[0].path_prefix", "must start with '/'"),
        ("      sticky_cookie: \"a b\"\n", "services.web.x-flotilla.sticky_cookie", "not a valid cookie name"),
        ("      balancer: random\n", "services.web.x-flotilla.balancer", "unknown balancer"),
        ("      drain_timeout: soon\n", "services.web.x-flotilla.drain_timeout", ""),
        ("      breaker: {consecutive_failures: 0}\n", "services.web.x-flotilla.breaker.consecutive_failures", "at least 1"),
        ("      breaker: {min_success_percent: 150}\n", "services.web.x-flotilla.breaker.min_success_percent", "outside 0..=100"),
        ("      breaker: {tripwire: 1}\n", "services.web.x-flotilla.breaker.tripwire", "unknown key"),
        ("      fallback: {status: 42}\n", "services.web.x-flotilla.fallback.status", "not an HTTP status"),
        ("      fallback: {body: [1]}\n", "services.web.x-flotilla.fallback.body", "expected a string"),
        ("      retry_budget_percent: 101\n", "services.web.x-flotilla.retry_budget_percent", "outside 0..=100"),
    ];
    for (extra, field, reason) in cases {
        let errors = error_fields(&web(&format!("    x-flotilla:\n{extra}")));
        assert!(
            errors.iter().any(|(f, r)| f == field && r.contains(reason)),
            "{extra}: expected {field}: {reason}, got {errors:?}"
        );
    }
}

/// A host-mode port is bound by the task on its node, so mesh settings for it are an error.
#[test]
fn mesh_settings_for_a_host_mode_port_are_rejected() {
    let yaml = "services:\n  web:\n    command: [sleep, \"100\"]\n    ports:\n      - {target: 80, published: 8080, mode: host}\n    x-flotilla:\n      ports: [{published: 8080, protocol: http}]\n";
    let errors = error_fields(yaml);
    assert!(
        errors
            .iter()
            .any(|(f, r)| f == "services.web.x-flotilla.ports[0].published"
                && r.contains("host-mode ports bypass the mesh")),
        "{errors:?}"
    );
    // The same settings on an ingress port are fine.
    let ingress = yaml.replace(", mode: host", "");
    assert!(parse_str(&ingress, "c.yaml", Path::new(".")).is_ok());
}
