//! authprobe's core: the `AuthProbe` API and the pure check engine. Layers, bottom up:
//! `authprobe-core` (api, engine) ← `metrics`, `google` ← `probe` ← `controller` ← `runtime` ← `cmd`.
//! Nothing here performs IO; its dependencies (no kube client, tokio, reqwest or tracing) prove it.

pub mod api;
pub mod engine;
pub mod redact;
