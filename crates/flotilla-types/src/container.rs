//! Container-only settings of a service (used by the docker driver): `user` lives on
//! [`ServiceSpec`](crate::ServiceSpec) because processes honour it too.

use crate::spec::FieldError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Compose keys that only make sense for containers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// `ulimits`: resource name (`nofile`, `nproc`, …) → soft and hard limit.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ulimits: BTreeMap<String, Ulimit>,
    /// `cap_add`: capability names, with or without the `CAP_` prefix, or `ALL`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// `read_only`: mount the root filesystem read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// `tmpfs`: `/path` or `/path:options` (e.g. `/run:size=64m,mode=1777`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tmpfs: Vec<String>,
    /// `init`: run an init process as PID 1 that forwards signals and reaps zombies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<bool>,
    /// `volumes`: named volumes and bind mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// `deploy.resources.reservations.devices` entries asking for GPUs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuRequest>,
    /// `x-flotilla.runtime`: the OCI runtime the engine should use (e.g. `runsc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// `pull_policy`.
    #[serde(default, skip_serializing_if = "PullPolicy::is_default")]
    pub pull_policy: PullPolicy,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One `ulimits` entry; a single number in Compose sets both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ulimit {
    pub soft: i64,
    pub hard: i64,
}

/// What a `volumes` entry mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    /// A named volume the engine manages (created on first use), or an anonymous one.
    Volume,
    /// A host path.
    Bind,
}

/// One `volumes` entry, from the short (`src:dst:ro`) or long syntax.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    pub kind: VolumeKind,
    /// Volume name or absolute host path; `None` for an anonymous volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Absolute path inside the container.
    pub target: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

/// How many GPUs a [`GpuRequest`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuCount {
    All,
    #[serde(untagged)]
    Count(u64),
}

/// A `devices` reservation with `capabilities: [gpu]`, passed to the engine as a DeviceRequest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<GpuCount>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_ids: Vec<String>,
    /// Always contains `gpu`; other capabilities (`compute`, `utility`) are passed along.
    pub capabilities: Vec<String>,
}

/// `pull_policy`: when the agent may pull an image from a registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Only ever use images already on the node.
    Never,
    /// Pull only when the node lacks the image.
    #[default]
    Missing,
    /// Pull before every start (falling back to a local copy if the registry is unreachable).
    Always,
}

impl PullPolicy {
    pub fn is_default(&self) -> bool {
        *self == PullPolicy::Missing
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "never" => Some(PullPolicy::Never),
            // `if_not_present` is the Compose spec's older spelling of `missing`.
            "missing" | "if_not_present" => Some(PullPolicy::Missing),
            "always" => Some(PullPolicy::Always),
            _ => None,
        }
    }
}

/// Linux capabilities the engine knows (without the `CAP_` prefix).
pub const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYSLOG",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "WAKE_ALARM",
];

/// Resource names `ulimits` accepts (those of `setrlimit`).
pub const ULIMIT_NAMES: &[&str] = &[
    "as",
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

/// Whether `name` is a capability the engine accepts: `ALL`, or a known name with or without
/// `CAP_`, in any case.
pub fn is_known_capability(name: &str) -> bool {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    bare == "ALL" || CAPABILITIES.contains(&bare)
}

impl ContainerSpec {
    pub fn is_default(&self) -> bool {
        *self == ContainerSpec::default()
    }

    /// Checks the container settings of service `service`; field paths are the Compose ones.
    pub fn validate(&self, service: &str) -> Vec<FieldError> {
        let at = |field: String| format!("services.{service}.{field}");
        let mut errs = Vec::new();
        for (key, list) in [("cap_add", &self.cap_add), ("cap_drop", &self.cap_drop)] {
            for (i, cap) in list.iter().enumerate() {
                if !is_known_capability(cap) {
                    errs.push(FieldError::new(
                        at(format!("{key}[{i}]")),
                        format!(
                            "{cap:?} is not a Linux capability (e.g. NET_ADMIN, SYS_PTRACE, ALL)"
                        ),
                    ));
                }
            }
        }
        for (name, limit) in &self.ulimits {
            let field = at(format!("ulimits.{name}"));
            if !ULIMIT_NAMES.contains(&name.as_str()) {
                errs.push(FieldError::new(
                    field.clone(),
                    format!(
                        "{name:?} is not a ulimit (expected one of {})",
                        ULIMIT_NAMES.join(", ")
                    ),
                ));
            }
            if limit.soft < -1 || limit.hard < -1 {
                errs.push(FieldError::new(
                    field.clone(),
                    "limits must be -1 (unlimited) or a non-negative number",
                ));
            }
            if limit.hard != -1 && (limit.soft == -1 || limit.soft > limit.hard) {
                errs.push(FieldError::new(
                    field,
                    format!(
                        "soft limit {} is larger than hard limit {}",
                        limit.soft, limit.hard
                    ),
                ));
            }
        }
        for (i, t) in self.tmpfs.iter().enumerate() {
            if let Err(reason) = check_tmpfs(t) {
                errs.push(FieldError::new(at(format!("tmpfs[{i}]")), reason));
            }
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if !v.target.starts_with('/') {
                errs.push(FieldError::new(
                    at(format!("volumes[{i}].target")),
                    format!(
                        "{:?} must be an absolute path inside the container",
                        v.target
                    ),
                ));
            }
            match (v.kind, v.source.as_deref()) {
                (VolumeKind::Bind, None) => errs.push(FieldError::new(
                    at(format!("volumes[{i}].source")),
                    "a bind mount needs a host path",
                )),
                (VolumeKind::Bind, Some(src)) if !src.starts_with('/') => {
                    errs.push(FieldError::new(
                        at(format!("volumes[{i}].source")),
                        format!("{src:?} must be an absolute host path"),
                    ))
                }
                (VolumeKind::Volume, Some(name)) if !valid_volume_name(name) => {
                    errs.push(FieldError::new(
                        at(format!("volumes[{i}].source")),
                        format!(
                            "{name:?} is not a volume name ([A-Za-z0-9][A-Za-z0-9_.-]*); host paths start with '/', './' or '~'"
                        ),
                    ))
                }
                _ => {}
            }
        }
        for (i, g) in self.gpus.iter().enumerate() {
            let field = at(format!("deploy.resources.reservations.devices[{i}]"));
            if g.count.is_some() && !g.device_ids.is_empty() {
                errs.push(FieldError::new(
                    field.clone(),
                    "count and device_ids are mutually exclusive",
                ));
            }
            if g.count == Some(GpuCount::Count(0)) {
                errs.push(FieldError::new(
                    format!("{field}.count"),
                    "must be at least 1 (or all)",
                ));
            }
            if !g.capabilities.iter().any(|c| c == "gpu") {
                errs.push(FieldError::new(
                    format!("{field}.capabilities"),
                    "only GPU devices (capabilities: [gpu]) are supported",
                ));
            }
        }
        if let Some(rt) = &self.runtime {
            let ok = !rt.is_empty()
                && rt
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                errs.push(FieldError::new(
                    at("x-flotilla.runtime".into()),
                    format!("{rt:?} is not a runtime name (e.g. runc, runsc)"),
                ));
            }
        }
        errs
    }
}

/// The engine's rule for volume names.
fn valid_volume_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// One `tmpfs` entry: an absolute path, and a size a node can have.
fn check_tmpfs(entry: &str) -> Result<(), String> {
    let (path, options) = entry.split_once(':').unwrap_or((entry, ""));
    if !path.starts_with('/') {
        return Err(format!(
            "{path:?} must be an absolute path inside the container"
        ));
    }
    check_tmpfs_size(options)
}

/// A tmpfs `size=` option: a byte size (`64m`) no larger than any node's memory, or a
/// percentage of the node's memory (`50%`), as the kernel takes it.
fn check_tmpfs_size(options: &str) -> Result<(), String> {
    let Some(size) = options
        .split(',')
        .find_map(|o| o.trim().strip_prefix("size="))
    else {
        return Ok(());
    };
    if let Some(percent) = size.strip_suffix('%') {
        return match percent.parse::<u8>() {
            Ok(1..=100) => Ok(()),
            _ => Err(format!("size={size}: a percentage must be 1% to 100%")),
        };
    }
    match crate::units::parse_bytes(size) {
        Ok(0) => Err(format!("size={size}: must be greater than 0")),
        Ok(bytes) if bytes > crate::spec_bounds::MAX_MEMORY_BYTES => Err(format!(
            "size={size}: more than the limit of {} bytes (1 PiB)",
            crate::spec_bounds::MAX_MEMORY_BYTES
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("size={size}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_checked_by_index() {
        let spec = ContainerSpec {
            cap_add: vec![
                "NET_ADMIN".into(),
                "cap_sys_ptrace".into(),
                "NET_MAGIC".into(),
            ],
            cap_drop: vec!["ALL".into()],
            ..ContainerSpec::default()
        };
        let errs = spec.validate("web");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "services.web.cap_add[2]");
        assert!(errs[0].reason.contains("NET_MAGIC"));
    }

    #[test]
    fn ulimits_and_mounts_checked() {
        let mut spec = ContainerSpec::default();
        spec.ulimits
            .insert("nofile".into(), Ulimit { soft: 10, hard: 5 });
        spec.ulimits
            .insert("files".into(), Ulimit { soft: 1, hard: 1 });
        spec.volumes.push(VolumeMount {
            kind: VolumeKind::Bind,
            source: Some("relative".into()),
            target: "data".into(),
            read_only: false,
        });
        spec.tmpfs.push("run".into());
        let fields: Vec<String> = spec.validate("db").into_iter().map(|e| e.field).collect();
        assert!(
            fields.contains(&"services.db.ulimits.nofile".to_string()),
            "{fields:?}"
        );
        assert!(
            fields.contains(&"services.db.ulimits.files".to_string()),
            "{fields:?}"
        );
        assert!(
            fields.contains(&"services.db.volumes[0].source".to_string()),
            "{fields:?}"
        );
        assert!(
            fields.contains(&"services.db.volumes[0].target".to_string()),
            "{fields:?}"
        );
        assert!(
            fields.contains(&"services.db.tmpfs[0]".to_string()),
            "{fields:?}"
        );
    }

    #[test]
    fn gpu_count_serde() {
        let g: GpuCount = serde_json::from_str("\"all\"").unwrap();
        assert_eq!(g, GpuCount::All);
        let g: GpuCount = serde_json::from_str("2").unwrap();
        assert_eq!(g, GpuCount::Count(2));
    }
}
