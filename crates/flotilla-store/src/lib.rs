//! The replicated store: openraft state machine and log persisted in redb
#![forbid(unsafe_code)]
