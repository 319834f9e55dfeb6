//! Builders shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use flotilla_types::{
    Availability, DesiredState, DriverKind, Meta, Node, NodeResources, NodeRole, NodeState,
    ResourceAmounts, ServiceSpec, Task, TaskState, TaskStatus,
};
use std::collections::BTreeMap;

pub const GIB: u64 = 1 << 30;

pub fn node(id: &str, zone: &str, cpu_millis: u64, memory_bytes: u64) -> Node {
    Node {
        id: id.to_string(),
        hostname: format!("host-{id}"),
        role: NodeRole::Worker,
        availability: Availability::Active,
        state: NodeState::Ready,
        labels: BTreeMap::from([("zone".to_string(), zone.to_string())]),
        engine_labels: BTreeMap::new(),
        images: Vec::new(),
        zone: None,
        resources: NodeResources {
            cpu_millis,
            memory_bytes,
        },
        drivers: vec![DriverKind::Process, DriverKind::Sim],
        agent_addr: None,
        advertise_ip: None,
        port_conflicts: Vec::new(),
        last_heartbeat: 0,
        message: String::new(),
        meta: Meta::default(),
    }
}

pub fn spec(name: &str) -> ServiceSpec {
    ServiceSpec::process(name, vec!["true".to_string()])
}

pub fn reserve(mut s: ServiceSpec, cpu_millis: u64, memory_bytes: u64) -> ServiceSpec {
    s.resources.reservations = ResourceAmounts {
        cpu_millis: Some(cpu_millis),
        memory_bytes: Some(memory_bytes),
        pids: None,
    };
    s
}

/// A running task of `spec` on `node`.
pub fn task(id: &str, spec: &ServiceSpec, node: &str) -> Task {
    Task {
        id: id.to_string(),
        service: spec.name.clone(),
        slot: Some(1),
        revision: 1,
        spec: spec.clone(),
        node: Some(node.to_string()),
        desired_state: DesiredState::Running,
        status: TaskStatus::new(TaskState::Running, 0, ""),
        history: Vec::new(),
        attempt: 0,
        not_before: None,
        weight: None,
        meta: Meta::default(),
    }
}
