//! rustls configurations for the cluster's mutual TLS, with credentials that can be swapped at
//! run time (certificate renewal, root rotation) without rebuilding listeners or clients.

use crate::ca::{all_ders, der_digest, identity_of, NodeCredentials, NodeIdentity, Role};
use crate::PkiError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Signature check with ring's algorithms, as [`provider`] configures; `verify` is rustls's
/// TLS 1.2 or 1.3 check.
fn verify_with_ring(
    verify: fn(
        &[u8],
        &CertificateDer<'_>,
        &DigitallySignedStruct,
        &rustls::crypto::WebPkiSupportedAlgorithms,
    ) -> Result<HandshakeSignatureValid, rustls::Error>,
    signed: (&[u8], &CertificateDer<'_>, &DigitallySignedStruct),
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let (message, cert, dss) = signed;
    verify(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

/// The handshake-signature half of a certificate verifier, the same for every verifier here
/// (client or server side). A macro because `ClientCertVerifier` and `ServerCertVerifier` are
/// separate traits with identically named methods.
macro_rules! handshake_signatures_with_ring {
    () => {
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_with_ring(verify_tls12_signature, (m, c, d))
        }

        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_with_ring(verify_tls13_signature, (m, c, d))
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Refuses a certificate of any role but manager: `what` names the side, `only` what managers
/// alone may do.
fn require_manager(identity: &NodeIdentity, what: &str, only: &str) -> Result<(), rustls::Error> {
    if identity.role == Role::Manager {
        return Ok(());
    }
    Err(other_error(PkiError::BadCertificate {
        what: what.into(),
        reason: format!(
            "node {} presents a {} certificate; only managers {only}",
            identity.node_id, identity.role
        ),
    }))
}

fn root_store(trust_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for der in all_ders(trust_pem, "trusted roots")? {
        roots.add(der)?;
    }
    Ok(roots)
}

/// Checks that `cert_pem` chains to a root in `trust_pem` and is valid now.
pub(crate) fn verify_chain(cert_pem: &str, trust_pem: &str) -> Result<(), PkiError> {
    let roots = root_store(trust_pem)?;
    let chain = all_ders(cert_pem, "node")?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| PkiError::BadCertificate {
            what: "node".into(),
            reason: "empty chain".into(),
        })?;
    let parsed = ParsedCertificate::try_from(leaf)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        intermediates,
        UnixTime::now(),
        provider().signature_verification_algorithms.all,
    )?;
    Ok(())
}

/// The current credentials in the forms rustls wants.
struct Loaded {
    creds: NodeCredentials,
    certified: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl Loaded {
    fn new(creds: NodeCredentials) -> Result<Loaded, PkiError> {
        creds.verify()?;
        let provider = provider();
        let chain = all_ders(&creds.cert_pem, "node")?;
        let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes())
            .map_err(|e| PkiError::BadKey(format!("not a PEM private key: {e}")))?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| PkiError::BadKey(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| PkiError::BadKey(format!("key does not match the certificate: {e}")))?;
        let roots = Arc::new(root_store(&creds.trust_pem)?);
        // Client certificates are optional at the TLS layer: CLI users may authenticate with
        // the bearer token instead. A presented certificate must chain to the cluster CA; the API
        // then authorises by the identity in it.
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .allow_unauthenticated()
                .build()?;
        Ok(Loaded {
            creds,
            certified: Arc::new(certified),
            roots,
            client_verifier,
        })
    }
}

/// This node's TLS identity. Renewal or a new trust bundle go through [`TlsIdentity::replace`];
/// every config built from it picks the change up on the next handshake.
pub struct TlsIdentity {
    identity: NodeIdentity,
    current: RwLock<Arc<Loaded>>,
    /// Removed nodes: node id → last second (epoch) of revoked certificates. Client
    /// certificates of these are refused in the handshake ([`TlsIdentity::set_revocations`]).
    revoked: RwLock<Arc<BTreeMap<String, u64>>>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("identity", &self.identity)
            .finish()
    }
}

impl TlsIdentity {
    pub fn new(creds: NodeCredentials) -> Result<Arc<TlsIdentity>, PkiError> {
        let identity = creds.identity()?;
        Ok(Arc::new(TlsIdentity {
            identity,
            current: RwLock::new(Arc::new(Loaded::new(creds)?)),
            revoked: RwLock::default(),
        }))
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    fn loaded(&self) -> Arc<Loaded> {
        // A poisoned lock only means a writer panicked after validating; the value is whole.
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn credentials(&self) -> NodeCredentials {
        self.loaded().creds.clone()
    }

    /// Swaps in renewed credentials. They must be valid and name the same node.
    pub fn replace(&self, creds: NodeCredentials) -> Result<(), PkiError> {
        let identity = creds.identity()?;
        if identity.node_id != self.identity.node_id {
            return Err(PkiError::BadCertificate {
                what: "renewed".into(),
                reason: format!(
                    "names node {:?}, but this is node {:?}",
                    identity.node_id, self.identity.node_id
                ),
            });
        }
        let loaded = Arc::new(Loaded::new(creds)?);
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = loaded;
        Ok(())
    }

    /// Replaces the revocation list (removed nodes and the last second of their revoked
    /// certificates): agent servers have no store, so nodes keep this up to date from the
    /// managers and it applies from the next handshake.
    pub fn set_revocations(&self, revoked: BTreeMap<String, u64>) {
        *self
            .revoked
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(revoked);
    }

    /// Refuses a certificate of a removed node issued at or before its removal.
    fn check_revoked(&self, identity: &NodeIdentity, cert_der: &[u8]) -> Result<(), PkiError> {
        let revoked = self
            .revoked
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        match revoked.get(&identity.node_id) {
            Some(at) if crate::issued_at_of(cert_der)? <= *at => Err(PkiError::BadCertificate {
                what: "client".into(),
                reason: format!(
                    "the certificate of node {} was revoked (the node was removed)",
                    identity.node_id
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Server side: presents our certificate; verifies client certificates when offered.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, PkiError> {
        self.serving(false)
    }

    /// Client side: presents our certificate and accepts only servers whose certificate chains
    /// to the cluster CA and names a manager.
    pub fn client_config(self: &Arc<Self>) -> Result<ClientConfig, PkiError> {
        Ok(ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ManagerServerVerifier(
                TrustedRoots::Current(self.clone()),
            )))
            .with_client_cert_resolver(Arc::new(CurrentCert(self.clone()))))
    }

    /// The agent server of a cluster node: presents our certificate and admits only clients
    /// with a manager certificate of the cluster.
    pub fn agent_server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, PkiError> {
        self.serving(true)
    }

    /// A server presenting our certificate; `managers_only`: a manager client certificate is
    /// required, otherwise a client certificate is checked when offered.
    fn serving(self: &Arc<Self>, managers_only: bool) -> Result<Arc<ServerConfig>, PkiError> {
        let verifier = ClusterClientVerifier {
            identity: self.clone(),
            managers_only,
        };
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(CurrentCert(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A manager's client for agent servers: presents our certificate and accepts any node
    /// certificate of the cluster (agents on workers hold worker certificates).
    pub fn agent_client_config(self: &Arc<Self>) -> Result<ClientConfig, PkiError> {
        Ok(ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NodeServerVerifier(self.clone())))
            .with_client_cert_resolver(Arc::new(CurrentCert(self.clone()))))
    }
}

#[derive(Debug)]
struct CurrentCert(Arc<TlsIdentity>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.loaded().certified.clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.loaded().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks client certificates against the cluster CA (as currently loaded, so rotations and
/// renewals apply). With `managers_only` (the agent server, whose only legitimate clients are
/// managers: log proxying, mesh stats for releases, resource updates) a certificate is required
/// and must name a manager; otherwise (the cluster API, which also serves bearer-token and
/// loopback callers) one is checked when offered.
#[derive(Debug)]
struct ClusterClientVerifier {
    identity: Arc<TlsIdentity>,
    managers_only: bool,
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.managers_only
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would borrow from the swappable state; clients send their only
        // certificate regardless, so none are needed.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.identity.loaded().client_verifier.verify_client_cert(
            end_entity,
            intermediates,
            now,
        )?;
        let identity = identity_of(end_entity).map_err(other_error)?;
        // Agent servers only: the cluster API refuses revoked certificates itself, from the
        // store, with a 403 that says why.
        if self.managers_only {
            self.identity
                .check_revoked(&identity, end_entity)
                .map_err(other_error)?;
        }
        if self.managers_only {
            require_manager(&identity, "client", "may call agents")?;
        }
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures_with_ring!();
}

/// Verifies the chain against the current roots, then requires a manager identity. Host names
/// are not checked: nodes are reached by whatever address they advertise, and the identity in
/// the certificate is what matters.
#[derive(Debug)]
enum TrustedRoots {
    /// Follows the node's credentials through renewals and rotations.
    Current(Arc<TlsIdentity>),
    /// A joiner's pinned CA, before it has credentials.
    Fixed(Arc<RootCertStore>),
}

#[derive(Debug)]
struct ManagerServerVerifier(TrustedRoots);

fn other_error(e: PkiError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

/// Checks that a server certificate chains to `roots` and is valid `now`; returns the node
/// identity it names.
fn server_identity(
    roots: &RootCertStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<NodeIdentity, rustls::Error> {
    let parsed = ParsedCertificate::try_from(end_entity)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        now,
        provider().signature_verification_algorithms.all,
    )?;
    identity_of(end_entity).map_err(other_error)
}

/// Accepts any node of the cluster (worker or manager): agents serve with their own node
/// certificate, whatever their role.
#[derive(Debug)]
struct NodeServerVerifier(Arc<TlsIdentity>);

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        server_identity(&self.0.loaded().roots, end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_with_ring!();
}

impl ServerCertVerifier for ManagerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = match &self.0 {
            TrustedRoots::Current(identity) => identity.loaded().roots.clone(),
            TrustedRoots::Fixed(roots) => roots.clone(),
        };
        let identity = server_identity(&roots, end_entity, intermediates, now)?;
        require_manager(&identity, "server", "serve the cluster API")?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_with_ring!();
}

/// Accepts any server certificate (signatures are still checked). Used by a joining node for
/// exactly one request, fetching the CA root, whose digest it then compares with the one pinned
/// in its join token ([`fetched_ca_matches`]); everything after that uses the pinned CA.
#[derive(Debug)]
struct TrustOnFirstUse;

impl ServerCertVerifier for TrustOnFirstUse {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_with_ring!();
}

/// The client config for fetching the CA root before it is known (see [`TrustOnFirstUse`]).
pub fn bootstrap_client_config() -> Result<ClientConfig, PkiError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustOnFirstUse))
        .with_no_client_auth())
}

/// A client without a certificate that trusts only managers of the CA in `trust_pem`: what a
/// joining node uses once it has pinned the CA and before it has its own certificate.
pub fn pinned_client_config(trust_pem: &str) -> Result<ClientConfig, PkiError> {
    let roots = Arc::new(root_store(trust_pem)?);
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ManagerServerVerifier(TrustedRoots::Fixed(
            roots,
        ))))
        .with_no_client_auth())
}

/// Checks that the first certificate of a fetched CA bundle is the root the token pins.
pub fn fetched_ca_matches(ca_pem: &str, pinned_digest: &str) -> Result<(), PkiError> {
    let first = all_ders(ca_pem, "fetched CA")?;
    let actual = first.first().map(|der| der_digest(der)).unwrap_or_default();
    if actual == pinned_digest {
        Ok(())
    } else {
        Err(PkiError::BadToken(format!(
            "the manager's CA root (sha256 {actual}) is not the one the token pins \
             ({pinned_digest}): wrong address, a different cluster, or a man in the middle"
        )))
    }
}
