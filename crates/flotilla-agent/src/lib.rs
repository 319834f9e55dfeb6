//! The node agent: [`agent::Agent`] follows the tasks the manager assigns to this node and runs
//! each behind the [`driver::Driver`] trait (the process driver supervises each workload through
//! a per-task [`shim`] so it survives agent restarts; the [`docker`] driver runs containers on
//! the local Docker Engine), with cgroup limits, health checks, host port allocation and
//! rotating log files.
#![forbid(unsafe_code)]

pub mod agent;
pub mod cgroup;
pub mod docker;
pub mod docker_image;
pub mod driver;
pub mod health;
pub mod hollow;
pub mod logs;
pub mod mesh_node;
pub mod ports;
pub mod process;
pub mod shim;
pub mod sim;
pub mod trampoline;
