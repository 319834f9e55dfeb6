//! Who a process task runs as when its spec names no `user:`, and the private parts of its task
//! dir.
//!
//! An agent running as root runs such tasks as the unprivileged `flotilla-task` system user,
//! created on first start (falling back to `nobody` where users cannot be added); running as root
//! takes an explicit `user: root` (or uid 0). An agent that is not root cannot switch users, so
//! its tasks run as the agent's own user.

use crate::shim::UserIds;
use nix::unistd::{Uid, User};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// The system user default process tasks run as.
pub const TASK_USER: &str = "flotilla-task";
/// Used when [`TASK_USER`] does not exist and cannot be created.
const FALLBACK_USER: &str = "nobody";
/// Name of the task's own working dir inside its task dir (the default `working_dir`).
pub const WORK_DIR: &str = "work";

/// The identity of tasks without `user:`; `None` runs them as the agent's own user.
pub fn default_task_user() -> Option<UserIds> {
    if !Uid::effective().is_root() {
        return None;
    }
    if let Some(ids) = lookup(TASK_USER) {
        return Some(ids);
    }
    create_system_user();
    let ids = lookup(TASK_USER).or_else(|| lookup(FALLBACK_USER));
    match ids {
        Some(ids) => tracing::info!(uid = ids.uid, gid = ids.gid, "default process task user"),
        None => tracing::error!(
            "neither {TASK_USER} nor {FALLBACK_USER} exists; process tasks without `user:` \
             are refused"
        ),
    }
    ids
}

fn lookup(name: &str) -> Option<UserIds> {
    User::from_name(name).ok().flatten().map(|u| UserIds {
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    })
}

/// `useradd --system` for [`TASK_USER`]: no home, no login shell. Failure (no `useradd`, a
/// read-only /etc, another agent adding it at the same moment) is logged; the caller looks the
/// user up again either way.
fn create_system_user() {
    let result = std::process::Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "flotilla process tasks",
            TASK_USER,
        ])
        .stdin(std::process::Stdio::null())
        .output();
    match result {
        Ok(out) if out.status.success() => tracing::info!("created the system user {TASK_USER}"),
        Ok(out) => tracing::warn!(
            status = %out.status,
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "cannot create the system user {TASK_USER}"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot run useradd to create {TASK_USER}"),
    }
}

/// Creates a task dir only root reads (`0711`: the shim and `exec` can still enter a working
/// dir inside it as the task's user). Fails if it exists.
pub fn create_task_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(0o711).create(dir)?;
    // The umask may have taken bits away; set exactly.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
}

/// Creates `<task dir>/work`, the task's default working dir, owned by the task's user and
/// private to it.
pub fn create_work_dir(dir: &Path, user: Option<UserIds>) -> std::io::Result<()> {
    let work = dir.join(WORK_DIR);
    std::fs::DirBuilder::new().mode(0o700).create(&work)?;
    if let Some(u) = user {
        std::os::unix::fs::chown(&work, Some(u.uid), Some(u.gid))?;
    }
    Ok(())
}
