//! The live form of a [`RouteTable`]: an immutable [`Routing`] snapshot that connections read,
//! and the [`Registry`] of per-backend state that outlives snapshots.

use crate::balancer::{BackendState, Pool};
use crate::budget::RetryBudget;
use crate::metrics::{Counters, MeshStats, ServiceStats};
use crate::routes::{PortPlan, RouteTable};
use flotilla_types::mesh::MeshSpec;
use flotilla_types::release::CanaryMatch;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A service as connections see it in one snapshot.
#[derive(Debug)]
pub(crate) struct ServiceEntry {
    pub name: String,
    pub spec: MeshSpec,
    pub counters: Arc<Counters>,
    pub budget: Arc<RetryBudget>,
    /// Backends per published port.
    pub pools: HashMap<u16, Pool>,
    /// During a canary rollout with a request match: which requests go to the canary, and
    /// the canary's backends per published port (weights ignored).
    pub canary: Option<(CanaryMatch, HashMap<u16, Pool>)>,
}

/// One immutable routing snapshot; `Mesh::apply` swaps in a new one.
#[derive(Debug, Default)]
pub(crate) struct Routing {
    pub ports: BTreeMap<u16, PortPlan>,
    pub services: HashMap<String, Arc<ServiceEntry>>,
}

impl Routing {
    /// The service and backend pool serving `service` on `port`.
    pub fn target(&self, service: &str, port: u16) -> Option<(&Arc<ServiceEntry>, &Pool)> {
        let entry = self.services.get(service)?;
        Some((entry, entry.pools.get(&port)?))
    }
}

/// Identifies a backend's state across snapshots.
type BackendKey = (String, String, SocketAddr);

/// Per-service and per-backend state that survives route updates.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    backends: HashMap<BackendKey, Arc<BackendState>>,
    services: HashMap<String, (Arc<Counters>, Arc<RetryBudget>)>,
}

impl Registry {
    /// Builds a snapshot for `table`, reusing the state of backends it already knew. Backends
    /// that left the table stay registered (with weight 0) while requests are in flight on them,
    /// so `in_flight` keeps answering for a draining task.
    pub fn build(&mut self, table: &RouteTable, ports: BTreeMap<u16, PortPlan>) -> Routing {
        let mut live: HashMap<BackendKey, Arc<BackendState>> = HashMap::new();
        let mut services = HashMap::new();
        for (name, routes) in &table.services {
            let (counters, budget) = self
                .services
                .entry(name.clone())
                .or_insert_with(|| {
                    (
                        Arc::new(Counters::default()),
                        Arc::new(RetryBudget::new(routes.spec.retry_budget_percent)),
                    )
                })
                .clone();
            budget.set_percent(routes.spec.retry_budget_percent);
            let mut pools = HashMap::new();
            let mut canary_pools = HashMap::new();
            for port in &routes.ports {
                let mut backends = Vec::new();
                for b in &port.backends {
                    let key = (name.clone(), b.task_id.clone(), b.addr);
                    let state = live
                        .entry(key.clone())
                        .or_insert_with(|| {
                            self.backends.get(&key).cloned().unwrap_or_else(|| {
                                Arc::new(BackendState::new(
                                    name,
                                    &b.task_id,
                                    b.addr,
                                    &routes.spec.breaker,
                                ))
                            })
                        })
                        .clone();
                    state.set(b.weight, b.healthy);
                    state.set_current(b.current);
                    state.breaker.set_spec(&routes.spec.breaker);
                    if !backends
                        .iter()
                        .any(|x: &Arc<BackendState>| x.addr == b.addr)
                    {
                        backends.push(state);
                    }
                }
                if let Some(canary) = &routes.canary {
                    let chosen = backends
                        .iter()
                        .filter(|b| canary.tasks.contains(&b.task_id))
                        .cloned()
                        .collect();
                    canary_pools.insert(
                        port.published,
                        Pool::unweighted(chosen, routes.spec.balancer),
                    );
                }
                pools.insert(port.published, Pool::new(backends, routes.spec.balancer));
            }
            services.insert(
                name.clone(),
                Arc::new(ServiceEntry {
                    name: name.clone(),
                    spec: routes.spec.clone(),
                    counters,
                    budget,
                    pools,
                    canary: routes
                        .canary
                        .as_ref()
                        .map(|c| (c.matching.clone(), canary_pools)),
                }),
            );
        }
        for (key, state) in self.backends.drain() {
            if !live.contains_key(&key) && state.in_flight() > 0 {
                state.set(0, false);
                live.insert(key, state);
            }
        }
        self.backends = live;
        let backends = &self.backends;
        self.services.retain(|name, _| {
            table.services.contains_key(name) || backends.keys().any(|(s, _, _)| s == name)
        });
        Routing { ports, services }
    }

    pub fn in_flight(&self, task_id: &str) -> u64 {
        self.backends
            .values()
            .filter(|b| b.task_id == task_id)
            .map(|b| b.in_flight())
            .sum()
    }

    pub fn stats(&self) -> MeshStats {
        let mut stats = MeshStats::default();
        for (name, (counters, _)) in &self.services {
            let mut tasks: Vec<_> = self
                .backends
                .values()
                .filter(|b| &b.service == name)
                .map(|b| b.stats())
                .collect();
            tasks.sort_by(|a, b| (&a.task_id, &a.addr).cmp(&(&b.task_id, &b.addr)));
            stats.services.insert(
                name.clone(),
                ServiceStats {
                    requests: counters.requests.load(Ordering::Relaxed),
                    connections: counters.connections.load(Ordering::Relaxed),
                    errors: counters.errors(),
                    latency: counters.latency.summary(),
                    in_flight: tasks.iter().map(|t| t.in_flight).sum(),
                    tasks,
                },
            );
        }
        stats
    }
}
