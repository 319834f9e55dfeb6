//! The node agent: drivers behind one trait, the per-task shim, health checks and logs
#![forbid(unsafe_code)]
