//! The certificate authority, node keys and the certificates it issues.

use crate::PkiError;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime};
use time::OffsetDateTime;

/// How long a CA root is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a node certificate is valid (Swarm's default); renewed after two thirds of it.
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Certificates are back-dated this much so small clock skew between nodes does not make a
/// fresh certificate "not yet valid".
const BACKDATE: Duration = Duration::from_secs(3600);
const URI_SCHEME: &str = "flotilla://";

/// What a node may do in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Runs the store (raft voter), the API and the controllers.
    Manager,
    /// Runs tasks only.
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "manager" => Ok(Role::Manager),
            "worker" => Ok(Role::Worker),
            other => Err(format!("{other:?} is not a role (manager or worker)")),
        }
    }
}

/// Who a certificate belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_id: String,
    pub role: Role,
}

impl NodeIdentity {
    fn uri(&self) -> String {
        format!("{URI_SCHEME}{}/{}", self.role, self.node_id)
    }

    fn parse_uri(uri: &str) -> Option<NodeIdentity> {
        let (role, node_id) = uri.strip_prefix(URI_SCHEME)?.split_once('/')?;
        if node_id.is_empty() || node_id.contains('/') {
            return None;
        }
        Some(NodeIdentity {
            node_id: node_id.to_string(),
            role: role.parse().ok()?,
        })
    }
}

/// The identity a node certificate (DER) carries in its `flotilla://ROLE/ID` SAN URI.
pub fn identity_of(cert_der: &[u8]) -> Result<NodeIdentity, PkiError> {
    let bad = |reason: String| PkiError::BadCertificate {
        what: "identity".into(),
        reason,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| bad(format!("not a valid X.509 certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("unreadable subjectAltName: {e}")))?
        .ok_or_else(|| bad("no subjectAltName: not a flotilla node certificate".into()))?;
    let mut found = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => NodeIdentity::parse_uri(uri),
            _ => None,
        });
    match (found.next(), found.next()) {
        (Some(identity), None) => Ok(identity),
        (None, _) => Err(bad("no flotilla://ROLE/ID URI in subjectAltName".into())),
        (Some(_), Some(_)) => Err(bad("more than one flotilla:// identity".into())),
    }
}

fn not_after_of(cert_der: &[u8]) -> Result<(SystemTime, SystemTime), PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| PkiError::BadCertificate {
            what: "validity".into(),
            reason: e.to_string(),
        })?;
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    };
    Ok((
        to_system(cert.validity().not_before),
        to_system(cert.validity().not_after),
    ))
}

/// When the CA signed a node certificate (DER), in whole seconds since the Unix epoch: its
/// `notBefore` plus the fixed back-dating [`CaSigner::issue`] applies. Revocations compare it
/// with the time a node was removed, so a certificate issued before the removal is refused
/// while one issued to a node that rejoined afterwards is not.
pub fn issued_at_of(cert_der: &[u8]) -> Result<u64, PkiError> {
    let (not_before, _) = not_after_of(cert_der)?;
    Ok((not_before + BACKDATE)
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0))
}

fn first_der(pem: &str, what: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadCertificate {
        what: what.to_string(),
        reason: format!("not a PEM certificate: {e}"),
    })
}

/// Every certificate in a PEM bundle, in order.
pub(crate) fn all_ders(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::BadCertificate {
            what: what.to_string(),
            reason: format!("not a PEM certificate bundle: {e}"),
        })?;
    if certs.is_empty() {
        return Err(PkiError::BadCertificate {
            what: what.to_string(),
            reason: "no certificate in the PEM data".into(),
        });
    }
    Ok(certs)
}

/// SHA-256 of a certificate's DER, lower-case hex: what a join token pins.
pub(crate) fn der_digest(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// A CA root that can sign: its certificate and private key.
pub struct CaSigner {
    cert_pem: String,
    key: KeyPair,
    /// rcgen signs with a `Certificate` value; rebuilt from the stored PEM, it has the root's
    /// subject and key, which is all a child's issuer fields and signature depend on.
    issuer: rcgen::Certificate,
}

impl CaSigner {
    /// A fresh self-signed root for `cluster_name`.
    pub fn generate(cluster_name: &str) -> Result<CaSigner, PkiError> {
        let key = KeyPair::generate()?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("flotilla cluster CA {cluster_name}"),
        );
        dn.push(DnType::OrganizationName, "flotilla");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + CA_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(CaSigner {
            cert_pem: cert.pem(),
            key,
            issuer: cert,
        })
    }

    /// Loads a root from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CaSigner, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadKey(e.to_string()))?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        let issuer = params.self_signed(&key)?;
        // A key that does not belong to the certificate would issue certificates nobody trusts.
        let stored = first_der(cert_pem, "CA root")?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&stored).map_err(|e| PkiError::BadCertificate {
                what: "CA root".into(),
                reason: e.to_string(),
            })?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::BadKey(
                "the CA key does not match the CA certificate".into(),
            ));
        }
        Ok(CaSigner {
            cert_pem: cert_pem.to_string(),
            key,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// SHA-256 of the root's DER, as pinned by join tokens.
    pub fn digest(&self) -> Result<String, PkiError> {
        Ok(der_digest(&first_der(&self.cert_pem, "CA root")?))
    }

    /// Signs the CSR's public key into a certificate for `identity`. Everything else in the CSR
    /// (names, extensions) is ignored: the CA alone decides what a node is. `addresses` become
    /// IP or DNS SANs so ordinary TLS clients (curl) can also verify the node.
    pub fn issue(
        &self,
        csr_pem: &str,
        identity: &NodeIdentity,
        addresses: &[String],
        validity: Duration,
    ) -> Result<String, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.node_id.clone());
        dn.push(DnType::OrganizationalUnitName, identity.role.as_str());
        dn.push(DnType::OrganizationName, "flotilla");
        params.distinguished_name = dn;
        let uri =
            rcgen::Ia5String::try_from(identity.uri()).map_err(|e| PkiError::BadCertificate {
                what: "node id".into(),
                reason: format!("{:?} cannot be put in a certificate: {e}", identity.node_id),
            })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        for addr in addresses {
            params.subject_alt_names.push(match addr.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    SanType::DnsName(rcgen::Ia5String::try_from(addr.as_str()).map_err(|e| {
                        PkiError::BadCertificate {
                            what: "address".into(),
                            reason: format!(
                                "{addr:?} is neither an IP address nor a DNS name: {e}"
                            ),
                        }
                    })?)
                }
            });
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + validity);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        Ok(csr.signed_by(&self.issuer, &self.key)?.pem())
    }
}

fn random_serial() -> rcgen::SerialNumber {
    // Positive 127-bit serials: unique enough that two certificates never share one.
    let bytes = (rand::random::<u128>() >> 1).to_be_bytes();
    rcgen::SerialNumber::from_slice(&bytes)
}

/// The CA as managers keep it: the signing root plus older roots still trusted during a
/// rotation.
pub struct CaBundle {
    pub signer: CaSigner,
    /// Roots from before the last rotation(s), still trusted until retired.
    pub previous_roots: Vec<String>,
}

const CA_CERT_FILE: &str = "ca.crt";
const CA_KEY_FILE: &str = "ca.key";
const CA_PREVIOUS_FILE: &str = "ca-previous.pem";

impl CaBundle {
    pub fn generate(cluster_name: &str) -> Result<CaBundle, PkiError> {
        Ok(CaBundle {
            signer: CaSigner::generate(cluster_name)?,
            previous_roots: Vec::new(),
        })
    }

    /// Every trusted root, the signing one first, as one PEM bundle.
    pub fn trust_pem(&self) -> String {
        let mut out = self.signer.cert_pem().to_string();
        for root in &self.previous_roots {
            out.push_str(root);
        }
        out
    }

    /// Starts a root rotation: a new root signs from now on, the old one stays trusted so
    /// certificates it issued keep working until their nodes renew.
    pub fn rotate(&mut self, cluster_name: &str) -> Result<(), PkiError> {
        self.rotate_to(CaSigner::generate(cluster_name)?);
        Ok(())
    }

    /// Trusts `next`'s root without signing with it yet: the first step of a rotation in a
    /// running cluster, so every node trusts the new root before anyone presents a
    /// certificate it signed.
    pub fn trust_next(&mut self, next: &CaSigner) {
        if !self.previous_roots.iter().any(|r| r == next.cert_pem()) {
            self.previous_roots.insert(0, next.cert_pem().to_string());
        }
    }

    /// Makes `next` the signing root; the old one stays trusted ([`CaBundle::rotate`]).
    pub fn rotate_to(&mut self, next: CaSigner) {
        self.previous_roots.retain(|r| r != next.cert_pem());
        let old = std::mem::replace(&mut self.signer, next);
        self.previous_roots.insert(0, old.cert_pem);
    }

    /// Ends a rotation: only the signing root stays trusted. Call once every node has renewed.
    pub fn retire_old_roots(&mut self) {
        self.previous_roots.clear();
    }

    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        write_file(&dir.join(CA_CERT_FILE), self.signer.cert_pem(), false)?;
        write_file(&dir.join(CA_KEY_FILE), &self.signer.key_pem(), true)?;
        write_file(
            &dir.join(CA_PREVIOUS_FILE),
            &self.previous_roots.concat(),
            false,
        )
    }

    /// A bundle from its signing root, key and the PEM bundle of still-trusted older roots.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        previous_roots_pem: &str,
    ) -> Result<CaBundle, PkiError> {
        Ok(CaBundle {
            signer: CaSigner::from_pem(cert_pem, key_pem)?,
            previous_roots: if previous_roots_pem.trim().is_empty() {
                Vec::new()
            } else {
                split_pem_bundle(previous_roots_pem, "previous CA roots")?
            },
        })
    }

    pub fn load(dir: &Path) -> Result<CaBundle, PkiError> {
        let previous = match std::fs::read_to_string(dir.join(CA_PREVIOUS_FILE)) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(PkiError::Io {
                    path: dir.join(CA_PREVIOUS_FILE),
                    source,
                })
            }
        };
        Self::from_pem(
            &read_file(&dir.join(CA_CERT_FILE))?,
            &read_file(&dir.join(CA_KEY_FILE))?,
            &previous,
        )
    }

    pub fn exists(dir: &Path) -> bool {
        dir.join(CA_KEY_FILE).exists()
    }

    /// Deletes what [`CaBundle::save`] wrote: a demoted manager must not keep the CA key.
    pub fn remove(dir: &Path) -> Result<(), PkiError> {
        for file in [CA_KEY_FILE, CA_CERT_FILE, CA_PREVIOUS_FILE] {
            remove_file(&dir.join(file))?;
        }
        Ok(())
    }
}

/// Deletes `path`; a file already gone is fine.
pub fn remove_file(path: &Path) -> Result<(), PkiError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(PkiError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Splits a PEM bundle into one PEM string per certificate, checking each parses.
fn split_pem_bundle(bundle: &str, what: &str) -> Result<Vec<String>, PkiError> {
    const END: &str = "-----END CERTIFICATE-----";
    let parts: Vec<String> = bundle
        .split_inclusive(END)
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| format!("{p}\n"))
        .collect();
    for part in &parts {
        first_der(part, what)?;
    }
    Ok(parts)
}

/// A node's private key, generated on the node; only its CSR leaves the machine.
pub struct NodeKey {
    key: KeyPair,
}

impl NodeKey {
    pub fn generate() -> Result<NodeKey, PkiError> {
        Ok(NodeKey {
            key: KeyPair::generate()?,
        })
    }

    pub fn from_pem(pem: &str) -> Result<NodeKey, PkiError> {
        Ok(NodeKey {
            key: KeyPair::from_pem(pem).map_err(|e| PkiError::BadKey(e.to_string()))?,
        })
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate signing request for this key (the CA decides the identity).
    pub fn csr_pem(&self, node_id: &str) -> Result<String, PkiError> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, node_id.to_string());
        Ok(params.serialize_request(&self.key)?.pem()?)
    }
}

/// What a node holds to speak mTLS: its certificate, its key and the roots it trusts.
#[derive(Clone)]
pub struct NodeCredentials {
    pub cert_pem: String,
    pub key_pem: String,
    /// Trusted CA roots (PEM bundle).
    pub trust_pem: String,
}

const NODE_CERT_FILE: &str = "node.crt";
const NODE_KEY_FILE: &str = "node.key";
const TRUST_FILE: &str = "trust.pem";

impl NodeCredentials {
    pub fn identity(&self) -> Result<NodeIdentity, PkiError> {
        identity_of(&first_der(&self.cert_pem, "node")?)
    }

    /// How long the certificate is valid from when it was issued.
    pub fn lifetime(&self) -> Result<Duration, PkiError> {
        let (from, until) = not_after_of(&first_der(&self.cert_pem, "node")?)?;
        Ok(until.duration_since(from + BACKDATE).unwrap_or_default())
    }

    /// When the certificate stops being valid.
    pub fn not_after(&self) -> Result<SystemTime, PkiError> {
        Ok(not_after_of(&first_der(&self.cert_pem, "node")?)?.1)
    }

    /// True once less than a third of the certificate's lifetime (from issue, not from the
    /// back-dated `notBefore`) is left.
    pub fn needs_renewal(&self, now: SystemTime) -> Result<bool, PkiError> {
        let (from, until) = not_after_of(&first_der(&self.cert_pem, "node")?)?;
        let lifetime = until.duration_since(from + BACKDATE).unwrap_or_default();
        Ok(match until.duration_since(now) {
            Ok(left) => left < lifetime / 3,
            Err(_) => true,
        })
    }

    /// Whether the certificate chains to one of the trusted roots.
    pub fn verify(&self) -> Result<(), PkiError> {
        crate::tls::verify_chain(&self.cert_pem, &self.trust_pem)
    }

    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_file(&dir.join(NODE_KEY_FILE), &self.key_pem, true)?;
        write_file(&dir.join(TRUST_FILE), &self.trust_pem, false)?;
        // The certificate last: its presence marks a complete set.
        write_file(&dir.join(NODE_CERT_FILE), &self.cert_pem, false)
    }

    pub fn load(dir: &Path) -> Result<NodeCredentials, PkiError> {
        let creds = NodeCredentials {
            cert_pem: read_file(&dir.join(NODE_CERT_FILE))?,
            key_pem: read_file(&dir.join(NODE_KEY_FILE))?,
            trust_pem: read_file(&dir.join(TRUST_FILE))?,
        };
        creds.identity()?;
        Ok(creds)
    }

    pub fn exists(dir: &Path) -> bool {
        dir.join(NODE_CERT_FILE).exists()
    }
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes atomically (temp file + rename); `secret` files are created mode 0600.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
