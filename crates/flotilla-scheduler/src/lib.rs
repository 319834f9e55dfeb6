//! Pure placement: a function from cluster snapshot and request to placements
#![forbid(unsafe_code)]
