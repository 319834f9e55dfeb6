//! The demo app over real sockets, in-process (`serve`) and as a real process (`run`).
// The helpers below are test code too: a panic in them is a test failure with a clear location.
#![allow(clippy::unwrap_used)]

use flotilla_demo::{run, serve, DemoConfig, CRASH_EXIT_CODE};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

fn config() -> DemoConfig {
    DemoConfig {
        port: 0,
        version: "v7".into(),
        task_id: "task-123".into(),
        fail_health: false,
        error_rate: 0.0,
        latency: Duration::ZERO,
        exit_after: None,
        alloc_mb: 0,
    }
}

struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), flotilla_demo::DemoError>>,
}

async fn start(cfg: DemoConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, cfg, async move {
        let _ = stopped.await;
    }));
    Running { addr, stop, server }
}

/// Sends one request with `Connection: close` and returns (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    read_response(stream).await
}

async fn read_response(mut stream: TcpStream) -> (u16, String) {
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .expect("a complete HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

#[tokio::test]
async fn root_reports_version_task_and_hostname() {
    let app = start(config()).await;
    let (status, body) = get(app.addr, "/").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["version"], "v7");
    assert_eq!(json["task"], "task-123");
    assert!(
        json["hostname"].as_str().is_some_and(|h| !h.is_empty()),
        "{json}"
    );
    app.stop.send(()).unwrap();
    app.server.await.unwrap().unwrap();
}

#[tokio::test]
async fn health_and_unknown_paths() {
    let app = start(config()).await;
    assert_eq!(get(app.addr, "/health").await, (200, "ok".to_string()));
    assert_eq!(get(app.addr, "/nope").await.0, 404);

    let sick = start(DemoConfig {
        fail_health: true,
        ..config()
    })
    .await;
    assert_eq!(get(sick.addr, "/health").await.0, 503);
    assert_eq!(get(sick.addr, "/").await.0, 200, "only /health is affected");
}

#[tokio::test]
async fn error_rate_one_always_fails_root_but_not_health() {
    let app = start(DemoConfig {
        error_rate: 1.0,
        ..config()
    })
    .await;
    for _ in 0..5 {
        assert_eq!(get(app.addr, "/").await.0, 500);
    }
    assert_eq!(get(app.addr, "/health").await.0, 200);
}

#[tokio::test]
async fn bad_error_rate_is_rejected_before_serving() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = serve(
        listener,
        DemoConfig {
            error_rate: 2.0,
            ..config()
        },
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("--error-rate"), "{err}");
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_stops_accepting() {
    let app = start(DemoConfig {
        latency: Duration::from_secs(2),
        ..config()
    })
    .await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // Give the server time to read the request so it is in flight (the reply takes 2s).
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.stop.send(()).unwrap();

    let (status, body) = read_response(stream).await;
    assert_eq!(status, 200, "the in-flight request completes: {body}");
    app.server.await.unwrap().unwrap();
    assert!(
        TcpStream::connect(app.addr).await.is_err(),
        "the listener is closed after shutdown"
    );
}

/// Entry point for the process tests below: runs the real app when the test binary is re-executed
/// with `DEMO_CHILD_CONFIG` set, and does nothing in a normal test run.
#[test]
fn child_process_entry() {
    let Ok(spec) = std::env::var("DEMO_CHILD_CONFIG") else {
        return;
    };
    let exit_after = spec
        .strip_prefix("exit_after_ms=")
        .map(|ms| Duration::from_millis(ms.parse().unwrap()));
    let cfg = DemoConfig {
        version: "child".into(),
        exit_after,
        ..config()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(run(cfg)).unwrap();
}

/// The app running as a child process. Killed on drop so a failing test leaves nothing behind.
struct ChildApp {
    process: std::process::Child,
    /// Kept open: the child's later stdout writes would fail on a closed pipe.
    _stdout: std::io::Lines<BufReader<std::process::ChildStdout>>,
    port: u16,
}

impl ChildApp {
    /// Starts the app and waits for its banner, which carries the port it bound.
    fn spawn(spec: &str) -> ChildApp {
        let mut process = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("DEMO_CHILD_CONFIG", spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(process.stdout.take().unwrap()).lines();
        const BANNER: &str = "demo-app child listening on ";
        let port = loop {
            let line = stdout.next().expect("the child prints its banner").unwrap();
            // The test harness prints "test child_process_entry ... " on the same line.
            if let Some((_, port)) = line.split_once(BANNER) {
                break port.trim().parse::<u16>().unwrap();
            }
        };
        ChildApp {
            process,
            _stdout: stdout,
            port,
        }
    }

    fn wait_with_deadline(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "child did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ChildApp {
    fn drop(&mut self) {
        if self.process.try_wait().ok().flatten().is_none() {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }
}

#[test]
fn sigterm_exits_zero() {
    let mut child = ChildApp::spawn("plain");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, _) = rt.block_on(get(
        SocketAddr::from(([127, 0, 0, 1], child.port)),
        "/health",
    ));
    assert_eq!(status, 200);
    let killed = Command::new("kill")
        .args(["-TERM", &child.process.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait_with_deadline();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn exit_after_crashes_with_code_3_and_says_why() {
    let mut child = ChildApp::spawn("exit_after_ms=200");
    let status = child.wait_with_deadline();
    assert_eq!(status.code(), Some(CRASH_EXIT_CODE), "{status:?}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.process.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("simulated crash"), "{stderr}");
}
