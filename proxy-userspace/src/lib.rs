//! kube-ebpf-proxy's controller: sources → model → reconciler → dataplane (see `shared/design.md`).

pub mod cluster;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod events;
pub mod health;
pub mod metrics;
pub mod model;
pub mod port_range;
pub mod reconcile;
pub mod source;
