//! A service's bridge network on the Docker Engine (`flotilla-<service>`), shared by every
//! agent that uses the engine.
//!
//! Engines before API 1.44 create two networks of one name when two creates race (two agents on
//! one engine starting the service's first containers at once), and from then on every use of
//! the name fails with `network flotilla-web is ambiguous`. So networks are looked up by exact
//! name and used by id: of several namesakes every agent picks the same one (the oldest, ties
//! broken by id), and removes the others while no container uses them.

use crate::docker::is_status;
use crate::driver::DriverError;
use bollard::models::{Network, NetworkCreateRequest};
use bollard::query_parameters::{ListContainersOptionsBuilder, ListNetworksOptions};
use bollard::Docker;
use std::collections::HashMap;
use std::net::Ipv4Addr;

/// The bridge network of a service's containers.
pub fn network_name(service: &str) -> String {
    format!("flotilla-{service}")
}

/// The network a service's containers join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceNetwork {
    pub id: String,
    /// The host's address on it, when the engine reports one.
    pub gateway: Option<Ipv4Addr>,
}

/// Finds the service's network or creates it (with `labels`) for `task`'s start; heals
/// duplicates. The caller serialises calls within one agent.
pub async fn ensure(
    docker: &Docker,
    service: &str,
    task: &str,
    labels: HashMap<String, String>,
) -> Result<ServiceNetwork, DriverError> {
    let name = network_name(service);
    if namesakes(docker, &name).await?.is_empty() {
        let request = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".into()),
            labels: Some(labels),
            ..Default::default()
        };
        match docker.create_network(request).await {
            Ok(_) => tracing::info!(network = %name, "created service network"),
            // Another agent created it first (engines that check for duplicates).
            Err(e) if is_conflict(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Listed again: another agent may have created a namesake at the same moment.
    let found = namesakes(docker, &name).await?;
    let (chosen, others) = found
        .split_first()
        .ok_or_else(|| DriverError::StartFailed {
            task: task.to_string(),
            reason: format!("network {name} vanished right after it was created"),
        })?;
    for dup in others {
        remove_if_unused(docker, dup).await;
    }
    Ok(ServiceNetwork {
        id: chosen.id.clone().unwrap_or_default(),
        gateway: gateway_of(chosen),
    })
}

/// Removes every network of the service that no container uses (the caller checked that this
/// agent has no container of the service left). Networks still in use by another agent's
/// containers stay; the last agent out removes them.
pub async fn release(docker: &Docker, service: &str) -> Result<(), DriverError> {
    for network in namesakes(docker, &network_name(service)).await? {
        let Some(id) = network.id.as_deref() else {
            continue;
        };
        // The engine removes a network that only stopped or just-created containers are on;
        // another agent may be about to start one there.
        if has_containers(docker, id, &network_name(service)).await? {
            continue;
        }
        match docker.remove_network(id).await {
            Ok(()) => {
                tracing::info!(network = %network_name(service), %id, "removed service network")
            }
            Err(e) if is_status(&e, 404) || is_status(&e, 403) || is_conflict(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether any container, running or not, is attached to network `id` named `name`. A created
/// container matches only by name (its endpoint has no network id yet), so a namesake's
/// container keeps this network too, which errs on the safe side.
async fn has_containers(docker: &Docker, id: &str, name: &str) -> Result<bool, DriverError> {
    let filters = HashMap::from([("network", vec![id.to_string(), name.to_string()])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    Ok(!docker.list_containers(Some(options)).await?.is_empty())
}

/// The networks named exactly `name`, the one every agent uses first.
async fn namesakes(docker: &Docker, name: &str) -> Result<Vec<Network>, DriverError> {
    // The engine's `name` filter matches substrings; keep exact names only.
    let options = ListNetworksOptions {
        filters: Some(HashMap::from([(
            "name".to_string(),
            vec![name.to_string()],
        )])),
    };
    let mut found: Vec<Network> = docker
        .list_networks(Some(options))
        .await?
        .into_iter()
        .filter(|n| n.name.as_deref() == Some(name))
        .collect();
    found.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
    Ok(found)
}

/// Removes a duplicate network unless a container is attached to it.
async fn remove_if_unused(docker: &Docker, network: &Network) {
    let Some(id) = network.id.as_deref() else {
        return;
    };
    let in_use = match docker.inspect_network(id, None).await {
        Ok(n) => n.containers.is_some_and(|c| !c.is_empty()),
        Err(_) => return,
    };
    if in_use {
        tracing::warn!(network = ?network.name, %id, "duplicate service network still in use; removed once it is free");
        return;
    }
    match docker.remove_network(id).await {
        Ok(()) => {
            tracing::info!(network = ?network.name, %id, "removed a duplicate service network")
        }
        Err(e) => tracing::debug!(%id, error = %e, "removing a duplicate network failed"),
    }
}

/// The IPv4 gateway of a network, from its IPAM config.
fn gateway_of(network: &Network) -> Option<Ipv4Addr> {
    network
        .ipam
        .as_ref()?
        .config
        .as_ref()?
        .iter()
        .find_map(|c| c.gateway.as_deref()?.parse().ok())
}

/// "already exists" / "has active endpoints": the engine answers 409 for both.
fn is_conflict(e: &bollard::errors::Error) -> bool {
    is_status(e, 409)
}
