//! A node's data directory: where it is, the lock that keeps two processes from sharing it, and
//! the small files in it (identity, cluster certificates' folder, raft id, known managers).
//! Shared by `flotilla up`, `flotilla agent` and the cluster node daemon.

use anyhow::{anyhow, Context};
use std::fs::File;
use std::path::{Path, PathBuf};

pub fn parse_port_range(s: &str) -> Result<std::ops::Range<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected START-END, e.g. 20000-32000"))?;
    let start: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: start {a:?} is not a port number"))?;
    let end: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: end {b:?} is not a port number"))?;
    if start == 0 || start >= end {
        return Err(format!("{s:?}: need 0 < START < END"));
    }
    Ok(start..end)
}

pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/var/lib/flotilla")
    } else {
        std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".local/share/flotilla"))
            .unwrap_or_else(|| PathBuf::from("flotilla-data"))
    }
}

/// Creates `dir` and locks it for this process: one flotilla per data dir, or two would fight
/// over the store and the tasks. The lock lasts as long as the returned value.
pub fn lock(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<File>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--data-dir {}: cannot create", dir.display()))?;
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .context("opening the data-dir lock")?;
    nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, e)| {
            anyhow::anyhow!(
                "--data-dir {}: another flotilla is using it ({e})",
                dir.display()
            )
        },
    )
}

/// The node's name: `--node-name` if given (validated), else the one remembered in
/// `DATA_DIR/node-id`, else the host name.
pub fn node_name(given: Option<&str>, dir: &Path) -> anyhow::Result<String> {
    match given {
        Some(n) => {
            flotilla_types::validate_name(n).map_err(|r| anyhow::anyhow!("--node-name: {r}"))?;
            Ok(n.to_string())
        }
        None => load_or_create(&dir.join("node-id"), || {
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default();
            sanitize_node_name(&host)
        }),
    }
}

/// Reads a small identity file, creating it with `make()` the first time.
pub fn load_or_create(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) | Err(_) => {
            let v = make();
            std::fs::write(path, format!("{v}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(v)
        }
    }
}

fn sanitize_node_name(raw: &str) -> String {
    let s: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let s = s.trim_matches('-').to_string();
    if s.is_empty() {
        "node-1".into()
    } else {
        s
    }
}

/// A manager's raft id (absent on workers).
pub const RAFT_ID_FILE: &str = "raft-id";

pub fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

pub fn write_raft_id(data_dir: &Path, id: u64) -> anyhow::Result<()> {
    std::fs::write(data_dir.join(RAFT_ID_FILE), format!("{id}\n"))
        .with_context(|| format!("writing {}", data_dir.join(RAFT_ID_FILE).display()))
}

pub fn read_raft_id(data_dir: &Path) -> anyhow::Result<u64> {
    let path = data_dir.join(RAFT_ID_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (is this a manager's data dir?)", path.display()))?;
    text.trim()
        .parse()
        .map_err(|_| anyhow!("{}: {:?} is not a raft id", path.display(), text.trim()))
}

/// Removes a former manager's raft id and store. `keep_as`: rename the store to
/// `store.KEEP_AS-SECONDS` instead (returned), for a dissolved cluster's last state.
pub fn remove_raft_state(
    data_dir: &Path,
    keep_as: Option<&str>,
) -> anyhow::Result<Option<PathBuf>> {
    flotilla_pki::remove_file(&data_dir.join(RAFT_ID_FILE))?;
    let store = data_dir.join("store");
    if !store.exists() {
        return Ok(None);
    }
    match keep_as {
        Some(suffix) => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let kept = data_dir.join(format!("store.{suffix}-{secs}"));
            std::fs::rename(&store, &kept)
                .with_context(|| format!("moving {} aside", store.display()))?;
            Ok(Some(kept))
        }
        None => {
            std::fs::remove_dir_all(&store)
                .with_context(|| format!("removing {}", store.display()))?;
            Ok(None)
        }
    }
}

/// Deletes a node's credentials and manager list once it has left: the next `flotilla join`
/// on this data dir joins afresh with a token (the old certificate is revoked anyway).
pub fn forget_cluster(data_dir: &Path) -> anyhow::Result<()> {
    let dir = pki_dir(data_dir);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    flotilla_pki::remove_file(&data_dir.join(MANAGERS_FILE))?;
    Ok(())
}

/// A worker's list of manager addresses, one per line, rewritten as the cluster changes.
pub const MANAGERS_FILE: &str = "managers";

pub fn read_known_managers(data_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(data_dir.join(MANAGERS_FILE))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Writes the managers file whole and renames it into place: a crash never leaves half a list.
pub fn save_known_managers(data_dir: &Path, addrs: &[String]) -> anyhow::Result<()> {
    let path = data_dir.join(MANAGERS_FILE);
    let tmp = data_dir.join(format!("{MANAGERS_FILE}.tmp"));
    std::fs::write(&tmp, addrs.join("\n") + "\n")
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}
