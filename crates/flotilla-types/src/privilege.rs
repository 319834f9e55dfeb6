//! The parts of a service that ask for privilege on the node: the one list the role checks of
//! API tokens consult (a deploy token without the privileged role may ask for none of these).
//!
//! Compose keys that would grant more (`privileged`, `network_mode: host`, `pid: host`, `ipc`,
//! `devices`) are refused by the Compose loader, so no spec carries them.

use crate::container::VolumeKind;
use crate::{DriverKind, ServiceSpec};
use serde::{Deserialize, Serialize};

/// One privileged request of a service: the field path (as validation errors name it) and what
/// it grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivilegedRequest {
    pub field: String,
    pub grants: String,
}

/// True if a `user:` value names uid 0 (`root`, `0`, `root:GROUP`, `0:GID`).
pub fn is_root_user(user: &str) -> bool {
    let name = user.split_once(':').map_or(user, |(u, _)| u);
    name == "root" || name.parse::<u32>() == Ok(0)
}

impl ServiceSpec {
    /// Every field of this service that asks for privilege on its node, in field order; empty
    /// for a service that runs unprivileged.
    pub fn privileged_requests(&self) -> Vec<PrivilegedRequest> {
        let field = |path: String| format!("services.{}.{path}", self.name);
        let mut out = Vec::new();
        let mut push = |path: String, grants: String| {
            out.push(PrivilegedRequest {
                field: field(path),
                grants,
            })
        };
        if let Some(user) = self.user.as_deref().filter(|u| is_root_user(u)) {
            let grants = match self.driver {
                DriverKind::Process => "runs as root on the node",
                _ => "runs as root in the container",
            };
            push("user".into(), format!("{user:?} {grants}"));
        }
        let c = &self.container;
        for (i, cap) in c.cap_add.iter().enumerate() {
            push(format!("cap_add[{i}]"), format!("adds capability {cap}"));
        }
        for (i, v) in c.volumes.iter().enumerate() {
            if v.kind == VolumeKind::Bind {
                let src = v.source.as_deref().unwrap_or("?");
                let mode = if v.read_only {
                    "read-only"
                } else {
                    "read-write"
                };
                push(
                    format!("volumes[{i}]"),
                    format!("mounts host path {src} {mode}"),
                );
            }
        }
        for (i, _) in c.gpus.iter().enumerate() {
            push(
                format!("deploy.resources.reservations.devices[{i}]"),
                "uses host GPU devices".into(),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::VolumeMount;

    #[test]
    fn root_spellings() {
        for u in ["root", "0", "root:root", "0:0", "0:wheel"] {
            assert!(is_root_user(u), "{u}");
        }
        for u in ["nobody", "1000", "rooty", "1000:0", ""] {
            assert!(!is_root_user(u), "{u}");
        }
    }

    #[test]
    fn lists_each_privileged_field() {
        let mut spec = ServiceSpec::process("web", vec!["true".into()]);
        assert!(spec.privileged_requests().is_empty());
        spec.user = Some("nobody".into());
        assert!(spec.privileged_requests().is_empty());
        spec.user = Some("0".into());
        spec.container.cap_add = vec!["NET_ADMIN".into()];
        spec.container.volumes = vec![
            VolumeMount {
                kind: VolumeKind::Volume,
                source: Some("data".into()),
                target: "/data".into(),
                read_only: false,
            },
            VolumeMount {
                kind: VolumeKind::Bind,
                source: Some("/etc".into()),
                target: "/host-etc".into(),
                read_only: true,
            },
        ];
        let fields: Vec<String> = spec
            .privileged_requests()
            .into_iter()
            .map(|r| r.field)
            .collect();
        assert_eq!(
            fields,
            [
                "services.web.user",
                "services.web.cap_add[0]",
                "services.web.volumes[1]"
            ]
        );
    }
}
