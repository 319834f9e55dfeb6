//! Lock-free counters and latency histograms, and their serialisable snapshots.
//! Not `prometheus-client`: it has no summary type (our latency quantiles) and writes only
//! OpenMetrics, while `/metrics` serves the Prometheus 0.0.4 text read from these atomics.
//!
//! Every request touches these on the hot path, so they are plain atomics: a log-linear
//! histogram (16 sub-buckets per power of two, about 6% relative error) needs no lock to record.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Values below this are recorded exactly (one bucket per microsecond).
const LINEAR_LIMIT: u64 = 32;
const SUB_BUCKETS: u64 = 16;
/// Enough octaves for 2^45 µs (about a year).
const BUCKETS: usize = (LINEAR_LIMIT + 41 * SUB_BUCKETS) as usize;

/// A latency histogram in microseconds.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Histogram").field(&self.summary()).finish()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket_of(micros: u64) -> usize {
    if micros < LINEAR_LIMIT {
        return micros as usize;
    }
    let octave = 63 - u64::from(micros.leading_zeros()); // >= 5
    let sub = (micros >> (octave - 4)) & (SUB_BUCKETS - 1);
    let idx = LINEAR_LIMIT + (octave - 5) * SUB_BUCKETS + sub;
    (idx as usize).min(BUCKETS - 1)
}

/// The middle of a bucket's range, in microseconds.
fn bucket_value(idx: usize) -> f64 {
    let idx = idx as u64;
    if idx < LINEAR_LIMIT {
        return idx as f64;
    }
    let octave = (idx - LINEAR_LIMIT) / SUB_BUCKETS + 5;
    let sub = (idx - LINEAR_LIMIT) % SUB_BUCKETS;
    let width = 1u64 << (octave - 4);
    let low = (SUB_BUCKETS + sub) * width;
    low as f64 + width as f64 / 2.0
}

impl Histogram {
    pub fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// The current bucket counts.
    pub fn snapshot(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary::from_counts(&self.snapshot())
    }
}

/// Latency quantiles in milliseconds (0 when there are no samples).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

impl LatencySummary {
    /// Quantiles of bucket counts as produced by [`Histogram::snapshot`].
    pub fn from_counts(counts: &[u64]) -> Self {
        let count: u64 = counts.iter().sum();
        let quantile = |q: f64| -> f64 {
            if count == 0 {
                return 0.0;
            }
            let rank = ((count as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (idx, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return bucket_value(idx) / 1000.0;
                }
            }
            0.0
        };
        LatencySummary {
            count,
            p50_ms: quantile(0.50),
            p90_ms: quantile(0.90),
            p99_ms: quantile(0.99),
        }
    }
}

/// Why a request or connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The backend refused or did not accept the connection.
    Connect,
    /// The backend answered 5xx (or broke the connection mid-exchange).
    Status5xx,
    /// The backend did not answer in time.
    Timeout,
    /// No backend could take it because every breaker was open (or none is healthy).
    BreakerOpen,
}

/// Request, connection and error counters for one service or one backend.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub connections: AtomicU64,
    connect_errors: AtomicU64,
    status_5xx: AtomicU64,
    timeouts: AtomicU64,
    breaker_open: AtomicU64,
    pub latency: Histogram,
}

impl Counters {
    pub fn error(&self, class: ErrorClass) {
        let counter = match class {
            ErrorClass::Connect => &self.connect_errors,
            ErrorClass::Status5xx => &self.status_5xx,
            ErrorClass::Timeout => &self.timeouts,
            ErrorClass::BreakerOpen => &self.breaker_open,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn errors(&self) -> ErrorCounts {
        ErrorCounts {
            connect: self.connect_errors.load(Ordering::Relaxed),
            status_5xx: self.status_5xx.load(Ordering::Relaxed),
            timeout: self.timeouts.load(Ordering::Relaxed),
            breaker_open: self.breaker_open.load(Ordering::Relaxed),
        }
    }
}

/// Errors by class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    pub connect: u64,
    #[serde(rename = "5xx")]
    pub status_5xx: u64,
    pub timeout: u64,
    pub breaker_open: u64,
}

/// A backend's circuit-breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    fn gauge(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// Snapshot of everything the mesh measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MeshStats {
    pub services: BTreeMap<String, ServiceStats>,
    /// Client connections on all published ports against the mesh-wide cap.
    #[serde(default)]
    pub clients: ClientConnections,
}

/// Client connections of the mesh's listeners.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConnections {
    pub open: u64,
    pub cap: u64,
    /// Closed at once since the start because a cap was reached.
    pub refused: u64,
}

impl ClientConnections {
    /// The Prometheus families of these numbers.
    pub fn prometheus(&self) -> String {
        format!(
            "# HELP flotilla_mesh_client_connections Client connections open on published ports.\n\
             # TYPE flotilla_mesh_client_connections gauge\n\
             flotilla_mesh_client_connections {}\n\
             # HELP flotilla_mesh_client_connections_max The cap on open client connections.\n\
             # TYPE flotilla_mesh_client_connections_max gauge\n\
             flotilla_mesh_client_connections_max {}\n\
             # HELP flotilla_mesh_client_connections_refused_total Connections closed at once because a cap was reached.\n\
             # TYPE flotilla_mesh_client_connections_refused_total counter\n\
             flotilla_mesh_client_connections_refused_total {}\n",
            self.open, self.cap, self.refused
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStats {
    pub requests: u64,
    pub connections: u64,
    pub errors: ErrorCounts,
    pub latency: LatencySummary,
    pub in_flight: u64,
    /// Per task; a task published on several ports has one entry per port's backend address.
    pub tasks: Vec<TaskStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStats {
    pub task_id: String,
    pub addr: String,
    pub weight: u8,
    pub healthy: bool,
    pub breaker: BreakerState,
    pub requests: u64,
    pub connections: u64,
    pub errors: ErrorCounts,
    pub latency: LatencySummary,
    pub in_flight: u64,
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders stats in the Prometheus text exposition format (version 0.0.4).
pub fn prometheus(stats: &MeshStats) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
        // Writing into a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for line in lines {
            let _ = writeln!(out, "{name}{line}");
        }
    };
    let mut requests = Vec::new();
    let mut connections = Vec::new();
    let mut errors = Vec::new();
    let mut in_flight = Vec::new();
    let mut latency = Vec::new();
    let mut weight = Vec::new();
    let mut breaker = Vec::new();
    for (service, s) in &stats.services {
        let svc = escape_label(service);
        let mut add = |labels: String,
                       req: u64,
                       conn: u64,
                       errs: ErrorCounts,
                       lat: LatencySummary,
                       inf: u64| {
            requests.push(format!("{{{labels}}} {req}"));
            connections.push(format!("{{{labels}}} {conn}"));
            for (class, n) in [
                ("connect", errs.connect),
                ("5xx", errs.status_5xx),
                ("timeout", errs.timeout),
                ("breaker_open", errs.breaker_open),
            ] {
                errors.push(format!("{{{labels},class=\"{class}\"}} {n}"));
            }
            in_flight.push(format!("{{{labels}}} {inf}"));
            for (q, v) in [
                ("0.5", lat.p50_ms),
                ("0.9", lat.p90_ms),
                ("0.99", lat.p99_ms),
            ] {
                latency.push(format!("{{{labels},quantile=\"{q}\"}} {}", v / 1000.0));
            }
            latency.push(format!("_count{{{labels}}} {}", lat.count));
        };
        add(
            format!("service=\"{svc}\",task=\"\""),
            s.requests,
            s.connections,
            s.errors,
            s.latency,
            s.in_flight,
        );
        for t in &s.tasks {
            let labels = format!(
                "service=\"{svc}\",task=\"{}\",addr=\"{}\"",
                escape_label(&t.task_id),
                escape_label(&t.addr)
            );
            add(
                labels.clone(),
                t.requests,
                t.connections,
                t.errors,
                t.latency,
                t.in_flight,
            );
            weight.push(format!("{{{labels}}} {}", t.weight));
            breaker.push(format!("{{{labels}}} {}", t.breaker.gauge()));
        }
    }
    family(
        "flotilla_mesh_requests_total",
        "counter",
        "HTTP requests proxied (task=\"\" is the service total).",
        requests,
    );
    family(
        "flotilla_mesh_connections_total",
        "counter",
        "Connections proxied.",
        connections,
    );
    family(
        "flotilla_mesh_errors_total",
        "counter",
        "Failed requests or connections by class.",
        errors,
    );
    family(
        "flotilla_mesh_in_flight",
        "gauge",
        "Requests and connections in progress.",
        in_flight,
    );
    family(
        "flotilla_mesh_latency_seconds",
        "summary",
        "Time to response headers (HTTP) or to connect (TCP).",
        latency,
    );
    family(
        "flotilla_mesh_backend_weight",
        "gauge",
        "Traffic weight of a task, 0..=100.",
        weight,
    );
    family(
        "flotilla_mesh_breaker_state",
        "gauge",
        "Circuit breaker: 0 closed, 1 half-open, 2 open.",
        breaker,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_close() {
        let mut last = 0;
        for micros in [0, 1, 31, 32, 33, 100, 1_000, 12_345, 1_000_000, u64::MAX] {
            let b = bucket_of(micros);
            assert!(b >= last, "{micros}");
            last = b;
            if (32..1 << 40).contains(&micros) {
                let v = bucket_value(b);
                let err = (v - micros as f64).abs() / micros as f64;
                assert!(err < 0.07, "{micros} -> {v}");
            }
        }
    }

    #[test]
    fn quantiles() {
        let h = Histogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50_ms - 50.0).abs() < 4.0, "{s:?}");
        assert!((s.p99_ms - 99.0).abs() < 7.0, "{s:?}");
        assert_eq!(LatencySummary::from_counts(&[]).p99_ms, 0.0);
    }
}
