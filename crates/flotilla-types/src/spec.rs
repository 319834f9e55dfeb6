//! The desired-state vocabulary: a service as Flotilla understands it.
//!
//! This is the normalised form of a Compose service. `flotilla-compose` produces it from YAML and
//! the API accepts it as JSON; [`ServiceSpec::validate`] is the one place both paths check it, so a
//! spec that reaches the store is always well formed.

pub use crate::field_error::FieldError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Largest replica count a single service may ask for.
pub const MAX_REPLICAS: u64 = 1_000_000;

/// Which runtime runs a service's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// A supervised host process in its own cgroup.
    Process,
    /// A container on the local Docker Engine.
    Docker,
    /// Hollow-node driver: "runs" tasks instantly. For scale tests and benchmarks only.
    Sim,
}

impl DriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Process => "process",
            DriverKind::Docker => "docker",
            DriverKind::Sim => "sim",
        }
    }
}

impl std::fmt::Display for DriverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `deploy.mode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum ServiceMode {
    /// Keep `replicas` tasks running somewhere in the cluster.
    Replicated { replicas: u64 },
    /// Keep one task on every eligible node.
    Global,
}

impl ServiceMode {
    pub fn replicas(&self) -> Option<u64> {
        match self {
            ServiceMode::Replicated { replicas } => Some(*replicas),
            ServiceMode::Global => None,
        }
    }
}

/// One entry of Compose `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// The port the task listens on (inside the container, or `FLOTILLA_PORT_<target>` for a process).
    pub target: u16,
    /// The cluster-wide published port served by the mesh, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<u16>,
    #[serde(default)]
    pub protocol: PortProtocol,
    /// How `published` is exposed. Defaults to ingress so specs stored before modes existed
    /// still read back unchanged.
    #[serde(default, skip_serializing_if = "PortMode::is_ingress")]
    pub mode: PortMode,
}

/// Compose `ports[].mode`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PortMode {
    /// The mesh serves `published` on every node and balances over all tasks.
    #[default]
    Ingress,
    /// The task binds `published` directly on its own node, so the port is a node resource:
    /// at most one task per node can hold it, and the mesh does not listen on it.
    Host,
}

impl PortMode {
    pub fn is_ingress(&self) -> bool {
        *self == PortMode::Ingress
    }
}

impl PortSpec {
    /// The node port this entry holds exclusively, if it is a host-mode published port.
    pub fn host_port(&self) -> Option<(u16, PortProtocol)> {
        match (self.mode, self.published) {
            (PortMode::Host, Some(p)) => Some((p, self.protocol)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    #[default]
    Tcp,
    Udp,
}

/// What a health check runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum HealthTest {
    /// Compose `["CMD", prog, args…]`: run directly.
    Cmd { argv: Vec<String> },
    /// Compose `["CMD-SHELL", script]` or a plain string: run through `/bin/sh -c`.
    Shell { script: String },
    /// `x-flotilla.healthcheck.http`: GET this path on the first port; 2xx/3xx is healthy.
    Http { path: String },
    /// `x-flotilla.healthcheck.tcp`: a TCP connect to the first port succeeds.
    Tcp,
}

/// A health check with Compose's timing fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub test: HealthTest,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub retries: u32,
    #[serde(with = "humantime_serde")]
    pub start_period: Duration,
    /// Compose's `start_interval`: the time between probes inside `start_period`, until the
    /// first pass. (Specs stored before this field read the Compose default.)
    #[serde(
        with = "humantime_serde",
        default = "HealthCheck::default_start_interval"
    )]
    pub start_interval: Duration,
}

impl HealthCheck {
    /// Compose's defaults: 30s interval, 30s timeout, 3 retries, no start period, 5s start
    /// interval.
    pub fn with_defaults(test: HealthTest) -> Self {
        HealthCheck {
            test,
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
            retries: 3,
            start_period: Duration::ZERO,
            start_interval: Self::default_start_interval(),
        }
    }

    /// Compose's default `start_interval`.
    pub fn default_start_interval() -> Duration {
        Duration::from_secs(5)
    }
}

/// `depends_on.<svc>.condition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DependencyCondition {
    ServiceStarted,
    ServiceHealthy,
}

/// Cpu in millicores, memory in bytes. `None` means "not set".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceAmounts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

/// `deploy.resources`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    #[serde(default)]
    pub limits: ResourceAmounts,
    #[serde(default)]
    pub reservations: ResourceAmounts,
}

/// `deploy.restart_policy.condition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    None,
    OnFailure,
    Any,
}

/// `deploy.restart_policy`. The delay doubles with every restart inside `window`, capped at
/// [`RestartPolicy::MAX_DELAY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub condition: RestartCondition,
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub window: Option<Duration>,
}

impl RestartPolicy {
    pub const MAX_DELAY: Duration = Duration::from_secs(300);

    /// The delay before restart number `attempt` (0-based): `delay * 2^attempt`, capped.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self.delay.max(Duration::from_millis(100));
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        base.checked_mul(factor)
            .unwrap_or(Self::MAX_DELAY)
            .min(Self::MAX_DELAY)
    }
}

impl Default for RestartPolicy {
    /// Swarm's default: restart on any exit, 5s delay, no attempt limit.
    fn default() -> Self {
        RestartPolicy {
            condition: RestartCondition::Any,
            delay: Duration::from_secs(5),
            max_attempts: None,
            window: None,
        }
    }
}

/// `deploy.placement`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementSpec {
    /// Swarm-mode constraint expressions such as `node.labels.zone==a`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas_per_node: Option<u64>,
    /// `deploy.placement.preferences`, each as `spread=node.labels.K`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferences: Vec<String>,
    /// `x-flotilla.placement.max_per_node`; the tighter of this and `max_replicas_per_node` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_node: Option<u64>,
    /// `x-flotilla.placement.spread`: topology spread over a node label (or `zone`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spread: Vec<SpreadSpec>,
    /// `x-flotilla.placement.affinities`: co-location with (or avoidance of) another service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinities: Vec<AffinitySpec>,
    /// `x-flotilla.placement.strategy`.
    #[serde(default, skip_serializing_if = "PlacementStrategy::is_default")]
    pub strategy: PlacementStrategy,
    /// `x-flotilla.placement.priority`, 0..=1000. 0 (the default) is the lowest: a task may
    /// preempt only tasks of strictly lower priority, so services opt in by raising it.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub priority: u32,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// One `x-flotilla.placement.spread` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpreadSpec {
    /// Node label to spread over; `zone` means the node's zone.
    pub label: String,
    /// Hard: a placement that would exceed `max_skew` fails. Soft: only steers the score.
    #[serde(default)]
    pub hard: bool,
    /// Largest allowed difference between the most and least used value of `label`.
    #[serde(default = "default_max_skew")]
    pub max_skew: u32,
}

fn default_max_skew() -> u32 {
    1
}

/// One `x-flotilla.placement.affinities` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinitySpec {
    /// The other service.
    pub service: String,
    /// Positive attracts towards nodes running `service`, negative repels (anti-affinity).
    #[serde(default)]
    pub weight: i32,
    /// Hard: must (weight > 0) or must not (weight < 0) share a node with `service`.
    #[serde(default)]
    pub hard: bool,
}

/// `x-flotilla.placement.strategy`: how feasible nodes are ranked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementStrategy {
    /// Fewest tasks of the service on the node, then the least loaded node.
    #[default]
    Spread,
    /// The most loaded node that still fits.
    Binpack,
}

impl PlacementStrategy {
    pub fn is_default(&self) -> bool {
        *self == PlacementStrategy::Spread
    }
}

/// A Compose service, normalised and validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub driver: DriverKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Replaces the image's command; for a process it is the program and its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `env_file` contents merged with `environment` (which wins).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub depends_on: BTreeMap<String, DependencyCondition>,
    pub mode: ServiceMode,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// `deploy.labels`: labels on the service object, not on its tasks.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deploy_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "PlacementSpec::is_empty")]
    pub placement: PlacementSpec,
    #[serde(with = "humantime_serde")]
    pub stop_grace_period: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Settings only containers use.
    #[serde(default, skip_serializing_if = "crate::ContainerSpec::is_default")]
    pub container: crate::ContainerSpec,
    /// How the routing mesh exposes the service.
    #[serde(default, skip_serializing_if = "crate::MeshSpec::is_default")]
    pub mesh: crate::MeshSpec,
    /// How new revisions replace old ones.
    #[serde(default, skip_serializing_if = "crate::RolloutSpec::is_default")]
    pub rollout: crate::RolloutSpec,
}

impl PlacementSpec {
    pub fn is_empty(&self) -> bool {
        self.constraints.is_empty()
            && self.max_replicas_per_node.is_none()
            && self.preferences.is_empty()
            && self.max_per_node.is_none()
            && self.spread.is_empty()
            && self.affinities.is_empty()
            && self.strategy.is_default()
            && self.priority == 0
    }
}

impl ServiceSpec {
    /// A minimal process service running `command`, with Compose defaults everywhere else.
    pub fn process(name: &str, command: Vec<String>) -> Self {
        ServiceSpec {
            name: name.to_string(),
            driver: DriverKind::Process,
            image: None,
            command: Some(command),
            entrypoint: None,
            environment: BTreeMap::new(),
            working_dir: None,
            user: None,
            labels: BTreeMap::new(),
            ports: Vec::new(),
            healthcheck: None,
            depends_on: BTreeMap::new(),
            mode: ServiceMode::Replicated { replicas: 1 },
            resources: Resources::default(),
            restart_policy: RestartPolicy::default(),
            deploy_labels: BTreeMap::new(),
            placement: PlacementSpec::default(),
            stop_grace_period: Duration::from_secs(10),
            stop_signal: None,
            container: crate::ContainerSpec::default(),
            mesh: crate::MeshSpec::default(),
            rollout: crate::RolloutSpec::default(),
        }
    }

    /// The part of the spec that defines a task. Two specs with equal templates need no task
    /// replacement; a change in replica count alone is a scale, not a rollout.
    pub fn task_template_eq(&self, other: &ServiceSpec) -> bool {
        // Field by field, without cloning: controllers call this for every task on every pass.
        // The destructuring makes a new field a compile error here until someone decides
        // whether it defines the task.
        let ServiceSpec {
            name,
            driver,
            image,
            command,
            entrypoint,
            environment,
            working_dir,
            user,
            labels,
            ports,
            healthcheck,
            depends_on,
            // A replica count change is a scale, not a rollout.
            mode: _,
            resources,
            restart_policy,
            // Labels on the service object, not its tasks.
            deploy_labels: _,
            placement,
            stop_grace_period,
            stop_signal,
            container,
            mesh,
            // Release settings (the disruption budget included) govern how tasks move, not
            // what they run.
            rollout: _,
        } = self;
        *name == other.name
            && *driver == other.driver
            && *image == other.image
            && *command == other.command
            && *entrypoint == other.entrypoint
            && *environment == other.environment
            && *working_dir == other.working_dir
            && *user == other.user
            && *labels == other.labels
            && *ports == other.ports
            && *healthcheck == other.healthcheck
            && *depends_on == other.depends_on
            && *resources == other.resources
            && *restart_policy == other.restart_policy
            && *placement == other.placement
            && *stop_grace_period == other.stop_grace_period
            && *stop_signal == other.stop_signal
            && *container == other.container
            && *mesh == other.mesh
    }
}

/// Service names become task names, DNS labels and cgroup directory names, so they follow the
/// DNS label rules Compose and Swarm use.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("name {name:?} must be 1 to 63 characters"));
    }
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    let starts_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok_chars || !starts_ok {
        return Err(format!(
            "name {name:?} may hold only lowercase letters, digits, '-' and '_', and must start with a letter or digit"
        ));
    }
    Ok(())
}

/// Maps a signal name (`SIGTERM`, `TERM`, `15`) to its number on Linux.
pub fn signal_number(name: &str) -> Option<i32> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Ok(n) = bare.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    Some(match bare {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ABRT" => 6,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        "WINCH" => 28,
        _ => return None,
    })
}

/// Checks a set of services together: each one on its own, then the `depends_on` graph (unknown
/// targets and cycles).
pub fn validate_stack(services: &[ServiceSpec]) -> Result<(), Vec<FieldError>> {
    let mut errs = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for s in services {
        if let Err(mut e) = s.validate() {
            errs.append(&mut e);
        }
        if !names.insert(s.name.as_str()) {
            errs.push(FieldError::new(
                format!("services.{}", s.name),
                "service is defined twice",
            ));
        }
    }
    for s in services {
        for dep in s.depends_on.keys() {
            if dep != &s.name && !names.contains(dep.as_str()) {
                errs.push(FieldError::new(
                    format!("services.{}.depends_on.{dep}", s.name),
                    format!("service {dep:?} is not defined in this file"),
                ));
            }
        }
    }
    if let Some(cycle) = find_dependency_cycle(services) {
        errs.push(FieldError::new(
            format!("services.{}.depends_on", cycle[0]),
            format!("dependency cycle: {}", cycle.join(" -> ")),
        ));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// Returns one cycle in the `depends_on` graph, as a closed path `a -> b -> a`.
pub fn find_dependency_cycle(services: &[ServiceSpec]) -> Option<Vec<String>> {
    let graph: BTreeMap<&str, Vec<&str>> = services
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.depends_on.keys().map(String::as_str).collect(),
            )
        })
        .collect();
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit<'a>(
        node: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Visiting) => {
                let start = path.iter().position(|n| *n == node).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node, Mark::Visiting);
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if graph.contains_key(next) {
                if let Some(c) = visit(next, graph, marks, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        marks.insert(node, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for name in graph.keys() {
        let mut path = Vec::new();
        if let Some(c) = visit(name, &graph, &mut marks, &mut path) {
            return Some(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RestartPolicy {
            delay: Duration::from_secs(1),
            ..RestartPolicy::default()
        };
        assert_eq!(p.backoff(0), Duration::from_secs(1));
        assert_eq!(p.backoff(3), Duration::from_secs(8));
        assert_eq!(p.backoff(30), RestartPolicy::MAX_DELAY);
    }

    #[test]
    fn cycle_found() {
        let mut a = ServiceSpec::process("a", vec!["true".into()]);
        let mut b = ServiceSpec::process("b", vec!["true".into()]);
        a.depends_on
            .insert("b".into(), DependencyCondition::ServiceStarted);
        b.depends_on
            .insert("a".into(), DependencyCondition::ServiceStarted);
        let errs = validate_stack(&[a, b]).unwrap_err();
        assert!(errs.iter().any(|e| e.reason.contains("cycle")), "{errs:?}");
    }

    #[test]
    fn template_ignores_replicas() {
        let a = ServiceSpec::process("a", vec!["true".into()]);
        let mut b = a.clone();
        b.mode = ServiceMode::Replicated { replicas: 7 };
        assert!(a.task_template_eq(&b));
        b.environment.insert("X".into(), "1".into());
        assert!(!a.task_template_eq(&b));
    }
}
