//! The integration tests, in one binary so that `make test` links the product once: one module
//! per area, run as `cargo test --test it` (one area: `cargo test --test it faults::`). Which
//! environment each module runs in, and why, is in `support`'s documentation; the heap check
//! (`tests/memory.rs`) and the canary's node tests (`tests/canary.rs`, re-executed inside a node's
//! namespaces) are binaries of their own.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: a failed expectation is a failed test

mod support;

mod alerts;
mod chain;
mod chart;
mod chart_hardening;
mod check;
mod control_plane;
mod faults;
mod google_client;
mod google_faults;
mod hostile;
mod image;
mod key_rotation;
mod leadership;
mod lifecycle;
mod listing;
mod metrics;
mod operability;
mod operator;
mod quota;
mod token_type;
mod workload;
