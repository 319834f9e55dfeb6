//! Backend choice: weighted power-of-two-choices over peak-EWMA load (as tower's `balance::p2c`
//! with `load::PeakEwma`), or smooth weighted round robin.
//!
//! Only backends that are healthy, have a weight above 0 and whose breaker lets traffic through
//! are candidates. Both candidates of P2C are sampled in proportion to their weight, and the
//! clearly less loaded one wins; with (nearly) equal load each backend's share is its weight's
//! share.

use crate::breaker::{Breaker, Permit};
use crate::metrics::{Counters, TaskStats};
use flotilla_types::mesh::{BalancerKind, BreakerSpec};
use rand::Rng;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// RTT assumed for a backend with no samples yet: pessimistic, so a new task is not flooded
/// before it has shown how fast it is (linkerd uses the same default).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast old latency samples stop mattering.
const DECAY: Duration = Duration::from_secs(10);
/// Loads closer than this ratio count as equal and the choice between the two candidates is a
/// coin flip. Without it, latency jitter between identical tasks would decide every pick and
/// bend the split away from the weights (a weight-10 canary that happens to be a little faster
/// would get almost 20% of the traffic); with it, weights hold while clearly slower or busier
/// tasks still lose.
const LOAD_TIE_RATIO: f64 = 1.25;

#[derive(Debug)]
struct PeakEwma {
    /// Estimated round trip, in nanoseconds.
    estimate_ns: f64,
    stamp: Instant,
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
        if rtt_ns > self.estimate_ns {
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
            in_flight: AtomicU64::new(0),
            ewma: Mutex::new(PeakEwma {
                estimate_ns: DEFAULT_RTT.as_nanos() as f64,
                stamp: Instant::now(),
            }),
            breaker: Breaker::new(breaker.clone()),
            counters: Counters::default(),
        }
    }

    pub fn set(&self, weight: u8, healthy: bool) {
        self.weight.store(weight.min(100), Ordering::Relaxed);
        self.healthy.store(healthy, Ordering::Relaxed);
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

    fn load(&self) -> f64 {
        let now = Instant::now();
        let estimate = self
            .ewma
            .lock()
            .map(|mut e| e.decayed(now))
            .unwrap_or(DEFAULT_RTT.as_nanos() as f64);
        estimate * (self.in_flight() + 1) as f64
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
}

impl Pool {
    pub fn new(backends: Vec<Arc<BackendState>>, kind: BalancerKind) -> Self {
        let scores = vec![0; backends.len()];
        Pool {
            backends,
            kind,
            unweighted: false,
            round_robin: Mutex::new(scores),
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

    /// Power of two choices: two candidates sampled by weight, the clearly less loaded wins.
    fn p2c(&self, candidate: impl Fn(&BackendState) -> bool) -> Option<&Arc<BackendState>> {
        let (mut count, mut total, mut only) = (0usize, 0u32, None);
        for b in self.backends.iter().filter(|b| candidate(b)) {
            count += 1;
            total += u32::from(self.weight_of(b));
            only = Some(b);
        }
        if count <= 1 {
            return only;
        }
        let mut rng = rand::rng();
        let a = self.by_ticket(&candidate, rng.random_range(0..total.max(1)))?;
        let b = self.by_ticket(&candidate, rng.random_range(0..total.max(1)))?;
        let (load_a, load_b) = (a.load(), b.load());
        Some(if load_a * LOAD_TIE_RATIO < load_b {
            a
        } else if load_b * LOAD_TIE_RATIO < load_a {
            b
        } else if rng.random_bool(0.5) {
            a
        } else {
            b
        })
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
