//! Where Kubernetes objects come from: a real API server (kube-rs reflectors) or a folder of
//! manifests. Both publish the same `ClusterSnapshot`, only once it is complete (synced).
//!
//! Both publish on a `tokio::sync::watch::Sender<Arc<ClusterSnapshot>>`: the channel's initial
//! value is the consumer's placeholder, and its first *change* is the first complete snapshot
//! (`manifests::watch` sends one before it returns; `kube::run` once Services and EndpointSlices
//! have both been listed). Diagnostics whose message contains `warning:` did not stop the object
//! from being used (e.g. a NodePort outside `--service-node-port-range`); every other diagnostic
//! means the object was skipped.

pub mod kube;
pub mod manifests;
