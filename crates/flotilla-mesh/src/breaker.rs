//! Per-backend circuit breaker: closed → open → half-open probe → closed, with exponential
//! backoff between probes.

use crate::metrics::BreakerState;
use flotilla_types::mesh::BreakerSpec;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest an open breaker waits before probing again.
const MAX_OPEN_FOR: Duration = Duration::from_secs(300);

#[derive(Debug)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    /// One probe request may go through; `probing` is set while it is in flight.
    HalfOpen {
        probing: bool,
    },
}

#[derive(Debug)]
struct Inner {
    spec: BreakerSpec,
    phase: Phase,
    consecutive_failures: u32,
    /// Outcomes of the last `window_requests` requests (true = success).
    window: VecDeque<bool>,
    /// Times the breaker re-opened since it was last closed; drives the backoff.
    reopenings: u32,
}

/// What [`Breaker::acquire`] granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Normal traffic.
    Normal,
    /// The single half-open probe; its outcome decides whether the breaker closes.
    Probe,
}

#[derive(Debug)]
pub struct Breaker {
    inner: Mutex<Inner>,
    /// Mirrors `phase == Closed` (written under the lock), so checking and admitting a request
    /// to a closed breaker (nearly every request) takes no lock. A request admitted just as the
    /// breaker opens is the same as one admitted just before: `record` ignores its outcome.
    closed: AtomicBool,
}

impl Breaker {
    pub fn new(spec: BreakerSpec) -> Self {
        Breaker {
            inner: Mutex::new(Inner {
                spec,
                phase: Phase::Closed,
                consecutive_failures: 0,
                window: VecDeque::new(),
                reopenings: 0,
            }),
            closed: AtomicBool::new(true),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves only counters behind; keep using them.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a new spec (after `Mesh::apply`) without resetting the state.
    pub fn set_spec(&self, spec: &BreakerSpec) {
        self.lock().spec = spec.clone();
    }

    pub fn state(&self) -> BreakerState {
        let inner = self.lock();
        match inner.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if Instant::now() >= until => BreakerState::HalfOpen,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a request could be sent now, without claiming the half-open probe.
    pub fn would_allow(&self) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return true;
        }
        let inner = self.lock();
        match inner.phase {
            Phase::Closed => true,
            Phase::Open { until } => Instant::now() >= until,
            Phase::HalfOpen { probing } => !probing,
        }
    }

    /// Claims the right to send one request, or `None` while open.
    pub fn acquire(&self) -> Option<Permit> {
        if self.closed.load(Ordering::Relaxed) {
            return Some(Permit::Normal);
        }
        let mut inner = self.lock();
        match inner.phase {
            Phase::Closed => Some(Permit::Normal),
            Phase::Open { until } if Instant::now() >= until => {
                inner.phase = Phase::HalfOpen { probing: true };
                Some(Permit::Probe)
            }
            Phase::Open { .. } => None,
            Phase::HalfOpen { probing: false } => {
                inner.phase = Phase::HalfOpen { probing: true };
                Some(Permit::Probe)
            }
            Phase::HalfOpen { probing: true } => None,
        }
    }

    /// Records the outcome of a request sent under `permit`.
    pub fn record(&self, permit: Permit, success: bool) {
        let mut inner = self.lock();
        record_locked(&mut inner, permit, success);
        self.closed
            .store(matches!(inner.phase, Phase::Closed), Ordering::Relaxed);
    }

    /// Releases a probe permit whose request never reached the backend (so it proved nothing).
    pub fn release(&self, permit: Permit) {
        if permit == Permit::Probe {
            let mut inner = self.lock();
            if matches!(inner.phase, Phase::HalfOpen { probing: true }) {
                inner.phase = Phase::HalfOpen { probing: false };
            }
        }
    }
}

/// [`Breaker::record`] under its lock.
fn record_locked(inner: &mut Inner, permit: Permit, success: bool) {
    if permit == Permit::Probe {
        if success {
            inner.phase = Phase::Closed;
            inner.reopenings = 0;
            inner.consecutive_failures = 0;
            inner.window.clear();
        } else {
            inner.reopenings = inner.reopenings.saturating_add(1);
            open(inner);
        }
        return;
    }
    if !matches!(inner.phase, Phase::Closed) {
        // A request admitted before the breaker opened; the probe decides from here.
        return;
    }
    let window_len = inner.spec.window_requests.max(1) as usize;
    inner.window.push_back(success);
    while inner.window.len() > window_len {
        inner.window.pop_front();
    }
    if success {
        inner.consecutive_failures = 0;
        return;
    }
    inner.consecutive_failures += 1;
    let successes = inner.window.iter().filter(|ok| **ok).count();
    let rate_too_low = inner.window.len() == window_len
        && successes * 100 < usize::from(inner.spec.min_success_percent) * window_len;
    if inner.consecutive_failures >= inner.spec.consecutive_failures.max(1) || rate_too_low {
        open(inner);
    }
}

fn open(inner: &mut Inner) {
    let factor = 1u32
        .checked_shl(inner.reopenings.min(16))
        .unwrap_or(u32::MAX);
    let open_for = inner
        .spec
        .open_for
        .checked_mul(factor)
        .unwrap_or(MAX_OPEN_FOR)
        .min(MAX_OPEN_FOR);
    inner.phase = Phase::Open {
        until: Instant::now() + open_for,
    };
    inner.consecutive_failures = 0;
    inner.window.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(open_for: Duration) -> BreakerSpec {
        BreakerSpec {
            consecutive_failures: 3,
            min_success_percent: 50,
            window_requests: 10,
            open_for,
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_recovers_through_probe() {
        let b = Breaker::new(spec(Duration::ZERO));
        for _ in 0..2 {
            let p = b.acquire().unwrap();
            b.record(p, false);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        let p = b.acquire().unwrap();
        b.record(p, false);
        // open_for is zero, so the breaker is immediately due for a probe.
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.acquire().unwrap();
        assert_eq!(probe, Permit::Probe);
        assert!(b.acquire().is_none(), "only one probe at a time");
        b.record(probe, true);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn stays_open_until_its_backoff_passes() {
        let b = Breaker::new(spec(Duration::from_secs(3600)));
        for _ in 0..3 {
            let p = b.acquire().unwrap();
            b.record(p, false);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.acquire().is_none());
        assert!(!b.would_allow());
    }

    #[test]
    fn opens_on_low_success_rate() {
        let b = Breaker::new(spec(Duration::from_secs(3600)));
        // Alternating failures never reach 3 in a row but give a 40% success rate.
        for ok in [
            true, false, false, true, false, false, true, false, true, false,
        ] {
            let p = b.acquire().unwrap();
            b.record(p, ok);
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn failed_probe_reopens_and_released_probe_can_be_retried() {
        let b = Breaker::new(spec(Duration::ZERO));
        for _ in 0..3 {
            let p = b.acquire().unwrap();
            b.record(p, false);
        }
        let probe = b.acquire().unwrap();
        b.release(probe);
        let probe = b.acquire().unwrap();
        assert_eq!(probe, Permit::Probe);
        b.record(probe, false);
        assert_eq!(b.lock().reopenings, 1);
    }
}
