//! Persistence: the raft log, vote and state machine in one redb file, plus the in-memory
//! [`ClusterState`] and change feed kept in step with it.
//!
//! [`LogStore`] and [`StateMachine`] are openraft's two storage halves; both share one [`Shared`]
//! (the redb database and the live in-memory view). Every redb commit runs on tokio's blocking
//! pool, because a durable commit fsyncs.

use crate::apply::apply_command;
use crate::kinds::{for_each_kind, DbKey, Kind, KindVisitor, Overlay, SnapshotData};
use crate::log_writer::LogWriter;
use crate::ops::{ChangeBatch, ClusterState, CommandResult};
use crate::TypeConfig;
use flotilla_types::Event;
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, BasicNode, CommittedLeaderId, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId,
    LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    Table, TableDefinition, WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::broadcast;

/// Raft log entries by index, as JSON.
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Raft bookkeeping: [`VOTE`], [`COMMITTED`], [`LAST_PURGED`].
pub(crate) const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
// Each stored kind has its own table, named by `Kind::TABLE` (see `kind_table`).
/// Events keyed by (revision, position within the revision's command).
const EVENTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("events");
/// State-machine bookkeeping: [`LAST_APPLIED`], [`LAST_MEMBERSHIP`].
const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
/// The current snapshot: [`SNAPSHOT_META`] and [`SNAPSHOT_DATA`].
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
pub(crate) const LAST_PURGED: &str = "last_purged";
const LAST_APPLIED: &str = "last_applied";
const LAST_MEMBERSHIP: &str = "last_membership";
const SNAPSHOT_META: &str = "meta";
const SNAPSHOT_DATA: &str = "data";

/// How many recent change batches [`Shared::changes_since`] can replay.
pub(crate) const CHANGE_RING_CAPACITY: usize = 4096;
/// How many bytes (of the batches' objects, as stored) the change ring holds at most: a few
/// large objects rewritten often must not pin gigabytes. The newest batch is always kept.
pub(crate) const CHANGE_RING_MAX_BYTES: usize = 64 << 20;
/// What a change or event costs in the ring beyond its encoded object.
const CHANGE_OVERHEAD_BYTES: usize = 64;

pub(crate) type LogIdOf = LogId<u64>;
type Membership = StoredMembership<u64, BasicNode>;

/// A failure inside the storage layer, before it is mapped to openraft's or the caller's error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DbError {
    #[error("redb: {0}")]
    Database(#[from] redb::DatabaseError),
    #[error("redb transaction: {0}")]
    Transaction(#[from] redb::TransactionError),
    #[error("redb table: {0}")]
    Table(#[from] redb::TableError),
    #[error("redb storage: {0}")]
    Storage(#[from] redb::StorageError),
    #[error("redb commit: {0}")]
    Commit(#[from] redb::CommitError),
    #[error("redb durability: {0}")]
    Durability(#[from] redb::SetDurabilityError),
    #[error("creating {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("encoding {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("decoding {what}: {source}")]
    Decode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("storage task did not finish: {0}")]
    Join(String),
}

impl From<DbError> for crate::StoreError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Encode { .. } | DbError::Decode { .. } => {
                crate::StoreError::Codec(e.to_string())
            }
            _ => crate::StoreError::Storage(e.to_string()),
        }
    }
}

pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, DbError> {
    serde_json::to_vec(value).map_err(|source| DbError::Encode { what, source })
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DbError> {
    serde_json::from_slice(bytes).map_err(|source| DbError::Decode { what, source })
}

/// Wraps a storage-layer failure as the error openraft expects (which stops raft: the node must
/// not continue on a store it cannot trust).
fn raft_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: DbError) -> StorageError<u64> {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

/// Runs a blocking redb operation off the async worker threads.
async fn blocking<T, F>(f: F) -> Result<T, DbError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, DbError> + Send + 'static,
{
    // Keep the caller's span (raft's, carrying the node id) on the blocking thread's logs.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| DbError::Join(e.to_string()))?
}

fn get_json<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    what: &'static str,
) -> Result<Option<T>, DbError> {
    match table.get(key)? {
        Some(guard) => Ok(Some(decode(what, guard.value())?)),
        None => Ok(None),
    }
}

/// The live in-memory view readers use. Guarded by one lock so a reader that subscribes and then
/// reads the state never misses or double-counts a batch.
struct Live {
    state: ClusterState,
    /// The last applied batches, oldest first: at most [`CHANGE_RING_CAPACITY`] of them and
    /// [`CHANGE_RING_MAX_BYTES`] in total, each with its size.
    ring: VecDeque<(Arc<ChangeBatch>, usize)>,
    /// The sum of the sizes in `ring`.
    ring_bytes: usize,
    /// Every batch with a revision above this is in `ring`.
    ring_floor: u64,
    changes: broadcast::Sender<Arc<ChangeBatch>>,
}

impl Live {
    /// Adds `batch` (of `size` bytes) to the ring, evicting the oldest batches beyond its bounds.
    fn remember(&mut self, batch: Arc<ChangeBatch>, size: usize) {
        self.ring.push_back((batch, size));
        self.ring_bytes += size;
        while self.ring.len() > CHANGE_RING_CAPACITY
            || (self.ring_bytes > CHANGE_RING_MAX_BYTES && self.ring.len() > 1)
        {
            let Some((evicted, size)) = self.ring.pop_front() else {
                break;
            };
            self.ring_bytes -= size;
            self.ring_floor = evicted.revision;
        }
    }
}

/// What the log store, the state machine and the [`crate::Store`] share.
pub(crate) struct Shared {
    db: Arc<Database>,
    /// Whether the store's disk has room ([`crate::disk`]).
    pub(crate) disk: Arc<crate::disk::DiskGuard>,
    /// Group-commits log appends, truncates and purges (see [`crate::log_writer`]).
    log_writer: LogWriter,
    live: RwLock<Live>,
    /// Newest events kept on disk.
    event_retention: u64,
}

/// The state machine's position as loaded from disk.
pub(crate) struct Applied {
    last_applied: Option<LogIdOf>,
    membership: Membership,
}

impl Shared {
    /// Opens (creating if needed) the redb file at `path` and loads the applied state into memory.
    pub(crate) fn open(
        path: &Path,
        event_retention: u64,
    ) -> Result<(Arc<Shared>, Applied), DbError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DbError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        // Opening a table in a write transaction creates it; readers can then rely on it existing.
        txn.open_table(LOG)?;
        txn.open_table(RAFT_META)?;
        txn.open_table(SNAPSHOT)?;
        txn.open_table(EVENTS)?;
        txn.open_table(SM_META)?;
        create_kind_tables(&txn)?;
        txn.commit()?;

        let txn = db.begin_read()?;
        let sm_meta = txn.open_table(SM_META)?;
        let last_applied: Option<LogIdOf> =
            get_json(&sm_meta, LAST_APPLIED, "last applied log id")?;
        let membership: Membership =
            get_json(&sm_meta, LAST_MEMBERSHIP, "last membership")?.unwrap_or_default();
        let data = read_sm_tables(&txn, false)?;
        let revision = last_applied.map_or(0, |l| l.index);
        let state = data.into_state(revision);
        let (changes, _) = broadcast::channel(CHANGE_RING_CAPACITY);
        let db = Arc::new(db);
        let disk = crate::disk::DiskGuard::new(
            path.parent().unwrap_or(Path::new(".")),
            crate::disk::MIN_FREE,
        );
        let shared = Shared {
            log_writer: LogWriter::start(db.clone(), disk.clone())?,
            disk,
            db,
            live: RwLock::new(Live {
                state,
                ring: VecDeque::new(),
                ring_bytes: 0,
                ring_floor: revision,
                changes,
            }),
            event_retention,
        };
        Ok((
            Arc::new(shared),
            Applied {
                last_applied,
                membership,
            },
        ))
    }

    // A panic while the lock is held can only come from a bug in code that only moves values
    // into place; the state is still whole, so a poisoned lock is safe to keep using.
    fn live(&self) -> RwLockReadGuard<'_, Live> {
        self.live.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn live_mut(&self) -> RwLockWriteGuard<'_, Live> {
        self.live.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        f(&self.live().state)
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<ChangeBatch>> {
        self.live().changes.subscribe()
    }

    pub(crate) fn changes_since(&self, since: u64) -> Option<Vec<Arc<ChangeBatch>>> {
        let live = self.live();
        if since < live.ring_floor {
            return None;
        }
        // The ring is ordered by revision, so skip the prefix at or below `since`.
        let start = live.ring.partition_point(|(b, _)| b.revision <= since);
        Some(live.ring.range(start..).map(|(b, _)| b.clone()).collect())
    }

    pub(crate) fn events(&self, since: u64, limit: usize) -> Result<Vec<Event>, DbError> {
        let Some(first) = since.checked_add(1) else {
            return Ok(Vec::new());
        };
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for item in table.range((first, 0)..)?.take(limit) {
            let (_, value) = item?;
            out.push(decode("event", value.value())?);
        }
        Ok(out)
    }

    // ---- raft log ----

    fn log_state(&self) -> Result<LogState<TypeConfig>, DbError> {
        let unflushed = self.log_writer.last_unflushed();
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(RAFT_META)?;
        let last_purged: Option<LogIdOf> = get_json(&meta, LAST_PURGED, "last purged log id")?;
        let log = txn.open_table(LOG)?;
        let last_log = match log.last()? {
            Some((_, value)) => {
                Some(decode::<Entry<TypeConfig>>("log entry", value.value())?.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: unflushed.max(last_log),
        })
    }

    fn read_logs(
        &self,
        range: (Bound<u64>, Bound<u64>),
    ) -> Result<Vec<Entry<TypeConfig>>, DbError> {
        // Unflushed entries first: see `LogWriter::unflushed` for why the order matters.
        let unflushed = self.log_writer.unflushed(range);
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let mut out = BTreeMap::new();
        for item in log.range(range)? {
            let (index, value) = item?;
            out.insert(
                index.value(),
                decode::<Entry<TypeConfig>>("log entry", value.value())?,
            );
        }
        for entry in unflushed {
            out.insert(entry.log_id.index, entry);
        }
        Ok(out.into_values().collect())
    }

    fn read_raft_meta<T: DeserializeOwned>(
        &self,
        key: &str,
        what: &'static str,
    ) -> Result<Option<T>, DbError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(RAFT_META)?;
        get_json(&meta, key, what)
    }

    fn write_raft_meta(
        &self,
        key: &str,
        value: &[u8],
        durability: Durability,
    ) -> Result<(), DbError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(durability)?;
        txn.open_table(RAFT_META)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }

    // ---- state machine ----

    /// Applies `entries` in one redb transaction, then publishes the result in memory.
    fn apply_entries(
        &self,
        entries: Vec<Entry<TypeConfig>>,
        applied: &mut Applied,
    ) -> Result<Vec<CommandResult>, DbError> {
        let started = std::time::Instant::now();
        let count = entries.len();
        let mut results = Vec::with_capacity(entries.len());
        let mut pending = Overlay::default();
        let mut batches = Vec::new();
        let sizes;
        let mut txn = self.db.begin_write()?;
        // Not fsynced: every entry applied here is already in the raft log, fsynced on a
        // majority before it was committed, and openraft re-applies committed entries above
        // the state machine's last_applied on startup (`bootstrap_single` waits for that). The
        // next durable commit (a log append, at the latest) persists this one; a snapshot's
        // commit is durable, so the log is never purged beyond what is on disk here. This saves
        // one fsync per write on the leader's critical path.
        txn.set_durability(Durability::None)?;
        {
            let mut tables = SmTables::open(&txn)?;
            // Only this (serialised) apply path changes `live`, so the view read here is still
            // current when the write lock is taken after commit.
            let live = self.live();
            for entry in entries {
                let index = entry.log_id.index;
                applied.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Membership(m) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    }
                    EntryPayload::Normal(cmd) => {
                        let _span = tracing::debug_span!("apply", revision = index).entered();
                        let outcome = apply_command(&live.state, &pending, &cmd, index);
                        if let Some(done) = outcome.applied {
                            tables.write_events(&done.events)?;
                            pending.merge(done.writes);
                            batches.push(Arc::new(ChangeBatch {
                                revision: index,
                                changes: done.changes,
                                events: done.events,
                            }));
                        } else {
                            tracing::debug!(result = ?outcome.result, "command refused");
                        }
                        results.push(outcome.result);
                        continue;
                    }
                }
                results.push(CommandResult::Applied { revision: index });
            }
            drop(live);
            sizes = tables.write_changes(&batches)?;
            tables.trim_events(self.event_retention)?;
            tables.write_applied(applied)?;
        }
        txn.commit()?;

        let mut live = self.live_mut();
        pending.apply_to(&mut live.state);
        live.state.revision = applied.last_applied.map_or(0, |l| l.index);
        for (batch, size) in batches.into_iter().zip(sizes) {
            live.remember(batch.clone(), size);
            // No receivers is fine: nobody is watching.
            let _ = live.changes.send(batch);
        }
        drop(live);
        tracing::debug!(
            entries = count,
            took_us = started.elapsed().as_micros() as u64,
            "entries applied"
        );
        Ok(results)
    }

    /// Replaces the state machine with a snapshot, on disk and in memory.
    pub(crate) fn install_snapshot(
        &self,
        meta: &SnapshotMeta<u64, BasicNode>,
        data: &[u8],
    ) -> Result<(), DbError> {
        let snapshot: SnapshotData = decode("snapshot", data)?;
        let applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let txn = self.db.begin_write()?;
        {
            let mut tables = SmTables::open(&txn)?;
            tables.replace_all(&snapshot)?;
            tables.write_applied(&applied)?;
            let mut current = txn.open_table(SNAPSHOT)?;
            current.insert(SNAPSHOT_META, encode("snapshot meta", meta)?.as_slice())?;
            current.insert(SNAPSHOT_DATA, data)?;
        }
        txn.commit()?;

        let revision = meta.last_log_id.map_or(0, |l| l.index);
        let mut live = self.live_mut();
        live.state = snapshot.into_state(revision);
        live.ring.clear();
        live.ring_bytes = 0;
        live.ring_floor = revision;
        // Replacing the sender closes every subscription: their holders see `Closed` and must
        // resync from a full read, since the snapshot is not expressed as change batches.
        live.changes = broadcast::channel(CHANGE_RING_CAPACITY).0;
        Ok(())
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, DbError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOT)?;
        let meta: Option<SnapshotMeta<u64, BasicNode>> =
            get_json(&table, SNAPSHOT_META, "snapshot meta")?;
        let (Some(meta), Some(data)) = (meta, table.get(SNAPSHOT_DATA)?) else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.value().to_vec())),
        }))
    }

    /// Whether log entries wait to be written (the log writer is behind, or waits for space).
    #[cfg(test)]
    pub(crate) fn has_unflushed(&self) -> bool {
        self.log_writer.last_unflushed().is_some()
    }

    /// Serialises the state machine as of now without recording anything (a backup).
    pub(crate) fn read_snapshot(&self) -> Result<(SnapshotMeta<u64, BasicNode>, Vec<u8>), DbError> {
        serialise_state(self.db.begin_read()?)
    }

    /// Serialises the state machine as seen by `txn` and records it as the current snapshot.
    fn build_snapshot(&self, txn: ReadTransaction) -> Result<Snapshot<TypeConfig>, DbError> {
        let (meta, data) = serialise_state(txn)?;
        let write = self.db.begin_write()?;
        {
            let mut current = write.open_table(SNAPSHOT)?;
            let existing: Option<SnapshotMeta<u64, BasicNode>> =
                get_json(&current, SNAPSHOT_META, "snapshot meta")?;
            // A snapshot installed from the leader meanwhile may be newer; keep the newest.
            if existing.is_none_or(|e| e.last_log_id <= meta.last_log_id) {
                current.insert(SNAPSHOT_META, encode("snapshot meta", &meta)?.as_slice())?;
                current.insert(SNAPSHOT_DATA, data.as_slice())?;
            }
        }
        write.commit()?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// The state machine as seen by `txn`: its snapshot meta and encoded data.
fn serialise_state(
    txn: ReadTransaction,
) -> Result<(SnapshotMeta<u64, BasicNode>, Vec<u8>), DbError> {
    let sm_meta = txn.open_table(SM_META)?;
    let last_log_id: Option<LogIdOf> = get_json(&sm_meta, LAST_APPLIED, "last applied log id")?;
    let last_membership: Membership =
        get_json(&sm_meta, LAST_MEMBERSHIP, "last membership")?.unwrap_or_default();
    let data = encode("snapshot", &read_sm_tables(&txn, true)?)?;
    let index = last_log_id.map_or(0, |l| l.index);
    let meta = SnapshotMeta {
        last_log_id,
        last_membership,
        snapshot_id: format!("{index}-{:08x}", rand::random::<u32>()),
    };
    Ok((meta, data))
}

/// The redb table of kind `K`.
fn kind_table<K: Kind>() -> TableDefinition<'static, <K::Key as DbKey>::Redb, &'static [u8]> {
    TableDefinition::new(K::TABLE)
}

/// Decodes every value of `table`.
fn all<K: redb::Key + 'static, T: DeserializeOwned>(
    table: &impl ReadableTable<K, &'static [u8]>,
    what: &'static str,
) -> Result<Vec<T>, DbError> {
    let mut out = Vec::new();
    for item in table.iter()? {
        let (_, value) = item?;
        out.push(decode(what, value.value())?);
    }
    Ok(out)
}

/// Reads every state-machine table; events only when `with_events`.
fn read_sm_tables(txn: &ReadTransaction, with_events: bool) -> Result<SnapshotData, DbError> {
    struct Read<'t> {
        txn: &'t ReadTransaction,
        data: SnapshotData,
    }
    impl KindVisitor for Read<'_> {
        type Error = DbError;
        fn visit<K: Kind>(&mut self) -> Result<(), DbError> {
            *K::in_snapshot(&mut self.data) =
                all(&self.txn.open_table(kind_table::<K>())?, K::KIND)?;
            Ok(())
        }
    }
    let mut read = Read {
        txn,
        data: SnapshotData::default(),
    };
    for_each_kind(&mut read)?;
    if with_events {
        read.data.events = all(&txn.open_table(EVENTS)?, "event")?;
    }
    Ok(read.data)
}

/// Opens (creating if needed) the table of every kind in `txn`.
fn create_kind_tables(txn: &WriteTransaction) -> Result<(), DbError> {
    struct Create<'t>(&'t WriteTransaction);
    impl KindVisitor for Create<'_> {
        type Error = DbError;
        fn visit<K: Kind>(&mut self) -> Result<(), DbError> {
            self.0.open_table(kind_table::<K>())?;
            Ok(())
        }
    }
    for_each_kind(&mut Create(txn))
}

/// The state-machine tables, open in one write transaction; a kind's table is opened while its
/// objects are written.
struct SmTables<'txn> {
    txn: &'txn WriteTransaction,
    events: Table<'txn, (u64, u32), &'static [u8]>,
    meta: Table<'txn, &'static str, &'static [u8]>,
}

impl<'txn> SmTables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, DbError> {
        Ok(SmTables {
            txn,
            events: txn.open_table(EVENTS)?,
            meta: txn.open_table(SM_META)?,
        })
    }

    /// Writes the changes of `batches`, in order, opening each touched kind's table once.
    /// Returns each batch's size: its objects as stored, plus a little per change and event.
    fn write_changes(&mut self, batches: &[Arc<ChangeBatch>]) -> Result<Vec<usize>, DbError> {
        struct Write<'c, 't> {
            txn: &'t WriteTransaction,
            batches: &'c [Arc<ChangeBatch>],
            sizes: Vec<usize>,
        }
        impl KindVisitor for Write<'_, '_> {
            type Error = DbError;
            fn visit<K: Kind>(&mut self) -> Result<(), DbError> {
                let mut mine = (self.batches.iter().enumerate())
                    .flat_map(|(i, b)| {
                        b.changes
                            .iter()
                            .filter_map(K::of_change)
                            .map(move |c| (i, c))
                    })
                    .peekable();
                if mine.peek().is_none() {
                    return Ok(());
                }
                let mut table = self.txn.open_table(kind_table::<K>())?;
                for (i, (key, object)) in mine {
                    match object {
                        Some(o) => {
                            let bytes = encode(K::KIND, o)?;
                            self.sizes[i] += bytes.len();
                            table.insert(key.db_key(), bytes.as_slice())?
                        }
                        None => table.remove(key.db_key())?,
                    };
                }
                Ok(())
            }
        }
        let mut write = Write {
            txn: self.txn,
            batches,
            sizes: batches
                .iter()
                .map(|b| {
                    let events: usize = b.events.iter().map(|e| e.message.len()).sum();
                    events + (b.changes.len() + b.events.len()) * CHANGE_OVERHEAD_BYTES
                })
                .collect(),
        };
        for_each_kind(&mut write)?;
        Ok(write.sizes)
    }

    fn write_events(&mut self, events: &[Event]) -> Result<(), DbError> {
        for (position, event) in (0u32..).zip(events) {
            self.events.insert(
                (event.revision, position),
                encode("event", event)?.as_slice(),
            )?;
        }
        Ok(())
    }

    /// Drops the oldest events beyond `retention`.
    fn trim_events(&mut self, retention: u64) -> Result<(), DbError> {
        let excess = self.events.len()?.saturating_sub(retention);
        for _ in 0..excess {
            self.events.pop_first()?;
        }
        Ok(())
    }

    fn write_applied(&mut self, applied: &Applied) -> Result<(), DbError> {
        self.meta.insert(
            LAST_APPLIED,
            encode("last applied log id", &applied.last_applied)?.as_slice(),
        )?;
        self.meta.insert(
            LAST_MEMBERSHIP,
            encode("last membership", &applied.membership)?.as_slice(),
        )?;
        Ok(())
    }

    fn replace_all(&mut self, data: &SnapshotData) -> Result<(), DbError> {
        struct Replace<'d, 't> {
            txn: &'t WriteTransaction,
            data: &'d SnapshotData,
        }
        impl KindVisitor for Replace<'_, '_> {
            type Error = DbError;
            fn visit<K: Kind>(&mut self) -> Result<(), DbError> {
                let mut table = self.txn.open_table(kind_table::<K>())?;
                table.retain(|_, _| false)?;
                for object in K::objects(self.data) {
                    table.insert(object.key().db_key(), encode(K::KIND, object)?.as_slice())?;
                }
                Ok(())
            }
        }
        for_each_kind(&mut Replace {
            txn: self.txn,
            data,
        })?;
        self.events.retain(|_, _| false)?;
        let mut position = 0u32;
        let mut last_revision = None;
        for e in &data.events {
            position = if last_revision == Some(e.revision) {
                position + 1
            } else {
                0
            };
            last_revision = Some(e.revision);
            self.events
                .insert((e.revision, position), encode("event", e)?.as_slice())?;
        }
        Ok(())
    }
}

/// What [`force_single_voter`] appended.
pub(crate) struct ForcedVoter {
    /// The voters (and learners) of the membership it replaced.
    pub(crate) previous_members: Vec<u64>,
    /// The new membership entry: one past everything kept, in a term above any seen.
    pub(crate) entry: LogIdOf,
}

/// Makes `node_id` (at `addr`) the only voter of the store at `path`, keeping everything else:
/// appends a membership entry naming only it, one index past the last log entry (or the last
/// applied one, whichever is newer) and one term above any this node has seen, and records a
/// vote in that term so its next election is newer still. openraft takes the last membership
/// entry in the log as effective on startup, so the node elects itself alone and, as leader,
/// commits every entry it holds. Run while raft is stopped (the redb file is opened here).
/// `None` when this node is already the only member.
pub(crate) fn force_single_voter(
    path: &Path,
    node_id: u64,
    addr: &str,
) -> Result<Option<ForcedVoter>, DbError> {
    let db = Database::open(path)?;
    let read = db.begin_read()?;
    let meta = read.open_table(RAFT_META)?;
    let vote: Option<Vote<u64>> = get_json(&meta, VOTE, "vote")?;
    let last_purged: Option<LogIdOf> = get_json(&meta, LAST_PURGED, "last purged log id")?;
    let sm_meta = read.open_table(SM_META)?;
    let last_applied: Option<LogIdOf> = get_json(&sm_meta, LAST_APPLIED, "last applied log id")?;
    let mut membership = get_json::<Membership>(&sm_meta, LAST_MEMBERSHIP, "last membership")?
        .unwrap_or_default()
        .membership()
        .clone();
    let log = read.open_table(LOG)?;
    let mut last_log = last_purged;
    // The effective membership is the newest one in the log, else the applied one.
    for item in log.iter()? {
        let (_, value) = item?;
        let entry: Entry<TypeConfig> = decode("log entry", value.value())?;
        if let EntryPayload::Membership(m) = entry.payload {
            membership = m;
        }
        last_log = Some(entry.log_id);
    }
    drop((log, sm_meta, meta, read));

    let members: Vec<u64> = membership.nodes().map(|(id, _)| *id).collect();
    if members == [node_id]
        && membership.voter_ids().eq([node_id])
        && membership
            .get_node(&node_id)
            .is_some_and(|n| n.addr == addr)
    {
        return Ok(None);
    }
    let term = [
        vote.map(|v| v.leader_id().term),
        last_log.map(|l| l.leader_id.term),
        last_applied.map(|l| l.leader_id.term),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(0)
        + 1;
    let txn = db.begin_write()?;
    let entry_id = {
        let mut log = txn.open_table(LOG)?;
        let mut meta = txn.open_table(RAFT_META)?;
        // A state machine ahead of the log (a snapshot installed, its log not yet purged):
        // purge up to it as openraft would on startup, or the new entry would leave a hole.
        if let Some(applied) = last_applied.filter(|a| last_log < Some(*a)) {
            log.retain_in(..=applied.index, |_, _| false)?;
            meta.insert(
                LAST_PURGED,
                encode("last purged log id", &applied)?.as_slice(),
            )?;
            last_log = Some(applied);
        }
        let index = last_log.map_or(0, |l| l.index + 1);
        let entry: Entry<TypeConfig> = Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, node_id), index),
            payload: EntryPayload::Membership(openraft::Membership::new(
                vec![[node_id].into()],
                BTreeMap::from([(node_id, BasicNode::new(addr))]),
            )),
        };
        log.insert(index, encode("log entry", &entry)?.as_slice())?;
        meta.insert(VOTE, encode("vote", &Vote::new(term, node_id))?.as_slice())?;
        entry.log_id
    };
    txn.commit()?;
    Ok(Some(ForcedVoter {
        previous_members: members,
        entry: entry_id,
    }))
}

/// openraft's log half: entries, vote and commit/purge markers.
#[derive(Clone)]
pub(crate) struct LogStore {
    shared: Arc<Shared>,
}

impl LogStore {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        LogStore { shared }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        self.shared
            .read_logs(bounds)
            .map_err(|e| raft_err(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        self.shared
            .log_state()
            .map_err(|e| raft_err(ErrorSubject::Logs, ErrorVerb::Read, e))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let shared = self.shared.clone();
        let vote = *vote;
        blocking(move || {
            shared.write_raft_meta(VOTE, &encode("vote", &vote)?, Durability::Immediate)
        })
        .await
        .map_err(|e| raft_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        self.shared
            .read_raft_meta(VOTE, "vote")
            .map_err(|e| raft_err(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogIdOf>,
    ) -> Result<(), StorageError<u64>> {
        let shared = self.shared.clone();
        // Not fsynced on its own: the state machine is durable before `apply` returns, so the
        // committed marker only saves re-applying a few entries; the next durable commit (an
        // append or an apply) persists it anyway.
        blocking(move || {
            shared.write_raft_meta(
                COMMITTED,
                &encode("committed log id", &committed)?,
                Durability::None,
            )
        })
        .await
        .map_err(|e| raft_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf>, StorageError<u64>> {
        self.shared
            .read_raft_meta::<Option<LogIdOf>>(COMMITTED, "committed log id")
            .map(Option::flatten)
            .map_err(|e| raft_err(ErrorSubject::Store, ErrorVerb::Read, e))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.shared
            .log_writer
            .append(entries.into_iter().collect(), callback)
            .map_err(|e| raft_err(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn truncate(&mut self, log_id: LogIdOf) -> Result<(), StorageError<u64>> {
        self.shared
            .log_writer
            .truncate(log_id.index)
            .await
            .map_err(|e| raft_err(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogIdOf) -> Result<(), StorageError<u64>> {
        self.shared
            .log_writer
            .purge(log_id)
            .await
            .map_err(|e| raft_err(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))
    }
}

/// openraft's state-machine half.
pub(crate) struct StateMachine {
    shared: Arc<Shared>,
    applied: Applied,
}

impl StateMachine {
    pub(crate) fn new(shared: Arc<Shared>, applied: Applied) -> Self {
        StateMachine { shared, applied }
    }
}

/// Builds a snapshot from a redb read transaction taken when the builder was made, so it is
/// consistent with one `last_applied` however far apply has moved on since.
pub(crate) struct SnapshotBuilder {
    shared: Arc<Shared>,
    view: Option<ReadTransaction>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let shared = self.shared.clone();
        let view = self.view.take();
        blocking(move || {
            let txn = match view {
                Some(txn) => txn,
                None => shared.db.begin_read()?,
            };
            shared.build_snapshot(txn)
        })
        .await
        .map_err(|e| raft_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogIdOf>, Membership), StorageError<u64>> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let shared = self.shared.clone();
        let mut applied = Applied {
            last_applied: self.applied.last_applied,
            membership: self.applied.membership.clone(),
        };
        let (results, applied) = blocking(move || {
            let results = shared.apply_entries(entries, &mut applied)?;
            Ok((results, applied))
        })
        .await
        .map_err(|e| raft_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        self.applied = applied;
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // If the read transaction cannot be started now, the builder starts one itself; apply
        // may have moved on by then, which is still a consistent (newer) snapshot.
        let view = match self.shared.db.begin_read() {
            Ok(txn) => Some(txn),
            Err(e) => {
                tracing::warn!(error = %e, "could not pin a read view for the snapshot");
                None
            }
        };
        SnapshotBuilder {
            shared: self.shared.clone(),
            view,
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let shared = self.shared.clone();
        let owned_meta = meta.clone();
        let data = snapshot.into_inner();
        blocking(move || shared.install_snapshot(&owned_meta, &data))
            .await
            .map_err(|e| {
                raft_err(
                    ErrorSubject::Snapshot(Some(meta.signature())),
                    ErrorVerb::Write,
                    e,
                )
            })?;
        self.applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        self.shared
            .current_snapshot()
            .map_err(|e| raft_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))
    }
}
