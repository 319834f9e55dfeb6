//! Retry budget: retries may add at most a configured percentage on top of normal traffic, so a
//! failing backend cannot multiply the load on the others.

use std::sync::atomic::{AtomicU64, Ordering};

/// One retry costs this many units; a request deposits `percent * UNIT / 100`.
const UNIT: u64 = 1000;
/// Retries that are always allowed at start, so the first failures of a quiet service retry.
const INITIAL_RETRIES: u64 = 10;
/// Most retries that can be saved up.
const MAX_SAVED_RETRIES: u64 = 1000;

#[derive(Debug)]
pub struct RetryBudget {
    percent: AtomicU64,
    balance: AtomicU64,
}

impl RetryBudget {
    pub fn new(percent: u8) -> Self {
        RetryBudget {
            percent: AtomicU64::new(u64::from(percent.min(100))),
            balance: AtomicU64::new(INITIAL_RETRIES * UNIT),
        }
    }

    pub fn set_percent(&self, percent: u8) {
        self.percent
            .store(u64::from(percent.min(100)), Ordering::Relaxed);
    }

    /// Records one original request or connection.
    pub fn deposit(&self) {
        // A healthy service keeps its budget full; checking first keeps every request on every
        // core from writing (and so bouncing) this shared counter.
        if self.balance.load(Ordering::Relaxed) >= MAX_SAVED_RETRIES * UNIT {
            return;
        }
        let amount = self.percent.load(Ordering::Relaxed) * UNIT / 100;
        // fetch_update only fails when the closure returns None, which it never does here.
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + amount).min(MAX_SAVED_RETRIES * UNIT))
            });
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_sub(UNIT)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_limited_to_the_percentage() {
        let budget = RetryBudget::new(20);
        for _ in 0..INITIAL_RETRIES {
            assert!(budget.withdraw());
        }
        assert!(!budget.withdraw());
        for _ in 0..10 {
            budget.deposit();
        }
        assert!(budget.withdraw());
        assert!(budget.withdraw());
        assert!(
            !budget.withdraw(),
            "10 requests at 20% buy exactly 2 retries"
        );
    }
}
