//! Which managers vote in raft, and whether they can currently reach a quorum.

use crate::{Store, StoreError};
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

    /// Managers (voters) this one can reach: itself plus every peer that answered a raft RPC
    /// within [`REACHABLE_WITHIN`].
    pub fn reachable_managers(&self) -> (usize, usize) {
        let metrics = self.raft().metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let reachable = voters
            .iter()
            .filter(|id| {
                **id == self.node_id() || self.contacts().answered_within(**id, REACHABLE_WITHIN)
            })
            .count();
        (reachable, voters.len())
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
