//! Compose `ports`, in both the short (`"8080:80/udp"`) and long (`{target, published}`) syntax.

use crate::document::Node;
use crate::report::Report;
use flotilla_types::{PortMode, PortProtocol, PortSpec};

/// Reads the `ports` list. Entries with errors are left out after being reported.
pub(crate) fn read_ports(r: &mut Report, field: &str, node: &Node) -> Vec<PortSpec> {
    let Node::List(items) = node else {
        r.wrong_type(field, "a list of ports", node);
        return Vec::new();
    };
    items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| {
            let at = format!("{field}[{i}]");
            match item {
                Node::Int(_) => {
                    port_number(r, &at, &item.scalar_text().unwrap_or_default()).map(|target| {
                        PortSpec {
                            target,
                            published: None,
                            protocol: PortProtocol::Tcp,
                            mode: Default::default(),
                        }
                    })
                }
                Node::Str(s) => short_syntax(r, &at, s),
                Node::Map(entries) => long_syntax(r, &at, entries),
                other => {
                    r.wrong_type(&at, "\"[published:]target[/protocol]\" or a mapping", other);
                    None
                }
            }
        })
        .collect()
}

/// `[host_ip:][published:]target[/protocol]`.
fn short_syntax(r: &mut Report, field: &str, text: &str) -> Option<PortSpec> {
    let (addr, protocol) = match text.rsplit_once('/') {
        Some((addr, proto)) => (addr, protocol(r, field, proto)?),
        None => (text, PortProtocol::Tcp),
    };
    if addr.contains('-') {
        r.error(field, format!("{text:?}: port ranges are not supported"));
        return None;
    }
    // The host IP may itself contain colons (IPv6 in brackets), so split from the right.
    let mut parts = addr.rsplitn(3, ':');
    let target_text = parts.next().unwrap_or_default();
    let published_text = parts.next();
    let host_ip = parts.next();
    if let Some(ip) = host_ip.filter(|ip| !ip.is_empty()) {
        r.warn(
            field,
            format!("host IP {ip:?} is ignored: published ports listen on every node address"),
        );
    }
    let target = port_number(r, field, target_text);
    let published = match published_text {
        None | Some("") => Some(None),
        Some(p) => port_number(r, field, p).map(Some),
    };
    Some(PortSpec {
        target: target?,
        published: published?,
        protocol,
        mode: Default::default(),
    })
}

fn long_syntax(r: &mut Report, field: &str, entries: &[(String, Node)]) -> Option<PortSpec> {
    let mut target = None;
    let mut published = None;
    let mut proto = PortProtocol::Tcp;
    let mut mode = PortMode::Ingress;
    let mut ok = true;
    for (key, value) in entries {
        let at = format!("{field}.{key}");
        match key.as_str() {
            "target" => target = port_value(r, &at, value),
            "published" => match port_value(r, &at, value) {
                Some(p) => published = Some(p),
                None => ok = false,
            },
            "protocol" => match r.string(&at, value).and_then(|p| protocol(r, &at, &p)) {
                Some(p) => proto = p,
                None => ok = false,
            },
            "mode" => match r.string(&at, value).as_deref() {
                Some("ingress") => mode = PortMode::Ingress,
                Some("host") => mode = PortMode::Host,
                Some(other) => {
                    r.error(
                        &at,
                        format!("{other:?} is not a port mode (expected ingress or host)"),
                    );
                    ok = false;
                }
                None => ok = false,
            },
            "host_ip" | "name" | "app_protocol" => r.warn(&at, "not supported yet; ignored"),
            _ => {
                r.error(&at, "unknown key");
                ok = false;
            }
        }
    }
    if target.is_none() && !entries.iter().any(|(k, _)| k == "target") {
        r.error(&format!("{field}.target"), "is required");
    }
    // Host mode binds `published` on the node itself, so there must be one to bind.
    if mode == PortMode::Host && published.is_none() && ok {
        r.error(
            &format!("{field}.published"),
            "is required with mode: host (the port the task binds on its node)",
        );
        ok = false;
    }
    Some(PortSpec {
        target: target?,
        published,
        protocol: proto,
        mode,
    })
    .filter(|_| ok)
}

/// A port given as a number or as a numeric string.
fn port_value(r: &mut Report, field: &str, node: &Node) -> Option<u16> {
    match node {
        Node::Int(_) | Node::Str(_) => {
            port_number(r, field, &node.scalar_text().unwrap_or_default())
        }
        other => {
            r.wrong_type(field, "a port number", other);
            None
        }
    }
}

/// Port 0 is let through so that `ServiceSpec::validate` reports it in one place.
fn port_number(r: &mut Report, field: &str, text: &str) -> Option<u16> {
    if text.contains('-') && !text.starts_with('-') {
        r.error(field, format!("{text:?}: port ranges are not supported"));
        return None;
    }
    match text.trim().parse::<i64>() {
        Ok(n) if (0..=65535).contains(&n) => u16::try_from(n).ok(),
        Ok(n) => {
            r.error(field, format!("port {n} is out of range (1 to 65535)"));
            None
        }
        Err(_) => {
            r.error(field, format!("{text:?} is not a port number"));
            None
        }
    }
}

fn protocol(r: &mut Report, field: &str, text: &str) -> Option<PortProtocol> {
    match text {
        "tcp" => Some(PortProtocol::Tcp),
        "udp" => Some(PortProtocol::Udp),
        other => {
            r.error(
                field,
                format!("{other:?} is not a protocol (expected tcp or udp)"),
            );
            None
        }
    }
}
