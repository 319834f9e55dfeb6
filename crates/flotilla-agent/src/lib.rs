//! Runs, on one node, the tasks the manager assigns to it.
//!
//! [`agent::Agent`] follows the node's tasks and runs each behind the [`driver::Driver`] trait
//! ([`process`] through a per-task [`shim`] that survives agent restarts, [`docker`] on the local
//! Docker Engine), with [`cgroup`] limits, [`health`] checks, host [`ports`], rotating [`logs`]
//! and this node's part of the routing mesh ([`mesh_node`]).
#![forbid(unsafe_code)]

pub mod agent;
pub mod agent_auth;
pub mod cgroup;
pub mod docker;
mod docker_create;
pub mod docker_image;
pub mod docker_network;
pub mod driver;
pub mod health;
pub mod hollow;
pub mod logs;
pub mod mesh_node;
pub mod ports;
pub mod process;
mod reconciler;
mod runner;
pub mod shim;
pub mod sim;
pub mod task_user;
pub mod trampoline;
