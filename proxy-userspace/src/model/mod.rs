//! kube-proxy's decisions, pure: a `ClusterSnapshot` and the configuration in, the node's
//! `DesiredState` out. No I/O, so every rule is covered by table-driven tests.

mod types;

pub use types::*;
