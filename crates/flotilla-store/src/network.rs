//! Raft RPC between managers over HTTP with JSON bodies: plain HTTP for a single loopback
//! manager (`flotilla up`), HTTPS with mutual TLS ([`HttpNetwork::with_tls`]) in a cluster.
//!
//! The wire contract, which the API crate's server side implements by handing the decoded request
//! to [`crate::Raft`] and encoding its result:
//!
//! | path              | request body                    | response body (`200 OK`)                                                      |
//! |-------------------|---------------------------------|--------------------------------------------------------------------------------|
//! | [`APPEND_PATH`]   | `AppendEntriesRequest<TypeConfig>` | `Result<AppendEntriesResponse<u64>, RaftError<u64>>` (`raft.append_entries`) |
//! | [`VOTE_PATH`]     | `VoteRequest<u64>`              | `Result<VoteResponse<u64>, RaftError<u64>>` (`raft.vote`)                     |
//! | [`SNAPSHOT_PATH`] | `InstallSnapshotRequest<TypeConfig>` | `Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>` (`raft.install_snapshot`) |
//!
//! `Result` is encoded the serde way: `{"Ok": …}` or `{"Err": …}`.

use crate::TypeConfig;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const APPEND_PATH: &str = "/raft/append";
pub const VOTE_PATH: &str = "/raft/vote";
pub const SNAPSHOT_PATH: &str = "/raft/snapshot";

/// When each peer last answered a raft RPC (any answer, even a refused vote), so a manager
/// without quorum can say how many managers it can still reach.
#[derive(Clone, Default)]
pub struct Contacts(Arc<Mutex<BTreeMap<u64, Instant>>>);

impl Contacts {
    fn record(&self, target: u64) {
        // A poisoned lock only means a panic between two plain inserts; the map is usable.
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(target, Instant::now());
    }

    /// Whether `target` answered within `within`.
    pub fn answered_within(&self, target: u64, within: Duration) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&target)
            .is_some_and(|at| at.elapsed() <= within)
    }
}

/// Creates a [`HttpConnection`] per peer; all share one connection pool.
#[derive(Clone)]
pub struct HttpNetwork {
    client: reqwest::Client,
    scheme: &'static str,
    contacts: Contacts,
}

impl HttpNetwork {
    pub fn new() -> Result<Self, reqwest::Error> {
        Ok(HttpNetwork {
            client: reqwest::Client::builder()
                .pool_idle_timeout(flotilla_types::api::CLIENT_POOL_IDLE)
                .build()?,
            scheme: "http",
            contacts: Contacts::default(),
        })
    }

    /// RPC over HTTPS with `tls`, which presents this manager's certificate and verifies peers.
    pub fn with_tls(tls: rustls::ClientConfig) -> Result<Self, reqwest::Error> {
        Ok(HttpNetwork {
            client: reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .pool_idle_timeout(flotilla_types::api::CLIENT_POOL_IDLE)
                .build()?,
            scheme: "https",
            contacts: Contacts::default(),
        })
    }

    /// Which peers answered recently; shared with every connection this network makes.
    pub fn contacts(&self) -> Contacts {
        self.contacts.clone()
    }
}

impl RaftNetworkFactory<TypeConfig> for HttpNetwork {
    type Network = HttpConnection;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> HttpConnection {
        HttpConnection {
            client: self.client.clone(),
            scheme: self.scheme,
            target,
            node: node.clone(),
            contacts: self.contacts.clone(),
        }
    }
}

/// The RPC client for one peer.
pub struct HttpConnection {
    client: reqwest::Client,
    scheme: &'static str,
    target: u64,
    node: BasicNode,
    contacts: Contacts,
}

impl HttpConnection {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let url = format!("{}://{}{path}", self.scheme, self.node.addr);
        let response = self
            .client
            .post(&url)
            .timeout(option.hard_ttl())
            .json(req)
            .send()
            .await
            .map_err(|e| {
                // A refused or failed connection means the peer is down: back off. Anything
                // else (timeout, reset mid-request) is worth an immediate retry.
                if e.is_connect() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        let status = response.status();
        if status.is_success() {
            self.contacts.record(self.target);
        }
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let message = format!("POST {url} returned {status}: {body}");
            return Err(RPCError::Network(NetworkError::new(&AnyError::error(
                message,
            ))));
        }
        let result: Result<Resp, RaftError<u64, E>> = response
            .json()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for HttpConnection {
    #[tracing::instrument(level = "trace", skip_all, fields(target = self.target))]
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(APPEND_PATH, &rpc, &option).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(target = self.target))]
    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(SNAPSHOT_PATH, &rpc, &option).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(target = self.target))]
    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(VOTE_PATH, &rpc, &option).await
    }
}
