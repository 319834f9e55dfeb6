//! Bounds on a service's free-form inputs: sizes of its maps and strings, bytes no program can
//! take (NUL), paths that must be absolute, and amounts no node can have. Each problem is named
//! by its field, under `services.<name>.`.

use crate::spec::{ResourceAmounts, ServiceSpec};
use std::collections::BTreeMap;

/// Most entries in `environment`, `labels` or `deploy.labels`.
pub const MAX_MAP_ENTRIES: usize = 1024;
/// Longest environment variable or label name.
pub const MAX_KEY_LEN: usize = 256;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 4096;
/// Longest environment value or argument: Linux's limit on one exec argument (`MAX_ARG_STRLEN`).
pub const MAX_ARG_LEN: usize = 128 << 10;
/// Most arguments in `command` or `entrypoint`.
pub const MAX_ARGS: usize = 4096;
/// Most CPUs a task may reserve or be limited to; no node has more.
pub const MAX_CPUS: u64 = 4096;
/// Most memory a task may reserve or be limited to (1 PiB); no node has more.
pub const MAX_MEMORY_BYTES: u64 = 1 << 50;

/// Every bound above, as `(field, reason)` pairs relative to the service.
pub(crate) fn check(spec: &ServiceSpec) -> Vec<(String, String)> {
    let mut errs = Vec::new();
    for (field, argv) in [("command", &spec.command), ("entrypoint", &spec.entrypoint)] {
        if let Some(argv) = argv {
            check_argv(field, argv, &mut errs);
        }
    }
    for (field, value) in [
        ("image", &spec.image),
        ("user", &spec.user),
        ("working_dir", &spec.working_dir),
    ] {
        if value.as_deref().is_some_and(|v| v.contains('\0')) {
            errs.push((field.to_string(), "contains a NUL byte".to_string()));
        }
    }
    if let Some(dir) = &spec.working_dir {
        if !dir.starts_with('/') {
            errs.push((
                "working_dir".to_string(),
                format!("{dir:?} must be an absolute path"),
            ));
        }
    }
    check_map("environment", &spec.environment, MAX_ARG_LEN, &mut errs);
    check_map("labels", &spec.labels, MAX_LABEL_VALUE_LEN, &mut errs);
    check_map(
        "deploy.labels",
        &spec.deploy_labels,
        MAX_LABEL_VALUE_LEN,
        &mut errs,
    );
    check_published_ports(spec, &mut errs);
    let resources = &spec.resources;
    for (which, amounts) in [
        ("limits", &resources.limits),
        ("reservations", &resources.reservations),
    ] {
        check_amounts(which, amounts, &mut errs);
    }
    errs
}

fn check_argv(field: &str, argv: &[String], errs: &mut Vec<(String, String)>) {
    if argv.len() > MAX_ARGS {
        errs.push((
            field.to_string(),
            format!(
                "{} arguments is more than the limit of {MAX_ARGS}",
                argv.len()
            ),
        ));
    }
    for (i, arg) in argv.iter().enumerate() {
        if arg.contains('\0') {
            errs.push((format!("{field}[{i}]"), "contains a NUL byte".to_string()));
        }
        if arg.len() > MAX_ARG_LEN {
            errs.push((
                format!("{field}[{i}]"),
                format!("longer than the limit of {MAX_ARG_LEN} bytes"),
            ));
        }
    }
}

fn check_map(
    field: &str,
    map: &BTreeMap<String, String>,
    max_value: usize,
    errs: &mut Vec<(String, String)>,
) {
    if map.len() > MAX_MAP_ENTRIES {
        errs.push((
            field.to_string(),
            format!(
                "{} entries is more than the limit of {MAX_MAP_ENTRIES}",
                map.len()
            ),
        ));
        return;
    }
    for (key, value) in map {
        let at = format!("{field}.{key}");
        if key.len() > MAX_KEY_LEN {
            errs.push((
                at.clone(),
                format!("the name is longer than the limit of {MAX_KEY_LEN} bytes"),
            ));
        }
        if value.contains('\0') {
            errs.push((at.clone(), "the value contains a NUL byte".to_string()));
        }
        if value.len() > max_value {
            errs.push((
                at,
                format!("the value is longer than the limit of {max_value} bytes"),
            ));
        }
    }
}

/// The mesh (or the node, in host mode) serves each published port once: a second listing
/// would never be served.
fn check_published_ports(spec: &ServiceSpec, errs: &mut Vec<(String, String)>) {
    let mut seen = std::collections::BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        if let Some(published) = port.published {
            if !seen.insert((published, port.protocol)) {
                errs.push((
                    format!("ports[{i}].published"),
                    format!("published port {published} is listed twice"),
                ));
            }
        }
    }
}

fn check_amounts(which: &str, amounts: &ResourceAmounts, errs: &mut Vec<(String, String)>) {
    if amounts.cpu_millis.is_some_and(|m| m > MAX_CPUS * 1000) {
        errs.push((
            format!("deploy.resources.{which}.cpus"),
            format!("more than the limit of {MAX_CPUS} CPUs; no node has that many"),
        ));
    }
    if amounts.memory_bytes.is_some_and(|m| m > MAX_MEMORY_BYTES) {
        errs.push((
            format!("deploy.resources.{which}.memory"),
            format!(
                "more than the limit of {MAX_MEMORY_BYTES} bytes (1 PiB); no node has that much"
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use crate::spec::{PortMode, PortProtocol, PortSpec, ServiceSpec};

    fn fields(spec: &ServiceSpec) -> Vec<String> {
        spec.validate()
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    fn sleeper() -> ServiceSpec {
        ServiceSpec::process("web", vec!["sleep".into(), "60".into()])
    }

    #[test]
    fn nul_bytes_are_refused_wherever_a_program_would_get_them() {
        let mut spec = sleeper();
        spec.entrypoint = Some(vec!["/bin/sh\0x".into()]);
        spec.command = Some(vec!["sleep".into(), "6\x000".into()]);
        spec.environment.insert("A".into(), "b\0c".into());
        spec.working_dir = Some("/tmp\0/x".into());
        spec.user = Some("root\0".into());
        assert_eq!(
            fields(&spec),
            [
                "services.web.command[1]",
                "services.web.entrypoint[0]",
                "services.web.user",
                "services.web.working_dir",
                "services.web.environment.A",
            ]
        );
    }

    #[test]
    fn working_dir_must_be_absolute() {
        let mut spec = sleeper();
        spec.working_dir = Some("srv/app".into());
        assert_eq!(fields(&spec), ["services.web.working_dir"]);
        spec.working_dir = Some("/srv/app".into());
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn maps_and_values_are_bounded() {
        let mut spec = sleeper();
        for i in 0..=super::MAX_MAP_ENTRIES {
            spec.labels.insert(format!("l{i}"), "v".into());
        }
        spec.environment
            .insert("BIG".into(), "x".repeat(super::MAX_ARG_LEN + 1));
        spec.deploy_labels
            .insert("k".repeat(super::MAX_KEY_LEN + 1), "v".into());
        let got = fields(&spec);
        assert!(got.contains(&"services.web.labels".to_string()), "{got:?}");
        assert!(
            got.contains(&"services.web.environment.BIG".to_string()),
            "{got:?}"
        );
        assert_eq!(got.len(), 3, "{got:?}");
    }

    #[test]
    fn a_published_port_listed_twice_is_refused() {
        let mut spec = sleeper();
        let port = |target| PortSpec {
            target,
            published: Some(8080),
            protocol: PortProtocol::default(),
            mode: PortMode::default(),
        };
        spec.ports = vec![port(80), port(81)];
        assert_eq!(fields(&spec), ["services.web.ports[1].published"]);
    }

    #[test]
    fn cpus_and_memory_no_node_has_are_refused() {
        let mut spec = sleeper();
        spec.resources.reservations.cpu_millis = Some(1_000_000_000);
        spec.resources.limits.cpu_millis = Some(1_000_000_000);
        spec.resources.limits.memory_bytes = Some(u64::MAX / 2);
        assert_eq!(
            fields(&spec),
            [
                "services.web.deploy.resources.limits.cpus",
                "services.web.deploy.resources.limits.memory",
                "services.web.deploy.resources.reservations.cpus",
            ]
        );
    }

    #[test]
    fn tmpfs_size_must_be_a_size_a_node_can_have() {
        let mut spec = sleeper();
        spec.container.tmpfs = vec![
            "/run:size=1e30".into(),
            "/a:size=64m,mode=1777".into(),
            "/b:size=50%".into(),
            "/c:size=2000t".into(),
        ];
        assert_eq!(
            fields(&spec),
            ["services.web.tmpfs[0]", "services.web.tmpfs[3]"]
        );
    }
}
