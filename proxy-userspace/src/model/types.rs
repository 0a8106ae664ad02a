//! What the model decides for one node: the desired dataplane state. Pure data; produced by
//! `model::compute` from a `cluster::ClusterSnapshot` and the proxy configuration, consumed by
//! the reconciler (which turns it into map entries), by `kube-ebpf-proxy plan`, and by tests.
//!
//! Vocabulary follows kube-proxy's `pkg/proxy`: a *service port* is one port of one Service
//! (`ServicePortName`), a *frontend* is an address:port where it is reachable (ClusterIP,
//! NodePort on a node address, externalIP, LoadBalancer ingress IP), and the endpoint sets are
//! those of `CategorizeEndpoints`.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::cluster::Diagnostic;
pub use crate::cluster::IpFamily;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// kube-proxy's `ServicePortName`: namespace/name:port-name plus protocol.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The `name` of the port in the Service spec ("" for an unnamed single port).
    pub port: String,
    pub protocol: Protocol,
}

/// Where a frontend address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl std::fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "externalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        })
    }
}

impl FrontendKind {
    /// External destinations in kube-proxy's sense: subject to externalTrafficPolicy.
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

/// Who sent a packet, as far as kube-proxy's rules distinguish: the dataplane classifies each new
/// flow into one of these and applies the frontend's [`Action`] for that class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SourceClass {
    /// Matched by the local-traffic detector (`--detect-local-mode`: cluster CIDR, node CIDR,
    /// interface name prefix or bridge). With no detector, nothing is in this class.
    Pod,
    /// Originated on the node itself (kube-proxy's `fib saddr type local`).
    Node,
    /// Everything else: other hosts, and pods when no detector is configured.
    Other,
}

/// Which endpoint set a flow is balanced over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum EndpointSet {
    /// The frontend's own policy set: internal (ClusterIP) or external (other frontends).
    Policy,
    /// The Cluster-policy set, used for pod/node traffic to external frontends under
    /// externalTrafficPolicy Local (kube-proxy's "short circuit" to the cluster chain).
    Cluster,
}

/// What happens to a new flow of one [`SourceClass`] arriving at a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum Action {
    /// DNAT to an endpoint of `set`; SNAT to the node address when `masquerade` (hairpin
    /// traffic — client == chosen endpoint — is always masqueraded by the dataplane).
    Forward { set: EndpointSet, masquerade: bool },
    /// Refuse: ICMP/ICMPv6 port unreachable (kube-proxy's `reject`).
    Reject,
    /// Silently drop.
    Drop,
}

/// The action for each source class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Actions {
    pub pod: Action,
    pub node: Action,
    pub other: Action,
}

impl Actions {
    pub fn get(&self, class: SourceClass) -> Action {
        match class {
            SourceClass::Pod => self.pod,
            SourceClass::Node => self.node,
            SourceClass::Other => self.other,
        }
    }
}

/// One address:port where a service port is reachable on this node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Frontend {
    pub kind: FrontendKind,
    pub addr: IpAddr,
    pub port: u16,
    pub actions: Actions,
    /// loadBalancerSourceRanges of this family (LoadBalancer frontends only; empty = everyone).
    /// A source outside every range is dropped before the action applies (kube-proxy's
    /// firewall chain runs ahead of DNAT and of the reject/drop verdicts). When the node's
    /// primary IP of this family is inside a range, the Service's LoadBalancer IPs are appended
    /// as host ranges: a VIP-style LB IP is often a local address, so the node's own requests
    /// to it loop back with the VIP as source (kube-proxy's `allowFromNode`).
    pub source_ranges: Vec<ipnet::IpNet>,
}

/// One endpoint (address + resolved target port) and its conditions.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node (`nodeName` equals the proxy's hostname).
    pub local: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
}

/// Everything the dataplane needs for one service port in one IP family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortState {
    pub name: ServicePortName,
    pub family: IpFamily,
    pub frontends: Vec<Frontend>,
    /// Endpoints for the frontend's own policy: for the ClusterIP frontend this is the
    /// internalTrafficPolicy set, for the others the externalTrafficPolicy set.
    pub internal_endpoints: Vec<Endpoint>,
    pub external_endpoints: Vec<Endpoint>,
    /// The Cluster-policy set (`EndpointSet::Cluster`).
    pub cluster_endpoints: Vec<Endpoint>,
    /// Endpoints in none of the sets above whose established flows kube-proxy leaves alone:
    /// serving ones (terminating while ready ones exist), and for TCP and SCTP also those that
    /// stopped serving (kube-proxy cleans only UDP flows to endpoints that stop serving). No
    /// new connection goes to them; the dataplane keeps their backends for the flows it has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining_endpoints: Vec<Endpoint>,
    /// sessionAffinity ClientIP timeout in seconds; `None` without affinity.
    pub affinity_timeout_seconds: Option<u32>,
    pub internal_policy_local: bool,
    pub external_policy_local: bool,
    pub health_check_node_port: Option<u16>,
}

/// Addresses inside the service CIDRs that are not a frontend of any service port: kube-proxy
/// rejects traffic to a known ClusterIP on an unknown port and drops traffic to unallocated
/// addresses of the service CIDRs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressRules {
    pub service_cidrs: Vec<ipnet::IpNet>,
    /// Every allocated ClusterIP (a packet to one of these on a port no frontend has → REJECT).
    pub cluster_ips: Vec<IpAddr>,
}

impl AddressRules {
    /// Is some ClusterIP outside every service CIDR (the dataplane then asks for a ClusterIP
    /// whatever the destination)? An API server allocates inside its ServiceCIDRs; this happens
    /// when the proxy does not know them (no ServiceCIDR objects, no explicit flag).
    pub fn cluster_ips_outside_service_cidrs(&self) -> bool {
        self.cluster_ips
            .iter()
            .any(|ip| !self.service_cidrs.iter().any(|cidr| cidr.contains(ip)))
    }
}

/// How the dataplane recognises [`SourceClass::Pod`] traffic (`--detect-local-mode`). The model
/// has already applied the consequences (with no detector for a family, the Pod actions equal
/// the Other actions); the dataplane needs this only to classify packets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "mode", rename_all = "camelCase")]
pub enum LocalTrafficDetector {
    /// Nothing is Pod-class.
    #[default]
    None,
    /// Source address inside one of these (ClusterCIDR and NodeCIDR modes; at most one per
    /// family; a family without a CIDR has no detector).
    SourceCidrs { cidrs: Vec<ipnet::IpNet> },
    /// Arrived on an interface whose name starts with `prefix` (InterfaceNamePrefix mode).
    InterfaceNamePrefix { prefix: String },
    /// Arrived on the bridge `name` (BridgeInterface mode).
    BridgeInterface { name: String },
}

impl LocalTrafficDetector {
    /// kube-proxy's `IsImplemented()` for the proxier of `family`.
    pub fn is_implemented(&self, family: IpFamily) -> bool {
        match self {
            LocalTrafficDetector::None => false,
            LocalTrafficDetector::SourceCidrs { cidrs } => {
                cidrs.iter().any(|cidr| IpFamily::of(cidr.addr()) == family)
            }
            LocalTrafficDetector::InterfaceNamePrefix { .. }
            | LocalTrafficDetector::BridgeInterface { .. } => true,
        }
    }
}

/// The whole desired state of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredState {
    /// Sorted by (name, family) so output and diffs are deterministic.
    pub service_ports: Vec<Arc<ServicePortState>>,
    pub address_rules: AddressRules,
    /// How Pod-class sources are recognised (see [`SourceClass::Pod`]).
    pub local_traffic_detector: LocalTrafficDetector,
    /// The source's diagnostics first, then the model's.
    pub diagnostics: Vec<Diagnostic>,
}
