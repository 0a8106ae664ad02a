//! What the resolved configuration (and this node's Node object) gives the model
//! ([`ModelConfig`]), the manifests source and the health server.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use super::{DetectLocalMode, ProxyConfig};
use crate::model::{IpFamily, LocalTrafficDetector, ModelConfig};

pub(super) const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The node's primary IP of each family as kube-proxy picks it from the Node: the first
/// InternalIP of the family, else the first ExternalIP.
pub(super) fn node_primary_ips(node: &Node) -> Vec<IpAddr> {
    let addresses = node
        .status
        .as_ref()
        .and_then(|status| status.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut primary: Vec<IpAddr> = Vec::new();
    for wanted in ["InternalIP", "ExternalIP"] {
        for address in addresses.iter().filter(|a| a.type_ == wanted) {
            if let Ok(ip) = address.address.parse::<IpAddr>()
                && !primary
                    .iter()
                    .any(|known| IpFamily::of(*known) == IpFamily::of(ip))
            {
                primary.push(ip);
            }
        }
    }
    primary
}

/// The Node's pod CIDRs (`spec.podCIDRs`, else `spec.podCIDR`), first of each family.
pub(super) fn node_pod_cidrs(node: &Node) -> Vec<IpNet> {
    let Some(spec) = &node.spec else {
        return Vec::new();
    };
    let listed: Vec<&String> = match &spec.pod_cidrs {
        Some(cidrs) if !cidrs.is_empty() => cidrs.iter().collect(),
        _ => spec.pod_cidr.iter().collect(),
    };
    let mut cidrs: Vec<IpNet> = Vec::new();
    for cidr in listed
        .into_iter()
        .filter_map(|text| text.parse::<IpNet>().ok())
    {
        if !cidrs
            .iter()
            .any(|known| IpFamily::of(known.addr()) == IpFamily::of(cidr.addr()))
        {
            cidrs.push(cidr.trunc());
        }
    }
    cidrs
}

impl ProxyConfig {
    /// What the manifests source needs to allocate like the API server would.
    pub fn manifest_settings(&self) -> crate::source::manifests::ManifestSettings {
        let defaults = crate::source::manifests::ManifestSettings::new(self.hostname.clone());
        crate::source::manifests::ManifestSettings {
            service_cidrs: self
                .service_cluster_ip_range
                .clone()
                .unwrap_or(defaults.service_cidrs),
            node_port_range: self.service_node_port_range,
            hostname: self.hostname.clone(),
        }
    }

    /// How long a queued change may wait before /healthz fails: twice the sync period, as
    /// kube-proxy constructs its `ProxyHealthServer`.
    pub fn health_timeout(&self) -> Duration {
        self.sync_period * 2
    }

    /// The model's view of this configuration on this node. `node` is this node's Node object
    /// (when known) and `local_addresses` the addresses on the node's interfaces. Call it again
    /// whenever either changes.
    ///
    /// Primary node IPs: `bindAddress` for its family, else the Node's (first InternalIP, else
    /// ExternalIP, per family); with neither (no cluster), the first non-loopback local address
    /// of each family so that standalone plans still show NodePorts.
    pub fn model_config(&self, node: Option<&Node>, local_addresses: &[IpAddr]) -> ModelConfig {
        let mut node_ips: Vec<IpAddr> = self.bind_address.into_iter().collect();
        let fallback: Vec<IpAddr> = local_addresses
            .iter()
            .copied()
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
            .collect();
        let from_node = node.map(node_primary_ips).unwrap_or_default();
        for ip in from_node.into_iter().chain(fallback) {
            if !node_ips
                .iter()
                .any(|known| IpFamily::of(*known) == IpFamily::of(ip))
            {
                node_ips.push(ip);
            }
        }
        let zone = node
            .and_then(|node| node.metadata.labels.as_ref())
            .and_then(|labels| labels.get(ZONE_LABEL))
            .cloned();
        let local_traffic_detector = match self.detect_local_mode {
            DetectLocalMode::ClusterCIDR if !self.cluster_cidrs.is_empty() => {
                LocalTrafficDetector::SourceCidrs {
                    cidrs: self.cluster_cidrs.clone(),
                }
            }
            DetectLocalMode::NodeCIDR => {
                let cidrs = node.map(node_pod_cidrs).unwrap_or_default();
                if cidrs.is_empty() {
                    LocalTrafficDetector::None
                } else {
                    LocalTrafficDetector::SourceCidrs { cidrs }
                }
            }
            DetectLocalMode::InterfaceNamePrefix => LocalTrafficDetector::InterfaceNamePrefix {
                prefix: self.pod_interface_name_prefix.clone(),
            },
            DetectLocalMode::BridgeInterface => LocalTrafficDetector::BridgeInterface {
                name: self.pod_bridge_interface.clone(),
            },
            DetectLocalMode::ClusterCIDR => LocalTrafficDetector::None,
        };
        ModelConfig {
            hostname: self.hostname.clone(),
            node_ips,
            local_addresses: local_addresses.to_vec(),
            nodeport_addresses: self.nodeport_addresses.clone(),
            zone,
            local_traffic_detector,
            masquerade_all: self.masquerade_all,
            service_cidrs: self.service_cluster_ip_range.clone().unwrap_or_default(),
        }
    }
}
