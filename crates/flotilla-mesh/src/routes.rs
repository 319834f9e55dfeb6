//! The routing table a node serves, how it is derived from cluster objects, and how HTTP
//! requests are matched to services by Host and path prefix.

use crate::MeshError;
use flotilla_types::mesh::{MeshProtocol, MeshSpec};
use flotilla_types::release::CanaryMatch;
use flotilla_types::{
    DesiredState, Node, NodeState, PortProtocol, Service, Strategy, Task, TaskState,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The complete routing state for this node; replaced atomically by [`crate::Mesh::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    pub services: BTreeMap<String, ServiceRoutes>,
}

/// One service: its mesh settings and, per published port, the tasks behind it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRoutes {
    pub spec: MeshSpec,
    pub ports: Vec<ServicePort>,
    /// While a canary rollout runs with `x-flotilla.canary.match`: which HTTP requests go to
    /// which tasks whatever their weight.
    pub canary: Option<CanaryRouting>,
}

/// HTTP requests matching `matching` go to `tasks` (the new revision's) at any weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryRouting {
    pub matching: CanaryMatch,
    pub tasks: BTreeSet<String>,
}

/// A published port and the backends serving it (each task's host port for the target port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub published: u16,
    pub backends: Vec<Backend>,
}

/// One task reachable on one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub task_id: String,
    pub addr: SocketAddr,
    /// 0..=100; 0 takes no new connections or requests (draining).
    pub weight: u8,
    pub healthy: bool,
    /// Runs the service's current template (a rollout's new side). Weights are shares per
    /// version: the balancer moves load only between tasks of one version and weight.
    pub current: bool,
}

impl RouteTable {
    /// Builds the table from cluster objects: every service with published tcp ports; backends
    /// are tasks that are running and meant to run and have a host port for the target. A task
    /// is healthy when it passes its health check (or has none) on a node that is up. The
    /// address is the node's advertised IP, else its agent IP (127.0.0.1 on `local_node`),
    /// plus the host port; nodes with neither are skipped, as the mesh cannot reach them.
    pub fn from_cluster(
        services: &[Service],
        tasks: &[Task],
        nodes: &[Node],
        local_node: &str,
    ) -> Self {
        let node_ip = |node_id: &str| -> Option<(IpAddr, bool)> {
            if node_id == local_node {
                return Some((IpAddr::V4(Ipv4Addr::LOCALHOST), true));
            }
            let node = nodes.iter().find(|n| n.id == node_id)?;
            let ip = node
                .advertise_ip
                .or_else(|| node.agent_addr.as_deref().and_then(agent_ip))?;
            Some((ip, node.state == NodeState::Ready))
        };
        let mut table = RouteTable::default();
        for service in services {
            let published: Vec<(u16, u16)> = service
                .spec
                .ports
                .iter()
                // Host-mode ports are bound by the tasks themselves, not served by the mesh.
                .filter(|p| p.protocol == PortProtocol::Tcp && p.mode.is_ingress())
                .filter_map(|p| Some((p.published?, p.target)))
                .collect();
            if published.is_empty() {
                continue;
            }
            let live: Vec<&Task> = tasks
                .iter()
                .filter(|t| {
                    t.service == service.name
                        && t.desired_state == DesiredState::Running
                        && t.status.state == TaskState::Running
                })
                .collect();
            let ports = published
                .iter()
                .map(|&(published, target)| ServicePort {
                    published,
                    backends: live
                        .iter()
                        .filter_map(|task| {
                            let host_port = task
                                .status
                                .ports
                                .iter()
                                .find(|b| b.target == target)?
                                .host_port;
                            let (ip, node_up) = node_ip(task.node.as_deref()?)?;
                            Some(Backend {
                                task_id: task.id.clone(),
                                addr: SocketAddr::new(ip, host_port),
                                weight: task.weight.unwrap_or(100).min(100),
                                healthy: node_up && task.is_ready(),
                                current: task.spec.task_template_eq(&service.spec),
                            })
                        })
                        .collect(),
                })
                .collect();
            table.services.insert(
                service.name.clone(),
                ServiceRoutes {
                    spec: service.spec.mesh.clone(),
                    ports,
                    canary: canary_routing(service, &live),
                },
            );
        }
        table
    }
}

/// The canary's tasks (those of the service's current template) when a canary rollout with a
/// request match is under way, i.e. new and old tasks run side by side.
fn canary_routing(service: &Service, live: &[&Task]) -> Option<CanaryRouting> {
    let rollout = &service.spec.rollout;
    let matching = rollout.canary.matching.clone()?;
    if rollout.strategy != Strategy::Canary {
        return None;
    }
    let tasks: BTreeSet<String> = live
        .iter()
        .filter(|t| t.spec.task_template_eq(&service.spec))
        .map(|t| t.id.clone())
        .collect();
    (!tasks.is_empty() && tasks.len() < live.len()).then_some(CanaryRouting { matching, tasks })
}

/// The IP of an `agent_addr` (`1.2.3.4:7000`, `[::1]:7000`, either with `https://` in front
/// for a cluster node's mTLS agent server, or a bare IP).
fn agent_ip(agent_addr: &str) -> Option<IpAddr> {
    let agent_addr = agent_addr.strip_prefix("https://").unwrap_or(agent_addr);
    if let Ok(sock) = agent_addr.parse::<SocketAddr>() {
        return Some(sock.ip());
    }
    agent_addr.trim_matches(['[', ']']).parse().ok()
}

/// One HTTP route on a listener, owned by a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CompiledRoute {
    /// Lowercase, without port.
    pub host: Option<String>,
    pub path_prefix: String,
    pub service: String,
}

/// What a listener port serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PortPlan {
    Tcp {
        service: String,
        proxy_protocol: bool,
    },
    Http {
        routes: Vec<CompiledRoute>,
    },
}

/// Decides what each published port serves. Rejected ports (port 0, two services on one TCP
/// port, TCP mixed with HTTP, the same host and prefix twice) are left out and reported; the
/// rest of the table still applies.
pub(crate) fn plan_ports(table: &RouteTable) -> (BTreeMap<u16, PortPlan>, Vec<MeshError>) {
    let mut plans: BTreeMap<u16, PortPlan> = BTreeMap::new();
    let mut conflicts: BTreeMap<u16, String> = BTreeMap::new();
    for (name, routes) in &table.services {
        for port in &routes.ports {
            let published = port.published;
            if published == 0 {
                conflicts.insert(0, format!("{name} publishes port 0, which is not a port"));
                continue;
            }
            if conflicts.contains_key(&published) {
                continue;
            }
            let mesh_port = routes.spec.port(published);
            let conflict = match (mesh_port.protocol, plans.get(&published)) {
                (MeshProtocol::Tcp, None) => {
                    plans.insert(
                        published,
                        PortPlan::Tcp {
                            service: name.clone(),
                            proxy_protocol: mesh_port.proxy_protocol,
                        },
                    );
                    None
                }
                (MeshProtocol::Tcp, Some(existing)) => Some(format!(
                    "tcp port {published} is published by {name} and {}",
                    plan_owner(existing)
                )),
                (MeshProtocol::Http, Some(PortPlan::Tcp { service, .. })) => Some(format!(
                    "port {published} is http for {name} but tcp for {service}"
                )),
                (MeshProtocol::Http, _) => {
                    let mut own: Vec<CompiledRoute> = routes
                        .spec
                        .routes
                        .iter()
                        .filter(|r| r.port == published)
                        .map(|r| CompiledRoute {
                            host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                            path_prefix: r.path_prefix.clone(),
                            service: name.clone(),
                        })
                        .collect();
                    if own.is_empty() {
                        own.push(CompiledRoute {
                            host: None,
                            path_prefix: "/".to_string(),
                            service: name.clone(),
                        });
                    }
                    let PortPlan::Http { routes: entry } = plans
                        .entry(published)
                        .or_insert(PortPlan::Http { routes: Vec::new() })
                    else {
                        // The arm above took tcp ports.
                        continue;
                    };
                    let clash = own.iter().find_map(|r| {
                        entry
                            .iter()
                            .find(|e| e.host == r.host && e.path_prefix == r.path_prefix)
                    });
                    match clash {
                        Some(other) => Some(format!(
                            "route {}{} on port {published} is claimed by {name} and {}",
                            other.host.as_deref().unwrap_or("*"),
                            other.path_prefix,
                            other.service
                        )),
                        None => {
                            entry.extend(own);
                            None
                        }
                    }
                }
            };
            if let Some(reason) = conflict {
                conflicts.insert(published, reason);
                plans.remove(&published);
            }
        }
    }
    let errors = conflicts
        .into_iter()
        .map(|(port, reason)| MeshError::PortRejected { port, reason })
        .collect();
    (plans, errors)
}

fn plan_owner(plan: &PortPlan) -> String {
    match plan {
        PortPlan::Tcp { service, .. } => service.clone(),
        PortPlan::Http { routes } => routes
            .iter()
            .map(|r| r.service.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// The route for a request: among routes whose host matches (or is unset) and whose prefix
/// starts the path, the longest prefix wins; on a tie a route naming the host beats a catch-all.
pub(crate) fn match_route<'a>(
    routes: &'a [CompiledRoute],
    host: Option<&str>,
    path: &str,
) -> Option<&'a CompiledRoute> {
    routes
        .iter()
        .filter(|r| match &r.host {
            Some(h) => host.is_some_and(|req| req.eq_ignore_ascii_case(h)),
            None => true,
        })
        .filter(|r| prefix_matches(&r.path_prefix, path))
        .max_by_key(|r| (r.path_prefix.len(), r.host.is_some()))
}

/// `/api` matches `/api`, `/api/x` and `/api?q` but not `/apiary`; `/api/` matches `/api/x`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_types::mesh::{HttpRoute, MeshPort};

    fn route(host: Option<&str>, prefix: &str, service: &str) -> CompiledRoute {
        CompiledRoute {
            host: host.map(str::to_string),
            path_prefix: prefix.to_string(),
            service: service.to_string(),
        }
    }

    #[test]
    fn longest_prefix_and_host_win() {
        let routes = [
            route(None, "/", "root"),
            route(None, "/api", "api"),
            route(Some("admin.example"), "/", "admin"),
        ];
        let pick = |host, path| match_route(&routes, host, path).map(|r| r.service.as_str());
        assert_eq!(pick(None, "/api/users"), Some("api"));
        assert_eq!(pick(None, "/apiary"), Some("root"));
        assert_eq!(pick(Some("ADMIN.example"), "/x"), Some("admin"));
        assert_eq!(pick(Some("admin.example"), "/api"), Some("api"));
        assert_eq!(match_route(&routes[1..2], None, "/"), None);
    }

    fn http_service(published: u16, routes: Vec<HttpRoute>) -> ServiceRoutes {
        ServiceRoutes {
            spec: MeshSpec {
                ports: vec![MeshPort {
                    published,
                    protocol: MeshProtocol::Http,
                    proxy_protocol: false,
                }],
                routes,
                ..MeshSpec::default()
            },
            ports: vec![ServicePort {
                published,
                backends: Vec::new(),
            }],
            canary: None,
        }
    }

    #[test]
    fn from_cluster_takes_ready_tasks_with_host_ports() {
        use flotilla_types::testing;
        use flotilla_types::{
            Health, HealthCheck, HealthTest, Meta, NodeResources, PortBinding, PortSpec,
            ServiceSpec, TaskStatus,
        };
        let mut spec = ServiceSpec::process("web", vec!["serve".into()]);
        spec.ports = vec![PortSpec {
            target: 80,
            published: Some(8080),
            protocol: PortProtocol::Tcp,
            mode: Default::default(),
        }];
        spec.healthcheck = Some(HealthCheck::with_defaults(HealthTest::Tcp));
        let service = Service {
            name: "web".into(),
            spec: spec.clone(),
            revision: 1,
            meta: Meta::default(),
        };
        // Running, healthy, weight unset; the table below changes what each case needs.
        let task = |id: &str, node: &str, host_port| {
            let mut status = TaskStatus::new(TaskState::Running, 0, "");
            status.health = Health::Healthy;
            status.ports = vec![PortBinding {
                target: 80,
                host_port,
            }];
            let mut t = testing::task(id, &spec).on(node).build();
            t.status = status;
            t
        };
        let node = |id: &str, agent_addr: &str| {
            testing::node(id)
                .resources(NodeResources::default())
                .drivers(&[])
                .agent_addr(agent_addr)
                .build()
        };
        let mut tasks = [
            task("local", "n1", 30001),
            task("remote", "n2", 30002),
            task("sick", "n2", 30003),
            task("stopping", "n2", 30004),
            task("nowhere", "n3", 30005),
        ];
        tasks[1].weight = Some(40);
        tasks[2].status.health = Health::Unhealthy;
        tasks[3].desired_state = DesiredState::Shutdown;
        let nodes = [
            node("n1", "10.0.0.1:7000"),
            // The advertised IP wins over the agent's (loopback-bound) address.
            Node {
                advertise_ip: Some("192.168.1.2".parse().unwrap()),
                ..node("n2", "127.0.0.1:7000")
            },
            node("n3", "worker-3:7000"),
        ];
        let service_copy = service.clone();
        let table = RouteTable::from_cluster(&[service], &tasks, &nodes, "n1");
        let port = &table.services["web"].ports[0];
        assert_eq!(port.published, 8080);
        let got: Vec<(&str, String, u8, bool)> = port
            .backends
            .iter()
            .map(|b| (b.task_id.as_str(), b.addr.to_string(), b.weight, b.healthy))
            .collect();
        assert_eq!(
            got,
            [
                ("local", "127.0.0.1:30001".to_string(), 100, true),
                ("remote", "192.168.1.2:30002".to_string(), 40, true),
                ("sick", "192.168.1.2:30003".to_string(), 100, false),
            ]
        );

        // A host-mode port is bound by the tasks on their own nodes: the mesh leaves it alone.
        let mut host = service_copy;
        host.spec.ports[0].mode = flotilla_types::PortMode::Host;
        let table = RouteTable::from_cluster(&[host], &tasks, &nodes, "n1");
        assert!(!table.services.contains_key("web"), "{table:?}");
    }

    #[test]
    fn conflicts_are_reported_per_port() {
        let mut table = RouteTable::default();
        table.services.insert("a".into(), http_service(80, vec![]));
        table.services.insert("b".into(), http_service(80, vec![]));
        table.services.insert(
            "c".into(),
            http_service(
                81,
                vec![HttpRoute {
                    host: None,
                    path_prefix: "/c".into(),
                    port: 81,
                }],
            ),
        );
        let (plans, errors) = plan_ports(&table);
        assert!(matches!(
            errors.as_slice(),
            [MeshError::PortRejected { port: 80, .. }]
        ));
        assert_eq!(
            plans.get(&81),
            Some(&PortPlan::Http {
                routes: vec![route(None, "/c", "c")]
            })
        );
        assert!(!plans.contains_key(&80));
    }
}
