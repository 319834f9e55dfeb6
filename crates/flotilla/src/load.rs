//! `flotilla bench load`: constant-rate, open-loop HTTP GETs, to measure what a release costs
//! the clients. Requests start on schedule whether or not earlier ones have answered (so a
//! stall shows up as timeouts and latency, not as a lower rate), and every outcome is counted.

use crate::output::{self, Format};
use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The URL to GET.
    #[arg(long)]
    pub url: String,
    /// Requests per second.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// How long to send (e.g. 30s, 2m). SIGINT or SIGTERM stops sending earlier; the report
    /// then covers what was sent.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Per-request timeout.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub out: crate::cli::OutputArgs,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The TCP connection could not be made (refused, reset while connecting).
    Connect,
    Timeout,
    Status5xx,
    Status4xx,
    /// The connection broke after it was made (reset, truncated body, …).
    Other,
}

/// What `bench load -o json` prints.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub url: String,
    pub rate: u32,
    pub duration_ms: u64,
    pub sent: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub failures: BTreeMap<FailureKind, u64>,
    /// Successful answers by the `version` field of a JSON body (the demo app reports one).
    pub versions: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

enum Outcome {
    Ok {
        latency: Duration,
        version: Option<String>,
    },
    Failed(FailureKind),
}

async fn one(client: &reqwest::Client, url: &str) -> Outcome {
    let start = Instant::now();
    let resp = match client.get(url).send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Outcome::Failed(FailureKind::Timeout),
        Err(e) if e.is_connect() => return Outcome::Failed(FailureKind::Connect),
        Err(_) => return Outcome::Failed(FailureKind::Other),
    };
    let status = resp.status();
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) if e.is_timeout() => return Outcome::Failed(FailureKind::Timeout),
        Err(_) => return Outcome::Failed(FailureKind::Other),
    };
    if status.is_server_error() {
        return Outcome::Failed(FailureKind::Status5xx);
    }
    if status.is_client_error() {
        return Outcome::Failed(FailureKind::Status4xx);
    }
    let version = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("version").and_then(|v| v.as_str()).map(String::from));
    Outcome::Ok {
        latency: start.elapsed(),
        version,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Sends the load and collects the report.
pub async fn generate(args: &LoadArgs) -> anyhow::Result<LoadReport> {
    if args.rate == 0 {
        bail!("--rate must be at least 1 request per second");
    }
    if args.duration.is_zero() {
        bail!("--duration must be greater than 0");
    }
    reqwest::Url::parse(&args.url).with_context(|| format!("--url {:?}", args.url))?;
    let client = reqwest::Client::builder()
        .timeout(args.timeout)
        .build()
        .context("building the HTTP client")?;
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let mut ticker = tokio::time::interval(period);
    // Open loop: a late tick fires at once rather than thinning the schedule.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = (args.duration.as_secs_f64() * f64::from(args.rate)).round() as u64;
    let started = Instant::now();
    let mut inflight = tokio::task::JoinSet::new();
    let mut stop = std::pin::pin!(stop_signal());
    let mut sent = 0u64;
    while sent < total {
        tokio::select! {
            _ = ticker.tick() => {}
            // Requests already sent still count: their outcome is part of the report.
            _ = &mut stop => break,
        }
        sent += 1;
        let client = client.clone();
        let url = args.url.clone();
        inflight.spawn(async move { one(&client, &url).await });
    }
    let mut report = LoadReport {
        url: args.url.clone(),
        rate: args.rate,
        duration_ms: 0,
        sent,
        succeeded: 0,
        failed: 0,
        failures: BTreeMap::new(),
        versions: BTreeMap::new(),
        p50_ms: 0.0,
        p90_ms: 0.0,
        p99_ms: 0.0,
    };
    let mut latencies = Vec::with_capacity(usize::try_from(sent).unwrap_or(0));
    while let Some(done) = inflight.join_next().await {
        match done.context("a request task panicked")? {
            Outcome::Ok { latency, version } => {
                report.succeeded += 1;
                latencies.push(latency);
                if let Some(v) = version {
                    *report.versions.entry(v).or_default() += 1;
                }
            }
            Outcome::Failed(kind) => {
                report.failed += 1;
                *report.failures.entry(kind).or_default() += 1;
            }
        }
    }
    report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    latencies.sort_unstable();
    report.p50_ms = percentile(&latencies, 50.0);
    report.p90_ms = percentile(&latencies, 90.0);
    report.p99_ms = percentile(&latencies, 99.0);
    Ok(report)
}

/// Resolves on SIGINT or SIGTERM (a test or a user ending the load early); never when the
/// handlers cannot be installed.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

pub async fn run(args: &LoadArgs) -> anyhow::Result<ExitCode> {
    let report = generate(args).await?;
    match args.out.format {
        Format::Json => output::json(&report)?,
        Format::Table => {
            println!(
                "{} requests to {} at {}/s in {:.1}s: {} ok, {} failed",
                report.sent,
                report.url,
                report.rate,
                report.duration_ms as f64 / 1000.0,
                report.succeeded,
                report.failed
            );
            for (kind, n) in &report.failures {
                println!("  failed {kind:?}: {n}");
            }
            for (v, n) in &report.versions {
                println!("  version {v}: {n}");
            }
            println!(
                "latency p50 {:.1}ms  p90 {:.1}ms  p99 {:.1}ms",
                report.p50_ms, report.p90_ms, report.p99_ms
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_ranked_sample() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50.0), 51.0);
        assert_eq!(percentile(&samples, 99.0), 99.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }

    #[tokio::test]
    async fn counts_successes_and_refused_connections() {
        // The real demo app, and a port nothing listens on.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = flotilla_demo::DemoConfig {
            port: addr.port(),
            version: "v7".into(),
            task_id: "t".into(),
            fail_health: false,
            error_rate: 0.0,
            latency: Duration::ZERO,
            exit_after: None,
            alloc_mb: 0,
        };
        let server = tokio::spawn(flotilla_demo::serve(listener, cfg, std::future::pending()));
        let args = |url: String| LoadArgs {
            url,
            rate: 100,
            duration: Duration::from_millis(300),
            timeout: Duration::from_secs(5),
            out: crate::cli::OutputArgs {
                format: Format::Json,
            },
        };
        let ok = generate(&args(format!("http://{addr}/"))).await.unwrap();
        assert_eq!(ok.sent, 30);
        assert_eq!(ok.succeeded, 30, "{ok:?}");
        assert_eq!(ok.versions.get("v7"), Some(&30));
        server.abort();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap();
        drop(closed);
        let bad = generate(&args(format!("http://{dead}/"))).await.unwrap();
        assert_eq!(bad.failed, 30);
        assert_eq!(bad.failures.get(&FailureKind::Connect), Some(&30));
    }
}
