//! The node daemon behind `flotilla init` and `flotilla join`: one process per node of a secure
//! multi-node cluster, running as a manager or a worker and switching between the two in place.
//!
//! `init` creates the cluster CA and join secrets in `DATA_DIR/pki`, issues this node a manager
//! certificate, bootstraps raft (id 1) and serves the API over mutual TLS on `--listen-addr`
//! (plus plain HTTP on loopback `--api-addr` for the local CLI, as `up` does). `join` pins the
//! CA from the token, gets a certificate for a key generated here, then runs either a manager
//! (raft learner, then voter) or a worker agent ([`crate::agent_cmd::run_worker`]) over mTLS.
//! Both commands restart a node from its data dir when run again.
//!
//! One file per protocol step: [`admission`] (init's PKI, the join handshake), [`manager_mode`],
//! [`worker_mode`], and [`membership`] (what both modes poll: their role, renewals, the CA).

mod admission;
mod manager_mode;
mod membership;
mod worker_mode;

use crate::cluster_args::{InitArgs, JoinArgs, NodeArgs, MIN_CERT_VALIDITY};
use crate::node_dir;
use anyhow::bail;
use flotilla_pki::{NodeCredentials, Role};
use manager_mode::{force_new_cluster, run_manager, ManagerStart};
use std::net::SocketAddr;
use std::process::ExitCode;
use worker_mode::run_joined_worker;

/// Where other nodes reach this one: `--advertise-addr`, else a non-wildcard `--listen-addr`.
fn advertise(node: &NodeArgs) -> anyhow::Result<SocketAddr> {
    let addr = node.advertise_addr.unwrap_or(node.listen_addr);
    if addr.ip().is_unspecified() {
        bail!(
            "--advertise-addr is required when --listen-addr is {} (other nodes need a \
             reachable IP:PORT)",
            node.listen_addr
        );
    }
    Ok(addr)
}

/// `flotilla init`: a new cluster's first manager, a restarted manager, or (with
/// `--force-new-cluster`) the survivor of a lost quorum.
pub async fn init(args: &InitArgs) -> anyhow::Result<ExitCode> {
    let node = &args.node;
    if args.cert_validity < MIN_CERT_VALIDITY {
        bail!(
            "--cert-validity {}: must be at least {}",
            humantime::format_duration(args.cert_validity),
            humantime::format_duration(MIN_CERT_VALIDITY)
        );
    }
    let _lock = node_dir::lock(&node.data_dir)?;
    let name = node_dir::node_name(node.common.node_name.as_deref(), &node.data_dir)?;
    let advertise = advertise(node)?;
    let dir = node_dir::pki_dir(&node.data_dir);
    let fresh = !NodeCredentials::exists(&dir);
    if args.force_new_cluster {
        if fresh {
            bail!(
                "--force-new-cluster: {} holds no cluster to recover (no certificates in {})",
                node.data_dir.display(),
                dir.display()
            );
        }
        force_new_cluster(node, advertise).await?;
    } else if fresh {
        admission::create_cluster(node, &name, advertise, args.cert_validity)?;
    }
    let start = ManagerStart {
        advertise,
        join_via: None,
        cert_validity: fresh.then_some(args.cert_validity),
        forced: args.force_new_cluster,
    };
    run_node(node, &name, Next::Manager(start)).await
}

/// `flotilla join`: admitted with a token the first time, then restarted from the data dir.
pub async fn join(args: &JoinArgs) -> anyhow::Result<ExitCode> {
    let node = &args.node;
    let _lock = node_dir::lock(&node.data_dir)?;
    let name = node_dir::node_name(node.common.node_name.as_deref(), &node.data_dir)?;
    let dir = node_dir::pki_dir(&node.data_dir);
    let joined_now = !NodeCredentials::exists(&dir);
    if joined_now {
        admission::obtain_credentials(args, &name, &dir).await?;
        crate::private_files::make_private(&node.data_dir)?;
    }
    let creds = NodeCredentials::load(&dir)?;
    let first = match creds.identity()?.role {
        Role::Manager => Next::Manager(ManagerStart {
            advertise: advertise(node)?,
            join_via: joined_now.then(|| args.manager.clone()),
            cert_validity: None,
            forced: false,
        }),
        Role::Worker => Next::Worker {
            manager: args.manager.clone(),
        },
    };
    run_node(node, &name, first).await
}

/// What a node process runs next when one of its modes ends: a promotion turns a worker into
/// a manager and a demotion a manager into a worker in the same process (as in Swarm), with
/// the tasks left running and re-adopted by the new mode's agent.
enum Next {
    Exit,
    Manager(ManagerStart),
    Worker {
        /// The manager to follow first (the others are learnt from it).
        manager: String,
    },
}

async fn run_node(node: &NodeArgs, name: &str, mut next: Next) -> anyhow::Result<ExitCode> {
    loop {
        next = match next {
            Next::Exit => return Ok(ExitCode::SUCCESS),
            Next::Manager(start) => run_manager(node, name, &start).await?,
            Next::Worker { manager } => run_joined_worker(node, name, &manager).await?,
        };
    }
}
