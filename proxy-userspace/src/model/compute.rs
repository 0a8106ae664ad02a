//! `compute`: kube-proxy's service and endpoint decisions for one node, following
//! `pkg/proxy` (serviceport.go, endpointslicecache.go, topology.go `CategorizeEndpoints`) and
//! the nftables proxier's `syncProxyRules` for the per-source verdicts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use fnv::FnvHashMap;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort as K8sServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::config::ModelConfig;
use super::types::{
    Action, Actions, AddressRules, DesiredState, Endpoint, EndpointSet, Frontend, FrontendKind,
    IpFamily, Protocol, ServicePortName, ServicePortState,
};
use crate::cluster::{ClusterSnapshot, DEFAULT_AFFINITY_TIMEOUT_SECONDS, Diagnostic, ObjectKey};

/// The EndpointSlice label naming the Service it belongs to.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The node's desired dataplane state: every service port of every family with its frontends,
/// per-source actions and endpoint sets.
pub fn compute(snapshot: &ClusterSnapshot, config: &ModelConfig) -> DesiredState {
    ModelCache::default().compute(snapshot, config)
}

/// One Service's part of the desired state: what the Service and its EndpointSlices alone
/// decide (everything but the conflicts between Services).
#[derive(Debug, Default)]
struct ServicePart {
    ports: Vec<Arc<ServicePortState>>,
    /// Its ClusterIPs when it has ports (the nftables proxier's cluster-ips set).
    cluster_ips: Vec<IpAddr>,
    diagnostics: Vec<Diagnostic>,
}

/// A Service's part as last computed, with the objects it was computed from.
struct Memo {
    service: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    part: ServicePart,
    /// The last call that found the Service.
    generation: u64,
}

impl Memo {
    fn computed_from(&self, service: &Arc<Service>, slices: &[KeyedSlice<'_>]) -> bool {
        Arc::ptr_eq(&self.service, service)
            && self.slices.len() == slices.len()
            && self
                .slices
                .iter()
                .zip(slices)
                .all(|(memo, (_, _, slice))| Arc::ptr_eq(memo, slice))
    }
}

/// [`compute`] across syncs, incremental per Service: a Service whose object and
/// EndpointSlices are the same `Arc`s as at the last call, under the same configuration, keeps
/// its service ports without being computed again (sources share unchanged objects between
/// snapshots). The result is always what [`compute`] returns for the same input.
#[derive(Default)]
pub struct ModelCache {
    config: Option<ModelConfig>,
    /// FNV: hashed once per Service per sync, SipHash was a visible part of it.
    services: FnvHashMap<ObjectKey, Memo>,
    generation: u64,
}

impl ModelCache {
    pub fn compute(&mut self, snapshot: &ClusterSnapshot, config: &ModelConfig) -> DesiredState {
        if self.config.as_ref() != Some(config) {
            self.services.clear();
            self.config = Some(config.clone());
        }
        let mut diagnostics = snapshot.diagnostics.clone();
        let service_cidrs = super::service_cidrs::drop_ranges(
            &snapshot.service_cidrs,
            &config.service_cidrs,
            &mut diagnostics,
        );
        let slices = slices_by_service(snapshot, &mut diagnostics);
        // Walked beside the Services, which come in the same order.
        let mut rest = slices.as_slice();
        let mut orphans = Vec::new();
        let mut service_ports = Vec::new();
        let mut cluster_ips = Vec::new();
        self.generation += 1;
        let generation = self.generation;
        for (key, service) in &snapshot.services {
            let service_ref = (key.namespace.as_str(), key.name.as_str());
            while let Some((slice, after)) = rest.split_first()
                && slice.0 < service_ref
            {
                orphans.push(*slice);
                rest = after;
            }
            let count = rest
                .iter()
                .take_while(|slice| slice.0 == service_ref)
                .count();
            let (own, after) = rest.split_at(count);
            rest = after;
            let computed = || Memo {
                part: service_part(key, service, own, config),
                service: Arc::clone(service),
                slices: own.iter().map(|(_, _, slice)| Arc::clone(slice)).collect(),
                generation,
            };
            // Updated in place: rebuilding the map (or `entry`) would clone every key on every
            // call.
            let memo = if let Some(memo) = self.services.get_mut(key) {
                if !memo.computed_from(service, own) {
                    *memo = computed();
                }
                memo.generation = generation;
                &*memo
            } else {
                self.services.insert(key.clone(), computed());
                &self.services[key]
            };
            service_ports.extend(memo.part.ports.iter().cloned());
            cluster_ips.extend_from_slice(&memo.part.cluster_ips);
            diagnostics.extend(memo.part.diagnostics.iter().cloned());
        }
        self.services
            .retain(|_, memo| memo.generation == generation);
        // EndpointSlices of no known Service program nothing; their problems are still named,
        // in the Services' name order.
        orphans.extend_from_slice(rest);
        for own in orphans.chunk_by(|a, b| a.0 == b.0) {
            index_endpoint_slices(own, config, &mut diagnostics);
        }
        service_ports.sort_by(|a, b| (&a.name, a.family).cmp(&(&b.name, b.family)));
        drop_conflicting_frontends(&mut service_ports, &mut diagnostics);
        cluster_ips.sort_unstable();
        cluster_ips.dedup();
        DesiredState {
            service_ports,
            address_rules: AddressRules {
                service_cidrs,
                cluster_ips,
            },
            local_traffic_detector: config.local_traffic_detector.clone(),
            diagnostics,
        }
    }
}

/// An EndpointSlice with the (namespace, name) of its Service and its own key.
type KeyedSlice<'a> = ((&'a str, &'a str), &'a ObjectKey, &'a Arc<EndpointSlice>);

/// The EndpointSlices, ordered by their Service (namespace, name) and, for one Service, by
/// key: the Services' own order, so a walk beside them pairs them without a map (grouping them
/// in a hash map of vectors made the model's part of a one-Service change at 10,000 Services
/// about a quarter longer, measured in-process). Slices naming no Service are reported.
fn slices_by_service<'a>(
    snapshot: &'a ClusterSnapshot,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<KeyedSlice<'a>> {
    let mut slices: Vec<KeyedSlice<'a>> = snapshot
        .endpoint_slices
        .iter()
        .filter_map(|(key, slice)| {
            let service = service_of(key, slice, diagnostics)?;
            Some(((key.namespace.as_str(), service), key, slice))
        })
        .collect();
    // Stable: key order within a Service.
    slices.sort_by(|a, b| a.0.cmp(&b.0));
    slices
}

/// What `service` and its EndpointSlices `slices` decide.
fn service_part(
    key: &ObjectKey,
    service: &Service,
    slices: &[KeyedSlice<'_>],
    config: &ModelConfig,
) -> ServicePart {
    let mut part = ServicePart::default();
    let endpoints = index_endpoint_slices(slices, config, &mut part.diagnostics);
    let Some(service) = ServiceInfo::parse(key, service, &mut part.diagnostics) else {
        return part;
    };
    // Like the nftables proxier's cluster-ips set: ClusterIPs of Services with ports.
    if !service.ports.is_empty() {
        part.cluster_ips.extend(service.cluster_ips.iter().copied());
    }
    for &cluster_ip in &service.cluster_ips {
        let family = IpFamily::of(cluster_ip);
        for port in &service.ports {
            let name = ServicePortName {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                port: port.name.clone(),
                protocol: port.protocol,
            };
            let candidates = endpoints
                .get(&(port.name.clone(), port.protocol, family))
                .map_or(&[][..], Vec::as_slice);
            part.ports.push(Arc::new(service_port_state(
                &service, port, name, cluster_ip, candidates, config,
            )));
        }
    }
    part
}

/// One port of a Service, as kube-proxy's `BaseServicePortInfo` reads it.
struct PortInfo {
    name: String,
    protocol: Protocol,
    port: u16,
    node_port: Option<u16>,
}

/// The family-independent parts of a Service that the model uses.
struct ServiceInfo {
    /// The first ClusterIP of each family (kube-proxy's `GetClusterIPByFamily`).
    cluster_ips: Vec<IpAddr>,
    ports: Vec<PortInfo>,
    external_ips: Vec<IpAddr>,
    /// Ingress IPs of VIP mode (ipMode Proxy excluded).
    load_balancer_ips: Vec<IpAddr>,
    source_ranges: Vec<IpNet>,
    affinity_timeout_seconds: Option<u32>,
    internal_policy_local: bool,
    external_policy_local: bool,
    health_check_node_port: Option<u16>,
}

fn diagnostic(key: &ObjectKey, kind: &str, message: String) -> Diagnostic {
    Diagnostic {
        object: format!("{kind} {}/{}", key.namespace, key.name),
        message,
    }
}

fn parse_protocol(protocol: Option<&str>) -> Option<Protocol> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn parse_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|port| *port != 0)
}

impl ServiceInfo {
    /// `None` for Services kube-proxy does not proxy (ExternalName, headless, no ClusterIP) and
    /// for Services too broken to use (reported in `diagnostics`).
    fn parse(
        key: &ObjectKey,
        service: &Service,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Option<ServiceInfo> {
        let mut report = |message: String| diagnostics.push(diagnostic(key, "Service", message));
        let Some(spec) = &service.spec else {
            report("has no spec; skipped".to_owned());
            return None;
        };
        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        if service_type == "ExternalName" {
            return None;
        }
        let listed: Vec<&str> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
            _ => spec.cluster_ip.as_deref().into_iter().collect(),
        };
        if listed
            .first()
            .is_none_or(|ip| ip.is_empty() || *ip == "None")
        {
            return None;
        }
        let mut cluster_ips: Vec<IpAddr> = Vec::new();
        for text in listed {
            match text.parse::<IpAddr>() {
                Ok(ip) => {
                    if !cluster_ips
                        .iter()
                        .any(|known| IpFamily::of(*known) == IpFamily::of(ip))
                    {
                        cluster_ips.push(ip);
                    }
                }
                Err(_) => report(format!("invalid clusterIP {text:?} ignored")),
            }
        }
        if cluster_ips.is_empty() {
            return None;
        }
        let mut ports = Vec::new();
        for port in spec.ports.iter().flatten() {
            if let Some(info) = parse_service_port(port, &mut report) {
                ports.push(info);
            }
        }
        let external_ips = parse_ips(spec.external_ips.as_deref(), "externalIP", &mut report);
        let load_balancer_ips = service
            .status
            .iter()
            .filter_map(|status| status.load_balancer.as_ref())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|ingress| ingress.ip.as_deref().filter(|ip| !ip.is_empty()))
            .filter_map(|text| {
                let parsed = text.parse::<IpAddr>().ok();
                if parsed.is_none() {
                    report(format!("invalid loadBalancer ingress IP {text:?} ignored"));
                }
                parsed
            })
            .collect();
        let mut source_ranges = Vec::new();
        for text in spec.load_balancer_source_ranges.iter().flatten() {
            // The API server's validation tolerates whitespace around the CIDRs.
            match text.trim().parse::<IpNet>() {
                Ok(range) => source_ranges.push(range),
                Err(_) => report(format!("invalid loadBalancerSourceRange {text:?} ignored")),
            }
        }
        let affinity_timeout_seconds =
            (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
                spec.session_affinity_config
                    .as_ref()
                    .and_then(|config| config.client_ip.as_ref())
                    .and_then(|client_ip| client_ip.timeout_seconds)
                    .and_then(|seconds| u32::try_from(seconds).ok())
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
            });
        // apiservice.ExternallyAccessible: NodePort, LoadBalancer, or ClusterIP with externalIPs.
        let accepts_external_policy = service_type == "NodePort"
            || service_type == "LoadBalancer"
            || (service_type == "ClusterIP"
                && spec
                    .external_ips
                    .as_ref()
                    .is_some_and(|ips| !ips.is_empty()));
        let external_policy_local =
            accepts_external_policy && spec.external_traffic_policy.as_deref() == Some("Local");
        let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        // NeedsHealthCheck: LoadBalancer with externalTrafficPolicy Local.
        let health_check_node_port = if service_type == "LoadBalancer" && external_policy_local {
            let port = spec.health_check_node_port.and_then(parse_port);
            if port.is_none() {
                report("LoadBalancer with externalTrafficPolicy Local has no valid healthCheckNodePort".to_owned());
            }
            port
        } else {
            None
        };
        Some(ServiceInfo {
            cluster_ips,
            ports,
            external_ips,
            load_balancer_ips,
            source_ranges,
            affinity_timeout_seconds,
            internal_policy_local,
            external_policy_local,
            health_check_node_port,
        })
    }
}

fn parse_service_port(port: &K8sServicePort, report: &mut impl FnMut(String)) -> Option<PortInfo> {
    let name = port.name.clone().unwrap_or_default();
    let Some(protocol) = parse_protocol(port.protocol.as_deref()) else {
        report(format!(
            "port {name:?}: unsupported protocol {:?}; port skipped",
            port.protocol.as_deref().unwrap_or_default()
        ));
        return None;
    };
    let Some(number) = parse_port(port.port) else {
        report(format!(
            "port {name:?}: port {} out of range; port skipped",
            port.port
        ));
        return None;
    };
    let node_port = match port.node_port {
        None | Some(0) => None,
        Some(value) => {
            let parsed = parse_port(value);
            if parsed.is_none() {
                report(format!(
                    "port {name:?}: nodePort {value} out of range; NodePort skipped"
                ));
            }
            parsed
        }
    };
    Some(PortInfo {
        name,
        protocol,
        port: number,
        node_port,
    })
}

fn parse_ips(texts: Option<&[String]>, what: &str, report: &mut impl FnMut(String)) -> Vec<IpAddr> {
    let mut parsed = Vec::new();
    for text in texts.unwrap_or_default() {
        match text.parse::<IpAddr>() {
            Ok(ip) if !parsed.contains(&ip) => parsed.push(ip),
            Ok(_) => {}
            Err(_) => report(format!("invalid {what} {text:?} ignored")),
        }
    }
    parsed
}

/// An endpoint as `CategorizeEndpoints` sees it: the public [`Endpoint`] plus its hints.
#[derive(Clone, Debug)]
struct EndpointInfo {
    endpoint: Endpoint,
    zone_hints: BTreeSet<String>,
    node_hints: BTreeSet<String>,
}

/// Endpoints of a Service by (port name, protocol, family), deduplicated by address:port and
/// sorted, as `EndpointSliceCache` builds its `EndpointsMap`.
type ServiceEndpoints = BTreeMap<(String, Protocol, IpFamily), Vec<EndpointInfo>>;

fn index_endpoint_slices(
    slices: &[KeyedSlice<'_>],
    config: &ModelConfig,
    diagnostics: &mut Vec<Diagnostic>,
) -> ServiceEndpoints {
    // Keyed by address:port while collecting, for the dedupe.
    type ByAddress = BTreeMap<(IpAddr, u16), EndpointInfo>;
    let mut by_port: BTreeMap<_, ByAddress> = BTreeMap::new();
    for &(_, key, slice) in slices {
        // Each family's proxier only watches slices of its address type (FQDN slices: none).
        let Some(family) = IpFamily::parse(&slice.address_type) else {
            continue;
        };
        let mut endpoints = Vec::new();
        for endpoint in &slice.endpoints {
            let Some(first) = endpoint.addresses.first() else {
                continue;
            };
            match first.parse::<IpAddr>() {
                Ok(addr) if IpFamily::of(addr) == family => endpoints.push((endpoint, addr)),
                Ok(_) => diagnostics.push(diagnostic(
                    key,
                    "EndpointSlice",
                    format!(
                        "endpoint address {first:?} is not of addressType {}; ignored",
                        slice.address_type
                    ),
                )),
                Err(_) => diagnostics.push(diagnostic(
                    key,
                    "EndpointSlice",
                    format!("invalid endpoint address {first:?} ignored"),
                )),
            }
        }
        for port in slice.ports.iter().flatten() {
            // kube-proxy ignores ports without a name (the API defaults it to "") or number.
            let Some(port_name) = &port.name else {
                continue;
            };
            let Some(number) = port.port.and_then(parse_port) else {
                continue;
            };
            let Some(protocol) = parse_protocol(port.protocol.as_deref()) else {
                continue;
            };
            let set = by_port
                .entry((port_name.clone(), protocol, family))
                .or_default();
            for &(endpoint, addr) in &endpoints {
                let info = endpoint_info(endpoint, addr, number, config);
                // The same address:port in two slices is one endpoint; a non-terminating copy
                // wins (the IP may already belong to a new pod while the old one terminates).
                if !info.endpoint.terminating || !set.contains_key(&(addr, number)) {
                    set.insert((addr, number), info);
                }
            }
        }
    }
    by_port
        .into_iter()
        .map(|(port, set)| (port, set.into_values().collect()))
        .collect()
}

/// The name of the Service `slice` belongs to (its namespace is the slice's).
fn service_of<'a>(
    key: &ObjectKey,
    slice: &'a EndpointSlice,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<&'a str> {
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .filter(|name| !name.is_empty());
    if let Some(name) = service_name {
        Some(name.as_str())
    } else {
        diagnostics.push(diagnostic(
            key,
            "EndpointSlice",
            format!("has no {SERVICE_NAME_LABEL} label; ignored"),
        ));
        None
    }
}

fn endpoint_info(
    endpoint: &k8s_openapi::api::discovery::v1::Endpoint,
    addr: IpAddr,
    port: u16,
    config: &ModelConfig,
) -> EndpointInfo {
    let conditions = endpoint.conditions.as_ref();
    // As kube-proxy reads them: unset ready and serving mean true, unset terminating false.
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    let hints = endpoint.hints.as_ref();
    let zone_hints = hints
        .and_then(|h| h.for_zones.as_ref())
        .into_iter()
        .flatten()
        .map(|zone| zone.name.clone())
        .collect();
    let node_hints = hints
        .and_then(|h| h.for_nodes.as_ref())
        .into_iter()
        .flatten()
        .map(|node| node.name.clone())
        .collect();
    EndpointInfo {
        endpoint: Endpoint {
            addr,
            port,
            ready,
            serving,
            terminating,
            local: !config.hostname.is_empty()
                && endpoint.node_name.as_deref() == Some(config.hostname.as_str()),
            node_name: endpoint.node_name.clone(),
            zone: endpoint.zone.clone(),
        },
        zone_hints,
        node_hints,
    }
}

/// Which endpoints a topology mode admits (`availableForTopology`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    All,
    SameNode,
    SameZone,
}

/// `topologyModeFromHints` (with PreferSameTrafficDistribution, GA in 1.35): node hints if every
/// ready endpoint has one and one names this node, else zone hints likewise, else none.
fn topology_mode(endpoints: &[EndpointInfo], hostname: &str, zone: &str) -> TopologyMode {
    let ready: Vec<&EndpointInfo> = endpoints.iter().filter(|ep| ep.endpoint.ready).collect();
    if ready.is_empty() {
        return TopologyMode::All;
    }
    let all_node_hints = ready.iter().all(|ep| !ep.node_hints.is_empty());
    if all_node_hints && ready.iter().any(|ep| ep.node_hints.contains(hostname)) {
        return TopologyMode::SameNode;
    }
    let all_zone_hints = ready.iter().all(|ep| !ep.zone_hints.is_empty());
    if all_zone_hints && ready.iter().any(|ep| ep.zone_hints.contains(zone)) {
        return TopologyMode::SameZone;
    }
    TopologyMode::All
}

fn available_for_topology(
    ep: &EndpointInfo,
    mode: TopologyMode,
    hostname: &str,
    zone: &str,
) -> bool {
    match mode {
        TopologyMode::All => true,
        TopologyMode::SameNode => ep.node_hints.contains(hostname),
        TopologyMode::SameZone => ep.zone_hints.contains(zone),
    }
}

/// The outcome of `CategorizeEndpoints`.
struct Categorized {
    cluster: Vec<Endpoint>,
    local: Vec<Endpoint>,
    /// Usable endpoints exist somewhere in the cluster.
    has_any: bool,
}

fn select(endpoints: &[EndpointInfo], keep: impl Fn(&EndpointInfo) -> bool) -> Vec<Endpoint> {
    endpoints
        .iter()
        .filter(|ep| keep(ep))
        .map(|ep| ep.endpoint.clone())
        .collect()
}

fn categorize(
    endpoints: &[EndpointInfo],
    uses_cluster: bool,
    uses_local: bool,
    config: &ModelConfig,
) -> Categorized {
    let hostname = config.hostname.as_str();
    let zone = config.zone.as_deref().unwrap_or("");
    let mut result = Categorized {
        cluster: Vec::new(),
        local: Vec::new(),
        has_any: false,
    };
    if uses_cluster {
        let mode = topology_mode(endpoints, hostname, zone);
        result.cluster = select(endpoints, |ep| {
            ep.endpoint.ready && available_for_topology(ep, mode, hostname, zone)
        });
        if result.cluster.is_empty() {
            // No ready endpoint anywhere (topology already fell back when none was ready for
            // this node/zone): use serving-terminating ones, ignoring topology.
            result.cluster = select(endpoints, |ep| {
                ep.endpoint.serving && ep.endpoint.terminating
            });
        }
        result.has_any = !result.cluster.is_empty();
    }
    if uses_local {
        let serving_terminating = |ep: &EndpointInfo| {
            !ep.endpoint.ready && ep.endpoint.serving && ep.endpoint.terminating
        };
        if endpoints
            .iter()
            .any(|ep| ep.endpoint.ready || serving_terminating(ep))
        {
            result.has_any = true;
        }
        let local_ready = select(endpoints, |ep| ep.endpoint.local && ep.endpoint.ready);
        result.local = if local_ready.is_empty() {
            select(endpoints, |ep| {
                ep.endpoint.local && ep.endpoint.serving && ep.endpoint.terminating
            })
        } else {
            local_ready
        };
    }
    result
}

fn forward(set: EndpointSet, masquerade: bool) -> Action {
    Action::Forward { set, masquerade }
}

fn uniform(action: Action) -> Actions {
    Actions {
        pod: action,
        node: action,
        other: action,
    }
}

fn service_port_state(
    service: &ServiceInfo,
    port: &PortInfo,
    name: ServicePortName,
    cluster_ip: IpAddr,
    candidates: &[EndpointInfo],
    config: &ModelConfig,
) -> ServicePortState {
    let family = IpFamily::of(cluster_ip);
    let of_family = |ip: &&IpAddr| IpFamily::of(**ip) == family;
    let external_ips: Vec<IpAddr> = service
        .external_ips
        .iter()
        .filter(of_family)
        .copied()
        .collect();
    let lb_ips: Vec<IpAddr> = service
        .load_balancer_ips
        .iter()
        .filter(of_family)
        .copied()
        .collect();
    let node_port_addrs = match port.node_port {
        Some(_) => {
            config
                .nodeport_addresses
                .resolve(family, &config.node_ips, &config.local_addresses)
        }
        None => Vec::new(),
    };
    let externally_accessible =
        port.node_port.is_some() || !external_ips.is_empty() || !lb_ips.is_empty();
    let uses_cluster = !service.internal_policy_local || externally_accessible;
    let uses_local =
        service.internal_policy_local || (service.external_policy_local && externally_accessible);
    let sets = categorize(candidates, uses_cluster, uses_local, config);

    let has_internal = sets.has_any && (!service.internal_policy_local || !sets.local.is_empty());
    let has_external = sets.has_any && (!service.external_policy_local || !sets.local.is_empty());
    let detector = config.local_traffic_detector.is_implemented(family);

    let internal_actions = if !sets.has_any {
        uniform(Action::Reject)
    } else if !has_internal {
        uniform(Action::Drop)
    } else {
        // masqueradeAll SNATs everything to the ClusterIP; otherwise, with a detector,
        // everything the detector does not call a pod (it may be routed here from off-node).
        let masquerade_non_pod = config.masquerade_all || detector;
        Actions {
            pod: forward(EndpointSet::Policy, config.masquerade_all),
            node: forward(EndpointSet::Policy, masquerade_non_pod),
            other: forward(EndpointSet::Policy, masquerade_non_pod),
        }
    };
    let external_actions = if !sets.has_any {
        uniform(Action::Reject)
    } else if !service.external_policy_local {
        // Cluster policy may cross nodes: always masquerade.
        uniform(forward(EndpointSet::Policy, true))
    } else {
        let other = if has_external {
            forward(EndpointSet::Policy, false)
        } else {
            Action::Drop
        };
        Actions {
            // Pods short-circuit to the Cluster set as if they had gone out to the LB and back.
            pod: if detector {
                forward(EndpointSet::Cluster, false)
            } else {
                other
            },
            // The node's source would be the VIP itself (a local address): masquerade.
            node: forward(EndpointSet::Cluster, true),
            other,
        }
    };

    let mut frontends = vec![Frontend {
        kind: FrontendKind::ClusterIp,
        addr: cluster_ip,
        port: port.port,
        actions: internal_actions,
        source_ranges: Vec::new(),
    }];
    let external = |kind, addr, port, source_ranges| Frontend {
        kind,
        addr,
        port,
        actions: external_actions,
        source_ranges,
    };
    if let Some(node_port) = port.node_port {
        for addr in node_port_addrs {
            frontends.push(external(
                FrontendKind::NodePort,
                addr,
                node_port,
                Vec::new(),
            ));
        }
    }
    for &addr in &external_ips {
        frontends.push(external(
            FrontendKind::ExternalIp,
            addr,
            port.port,
            Vec::new(),
        ));
    }
    let lb_source_ranges = load_balancer_source_ranges(service, family, &lb_ips, config);
    for &addr in &lb_ips {
        frontends.push(external(
            FrontendKind::LoadBalancer,
            addr,
            port.port,
            lb_source_ranges.clone(),
        ));
    }

    let internal_endpoints = if service.internal_policy_local {
        sets.local.clone()
    } else {
        sets.cluster.clone()
    };
    let external_endpoints = if service.external_policy_local {
        sets.local.clone()
    } else {
        sets.cluster.clone()
    };
    let in_a_set = |ep: &EndpointInfo| {
        [&internal_endpoints, &external_endpoints, &sets.cluster]
            .iter()
            .any(|set| {
                set.iter()
                    .any(|e| (e.addr, e.port) == (ep.endpoint.addr, ep.endpoint.port))
            })
    };
    // kube-proxy only ever deletes the conntrack entries of UDP flows, and only to endpoints
    // that stopped serving; every other established flow keeps its endpoint.
    let keeps_flows = |ep: &EndpointInfo| ep.endpoint.serving || name.protocol != Protocol::Udp;
    let draining_endpoints = select(candidates, |ep| keeps_flows(ep) && !in_a_set(ep));
    ServicePortState {
        name,
        family,
        frontends,
        internal_endpoints,
        external_endpoints,
        cluster_endpoints: sets.cluster,
        draining_endpoints,
        affinity_timeout_seconds: service.affinity_timeout_seconds,
        internal_policy_local: service.internal_policy_local,
        external_policy_local: service.external_policy_local,
        health_check_node_port: service.health_check_node_port,
    }
}

/// An address:port/protocol can lead to one service port only (the dataplane's lookup key).
/// When Services collide (an externalIP equal to another Service's ClusterIP, a NodePort
/// claimed twice in a manifests folder), allocated addresses win over user-chosen ones
/// (ClusterIP, then NodePort, LoadBalancer, externalIP), then the first Service in name order;
/// every loss is reported.
fn drop_conflicting_frontends(
    service_ports: &mut [Arc<ServicePortState>],
    diagnostics: &mut Vec<Diagnostic>,
) {
    // Owner: the index of the service port in `service_ports`.
    let mut owners: FnvHashMap<(IpAddr, u16, Protocol), usize> = FnvHashMap::default();
    // (service port, frontend) pairs that lose, found before anything is changed: service
    // ports are shared with the model's memo and copied only when they lose a frontend.
    let mut losers: Vec<(usize, usize)> = Vec::new();
    // kube-proxy consults its service-ips map (ClusterIPs, externalIPs, LoadBalancer IPs)
    // before its nodeports chain: a NodePort on an address and port one of those has loses.
    let priority = [
        FrontendKind::ClusterIp,
        FrontendKind::LoadBalancer,
        FrontendKind::ExternalIp,
        FrontendKind::NodePort,
    ];
    for kind in priority {
        for (index, state) in service_ports.iter().enumerate() {
            let name = &state.name;
            for (position, frontend) in state.frontends.iter().enumerate() {
                if frontend.kind != kind {
                    continue;
                }
                let key = (frontend.addr, frontend.port, name.protocol);
                if let Some(&owner) = owners.get(&key) {
                    let owner = &service_ports[owner].name;
                    diagnostics.push(Diagnostic {
                        object: format!("Service {}/{}", name.namespace, name.name),
                        message: format!(
                            "{} frontend {}/{} is already Service {}/{} port {:?}; skipped",
                            frontend.kind,
                            std::net::SocketAddr::new(frontend.addr, frontend.port),
                            name.protocol,
                            owner.namespace,
                            owner.name,
                            owner.port
                        ),
                    });
                    losers.push((index, position));
                } else {
                    owners.insert(key, index);
                }
            }
        }
    }
    losers.sort_unstable();
    // Highest position first, so the positions still to remove stay valid.
    for &(index, position) in losers.iter().rev() {
        Arc::make_mut(&mut service_ports[index])
            .frontends
            .remove(position);
    }
}

/// loadBalancerSourceRanges of `family`, plus the LB IPs themselves when the node's primary IP
/// is inside a range (the nftables proxier's `allowFromNode`).
fn load_balancer_source_ranges(
    service: &ServiceInfo,
    family: IpFamily,
    lb_ips: &[IpAddr],
    config: &ModelConfig,
) -> Vec<IpNet> {
    let mut ranges: Vec<IpNet> = service
        .source_ranges
        .iter()
        .filter(|range| IpFamily::of(range.addr()) == family)
        .copied()
        .collect();
    let node_ip = config.primary_node_ip(family);
    if node_ip.is_some_and(|node_ip| ranges.iter().any(|range| range.contains(&node_ip))) {
        ranges.extend(lb_ips.iter().map(|ip| IpNet::from(*ip)));
    }
    ranges
}
