//! `flotilla demo-image`, `flotilla top` and `flotilla service update-resources`: the commands
//! that go with the docker driver (the last two work for process tasks too).

use crate::output::{self, Format};
use anyhow::{bail, Context};
use clap::Args;
use flotilla_agent::docker::DockerDriver;
use flotilla_agent::docker_image::{build_image, ImageRecipe, DEMO_IMAGE};
use flotilla_client::Client;
use flotilla_types::units::{format_bytes, parse_bytes, parse_cpus};
use flotilla_types::{DesiredState, TaskState};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct DemoImageArgs {
    /// Tag of the image to build.
    #[arg(long, default_value = DEMO_IMAGE)]
    pub tag: String,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    pub service: String,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct UpdateResourcesArgs {
    pub service: String,
    /// New memory limit, e.g. 128m.
    #[arg(long, value_parser = |s: &str| parse_bytes(s).map_err(|e| e.to_string()))]
    pub memory: Option<u64>,
    /// New cpu limit, e.g. 0.5.
    #[arg(long, value_parser = |s: &str| parse_cpus(s).map_err(|e| e.to_string()))]
    pub cpus: Option<u64>,
}

/// Builds the demo image (busybox + this binary) on the local engine.
pub async fn demo_image(args: &DemoImageArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the running flotilla binary")?;
    let docker = DockerDriver::detect("local", "local")
        .await?
        .context("no Docker Engine answers at DOCKER_HOST or /var/run/docker.sock")?;
    let recipe = ImageRecipe {
        tag: args.tag.clone(),
        ..ImageRecipe::demo(exe)
    };
    let built = build_image(docker.client(), &recipe).await?;
    println!("{built}");
    Ok(ExitCode::SUCCESS)
}

/// Tasks of `service` that are running and meant to keep running.
async fn running_tasks(c: &Client, service: &str) -> anyhow::Result<Vec<flotilla_types::Task>> {
    let tasks = c.tasks(Some(service), None).await?;
    Ok(tasks
        .into_iter()
        .filter(|t| {
            t.desired_state == DesiredState::Running && t.status.state == TaskState::Running
        })
        .collect())
}

/// One row per running task: cpu % and memory against its limit.
pub async fn top(c: &Client, args: &TopArgs) -> anyhow::Result<ExitCode> {
    let tasks = running_tasks(c, &args.service).await?;
    if tasks.is_empty() {
        bail!("service {} has no running tasks", args.service);
    }
    let samples = futures::future::join_all(tasks.iter().map(|t| c.task_stats(&t.id))).await;
    let mut stats = Vec::new();
    let mut rows = Vec::new();
    for (task, sample) in tasks.iter().zip(samples) {
        match sample {
            Ok(s) => {
                let limit = s.memory_limit_bytes.map_or("-".to_string(), format_bytes);
                rows.push(vec![
                    task.name(),
                    task.id.clone(),
                    format!("{:.1}%", s.cpu_percent),
                    format!("{} / {limit}", format_bytes(s.memory_bytes)),
                ]);
                stats.push(s);
            }
            Err(e) => rows.push(vec![
                task.name(),
                task.id.clone(),
                format!("error: {e}"),
                String::new(),
            ]),
        }
    }
    match args.format {
        Format::Json => output::json(&stats)?,
        Format::Table => output::table(&["TASK", "ID", "CPU %", "MEMORY / LIMIT"], &rows),
    }
    Ok(ExitCode::SUCCESS)
}

/// Changes the limits of every running task of a service in place.
pub async fn update_resources(c: &Client, args: &UpdateResourcesArgs) -> anyhow::Result<ExitCode> {
    if args.memory.is_none() && args.cpus.is_none() {
        bail!("give --memory and/or --cpus");
    }
    let tasks = running_tasks(c, &args.service).await?;
    if tasks.is_empty() {
        bail!("service {} has no running tasks", args.service);
    }
    for task in tasks {
        let mut resources = task.spec.resources;
        if let Some(m) = args.memory {
            resources.limits.memory_bytes = Some(m);
        }
        if let Some(cpus) = args.cpus {
            resources.limits.cpu_millis = Some(cpus);
        }
        c.update_task_resources(&task.id, &resources)
            .await
            .with_context(|| format!("task {} ({})", task.name(), task.id))?;
        println!("{} ({}) updated", task.name(), task.id);
    }
    Ok(ExitCode::SUCCESS)
}
