//! Service discovery over DNS: `A` queries for `<service>.flotilla` and `<service>.internal`
//! are answered with the mesh address. Other names are forwarded to upstream resolvers when
//! some are given (so a container can use the responder as its only DNS server), else
//! answered NXDOMAIN.

use hickory_proto::op::{Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

/// TTL of answers: short, as the set of services changes with deploys.
const TTL_SECS: u32 = 5;
/// Domains the mesh answers for.
const ZONES: [&str; 2] = ["flotilla", "internal"];

/// How long one upstream resolver gets to answer a forwarded query.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Forwarded queries waiting for an upstream at once; more are dropped (clients retry).
const MAX_FORWARDS: usize = 256;
/// Largest reply relayed from an upstream (EDNS clients may ask for more than 512 bytes).
const MAX_UDP_REPLY: usize = 4096;

/// Answers queries on `socket` until it fails. `known` says whether a service name exists.
/// Queries for names outside the mesh's zones go to `upstreams` in order (the first answer
/// wins), but only from clients on this host or its private networks, so the responder is no
/// open resolver; without upstreams they get NXDOMAIN.
pub async fn serve(
    socket: UdpSocket,
    known: impl Fn(&str) -> bool + Send + Sync + 'static,
    answer_ip: Ipv4Addr,
    upstreams: Vec<SocketAddr>,
) -> io::Result<()> {
    let socket = Arc::new(socket);
    let upstreams: Arc<[SocketAddr]> = upstreams.into();
    let forwards = Arc::new(Semaphore::new(MAX_FORWARDS));
    let mut buf = [0u8; 512];
    loop {
        let (len, from) = socket.recv_from(&mut buf).await?;
        let forward = !upstreams.is_empty() && may_forward_for(from.ip());
        let reply = match answer(&buf[..len], &known, answer_ip, forward) {
            Reply::Ignore => continue,
            Reply::Send(reply) => reply,
            Reply::Forward(header) => {
                let Ok(permit) = forwards.clone().try_acquire_owned() else {
                    tracing::debug!(%from, "too many forwarded dns queries; dropped one");
                    continue;
                };
                let (query, socket, upstreams) =
                    (buf[..len].to_vec(), socket.clone(), upstreams.clone());
                tokio::spawn(async move {
                    let reply = match relay(&query, &upstreams).await {
                        Some(reply) => reply,
                        None => failure(&header, ResponseCode::ServFail),
                    };
                    if let Err(e) = socket.send_to(&reply, from).await {
                        tracing::debug!(%from, error = %e, "dns reply not sent");
                    }
                    drop(permit);
                });
                continue;
            }
        };
        if let Err(e) = socket.send_to(&reply, from).await {
            tracing::debug!(%from, error = %e, "dns reply not sent");
        }
    }
}

/// Clients whose other queries are forwarded: this host and private networks (containers on
/// bridge networks).
fn may_forward_for(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || (v6.segments()[0] & 0xfe00) == 0xfc00 // unique local
                || (v6.segments()[0] & 0xffc0) == 0xfe80 // link local
        }
    }
}

/// Sends `query` to each upstream in turn until one answers it.
async fn relay(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let local: SocketAddr = match upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let exchange = async {
            let socket = UdpSocket::bind(local).await?;
            socket.connect(upstream).await?;
            socket.send(query).await?;
            let mut buf = vec![0u8; MAX_UDP_REPLY];
            loop {
                let n = socket.recv(&mut buf).await?;
                // Only the reply to this query (same id) counts.
                if n >= 12 && buf[..2] == query[..2] {
                    buf.truncate(n);
                    return Ok::<_, io::Error>(buf);
                }
            }
        };
        match tokio::time::timeout(FORWARD_TIMEOUT, exchange).await {
            Ok(Ok(reply)) => return Some(reply),
            Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "upstream dns failed"),
            Err(_) => tracing::debug!(%upstream, "upstream dns did not answer"),
        }
    }
    None
}

/// The nameservers of a `resolv.conf` text, on port 53.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (`fe80::1%eth0`) is left out: its scope means nothing here.
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// What to do with one datagram.
enum Reply {
    /// Not a query: answering it could start a loop.
    Ignore,
    Send(Vec<u8>),
    /// A name outside the mesh's zones, for an upstream resolver; the header answers with
    /// SERVFAIL when none does.
    Forward(Header),
}

/// The reply to `query` (its header) with `rcode` and nothing else.
fn failure(query: &Header, rcode: ResponseCode) -> Vec<u8> {
    let mut header = Header::response_from_request(query);
    header.set_recursion_available(true);
    header.set_response_code(rcode);
    encode(Message::new().set_header(header))
}

/// The wire form of `message`; a message this module builds always encodes, the fallback is
/// an empty (ignored) reply.
fn encode(message: &Message) -> Vec<u8> {
    message.to_vec().unwrap_or_else(|e| {
        tracing::debug!(error = %e, "dns reply not encoded");
        Vec::new()
    })
}

/// The lowercase service name of a name in one of the mesh's zones (`""` for a zone itself),
/// `None` for a name outside them.
fn in_zone(name: &Name) -> Option<String> {
    let mut labels: Vec<String> = name
        .iter()
        .map(|label| String::from_utf8_lossy(label).to_ascii_lowercase())
        .collect();
    let zone = labels.pop()?;
    ZONES.contains(&zone.as_str()).then(|| labels.join("."))
}

/// The reply to one query; names outside the mesh's zones are forwarded when `forward` is set.
fn answer(query: &[u8], known: &impl Fn(&str) -> bool, ip: Ipv4Addr, forward: bool) -> Reply {
    let Ok(header) = Header::read(&mut BinDecoder::new(query)) else {
        return Reply::Ignore;
    };
    if header.message_type() == MessageType::Response {
        return Reply::Ignore; // answering it could start a loop
    }
    if header.op_code() != OpCode::Query {
        return Reply::Send(failure(&header, ResponseCode::NotImp));
    }
    let question = Message::from_vec(query)
        .ok()
        .and_then(|m| (m.queries().len() == 1).then(|| m.queries()[0].clone()));
    let Some(question) = question else {
        return Reply::Send(failure(&header, ResponseCode::FormErr));
    };
    let zone_name = in_zone(question.name());
    if zone_name.is_none() && forward {
        return Reply::Forward(header);
    }
    let service = zone_name.filter(|s| !s.is_empty() && !s.contains('.') && known(s));
    let mut reply = Header::response_from_request(&header);
    // The mesh is the authority for its zones.
    reply.set_authoritative(true);
    reply.set_response_code(match service {
        Some(_) => ResponseCode::NoError,
        None => ResponseCode::NXDomain,
    });
    let mut message = Message::new();
    message.set_header(reply);
    let answers = service.is_some()
        && question.query_class() == DNSClass::IN
        && matches!(question.query_type(), RecordType::A | RecordType::ANY);
    if answers {
        let name = question.name().clone();
        message.add_answer(Record::from_rdata(name, TTL_SECS, RData::A(A(ip))));
    }
    message.add_query(question);
    Reply::Send(encode(&message))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE_A: u16 = 1;
    const CLASS_IN: u16 = 1;
    const RCODE_FORMERR: u8 = 1;
    const RCODE_NXDOMAIN: u8 = 3;

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut q = Vec::new();
        q.extend_from_slice(&id.to_be_bytes());
        q.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
        q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    fn rcode(reply: &[u8]) -> u8 {
        reply[3] & 0xF
    }

    #[tokio::test]
    async fn answers_known_services_over_udp() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let ip = Ipv4Addr::new(10, 9, 8, 7);
        let task = tokio::spawn(serve(server, |name| name == "web", ip, Vec::new()));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        let mut buf = [0u8; 512];

        for name in ["web.flotilla", "WEB.internal"] {
            client.send(&query(0x1234, name, TYPE_A)).await.unwrap();
            let n = client.recv(&mut buf).await.unwrap();
            let reply = &buf[..n];
            assert_eq!(&reply[..2], &[0x12, 0x34]);
            assert_eq!(rcode(reply), 0);
            assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), 1, "one answer");
            assert_eq!(&reply[n - 4..], &ip.octets());
        }
        for name in ["db.flotilla", "web.example", "a.web.flotilla", "flotilla"] {
            client.send(&query(7, name, TYPE_A)).await.unwrap();
            let n = client.recv(&mut buf).await.unwrap();
            assert_eq!(rcode(&buf[..n]), RCODE_NXDOMAIN, "{name}");
        }
        // AAAA for a known name: the name exists, it just has no IPv6 address.
        client.send(&query(8, "web.flotilla", 28)).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!((rcode(&buf[..n]), buf[7]), (0, 0));
        // Garbage: too short is ignored, a truncated question gets FORMERR; the server lives on.
        client.send(&[1, 2, 3]).await.unwrap();
        let mut bad = query(9, "web.flotilla", TYPE_A);
        bad.truncate(20);
        client.send(&bad).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(rcode(&buf[..n]), RCODE_FORMERR);
        client
            .send(&query(10, "web.flotilla", TYPE_A))
            .await
            .unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(rcode(&buf[..n]), 0);
        task.abort();
    }

    #[tokio::test]
    async fn other_names_go_to_the_upstream_resolver() {
        // A fake upstream that answers every query with its id and rcode 0.
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        let fake = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, from) = upstream.recv_from(&mut buf).await.unwrap();
                let mut reply = buf[..n].to_vec();
                reply[2] |= 0x80;
                reply.extend_from_slice(b"upstream");
                upstream.send_to(&reply, from).await.unwrap();
            }
        });
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let ip = Ipv4Addr::new(10, 9, 8, 7);
        // The second upstream is never asked: the first answers.
        let dead: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let task = tokio::spawn(serve(
            server,
            |name| name == "web",
            ip,
            vec![upstream_addr, dead],
        ));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        let mut buf = [0u8; 512];
        client
            .send(&query(0x4242, "example.com", TYPE_A))
            .await
            .unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..2], &[0x42, 0x42]);
        assert!(buf[..n].ends_with(b"upstream"), "relayed as is");
        // The mesh's own zones are still answered here, unknown services included.
        client
            .send(&query(1, "web.flotilla", TYPE_A))
            .await
            .unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[n - 4..n], &ip.octets());
        client.send(&query(2, "db.internal", TYPE_A)).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(rcode(&buf[..n]), RCODE_NXDOMAIN);
        task.abort();
        fake.abort();
    }

    #[test]
    fn forwarding_only_for_local_and_private_clients() {
        for ip in ["127.0.0.1", "172.18.0.5", "10.1.2.3", "::1", "fd00::5"] {
            assert!(may_forward_for(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "2001:db8::1"] {
            assert!(!may_forward_for(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn resolv_conf_nameservers() {
        let conf = "# generated\nsearch example.com\nnameserver 10.0.0.2\nnameserver ::1\n\
                    nameserver fe80::1%eth0\noptions ndots:0\n";
        assert_eq!(
            nameservers(conf),
            [
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
