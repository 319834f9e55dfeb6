//! The process driver: runs a task as a host process supervised by its own [`crate::shim`].
//!
//! Task dir layout (`<state_dir>/tasks/<task_id>/`): `spec.json` (what to run, incl. the host
//! ports), `state.json` (pid and exit, kept by the shim), `shim.sock`, `shim.log` (the shim's own
//! output) and `output.log*` (the workload's output, see [`crate::logs`]).
//!
//! The shim is started as `<shim_exe> shim --task-dir DIR` and the workload through
//! `<shim_exe> shim-exec ...`, so `shim_exe` must dispatch those two subcommands to
//! [`crate::shim::run_shim`] and [`crate::trampoline::run_exec_trampoline`] (the flotilla binary
//! does; tests use the `flotilla-agent-testhost` binary of this crate).

use crate::cgroup::{CgroupError, CgroupLayout};
use crate::driver::{
    Driver, DriverError, ExecOutput, ExitInfo, LogStream, RecoveredTask, RunningTask,
    EXEC_OUTPUT_LIMIT,
};
use crate::logs::{log_stream, LogLimits};
use crate::shim::{
    call_shim, read_json, write_json_atomic, ShimArgs, ShimCallError, ShimRequest, ShimSpec,
    ShimState, UserIds, SHIM_LOG_FILE, SHIM_SUBCOMMAND, SOCKET_FILE, SPEC_FILE, STATE_FILE,
};
use flotilla_types::api::TaskStats;
use flotilla_types::{now_ms, signal_number, DriverKind, PortBinding, Resources, Task};
use futures::StreamExt;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{Group, Pid, User};
use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt};

/// How long a new shim may take to report the workload's pid.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an exited task's shim waits to be told to shut down.
const DEFAULT_LINGER: Duration = Duration::from_secs(3600);
/// How far apart the two cpu readings of [`Driver::stats`] are taken.
const STATS_SAMPLE: Duration = Duration::from_millis(250);
/// Longest unix socket path Linux accepts (sun_path minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Runs tasks as supervised host processes.
pub struct ProcessDriver {
    tasks_dir: PathBuf,
    shim_exe: PathBuf,
    log_limits: LogLimits,
    linger_after_exit: Duration,
    /// Who tasks without `user:` run as (see [`crate::task_user`]).
    default_user: Option<UserIds>,
}

impl ProcessDriver {
    /// A driver keeping task dirs under `<state_dir>/tasks` and starting shims from `shim_exe`.
    pub fn new(state_dir: PathBuf, shim_exe: PathBuf) -> Result<Self, DriverError> {
        if !shim_exe.is_file() {
            return Err(DriverError::Invalid {
                field: "shim_exe".into(),
                reason: format!("{} is not an executable file", shim_exe.display()),
            });
        }
        let tasks_dir = state_dir.join("tasks");
        std::fs::create_dir_all(&tasks_dir).map_err(|source| DriverError::Io {
            path: tasks_dir.clone(),
            source,
        })?;
        Ok(ProcessDriver {
            tasks_dir,
            shim_exe,
            log_limits: LogLimits::default(),
            linger_after_exit: DEFAULT_LINGER,
            default_user: crate::task_user::default_task_user(),
        })
    }

    /// Sets the log file bounds for tasks started from now on.
    pub fn with_log_limits(mut self, limits: LogLimits) -> Result<Self, DriverError> {
        limits.validate()?;
        self.log_limits = limits;
        Ok(self)
    }

    /// The dir of a task, after checking the id is safe as a path component.
    pub fn task_dir(&self, task_id: &str) -> Result<PathBuf, DriverError> {
        let ok = !task_id.is_empty()
            && task_id.len() <= 64
            && task_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(DriverError::Invalid {
                field: "task.id".into(),
                reason: format!("{task_id:?} must be 1 to 64 characters of [A-Za-z0-9_-]"),
            });
        }
        Ok(self.tasks_dir.join(task_id))
    }

    /// The dir of a task that must exist.
    fn existing_task_dir(&self, task_id: &str) -> Result<PathBuf, DriverError> {
        let dir = self.task_dir(task_id)?;
        if dir.join(SPEC_FILE).is_file() {
            Ok(dir)
        } else {
            Err(DriverError::NotFound(task_id.to_string()))
        }
    }

    /// Turns a task into what its shim runs, rejecting bad fields by name.
    fn shim_spec(
        &self,
        task: &Task,
        ports: &[PortBinding],
        dir: &Path,
    ) -> Result<ShimSpec, DriverError> {
        let spec = &task.spec;
        let invalid = |field: &str, reason: String| DriverError::Invalid {
            field: format!("services.{}.{field}", spec.name),
            reason,
        };
        // Compose semantics: with an entrypoint, `command` are its arguments.
        let argv: Vec<String> = spec
            .entrypoint
            .iter()
            .flatten()
            .chain(spec.command.iter().flatten())
            .cloned()
            .collect();
        if argv.is_empty() || argv[0].is_empty() {
            return Err(invalid(
                "command",
                "a process task needs a program to run".into(),
            ));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(invalid("command", "contains a NUL byte".into()));
        }
        for (i, p) in ports.iter().enumerate() {
            if p.host_port == 0 || p.target == 0 {
                return Err(DriverError::Invalid {
                    field: format!("ports[{i}]"),
                    reason: "port 0 is not a port".into(),
                });
            }
        }
        let env = task_environment(task, ports)?;
        let working_dir = match &spec.working_dir {
            None => dir.join(crate::task_user::WORK_DIR),
            Some(wd) => {
                let p = PathBuf::from(wd);
                if !p.is_absolute() {
                    return Err(invalid(
                        "working_dir",
                        format!("{wd:?} must be an absolute path"),
                    ));
                }
                if !p.is_dir() {
                    return Err(invalid(
                        "working_dir",
                        format!("{wd:?} is not a directory on this node"),
                    ));
                }
                p
            }
        };
        let user = match &spec.user {
            None => self.default_user,
            Some(u) => Some(resolve_user(u).map_err(|reason| invalid("user", reason))?),
        };
        let stop_signal = match &spec.stop_signal {
            None => libc::SIGTERM,
            Some(s) => signal_number(s).ok_or_else(|| {
                invalid("stop_signal", format!("{s:?} is not a known signal name"))
            })?,
        };
        validate_resources(&spec.resources)?;
        let path = env.get("PATH").map(String::as_str).unwrap_or("");
        if find_program(&argv[0], path, &working_dir).is_none() {
            return Err(DriverError::StartFailed {
                task: task.id.clone(),
                reason: format!("program {:?} not found (PATH={path})", argv[0]),
            });
        }
        Ok(ShimSpec {
            task_id: task.id.clone(),
            service: spec.name.clone(),
            argv,
            env,
            working_dir,
            user,
            resources: spec.resources,
            stop_signal,
            stop_grace_ms: u64::try_from(spec.stop_grace_period.as_millis()).unwrap_or(u64::MAX),
            log: self.log_limits,
            ports: ports.to_vec(),
            exec_helper: self.shim_exe.clone(),
            linger_after_exit_ms: u64::try_from(self.linger_after_exit.as_millis())
                .unwrap_or(u64::MAX),
        })
    }

    /// Starts the shim detached (own process group, no inherited stdio) and reaps it if it exits
    /// while we are still its parent. Returns a receiver that fires with its exit.
    fn launch_shim(
        &self,
        dir: &Path,
    ) -> Result<tokio::sync::oneshot::Receiver<String>, DriverError> {
        let log_path = dir.join(SHIM_LOG_FILE);
        let io_err = |source| DriverError::Io {
            path: log_path.clone(),
            source,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(io_err)?;
        let log_err = log.try_clone().map_err(io_err)?;
        let mut child = tokio::process::Command::new(&self.shim_exe)
            .arg(SHIM_SUBCOMMAND)
            .args(
                ShimArgs {
                    task_dir: dir.to_path_buf(),
                }
                .to_args(),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| DriverError::Io {
                path: self.shim_exe.clone(),
                source,
            })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            let _ = tx.send(status);
        });
        Ok(rx)
    }

    /// Current state of a task: from its shim if it answers, else from `state.json`.
    async fn current_state(&self, dir: &Path) -> Result<(ShimState, bool), DriverError> {
        match call_shim(dir, &ShimRequest::Status).await {
            Ok(state) => Ok((state, true)),
            Err(_) => Ok((read_json(&dir.join(STATE_FILE))?, false)),
        }
    }

    /// The exit of a task whose shim is gone: the recorded one, or "unknown" after making sure
    /// nothing of the task is left running (an unsupervised workload cannot be managed).
    fn exit_without_shim(&self, task_id: &str, dir: &Path) -> Result<ExitInfo, DriverError> {
        let spec: ShimSpec = read_json(&dir.join(SPEC_FILE))?;
        let state: Option<ShimState> = read_json(&dir.join(STATE_FILE)).ok();
        match state {
            Some(ShimState {
                exited: Some(record),
                ..
            }) => Ok(ExitInfo::from_record(
                &record,
                spec.resources.limits.memory_bytes,
            )),
            Some(ShimState {
                start_error: Some(e),
                ..
            }) => Ok(ExitInfo::unknown(now_ms(), format!("start failed: {e}"))),
            state => {
                if let Some(pid) = state.and_then(|s| s.pid) {
                    // The group id is the workload's pid; only kill it if that process is still
                    // in the task cgroup, so a recycled pid is never hit.
                    let cg = CgroupLayout::detect().map(|l| l.task(task_id));
                    if cg
                        .as_ref()
                        .is_ok_and(|cg| cg.pids().contains(&(pid as i32)))
                    {
                        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    }
                }
                remove_cgroup(task_id)?;
                Ok(ExitInfo::unknown(
                    now_ms(),
                    "the task's supervisor (shim) vanished; exit status unknown, leftovers killed",
                ))
            }
        }
    }

    fn exit_of(&self, dir: &Path, state: &ShimState) -> Result<Option<ExitInfo>, DriverError> {
        let Some(record) = &state.exited else {
            return Ok(None);
        };
        let spec: ShimSpec = read_json(&dir.join(SPEC_FILE))?;
        Ok(Some(ExitInfo::from_record(
            record,
            spec.resources.limits.memory_bytes,
        )))
    }

    /// Sends a request whose reply is an exited state (wait, stop), falling back to the files.
    async fn call_until_exit(
        &self,
        task_id: &str,
        request: ShimRequest,
    ) -> Result<ExitInfo, DriverError> {
        let dir = self.existing_task_dir(task_id)?;
        match call_shim(&dir, &request).await {
            Ok(state) => match self.exit_of(&dir, &state)? {
                Some(exit) => Ok(exit),
                None => Err(DriverError::ShimUnavailable {
                    task: task_id.to_string(),
                    reason: "the shim replied without an exit".into(),
                }),
            },
            Err(ShimCallError::Refused(reason)) => Err(DriverError::Refused {
                task: task_id.to_string(),
                reason,
            }),
            Err(e) if e.is_local_exhaustion() => Err(DriverError::ShimUnavailable {
                task: task_id.to_string(),
                reason: e.to_string(),
            }),
            Err(e) => {
                tracing::warn!(task = task_id, error = %e, "shim unreachable; using the recorded state");
                self.exit_without_shim(task_id, &dir)
            }
        }
    }
}

/// The workload environment: the service's, plus PATH from the agent (unless the service sets
/// one), the port variables and the task identity.
fn task_environment(
    task: &Task,
    ports: &[PortBinding],
) -> Result<BTreeMap<String, String>, DriverError> {
    let mut env = BTreeMap::new();
    if let Ok(path) = std::env::var("PATH") {
        env.insert("PATH".to_string(), path);
    }
    for (k, v) in &task.spec.environment {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(DriverError::Invalid {
                field: format!("services.{}.environment.{k}", task.spec.name),
                reason: "names must be non-empty without '=' or NUL, values without NUL".into(),
            });
        }
        env.insert(k.clone(), v.clone());
    }
    if let Some(first) = ports.first() {
        env.insert("PORT".to_string(), first.host_port.to_string());
    }
    for p in ports {
        env.insert(
            format!("FLOTILLA_PORT_{}", p.target),
            p.host_port.to_string(),
        );
    }
    env.insert("FLOTILLA_TASK_ID".to_string(), task.id.clone());
    env.insert("FLOTILLA_SERVICE".to_string(), task.spec.name.clone());
    if let Some(slot) = task.slot {
        env.insert("FLOTILLA_SLOT".to_string(), slot.to_string());
    }
    Ok(env)
}

/// `name`, `uid`, `name:group` or `uid:gid` to numeric ids.
fn resolve_user(spec: &str) -> Result<UserIds, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => {
            let gid = User::from_uid(uid.into())
                .ok()
                .flatten()
                .map(|u| u.gid.as_raw());
            (uid, gid)
        }
        Err(_) => {
            let u = User::from_name(user)
                .map_err(|e| format!("cannot look up user {user:?}: {e}"))?
                .ok_or_else(|| format!("no user named {user:?} on this node"))?;
            (u.uid.as_raw(), Some(u.gid.as_raw()))
        }
    };
    let gid = match group {
        None => primary_gid.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(g)
                .map_err(|e| format!("cannot look up group {g:?}: {e}"))?
                .ok_or_else(|| format!("no group named {g:?} on this node"))?
                .gid
                .as_raw(),
        },
    };
    Ok(UserIds { uid, gid })
}

/// Resolves a program the way `execvp` will: a name with a slash as a path (relative to the
/// working dir), otherwise through PATH.
fn find_program(program: &str, path: &str, working_dir: &Path) -> Option<PathBuf> {
    if program.contains('/') {
        let p = working_dir.join(program);
        return p.is_file().then_some(p);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// The same checks as `ServiceSpec::validate`, for limits arriving through `update_resources`.
fn validate_resources(resources: &Resources) -> Result<(), DriverError> {
    let invalid = |field: &str, reason: &str| DriverError::Invalid {
        field: format!("deploy.resources.{field}"),
        reason: reason.into(),
    };
    for (which, a) in [
        ("limits", resources.limits),
        ("reservations", resources.reservations),
    ] {
        if a.memory_bytes.is_some_and(|m| m < 4 << 20) {
            return Err(invalid(&format!("{which}.memory"), "must be at least 4MiB"));
        }
        if a.cpu_millis == Some(0) {
            return Err(invalid(&format!("{which}.cpus"), "must be greater than 0"));
        }
        if a.pids == Some(0) {
            return Err(invalid(&format!("{which}.pids"), "must be greater than 0"));
        }
    }
    let l = resources.limits;
    let r = resources.reservations;
    if matches!((r.memory_bytes, l.memory_bytes), (Some(r), Some(l)) if r > l) {
        return Err(invalid(
            "reservations.memory",
            "reservation is larger than the limit",
        ));
    }
    if matches!((r.cpu_millis, l.cpu_millis), (Some(r), Some(l)) if r > l) {
        return Err(invalid(
            "reservations.cpus",
            "reservation is larger than the limit",
        ));
    }
    Ok(())
}

fn remove_cgroup(task_id: &str) -> Result<(), DriverError> {
    match CgroupLayout::detect() {
        Ok(layout) => Ok(layout.task(task_id).remove()?),
        // No cgroups on this node: nothing to remove.
        Err(CgroupError::Unavailable(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Reads a stream to the end, keeping at most `cap` bytes (reading on so the writer never blocks).
async fn read_capped(mut stream: impl AsyncRead + Unpin, cap: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = cap.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    kept
}

#[async_trait::async_trait]
impl Driver for ProcessDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }

    #[tracing::instrument(skip_all, fields(task = %task.id, service = %task.spec.name))]
    async fn start(&self, task: &Task, ports: &[PortBinding]) -> Result<RunningTask, DriverError> {
        let dir = self.task_dir(&task.id)?;
        if dir.exists() {
            return Err(DriverError::AlreadyExists(task.id.clone()));
        }
        let socket_len = dir.join(SOCKET_FILE).as_os_str().len();
        if socket_len > MAX_SOCKET_PATH {
            return Err(DriverError::Invalid {
                field: "state_dir".into(),
                reason: format!("too deep: the task socket path would be {socket_len} bytes, Linux allows {MAX_SOCKET_PATH}"),
            });
        }
        let spec = self.shim_spec(task, ports, &dir)?;
        let own_work_dir = spec.working_dir == dir.join(crate::task_user::WORK_DIR);
        crate::task_user::create_task_dir(&dir)
            .and_then(|()| match own_work_dir {
                true => crate::task_user::create_work_dir(&dir, spec.user),
                false => Ok(()),
            })
            .map_err(|source| DriverError::Io {
                path: dir.clone(),
                source,
            })?;
        let result = async {
            write_json_atomic(&dir.join(SPEC_FILE), &spec)?;
            let mut shim_exit = self.launch_shim(&dir)?;
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Ok(state) = read_json::<ShimState>(&dir.join(STATE_FILE)) {
                    if let Some(e) = state.start_error {
                        return Err(DriverError::StartFailed {
                            task: task.id.clone(),
                            reason: e,
                        });
                    }
                    if state.pid.is_some() {
                        return Ok(RunningTask {
                            pid: state.pid,
                            container_id: None,
                        });
                    }
                }
                if let Ok(status) = shim_exit.try_recv() {
                    let log = std::fs::read_to_string(dir.join(SHIM_LOG_FILE)).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    return Err(DriverError::StartFailed {
                        task: task.id.clone(),
                        reason: format!(
                            "the shim exited ({status}) before starting the workload: {}",
                            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                        ),
                    });
                }
                if Instant::now() > deadline {
                    return Err(DriverError::StartFailed {
                        task: task.id.clone(),
                        reason: format!("the shim did not report a pid within {START_TIMEOUT:?}"),
                    });
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        .await;
        match &result {
            Ok(running) => tracing::info!(pid = ?running.pid, "task started"),
            Err(e) => {
                tracing::warn!(error = %e, "task start failed; cleaning up");
                // The task never ran: leave nothing behind so the id can be retried.
                if let Err(cleanup) = self.remove(&task.id).await {
                    tracing::warn!(error = %cleanup, "cleanup after failed start failed");
                }
            }
        }
        result
    }

    async fn recover(&self) -> Result<Vec<RecoveredTask>, DriverError> {
        let entries = std::fs::read_dir(&self.tasks_dir).map_err(|source| DriverError::Io {
            path: self.tasks_dir.clone(),
            source,
        })?;
        let mut recovered = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            let Some(task_id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            let spec: ShimSpec = match read_json(&dir.join(SPEC_FILE)) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(task = %task_id, error = %e, "skipping a task dir without a readable spec");
                    continue;
                }
            };
            let (pid, exited) = match call_shim(&dir, &ShimRequest::Status).await {
                Ok(state) => (state.pid, self.exit_of(&dir, &state)?),
                Err(_) => {
                    let pid = read_json::<ShimState>(&dir.join(STATE_FILE))
                        .ok()
                        .and_then(|s| s.pid);
                    (pid, Some(self.exit_without_shim(&task_id, &dir)?))
                }
            };
            tracing::info!(task = %task_id, pid = ?pid, exited = exited.is_some(), "recovered task");
            recovered.push(RecoveredTask {
                task_id,
                pid,
                container_id: None,
                ports: spec.ports,
                exited,
            });
        }
        recovered.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        Ok(recovered)
    }

    #[tracing::instrument(skip(self))]
    async fn wait(&self, task_id: &str) -> Result<ExitInfo, DriverError> {
        self.call_until_exit(task_id, ShimRequest::Wait).await
    }

    #[tracing::instrument(skip(self))]
    async fn stop(
        &self,
        task_id: &str,
        signal: i32,
        grace: Duration,
    ) -> Result<ExitInfo, DriverError> {
        if Signal::try_from(signal).is_err() {
            return Err(DriverError::Invalid {
                field: "signal".into(),
                reason: format!("{signal} is not a signal number"),
            });
        }
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self.call_until_exit(task_id, ShimRequest::Stop { signal, grace_ms })
            .await
    }

    #[tracing::instrument(skip(self))]
    async fn remove(&self, task_id: &str) -> Result<(), DriverError> {
        let dir = self.task_dir(task_id)?;
        if !dir.exists() {
            return Ok(());
        }
        match call_shim(&dir, &ShimRequest::Shutdown).await {
            // Closed: the shim went away while shutting down, which is what we asked for.
            Ok(_) | Err(ShimCallError::Closed { .. }) => {}
            Err(e) => {
                tracing::debug!(error = %e, "no shim to shut down; cleaning up directly");
                if dir.join(SPEC_FILE).is_file() {
                    self.exit_without_shim(task_id, &dir)?;
                }
                remove_cgroup(task_id)?;
            }
        }
        std::fs::remove_dir_all(&dir).map_err(|source| DriverError::Io { path: dir, source })?;
        tracing::info!("task removed");
        Ok(())
    }

    #[tracing::instrument(skip(self, limits))]
    async fn update_resources(&self, task_id: &str, limits: &Resources) -> Result<(), DriverError> {
        validate_resources(limits)?;
        let dir = self.existing_task_dir(task_id)?;
        match call_shim(&dir, &ShimRequest::UpdateResources { resources: *limits }).await {
            Ok(_) => {}
            Err(ShimCallError::Refused(reason)) => {
                return Err(DriverError::Refused {
                    task: task_id.to_string(),
                    reason,
                })
            }
            Err(e) => {
                return Err(DriverError::ShimUnavailable {
                    task: task_id.to_string(),
                    reason: e.to_string(),
                })
            }
        }
        // Keep spec.json current so a re-adopting agent reports the right limits.
        let mut spec: ShimSpec = read_json(&dir.join(SPEC_FILE))?;
        spec.resources = *limits;
        write_json_atomic(&dir.join(SPEC_FILE), &spec)?;
        Ok(())
    }

    #[tracing::instrument(skip(self, timeout))]
    async fn exec(
        &self,
        task_id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, DriverError> {
        let dir = self.existing_task_dir(task_id)?;
        crate::driver::require_program(argv)?;
        let spec: ShimSpec = read_json(&dir.join(SPEC_FILE))?;
        let (state, _) = self.current_state(&dir).await?;
        if state.exited.is_some() || state.pid.is_none() {
            return Err(DriverError::NotRunning(task_id.to_string()));
        }
        // Same cgroup, user, environment and working dir as the workload.
        let cgroup_procs = if state.in_cgroup {
            CgroupLayout::detect()?.task(task_id).procs_files()
        } else {
            Vec::new()
        };
        let mut child = spec
            .trampoline_command(cgroup_procs, argv)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| DriverError::Io {
                path: spec.exec_helper.clone(),
                source,
            })?;
        let pid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let collect = async {
            let out = async {
                match stdout {
                    Some(s) => read_capped(s, EXEC_OUTPUT_LIMIT).await,
                    None => Vec::new(),
                }
            };
            let err = async {
                match stderr {
                    Some(s) => read_capped(s, EXEC_OUTPUT_LIMIT).await,
                    None => Vec::new(),
                }
            };
            let (out, err, status) = tokio::join!(out, err, child.wait());
            (out, err, status)
        };
        match tokio::time::timeout(timeout, collect).await {
            Ok((mut out, err, status)) => {
                out.extend_from_slice(&err);
                let status = status.map_err(|source| DriverError::Io {
                    path: spec.exec_helper.clone(),
                    source,
                })?;
                Ok(ExecOutput {
                    exit_code: status.code(),
                    output: String::from_utf8_lossy(&out).into_owned(),
                    timed_out: false,
                })
            }
            Err(_) => {
                if let Some(pid) = pid {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                Ok(ExecOutput::timed_out())
            }
        }
    }

    async fn logs(
        &self,
        task_id: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<LogStream, DriverError> {
        let dir = self.existing_task_dir(task_id)?;
        let state_path = dir.join(STATE_FILE);
        let finished = move || {
            read_json::<ShimState>(&state_path)
                .map(|s| s.exited.is_some() || s.start_error.is_some())
                .unwrap_or(true)
        };
        let stream = log_stream(dir, tail, follow, finished)?;
        Ok(stream.map(|chunk| chunk.map_err(DriverError::from)).boxed())
    }

    #[tracing::instrument(skip(self))]
    async fn stats(&self, task_id: &str) -> Result<TaskStats, DriverError> {
        let dir = self.existing_task_dir(task_id)?;
        let (state, _) = self.current_state(&dir).await?;
        if state.exited.is_some() || !state.in_cgroup {
            return Err(DriverError::NotRunning(task_id.to_string()));
        }
        let cgroup = CgroupLayout::detect()?.task(task_id);
        // Cpu use is a rate, so it takes two readings some time apart.
        let first = cgroup.usage()?;
        let started = Instant::now();
        tokio::time::sleep(STATS_SAMPLE).await;
        let second = cgroup.usage()?;
        let elapsed = started.elapsed().as_nanos().max(1) as f64;
        let used = second.cpu_nanos.saturating_sub(first.cpu_nanos) as f64;
        Ok(TaskStats {
            task_id: task_id.to_string(),
            cpu_percent: used / elapsed * 100.0,
            cpu_total_nanos: second.cpu_nanos,
            memory_bytes: second.memory_bytes,
            memory_limit_bytes: second.memory_limit_bytes,
            at: now_ms(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve() {
        assert_eq!(resolve_user("root").unwrap(), UserIds { uid: 0, gid: 0 });
        assert_eq!(
            resolve_user("1234:5678").unwrap(),
            UserIds {
                uid: 1234,
                gid: 5678
            }
        );
        assert_eq!(resolve_user("0:root").unwrap(), UserIds { uid: 0, gid: 0 });
        assert!(resolve_user("no-such-user-xyz")
            .unwrap_err()
            .contains("no user named"));
        assert!(resolve_user("root:no-such-group-xyz")
            .unwrap_err()
            .contains("no group named"));
    }

    #[test]
    fn resources_validated_by_field() {
        let mut r = Resources::default();
        r.limits.memory_bytes = Some(1024);
        let e = validate_resources(&r).unwrap_err().to_string();
        assert!(e.contains("deploy.resources.limits.memory"), "{e}");
        let mut r = Resources::default();
        r.limits.cpu_millis = Some(500);
        r.reservations.cpu_millis = Some(1000);
        let e = validate_resources(&r).unwrap_err().to_string();
        assert!(e.contains("reservations.cpus"), "{e}");
    }

    #[test]
    fn programs_found_like_execvp() {
        assert!(find_program("sh", "/nonexistent:/bin", Path::new("/")).is_some());
        assert!(
            find_program("definitely-not-a-program", "/bin:/usr/bin", Path::new("/")).is_none()
        );
        assert!(find_program("/bin/sh", "", Path::new("/")).is_some());
    }
}
