//! Server side of the raft RPC wire contract in [`flotilla_store::network`]: decode the request,
//! hand it to the local raft node, encode its `Result` the serde way.

use crate::body::JsonBody;
use crate::AppState;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use flotilla_store::TypeConfig;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/append", post(append))
        .route("/vote", post(vote))
        .route("/snapshot", post(snapshot))
}

async fn append(
    State(app): State<AppState>,
    JsonBody(req): JsonBody<AppendEntriesRequest<TypeConfig>>,
) -> Json<Result<AppendEntriesResponse<u64>, RaftError<u64>>> {
    Json(app.store.raft().append_entries(req).await)
}

async fn vote(
    State(app): State<AppState>,
    JsonBody(req): JsonBody<VoteRequest<u64>>,
) -> Json<Result<VoteResponse<u64>, RaftError<u64>>> {
    Json(app.store.raft().vote(req).await)
}

async fn snapshot(
    State(app): State<AppState>,
    JsonBody(req): JsonBody<InstallSnapshotRequest<TypeConfig>>,
) -> Json<Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>> {
    Json(app.store.raft().install_snapshot(req).await)
}
