//! A JSON body extractor whose errors name the offending field (`services[0].mode`), instead of
//! axum's plain-text rejection.

use crate::error::ApiError;
use axum::extract::{FromRequest, Request};
use flotilla_types::FieldError;
use serde::de::DeserializeOwned;

/// Largest request body accepted (a deploy of many services fits easily).
const MAX_BODY: usize = 8 << 20;

pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
            .await
            .map_err(|e| ApiError::invalid(format!("cannot read request body: {e}"), vec![]))?;
        parse(&bytes).map(JsonBody)
    }
}

pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
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
    })
}
