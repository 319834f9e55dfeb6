//! Errors the store reports to its callers.

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A write reached a manager that is not the raft leader; retry on the leader.
    #[error("this manager is not the leader (leader: {})", describe_leader(.leader_id, .leader_addr))]
    NotLeader {
        leader_id: Option<u64>,
        leader_addr: Option<String>,
    },
    /// No leader, quorum lost, or raft shutting down.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A redb or filesystem failure.
    #[error("storage failure: {0}")]
    Storage(String),
    /// A stored or received value could not be (de)serialised.
    #[error("encoding failure: {0}")]
    Codec(String),
    /// The store could not be set up with the given configuration.
    #[error("invalid store configuration: {0}")]
    Config(String),
}

fn describe_leader(id: &Option<u64>, addr: &Option<String>) -> String {
    match (id, addr) {
        (Some(id), Some(addr)) => format!("node {id} at {addr}"),
        (Some(id), None) => format!("node {id}"),
        (None, _) => "unknown".to_string(),
    }
}
