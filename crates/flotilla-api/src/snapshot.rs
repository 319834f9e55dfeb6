//! `GET /v1/snapshot`: a backup of this manager's store for `flotilla snapshot save`. It holds
//! every secret the store does (the cluster PKI), so only managers and the local CLI (or a
//! holder of the API token) may fetch it, like the other admin routes.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::State;
use axum::Json;
use flotilla_store::StoreBackup;

#[tracing::instrument(skip_all)]
pub async fn snapshot(State(app): State<AppState>) -> Result<Json<StoreBackup>, ApiError> {
    let backup = app.store.backup().await?;
    tracing::info!(revision = backup.revision(), "store backup taken");
    Ok(Json(backup))
}
