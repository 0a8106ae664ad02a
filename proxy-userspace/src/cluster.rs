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

impl ClusterSnapshot {
    /// Takes `previous`'s object wherever this snapshot holds an equal one, so consumers that
    /// remember what they computed per object (the model's per-Service memo) see it unchanged.
    /// For sources that build every object anew (the manifests folder); the API server's
    /// reflector stores already share them.
    pub fn share_unchanged(&mut self, previous: &ClusterSnapshot) {
        fn share<T: PartialEq>(
            objects: &mut BTreeMap<ObjectKey, Arc<T>>,
            previous: &BTreeMap<ObjectKey, Arc<T>>,
        ) {
            for (key, object) in objects.iter_mut() {
                if let Some(old) = previous.get(key)
                    && old == object
                {
                    *object = Arc::clone(old);
                }
            }
        }
        share(&mut self.services, &previous.services);
        share(&mut self.endpoint_slices, &previous.endpoint_slices);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, cluster_ip: &str) -> (ObjectKey, Arc<Service>) {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": cluster_ip, "ports": [{"port": 80}]},
        }))
        .expect("a valid Service");
        let key = ObjectKey {
            namespace: "default".to_owned(),
            name: name.to_owned(),
        };
        (key, Arc::new(service))
    }

    #[test]
    fn a_snapshot_shares_only_the_objects_that_did_not_change() {
        let previous = ClusterSnapshot {
            services: [service("same", "10.96.0.1"), service("moved", "10.96.0.2")].into(),
            ..ClusterSnapshot::default()
        };
        let mut next = ClusterSnapshot {
            services: [
                service("same", "10.96.0.1"),
                service("moved", "10.96.0.3"),
                service("new", "10.96.0.4"),
            ]
            .into(),
            ..ClusterSnapshot::default()
        };
        next.share_unchanged(&previous);
        let shared = |name: &str| {
            let key = service(name, "").0;
            previous
                .services
                .get(&key)
                .is_some_and(|old| Arc::ptr_eq(old, &next.services[&key]))
        };
        assert!(shared("same"));
        assert!(!shared("moved"));
        assert!(!shared("new"));
        assert_eq!(
            next.services[&service("moved", "").0],
            service("moved", "10.96.0.3").1
        );
    }
}
