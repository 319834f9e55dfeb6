//! What a deploy writes: for each service, a plan entry (create, update, scale or unchanged,
//! with the revision it gets and a one-line description of the change) and the store ops that
//! record the new revision. The API's deploy and rollback handlers and the controller tests
//! build their writes here, so tests exercise what the API does.

use flotilla_store::{ClusterState, Expect, Op};
use flotilla_types::api::{PlanAction, PlanEntry};
use flotilla_types::{
    Revision, Rollout, RolloutKind, Service, ServiceMode, ServiceSpec, Strategy, Timestamp,
};

/// A one-line description of what differs between two specs, for revision history.
pub fn describe_change(old: &ServiceSpec, new: &ServiceSpec) -> String {
    if old.task_template_eq(new) {
        return match (&old.mode, &new.mode) {
            (ServiceMode::Replicated { replicas: a }, ServiceMode::Replicated { replicas: b })
                if a != b =>
            {
                format!("replicas {a} -> {b}")
            }
            _ => "deploy labels".to_string(),
        };
    }
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return "spec changed".to_string();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let changed: Vec<&str> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(String::as_str)
        .collect();
    format!("changed {}", changed.join(", "))
}

/// What deploying `spec` would do to the service of that name.
pub fn plan_for(state: &ClusterState, spec: &ServiceSpec) -> PlanEntry {
    match state.services.get(&spec.name) {
        None => PlanEntry {
            service: spec.name.clone(),
            action: PlanAction::Create,
            revision: 1,
            change: "created".into(),
        },
        Some(cur) if cur.spec == *spec => PlanEntry {
            service: spec.name.clone(),
            action: PlanAction::Unchanged,
            revision: cur.revision,
            change: "unchanged".into(),
        },
        Some(cur) => PlanEntry {
            service: spec.name.clone(),
            action: if cur.spec.task_template_eq(spec) {
                PlanAction::Scale
            } else {
                PlanAction::Update
            },
            revision: next_revision(state, &spec.name),
            change: describe_change(&cur.spec, spec),
        },
    }
}

/// Revision numbers never repeat, even across a remove and re-create of the same name.
pub fn next_revision(state: &ClusterState, service: &str) -> u64 {
    state
        .revisions_of(service)
        .map(|r| r.number)
        .max()
        .unwrap_or(0)
        + 1
}

/// The ops that move `spec` into the store as a new revision, guarded by the versions read.
pub fn write_ops(
    state: &ClusterState,
    spec: &ServiceSpec,
    entry: &PlanEntry,
    by: &str,
    at: Timestamp,
) -> Vec<Op> {
    if entry.action == PlanAction::Unchanged {
        return Vec::new();
    }
    let current = state.services.get(&spec.name);
    let expect = current.map_or(Expect::Absent, |s| Expect::Version(s.meta.version));
    let number = next_revision(state, &spec.name);
    vec![
        Op::PutRevision {
            revision: Revision {
                service: spec.name.clone(),
                number,
                spec: spec.clone(),
                created_at: at,
                created_by: by.to_string(),
                change: entry.change.clone(),
            },
        },
        Op::PutService {
            service: Service {
                name: spec.name.clone(),
                spec: spec.clone(),
                revision: number,
                meta: current.map(|s| s.meta).unwrap_or_default(),
            },
            expect,
        },
    ]
}

/// A whole deploy of `specs` against `state`: the plan shown to the user and the ops of one
/// atomic write (empty when nothing changes).
pub fn deploy_ops(
    state: &ClusterState,
    specs: &[ServiceSpec],
    by: &str,
    at: Timestamp,
) -> (Vec<PlanEntry>, Vec<Op>) {
    let plan: Vec<PlanEntry> = specs.iter().map(|s| plan_for(state, s)).collect();
    let ops = specs
        .iter()
        .zip(&plan)
        .flat_map(|(s, e)| write_ops(state, s, e, by, at))
        .collect();
    (plan, ops)
}

/// The rollout a `service restart` writes: every task of the current revision replaced by a
/// fresh one, rolling, with the service's `update_config`; and the op that writes it over
/// `existing` (the service's previous, finished rollout).
pub fn restart_rollout(
    service: &Service,
    existing: Option<&Rollout>,
    now: Timestamp,
) -> (Rollout, Op) {
    let mut r = Rollout::new(
        &service.name,
        RolloutKind::Restart,
        Strategy::Rolling,
        service.spec.rollout.update.clone(),
        service.revision,
        service.revision,
        now,
        "restart requested".into(),
    );
    r.restart_at = Some(now);
    r.new_weight = 100;
    let op = Op::PutRollout {
        rollout: r.clone(),
        expect: existing.map_or(Expect::Absent, |e| Expect::Version(e.meta.version)),
    };
    (r, op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_descriptions() {
        let a = ServiceSpec::process("web", vec!["x".into()]);
        let mut b = a.clone();
        b.mode = ServiceMode::Replicated { replicas: 4 };
        assert_eq!(describe_change(&a, &b), "replicas 1 -> 4");
        b.environment.insert("A".into(), "1".into());
        assert_eq!(describe_change(&a, &b), "changed environment, mode");
    }
}
