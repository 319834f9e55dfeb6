//! Join tokens, Swarm style: `FLTKN-1-<sha256 of the CA root, hex>-<secret>`.
//!
//! The digest lets a joining node pin the CA before it trusts anything the manager says; the
//! secret says which role the node may join as. Worker and manager secrets are separate and
//! rotate independently; a rotated secret is refused at once.

use crate::ca::Role;
use crate::PkiError;
use std::fmt;
use std::str::FromStr;

pub const TOKEN_PREFIX: &str = "FLTKN";
const TOKEN_VERSION: &str = "1";
const DIGEST_LEN: usize = 64;
const SECRET_LEN: usize = 32;

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the CA root certificate (DER), lower-case hex.
    pub ca_digest: String,
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens end up in logs through `{:?}`; the secret must not.
        f.debug_struct("JoinToken")
            .field("ca_digest", &self.ca_digest)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}-{TOKEN_VERSION}-{}-{}",
            self.ca_digest, self.secret
        )
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FromStr for JoinToken {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            PkiError::BadToken(format!(
                "{why}; expected {TOKEN_PREFIX}-{TOKEN_VERSION}-<64 hex digits>-<32 hex digits> \
                 (print one with `flotilla token show worker|manager` on a manager)"
            ))
        };
        let mut parts = s.trim().split('-');
        if parts.next() != Some(TOKEN_PREFIX) {
            return Err(bad(&format!("does not start with {TOKEN_PREFIX}-")));
        }
        match parts.next() {
            Some(TOKEN_VERSION) => {}
            Some(v) => return Err(bad(&format!("unsupported token version {v:?}"))),
            None => return Err(bad("no version")),
        }
        let ca_digest = parts.next().unwrap_or_default();
        let secret = parts.next().unwrap_or_default();
        if parts.next().is_some() {
            return Err(bad("too many parts"));
        }
        if ca_digest.len() != DIGEST_LEN || !is_lower_hex(ca_digest) {
            return Err(bad("the CA digest is not 64 lower-case hex digits"));
        }
        if secret.len() != SECRET_LEN || !is_lower_hex(secret) {
            return Err(bad("the secret is not 32 lower-case hex digits"));
        }
        Ok(JoinToken {
            ca_digest: ca_digest.to_string(),
            secret: secret.to_string(),
        })
    }
}

fn new_secret() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The two current join secrets of a cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinSecrets {
    worker: String,
    manager: String,
}

impl fmt::Debug for JoinSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinSecrets(<redacted>)")
    }
}

impl JoinSecrets {
    pub fn generate() -> JoinSecrets {
        JoinSecrets {
            worker: new_secret(),
            manager: new_secret(),
        }
    }

    /// The token for `role`, pinned to the CA root with `ca_digest`.
    pub fn token(&self, role: Role, ca_digest: &str) -> JoinToken {
        JoinToken {
            ca_digest: ca_digest.to_string(),
            secret: match role {
                Role::Worker => self.worker.clone(),
                Role::Manager => self.manager.clone(),
            }
            .clone(),
        }
    }

    /// Replaces `role`'s secret: tokens printed before stop working.
    pub fn rotate(&mut self, role: Role) {
        match role {
            Role::Worker => self.worker = new_secret(),
            Role::Manager => self.manager = new_secret(),
        }
    }

    /// The role `token` grants, if its secret is current and it pins `ca_digest`.
    pub fn role_of(&self, token: &JoinToken, ca_digest: &str) -> Result<Role, PkiError> {
        if token.ca_digest != ca_digest {
            return Err(PkiError::BadToken(
                "the token was issued for a different cluster CA (wrong cluster, or the CA root \
                 was rotated since)"
                    .into(),
            ));
        }
        // Both comparisons always run so the timing does not tell which secret matched.
        let worker = constant_time_eq(token.secret.as_bytes(), self.worker.as_bytes());
        let manager = constant_time_eq(token.secret.as_bytes(), self.manager.as_bytes());
        match (manager, worker) {
            (true, _) => Ok(Role::Manager),
            (false, true) => Ok(Role::Worker),
            (false, false) => Err(PkiError::BadToken(
                "the token's secret is not valid (wrong token, or it was rotated)".into(),
            )),
        }
    }

    /// `worker:SECRET\nmanager:SECRET\n`, for a file only managers can read.
    pub fn to_file_contents(&self) -> String {
        format!("worker:{}\nmanager:{}\n", self.worker, self.manager)
    }

    pub fn from_file_contents(s: &str) -> Result<JoinSecrets, PkiError> {
        let mut worker = None;
        let mut manager = None;
        for line in s.lines().filter(|l| !l.trim().is_empty()) {
            match line.trim().split_once(':') {
                Some(("worker", v)) if v.len() == SECRET_LEN && is_lower_hex(v) => {
                    worker = Some(v.to_string())
                }
                Some(("manager", v)) if v.len() == SECRET_LEN && is_lower_hex(v) => {
                    manager = Some(v.to_string())
                }
                _ => {
                    return Err(PkiError::BadToken(format!(
                        "join secrets file: unexpected line {line:?} (expected worker:HEX or \
                         manager:HEX)"
                    )))
                }
            }
        }
        match (worker, manager) {
            (Some(worker), Some(manager)) => Ok(JoinSecrets { worker, manager }),
            _ => Err(PkiError::BadToken(
                "join secrets file: needs both a worker and a manager line".into(),
            )),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
