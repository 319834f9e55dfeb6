//! The per-task shim: a small supervisor process that owns one workload so the workload survives
//! an agent crash or restart and can be re-adopted.
//!
//! The agent writes `spec.json` ([`ShimSpec`]) into the task dir and starts `<exe> shim
//! --task-dir DIR`. The shim creates the task cgroup, starts the workload through the
//! [`crate::trampoline`], copies its output into the rotating log, records everything in
//! `state.json` ([`ShimState`], replaced atomically on every change) and answers requests on the
//! unix socket `shim.sock`: one JSON object per line in each direction ([`ShimRequest`] →
//! [`ShimResponse`]). After the workload exits the shim stays around (so a re-adopting agent can
//! still ask) until it is told to `shutdown` or [`ShimSpec::linger_after_exit_ms`] passes;
//! `state.json` stays behind either way and is the record of the exit.

use crate::cgroup::{CgroupError, CgroupLayout, TaskCgroup};
use crate::logs::{LineSplitter, LogError, LogLimits, RotatingLog};
use crate::trampoline::{ExecTrampolineArgs, EXEC_SUBCOMMAND};
use flotilla_types::{now_ms, PortBinding, Resources, Timestamp};
use futures::{SinkExt, StreamExt};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::codec::{Framed, LinesCodec};
use tracing::Instrument;

/// The subcommand name a host binary dispatches to [`run_shim`].
pub const SHIM_SUBCOMMAND: &str = "shim";
pub const SPEC_FILE: &str = "spec.json";
pub const STATE_FILE: &str = "state.json";
pub const SOCKET_FILE: &str = "shim.sock";
/// Where the shim's own stdout/stderr (its tracing output) go.
pub const SHIM_LOG_FILE: &str = "shim.log";
/// How long the exit waits for the output pumps to reach end of file.
const PUMP_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest request or response line on the socket.
const MAX_MESSAGE_BYTES: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum ShimError {
    #[error("shim arguments: {0}")]
    BadArgs(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("log: {0}")]
    Log(#[from] LogError),
    #[error("cannot start {program:?}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("cannot build the shim's runtime: {0}")]
    Runtime(io::Error),
}

/// `shim --task-dir DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimArgs {
    pub task_dir: PathBuf,
}

impl ShimArgs {
    /// Parses the arguments after the subcommand name.
    pub fn parse(args: &[String]) -> Result<Self, ShimError> {
        match args {
            [flag, dir] if flag == "--task-dir" && !dir.is_empty() => Ok(ShimArgs {
                task_dir: PathBuf::from(dir),
            }),
            _ => Err(ShimError::BadArgs(format!(
                "expected `--task-dir DIR`, got {args:?}"
            ))),
        }
    }

    pub fn to_args(&self) -> Vec<String> {
        vec!["--task-dir".into(), self.task_dir.display().to_string()]
    }
}

/// Numeric identity the workload runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserIds {
    pub uid: u32,
    pub gid: u32,
}

/// Everything the shim needs to run one task; written by the agent as `spec.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimSpec {
    pub task_id: String,
    pub service: String,
    /// Program and arguments; `argv[0]` is resolved through `env["PATH"]`.
    pub argv: Vec<String>,
    /// The complete environment of the workload (nothing else is inherited).
    pub env: BTreeMap<String, String>,
    pub working_dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserIds>,
    #[serde(default)]
    pub resources: Resources,
    /// Signal the agent uses for a graceful stop (kept here so a re-adopting agent knows it).
    pub stop_signal: i32,
    pub stop_grace_ms: u64,
    #[serde(default)]
    pub log: LogLimits,
    /// Host ports held by the task, so they survive an agent restart.
    #[serde(default)]
    pub ports: Vec<PortBinding>,
    /// Binary providing the `shim-exec` subcommand (normally the flotilla binary itself).
    pub exec_helper: PathBuf,
    /// How long the shim waits for `shutdown` after the workload exited.
    pub linger_after_exit_ms: u64,
}

impl ShimSpec {
    /// `argv` started through the `shim-exec` trampoline with the workload's cgroup, user,
    /// environment and working dir, stdout/stderr piped. Used for the workload itself and for
    /// exec health checks, so both run in exactly the same context.
    pub fn trampoline_command(
        &self,
        cgroup_procs: Vec<PathBuf>,
        argv: &[String],
    ) -> tokio::process::Command {
        let trampoline = ExecTrampolineArgs {
            cgroup_procs,
            uid: self.user.map(|u| u.uid),
            gid: self.user.map(|u| u.gid),
            argv: argv.to_vec(),
        };
        let mut command = tokio::process::Command::new(&self.exec_helper);
        command
            .arg(EXEC_SUBCOMMAND)
            .args(trampoline.to_args())
            .env_clear()
            .envs(&self.env)
            .current_dir(&self.working_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a stop reaches every process the workload forked.
            .process_group(0);
        command
    }

    /// Whether any cgroup limit or reservation is asked for (then a cgroup is mandatory).
    pub fn wants_cgroup_limits(&self) -> bool {
        let Resources {
            limits: l,
            reservations: r,
        } = self.resources;
        [l, r]
            .iter()
            .any(|a| a.cpu_millis.is_some() || a.memory_bytes.is_some() || a.pids.is_some())
    }
}

/// How the workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit status; for a signal death 128 + signal, as Docker reports it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub at: Timestamp,
}

/// The shim's view of its task, mirrored in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    pub shim_pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// Why the workload could not be started; the shim exits right after recording it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_error: Option<String>,
    /// Whether the workload runs in a task cgroup.
    #[serde(default)]
    pub in_cgroup: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited: Option<ExitRecord>,
}

/// A request on `shim.sock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ShimRequest {
    /// Reply with the current state.
    Status,
    /// Send `signal` to the workload's process group, wait up to `grace_ms`, then SIGKILL the
    /// group and everything in the cgroup. Replies once the workload is gone.
    Stop { signal: i32, grace_ms: u64 },
    /// Replies once the workload has exited.
    Wait,
    /// Rewrite the cgroup limits in place.
    UpdateResources { resources: Resources },
    /// Kill whatever is left, remove the cgroup, reply, and exit.
    Shutdown,
}

/// A reply on `shim.sock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShimResponse {
    State(ShimState),
    Error(String),
}

/// Runs the shim for `args.task_dir` until it is shut down. Synchronous: it builds its own
/// single-threaded runtime. An error means the task could not be started (also recorded as
/// `start_error` in `state.json`) or the task dir is unusable.
pub fn run_shim(args: ShimArgs) -> Result<(), ShimError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ShimError::Runtime)?;
    runtime.block_on(shim_main(args.task_dir))
}

/// What the request handlers share.
struct Supervisor {
    dir: PathBuf,
    pid: u32,
    cgroup: Option<TaskCgroup>,
    state: watch::Sender<ShimState>,
    shutdown: Notify,
}

async fn shim_main(dir: PathBuf) -> Result<(), ShimError> {
    let spec: ShimSpec = read_json(&dir.join(SPEC_FILE))?;
    let span = tracing::info_span!("shim", task = %spec.task_id, service = %spec.service);
    async move {
        let mut state = ShimState {
            shim_pid: std::process::id(),
            pid: None,
            started_at: None,
            start_error: None,
            in_cgroup: false,
            exited: None,
        };
        let (supervisor, workload, listener) = match launch(&dir, &spec, &mut state).await {
            Ok(launched) => launched,
            Err(e) => {
                tracing::error!(error = %e, "task start failed");
                state.start_error = Some(e.to_string());
                write_json_atomic(&dir.join(STATE_FILE), &state)?;
                return Err(e);
            }
        };
        let supervisor = Arc::new(supervisor);
        tokio::spawn(watch_exit(supervisor.clone(), workload));
        serve(
            supervisor.clone(),
            listener,
            Duration::from_millis(spec.linger_after_exit_ms),
        )
        .await;
        if let Some(cg) = &supervisor.cgroup {
            if let Err(e) = cg.remove() {
                tracing::warn!(error = %e, "cannot remove task cgroup");
            }
        }
        let _ = std::fs::remove_file(dir.join(SOCKET_FILE));
        tracing::info!("shim done");
        Ok(())
    }
    .instrument(span)
    .await
}

/// Creates the cgroup, binds the socket, starts the workload and its log pumps.
async fn launch(
    dir: &Path,
    spec: &ShimSpec,
    state: &mut ShimState,
) -> Result<(Supervisor, Workload, UnixListener), ShimError> {
    let cgroup = match prepare_cgroup(spec) {
        Ok(cg) => Some(cg),
        Err(e) if !spec.wants_cgroup_limits() => {
            tracing::warn!(error = %e, "running the task without a cgroup (no limits were requested)");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let log = Arc::new(Mutex::new(RotatingLog::open(dir, spec.log)?));
    let socket_path = dir.join(SOCKET_FILE);
    // A stale socket from a previous shim of this dir would make bind fail.
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path).map_err(|source| ShimError::Io {
        path: socket_path.clone(),
        source,
    })?;
    let cgroup_procs = cgroup
        .as_ref()
        .map(TaskCgroup::procs_files)
        .unwrap_or_default();
    let mut child = spec
        .trampoline_command(cgroup_procs, &spec.argv)
        .spawn()
        .map_err(|source| ShimError::Spawn {
            program: spec.argv.first().cloned().unwrap_or_default(),
            source,
        })?;
    let pid = child.id().ok_or_else(|| ShimError::Spawn {
        program: spec.argv.first().cloned().unwrap_or_default(),
        source: io::Error::other("the workload exited before its pid could be read"),
    })?;
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(pump_output(out, log.clone())));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(pump_output(err, log)));
    }
    state.pid = Some(pid);
    state.started_at = Some(now_ms());
    state.in_cgroup = cgroup.is_some();
    write_json_atomic(&dir.join(STATE_FILE), state)?;
    tracing::info!(pid, argv = ?spec.argv, "workload started");
    let (tx, _) = watch::channel(state.clone());
    Ok((
        Supervisor {
            dir: dir.to_path_buf(),
            pid,
            cgroup,
            state: tx,
            shutdown: Notify::new(),
        },
        Workload { child, pumps },
        listener,
    ))
}

/// The running workload and the tasks copying its output.
struct Workload {
    child: tokio::process::Child,
    pumps: Vec<JoinHandle<()>>,
}

fn prepare_cgroup(spec: &ShimSpec) -> Result<TaskCgroup, CgroupError> {
    let cgroup = CgroupLayout::detect()?.task(&spec.task_id);
    let result = cgroup.create().and_then(|()| cgroup.apply(&spec.resources));
    if let Err(e) = result {
        // Leave nothing half-made behind.
        let _ = cgroup.remove();
        return Err(e);
    }
    Ok(cgroup)
}

/// Copies one output stream of the workload into the log, line by line.
async fn pump_output(mut stream: impl AsyncRead + Unpin, log: Arc<Mutex<RotatingLog>>) {
    let mut splitter = LineSplitter::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let (lines, eof) = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => (splitter.finish().into_iter().collect(), true),
            Ok(n) => (splitter.push(&buf[..n]), false),
        };
        {
            // A poisoned lock only means another pump panicked mid-write; the file is still usable.
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            for line in &lines {
                if let Err(e) = log.write_line(line) {
                    tracing::warn!(error = %e, "cannot write task output to the log");
                }
            }
        }
        if eof {
            return;
        }
    }
}

/// Reaps the workload and records how it ended.
async fn watch_exit(supervisor: Arc<Supervisor>, workload: Workload) {
    let Workload { mut child, pumps } = workload;
    let status = child.wait().await;
    // The workload is gone; nothing it started may outlive it (as in a container).
    let _ = killpg(Pid::from_raw(supervisor.pid as i32), Signal::SIGKILL);
    if let Some(cg) = &supervisor.cgroup {
        cg.kill_all();
    }
    let record = match status {
        Ok(status) => exit_record(status, supervisor.cgroup.as_ref()),
        Err(e) => {
            tracing::error!(error = %e, "cannot wait for the workload");
            ExitRecord {
                code: None,
                signal: None,
                oom_killed: false,
                at: now_ms(),
            }
        }
    };
    // Let the last output reach the log before the exit is visible, so a reader that stops at the
    // exit sees everything. Bounded: a process outside the cgroup may hold the pipes open.
    let _ = tokio::time::timeout(PUMP_DRAIN_TIMEOUT, futures::future::join_all(pumps)).await;
    tracing::info!(code = ?record.code, signal = ?record.signal, oom_killed = record.oom_killed, "workload exited");
    supervisor.state.send_modify(|s| s.exited = Some(record));
    let state = supervisor.state.borrow().clone();
    if let Err(e) = write_json_atomic(&supervisor.dir.join(STATE_FILE), &state) {
        tracing::error!(error = %e, "cannot record the exit");
    }
}

fn exit_record(status: ExitStatus, cgroup: Option<&TaskCgroup>) -> ExitRecord {
    let signal = status.signal();
    let oom_killed = signal == Some(libc::SIGKILL) && cgroup.is_some_and(|cg| cg.oom_kills() > 0);
    ExitRecord {
        code: status.code().or(signal.map(|s| 128 + s)),
        signal,
        oom_killed,
        at: now_ms(),
    }
}

/// Accepts connections until shutdown, or until the workload has been gone for `linger`.
async fn serve(supervisor: Arc<Supervisor>, listener: UnixListener, linger: Duration) {
    let mut exited = supervisor.state.subscribe();
    let linger_over = async move {
        let _ = exited.wait_for(|s| s.exited.is_some()).await;
        tokio::time::sleep(linger).await;
    };
    tokio::pin!(linger_over);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(handle_connection(supervisor.clone(), stream)); }
                Err(e) => tracing::warn!(error = %e, "accept on shim socket failed"),
            },
            () = supervisor.shutdown.notified() => return,
            () = &mut linger_over => {
                tracing::info!("no shutdown request after the workload exited; exiting");
                return;
            }
        }
    }
}

async fn handle_connection(supervisor: Arc<Supervisor>, stream: UnixStream) {
    let mut framed = Framed::new(stream, LinesCodec::new_with_max_length(MAX_MESSAGE_BYTES));
    while let Some(Ok(line)) = framed.next().await {
        let (response, shutting_down) = match serde_json::from_str::<ShimRequest>(&line) {
            Ok(request) => {
                let shutting_down = request == ShimRequest::Shutdown;
                (handle_request(&supervisor, request).await, shutting_down)
            }
            Err(e) => (ShimResponse::Error(format!("bad request: {e}")), false),
        };
        let text = match serde_json::to_string(&response) {
            Ok(t) => t,
            Err(e) => format!("{{\"error\":\"cannot encode reply: {e}\"}}"),
        };
        if framed.send(text).await.is_err() {
            return;
        }
        if shutting_down {
            supervisor.shutdown.notify_one();
            // Keep the connection open until the process exits: the caller takes end of file as
            // "the shim has cleaned up and is gone".
            std::future::pending::<()>().await;
        }
    }
}

async fn handle_request(supervisor: &Supervisor, request: ShimRequest) -> ShimResponse {
    match request {
        ShimRequest::Status => ShimResponse::State(supervisor.state.borrow().clone()),
        ShimRequest::Wait => ShimResponse::State(wait_exited(supervisor).await),
        ShimRequest::Stop { signal, grace_ms } => {
            let signal = match Signal::try_from(signal) {
                Ok(s) => s,
                Err(_) => {
                    return ShimResponse::Error(format!(
                        "signal: {signal} is not a signal this shim can send"
                    ))
                }
            };
            ShimResponse::State(stop(supervisor, signal, Duration::from_millis(grace_ms)).await)
        }
        ShimRequest::Shutdown => {
            ShimResponse::State(stop(supervisor, Signal::SIGKILL, Duration::ZERO).await)
        }
        ShimRequest::UpdateResources { resources } => match &supervisor.cgroup {
            None => ShimResponse::Error(
                "resources: the task runs without a cgroup, so its limits cannot be changed".into(),
            ),
            Some(cg) => match cg.apply(&resources) {
                Ok(()) => ShimResponse::State(supervisor.state.borrow().clone()),
                Err(e) => ShimResponse::Error(e.to_string()),
            },
        },
    }
}

async fn wait_exited(supervisor: &Supervisor) -> ShimState {
    let mut rx = supervisor.state.subscribe();
    // The sender lives as long as the supervisor, so this only returns once exited is set.
    let result = rx.wait_for(|s| s.exited.is_some()).await.map(|s| s.clone());
    result.unwrap_or_else(|_| supervisor.state.borrow().clone())
}

async fn stop(supervisor: &Supervisor, signal: Signal, grace: Duration) -> ShimState {
    if supervisor.state.borrow().exited.is_some() {
        return supervisor.state.borrow().clone();
    }
    let group = Pid::from_raw(supervisor.pid as i32);
    tracing::info!(signal = %signal, grace = ?grace, "stopping workload");
    let _ = killpg(group, signal);
    if signal != Signal::SIGKILL {
        if let Ok(state) = tokio::time::timeout(grace, wait_exited(supervisor)).await {
            return state;
        }
        tracing::info!("grace period over; killing");
    }
    let _ = killpg(group, Signal::SIGKILL);
    // Also catches processes that moved to another process group.
    if let Some(cg) = &supervisor.cgroup {
        cg.kill_all();
    }
    wait_exited(supervisor).await
}

/// Reads a JSON file into `T`.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ShimError> {
    let bytes = std::fs::read(path).map_err(|source| ShimError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ShimError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Replaces `path` with `value` as JSON so readers never see a half-written file.
pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), ShimError> {
    let tmp = path.with_extension("json.tmp");
    let io_err = |source| ShimError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| ShimError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    // Private to root: `spec.json` holds the task's environment (its secrets among it).
    let write = || -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&bytes)
    };
    write().map_err(io_err)?;
    std::fs::rename(&tmp, path).map_err(io_err)
}

/// Why a request to a shim got no answer.
#[derive(Debug, Error)]
pub enum ShimCallError {
    /// No shim listens (it exited or crashed).
    #[error("shim at {path} is not reachable: {source}")]
    Unreachable { path: PathBuf, source: io::Error },
    #[error("shim at {path} closed the connection without replying")]
    Closed { path: PathBuf },
    #[error("shim at {path} sent an unreadable reply: {reason}")]
    Protocol { path: PathBuf, reason: String },
    /// The shim understood and refused.
    #[error("{0}")]
    Refused(String),
}

impl ShimCallError {
    /// The shim could not be reached because this process is out of descriptors (or memory):
    /// the shim is most likely alive, so the call must be retried, never taken for its end.
    pub fn is_local_exhaustion(&self) -> bool {
        matches!(self, ShimCallError::Unreachable { source, .. }
            if flotilla_mesh::conn_limits::is_resource_exhaustion(source))
    }
}

/// Sends one request to the shim of `task_dir` and returns its state reply.
pub async fn call_shim(task_dir: &Path, request: &ShimRequest) -> Result<ShimState, ShimCallError> {
    let path = task_dir.join(SOCKET_FILE);
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|source| ShimCallError::Unreachable {
            path: path.clone(),
            source,
        })?;
    let mut framed = Framed::new(stream, LinesCodec::new_with_max_length(MAX_MESSAGE_BYTES));
    let text = serde_json::to_string(request).map_err(|e| ShimCallError::Protocol {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    framed
        .send(text)
        .await
        .map_err(|e| ShimCallError::Protocol {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let line = match framed.next().await {
        Some(Ok(line)) => line,
        Some(Err(e)) => {
            return Err(ShimCallError::Protocol {
                path,
                reason: e.to_string(),
            })
        }
        None => return Err(ShimCallError::Closed { path }),
    };
    let response: ShimResponse =
        serde_json::from_str(&line).map_err(|e| ShimCallError::Protocol {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if *request == ShimRequest::Shutdown {
        // The shim closes the socket only after it removed the cgroup and is about to exit.
        while let Some(Ok(_)) = framed.next().await {}
    }
    match response {
        ShimResponse::State(state) => Ok(state),
        ShimResponse::Error(message) => Err(ShimCallError::Refused(message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_wire_format() {
        let req: ShimRequest =
            serde_json::from_str(r#"{"op":"stop","signal":15,"grace_ms":10000}"#).unwrap();
        assert_eq!(
            req,
            ShimRequest::Stop {
                signal: 15,
                grace_ms: 10000
            }
        );
        let req: ShimRequest = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(req, ShimRequest::Status);
        assert!(serde_json::from_str::<ShimRequest>(r#"{"op":"explode"}"#).is_err());
    }

    #[test]
    fn shim_args_parse() {
        let a = ShimArgs::parse(&["--task-dir".into(), "/x".into()]).unwrap();
        assert_eq!(ShimArgs::parse(&a.to_args()).unwrap(), a);
        assert!(ShimArgs::parse(&["--bogus".into()]).is_err());
    }
}
