//! The process driver end to end: real shims (through the testhost binary), real processes, real
//! cgroups, real sockets.
// Test helpers outside #[test] fns: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use flotilla_agent::driver::{Driver, DriverError};
use flotilla_agent::health::{probe, HealthMonitor, HealthReport};
use flotilla_agent::logs::LogLimits;
use flotilla_agent::process::ProcessDriver;
use flotilla_types::{
    Health, HealthCheck, HealthTest, PortBinding, ServiceSpec, Task, TaskState, TaskStatus,
};
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOST: &str = env!("CARGO_BIN_EXE_flotilla-agent-testhost");
const DEADLINE: Duration = Duration::from_secs(20);

fn driver(state: &Path) -> ProcessDriver {
    ProcessDriver::new(state.to_path_buf(), PathBuf::from(HOST)).unwrap()
}

fn task_with(spec: ServiceSpec) -> Task {
    let mut t = Task::new(&spec, 1, Some(1), 0);
    t.status = TaskStatus::new(TaskState::Assigned, 0, "");
    t
}

fn shell_task(script: &str) -> Task {
    task_with(ServiceSpec::process(
        "svc",
        vec!["/bin/sh".into(), "-c".into(), script.into()],
    ))
}

/// A shell task that runs as root: its script or probes use the test's root-only temp dir.
fn root_shell_task(script: &str) -> Task {
    let mut task = shell_task(script);
    task.spec.user = Some("root".into());
    task
}

/// Polls `check` until it returns Some, failing the test after a generous deadline.
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn logs_text(d: &ProcessDriver, id: &str, tail: Option<usize>) -> String {
    let mut s = d.logs(id, tail, false).await.unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn logs_until(d: &ProcessDriver, id: &str, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let text = logs_text(d, id, None).await;
        if text.contains(needle) {
            return text;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "log never contained {needle:?}: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn proc_field(pid: u32, index: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is index 0, pgrp index 2.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(index).map(str::to_string)
}

fn gone(pid: u32) -> bool {
    proc_field(pid, 0).is_none_or(|state| state == "Z")
}

fn memory_cgroup(id: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/cgroup/memory/flotilla/{id}"))
}

fn cgroups_writable() -> bool {
    let probe = Path::new("/sys/fs/cgroup/memory/flotilla");
    if std::fs::create_dir_all(probe).is_ok() && probe.join("cgroup.procs").exists() {
        return true;
    }
    eprintln!("SKIP: cgroup v1 memory hierarchy is not writable here; cgroup assertions skipped");
    false
}

#[tokio::test]
async fn start_runs_in_own_group_and_cgroup_with_env_and_logs() {
    let state = tempfile::tempdir().unwrap();
    let d = driver(state.path());
    let task = shell_task(
        "echo hi; echo \"port=$PORT p80=$FLOTILLA_PORT_80 p9=$FLOTILLA_PORT_9 id=$FLOTILLA_TASK_ID slot=$FLOTILLA_SLOT svc=$FLOTILLA_SERVICE\"; exec sleep 1000",
    );
    let ports = [
        PortBinding {
            target: 80,
            host_port: 23456,
        },
        PortBinding {
            target: 9,
            host_port: 23457,
        },
    ];
    let running = d.start(&task, &ports).await.unwrap();
    let pid = running.pid.unwrap();
    assert_eq!(
        proc_field(pid, 2),
        Some(pid.to_string()),
        "workload leads its own process group"
    );

    let text = logs_until(&d, &task.id, "port=").await;
    assert!(text.starts_with("hi\n"), "{text:?}");
    let expected = format!(
        "port=23456 p80=23456 p9=23457 id={} slot=1 svc=svc",
        task.id
    );
    assert!(text.contains(&expected), "{text:?}");
    assert_eq!(
        logs_text(&d, &task.id, Some(1)).await,
        format!("{expected}\n")
    );

    if cgroups_writable() {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            cg.contains(&format!("memory:/flotilla/{}", task.id)),
            "{cg}"
        );
        assert!(cg.contains(&format!("pids:/flotilla/{}", task.id)), "{cg}");
    }

    let exit = d.stop(&task.id, 15, Duration::from_secs(10)).await.unwrap();
    assert_eq!(exit.signal, Some(15));
    assert_eq!(exit.code, Some(143));
    assert!(exit.message.contains("signal 15"), "{}", exit.message);
    assert!(gone(pid));

    d.remove(&task.id).await.unwrap();
    assert!(!state.path().join("tasks").join(&task.id).exists());
    assert!(!memory_cgroup(&task.id).exists());
    d.remove(&task.id).await.unwrap();
    assert!(matches!(
        d.wait(&task.id).await,
        Err(DriverError::NotFound(_))
    ));
}

#[tokio::test]
async fn stop_honours_trap_and_kills_after_grace_including_children() {
    let state = tempfile::tempdir().unwrap();
    let d = driver(state.path());

    let polite =
        shell_task("trap 'echo bye; exit 0' TERM; echo ready; while true; do sleep 0.1; done");
    d.start(&polite, &[]).await.unwrap();
    logs_until(&d, &polite.id, "ready").await;
    let exit = d
        .stop(&polite.id, 15, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((exit.code, exit.signal), (Some(0), None), "{exit:?}");
    assert_eq!(exit.message, "exited with code 0");

    let stubborn = shell_task("trap '' TERM; sleep 1000 & sleep 1000 & echo ready; wait");
    let pid = d.start(&stubborn, &[]).await.unwrap().pid.unwrap();
    logs_until(&d, &stubborn.id, "ready").await;
    let pgid = pid.to_string();
    let group: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|p: &u32| proc_field(*p, 2).as_deref() == Some(pgid.as_str()))
        .collect();
    assert!(
        group.len() >= 3,
        "shell and two sleeps expected, got {group:?}"
    );
    let exit = d
        .stop(&stubborn.id, 15, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert_eq!(exit.code, Some(137));
    assert!(!exit.oom_killed);
    for p in group {
        eventually("children of the workload to be gone", || {
            gone(p).then_some(())
        })
        .await;
    }
    d.remove(&polite.id).await.unwrap();
    d.remove(&stubborn.id).await.unwrap();
}

#[tokio::test]
async fn wait_resolves_when_workload_is_killed_externally() {
    let state = tempfile::tempdir().unwrap();
    let d = Arc::new(driver(state.path()));
    let task = shell_task("exec sleep 1000");
    let pid = d.start(&task, &[]).await.unwrap().pid.unwrap();
    let waiter = {
        let d = d.clone();
        let id = task.id.clone();
        tokio::spawn(async move { d.wait(&id).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "wait must block while the task runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exit = tokio::time::timeout(DEADLINE, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(exit.signal, Some(9));
    assert!(!exit.oom_killed);
    // Once exited, wait answers at once.
    assert_eq!(d.wait(&task.id).await.unwrap().signal, Some(9));
    d.remove(&task.id).await.unwrap();
}

#[tokio::test]
async fn memory_limit_oom_kill_is_reported() {
    if !cgroups_writable() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let d = driver(state.path());
    let mut task =
        shell_task("a=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived; sleep 5");
    task.spec.resources.limits.memory_bytes = Some(32 << 20);
    d.start(&task, &[]).await.unwrap();
    let exit = tokio::time::timeout(DEADLINE, d.wait(&task.id))
        .await
        .unwrap()
        .unwrap();
    assert!(exit.oom_killed, "{exit:?}");
    assert_eq!(exit.signal, Some(9));
    assert_eq!(exit.message, "OOM killed (memory limit 32MiB)");
    d.remove(&task.id).await.unwrap();
}

#[tokio::test]
async fn limits_are_written_and_updated_in_place() {
    if !cgroups_writable() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let d = driver(state.path());
    let mut task = shell_task("exec sleep 1000");
    let r = &mut task.spec.resources;
    r.limits.memory_bytes = Some(64 << 20);
    r.limits.cpu_millis = Some(500);
    r.limits.pids = Some(100);
    r.reservations.memory_bytes = Some(32 << 20);
    r.reservations.cpu_millis = Some(250);
    let pid = d.start(&task, &[]).await.unwrap().pid.unwrap();
    let read = |ctl: &str, file: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{ctl}/flotilla/{}/{file}", task.id))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(
        read("memory", "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(
        read("memory", "memory.memsw.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(
        read("memory", "memory.soft_limit_in_bytes"),
        (32u64 << 20).to_string()
    );
    assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(read("cpu", "cpu.shares"), "256");
    assert_eq!(read("pids", "pids.max"), "100");

    let mut bigger = task.spec.resources;
    bigger.limits.memory_bytes = Some(128 << 20);
    bigger.limits.cpu_millis = Some(1500);
    d.update_resources(&task.id, &bigger).await.unwrap();
    assert_eq!(
        read("memory", "memory.limit_in_bytes"),
        (128u64 << 20).to_string()
    );
    assert_eq!(
        read("memory", "memory.memsw.limit_in_bytes"),
        (128u64 << 20).to_string()
    );
    assert_eq!(read("cpu", "cpu.cfs_quota_us"), "150000");

    let mut smaller = bigger;
    smaller.limits.memory_bytes = Some(48 << 20);
    smaller.reservations.memory_bytes = None;
    d.update_resources(&task.id, &smaller).await.unwrap();
    assert_eq!(
        read("memory", "memory.limit_in_bytes"),
        (48u64 << 20).to_string()
    );
    assert_eq!(
        read("memory", "memory.memsw.limit_in_bytes"),
        (48u64 << 20).to_string()
    );

    let mut bad = smaller;
    bad.limits.memory_bytes = Some(1024);
    let err = d
        .update_resources(&task.id, &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("deploy.resources.limits.memory"), "{err}");

    let recovered = driver(state.path()).recover().await.unwrap();
    assert_eq!(
        recovered[0].pid,
        Some(pid),
        "update must not restart the workload"
    );
    assert!(recovered[0].exited.is_none());
    d.remove(&task.id).await.unwrap();
    assert!(gone(pid));
}

#[tokio::test]
async fn new_driver_recovers_running_and_exited_tasks() {
    let state = tempfile::tempdir().unwrap();
    let ports = [PortBinding {
        target: 8080,
        host_port: 24001,
    }];
    let (running, finished, pid) = {
        let first = driver(state.path());
        let running = shell_task("exec sleep 1000");
        let pid = first.start(&running, &ports).await.unwrap().pid.unwrap();
        let finished = shell_task("sleep 0.3; exit 3");
        first.start(&finished, &[]).await.unwrap();
        (running, finished, pid)
        // `first` is dropped here: the agent is gone, the shims are not.
    };
    let second = driver(state.path());
    let start = Instant::now();
    let recovered = loop {
        let r = second.recover().await.unwrap();
        if r.iter()
            .any(|t| t.task_id == finished.id && t.exited.is_some())
        {
            break r;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the short task never exited: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(recovered.len(), 2);
    let r = recovered.iter().find(|t| t.task_id == running.id).unwrap();
    assert_eq!(r.pid, Some(pid));
    assert_eq!(r.ports, ports.to_vec());
    assert!(r.exited.is_none());
    let f = recovered.iter().find(|t| t.task_id == finished.id).unwrap();
    let exit = f.exited.as_ref().unwrap();
    assert_eq!(exit.code, Some(3));
    assert_eq!(exit.message, "exited with code 3");

    let exit = second
        .stop(&running.id, 15, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(exit.signal, Some(15));
    assert_eq!(second.wait(&running.id).await.unwrap(), exit);
    assert!(gone(pid));
    second.remove(&running.id).await.unwrap();
    second.remove(&finished.id).await.unwrap();
    assert!(second.recover().await.unwrap().is_empty());
}

#[tokio::test]
async fn log_files_rotate_within_bounds_and_follow_ends_at_exit() {
    let state = tempfile::tempdir().unwrap();
    let d = driver(state.path())
        .with_log_limits(LogLimits {
            max_file_bytes: 4096,
            max_files: 2,
        })
        .unwrap();
    // Waits for `go` (in its working dir, `<task dir>/work`) so the follower is attached first.
    let task = shell_task(
        "while [ ! -f go ]; do sleep 0.05; done; i=0; while [ $i -lt 3000 ]; do echo \"line $i\"; i=$((i+1)); done",
    );
    d.start(&task, &[]).await.unwrap();
    let dir = state.path().join("tasks").join(&task.id);
    let mut follow = d.logs(&task.id, Some(0), true).await.unwrap();
    std::fs::write(dir.join("work").join("go"), b"").unwrap();
    let mut followed = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(chunk) = follow.next().await {
            followed.extend_from_slice(&chunk.unwrap());
        }
    })
    .await
    .expect("follow must end when the task exits");
    assert!(String::from_utf8_lossy(&followed).ends_with("line 2999\n"));
    let exit = d.wait(&task.id).await.unwrap();
    assert_eq!(exit.code, Some(0));
    let total: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("output.log"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(total <= 2 * 4096, "log files hold {total} bytes");
    assert_eq!(
        logs_text(&d, &task.id, Some(2)).await,
        "line 2998\nline 2999\n"
    );
    d.remove(&task.id).await.unwrap();
}

#[tokio::test]
async fn bad_tasks_are_rejected_by_field() {
    let state = tempfile::tempdir().unwrap();
    let d = driver(state.path());
    let missing = task_with(ServiceSpec::process(
        "svc",
        vec!["no-such-program-xyz".into()],
    ));
    let err = d.start(&missing, &[]).await.unwrap_err();
    assert!(matches!(err, DriverError::StartFailed { .. }), "{err}");
    assert!(err.to_string().contains("no-such-program-xyz"), "{err}");
    assert!(!state.path().join("tasks").join(&missing.id).exists());

    let mut nouser = shell_task("true");
    nouser.spec.user = Some("no-such-user-xyz".into());
    let err = d.start(&nouser, &[]).await.unwrap_err().to_string();
    assert!(
        err.contains("services.svc.user") && err.contains("no user named"),
        "{err}"
    );

    let mut badid = shell_task("true");
    badid.id = "../escape".into();
    let err = d.start(&badid, &[]).await.unwrap_err().to_string();
    assert!(err.contains("task.id"), "{err}");

    let err = d
        .stop("0123456789abcdef", 15, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn runs_as_requested_user() {
    let state = tempfile::tempdir().unwrap();
    let d = driver(state.path());
    let mut task = shell_task("echo \"uid=$(id -u) gid=$(id -g)\"");
    task.spec.user = Some("65534:65534".into());
    d.start(&task, &[]).await.unwrap();
    assert_eq!(d.wait(&task.id).await.unwrap().code, Some(0));
    assert!(logs_text(&d, &task.id, None)
        .await
        .contains("uid=65534 gid=65534"));
    d.remove(&task.id).await.unwrap();
}

/// Without `user:` a process task runs unprivileged, in a working dir of its own, and what the
/// agent keeps about it (its environment in `spec.json`, its output) is readable by root only.
#[tokio::test]
async fn default_task_is_unprivileged_and_its_files_private() {
    use std::os::unix::fs::PermissionsExt;
    let state = tempfile::tempdir().unwrap();
    let d = driver(state.path());
    let mut task = shell_task("echo \"uid=$(id -u) cwd=$(pwd)\"; touch mine && echo wrote");
    task.spec.environment = [("SECRET".to_string(), "hunter2".to_string())].into();
    d.start(&task, &[]).await.unwrap();
    assert_eq!(d.wait(&task.id).await.unwrap().code, Some(0));
    let out = logs_text(&d, &task.id, None).await;
    let dir = state.path().join("tasks").join(&task.id);
    let uid: u32 = out
        .split("uid=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no uid in {out:?}"));
    if nix::unistd::Uid::effective().is_root() {
        assert_ne!(uid, 0, "a task without `user:` ran as root: {out}");
    }
    assert!(
        out.contains(&format!("cwd={}", dir.join("work").display())),
        "{out}"
    );
    assert!(
        out.contains("wrote"),
        "the task cannot write its working dir: {out}"
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o711, "task dir");
    assert_eq!(mode(&dir.join("spec.json")), 0o600, "spec.json");
    assert_eq!(mode(&dir.join("output.log")), 0o600, "output.log");
    d.remove(&task.id).await.unwrap();
}

/// Answers `GET /ok` with 200 and anything else with 503.
async fn http_responder() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 4096];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let status = if request.starts_with("GET /ok ") {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let reply =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    port
}

fn check(test: HealthTest) -> HealthCheck {
    HealthCheck {
        test,
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(5),
        retries: 2,
        start_period: Duration::ZERO,
        start_interval: Duration::from_millis(100),
    }
}

#[tokio::test]
async fn health_probes_http_tcp_and_shell() {
    let state = tempfile::tempdir().unwrap();
    let d = driver(state.path());
    let port = http_responder().await;

    let http_ok = check(HealthTest::Http { path: "/ok".into() });
    assert_eq!(probe(&http_ok, Some(port), "x", &d).await, Ok(()));
    let http_bad = check(HealthTest::Http {
        path: "/health".into(),
    });
    assert_eq!(
        probe(&http_bad, Some(port), "x", &d).await,
        Err("GET /health: 503".into())
    );

    assert_eq!(
        probe(&check(HealthTest::Tcp), Some(port), "x", &d).await,
        Ok(())
    );
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = probe(&check(HealthTest::Tcp), Some(closed), "x", &d)
        .await
        .unwrap_err();
    assert!(
        err.starts_with(&format!("connect 127.0.0.1:{closed}:")) && err.contains("refused"),
        "{err}"
    );

    let mut task = shell_task("exec sleep 1000");
    task.spec.environment.insert("MARKER".into(), "m1".into());
    d.start(&task, &[]).await.unwrap();
    let pass = check(HealthTest::Shell {
        script: "test \"$MARKER\" = m1 && test \"$FLOTILLA_TASK_ID\" = ".to_string() + &task.id,
    });
    assert_eq!(probe(&pass, None, &task.id, &d).await, Ok(()));
    let fail = check(HealthTest::Shell {
        script: "echo boom; exit 1".into(),
    });
    assert_eq!(
        probe(&fail, None, &task.id, &d).await,
        Err("exit code 1: boom".into())
    );
    let cmd = check(HealthTest::Cmd {
        argv: vec!["true".into()],
    });
    assert_eq!(probe(&cmd, None, &task.id, &d).await, Ok(()));
    let mut slow = check(HealthTest::Shell {
        script: "sleep 30".into(),
    });
    slow.timeout = Duration::from_millis(200);
    let err = probe(&slow, None, &task.id, &d).await.unwrap_err();
    assert!(err.starts_with("timed out"), "{err}");
    d.remove(&task.id).await.unwrap();
}

async fn next_report(rx: &mut tokio::sync::mpsc::UnboundedReceiver<HealthReport>) -> HealthReport {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn health_monitor_reports_transitions() {
    let state = tempfile::tempdir().unwrap();
    let flag = state.path().join("healthy-flag");
    let d: Arc<dyn Driver> = Arc::new(driver(state.path()));
    let task = shell_task("exec sleep 1000");
    d.start(&task, &[]).await.unwrap();
    let script = format!("test -f {}", flag.display());
    let mut hc = check(HealthTest::Shell { script });
    // Failures inside the start period must not count.
    hc.start_period = Duration::from_millis(600);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let _monitor = HealthMonitor::spawn(task.id.clone(), hc, Vec::new(), d.clone(), tx);
    let first = next_report(&mut rx).await;
    assert_eq!(first.health, Health::Starting);
    let unhealthy = next_report(&mut rx).await;
    assert_eq!(unhealthy.health, Health::Unhealthy);
    assert!(
        unhealthy.message.starts_with("exit code 1"),
        "{}",
        unhealthy.message
    );
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "failures in start_period counted"
    );
    std::fs::write(&flag, b"").unwrap();
    assert_eq!(next_report(&mut rx).await.health, Health::Healthy);
    d.remove(&task.id).await.unwrap();
}

/// Starts `hc` (whose `interval` is too long for any test to wait out) on `task`, past its
/// first `starting` report.
async fn monitor_with_long_interval(
    d: &Arc<dyn Driver>,
    task: &Task,
    hc: HealthCheck,
) -> (
    HealthMonitor,
    tokio::sync::mpsc::UnboundedReceiver<HealthReport>,
) {
    assert!(
        hc.interval > DEADLINE,
        "the interval alone must not get us there"
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let monitor = HealthMonitor::spawn(task.id.clone(), hc, Vec::new(), d.clone(), tx);
    assert_eq!(next_report(&mut rx).await.health, Health::Starting);
    (monitor, rx)
}

/// With Compose's default 30 s interval a task that is ready at once must not wait an interval
/// for its first probe (#12): the first probe runs right after the start.
#[tokio::test]
async fn health_monitor_probes_at_once() {
    let state = tempfile::tempdir().unwrap();
    let d: Arc<dyn Driver> = Arc::new(driver(state.path()));
    let task = shell_task("exec sleep 1000");
    d.start(&task, &[]).await.unwrap();
    let hc = HealthCheck::with_defaults(HealthTest::Cmd {
        argv: vec!["true".into()],
    });
    let (_monitor, mut rx) = monitor_with_long_interval(&d, &task, hc).await;
    assert_eq!(next_report(&mut rx).await.health, Health::Healthy);
    d.remove(&task.id).await.unwrap();
}

/// The immediate first probe runs before the workload may listen, so its failure does not
/// count: with `retries: 1` a failing check makes the task unhealthy at the second probe, not
/// the first.
#[tokio::test]
async fn health_first_probe_failure_does_not_count() {
    let state = tempfile::tempdir().unwrap();
    let d: Arc<dyn Driver> = Arc::new(driver(state.path()));
    let task = root_shell_task("exec sleep 1000");
    d.start(&task, &[]).await.unwrap();
    let probes = state.path().join("probes");
    let mut hc = check(HealthTest::Shell {
        script: format!("echo >> {}; exit 1", probes.display()),
    });
    hc.retries = 1;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _monitor = HealthMonitor::spawn(task.id.clone(), hc, Vec::new(), d.clone(), tx);
    assert_eq!(next_report(&mut rx).await.health, Health::Starting);
    assert_eq!(next_report(&mut rx).await.health, Health::Unhealthy);
    let count = std::fs::read_to_string(&probes).unwrap().lines().count();
    assert!(count >= 2, "unhealthy after {count} probe(s)");
    d.remove(&task.id).await.unwrap();
}

/// Compose's defaults (30 s interval, no start period): a workload that is not ready at the
/// first probe but right after is seen ready long before one interval (#12: a plain deploy
/// took 30 s to report ready).
#[tokio::test]
async fn health_with_compose_defaults_sees_a_late_listener_ready_early() {
    let state = tempfile::tempdir().unwrap();
    let flag = state.path().join("ready-flag");
    let d: Arc<dyn Driver> = Arc::new(driver(state.path()));
    let task = root_shell_task("exec sleep 1000");
    d.start(&task, &[]).await.unwrap();
    let probes = state.path().join("probes");
    let hc = HealthCheck::with_defaults(HealthTest::Shell {
        script: format!("echo >> {}; test -f {}", probes.display(), flag.display()),
    });
    let (_monitor, mut rx) = monitor_with_long_interval(&d, &task, hc).await;
    eventually("the first probe", || probes.exists().then_some(())).await;
    std::fs::write(&flag, b"").unwrap();
    assert_eq!(next_report(&mut rx).await.health, Health::Healthy);
    d.remove(&task.id).await.unwrap();
}

/// Inside `start_period` probes come every `start_interval` (Compose), not every `interval`,
/// so a task that becomes ready shortly after its start is seen ready soon.
#[tokio::test]
async fn health_monitor_uses_start_interval_in_start_period() {
    let state = tempfile::tempdir().unwrap();
    let flag = state.path().join("ready-flag");
    let d: Arc<dyn Driver> = Arc::new(driver(state.path()));
    let task = root_shell_task("exec sleep 1000");
    d.start(&task, &[]).await.unwrap();
    let probes = state.path().join("probes");
    let mut hc = HealthCheck::with_defaults(HealthTest::Shell {
        script: format!("echo >> {}; test -f {}", probes.display(), flag.display()),
    });
    hc.start_period = Duration::from_secs(3600);
    hc.start_interval = Duration::from_millis(100);
    let (_monitor, mut rx) = monitor_with_long_interval(&d, &task, hc).await;
    // Let the first probe fail, so the pass below comes from a later probe.
    eventually("the first probe", || probes.exists().then_some(())).await;
    std::fs::write(&flag, b"").unwrap();
    assert_eq!(next_report(&mut rx).await.health, Health::Healthy);
    d.remove(&task.id).await.unwrap();
}
