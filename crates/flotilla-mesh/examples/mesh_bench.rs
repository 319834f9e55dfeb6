//! Runs the mesh benchmark outside the CLI (until `flotilla bench mesh` is wired):
//!
//! - `mesh_bench [CONNECTIONS] [SECONDS]`: direct vs mesh, printed as JSON;
//! - `mesh_bench serve BACKEND LISTEN`: a mesh on LISTEN forwarding to BACKEND, until Ctrl-C;
//! - `mesh_bench backend LISTEN`: the benchmark's HTTP backend, until Ctrl-C.
#![allow(clippy::unwrap_used)] // a developer tool: a bad argument should just stop it

use flotilla_mesh::bench;
use std::net::SocketAddr;
use std::time::Duration;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = |i: usize| -> SocketAddr { args[i].parse().unwrap() };
    match args.first().map(String::as_str) {
        Some("serve") => bench::serve_mesh_for(addr(1), addr(2)).await.unwrap(),
        Some("backend") => {
            let listener = tokio::net::TcpListener::bind(addr(1)).await.unwrap();
            tokio::select! {
                _ = bench::serve_backend(listener, bytes::Bytes::from_static(b"ok")) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        _ => {
            let cfg = bench::BenchConfig {
                connections: args.first().map_or(32, |c| c.parse().unwrap()),
                duration: Duration::from_secs(args.get(1).map_or(5, |s| s.parse().unwrap())),
                ..bench::BenchConfig::default()
            };
            let report = bench::run(&cfg).await.unwrap();
            println!("{}", serde_json::to_string_pretty(&report).unwrap());
        }
    }
}
