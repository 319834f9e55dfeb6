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

/// Host ports task ports are taken from, on nodes that are given no `--task-ports`: this range
/// is cut into [`TASK_PORT_BLOCK`]-port blocks and each node takes one block of its own (see
/// [`task_ports`]), so several nodes on one host (distinct data dirs) never share ports.
pub const TASK_PORTS_DEFAULT: std::ops::Range<u16> = 20000..32000;
/// The size of a node's default block of task ports.
pub const TASK_PORT_BLOCK: u16 = 500;
/// `DATA_DIR/task-ports`: the node's default block, remembered so it never moves under the
/// tasks it already runs (a changed host name, a changed derivation).
const TASK_PORTS_FILE: &str = "task-ports";

/// The node's task port range: `--task-ports` when given, else the block remembered in
/// `DATA_DIR/task-ports`, else a block of [`TASK_PORTS_DEFAULT`] claimed for this data dir on
/// this host (then remembered). See [`claim_block`].
pub fn task_ports(
    given: Option<std::ops::Range<u16>>,
    dir: &Path,
    node_name: &str,
) -> anyhow::Result<std::ops::Range<u16>> {
    task_ports_with_claims(given, dir, node_name, &port_claims_dir())
}

/// Where the nodes of one host record which default block each data dir holds: tmpfs, so a
/// reboot forgets the claims and each node re-claims its remembered block as it starts.
fn port_claims_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/run/flotilla/task-port-blocks")
    } else {
        std::env::temp_dir().join("flotilla-task-port-blocks")
    }
}

fn task_ports_with_claims(
    given: Option<std::ops::Range<u16>>,
    dir: &Path,
    node_name: &str,
    claims: &Path,
) -> anyhow::Result<std::ops::Range<u16>> {
    if let Some(range) = given {
        return Ok(range);
    }
    let path = dir.join(TASK_PORTS_FILE);
    let text = load_or_create(&path, || {
        let r = claim_block(dir, node_name, claims);
        format!("{}-{}", r.start, r.end)
    })?;
    let range = parse_port_range(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (fix or delete the file, or pass --task-ports)",
            path.display()
        )
    })?;
    // A remembered block is this node's: say so again (the claims live on tmpfs).
    if let Err(e) = std::fs::create_dir_all(claims)
        .and_then(|()| std::fs::write(claims.join(range.start.to_string()), owner_id(dir)))
    {
        tracing::debug!(error = %e, "cannot record the task port block claim");
    }
    Ok(range)
}

/// Picks a free default block for the data dir `dir`: the one `node_name` hashes to, or the next
/// one no other live data dir on this host holds. A claim is a file named after the block's
/// first port, holding the claiming data dir, created with `O_EXCL` so two nodes starting at
/// once cannot take the same block. A claim is stale (taken over) when its data dir is gone or
/// remembers another block. Without a writable claims dir, or with every block held, the hashed
/// block is used and the allocator's bind test is the only guard (logged).
fn claim_block(dir: &Path, node_name: &str, claims: &Path) -> std::ops::Range<u16> {
    let hashed = default_task_ports(node_name);
    if let Err(e) = std::fs::create_dir_all(claims) {
        tracing::warn!(dir = %claims.display(), error = %e, "cannot record task port blocks; using the block the node name hashes to");
        return hashed;
    }
    let me = owner_id(dir);
    let blocks = (TASK_PORTS_DEFAULT.end - TASK_PORTS_DEFAULT.start) / TASK_PORT_BLOCK;
    let first = (hashed.start - TASK_PORTS_DEFAULT.start) / TASK_PORT_BLOCK;
    for i in 0..blocks {
        let start = TASK_PORTS_DEFAULT.start + ((first + i) % blocks) * TASK_PORT_BLOCK;
        let range = start..start + TASK_PORT_BLOCK;
        let claim = claims.join(start.to_string());
        let taken = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&claim)
        {
            Ok(mut f) => std::io::Write::write_all(&mut f, me.as_bytes()).is_ok(),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_to_string(&claim).unwrap_or_default();
                (owner == me || !claim_is_live(Path::new(&owner), &range))
                    && std::fs::write(&claim, &me).is_ok()
            }
            Err(_) => false,
        };
        if taken {
            return range;
        }
    }
    tracing::warn!("every default task port block is held by another node on this host; sharing the one the node name hashes to (pass --task-ports)");
    hashed
}

/// The claiming data dir, as one string (canonical, so two spellings of one dir agree).
fn owner_id(dir: &Path) -> String {
    std::fs::canonicalize(dir)
        .unwrap_or_else(|_| dir.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// Another node's claim holds while its data dir exists and does not remember another block
/// (a data dir without the file yet is a node between its claim and writing the file).
fn claim_is_live(owner: &Path, range: &std::ops::Range<u16>) -> bool {
    if owner.as_os_str().is_empty() || !owner.is_dir() {
        return false;
    }
    match std::fs::read_to_string(owner.join(TASK_PORTS_FILE)) {
        Ok(text) => parse_port_range(text.trim()).is_ok_and(|r| r == *range),
        Err(_) => true,
    }
}

/// The block of [`TASK_PORTS_DEFAULT`] that `node_name` hashes to (FNV-1a, stable across
/// builds and platforms): where a node looks first for a free block.
pub fn default_task_ports(node_name: &str) -> std::ops::Range<u16> {
    let hash = node_name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let blocks = (TASK_PORTS_DEFAULT.end - TASK_PORTS_DEFAULT.start) / TASK_PORT_BLOCK;
    // The remainder is below `blocks`, a u16.
    let block = u16::try_from(hash % u64::from(blocks)).unwrap_or(0);
    let start = TASK_PORTS_DEFAULT.start + block * TASK_PORT_BLOCK;
    start..start + TASK_PORT_BLOCK
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

/// Creates `dir` (private: see [`crate::private_files`]) and locks it for this process: one
/// flotilla per data dir, or two would fight over the store and the tasks. The lock lasts as
/// long as the returned value.
pub fn lock(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<File>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--data-dir {}: cannot create", dir.display()))?;
    crate::private_files::make_private(dir)?;
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

/// The manager's API token (DATA_DIR/api-token, 0600), created the first time. A token
/// written by an older version is kept as it is.
pub fn api_token(data_dir: &Path) -> anyhow::Result<String> {
    load_or_create(&data_dir.join("api-token"), || {
        format!("{:032x}", rand::random::<u128>())
    })
}

/// Reads a small identity file, creating it with `make()` the first time.
pub fn load_or_create(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) | Err(_) => {
            let v = make();
            crate::private_files::write_private(path, &format!("{v}\n"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Default blocks are inside the default range, remembered in the data dir, and
    /// `--task-ports` wins.
    #[test]
    fn default_task_ports_stay_in_range_and_stick() {
        let claims = tempfile::tempdir().unwrap();
        let ports = |dir: &Path, name: &str| task_ports_with_claims(None, dir, name, claims.path());
        for n in ["n1", "n2", "node-1", "worker-2"] {
            let r = default_task_ports(n);
            assert!(TASK_PORTS_DEFAULT.start <= r.start && r.end <= TASK_PORTS_DEFAULT.end);
            assert_eq!(r.end - r.start, TASK_PORT_BLOCK);
        }
        let dir = tempfile::tempdir().unwrap();
        let first = ports(dir.path(), "n2").unwrap();
        assert_eq!(first, default_task_ports("n2"));
        assert_eq!(
            ports(dir.path(), "renamed").unwrap(),
            first,
            "remembered in the data dir"
        );
        assert_eq!(
            task_ports_with_claims(Some(1000..2000), dir.path(), "n2", claims.path()).unwrap(),
            1000..2000
        );
        std::fs::write(dir.path().join(TASK_PORTS_FILE), "nonsense\n").unwrap();
        let err = ports(dir.path(), "n2").unwrap_err().to_string();
        assert!(
            err.contains("task-ports") && err.contains("--task-ports"),
            "{err}"
        );
    }

    /// #21: two nodes on one host whose names hash to the same block still get distinct
    /// blocks; a claim whose data dir is gone is taken over.
    #[test]
    fn nodes_whose_names_meet_in_one_block_get_distinct_blocks() {
        let a = "node-0".to_string();
        let b = (1..10_000)
            .map(|i| format!("node-{i}"))
            .find(|n| default_task_ports(n) == default_task_ports(&a))
            .expect("some name shares node-0's block");
        let claims = tempfile::tempdir().unwrap();
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ra = task_ports_with_claims(None, dir_a.path(), &a, claims.path()).unwrap();
        let rb = task_ports_with_claims(None, dir_b.path(), &b, claims.path()).unwrap();
        assert_eq!(ra, default_task_ports(&a));
        assert_ne!(ra, rb, "{a} and {b} must not share task ports");
        // dir_a is removed: its block is free for the next new node.
        drop(dir_a);
        let dir_c = tempfile::tempdir().unwrap();
        let rc = task_ports_with_claims(None, dir_c.path(), &a, claims.path()).unwrap();
        assert_eq!(rc, ra, "a stale claim is taken over");
        // dir_b restarts: it keeps its block.
        assert_eq!(
            task_ports_with_claims(None, dir_b.path(), &b, claims.path()).unwrap(),
            rb
        );
    }
}
