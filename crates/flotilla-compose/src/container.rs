//! Readers for the container-only service keys whose syntax needs more than a plain string,
//! list or boolean: `ulimits`, `tmpfs`, `volumes`, `pull_policy` and GPU `devices` reservations.
//! Their values are checked by `ContainerSpec::validate`.

use crate::document::Node;
use crate::report::Report;
use flotilla_types::container::{
    GpuCount, GpuRequest, PullPolicy, Ulimit, VolumeKind, VolumeMount,
};
use std::collections::BTreeMap;
use std::path::Path;

/// `ulimits`: `{nofile: 1024}` or `{nofile: {soft: 1024, hard: 2048}}`.
pub(crate) fn ulimits(r: &mut Report, field: &str, node: &Node) -> BTreeMap<String, Ulimit> {
    let mut out = BTreeMap::new();
    let Some(entries) = r.mapping(field, node) else {
        return out;
    };
    for (name, value) in entries {
        let at = format!("{field}.{name}");
        let limit = match value {
            Node::Int(_) => limit_value(r, &at, value).map(|v| Ulimit { soft: v, hard: v }),
            Node::Map(keys) => {
                let (mut soft, mut hard) = (None, None);
                for (key, v) in keys {
                    let key_at = format!("{at}.{key}");
                    match key.as_str() {
                        "soft" => soft = limit_value(r, &key_at, v),
                        "hard" => hard = limit_value(r, &key_at, v),
                        _ => r.error(&key_at, "unknown key (expected soft and hard)"),
                    }
                }
                match (soft, hard) {
                    (Some(soft), Some(hard)) => Some(Ulimit { soft, hard }),
                    _ => {
                        if !keys.iter().any(|(k, _)| k == "soft") {
                            r.error(&format!("{at}.soft"), "is required");
                        }
                        if !keys.iter().any(|(k, _)| k == "hard") {
                            r.error(&format!("{at}.hard"), "is required");
                        }
                        None
                    }
                }
            }
            other => {
                r.wrong_type(&at, "a number or {soft, hard}", other);
                None
            }
        };
        if let Some(limit) = limit {
            out.insert(name.clone(), limit);
        }
    }
    out
}

fn limit_value(r: &mut Report, field: &str, node: &Node) -> Option<i64> {
    match node {
        Node::Int(v) => match i64::try_from(*v) {
            Ok(v) if v >= -1 => Some(v),
            _ => {
                r.error(
                    field,
                    format!("{v} must be -1 (unlimited) or a non-negative number"),
                );
                None
            }
        },
        other => {
            r.wrong_type(field, "a whole number", other);
            None
        }
    }
}

/// `tmpfs`: a path or a list of paths, each optionally `:options`.
pub(crate) fn tmpfs(r: &mut Report, field: &str, node: &Node) -> Vec<String> {
    match node {
        Node::Str(s) => vec![s.clone()],
        _ => r.string_list(field, node).unwrap_or_default(),
    }
}

/// `pull_policy`: `never`, `missing` (or `if_not_present`), `always`.
pub(crate) fn pull_policy(r: &mut Report, field: &str, node: &Node) -> PullPolicy {
    match r.string(field, node).as_deref() {
        None => PullPolicy::default(),
        Some("build") => {
            r.error(
                field,
                "build is not supported: Flotilla does not build images",
            );
            PullPolicy::default()
        }
        Some(s) => PullPolicy::parse(s).unwrap_or_else(|| {
            r.error(
                field,
                format!("{s:?} is not a pull policy (expected never, missing or always)"),
            );
            PullPolicy::default()
        }),
    }
}

/// `volumes`: short (`src:dst[:ro|rw]`, `dst`) or long (`{type, source, target, read_only}`)
/// syntax. Relative host paths are resolved against `base_dir`.
pub(crate) fn volumes(
    r: &mut Report,
    base_dir: &Path,
    field: &str,
    node: &Node,
) -> Vec<VolumeMount> {
    r.list_of(field, node, |r, at, item| match item {
        Node::Str(s) => short_volume(r, base_dir, at, s),
        Node::Map(_) => long_volume(r, base_dir, at, item),
        other => {
            r.wrong_type(at, "\"SOURCE:TARGET[:ro]\" or a mapping", other);
            None
        }
    })
}

/// A host path as written (`./data`, `~/x`, `/srv`), or `None` when `source` names a volume.
fn host_path(base_dir: &Path, source: &str) -> Option<String> {
    if source.starts_with('/') {
        return Some(source.to_string());
    }
    if let Some(rest) = source.strip_prefix("~/") {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        return Some(format!("{home}/{rest}"));
    }
    if source.starts_with("./") || source.starts_with("../") || source == "." {
        let joined = base_dir.join(source);
        let absolute = std::path::absolute(&joined).unwrap_or(joined);
        return Some(absolute.to_string_lossy().into_owned());
    }
    None
}

fn short_volume(r: &mut Report, base_dir: &Path, field: &str, text: &str) -> Option<VolumeMount> {
    let parts: Vec<&str> = text.split(':').collect();
    let (source, target, mode) = match parts.as_slice() {
        [target] => (None, *target, None),
        [source, target] => (Some(*source), *target, None),
        [source, target, mode] => (Some(*source), *target, Some(*mode)),
        _ => {
            r.error(field, format!("{text:?} is not SOURCE:TARGET[:MODE]"));
            return None;
        }
    };
    let mut read_only = false;
    for option in mode.into_iter().flat_map(|m| m.split(',')) {
        match option {
            "ro" => read_only = true,
            "rw" => read_only = false,
            // SELinux relabelling and propagation flags do not change what is mounted.
            "z" | "Z" | "shared" | "rshared" | "slave" | "rslave" | "private" | "rprivate"
            | "nocopy" => {}
            other => {
                r.error(
                    field,
                    format!("{other:?} in {text:?} is not a mount mode (expected ro or rw)"),
                );
                return None;
            }
        }
    }
    let (kind, source) = match source {
        None => (VolumeKind::Volume, None),
        Some(s) => match host_path(base_dir, s) {
            Some(path) => (VolumeKind::Bind, Some(path)),
            None => (VolumeKind::Volume, Some(s.to_string())),
        },
    };
    Some(VolumeMount {
        kind,
        source,
        target: target.to_string(),
        read_only,
    })
}

fn long_volume(r: &mut Report, base_dir: &Path, field: &str, node: &Node) -> Option<VolumeMount> {
    let entries = r.mapping(field, node)?;
    let (mut kind, mut source, mut target, mut read_only) = (None, None, None, false);
    for (key, value) in entries {
        let at = format!("{field}.{key}");
        match key.as_str() {
            "type" => {
                kind = match r.string(&at, value).as_deref() {
                    Some("volume") => Some(VolumeKind::Volume),
                    Some("bind") => Some(VolumeKind::Bind),
                    Some("tmpfs") => {
                        r.error(&at, "use the service's tmpfs key for tmpfs mounts");
                        return None;
                    }
                    Some(other) => {
                        r.error(
                            &at,
                            format!("{other:?} is not a mount type (expected volume or bind)"),
                        );
                        return None;
                    }
                    None => return None,
                }
            }
            "source" => source = r.string(&at, value),
            "target" => target = r.string(&at, value),
            "read_only" => read_only = r.boolean(&at, value).unwrap_or(false),
            "consistency" | "volume" | "bind" => r.warn(&at, "not supported yet; ignored"),
            _ => r.error(&at, "unknown key"),
        }
    }
    let Some(target) = target else {
        r.error(&format!("{field}.target"), "is required");
        return None;
    };
    let kind = kind.unwrap_or(VolumeKind::Volume);
    let source = match (kind, source) {
        (VolumeKind::Bind, Some(s)) => match host_path(base_dir, &s) {
            Some(path) => Some(path),
            None => {
                r.error(
                    &format!("{field}.source"),
                    format!("{s:?} is not a host path (start it with '/', './' or '~/')"),
                );
                return None;
            }
        },
        (_, s) => s,
    };
    Some(VolumeMount {
        kind,
        source,
        target,
        read_only,
    })
}

/// `deploy.resources.reservations.devices`: each entry must ask for `capabilities: [gpu]`.
pub(crate) fn gpu_devices(r: &mut Report, field: &str, node: &Node) -> Vec<GpuRequest> {
    r.list_of_mappings(field, node, "a list", gpu_request)
}

/// One entry of `devices`.
fn gpu_request(r: &mut Report, at: &str, entries: &[(String, Node)]) -> Option<GpuRequest> {
    let mut request = GpuRequest {
        driver: None,
        count: None,
        device_ids: Vec::new(),
        capabilities: Vec::new(),
    };
    for (key, value) in entries {
        let key_at = format!("{at}.{key}");
        match key.as_str() {
            "capabilities" => {
                request.capabilities = r.string_list(&key_at, value).unwrap_or_default()
            }
            "driver" => request.driver = r.string(&key_at, value),
            "device_ids" => request.device_ids = r.string_list(&key_at, value).unwrap_or_default(),
            "count" => {
                request.count = match value {
                    Node::Str(s) if s == "all" => Some(GpuCount::All),
                    Node::Int(n) if *n >= 1 => u64::try_from(*n).ok().map(GpuCount::Count),
                    other => {
                        r.error(
                            &key_at,
                            format!(
                                "expected a positive number or \"all\", got {}",
                                other
                                    .scalar_text()
                                    .unwrap_or_else(|| other.kind().to_string())
                            ),
                        );
                        None
                    }
                }
            }
            "options" => r.warn(&key_at, "not supported yet; ignored"),
            _ => r.error(&key_at, "unknown key"),
        }
    }
    if !request.capabilities.iter().any(|c| c == "gpu") {
        r.error(
            &format!("{at}.capabilities"),
            "only GPU devices (capabilities: [gpu]) are supported",
        );
        return None;
    }
    if request.count.is_some() && !request.device_ids.is_empty() {
        r.error(at, "count and device_ids are mutually exclusive");
        return None;
    }
    Some(request)
}
