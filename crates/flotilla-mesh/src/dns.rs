//! Service discovery over DNS: `A` queries for `<service>.flotilla` and `<service>.internal`
//! are answered with the mesh address; anything else is NXDOMAIN.

use std::io;
use std::net::Ipv4Addr;
use tokio::net::UdpSocket;

/// TTL of answers: short, as the set of services changes with deploys.
const TTL_SECS: u32 = 5;
const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const RCODE_FORMERR: u8 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;
/// Domains the mesh answers for.
const ZONES: [&str; 2] = ["flotilla", "internal"];

/// Answers queries on `socket` until it fails. `known` says whether a service name exists.
pub async fn serve(
    socket: UdpSocket,
    known: impl Fn(&str) -> bool + Send + Sync + 'static,
    answer_ip: Ipv4Addr,
) -> io::Result<()> {
    let mut buf = [0u8; 512];
    loop {
        let (len, from) = socket.recv_from(&mut buf).await?;
        if let Some(reply) = answer(&buf[..len], &known, answer_ip) {
            if let Err(e) = socket.send_to(&reply, from).await {
                tracing::debug!(%from, error = %e, "dns reply not sent");
            }
        }
    }
}

struct Question {
    /// Labels joined by '.', lowercase.
    name: String,
    qtype: u16,
    qclass: u16,
    /// Where the question section ends in the query.
    end: usize,
}

/// Reads the single question of a query; `None` when it is malformed.
fn parse_question(msg: &[u8]) -> Option<Question> {
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*msg.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        // Compression pointers and extended label types have no place in a question.
        if len > 63 {
            return None;
        }
        let label = msg.get(pos..pos + len)?;
        labels.push(std::str::from_utf8(label).ok()?.to_ascii_lowercase());
        pos += len;
    }
    let fixed = msg.get(pos..pos + 4)?;
    Some(Question {
        name: labels.join("."),
        qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
        qclass: u16::from_be_bytes([fixed[2], fixed[3]]),
        end: pos + 4,
    })
}

/// The reply to one query, or `None` for input that is not a query at all.
fn answer(query: &[u8], known: &impl Fn(&str) -> bool, ip: Ipv4Addr) -> Option<Vec<u8>> {
    let header = query.get(..12)?;
    let flags = u16::from_be_bytes([header[2], header[3]]);
    if flags & 0x8000 != 0 {
        return None; // a response; answering it could start a loop
    }
    let opcode = (flags >> 11) & 0xF;
    let qdcount = u16::from_be_bytes([header[4], header[5]]);
    let question = if qdcount == 1 {
        parse_question(query)
    } else {
        None
    };
    let mut reply = Vec::with_capacity(64);
    reply.extend_from_slice(&header[..2]);
    // QR, the query's opcode and RD; AA because the mesh is the authority for its zones.
    let reply_flags = 0x8000 | (opcode << 11) | 0x0400 | (flags & 0x0100);
    let Some(q) = question.filter(|_| opcode == 0) else {
        let rcode = if opcode == 0 {
            RCODE_FORMERR
        } else {
            RCODE_NOTIMP
        };
        reply.extend_from_slice(&(reply_flags | u16::from(rcode)).to_be_bytes());
        reply.extend_from_slice(&[0; 8]);
        return Some(reply);
    };
    let service = ZONES
        .iter()
        .find_map(|zone| q.name.strip_suffix(zone)?.strip_suffix('.'))
        .filter(|s| !s.is_empty() && !s.contains('.') && known(s));
    let answers = service.is_some() && q.qclass == CLASS_IN && matches!(q.qtype, TYPE_A | TYPE_ANY);
    let rcode = if service.is_some() { 0 } else { RCODE_NXDOMAIN };
    reply.extend_from_slice(&(reply_flags | u16::from(rcode)).to_be_bytes());
    reply.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    reply.extend_from_slice(&u16::from(answers).to_be_bytes()); // ANCOUNT
    reply.extend_from_slice(&[0; 4]); // NSCOUNT, ARCOUNT
    reply.extend_from_slice(&query[12..q.end]);
    if answers {
        reply.extend_from_slice(&[0xC0, 12]); // name: pointer to the question
        reply.extend_from_slice(&TYPE_A.to_be_bytes());
        reply.extend_from_slice(&CLASS_IN.to_be_bytes());
        reply.extend_from_slice(&TTL_SECS.to_be_bytes());
        reply.extend_from_slice(&4u16.to_be_bytes());
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let task = tokio::spawn(serve(server, |name| name == "web", ip));
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
}
