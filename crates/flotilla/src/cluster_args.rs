//! The command-line arguments of `flotilla init`, `join`, `leave`, `token`, `ca` and the node
//! membership commands (`node rm|promote|demote`).

use crate::node_dir;
use clap::{Args, Subcommand};
use flotilla_pki::Role;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args, Clone)]
pub struct NodeArgs {
    /// Where the store, certificates, task state and logs live.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value_os_t = node_dir::default_data_dir())]
    pub data_dir: PathBuf,
    /// Address the cluster (mTLS) API listens on.
    #[arg(long, default_value = "0.0.0.0:7451")]
    pub listen_addr: SocketAddr,
    /// Address other nodes reach this one at (IP:PORT). Default: --listen-addr, which must then
    /// not be a wildcard.
    #[arg(long)]
    pub advertise_addr: Option<SocketAddr>,
    /// Plain-HTTP API for the local CLI, loopback only (managers only).
    #[arg(long, default_value = "127.0.0.1:7450")]
    pub api_addr: SocketAddr,
    /// A node silent for this long is marked down and its tasks replaced.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub node_grace: Duration,
    #[command(flatten)]
    pub common: crate::node_flags::NodeFlags,
    #[command(flatten)]
    pub mesh: crate::mesh_cmd::MeshArgs,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// How long node certificates are valid; every node renews its own once less than a third
    /// is left. At least 30s (short values are for tests).
    #[arg(long, default_value = "90days", value_parser = humantime::parse_duration)]
    pub cert_validity: Duration,
    /// Disaster recovery: restart this manager from its data dir as the only manager of the
    /// cluster, keeping its state, after the other managers were lost for good (quorum can
    /// never come back). The lost managers are removed and must join again with fresh data.
    /// See docs/OPERATIONS.md before using it.
    #[arg(long)]
    pub force_new_cluster: bool,
}

/// Below this, renewals (every tenth of the validity, after two thirds) would crowd each other.
pub const MIN_CERT_VALIDITY: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// A join token printed by `flotilla init` or `flotilla token show`. Prefer
    /// FLOTILLA_JOIN_TOKEN or --token-file: a command line is visible to every local user.
    /// Needed only for the first join; a restart reads the node's certificate.
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the join token from this file (e.g. a secret mounted by the provisioning tool).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// A manager's cluster address (IP:PORT).
    pub manager: String,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// The node to remove (its name, as `flotilla node ls` shows it).
    pub node: String,
    /// Remove the node even though it is still up (its agent keeps running but is refused).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print the join command for a role.
    Show { role: RoleArg },
    /// Replace a role's join token; the old one is refused from now on.
    Rotate { role: RoleArg },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RoleArg {
    Worker,
    Manager,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Worker => Role::Worker,
            RoleArg::Manager => Role::Manager,
        }
    }
}

#[derive(Debug, Args)]
pub struct RoleChangeArgs {
    /// The nodes to promote or demote (names, as `flotilla node ls` shows them).
    #[arg(required = true)]
    pub nodes: Vec<String>,
    /// Return once the change is recorded, without waiting for the node to carry it out.
    #[arg(long)]
    pub detach: bool,
    /// Give up waiting for a node after this long (the change still happens when it can).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct LeaveArgs {
    /// The data dir of the node that leaves (a node running on this machine).
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value_os_t = node_dir::default_data_dir())]
    pub data_dir: PathBuf,
    /// Managers: leave even if the managers left lose quorum; the last manager leaves too,
    /// dissolving the cluster. Everyone: stop the node's tasks now instead of waiting for a
    /// zero-downtime drain.
    #[arg(long)]
    pub force: bool,
    /// Give up waiting after this long (the node keeps leaving on its own).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Where a CA root rotation stands.
    Status,
    /// Rotate the CA root: the new root is trusted next to the old one, every node renews onto
    /// it, then the old root is dropped. Join tokens change (they name the root).
    Rotate {
        /// Give up waiting after this long (rerun to carry on where it stands).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}
