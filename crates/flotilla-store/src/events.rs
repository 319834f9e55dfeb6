//! What the store tells operators: the wording of the [`Event`]s an applied command produces.
//!
//! Each kind that speaks has one function here, called with the object before and after the
//! write (`None` when it did not exist, or no longer does). Kinds without events say nothing.

use crate::Record;
use flotilla_types::{
    Availability, Event, EventLevel, Health, Node, NodeState, Rollout, RolloutKind, RolloutPhase,
    Service, Task, TaskState, Timestamp,
};
use std::collections::BTreeMap;

/// The events of one command, stamped with its revision and time.
pub(crate) struct Events {
    revision: u64,
    at: Timestamp,
    list: Vec<Event>,
}

impl Events {
    pub(crate) fn new(revision: u64, at: Timestamp) -> Self {
        Events {
            revision,
            at,
            list: Vec::new(),
        }
    }

    pub(crate) fn into_vec(self) -> Vec<Event> {
        self.list
    }

    fn push(&mut self, level: EventLevel, kind: &str, object: &str, action: &str, message: String) {
        self.list.push(Event {
            revision: self.revision,
            at: self.at,
            level,
            kind: kind.to_string(),
            object: object.to_string(),
            action: action.to_string(),
            message,
        });
    }
}

/// `created`, `updated` (new revision, or a spec change), `scaled`, `removed`.
pub(crate) fn service(ev: &mut Events, old: Option<&Service>, new: Option<&Service>) {
    let (old, new) = match (old, new) {
        (None, Some(new)) => {
            let name = new.name.as_str();
            let message = format!("service {name} created (revision {})", new.revision);
            return ev.push(EventLevel::Info, "service", name, "created", message);
        }
        (Some(old), None) => {
            let name = old.name.as_str();
            let message = format!("service {name} removed");
            return ev.push(EventLevel::Info, "service", name, "removed", message);
        }
        (Some(old), Some(new)) => (old, new),
        (None, None) => return,
    };
    let name = new.name.as_str();
    let (old_replicas, new_replicas) = (old.spec.mode.replicas(), new.spec.mode.replicas());
    if old.revision != new.revision {
        let message = format!("service {name} updated to revision {}", new.revision);
        ev.push(EventLevel::Info, "service", name, "updated", message);
    } else if let (Some(from), Some(to), true) =
        (old_replicas, new_replicas, old_replicas != new_replicas)
    {
        let message = format!("service {name} scaled from {from} to {to} replicas");
        ev.push(EventLevel::Info, "service", name, "scaled", message);
    } else if old.spec != new.spec {
        let message = format!("service {name} updated");
        ev.push(EventLevel::Info, "service", name, "updated", message);
    }
}

/// `created`; then `unplaced` (each new reason a pending task cannot be placed), `state` and
/// `health`. A task's deletion says nothing: its service's events explain it.
pub(crate) fn task(ev: &mut Events, old: Option<&Task>, new: Option<&Task>) {
    match (old, new) {
        (None, Some(new)) => task_created(ev, new),
        (Some(old), Some(new)) => task_changed(ev, old, new),
        (_, None) => {}
    }
}

fn task_created(ev: &mut Events, task: &Task) {
    let status = &task.status;
    let (level, message) = match (status.state, task.node.as_deref()) {
        (TaskState::Pending, None) if !status.message.is_empty() => (
            EventLevel::Warning,
            format!("{} pending: {}", task.name(), status.message),
        ),
        (_, Some(node)) => (
            EventLevel::Info,
            format!(
                "{} created on {node} (revision {})",
                task.name(),
                task.revision
            ),
        ),
        (_, None) => (
            EventLevel::Info,
            format!("{} created (revision {})", task.name(), task.revision),
        ),
    };
    ev.push(level, "task", &task.id, "created", message);
}

fn task_changed(ev: &mut Events, old: &Task, new: &Task) {
    let status = &new.status;
    let detail = if status.message.is_empty() {
        String::new()
    } else {
        format!(": {}", status.message)
    };
    if status.state == TaskState::Pending
        && old.status.state == TaskState::Pending
        && old.status.message != status.message
        && !status.message.is_empty()
    {
        // Why a task cannot be placed, each time the reason changes.
        let message = format!("{} pending: {}", new.name(), status.message);
        ev.push(EventLevel::Warning, "task", &new.id, "unplaced", message);
    }
    if old.status.state != status.state {
        let level = match status.state {
            TaskState::Failed | TaskState::Rejected | TaskState::Lost => EventLevel::Warning,
            _ => EventLevel::Info,
        };
        let message = format!("{} {}{detail}", new.name(), status.state);
        ev.push(level, "task", &new.id, "state", message);
    }
    if old.status.health != status.health {
        let (level, detail) = match status.health {
            Health::Unhealthy => (EventLevel::Warning, detail.as_str()),
            _ => (EventLevel::Info, ""),
        };
        let message = format!("{} {}{detail}", new.name(), status.health.as_str());
        ev.push(level, "task", &new.id, "health", message);
    }
}

/// `created` (registered), `state`, `availability`, `labels`, `removed`.
pub(crate) fn node(ev: &mut Events, old: Option<&Node>, new: Option<&Node>) {
    match (old, new) {
        (None, Some(new)) => {
            let message = format!("node {} ({}) registered", new.id, new.hostname);
            ev.push(EventLevel::Info, "node", &new.id, "created", message);
        }
        (Some(old), None) => {
            let message = format!("node {} removed", old.id);
            ev.push(EventLevel::Info, "node", &old.id, "removed", message);
        }
        (Some(old), Some(new)) => {
            if old.state != new.state {
                node_state(ev, new);
            }
            if old.availability != new.availability {
                node_availability(ev, new);
            }
            if old.labels != new.labels {
                let message = format!("node {} labels: {}", new.id, format_labels(&new.labels));
                ev.push(EventLevel::Info, "node", &new.id, "labels", message);
            }
        }
        (None, None) => {}
    }
}

fn node_state(ev: &mut Events, node: &Node) {
    let (level, message) = match node.state {
        NodeState::Ready => (EventLevel::Info, format!("node {} ready", node.id)),
        NodeState::Down if node.message.is_empty() => {
            (EventLevel::Warning, format!("node {} down", node.id))
        }
        NodeState::Down => (
            EventLevel::Warning,
            format!("node {} down: {}", node.id, node.message),
        ),
    };
    ev.push(level, "node", &node.id, "state", message);
}

fn node_availability(ev: &mut Events, node: &Node) {
    let availability = node.availability.as_str();
    let (level, message) = match node.availability {
        Availability::Active => (
            EventLevel::Info,
            format!("node {} availability {availability}", node.id),
        ),
        // Pausing or draining is worth a warning only when the system did it (with a reason).
        _ if node.message.is_empty() => (
            EventLevel::Info,
            format!("node {} availability {availability}", node.id),
        ),
        _ => (
            EventLevel::Warning,
            format!(
                "node {} availability {availability}: {}",
                node.id, node.message
            ),
        ),
    };
    ev.push(level, "node", &node.id, "availability", message);
}

/// `k=v,k2=v2`, or `(none)`.
fn format_labels(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "(none)".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One event per change a human follows: start, pause/resume, phase or canary step, shrink and
/// restore, failed analysis. A release's deletion says nothing.
pub(crate) fn rollout(ev: &mut Events, old: Option<&Rollout>, new: Option<&Rollout>) {
    let Some(new) = new else { return };
    let same_rollout = old.is_some_and(|o| {
        o.to_revision == new.to_revision && o.kind == new.kind && o.started_at == new.started_at
    });
    let detail = if new.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", new.reason)
    };
    match old {
        Some(old) if same_rollout => {
            rollout_pause(ev, old, new, &detail);
            rollout_phase(ev, old, new, &detail);
            rollout_shrink(ev, old, new);
            rollout_analysis(ev, old, new);
        }
        _ => rollout_started(ev, new, &detail),
    }
}

fn rollout_started(ev: &mut Events, new: &Rollout, detail: &str) {
    let what = match new.kind {
        RolloutKind::Update => "rollout",
        RolloutKind::Restart => "restart",
        RolloutKind::AutoRollback => "automatic rollback",
    };
    let message = format!(
        "{}: {} {what} from revision {} to {} started{detail}",
        new.service,
        new.strategy.as_str(),
        new.from_revision,
        new.to_revision
    );
    let level = match new.kind {
        RolloutKind::AutoRollback => EventLevel::Warning,
        _ => EventLevel::Info,
    };
    ev.push(level, "rollout", &new.service, "started", message);
}

fn rollout_pause(ev: &mut Events, old: &Rollout, new: &Rollout, detail: &str) {
    if old.paused == new.paused {
        return;
    }
    let (level, action) = if new.paused {
        (EventLevel::Warning, "paused")
    } else {
        (EventLevel::Info, "resumed")
    };
    let message = format!("{}: rollout {action}{detail}", new.service);
    ev.push(level, "rollout", &new.service, action, message);
}

fn rollout_phase(ev: &mut Events, old: &Rollout, new: &Rollout, detail: &str) {
    if old.phase == new.phase && old.step == new.step {
        return;
    }
    let level = match new.phase {
        RolloutPhase::RolledBack => EventLevel::Warning,
        _ => EventLevel::Info,
    };
    let step = if new.phase == RolloutPhase::CanaryStep {
        format!(" {} (weight {})", new.step + 1, new.new_weight)
    } else {
        String::new()
    };
    let message = format!(
        "{}: rollout to revision {} {}{step}{}",
        new.service,
        new.to_revision,
        new.phase.as_str(),
        if new.phase.is_terminal() { detail } else { "" }
    );
    ev.push(level, "rollout", &new.service, new.phase.as_str(), message);
}

fn rollout_shrink(ev: &mut Events, old: &Rollout, new: &Rollout) {
    let name = new.service.as_str();
    if new.shrunk > old.shrunk {
        let message = format!(
            "{name}: shrink: stopped {} blue task(s) so green can take their host ports \
             ({} in all; restored when green runs the full count)",
            new.shrunk - old.shrunk,
            new.shrunk
        );
        ev.push(EventLevel::Warning, "rollout", name, "shrink", message);
    }
    // A failed shrunk rollout's restore shows in the automatic rollback's reason.
    if new.shrunk > 0 && old.phase != new.phase && new.phase == RolloutPhase::Succeeded {
        let message = format!(
            "{name}: restore: green runs the full count after {} blue task(s) were shrunk",
            new.shrunk
        );
        ev.push(EventLevel::Info, "rollout", name, "restore", message);
    }
}

fn rollout_analysis(ev: &mut Events, old: &Rollout, new: &Rollout) {
    if let Some(result) = new.analysis.last().filter(|r| !r.passed) {
        if old.analysis.last() != Some(result) {
            let message = format!(
                "{}: canary analysis failed: {}",
                new.service, result.message
            );
            ev.push(
                EventLevel::Warning,
                "rollout",
                &new.service,
                "analysis",
                message,
            );
        }
    }
}

/// Records under `episode/` mark a cluster-wide condition a controller entered (such as a node
/// disruption): their `message` is a warning when one begins, and its end is noted. Other
/// records say nothing.
pub(crate) fn episode(ev: &mut Events, old: Option<&Record>, new: Option<&Record>) {
    let name = |r: &Record| r.key.strip_prefix("episode/").map(str::to_string);
    match (old, new) {
        (None, Some(new)) => {
            let Some(object) = name(new) else { return };
            let message = match new.value.get("message").and_then(|m| m.as_str()) {
                Some(m) => m.to_string(),
                None => format!("{object} began"),
            };
            ev.push(EventLevel::Warning, "cluster", &object, "began", message);
        }
        (Some(old), None) => {
            let Some(object) = name(old) else { return };
            let message = format!("{object} ended");
            ev.push(EventLevel::Info, "cluster", &object, "ended", message);
        }
        _ => {}
    }
}
