//! The `sim` driver: **for scale tests and benchmarks only.** It "runs" a task by remembering
//! it: start succeeds at once, nothing executes, stop returns a clean exit. Hollow nodes
//! ([`crate::hollow`]) use it so the whole control plane can be driven at scale on one machine,
//! like Kubernetes' kubemark.

use crate::driver::{
    Driver, DriverError, ExecOutput, ExitInfo, LogStream, RecoveredTask, RunningTask,
};
use async_trait::async_trait;
use flotilla_types::{now_ms, DriverKind, PortBinding, Resources, Task};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

/// A simulated task: its exit, once stopped.
struct SimTask {
    exit: watch::Sender<Option<ExitInfo>>,
}

/// Runs nothing, instantly. Not for production use.
#[derive(Default)]
pub struct SimDriver {
    tasks: Mutex<HashMap<String, SimTask>>,
}

impl SimDriver {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_task<R>(&self, id: &str, f: impl FnOnce(&SimTask) -> R) -> Result<R, DriverError> {
        let tasks = self
            .tasks
            .lock()
            .map_err(|_| DriverError::NotFound(id.to_string()))?;
        tasks
            .get(id)
            .map(f)
            .ok_or_else(|| DriverError::NotFound(id.to_string()))
    }

    /// How many tasks are "running".
    pub fn running(&self) -> usize {
        self.tasks.lock().map_or(0, |t| t.len())
    }
}

#[async_trait]
impl Driver for SimDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Sim
    }

    async fn start(&self, task: &Task, _ports: &[PortBinding]) -> Result<RunningTask, DriverError> {
        let mut tasks = self
            .tasks
            .lock()
            .map_err(|_| DriverError::AlreadyExists(task.id.clone()))?;
        if tasks.contains_key(&task.id) {
            return Err(DriverError::AlreadyExists(task.id.clone()));
        }
        let (exit, _) = watch::channel(None);
        tasks.insert(task.id.clone(), SimTask { exit });
        Ok(RunningTask {
            pid: None,
            container_id: None,
        })
    }

    async fn recover(&self) -> Result<Vec<RecoveredTask>, DriverError> {
        // Simulated tasks live only in memory: a restarted hollow node has none.
        Ok(Vec::new())
    }

    async fn wait(&self, task_id: &str) -> Result<ExitInfo, DriverError> {
        let mut rx = self.with_task(task_id, |t| t.exit.subscribe())?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| DriverError::NotFound(task_id.to_string()))?
            .clone();
        exit.ok_or_else(|| DriverError::NotFound(task_id.to_string()))
    }

    async fn stop(
        &self,
        task_id: &str,
        _signal: i32,
        _grace: Duration,
    ) -> Result<ExitInfo, DriverError> {
        let exit = ExitInfo {
            code: Some(0),
            signal: None,
            oom_killed: false,
            at: now_ms(),
            message: "exited with code 0".into(),
        };
        self.with_task(task_id, |t| {
            t.exit.send_replace(Some(exit.clone()));
        })?;
        Ok(exit)
    }

    async fn remove(&self, task_id: &str) -> Result<(), DriverError> {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.remove(task_id);
        }
        Ok(())
    }

    async fn update_resources(
        &self,
        task_id: &str,
        _limits: &Resources,
    ) -> Result<(), DriverError> {
        self.with_task(task_id, |_| ())
    }

    async fn exec(
        &self,
        task_id: &str,
        _argv: &[String],
        _timeout: Duration,
    ) -> Result<ExecOutput, DriverError> {
        self.with_task(task_id, |_| ExecOutput {
            exit_code: Some(0),
            output: String::new(),
            timed_out: false,
        })
    }

    async fn logs(
        &self,
        task_id: &str,
        _tail: Option<usize>,
        _follow: bool,
    ) -> Result<LogStream, DriverError> {
        self.with_task(task_id, |_| ())?;
        Ok(Box::pin(futures::stream::empty()))
    }

    async fn stats(&self, task_id: &str) -> Result<flotilla_types::api::TaskStats, DriverError> {
        // Nothing runs, so nothing is used.
        self.with_task(task_id, |_| flotilla_types::api::TaskStats {
            task_id: task_id.to_string(),
            cpu_percent: 0.0,
            cpu_total_nanos: 0,
            memory_bytes: 0,
            memory_limit_bytes: None,
            at: now_ms(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_types::ServiceSpec;

    fn task(id: &str) -> Task {
        let mut spec = ServiceSpec::process("s", vec!["x".into()]);
        spec.driver = DriverKind::Sim;
        let mut t = Task::new(&spec, 1, Some(1), 0);
        t.id = id.into();
        t.node = Some("n".into());
        t.status = flotilla_types::TaskStatus::new(flotilla_types::TaskState::Assigned, 0, "");
        t
    }

    #[tokio::test]
    async fn start_wait_stop_remove() {
        let d = SimDriver::new();
        d.start(&task("a"), &[]).await.expect("start");
        assert!(
            d.start(&task("a"), &[]).await.is_err(),
            "a task starts once"
        );
        assert_eq!(d.running(), 1);
        let waiter = {
            let d = &d;
            async move { d.wait("a").await }
        };
        let (exit, stopped) = tokio::join!(waiter, d.stop("a", 15, Duration::ZERO));
        assert_eq!(exit.expect("wait").code, Some(0));
        assert_eq!(stopped.expect("stop").code, Some(0));
        d.remove("a").await.expect("remove");
        assert_eq!(d.running(), 0);
        assert!(matches!(d.wait("a").await, Err(DriverError::NotFound(_))));
    }
}
