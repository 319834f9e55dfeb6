//! CA root rotation: the new root is trusted beside the old one, every node renews onto it,
//! then the old root is dropped.

use super::records::{issued_key, put_record, record_of, Issued};
use super::security::{pki_error, put_pki_op, security, ClusterSecurity};
use crate::error::{check_applied, ApiError};
use crate::AppState;
use axum::extract::State;
use axum::Json;
use flotilla_pki::CaBundle;
use flotilla_store::{Command, Expect, Op, Store};
use flotilla_types::cluster::CaRotationStatus;
use serde::{Deserialize, Serialize};

/// Store record of a CA root rotation under way: the next root, trusted but not yet signing.
const CA_ROTATION_RECORD: &str = "ca-rotation";

#[derive(Clone, Serialize, Deserialize)]
struct CaRotation {
    /// `trust` or `sign`.
    phase: String,
    next_cert_pem: String,
    next_key_pem: String,
}

/// Nodes whose latest certificate is not from the signing root with the current trust
/// bundle (or, in the `trust` phase, not with the current bundle): they renew on their own
/// within a second or two of a change (`GET /v1/cluster/membership` shows the bundle).
fn lagging_nodes(store: &Store, sec: &ClusterSecurity, need_signer: bool) -> Vec<String> {
    let (signer, trust) = {
        let ca = sec.ca();
        (ca.signer.digest().unwrap_or_default(), ca.trust_pem())
    };
    let mut nodes: std::collections::BTreeSet<String> =
        store.read(|s| s.nodes.keys().cloned().collect());
    nodes.extend(store.read(|s| {
        s.records
            .range("manager/".to_string().."manager0".to_string())
            .map(|(k, _)| k.trim_start_matches("manager/").to_string())
            .collect::<Vec<_>>()
    }));
    nodes
        .into_iter()
        .filter(|n| match record_of::<Issued>(store, &issued_key(n)) {
            Some((i, _)) => i.trust_pem != trust || (need_signer && i.signer != signer),
            None => true,
        })
        .collect()
}

fn rotation_status(
    store: &Store,
    sec: &ClusterSecurity,
    completed: bool,
) -> Result<CaRotationStatus, ApiError> {
    let phase = record_of::<CaRotation>(store, CA_ROTATION_RECORD).map(|(r, _)| r.phase);
    let ca = sec.ca();
    let signing_root = ca.signer.digest().map_err(pki_error)?;
    let trusted_roots = 1 + ca.previous_roots.len();
    drop(ca);
    Ok(CaRotationStatus {
        waiting_for: match phase.as_deref() {
            Some(p) => lagging_nodes(store, sec, p == "sign"),
            None => Vec::new(),
        },
        phase,
        completed,
        signing_root,
        trusted_roots,
    })
}

/// `GET /v1/cluster/ca/status`.
pub(super) async fn ca_status(
    State(app): State<AppState>,
) -> Result<Json<CaRotationStatus>, ApiError> {
    let sec = security(&app)?;
    Ok(Json(rotation_status(&app.store, sec, false)?))
}

/// `POST /v1/cluster/ca/rotate`: one step of a CA root rotation, in three steps so no node
/// ever meets a certificate it does not trust: (1) `trust`: a new root is trusted next to the
/// old one, which still signs; every node renews to get the new bundle. (2) `sign`: once all
/// have it, the new root signs; every node renews onto it. (3) once all have, the old root is
/// dropped (nodes renew once more to drop it from their bundle) and join tokens change, as they
/// name the signing root. A step is taken only when no node lags behind the current one.
#[tracing::instrument(skip_all)]
pub(super) async fn rotate_ca(
    State(app): State<AppState>,
) -> Result<Json<CaRotationStatus>, ApiError> {
    let sec = security(&app)?;
    let rotation = record_of::<CaRotation>(&app.store, CA_ROTATION_RECORD);
    let expect = rotation
        .as_ref()
        .map_or(Expect::Absent, |(_, v)| Expect::Version(*v));
    let mut secrets = sec.manager_secrets();
    let mut ca = CaBundle::from_pem(
        &secrets.ca_cert_pem,
        &secrets.ca_key_pem,
        &secrets.previous_roots_pem,
    )
    .map_err(pki_error)?;
    let (record_op, completed) = match rotation {
        None => {
            let cluster = sec.tls.identity().node_id.clone();
            let next = flotilla_pki::CaSigner::generate(&cluster).map_err(pki_error)?;
            ca.trust_next(&next);
            let record = CaRotation {
                phase: "trust".into(),
                next_cert_pem: next.cert_pem().to_string(),
                next_key_pem: next.key_pem(),
            };
            tracing::info!("CA root rotation started: the new root is trusted");
            (put_record(CA_ROTATION_RECORD, &record, expect)?, false)
        }
        Some((r, _)) if !lagging_nodes(&app.store, sec, r.phase == "sign").is_empty() => {
            return Ok(Json(rotation_status(&app.store, sec, false)?));
        }
        Some((mut r, _)) if r.phase == "trust" => {
            let next = flotilla_pki::CaSigner::from_pem(&r.next_cert_pem, &r.next_key_pem)
                .map_err(pki_error)?;
            ca.rotate_to(next);
            r.phase = "sign".into();
            tracing::info!("CA root rotation: the new root signs");
            (put_record(CA_ROTATION_RECORD, &r, expect)?, false)
        }
        Some(_) => {
            ca.retire_old_roots();
            tracing::info!("CA root rotation completed: the old root is no longer trusted");
            (
                Op::DeleteRecord {
                    key: CA_ROTATION_RECORD.into(),
                    expect,
                },
                true,
            )
        }
    };
    secrets.ca_cert_pem = ca.signer.cert_pem().to_string();
    secrets.ca_key_pem = ca.signer.key_pem();
    secrets.previous_roots_pem = ca.previous_roots.concat();
    let ops = vec![put_pki_op(&app.store, &secrets)?, record_op];
    check_applied(app.store.write(Command::new(ops)).await?)?;
    sec.sync(&app.store)?;
    Ok(Json(rotation_status(&app.store, sec, completed)?))
}
