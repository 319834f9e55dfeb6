//! [`ServiceSpec::validate`]: every invariant the rest of the system relies on, one function per
//! section of the spec.

use crate::field_error::FieldError;
use crate::spec::{
    signal_number, validate_name, DriverKind, HealthTest, PortMode, Resources, RestartCondition,
    ServiceMode, ServiceSpec, MAX_REPLICAS,
};

/// The problems found in one service, each under `services.<name>.<field>`.
struct Problems<'s> {
    service: &'s str,
    errs: Vec<FieldError>,
}

impl Problems<'_> {
    fn at(&self, field: &str) -> String {
        format!("services.{}.{field}", self.service)
    }

    fn add(&mut self, field: &str, reason: impl Into<String>) {
        let field = self.at(field);
        self.errs.push(FieldError::new(field, reason));
    }
}

impl ServiceSpec {
    /// Checks every invariant the rest of the system relies on. Each problem names its field path
    /// relative to the service (`services.web.deploy.replicas`).
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut p = Problems {
            service: &self.name,
            errs: Vec::new(),
        };
        if let Err(reason) = validate_name(&self.name) {
            p.errs
                .push(FieldError::new(format!("services.{}", self.name), reason));
        }
        check_program(self, &mut p);
        for (field, reason) in crate::spec_bounds::check(self) {
            p.add(&field, reason);
        }
        check_environment(self, &mut p);
        check_ports(self, &mut p);
        check_healthcheck(self, &mut p);
        for dep in self.depends_on.keys().filter(|dep| **dep == self.name) {
            p.add(
                &format!("depends_on.{dep}"),
                "a service cannot depend on itself",
            );
        }
        check_resources(&self.resources, &mut p);
        check_restart_policy(self, &mut p);
        p.errs.extend(self.container.validate(&self.name));
        p.errs.extend(self.mesh.validate(&self.name, &self.ports));
        check_rollout(self, &mut p);
        check_stop_signal(self, &mut p);
        if p.errs.is_empty() {
            Ok(())
        } else {
            Err(p.errs)
        }
    }
}

/// What runs and how many: the driver's needs (a command, an image), the command's bytes and
/// the replica count.
fn check_program(spec: &ServiceSpec, p: &mut Problems) {
    match spec.driver {
        DriverKind::Process => {
            if spec.command.as_ref().is_none_or(|c| c.is_empty())
                && spec.entrypoint.as_ref().is_none_or(|c| c.is_empty())
            {
                p.add(
                    "command",
                    "a process service needs a command (or entrypoint) to run",
                );
            }
        }
        DriverKind::Docker => {
            if spec.image.as_deref().is_none_or(str::is_empty) {
                p.add("image", "the docker driver needs an image");
            }
        }
        DriverKind::Sim => {}
    }
    if let ServiceMode::Replicated { replicas } = spec.mode {
        if replicas > MAX_REPLICAS {
            p.add(
                "deploy.replicas",
                format!("{replicas} is more than the maximum of {MAX_REPLICAS}"),
            );
        }
    }
}

fn check_environment(spec: &ServiceSpec, p: &mut Problems) {
    for key in spec.environment.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            p.add(
                &format!("environment.{key}"),
                "variable names must be non-empty and contain no '=' or NUL",
            );
        }
    }
}

fn check_ports(spec: &ServiceSpec, p: &mut Problems) {
    let mut seen_targets = std::collections::BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        if port.target == 0 {
            p.add(&format!("ports[{i}].target"), "port 0 is not a port");
        }
        if port.published == Some(0) {
            p.add(&format!("ports[{i}].published"), "port 0 is not a port");
        }
        if !seen_targets.insert((port.target, port.protocol)) {
            p.add(
                &format!("ports[{i}].target"),
                format!("target port {} is listed twice", port.target),
            );
        }
        // Host mode binds `published` on the node itself; without it there is nothing to bind.
        if port.mode == PortMode::Host && port.published.is_none() {
            p.add(
                &format!("ports[{i}].published"),
                "host mode needs a published port to bind on the node",
            );
        }
    }
}

fn check_healthcheck(spec: &ServiceSpec, p: &mut Problems) {
    let Some(hc) = &spec.healthcheck else {
        return;
    };
    if hc.interval.is_zero() {
        p.add("healthcheck.interval", "must be greater than 0");
    }
    if hc.timeout.is_zero() {
        p.add("healthcheck.timeout", "must be greater than 0");
    }
    match &hc.test {
        HealthTest::Cmd { argv } if argv.is_empty() => {
            p.add("healthcheck.test", "CMD needs a program to run")
        }
        HealthTest::Shell { script } if script.trim().is_empty() => {
            p.add("healthcheck.test", "CMD-SHELL needs a command")
        }
        HealthTest::Http { path } if !path.starts_with('/') => p.add(
            "x-flotilla.healthcheck.http",
            format!("{path:?} must be an absolute path starting with '/'"),
        ),
        HealthTest::Http { .. } | HealthTest::Tcp if spec.ports.is_empty() => p.add(
            "x-flotilla.healthcheck",
            "http and tcp health checks need at least one entry in ports",
        ),
        _ => {}
    }
}

fn check_resources(resources: &Resources, p: &mut Problems) {
    let Resources {
        limits,
        reservations,
    } = *resources;
    for (which, amounts) in [("limits", limits), ("reservations", reservations)] {
        let memory = format!("deploy.resources.{which}.memory");
        match amounts.memory_bytes {
            Some(0) => p.add(&memory, "must be greater than 0"),
            Some(mem) if mem < 4 << 20 => p.add(
                &memory,
                format!("{mem} bytes is below the 4MiB minimum a task can run in"),
            ),
            _ => {}
        }
        if amounts.cpu_millis == Some(0) {
            p.add(
                &format!("deploy.resources.{which}.cpus"),
                "must be greater than 0",
            );
        }
    }
    let over = |res: Option<u64>, lim: Option<u64>| res.zip(lim).is_some_and(|(r, l)| r > l);
    if over(reservations.memory_bytes, limits.memory_bytes) {
        p.add(
            "deploy.resources.reservations.memory",
            "reservation is larger than the limit",
        );
    }
    if over(reservations.cpu_millis, limits.cpu_millis) {
        p.add(
            "deploy.resources.reservations.cpus",
            "reservation is larger than the limit",
        );
    }
}

fn check_restart_policy(spec: &ServiceSpec, p: &mut Problems) {
    if spec.restart_policy.max_attempts == Some(0)
        && spec.restart_policy.condition != RestartCondition::None
    {
        // Compose treats 0 as "unlimited" in some versions; we reject it to avoid guessing.
        p.add(
            "deploy.restart_policy.max_attempts",
            "0 is ambiguous: leave it out for unlimited attempts",
        );
    }
}

fn check_stop_signal(spec: &ServiceSpec, p: &mut Problems) {
    if let Some(sig) = &spec.stop_signal {
        if signal_number(sig).is_none() {
            p.add(
                "stop_signal",
                format!("{sig:?} is not a known signal name (e.g. SIGTERM, SIGINT, SIGQUIT)"),
            );
        }
    }
}

/// Disruption budget, update/rollback/canary settings, and the canary match's need for HTTP.
fn check_rollout(spec: &ServiceSpec, p: &mut Problems) {
    let rollout = &spec.rollout;
    if let Err((field, reason)) = rollout.disruption.validate() {
        p.add(&format!("x-flotilla.disruption.{field}"), reason);
    }
    for e in crate::release::validate_release(&rollout.update, &rollout.rollback, &rollout.canary) {
        p.add(&e.field, e.reason);
    }
    // Headers and cookies exist only where the mesh speaks HTTP.
    let http = !spec.mesh.routes.is_empty()
        || spec
            .mesh
            .ports
            .iter()
            .any(|port| port.protocol == crate::mesh::MeshProtocol::Http);
    if rollout.canary.matching.is_some() && !http {
        p.add(
            "x-flotilla.canary.match",
            "needs an HTTP port (x-flotilla.ports[].protocol: http, or x-flotilla.routes)",
        );
    }
}
