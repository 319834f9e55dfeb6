//! Level-triggered, idempotent controllers that drive tasks toward service specs
#![forbid(unsafe_code)]
