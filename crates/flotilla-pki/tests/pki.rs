//! The PKI end to end: certificates issued by the built-in CA, used in real TLS handshakes over
//! TCP sockets, rotated, renewed and pinned by join tokens.
// Test helpers outside #[test] fns: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use flotilla_pki::{
    bootstrap_client_config, fetched_ca_matches, identity_of, CaBundle, CaSigner, JoinSecrets,
    JoinToken, NodeCredentials, NodeIdentity, NodeKey, Role, TlsIdentity, NODE_CERT_VALIDITY,
};
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn issue(ca: &CaBundle, node_id: &str, role: Role, validity: Duration) -> NodeCredentials {
    let key = NodeKey::generate().unwrap();
    let csr = key.csr_pem(node_id).unwrap();
    let identity = NodeIdentity {
        node_id: node_id.into(),
        role,
    };
    let cert_pem = ca
        .signer
        .issue(&csr, &identity, &["127.0.0.1".into()], validity)
        .unwrap();
    NodeCredentials {
        cert_pem,
        key_pem: key.key_pem(),
        trust_pem: ca.trust_pem(),
    }
}

/// Serves one TLS connection; returns the identity of the client certificate, if any.
async fn serve_once(
    server: Arc<TlsIdentity>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<Option<NodeIdentity>, String>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config().unwrap());
    let handle = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first().cloned());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok(peer.map(|der| identity_of(&der).unwrap()))
    });
    (addr, handle)
}

async fn ping(config: rustls::ClientConfig, addr: std::net::SocketAddr) -> Result<(), String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn certificates_carry_node_id_and_role() {
    let ca = CaBundle::generate("test").unwrap();
    let creds = issue(&ca, "mgr-1", Role::Manager, NODE_CERT_VALIDITY);
    assert_eq!(
        creds.identity().unwrap(),
        NodeIdentity {
            node_id: "mgr-1".into(),
            role: Role::Manager
        }
    );
    creds.verify().unwrap();
    let worker = issue(&ca, "w-1", Role::Worker, NODE_CERT_VALIDITY);
    assert_eq!(worker.identity().unwrap().role, Role::Worker);
    // The CA root itself names no node.
    let root = rustls::pki_types::pem::PemObject::from_pem_slice(ca.signer.cert_pem().as_bytes())
        .map(|d: rustls::pki_types::CertificateDer<'static>| d)
        .unwrap();
    let err = identity_of(&root).unwrap_err().to_string();
    assert!(err.contains("subjectAltName"), "{err}");
}

#[test]
fn the_csr_cannot_choose_its_identity() {
    let ca = CaBundle::generate("test").unwrap();
    let key = NodeKey::generate().unwrap();
    // The joiner asks to be called "mgr-evil"; the CA names it what the token allowed.
    let csr = key.csr_pem("mgr-evil").unwrap();
    let identity = NodeIdentity {
        node_id: "w-7".into(),
        role: Role::Worker,
    };
    let cert = ca
        .signer
        .issue(&csr, &identity, &[], NODE_CERT_VALIDITY)
        .unwrap();
    let creds = NodeCredentials {
        cert_pem: cert,
        key_pem: key.key_pem(),
        trust_pem: ca.trust_pem(),
    };
    assert_eq!(creds.identity().unwrap(), identity);
}

#[tokio::test]
async fn mutual_tls_identifies_the_client_and_requires_a_manager_server() {
    let ca = CaBundle::generate("test").unwrap();
    let manager = TlsIdentity::new(issue(&ca, "mgr-1", Role::Manager, NODE_CERT_VALIDITY)).unwrap();
    let worker = TlsIdentity::new(issue(&ca, "w-1", Role::Worker, NODE_CERT_VALIDITY)).unwrap();

    let (addr, server) = serve_once(manager.clone()).await;
    ping(worker.client_config().unwrap(), addr).await.unwrap();
    assert_eq!(
        server.await.unwrap().unwrap(),
        Some(NodeIdentity {
            node_id: "w-1".into(),
            role: Role::Worker
        })
    );

    // A worker certificate cannot serve as a manager.
    let (addr, server) = serve_once(worker.clone()).await;
    let err = ping(manager.client_config().unwrap(), addr)
        .await
        .unwrap_err();
    assert!(err.contains("only managers"), "{err}");
    server.abort();
}

#[tokio::test]
async fn a_foreign_ca_is_refused_both_ways() {
    let ours = CaBundle::generate("ours").unwrap();
    let theirs = CaBundle::generate("theirs").unwrap();
    let manager =
        TlsIdentity::new(issue(&ours, "mgr-1", Role::Manager, NODE_CERT_VALIDITY)).unwrap();
    let intruder =
        TlsIdentity::new(issue(&theirs, "mgr-x", Role::Manager, NODE_CERT_VALIDITY)).unwrap();

    // Client from another cluster: the server refuses its certificate.
    let (addr, server) = serve_once(manager.clone()).await;
    let client_result = ping(intruder.client_config().unwrap(), addr).await;
    let server_result = server.await.unwrap();
    assert!(
        client_result.is_err() || server_result.is_err(),
        "a foreign client certificate was accepted"
    );
    assert!(server_result.is_err());

    // Server from another cluster: our client refuses it.
    let (addr, server) = serve_once(intruder).await;
    let err = ping(manager.client_config().unwrap(), addr)
        .await
        .unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("invalid peer certificate"),
        "{err}"
    );
    server.abort();
}

#[tokio::test]
async fn root_rotation_trusts_old_and_new_until_retired() {
    let mut ca = CaBundle::generate("test").unwrap();
    let old = issue(&ca, "mgr-1", Role::Manager, NODE_CERT_VALIDITY);
    let old_digest = ca.signer.digest().unwrap();

    ca.rotate("test").unwrap();
    assert_ne!(ca.signer.digest().unwrap(), old_digest);
    let new = issue(&ca, "w-1", Role::Worker, NODE_CERT_VALIDITY);
    // During the rotation an old-root certificate still verifies against the new bundle.
    let old_with_new_trust = NodeCredentials {
        trust_pem: ca.trust_pem(),
        ..old.clone()
    };
    old_with_new_trust.verify().unwrap();
    new.verify().unwrap();

    // Handshake between an old-root server and a new-root client, both trusting both roots.
    let server = TlsIdentity::new(old_with_new_trust).unwrap();
    let client = TlsIdentity::new(new.clone()).unwrap();
    let (addr, handle) = serve_once(server).await;
    ping(client.client_config().unwrap(), addr).await.unwrap();
    assert_eq!(handle.await.unwrap().unwrap().unwrap().node_id, "w-1");

    ca.retire_old_roots();
    let stale = NodeCredentials {
        trust_pem: ca.trust_pem(),
        ..old
    };
    assert!(stale.verify().is_err(), "retired root still trusted");
    NodeCredentials {
        trust_pem: ca.trust_pem(),
        ..new
    }
    .verify()
    .unwrap();
}

#[tokio::test]
async fn renewal_swaps_credentials_in_running_configs() {
    let ca = CaBundle::generate("test").unwrap();
    let short = issue(&ca, "mgr-1", Role::Manager, Duration::from_secs(30));
    // The lifetime counts from issue, not from the back-dated notBefore: a fresh 30 s
    // certificate is not due yet, and is once less than 10 s are left.
    assert!(!short.needs_renewal(SystemTime::now()).unwrap());
    assert_eq!(short.lifetime().unwrap(), Duration::from_secs(30));
    assert!(short
        .needs_renewal(SystemTime::now() + Duration::from_secs(25))
        .unwrap());
    let long = issue(&ca, "mgr-1", Role::Manager, NODE_CERT_VALIDITY);
    assert!(!long.needs_renewal(SystemTime::now()).unwrap());
    assert!(long
        .needs_renewal(SystemTime::now() + NODE_CERT_VALIDITY)
        .unwrap());

    let identity = TlsIdentity::new(short).unwrap();
    let server_config = identity.server_config().unwrap();
    identity.replace(long.clone()).unwrap();
    assert_eq!(identity.credentials().cert_pem, long.cert_pem);
    // The config built before the swap serves the new certificate.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(bootstrap_client_config().unwrap()));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap();
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let expected: rustls::pki_types::CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(long.cert_pem.as_bytes()).unwrap();
    assert_eq!(served, expected);
    drop(tls);
    server.await.unwrap();

    // Renewed credentials must name the same node.
    let other = issue(&ca, "mgr-2", Role::Manager, NODE_CERT_VALIDITY);
    let err = identity.replace(other).unwrap_err().to_string();
    assert!(err.contains("mgr-2"), "{err}");
}

#[test]
fn join_tokens_pin_the_ca_and_rotate() {
    let ca = CaBundle::generate("test").unwrap();
    let digest = ca.signer.digest().unwrap();
    let mut secrets = JoinSecrets::generate();
    let worker = secrets.token(Role::Worker, &digest);
    let manager = secrets.token(Role::Manager, &digest);
    assert_ne!(worker, manager);

    let text = worker.to_string();
    assert!(text.starts_with("FLTKN-1-"), "{text}");
    let parsed: JoinToken = text.parse().unwrap();
    assert_eq!(parsed, worker);
    assert_eq!(secrets.role_of(&parsed, &digest).unwrap(), Role::Worker);
    assert_eq!(secrets.role_of(&manager, &digest).unwrap(), Role::Manager);
    assert!(!format!("{parsed:?}").contains(&parsed.secret));

    secrets.rotate(Role::Worker);
    let err = secrets.role_of(&worker, &digest).unwrap_err().to_string();
    assert!(err.contains("rotated"), "{err}");
    assert_eq!(secrets.role_of(&manager, &digest).unwrap(), Role::Manager);

    let other_ca = CaBundle::generate("other").unwrap();
    let err = secrets
        .role_of(&manager, &other_ca.signer.digest().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("different cluster CA"), "{err}");

    let round = JoinSecrets::from_file_contents(&secrets.to_file_contents()).unwrap();
    assert_eq!(round, secrets);
    assert!(JoinSecrets::from_file_contents("worker:abc\n").is_err());

    fetched_ca_matches(ca.signer.cert_pem(), &digest).unwrap();
    let err = fetched_ca_matches(other_ca.signer.cert_pem(), &digest)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not the one the token pins"), "{err}");
}

#[test]
fn malformed_tokens_say_what_is_wrong() {
    let digest = "a".repeat(64);
    let secret = "b".repeat(32);
    for (token, why) in [
        ("", "does not start with FLTKN-"),
        ("SWMTKN-1-x-y", "does not start with FLTKN-"),
        (&format!("FLTKN-2-{digest}-{secret}") as &str, "version"),
        (&format!("FLTKN-1-{}-{secret}", "a".repeat(10)), "CA digest"),
        (&format!("FLTKN-1-{digest}-XYZ"), "secret"),
        (&format!("FLTKN-1-{digest}-{secret}-extra"), "too many"),
    ] {
        let err = token.parse::<JoinToken>().unwrap_err().to_string();
        assert!(err.contains(why), "{token:?}: {err}");
    }
}

#[test]
fn ca_and_credentials_survive_a_save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = CaBundle::generate("test").unwrap();
    ca.rotate("test").unwrap();
    ca.save(dir.path()).unwrap();
    assert!(CaBundle::exists(dir.path()));
    let loaded = CaBundle::load(dir.path()).unwrap();
    assert_eq!(loaded.trust_pem(), ca.trust_pem());
    assert_eq!(loaded.signer.digest().unwrap(), ca.signer.digest().unwrap());
    // The reloaded signer issues certificates the original root's bundle trusts.
    let creds = issue(&loaded, "mgr-1", Role::Manager, NODE_CERT_VALIDITY);
    NodeCredentials {
        trust_pem: ca.trust_pem(),
        ..creds.clone()
    }
    .verify()
    .unwrap();

    let node_dir = dir.path().join("node");
    creds.save(&node_dir).unwrap();
    let back = NodeCredentials::load(&node_dir).unwrap();
    assert_eq!(back.cert_pem, creds.cert_pem);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node_dir.join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "node key readable by others: {mode:o}");

    let other = CaSigner::generate("other").unwrap();
    let err = CaSigner::from_pem(ca.signer.cert_pem(), &other.key_pem())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("does not match"), "{err}");
}
