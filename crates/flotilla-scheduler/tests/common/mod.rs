//! Builders shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use flotilla_types::testing;
use flotilla_types::{DriverKind, Node, ResourceAmounts, ServiceSpec, Task};

pub const GIB: u64 = 1 << 30;

pub fn node(id: &str, zone: &str, cpu_millis: u64, memory_bytes: u64) -> Node {
    testing::node(id)
        .hostname(&format!("host-{id}"))
        .label("zone", zone)
        .cpu(cpu_millis)
        .memory(memory_bytes)
        .drivers(&[DriverKind::Process, DriverKind::Sim])
        .build()
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
    testing::task(id, spec).on(node).build()
}
