//! The cluster's admin commands, each a client of the managers' typed membership routes:
//! `flotilla token`, `node rm|promote|demote`, `leave` and `ca status|rotate`.

use crate::cluster_args::{CaCommand, LeaveArgs, RmArgs, RoleChangeArgs, TokenCommand};
use crate::node_dir;
use anyhow::{anyhow, bail, Context};
use flotilla_client::Client;
use flotilla_pki::{NodeCredentials, Role, TlsIdentity};
use flotilla_types::cluster::{CaRotationStatus, LeaveRequest, TokensResponse};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// `flotilla node rm NODE [--force]`.
pub async fn node_rm(client: &Client, args: &RmArgs) -> anyhow::Result<ExitCode> {
    let removed = client.remove_node(&args.node, args.force).await?;
    println!(
        "removed node {}{}; its certificate is revoked",
        removed.node,
        if removed.was_manager {
            " (and from the raft managers)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `flotilla token show|rotate ROLE`, against the manager at `--addr`.
pub async fn token(client: &Client, cmd: &TokenCommand) -> anyhow::Result<ExitCode> {
    let (role, tokens): (Role, TokensResponse) = match cmd {
        TokenCommand::Show { role } => ((*role).into(), client.join_tokens().await?),
        TokenCommand::Rotate { role } => {
            let role: Role = (*role).into();
            let tokens = client.rotate_join_token(role.as_str()).await?;
            println!("rotated the {role} join token; the previous one is refused from now on");
            (role, tokens)
        }
    };
    println!(
        "{}",
        match role {
            Role::Worker => tokens.worker,
            Role::Manager => tokens.manager,
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `flotilla node promote|demote NODE...`: records the change, then waits until the node has
/// carried it out (a voter in raft, or a ready worker).
pub async fn node_role(
    client: &Client,
    args: &RoleChangeArgs,
    role: Role,
) -> anyhow::Result<ExitCode> {
    let verb = match role {
        Role::Manager => "promote",
        Role::Worker => "demote",
    };
    for node in &args.nodes {
        let changed = match role {
            Role::Manager => client.promote_node(node).await,
            Role::Worker => client.demote_node(node).await,
        }
        .with_context(|| format!("{verb} {node}"))?;
        if changed.unchanged {
            println!("node {node} is already a {role}");
            continue;
        }
        for warning in &changed.warnings {
            eprintln!("warning: {warning}");
        }
        println!("node {node}: {verb}d to {role}");
        if args.detach {
            continue;
        }
        let deadline = Instant::now() + args.timeout;
        loop {
            match role_carried_out(client, node, role).await {
                Ok(true) => break,
                Ok(false) => {}
                // The manager asked was the one demoted: its local API is gone with it.
                Err(e) if role == Role::Worker && e.code().is_none() => {
                    println!(
                        "node {node}: the manager answering this CLI was the one demoted and \
                         stopped serving; follow it on another manager (`flotilla node ls`)"
                    );
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "waiting for the node"),
            }
            if Instant::now() > deadline {
                bail!(
                    "node {node} has not become a {role} after {}: is it up (`flotilla node ls`)? \
                     It carries the change out once it is; see its log",
                    humantime::format_duration(args.timeout)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        println!("node {node} is a {role} now");
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether `node` holds `role` now: a raft voter, or a ready worker out of raft.
async fn role_carried_out(
    client: &Client,
    node: &str,
    role: Role,
) -> Result<bool, flotilla_client::ClientError> {
    let managers = client.cluster_managers().await?;
    let voting = managers
        .iter()
        .any(|m| m.voter && m.node.as_deref() == Some(node));
    Ok(match role {
        Role::Manager => voting,
        Role::Worker => {
            let n = client.node(node).await?;
            !voting
                && n.role == flotilla_types::NodeRole::Worker
                && n.state == flotilla_types::NodeState::Ready
        }
    })
}

/// `flotilla leave`, run on the node: asks the managers to let it leave (a manager through its
/// local API, a worker with its own certificate), then waits until the node's process, which
/// drains, asks for its removal and exits, is gone.
pub async fn leave(local: &Client, args: &LeaveArgs) -> anyhow::Result<ExitCode> {
    let dir = node_dir::pki_dir(&args.data_dir);
    if !NodeCredentials::exists(&dir) {
        bail!(
            "{} holds no cluster certificate: no node of a cluster uses --data-dir {}",
            dir.display(),
            args.data_dir.display()
        );
    }
    let running = || node_dir::lock(&args.data_dir).is_err();
    if !running() {
        bail!(
            "no flotilla node is running on --data-dir {}: start it again (the same `flotilla \
             init` or `join` command) so it can drain and leave, or remove it from a manager \
             with `flotilla node rm NODE`",
            args.data_dir.display()
        );
    }
    let creds = NodeCredentials::load(&dir)?;
    let me = creds.identity()?;
    let client = match me.role {
        // A manager's CLI has its loopback API (--addr).
        Role::Manager => local.clone(),
        Role::Worker => {
            let known = node_dir::read_known_managers(&args.data_dir);
            let first = known.first().ok_or_else(|| {
                anyhow!(
                    "{} lists no managers",
                    args.data_dir.join(node_dir::MANAGERS_FILE).display()
                )
            })?;
            let client = Client::with_tls(first, TlsIdentity::new(creds)?.client_config()?)?;
            client.set_managers(&known)?;
            client
        }
    };
    let request = LeaveRequest {
        node: Some(me.node_id.clone()),
        force: args.force,
    };
    // The saved list may name managers that are gone; the client moves past those.
    let mut attempts = client.managers().len();
    let left = loop {
        attempts -= 1;
        match client.leave_cluster(&request).await {
            Err(flotilla_client::ClientError::Connect { .. }) if attempts > 0 => continue,
            done => break done.context("asking the managers to let this node leave")?,
        }
    };
    for warning in &left.warnings {
        eprintln!("warning: {warning}");
    }
    let node = &left.node;
    if left.was_manager {
        println!("{node}: demoted (it left the raft voters)");
    }
    println!(
        "{node}: {}; it leaves once it runs nothing",
        if args.force {
            "stopping its tasks"
        } else {
            "draining (each task moves once its replacement is ready)"
        }
    );
    let deadline = Instant::now() + args.timeout;
    while running() {
        if Instant::now() > deadline {
            bail!(
                "{node} is still leaving after {}: its tasks may have nowhere to go (see \
                 `flotilla ps` and `flotilla events` on a manager). It leaves on its own once \
                 they have moved; `flotilla leave --force` stops them now",
                humantime::format_duration(args.timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if NodeCredentials::exists(&dir) {
        bail!("the node stopped before it had left (stopped by hand?); start it again and rerun `flotilla leave`");
    }
    println!("{node} left the cluster; its certificate is revoked");
    Ok(ExitCode::SUCCESS)
}

fn print_rotation(status: &CaRotationStatus) {
    let phase = match status.phase.as_deref() {
        Some("trust") => "step 1/2: every node is to trust the new root (the old one signs)",
        Some("sign") => "step 2/2: the new root signs; every node is to renew onto it",
        Some(other) => other,
        None => "no rotation under way",
    };
    println!(
        "CA root {} ({} trusted); {phase}{}",
        &status.signing_root[..status.signing_root.len().min(16)],
        status.trusted_roots,
        if status.waiting_for.is_empty() {
            String::new()
        } else {
            format!("; waiting for {}", status.waiting_for.join(", "))
        }
    );
}

/// `flotilla ca status|rotate`.
pub async fn ca(client: &Client, cmd: &CaCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CaCommand::Status => {
            print_rotation(&client.ca_rotation_status().await?);
        }
        CaCommand::Rotate { timeout } => {
            let deadline = Instant::now() + *timeout;
            let mut last: Option<(Option<String>, Vec<String>)> = None;
            loop {
                let status = client.rotate_ca().await?;
                if status.completed {
                    print_rotation(&status);
                    println!("rotation completed; the old root is no longer trusted");
                    let tokens = client.join_tokens().await?;
                    println!("new worker join token:  {}", tokens.worker);
                    println!("new manager join token: {}", tokens.manager);
                    break;
                }
                let now = (status.phase.clone(), status.waiting_for.clone());
                if last.as_ref() != Some(&now) {
                    print_rotation(&status);
                    last = Some(now);
                }
                if Instant::now() > deadline {
                    bail!(
                        "the rotation is still waiting for {} after {} (down nodes renew once \
                         back; remove those that will not come back with `flotilla node rm`). \
                         Run `flotilla ca rotate` again to carry on",
                        status.waiting_for.join(", "),
                        humantime::format_duration(*timeout)
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
