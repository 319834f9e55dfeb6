//! The runtime-neutral interface the agent uses to run tasks, and the values it exchanges.
//!
//! A driver owns whatever a task needs on the node (processes, cgroups, containers, files). The
//! agent only talks to this trait, so the process driver and a later docker driver are
//! interchangeable.

use crate::cgroup::CgroupError;
use crate::logs::LogError;
use crate::shim::{ExitRecord, ShimError};
use flotilla_types::api::TaskStats;
use flotilla_types::units::format_bytes;
use flotilla_types::{DriverKind, Health, PortBinding, Resources, Task, Timestamp};
use nix::sys::signal::Signal;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// Output of a task, as chunks of whole lines.
pub type LogStream = futures::stream::BoxStream<'static, Result<bytes::Bytes, DriverError>>;

#[derive(Debug, Error)]
pub enum DriverError {
    /// The task (or request) is malformed; `field` names the offending part.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("task {task}: start failed: {reason}")]
    StartFailed { task: String, reason: String },
    #[error("task {0} not found on this node")]
    NotFound(String),
    #[error("task {0} already exists on this node")]
    AlreadyExists(String),
    #[error("task {0} is not running")]
    NotRunning(String),
    #[error("task {task}: {reason}")]
    Refused { task: String, reason: String },
    #[error("task {task}: its supervisor is unreachable: {reason}")]
    ShimUnavailable { task: String, reason: String },
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("logs: {0}")]
    Log(#[from] LogError),
    #[error("task files: {0}")]
    Files(#[from] ShimError),
    #[error("docker engine: {0}")]
    Engine(#[from] bollard::errors::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An exec's argv must name a program; every driver refuses an empty one the same way.
pub(crate) fn require_program(argv: &[String]) -> Result<(), DriverError> {
    match argv.first() {
        Some(program) if !program.is_empty() => Ok(()),
        _ => Err(DriverError::Invalid {
            field: "argv".into(),
            reason: "needs a program to run".into(),
        }),
    }
}

/// A task the driver just started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningTask {
    pub pid: Option<u32>,
    pub container_id: Option<String>,
}

/// A task found on the node after an agent restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredTask {
    pub task_id: String,
    pub pid: Option<u32>,
    pub container_id: Option<String>,
    pub ports: Vec<PortBinding>,
    /// Set when the workload exited (possibly while the agent was down).
    pub exited: Option<ExitInfo>,
}

/// How a task's workload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit status; 128 + signal for a signal death.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub at: Timestamp,
    /// For humans: "exited with code 1", "killed by signal 9 (SIGKILL)", "OOM killed (memory limit 64MiB)".
    pub message: String,
}

impl ExitInfo {
    /// Describes a recorded exit; `memory_limit` is named in the OOM message.
    pub fn from_record(record: &ExitRecord, memory_limit: Option<u64>) -> Self {
        let message = if record.oom_killed {
            match memory_limit {
                Some(limit) => format!("OOM killed (memory limit {})", format_bytes(limit)),
                None => "OOM killed".to_string(),
            }
        } else if let Some(sig) = record.signal {
            match Signal::try_from(sig) {
                Ok(s) => format!("killed by signal {sig} ({})", s.as_str()),
                Err(_) => format!("killed by signal {sig}"),
            }
        } else if let Some(code) = record.code {
            format!("exited with code {code}")
        } else {
            "exit status unknown".to_string()
        };
        ExitInfo {
            code: record.code,
            signal: record.signal,
            oom_killed: record.oom_killed,
            at: record.at,
            message,
        }
    }

    /// An exit whose status nobody observed (e.g. the supervisor vanished).
    pub fn unknown(at: Timestamp, message: impl Into<String>) -> Self {
        ExitInfo {
            code: None,
            signal: None,
            oom_killed: false,
            at,
            message: message.into(),
        }
    }
}

/// Result of [`Driver::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// `None` when the command was killed for running past its timeout or died by a signal.
    pub exit_code: Option<i32>,
    /// stdout followed by stderr, lossily decoded and capped at [`EXEC_OUTPUT_LIMIT`] bytes each.
    pub output: String,
    pub timed_out: bool,
}

impl ExecOutput {
    /// The command ran past its timeout; whatever it printed is discarded with it.
    pub fn timed_out() -> Self {
        ExecOutput {
            exit_code: None,
            output: String::new(),
            timed_out: true,
        }
    }
}

/// Most bytes of each exec output stream kept.
pub const EXEC_OUTPUT_LIMIT: usize = 64 * 1024;

#[async_trait::async_trait]
pub trait Driver: Send + Sync {
    fn kind(&self) -> DriverKind;
    /// Start a task. `ports` are host ports already allocated for the task's target ports.
    async fn start(&self, task: &Task, ports: &[PortBinding]) -> Result<RunningTask, DriverError>;
    /// Tasks of this driver that exist on the node (after an agent restart): running ones and
    /// exited-but-unreported ones.
    async fn recover(&self) -> Result<Vec<RecoveredTask>, DriverError>;
    /// Resolves when the task's workload exits (immediately if it already has).
    async fn wait(&self, task_id: &str) -> Result<ExitInfo, DriverError>;
    /// Graceful stop: signal, grace period, then kill; returns the exit.
    async fn stop(
        &self,
        task_id: &str,
        signal: i32,
        grace: Duration,
    ) -> Result<ExitInfo, DriverError>;
    /// Free everything the task held on the node (supervisor, cgroup, task dir). Idempotent.
    async fn remove(&self, task_id: &str) -> Result<(), DriverError>;
    /// Change cpu/memory limits of a running task without restarting it.
    async fn update_resources(&self, task_id: &str, limits: &Resources) -> Result<(), DriverError>;
    /// Run a command for an exec health check in the task's context.
    async fn exec(
        &self,
        task_id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, DriverError>;
    /// Log lines: the last `tail` lines, then (if follow) new ones as they are written, across
    /// rotations, until the task exits.
    async fn logs(
        &self,
        task_id: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<LogStream, DriverError>;
    /// Cpu and memory use of a running task.
    async fn stats(&self, task_id: &str) -> Result<TaskStats, DriverError>;
    /// Health as the runtime itself judges it (e.g. an image's Docker `HEALTHCHECK`), for tasks
    /// whose service defines no check; `None` when the runtime has nothing to say.
    async fn native_health(&self, _task_id: &str) -> Option<tokio::sync::watch::Receiver<Health>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(code: Option<i32>, signal: Option<i32>, oom: bool) -> ExitRecord {
        ExitRecord {
            code,
            signal,
            oom_killed: oom,
            at: 1,
        }
    }

    #[test]
    fn exit_messages() {
        assert_eq!(
            ExitInfo::from_record(&rec(Some(1), None, false), None).message,
            "exited with code 1"
        );
        assert_eq!(
            ExitInfo::from_record(&rec(Some(137), Some(9), false), None).message,
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            ExitInfo::from_record(&rec(Some(137), Some(9), true), Some(64 << 20)).message,
            "OOM killed (memory limit 64MiB)"
        );
    }
}
