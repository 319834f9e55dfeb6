//! Which managers vote in raft, and whether they can currently reach a quorum.

use crate::{Store, StoreConfig, StoreError};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use std::collections::BTreeSet;
use std::time::Duration;

/// A leader whose quorum has not acknowledged it for this long is treated as cut off: writes
/// would only hang until the write timeout, so they are refused at once instead.
const QUORUM_ACK_LIMIT: Duration = Duration::from_millis(1500);
/// A peer that answered a raft RPC this recently counts as reachable. Leaders send heartbeats
/// every 250 ms and candidates ask for votes every 1-2 s, so live peers answer well within it.
const REACHABLE_WITHIN: Duration = Duration::from_secs(4);
/// Stricter for [`Store::removal_risk`]: a removal the managers left cannot commit (joint
/// consensus needs their quorum too) stalls every write, so a peer must have answered one of
/// the last few leader heartbeats (every 250 ms) to count. Only the leader sends those.
const REMOVAL_REACHABLE_WITHIN: Duration = Duration::from_secs(1);

/// One raft member as the membership config lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub raft_id: u64,
    pub addr: String,
    /// False for a learner (still catching up, not yet voting).
    pub voter: bool,
}

fn membership_error(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> StoreError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => StoreError::NotLeader {
            leader_id: f.leader_id,
            leader_addr: f.leader_node.map(|n| n.addr),
        },
        other => StoreError::Unavailable(format!("membership change failed: {other}")),
    }
}

impl Store {
    /// Every raft member (voters and learners), by raft id.
    pub fn members(&self) -> Vec<Member> {
        let metrics = self.raft().metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| Member {
                raft_id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
            })
            .collect()
    }

    /// Adds a manager: first as a learner (waiting until it has caught up with the log), then
    /// as a voter. Must run on the leader. Idempotent for a manager already voting.
    #[tracing::instrument(skip(self), fields(node_id = self.node_id()))]
    pub async fn add_manager(&self, raft_id: u64, addr: &str) -> Result<(), StoreError> {
        self.raft()
            .add_learner(raft_id, BasicNode::new(addr), true)
            .await
            .map_err(membership_error)?;
        let mut voters: BTreeSet<u64> = self
            .members()
            .into_iter()
            .filter(|m| m.voter)
            .map(|m| m.raft_id)
            .collect();
        if voters.insert(raft_id) {
            self.raft()
                .change_membership(voters, false)
                .await
                .map_err(membership_error)?;
        }
        tracing::info!(raft_id, addr, "manager added as a voter");
        Ok(())
    }

    /// Removes a manager from the voters and from the membership. Must run on the leader.
    #[tracing::instrument(skip(self), fields(node_id = self.node_id()))]
    pub async fn remove_manager(&self, raft_id: u64) -> Result<(), StoreError> {
        let voters: BTreeSet<u64> = self
            .members()
            .into_iter()
            .filter(|m| m.voter && m.raft_id != raft_id)
            .map(|m| m.raft_id)
            .collect();
        if voters.is_empty() {
            return Err(StoreError::Config(
                "cannot remove the last manager: the cluster would have no voters".into(),
            ));
        }
        // `false`: learners not named are removed too, so the node leaves entirely.
        self.raft()
            .change_membership(voters, false)
            .await
            .map_err(membership_error)?;
        tracing::info!(raft_id, "manager removed");
        Ok(())
    }

    /// Raft ids of the voters.
    pub fn voters(&self) -> BTreeSet<u64> {
        let metrics = self.raft().metrics().borrow().clone();
        let voters = metrics.membership_config.membership().voter_ids().collect();
        voters
    }

    /// Voters this one can reach: itself plus every peer that answered a raft RPC within
    /// [`REACHABLE_WITHIN`].
    pub fn reachable_voters(&self) -> BTreeSet<u64> {
        self.voters_answering_within(REACHABLE_WITHIN)
    }

    fn voters_answering_within(&self, within: Duration) -> BTreeSet<u64> {
        self.voters()
            .into_iter()
            .filter(|id| *id == self.node_id() || self.contacts().answered_within(*id, within))
            .collect()
    }

    /// Managers (voters) this one can reach, and how many voters there are.
    pub fn reachable_managers(&self) -> (usize, usize) {
        (self.reachable_voters().len(), self.voters().len())
    }

    /// Why removing voter `raft_id` now would be unsafe: it is the last one, or the voters
    /// left would not reach a quorum among themselves (counted from this manager, normally
    /// the leader). `None` when it is safe or `raft_id` is not a voter.
    pub fn removal_risk(&self, raft_id: u64) -> Option<String> {
        let mut remaining = self.voters();
        if !remaining.remove(&raft_id) {
            return None;
        }
        if remaining.is_empty() {
            return Some("it is the last manager: the cluster would have no voters".into());
        }
        let reachable = self
            .voters_answering_within(REMOVAL_REACHABLE_WITHIN)
            .intersection(&remaining)
            .count();
        let quorum = remaining.len() / 2 + 1;
        (reachable < quorum).then(|| {
            format!(
                "the {} managers left would not have a quorum: {reachable} of them reachable, \
                 {quorum} needed",
                remaining.len()
            )
        })
    }

    /// Fails fast when a write could not commit: no leader known, or this leader has not heard
    /// from a quorum recently. The message says how many managers are reachable and how many
    /// are needed, e.g. `quorum lost: 1 of 3 managers reachable, 2 needed`.
    pub fn check_quorum(&self) -> Result<(), StoreError> {
        let metrics = self.raft().metrics().borrow().clone();
        let voters = metrics.membership_config.membership().voter_ids().count();
        let quorum = voters / 2 + 1;
        let lost = |detail: String| {
            let (reachable, voters) = self.reachable_managers();
            StoreError::Unavailable(format!(
                "quorum lost: {reachable} of {voters} managers reachable, {quorum} needed \
                 ({detail}); running tasks keep running, writes fail until enough managers \
                 are back"
            ))
        };
        match (metrics.state, metrics.current_leader) {
            // A single voter is its own quorum.
            (ServerState::Leader, _) if voters == 1 => Ok(()),
            (ServerState::Leader, _) => match metrics.millis_since_quorum_ack {
                Some(ms) if Duration::from_millis(ms) <= QUORUM_ACK_LIMIT => Ok(()),
                // Freshly elected, no acknowledgement yet: let the write wait for one.
                None => Ok(()),
                Some(ms) => Err(lost(format!(
                    "this leader has not been acknowledged by a quorum for {ms} ms"
                ))),
            },
            (_, Some(_)) => Ok(()),
            (_, None) => Err(lost("no leader can be elected".into())),
        }
    }
}

/// What [`Store::force_new_cluster`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForcedCluster {
    /// The raft members before; all but this manager are gone from the new membership.
    pub previous_members: Vec<u64>,
    /// Log index of the new membership entry: everything before it was kept.
    pub index: u64,
    /// The raft term of that entry, above any term the old cluster used.
    pub term: u64,
}

impl Store {
    /// `flotilla init --force-new-cluster`: rewrites the stored membership of the (stopped)
    /// store in `cfg.data_dir` so that `cfg.node_id`, at `cfg.advertise_addr`, is the only
    /// voter, keeping every log entry and the whole state machine. Open the store afterwards
    /// and it elects itself alone. `None` if it already was the only member.
    ///
    /// Whatever only the lost managers had (acknowledged by a quorum this manager was not part
    /// of) is gone; the lost managers must never run again with their old data.
    pub async fn force_new_cluster(cfg: &StoreConfig) -> Result<Option<ForcedCluster>, StoreError> {
        cfg.validate()?;
        let path = cfg.data_dir.join(crate::store::DB_FILE);
        if !path.is_file() {
            return Err(StoreError::Config(format!(
                "{} does not exist: --force-new-cluster needs a manager's existing data",
                path.display()
            )));
        }
        let (node_id, addr) = (cfg.node_id, cfg.advertise_addr.clone());
        let forced = tokio::task::spawn_blocking(move || {
            crate::storage::force_single_voter(&path, node_id, &addr)
        })
        .await
        .map_err(|e| StoreError::Storage(format!("rewriting the membership: {e}")))??;
        Ok(forced.map(|f| {
            tracing::warn!(
                previous = ?f.previous_members,
                index = f.entry.index,
                term = f.entry.leader_id.term,
                "forced a new one-manager cluster"
            );
            ForcedCluster {
                previous_members: f.previous_members,
                index: f.entry.index,
                term: f.entry.leader_id.term,
            }
        }))
    }
}
