//! `flotilla node update` and `flotilla node maintain`: an operator's control over where work
//! runs. Maintenance is drain → wait until the node runs nothing → upgrade → re-activate.

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use flotilla_client::Client;
use flotilla_types::api::NodeUpdate;
use flotilla_types::{Availability, Node, NodeState};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How often `maintain` looks at the node while it waits.
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AvailabilityArg {
    /// Takes new tasks.
    Active,
    /// Keeps its tasks, takes no new ones.
    Pause,
    /// Its tasks move to other nodes, each replacement ready before the old task stops.
    Drain,
}

impl From<AvailabilityArg> for Availability {
    fn from(a: AvailabilityArg) -> Self {
        match a {
            AvailabilityArg::Active => Availability::Active,
            AvailabilityArg::Pause => Availability::Pause,
            AvailabilityArg::Drain => Availability::Drain,
        }
    }
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The node's id (as `node ls` shows it).
    pub node: String,
    #[arg(long, value_enum)]
    pub availability: Option<AvailabilityArg>,
    /// Add or change a label, KEY=VALUE (repeatable). Constraints see it as node.labels.KEY.
    #[arg(long = "label-add", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub label_add: Vec<(String, String)>,
    /// Remove a label (repeatable).
    #[arg(long = "label-rm", value_name = "KEY")]
    pub label_rm: Vec<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE, e.g. zone=eu-1"))?;
    if k.is_empty() {
        return Err(format!("{s:?}: the key is empty"));
    }
    Ok((k.to_string(), v.to_string()))
}

#[derive(Debug, Args)]
pub struct MaintainArgs {
    /// The node to take out of service.
    pub node: String,
    /// Once the node runs nothing, run this shell command (say, an upgrade over ssh; the node's
    /// id is in $FLOTILLA_NODE), wait for the node to be ready, and re-activate it. Without it,
    /// an interactive terminal is asked to press Enter; a script gets the command to run later.
    #[arg(long, value_name = "COMMAND")]
    pub then: Option<String>,
    /// Give up waiting (for the drain, or for the node to come back) after this long. The node
    /// stays drained.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub async fn update(c: &Client, args: &UpdateArgs) -> anyhow::Result<ExitCode> {
    if args.availability.is_none() && args.label_add.is_empty() && args.label_rm.is_empty() {
        bail!("node update needs --availability, --label-add or --label-rm");
    }
    let node = c
        .update_node(
            &args.node,
            &NodeUpdate {
                availability: args.availability.map(Availability::from),
                label_add: args.label_add.iter().cloned().collect::<BTreeMap<_, _>>(),
                label_rm: args.label_rm.clone(),
            },
        )
        .await?;
    println!("{}", node.id);
    Ok(ExitCode::SUCCESS)
}

pub async fn maintain(c: &Client, args: &MaintainArgs) -> anyhow::Result<ExitCode> {
    let id = args.node.as_str();
    c.node(id).await?;
    set_availability(c, id, Availability::Drain).await?;
    println!("{id}: draining (each task moves once its replacement is ready)");
    let deadline = Instant::now() + args.timeout;
    let mut last_count = None;
    loop {
        let remaining = c
            .tasks(None, Some(id))
            .await?
            .into_iter()
            .filter(|t| !t.status.state.is_terminal())
            .count();
        if last_count != Some(remaining) {
            println!("{id}: {remaining} tasks still on the node");
            last_count = Some(remaining);
        }
        if remaining == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{id} still runs {remaining} tasks after {}; it stays drained (see `flotilla ps` and `flotilla events`)",
                humantime::format_duration(args.timeout)
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let reactivate = format!("flotilla node update --availability active {id}");
    match &args.then {
        Some(command) => {
            println!("{id}: drained; running: {command}");
            let status = tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(command)
                .env("FLOTILLA_NODE", id)
                .status()
                .await
                .context("starting /bin/sh for --then")?;
            if !status.success() {
                bail!("--then command failed ({status}); {id} stays drained. Fix it, then run `{reactivate}`");
            }
            let node = wait_ready(c, id, deadline).await?;
            set_availability(c, &node.id, Availability::Active).await?;
            println!("{id}: active again");
        }
        None if std::io::stdin().is_terminal() => {
            println!("{id}: drained. Upgrade it now, then press Enter to re-activate it (or Ctrl-C and later run `{reactivate}`)");
            let mut line = String::new();
            tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line))
                .await
                .context("waiting for Enter")?
                .context("reading stdin")?;
            let node = wait_ready(c, id, deadline.max(Instant::now() + args.timeout)).await?;
            set_availability(c, &node.id, Availability::Active).await?;
            println!("{id}: active again");
        }
        None => println!("{id}: drained. Upgrade it now, then run `{reactivate}`"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn set_availability(c: &Client, id: &str, availability: Availability) -> anyhow::Result<()> {
    c.update_node(
        id,
        &NodeUpdate {
            availability: Some(availability),
            ..NodeUpdate::default()
        },
    )
    .await
    .with_context(|| format!("setting {id} to {}", availability.as_str()))?;
    Ok(())
}

/// Waits until the node's agent is back and heartbeating.
async fn wait_ready(c: &Client, id: &str, deadline: Instant) -> anyhow::Result<Node> {
    loop {
        // The manager may itself be restarting during an upgrade: keep asking.
        match c.node(id).await {
            Ok(node) if node.state == NodeState::Ready => return Ok(node),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "waiting for the node"),
        }
        if Instant::now() > deadline {
            bail!("{id} did not come back ready in time; it stays drained");
        }
        tokio::time::sleep(POLL).await;
    }
}
