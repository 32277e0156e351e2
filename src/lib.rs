//! authprobe: proves, continuously and per namespace, that each Kubernetes ServiceAccount can still
//! become the Google identity it is supposed to become, and says which step fails and how to fix it.

pub mod api;
pub mod chain;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod controller;
pub mod engine;
pub mod google;
pub mod health;
pub mod http;
pub mod inventory;
pub mod leader;
pub mod metrics;
pub mod operator;
pub mod probe;
pub mod redact;
pub mod telemetry;
