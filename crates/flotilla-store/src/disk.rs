//! Keeps a full disk from stopping raft for good.
//!
//! redb latches the first failed write (`PreviousIo`) and openraft shuts its core down on any
//! storage error, so an `ENOSPC` that reaches either needs a restart. The store therefore treats
//! its disk as full while less than [`MIN_FREE`] is available to it: writes are refused at once
//! ([`Store::write`](crate::Store::write) answers "disk full"), log appends already under way
//! wait in the log writer until space returns instead of failing, and everything resumes on
//! its own once space is freed. [`MIN_FREE`] is the headroom those in-flight appends and their
//! application use; an `ENOSPC` that still gets past it (another process taking the last
//! megabytes within a millisecond) stops raft as before.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a write refused for a full disk begins its message.
pub const DISK_FULL: &str = "disk full";
/// Free space below which the store counts its disk as full.
pub const MIN_FREE: u64 = 16 * 1024 * 1024;
/// How often the watcher re-reads the free space, and a stalled log append re-checks it.
pub(crate) const POLL: Duration = Duration::from_millis(500);
/// While the disk stays full, it is logged again this often (not once per refused write).
const REMIND_EVERY: Duration = Duration::from_secs(60);

/// Whether the store's disk has room, as last measured.
pub(crate) struct DiskGuard {
    dir: PathBuf,
    min_free: u64,
    full: AtomicBool,
    /// When a full disk was last logged.
    logged: Mutex<Option<Instant>>,
}

impl DiskGuard {
    pub(crate) fn new(dir: &Path, min_free: u64) -> Arc<DiskGuard> {
        let guard = Arc::new(DiskGuard {
            dir: dir.to_path_buf(),
            min_free,
            full: AtomicBool::new(false),
            logged: Mutex::new(None),
        });
        guard.refresh();
        guard
    }

    /// Bytes available to this process on the store's filesystem; `None` if unknown.
    pub(crate) fn available(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.dir).ok()?;
        Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }

    /// Measures again; returns whether the disk is full. Logs the changes, and a full disk
    /// at most once per [`REMIND_EVERY`].
    pub(crate) fn refresh(&self) -> bool {
        // An unreadable filesystem is not reported as full: the write itself will say why.
        let available = self.available();
        let full = available.is_some_and(|a| a < self.min_free);
        let was = self.full.swap(full, Ordering::AcqRel);
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if full {
            let due = logged.is_none_or(|at| at.elapsed() >= REMIND_EVERY);
            if !was || due {
                tracing::error!(
                    dir = %self.dir.display(),
                    available = available.unwrap_or(0),
                    needed = self.min_free,
                    "disk full: the store refuses writes until space is freed (reads still work)"
                );
                *logged = Some(Instant::now());
            }
        } else if was {
            tracing::warn!(dir = %self.dir.display(), "disk space is back: the store accepts writes again");
            *logged = None;
        }
        full
    }

    /// As last measured.
    pub(crate) fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// Blocks (the log writer's thread) while the disk is full, re-measuring every [`POLL`],
    /// or until `give_up` turns true.
    pub(crate) fn wait_for_space(&self, give_up: &AtomicBool) {
        while self.refresh() && !give_up.load(Ordering::Acquire) {
            std::thread::sleep(POLL);
        }
    }

    /// What a refused write reports.
    pub(crate) fn refusal(&self) -> String {
        format!(
            "{DISK_FULL}: under {} MiB free for the store in {} ({} MiB left); writes resume once \
             space is freed, reads keep working",
            self.min_free / (1024 * 1024),
            self.dir.display(),
            self.available().unwrap_or(0) / (1024 * 1024)
        )
    }
}

/// Re-measures every [`POLL`] while `guard` has other owners, so a full disk shows (and
/// clears) in the store's status without a write.
pub(crate) fn watch(guard: std::sync::Weak<DiskGuard>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL).await;
            let Some(g) = guard.upgrade() else { return };
            g.refresh();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_above_the_free_space_counts_as_full() {
        let dir = tempfile::tempdir().unwrap();
        let roomy = DiskGuard::new(dir.path(), 0);
        assert!(!roomy.is_full());
        let full = DiskGuard::new(dir.path(), u64::MAX);
        assert!(full.is_full());
        assert!(
            full.refusal().starts_with("disk full"),
            "{}",
            full.refusal()
        );
        // A stalled append gives up when told to.
        full.wait_for_space(&AtomicBool::new(true));
    }
}
