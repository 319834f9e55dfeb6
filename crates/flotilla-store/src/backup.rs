//! Store backups for the operator (`flotilla snapshot save|restore`): a running manager's
//! applied state written as one JSON document, and its restore into a stopped node's data dir
//! as a new one-manager cluster (as `etcdutl snapshot restore` does).

use crate::storage::{DbError, Shared};
use crate::store::DB_FILE;
use crate::{Store, StoreConfig, StoreError};
use openraft::{BasicNode, SnapshotMeta};
use serde::{Deserialize, Serialize};

/// What a backup file says it is.
pub const BACKUP_FORMAT: &str = "flotilla-store-backup";
const BACKUP_VERSION: u32 = 1;

/// A backup file: the raft snapshot meta (last applied log id, membership) and the state
/// machine's data (every kind's objects and the recent events).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreBackup {
    pub format: String,
    pub version: u32,
    pub meta: SnapshotMeta<u64, BasicNode>,
    pub data: serde_json::Value,
}

impl StoreBackup {
    /// The store revision (log index) the backup holds.
    pub fn revision(&self) -> u64 {
        self.meta.last_log_id.map_or(0, |l| l.index)
    }
}

/// What [`Store::restore_backup`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub revision: u64,
    /// The raft ids of the backed-up cluster's managers; the restored one is alone.
    pub previous_members: Vec<u64>,
}

impl Store {
    /// A consistent copy of this manager's applied state (not of entries it has yet to apply).
    pub async fn backup(&self) -> Result<StoreBackup, StoreError> {
        let shared = self.shared().clone();
        let (meta, data) = tokio::task::spawn_blocking(move || shared.read_snapshot())
            .await
            .map_err(|e| StoreError::Storage(format!("reading the state: {e}")))??;
        let data = serde_json::from_slice(&data)
            .map_err(|e| StoreError::Codec(format!("the state as JSON: {e}")))?;
        Ok(StoreBackup {
            format: BACKUP_FORMAT.into(),
            version: BACKUP_VERSION,
            meta,
            data,
        })
    }

    /// Writes `backup` as the store in `cfg.data_dir` of a stopped node, which must hold no
    /// store yet, with `cfg.node_id` at `cfg.advertise_addr` as its only manager. Started
    /// afterwards, that manager elects itself and serves the backed-up state.
    pub async fn restore_backup(
        cfg: &StoreConfig,
        backup: StoreBackup,
    ) -> Result<Restored, StoreError> {
        cfg.validate()?;
        if backup.format != BACKUP_FORMAT || backup.version != BACKUP_VERSION {
            return Err(StoreError::Config(format!(
                "format: {:?} version {} is not a {BACKUP_FORMAT} version {BACKUP_VERSION}",
                backup.format, backup.version
            )));
        }
        let path = cfg.data_dir.join(DB_FILE);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
            return Err(StoreError::Config(format!(
                "{} exists: restore only into a data dir without a store (move it aside first)",
                path.display()
            )));
        }
        let (node_id, addr) = (cfg.node_id, cfg.advertise_addr.clone());
        let revision = backup.revision();
        let previous_members = backup
            .meta
            .last_membership
            .membership()
            .voter_ids()
            .collect();
        tokio::task::spawn_blocking(move || -> Result<(), DbError> {
            let data = crate::storage::encode("snapshot", &backup.data)?;
            {
                let (shared, _) = Shared::open(&path, crate::store::EVENT_RETENTION)?;
                shared.install_snapshot(&backup.meta, &data)?;
            }
            crate::storage::force_single_voter(&path, node_id, &addr)?;
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Storage(format!("restoring: {e}")))??;
        tracing::warn!(revision, "restored the store from a backup");
        Ok(Restored {
            revision,
            previous_members,
        })
    }
}
