//! The agent running out of file descriptors (#14): a health probe that cannot run says
//! nothing about the task, so it must not count as a failure; a stop that cannot reach the
//! task's shim must fail (to be retried), never be taken for the shim's end while the workload
//! runs on. Its own test binary, as it lowers the whole process's descriptor limit; the tests
//! take turns through [`LIMIT`].
// Test helpers outside #[test] fns: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use flotilla_agent::driver::{Driver, DriverError};
use flotilla_agent::health::{probe_outcome, HealthMonitor, Outcome};
use flotilla_agent::process::ProcessDriver;
use flotilla_types::{
    Health, HealthCheck, HealthTest, PortBinding, ServiceSpec, Task, TaskState, TaskStatus,
};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const HOST: &str = env!("CARGO_BIN_EXE_flotilla-agent-testhost");

/// Held by a test for its whole run (its runtime included) while it lowers the limit, so the
/// other keeps its descriptors.
static LIMIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `test` on its own runtime, in turn with the other tests.
fn in_turn<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F) {
    let _turn = LIMIT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(test());
}

fn check(test: HealthTest) -> HealthCheck {
    HealthCheck {
        test,
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(2),
        retries: 1,
        start_period: Duration::ZERO,
        start_interval: Duration::from_millis(50),
    }
}

/// Opens descriptors until the process has none left; they are freed when dropped.
fn exhaust_descriptors() -> Vec<std::fs::File> {
    let mut held = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => return held,
            Err(e) => panic!("unexpected error while opening files: {e}"),
        }
    }
}

#[test]
fn probes_failing_for_lack_of_descriptors_do_not_make_a_task_unhealthy() {
    in_turn(probes_failing_for_lack_of_descriptors);
}

async fn probes_failing_for_lack_of_descriptors() {
    let state = tempfile::tempdir().unwrap();
    let driver =
        Arc::new(ProcessDriver::new(state.path().to_path_buf(), PathBuf::from(HOST)).unwrap());
    // The "task": a listening socket that accepts (the kernel does, without our help).
    let task = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = task.local_addr().unwrap().port();
    let tcp = check(HealthTest::Tcp);
    let http = check(HealthTest::Http { path: "/".into() });
    assert_eq!(
        probe_outcome(&tcp, Some(port), "t", driver.as_ref()).await,
        Outcome::Done(Ok(()))
    );

    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 256.min(soft), hard).unwrap();
    let held = exhaust_descriptors();
    for c in [&tcp, &http] {
        let outcome = probe_outcome(c, Some(port), "t", driver.as_ref()).await;
        assert!(
            matches!(outcome, Outcome::Inconclusive(_)),
            "{:?}: {outcome:?}",
            c.test
        );
    }
    let (reports, mut received) = tokio::sync::mpsc::unbounded_channel();
    let ports = vec![PortBinding {
        target: port,
        host_port: port,
    }];
    let monitor = HealthMonitor::spawn("t".into(), tcp.clone(), ports, driver.clone(), reports);
    // Many probe periods (and far past the start phase) while out of descriptors.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(held);
    while let Ok(report) = received.try_recv() {
        assert_ne!(report.health, Health::Unhealthy, "{}", report.message);
    }
    drop(monitor);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    assert_eq!(
        probe_outcome(&tcp, Some(port), "t", driver.as_ref()).await,
        Outcome::Done(Ok(()))
    );
}

/// Kills the workload if the test fails before stopping it.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &self.0.to_string()])
                .status();
        }
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat[stat.rfind(')')? + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

#[test]
fn a_stop_that_cannot_reach_the_shim_fails_and_leaves_the_task_tracked() {
    in_turn(stop_without_descriptors);
}

async fn stop_without_descriptors() {
    let state = tempfile::tempdir().unwrap();
    let driver = ProcessDriver::new(state.path().to_path_buf(), PathBuf::from(HOST)).unwrap();
    let spec = ServiceSpec::process("svc", vec!["sleep".into(), "1000".into()]);
    let mut task = Task::new(&spec, 1, Some(1), 0);
    task.status = TaskStatus::new(TaskState::Assigned, 0, "");
    let pid = driver.start(&task, &[]).await.unwrap().pid.unwrap();
    let _cleanup = KillOnDrop(pid);

    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 256.min(soft), hard).unwrap();
    let held = exhaust_descriptors();
    let stopped = driver.stop(&task.id, 15, Duration::from_secs(5)).await;
    drop(held);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    assert!(
        matches!(stopped, Err(DriverError::ShimUnavailable { .. })),
        "{stopped:?}"
    );
    assert!(alive(pid), "the workload was given up on");

    // Descriptors back: the retry stops it for real.
    let exit = driver
        .stop(&task.id, 15, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(exit.signal, Some(15), "{exit:?}");
    assert!(!alive(pid));
    driver.remove(&task.id).await.unwrap();
}

#[test]
fn host_ports_are_not_called_busy_when_the_node_is_out_of_descriptors() {
    in_turn(ports_without_descriptors);
}

async fn ports_without_descriptors() {
    use flotilla_agent::ports::{PortAllocator, PortError};
    use flotilla_types::{PortProtocol, PortSpec};
    let allocator = PortAllocator::new(24100..24200).unwrap();
    let wanted = [PortSpec {
        target: 80,
        published: None,
        protocol: PortProtocol::Tcp,
        mode: Default::default(),
    }];
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 256.min(soft), hard).unwrap();
    let held = exhaust_descriptors();
    let allocated = allocator.allocate(&wanted);
    drop(held);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    assert!(
        matches!(allocated, Err(PortError::NodeExhausted { .. })),
        "{allocated:?}"
    );
    assert!(allocator.held().is_empty());
    assert_eq!(allocator.allocate(&wanted).unwrap().len(), 1);
}
