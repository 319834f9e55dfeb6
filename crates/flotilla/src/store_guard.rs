//! The start-up check that keeps a lost store from turning into a new, empty cluster: a
//! manager about to bootstrap on a data dir whose store file is missing or empty while the
//! node has other state (the store's directory, task dirs) refuses to start and says how to
//! recover.

use anyhow::bail;
use std::path::{Path, PathBuf};

/// The store's redb file under a data dir (see `flotilla_store::StoreConfig`).
pub fn store_file(data_dir: &Path) -> PathBuf {
    data_dir.join("store").join("store.redb")
}

/// Fails when bootstrapping on `data_dir` would start an empty cluster beside state a store
/// used to account for. `discard`: `--discard-unknown-workloads`, the operator accepts a new
/// store (whose agent then stops the workloads it does not know).
pub fn check_before_bootstrap(data_dir: &Path, discard: bool) -> anyhow::Result<()> {
    let file = store_file(data_dir);
    let problem = match std::fs::metadata(&file) {
        Ok(m) if m.len() > 0 => return Ok(()),
        Ok(_) => "is empty (0 bytes)",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "is missing",
        Err(e) => bail!("cannot read {}: {e}", file.display()),
    };
    let evidence = leftover_state(data_dir);
    if evidence.is_empty() || discard {
        if !evidence.is_empty() {
            tracing::warn!(store = %file.display(), "starting a new, empty store over a lost one (--discard-unknown-workloads)");
        }
        return Ok(());
    }
    bail!(
        "refusing to start: the store {} {problem}, but this data dir holds state a store \
         accounted for ({}). Starting would create a new, empty cluster that knows none of \
         this node's workloads. They are left running. To recover: stop nothing, then \
         either restore a snapshot into this data dir (`flotilla snapshot restore FILE \
         --data-dir {}`), or, for a manager of a multi-manager cluster, move {} aside and \
         join again through a healthy manager. To start a new, empty cluster here anyway \
         and stop the workloads it does not know, add --discard-unknown-workloads \
         (docs/OPERATIONS.md, \"When things go wrong\")",
        file.display(),
        evidence.join(", "),
        data_dir.display(),
        data_dir.join("store").display(),
    )
}

/// What on `data_dir` shows a store existed: its directory (created by the store itself)
/// and the process driver's tasks whose workload has not exited (finished ones, kept for
/// their logs, outlive a dissolved cluster).
fn leftover_state(data_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let store_dir = data_dir.join("store");
    if store_dir.is_dir() {
        found.push(format!("the directory {}", store_dir.display()));
    }
    let tasks = data_dir.join("agent").join("process").join("tasks");
    let live = std::fs::read_dir(&tasks)
        .map_or(0, |d| d.flatten().filter(|e| not_exited(&e.path())).count());
    if live > 0 {
        found.push(format!("{live} unfinished task(s) in {}", tasks.display()));
    }
    found
}

/// A task dir whose shim state records no exit (an unreadable one counts as running).
fn not_exited(task_dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(task_dir.join("state.json")) else {
        return task_dir.is_dir();
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .map_or(true, |v| v.get("exited").is_none_or(|e| e.is_null()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_data_dir_passes() {
        let dir = tempfile::tempdir().unwrap();
        check_before_bootstrap(dir.path(), false).unwrap();
    }

    #[test]
    fn an_empty_store_file_is_refused_with_a_way_out() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        std::fs::write(store_file(dir.path()), b"").unwrap();
        let err = check_before_bootstrap(dir.path(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is empty (0 bytes)"), "{err}");
        assert!(err.contains("snapshot restore"), "{err}");
        check_before_bootstrap(dir.path(), true).unwrap();
    }

    #[test]
    fn a_missing_store_beside_task_dirs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tasks = dir.path().join("agent/process/tasks");
        std::fs::create_dir_all(tasks.join("running")).unwrap();
        std::fs::write(
            tasks.join("running/state.json"),
            r#"{"shim_pid":1,"pid":2}"#,
        )
        .unwrap();
        std::fs::create_dir_all(tasks.join("ended")).unwrap();
        std::fs::write(
            tasks.join("ended/state.json"),
            r#"{"shim_pid":1,"exited":{"code":0}}"#,
        )
        .unwrap();
        let err = check_before_bootstrap(dir.path(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is missing"), "{err}");
        assert!(err.contains("1 unfinished task(s)"), "{err}");
        std::fs::remove_dir_all(tasks.join("running")).unwrap();
        check_before_bootstrap(dir.path(), false).unwrap();
    }
}
