//! Node resources: agents register and heartbeat; operators list them, change their
//! availability (`active`, `pause`, `drain`) and labels.

use crate::body::{JsonBody, StrictJsonBody};
use crate::error::{check_applied, ApiError};
use crate::AppState;
use axum::extract::{Path, State};
use axum::Json;
use flotilla_store::{Command, Expect, Op};
use flotilla_types::api::{Heartbeat, NodeRegistration, NodeUpdate, WriteResponse};
use flotilla_types::{
    now_ms, validate_name, Availability, FieldError, Meta, Node, NodeRole, NodeState,
};

/// Longest label key and value accepted.
const MAX_LABEL_KEY: usize = 128;
const MAX_LABEL_VALUE: usize = 256;
/// Most labels one node may carry. A node is rewritten with every heartbeat, so its size is
/// paid again and again in the log, the change ring and every watcher.
const MAX_NODE_LABELS: usize = 256;
/// Bounds on what an agent reports about its mesh's unserved ports.
const MAX_PORT_CONFLICTS: usize = 256;
const MAX_PORT_CONFLICT_LEN: usize = 4096;
/// Bounds on an agent's bearer secret (it is sent in an HTTP header).
const MIN_AGENT_SECRET: usize = 16;
const MAX_AGENT_SECRET: usize = 256;

pub async fn list(State(app): State<AppState>) -> Json<Vec<Node>> {
    Json(app.store.read(|s| s.nodes.values().cloned().collect()))
}

fn validate_registration(reg: &NodeRegistration) -> Result<(), ApiError> {
    let mut fields = Vec::new();
    if let Err(reason) = validate_name(&reg.id) {
        fields.push(FieldError::new("id", reason));
    }
    if reg.hostname.trim().is_empty() {
        fields.push(FieldError::new("hostname", "must not be empty"));
    }
    if reg.drivers.is_empty() {
        fields.push(FieldError::new(
            "drivers",
            "a node must offer at least one driver",
        ));
    }
    if let Some(addr) = &reg.agent_addr {
        let host_port = addr.strip_prefix("https://").unwrap_or(addr);
        if host_port.parse::<std::net::SocketAddr>().is_err() {
            fields.push(FieldError::new(
                "agent_addr",
                format!("{addr:?} is not HOST:PORT or https://HOST:PORT"),
            ));
        }
    }
    if let Some(ip) = reg.advertise_ip {
        if ip.is_unspecified() || ip.is_multicast() {
            fields.push(FieldError::new(
                "advertise_ip",
                format!("{ip} is not an address other nodes can reach"),
            ));
        }
    }
    if let Some(secret) = &reg.agent_secret {
        if secret.len() < MIN_AGENT_SECRET || secret.len() > MAX_AGENT_SECRET {
            fields.push(FieldError::new(
                "agent_secret",
                format!("must be {MIN_AGENT_SECRET} to {MAX_AGENT_SECRET} bytes"),
            ));
        } else if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            fields.push(FieldError::new(
                "agent_secret",
                "must be printable ASCII without spaces",
            ));
        }
    }
    for (field, labels) in [
        ("labels", &reg.labels),
        ("engine_labels", &reg.engine_labels),
    ] {
        if let Err(reason) = label_count(labels.len()) {
            fields.push(FieldError::new(field, reason));
        }
    }
    if reg.port_conflicts.len() > MAX_PORT_CONFLICTS {
        fields.push(FieldError::new(
            "port_conflicts",
            format!("more than {MAX_PORT_CONFLICTS} entries"),
        ));
    }
    if let Some(i) = reg
        .port_conflicts
        .iter()
        .position(|c| c.len() > MAX_PORT_CONFLICT_LEN)
    {
        fields.push(FieldError::new(
            format!("port_conflicts[{i}]"),
            format!("longer than {MAX_PORT_CONFLICT_LEN} bytes"),
        ));
    }
    if fields.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid("invalid node registration", fields))
    }
}

/// Creates the node, or refreshes what the agent reports while keeping what operators set
/// (availability, labels).
pub async fn register(
    State(app): State<AppState>,
    peer: Option<axum::Extension<crate::cluster::PeerIdentity>>,
    JsonBody(reg): JsonBody<NodeRegistration>,
) -> Result<Json<Node>, ApiError> {
    validate_registration(&reg)?;
    // In a cluster the certificate says who the node is and what it may do: a node registers
    // only itself, and its role is the one the CA signed. Without a certificate, only the
    // agent running in the manager's own process (`flotilla up`) is a manager; a standalone
    // `flotilla agent` following it is a worker.
    let certified = crate::cluster::peer_of(peer);
    if let Some(id) = &certified {
        own_node_only(id, &reg.id)?;
    }
    let role = match certified {
        Some(id) => match id.role {
            flotilla_pki::Role::Manager => NodeRole::Manager,
            flotilla_pki::Role::Worker => NodeRole::Worker,
        },
        None if app.local_node.as_deref() == Some(reg.id.as_str()) => NodeRole::Manager,
        None => NodeRole::Worker,
    };
    for _ in 0..5 {
        let now = now_ms();
        let existing = app.store.read(|s| s.nodes.get(&reg.id).cloned());
        let node = Node {
            id: reg.id.clone(),
            hostname: reg.hostname.clone(),
            role,
            availability: existing
                .as_ref()
                .map(|n| n.availability)
                .unwrap_or_default(),
            state: NodeState::Ready,
            labels: existing
                .as_ref()
                .map(|n| n.labels.clone())
                .unwrap_or_else(|| reg.labels.clone()),
            engine_labels: reg.engine_labels.clone(),
            images: reg.images.clone(),
            zone: existing.as_ref().and_then(|n| n.zone.clone()),
            resources: reg.resources,
            drivers: reg.drivers.clone(),
            agent_addr: reg.agent_addr.clone(),
            advertise_ip: reg.advertise_ip,
            port_conflicts: reg.port_conflicts.clone(),
            last_heartbeat: now,
            // Why a node is paused or drained (an auto-cordon) outlives agent restarts.
            message: existing
                .as_ref()
                .filter(|n| n.availability != Availability::Active)
                .map(|n| n.message.clone())
                .unwrap_or_default(),
            meta: existing.as_ref().map(|n| n.meta).unwrap_or(Meta::default()),
        };
        let expect = existing
            .as_ref()
            .map_or(Expect::Absent, |n| Expect::Version(n.meta.version));
        let mut ops = vec![Op::PutNode { node, expect }];
        if let Some(secret) = &reg.agent_secret {
            ops.extend(crate::agent_secret::put_op(&app, &reg.id, secret));
        }
        let result = app.store.write(Command { ops, at: now }).await?;
        match check_applied(result) {
            Ok(_) => {
                let node = app.store.read(|s| s.nodes.get(&reg.id).cloned());
                return node
                    .map(Json)
                    .ok_or_else(|| ApiError::Internal("node vanished after registration".into()));
            }
            Err(ApiError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::Conflict(format!(
        "node {} kept changing during registration",
        reg.id
    )))
}

/// A worker certificate acts only for its own node.
fn own_node_only(identity: &flotilla_pki::NodeIdentity, node: &str) -> Result<(), ApiError> {
    if identity.role == flotilla_pki::Role::Worker && identity.node_id != node {
        return Err(ApiError::Forbidden(format!(
            "node {} may only register and heartbeat as itself, not as {node:?}",
            identity.node_id
        )));
    }
    Ok(())
}

pub async fn heartbeat(
    State(app): State<AppState>,
    peer: Option<axum::Extension<crate::cluster::PeerIdentity>>,
    Path(id): Path<String>,
    JsonBody(hb): JsonBody<Heartbeat>,
) -> Result<Json<WriteResponse>, ApiError> {
    if let Some(identity) = crate::cluster::peer_of(peer) {
        own_node_only(&identity, &id)?;
    }
    tracing::trace!(node = %id, agent_time = hb.at, "heartbeat");
    let result = app
        .store
        .write(Command::new(vec![Op::NodeHeartbeat {
            id,
            // The manager's clock judges liveness, so skew between agents and managers cannot
            // make a node look dead or alive; the agent's own time is only logged.
            at: now_ms(),
        }]))
        .await?;
    Ok(Json(WriteResponse {
        store_revision: check_applied(result)?,
    }))
}

pub async fn get_node(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    app.store
        .read(|s| s.nodes.get(&id).cloned())
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no node {id:?}")))
}

fn validate_update(update: &NodeUpdate) -> Result<(), ApiError> {
    let mut fields = Vec::new();
    if update.availability.is_none() && update.label_add.is_empty() && update.label_rm.is_empty() {
        fields.push(FieldError::new(
            "body",
            "nothing to change: give availability, label_add or label_rm",
        ));
    }
    for (field, count) in [
        ("label_add", update.label_add.len()),
        ("label_rm", update.label_rm.len()),
    ] {
        if let Err(reason) = label_count(count) {
            fields.push(FieldError::new(field, reason.clone()));
            return Err(ApiError::invalid(
                format!("invalid node update: {field}: {reason}"),
                fields,
            ));
        }
    }
    let check_key = |field: String, key: &str, fields: &mut Vec<FieldError>| {
        let bad = |reason: String| FieldError::new(field.clone(), reason);
        if key.is_empty() {
            fields.push(bad("a label key must not be empty".into()));
        } else if key.len() > MAX_LABEL_KEY {
            fields.push(bad(format!("longer than {MAX_LABEL_KEY} bytes")));
        } else if key
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '=')
        {
            fields.push(bad(format!(
                "{key:?} must not contain '=', whitespace or control characters"
            )));
        }
    };
    for (key, value) in &update.label_add {
        check_key(format!("label_add.{key}"), key, &mut fields);
        if value.len() > MAX_LABEL_VALUE {
            fields.push(FieldError::new(
                format!("label_add.{key}"),
                format!("the value is longer than {MAX_LABEL_VALUE} bytes"),
            ));
        } else if value.chars().any(char::is_control) {
            fields.push(FieldError::new(
                format!("label_add.{key}"),
                "the value must not contain control characters",
            ));
        }
    }
    for (i, key) in update.label_rm.iter().enumerate() {
        check_key(format!("label_rm[{i}]"), key, &mut fields);
        if update.label_add.contains_key(key) {
            fields.push(FieldError::new(
                format!("label_rm[{i}]"),
                format!("{key:?} is also in label_add; give one or the other"),
            ));
        }
    }
    if fields.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid("invalid node update", fields))
    }
}

fn label_count(count: usize) -> Result<(), String> {
    if count > MAX_NODE_LABELS {
        return Err(format!(
            "{count} labels, more than the limit of {MAX_NODE_LABELS} per node"
        ));
    }
    Ok(())
}

/// `flotilla node update`: availability and labels. Setting a node active again clears the
/// reason it was paused or drained for.
pub async fn update(
    State(app): State<AppState>,
    Path(id): Path<String>,
    StrictJsonBody(update): StrictJsonBody<NodeUpdate>,
) -> Result<Json<Node>, ApiError> {
    validate_update(&update)?;
    // Heartbeats bump the node's version every second or so: re-read and retry on conflict.
    for _ in 0..10 {
        let Some(old) = app.store.read(|s| s.nodes.get(&id).cloned()) else {
            return Err(ApiError::NotFound(format!("no node {id:?}")));
        };
        let mut node = old.clone();
        if let Some(availability) = update.availability {
            if availability != old.availability && node.state == NodeState::Ready {
                node.message.clear();
            }
            node.availability = availability;
        }
        for key in &update.label_rm {
            node.labels.remove(key);
        }
        node.labels.extend(update.label_add.clone());
        if let Err(reason) = label_count(node.labels.len()) {
            let reason = format!("the node would have {reason}");
            return Err(ApiError::invalid(
                format!("invalid node update: label_add: {reason}"),
                vec![FieldError::new("label_add", reason)],
            ));
        }
        tracing::info!(node = %id, availability = node.availability.as_str(), "node updated");
        let result = app
            .store
            .write(Command::new(vec![Op::PutNode {
                node,
                expect: Expect::Version(old.meta.version),
            }]))
            .await?;
        match check_applied(result) {
            Ok(_) => {
                return app
                    .store
                    .read(|s| s.nodes.get(&id).cloned())
                    .map(Json)
                    .ok_or_else(|| ApiError::NotFound(format!("node {id:?} was removed")));
            }
            Err(ApiError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::Conflict(format!(
        "node {id} kept changing during the update; try again"
    )))
}

/// The URL of `path` on the agent server at `agent_addr`: `https://HOST:PORT` for cluster nodes
/// (mTLS, reached with [`crate::AppState::http`]'s manager certificate), plain `HOST:PORT` for a
/// loopback agent (`flotilla up`, standalone agents).
pub(crate) fn agent_url(agent_addr: &str, path: &str) -> String {
    if agent_addr.starts_with("https://") {
        format!("{agent_addr}{path}")
    } else {
        format!("http://{agent_addr}{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn fields_of(update: &NodeUpdate) -> Vec<String> {
        match validate_update(update) {
            Err(ApiError::Invalid { fields, .. }) => fields.into_iter().map(|f| f.field).collect(),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn bad_updates_name_their_fields() {
        assert_eq!(fields_of(&NodeUpdate::default()), ["body"]);
        let update = NodeUpdate {
            availability: None,
            label_add: BTreeMap::from([
                ("".to_string(), "x".to_string()),
                ("a b".to_string(), "x".to_string()),
                ("zone".to_string(), "bad\nvalue".to_string()),
                ("keep".to_string(), "1".to_string()),
            ]),
            label_rm: vec!["keep".to_string(), "k=v".to_string()],
        };
        assert_eq!(
            fields_of(&update),
            [
                "label_add.",
                "label_add.a b",
                "label_add.zone",
                "label_rm[0]",
                "label_rm[1]"
            ]
        );
    }

    #[test]
    fn too_many_labels_are_refused_naming_the_limit() {
        let update = NodeUpdate {
            label_add: (0..100_000)
                .map(|i| (format!("k{i}"), "v".to_string()))
                .collect(),
            ..NodeUpdate::default()
        };
        let Err(ApiError::Invalid { message, fields }) = validate_update(&update) else {
            panic!("100k labels accepted");
        };
        assert!(message.contains("limit of 256 per node"), "{message}");
        assert_eq!(fields[0].field, "label_add");
    }

    #[test]
    fn good_updates_pass() {
        let update = NodeUpdate {
            availability: Some(Availability::Drain),
            label_add: BTreeMap::from([("zone".to_string(), "eu-1".to_string())]),
            label_rm: vec!["old".to_string()],
        };
        assert!(validate_update(&update).is_ok());
    }

    #[test]
    fn unknown_fields_and_bad_availability_are_rejected_by_name() {
        let err = crate::body::parse::<NodeUpdate>(br#"{"availability":"sleep"}"#)
            .expect_err("bad availability");
        let ApiError::Invalid { fields, .. } = err else {
            panic!("expected invalid");
        };
        assert_eq!(fields[0].field, "availability");
        assert!(crate::body::parse::<NodeUpdate>(br#"{"labels":{}}"#).is_err());
    }
}
