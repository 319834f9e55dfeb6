//! Authentication of the agent server when it runs without mTLS (`flotilla up`'s in-process
//! agent, standalone `flotilla agent`): a random per-node secret, kept `0600` in the agent's
//! state dir and sent to the manager when the node registers. Every request must carry it as
//! `Authorization: Bearer <secret>`, so a workload on the same host that connects to the
//! loopback server gets 401 and cannot read other tasks' logs or change its own limits.

use axum::http::{header, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File in the agent's state dir holding the secret.
pub const SECRET_FILE: &str = "agent-secret";

#[derive(Debug, thiserror::Error)]
#[error("agent secret {path}: {source}")]
pub struct SecretError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The node's agent secret: read back from `<state_dir>/agent-secret`, or created there (mode
/// 0600, written whole and renamed into place) on first start.
pub fn load_or_create_secret(state_dir: &Path) -> Result<String, SecretError> {
    let path = state_dir.join(SECRET_FILE);
    let io = |source| SecretError {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => {
            // Tighten a file an operator (or an older version) left readable.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
            return Ok(text.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    std::fs::create_dir_all(state_dir).map_err(io)?;
    let secret = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let tmp = state_dir.join(format!("{SECRET_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(format!("{secret}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(secret)
}

/// Compares in time independent of where the inputs differ.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Middleware: answers 401 unless the request carries `Authorization: Bearer <secret>`.
pub async fn require_secret(
    secret: Arc<str>,
    req: Request<axum::body::Body>,
    next: Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if same_secret(given.trim().as_bytes(), secret.as_bytes()) => {
            next.run(req).await
        }
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "the agent server answers only its manager: a bearer secret is required\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_secret(dir.path()).unwrap();
        assert_eq!(first.len(), 64);
        let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_secret(dir.path()).unwrap(), first);
    }

    #[test]
    fn comparison() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
    }
}
