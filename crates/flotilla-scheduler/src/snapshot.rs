//! The cluster as placement sees it: node capacity, what each node already holds, start-failure
//! penalties and disruption budgets, plus per-service caches of the filters that cannot change
//! during a pass.

use crate::constraint::{compile, CompiledPlacement, Demand, NodeAttr};
use flotilla_types::{
    Availability, FieldError, Node, NodeState, PortProtocol, PortSpec, ServiceSpec, Task, Timestamp,
};
// FxHash, not std's SipHash: placement does several map lookups per candidate node and SipHash
// dominated the profile; the keys are node indices and names from our own store, not attacker
// input.
use rustc_hash::FxHashMap as FastMap;
use std::collections::{BTreeMap, HashMap};
use thiserror::Error;

/// Penalties halve every minute: a node that failed to start a task is avoided at first and
/// trusted again after a few minutes.
pub const PENALTY_HALF_LIFE_MS: i64 = 60_000;
/// Tasks of a service that may be preempted in one pass unless told otherwise.
pub const DEFAULT_DISRUPTION_BUDGET: usize = 1;

/// Bad snapshot settings.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SnapshotError {
    #[error("overcommit ratio {field} = {value} must be a finite number >= 1")]
    BadRatio { field: &'static str, value: f64 },
}

/// How far a node may be committed relative to its capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OvercommitRatios {
    /// Sum of reservations may reach `capacity * reservation` (default 1.0: reservations are real).
    pub reservation: f64,
    /// Sum of limits may reach `capacity * limit` (default 2.0: limits are ceilings, rarely all hit
    /// at once).
    pub limit: f64,
}

impl Default for OvercommitRatios {
    fn default() -> Self {
        OvercommitRatios {
            reservation: 1.0,
            limit: 2.0,
        }
    }
}

/// CPU (millicores) and memory (bytes) in the four dimensions placement checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Amounts {
    pub reserved_cpu: u64,
    pub reserved_memory: u64,
    pub limit_cpu: u64,
    pub limit_memory: u64,
}

impl Amounts {
    pub(crate) fn add_demand(&mut self, d: &Demand) {
        self.reserved_cpu = self.reserved_cpu.saturating_add(d.reserved_cpu);
        self.reserved_memory = self.reserved_memory.saturating_add(d.reserved_memory);
        self.limit_cpu = self.limit_cpu.saturating_add(d.limit_cpu);
        self.limit_memory = self.limit_memory.saturating_add(d.limit_memory);
    }

    pub(crate) fn sub_demand(&mut self, d: &Demand) {
        self.reserved_cpu = self.reserved_cpu.saturating_sub(d.reserved_cpu);
        self.reserved_memory = self.reserved_memory.saturating_sub(d.reserved_memory);
        self.limit_cpu = self.limit_cpu.saturating_sub(d.limit_cpu);
        self.limit_memory = self.limit_memory.saturating_sub(d.limit_memory);
    }
}

/// A task already holding resources on a node, as far as preemption cares. Borrowed from the
/// task: a snapshot is built on every controller pass, over every placed task.
#[derive(Debug, Clone)]
pub(crate) struct Resident<'n> {
    pub id: &'n str,
    pub service: &'n str,
    pub image: Option<&'n str>,
    pub priority: u32,
    pub demand: Demand,
    pub host_ports: Vec<(u16, PortProtocol)>,
}

/// One node and what it holds. The node is borrowed: copying every node on every controller
/// pass made registering 10,000 nodes quadratic (docs/BENCHMARKS.md).
#[derive(Debug, Clone)]
pub(crate) struct NodeEntry<'n> {
    pub node: &'n Node,
    /// Capacity after applying the overcommit ratios.
    pub capacity: Amounts,
    pub used: Amounts,
    /// Tasks per image (including tasks placed during this pass).
    pub images: FastMap<String, u32>,
    /// Tasks present when the snapshot was built; the only ones preemption may evict.
    pub residents: Vec<Resident<'n>>,
    /// Host-mode ports held by live tasks (a multiset; almost always empty or tiny).
    pub host_ports: Vec<(u16, PortProtocol)>,
}

impl NodeEntry<'_> {
    fn add(&mut self, image: Option<&str>, demand: &Demand) {
        self.used.add_demand(demand);
        if let Some(i) = image {
            bump(&mut self.images, i, 1);
        }
    }

    fn remove(&mut self, image: Option<&str>, demand: &Demand) {
        self.used.sub_demand(demand);
        if let Some(i) = image {
            bump(&mut self.images, i, -1);
        }
    }
}

/// Adjusts a counter, dropping it at zero so maps only hold what is present.
fn bump(map: &mut FastMap<String, u32>, key: &str, delta: i32) {
    if delta > 0 {
        match map.get_mut(key) {
            Some(n) => *n += 1,
            None => {
                map.insert(key.to_string(), 1);
            }
        }
    } else if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

fn scaled(capacity: u64, ratio: f64) -> u64 {
    // `as` saturates for floats out of range, and the ratio is validated finite and >= 1.
    (capacity as f64 * ratio) as u64
}

/// Why a node cannot take a task. Ordered so that explanations are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Rejection {
    NodeDown,
    Paused,
    Draining,
    MissingDriver,
    Constraint(usize),
    MaxPerNode,
    Affinity(usize),
    MissingSpreadLabel(usize),
    Spread(usize),
    MissingZone,
    ZoneAlreadyUsed,
    /// Index into `CompiledPlacement::host_ports`.
    HostPortInUse(usize),
    InsufficientCpu,
    InsufficientMemory,
    CpuLimitOvercommit,
    MemoryLimitOvercommit,
}

impl Rejection {
    /// Whether freeing resources on the node could lift the rejection.
    pub fn is_resource(self) -> bool {
        matches!(
            self,
            Rejection::InsufficientCpu
                | Rejection::InsufficientMemory
                | Rejection::CpuLimitOvercommit
                | Rejection::MemoryLimitOvercommit
        )
    }

    pub fn describe(self, c: &CompiledPlacement) -> String {
        match self {
            Rejection::NodeDown => "node down".to_string(),
            Rejection::Paused => "node paused".to_string(),
            Rejection::Draining => "node draining".to_string(),
            Rejection::MissingDriver => format!("missing driver {}", c.driver),
            Rejection::Constraint(i) => format!("violate {}", c.constraints[i].expr),
            Rejection::MaxPerNode => {
                format!("max {} tasks per node", c.max_per_node.unwrap_or(0))
            }
            Rejection::Affinity(i) => format!("violate {}", c.affinities[i].expr),
            Rejection::MissingSpreadLabel(i) => {
                format!("missing label for {}", c.spreads[i].expr)
            }
            Rejection::Spread(i) => format!("violate {}", c.spreads[i].expr),
            Rejection::MissingZone => "no zone".to_string(),
            Rejection::ZoneAlreadyUsed => match &c.zones {
                Some(z) => format!("violate {} (zone already used)", z.expr),
                None => "zone already used".to_string(),
            },
            Rejection::HostPortInUse(i) => match c.host_ports.get(i) {
                Some((port, PortProtocol::Tcp)) => format!("host port {port} in use"),
                Some((port, PortProtocol::Udp)) => format!("host port {port}/udp in use"),
                None => "host port in use".to_string(),
            },
            Rejection::InsufficientCpu => "insufficient cpu".to_string(),
            Rejection::InsufficientMemory => "insufficient memory".to_string(),
            Rejection::CpuLimitOvercommit => "cpu limits over overcommit ratio".to_string(),
            Rejection::MemoryLimitOvercommit => "memory limits over overcommit ratio".to_string(),
        }
    }
}

/// Tasks of one service grouped by the values of one node attribute.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub attr: NodeAttr,
    /// Domain of each node (by node index); `None` when the node lacks the attribute.
    pub domain_of: Vec<Option<u32>>,
    /// Tasks of the service per domain.
    pub counts: Vec<u32>,
    /// Whether a domain has at least one node passing the static filters. Only those domains
    /// count for skew, as a zone the service may never use must not block it.
    pub eligible: Vec<bool>,
}

impl Topology {
    /// Smallest count among eligible domains.
    pub fn min_eligible(&self) -> u32 {
        self.counts
            .iter()
            .zip(&self.eligible)
            .filter(|(_, e)| **e)
            .map(|(c, _)| *c)
            .min()
            .unwrap_or(0)
    }

    pub fn domains_used(&self) -> usize {
        self.counts.iter().filter(|c| **c > 0).count()
    }

    pub fn eligible_domains(&self) -> usize {
        self.eligible.iter().filter(|e| **e).count()
    }

    fn adjust(&mut self, node: usize, delta: i32) {
        if let Some(Some(d)) = self.domain_of.get(node) {
            let c = &mut self.counts[*d as usize];
            *c = if delta > 0 {
                *c + 1
            } else {
                c.saturating_sub(1)
            };
        }
    }
}

/// What never changes for a service during a pass: its compiled rules, the nodes passing the
/// static filters (state, availability, driver, hard constraints) and their soft-constraint score.
#[derive(Debug, Clone)]
pub(crate) struct ServiceCache {
    pub spec: ServiceSpec,
    pub compiled: CompiledPlacement,
    /// Node indices passing the static filters, ascending.
    pub eligible: Vec<usize>,
    /// Number of satisfied soft constraints, parallel to `eligible`.
    pub soft_hits: Vec<u32>,
    /// Number of soft constraints, i.e. the best possible `soft_hits`.
    pub soft_total: u32,
    pub static_rejections: BTreeMap<Rejection, usize>,
    pub topologies: Vec<Topology>,
    /// Topology index of each spread rule, parallel to `compiled.spreads`.
    pub spread_topology: Vec<usize>,
    /// Topology index of the zone requirement.
    pub zone_topology: Option<usize>,
}

/// A decaying start-failure penalty.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Penalty {
    value: f64,
    at: Timestamp,
}

impl Penalty {
    pub(crate) fn at(self, now: Timestamp) -> f64 {
        let elapsed = now.saturating_sub(self.at).max(0) as f64;
        self.value * 0.5f64.powf(elapsed / PENALTY_HALF_LIFE_MS as f64)
    }
}

/// Everything placement needs to know, built once per scheduling pass. It borrows the nodes
/// and the tasks it was built from (`'n`).
#[derive(Debug, Clone)]
pub struct ClusterSnapshot<'n> {
    pub(crate) nodes: Vec<NodeEntry<'n>>,
    /// Node index by id, and by hostname where that does not shadow an id.
    by_name: FastMap<&'n str, usize>,
    pub(crate) now: Timestamp,
    ratios: OvercommitRatios,
    /// Start-failure penalties: service → node index → penalty.
    failures: HashMap<String, HashMap<usize, Penalty>>,
    /// Remaining disruption budget per service.
    budgets: HashMap<String, usize>,
    pub(crate) caches: HashMap<String, ServiceCache>,
    /// Tasks per node index, per service (including tasks placed during this pass).
    pub(crate) usage: FastMap<String, FastMap<usize, u32>>,
    /// Placements made so far; varies the sampling order between successive placements.
    pub(crate) placements_made: u64,
}

impl<'n> ClusterSnapshot<'n> {
    /// `tasks`: all tasks that hold resources (non-terminal, assigned to a node). Terminal or
    /// unassigned tasks, and tasks on nodes not in `nodes`, are skipped.
    pub fn new(
        nodes: impl IntoIterator<Item = &'n Node>,
        tasks: impl IntoIterator<Item = &'n Task>,
        now: Timestamp,
    ) -> Self {
        let ratios = OvercommitRatios::default();
        let mut entries: Vec<NodeEntry<'n>> = nodes
            .into_iter()
            .map(|n| NodeEntry {
                node: n,
                capacity: capacity_of(n, ratios),
                used: Amounts::default(),
                images: FastMap::default(),
                residents: Vec::new(),
                host_ports: Vec::new(),
            })
            .collect();
        let mut by_name = FastMap::default();
        by_name.reserve(entries.len() * 2);
        for (i, e) in entries.iter().enumerate() {
            by_name.entry(e.node.hostname.as_str()).or_insert(i);
        }
        for (i, e) in entries.iter().enumerate() {
            by_name.insert(e.node.id.as_str(), i);
        }
        let mut usage = FastMap::default();
        for task in tasks {
            if task.status.state.is_terminal() {
                continue;
            }
            let Some(node) = task.node.as_deref() else {
                continue;
            };
            let Some(&idx) = by_name.get(node) else {
                tracing::debug!(task = %task.id, node, "task on a node outside the snapshot; ignored");
                continue;
            };
            let demand = Demand::of(&task.spec);
            let entry = &mut entries[idx];
            entry.add(task.spec.image.as_deref(), &demand);
            bump_usage(&mut usage, &task.service, idx, 1);
            let host_ports = host_ports_of(&task.spec);
            entry.host_ports.extend_from_slice(&host_ports);
            entry.residents.push(Resident {
                id: &task.id,
                service: &task.service,
                image: task.spec.image.as_deref(),
                priority: task.spec.placement.priority,
                demand,
                host_ports,
            });
        }
        ClusterSnapshot {
            nodes: entries,
            by_name,
            now,
            ratios,
            failures: HashMap::new(),
            budgets: HashMap::new(),
            caches: HashMap::new(),
            usage,
            placements_made: 0,
        }
    }

    /// Accounts the resources of a task that is being stopped (desired shutdown, not finished):
    /// its process still holds them until it exits, so nothing else may take them yet, but it
    /// is not a resident either (preempting a task already on its way out frees nothing) and
    /// it does not count for its service's spreading. Finished or unassigned tasks and tasks on
    /// nodes outside the snapshot are ignored.
    pub fn hold_stopping(&mut self, task: &Task) {
        if task.status.state.is_terminal() {
            return;
        }
        let Some(&idx) = task.node.as_deref().and_then(|n| self.by_name.get(n)) else {
            return;
        };
        self.nodes[idx].used.add_demand(&Demand::of(&task.spec));
        // The exiting process still has its host port bound.
        self.nodes[idx]
            .host_ports
            .extend(task.spec.ports.iter().filter_map(PortSpec::host_port));
    }

    /// Keeps room on `node` for a task of `spec` that is not placed yet: a preempting task
    /// waiting for its victims to exit. Without it, the room the first victim frees goes to
    /// whichever service is placed next in the same pass (often the victims' own replacements),
    /// and the preemptor has to evict again. Unknown nodes are ignored.
    pub fn hold_for(&mut self, node: &str, spec: &ServiceSpec) {
        let Some(&idx) = self.by_name.get(node) else {
            return;
        };
        self.nodes[idx].used.add_demand(&Demand::of(spec));
        self.nodes[idx]
            .host_ports
            .extend(spec.ports.iter().filter_map(PortSpec::host_port));
    }

    /// The time penalties are evaluated at.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Changes how far nodes may be committed (see [`OvercommitRatios`]).
    pub fn set_overcommit(&mut self, ratios: OvercommitRatios) -> Result<(), SnapshotError> {
        for (field, value) in [("reservation", ratios.reservation), ("limit", ratios.limit)] {
            if !value.is_finite() || value < 1.0 {
                return Err(SnapshotError::BadRatio { field, value });
            }
        }
        self.ratios = ratios;
        for e in &mut self.nodes {
            e.capacity = capacity_of(e.node, ratios);
        }
        Ok(())
    }

    /// How many more tasks of `service` preemption may evict in this pass (default
    /// [`DEFAULT_DISRUPTION_BUDGET`]).
    pub fn set_disruption_budget(&mut self, service: &str, remaining: usize) {
        self.budgets.insert(service.to_string(), remaining);
    }

    pub(crate) fn budget(&self, service: &str) -> usize {
        self.budgets
            .get(service)
            .copied()
            .unwrap_or(DEFAULT_DISRUPTION_BUDGET)
    }

    /// Remember that `service`'s task failed to start on `node` (id or hostname) at `at`. The
    /// penalty adds up over failures and halves every [`PENALTY_HALF_LIFE_MS`]. A node outside
    /// the snapshot cannot be chosen anyway, so it is ignored.
    pub fn record_start_failure(&mut self, service: &str, node: &str, at: Timestamp) {
        let Some(&idx) = self.by_name.get(node) else {
            tracing::debug!(service, node, "start failure on unknown node ignored");
            return;
        };
        let slot = self
            .failures
            .entry(service.to_string())
            .or_default()
            .entry(idx)
            .or_insert(Penalty { value: 0.0, at });
        let latest = slot.at.max(at);
        *slot = Penalty {
            value: slot.at(latest) + 1.0,
            at: latest,
        };
    }

    /// The current penalties of `service`, by node index.
    pub(crate) fn penalties(&self, service: &str) -> Option<&HashMap<usize, Penalty>> {
        self.failures.get(service)
    }

    pub(crate) fn node_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Makes sure the cache for `spec.name` matches `spec`, compiling it if needed.
    pub(crate) fn prepare(&mut self, spec: &ServiceSpec) -> Result<(), Vec<FieldError>> {
        if self.caches.get(&spec.name).is_some_and(|c| c.spec == *spec) {
            return Ok(());
        }
        let compiled = compile(spec)?;
        let cache = self.build_cache(spec, compiled);
        self.caches.insert(spec.name.clone(), cache);
        Ok(())
    }

    fn build_cache(&self, spec: &ServiceSpec, compiled: CompiledPlacement) -> ServiceCache {
        let mut eligible = Vec::new();
        let mut soft_hits = Vec::new();
        let mut static_rejections = BTreeMap::new();
        for (i, e) in self.nodes.iter().enumerate() {
            match static_check(e.node, &compiled) {
                Ok(hits) => {
                    eligible.push(i);
                    soft_hits.push(hits);
                }
                Err(r) => *static_rejections.entry(r).or_insert(0) += 1,
            }
        }
        let mut topologies: Vec<Topology> = Vec::new();
        let mut topology_for = |attr: &NodeAttr| -> usize {
            if let Some(i) = topologies.iter().position(|t| t.attr == *attr) {
                return i;
            }
            topologies.push(self.topology(attr, &spec.name, &eligible));
            topologies.len() - 1
        };
        let spread_topology = compiled
            .spreads
            .iter()
            .map(|s| topology_for(&s.attr))
            .collect();
        let zone_topology = compiled
            .zones
            .as_ref()
            .map(|_| topology_for(&NodeAttr::Zone));
        ServiceCache {
            spec: spec.clone(),
            eligible,
            soft_hits,
            soft_total: compiled.constraints.iter().filter(|k| k.soft).count() as u32,
            static_rejections,
            topologies,
            spread_topology,
            zone_topology,
            compiled,
        }
    }

    fn topology(&self, attr: &NodeAttr, service: &str, eligible: &[usize]) -> Topology {
        let own = self.usage.get(service);
        let mut names: FastMap<&str, u32> = FastMap::default();
        let mut counts = Vec::new();
        let domain_of: Vec<Option<u32>> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let value = attr.domain(e.node)?;
                let next = names.len() as u32;
                let d = *names.entry(value).or_insert(next);
                if d as usize == counts.len() {
                    counts.push(0);
                }
                counts[d as usize] += own.and_then(|m| m.get(&i)).copied().unwrap_or(0);
                Some(d)
            })
            .collect();
        let mut domain_eligible = vec![false; counts.len()];
        for &i in eligible {
            if let Some(d) = domain_of[i] {
                domain_eligible[d as usize] = true;
            }
        }
        Topology {
            attr: attr.clone(),
            domain_of,
            counts,
            eligible: domain_eligible,
        }
    }

    /// Accounts a task of `service` on node `idx`.
    pub(crate) fn add_task(&mut self, idx: usize, service: &str, image: Option<&str>, d: &Demand) {
        self.nodes[idx].add(image, d);
        bump_usage(&mut self.usage, service, idx, 1);
        if let Some(cache) = self.caches.get_mut(service) {
            cache.topologies.iter_mut().for_each(|t| t.adjust(idx, 1));
        }
    }

    /// Marks `ports` as held on node `idx` by a task placed in this pass.
    pub(crate) fn hold_host_ports(&mut self, idx: usize, ports: &[(u16, PortProtocol)]) {
        self.nodes[idx].host_ports.extend_from_slice(ports);
    }

    fn release_host_ports(&mut self, idx: usize, ports: &[(u16, PortProtocol)]) {
        let held = &mut self.nodes[idx].host_ports;
        for p in ports {
            if let Some(i) = held.iter().position(|h| h == p) {
                held.swap_remove(i);
            }
        }
    }

    /// Evicts resident `r` of node `idx`, returning its task id.
    pub(crate) fn evict(&mut self, idx: usize, r: usize) -> String {
        let resident = self.nodes[idx].residents.remove(r);
        self.nodes[idx].remove(resident.image, &resident.demand);
        self.release_host_ports(idx, &resident.host_ports);
        bump_usage(&mut self.usage, resident.service, idx, -1);
        if let Some(cache) = self.caches.get_mut(resident.service) {
            cache.topologies.iter_mut().for_each(|t| t.adjust(idx, -1));
        }
        let budget = self
            .budgets
            .entry(resident.service.to_string())
            .or_insert(DEFAULT_DISRUPTION_BUDGET);
        *budget = budget.saturating_sub(1);
        resident.id.to_string()
    }
}

fn host_ports_of(spec: &ServiceSpec) -> Vec<(u16, PortProtocol)> {
    spec.ports.iter().filter_map(PortSpec::host_port).collect()
}

/// Adjusts the task count of `service` on node `idx`, dropping entries at zero.
fn bump_usage(
    usage: &mut FastMap<String, FastMap<usize, u32>>,
    service: &str,
    idx: usize,
    delta: i32,
) {
    let per_node = match usage.get_mut(service) {
        Some(m) => m,
        None if delta > 0 => usage.entry(service.to_string()).or_default(),
        None => return,
    };
    if delta > 0 {
        *per_node.entry(idx).or_insert(0) += 1;
    } else if let Some(n) = per_node.get_mut(&idx) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            per_node.remove(&idx);
        }
    }
}

fn capacity_of(n: &Node, r: OvercommitRatios) -> Amounts {
    Amounts {
        reserved_cpu: scaled(n.resources.cpu_millis, r.reservation),
        reserved_memory: scaled(n.resources.memory_bytes, r.reservation),
        limit_cpu: scaled(n.resources.cpu_millis, r.limit),
        limit_memory: scaled(n.resources.memory_bytes, r.limit),
    }
}

/// Filters that depend only on the node and the spec. Returns the number of satisfied soft
/// constraints.
pub(crate) fn static_check(node: &Node, c: &CompiledPlacement) -> Result<u32, Rejection> {
    if node.state != NodeState::Ready {
        return Err(Rejection::NodeDown);
    }
    match node.availability {
        Availability::Active => {}
        Availability::Pause => return Err(Rejection::Paused),
        Availability::Drain => return Err(Rejection::Draining),
    }
    if !node.drivers.contains(&c.driver) {
        return Err(Rejection::MissingDriver);
    }
    let mut soft_hits = 0;
    for (i, k) in c.constraints.iter().enumerate() {
        let ok = k.matches(node);
        if k.soft {
            soft_hits += u32::from(ok);
        } else if !ok {
            return Err(Rejection::Constraint(i));
        }
    }
    Ok(soft_hits)
}
