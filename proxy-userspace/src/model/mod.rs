//! kube-proxy's decisions, pure: a `ClusterSnapshot` and the configuration in, the node's
//! `DesiredState` out. No I/O, so every rule is covered by table-driven tests. `ModelCache` is
//! the same computation per Service, remembering each Service's result between calls (what the
//! controller uses, so a change costs the Services it touches); the tables check both.

mod compute;
mod config;
mod render;
mod service_cidrs;
#[cfg(test)]
mod tests;
mod types;

pub use compute::{ModelCache, compute};
pub use config::{ModelConfig, NodePortAddresses};
pub use render::render_text;
pub use types::*;
