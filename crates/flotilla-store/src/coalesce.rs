//! Coalescing of concurrent small writes into one raft entry.
//!
//! openraft 0.9 awaits each append's flush in its core loop (`RaftCore::append_to_log` waits
//! for the `LogFlushed` callback before it takes the next client write), so the leader writes
//! at most one entry per fsync however many clients wait, and the group-committing log writer
//! only ever sees one append at a time. Many independent writers (every agent's status report)
//! therefore queue here instead: each round takes everything queued, proposes it as one
//! command, and answers every caller. A caller's ops still apply atomically and in queue
//! order; if the combined command is refused (one caller's precondition failed), each command
//! is proposed again on its own, so every caller gets the answer its own command would have.

use crate::ops::{Command, CommandResult};
use crate::store::WeakStore;
use crate::{Store, StoreError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Most commands combined into one entry.
const MAX_COMMANDS: usize = 512;
/// Combined entries in flight: one being flushed while the previous one is applied keeps the
/// raft core busy; more would only split the queue into smaller entries again.
const IN_FLIGHT: usize = 2;

type Reply = oneshot::Sender<Result<CommandResult, StoreError>>;
pub(crate) type Queue = mpsc::UnboundedSender<(Command, Reply)>;

/// Starts the coalescing task for `store`; it ends once the store (the queue's sender) is dropped.
pub(crate) fn start(store: WeakStore) -> Queue {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Command, Reply)>();
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        while let Some(first) = rx.recv().await {
            // Wait for a slot before gathering, so writes arriving meanwhile join this round.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let mut round = vec![first];
            while round.len() < MAX_COMMANDS {
                match rx.try_recv() {
                    Ok(next) => round.push(next),
                    Err(_) => break,
                }
            }
            let Some(store) = store.upgrade() else {
                return;
            };
            tokio::spawn(async move {
                write_round(&store, round).await;
                drop(slot);
            });
        }
    });
    tx
}

async fn write_round(store: &Store, round: Vec<(Command, Reply)>) {
    if round.len() == 1 {
        let (cmd, reply) = round.into_iter().next().expect("one command");
        let _ = reply.send(store.write(cmd).await);
        return;
    }
    let combined = Command {
        ops: round
            .iter()
            .flat_map(|(c, _)| c.ops.iter().cloned())
            .collect(),
        at: round.iter().map(|(c, _)| c.at).max().unwrap_or_default(),
    };
    match store.write(combined).await {
        Ok(CommandResult::Applied { revision }) => {
            for (_, reply) in round {
                let _ = reply.send(Ok(CommandResult::Applied { revision }));
            }
        }
        // Some caller's precondition failed, which refused the whole entry: nothing was
        // applied, so each command goes again on its own, in order.
        Ok(_) => {
            for (cmd, reply) in round {
                let _ = reply.send(store.write(cmd).await);
            }
        }
        // Not leader, timed out, unavailable: each caller would have got the same.
        Err(e) => {
            for (_, reply) in round {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
