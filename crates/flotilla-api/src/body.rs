//! JSON body extractors whose errors name the offending field (`services[0].mode`), instead of
//! axum's plain-text rejection. [`StrictJsonBody`] also refuses fields the type does not know,
//! for what operators send; [`JsonBody`] ignores them, for what agents and other managers send
//! (a newer peer may add fields an older manager must tolerate).

use crate::error::ApiError;
use axum::extract::{FromRequest, Request};
use flotilla_types::FieldError;
use futures::StreamExt;
use serde::de::DeserializeOwned;

/// Largest request body accepted (a deploy of many services fits easily).
pub const MAX_BODY: usize = 8 << 20;

pub struct JsonBody<T>(pub T);

/// A JSON body in which every field must be one the type knows.
pub struct StrictJsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req).await?;
        parse(&bytes).map(JsonBody)
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for StrictJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req).await?;
        parse_strict(&bytes).map(StrictJsonBody)
    }
}

/// Reads the whole body, refusing (413) one larger than [`MAX_BODY`] as soon as it is known to
/// be, whether from its `Content-Length` or from what arrived.
async fn read_body(req: Request) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::TooLarge(format!(
            "the request body is larger than the limit of {MAX_BODY} bytes ({} MiB)",
            MAX_BODY >> 20
        ))
    };
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        return Err(too_large());
    }
    let mut stream = req.into_body().into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::invalid(format!("cannot read request body: {e}"), vec![]))?;
        if bytes.len() + chunk.len() > MAX_BODY {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Parses `bytes` as a `T`, ignoring fields `T` does not have.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(invalid_body)
}

/// Parses `bytes` as a `T`, refusing fields `T` does not have, each named by its path
/// (`services[0].privileged`).
pub fn parse_strict<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut unknown = Vec::new();
    let mut note = |path: serde_ignored::Path| unknown.push(field_path(&path));
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(de, &mut note))
        .map_err(invalid_body)?;
    if unknown.is_empty() {
        return Ok(value);
    }
    let fields: Vec<FieldError> = unknown
        .iter()
        .map(|path| FieldError::new(path, "unknown field"))
        .collect();
    Err(ApiError::invalid(
        format!("invalid request body: unknown field {}", unknown.join(", ")),
        fields,
    ))
}

fn invalid_body(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let field = if path == "." {
        "body".to_string()
    } else {
        path
    };
    let reason = e.into_inner().to_string();
    ApiError::invalid(
        format!("invalid request body: {field}: {reason}"),
        vec![FieldError::new(field, reason)],
    )
}

/// `services[0].privileged`, the way `serde_path_to_error` names fields.
fn field_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_types::api::DeployRequest;

    fn fields_of(err: ApiError) -> Vec<String> {
        match err {
            ApiError::Invalid { fields, .. } => fields.into_iter().map(|f| f.field).collect(),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn strict_parse_names_unknown_fields_by_path() {
        let body = br#"{"services":[{"name":"web","driver":"process","command":["sleep","9"],
            "mode":{"mode":"replicated","replicas":1},"stop_grace_period":"10s",
            "privileged":true,"resources":{"limits":{"gpus":1}}}],"force":true}"#;
        assert!(parse::<DeployRequest>(body).is_ok());
        let err = parse_strict::<DeployRequest>(body).expect_err("refused");
        assert_eq!(
            fields_of(err),
            [
                "services[0].privileged",
                "services[0].resources.limits.gpus",
                "force"
            ]
        );
    }

    #[test]
    fn strict_parse_accepts_known_fields() {
        let body = br#"{"services":[{"name":"web","driver":"process","command":["sleep","9"],
            "mode":{"mode":"replicated","replicas":1},"stop_grace_period":"10s"}],"dry_run":true}"#;
        let req = parse_strict::<DeployRequest>(body).expect("accepted");
        assert!(req.dry_run);
    }
}
