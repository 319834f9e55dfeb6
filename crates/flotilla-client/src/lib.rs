//! Typed HTTP client for the Flotilla API, used by the CLI and agents
#![forbid(unsafe_code)]
