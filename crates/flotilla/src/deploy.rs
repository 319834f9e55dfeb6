//! `flotilla deploy`: parse and validate a Compose file locally, send it, then follow the
//! rollout over the watch stream until every service has converged or failed. A release shows
//! its phase, weights, counts and canary analysis; a rollback or abort exits non-zero.

use crate::cli::{client, Cli};
use anyhow::{bail, Context};
use clap::Args;
use flotilla_client::{Client, Mirror};
use flotilla_types::api::{DeployRequest, DeployResponse, PlanAction};
use flotilla_types::{DesiredState, ServiceMode, ServiceSpec, TaskState};
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

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
    follow(&c, &names, &updated, args.timeout).await
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

/// How one service's rollout stands.
#[derive(Debug, PartialEq)]
enum Progress {
    Waiting {
        ready: u64,
        desired: u64,
        note: String,
    },
    Done {
        ready: u64,
    },
    Failed(String),
}

fn progress(mirror: &Mirror, name: &str, started_ms: i64) -> Progress {
    let Some(svc) = mirror.services.get(name) else {
        return Progress::Waiting {
            ready: 0,
            desired: 0,
            note: "waiting for the service to appear".into(),
        };
    };
    let tasks: Vec<_> = mirror
        .tasks
        .values()
        .filter(|t| t.service == name)
        .collect();
    let desired = match svc.spec.mode {
        ServiceMode::Replicated { replicas } => replicas,
        ServiceMode::Global => mirror.nodes.len() as u64,
    };
    let live: Vec<_> = tasks
        .iter()
        .filter(|t| t.desired_state == DesiredState::Running && !t.status.state.is_terminal())
        .collect();
    let ready = live
        .iter()
        .filter(|t| t.spec.task_template_eq(&svc.spec) && t.is_ready())
        .count() as u64;
    let outdated = live.iter().any(|t| !t.spec.task_template_eq(&svc.spec));
    let failures: Vec<_> = tasks
        .iter()
        .filter(|t| {
            t.meta.created_at >= started_ms
                && t.spec.task_template_eq(&svc.spec)
                && matches!(t.status.state, TaskState::Failed | TaskState::Rejected)
        })
        .collect();
    // A dead task still desired running was not replaced: the restart policy gave up.
    if let Some(stuck) = failures
        .iter()
        .find(|t| t.desired_state == DesiredState::Running)
    {
        return Progress::Failed(format!(
            "{} failed and will not be restarted: {}",
            stuck.name(),
            stuck.status.message
        ));
    }
    if failures.len() as u64 >= desired.max(3) {
        let last = failures
            .iter()
            .max_by_key(|t| t.status.since)
            .map(|t| t.status.message.clone())
            .unwrap_or_default();
        return Progress::Failed(format!(
            "{} task failures since the deploy started; last: {last}",
            failures.len()
        ));
    }
    if ready >= desired && !outdated && live.len() as u64 == desired {
        return Progress::Done { ready };
    }
    let note = live
        .iter()
        .filter(|t| !t.status.message.is_empty() && !t.is_ready())
        .map(|t| format!("{}: {}", t.name(), t.status.message))
        .next()
        .unwrap_or_default();
    Progress::Waiting {
        ready,
        desired,
        note,
    }
}

/// The release of `revision` as the deploy reports it, while one is under way or once it
/// failed; `None` defers to the task counts.
fn release_progress(mirror: &Mirror, name: &str, revision: u64) -> Option<Progress> {
    let r = mirror.rollouts.get(name)?;
    let mine = r.to_revision == revision
        || (r.kind == flotilla_types::RolloutKind::AutoRollback && r.from_revision == revision);
    if !mine {
        return None;
    }
    let line = crate::rollout_cmd::describe(r);
    match crate::rollout_cmd::outcome(r, revision) {
        Some(code) if code == ExitCode::FAILURE => Some(Progress::Failed(line)),
        Some(_) => None,
        None => Some(Progress::Waiting {
            ready: r.updated,
            desired: match mirror.services.get(name).map(|s| &s.spec.mode) {
                Some(ServiceMode::Replicated { replicas }) => *replicas,
                _ => r.updated,
            },
            note: line,
        }),
    }
}

async fn follow(
    c: &Client,
    names: &[String],
    updated: &BTreeMap<String, u64>,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let started_ms = flotilla_types::now_ms() - 1000;
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>16} [{bar:20}] {pos}/{len} {msg}")
        .context("progress template")?
        .progress_chars("=> ");
    let bars: BTreeMap<&str, ProgressBar> = names
        .iter()
        .map(|n| {
            let bar = multi.add(ProgressBar::new(0));
            bar.set_style(style.clone());
            bar.set_prefix(n.clone());
            (n.as_str(), bar)
        })
        .collect();
    let mut mirror = Mirror::default();
    let mut stream = c.watch(None, None).await?;
    let mut outcome: BTreeMap<&str, Progress> = BTreeMap::new();
    loop {
        let remaining = timeout.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            for b in bars.values() {
                b.abandon();
            }
            for n in names {
                if let Some(p) = outcome.get(n.as_str()) {
                    eprintln!("{n}: {p:?}");
                }
            }
            bail!(
                "deploy did not converge within {}",
                humantime::format_duration(timeout)
            );
        }
        let msg = match tokio::time::timeout(remaining, stream.next()).await {
            Ok(Some(m)) => m?,
            Ok(None) => bail!("the manager closed the watch stream"),
            Err(_) => continue,
        };
        mirror.apply(msg);
        let mut all_done = true;
        for n in names {
            let p = updated
                .get(n)
                .and_then(|rev| release_progress(&mirror, n, *rev))
                .unwrap_or_else(|| progress(&mirror, n, started_ms));
            let bar = &bars[n.as_str()];
            match &p {
                Progress::Waiting {
                    ready,
                    desired,
                    note,
                } => {
                    all_done = false;
                    bar.set_length(*desired);
                    bar.set_position(*ready);
                    bar.set_message(note.clone());
                }
                Progress::Done { ready } => {
                    bar.set_length(*ready);
                    bar.set_position(*ready);
                    bar.finish_with_message("ready");
                }
                Progress::Failed(why) => {
                    bar.abandon_with_message(why.clone());
                    drop(multi);
                    println!("{n}: FAILED: {why}");
                    return Ok(ExitCode::FAILURE);
                }
            }
            outcome.insert(n.as_str(), p);
        }
        if all_done {
            drop(multi);
            for n in names {
                if let Some(Progress::Done { ready }) = outcome.get(n.as_str()) {
                    println!("{n}: {ready} task(s) ready");
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
    }
}
