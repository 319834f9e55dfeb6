//! Release settings in Compose: `deploy.update_config`, `deploy.rollback_config` and
//! `x-flotilla.strategy` / `blue_green` / `canary`.
#![allow(clippy::unwrap_used)] // tests fail loudly on broken setup

use flotilla_compose::{parse_str, ComposeError};
use flotilla_types::release::{Decimal, FailureAction};
use flotilla_types::{Strategy, UpdateOrder};
use std::path::Path;
use std::time::Duration;

fn web(extra: &str) -> String {
    format!("services:\n  web:\n    command: [\"sleep\", \"100\"]\n{extra}")
}

#[test]
fn update_and_rollback_config_are_read() {
    let yaml = web(
        "    deploy:\n      update_config:\n        parallelism: 2\n        delay: 10s\n        order: stop-first\n        monitor: 30s\n        max_failure_ratio: 0.25\n        failure_action: rollback\n      rollback_config:\n        parallelism: 0\n        order: start-first\n",
    );
    let file = parse_str(&yaml, "c.yaml", Path::new(".")).unwrap();
    assert!(file.warnings.is_empty(), "{:?}", file.warnings);
    let r = &file.services[0].rollout;
    assert_eq!(r.update.parallelism, 2);
    assert_eq!(r.update.delay, Duration::from_secs(10));
    assert_eq!(r.update.order, UpdateOrder::StopFirst);
    assert_eq!(r.update.monitor, Duration::from_secs(30));
    assert_eq!(r.update.max_failure_ratio, Decimal::from_f64(0.25).unwrap());
    assert_eq!(r.update.failure_action, FailureAction::Rollback);
    assert_eq!(r.rollback.parallelism, 0);
    assert_eq!(r.rollback.order, UpdateOrder::StartFirst);
    assert_eq!(r.strategy, Strategy::Rolling);
}

#[test]
fn blue_green_and_canary_are_read() {
    let yaml = web(
        "    x-flotilla:\n      strategy: canary\n      blue_green:\n        auto_promote: false\n        scale_down_delay: 1m\n      canary:\n        steps:\n          - {weight: 10, pause: 30s}\n          - {weight: 50}\n        analysis:\n          success_rate: 99.5\n          p99_ms: 250\n          interval: 10s\n",
    );
    let file = parse_str(&yaml, "c.yaml", Path::new(".")).unwrap();
    let r = &file.services[0].rollout;
    assert_eq!(r.strategy, Strategy::Canary);
    assert!(!r.blue_green.auto_promote);
    assert_eq!(r.blue_green.scale_down_delay, Duration::from_secs(60));
    assert_eq!(r.canary.steps.len(), 2);
    assert_eq!(r.canary.steps[0].weight, 10);
    assert_eq!(r.canary.steps[0].pause, Some(Duration::from_secs(30)));
    assert_eq!(r.canary.steps[1].pause, None);
    assert_eq!(
        r.canary.analysis.success_rate,
        Decimal::from_f64(99.5).unwrap()
    );
    assert_eq!(r.canary.analysis.p99_ms, 250);
    assert_eq!(r.canary.analysis.interval, Duration::from_secs(10));
}

#[test]
fn bad_release_settings_name_their_field() {
    let cases = [
        ("    deploy:\n      update_config:\n        order: sideways\n", "services.web.deploy.update_config.order", "not an order"),
        ("    deploy:\n      update_config:\n        failure_action: panic\n", "services.web.deploy.update_config.failure_action", "not a failure action"),
        ("    deploy:\n      rollback_config:\n        max_failure_ratio: 2\n", "services.web.deploy.rollback_config.max_failure_ratio", "outside 0..=1"),
        ("    deploy:\n      update_config:\n        parallelism: -1\n", "services.web.deploy.update_config.parallelism", ">= 0"),
        ("    deploy:\n      update_config:\n        speed: 3\n", "services.web.deploy.update_config.speed", "unknown key"),
        ("    x-flotilla:\n      strategy: big-bang\n", "services.web.x-flotilla.strategy", "not a strategy"),
        ("    x-flotilla:\n      blue_green:\n        auto_promote: maybe\n", "services.web.x-flotilla.blue_green.auto_promote", "expected true or false"),
        ("    x-flotilla:\n      canary:\n        steps:\n          - {weight: 0}\n", "services.web.x-flotilla.canary.steps[0].weight", "outside 1..=100"),
        ("    x-flotilla:\n      canary:\n        steps:\n          - {pause: 10s}\n", "services.web.x-flotilla.canary.steps[0].weight", "needs a weight"),
        ("    x-flotilla:\n      canary:\n        steps:\n          - {weight: 50}\n          - {weight: 20}\n", "services.web.x-flotilla.canary.steps[1].weight", "lower than the step before"),
        ("    x-flotilla:\n      canary:\n        analysis:\n          success_rate: 120\n", "services.web.x-flotilla.canary.analysis.success_rate", "outside 0..=100"),
        ("    x-flotilla:\n      canary:\n        analysis:\n          interval: 0s\n", "services.web.x-flotilla.canary.analysis.interval", "greater than 0"),
        ("    x-flotilla:\n      canary:\n        match:\n          header: x-canary\n", "services.web.x-flotilla.canary.match", "needs an HTTP port"),
        ("    x-flotilla:\n      canary:\n        match:\n          header: \"x canary\"\n", "services.web.x-flotilla.canary.match.header", "not a valid header name"),
        ("    x-flotilla:\n      canary:\n        match:\n          value: \"1\"\n", "services.web.x-flotilla.canary.match", "header, a cookie"),
        ("    x-flotilla:\n      canary:\n        match:\n          query: x\n", "services.web.x-flotilla.canary.match.query", "unknown key"),
    ];
    let mut failures = Vec::new();
    for (extra, field, reason) in cases {
        match parse_str(&web(extra), "c.yaml", Path::new(".")) {
            Err(ComposeError::Invalid { errors, .. }) => {
                if !errors
                    .iter()
                    .any(|e| e.field == field && e.reason.contains(reason))
                {
                    failures.push(format!("{field}: wanted {reason:?}, got {errors:?}"));
                }
            }
            other => failures.push(format!("{field}: wanted Invalid, got {other:?}")),
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn canary_match_is_read() {
    let yaml = web(
        "    ports: [\"8080:80\"]\n    x-flotilla:\n      ports: [{published: 8080, protocol: http}]\n      canary:\n        match: {header: X-Canary, cookie: canary, value: \"yes\"}\n",
    );
    let file = parse_str(&yaml, "c.yaml", Path::new(".")).unwrap();
    let m = file.services[0].rollout.canary.matching.clone().unwrap();
    assert_eq!(m.header.as_deref(), Some("X-Canary"));
    assert_eq!(m.cookie.as_deref(), Some("canary"));
    assert_eq!(m.value.as_deref(), Some("yes"));
}
