//! How a service's new revisions replace old ones (`deploy.update_config`, `x-flotilla.strategy`).

use crate::release::{BlueGreenSpec, CanarySpec, Strategy, UpdateConfig};
use serde::{Deserialize, Serialize};

/// Release settings of a service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// How many tasks voluntary disruptions (node drains) may take away at once
    /// (`x-flotilla.disruption`).
    #[serde(default, skip_serializing_if = "DisruptionBudget::is_default")]
    pub disruption: DisruptionBudget,
    /// `deploy.update_config`.
    #[serde(default, skip_serializing_if = "UpdateConfig::is_default")]
    pub update: UpdateConfig,
    /// `deploy.rollback_config`: how an automatic rollback replaces the failed tasks.
    #[serde(default, skip_serializing_if = "UpdateConfig::is_default")]
    pub rollback: UpdateConfig,
    /// `x-flotilla.strategy`.
    #[serde(default, skip_serializing_if = "is_rolling")]
    pub strategy: Strategy,
    /// `x-flotilla.blue_green`.
    #[serde(default, skip_serializing_if = "BlueGreenSpec::is_default")]
    pub blue_green: BlueGreenSpec,
    /// `x-flotilla.canary`.
    #[serde(default, skip_serializing_if = "CanarySpec::is_default")]
    pub canary: CanarySpec,
}

fn is_rolling(s: &Strategy) -> bool {
    *s == Strategy::Rolling
}

impl RolloutSpec {
    pub fn is_default(&self) -> bool {
        *self == RolloutSpec::default()
    }
}

/// A service's disruption budget: how many of its replicas may be unavailable, or in the middle
/// of moving, at once while nodes are drained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisruptionBudget {
    /// `None`: 1 or 25% of the replicas, whichever is larger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<MaxUnavailable>,
}

/// `x-flotilla.disruption.max_unavailable`: a task count or a percentage of the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaxUnavailable {
    /// At least 1.
    Count(u64),
    /// 1..=100, rounded down but never below one task.
    Percent(u8),
}

/// Share of the replicas the default budget allows, in percent.
const DEFAULT_PERCENT: u64 = 25;

impl DisruptionBudget {
    pub fn is_default(&self) -> bool {
        *self == DisruptionBudget::default()
    }

    /// How many of `replicas` tasks may be unavailable at once. Never 0: a budget of zero would
    /// make every drain wait forever.
    pub fn allowed(&self, replicas: u64) -> u64 {
        let by_percent = |p: u64| replicas.saturating_mul(p) / 100;
        let n = match self.max_unavailable {
            None => by_percent(DEFAULT_PERCENT),
            Some(MaxUnavailable::Count(n)) => n,
            Some(MaxUnavailable::Percent(p)) => by_percent(u64::from(p)),
        };
        n.max(1)
    }

    /// Checks the budget's bounds; the error names the field below `x-flotilla.disruption`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        match self.max_unavailable {
            Some(MaxUnavailable::Count(0)) => Err((
                "max_unavailable",
                "must be at least 1 (0 would block every drain)".into(),
            )),
            Some(MaxUnavailable::Percent(p)) if p == 0 || p > 100 => {
                Err(("max_unavailable", format!("{p}% is outside 1%..=100%")))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_budget_is_one_or_a_quarter() {
        let b = DisruptionBudget::default();
        assert_eq!(b.allowed(0), 1);
        assert_eq!(b.allowed(3), 1);
        assert_eq!(b.allowed(4), 1);
        assert_eq!(b.allowed(8), 2);
        assert_eq!(b.allowed(100), 25);
    }

    #[test]
    fn explicit_budgets() {
        let count = DisruptionBudget {
            max_unavailable: Some(MaxUnavailable::Count(3)),
        };
        assert_eq!(count.allowed(10), 3);
        let pct = DisruptionBudget {
            max_unavailable: Some(MaxUnavailable::Percent(50)),
        };
        assert_eq!(pct.allowed(10), 5);
        assert_eq!(pct.allowed(1), 1, "rounds down but never to zero");
    }

    #[test]
    fn out_of_range_budgets_are_rejected() {
        for bad in [
            MaxUnavailable::Count(0),
            MaxUnavailable::Percent(0),
            MaxUnavailable::Percent(101),
        ] {
            let b = DisruptionBudget {
                max_unavailable: Some(bad),
            };
            assert_eq!(b.validate().map_err(|e| e.0), Err("max_unavailable"));
        }
        assert!(DisruptionBudget::default().validate().is_ok());
    }
}
