//! Release settings: `deploy.update_config`, `deploy.rollback_config`, `x-flotilla.strategy`,
//! `x-flotilla.blue_green` and `x-flotilla.canary`.

use crate::document::Node;
use crate::report::Report;
use flotilla_types::release::{
    AnalysisSpec, BlueGreenSpec, CanaryMatch, CanarySpec, CanaryStep, Decimal, FailureAction,
};
use flotilla_types::{Strategy, UpdateConfig, UpdateOrder};

/// A non-negative number (integer or float).
fn number(r: &mut Report, field: &str, node: &Node) -> Option<f64> {
    let v = match node {
        Node::Int(i) => *i as f64,
        Node::Float(f) => *f,
        other => {
            r.wrong_type(field, "a number", other);
            return None;
        }
    };
    if !v.is_finite() || v < 0.0 {
        r.error(field, format!("{v} is not a non-negative number"));
        return None;
    }
    Some(v)
}

/// `update_config` / `rollback_config`: Compose's fields with Swarm's meaning.
pub(crate) fn update_config(r: &mut Report, field: &str, node: &Node) -> UpdateConfig {
    let mut cfg = UpdateConfig::default();
    r.keys(field, node, |r, key, at, value| match key {
        "parallelism" => {
            if let Some(n) = r.uint(at, value) {
                cfg.parallelism = n;
            }
        }
        "delay" => {
            if let Some(d) = r.duration(at, value) {
                cfg.delay = d;
            }
        }
        "monitor" => {
            if let Some(d) = r.duration(at, value) {
                cfg.monitor = d;
            }
        }
        "order" => match r.string(at, value).as_deref() {
            Some("start-first") => cfg.order = UpdateOrder::StartFirst,
            Some("stop-first") => cfg.order = UpdateOrder::StopFirst,
            Some(other) => r.error(
                at,
                format!("{other:?} is not an order (expected start-first or stop-first)"),
            ),
            None => {}
        },
        "max_failure_ratio" => {
            if let Some(v) = number(r, at, value) {
                if v > 1.0 {
                    r.error(at, format!("{v} is outside 0..=1"));
                } else if let Some(d) = Decimal::from_f64(v) {
                    cfg.max_failure_ratio = d;
                }
            }
        }
        "failure_action" => match r.string(at, value).as_deref() {
            Some("pause") => cfg.failure_action = FailureAction::Pause,
            Some("continue") => cfg.failure_action = FailureAction::Continue,
            Some("rollback") => cfg.failure_action = FailureAction::Rollback,
            Some(other) => r.error(
                at,
                format!("{other:?} is not a failure action (expected pause, continue or rollback)"),
            ),
            None => {}
        },
        _ => r.error(
            at,
            "unknown key (expected parallelism, delay, order, monitor, max_failure_ratio or failure_action)",
        ),
    });
    cfg
}

/// `x-flotilla.strategy: rolling | blue-green | canary`.
pub(crate) fn strategy(r: &mut Report, field: &str, node: &Node) -> Option<Strategy> {
    match r.string(field, node).as_deref() {
        Some("rolling") => Some(Strategy::Rolling),
        Some("blue-green") => Some(Strategy::BlueGreen),
        Some("canary") => Some(Strategy::Canary),
        Some(other) => {
            r.error(
                field,
                format!("{other:?} is not a strategy (expected rolling, blue-green or canary)"),
            );
            None
        }
        None => None,
    }
}

/// `x-flotilla.blue_green: {auto_promote, scale_down_delay}`.
pub(crate) fn blue_green(r: &mut Report, field: &str, node: &Node) -> BlueGreenSpec {
    let mut spec = BlueGreenSpec::default();
    r.keys(field, node, |r, key, at, value| match key {
        "auto_promote" => {
            if let Some(b) = r.boolean(at, value) {
                spec.auto_promote = b;
            }
        }
        "scale_down_delay" => {
            if let Some(d) = r.duration(at, value) {
                spec.scale_down_delay = d;
            }
        }
        _ => r.error(
            at,
            "unknown key (expected auto_promote or scale_down_delay)",
        ),
    });
    spec
}

/// `x-flotilla.canary: {steps: [{weight, pause}], analysis: {success_rate, p99_ms, interval}}`.
pub(crate) fn canary(r: &mut Report, field: &str, node: &Node) -> CanarySpec {
    let mut spec = CanarySpec::default();
    r.keys(field, node, |r, key, at, value| match key {
        "steps" => spec.steps = steps(r, at, value),
        "analysis" => spec.analysis = analysis(r, at, value),
        "match" => spec.matching = Some(canary_match(r, at, value)),
        _ => r.error(at, "unknown key (expected steps, analysis or match)"),
    });
    spec
}

/// `x-flotilla.canary.match: {header, cookie, value}`; names and value are checked by
/// `validate_release`.
fn canary_match(r: &mut Report, field: &str, node: &Node) -> CanaryMatch {
    let mut m = CanaryMatch::default();
    r.keys(field, node, |r, key, at, value| match key {
        "header" => m.header = r.string(at, value),
        "cookie" => m.cookie = r.string(at, value),
        "value" => m.value = r.string(at, value),
        _ => r.error(at, "unknown key (expected header, cookie or value)"),
    });
    m
}

fn steps(r: &mut Report, field: &str, node: &Node) -> Vec<CanaryStep> {
    r.list_of_mappings(field, node, "a list of steps", step)
}

/// One canary step: `{weight, pause}`.
fn step(r: &mut Report, at: &str, entries: &[(String, Node)]) -> Option<CanaryStep> {
    let mut weight = None;
    let mut pause = None;
    for (key, value) in entries {
        let key_at = format!("{at}.{key}");
        match key.as_str() {
            "weight" => match r.uint(&key_at, value) {
                Some(w @ 1..=100) => weight = u8::try_from(w).ok(),
                Some(w) => r.error(&key_at, format!("{w} is outside 1..=100")),
                None => {}
            },
            "pause" => pause = r.duration(&key_at, value),
            _ => r.error(&key_at, "unknown key (expected weight or pause)"),
        }
    }
    if weight.is_none() && entries.iter().all(|(k, _)| k != "weight") {
        r.error(
            &format!("{at}.weight"),
            "every step needs a weight (1..=100)",
        );
    }
    Some(CanaryStep {
        weight: weight?,
        pause,
    })
}

fn analysis(r: &mut Report, field: &str, node: &Node) -> AnalysisSpec {
    let mut spec = AnalysisSpec::default();
    r.keys(field, node, |r, key, at, value| match key {
        "success_rate" => {
            // A percentage: `99`, `99.5` or `"99%"`.
            let v = match value {
                Node::Str(s) => match s.trim().trim_end_matches('%').trim().parse::<f64>() {
                    Ok(v) => Some(v),
                    Err(_) => {
                        r.error(
                            at,
                            format!("{s:?} is not a percentage like 99 or \"99.5%\""),
                        );
                        None
                    }
                },
                other => number(r, at, other),
            };
            match v {
                Some(v) if (0.0..=100.0).contains(&v) => {
                    if let Some(d) = Decimal::from_f64(v) {
                        spec.success_rate = d;
                    }
                }
                Some(v) => r.error(at, format!("{v}% is outside 0..=100")),
                None => {}
            }
        }
        "p99_ms" => {
            if let Some(n) = r.uint(at, value) {
                spec.p99_ms = n;
            }
        }
        "interval" => match r.duration(at, value) {
            Some(d) if d.is_zero() => r.error(at, "must be greater than 0"),
            Some(d) => spec.interval = d,
            None => {}
        },
        _ => r.error(
            at,
            "unknown key (expected success_rate, p99_ms or interval)",
        ),
    });
    spec
}
