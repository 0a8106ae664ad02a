//! What the proxy reads, as the sources publish it and the model takes it in: one consistent
//! snapshot of the cluster's objects, their keys, and the problems found with them. Its own
//! module so that neither the sources nor the model depend on the other's types.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde::Serialize;

/// kube-apiserver's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours): what
/// the model assumes when a Service leaves it out, and what the manifests source fills in.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

/// `namespace/name` of a namespaced object (cluster-scoped objects have an empty namespace).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

/// Everything the model reads, as one consistent snapshot. Objects are shared (`Arc`) with the
/// source's stores and with earlier snapshots: a snapshot copies keys and pointers, never the
/// objects themselves.
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
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

/// A problem with one object that a source or the model skipped (or used with a caveat);
/// everything else is still used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Diagnostic {
    /// `Kind namespace/name` of the object.
    pub object: String,
    pub message: String,
}

/// An IP family as the API spells it (`spec.ipFamilies`, `addressType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    pub fn of(addr: IpAddr) -> IpFamily {
        match addr {
            IpAddr::V4(_) => IpFamily::IPv4,
            IpAddr::V6(_) => IpFamily::IPv6,
        }
    }

    /// The API's name: `IPv4` or `IPv6`.
    pub fn name(self) -> &'static str {
        match self {
            IpFamily::IPv4 => "IPv4",
            IpFamily::IPv6 => "IPv6",
        }
    }

    /// The family the API's name names.
    pub fn parse(name: &str) -> Option<IpFamily> {
        match name {
            "IPv4" => Some(IpFamily::IPv4),
            "IPv6" => Some(IpFamily::IPv6),
            _ => None,
        }
    }
}
