//! kube-ebpf-proxy's controller: sources → model → reconciler → dataplane (see `shared/design.md`).

pub mod dataplane;
pub mod model;
pub mod reconcile;
pub mod source;
