//! `flotilla deploy`: parse and validate a Compose file locally, send it, then follow the
//! rollout (`crate::follow`) until every service has converged and every node's mesh routes
//! it, or until one failed. A release shows its phase, weights, counts and canary analysis; a
//! rollback or abort exits non-zero.

use crate::cli::{client, Cli, ScaleArgs};
use clap::Args;
use flotilla_client::Client;
use flotilla_types::api::{DeployRequest, DeployResponse, PlanAction};
use flotilla_types::{ServiceMode, ServiceSpec};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The Compose file.
    #[arg(short = 'f', long = "file", required = true)]
    pub file: PathBuf,
    /// Validate and print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Return once the change is accepted, without waiting for convergence.
    #[arg(short, long)]
    pub detach: bool,
    /// Give up waiting after this long (e.g. 90s, 5m).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub async fn run(cli: &Cli, args: &DeployArgs) -> anyhow::Result<ExitCode> {
    let compose = flotilla_compose::load(&args.file).map_err(|e| anyhow::anyhow!("{e}"))?;
    for w in &compose.warnings {
        eprintln!("warning: {}: {}", w.field, w.message);
    }
    let c = client(cli)?;
    let req = DeployRequest {
        services: compose.services.clone(),
        dry_run: args.dry_run,
        requested_by: requester(),
    };
    if args.dry_run {
        print_local_plan(&compose.services);
        match c.deploy(&req).await {
            Ok(resp) => print_plan(&resp),
            Err(flotilla_client::ClientError::Connect { addr, .. }) => {
                println!("(no manager reachable at {addr}: the file is valid; nothing was compared against a cluster)")
            }
            Err(e) => return Err(e.into()),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let resp = c.deploy(&req).await?;
    print_plan(&resp);
    if args.detach {
        return Ok(ExitCode::SUCCESS);
    }
    let names: Vec<String> = compose.services.iter().map(|s| s.name.clone()).collect();
    let updated: BTreeMap<String, u64> = resp
        .plan
        .iter()
        .filter(|e| e.action == PlanAction::Update)
        .map(|e| (e.service.clone(), e.revision))
        .collect();
    crate::follow::follow(&c, &names, &updated, args.timeout).await
}

/// `flotilla scale`: sets the replica counts, then (unless detached) waits like a deploy until
/// every scaled service has converged and every node's mesh routes its tasks.
pub async fn scale(c: &Client, args: &ScaleArgs) -> anyhow::Result<ExitCode> {
    for (name, n) in &args.targets {
        c.scale(name, *n).await?;
        println!("{name} scaled to {n}");
    }
    if args.detach {
        return Ok(ExitCode::SUCCESS);
    }
    let mut names: Vec<String> = args.targets.iter().map(|(n, _)| n.clone()).collect();
    names.sort_unstable();
    names.dedup();
    crate::follow::follow(c, &names, &BTreeMap::new(), args.timeout).await
}

pub fn requester() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

fn print_local_plan(services: &[ServiceSpec]) {
    println!("Validated {} service(s):", services.len());
    for s in services {
        let mode = match s.mode {
            ServiceMode::Replicated { replicas } => format!("{replicas} replica(s)"),
            ServiceMode::Global => "global".into(),
        };
        let run = match &s.image {
            Some(img) => img.clone(),
            None => s
                .entrypoint
                .iter()
                .chain(s.command.iter())
                .flatten()
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
        };
        println!("  {} [{}] {mode}: {run}", s.name, s.driver);
    }
}

fn print_plan(resp: &DeployResponse) {
    let verb = if resp.dry_run { "would" } else { "will" };
    for e in &resp.plan {
        let action = match e.action {
            PlanAction::Create => "create",
            PlanAction::Update => "update",
            PlanAction::Scale => "scale",
            PlanAction::Unchanged => "leave unchanged",
        };
        println!(
            "{}: {verb} {action} (revision {}; {})",
            e.service, e.revision, e.change
        );
    }
}
