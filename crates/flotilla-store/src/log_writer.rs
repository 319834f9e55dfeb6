//! Group commit for the raft log.
//!
//! openraft 0.9 hands the log store one entry per client write and awaits each `append` in its
//! core loop, so awaiting an fsync there caps the store at one write per fsync. Instead, `append`
//! parks its entries in an in-memory overlay (so they are readable at once, as openraft requires)
//! and queues them for one writer thread, which commits everything queued so far in a single
//! fsync'd redb transaction and only then reports each batch flushed. Truncate and purge go
//! through the same queue, so every log mutation reaches disk in the order openraft issued it.
//!
//! openraft 0.9.25 also waits for the flushed callback (`RaftCore::append_to_log`) before it
//! takes the next client write, so on the leader this still writes one client entry per fsync:
//! concurrent small writers share entries through [`crate::coalesce`] instead. The queue still
//! keeps the fsync off openraft's core task and folds in a truncate or purge issued meanwhile.
//!
//! While the disk is full ([`crate::disk`]) the thread waits for space before committing, so
//! openraft sees a slow flush rather than a storage error (which would stop it for good).

use crate::disk::DiskGuard;
use crate::storage::{encode, DbError, LogIdOf, LAST_PURGED, LOG, RAFT_META};
use crate::TypeConfig;
use openraft::storage::LogFlushed;
use openraft::Entry;
use redb::Database;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::oneshot;

/// Most jobs folded into one transaction.
const MAX_BATCH: usize = 4096;

/// Entries appended but not yet known to be on disk, by log index. The sequence number tells
/// a flushed entry from a newer one written at the same index after a truncate.
#[derive(Default)]
struct Overlay {
    entries: BTreeMap<u64, (u64, Entry<TypeConfig>)>,
    next_seq: u64,
}

enum Job {
    Append {
        rows: Vec<(u64, u64, Vec<u8>)>,
        flushed: LogFlushed<TypeConfig>,
    },
    Truncate {
        from: u64,
        done: oneshot::Sender<Result<(), DbError>>,
    },
    Purge {
        upto: u64,
        upto_json: Vec<u8>,
        done: oneshot::Sender<Result<(), DbError>>,
    },
}

pub(crate) struct LogWriter {
    /// `None` only while dropping, so the thread sees its queue close.
    jobs: Option<mpsc::Sender<Job>>,
    overlay: Arc<Mutex<Overlay>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Set while dropping: a commit waiting for disk space is attempted at once.
    closing: Arc<AtomicBool>,
}

impl Drop for LogWriter {
    /// Closes the queue and waits for the thread, so the database file is released (and can be
    /// reopened) as soon as the store is dropped.
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl LogWriter {
    /// Starts the writer thread; it ends when the `LogWriter` is dropped.
    pub(crate) fn start(db: Arc<Database>, disk: Arc<DiskGuard>) -> Result<Self, DbError> {
        let (jobs, rx) = mpsc::channel();
        let overlay = Arc::new(Mutex::new(Overlay::default()));
        let thread_overlay = overlay.clone();
        let closing = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            db,
            disk,
            closing: closing.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_loop(&writer, &rx, &thread_overlay))
            .map_err(|source| DbError::Io {
                path: "raft-log-writer thread".into(),
                source,
            })?;
        Ok(LogWriter {
            jobs: Some(jobs),
            overlay,
            thread: Some(thread),
            closing,
        })
    }

    fn overlay(&self) -> std::sync::MutexGuard<'_, Overlay> {
        // A poisoned lock only means a panic elsewhere mid-update of plain maps; the data is
        // still consistent enough to serve reads, and refusing would wedge raft.
        self.overlay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `entries` readable now and durable soon; `flushed` fires once they are on disk.
    pub(crate) fn append(
        &self,
        entries: Vec<Entry<TypeConfig>>,
        flushed: LogFlushed<TypeConfig>,
    ) -> Result<(), DbError> {
        let mut rows = Vec::with_capacity(entries.len());
        {
            let mut overlay = self.overlay();
            for entry in entries {
                let seq = overlay.next_seq;
                overlay.next_seq += 1;
                let index = entry.log_id.index;
                rows.push((index, seq, encode("log entry", &entry)?));
                overlay.entries.insert(index, (seq, entry));
            }
        }
        self.send(Job::Append { rows, flushed })
    }

    /// Removes entries from `from` on, in memory at once and on disk before returning.
    pub(crate) async fn truncate(&self, from: u64) -> Result<(), DbError> {
        self.overlay().entries.retain(|i, _| *i < from);
        let (done, wait) = oneshot::channel();
        self.send_and_wait(Job::Truncate { from, done }, wait).await
    }

    /// Deletes entries up to `upto` and records it as the last purged log id.
    pub(crate) async fn purge(&self, upto: LogIdOf) -> Result<(), DbError> {
        self.overlay().entries.retain(|i, _| *i > upto.index);
        let (done, wait) = oneshot::channel();
        let upto_json = encode("last purged log id", &upto)?;
        self.send_and_wait(
            Job::Purge {
                upto: upto.index,
                upto_json,
                done,
            },
            wait,
        )
        .await
    }

    async fn send_and_wait(
        &self,
        job: Job,
        wait: oneshot::Receiver<Result<(), DbError>>,
    ) -> Result<(), DbError> {
        self.send(job)?;
        wait.await
            .map_err(|_| DbError::Join("the raft log writer has stopped".into()))?
    }

    fn send(&self, job: Job) -> Result<(), DbError> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| DbError::Join("the raft log writer has stopped".into()))
    }

    /// Entries in `range` not yet on disk. Read this *before* the table: an entry leaves the
    /// overlay only after its transaction committed, so one of the two reads always has it.
    pub(crate) fn unflushed(&self, range: (Bound<u64>, Bound<u64>)) -> Vec<Entry<TypeConfig>> {
        self.overlay()
            .entries
            .range(range)
            .map(|(_, (_, e))| e.clone())
            .collect()
    }

    /// The newest unflushed entry's log id.
    pub(crate) fn last_unflushed(&self) -> Option<LogIdOf> {
        self.overlay()
            .entries
            .values()
            .next_back()
            .map(|(_, e)| e.log_id)
    }
}

/// What the writer thread writes with.
struct Writer {
    db: Arc<Database>,
    disk: Arc<DiskGuard>,
    closing: Arc<AtomicBool>,
}

fn write_loop(writer: &Writer, rx: &mpsc::Receiver<Job>, overlay: &Mutex<Overlay>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        writer.disk.wait_for_space(&writer.closing);
        let started = std::time::Instant::now();
        let result = commit(&writer.db, &batch);
        tracing::debug!(
            jobs = batch.len(),
            took_us = started.elapsed().as_micros() as u64,
            "raft log batch committed"
        );
        let mut flushed_rows = Vec::new();
        for job in batch {
            match job {
                Job::Append { rows, flushed } => match &result {
                    Ok(()) => {
                        flushed_rows.extend(rows.into_iter().map(|(i, seq, _)| (i, seq)));
                        flushed.log_io_completed(Ok(()));
                    }
                    Err(e) => flushed.log_io_completed(Err(std::io::Error::other(e.to_string()))),
                },
                Job::Truncate { done, .. } | Job::Purge { done, .. } => {
                    let _ = done.send(
                        result
                            .as_ref()
                            .map(|_| ())
                            .map_err(|e| DbError::Join(e.to_string())),
                    );
                }
            }
        }
        let mut overlay = overlay.lock().unwrap_or_else(|p| p.into_inner());
        for (index, seq) in flushed_rows {
            if overlay.entries.get(&index).is_some_and(|(s, _)| *s == seq) {
                overlay.entries.remove(&index);
            }
        }
    }
}

/// Everything queued, in order, in one durable transaction.
fn commit(db: &Database, batch: &[Job]) -> Result<(), DbError> {
    // The default durability is `Immediate`: `commit` returns after fsync.
    let txn = db.begin_write()?;
    {
        let mut log = txn.open_table(LOG)?;
        let mut meta = txn.open_table(RAFT_META)?;
        for job in batch {
            match job {
                Job::Append { rows, .. } => {
                    for (index, _, bytes) in rows {
                        log.insert(index, bytes.as_slice())?;
                    }
                }
                Job::Truncate { from, .. } => {
                    log.retain_in(*from.., |_, _| false)?;
                }
                Job::Purge {
                    upto, upto_json, ..
                } => {
                    log.retain_in(..=*upto, |_, _| false)?;
                    meta.insert(LAST_PURGED, upto_json.as_slice())?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}
