//! The manager HTTP API (axum): typed errors, resource versions and watch streams
#![forbid(unsafe_code)]
