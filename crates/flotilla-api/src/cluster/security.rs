//! A manager's share of the cluster PKI ([`ClusterSecurity`]): the CA and join secrets on disk
//! and in the store, kept in step between managers.

use super::records::{put_record, record_of, PKI_RECORD};
use crate::error::{check_applied, ApiError};
use crate::AppState;
use flotilla_pki::{CaBundle, JoinSecrets, PkiError, Role, TlsIdentity, NODE_CERT_VALIDITY};
use flotilla_store::{Command, Expect, Op, Store};
use flotilla_types::cluster::{ManagerSecrets, TokensResponse};
use flotilla_types::FieldError;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

const SECRETS_FILE: &str = "join-secrets";

/// A manager's share of the cluster PKI: the CA (to sign), the join secrets (to admit), and its
/// own TLS identity. Kept in `dir`, readable only by root.
pub struct ClusterSecurity {
    dir: PathBuf,
    ca: Mutex<CaBundle>,
    secrets: Mutex<JoinSecrets>,
    /// Version of the [`PKI_RECORD`] the two above were last loaded from (0: local files only).
    synced: Mutex<u64>,
    /// How long the certificates this cluster issues are valid.
    cert_validity: Mutex<std::time::Duration>,
    pub tls: Arc<TlsIdentity>,
}

impl ClusterSecurity {
    pub fn new(dir: PathBuf, ca: CaBundle, secrets: JoinSecrets, tls: Arc<TlsIdentity>) -> Self {
        ClusterSecurity {
            dir,
            ca: Mutex::new(ca),
            secrets: Mutex::new(secrets),
            synced: Mutex::new(0),
            cert_validity: Mutex::new(NODE_CERT_VALIDITY),
            tls,
        }
    }

    /// Loads what `flotilla init` or a manager `join` saved in `dir`.
    pub fn load(dir: PathBuf, tls: Arc<TlsIdentity>) -> Result<Self, PkiError> {
        let ca = CaBundle::load(&dir)?;
        let path = dir.join(SECRETS_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| PkiError::Io {
            path: path.clone(),
            source,
        })?;
        let secrets = JoinSecrets::from_file_contents(&text)?;
        Ok(Self::new(dir, ca, secrets, tls))
    }

    /// Writes the CA and secrets to `dir` (the secrets file mode 0600).
    pub fn save(
        dir: &std::path::Path,
        ca: &CaBundle,
        secrets: &JoinSecrets,
    ) -> Result<(), PkiError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        ca.save(dir)?;
        let path = dir.join(SECRETS_FILE);
        let io = |source| PkiError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        file.write_all(secrets.to_file_contents().as_bytes())
            .map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// Deletes the CA and join secrets from `dir` (what [`ClusterSecurity::save`] wrote): a
    /// manager turning into a worker keeps only its own certificate.
    pub fn forget(dir: &std::path::Path) -> Result<(), PkiError> {
        CaBundle::remove(dir)?;
        flotilla_pki::remove_file(&dir.join(SECRETS_FILE))
    }

    pub(super) fn ca(&self) -> MutexGuard<'_, CaBundle> {
        // Poisoning means a panic mid-update of plain data that is re-saved whole; keep going.
        self.ca.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn secrets(&self) -> MutexGuard<'_, JoinSecrets> {
        self.secrets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current join tokens.
    pub fn tokens(&self) -> Result<TokensResponse, PkiError> {
        let digest = self.ca().signer.digest()?;
        let secrets = self.secrets();
        Ok(TokensResponse {
            worker: secrets.token(Role::Worker, &digest).to_string(),
            manager: secrets.token(Role::Manager, &digest).to_string(),
        })
    }

    /// Loads the cluster's current PKI from the store when it changed since the last call, and
    /// keeps the local copy in `DATA_DIR/pki` in step (what a restarted or recovered manager
    /// starts from).
    pub fn sync(&self, store: &Store) -> Result<(), ApiError> {
        let Some((secrets, version)) = record_of::<ManagerSecrets>(store, PKI_RECORD) else {
            return Ok(());
        };
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if *synced == version {
            return Ok(());
        }
        let ca = CaBundle::from_pem(
            &secrets.ca_cert_pem,
            &secrets.ca_key_pem,
            &secrets.previous_roots_pem,
        )
        .map_err(pki_error)?;
        let join = JoinSecrets::from_file_contents(&secrets.join_secrets).map_err(pki_error)?;
        ClusterSecurity::save(&self.dir, &ca, &join).map_err(pki_error)?;
        *self.ca() = ca;
        *self.secrets() = join;
        *self.cert_validity.lock().unwrap_or_else(|p| p.into_inner()) = secrets
            .node_cert_validity_secs
            .map_or(NODE_CERT_VALIDITY, std::time::Duration::from_secs);
        *synced = version;
        Ok(())
    }

    /// Puts this manager's PKI into the store if the store has none yet (a new cluster, or one
    /// from before the PKI was replicated). Must run on the leader.
    pub async fn publish(&self, store: &Store) -> Result<(), ApiError> {
        if store.read(|s| s.records.contains_key(PKI_RECORD)) {
            return self.sync(store);
        }
        let op = put_record(PKI_RECORD, &self.manager_secrets(), Expect::Absent)?;
        match check_applied(store.write(Command::new(vec![op])).await?) {
            Ok(_) | Err(ApiError::Conflict(_)) => self.sync(store),
            Err(e) => Err(e),
        }
    }

    /// Replaces the PKI record with `secrets` (compare-and-set on the version read before).
    pub(super) async fn store_secrets(
        &self,
        store: &Store,
        secrets: &ManagerSecrets,
    ) -> Result<(), ApiError> {
        let op = put_pki_op(store, secrets)?;
        check_applied(store.write(Command::new(vec![op])).await?)?;
        self.sync(store)
    }

    pub(super) fn manager_secrets(&self) -> ManagerSecrets {
        let ca = self.ca();
        ManagerSecrets {
            ca_cert_pem: ca.signer.cert_pem().to_string(),
            ca_key_pem: ca.signer.key_pem(),
            previous_roots_pem: ca.previous_roots.concat(),
            join_secrets: self.secrets().to_file_contents(),
            node_cert_validity_secs: Some(self.cert_validity().as_secs()),
        }
    }

    /// How long node certificates issued now are valid.
    pub fn cert_validity(&self) -> std::time::Duration {
        *self.cert_validity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the validity of certificates issued from now on (`flotilla init --cert-validity`,
    /// before [`ClusterSecurity::publish`]); the store's value wins once there is one.
    pub fn set_cert_validity(&self, validity: std::time::Duration) {
        *self.cert_validity.lock().unwrap_or_else(|p| p.into_inner()) = validity;
    }
}

/// Replaces the PKI record with `secrets`, compare-and-set on the version read now.
pub(super) fn put_pki_op(store: &Store, secrets: &ManagerSecrets) -> Result<Op, ApiError> {
    let expect = store
        .read(|s| s.records.get(PKI_RECORD).map(|r| r.meta.version))
        .map_or(Expect::Absent, Expect::Version);
    put_record(PKI_RECORD, secrets, expect)
}

pub(super) fn pki_error(e: PkiError) -> ApiError {
    match e {
        PkiError::BadToken(reason) => ApiError::Unauthorized(format!("join refused: {reason}")),
        PkiError::Rcgen(_) | PkiError::BadCertificate { .. } | PkiError::BadKey(_) => {
            ApiError::invalid(
                "invalid certificate request",
                vec![FieldError::new("csr_pem", e.to_string())],
            )
        }
        other => ApiError::Internal(other.to_string()),
    }
}

/// The cluster PKI, brought up to date with the store.
pub(super) fn security(app: &AppState) -> Result<&Arc<ClusterSecurity>, ApiError> {
    let sec = app.cluster.as_ref().ok_or_else(|| {
        ApiError::NotFound(
            "this manager runs without cluster security (started with `flotilla up`); use \
             `flotilla init` to start a cluster"
                .into(),
        )
    })?;
    sec.sync(&app.store)?;
    Ok(sec)
}
