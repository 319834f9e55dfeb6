//! Backend choice: weighted power-of-two-choices over peak-EWMA load (as tower's `balance::p2c`
//! with `load::PeakEwma`), or smooth weighted round robin.
//!
//! Only backends that are healthy, have a weight above 0 and whose breaker lets traffic through
//! are candidates. Weights are shares of traffic under both balancers. Round robin meets them
//! exactly. P2C splits the choice in two: the first candidate is drawn by weight from a
//! low-discrepancy sequence, so every class (the backends of one version sharing one weight,
//! e.g. a canary's tasks at a step) gets exactly its share; the second is a random backend of
//! the same class, and the clearly less loaded of the two wins. Load only moves traffic within
//! a class, never between a canary and the old version.

use crate::breaker::{Breaker, Permit};
use crate::metrics::{Counters, TaskStats};
use flotilla_types::mesh::{BalancerKind, BreakerSpec};
use rand::Rng;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How fast old latency samples stop mattering.
const DECAY: Duration = Duration::from_secs(10);
/// Loads closer than this ratio count as equal and the choice between the two candidates is a
/// coin flip, so latency jitter between identical tasks does not decide every pick; clearly
/// slower or busier tasks still lose.
const LOAD_TIE_RATIO: f64 = 1.25;
/// 2^64 divided by the golden ratio: `k * GOLDEN` (wrapping) is the Weyl sequence `k / phi mod
/// 1` scaled to 64 bits, which spreads any prefix of picks over `0..total` almost evenly.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

#[derive(Debug)]
struct PeakEwma {
    /// Estimated round trip, in nanoseconds; meaningful once `sampled`.
    estimate_ns: f64,
    stamp: Instant,
    sampled: bool,
}

impl PeakEwma {
    /// Decays the estimate for the time passed since the last update.
    fn decayed(&mut self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
        let decay = (-elapsed / DECAY.as_nanos() as f64).exp();
        self.estimate_ns *= decay;
        self.stamp = now;
        self.estimate_ns
    }

    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt_ns = rtt.as_nanos() as f64;
        let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
        if !self.sampled || rtt_ns > self.estimate_ns {
            self.sampled = true;
            // Peak sensitivity: a slow response raises the estimate at once.
            self.estimate_ns = rtt_ns;
        } else {
            let decay = (-elapsed / DECAY.as_nanos() as f64).exp();
            self.estimate_ns = self.estimate_ns * decay + rtt_ns * (1.0 - decay);
        }
        self.stamp = now;
    }
}

/// One task's address and everything the mesh knows about it. Kept across route updates (keyed
/// by service, task and address) so counters, breaker and in-flight counts survive them.
#[derive(Debug)]
pub struct BackendState {
    pub service: String,
    pub task_id: String,
    pub addr: SocketAddr,
    /// `addr` as a URI authority, built once instead of per request.
    pub authority: hyper::http::uri::Authority,
    weight: AtomicU8,
    healthy: AtomicBool,
    /// Runs the service's current template: with the weight, the backend's balancing class.
    current: AtomicBool,
    in_flight: AtomicU64,
    ewma: Mutex<PeakEwma>,
    pub breaker: Breaker,
    pub counters: Counters,
}

impl BackendState {
    pub fn new(service: &str, task_id: &str, addr: SocketAddr, breaker: &BreakerSpec) -> Self {
        // A socket address always renders as a valid `host:port` authority.
        let authority = hyper::http::uri::Authority::try_from(addr.to_string())
            .expect("a socket address is a valid authority");
        BackendState {
            service: service.to_string(),
            task_id: task_id.to_string(),
            addr,
            authority,
            weight: AtomicU8::new(100),
            healthy: AtomicBool::new(false),
            current: AtomicBool::new(true),
            in_flight: AtomicU64::new(0),
            ewma: Mutex::new(PeakEwma {
                estimate_ns: 0.0,
                stamp: Instant::now(),
                sampled: false,
            }),
            breaker: Breaker::new(breaker.clone()),
            counters: Counters::default(),
        }
    }

    pub fn set(&self, weight: u8, healthy: bool) {
        self.weight.store(weight.min(100), Ordering::Relaxed);
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn set_current(&self, current: bool) {
        self.current.store(current, Ordering::Relaxed);
    }

    pub fn weight(&self) -> u8 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Takes new traffic: healthy, weighted, breaker not open.
    fn eligible(&self) -> bool {
        self.weight() > 0 && self.eligible_at_any_weight()
    }

    /// Healthy and breaker not open, whatever its weight (canary-matched requests).
    fn eligible_at_any_weight(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.breaker.would_allow()
    }

    /// The decayed round-trip estimate, `None` before the first sample.
    fn rtt_estimate(&self) -> Option<f64> {
        let now = Instant::now();
        let mut ewma = self.ewma.lock().ok()?;
        ewma.sampled.then(|| ewma.decayed(now))
    }

    /// Records a round trip (time to response headers, or to connect for TCP).
    pub fn observe(&self, rtt: Duration) {
        if let Ok(mut e) = self.ewma.lock() {
            e.observe(rtt, Instant::now());
        }
        self.counters.latency.record(rtt);
    }

    pub fn stats(&self) -> TaskStats {
        TaskStats {
            task_id: self.task_id.clone(),
            addr: self.addr.to_string(),
            weight: self.weight(),
            healthy: self.healthy.load(Ordering::Relaxed),
            breaker: self.breaker.state(),
            requests: self.counters.requests.load(Ordering::Relaxed),
            connections: self.counters.connections.load(Ordering::Relaxed),
            errors: self.counters.errors(),
            latency: self.counters.latency.summary(),
            in_flight: self.in_flight(),
        }
    }
}

/// Counts one request or connection as in flight on a backend until dropped.
#[derive(Debug)]
pub struct InFlight {
    backend: Arc<BackendState>,
}

impl InFlight {
    pub fn new(backend: Arc<BackendState>) -> Self {
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { backend }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The right to send one request or connection to a backend, granted by its breaker. Settle it
/// with the outcome; dropping it unsettled (the client went away) returns a half-open probe
/// unused so the breaker can probe again.
#[derive(Debug)]
pub struct Attempt {
    pub backend: Arc<BackendState>,
    permit: Permit,
    settled: bool,
}

impl Attempt {
    fn new(backend: Arc<BackendState>, permit: Permit) -> Self {
        Attempt {
            backend,
            permit,
            settled: false,
        }
    }

    pub fn settle(mut self, success: bool) {
        self.settled = true;
        self.backend.breaker.record(self.permit, success);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.settled {
            self.backend.breaker.release(self.permit);
        }
    }
}

/// The backends of one service on one published port.
#[derive(Debug)]
pub struct Pool {
    backends: Vec<Arc<BackendState>>,
    kind: BalancerKind,
    /// Every backend counts as weight 100, including weight 0 (a canary's matched requests
    /// reach it at any step).
    unweighted: bool,
    /// Smooth weighted round robin's running scores, one per backend.
    round_robin: Mutex<Vec<i64>>,
    /// How many first P2C candidates were drawn (the index into the Weyl sequence).
    draws: AtomicU64,
}

impl Pool {
    pub fn new(backends: Vec<Arc<BackendState>>, kind: BalancerKind) -> Self {
        let scores = vec![0; backends.len()];
        Pool {
            backends,
            kind,
            unweighted: false,
            round_robin: Mutex::new(scores),
            draws: AtomicU64::new(0),
        }
    }

    /// A pool that ignores the backends' weights.
    pub fn unweighted(backends: Vec<Arc<BackendState>>, kind: BalancerKind) -> Self {
        Pool {
            unweighted: true,
            ..Pool::new(backends, kind)
        }
    }

    fn takes(&self, b: &BackendState) -> bool {
        if self.unweighted {
            b.eligible_at_any_weight()
        } else {
            b.eligible()
        }
    }

    fn weight_of(&self, b: &BackendState) -> u8 {
        if self.unweighted {
            100
        } else {
            b.weight()
        }
    }

    /// Backends of one class share traffic by load; classes share it by weight.
    fn class_of(&self, b: &BackendState) -> (u8, bool) {
        (self.weight_of(b), b.current.load(Ordering::Relaxed))
    }

    /// How many backends the pool has, whether or not they take traffic now.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// The backend of `task_id` if it may take a new request (cookie stickiness).
    pub fn sticky(&self, task_id: &str) -> Option<Attempt> {
        let backend = self
            .backends
            .iter()
            .find(|b| b.task_id == task_id && self.takes(b))?;
        let permit = backend.breaker.acquire()?;
        Some(Attempt::new(backend.clone(), permit))
    }

    /// Chooses a backend not in `tried`, claiming a breaker permit for it. `None` when no
    /// backend can take traffic. Allocates nothing unless a breaker refuses its chosen backend
    /// (it changed since the eligibility check, e.g. its probe was just claimed).
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Attempt> {
        let mut refused: Vec<SocketAddr> = Vec::new();
        loop {
            let candidate = |b: &BackendState| {
                !tried.contains(&b.addr) && !refused.contains(&b.addr) && self.takes(b)
            };
            let chosen = match self.kind {
                BalancerKind::P2c => self.p2c(candidate),
                BalancerKind::RoundRobin => self.round_robin(candidate),
            }?;
            if let Some(permit) = chosen.breaker.acquire() {
                return Some(Attempt::new(chosen.clone(), permit));
            }
            refused.push(chosen.addr);
        }
    }

    /// Smooth weighted round robin (as nginx's) over the backends `candidate` accepts.
    fn round_robin(&self, candidate: impl Fn(&BackendState) -> bool) -> Option<&Arc<BackendState>> {
        let Ok(mut scores) = self.round_robin.lock() else {
            return self.backends.iter().find(|b| candidate(b));
        };
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (slot, b) in self.backends.iter().enumerate() {
            if !candidate(b) {
                continue;
            }
            let weight = i64::from(self.weight_of(b));
            total += weight;
            scores[slot] += weight;
            if best.is_none_or(|best| scores[slot] > scores[best]) {
                best = Some(slot);
            }
        }
        let best = best?;
        scores[best] -= total;
        Some(&self.backends[best])
    }

    /// The backend holding `ticket` (in `0..total weight`) among those `candidate` accepts;
    /// the last one when eligibility changed since the total was taken.
    fn by_ticket(
        &self,
        candidate: &impl Fn(&BackendState) -> bool,
        mut ticket: u32,
    ) -> Option<&Arc<BackendState>> {
        let mut last = None;
        for b in self.backends.iter().filter(|b| candidate(b)) {
            let w = u32::from(self.weight_of(b));
            if ticket < w {
                return Some(b);
            }
            ticket -= w;
            last = Some(b);
        }
        last
    }

    /// Power of two choices: the first candidate drawn by weight, the second a random one of its
    /// class (same version and weight), the clearly less loaded wins.
    fn p2c(&self, candidate: impl Fn(&BackendState) -> bool) -> Option<&Arc<BackendState>> {
        let total: u32 = self
            .backends
            .iter()
            .filter(|b| candidate(b))
            .map(|b| u32::from(self.weight_of(b)))
            .sum();
        let first = self.by_ticket(&candidate, self.next_ticket(total))?;
        let class = self.class_of(first);
        let peer = |b: &BackendState| candidate(b) && self.class_of(b) == class;
        let peers = self.backends.iter().filter(|b| peer(b)).count();
        if peers <= 1 {
            return Some(first);
        }
        let mut rng = rand::rng();
        let nth = rng.random_range(0..peers);
        let second = self.backends.iter().filter(|b| peer(b)).nth(nth)?;
        let (cost_first, cost_second) = costs(first, second);
        Some(if cost_first * LOAD_TIE_RATIO < cost_second {
            first
        } else if cost_second * LOAD_TIE_RATIO < cost_first {
            second
        } else if rng.random_bool(0.5) {
            first
        } else {
            second
        })
    }

    /// The next ticket in `0..total` from the golden-ratio Weyl sequence: over any run of
    /// picks each weight's share of tickets is its share of `total`, off by a handful of picks
    /// at most, without a lock.
    fn next_ticket(&self, total: u32) -> u32 {
        let draw = self
            .draws
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(GOLDEN);
        // The high 64 bits of a 64x32-bit product are below `total`.
        ((u128::from(draw) * u128::from(total)) >> 64) as u32
    }
}

/// The loads of two backends, comparable with each other: round-trip estimate times requests
/// in flight (plus the new one), or only the latter while either has no round trip measured
/// yet, so a just-started task is neither flooded nor starved behind a default estimate.
fn costs(a: &BackendState, b: &BackendState) -> (f64, f64) {
    let pending = |x: &BackendState| (x.in_flight() + 1) as f64;
    match (a.rtt_estimate(), b.rtt_estimate()) {
        (Some(rtt_a), Some(rtt_b)) => (rtt_a * pending(a), rtt_b * pending(b)),
        _ => (pending(a), pending(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(port: u16, weight: u8) -> Arc<BackendState> {
        let b = BackendState::new(
            "svc",
            &format!("t{port}"),
            SocketAddr::from(([127, 0, 0, 1], port)),
            &BreakerSpec::default(),
        );
        b.set(weight, true);
        Arc::new(b)
    }

    fn shares(kind: BalancerKind, weights: &[u8], picks: usize) -> Vec<usize> {
        let backends: Vec<_> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| backend(1000 + i as u16, *w))
            .collect();
        let pool = Pool::new(backends.clone(), kind);
        let mut counts = vec![0; weights.len()];
        for _ in 0..picks {
            let attempt = pool.pick(&[]).unwrap();
            counts[usize::from(attempt.backend.addr.port() - 1000)] += 1;
        }
        counts
    }

    #[test]
    fn weight_zero_gets_nothing_and_weights_shape_the_split() {
        for kind in [BalancerKind::P2c, BalancerKind::RoundRobin] {
            let counts = shares(kind, &[100, 0, 25], 2000);
            assert_eq!(counts[1], 0, "{kind:?} {counts:?}");
            assert!(
                counts[2] > 0 && counts[0] > 2 * counts[2],
                "{kind:?} {counts:?}"
            );
        }
        assert_eq!(shares(BalancerKind::RoundRobin, &[50, 50], 10), [5, 5]);
    }

    /// Picks `picks` times; how many landed on a backend `current` accepts, in percent.
    fn share_of(pool: &Pool, picks: usize, current: impl Fn(&BackendState) -> bool) -> f64 {
        let hits = (0..picks)
            .filter(|_| current(&pool.pick(&[]).unwrap().backend))
            .count();
        hits as f64 * 100.0 / picks as f64
    }

    /// Equal-latency tasks under concurrency: each has requests in flight in proportion to its
    /// weight; the old ones have measured round trips, the canary's are fresh.
    #[test]
    fn p2c_gives_a_canary_its_weight_whatever_the_load_of_either_version() {
        for weight in [10u8, 25, 50, 90] {
            let old: Vec<_> = (1..=2).map(|port| backend(port, 100 - weight)).collect();
            for b in &old {
                b.set_current(false);
                b.observe(Duration::from_millis(1));
            }
            let new: Vec<_> = (3..=4).map(|port| backend(port, weight)).collect();
            let all = [old, new].concat();
            let _busy: Vec<_> = all
                .iter()
                .flat_map(|b| (0..b.weight() / 10).map(|_| InFlight::new(b.clone())))
                .collect();
            let pool = Pool::new(all, BalancerKind::P2c);
            let share = share_of(&pool, 10_000, |b| b.current.load(Ordering::Relaxed));
            assert!(
                (share - f64::from(weight)).abs() <= 1.0,
                "weight {weight}: {share:.2}%"
            );
        }
    }

    #[test]
    fn load_moves_traffic_within_a_version_but_not_across_versions() {
        let slow = backend(1, 75);
        let fast = backend(2, 75);
        for b in [&slow, &fast] {
            b.set_current(false);
        }
        slow.observe(Duration::from_millis(500));
        fast.observe(Duration::from_millis(1));
        let _busy: Vec<_> = (0..5).map(|_| InFlight::new(slow.clone())).collect();
        let canary = backend(3, 25);
        canary.observe(Duration::from_millis(900));
        let pool = Pool::new(vec![slow.clone(), fast, canary], BalancerKind::P2c);
        let share = share_of(&pool, 10_000, |b| b.current.load(Ordering::Relaxed));
        // 25 of 25 + 75 + 75, however slow or busy either side is.
        assert!((share - 100.0 / 7.0).abs() <= 1.0, "{share:.2}%");
        // The slow one wins only when both candidates are it: a quarter of the old side's 6/7.
        let slow_share = share_of(&pool, 10_000, |b| b.addr == slow.addr);
        assert!(slow_share < 30.0, "{slow_share:.2}%");
    }

    #[test]
    fn p2c_prefers_the_less_loaded_backend() {
        let slow = backend(1, 100);
        let fast = backend(2, 100);
        slow.observe(Duration::from_millis(500));
        fast.observe(Duration::from_millis(1));
        let _busy: Vec<_> = (0..5).map(|_| InFlight::new(slow.clone())).collect();
        let pool = Pool::new(vec![slow, fast.clone()], BalancerKind::P2c);
        let fast_picks = (0..200)
            .filter(|_| pool.pick(&[]).unwrap().backend.addr == fast.addr)
            .count();
        // The slow one wins only when both samples land on it (about a quarter of the time).
        assert!(fast_picks > 100, "{fast_picks}");
    }

    #[test]
    fn an_unweighted_pool_takes_weight_zero_backends() {
        let canary = backend(1, 0);
        let sick = backend(2, 100);
        sick.set(100, false);
        let weighted = Pool::new(vec![canary.clone(), sick.clone()], BalancerKind::P2c);
        assert!(weighted.pick(&[]).is_none());
        let pool = Pool::unweighted(vec![canary.clone(), sick], BalancerKind::RoundRobin);
        for _ in 0..10 {
            assert_eq!(pool.pick(&[]).unwrap().backend.addr, canary.addr);
        }
    }

    #[test]
    fn unhealthy_and_tried_backends_are_skipped() {
        let a = backend(1, 100);
        let b = backend(2, 100);
        b.set(100, false);
        let pool = Pool::new(vec![a.clone(), b], BalancerKind::P2c);
        assert_eq!(pool.pick(&[]).unwrap().backend.addr, a.addr);
        assert!(pool.pick(&[a.addr]).is_none());
    }
}
