//! The demo HTTP app built into the flotilla binary (flotilla demo-app)
#![forbid(unsafe_code)]
