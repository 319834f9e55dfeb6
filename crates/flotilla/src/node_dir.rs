//! A node's data directory: where it is, the lock that keeps two processes from sharing it, and
//! the small identity files in it. Shared by `flotilla up` and `flotilla agent`.

use anyhow::Context;
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
