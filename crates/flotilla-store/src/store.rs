//! [`Store`]: one manager's handle on the replicated store.

use crate::network::HttpNetwork;
use crate::ops::{ChangeBatch, ClusterState, Command, CommandResult};
use crate::storage::{LogStore, Shared, StateMachine};
use crate::{Raft, StoreError};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, SnapshotPolicy};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Newest events kept on disk.
pub(crate) const EVENT_RETENTION: u64 = 10_000;
/// Longest a write waits to be committed and applied before it is reported as unavailable.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest [`Store::bootstrap_single`] waits for a leader.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Name of the redb file inside [`StoreConfig::data_dir`].
pub(crate) const DB_FILE: &str = "store.redb";

/// Where and as whom a store runs.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The store keeps everything in `data_dir/store.redb`; the directory is created if missing.
    pub data_dir: PathBuf,
    pub node_id: u64,
    /// `host:port` where this manager's HTTP API (and raft RPC) listens.
    pub advertise_addr: String,
}

impl StoreConfig {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(StoreError::Config("data_dir is empty".to_string()));
        }
        let port = self
            .advertise_addr
            .rsplit_once(':')
            .map(|(host, port)| (host.trim(), port));
        match port {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
            _ => Err(StoreError::Config(format!(
                "advertise_addr {:?} is not host:port (e.g. \"10.0.0.5:7420\")",
                self.advertise_addr
            ))),
        }
    }
}

/// A running store: the raft node plus the applied state. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    raft: Raft,
    shared: Arc<Shared>,
    node_id: u64,
    advertise_addr: String,
    /// Which peers answered raft RPCs lately ([`Store::check_quorum`] reports them).
    contacts: crate::network::Contacts,
    /// Writes waiting to share a raft entry ([`Store::write_coalesced`]).
    coalesce: crate::coalesce::Queue,
}

/// A [`Store`] that does not keep it open (held by the store's own background tasks).
pub(crate) struct WeakStore(std::sync::Weak<Inner>);

impl WeakStore {
    pub(crate) fn upgrade(&self) -> Option<Store> {
        self.0.upgrade().map(|inner| Store { inner })
    }
}

impl Store {
    pub(crate) fn contacts(&self) -> &crate::network::Contacts {
        &self.inner.contacts
    }

    /// Opens the store in `cfg.data_dir` (loading the applied state from disk) and starts raft.
    pub async fn open(cfg: StoreConfig) -> Result<Store, StoreError> {
        Self::open_with_retention(cfg, EVENT_RETENTION).await
    }

    /// Like [`Store::open`], but raft RPC goes through `network` (e.g.
    /// [`HttpNetwork::with_tls`] in a multi-manager cluster).
    pub async fn open_with_network(
        cfg: StoreConfig,
        network: HttpNetwork,
    ) -> Result<Store, StoreError> {
        Self::open_inner(cfg, EVENT_RETENTION, network).await
    }

    pub(crate) async fn open_with_retention(
        cfg: StoreConfig,
        event_retention: u64,
    ) -> Result<Store, StoreError> {
        let network = HttpNetwork::new()
            .map_err(|e| StoreError::Config(format!("building the raft HTTP client: {e}")))?;
        Self::open_inner(cfg, event_retention, network).await
    }

    #[tracing::instrument(skip_all, fields(node_id = cfg.node_id))]
    async fn open_inner(
        cfg: StoreConfig,
        event_retention: u64,
        network: HttpNetwork,
    ) -> Result<Store, StoreError> {
        cfg.validate()?;
        let path = cfg.data_dir.join(DB_FILE);
        let open_path = path.clone();
        let (shared, applied) =
            tokio::task::spawn_blocking(move || Shared::open(&open_path, event_retention))
                .await
                .map_err(|e| StoreError::Storage(format!("opening {}: {e}", path.display())))??;
        tracing::info!(path = %path.display(), revision = shared.read(|s| s.revision), "store loaded");
        crate::disk::watch(Arc::downgrade(&shared.disk));

        let config = Config {
            cluster_name: "flotilla".to_string(),
            // openraft also uses the heartbeat interval as the AppendEntries timeout, so it
            // stays at 250 ms for slow disks. A follower whose leader was acknowledged waits a
            // lease (= election_timeout_max) plus a random election timeout before standing:
            // 1.2–1.6 s of silence (about 5 missed heartbeats), so a dead leader is replaced
            // within the 2 s failover goal (docs/BENCHMARKS.md) without elections on a merely
            // slow heartbeat. Elections are checked on openraft's tick (1.5 × heartbeat), so
            // detection takes 1.2–2 s; with write forwarding moving to the new leader at once
            // the first write lands 1.4–1.9 s after the kill (release build, loaded VM). Not
            // shortened further: CI runs the cluster tests on 2 loaded cores, where a shorter
            // silence would depose live leaders.
            heartbeat_interval: 250,
            election_timeout_min: 400,
            election_timeout_max: 800,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(10_000),
            max_in_snapshot_log_to_keep: 1000,
            ..Config::default()
        }
        .validate()
        .map_err(|e| StoreError::Config(format!("raft config: {e}")))?;
        let raft = Raft::new(
            cfg.node_id,
            Arc::new(config),
            network.clone(),
            LogStore::new(shared.clone()),
            StateMachine::new(shared.clone(), applied),
        )
        .await
        .map_err(|e| StoreError::Unavailable(format!("raft failed to start: {e}")))?;
        Ok(Store {
            inner: Arc::new_cyclic(|weak| Inner {
                raft,
                shared,
                node_id: cfg.node_id,
                advertise_addr: cfg.advertise_addr,
                contacts: network.contacts(),
                coalesce: crate::coalesce::start(WeakStore(weak.clone())),
            }),
        })
    }

    /// Initialise a single-voter cluster (this node) if never initialised. Idempotent: on an
    /// already-initialised store (e.g. after restart) it is a no-op. Waits until this node is
    /// leader.
    #[tracing::instrument(skip_all, fields(node_id = self.inner.node_id))]
    pub async fn bootstrap_single(&self) -> Result<(), StoreError> {
        let raft = &self.inner.raft;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| StoreError::Unavailable(format!("raft stopped: {e}")))?;
        if !initialized {
            let members = BTreeMap::from([(
                self.inner.node_id,
                BasicNode::new(&self.inner.advertise_addr),
            )]);
            raft.initialize(members)
                .await
                .map_err(|e| StoreError::Unavailable(format!("initialising the cluster: {e}")))?;
            tracing::info!("initialised a single-manager cluster");
        } else if raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .count()
            > 1
        {
            // The first manager restarting in a multi-manager cluster: another manager may
            // lead, and this one must serve raft RPCs (which start after this returns) to
            // rejoin, so waiting for its own leadership would only block it.
            return Ok(());
        }
        raft.wait(Some(LEADER_TIMEOUT))
            .current_leader(self.inner.node_id, "this manager to become leader")
            .await
            .map_err(|e| StoreError::Unavailable(format!("waiting for leadership: {e}")))?;
        // The state machine is not fsynced on its own (the log is, see `apply_entries`): after
        // a crash it can be behind the log until this leader commits its first entry and
        // openraft re-applies the rest. Wait for that, so callers start from the whole state.
        let last_log = raft.metrics().borrow().last_log_index;
        raft.wait(Some(LEADER_TIMEOUT))
            .applied_index_at_least(last_log, "the state machine to catch up with the log")
            .await
            .map_err(|e| StoreError::Unavailable(format!("replaying the log: {e}")))?;
        Ok(())
    }

    /// Propose through raft (client_write) and return once applied. The write is durable
    /// before this returns: its log entry is fsynced on a majority of managers.
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, StoreError> {
        self.check_disk()?;
        // Without quorum the write could only wait out WRITE_TIMEOUT; say so at once.
        self.check_quorum()?;
        let written = tokio::time::timeout(WRITE_TIMEOUT, self.inner.raft.client_write(cmd)).await;
        match written {
            Err(_) => Err(StoreError::Unavailable(format!(
                "write not applied within {WRITE_TIMEOUT:?} (quorum may be lost; the write may \
                 still be applied later)"
            ))),
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                match forward.leader_id {
                    Some(leader_id) => Err(StoreError::NotLeader {
                        leader_id: Some(leader_id),
                        leader_addr: forward.leader_node.map(|n| n.addr),
                    }),
                    None => Err(StoreError::Unavailable(
                        "no leader elected (election in progress or quorum lost)".to_string(),
                    )),
                }
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => Err(
                StoreError::Unavailable(format!("membership change in progress: {e}")),
            ),
            Ok(Err(RaftError::Fatal(e))) => {
                Err(StoreError::Unavailable(format!("raft stopped: {e}")))
            }
        }
    }

    /// Like [`Store::write`], but the command may share one raft entry with other concurrent
    /// `write_coalesced` calls (see [`crate::coalesce`]): for many small independent writers,
    /// such as agents' status reports, whose commands rarely conflict. The command still applies
    /// atomically, and its result is the one it would have had alone.
    pub async fn write_coalesced(&self, cmd: Command) -> Result<CommandResult, StoreError> {
        self.check_disk()?;
        self.check_quorum()?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.inner
            .coalesce
            .send((cmd, reply))
            .map_err(|_| StoreError::Unavailable("the store is shutting down".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the store is shutting down".into()))?
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// Refuses a write while this manager's disk is full ([`crate::disk`]): it could only
    /// stall, or reach redb and stop raft.
    fn check_disk(&self) -> Result<(), StoreError> {
        let disk = &self.inner.shared.disk;
        if disk.refresh() {
            return Err(StoreError::Unavailable(disk.refusal()));
        }
        Ok(())
    }

    /// Why this manager's store is not fully working, for `/v1/status`: empty when healthy,
    /// else e.g. "disk full" or "raft stopped: ...".
    pub fn degraded(&self) -> Vec<String> {
        let mut why = Vec::new();
        if self.inner.shared.disk.is_full() {
            why.push("disk full".to_string());
        }
        if let Err(fatal) = &self.raft().metrics().borrow().running_state {
            why.push(format!("raft stopped: {fatal}"));
        }
        why
    }

    /// Run `f` against the current applied state (in-memory, kept in step with redb).
    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        self.inner.shared.read(f)
    }

    /// The last applied log index.
    pub fn revision(&self) -> u64 {
        self.inner.shared.read(|s| s.revision)
    }

    /// Every applied command's [`ChangeBatch`] (refused commands produce none). Subscribe before
    /// reading the state, then skip batches at or below the state's revision. A `Lagged` receiver
    /// can catch up with [`Store::changes_since`]; a `Closed` one (after a snapshot was installed)
    /// must resync from a full read.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ChangeBatch>> {
        self.inner.shared.subscribe()
    }

    /// Batches with revision > `since`, from an in-memory ring of the last 4096 batches; `None` if
    /// `since` is older than the ring holds (the caller must resync from a full read).
    pub fn changes_since(&self, since: u64) -> Option<Vec<Arc<ChangeBatch>>> {
        self.inner.shared.changes_since(since)
    }

    /// Persisted events with revision > `since`, oldest first, at most `limit`. The newest 10 000
    /// are kept.
    pub fn events(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<Vec<flotilla_types::Event>, StoreError> {
        Ok(self.inner.shared.events(since, limit)?)
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    pub fn current_leader(&self) -> Option<u64> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// Stops raft. Everything acknowledged is already on disk.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| StoreError::Unavailable(format!("raft task failed while stopping: {e}")))
    }
}
