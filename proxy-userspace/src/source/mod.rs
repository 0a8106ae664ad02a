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

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;

use crate::model::Diagnostic;

/// `namespace/name` of a namespaced object (cluster-scoped objects have an empty namespace).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

/// Everything the model reads, as one consistent snapshot.
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub services: BTreeMap<ObjectKey, Service>,
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// This node's Node object (zone label, addresses, deletion), when known.
    pub node: Option<Node>,
    /// The cluster's ServiceCIDR objects (networking.k8s.io/v1): the ranges ClusterIPs come
    /// from, where unallocated addresses are dropped.
    pub service_cidrs: BTreeMap<ObjectKey, ServiceCIDR>,
    /// Problems with objects the source could not use (file, object and reason).
    pub diagnostics: Vec<Diagnostic>,
    /// Values the source filled in because the objects left them out, as the API server's
    /// allocators would (manifests source only: a real API server has already done this).
    pub allocations: Vec<Allocation>,
}

/// One value the manifests source allocated for a Service (ClusterIP, NodePort,
/// healthCheckNodePort). The allocated value is also written into the Service in the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// `Service namespace/name`.
    pub object: String,
    /// Field path in the Service, e.g. `spec.clusterIPs[0]` or `spec.ports[http].nodePort`.
    pub field: String,
    pub value: String,
}
