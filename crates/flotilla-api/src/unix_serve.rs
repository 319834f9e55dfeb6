//! Serving the API on a Unix socket, the local administrator's way in (like Docker's
//! `/run/docker.sock`): the socket is owned by root, mode 0660, group `flotilla` when that
//! group exists, so file permissions decide who may use it and every request on it is trusted
//! as an administrator's ([`crate::auth::LocalSocket`]).

use crate::auth::LocalSocket;
use crate::{router, AppState};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio::net::UnixListener;

/// The group whose members may use the socket, if it exists (like Docker's `docker` group).
pub const SOCKET_GROUP: &str = "flotilla";
/// Owner and group may connect; nobody else.
const SOCKET_MODE: u32 = 0o660;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{}: another manager is serving on this socket", .0.display())]
    InUse(PathBuf),
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Binds the API socket at `path`: creates its directory, replaces a stale socket left by a
/// manager that died (but refuses one that still answers), and restricts it to owner and
/// group (`flotilla` if it exists).
pub fn bind_unix(path: &Path) -> Result<UnixListener, SocketError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir, "creating the socket's directory"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io(path, "removing a stale socket"))?;
        }
        Ok(_) => {
            return Err(SocketError::Io {
                path: path.to_path_buf(),
                what: "exists and is not a socket",
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            })
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(io(path, "binding the API socket"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(io(path, "setting the socket's mode"))?;
    if let Some(gid) = group_id(SOCKET_GROUP) {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(io(path, "giving the socket to the flotilla group"))?;
    }
    Ok(listener)
}

/// The id of group `name` from `/etc/group`, if it exists.
fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name)
            .then(|| fields.nth(1)?.parse().ok())
            .flatten()
    })
}

/// Serves the API on `listener` (from [`bind_unix`] at `path`) until `shutdown` resolves, then
/// removes the socket file.
pub async fn serve_unix(
    listener: UnixListener,
    path: PathBuf,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state).layer(axum::Extension(LocalSocket));
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::debug!(path = %path.display(), error = %e, "removing the API socket");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_come_from_etc_group() {
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-flotilla-test"), None);
    }

    #[tokio::test]
    async fn the_socket_is_0660_and_a_live_one_is_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/flotilla.sock");
        let listener = bind_unix(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        assert!(matches!(bind_unix(&path), Err(SocketError::InUse(_))));
        drop(listener);
        // The socket file of a dead manager is stale: a new one takes its place.
        bind_unix(&path).expect("rebinding over a stale socket");
    }
}
