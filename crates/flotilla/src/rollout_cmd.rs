//! `flotilla rollout status|pause|resume|promote|abort`, `flotilla service restart` and
//! `flotilla rollback`: the operator's handles on a service's release.

use crate::output::{self, Format};
use anyhow::bail;
use clap::{Args, Subcommand};
use flotilla_client::Client;
use flotilla_types::release::RollbackRequest;
use flotilla_types::{Rollout, RolloutAction, RolloutKind, RolloutPhase};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Where the service's release stands: phase, weights, counts, analysis.
    Status {
        name: String,
        #[command(flatten)]
        out: crate::cli::OutputArgs,
    },
    /// Stop starting new tasks (tasks already starting finish).
    Pause { name: String },
    /// Continue a paused rollout (failures so far are forgiven).
    Resume { name: String },
    /// Blue-green: finish a release waiting for promotion. Canary: go to 100% now.
    Promote { name: String },
    /// Return all traffic to the previous revision and roll back to it.
    Abort { name: String },
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    pub name: String,
    /// Return once the restart is accepted.
    #[arg(short, long)]
    pub detach: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    pub name: String,
    /// The revision to return to (default: the newest earlier one that differs).
    #[arg(long)]
    pub to: Option<u64>,
    /// Return once the rollback is accepted.
    #[arg(short, long)]
    pub detach: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub async fn rollout(c: &Client, cmd: &RolloutCommand) -> anyhow::Result<ExitCode> {
    let (name, action) = match cmd {
        RolloutCommand::Status { name, out } => {
            let r = c.rollout(name).await?;
            match out.format {
                Format::Json => output::json(&r)?,
                Format::Table => print_status(&r),
            }
            return Ok(ExitCode::SUCCESS);
        }
        RolloutCommand::Pause { name } => (name, RolloutAction::Pause),
        RolloutCommand::Resume { name } => (name, RolloutAction::Resume),
        RolloutCommand::Promote { name } => (name, RolloutAction::Promote),
        RolloutCommand::Abort { name } => (name, RolloutAction::Abort),
    };
    let r = c.rollout_action(name, action).await?;
    println!("{name}: {action:?} requested ({})", describe(&r));
    Ok(ExitCode::SUCCESS)
}

pub async fn restart(c: &Client, args: &RestartArgs) -> anyhow::Result<ExitCode> {
    let r = c.restart_service(&args.name).await?;
    println!(
        "{}: restart of revision {} started",
        args.name, r.to_revision
    );
    if args.detach {
        return Ok(ExitCode::SUCCESS);
    }
    follow(c, &args.name, r.to_revision, args.timeout).await
}

pub async fn rollback(c: &Client, args: &RollbackArgs) -> anyhow::Result<ExitCode> {
    let resp = c
        .rollback(
            &args.name,
            &RollbackRequest {
                to: args.to,
                requested_by: crate::deploy::requester(),
            },
        )
        .await?;
    let Some(entry) = resp.plan.first() else {
        bail!("the manager returned an empty plan");
    };
    println!(
        "{}: revision {} ({})",
        args.name, entry.revision, entry.change
    );
    if args.detach {
        return Ok(ExitCode::SUCCESS);
    }
    follow(c, &args.name, entry.revision, args.timeout).await
}

/// Prints the release of `name` to `revision` as it changes until it ends: exit 0 when it
/// succeeded, 1 when it was rolled back, paused or timed out.
pub async fn follow(
    c: &Client,
    name: &str,
    revision: u64,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        if started.elapsed() > timeout {
            bail!(
                "{name}: the release did not finish within {}",
                humantime::format_duration(timeout)
            );
        }
        match c.rollout(name).await {
            Ok(r) => {
                let line = describe(&r);
                if line != last {
                    println!("{name}: {line}");
                    last = line;
                }
                if let Some(code) = outcome(&r, revision) {
                    return Ok(code);
                }
            }
            // No rollout recorded yet: the controllers have not seen the new revision.
            Err(flotilla_client::ClientError::Api { status: 404, .. }) => {}
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `Some(exit code)` once the release of `revision` has ended.
pub fn outcome(r: &Rollout, revision: u64) -> Option<ExitCode> {
    if r.kind == RolloutKind::AutoRollback && r.from_revision == revision {
        return Some(ExitCode::FAILURE);
    }
    if r.to_revision != revision {
        // A newer revision replaced ours.
        return (r.to_revision > revision).then_some(ExitCode::FAILURE);
    }
    if r.paused {
        return Some(ExitCode::FAILURE);
    }
    match r.phase {
        RolloutPhase::Succeeded => Some(ExitCode::SUCCESS),
        RolloutPhase::RolledBack | RolloutPhase::Superseded => Some(ExitCode::FAILURE),
        _ => None,
    }
}

/// One line: what, where, weights, counts, last analysis.
pub fn describe(r: &Rollout) -> String {
    let what = match r.kind {
        RolloutKind::Update => format!(
            "{} {}→{}",
            r.strategy.as_str(),
            r.from_revision,
            r.to_revision
        ),
        RolloutKind::Restart => format!("restart of revision {}", r.to_revision),
        RolloutKind::AutoRollback => format!("ROLLED BACK {}→{}", r.from_revision, r.to_revision),
    };
    let mut line = format!(
        "{what}: {}{} new weight {}%, {} updated, {} failed",
        r.phase.as_str(),
        if r.phase == RolloutPhase::CanaryStep {
            format!(" {}", r.step + 1)
        } else {
            String::new()
        },
        r.new_weight,
        r.updated,
        r.failed
    );
    if r.paused {
        line.push_str(", PAUSED");
    }
    if let Some(a) = r.analysis.last() {
        line.push_str(&format!(
            ", analysis step {}: {} ({})",
            a.step + 1,
            if a.passed { "pass" } else { "FAIL" },
            a.message
        ));
    }
    if !r.reason.is_empty() {
        line.push_str(&format!(" — {}", r.reason));
    }
    line
}

fn print_status(r: &Rollout) {
    println!("Service:    {}", r.service);
    println!("Release:    {}", describe(r));
    println!("Started:    {} ago", output::ago(r.started_at));
    if let Some(f) = r.finished_at {
        println!("Finished:   {} ago", output::ago(f));
    }
    if !r.analysis.is_empty() {
        let rows: Vec<Vec<String>> = r
            .analysis
            .iter()
            .map(|a| {
                vec![
                    (a.step + 1).to_string(),
                    a.requests.to_string(),
                    a.errors.to_string(),
                    a.success_rate
                        .map_or_else(|| "-".into(), |s| format!("{s:.2}%")),
                    format!("{:.0}", a.p99_ms),
                    if a.passed { "pass" } else { "FAIL" }.into(),
                ]
            })
            .collect();
        output::table(
            &["STEP", "REQUESTS", "ERRORS", "SUCCESS", "P99 MS", "RESULT"],
            &rows,
        );
    }
}
