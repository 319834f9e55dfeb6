//! End-to-end behaviour of the mesh with real sockets and real hyper backends.
#![allow(clippy::unwrap_used)] // tests fail loudly on broken setup

mod common;

use common::*;
use flotilla_mesh::{BreakerState, MeshError, RouteTable, ServicePort, ServiceRoutes};
use flotilla_types::mesh::{HttpRoute, MeshPort, MeshProtocol, MeshSpec};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn http_routes_by_host_and_longest_prefix_and_forwards_client_address() {
    let web = TestBackend::start("web").await;
    let api = TestBackend::start("api").await;
    let admin = TestBackend::start("admin").await;
    let port = free_port();
    let mut table = RouteTable::default();
    for (name, backend, routes) in [
        (&web, &web, vec![(None, "/")]),
        (&api, &api, vec![(None, "/api"), (None, "/v2/api")]),
        (&admin, &admin, vec![(Some("admin.example"), "/")]),
    ] {
        table.services.insert(
            name.name.clone(),
            ServiceRoutes {
                spec: MeshSpec {
                    ports: vec![http_port(port)],
                    routes: routes
                        .into_iter()
                        .map(|(host, prefix)| HttpRoute {
                            host: host.map(str::to_string),
                            path_prefix: prefix.to_string(),
                            port,
                        })
                        .collect(),
                    ..MeshSpec::default()
                },
                ports: vec![ServicePort {
                    published: port,
                    backends: vec![backend.backend(100)],
                }],
                canary: None,
            },
        );
    }
    let mesh = mesh();
    mesh.apply(table).await.unwrap();
    let addr = local(port);

    let reply = get(addr, "/api/users?x=1", &[]).await;
    assert_eq!(reply.body, "api");
    assert_eq!(reply.headers["x-seen-path"], "/api/users");
    assert_eq!(get(addr, "/apiary", &[]).await.body, "web");
    assert_eq!(
        get(addr, "/", &[("host", "Admin.Example:8080")]).await.body,
        "admin"
    );
    let reply = get(addr, "/v2/api", &[("x-forwarded-for", "203.0.113.9")]).await;
    assert_eq!(reply.body, "api");
    assert_eq!(reply.headers["x-seen-xff"], "203.0.113.9, 127.0.0.1");
    assert_eq!(
        reply.headers["x-seen-forwarded"],
        "for=127.0.0.1;proto=http;host=\"test.local\""
    );
    mesh.shutdown().await;
}

#[tokio::test]
async fn hot_update_swaps_backends_on_open_connections_and_closes_removed_ports() {
    let old = TestBackend::start("old").await;
    let new = TestBackend::start("new").await;
    let port = free_port();
    let mesh = mesh();
    mesh.apply(http_table("web", port, vec![old.backend(100)]))
        .await
        .unwrap();
    let mut client = Client::connect(local(port)).await;
    assert_eq!(client.get("/", &[]).await.body, "old");

    mesh.apply(http_table("web", port, vec![new.backend(100)]))
        .await
        .unwrap();
    // Same client connection, new backend.
    for _ in 0..5 {
        assert_eq!(client.get("/", &[]).await.body, "new");
    }

    // Remove the port: new connections are refused, the open one still works.
    mesh.apply(RouteTable::default()).await.unwrap();
    assert!(TcpStream::connect(local(port)).await.is_err());
    let reply = client.get("/", &[]).await;
    assert_eq!(reply.status, 404, "the port no longer routes anywhere");
    mesh.shutdown().await;
}

#[tokio::test]
async fn weights_are_respected_and_unhealthy_backends_get_nothing() {
    let heavy = TestBackend::start("heavy").await;
    let light = TestBackend::start("light").await;
    let drained = TestBackend::start("drained").await;
    let sick = TestBackend::start("sick").await;
    let port = free_port();
    let mut sick_backend = sick.backend(100);
    sick_backend.healthy = false;
    let mesh = mesh();
    mesh.apply(http_table(
        "web",
        port,
        vec![
            heavy.backend(100),
            light.backend(20),
            drained.backend(0),
            sick_backend,
        ],
    ))
    .await
    .unwrap();
    let mut client = Client::connect(local(port)).await;
    for _ in 0..600 {
        assert_eq!(client.get("/", &[]).await.status, 200);
    }
    assert_eq!(drained.hits(), 0);
    assert_eq!(sick.hits(), 0);
    assert!(light.hits() > 0, "light got {}", light.hits());
    assert!(
        heavy.hits() > 2 * light.hits(),
        "heavy {} light {}",
        heavy.hits(),
        light.hits()
    );
    let stats = mesh.stats();
    let web = &stats.services["web"];
    assert_eq!(web.requests, 600);
    assert!(
        web.latency.count == 600 && web.latency.p99_ms > 0.0,
        "{web:?}"
    );
    let heavy_stats = web.tasks.iter().find(|t| t.task_id == "heavy").unwrap();
    assert_eq!(heavy_stats.requests, heavy.hits());
    assert_eq!(heavy_stats.weight, 100);
    let text = mesh.prometheus();
    assert!(
        text.contains("flotilla_mesh_requests_total{service=\"web\",task=\"\"} 600"),
        "{text}"
    );
    assert!(text.contains("flotilla_mesh_backend_weight{service=\"web\",task=\"drained\""));
    mesh.shutdown().await;
}

#[tokio::test]
async fn draining_lets_in_flight_requests_finish_and_sends_nothing_new() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let port = free_port();
    let mesh = Arc::new(mesh());
    // Only a takes traffic, so the slow request lands there.
    mesh.apply(http_table("web", port, vec![a.backend(100), b.backend(0)]))
        .await
        .unwrap();
    let slow = tokio::spawn(async move { get(local(port), "/slow", &[]).await });
    let m = mesh.clone();
    eventually("the slow request to be in flight", || m.in_flight("a") == 1).await;

    // Drain a: weight 0, and then remove it from the table altogether.
    mesh.apply(http_table("web", port, vec![a.backend(0), b.backend(100)]))
        .await
        .unwrap();
    for _ in 0..20 {
        assert_eq!(get(local(port), "/", &[]).await.body, "b");
    }
    mesh.apply(http_table("web", port, vec![b.backend(100)]))
        .await
        .unwrap();
    assert_eq!(
        mesh.in_flight("a"),
        1,
        "still counted after leaving the table"
    );
    a.release.notify_one();
    let reply = slow.await.unwrap();
    assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "a"));
    let m = mesh.clone();
    eventually("a to have nothing in flight", || m.in_flight("a") == 0).await;
    assert_eq!(a.hits(), 1);
    mesh.shutdown().await;
}

#[tokio::test]
async fn connect_failures_are_retried_and_open_the_breaker() {
    let good = TestBackend::start("good").await;
    // A port with nothing listening: every connect is refused.
    let dead_addr = local(free_port());
    let port = free_port();
    let mesh = mesh();
    let mut table = http_table("web", port, vec![good.backend(100)]);
    if let Some(s) = table.services.get_mut("web") {
        s.ports[0].backends.push(flotilla_mesh::Backend {
            task_id: "dead".into(),
            addr: dead_addr,
            weight: 100,
            healthy: true,
            current: true,
        });
    }
    mesh.apply(table).await.unwrap();
    let mut client = Client::connect(local(port)).await;
    for _ in 0..100 {
        let reply = client.get("/", &[]).await;
        assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "good"));
    }
    let stats = mesh.stats();
    let dead = stats.services["web"]
        .tasks
        .iter()
        .find(|t| t.task_id == "dead")
        .unwrap()
        .clone();
    assert!(dead.errors.connect >= 5, "{dead:?}");
    assert_eq!(dead.breaker, BreakerState::Open, "{dead:?}");
    mesh.shutdown().await;
}

#[tokio::test]
async fn server_errors_open_the_breaker_then_the_fallback_answers_fast() {
    let flaky = TestBackend::start("flaky").await;
    let port = free_port();
    let mut table = http_table("web", port, vec![flaky.backend(100)]);
    if let Some(s) = table.services.get_mut("web") {
        s.spec.fallback.body = "come back later".into();
        s.spec.breaker.open_for = Duration::from_secs(3600);
    }
    let mesh = mesh();
    mesh.apply(table).await.unwrap();
    let mut client = Client::connect(local(port)).await;
    for _ in 0..5 {
        assert_eq!(client.get("/fail", &[]).await.status, 500);
    }
    let reply = client.get("/", &[]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.body.as_str()),
        (503, "come back later")
    );
    assert_eq!(flaky.hits(), 5, "the open breaker kept the request away");
    let web = &mesh.stats().services["web"];
    assert_eq!((web.errors.status_5xx, web.errors.breaker_open), (5, 1));

    // No healthy backend at all: the same fallback.
    let mut table = http_table("web", port, vec![flaky.backend(100)]);
    if let Some(s) = table.services.get_mut("web") {
        s.ports[0].backends[0].healthy = false;
    }
    mesh.apply(table).await.unwrap();
    assert_eq!(client.get("/", &[]).await.status, 503);
    mesh.shutdown().await;
}

#[tokio::test]
async fn killing_a_backend_under_load_fails_no_get() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let port = free_port();
    let mesh = mesh();
    mesh.apply(http_table(
        "web",
        port,
        vec![a.backend(100), b.backend(100)],
    ))
    .await
    .unwrap();
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (failures, done, stop) = (failures.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                let mut client = Client::connect(local(port)).await;
                while !stop.is_cancelled() {
                    match client.try_get("/", &[]).await {
                        Ok(reply) if reply.status == 200 => {}
                        _ => {
                            failures.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    eventually("load to flow through both backends", || {
        a.hits() > 50 && b.hits() > 50
    })
    .await;
    a.kill();
    let after_kill = done.load(Ordering::SeqCst);
    eventually("load to keep flowing after the kill", || {
        done.load(Ordering::SeqCst) > after_kill + 500
    })
    .await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    mesh.shutdown().await;
}

#[tokio::test]
async fn sticky_cookie_pins_a_client_to_one_task() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let port = free_port();
    let mut table = http_table("web", port, vec![a.backend(100), b.backend(100)]);
    if let Some(s) = table.services.get_mut("web") {
        s.spec.sticky_cookie = Some("lb".into());
    }
    let mesh = mesh();
    mesh.apply(table).await.unwrap();
    let first = get(local(port), "/", &[]).await;
    let cookie = first.headers["set-cookie"].to_str().unwrap().to_string();
    let pair = cookie.split(';').next().unwrap().to_string();
    assert_eq!(pair, format!("lb={}", first.body));
    for _ in 0..30 {
        let reply = get(local(port), "/", &[("cookie", pair.as_str())]).await;
        assert_eq!(reply.body, first.body);
        assert!(!reply.headers.contains_key("set-cookie"));
    }
    mesh.shutdown().await;
}

/// A TCP backend that reports the first bytes it gets and then echoes.
async fn echo_backend() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut first = true;
                loop {
                    let n = match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if first {
                        let _ = tx.send(buf[..n].to_vec());
                        first = false;
                    }
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn tcp_service(port: u16, proxy_protocol: bool, backend: SocketAddr) -> ServiceRoutes {
    ServiceRoutes {
        spec: MeshSpec {
            ports: vec![MeshPort {
                published: port,
                protocol: MeshProtocol::Tcp,
                proxy_protocol,
            }],
            ..MeshSpec::default()
        },
        ports: vec![ServicePort {
            published: port,
            backends: vec![flotilla_mesh::Backend {
                task_id: format!("task-{port}"),
                addr: backend,
                weight: 100,
                healthy: true,
                current: true,
            }],
        }],
        canary: None,
    }
}

#[tokio::test]
async fn tcp_proxy_copies_bytes_and_sends_proxy_v2_and_survives_port_removal() {
    let (plain_backend, mut plain_seen) = echo_backend().await;
    let (pp_backend, mut pp_seen) = echo_backend().await;
    let (plain_port, pp_port) = (free_port(), free_port());
    let mut table = RouteTable::default();
    table.services.insert(
        "plain".into(),
        tcp_service(plain_port, false, plain_backend),
    );
    table
        .services
        .insert("pp".into(), tcp_service(pp_port, true, pp_backend));
    let mesh = mesh();
    mesh.apply(table.clone()).await.unwrap();

    let mut plain = TcpStream::connect(local(plain_port)).await.unwrap();
    plain.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    plain.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    assert_eq!(plain_seen.recv().await.unwrap(), b"hello");

    let mut pp = TcpStream::connect(local(pp_port)).await.unwrap();
    let client_addr = pp.local_addr().unwrap();
    pp.write_all(b"ping").await.unwrap();
    let mut first = Vec::new();
    while first.len() < 28 + 4 {
        first.extend(pp_seen.recv().await.unwrap());
    }
    assert_eq!(&first[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!((first[12], first[13]), (0x21, 0x11));
    assert_eq!(&first[16..20], &[127, 0, 0, 1]);
    assert_eq!(
        u16::from_be_bytes([first[24], first[25]]),
        client_addr.port()
    );
    assert_eq!(u16::from_be_bytes([first[26], first[27]]), pp_port);
    assert_eq!(&first[28..], b"ping");

    // Remove the plain service: its open connection keeps working, new ones are refused.
    table.services.remove("plain");
    mesh.apply(table).await.unwrap();
    assert!(TcpStream::connect(local(plain_port)).await.is_err());
    plain.write_all(b"again").await.unwrap();
    plain.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"again");
    let stats = mesh.stats();
    assert_eq!(stats.services["plain"].in_flight, 1);
    assert_eq!(stats.services["pp"].connections, 1);
    drop(plain);
    drop(pp);
    mesh.shutdown().await;
}

/// Sends raw bytes and returns what the mesh answered before closing.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn hostile_clients_do_not_hurt_others() {
    let web = TestBackend::start("web").await;
    let port = free_port();
    let mesh = mesh();
    mesh.apply(http_table("web", port, vec![web.backend(100)]))
        .await
        .unwrap();
    let addr = local(port);

    // Slowloris: half a request head, then silence. Kept open while others are served.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    // A client that promises a body and disconnects halfway.
    let mut quitter = TcpStream::connect(addr).await.unwrap();
    quitter
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\npartial")
        .await
        .unwrap();
    drop(quitter);
    // A client that leaves while its request is being answered.
    let mut impatient = TcpStream::connect(addr).await.unwrap();
    impatient
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    eventually("the impatient request to reach the backend", || {
        mesh.in_flight("web") == 1
    })
    .await;
    drop(impatient);
    eventually("the abandoned request to stop counting", || {
        mesh.in_flight("web") == 0
    })
    .await;

    assert_eq!(get(addr, "/", &[]).await.body, "web");

    let garbage = raw_exchange(addr, b"\x16\x03\x01\x00\xa5garbage\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage:?}");

    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let answer = raw_exchange(addr, huge.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

    // The slowloris connection is closed by the header timeout.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "slow client was never cut off");

    assert_eq!(get(addr, "/", &[]).await.body, "web");
    mesh.shutdown().await;
}

#[tokio::test]
async fn bind_errors_name_the_port_and_leave_other_ports_working() {
    let web = TestBackend::start("web").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let good_port = free_port();
    let mut table = http_table("web", good_port, vec![web.backend(100)]);
    let mut other = http_table("other", taken_port, vec![web.backend(100)]);
    table.services.append(&mut other.services);
    let mesh = mesh();
    let err = mesh.apply(table).await.unwrap_err();
    assert!(
        matches!(err, MeshError::Bind { port, .. } if port == taken_port),
        "{err}"
    );
    assert!(err.to_string().contains(&taken_port.to_string()));
    assert_eq!(get(local(good_port), "/", &[]).await.body, "web");
    mesh.shutdown().await;
}

#[tokio::test]
async fn bench_measures_direct_and_mesh() {
    let report = flotilla_mesh::bench::run(&flotilla_mesh::bench::BenchConfig {
        connections: 4,
        duration: Duration::from_millis(500),
        response_bytes: 16,
        rate: None,
    })
    .await
    .unwrap();
    assert!(
        report.direct.requests > 0 && report.mesh.requests > 0,
        "{report:?}"
    );
    assert_eq!(
        (report.direct.errors, report.mesh.errors),
        (0, 0),
        "{report:?}"
    );
    assert!(report.throughput_ratio > 0.0);
}

/// At a fixed rate the load sends about rate × duration requests, whatever the server's speed.
#[tokio::test]
async fn bench_at_a_fixed_rate_sends_on_schedule() {
    let report = flotilla_mesh::bench::run(&flotilla_mesh::bench::BenchConfig {
        connections: 4,
        duration: Duration::from_secs(1),
        response_bytes: 16,
        rate: Some(200),
    })
    .await
    .unwrap();
    for r in [&report.direct, &report.mesh] {
        // 200 are due; a loaded machine may finish a few late ones past the deadline or miss
        // the last few.
        assert!((150..=210).contains(&r.requests), "{report:?}");
        assert_eq!(r.errors, 0, "{report:?}");
    }
}

/// A large request body (above the replay limit, so streamed) goes up and a large chunked
/// response streams back through the backend connection the client connection drives, and
/// that connection carries the client's next requests, an empty-bodied HEAD included.
#[tokio::test]
async fn large_bodies_stream_both_ways_and_the_backend_connection_is_reused() {
    use http_body_util::{BodyExt, Full};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // Echoes the request body, streamed (chunked: no length is known up front).
                let service = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                    let body: hyper::body::Incoming = req.into_body();
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let port = free_port();
    let mesh = mesh();
    mesh.apply(http_table(
        "echo",
        port,
        vec![flotilla_mesh::Backend {
            task_id: "echo".into(),
            addr: backend_addr,
            weight: 100,
            healthy: true,
            current: true,
        }],
    ))
    .await
    .unwrap();

    let stream = TcpStream::connect(local(port)).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    for round in 0..3 {
        let req = hyper::Request::post("/")
            .header("host", "test.local")
            .body(Full::new(bytes::Bytes::from(payload.clone())))
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "round {round}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(body == payload, "round {round}: {} bytes back", body.len());
        let head = hyper::Request::head("/")
            .header("host", "test.local")
            .body(Full::new(bytes::Bytes::new()))
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(head).await.unwrap();
        assert_eq!(resp.status(), 200, "round {round}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one backend connection for all six requests"
    );
    mesh.shutdown().await;
}

/// Sends `requests` GETs to `port` over `clients` concurrent keep-alive connections.
async fn load(port: u16, clients: u64, requests: u64) {
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = Client::connect(local(port)).await;
                for _ in 0..requests / clients {
                    assert_eq!(client.get("/", &[]).await.status, 200);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
}

/// #21 item 6: under the default balancer (P2C over peak-EWMA) a canary step's weight is the
/// new version's share of requests, also when the old tasks are warm and the new ones fresh.
#[tokio::test]
async fn a_canary_weight_is_its_share_of_requests_under_p2c() {
    for weight in [10u8, 25, 50, 90] {
        let old = [
            TestBackend::start("old-1").await,
            TestBackend::start("old-2").await,
        ];
        let new = [
            TestBackend::start("new-1").await,
            TestBackend::start("new-2").await,
        ];
        let port = free_port();
        let mesh = mesh();
        let all = |old_weight: u8, new_weight: u8| {
            let mut backends: Vec<_> = old
                .iter()
                .map(|b| flotilla_mesh::Backend {
                    current: false,
                    ..b.backend(old_weight)
                })
                .collect();
            backends.extend(new.iter().map(|b| b.backend(new_weight)));
            http_table("web", port, backends)
        };
        // The old version has served for a while; the canary's tasks have just started.
        mesh.apply(all(100, 0)).await.unwrap();
        load(port, 4, 400).await;
        mesh.apply(all(100 - weight, weight)).await.unwrap();
        let requests = 4000;
        load(port, 4, requests).await;
        let canary: u64 = new.iter().map(TestBackend::hits).sum();
        let share = canary as f64 * 100.0 / requests as f64;
        assert!(
            (share - f64::from(weight)).abs() <= 2.0,
            "weight {weight}: the canary got {share:.1}% ({canary} of {requests})"
        );
        mesh.shutdown().await;
    }
}

/// A published port over its connection cap closes new clients at once (no backend connection
/// is made for them) and admits again when a place frees; a TCP connection with no traffic
/// for the idle timeout is closed, one with traffic is not.
#[tokio::test]
async fn connection_cap_and_tcp_idle_timeout() {
    let (backend, mut seen) = echo_backend().await;
    let port = free_port();
    let mut table = RouteTable::default();
    table
        .services
        .insert("capped".into(), tcp_service(port, false, backend));
    let mesh = flotilla_mesh::Mesh::new(flotilla_mesh::MeshConfig {
        bind_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        max_connections: 2,
        tcp_idle_timeout: Duration::from_millis(300),
        ..flotilla_mesh::MeshConfig::default()
    });
    mesh.apply(table).await.unwrap();
    let echo = |mut s: TcpStream, text: &'static [u8]| async move {
        s.write_all(text).await.unwrap();
        let mut buf = vec![0u8; text.len()];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, text);
        s
    };
    let busy = echo(TcpStream::connect(local(port)).await.unwrap(), b"one").await;
    let idle = echo(TcpStream::connect(local(port)).await.unwrap(), b"two").await;
    assert_eq!(seen.recv().await.unwrap(), b"one");
    assert_eq!(seen.recv().await.unwrap(), b"two");

    // The third is accepted by the kernel and closed by the mesh without a byte.
    let mut third = TcpStream::connect(local(port)).await.unwrap();
    let _ = third.write_all(b"three").await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), third.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the mesh kept a connection over its cap");
    assert!(rest.is_empty());
    let clients = mesh.stats().clients;
    // (`idle` may already have timed out under load.)
    assert_eq!((clients.cap, clients.refused), (2, 1));
    assert!(clients.open <= 2, "{clients:?}");
    assert!(mesh
        .prometheus()
        .contains("flotilla_mesh_client_connections_refused_total 1\n"));

    // `busy` keeps talking through several idle periods; `idle` says nothing and is closed.
    let mut busy = busy;
    let mut idle = idle;
    let mut idle_closed = false;
    for _ in 0..20 {
        busy = echo(busy, b"tick").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(1), idle.read(&mut probe)).await
        {
            idle_closed = true;
            break;
        }
    }
    assert!(
        idle_closed,
        "an idle connection outlived the idle timeout many times over"
    );
    // Its place is free again (once the mesh has finished with the closed connection).
    let mut admitted = false;
    for _ in 0..50 {
        let mut s = TcpStream::connect(local(port)).await.unwrap();
        s.write_all(b"four").await.unwrap();
        let mut buf = [0u8; 4];
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await
        {
            admitted = buf == *b"four";
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted, "the freed place was never given again");
    drop(busy);
    mesh.shutdown().await;
}
