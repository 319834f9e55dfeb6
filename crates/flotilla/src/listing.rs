//! Read-only commands: `service ls|inspect|history`, `ps`, `node ls`, `logs`, `events`.

use crate::cli::OutputArgs;
use crate::output::{ago, json, table, Format};
use anyhow::bail;
use clap::Args;
use flotilla_client::Client;
use flotilla_types::{format_ts, units::format_bytes, DesiredState, Task};
use futures::StreamExt;
use std::io::Write;
use std::process::ExitCode;

pub async fn service_ls(c: &Client, out: OutputArgs) -> anyhow::Result<ExitCode> {
    let services = c.services().await?;
    if out.format == Format::Json {
        json(&services)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.mode.clone(),
                s.driver.to_string(),
                format!("{}/{}", s.ready, s.desired),
                s.revision.to_string(),
                s.ports.clone(),
                s.image_or_command.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "MODE",
            "DRIVER",
            "READY",
            "REV",
            "PORTS",
            "IMAGE/COMMAND",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn service_inspect(c: &Client, name: &str, out: OutputArgs) -> anyhow::Result<ExitCode> {
    let detail = c.service(name).await?;
    if out.format == Format::Json {
        json(&detail)?;
        return Ok(ExitCode::SUCCESS);
    }
    let s = &detail.summary;
    println!("Name:      {}", s.name);
    println!("Revision:  {}", s.revision);
    println!(
        "Mode:      {} ({} desired, {} running, {} ready)",
        s.mode, s.desired, s.running, s.ready
    );
    println!("Driver:    {}", s.driver);
    println!("Run:       {}", s.image_or_command);
    println!("Spec:");
    println!("{}", serde_json::to_string_pretty(&detail.service.spec)?);
    println!("Tasks:");
    let mesh = crate::mesh_cmd::ps_notes(c, &detail.tasks).await;
    print_tasks(&detail.tasks, true, &mesh);
    Ok(ExitCode::SUCCESS)
}

pub async fn service_history(c: &Client, name: &str, out: OutputArgs) -> anyhow::Result<ExitCode> {
    let revs = c.revisions(name).await?;
    if out.format == Format::Json {
        json(&revs)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = revs
        .iter()
        .map(|r| {
            vec![
                r.number.to_string(),
                format_ts(r.created_at),
                r.created_by.clone(),
                r.change.clone(),
            ]
        })
        .collect();
    table(&["REV", "CREATED", "BY", "CHANGE"], &rows);
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Only this service's tasks.
    pub service: Option<String>,
    /// Include finished tasks (history), not only those meant to be running.
    #[arg(short, long)]
    pub all: bool,
    #[command(flatten)]
    pub out: OutputArgs,
}

pub async fn ps(c: &Client, args: &PsArgs) -> anyhow::Result<ExitCode> {
    if let Some(svc) = &args.service {
        // A clear error for a typo, rather than an empty table.
        c.service(svc).await?;
    }
    let tasks: Vec<Task> = c
        .tasks(args.service.as_deref(), None)
        .await?
        .into_iter()
        .filter(|t| args.all || t.desired_state == DesiredState::Running)
        .collect();
    if args.out.format == Format::Json {
        json(&tasks)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mesh = crate::mesh_cmd::ps_notes(c, &tasks).await;
    print_tasks(&tasks, args.all, &mesh);
    Ok(ExitCode::SUCCESS)
}

/// `mesh` holds the MESH column (weight, breakers) per task id.
fn print_tasks(
    tasks: &[Task],
    with_desired: bool,
    mesh: &std::collections::BTreeMap<String, String>,
) {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            let ports = t
                .status
                .ports
                .iter()
                .map(|p| format!("{}->{}", p.host_port, p.target))
                .collect::<Vec<_>>()
                .join(",");
            let runtime = match (&t.status.container_id, t.status.pid) {
                (Some(c), _) => c.chars().take(12).collect(),
                (None, Some(pid)) => format!("pid {pid}"),
                _ => "-".into(),
            };
            let mut row = vec![
                t.id.chars().take(12).collect(),
                t.name(),
                t.node.clone().unwrap_or_else(|| "-".into()),
                format!("{} {}", t.status.state, ago(t.status.since)),
                t.status.health.as_str().to_string(),
                if ports.is_empty() { "-".into() } else { ports },
                runtime,
                mesh.get(&t.id).cloned().unwrap_or_else(|| "-".into()),
                t.status.message.clone(),
            ];
            if with_desired {
                row.insert(3, format!("{:?}", t.desired_state).to_lowercase());
            }
            row
        })
        .collect();
    let mut header = vec![
        "ID",
        "NAME",
        "NODE",
        "STATE",
        "HEALTH",
        "PORTS",
        "PID/CONTAINER",
        "MESH",
        "MESSAGE",
    ];
    if with_desired {
        header.insert(3, "DESIRED");
    }
    table(&header, &rows);
}

pub async fn node_ls(c: &Client, out: OutputArgs) -> anyhow::Result<ExitCode> {
    let nodes = c.nodes().await?;
    if out.format == Format::Json {
        json(&nodes)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.hostname.clone(),
                format!("{:?}", n.role).to_lowercase(),
                format!("{:?}", n.state).to_lowercase(),
                format!("{:?}", n.availability).to_lowercase(),
                n.drivers
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                format!("{:.1}", n.resources.cpu_millis as f64 / 1000.0),
                format_bytes(n.resources.memory_bytes),
                if n.labels.is_empty() {
                    "-".to_string()
                } else {
                    n.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                },
                node_message(n),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "HOSTNAME",
            "ROLE",
            "STATE",
            "AVAILABILITY",
            "DRIVERS",
            "CPUS",
            "MEMORY",
            "LABELS",
            "MESSAGE",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

/// The node's message, plus the published ports its mesh cannot serve (they would otherwise
/// be visible only in the agent's log).
fn node_message(n: &flotilla_types::Node) -> String {
    let ports = n
        .port_conflicts
        .iter()
        .map(|c| format!("mesh: {c}"))
        .collect::<Vec<_>>()
        .join("; ");
    match (n.message.is_empty(), ports.is_empty()) {
        (_, true) => n.message.clone(),
        (true, false) => ports,
        (false, false) => format!("{}; {ports}", n.message),
    }
}

pub async fn node_inspect(c: &Client, id: &str, out: OutputArgs) -> anyhow::Result<ExitCode> {
    let n = c.node(id).await?;
    if out.format == Format::Json {
        json(&n)?;
        return Ok(ExitCode::SUCCESS);
    }
    let or_dash = |s: Option<String>| s.unwrap_or_else(|| "-".to_string());
    println!("ID:            {}", n.id);
    println!("Hostname:      {}", n.hostname);
    println!("Role:          {:?}", n.role);
    println!("State:         {:?}", n.state);
    println!("Availability:  {:?}", n.availability);
    println!("Agent address: {}", or_dash(n.agent_addr.clone()));
    println!(
        "Advertise IP:  {}",
        or_dash(n.advertise_ip.map(|ip| ip.to_string()))
    );
    println!(
        "Resources:     {:.1} cpus, {}",
        n.resources.cpu_millis as f64 / 1000.0,
        format_bytes(n.resources.memory_bytes)
    );
    let drivers: Vec<String> = n.drivers.iter().map(|d| d.to_string()).collect();
    println!("Drivers:       {}", drivers.join(","));
    for (k, v) in &n.labels {
        println!("Label:         {k}={v}");
    }
    if !n.message.is_empty() {
        println!("Message:       {}", n.message);
    }
    if n.port_conflicts.is_empty() {
        println!("Mesh ports:    all published ports served");
    }
    for c in &n.port_conflicts {
        println!("Mesh ports:    NOT SERVED: {c}");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// A task id (or unique prefix), a task name like `web.2`, or a service name.
    pub target: String,
    /// Keep printing new output.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines of each task.
    #[arg(long)]
    pub tail: Option<usize>,
}

pub async fn logs(c: &Client, args: &LogsArgs) -> anyhow::Result<ExitCode> {
    let service_tasks: Vec<Task> = match c.service(&args.target).await {
        Ok(detail) => detail
            .tasks
            .into_iter()
            // Finished tasks too: their nodes keep their logs while `ps --all` lists them.
            .filter(|t| t.node.is_some())
            .collect(),
        Err(e) if e.code() == Some("not_found") => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if service_tasks.is_empty() {
        let task = c.task(&args.target).await?;
        let mut stream = c.logs(&task.id, args.tail, args.follow).await?;
        let mut stdout = std::io::stdout();
        while let Some(chunk) = stream.next().await {
            stdout.write_all(&chunk?)?;
            stdout.flush()?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    // A service: every task's output (running and finished, as `ps --all` lists them), each
    // line prefixed with the task name. A task that has not started yet has none.
    let mut streams = Vec::new();
    for t in &service_tasks {
        let name = t.name();
        match c.logs(&t.id, args.tail, args.follow).await {
            Ok(s) => streams.push(prefix_lines(s, name)),
            Err(e) if e.code() == Some("not_found") => {}
            // A finished task on a node that is down: say so, show the others.
            Err(e) if t.desired_state != DesiredState::Running => eprintln!("{name}: {e}"),
            Err(e) => return Err(e.into()),
        }
    }
    let mut merged = futures::stream::select_all(streams);
    let mut stdout = std::io::stdout();
    while let Some(line) = merged.next().await {
        stdout.write_all(line?.as_bytes())?;
        stdout.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

fn prefix_lines(
    stream: futures::stream::BoxStream<'static, Result<bytes::Bytes, flotilla_client::ClientError>>,
    name: String,
) -> futures::stream::BoxStream<'static, anyhow::Result<String>> {
    futures::stream::unfold(
        (stream, Vec::<u8>::new(), name),
        |(mut s, mut buf, name)| async move {
            loop {
                if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let text = format!("{name} | {}", String::from_utf8_lossy(&line));
                    return Some((Ok(text), (s, buf, name)));
                }
                match s.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => return Some((Err(e.into()), (s, Vec::new(), name))),
                    None if buf.is_empty() => return None,
                    None => {
                        let text = format!("{name} | {}\n", String::from_utf8_lossy(&buf));
                        buf.clear();
                        return Some((Ok(text), (s, buf, name)));
                    }
                }
            }
        },
    )
    .boxed()
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new events.
    #[arg(short, long)]
    pub follow: bool,
    /// Only events after this store revision.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    #[command(flatten)]
    pub out: OutputArgs,
}

pub async fn events(c: &Client, args: &EventsArgs) -> anyhow::Result<ExitCode> {
    let mut stream = c.events(args.since, args.follow).await?;
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        if args.out.format == Format::Json {
            println!("{}", serde_json::to_string(&ev)?);
        } else {
            println!(
                "{}  {:<7} {:<8} {:<24} {:<9} {}",
                format_ts(ev.at),
                format!("{:?}", ev.level).to_lowercase(),
                ev.kind,
                ev.object,
                ev.action,
                ev.message
            );
        }
    }
    if args.follow {
        bail!("the event stream closed (manager stopped?)");
    }
    Ok(ExitCode::SUCCESS)
}
