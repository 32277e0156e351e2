//! authprobe: proves, continuously and per namespace, that each Kubernetes ServiceAccount can still
//! become the Google identity it is supposed to become, and says which step fails and how to fix it.
//!
//! Layers, bottom up (each room imports only rooms below it):
//! `authprobe_core` (api, pure engine) ← [`metrics`], [`fence`], [`google`] ← [`probe`] ← [`controller`] ←
//! [`runtime`] ← [`cmd`].

pub use authprobe_core::{api, engine, redact};

pub mod cmd;
pub mod controller;
pub mod fence;
pub mod google;
pub mod metrics;
pub mod probe;
pub mod runtime;
