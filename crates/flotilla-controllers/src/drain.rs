//! Zero-downtime drains: moving a replicated service's tasks off nodes whose availability is
//! `drain`, start-first, within the service's disruption budget.
//!
//! A task on a draining node keeps serving its slot until a replacement on another node is
//! ready; only then is it stopped. The budget (`x-flotilla.disruption.max_unavailable`) caps how
//! many slots are unavailable or mid-move at once, counting slots that are unavailable for any
//! other reason too (like a Kubernetes PodDisruptionBudget), so a drain never makes a struggling
//! service worse.

use flotilla_types::Task;

/// One replica slot as the drain sees it.
#[derive(Debug, Clone)]
pub struct SlotTasks<'a> {
    pub slot: u64,
    /// Live tasks (desired `running`, not finished) of the service's current template.
    pub current: Vec<&'a Task>,
    /// Whether a live task of an older template is ready in this slot (mid rolling update).
    pub outdated_ready: bool,
}

/// What the drain decided for one slot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotMove<'a> {
    pub slot: u64,
    /// Tasks on draining nodes that keep serving the slot for now.
    pub leaving: Vec<&'a Task>,
    /// Tasks on draining nodes to stop now: a replacement is ready, or they were not serving.
    pub retire: Vec<&'a Task>,
    /// Create a replacement on another node now.
    pub replace: bool,
}

impl SlotMove<'_> {
    /// Whether some task of this slot is on a draining node: the slot is taken care of by the
    /// drain, not by the ordinary replacement logic.
    pub fn is_moving(&self) -> bool {
        !self.leaving.is_empty() || !self.retire.is_empty() || self.replace
    }

    /// Whether `id` is one of the tasks leaving the slot.
    pub fn involves(&self, id: &str) -> bool {
        self.leaving.iter().chain(&self.retire).any(|t| t.id == id)
    }
}

/// Plans one pass of a service's drain. `budget` is how many slots may be unavailable or
/// mid-move at once (at least 1); `draining(node)` says whether a node is being drained.
/// Returns a move for every slot with a task on a draining node, lowest slot first.
pub fn plan<'a>(
    slots: &[SlotTasks<'a>],
    budget: u64,
    draining: impl Fn(&str) -> bool,
) -> Vec<SlotMove<'a>> {
    let mut moves = Vec::new();
    let mut busy = 0u64;
    let mut waiting = Vec::new();
    for s in slots {
        let (leaving, staying): (Vec<&Task>, Vec<&Task>) = s
            .current
            .iter()
            .copied()
            .partition(|t| t.node.as_deref().is_some_and(&draining));
        let serving = s.current.iter().any(|t| t.is_ready()) || s.outdated_ready;
        if leaving.is_empty() {
            if !serving {
                busy += 1;
            }
            continue;
        }
        let mut m = SlotMove {
            slot: s.slot,
            ..SlotMove::default()
        };
        if staying.iter().any(|t| t.is_ready()) {
            // The replacement is serving: the old task can go.
            m.retire = leaving;
        } else if !leaving.iter().any(|t| t.is_ready()) {
            // Nothing to protect: the leaving task was not serving anyway.
            m.retire = leaving;
            m.replace = staying.is_empty();
            busy += 1;
        } else if !staying.is_empty() {
            // A replacement is on its way; the old task serves until it is ready.
            m.leaving = leaving;
            busy += 1;
        } else {
            m.leaving = leaving;
            waiting.push(moves.len());
        }
        moves.push(m);
    }
    let mut allowed = budget.max(1).saturating_sub(busy);
    for i in waiting {
        if allowed == 0 {
            break;
        }
        moves[i].replace = true;
        allowed -= 1;
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_types::testing;
    use flotilla_types::{Health, HealthCheck, HealthTest, ServiceSpec, TaskState};

    fn task(id: &str, node: Option<&str>, state: TaskState, health: Health) -> Task {
        let mut spec = ServiceSpec::process("web", vec!["app".into()]);
        spec.healthcheck = Some(HealthCheck::with_defaults(HealthTest::Tcp));
        let mut t = testing::task(id, &spec).status(state, 0).build();
        t.node = node.map(str::to_string);
        t.status.health = health;
        t
    }

    fn ready(id: &str, node: &str) -> Task {
        task(id, Some(node), TaskState::Running, Health::Healthy)
    }

    fn starting(id: &str, node: &str) -> Task {
        task(id, Some(node), TaskState::Running, Health::Starting)
    }

    fn slot<'a>(n: u64, current: &[&'a Task]) -> SlotTasks<'a> {
        SlotTasks {
            slot: n,
            current: current.to_vec(),
            outdated_ready: false,
        }
    }

    fn on_b(node: &str) -> bool {
        node == "b"
    }

    fn ids(ts: &[&Task]) -> Vec<String> {
        ts.iter().map(|t| t.id.clone()).collect()
    }

    #[test]
    fn no_task_on_a_draining_node_means_no_moves() {
        let (a1, a2) = (ready("1", "a"), ready("2", "c"));
        assert!(plan(&[slot(1, &[&a1]), slot(2, &[&a2])], 1, on_b).is_empty());
    }

    #[test]
    fn budget_limits_how_many_slots_start_moving() {
        let t: Vec<Task> = (1..=4).map(|i| ready(&i.to_string(), "b")).collect();
        let slots: Vec<SlotTasks> = t.iter().zip(1..).map(|(t, n)| slot(n, &[t])).collect();
        let moves = plan(&slots, 1, on_b);
        assert_eq!(moves.len(), 4);
        assert_eq!(
            moves
                .iter()
                .filter(|m| m.replace)
                .map(|m| m.slot)
                .collect::<Vec<_>>(),
            [1],
            "lowest slot first, one at a time"
        );
        assert!(
            moves.iter().all(|m| m.retire.is_empty()),
            "old tasks keep serving"
        );
        let moves = plan(&slots, 3, on_b);
        assert_eq!(moves.iter().filter(|m| m.replace).count(), 3);
    }

    #[test]
    fn old_task_stops_only_once_its_replacement_is_ready() {
        let (old, new) = (ready("old", "b"), starting("new", "a"));
        let moves = plan(&[slot(1, &[&old, &new])], 1, on_b);
        assert_eq!(ids(&moves[0].leaving), ["old"]);
        assert!(moves[0].retire.is_empty() && !moves[0].replace);

        let new = ready("new", "a");
        let moves = plan(&[slot(1, &[&old, &new])], 1, on_b);
        assert_eq!(ids(&moves[0].retire), ["old"]);
        assert!(moves[0].leaving.is_empty() && !moves[0].replace);
    }

    #[test]
    fn a_move_in_flight_uses_the_budget() {
        let (old1, new1, old2) = (ready("o1", "b"), starting("n1", "a"), ready("o2", "b"));
        let moves = plan(&[slot(1, &[&old1, &new1]), slot(2, &[&old2])], 1, on_b);
        assert!(!moves[1].replace, "slot 2 waits for slot 1's replacement");
        let moves = plan(&[slot(1, &[&old1, &new1]), slot(2, &[&old2])], 2, on_b);
        assert!(moves[1].replace);
    }

    #[test]
    fn unavailable_slots_elsewhere_use_the_budget() {
        let (broken, old) = (starting("x", "a"), ready("o", "b"));
        let moves = plan(&[slot(1, &[&broken]), slot(2, &[&old])], 1, on_b);
        assert_eq!(moves.len(), 1);
        assert!(!moves[0].replace, "the service is already one task short");
        let empty = plan(&[slot(1, &[]), slot(2, &[&old])], 1, on_b);
        assert!(!empty[0].replace, "an empty slot is unavailable too");
        let mut outdated = slot(1, &[]);
        outdated.outdated_ready = true;
        assert!(plan(&[outdated, slot(2, &[&old])], 1, on_b)[0].replace);
    }

    #[test]
    fn a_task_that_is_not_serving_moves_at_once() {
        let sick = starting("s", "b");
        let moves = plan(&[slot(1, &[&sick])], 1, on_b);
        assert_eq!(ids(&moves[0].retire), ["s"]);
        assert!(moves[0].replace);
        let pending = task("p", None, TaskState::Pending, Health::None);
        let moves = plan(&[slot(1, &[&sick, &pending])], 1, on_b);
        assert_eq!(ids(&moves[0].retire), ["s"]);
        assert!(!moves[0].replace, "its replacement already exists");
    }

    #[test]
    fn slot_move_reports_which_tasks_it_involves() {
        let (old, gone) = (ready("old", "b"), ready("gone", "b"));
        let m = SlotMove {
            slot: 1,
            leaving: vec![&old],
            retire: vec![&gone],
            replace: false,
        };
        assert!(m.is_moving() && m.involves("old") && m.involves("gone") && !m.involves("x"));
        assert!(!SlotMove::default().is_moving());
    }
}
