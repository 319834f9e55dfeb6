//! The engine's create request for a task's container: image and command, environment, labels,
//! published ports, mounts and devices, resource limits, and the service network.

use crate::docker::{
    limits_update, LABEL_NODE, LABEL_OWNER, LABEL_REVISION, LABEL_SERVICE, LABEL_SLOT, LABEL_TASK,
};
use crate::driver::DriverError;
use bollard::models::{
    ContainerCreateBody, DeviceRequest, EndpointSettings, HealthConfig, HostConfig, Mount,
    MountType, NetworkingConfig, PortBinding as EnginePortBinding, ResourcesUlimits,
};
use flotilla_types::container::{ContainerSpec, GpuCount, VolumeKind};
use flotilla_types::{PortBinding, PortProtocol, Resources, ServiceSpec, Task};
use std::collections::HashMap;

/// The engine's port bindings (`"8080/tcp"` → host port).
type Bindings = HashMap<String, Option<Vec<EnginePortBinding>>>;

/// The create request of `task`'s container on node `node`, owned by agent `owner`, with host
/// `ports`. The network is attached later ([`attach_network`]).
pub(crate) fn create_body(
    task: &Task,
    ports: &[PortBinding],
    node: &str,
    owner: &str,
) -> Result<ContainerCreateBody, DriverError> {
    let spec = &task.spec;
    if let Some(e) = spec.container.validate(&spec.name).into_iter().next() {
        return Err(DriverError::Invalid {
            field: e.field,
            reason: e.reason,
        });
    }
    let image = spec
        .image
        .clone()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| invalid(spec, "image", "the docker driver needs an image".into()))?;
    let env = environment(task, ports, node)?;
    let (exposed, bindings) = port_bindings(spec, ports)?;
    let mut host = host_config(&spec.container, bindings);
    apply_limits(&mut host, &spec.resources)?;
    Ok(ContainerCreateBody {
        image: Some(image),
        cmd: spec.command.clone(),
        entrypoint: spec.entrypoint.clone(),
        env: Some(env),
        working_dir: spec.working_dir.clone(),
        user: spec.user.clone(),
        labels: Some(labels(task, node, owner)),
        exposed_ports: Some(exposed),
        stop_signal: spec.stop_signal.clone(),
        stop_timeout: Some(i64::try_from(spec.stop_grace_period.as_secs()).unwrap_or(i64::MAX)),
        // The agent runs the service's own check; the image's would only compete with it.
        healthcheck: spec.healthcheck.as_ref().map(|_| HealthConfig {
            test: Some(vec!["NONE".into()]),
            ..Default::default()
        }),
        host_config: Some(host),
        ..Default::default()
    })
}

fn invalid(spec: &ServiceSpec, field: &str, reason: String) -> DriverError {
    DriverError::Invalid {
        field: format!("services.{}.{field}", spec.name),
        reason,
    }
}

/// The service's environment plus `PORT`, `FLOTILLA_PORT_<target>`, and the task's identity.
fn environment(task: &Task, ports: &[PortBinding], node: &str) -> Result<Vec<String>, DriverError> {
    let spec = &task.spec;
    let mut env = Vec::new();
    for (k, v) in &spec.environment {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(invalid(
                spec,
                &format!("environment.{k}"),
                "names must be non-empty without '=' or NUL, values without NUL".into(),
            ));
        }
        env.push(format!("{k}={v}"));
    }
    // Inside the container the workload listens on its target port; the host port is the
    // engine's business.
    if let Some(first) = ports.first() {
        env.push(format!("PORT={}", first.target));
    }
    for p in ports {
        env.push(format!("FLOTILLA_PORT_{0}={0}", p.target));
    }
    env.push(format!("FLOTILLA_TASK_ID={}", task.id));
    env.push(format!("FLOTILLA_SERVICE={}", spec.name));
    env.push(format!("FLOTILLA_NODE={node}"));
    if let Some(slot) = task.slot {
        env.push(format!("FLOTILLA_SLOT={slot}"));
    }
    Ok(env)
}

/// The exposed ports (`8080/tcp`) and their host bindings.
fn port_bindings(
    spec: &ServiceSpec,
    ports: &[PortBinding],
) -> Result<(Vec<String>, Bindings), DriverError> {
    let protocol_of = |target: u16| {
        spec.ports
            .iter()
            .find(|p| p.target == target)
            .map_or(PortProtocol::Tcp, |p| p.protocol)
    };
    let mut exposed = Vec::new();
    let mut bindings = HashMap::new();
    for p in ports {
        if p.host_port == 0 || p.target == 0 {
            return Err(invalid(spec, "ports", "port 0 is not a port".into()));
        }
        let proto = match protocol_of(p.target) {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        };
        let key = format!("{}/{proto}", p.target);
        exposed.push(key.clone());
        bindings.insert(
            key,
            Some(vec![EnginePortBinding {
                host_ip: None,
                host_port: Some(p.host_port.to_string()),
            }]),
        );
    }
    Ok((exposed, bindings))
}

/// The service's labels plus Flotilla's, which find, adopt and remove the container.
fn labels(task: &Task, node: &str, owner: &str) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> = task
        .spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(LABEL_SERVICE.into(), task.spec.name.clone());
    labels.insert(LABEL_TASK.into(), task.id.clone());
    labels.insert(LABEL_REVISION.into(), task.revision.to_string());
    labels.insert(LABEL_NODE.into(), node.to_string());
    labels.insert(LABEL_OWNER.into(), owner.to_string());
    if let Some(slot) = task.slot {
        labels.insert(LABEL_SLOT.into(), slot.to_string());
    }
    labels
}

/// The host side: port bindings, capabilities, mounts, tmpfs, ulimits, GPUs, runtime.
fn host_config(c: &ContainerSpec, bindings: Bindings) -> HostConfig {
    let mounts: Vec<Mount> = c.volumes.iter().map(mount).collect();
    let tmpfs: HashMap<String, String> = c
        .tmpfs
        .iter()
        .map(|t| match t.split_once(':') {
            Some((path, opts)) => (path.to_string(), opts.to_string()),
            None => (t.clone(), String::new()),
        })
        .collect();
    let ulimits: Vec<ResourcesUlimits> = c
        .ulimits
        .iter()
        .map(|(name, l)| ResourcesUlimits {
            name: Some(name.clone()),
            soft: Some(l.soft),
            hard: Some(l.hard),
        })
        .collect();
    let device_requests: Vec<DeviceRequest> = c.gpus.iter().map(device_request).collect();
    HostConfig {
        port_bindings: Some(bindings),
        cap_add: (!c.cap_add.is_empty()).then(|| c.cap_add.clone()),
        cap_drop: (!c.cap_drop.is_empty()).then(|| c.cap_drop.clone()),
        readonly_rootfs: Some(c.read_only),
        init: c.init,
        mounts: (!mounts.is_empty()).then_some(mounts),
        tmpfs: (!tmpfs.is_empty()).then_some(tmpfs),
        ulimits: (!ulimits.is_empty()).then_some(ulimits),
        device_requests: (!device_requests.is_empty()).then_some(device_requests),
        runtime: c.runtime.clone(),
        // The routing mesh is reached through the bridge gateway (`<SERVICE>_ADDR`).
        extra_hosts: Some(vec![format!(
            "{}:host-gateway",
            crate::mesh_node::CONTAINER_HOST
        )]),
        ..Default::default()
    }
}

fn mount(v: &flotilla_types::container::VolumeMount) -> Mount {
    Mount {
        typ: Some(match v.kind {
            VolumeKind::Volume => MountType::VOLUME,
            VolumeKind::Bind => MountType::BIND,
        }),
        source: v.source.clone(),
        target: Some(v.target.clone()),
        read_only: Some(v.read_only),
        ..Default::default()
    }
}

fn device_request(g: &flotilla_types::container::GpuRequest) -> DeviceRequest {
    DeviceRequest {
        driver: g.driver.clone(),
        count: g.count.map(|n| match n {
            // The engine's spelling of "all devices".
            GpuCount::All => -1,
            GpuCount::Count(n) => i64::try_from(n).unwrap_or(i64::MAX),
        }),
        device_ids: (!g.device_ids.is_empty()).then(|| g.device_ids.clone()),
        capabilities: Some(vec![g.capabilities.clone()]),
        options: None,
    }
}

fn apply_limits(host: &mut HostConfig, resources: &Resources) -> Result<(), DriverError> {
    let update = limits_update(resources)?;
    host.nano_cpus = update.nano_cpus;
    host.memory = update.memory;
    host.memory_swap = update.memory_swap;
    host.memory_reservation = update.memory_reservation;
    host.cpu_shares = update.cpu_shares;
    host.pids_limit = update.pids_limit;
    Ok(())
}

/// Joins the container to the service network by id (a name may be ambiguous, see
/// [`crate::docker_network`]), where other containers find it by the service's name.
pub(crate) fn attach_network(body: &mut ContainerCreateBody, network_id: &str, service: &str) {
    body.host_config
        .get_or_insert_with(Default::default)
        .network_mode = Some(network_id.to_string());
    body.networking_config = Some(NetworkingConfig {
        endpoints_config: Some(HashMap::from([(
            network_id.to_string(),
            EndpointSettings {
                aliases: Some(vec![service.to_string()]),
                ..Default::default()
            },
        )])),
    });
}
