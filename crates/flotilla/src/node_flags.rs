//! The flags every command that runs a node able to manage shares (`up`, `init`, `join`).

use crate::node_dir;
use clap::Args;

#[derive(Debug, Args, Clone)]
pub struct NodeFlags {
    /// This node's name (default: the host name; remembered in DATA_DIR/node-id).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Range host ports for task ports are taken from (START-END, end exclusive). Default: a
    /// 500-port block of 20000-32000 picked by the node's name, remembered in DATA_DIR/task-ports.
    #[arg(long, value_parser = node_dir::parse_port_range)]
    pub task_ports: Option<std::ops::Range<u16>>,
    /// Finished tasks kept per replica slot for `flotilla ps -a` while this node is a manager
    /// (like Swarm's `--task-history-limit`); older ones are deleted.
    #[arg(long, default_value_t = 5, value_parser = crate::manager::parse_task_history)]
    pub task_history: usize,
    /// The Unix socket a manager serves its API on for local administrators (root, mode
    /// 0660, group `flotilla` if it exists). Default: /run/flotilla/flotilla.sock, or
    /// DATA_DIR/flotilla.sock where /run/flotilla cannot be used.
    #[arg(long = "socket", value_name = "PATH")]
    pub socket: Option<std::path::PathBuf>,
    /// Stop workloads found on this node whose tasks the cluster does not know, even when its
    /// store meets this node for the first time (a new or lost store). Without it they are
    /// left running and reported (docs/OPERATIONS.md, "When things go wrong").
    #[arg(long)]
    pub discard_unknown_workloads: bool,
    #[command(flatten)]
    pub limits: crate::limit_flags::LimitFlags,
}
