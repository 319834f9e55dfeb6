//! Keeping a node's secrets private on disk: the data dir is 0700, and every key, token and
//! store file in it (the store holds the cluster CA's key) is 0600. Applied at every start, so
//! a data dir written by an older version (0755 directories, a 0644 `api-token`) is tightened
//! in place and keeps working.

use anyhow::Context;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Directories of secrets under the data dir, made private with everything in them. Task
/// state (`agent/`) is left alone: the agent decides who its tasks' files belong to.
const SECRET_DIRS: &[&str] = &["store", "pki"];
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Makes `data_dir` 0700, its own files 0600, and its secret directories (store, certificates
/// and keys) 0700 with 0600 files, recursively.
pub fn make_private(data_dir: &Path) -> anyhow::Result<()> {
    set_mode(data_dir, DIR_MODE)?;
    for (path, kind) in entries(data_dir)? {
        if kind.is_file() {
            set_mode(&path, FILE_MODE)?;
        }
    }
    for dir in SECRET_DIRS {
        let dir = data_dir.join(dir);
        if dir.is_dir() {
            make_tree_private(&dir)?;
        }
    }
    Ok(())
}

fn make_tree_private(dir: &Path) -> anyhow::Result<()> {
    set_mode(dir, DIR_MODE)?;
    for (path, kind) in entries(dir)? {
        if kind.is_dir() {
            make_tree_private(&path)?;
        } else if kind.is_file() {
            set_mode(&path, FILE_MODE)?;
        }
    }
    Ok(())
}

/// What `dir` holds: each entry's path and type (symlinks are not followed).
fn entries(dir: &Path) -> anyhow::Result<Vec<(std::path::PathBuf, std::fs::FileType)>> {
    std::fs::read_dir(dir)
        .and_then(|entries| {
            entries
                .map(|e| e.and_then(|e| Ok((e.path(), e.file_type()?))))
                .collect::<Result<Vec<_>, _>>()
        })
        .with_context(|| format!("reading {}", dir.display()))
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("making {} private (mode {mode:o})", path.display()))
}

/// Writes a secret file, created 0600 (and made 0600 if it existed).
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, FILE_MODE)?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn an_old_world_readable_data_dir_is_tightened() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(data.join("store")).expect("mkdir");
        std::fs::create_dir_all(data.join("agent")).expect("mkdir");
        for (file, m) in [
            ("api-token", 0o644),
            ("store/store.redb", 0o644),
            ("agent/task.log", 0o644),
        ] {
            std::fs::write(data.join(file), "x").expect("write");
            set_mode(&data.join(file), m).expect("chmod");
        }
        set_mode(&data, 0o755).expect("chmod");
        set_mode(&data.join("store"), 0o755).expect("chmod");
        make_private(&data).expect("make private");
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("store")), 0o700);
        assert_eq!(mode(&data.join("api-token")), 0o600);
        assert_eq!(mode(&data.join("store/store.redb")), 0o600);
        // The token itself is unchanged: an upgraded node keeps its api-token.
        assert_eq!(
            std::fs::read_to_string(data.join("api-token")).expect("read"),
            "x"
        );
        // Task files are the agent's business.
        assert_eq!(mode(&data.join("agent/task.log")), 0o644);
    }

    #[test]
    fn secret_files_are_written_0600() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("api-token");
        std::fs::write(&path, "old").expect("write");
        set_mode(&path, 0o644).expect("chmod");
        write_private(&path, "new\n").expect("write");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new\n");
    }
}
