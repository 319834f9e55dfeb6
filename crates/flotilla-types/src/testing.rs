//! Builders for tests (feature `test-support`): a [`Node`], [`Task`] or [`ServiceSpec`] with
//! sensible defaults, changed only where a test cares, so a new field is added in one place
//! instead of in every test's copy of the literal.

use crate::{
    Availability, DesiredState, DriverKind, Meta, Node, NodeResources, NodeRole, NodeState,
    ResourceAmounts, ServiceMode, ServiceSpec, Task, TaskState, TaskStatus, Timestamp,
};

/// Builds a [`Node`]: a ready, active worker with 2 cores and 8 GiB that runs processes.
#[derive(Debug, Clone)]
pub struct NodeBuilder(Node);

/// A [`NodeBuilder`] for node `id`.
pub fn node(id: &str) -> NodeBuilder {
    NodeBuilder(Node::new(
        id,
        NodeResources {
            cpu_millis: 2000,
            memory_bytes: 8 << 30,
        },
    ))
}

impl NodeBuilder {
    pub fn cpu(mut self, millis: u64) -> Self {
        self.0.resources.cpu_millis = millis;
        self
    }

    pub fn memory(mut self, bytes: u64) -> Self {
        self.0.resources.memory_bytes = bytes;
        self
    }

    pub fn resources(mut self, resources: NodeResources) -> Self {
        self.0.resources = resources;
        self
    }

    pub fn hostname(mut self, hostname: &str) -> Self {
        self.0.hostname = hostname.to_string();
        self
    }

    pub fn role(mut self, role: NodeRole) -> Self {
        self.0.role = role;
        self
    }

    pub fn availability(mut self, availability: Availability) -> Self {
        self.0.availability = availability;
        self
    }

    pub fn state(mut self, state: NodeState) -> Self {
        self.0.state = state;
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.0.labels.insert(key.to_string(), value.to_string());
        self
    }

    pub fn zone(mut self, zone: &str) -> Self {
        self.0.zone = Some(zone.to_string());
        self
    }

    pub fn drivers(mut self, drivers: &[DriverKind]) -> Self {
        self.0.drivers = drivers.to_vec();
        self
    }

    pub fn agent_addr(mut self, addr: &str) -> Self {
        self.0.agent_addr = Some(addr.to_string());
        self
    }

    pub fn heartbeat(mut self, at: Timestamp) -> Self {
        self.0.last_heartbeat = at;
        self
    }

    pub fn version(mut self, version: u64) -> Self {
        self.0.meta.version = version;
        self
    }

    pub fn build(self) -> Node {
        self.0
    }
}

impl From<NodeBuilder> for Node {
    fn from(b: NodeBuilder) -> Node {
        b.0
    }
}

/// Builds a [`ServiceSpec`]: a one-replica process service running `sleep 600`.
#[derive(Debug, Clone)]
pub struct SpecBuilder(ServiceSpec);

/// A [`SpecBuilder`] for service `name`.
pub fn spec(name: &str) -> SpecBuilder {
    SpecBuilder(ServiceSpec::process(
        name,
        vec!["sleep".to_string(), "600".to_string()],
    ))
}

impl SpecBuilder {
    pub fn replicas(mut self, replicas: u64) -> Self {
        self.0.mode = ServiceMode::Replicated { replicas };
        self
    }

    pub fn global(mut self) -> Self {
        self.0.mode = ServiceMode::Global;
        self
    }

    pub fn command(mut self, command: &[&str]) -> Self {
        self.0.command = Some(command.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn driver(mut self, driver: DriverKind) -> Self {
        self.0.driver = driver;
        self
    }

    /// Reserves `cpu_millis` (and `memory_bytes` when non-zero) per task.
    pub fn reserve(mut self, cpu_millis: u64, memory_bytes: u64) -> Self {
        self.0.resources.reservations = ResourceAmounts {
            cpu_millis: Some(cpu_millis),
            memory_bytes: (memory_bytes > 0).then_some(memory_bytes),
            pids: None,
        };
        self
    }

    pub fn priority(mut self, priority: u32) -> Self {
        self.0.placement.priority = priority;
        self
    }

    pub fn build(self) -> ServiceSpec {
        self.0
    }
}

impl From<SpecBuilder> for ServiceSpec {
    fn from(b: SpecBuilder) -> ServiceSpec {
        b.0
    }
}

/// Builds a [`Task`]: running since `0` in slot 1 of revision 1, desired running.
#[derive(Debug, Clone)]
pub struct TaskBuilder(Task);

/// A [`TaskBuilder`] for task `id` of `spec`.
pub fn task(id: &str, spec: &ServiceSpec) -> TaskBuilder {
    let mut t = Task::new(spec, 1, Some(1), 0);
    t.id = id.to_string();
    t.status = TaskStatus::new(TaskState::Running, 0, "");
    TaskBuilder(t)
}

impl TaskBuilder {
    pub fn slot(mut self, slot: Option<u64>) -> Self {
        self.0.slot = slot;
        self
    }

    pub fn revision(mut self, revision: u64) -> Self {
        self.0.revision = revision;
        self
    }

    pub fn on(mut self, node: &str) -> Self {
        self.0.node = Some(node.to_string());
        self
    }

    pub fn desired(mut self, desired: DesiredState) -> Self {
        self.0.desired_state = desired;
        self
    }

    /// The current status: `state` since `at`, without adding history.
    pub fn status(mut self, state: TaskState, at: Timestamp) -> Self {
        self.0.status = TaskStatus::new(state, at, "");
        self
    }

    /// Records `state` at `at` as a reported transition (history included).
    pub fn then(mut self, state: TaskState, at: Timestamp, message: &str) -> Self {
        self.0.record_status(TaskStatus::new(state, at, message));
        self
    }

    pub fn weight(mut self, weight: Option<u8>) -> Self {
        self.0.weight = weight;
        self
    }

    /// `meta` as the store would have set it: `version`, created at `created_at`.
    pub fn meta(mut self, version: u64, created_at: Timestamp) -> Self {
        self.0.meta = Meta {
            version,
            created_at,
            updated_at: created_at,
        };
        self
    }

    pub fn build(self) -> Task {
        self.0
    }
}

impl From<TaskBuilder> for Task {
    fn from(b: TaskBuilder) -> Task {
        b.0
    }
}
