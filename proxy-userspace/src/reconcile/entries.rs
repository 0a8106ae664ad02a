//! The desired state as map entries: the one place that decides how a `DesiredState` is laid
//! out in the kernel maps of `proxy-common`.

use std::net::IpAddr;

// FNV instead of SipHash: the keys are small fixed-size map keys of our own, and hashing them
// was a tenth of a 10,000-Service sync (no attacker chooses them).
use fnv::{FnvHashMap as HashMap, FnvHashSet as HashSet};

use ipnet::IpNet;
use proxy_common::{
    AffinityBackendKey, BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Backend, ConfigValue, IPPROTO_SCTP,
    IPPROTO_TCP, IPPROTO_UDP, SCOPE_CLUSTER, SCOPE_POLICY, SOURCE_NODE, SOURCE_OTHER, SOURCE_POD,
    SVC_F_EXTERNAL, SVC_F_HAS_CLUSTER_SCOPE, SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue,
    VIP_F_CLUSTER_IP, VipKey, VipValue, addr_from_ip,
};

use super::ids::Ids;
use crate::model::{
    Action, DesiredState, Endpoint, EndpointSet, FrontendKind, LocalTrafficDetector, Protocol,
    ServicePortState, SourceClass,
};

/// One loadBalancerSourceRanges rule: clients in `range` may reach the service `service_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRange {
    pub service_id: u32,
    pub range: IpNet,
}

/// Everything the controller programs into the maps (conntrack and affinity are the kernel's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapEntries {
    pub backends: HashMap<u32, Backend>,
    pub services: HashMap<ServiceKey, ServiceValue>,
    pub vips: HashMap<VipKey, VipValue>,
    pub source_ranges: HashSet<SourceRange>,
    /// Service CIDRs: unallocated addresses in them are dropped.
    pub service_cidrs: HashSet<IpNet>,
    /// The local-traffic detector's CIDRs (cluster CIDR or node pod CIDRs).
    pub local_cidrs: HashSet<IpNet>,
    /// For service ports with ClientIP affinity: which backends an affinity entry may keep
    /// sending a client to (the endpoint sets the slots select from).
    pub affinity_backends: HashSet<AffinityBackendKey>,
    /// The CONFIG map's one value (node addresses, SNAT ports, detector mode, flags).
    pub config: ConfigValue,
    /// Interfaces whose traffic the interface-based local-traffic detectors call pod traffic.
    pub local_ifindexes: HashSet<u32>,
}

/// The node's part of the maps, which the model's desired state does not hold: the CONFIG
/// value and the local-traffic detector's interfaces (the controller derives both from the
/// configuration, the Node and this network namespace's interfaces).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeEntries {
    pub config: ConfigValue,
    pub local_ifindexes: HashSet<u32>,
}

pub fn proto_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

fn class_bit(class: SourceClass) -> u8 {
    1 << match class {
        SourceClass::Pod => SOURCE_POD,
        SourceClass::Node => SOURCE_NODE,
        SourceClass::Other => SOURCE_OTHER,
    }
}

/// The per-class bit masks of a service entry.
fn class_masks(actions: crate::model::Actions) -> (u8, u8, u8, u8) {
    let (mut cluster, mut masquerade, mut reject, mut drop) = (0, 0, 0, 0);
    for class in [SourceClass::Pod, SourceClass::Node, SourceClass::Other] {
        let bit = class_bit(class);
        match actions.get(class) {
            Action::Forward { set, masquerade: m } => {
                if set == EndpointSet::Cluster {
                    cluster |= bit;
                }
                if m {
                    masquerade |= bit;
                }
            }
            Action::Reject => reject |= bit,
            Action::Drop => drop |= bit,
        }
    }
    (cluster, masquerade, reject, drop)
}

impl MapEntries {
    /// Lays out `state` and the node's entries as map entries, taking ids from `ids` (stable
    /// for what `previous` already holds).
    pub fn from_desired(
        state: &DesiredState,
        node: &NodeEntries,
        ids: &mut Ids,
        previous: &MapEntries,
    ) -> MapEntries {
        let local_cidrs = match &state.local_traffic_detector {
            LocalTrafficDetector::SourceCidrs { cidrs } => cidrs.iter().copied().collect(),
            // Interface-based detectors are programmed per interface as interfaces come and go.
            LocalTrafficDetector::None
            | LocalTrafficDetector::InterfaceNamePrefix { .. }
            | LocalTrafficDetector::BridgeInterface { .. } => HashSet::default(),
        };
        let mut entries = MapEntries {
            local_cidrs,
            service_cidrs: state.address_rules.service_cidrs.iter().copied().collect(),
            config: node.config,
            local_ifindexes: node.local_ifindexes.clone(),
            ..MapEntries::default()
        };
        for &ip in &state.address_rules.cluster_ips {
            let (addr, family) = addr_from_ip(ip);
            entries.vips.insert(
                VipKey {
                    addr,
                    family,
                    _pad: [0; 3],
                },
                VipValue {
                    flags: VIP_F_CLUSTER_IP,
                    _pad: [0; 3],
                },
            );
        }
        ids.begin_generation();
        for sp in &state.service_ports {
            entries.add_service_port(sp, ids, previous);
        }
        ids.end_generation();
        entries
    }

    fn add_service_port(&mut self, sp: &ServicePortState, ids: &mut Ids, previous: &MapEntries) {
        let proto = proto_number(sp.name.protocol);
        let frontend_keys: Vec<ServiceKey> = sp
            .frontends
            .iter()
            .map(|f| frontend_key(f.addr, f.port, proto, SCOPE_POLICY))
            .collect();
        let service_id = ids.service(&sp.name, sp.family, &frontend_keys, previous);
        let mut backend_ids = |endpoints: &[Endpoint], entries: &mut MapEntries| -> Vec<u32> {
            let mut sorted: Vec<&Endpoint> = endpoints.iter().collect();
            sorted.sort_by_key(|e| (e.addr, e.port));
            sorted.dedup_by_key(|e| (e.addr, e.port));
            sorted
                .into_iter()
                .map(|e| {
                    let (addr, family) = addr_from_ip(e.addr);
                    let backend = Backend {
                        addr,
                        port: e.port.to_be(),
                        proto,
                        family,
                        flags: if e.local { BACKEND_F_LOCAL } else { 0 }
                            | if e.terminating {
                                BACKEND_F_TERMINATING
                            } else {
                                0
                            },
                        _pad: [0; 3],
                    };
                    let id = ids.backend(&backend);
                    entries.backends.insert(id, backend);
                    id
                })
                .collect()
        };
        let internal = backend_ids(&sp.internal_endpoints, self);
        let external = backend_ids(&sp.external_endpoints, self);
        let cluster = backend_ids(&sp.cluster_endpoints, self);
        // Backends without a slot: only established flows reach them.
        backend_ids(&sp.draining_endpoints, self);
        let affinity_timeout = sp.affinity_timeout_seconds.unwrap_or(0);
        for (frontend, key) in sp.frontends.iter().zip(frontend_keys) {
            let (cluster_classes, masquerade_classes, reject_classes, drop_classes) =
                class_masks(frontend.actions);
            let mut flags = 0;
            if !frontend.source_ranges.is_empty() {
                flags |= SVC_F_SOURCE_RANGES;
                for range in &frontend.source_ranges {
                    self.source_ranges.insert(SourceRange {
                        service_id,
                        range: *range,
                    });
                }
            }
            if cluster_classes != 0 {
                flags |= SVC_F_HAS_CLUSTER_SCOPE;
            }
            if frontend.kind.is_external() {
                flags |= SVC_F_EXTERNAL;
            }
            let policy = if frontend.kind == FrontendKind::ClusterIp {
                &internal
            } else {
                &external
            };
            let entry = |count: usize| ServiceValue {
                id: service_id,
                count: count as u16,
                flags,
                affinity_timeout,
                cluster_classes,
                masquerade_classes,
                reject_classes,
                drop_classes,
            };
            self.add_slots(key, entry(policy.len()), policy);
            if affinity_timeout != 0 {
                self.add_affinity_backends(
                    service_id,
                    SCOPE_POLICY,
                    frontend.kind.is_external(),
                    policy,
                );
            }
            if cluster_classes != 0 {
                let cluster_key = ServiceKey {
                    scope: SCOPE_CLUSTER,
                    ..key
                };
                self.add_slots(cluster_key, entry(cluster.len()), &cluster);
                if affinity_timeout != 0 {
                    self.add_affinity_backends(service_id, SCOPE_CLUSTER, false, &cluster);
                }
            }
        }
    }

    fn add_affinity_backends(
        &mut self,
        service_id: u32,
        scope: u8,
        external: bool,
        backends: &[u32],
    ) {
        self.affinity_backends
            .extend(backends.iter().map(|&backend_id| AffinityBackendKey {
                service_id,
                backend_id,
                scope,
                external: u8::from(external),
                _pad: [0; 2],
            }));
    }

    fn add_slots(&mut self, key: ServiceKey, entry: ServiceValue, backends: &[u32]) {
        self.services.insert(key, entry);
        for (i, &backend) in backends.iter().enumerate() {
            self.services.insert(
                ServiceKey {
                    slot: (i + 1) as u16,
                    ..key
                },
                ServiceValue {
                    id: backend,
                    ..ServiceValue::default()
                },
            );
        }
    }
}

pub fn frontend_key(addr: IpAddr, port: u16, proto: u8, scope: u8) -> ServiceKey {
    let (addr, family) = addr_from_ip(addr);
    ServiceKey {
        addr,
        port: port.to_be(),
        proto,
        scope,
        slot: 0,
        family,
        _pad: 0,
    }
}
