//! End-to-end tests of the manager's input limits (issue #14): a real `flotilla up`, requests
//! through the real CLI and raw HTTP, and the refusals naming their limit or field.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Sends one request with a JSON body to `c`'s TCP API, with its token like any client.
fn http_send(c: &Cluster, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", c.api_port)).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         {}\r\nContent-Length: {}\r\n\r\n",
        c.bearer(),
        body.len()
    )
    .expect("send head");
    // The server may answer (413) and close before reading all of a large body.
    let _ = s.write_all(body);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The resident memory of the `flotilla up` serving `c`, in KiB.
fn up_rss_kib(c: &Cluster) -> u64 {
    let data_dir = c.data_dir().display().to_string();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let dir = entry.expect("proc entry").path();
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "up") && args.contains(&data_dir) {
            let status = std::fs::read_to_string(dir.join("status")).expect("status");
            return status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .expect("VmRSS");
        }
    }
    panic!("no flotilla up process for {data_dir}");
}

fn service_json(name: &str, extra: &str) -> String {
    format!(
        r#"{{"name":"{name}","driver":"process","command":["sleep","600"],
        "mode":{{"mode":"replicated","replicas":1}},"stop_grace_period":"1s"{extra}}}"#
    )
}

fn deploy_json(service: &str) -> Vec<u8> {
    format!(r#"{{"services":[{service}]}}"#).into_bytes()
}

/// `scale web=1000000`, or a Compose file asking for a million replicas, is refused with the
/// limit named, creates no tasks and leaves the manager's memory where it was; the limits
/// follow their flags.
#[test]
fn task_limits_refuse_huge_scales_and_deploys() {
    let c = Cluster::start_with(&["--demo", "--max-tasks-per-service", "4", "--max-tasks", "6"]);
    c.wait_ready("demo", 3);
    let rss_before = up_rss_kib(&c);
    let tasks_before = c.all_tasks("demo").len();

    let huge = c.run(&["scale", "demo=1000000"]);
    assert!(!huge.status.success(), "scale demo=1000000 was accepted");
    let err = stderr(&huge);
    assert!(err.contains("--max-tasks-per-service"), "{err}");
    assert!(err.contains("limit of 4 tasks per service"), "{err}");

    let five = c.run(&["scale", "demo=5"]);
    assert!(!five.status.success(), "5 > --max-tasks-per-service 4");
    c.ok(&["scale", "demo=4"]);
    c.wait_ready("demo", 4);

    // 4 of demo + 3 more is over the cluster's 6.
    let out = c.deploy(
        "more.yaml",
        "services:\n  more:\n    command: [sleep, '600']\n    deploy: {replicas: 3}\n",
    );
    assert!(
        !out.status.success(),
        "deploy over --max-tasks was accepted"
    );
    assert!(stderr(&out).contains("--max-tasks"), "{}", stderr(&out));

    let out = c.deploy(
        "million.yaml",
        "services:\n  many:\n    command: [sleep, '600']\n    deploy:\n      replicas: 1000000\n      \
         placement: {constraints: ['node.labels.nowhere == true']}\n",
    );
    assert!(!out.status.success(), "a million replicas were accepted");
    assert!(
        stderr(&out).contains("--max-tasks-per-service"),
        "{}",
        stderr(&out)
    );

    let ls = c.json(&["service", "ls"]);
    assert_eq!(ls.as_array().map(Vec::len), Some(1), "{ls}");
    assert!(c.all_tasks("demo").len() >= tasks_before);
    assert!(c.all_tasks("demo").len() < 20);
    // Rough: a million task records would take gigabytes.
    let rss_after = up_rss_kib(&c);
    assert!(
        rss_after < rss_before + 200 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

/// What the API refuses, each naming its field or limit in the JSON error body.
#[test]
fn api_refuses_unknown_fields_oversized_bodies_and_impossible_inputs() {
    let c = Cluster::start();

    let (status, body) = http_send(
        &c,
        "POST",
        "/v1/deploy",
        &deploy_json(&service_json("web", r#","privileged":true"#)),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("services[0].privileged"), "{body}");

    let (status, body) = http_send(
        &c,
        "POST",
        "/v1/deploy",
        &deploy_json(&service_json("web", "").replace("\"process\"", "\"sim\"")),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("services[0].driver"), "{body}");

    let cases = [
        (
            r#","entrypoint":["/bin/sh\u0000"]"#,
            "services.web.entrypoint[0]",
        ),
        (
            r#","environment":{"A":"b\u0000"}"#,
            "services.web.environment.A",
        ),
        (r#","working_dir":"tmp""#, "services.web.working_dir"),
        (r#","user":"root\u0000""#, "services.web.user"),
        (
            r#","ports":[{"target":80,"published":18080},{"target":81,"published":18080}]"#,
            "services.web.ports[1].published",
        ),
        (
            r#","container":{"tmpfs":["/run:size=1e30"]}"#,
            "services.web.tmpfs[0]",
        ),
        (
            r#","resources":{"reservations":{"cpu_millis":1000000000}}"#,
            "services.web.deploy.resources.reservations.cpus",
        ),
    ];
    for (extra, field) in cases {
        let (status, body) = http_send(
            &c,
            "POST",
            "/v1/deploy",
            &deploy_json(&service_json("web", extra)),
        );
        assert_eq!(status, 400, "{extra}: {body}");
        assert!(body.contains(field), "{extra}: wanted {field} in {body}");
    }

    let huge = vec![b' '; 9 << 20];
    let (status, body) = http_send(&c, "POST", "/v1/deploy", &huge);
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("limit of 8388608 bytes"), "{body}");

    let node = c.json(&["node", "ls"])[0]["id"]
        .as_str()
        .expect("node id")
        .to_string();
    let labels: serde_json::Map<String, Value> = (0..100_000)
        .map(|i| (format!("label{i}"), Value::from("value")))
        .collect();
    let update = serde_json::json!({ "label_add": labels }).to_string();
    let (status, body) = http_send(&c, "PATCH", &format!("/v1/nodes/{node}"), update.as_bytes());
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("limit of 256 per node"), "{body}");

    let (status, body) = http_get_from(
        "127.0.0.1",
        c.api_port,
        "/v1/events?since=abc",
        &[&c.bearer()],
    )
    .expect("API reachable");
    assert_eq!(status, 400, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(err["fields"][0]["field"], "since", "{body}");

    // Nothing of the above was stored.
    let ls = c.json(&["service", "ls"]);
    assert_eq!(ls.as_array().map(Vec::len), Some(0), "{ls}");
}

/// The CLI refuses a Compose file that is a FIFO or a device instead of blocking or reading
/// forever.
#[test]
fn deploy_refuses_files_that_are_not_regular() {
    let c = Cluster::start();
    let out = c.run(&["deploy", "-f", "/dev/zero"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a regular file"),
        "{}",
        stderr(&out)
    );
    let fifo = c.dir.path().join("compose.fifo");
    assert!(sh(&format!("mkfifo {}", fifo.display())).status.success());
    let out = c.run(&["deploy", "-f", fifo.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("a FIFO"), "{}", stderr(&out));
}
