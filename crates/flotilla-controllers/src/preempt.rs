//! Preemption bookkeeping of a pass: what each service may lose to higher-priority tasks, and
//! the pending tasks nominated for a node whose victims are stopping (see
//! [`Nomination`](flotilla_types::Nomination)).

use crate::reconcile::is_live;
use flotilla_scheduler::{schedule, ClusterSnapshot, Placement, PlacementRequest};
use flotilla_store::ClusterState;
use flotilla_types::{Nomination, Task};
use std::collections::BTreeMap;

/// For each nominated task: `None` while a victim is still stopping; once they have all
/// exited, its placement on the nominated node, or anywhere if that no longer fits (a node
/// gone, say). Tasks that fit nowhere are left out; their service's pass explains why.
pub(crate) fn settle_nominations(
    state: &ClusterState,
    snapshot: &mut ClusterSnapshot,
    nominated: &[(&Task, &Nomination)],
) -> BTreeMap<String, Option<Placement>> {
    let mut out = BTreeMap::new();
    for (t, n) in nominated {
        let stopping = n.victims.iter().any(|id| {
            state
                .tasks
                .get(id)
                .is_some_and(|v| !v.status.state.is_terminal())
        });
        let Some(service) = state.services.get(&t.service) else {
            continue;
        };
        if stopping {
            // Victims exit one by one: what the first ones free stays reserved for this task.
            snapshot.hold_for(&n.node, &service.spec);
            out.insert(t.id.clone(), None);
            continue;
        }
        let mut req = PlacementRequest::new(&service.spec, 1);
        req.pin_to = Some(&n.node);
        let placed = schedule(snapshot, &req).or_else(|_| {
            tracing::info!(service = %t.service, task = %t.id, node = %n.node, "nominated node no longer fits; placing afresh");
            schedule(snapshot, &PlacementRequest::new(&service.spec, 1))
        });
        if let Ok(mut placements) = placed {
            if !placements.is_empty() {
                out.insert(t.id.clone(), Some(placements.swap_remove(0)));
            }
        }
    }
    out
}

/// How many tasks of each service preemption may stop in this pass: the service's disruption
/// budget (`x-flotilla.disruption`) minus the replicas already unavailable, the same
/// accounting drains use, so preemption never makes a struggling service worse.
pub(crate) fn set_preemption_budgets(state: &ClusterState, snapshot: &mut ClusterSnapshot) {
    let mut live: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for t in state.tasks.values().filter(|t| is_live(t)) {
        let e = live.entry(t.service.as_str()).or_default();
        e.0 += 1;
        e.1 += u64::from(t.is_ready());
    }
    for service in state.services.values() {
        let (count, ready) = live.get(service.name.as_str()).copied().unwrap_or_default();
        let wanted = service.spec.mode.replicas().unwrap_or(count);
        let unavailable = wanted.saturating_sub(ready);
        let allowed = service.spec.rollout.disruption.allowed(wanted);
        let remaining = usize::try_from(allowed.saturating_sub(unavailable)).unwrap_or(usize::MAX);
        snapshot.set_disruption_budget(&service.name, remaining);
    }
}
