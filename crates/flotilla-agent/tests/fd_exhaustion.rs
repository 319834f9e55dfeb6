//! Health checks when the agent itself runs out of file descriptors (#14): the probe cannot
//! run, which says nothing about the task, so it must not count as a failure. Its own test
//! binary, as it lowers the whole process's descriptor limit.
// Test helpers outside #[test] fns: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use flotilla_agent::health::{probe_outcome, HealthMonitor, Outcome};
use flotilla_agent::process::ProcessDriver;
use flotilla_types::{Health, HealthCheck, HealthTest, PortBinding};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const HOST: &str = env!("CARGO_BIN_EXE_flotilla-agent-testhost");

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

#[tokio::test(flavor = "current_thread")]
async fn probes_failing_for_lack_of_descriptors_do_not_make_a_task_unhealthy() {
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
