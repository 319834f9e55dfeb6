//! Host port allocation for task ports.
//!
//! Ports come from the node's range (the CLI gives each node a 500-port block of 20000..32000
//! unless `--task-ports` says otherwise). A port is handed out only if it
//! is not held by a live task and can be bound on 0.0.0.0 right now (for its protocol), so a
//! port some unrelated program listens on is skipped.

use flotilla_types::{PortBinding, PortProtocol, PortSpec};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::ops::Range;
use std::sync::Mutex;
use thiserror::Error;

/// Default range host ports are taken from.
pub const DEFAULT_PORT_RANGE: Range<u16> = 20000..32000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PortError {
    #[error("port range {start}..{end}: {reason}")]
    BadRange {
        start: u16,
        end: u16,
        reason: &'static str,
    },
    #[error("no free host port left in {start}..{end} ({wanted} needed)")]
    Exhausted { start: u16, end: u16, wanted: usize },
    #[error("port {0} is already allocated to another task")]
    InUse(u16),
    #[error("port 0 is not a port")]
    Zero,
    #[error("host port {port} is in use on this node")]
    HostPortInUse { port: u16 },
    /// Ports could not be checked: the agent is out of file descriptors (or memory).
    #[error("cannot check host ports: the node is out of resources: {reason}")]
    NodeExhausted { reason: String },
}

struct Allocations {
    held: BTreeSet<u16>,
    /// Where the next search starts, so freed ports are not reused immediately.
    cursor: u16,
}

/// Hands out free host ports.
pub struct PortAllocator {
    range: Range<u16>,
    state: Mutex<Allocations>,
}

impl PortAllocator {
    pub fn new(range: Range<u16>) -> Result<Self, PortError> {
        if range.is_empty() {
            return Err(PortError::BadRange {
                start: range.start,
                end: range.end,
                reason: "is empty",
            });
        }
        if range.start == 0 {
            return Err(PortError::BadRange {
                start: range.start,
                end: range.end,
                reason: "must not include port 0",
            });
        }
        Ok(Self::with_checked_range(range))
    }

    /// `range` must be non-empty and exclude port 0.
    fn with_checked_range(range: Range<u16>) -> Self {
        PortAllocator {
            state: Mutex::new(Allocations {
                held: BTreeSet::new(),
                cursor: range.start,
            }),
            range,
        }
    }

    /// Host ports for each of `ports`, all or none. A host-mode port gets its published port
    /// (inside or outside the range), or fails if a live task or another program holds it.
    pub fn allocate(&self, ports: &[PortSpec]) -> Result<Vec<PortBinding>, PortError> {
        let mut state = self.lock();
        // (position in `ports`, binding): results keep the order of `ports`, as `PORT` is the
        // first one.
        let mut chosen: Vec<(usize, PortBinding)> = Vec::with_capacity(ports.len());
        let span = u32::from(self.range.end - self.range.start);
        let mut tried = 0u32;
        // Fixed (host-mode) ports first, so a range search cannot hand one of them to another
        // entry.
        for (i, spec) in ports.iter().enumerate() {
            let Some((port, protocol)) = spec.host_port() else {
                continue;
            };
            let taken =
                state.held.contains(&port) || chosen.iter().any(|(_, b)| b.host_port == port);
            if taken || !bindable(port, protocol)? {
                return Err(PortError::HostPortInUse { port });
            }
            chosen.push((
                i,
                PortBinding {
                    target: spec.target,
                    host_port: port,
                },
            ));
        }
        for (i, spec) in ports.iter().enumerate() {
            if spec.host_port().is_some() {
                continue;
            }
            loop {
                if tried >= span {
                    return Err(PortError::Exhausted {
                        start: self.range.start,
                        end: self.range.end,
                        wanted: ports.len(),
                    });
                }
                tried += 1;
                let port = state.cursor;
                state.cursor = if port + 1 >= self.range.end {
                    self.range.start
                } else {
                    port + 1
                };
                let taken =
                    state.held.contains(&port) || chosen.iter().any(|(_, b)| b.host_port == port);
                if !taken && bindable(port, spec.protocol)? {
                    chosen.push((
                        i,
                        PortBinding {
                            target: spec.target,
                            host_port: port,
                        },
                    ));
                    break;
                }
            }
        }
        chosen.sort_unstable_by_key(|(i, _)| *i);
        state.held.extend(chosen.iter().map(|(_, b)| b.host_port));
        Ok(chosen.into_iter().map(|(_, b)| b).collect())
    }

    /// Marks a port as held by a live task (after recovery). Ports outside the range are
    /// recorded too, so they are released symmetrically.
    pub fn reserve(&self, port: u16) -> Result<(), PortError> {
        if port == 0 {
            return Err(PortError::Zero);
        }
        if !self.lock().held.insert(port) {
            return Err(PortError::InUse(port));
        }
        Ok(())
    }

    /// Returns a port to the pool. Releasing a port that is not held is a no-op.
    pub fn release(&self, port: u16) {
        self.lock().held.remove(&port);
    }

    /// Ports currently held.
    pub fn held(&self) -> Vec<u16> {
        self.lock().held.iter().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Allocations> {
        // The guarded data stays consistent even if a holder panicked: every update is one insert
        // or remove.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for PortAllocator {
    fn default() -> Self {
        // The default range is non-empty and starts above 0.
        Self::with_checked_range(DEFAULT_PORT_RANGE)
    }
}

/// Whether the port can be bound right now (the socket is closed again immediately). A node
/// out of descriptors cannot tell, which is an error of its own rather than a busy port.
fn bindable(port: u16, protocol: PortProtocol) -> Result<bool, PortError> {
    let addr = (Ipv4Addr::UNSPECIFIED, port);
    let bound = match protocol {
        PortProtocol::Tcp => TcpListener::bind(addr).map(drop),
        PortProtocol::Udp => UdpSocket::bind(addr).map(drop),
    };
    match bound {
        Ok(()) => Ok(true),
        Err(e) if flotilla_mesh::conn_limits::is_resource_exhaustion(&e) => {
            Err(PortError::NodeExhausted {
                reason: e.to_string(),
            })
        }
        Err(_) => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(target: u16) -> PortSpec {
        PortSpec {
            target,
            published: None,
            protocol: PortProtocol::Tcp,
            mode: Default::default(),
        }
    }

    #[test]
    fn skips_held_and_busy_ports() {
        // Find a small free range by letting the OS pick a port and using its neighbourhood.
        let busy = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let busy_port = busy.local_addr().unwrap().port();
        let alloc = PortAllocator::new(busy_port..busy_port.saturating_add(5)).unwrap();
        let got = alloc.allocate(&[tcp(80), tcp(443)]).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|b| b.host_port != busy_port), "{got:?}");
        assert_eq!(got[0].target, 80);
        assert_ne!(got[0].host_port, got[1].host_port);
        for b in &got {
            assert_eq!(
                alloc.reserve(b.host_port),
                Err(PortError::InUse(b.host_port))
            );
        }
        alloc.release(got[0].host_port);
        assert!(!alloc.held().contains(&got[0].host_port));
    }

    #[test]
    fn exhaustion_is_all_or_nothing() {
        let probe = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let p = probe.local_addr().unwrap().port();
        drop(probe);
        let alloc = PortAllocator::new(p..p + 1).unwrap();
        let err = alloc.allocate(&[tcp(1), tcp(2)]).unwrap_err();
        assert!(
            matches!(err, PortError::Exhausted { wanted: 2, .. }),
            "{err:?}"
        );
        assert!(alloc.held().is_empty());
    }

    /// A host-mode port is handed out as published (even outside the range), keeps the order of
    /// the spec, and is refused while a live task or another program holds it.
    #[test]
    fn host_mode_ports_bind_the_published_port() {
        let probe = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let fixed = probe.local_addr().unwrap().port();
        drop(probe);
        let range_probe = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let r = range_probe.local_addr().unwrap().port();
        drop(range_probe);
        let alloc = PortAllocator::new(r..r.saturating_add(1)).unwrap();
        let host = PortSpec {
            target: 80,
            published: Some(fixed),
            protocol: PortProtocol::Tcp,
            mode: flotilla_types::PortMode::Host,
        };
        let got = alloc.allocate(&[tcp(9000), host.clone()]).unwrap();
        assert_eq!(got[0].target, 9000);
        assert_eq!(got[1].target, 80);
        assert_eq!(got[1].host_port, fixed);
        // Held by the first task: a second one on this node is refused, and nothing leaks.
        assert_eq!(
            alloc.allocate(std::slice::from_ref(&host)),
            Err(PortError::HostPortInUse { port: fixed })
        );
        alloc.release(fixed);
        alloc.release(got[0].host_port);
        // Held by some other program on the host.
        let squatter = TcpListener::bind((Ipv4Addr::UNSPECIFIED, fixed)).unwrap();
        assert_eq!(
            alloc.allocate(std::slice::from_ref(&host)),
            Err(PortError::HostPortInUse { port: fixed })
        );
        assert!(alloc.held().is_empty());
        drop(squatter);
        assert_eq!(alloc.allocate(&[host]).unwrap()[0].host_port, fixed);
    }

    #[test]
    fn bad_ranges_rejected() {
        assert!(matches!(
            PortAllocator::new(5..5),
            Err(PortError::BadRange { .. })
        ));
        assert!(matches!(
            PortAllocator::new(0..5),
            Err(PortError::BadRange { .. })
        ));
        assert_eq!(PortAllocator::default().reserve(0), Err(PortError::Zero));
    }
}
