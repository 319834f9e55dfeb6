//! Typed HTTP client for the Flotilla manager API, used by the CLI, agents and cluster nodes:
//! one method per route, so no caller builds a path or decodes a body itself.
//!
//! Bodies are defined once in [`flotilla_types::api`] and, for the cluster membership routes
//! (`cluster.rs` here), [`flotilla_types::cluster`]; this crate only turns them into calls.
//! Streaming endpoints (`events`, `watch`, `logs`) return `Stream`s that end when the server
//! closes the connection.
#![forbid(unsafe_code)]

mod cluster;
mod mirror;
pub use mirror::Mirror;

use bytes::Bytes;
use flotilla_types::api::TaskStats;
use flotilla_types::api::{
    ApiErrorBody, BulkStatusReport, BulkStatusResponse, ClusterStatus, DeployRequest,
    DeployResponse, Heartbeat, NodeRegistration, NodeUpdate, ScaleRequest, ServiceDetail,
    ServiceSummary, TaskStatusReport, WatchMessage, WriteResponse,
};
use flotilla_types::{Event, Node, Revision, Task};
use futures::stream::{BoxStream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Environment variable holding the API address when `--addr` is not given.
pub const ADDR_ENV: &str = "FLOTILLA_ADDR";
/// Environment variable holding the API bearer token.
pub const TOKEN_ENV: &str = "FLOTILLA_TOKEN";
/// Environment variable naming the manager's Unix socket (like `--addr unix:///PATH`).
pub const SOCKET_ENV: &str = "FLOTILLA_SOCKET";
/// Where a local manager listens by default.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:7450";
/// Where a manager run as root serves its Unix socket by default.
pub const DEFAULT_SOCKET: &str = "/run/flotilla/flotilla.sock";
/// The address form of a Unix socket, as in `DOCKER_HOST`: `unix:///run/flotilla/flotilla.sock`.
pub const UNIX_SCHEME: &str = "unix://";
/// The URL base of requests over a Unix socket (the host is not used to connect).
const UNIX_BASE: &str = "http://localhost";

/// Longest wait for a manager's answer to a read (or for a stream to start): reads are served
/// from the manager's memory in milliseconds, so a manager this slow, even on a loaded machine
/// with a large answer, has stopped answering; the read moves to the next manager.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a manager's answer to a write. Above the store's own 10 s bound on a write
/// (plus forwarding to a new leader) so a live manager always answers first, with its reason.
const WRITE_TIMEOUT: Duration = Duration::from_secs(16);
/// Longest silence on a watch stream: three of the manager's 5 s heartbeats missed.
const WATCH_SILENCE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid API address {addr:?}: {reason}")]
    InvalidAddr { addr: String, reason: String },
    #[error("cannot reach the Flotilla API at {addr}: {reason} (is `flotilla up` running? set --addr or FLOTILLA_ADDR)")]
    Connect { addr: String, reason: String },
    /// The manager accepted the request but did not answer in time (it hangs, or is cut off
    /// mid-request). A write may or may not have been applied.
    #[error("no answer from the Flotilla API at {addr} within {after:?}{}", if *.write { "; the write may or may not have been applied" } else { "" })]
    Timeout {
        addr: String,
        after: Duration,
        write: bool,
    },
    #[error("{}", format_api_error(.status, .body))]
    Api { status: u16, body: ApiErrorBody },
    #[error("unexpected response from {url}: {reason}")]
    Decode { url: String, reason: String },
}

fn format_api_error(status: &u16, body: &ApiErrorBody) -> String {
    let mut out = format!("{} ({status}): {}", body.code, body.message);
    for f in &body.fields {
        out.push_str(&format!("\n  {}: {}", f.field, f.reason));
    }
    out
}

impl ClientError {
    /// The API's error code (`not_found`, `conflict`, …) if the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { body, .. } => Some(&body.code),
            _ => None,
        }
    }
}

/// A handle on a manager's API. Clones share one list of managers ([`Client::set_managers`]):
/// when a request cannot reach the current one, later requests go to the next, so an agent
/// follows the cluster when the manager it joined through dies.
#[derive(Clone, Debug)]
pub struct Client {
    endpoints: Arc<Mutex<Endpoints>>,
    http: reqwest::Client,
    token: Option<String>,
    /// How long a read and a write wait for an answer ([`READ_TIMEOUT`], [`WRITE_TIMEOUT`]).
    timeouts: (Duration, Duration),
    /// The Unix socket every request goes through, if this is a socket client.
    socket: Option<std::path::PathBuf>,
}

#[derive(Debug)]
struct Endpoints {
    /// Normalised base URLs; never empty.
    all: Vec<String>,
    current: usize,
}

/// The settings every client shares, whatever its transport.
fn http_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .pool_idle_timeout(flotilla_types::api::CLIENT_POOL_IDLE)
}

impl Client {
    /// `addr` is `http://host:port`, `host:port`, or `unix:///path` (a manager's Unix socket,
    /// where no token is needed: the socket's file mode is the credential).
    pub fn new(addr: &str, token: Option<String>) -> Result<Self, ClientError> {
        if let Some(path) = addr.trim().strip_prefix(UNIX_SCHEME) {
            return Client::unix(std::path::Path::new(path));
        }
        let base = normalise_addr(addr)?;
        let http = http_builder()
            .build()
            .map_err(|e| ClientError::InvalidAddr {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Client::from_parts(base, http, token))
    }

    /// A client over HTTPS with `tls` (a cluster node's mutual-TLS config, see
    /// `flotilla_pki::TlsIdentity::client_config`). `addr` is `HOST:PORT` or `https://HOST:PORT`.
    pub fn with_tls(addr: &str, tls: rustls::ClientConfig) -> Result<Self, ClientError> {
        let trimmed = addr.trim();
        let with_scheme = if trimmed.contains("://") {
            trimmed.to_string()
        } else {
            format!("https://{trimmed}")
        };
        let base = normalise_addr(&with_scheme)?;
        if !base.starts_with("https://") {
            return Err(ClientError::InvalidAddr {
                addr: addr.to_string(),
                reason: "a TLS client needs an https:// address".into(),
            });
        }
        let http = http_builder()
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|e| ClientError::InvalidAddr {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Client::from_parts(base, http, None))
    }

    /// A client of the manager's Unix socket at `path` (see `flotilla_api::serve_unix`).
    pub fn unix(path: &std::path::Path) -> Result<Self, ClientError> {
        if !path.is_absolute() {
            return Err(ClientError::InvalidAddr {
                addr: format!("{UNIX_SCHEME}{}", path.display()),
                reason: "a Unix socket address needs an absolute path, e.g. \
                         unix:///run/flotilla/flotilla.sock"
                    .into(),
            });
        }
        let http =
            http_builder()
                .unix_socket(path)
                .build()
                .map_err(|e| ClientError::InvalidAddr {
                    addr: format!("{UNIX_SCHEME}{}", path.display()),
                    reason: e.to_string(),
                })?;
        let mut client = Client::from_parts(UNIX_BASE.to_string(), http, None);
        client.socket = Some(path.to_path_buf());
        Ok(client)
    }

    /// How `base` is named in errors: the socket for a socket client.
    fn shown(&self, base: &str) -> String {
        match &self.socket {
            Some(path) => format!("{UNIX_SCHEME}{}", path.display()),
            None => base.to_string(),
        }
    }

    fn from_parts(base: String, http: reqwest::Client, token: Option<String>) -> Client {
        Client {
            endpoints: Arc::new(Mutex::new(Endpoints {
                all: vec![base],
                current: 0,
            })),
            http,
            token,
            timeouts: (READ_TIMEOUT, WRITE_TIMEOUT),
            socket: None,
        }
    }

    /// Overrides how long a read and a write wait for a manager's answer before it is
    /// considered hung (defaults: 10 s and 16 s).
    pub fn with_request_timeouts(mut self, read: Duration, write: Duration) -> Self {
        self.timeouts = (read, write);
        self
    }

    fn endpoints(&self) -> MutexGuard<'_, Endpoints> {
        // Only plain assignments happen under this lock; a poisoned one still holds valid data.
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the managers this client (and its clones) may use. The current one stays in
    /// use if it is listed; otherwise the first listed is used. Addresses take this client's
    /// scheme when they have none. An empty list changes nothing.
    pub fn set_managers(&self, addrs: &[String]) -> Result<(), ClientError> {
        let scheme = if self.base().starts_with("https://") {
            "https"
        } else {
            "http"
        };
        let mut all = Vec::new();
        for a in addrs {
            let a = a.trim();
            let with_scheme = if a.contains("://") {
                a.to_string()
            } else {
                format!("{scheme}://{a}")
            };
            let base = normalise_addr(&with_scheme)?;
            if !all.contains(&base) {
                all.push(base);
            }
        }
        if all.is_empty() {
            return Ok(());
        }
        let mut ep = self.endpoints();
        let current = ep.all[ep.current].clone();
        ep.current = all.iter().position(|b| *b == current).unwrap_or(0);
        ep.all = all;
        Ok(())
    }

    /// Every manager this client may use, the current one first.
    pub fn managers(&self) -> Vec<String> {
        let ep = self.endpoints();
        let n = ep.all.len();
        (0..n)
            .map(|i| ep.all[(ep.current + i) % n].clone())
            .collect()
    }

    /// `failed` could not be reached or stopped answering: move to the next manager, unless
    /// another request moved on already.
    fn fail_over(&self, failed: &str) {
        let mut ep = self.endpoints();
        if ep.all.len() > 1 && ep.all[ep.current] == failed {
            ep.current = (ep.current + 1) % ep.all.len();
        }
    }

    /// The manager requests go to now.
    pub fn base(&self) -> String {
        let ep = self.endpoints();
        ep.all[ep.current].clone()
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base()));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req
    }

    /// Sends `req` and waits for the answer's head (a stream's body may then take as long as
    /// it likes). A manager that cannot be reached, or does not answer in time, is left for the
    /// next one (for this client's later requests too). The request itself moves to the next
    /// manager when that is safe: it never got through (connection failed), or it is a read.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        // The request was built against the current manager just before this call.
        let mut used = self.base();
        let mut request = req.build().map_err(|e| ClientError::InvalidAddr {
            addr: used.clone(),
            reason: error_chain(&e),
        })?;
        let read = request.method() == reqwest::Method::GET;
        let limit = if read {
            self.timeouts.0
        } else {
            self.timeouts.1
        };
        let mut attempts_left = self.endpoints().all.len();
        let resp = loop {
            attempts_left -= 1;
            let again = if attempts_left > 0 {
                request.try_clone()
            } else {
                None
            };
            let failed = match tokio::time::timeout(limit, self.http.execute(request)).await {
                Ok(Ok(resp)) => break resp,
                Ok(Err(e)) => {
                    let retry = e.is_connect();
                    let err = ClientError::Connect {
                        addr: self.shown(&used),
                        reason: error_chain(&e),
                    };
                    (err, retry)
                }
                Err(_) => {
                    tracing::warn!(manager = %used, after = ?limit, "no answer; trying another manager");
                    let err = ClientError::Timeout {
                        addr: used.clone(),
                        after: limit,
                        write: !read,
                    };
                    (err, read)
                }
            };
            self.fail_over(&used);
            let (err, retry) = failed;
            let next = self.base();
            match again {
                Some(mut again) if retry && next != used => {
                    let rest = again.url().as_str().strip_prefix(used.as_str());
                    let Some(url) =
                        rest.and_then(|r| reqwest::Url::parse(&format!("{next}{r}")).ok())
                    else {
                        return Err(err);
                    };
                    tracing::debug!(failed = %used, next = %next, error = %err, "retrying on another manager");
                    *again.url_mut() = url;
                    request = again;
                    used = next;
                }
                _ => return Err(err),
            }
        };
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let url = resp.url().to_string();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str::<ApiErrorBody>(&text).unwrap_or(ApiErrorBody {
            code: "http".into(),
            message: format!("{url}: {}", text.trim()),
            fields: Vec::new(),
        });
        Err(ClientError::Api { status, body })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = self.send(req).await?;
        let url = resp.url().to_string();
        let addr = url.clone();
        let limit = self.timeouts.0;
        let bytes = tokio::time::timeout(limit, resp.bytes())
            .await
            .map_err(|_| ClientError::Timeout {
                addr: addr.clone(),
                after: limit,
                write: false,
            })?
            .map_err(|e| ClientError::Connect {
                addr,
                reason: error_chain(&e),
            })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            url,
            reason: e.to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json(self.request(reqwest::Method::GET, path)).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.json(self.request(reqwest::Method::POST, path).json(body))
            .await
    }

    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        self.get("/v1/status").await
    }

    /// A backup of the answering manager's store (`flotilla_store::StoreBackup` as JSON).
    pub async fn store_backup(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/v1/snapshot").await
    }

    pub async fn deploy(&self, req: &DeployRequest) -> Result<DeployResponse, ClientError> {
        self.post("/v1/deploy", req).await
    }

    pub async fn services(&self) -> Result<Vec<ServiceSummary>, ClientError> {
        self.get("/v1/services").await
    }

    pub async fn service(&self, name: &str) -> Result<ServiceDetail, ClientError> {
        self.get(&format!("/v1/services/{}", encode(name))).await
    }

    pub async fn remove_service(&self, name: &str) -> Result<WriteResponse, ClientError> {
        self.json(self.request(
            reqwest::Method::DELETE,
            &format!("/v1/services/{}", encode(name)),
        ))
        .await
    }

    pub async fn scale(&self, name: &str, replicas: u64) -> Result<WriteResponse, ClientError> {
        self.post(
            &format!("/v1/services/{}/scale", encode(name)),
            &ScaleRequest { replicas },
        )
        .await
    }

    pub async fn revisions(&self, name: &str) -> Result<Vec<Revision>, ClientError> {
        self.get(&format!("/v1/services/{}/revisions", encode(name)))
            .await
    }

    pub async fn tasks(
        &self,
        service: Option<&str>,
        node: Option<&str>,
    ) -> Result<Vec<Task>, ClientError> {
        let mut query = Vec::new();
        if let Some(s) = service {
            query.push(format!("service={}", encode(s)));
        }
        if let Some(n) = node {
            query.push(format!("node={}", encode(n)));
        }
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        self.get(&format!("/v1/tasks{q}")).await
    }

    pub async fn task(&self, id: &str) -> Result<Task, ClientError> {
        self.get(&format!("/v1/tasks/{}", encode(id))).await
    }

    /// Sets a task's mesh weight (0 drains it, 100 is full share).
    pub async fn set_task_weight(
        &self,
        id: &str,
        weight: u8,
    ) -> Result<WriteResponse, ClientError> {
        self.json(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/tasks/{}/weight", encode(id)),
            )
            .json(&flotilla_types::api::WeightRequest { weight }),
        )
        .await
    }

    /// Sets the mesh weights of several tasks of `service` in one write.
    pub async fn set_task_weights(
        &self,
        service: &str,
        weights: std::collections::BTreeMap<String, u8>,
    ) -> Result<WriteResponse, ClientError> {
        self.json(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/services/{}/weights", encode(service)),
            )
            .json(&flotilla_types::api::BulkWeightRequest { weights }),
        )
        .await
    }

    /// Per-task mesh traffic of a service, summed over every node.
    pub async fn service_traffic(
        &self,
        service: &str,
    ) -> Result<flotilla_types::api::ServiceTraffic, ClientError> {
        self.get(&format!("/v1/services/{}/traffic", encode(service)))
            .await
    }

    /// The service's latest rollout.
    pub async fn rollout(&self, service: &str) -> Result<flotilla_types::Rollout, ClientError> {
        self.get(&format!("/v1/services/{}/rollout", encode(service)))
            .await
    }

    /// Pauses, resumes, promotes or aborts the service's rollout in progress.
    pub async fn rollout_action(
        &self,
        service: &str,
        action: flotilla_types::RolloutAction,
    ) -> Result<flotilla_types::Rollout, ClientError> {
        self.post(
            &format!("/v1/services/{}/rollout", encode(service)),
            &serde_json::json!({ "action": action }),
        )
        .await
    }

    /// Replaces every task of the service with a fresh one of the same revision, rolling.
    pub async fn restart_service(
        &self,
        service: &str,
    ) -> Result<flotilla_types::Rollout, ClientError> {
        self.post(
            &format!("/v1/services/{}/restart", encode(service)),
            &serde_json::json!({}),
        )
        .await
    }

    /// Deploys a kept revision's spec (the previous one when `to` is `None`) as a new revision.
    pub async fn rollback(
        &self,
        service: &str,
        req: &flotilla_types::release::RollbackRequest,
    ) -> Result<DeployResponse, ClientError> {
        self.post(&format!("/v1/services/{}/rollback", encode(service)), req)
            .await
    }

    pub async fn report_status(
        &self,
        id: &str,
        report: &TaskStatusReport,
    ) -> Result<WriteResponse, ClientError> {
        self.json(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/tasks/{}/status", encode(id)),
            )
            .json(report),
        )
        .await
    }

    pub async fn report_statuses(
        &self,
        bulk: &BulkStatusReport,
    ) -> Result<BulkStatusResponse, ClientError> {
        self.json(
            self.request(reqwest::Method::PUT, "/v1/tasks/status")
                .json(bulk),
        )
        .await
    }

    pub async fn nodes(&self) -> Result<Vec<Node>, ClientError> {
        self.get("/v1/nodes").await
    }

    pub async fn node(&self, id: &str) -> Result<Node, ClientError> {
        self.get(&format!("/v1/nodes/{}", encode(id))).await
    }

    /// Changes a node's availability and labels (`flotilla node update`).
    pub async fn update_node(&self, id: &str, update: &NodeUpdate) -> Result<Node, ClientError> {
        let path = format!("/v1/nodes/{}", encode(id));
        self.json(self.request(reqwest::Method::PATCH, &path).json(update))
            .await
    }

    pub async fn register_node(&self, reg: &NodeRegistration) -> Result<Node, ClientError> {
        self.post("/v1/nodes/register", reg).await
    }

    pub async fn heartbeat(
        &self,
        node: &str,
        hb: &Heartbeat,
    ) -> Result<WriteResponse, ClientError> {
        self.post(&format!("/v1/nodes/{}/heartbeat", encode(node)), hb)
            .await
    }

    /// A task's output: the last `tail` lines, then new lines while `follow`.
    pub async fn logs(
        &self,
        task: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<Bytes, ClientError>>, ClientError> {
        let mut path = format!("/v1/tasks/{}/logs?follow={follow}", encode(task));
        if let Some(n) = tail {
            path.push_str(&format!("&tail={n}"));
        }
        let resp = self.send(self.request(reqwest::Method::GET, &path)).await?;
        let addr = self.base();
        Ok(resp
            .bytes_stream()
            .map(move |r| {
                r.map_err(|e| ClientError::Connect {
                    addr: addr.clone(),
                    reason: error_chain(&e),
                })
            })
            .boxed())
    }

    /// A running task's cpu and memory use (sampled by its node's agent).
    pub async fn task_stats(&self, task: &str) -> Result<TaskStats, ClientError> {
        self.get(&format!("/v1/tasks/{}/stats", encode(task))).await
    }

    /// Changes a running task's cpu/memory limits without restarting it.
    pub async fn update_task_resources(
        &self,
        task: &str,
        resources: &flotilla_types::Resources,
    ) -> Result<(), ClientError> {
        self.send(
            self.request(
                reqwest::Method::POST,
                &format!("/v1/tasks/{}/resources", encode(task)),
            )
            .json(resources),
        )
        .await?;
        Ok(())
    }

    /// Events after store revision `since`; with `follow`, keeps streaming new ones.
    pub async fn events(
        &self,
        since: u64,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<Event, ClientError>>, ClientError> {
        self.ndjson(&format!("/v1/events?since={since}&follow={follow}"), None)
            .await
    }

    /// A watch stream: a snapshot first, then changes. `kind` filters object kinds (`task`,
    /// `service`, `node`), `node` filters tasks to one node.
    pub async fn watch(
        &self,
        kind: Option<&str>,
        node: Option<&str>,
    ) -> Result<BoxStream<'static, Result<WatchMessage, ClientError>>, ClientError> {
        let mut query = Vec::new();
        if let Some(k) = kind {
            query.push(format!("kind={}", encode(k)));
        }
        if let Some(n) = node {
            query.push(format!("node={}", encode(n)));
        }
        // The manager sends a heartbeat after 5 s without changes: a longer silence means it
        // stopped answering, and the stream ends so the caller can watch another one.
        self.ndjson(
            &format!("/v1/watch?{}", query.join("&")),
            Some(WATCH_SILENCE),
        )
        .await
    }

    /// Streams the NDJSON answer to `GET path`. With `idle`, a silence that long ends the
    /// stream with [`ClientError::Timeout`] and moves this client to the next manager.
    async fn ndjson<T: DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
        idle: Option<Duration>,
    ) -> Result<BoxStream<'static, Result<T, ClientError>>, ClientError> {
        let resp = self.send(self.request(reqwest::Method::GET, path)).await?;
        let url = resp.url().to_string();
        let addr = self.base();
        let bytes = resp.bytes_stream();
        let client = self.clone();
        let lines = futures::stream::unfold(
            (bytes, Vec::<u8>::new(), false),
            move |(mut bytes, mut buf, done)| {
                let url = url.clone();
                let addr = addr.clone();
                let client = client.clone();
                async move {
                    if done {
                        return None;
                    }
                    loop {
                        if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=pos).collect();
                            let line = &line[..line.len() - 1];
                            if line.iter().all(u8::is_ascii_whitespace) {
                                continue;
                            }
                            let item = serde_json::from_slice::<T>(line).map_err(|e| {
                                ClientError::Decode {
                                    url: url.clone(),
                                    reason: e.to_string(),
                                }
                            });
                            return Some((item, (bytes, buf, false)));
                        }
                        let next = match idle {
                            Some(idle) => match tokio::time::timeout(idle, bytes.next()).await {
                                Ok(next) => next,
                                Err(_) => {
                                    client.fail_over(&addr);
                                    let err = ClientError::Timeout {
                                        addr: addr.clone(),
                                        after: idle,
                                        write: false,
                                    };
                                    return Some((Err(err), (bytes, buf, true)));
                                }
                            },
                            None => bytes.next().await,
                        };
                        match next {
                            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                            Some(Err(e)) => {
                                let err = ClientError::Connect {
                                    addr: addr.clone(),
                                    reason: error_chain(&e),
                                };
                                return Some((Err(err), (bytes, buf, true)));
                            }
                            None => return None,
                        }
                    }
                }
            },
        );
        Ok(lines.boxed())
    }
}

/// Accepts `host:port`, `http://host:port` or `https://…`, without a trailing slash.
fn normalise_addr(addr: &str) -> Result<String, ClientError> {
    let trimmed = addr.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(ClientError::InvalidAddr {
            addr: addr.to_string(),
            reason: "empty".into(),
        });
    }
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("http://{trimmed}")
    };
    let url = reqwest::Url::parse(&with_scheme).map_err(|e| ClientError::InvalidAddr {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ClientError::InvalidAddr {
            addr: addr.to_string(),
            reason: "expected http://HOST:PORT".into(),
        });
    }
    Ok(with_scheme)
}

/// Percent-encodes a path segment or query value (service names and ids are plain, but a
/// user-typed name may not be).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// reqwest's Display hides the cause ("error sending request"); show the whole chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            normalise_addr("127.0.0.1:7450").unwrap(),
            "http://127.0.0.1:7450"
        );
        assert_eq!(normalise_addr("http://h:1/").unwrap(), "http://h:1");
        assert!(normalise_addr("").is_err());
        assert!(normalise_addr("ftp://x").is_err());
    }

    #[test]
    fn encoding() {
        assert_eq!(encode("web.1"), "web.1");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }

    /// A manager that accepts connections and reads requests but never answers.
    async fn hung_manager() -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        (addr, task)
    }

    /// A manager answering every request with `body` (JSON); counts the requests.
    async fn answering_manager(
        body: &'static str,
    ) -> (
        String,
        Arc<std::sync::atomic::AtomicUsize>,
        tokio::task::JoinHandle<()>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if conn.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, served, task)
    }

    #[tokio::test]
    async fn a_hung_manager_is_left_for_the_next_one() {
        let (hung, hung_task) = hung_manager().await;
        let (good, served, good_task) = answering_manager("[]").await;
        let short = Duration::from_millis(300);
        let client_of = |managers: &[String]| {
            let c = Client::new(&managers[0], None)
                .unwrap()
                .with_request_timeouts(short, short);
            c.set_managers(managers).unwrap();
            c
        };
        let managers = [hung.clone(), good.clone()];

        // A read is retried on the next manager at once.
        let client = client_of(&managers);
        assert!(client.nodes().await.unwrap().is_empty());
        assert_eq!(client.base(), format!("http://{good}"));
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);

        // A write is not (it may have been applied), but the next request goes elsewhere.
        let client = client_of(&managers);
        let err = client
            .heartbeat("n1", &Heartbeat { at: 0 })
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Timeout { write: true, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("may or may not have been applied"),
            "{err}"
        );
        assert_eq!(client.base(), format!("http://{good}"));
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
        hung_task.abort();
        good_task.abort();
    }

    #[tokio::test]
    async fn a_write_that_cannot_connect_moves_to_the_next_manager() {
        // A port nothing listens on: the connection is refused, so the write never left.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let (good, served, good_task) = answering_manager("{\"store_revision\":1}").await;
        let client = Client::new(&dead, None).unwrap();
        client.set_managers(&[dead, good.clone()]).unwrap();
        client.heartbeat("n1", &Heartbeat { at: 0 }).await.unwrap();
        assert_eq!(client.base(), format!("http://{good}"));
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
        good_task.abort();
    }
}
