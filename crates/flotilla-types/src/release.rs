//! Releases: how a service moves from one revision to the next (`deploy.update_config`,
//! `deploy.rollback_config`, `x-flotilla.strategy`, `x-flotilla.blue_green`, `x-flotilla.canary`),
//! and the [`Rollout`] object the store keeps for the release in progress.

use crate::spec::FieldError;
use crate::state::{Meta, Timestamp};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A non-negative decimal kept as millionths, so specs stay `Eq` and compare exactly.
/// Serialised as a plain JSON number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Decimal(u64);

impl Decimal {
    const SCALE: f64 = 1_000_000.0;

    /// `None` for negative, non-finite or absurdly large values.
    pub fn from_f64(v: f64) -> Option<Decimal> {
        if !v.is_finite() || !(0.0..=1e12).contains(&v) {
            return None;
        }
        // In range (checked above), so the cast neither wraps nor saturates.
        Some(Decimal((v * Self::SCALE).round() as u64))
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / Self::SCALE
    }
}

impl Serialize for Decimal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.as_f64())
    }
}

impl<'de> Deserialize<'de> for Decimal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        Decimal::from_f64(v)
            .ok_or_else(|| serde::de::Error::custom(format!("{v} is not a non-negative number")))
    }
}

/// `update_config.order`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// Stop (and drain) the old task, then start its replacement.
    StopFirst,
    /// Start the replacement, wait until it counts, then drain and stop the old task. Flotilla's
    /// default (Swarm's is stop-first) because it never lowers capacity.
    #[default]
    StartFirst,
}

/// `update_config.failure_action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    #[default]
    Pause,
    Continue,
    Rollback,
}

/// Compose's `deploy.update_config` / `deploy.rollback_config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// Tasks replaced at once; 0 means all at once.
    #[serde(default = "one")]
    pub parallelism: u64,
    /// Wait between two batches.
    #[serde(default, with = "humantime_serde")]
    pub delay: Duration,
    #[serde(default)]
    pub order: UpdateOrder,
    /// A new task counts as updated only after it has been ready this long.
    #[serde(default = "default_monitor", with = "humantime_serde")]
    pub monitor: Duration,
    /// Share (0..=1) of the replicas that may fail before `failure_action` applies.
    #[serde(default)]
    pub max_failure_ratio: Decimal,
    #[serde(default)]
    pub failure_action: FailureAction,
}

fn one() -> u64 {
    1
}

fn default_monitor() -> Duration {
    Duration::from_secs(5)
}

impl Default for UpdateConfig {
    /// Swarm's defaults, except `order` (start-first).
    fn default() -> Self {
        UpdateConfig {
            parallelism: 1,
            delay: Duration::ZERO,
            order: UpdateOrder::StartFirst,
            monitor: default_monitor(),
            max_failure_ratio: Decimal::default(),
            failure_action: FailureAction::Pause,
        }
    }
}

impl UpdateConfig {
    pub fn is_default(&self) -> bool {
        *self == UpdateConfig::default()
    }

    fn validate(&self, field: &str, errs: &mut Vec<FieldError>) {
        if self.max_failure_ratio > Decimal::from_f64(1.0).unwrap_or_default() {
            errs.push(FieldError::new(
                format!("{field}.max_failure_ratio"),
                format!("{} is outside 0..=1", self.max_failure_ratio.as_f64()),
            ));
        }
    }
}

/// `x-flotilla.strategy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    #[default]
    Rolling,
    BlueGreen,
    Canary,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Rolling => "rolling",
            Strategy::BlueGreen => "blue-green",
            Strategy::Canary => "canary",
        }
    }
}

/// `x-flotilla.blue_green`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlueGreenSpec {
    /// `false` waits for `flotilla rollout promote` once green carries all traffic.
    #[serde(default = "yes")]
    pub auto_promote: bool,
    /// How long blue stays (at weight 0) after promotion, for a fast manual abort.
    #[serde(default = "default_scale_down_delay", with = "humantime_serde")]
    pub scale_down_delay: Duration,
}

fn yes() -> bool {
    true
}

fn default_scale_down_delay() -> Duration {
    Duration::from_secs(30)
}

impl Default for BlueGreenSpec {
    fn default() -> Self {
        BlueGreenSpec {
            auto_promote: true,
            scale_down_delay: default_scale_down_delay(),
        }
    }
}

impl BlueGreenSpec {
    pub fn is_default(&self) -> bool {
        *self == BlueGreenSpec::default()
    }
}

/// One `x-flotilla.canary.steps` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryStep {
    /// Share of traffic the new revision gets, 1..=100.
    pub weight: u8,
    /// How long to hold (and analyse) this step; `None` waits for `flotilla rollout promote`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub pause: Option<Duration>,
}

/// `x-flotilla.canary.analysis`: what a step must show on the mesh's metrics to go on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnalysisSpec {
    /// Lowest acceptable share of successful requests to the canary, in percent.
    #[serde(default = "default_success_rate")]
    pub success_rate: Decimal,
    /// Highest acceptable 99th-percentile latency of the canary.
    #[serde(default = "default_p99_ms")]
    pub p99_ms: u64,
    /// How often a step is analysed.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
}

fn default_success_rate() -> Decimal {
    Decimal(99_000_000)
}

fn default_p99_ms() -> u64 {
    500
}

fn default_interval() -> Duration {
    Duration::from_secs(5)
}

impl Default for AnalysisSpec {
    fn default() -> Self {
        AnalysisSpec {
            success_rate: default_success_rate(),
            p99_ms: default_p99_ms(),
            interval: default_interval(),
        }
    }
}

/// `x-flotilla.canary`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanarySpec {
    /// Empty means one step straight to 100%.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<CanaryStep>,
    #[serde(default)]
    pub analysis: AnalysisSpec,
    /// `x-flotilla.canary.match`: HTTP requests that always go to the canary (the tasks of
    /// the new revision), whatever the step's weight, so chosen testers reach it.
    #[serde(rename = "match", default, skip_serializing_if = "Option::is_none")]
    pub matching: Option<CanaryMatch>,
}

/// Which requests the mesh sends to the canary: those carrying the header and/or the cookie
/// (either one matches), with `value` when given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// The exact value the header or cookie must have; `None` matches any value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl CanaryMatch {
    fn validate(&self, errs: &mut Vec<FieldError>) {
        let at = |f: &str| format!("x-flotilla.canary.match.{f}");
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        if self.header.is_none() && self.cookie.is_none() {
            errs.push(FieldError::new(
                "x-flotilla.canary.match",
                "give a header, a cookie, or both",
            ));
        }
        for (field, name) in [("header", &self.header), ("cookie", &self.cookie)] {
            if let Some(name) = name.as_deref().filter(|n| !token(n)) {
                errs.push(FieldError::new(
                    at(field),
                    format!("{name:?} is not a valid {field} name"),
                ));
            }
        }
        if let Some(value) = &self.value {
            // Visible ASCII without `;` fits both a header and a cookie value.
            if value.is_empty()
                || !value
                    .bytes()
                    .all(|b| (0x21..0x7f).contains(&b) && b != b';')
            {
                errs.push(FieldError::new(
                    at("value"),
                    format!("{value:?} must be non-empty visible ASCII without ';'"),
                ));
            }
        }
    }
}

impl CanarySpec {
    pub fn is_default(&self) -> bool {
        *self == CanarySpec::default()
    }

    /// The steps to walk: the configured ones, ending at 100% (added when missing).
    pub fn effective_steps(&self) -> Vec<CanaryStep> {
        let mut steps = self.steps.clone();
        if steps.last().is_none_or(|s| s.weight < 100) {
            steps.push(CanaryStep {
                weight: 100,
                pause: Some(Duration::ZERO),
            });
        }
        steps
    }
}

/// Checks the release settings; errors name fields relative to the service
/// (`deploy.update_config.max_failure_ratio`).
pub fn validate_release(
    update: &UpdateConfig,
    rollback: &UpdateConfig,
    canary: &CanarySpec,
) -> Vec<FieldError> {
    let mut errs = Vec::new();
    update.validate("deploy.update_config", &mut errs);
    rollback.validate("deploy.rollback_config", &mut errs);
    let mut last = 0u8;
    for (i, step) in canary.steps.iter().enumerate() {
        let at = format!("x-flotilla.canary.steps[{i}].weight");
        if step.weight == 0 || step.weight > 100 {
            errs.push(FieldError::new(
                at,
                format!("{} is outside 1..=100", step.weight),
            ));
        } else if step.weight < last {
            errs.push(FieldError::new(
                at,
                format!("{} is lower than the step before ({last})", step.weight),
            ));
        }
        last = last.max(step.weight);
    }
    if let Some(m) = &canary.matching {
        m.validate(&mut errs);
    }
    let a = &canary.analysis;
    if a.success_rate > Decimal(100_000_000) {
        errs.push(FieldError::new(
            "x-flotilla.canary.analysis.success_rate",
            format!("{}% is above 100%", a.success_rate.as_f64()),
        ));
    }
    if a.interval.is_zero() {
        errs.push(FieldError::new(
            "x-flotilla.canary.analysis.interval",
            "must be greater than 0",
        ));
    }
    errs
}

/// Why a rollout exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutKind {
    /// A new revision was deployed (including `flotilla rollback`, which deploys an old spec).
    Update,
    /// `flotilla service restart`: fresh tasks of the same revision.
    Restart,
    /// The controller returned to the previous revision after a failure.
    AutoRollback,
}

/// Where a rollout is. Terminal states are `Succeeded`, `RolledBack` and `Superseded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutPhase {
    /// Rolling: replacing tasks batch by batch.
    Replacing,
    /// Blue-green / canary: the new tasks start beside the old ones at weight 0.
    StartingNew,
    /// Blue-green: new at weight 100 beside old; waiting until every node's mesh routes it.
    Routing,
    /// Blue-green: old at weight 0; waiting for its in-flight requests to finish.
    DrainingOld,
    /// Blue-green with `auto_promote: false`: waiting for `flotilla rollout promote`.
    AwaitingPromotion,
    /// Canary: holding step `step` and analysing it.
    CanaryStep,
    /// The old tasks are removed (after `scale_down_delay` for blue-green).
    ScalingDown,
    Succeeded,
    /// Failed or aborted; the service went back to the previous revision (see `reason`).
    RolledBack,
    /// A newer deploy replaced this rollout before it finished.
    Superseded,
}

impl RolloutPhase {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RolloutPhase::Succeeded | RolloutPhase::RolledBack | RolloutPhase::Superseded
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutPhase::Replacing => "replacing",
            RolloutPhase::StartingNew => "starting-new",
            RolloutPhase::Routing => "routing",
            RolloutPhase::DrainingOld => "draining-old",
            RolloutPhase::AwaitingPromotion => "awaiting-promotion",
            RolloutPhase::CanaryStep => "canary-step",
            RolloutPhase::ScalingDown => "scaling-down",
            RolloutPhase::Succeeded => "succeeded",
            RolloutPhase::RolledBack => "rolled-back",
            RolloutPhase::Superseded => "superseded",
        }
    }
}

/// One canary analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisResult {
    pub at: Timestamp,
    /// Canary step (0-based) analysed.
    pub step: u32,
    /// Requests to the new tasks since the step began.
    pub requests: u64,
    pub errors: u64,
    /// In percent; `None` without requests.
    pub success_rate: Option<f64>,
    pub p99_ms: f64,
    pub passed: bool,
    pub message: String,
}

/// Most analysis results a rollout keeps; older ones are dropped first.
pub const ANALYSIS_HISTORY: usize = 20;

/// The release of one service, kept in the replicated store (one per service: a new deploy
/// replaces it). Controllers drive it level-triggered, so another manager picks it up where the
/// failed one left it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub service: String,
    pub kind: RolloutKind,
    pub strategy: Strategy,
    /// Batching, monitoring and failure policy in force (`update_config`, or `rollback_config`
    /// for an automatic rollback).
    pub config: UpdateConfig,
    pub from_revision: u64,
    pub to_revision: u64,
    /// `Restart`: tasks created before this are replaced even though their revision is current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_at: Option<Timestamp>,
    pub phase: RolloutPhase,
    /// Canary: the step (0-based) in progress.
    #[serde(default)]
    pub step: u32,
    pub phase_since: Timestamp,
    /// Share of traffic the new revision gets, as last set.
    #[serde(default)]
    pub new_weight: u8,
    /// New tasks that count (ready for `monitor`).
    #[serde(default)]
    pub updated: u64,
    /// New tasks that failed.
    #[serde(default)]
    pub failed: u64,
    /// Failures already acted on (a resume does not pause again for them).
    #[serde(default)]
    pub failures_acknowledged: u64,
    #[serde(default)]
    pub paused: bool,
    /// Why it is paused, or why it was rolled back.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default)]
    pub promote_requested: bool,
    #[serde(default)]
    pub abort_requested: bool,
    /// When the rollout was last resumed; the global guard ignores start failures before it.
    #[serde(default)]
    pub resumed_at: Timestamp,
    /// Canary analysis: request and error counts of the new tasks when the step began.
    #[serde(default)]
    pub baseline_requests: u64,
    #[serde(default)]
    pub baseline_errors: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysis: Vec<AnalysisResult>,
    /// Blue-green with host-mode ports: blue tasks stopped early so green tasks could take
    /// their host ports (the shrink). Stored so a new leader knows the service runs below its
    /// count until green is complete, and a failure restores blue stop-first.
    #[serde(default)]
    pub shrunk: u64,
    pub started_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    #[serde(default)]
    pub meta: Meta,
}

impl Rollout {
    /// A fresh rollout of `kind` from `from` to `to`, in the strategy's first phase.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        service: &str,
        kind: RolloutKind,
        strategy: Strategy,
        config: UpdateConfig,
        from: u64,
        to: u64,
        now: Timestamp,
        reason: String,
    ) -> Rollout {
        Rollout {
            service: service.to_string(),
            kind,
            strategy,
            config,
            from_revision: from,
            to_revision: to,
            restart_at: None,
            phase: match strategy {
                Strategy::Rolling => RolloutPhase::Replacing,
                Strategy::BlueGreen | Strategy::Canary => RolloutPhase::StartingNew,
            },
            step: 0,
            phase_since: now,
            new_weight: 0,
            updated: 0,
            failed: 0,
            failures_acknowledged: 0,
            paused: false,
            reason,
            promote_requested: false,
            abort_requested: false,
            resumed_at: now,
            baseline_requests: 0,
            baseline_errors: 0,
            analysis: Vec::new(),
            shrunk: 0,
            started_at: now,
            finished_at: None,
            meta: Meta::default(),
        }
    }

    pub fn is_active(&self) -> bool {
        !self.phase.is_terminal()
    }
}

/// `POST /v1/services/{name}/rollout`: an operator's control of the running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutAction {
    Pause,
    Resume,
    Promote,
    Abort,
}

/// `POST /v1/services/{name}/rollback`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// The revision to return to; `None` means the one before the current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    #[serde(default)]
    pub requested_by: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_round_trips_and_rejects_negatives() {
        let d: Decimal = serde_json::from_str("0.25").unwrap();
        assert_eq!(d.as_f64(), 0.25);
        assert_eq!(serde_json::to_string(&d).unwrap(), "0.25");
        assert!(serde_json::from_str::<Decimal>("-1").is_err());
    }

    #[test]
    fn canary_always_ends_at_full_weight() {
        let c = CanarySpec {
            steps: vec![CanaryStep {
                weight: 10,
                pause: None,
            }],
            ..CanarySpec::default()
        };
        let steps = c.effective_steps();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[1].weight, 100);
        assert_eq!(CanarySpec::default().effective_steps().len(), 1);
    }

    #[test]
    fn bad_release_settings_name_their_field() {
        let update = UpdateConfig {
            max_failure_ratio: Decimal::from_f64(1.5).unwrap(),
            ..UpdateConfig::default()
        };
        let canary = CanarySpec {
            steps: vec![
                CanaryStep {
                    weight: 50,
                    pause: None,
                },
                CanaryStep {
                    weight: 10,
                    pause: None,
                },
            ],
            analysis: AnalysisSpec {
                interval: Duration::ZERO,
                ..AnalysisSpec::default()
            },
            matching: Some(CanaryMatch {
                header: Some("x canary".into()),
                ..CanaryMatch::default()
            }),
        };
        let errs = validate_release(&update, &UpdateConfig::default(), &canary);
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "deploy.update_config.max_failure_ratio",
                "x-flotilla.canary.steps[1].weight",
                "x-flotilla.canary.match.header",
                "x-flotilla.canary.analysis.interval"
            ]
        );
    }
}
