//! The desired state as map entries: the one place that decides how a `DesiredState` is laid
//! out in the kernel maps of `proxy-common`.

use std::net::IpAddr;
use std::sync::Arc;

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
    Action, DesiredState, Endpoint, EndpointSet, FrontendKind, IpFamily, LocalTrafficDetector,
    Protocol, ServicePortName, ServicePortState, SourceClass,
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

/// Keys whose desired entry may have changed in one [`Layout::update`]: the reconciler diffs
/// only these (and the small node-wide sets) against what is programmed.
#[derive(Debug, Default)]
pub struct Touched {
    pub backends: HashSet<u32>,
    pub services: HashSet<ServiceKey>,
    pub source_ranges: HashSet<SourceRange>,
    pub affinity_backends: HashSet<AffinityBackendKey>,
    /// Service ports laid out again (added or changed).
    pub service_ports: usize,
}

impl Touched {
    /// `entries` restricted to the touched keys, with the node-wide parts whole.
    pub fn restrict(&self, entries: &MapEntries) -> MapEntries {
        fn pick<K: Copy + Eq + std::hash::Hash, V: Copy>(
            keys: &HashSet<K>,
            map: &HashMap<K, V>,
        ) -> HashMap<K, V> {
            keys.iter()
                .filter_map(|k| map.get(k).map(|v| (*k, *v)))
                .collect()
        }
        fn present<K: Copy + Eq + std::hash::Hash>(
            keys: &HashSet<K>,
            set: &HashSet<K>,
        ) -> HashSet<K> {
            keys.iter().filter(|k| set.contains(*k)).copied().collect()
        }
        MapEntries {
            backends: pick(&self.backends, &entries.backends),
            services: pick(&self.services, &entries.services),
            source_ranges: present(&self.source_ranges, &entries.source_ranges),
            affinity_backends: present(&self.affinity_backends, &entries.affinity_backends),
            vips: entries.vips.clone(),
            service_cidrs: entries.service_cidrs.clone(),
            local_cidrs: entries.local_cidrs.clone(),
            config: entries.config,
            local_ifindexes: entries.local_ifindexes.clone(),
        }
    }
}

/// What one service port laid out, remembered with the state it came from.
#[derive(Debug)]
struct PortEntries {
    from: Arc<ServicePortState>,
    /// The last [`Layout::update`] that found this service port in the desired state.
    seen: u64,
    /// The backends it names (each once: one reference in [`Ids`]).
    backends: Vec<Backend>,
    services: Vec<ServiceKey>,
    source_ranges: Vec<SourceRange>,
    affinity_backends: Vec<AffinityBackendKey>,
}

/// The desired state laid out as map entries, kept per service port: an update lays out only
/// the service ports whose state is a new `Arc` (the model keeps the `Arc` of an unchanged
/// one), so a change costs what it touches, not the whole state.
#[derive(Debug, Default)]
pub struct Layout {
    entries: MapEntries,
    /// By the address of the `Arc` the service port was laid out from (held in the value, so
    /// the address is not reused while it is a key).
    ports: HashMap<usize, PortEntries>,
    by_name: std::collections::HashMap<(ServicePortName, IpFamily), usize>,
    generation: u64,
}

fn arc_key(sp: &Arc<ServicePortState>) -> usize {
    Arc::as_ptr(sp) as usize
}

impl Layout {
    /// Everything laid out: what the maps are to hold.
    pub fn entries(&self) -> &MapEntries {
        &self.entries
    }

    /// Lays out `state` and the node's entries, taking ids from `ids` (stable for what
    /// `programmed` already holds after a restart), and says which keys may have changed.
    pub fn update(
        &mut self,
        state: &DesiredState,
        node: &NodeEntries,
        ids: &mut Ids,
        programmed: &MapEntries,
    ) -> Touched {
        self.generation += 1;
        let generation = self.generation;
        self.lay_out_node(state, node);
        let mut touched = Touched::default();
        let mut changed = Vec::new();
        for sp in &state.service_ports {
            match self.ports.get_mut(&arc_key(sp)) {
                Some(port) => port.seen = generation,
                None => changed.push(sp),
            }
        }
        // Old entries of changed and removed service ports out first, then the new ones in:
        // a key moving from one service port to another (a renamed Service) ends up present.
        for sp in &changed {
            if let Some(old) = self.by_name.remove(&(sp.name.clone(), sp.family))
                && let Some(port) = self.ports.remove(&old)
            {
                self.remove_port(&port, ids, &mut touched);
            }
        }
        let gone: Vec<usize> = self
            .ports
            .iter()
            .filter(|(_, port)| port.seen != generation)
            .map(|(key, _)| *key)
            .collect();
        for key in gone {
            if let Some(port) = self.ports.remove(&key) {
                self.by_name
                    .remove(&(port.from.name.clone(), port.from.family));
                ids.release_service(&port.from.name, port.from.family);
                self.remove_port(&port, ids, &mut touched);
            }
        }
        for sp in changed {
            let mut port = self.add_service_port(sp, ids, programmed, &mut touched);
            port.seen = generation;
            self.by_name
                .insert((sp.name.clone(), sp.family), arc_key(sp));
            self.ports.insert(arc_key(sp), port);
            touched.service_ports += 1;
        }
        for id in ids.settle() {
            self.entries.backends.remove(&id);
            touched.backends.insert(id);
        }
        touched
    }

    /// The node-wide parts: CONFIG, the detector's CIDRs and interfaces, the service CIDRs and
    /// the ClusterIPs (sets as large as the Services at most, rebuilt whole).
    fn lay_out_node(&mut self, state: &DesiredState, node: &NodeEntries) {
        let entries = &mut self.entries;
        entries.local_cidrs = match &state.local_traffic_detector {
            LocalTrafficDetector::SourceCidrs { cidrs } => cidrs.iter().copied().collect(),
            // Interface-based detectors are programmed per interface as interfaces come and go.
            LocalTrafficDetector::None
            | LocalTrafficDetector::InterfaceNamePrefix { .. }
            | LocalTrafficDetector::BridgeInterface { .. } => HashSet::default(),
        };
        entries.service_cidrs = state.address_rules.service_cidrs.iter().copied().collect();
        entries.config = node.config;
        entries.local_ifindexes.clone_from(&node.local_ifindexes);
        entries.vips = state
            .address_rules
            .cluster_ips
            .iter()
            .map(|&ip| vip_entry(ip, VIP_F_CLUSTER_IP))
            .collect();
    }

    /// Takes a service port's entries out (a backend another service port names stays).
    fn remove_port(&mut self, port: &PortEntries, ids: &mut Ids, touched: &mut Touched) {
        for key in &port.services {
            self.entries.services.remove(key);
            touched.services.insert(*key);
        }
        for range in &port.source_ranges {
            self.entries.source_ranges.remove(range);
            touched.source_ranges.insert(*range);
        }
        for key in &port.affinity_backends {
            self.entries.affinity_backends.remove(key);
            touched.affinity_backends.insert(*key);
        }
        for backend in &port.backends {
            ids.release_backend(backend);
        }
    }

    fn add_service_port(
        &mut self,
        sp: &Arc<ServicePortState>,
        ids: &mut Ids,
        programmed: &MapEntries,
        touched: &mut Touched,
    ) -> PortEntries {
        let proto = proto_number(sp.name.protocol);
        let frontend_keys: Vec<ServiceKey> = sp
            .frontends
            .iter()
            .map(|f| frontend_key(f.addr, f.port, proto, SCOPE_POLICY))
            .collect();
        let service_id = ids.service(&sp.name, sp.family, &frontend_keys, programmed);
        let mut port = PortEntries {
            from: sp.clone(),
            seen: 0,
            backends: Vec::new(),
            services: Vec::new(),
            source_ranges: Vec::new(),
            affinity_backends: Vec::new(),
        };
        // Each endpoint once, with the id it has wherever it is named.
        let mut named: HashMap<(IpAddr, u16), u32> = HashMap::default();
        let mut backend_ids = |endpoints: &[Endpoint], port: &mut PortEntries| -> Vec<u32> {
            let mut sorted: Vec<&Endpoint> = endpoints.iter().collect();
            sorted.sort_by_key(|e| (e.addr, e.port));
            sorted.dedup_by_key(|e| (e.addr, e.port));
            sorted
                .into_iter()
                .map(|e| {
                    *named.entry((e.addr, e.port)).or_insert_with(|| {
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
                        let id = ids.acquire_backend(&backend);
                        self.entries.backends.insert(id, backend);
                        touched.backends.insert(id);
                        port.backends.push(backend);
                        id
                    })
                })
                .collect()
        };
        let internal = backend_ids(&sp.internal_endpoints, &mut port);
        let external = backend_ids(&sp.external_endpoints, &mut port);
        let cluster = backend_ids(&sp.cluster_endpoints, &mut port);
        // Backends without a slot: only established flows reach them.
        backend_ids(&sp.draining_endpoints, &mut port);
        let affinity_timeout = sp.affinity_timeout_seconds.unwrap_or(0);
        let mut out = PortOut {
            entries: &mut self.entries,
            port: &mut port,
            touched,
        };
        for (frontend, key) in sp.frontends.iter().zip(frontend_keys) {
            let (cluster_classes, masquerade_classes, reject_classes, drop_classes) =
                class_masks(frontend.actions);
            let mut flags = 0;
            if !frontend.source_ranges.is_empty() {
                flags |= SVC_F_SOURCE_RANGES;
                for range in &frontend.source_ranges {
                    out.source_range(SourceRange {
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
            out.slots(key, entry(policy.len()), policy);
            if affinity_timeout != 0 {
                out.affinity_backends(
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
                out.slots(cluster_key, entry(cluster.len()), &cluster);
                if affinity_timeout != 0 {
                    out.affinity_backends(service_id, SCOPE_CLUSTER, false, &cluster);
                }
            }
        }
        port
    }
}

/// Where one service port's entries go: the layout, its own record of them, the touched keys.
struct PortOut<'a> {
    entries: &'a mut MapEntries,
    port: &'a mut PortEntries,
    touched: &'a mut Touched,
}

impl PortOut<'_> {
    fn service(&mut self, key: ServiceKey, value: ServiceValue) {
        self.entries.services.insert(key, value);
        self.port.services.push(key);
        self.touched.services.insert(key);
    }

    fn source_range(&mut self, range: SourceRange) {
        self.entries.source_ranges.insert(range);
        self.port.source_ranges.push(range);
        self.touched.source_ranges.insert(range);
    }

    fn affinity_backends(&mut self, service_id: u32, scope: u8, external: bool, backends: &[u32]) {
        for &backend_id in backends {
            let key = AffinityBackendKey {
                service_id,
                backend_id,
                scope,
                external: u8::from(external),
                _pad: [0; 2],
            };
            self.entries.affinity_backends.insert(key);
            self.port.affinity_backends.push(key);
            self.touched.affinity_backends.insert(key);
        }
    }

    fn slots(&mut self, key: ServiceKey, entry: ServiceValue, backends: &[u32]) {
        self.service(key, entry);
        for (i, &backend) in backends.iter().enumerate() {
            self.service(
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

/// The `VIPS` entry of address `ip` with `flags`.
pub fn vip_entry(ip: IpAddr, flags: u8) -> (VipKey, VipValue) {
    let (addr, family) = addr_from_ip(ip);
    (
        VipKey {
            addr,
            family,
            _pad: [0; 3],
        },
        VipValue {
            flags,
            _pad: [0; 3],
        },
    )
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
