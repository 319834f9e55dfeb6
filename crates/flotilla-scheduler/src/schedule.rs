//! One placement: walk a sample of the statically eligible nodes, drop those failing the dynamic
//! filters, score the rest, take the best; preempt lower-priority tasks if nothing fits; explain
//! the failure otherwise.

use crate::constraint::{AffinityTarget, CompiledPlacement, Demand};
use crate::snapshot::{static_check, ClusterSnapshot, NodeEntry, Rejection, ServiceCache};
use flotilla_types::{FieldError, PlacementStrategy, PortSpec, ServiceSpec};
use rustc_hash::FxHashMap as FastMap;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use thiserror::Error;

/// Fewest feasible candidates scored per placement; clusters this small are scored in full.
pub const MIN_CANDIDATES: usize = 16;
/// Feasible candidates may be scanned up to this many times the limit while looking for ones
/// with no penalty and every preference met, so bad candidates do not use up the sample.
const MAX_SKIP_FACTOR: usize = 4;
/// Penalties decayed below this are forgotten.
const PENALTY_FLOOR: f64 = 1.0 / 64.0;

// Score tiers, highest first: a start-failure penalty outweighs any preference, a preference
// outweighs spreading, spreading outweighs load.
const PENALTY_WEIGHT: f64 = 1e9;
const SOFT_WEIGHT: f64 = 1e5;
const AFFINITY_UNIT: f64 = 1e3;
const SPREAD_WEIGHT: f64 = 1e3;
const SERVICE_COUNT_WEIGHT: f64 = 10.0;
/// Holding the task's image (no pull needed) beats a lighter load, not spreading.
const IMAGE_WEIGHT: f64 = 5.0;
const LOAD_WEIGHT: f64 = 1.0;

/// A request to place `count` tasks of one service.
#[derive(Debug, Clone, Copy)]
pub struct PlacementRequest<'a> {
    pub spec: &'a ServiceSpec,
    /// Tasks to place.
    pub count: usize,
    /// Only consider this node (id or hostname); used for global services.
    pub pin_to: Option<&'a str>,
}

impl<'a> PlacementRequest<'a> {
    pub fn new(spec: &'a ServiceSpec, count: usize) -> Self {
        PlacementRequest {
            spec,
            count,
            pin_to: None,
        }
    }
}

/// Where one task goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// Node id.
    pub node: String,
    /// Ids of tasks to preempt on that node first.
    pub evictions: Vec<String>,
}

/// Not every task could be placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Error)]
#[error("{reason}")]
pub struct PlacementFailure {
    /// Placements made before the failure; already accounted in the snapshot.
    pub placed: Vec<Placement>,
    pub unplaced: usize,
    /// E.g. `0/5 nodes: 3 insufficient memory, 2 violate node.labels.zone==b`.
    pub reason: String,
    /// Nodes rejected per reason.
    pub counts: BTreeMap<String, usize>,
}

/// Place `count` tasks; on partial success returns Err with what was placed.
///
/// Every placement is accounted in `snapshot` at once, so later placements (in this call or
/// later ones on the same snapshot) see it.
pub fn schedule(
    snapshot: &mut ClusterSnapshot,
    req: &PlacementRequest,
) -> Result<Vec<Placement>, PlacementFailure> {
    let span = tracing::debug_span!("schedule", service = %req.spec.name, count = req.count);
    let _entered = span.enter();
    let name = req.spec.name.as_str();
    let mut placed = Vec::with_capacity(req.count);
    let fail = |placed: Vec<Placement>, total: usize, counts: BTreeMap<String, usize>| {
        let unplaced = req.count - placed.len();
        let reason = explain(total, &counts);
        tracing::debug!(%reason, unplaced, "placement failed");
        PlacementFailure {
            placed,
            unplaced,
            reason,
            counts,
        }
    };
    if let Err(errors) = snapshot.prepare(req.spec) {
        return Err(invalid_spec(req.count, &errors));
    }
    let pin = match req.pin_to {
        None => None,
        Some(node) => match snapshot.node_index(node) {
            Some(i) => Some(i),
            None => {
                let counts = BTreeMap::from([(format!("unknown node {node:?}"), 1)]);
                return Err(fail(placed, 0, counts));
            }
        },
    };
    let demand = Demand::of(req.spec);
    let host_ports: Vec<_> = req
        .spec
        .ports
        .iter()
        .filter_map(PortSpec::host_port)
        .collect();
    let image = req.spec.image.as_deref();
    for _ in 0..req.count {
        // `prepare` above inserted the cache under this name and nothing removes caches.
        let cache = snapshot
            .caches
            .get(name)
            .expect("prepare() inserted the service cache");
        let decision = match decide(snapshot, cache, pin) {
            Ok(d) => d,
            Err((total, counts)) => return Err(fail(placed, total, counts)),
        };
        let mut evictions = decision.evictions;
        // Remove from the back so earlier indices stay valid.
        evictions.sort_unstable_by(|a, b| b.cmp(a));
        let evicted: Vec<String> = evictions
            .into_iter()
            .map(|r| snapshot.evict(decision.node, r))
            .collect();
        snapshot.add_task(decision.node, name, image, &demand);
        snapshot.hold_host_ports(decision.node, &host_ports);
        snapshot.placements_made += 1;
        let node = snapshot.nodes[decision.node].node.id.clone();
        if !evicted.is_empty() {
            tracing::info!(node = %node, evictions = ?evicted, "preempting lower-priority tasks");
        }
        placed.push(Placement {
            node,
            evictions: evicted,
        });
    }
    Ok(placed)
}

fn invalid_spec(count: usize, errors: &[FieldError]) -> PlacementFailure {
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    PlacementFailure {
        placed: Vec::new(),
        unplaced: count,
        reason: format!("invalid placement: {}", text.join("; ")),
        counts: errors.iter().map(|e| (e.to_string(), 0)).collect(),
    }
}

/// `0/5 nodes: 3 insufficient memory, 2 violate node.labels.zone==b`: reasons by count
/// descending, then by name.
fn explain(total: usize, counts: &BTreeMap<String, usize>) -> String {
    let mut entries: Vec<(&String, &usize)> = counts.iter().collect();
    entries.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let parts: Vec<String> = entries.iter().map(|(r, n)| format!("{n} {r}")).collect();
    if parts.is_empty() {
        format!("0/{total} nodes: no nodes")
    } else {
        format!("0/{total} nodes: {}", parts.join(", "))
    }
}

/// The chosen node and the residents to evict from it.
struct Decision {
    node: usize,
    evictions: Vec<usize>,
}

/// Tasks of one service per node index.
type NodeCounts = FastMap<usize, u32>;

/// Facts looked up once per placement rather than once per candidate.
struct PassView<'s> {
    /// Least-used eligible domain count per topology.
    mins: Vec<u32>,
    /// Zones the service already uses.
    zones_used: usize,
    /// Where the service's own tasks are.
    own: Option<&'s NodeCounts>,
    /// For each service affinity, where the matching services' tasks are (parallel to
    /// `compiled.affinities`; empty for image affinities).
    affinity_usage: Vec<Vec<&'s NodeCounts>>,
}

impl<'s> PassView<'s> {
    /// What one placement pass of `cache`'s service reads from the snapshot.
    fn of(snap: &'s ClusterSnapshot, cache: &ServiceCache) -> Self {
        let c = &cache.compiled;
        PassView {
            mins: cache.topologies.iter().map(|t| t.min_eligible()).collect(),
            zones_used: cache
                .zone_topology
                .map_or(0, |ti| cache.topologies[ti].domains_used()),
            own: snap.usage.get(&c.service),
            affinity_usage: c
                .affinities
                .iter()
                .map(|a| match &a.target {
                    AffinityTarget::Service(m) => match m.exact() {
                        Some(s) => snap.usage.get(s).into_iter().collect(),
                        None => snap
                            .usage
                            .iter()
                            .filter(|(k, _)| m.matches(k))
                            .map(|(_, v)| v)
                            .collect(),
                    },
                    AffinityTarget::Image(_) => Vec::new(),
                })
                .collect(),
        }
    }

    fn own_count(&self, idx: usize) -> u32 {
        self.own.and_then(|m| m.get(&idx)).copied().unwrap_or(0)
    }
}

/// A deterministic xorshift64* generator: placement must be reproducible from its inputs.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // Zero is the one state xorshift cannot leave.
        XorShift(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Visits every position of `0..len` once, in a pseudo-random order: a random start and a
/// stride coprime with `len` (a cheap permutation, so nothing is shuffled or allocated).
struct Walk {
    pos: usize,
    stride: usize,
    len: usize,
    left: usize,
}

impl Walk {
    fn new(len: usize, rng: &mut XorShift) -> Self {
        if len <= 1 {
            return Walk {
                pos: 0,
                stride: 1,
                len: len.max(1),
                left: len,
            };
        }
        let mut stride = 1 + rng.below(len - 1);
        while gcd(stride, len) != 1 {
            stride = if stride + 1 >= len { 1 } else { stride + 1 };
        }
        Walk {
            pos: rng.below(len),
            stride,
            len,
            left: len,
        }
    }
}

impl Iterator for Walk {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let here = self.pos;
        self.pos = (self.pos + self.stride) % self.len;
        Some(here)
    }
}

/// Nomad's limit: log2 of the eligible node count, but never fewer than [`MIN_CANDIDATES`].
fn candidate_limit(eligible: usize) -> usize {
    let log2 = usize::BITS - eligible.max(1).leading_zeros();
    (log2 as usize).max(MIN_CANDIDATES)
}

/// Whether node `idx` runs what affinity `i` is about.
fn node_has(e: &NodeEntry, idx: usize, target: &AffinityTarget, usage: &[&NodeCounts]) -> bool {
    match target {
        AffinityTarget::Service(_) => usage.iter().any(|m| m.contains_key(&idx)),
        AffinityTarget::Image(m) => match m.exact() {
            Some(s) => e.images.contains_key(s),
            None => e.images.keys().any(|k| m.matches(k)),
        },
    }
}

/// Filters that depend on what the nodes hold now. Resource checks come last so a resource
/// rejection means every other filter passed (which is what preemption needs).
fn dynamic_check(
    e: &NodeEntry,
    idx: usize,
    cache: &ServiceCache,
    view: &PassView,
) -> Result<(), Rejection> {
    let c = &cache.compiled;
    if let Some(max) = c.max_per_node {
        if u64::from(view.own_count(idx)) >= max {
            return Err(Rejection::MaxPerNode);
        }
    }
    for (i, a) in c.affinities.iter().enumerate() {
        if a.hard && node_has(e, idx, &a.target, &view.affinity_usage[i]) != a.attract {
            return Err(Rejection::Affinity(i));
        }
    }
    for (i, s) in c.spreads.iter().enumerate() {
        if !s.hard {
            continue;
        }
        let ti = cache.spread_topology[i];
        let t = &cache.topologies[ti];
        match t.domain_of[idx] {
            None => return Err(Rejection::MissingSpreadLabel(i)),
            Some(d) => {
                let after = t.counts[d as usize] + 1;
                if after.saturating_sub(view.mins[ti]) > s.max_skew {
                    return Err(Rejection::Spread(i));
                }
            }
        }
    }
    if let (Some(z), Some(ti)) = (&c.zones, cache.zone_topology) {
        if z.hard {
            let t = &cache.topologies[ti];
            match t.domain_of[idx] {
                None => return Err(Rejection::MissingZone),
                Some(d) if view.zones_used < z.zones && t.counts[d as usize] > 0 => {
                    return Err(Rejection::ZoneAlreadyUsed)
                }
                Some(_) => {}
            }
        }
    }
    // A host-mode port is bound on the node itself, so one holder per node (this service's
    // own tasks included); freeing resources cannot lift this, so it is not a resource reason.
    if let Some(i) = c.host_ports.iter().position(|p| e.host_ports.contains(p)) {
        return Err(Rejection::HostPortInUse(i));
    }
    resource_check(&e.used, &e.capacity, &c.demand)
}

fn resource_check(
    used: &crate::snapshot::Amounts,
    cap: &crate::snapshot::Amounts,
    d: &Demand,
) -> Result<(), Rejection> {
    let over = |u: u64, want: u64, cap: u64| want > 0 && u.saturating_add(want) > cap;
    if over(used.reserved_cpu, d.reserved_cpu, cap.reserved_cpu) {
        return Err(Rejection::InsufficientCpu);
    }
    if over(used.reserved_memory, d.reserved_memory, cap.reserved_memory) {
        return Err(Rejection::InsufficientMemory);
    }
    if over(used.limit_cpu, d.limit_cpu, cap.limit_cpu) {
        return Err(Rejection::CpuLimitOvercommit);
    }
    if over(used.limit_memory, d.limit_memory, cap.limit_memory) {
        return Err(Rejection::MemoryLimitOvercommit);
    }
    Ok(())
}

fn fraction(used: u64, cap: u64) -> f64 {
    if cap == 0 {
        1.0
    } else {
        used as f64 / cap as f64
    }
}

/// Higher is better. Also says whether the node is "clean": no penalty, every preference met.
fn score(
    e: &NodeEntry,
    idx: usize,
    pos: usize,
    cache: &ServiceCache,
    view: &PassView,
    penalty: f64,
) -> (f64, bool) {
    let c = &cache.compiled;
    let hits = cache.soft_hits[pos];
    let mut clean = penalty == 0.0 && hits == cache.soft_total;
    let mut s = -penalty * PENALTY_WEIGHT + f64::from(hits) * SOFT_WEIGHT;
    for (i, a) in c.affinities.iter().enumerate().filter(|(_, a)| !a.hard) {
        let w = f64::from(a.weight) * AFFINITY_UNIT;
        if node_has(e, idx, &a.target, &view.affinity_usage[i]) == a.attract {
            s += w;
        } else {
            s -= w;
            clean = false;
        }
    }
    for (i, sp) in c.spreads.iter().enumerate() {
        let ti = cache.spread_topology[i];
        let t = &cache.topologies[ti];
        s -= match t.domain_of[idx] {
            Some(d) => {
                f64::from(t.counts[d as usize] - view.mins[ti].min(t.counts[d as usize]))
                    * SPREAD_WEIGHT
            }
            // Nodes lacking the label come after every labelled one.
            None if !sp.hard => SOFT_WEIGHT,
            None => 0.0,
        };
    }
    if let (Some(z), Some(ti)) = (&c.zones, cache.zone_topology) {
        let t = &cache.topologies[ti];
        let reused = t.domain_of[idx].is_none_or(|d| t.counts[d as usize] > 0);
        if !z.hard && view.zones_used < z.zones && reused {
            s -= SOFT_WEIGHT;
            clean = false;
        }
    }
    let d = &c.demand;
    let load = (fraction(
        e.used.reserved_cpu + d.reserved_cpu,
        e.capacity.reserved_cpu,
    ) + fraction(
        e.used.reserved_memory + d.reserved_memory,
        e.capacity.reserved_memory,
    )) / 2.0;
    if let Some(image) = c.image.as_deref() {
        if e.images.contains_key(image) || e.node.images.iter().any(|i| i == image) {
            s += IMAGE_WEIGHT;
        }
    }
    match c.strategy {
        PlacementStrategy::Spread => {
            s -= f64::from(view.own_count(idx)) * SERVICE_COUNT_WEIGHT + load * LOAD_WEIGHT;
        }
        PlacementStrategy::Binpack => s += load * SERVICE_COUNT_WEIGHT,
    }
    (s, clean)
}

type Explained = (usize, BTreeMap<String, usize>);

fn decide(
    snap: &ClusterSnapshot,
    cache: &ServiceCache,
    pin: Option<usize>,
) -> Result<Decision, Explained> {
    let c = &cache.compiled;
    let view = PassView::of(snap, cache);
    let total = if pin.is_some() { 1 } else { snap.nodes.len() };
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let note = |counts: &mut BTreeMap<String, usize>, r: Rejection, n: usize| {
        *counts.entry(r.describe(c)).or_insert(0) += n;
    };

    // Positions in `cache.eligible` to consider.
    let positions: Vec<usize>;
    let walk: Box<dyn Iterator<Item = usize>> = match pin {
        Some(idx) => match cache.eligible.binary_search(&idx) {
            Ok(pos) => {
                positions = vec![pos];
                Box::new(positions.iter().copied())
            }
            Err(_) => {
                if let Err(r) = static_check(snap.nodes[idx].node, c) {
                    note(&mut counts, r, 1);
                }
                return Err((total, counts));
            }
        },
        None => {
            for (r, n) in &cache.static_rejections {
                note(&mut counts, *r, *n);
            }
            if let (Some(z), Some(ti)) = (&c.zones, cache.zone_topology) {
                let t = &cache.topologies[ti];
                let reachable = t.eligible_domains();
                if z.hard && view.zones_used < z.zones && reachable < z.zones {
                    counts.insert(
                        format!(
                            "violate {} (only {reachable} zones have eligible nodes)",
                            z.expr
                        ),
                        cache.eligible.len(),
                    );
                    return Err((total, counts));
                }
            }
            let seed = fnv1a(&c.service) ^ snap.placements_made.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            Box::new(Walk::new(cache.eligible.len(), &mut XorShift::new(seed)))
        }
    };

    let penalties = snap.penalties(&c.service);
    let limit = candidate_limit(cache.eligible.len());
    let mut best: Option<(f64, usize)> = None;
    let (mut clean_seen, mut feasible) = (0, 0);
    let mut dynamic: Vec<(Rejection, usize)> = Vec::new();
    let mut resource_blocked = Vec::new();
    for pos in walk {
        let idx = cache.eligible[pos];
        let e = &snap.nodes[idx];
        if let Err(r) = dynamic_check(e, idx, cache, &view) {
            match dynamic.iter_mut().find(|(k, _)| *k == r) {
                Some((_, n)) => *n += 1,
                None => dynamic.push((r, 1)),
            }
            if r.is_resource() && c.priority > 0 {
                resource_blocked.push(idx);
            }
            continue;
        }
        feasible += 1;
        let penalty = penalties
            .and_then(|p| p.get(&idx))
            .map(|p| p.at(snap.now))
            .filter(|p| *p >= PENALTY_FLOOR)
            .unwrap_or(0.0);
        let (s, clean) = score(e, idx, pos, cache, &view, penalty);
        if best.is_none_or(|(b, _)| s > b) {
            best = Some((s, idx));
        }
        clean_seen += usize::from(clean);
        if clean_seen >= limit || feasible >= limit * MAX_SKIP_FACTOR {
            break;
        }
    }
    if let Some((_, node)) = best {
        return Ok(Decision {
            node,
            evictions: Vec::new(),
        });
    }
    if let Some(decision) = preempt(snap, c, &resource_blocked) {
        return Ok(decision);
    }
    for (r, n) in dynamic {
        note(&mut counts, r, n);
    }
    Err((total, counts))
}

/// The node where evicting strictly lower-priority tasks makes room with the fewest evictions
/// (then the lowest evicted priorities), within each victim service's disruption budget.
fn preempt(snap: &ClusterSnapshot, c: &CompiledPlacement, blocked: &[usize]) -> Option<Decision> {
    let mut best: Option<((usize, u32, u64), Decision)> = None;
    for &idx in blocked {
        let e = &snap.nodes[idx];
        let mut victims: Vec<usize> = (0..e.residents.len())
            .filter(|&r| e.residents[r].priority < c.priority)
            .collect();
        // Lowest priority first; among equals the largest first, so fewer tasks are needed.
        victims.sort_by(|&a, &b| {
            let (ra, rb) = (&e.residents[a], &e.residents[b]);
            ra.priority
                .cmp(&rb.priority)
                .then(rb.demand.reserved_memory.cmp(&ra.demand.reserved_memory))
                .then(rb.demand.reserved_cpu.cmp(&ra.demand.reserved_cpu))
        });
        let mut used = e.used;
        let mut taken: HashMap<&str, usize> = HashMap::new();
        let mut chosen = Vec::new();
        for r in victims {
            if resource_check(&used, &e.capacity, &c.demand).is_ok() {
                break;
            }
            let res = &e.residents[r];
            let n = taken.entry(res.service).or_insert(0);
            if *n >= snap.budget(res.service) {
                continue;
            }
            *n += 1;
            used.sub_demand(&res.demand);
            chosen.push(r);
        }
        if chosen.is_empty() || resource_check(&used, &e.capacity, &c.demand).is_err() {
            continue;
        }
        let key = (
            chosen.len(),
            chosen
                .iter()
                .map(|&r| e.residents[r].priority)
                .max()
                .unwrap_or(0),
            chosen
                .iter()
                .map(|&r| u64::from(e.residents[r].priority))
                .sum(),
        );
        if best.as_ref().is_none_or(|(k, _)| key < *k) {
            best = Some((
                key,
                Decision {
                    node: idx,
                    evictions: chosen,
                },
            ));
        }
    }
    best.map(|(_, d)| d)
}
