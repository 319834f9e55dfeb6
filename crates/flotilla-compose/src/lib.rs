//! Compose files parsed and validated into Flotilla service specs
#![forbid(unsafe_code)]
