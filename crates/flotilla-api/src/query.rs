//! A query-string extractor whose errors are the API's JSON error body naming the parameter,
//! instead of axum's plain-text rejection.

use crate::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use flotilla_types::FieldError;
use serde::de::DeserializeOwned;

pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(invalid_query(&rejection.body_text())),
        }
    }
}

/// axum says `Failed to deserialize query string: since: invalid digit found in string`.
fn invalid_query(text: &str) -> ApiError {
    let detail = text
        .split_once("query string: ")
        .map_or(text, |(_, detail)| detail);
    let (field, reason) = match detail.split_once(": ") {
        Some((field, reason)) if !field.contains(' ') => (field.to_string(), reason),
        _ => ("query".to_string(), detail),
    };
    ApiError::invalid(
        format!("invalid query string: {detail}"),
        vec![FieldError::new(field, reason)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Q {
        since: Option<u64>,
    }

    #[tokio::test]
    async fn a_bad_parameter_is_named_in_a_json_error() {
        let req = axum::http::Request::get("/v1/events?since=abc")
            .body(())
            .expect("request");
        let (mut parts, ()) = req.into_parts();
        let err = Query::<Q>::from_request_parts(&mut parts, &())
            .await
            .err()
            .expect("refused");
        let ApiError::Invalid { fields, message } = err else {
            panic!("expected invalid");
        };
        assert_eq!(fields[0].field, "since", "{message}");
    }
}
