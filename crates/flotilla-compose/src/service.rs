//! One Compose service mapping → one [`ServiceSpec`].

use crate::container;
use crate::document::Node;
use crate::env_file::parse_env_file;
use crate::mesh::{self, MESH_KEYS};
use crate::ports::read_ports;
use crate::report::Report;
use crate::shell_words;
use flotilla_types::container::GpuRequest;
use flotilla_types::units::{parse_bytes, parse_cpus};
use flotilla_types::{
    AffinitySpec, DependencyCondition, DisruptionBudget, DriverKind, HealthCheck, HealthTest,
    MaxUnavailable, MeshSpec, PlacementSpec, PlacementStrategy, ResourceAmounts, Resources,
    RestartCondition, RestartPolicy, ServiceMode, ServiceSpec, SpreadSpec,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Service keys the Compose Specification defines that Flotilla does not act on yet. They are
/// reported as warnings so nobody believes they took effect.
const UNSUPPORTED_SERVICE_KEYS: &[&str] = &[
    "annotations",
    "attach",
    "blkio_config",
    "build",
    "cgroup",
    "cgroup_parent",
    "configs",
    "container_name",
    "cpu_count",
    "cpu_percent",
    "cpu_period",
    "cpu_quota",
    "cpu_rt_period",
    "cpu_rt_runtime",
    "cpu_shares",
    "cpus",
    "cpuset",
    "credential_spec",
    "develop",
    "device_cgroup_rules",
    "devices",
    "dns",
    "dns_opt",
    "dns_search",
    "domainname",
    "expose",
    "extends",
    "external_links",
    "extra_hosts",
    "gpus",
    "group_add",
    "hostname",
    "ipc",
    "isolation",
    "label_file",
    "links",
    "logging",
    "mac_address",
    "mem_limit",
    "mem_reservation",
    "mem_swappiness",
    "memswap_limit",
    "models",
    "network_mode",
    "networks",
    "oom_kill_disable",
    "oom_score_adj",
    "pid",
    "pids_limit",
    "platform",
    "post_start",
    "pre_stop",
    "privileged",
    "profiles",
    "provider",
    "runtime",
    "scale",
    "secrets",
    "security_opt",
    "shm_size",
    "stdin_open",
    "storage_opt",
    "sysctls",
    "tty",
    "use_api_socket",
    "userns_mode",
    "uts",
    "volumes_from",
];

/// Where relative `env_file` paths are resolved.
pub(crate) struct Context<'a> {
    pub(crate) base_dir: &'a Path,
}

/// Reads one service. Always returns a spec (with defaults where fields were bad) so the whole
/// stack can still be cross-checked; the caller discards it if `r` holds errors.
pub(crate) fn read_service(
    r: &mut Report,
    ctx: &Context<'_>,
    name: &str,
    node: &Node,
) -> ServiceSpec {
    let path = format!("services.{name}");
    let mut spec = ServiceSpec::process(name, Vec::new());
    spec.command = None;
    let Some(entries) = r.mapping(&path, node) else {
        return spec;
    };

    let mut environment = BTreeMap::new();
    let mut env_file_vars = BTreeMap::new();
    let mut compose_health: Option<Option<HealthCheck>> = None;
    let mut flotilla = FlotillaExtension::default();
    let mut deploy = Deploy::default();
    let mut restart: Option<RestartPolicy> = None;

    for (key, value) in entries {
        let at = format!("{path}.{key}");
        match key.as_str() {
            "image" => spec.image = r.string(&at, value),
            "command" => spec.command = command(r, &at, value),
            "entrypoint" => spec.entrypoint = command(r, &at, value),
            "environment" => environment = r.dict_or_list(&at, value, from_process_env),
            "env_file" => env_file_vars = env_files(r, ctx, &at, value),
            "working_dir" => spec.working_dir = r.string(&at, value),
            "user" => spec.user = r.string(&at, value),
            "labels" => spec.labels = r.dict_or_list(&at, value, |_, _, _| Some(String::new())),
            "ports" => spec.ports = read_ports(r, &at, value),
            "healthcheck" => compose_health = Some(healthcheck(r, &at, value)),
            "depends_on" => spec.depends_on = depends_on(r, &at, value),
            "stop_grace_period" => {
                if let Some(d) = r.duration(&at, value) {
                    spec.stop_grace_period = d;
                }
            }
            "stop_signal" => spec.stop_signal = r.string(&at, value),
            "restart" => restart = restart_shorthand(r, &at, value),
            "deploy" => deploy = read_deploy(r, &at, value),
            "x-flotilla" => flotilla = flotilla_extension(r, &at, value),
            "cap_add" => spec.container.cap_add = r.string_list(&at, value).unwrap_or_default(),
            "cap_drop" => spec.container.cap_drop = r.string_list(&at, value).unwrap_or_default(),
            "ulimits" => spec.container.ulimits = container::ulimits(r, &at, value),
            "read_only" => spec.container.read_only = r.boolean(&at, value).unwrap_or(false),
            "init" => spec.container.init = r.boolean(&at, value),
            "tmpfs" => spec.container.tmpfs = container::tmpfs(r, &at, value),
            "volumes" => spec.container.volumes = container::volumes(r, ctx.base_dir, &at, value),
            "pull_policy" => spec.container.pull_policy = container::pull_policy(r, &at, value),
            k if UNSUPPORTED_SERVICE_KEYS.contains(&k) => r.warn(&at, "not supported yet; ignored"),
            k if k.starts_with("x-") => r.warn(&at, "unknown extension; ignored"),
            _ => r.error(&at, "unknown key"),
        }
    }

    env_file_vars.extend(environment);
    spec.environment = env_file_vars;

    spec.driver = flotilla.driver.unwrap_or(if spec.image.is_some() {
        DriverKind::Docker
    } else {
        DriverKind::Process
    });

    spec.healthcheck = match (compose_health, flotilla.healthcheck.take()) {
        (Some(_), Some(_)) => {
            r.error(
                &format!("{path}.x-flotilla.healthcheck"),
                format!("conflicts with {path}.healthcheck: give only one of them"),
            );
            None
        }
        (Some(compose), None) => compose,
        (None, ext) => ext,
    };

    apply_deploy(r, &path, &mut spec, deploy, flotilla, restart);
    spec
}

/// Fills `spec` from the service's `deploy`, `restart` and `x-flotilla` sections (read by then):
/// mode, resources, placement, rollout, mesh and restart policy. Contradictions between them
/// are reported at `path`.
fn apply_deploy(
    r: &mut Report,
    path: &str,
    spec: &mut ServiceSpec,
    deploy: Deploy,
    mut flotilla: FlotillaExtension,
    restart: Option<RestartPolicy>,
) {
    spec.mode = match (deploy.global, deploy.replicas) {
        (true, Some(_)) => {
            r.error(
                &format!("{path}.deploy.replicas"),
                "cannot be set when deploy.mode is global",
            );
            ServiceMode::Global
        }
        (true, None) => ServiceMode::Global,
        (false, replicas) => ServiceMode::Replicated {
            replicas: replicas.unwrap_or(1),
        },
    };
    spec.resources = deploy.resources;
    spec.container.gpus = deploy.gpus;
    spec.container.runtime = flotilla.runtime;
    spec.deploy_labels = deploy.labels;
    spec.placement = deploy.placement;
    let extra = std::mem::take(&mut flotilla.placement);
    spec.placement.max_per_node = extra.max_per_node;
    spec.placement.spread = extra.spread;
    spec.placement.affinities = extra.affinities;
    spec.placement.strategy = extra.strategy.unwrap_or_default();
    if let (Some(a), Some(b)) = (flotilla.priority, extra.priority) {
        if a != b {
            r.error(
                &format!("{path}.x-flotilla.priority"),
                format!("{a} contradicts x-flotilla.placement.priority {b} (set one)"),
            );
        }
    }
    spec.placement.priority = extra.priority.or(flotilla.priority).unwrap_or(0);
    spec.rollout.disruption = flotilla.disruption;
    spec.rollout.update = deploy.update_config;
    spec.rollout.rollback = deploy.rollback_config;
    spec.rollout.strategy = flotilla.strategy.unwrap_or_default();
    spec.rollout.blue_green = flotilla.blue_green;
    spec.rollout.canary = flotilla.canary;
    spec.mesh = flotilla.mesh;
    spec.restart_policy = match (deploy.restart_policy, restart) {
        (Some(policy), Some(_)) => {
            r.warn(
                &format!("{path}.restart"),
                "ignored because deploy.restart_policy is set",
            );
            policy
        }
        (Some(policy), None) | (None, Some(policy)) => policy,
        (None, None) => RestartPolicy::default(),
    };
}

/// A bare `environment` entry takes its value from this process's environment, as Compose does
/// with the shell's; when unset the variable is left out.
fn from_process_env(r: &mut Report, field: &str, key: &str) -> Option<String> {
    let value = std::env::var(key).ok();
    if value.is_none() {
        r.warn(
            field,
            format!("{key} has no value and is not set in the environment; left unset"),
        );
    }
    value
}

/// `command` / `entrypoint`: a string split shell-style, or a list of strings.
fn command(r: &mut Report, field: &str, node: &Node) -> Option<Vec<String>> {
    match node {
        Node::Str(s) => shell_words::split(s)
            .map_err(|reason| r.error(field, format!("{s:?}: {reason}")))
            .ok(),
        Node::List(_) => r.string_list(field, node),
        other => {
            r.wrong_type(field, "a string or a list of strings", other);
            None
        }
    }
}

/// `env_file`: a path, a list of paths, or a list of `{path, required}`. Later files win.
fn env_files(
    r: &mut Report,
    ctx: &Context<'_>,
    field: &str,
    node: &Node,
) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    let entries: Vec<(String, &Node)> = match node {
        Node::List(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| (format!("{field}[{i}]"), item))
            .collect(),
        single => vec![(field.to_string(), single)],
    };
    for (at, entry) in entries {
        let (path, required) = match entry {
            Node::Str(p) => (p.clone(), true),
            Node::Map(keys) => {
                let mut path = None;
                let mut required = true;
                for (key, value) in keys {
                    let key_at = format!("{at}.{key}");
                    match key.as_str() {
                        "path" => path = r.string(&key_at, value),
                        "required" => required = r.boolean(&key_at, value).unwrap_or(true),
                        "format" => r.warn(&key_at, "not supported yet; read as KEY=VALUE lines"),
                        _ => r.error(&key_at, "unknown key"),
                    }
                }
                match path {
                    Some(p) => (p, required),
                    None => {
                        if !keys.iter().any(|(k, _)| k == "path") {
                            r.error(&format!("{at}.path"), "is required");
                        }
                        continue;
                    }
                }
            }
            other => {
                r.wrong_type(&at, "a path or a mapping with `path`", other);
                continue;
            }
        };
        // Joining onto "." would only add noise ("././app.env") to messages.
        let full = if ctx.base_dir == Path::new(".") {
            PathBuf::from(&path)
        } else {
            ctx.base_dir.join(&path)
        };
        match crate::read::read_capped(&full, crate::read::MAX_FILE_BYTES) {
            Ok(text) => match parse_env_file(&text) {
                Ok(file_vars) => vars.extend(file_vars),
                Err((line, reason)) => {
                    r.error(&at, format!("{}: line {line}: {reason}", full.display()))
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {}
            Err(e) => r.error(&at, format!("cannot read {}: {e}", full.display())),
        }
    }
    vars
}

/// Compose `healthcheck`. `None` when disabled (`disable: true`, `["NONE"]`) or invalid.
fn healthcheck(r: &mut Report, field: &str, node: &Node) -> Option<HealthCheck> {
    let entries = r.mapping(field, node)?;
    let mut check = HealthCheck::with_defaults(HealthTest::Tcp);
    let mut test: Option<Option<HealthTest>> = None;
    let mut disabled = false;
    let mut ok = true;
    for (key, value) in entries {
        let at = format!("{field}.{key}");
        match key.as_str() {
            "test" => match health_test(r, &at, value) {
                Some(t) => test = Some(t),
                None => ok = false,
            },
            "disable" => disabled = r.boolean(&at, value).unwrap_or(false),
            _ => {
                if !health_timing(r, &at, key, value, &mut check) {
                    r.error(&at, "unknown key");
                }
            }
        }
    }
    if disabled || !ok {
        return None;
    }
    match test {
        Some(Some(t)) => {
            check.test = t;
            Some(check)
        }
        Some(None) => None,
        None => {
            r.error(
                &format!("{field}.test"),
                "is required (Flotilla does not inherit an image's health check)",
            );
            None
        }
    }
}

/// Sets a timing field shared by Compose's and `x-flotilla`'s health checks. Returns false when
/// `key` is not a timing field, so the caller can report it.
fn health_timing(
    r: &mut Report,
    at: &str,
    key: &str,
    value: &Node,
    check: &mut HealthCheck,
) -> bool {
    let slot = match key {
        "interval" => &mut check.interval,
        "timeout" => &mut check.timeout,
        "start_period" => &mut check.start_period,
        "start_interval" => &mut check.start_interval,
        "retries" => {
            if let Some(n) = r.uint32(at, value) {
                check.retries = n;
            }
            return true;
        }
        _ => return false,
    };
    match r.duration(at, value) {
        // `interval` and `timeout` are checked with the spec; a zero start interval would
        // probe without pause.
        Some(d) if d.is_zero() && key == "start_interval" => r.error(at, "must be greater than 0"),
        Some(d) => *slot = d,
        None => {}
    }
    true
}

/// `test`: `["CMD", ...]`, `["CMD-SHELL", "..."]`, `["NONE"]` or a string (CMD-SHELL).
/// `Some(None)` means NONE (disabled).
fn health_test(r: &mut Report, field: &str, node: &Node) -> Option<Option<HealthTest>> {
    match node {
        Node::Str(script) => Some(Some(HealthTest::Shell {
            script: script.clone(),
        })),
        Node::List(_) => {
            let items = r.string_list(field, node)?;
            let Some((kind, rest)) = items.split_first() else {
                r.error(
                    field,
                    "is empty; expected [\"CMD\", ...], [\"CMD-SHELL\", \"...\"] or [\"NONE\"]",
                );
                return None;
            };
            match kind.as_str() {
                "CMD" => Some(Some(HealthTest::Cmd {
                    argv: rest.to_vec(),
                })),
                "CMD-SHELL" => Some(Some(HealthTest::Shell {
                    script: rest.join(" "),
                })),
                "NONE" => Some(None),
                other => {
                    r.error(
                        &format!("{field}[0]"),
                        format!("{other:?} is not a test kind (expected CMD, CMD-SHELL or NONE)"),
                    );
                    None
                }
            }
        }
        other => {
            r.wrong_type(field, "a string or a list of strings", other);
            None
        }
    }
}

/// `depends_on`: a list of names (service_started) or `{name: {condition}}`.
fn depends_on(r: &mut Report, field: &str, node: &Node) -> BTreeMap<String, DependencyCondition> {
    let mut deps = BTreeMap::new();
    match node {
        Node::List(_) => {
            for name in r.string_list(field, node).unwrap_or_default() {
                deps.insert(name, DependencyCondition::ServiceStarted);
            }
        }
        Node::Map(entries) => {
            for (name, spec) in entries {
                let at = format!("{field}.{name}");
                let mut condition = DependencyCondition::ServiceStarted;
                let mut ok = true;
                if let Some(keys) = r.mapping(&at, spec) {
                    for (key, value) in keys {
                        let key_at = format!("{at}.{key}");
                        match key.as_str() {
                            "condition" => match r.string(&key_at, value).as_deref() {
                                Some("service_started") => {
                                    condition = DependencyCondition::ServiceStarted
                                }
                                Some("service_healthy") => {
                                    condition = DependencyCondition::ServiceHealthy
                                }
                                Some("service_completed_successfully") => {
                                    r.error(
                                        &key_at,
                                        "service_completed_successfully is not supported",
                                    );
                                    ok = false;
                                }
                                Some(other) => {
                                    r.error(&key_at, format!("{other:?} is not a condition (expected service_started or service_healthy)"));
                                    ok = false;
                                }
                                None => ok = false,
                            },
                            "restart" | "required" => r.warn(&key_at, "not supported yet; ignored"),
                            _ => r.error(&key_at, "unknown key"),
                        }
                    }
                } else {
                    ok = false;
                }
                if ok {
                    deps.insert(name.clone(), condition);
                }
            }
        }
        other => r.wrong_type(field, "a list of service names or a mapping", other),
    }
    deps
}

/// The non-swarm `restart:` shorthand: `no`, `always`, `on-failure[:N]`, `unless-stopped`.
fn restart_shorthand(r: &mut Report, field: &str, node: &Node) -> Option<RestartPolicy> {
    let text = match node {
        // YAML 1.1 readers turn an unquoted `no` into false; accept it as Compose does.
        Node::Bool(false) => "no".to_string(),
        other => r.string(field, other)?,
    };
    let base = RestartPolicy::default();
    let (condition, max_attempts) = match text.split_once(':') {
        Some(("on-failure", n)) => match n.trim().parse::<u32>() {
            Ok(n) => (RestartCondition::OnFailure, Some(n)),
            Err(_) => {
                r.error(field, format!("{n:?} in {text:?} is not a retry count"));
                return None;
            }
        },
        _ => match text.as_str() {
            "no" => (RestartCondition::None, None),
            "always" | "unless-stopped" => (RestartCondition::Any, None),
            "on-failure" => (RestartCondition::OnFailure, None),
            _ => {
                r.error(
                    field,
                    format!("{text:?} is not a restart policy (expected no, always, on-failure[:N] or unless-stopped)"),
                );
                return None;
            }
        },
    };
    Some(RestartPolicy {
        condition,
        max_attempts,
        ..base
    })
}

/// What `deploy` contributes to the spec.
#[derive(Default)]
struct Deploy {
    global: bool,
    replicas: Option<u64>,
    resources: Resources,
    /// `resources.reservations.devices` asking for GPUs.
    gpus: Vec<GpuRequest>,
    restart_policy: Option<RestartPolicy>,
    labels: BTreeMap<String, String>,
    placement: PlacementSpec,
    update_config: flotilla_types::UpdateConfig,
    rollback_config: flotilla_types::UpdateConfig,
}

fn read_deploy(r: &mut Report, field: &str, node: &Node) -> Deploy {
    let mut deploy = Deploy::default();
    r.keys(field, node, |r, key, at, value| match key {
        "mode" => match r.string(at, value).as_deref() {
            Some("replicated") | None => {}
            Some("global") => deploy.global = true,
            Some(other) => r.error(
                at,
                format!("{other:?} is not a deploy mode (expected replicated or global)"),
            ),
        },
        "replicas" => deploy.replicas = r.uint(at, value),
        "resources" => deploy.resources = resources(r, at, value, &mut deploy.gpus),
        "restart_policy" => deploy.restart_policy = restart_policy(r, at, value),
        "labels" => deploy.labels = r.dict_or_list(at, value, |_, _, _| Some(String::new())),
        "placement" => deploy.placement = placement(r, at, value),
        "update_config" => deploy.update_config = crate::rollout::update_config(r, at, value),
        "rollback_config" => deploy.rollback_config = crate::rollout::update_config(r, at, value),
        "endpoint_mode" => r.warn(at, "not supported yet; ignored"),
        _ => r.error(at, "unknown key"),
    });
    deploy
}

/// `deploy.resources`; GPU device reservations go to `gpus`.
fn resources(r: &mut Report, field: &str, node: &Node, gpus: &mut Vec<GpuRequest>) -> Resources {
    let mut res = Resources::default();
    r.keys(field, node, |r, key, at, value| match key {
        "limits" => res.limits = amounts(r, at, value, None),
        "reservations" => res.reservations = amounts(r, at, value, Some(gpus)),
        _ => r.error(at, "unknown key (expected limits or reservations)"),
    });
    res
}

/// `limits` / `reservations`; only reservations (`gpus` is `Some`) may hold `devices`.
fn amounts(
    r: &mut Report,
    field: &str,
    node: &Node,
    mut gpus: Option<&mut Vec<GpuRequest>>,
) -> ResourceAmounts {
    let mut amounts = ResourceAmounts::default();
    r.keys(field, node, |r, key, at, value| match key {
        "cpus" => {
            amounts.cpu_millis = unit_value(r, at, value, "a cpu count such as \"0.5\"", parse_cpus)
        }
        "memory" => {
            amounts.memory_bytes =
                unit_value(r, at, value, "a byte size such as \"512m\"", parse_bytes)
        }
        "pids" => amounts.pids = r.uint(at, value),
        "devices" => match gpus.as_deref_mut() {
            Some(out) => *out = container::gpu_devices(r, at, value),
            None => r.error(
                at,
                "devices can only be reserved (deploy.resources.reservations.devices)",
            ),
        },
        "generic_resources" => r.warn(at, "not supported yet; ignored"),
        _ => r.error(at, "unknown key"),
    });
    amounts
}

/// A string or number handed to one of the `units` parsers.
fn unit_value<E: std::fmt::Display>(
    r: &mut Report,
    field: &str,
    node: &Node,
    expected: &str,
    parse: impl Fn(&str) -> Result<u64, E>,
) -> Option<u64> {
    match node {
        Node::Str(_) | Node::Int(_) | Node::Float(_) => {
            let text = node.scalar_text().unwrap_or_default();
            parse(&text).map_err(|e| r.error(field, e.to_string())).ok()
        }
        other => {
            r.wrong_type(field, expected, other);
            None
        }
    }
}

fn restart_policy(r: &mut Report, field: &str, node: &Node) -> Option<RestartPolicy> {
    let entries = r.mapping(field, node)?;
    let mut policy = RestartPolicy::default();
    for (key, value) in entries {
        let at = format!("{field}.{key}");
        match key.as_str() {
            "condition" => match r.string(&at, value).as_deref() {
                Some("none") => policy.condition = RestartCondition::None,
                Some("on-failure") => policy.condition = RestartCondition::OnFailure,
                Some("any") => policy.condition = RestartCondition::Any,
                Some(other) => r.error(
                    &at,
                    format!(
                        "{other:?} is not a restart condition (expected none, on-failure or any)"
                    ),
                ),
                None => {}
            },
            "delay" => {
                if let Some(d) = r.duration(&at, value) {
                    policy.delay = d;
                }
            }
            "max_attempts" => policy.max_attempts = r.uint32(&at, value),
            "window" => policy.window = r.duration(&at, value),
            _ => r.error(&at, "unknown key"),
        }
    }
    Some(policy)
}

fn placement(r: &mut Report, field: &str, node: &Node) -> PlacementSpec {
    let mut placement = PlacementSpec::default();
    r.keys(field, node, |r, key, at, value| match key {
        "constraints" => placement.constraints = r.string_list(at, value).unwrap_or_default(),
        "max_replicas_per_node" => placement.max_replicas_per_node = r.uint(at, value),
        "preferences" => placement.preferences = preferences(r, at, value),
        "platforms" => r.warn(at, "not supported yet; ignored"),
        _ => r.error(at, "unknown key"),
    });
    placement
}

/// `placement.preferences`: `[{spread: node.labels.K}]`, kept as `spread=node.labels.K`.
fn preferences(r: &mut Report, field: &str, node: &Node) -> Vec<String> {
    r.list_of_mappings(
        field,
        node,
        "a list of {spread: node.labels.KEY}",
        preference,
    )
}

/// One preference, `{spread: node.labels.K}`.
fn preference(r: &mut Report, at: &str, entries: &[(String, Node)]) -> Option<String> {
    let mut out = None;
    for (key, value) in entries {
        let key_at = format!("{at}.{key}");
        if key != "spread" {
            r.error(&key_at, "unknown key (the only preference is spread)");
            continue;
        }
        match r.string(&key_at, value) {
            Some(label)
                if label.starts_with("node.labels.") && label.len() > "node.labels.".len() =>
            {
                out = Some(format!("spread={label}"))
            }
            Some(label) => r.error(
                &key_at,
                format!("{label:?} must name a node label, e.g. node.labels.zone"),
            ),
            None => {}
        }
    }
    out
}

/// What `x-flotilla` contributes to the spec.
#[derive(Default)]
struct FlotillaExtension {
    driver: Option<DriverKind>,
    healthcheck: Option<HealthCheck>,
    placement: FlotillaPlacement,
    disruption: DisruptionBudget,
    /// `x-flotilla.priority`; the same as `x-flotilla.placement.priority`.
    priority: Option<u32>,
    runtime: Option<String>,
    mesh: MeshSpec,
    strategy: Option<flotilla_types::Strategy>,
    blue_green: flotilla_types::release::BlueGreenSpec,
    canary: flotilla_types::release::CanarySpec,
}

/// `x-flotilla.placement`: Flotilla's placement additions, merged into `PlacementSpec`.
#[derive(Default)]
struct FlotillaPlacement {
    max_per_node: Option<u64>,
    spread: Vec<SpreadSpec>,
    affinities: Vec<AffinitySpec>,
    strategy: Option<PlacementStrategy>,
    priority: Option<u32>,
}

fn flotilla_placement(r: &mut Report, field: &str, node: &Node) -> FlotillaPlacement {
    let mut out = FlotillaPlacement::default();
    r.keys(field, node, |r, key, at, value| match key {
        "max_per_node" => out.max_per_node = r.uint(at, value),
        "strategy" => {
            out.strategy = match r.string(at, value).as_deref() {
                Some("spread") => Some(PlacementStrategy::Spread),
                Some("binpack") => Some(PlacementStrategy::Binpack),
                Some(other) => {
                    r.error(
                        at,
                        format!("unknown strategy {other:?} (expected spread or binpack)"),
                    );
                    None
                }
                None => None,
            }
        }
        "priority" => out.priority = priority(r, at, value),
        "spread" => out.spread = r.list_of(at, value, spread_rule),
        "affinities" => out.affinities = r.list_of(at, value, affinity_rule),
        _ => r.error(
            at,
            "unknown key (expected max_per_node, spread, affinities, strategy or priority)",
        ),
    });
    out
}

/// `x-flotilla.priority` (or `x-flotilla.placement.priority`): 0..=1000.
fn priority(r: &mut Report, field: &str, node: &Node) -> Option<u32> {
    r.uint32(field, node).and_then(|p| {
        if p > 1000 {
            r.error(field, format!("{p} is outside 0..=1000"));
            None
        } else {
            Some(p)
        }
    })
}

fn spread_rule(r: &mut Report, field: &str, node: &Node) -> Option<SpreadSpec> {
    let (mut label, mut hard, mut max_skew) = (None, false, 1);
    r.keys(field, node, |r, key, at, value| match key {
        "label" => label = r.string(at, value),
        "hard" => hard = r.boolean(at, value).unwrap_or(false),
        "max_skew" => max_skew = r.uint32(at, value).unwrap_or(1),
        _ => r.error(at, "unknown key (expected label, hard, max_skew)"),
    })?;
    let Some(label) = label else {
        r.error(field, "needs a label, e.g. {label: zone}");
        return None;
    };
    Some(SpreadSpec {
        label,
        hard,
        max_skew,
    })
}

fn affinity_rule(r: &mut Report, field: &str, node: &Node) -> Option<AffinitySpec> {
    let (mut service, mut weight, mut hard) = (None, 0i32, false);
    r.keys(field, node, |r, key, at, value| match key {
        "service" => service = r.string(at, value),
        "weight" => match value {
            Node::Int(w) if (-100..=100).contains(w) => weight = *w as i32,
            Node::Int(w) => r.error(at, format!("{w} is outside -100..=100")),
            other => r.wrong_type(at, "a whole number", other),
        },
        "hard" => hard = r.boolean(at, value).unwrap_or(false),
        _ => r.error(at, "unknown key (expected service, weight, hard)"),
    })?;
    let Some(service) = service else {
        r.error(field, "needs the other service's name");
        return None;
    };
    Some(AffinitySpec {
        service,
        weight,
        hard,
    })
}

fn flotilla_extension(r: &mut Report, field: &str, node: &Node) -> FlotillaExtension {
    let mut ext = FlotillaExtension::default();
    r.keys(field, node, |r, key, at, value| match key {
        "driver" => {
            ext.driver = match r.string(at, value).as_deref() {
                Some("process") => Some(DriverKind::Process),
                Some("docker") => Some(DriverKind::Docker),
                Some("sim") => Some(DriverKind::Sim),
                Some(other) => {
                    r.error(
                        at,
                        format!("unknown driver {other:?} (expected process or docker)"),
                    );
                    None
                }
                None => None,
            }
        }
        "healthcheck" => ext.healthcheck = flotilla_healthcheck(r, at, value),
        "placement" => ext.placement = flotilla_placement(r, at, value),
        "runtime" => ext.runtime = r.string(at, value),
        "disruption" => ext.disruption = flotilla_disruption(r, at, value),
        "strategy" => ext.strategy = crate::rollout::strategy(r, at, value),
        "blue_green" => ext.blue_green = crate::rollout::blue_green(r, at, value),
        "canary" => ext.canary = crate::rollout::canary(r, at, value),
        k if MESH_KEYS.contains(&k) => mesh::read_key(r, at, k, value, &mut ext.mesh),
        "priority" => ext.priority = priority(r, at, value),
        _ => r.warn(at, "unknown x-flotilla key; ignored"),
    });
    ext
}

/// `x-flotilla.disruption`: `{max_unavailable: 2}` or `{max_unavailable: "25%"}`.
fn flotilla_disruption(r: &mut Report, field: &str, node: &Node) -> DisruptionBudget {
    let mut budget = DisruptionBudget::default();
    r.keys(field, node, |r, key, at, value| match key {
        "max_unavailable" => budget.max_unavailable = max_unavailable(r, at, value),
        _ => r.error(at, "unknown key (expected max_unavailable)"),
    });
    budget
}

fn max_unavailable(r: &mut Report, field: &str, node: &Node) -> Option<MaxUnavailable> {
    const EXPECTED: &str = "expected a whole number of tasks or a percentage like \"25%\"";
    match node {
        Node::Int(n) if *n >= 1 => {
            Some(MaxUnavailable::Count(u64::try_from(*n).unwrap_or(u64::MAX)))
        }
        Node::Int(n) => {
            r.error(field, format!("must be at least 1, got {n}"));
            None
        }
        Node::Str(s) => {
            let Some(pct) = s.trim().strip_suffix('%') else {
                r.error(field, format!("{EXPECTED}, got {s:?}"));
                return None;
            };
            match pct.trim().parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Some(MaxUnavailable::Percent(p)),
                _ => {
                    r.error(field, format!("{s:?} is not a percentage in 1%..=100%"));
                    None
                }
            }
        }
        other => {
            r.error(field, format!("{EXPECTED}, got {}", other.kind()));
            None
        }
    }
}

/// `x-flotilla.healthcheck`: `{http: "/path"}` or `{tcp: true}` plus Compose's timing fields.
fn flotilla_healthcheck(r: &mut Report, field: &str, node: &Node) -> Option<HealthCheck> {
    let entries = r.mapping(field, node)?;
    let mut check = HealthCheck::with_defaults(HealthTest::Tcp);
    let mut http: Option<String> = None;
    let mut tcp = false;
    let mut ok = true;
    for (key, value) in entries {
        let at = format!("{field}.{key}");
        match key.as_str() {
            "http" => match r.string(&at, value) {
                Some(path) => http = Some(path),
                None => ok = false,
            },
            "tcp" => match r.boolean(&at, value) {
                Some(b) => tcp = b,
                None => ok = false,
            },
            _ => {
                if !health_timing(r, &at, key, value, &mut check) {
                    r.error(&at, "unknown key");
                }
            }
        }
    }
    if !ok {
        return None;
    }
    check.test = match (http, tcp) {
        (Some(_), true) => {
            r.error(field, "give either http or tcp, not both");
            return None;
        }
        (Some(path), false) => HealthTest::Http { path },
        (None, true) => HealthTest::Tcp,
        (None, false) => {
            r.error(field, "needs `http: /path` or `tcp: true`");
            return None;
        }
    };
    Some(check)
}
