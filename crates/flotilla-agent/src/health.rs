//! Health checks with Compose semantics.
//!
//! A task starts `starting`. A passing probe makes it `healthy` (and ends the start period early);
//! `retries` consecutive failures make it `unhealthy`; failures inside `start_period` do not count.
//! The first probe runs at once after the start, then (until a pass) every `start_interval` in
//! the start phase, then every `interval`; see [`Cadence`].
//! Only transitions are reported, through a channel, each with the last probe's reason.

use crate::driver::Driver;
use flotilla_mesh::conn_limits::caused_by_exhaustion;
use flotilla_types::{now_ms, Health, HealthCheck, HealthTest, PortBinding, Timestamp};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// A change of a task's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub task_id: String,
    pub health: Health,
    /// Why: the last failure's reason for `unhealthy`, empty otherwise.
    pub message: String,
    pub at: Timestamp,
}

/// The Compose health state machine, without any I/O.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    retries: u32,
    failures: u32,
    start_period_over: bool,
    health: Health,
}

impl HealthTracker {
    /// `retries` of 0 is treated as 1: one failure is needed to become unhealthy.
    pub fn new(retries: u32) -> Self {
        HealthTracker {
            retries: retries.max(1),
            failures: 0,
            start_period_over: false,
            health: Health::Starting,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Records one probe result; `in_start_period` says whether it ran inside `start_period`.
    /// Returns the new health when it changed.
    pub fn record(&mut self, passed: bool, in_start_period: bool) -> Option<Health> {
        let next = if passed {
            self.failures = 0;
            self.start_period_over = true;
            Health::Healthy
        } else if in_start_period && !self.start_period_over {
            self.health
        } else {
            self.failures += 1;
            if self.failures >= self.retries {
                Health::Unhealthy
            } else {
                self.health
            }
        };
        (next != self.health).then(|| {
            self.health = next;
            next
        })
    }
}

/// Runs a task's health check in the background until dropped.
pub struct HealthMonitor {
    handle: JoinHandle<()>,
}

impl HealthMonitor {
    /// Starts probing. The first report (`starting`) is sent immediately and the first probe
    /// runs at once (as Kubernetes' probes do); [`Cadence`] says when the next ones run. Stops
    /// by itself when `reports` is closed.
    pub fn spawn(
        task_id: String,
        check: HealthCheck,
        ports: Vec<PortBinding>,
        driver: Arc<dyn Driver>,
        reports: mpsc::UnboundedSender<HealthReport>,
    ) -> Self {
        let span = tracing::info_span!("health", task = %task_id);
        let handle = tokio::spawn(
            async move {
                let mut tracker = HealthTracker::new(check.retries);
                let report = |health, message: String| HealthReport {
                    task_id: task_id.clone(),
                    health,
                    message,
                    at: now_ms(),
                };
                if reports
                    .send(report(Health::Starting, String::new()))
                    .is_err()
                {
                    return;
                }
                let host_port = ports.first().map(|p| p.host_port);
                let mut cadence = Cadence::new(&check);
                loop {
                    let in_start_period = cadence.in_start_period();
                    let result = match probe_outcome(&check, host_port, &task_id, driver.as_ref())
                        .await
                    {
                        Outcome::Inconclusive(reason) => {
                            // The agent could not run the probe (out of descriptors and the
                            // like): that says nothing about the task, which must not be
                            // killed for it. Try again at the usual cadence.
                            tracing::warn!(%reason, "health probe could not run; not counted");
                            tokio::time::sleep(cadence.next_delay(&check, tracker.health())).await;
                            continue;
                        }
                        Outcome::Done(result) => result,
                    };
                    if let Err(reason) = &result {
                        tracing::debug!(%reason, "health probe failed");
                    }
                    if let Some(health) = tracker.record(result.is_ok(), in_start_period) {
                        tracing::info!(health = health.as_str(), "health changed");
                        let message = result.err().unwrap_or_default();
                        if reports.send(report(health, message)).is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(cadence.next_delay(&check, tracker.health())).await;
                }
            }
            .instrument(span),
        );
        HealthMonitor { handle }
    }
}

/// The first pause of the start phase; each next one doubles, up to `start_interval`.
const FIRST_START_DELAY: Duration = Duration::from_millis(100);

/// When probes run. The first runs at once; until the task first passes, inside its start
/// phase, they come every `start_interval` (the first few sooner, from 100 ms doubling, so a
/// task ready within a second is seen ready within a second); after that every `interval`.
///
/// The start phase lasts `start_period`, and at least one `interval`: Docker runs its first
/// probe only after one interval, so failures before then never counted, and still do not.
struct Cadence {
    started: Instant,
    phase: Duration,
    early: Duration,
}

impl Cadence {
    fn new(check: &HealthCheck) -> Self {
        Cadence {
            started: Instant::now(),
            phase: check.start_period.max(check.interval),
            early: FIRST_START_DELAY,
        }
    }

    /// Whether a probe now falls in the start phase (its failure does not count).
    fn in_start_period(&self) -> bool {
        self.started.elapsed() < self.phase
    }

    /// The pause before the next probe, given the task's health now.
    fn next_delay(&mut self, check: &HealthCheck, health: Health) -> Duration {
        if health != Health::Starting || !self.in_start_period() {
            return check.interval;
        }
        let cap = if check.start_interval.is_zero() {
            check.interval
        } else {
            check.start_interval.min(check.interval)
        };
        let delay = self.early.min(cap);
        self.early = self.early.saturating_mul(2);
        delay
    }
}

impl HealthMonitor {
    /// Relays health a runtime judges itself (see [`Driver::native_health`]) as reports, until
    /// dropped or the runtime stops reporting.
    pub fn forward(
        task_id: String,
        mut native: tokio::sync::watch::Receiver<Health>,
        reports: mpsc::UnboundedSender<HealthReport>,
    ) -> Self {
        let span = tracing::info_span!("native_health", task = %task_id);
        let handle = tokio::spawn(
            async move {
                loop {
                    let health = *native.borrow_and_update();
                    let report = HealthReport {
                        task_id: task_id.clone(),
                        health,
                        message: match health {
                            Health::Unhealthy => "the image's HEALTHCHECK failed".into(),
                            _ => String::new(),
                        },
                        at: now_ms(),
                    };
                    if reports.send(report).is_err() || native.changed().await.is_err() {
                        return;
                    }
                }
            }
            .instrument(span),
        );
        HealthMonitor { handle }
    }
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Runs one probe; `Err` carries why it failed (or why it could not run).
pub async fn probe(
    check: &HealthCheck,
    host_port: Option<u16>,
    task_id: &str,
    driver: &dyn Driver,
) -> Result<(), String> {
    match probe_outcome(check, host_port, task_id, driver).await {
        Outcome::Done(result) => result,
        Outcome::Inconclusive(reason) => Err(reason),
    }
}

/// What one probe says about a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The probe ran: passed, or failed with why.
    Done(Result<(), String>),
    /// The agent itself could not run the probe (out of file descriptors or memory): not the
    /// task's failure.
    Inconclusive(String),
}

/// Runs one probe and tells a failure of the task from the agent's own resource exhaustion.
pub async fn probe_outcome(
    check: &HealthCheck,
    host_port: Option<u16>,
    task_id: &str,
    driver: &dyn Driver,
) -> Outcome {
    match run_probe(check, host_port, task_id, driver).await {
        Ok(()) => Outcome::Done(Ok(())),
        Err(Failure::Agent(reason)) => Outcome::Inconclusive(reason),
        Err(Failure::Task(reason)) => Outcome::Done(Err(reason)),
    }
}

/// Why a probe did not pass.
enum Failure {
    Task(String),
    Agent(String),
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Failure::Task(reason)
    }
}

/// `reason` blamed on the agent when `error` (or one of its causes) is resource exhaustion
/// of this process or the system, on the task otherwise.
fn failure(error: &(dyn std::error::Error + 'static), reason: String) -> Failure {
    if caused_by_exhaustion(error) {
        Failure::Agent(reason)
    } else {
        Failure::Task(reason)
    }
}

async fn run_probe(
    check: &HealthCheck,
    host_port: Option<u16>,
    task_id: &str,
    driver: &dyn Driver,
) -> Result<(), Failure> {
    let timeout = check.timeout;
    let need_port = || host_port.ok_or_else(|| "the task has no port to check".to_string());
    match &check.test {
        HealthTest::Http { path } => http_probe(need_port()?, path, timeout).await,
        HealthTest::Tcp => tcp_probe(need_port()?, timeout).await,
        HealthTest::Cmd { argv } => exec_probe(driver, task_id, argv, timeout).await,
        HealthTest::Shell { script } => {
            let argv = ["/bin/sh".to_string(), "-c".to_string(), script.clone()];
            exec_probe(driver, task_id, &argv, timeout).await
        }
    }
}

async fn http_probe(port: u16, path: &str, timeout: Duration) -> Result<(), Failure> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        // A redirect already proves the server answers; following it could leave the task.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| Failure::Agent(format!("GET {path}: cannot build HTTP client: {e}")))?;
    let url = format!("http://127.0.0.1:{port}{path}");
    match client.get(&url).send().await {
        Ok(resp) if resp.status().is_success() || resp.status().is_redirection() => Ok(()),
        Ok(resp) => Err(format!("GET {path}: {}", resp.status().as_u16()).into()),
        Err(e) if e.is_timeout() => {
            Err(format!("GET {path}: no response within {timeout:?}").into())
        }
        Err(e) => Err(failure(&e, format!("GET {path}: {}", error_chain(&e)))),
    }
}

async fn tcp_probe(port: u16, timeout: Duration) -> Result<(), Failure> {
    let addr = format!("127.0.0.1:{port}");
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(failure(&e, format!("connect {addr}: {e}"))),
        Err(_) => Err(format!("connect {addr}: no answer within {timeout:?}").into()),
    }
}

async fn exec_probe(
    driver: &dyn Driver,
    task_id: &str,
    argv: &[String],
    timeout: Duration,
) -> Result<(), Failure> {
    let out = driver
        .exec(task_id, argv, timeout)
        .await
        .map_err(|e| failure(&e, format!("cannot run check: {e}")))?;
    if out.timed_out {
        return Err(format!("timed out after {timeout:?}").into());
    }
    match out.exit_code {
        Some(0) => Ok(()),
        code => {
            let first_line = out.output.lines().next().unwrap_or("").trim();
            let status = code.map_or("killed by a signal".to_string(), |c| {
                format!("exit code {c}")
            });
            Err(format!("{status}: {first_line}").into())
        }
    }
}

/// An error with its causes, as reqwest's Display leaves them out.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_semantics() {
        let mut t = HealthTracker::new(3);
        assert_eq!(t.health(), Health::Starting);
        // Failures in the start period do not count.
        for _ in 0..5 {
            assert_eq!(t.record(false, true), None);
        }
        assert_eq!(t.record(false, false), None);
        assert_eq!(t.record(false, false), None);
        assert_eq!(t.record(false, false), Some(Health::Unhealthy));
        assert_eq!(t.record(true, false), Some(Health::Healthy));
        assert_eq!(t.record(true, false), None);
        assert_eq!(t.record(false, false), None);
        assert_eq!(
            t.record(true, false),
            None,
            "a pass resets the failure count"
        );
        assert_eq!(t.record(false, false), None);
        assert_eq!(t.record(false, false), None);
        assert_eq!(t.record(false, false), Some(Health::Unhealthy));
    }

    #[test]
    fn success_ends_start_period() {
        let mut t = HealthTracker::new(1);
        assert_eq!(t.record(true, true), Some(Health::Healthy));
        // Still inside start_period by the clock, but it ended with the success.
        assert_eq!(t.record(false, true), Some(Health::Unhealthy));
    }
}
