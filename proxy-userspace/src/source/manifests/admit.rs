//! What the API server does to a Service between `kubectl apply` and the watch: defaulting,
//! validation of the fields the proxy relies on, and ClusterIP / NodePort allocation.
//!
//! Like the API server, what a Service was given it keeps while it exists ([`History`]): a
//! Service admitted earlier holds its ClusterIPs, NodePorts and externalIP / LoadBalancer
//! frontends, and an object asking for one of them is refused (never the holder), whatever the
//! file names sort to; an edit the API server would refuse leaves the admitted version in
//! place. Objects new to the proxy are admitted oldest first (a file's modification time stands
//! for its creation time; paths break ties). Values left out are allocated deterministically:
//! the first free value probing from a hash of the Service's name, from the upper band of a
//! range as the API server's allocators do, leaving the lower band to explicit choices.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::SystemTime;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{ClientIPConfig, Service, ServiceSpec, SessionAffinityConfig};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ManifestSettings;
use super::parse::{Origin, diagnostic};
use super::parsed::ParsedFiles;
use crate::cluster::Diagnostic;
use crate::cluster::{Allocation, IpFamily, ObjectKey};

/// A Service waiting for admission, with where it came from.
pub struct Candidate {
    pub key: ObjectKey,
    pub origin: Origin,
    /// Its file's modification time: the creation order of objects new to the proxy.
    pub created: SystemTime,
    pub service: Service,
}

/// What earlier reads of the folder admitted, as the API server's storage would hold it: the
/// admission order and each Service as admitted, allocations included; and the files as they
/// were parsed. Empty for a folder read from scratch.
#[derive(Default)]
pub struct History {
    rank: HashMap<ObjectKey, u64>,
    next_rank: u64,
    admitted: BTreeMap<ObjectKey, (Origin, Service)>,
    parsed: ParsedFiles,
}

impl History {
    /// The files as earlier reads parsed them.
    pub fn parsed_files(&mut self) -> &mut ParsedFiles {
        &mut self.parsed
    }

    /// The file the admitted version of `key` came from.
    pub fn origin(&self, key: &ObjectKey) -> Option<&Origin> {
        self.admitted.get(key).map(|(origin, _)| origin)
    }
}

fn object_name(key: &ObjectKey) -> String {
    format!("Service {}/{}", key.namespace, key.name)
}

/// Defaults, validates and allocates, in admission order (see the module doc). Returns the
/// admitted Services; refused ones are diagnostics naming the file and the field, allocated
/// values are recorded in `allocations` and written into the Service. `history` is read and
/// then updated to this read's outcome.
pub fn admit(
    mut candidates: Vec<Candidate>,
    settings: &ManifestSettings,
    history: &mut History,
    diagnostics: &mut Vec<Diagnostic>,
    allocations: &mut Vec<Allocation>,
) -> BTreeMap<ObjectKey, Service> {
    candidates.sort_by(|a, b| {
        let rank = |c: &Candidate| history.rank.get(&c.key).copied().unwrap_or(u64::MAX);
        (
            rank(a),
            a.created,
            &a.origin.file,
            a.origin.document,
            &a.key,
        )
            .cmp(&(
                rank(b),
                b.created,
                &b.origin.file,
                b.origin.document,
                &b.key,
            ))
    });
    let present: HashSet<ObjectKey> = candidates.iter().map(|c| c.key.clone()).collect();
    history.admitted.retain(|key, _| present.contains(key));
    history.rank.retain(|key, _| present.contains(key));

    let mut pools = Pools::new(settings);
    // What admitted Services hold, before any request is looked at.
    for (key, (_, service)) in &history.admitted {
        pools.hold(key, service);
    }
    // One Service at a time, as the API server creates them: an older Service's allocated
    // values are taken before a newer one asks for them explicitly.
    let mut admitted = BTreeMap::new();
    for mut candidate in candidates {
        let previous = history.admitted.get(&candidate.key);
        let spec = candidate
            .service
            .spec
            .get_or_insert_with(ServiceSpec::default);
        apply_defaults(spec);
        let carried = previous.map_or_else(Vec::new, |(_, old)| carry_over(old, spec));
        let outcome = validate(&candidate.service)
            .and_then(|()| pools.reserve_explicit(&candidate, settings, diagnostics));
        let candidate = match outcome {
            Ok(()) => {
                let object = object_name(&candidate.key);
                allocations.extend(carried.into_iter().map(|(field, value)| Allocation {
                    object: object.clone(),
                    field,
                    value,
                }));
                candidate
            }
            Err(reason) => {
                diagnostics.push(diagnostic(
                    object_name(&candidate.key),
                    &candidate.origin,
                    reason,
                ));
                // The API server refuses the update: the stored version stays.
                let Some((origin, service)) = previous else {
                    continue;
                };
                diagnostics.push(diagnostic(
                    object_name(&candidate.key),
                    &candidate.origin,
                    format!("this change is refused; the Service stays as admitted from {origin}"),
                ));
                Candidate {
                    origin: origin.clone(),
                    service: service.clone(),
                    ..candidate
                }
            }
        };
        let mut candidate = candidate;
        match pools.allocate_missing(&candidate.key, &mut candidate.service, allocations) {
            Ok(()) => {
                if !history.rank.contains_key(&candidate.key) {
                    history
                        .rank
                        .insert(candidate.key.clone(), history.next_rank);
                    history.next_rank += 1;
                }
                history.admitted.insert(
                    candidate.key.clone(),
                    (candidate.origin, candidate.service.clone()),
                );
                admitted.insert(candidate.key, candidate.service);
            }
            Err(reason) => diagnostics.push(diagnostic(
                object_name(&candidate.key),
                &candidate.origin,
                reason,
            )),
        }
    }
    admitted
}

/// Gives a Service the values it was allocated before for the fields its new version still
/// leaves out (the API server keeps them across updates). Returns the (field, value) pairs.
fn carry_over(old: &Service, spec: &mut ServiceSpec) -> Vec<(String, String)> {
    let Some(old) = old.spec.as_ref() else {
        return Vec::new();
    };
    let mut carried = Vec::new();
    let service_type = spec.type_.clone().unwrap_or_default();
    if service_type != "ExternalName"
        && explicit_cluster_ips(spec).is_empty()
        && spec
            .ip_families
            .as_ref()
            .is_none_or(|f| Some(f) == old.ip_families.as_ref())
        && spec
            .ip_family_policy
            .as_ref()
            .is_none_or(|p| Some(p) == old.ip_family_policy.as_ref())
    {
        let ips = explicit_cluster_ips(old);
        if !ips.is_empty() && ips[0] != "None" {
            for (index, ip) in ips.iter().enumerate() {
                carried.push((format!("spec.clusterIPs[{index}]"), ip.clone()));
            }
            spec.cluster_ip = ips.first().cloned();
            spec.cluster_ips = Some(ips);
            spec.ip_families.clone_from(&old.ip_families);
            spec.ip_family_policy.clone_from(&old.ip_family_policy);
        }
    }
    if matches!(service_type.as_str(), "NodePort" | "LoadBalancer")
        && spec.allocate_load_balancer_node_ports != Some(false)
    {
        let old_ports = old.ports.as_deref().unwrap_or_default();
        for (index, port) in spec.ports.iter_mut().flatten().enumerate() {
            if port.node_port.is_some_and(|p| p != 0) {
                continue;
            }
            let same = old_ports.iter().find(|o| {
                o.port == port.port && o.protocol == port.protocol && o.name == port.name
            });
            if let Some(value) = same.and_then(|o| o.node_port).filter(|p| *p != 0) {
                port.node_port = Some(value);
                let label = port
                    .name
                    .clone()
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| index.to_string());
                carried.push((format!("spec.ports[{label}].nodePort"), value.to_string()));
            }
        }
    }
    if service_type == "LoadBalancer"
        && spec.external_traffic_policy.as_deref() == Some("Local")
        && spec.health_check_node_port.is_none_or(|p| p == 0)
        && let Some(value) = old.health_check_node_port.filter(|p| *p != 0)
    {
        spec.health_check_node_port = Some(value);
        carried.push(("spec.healthCheckNodePort".to_owned(), value.to_string()));
    }
    carried
}

/// The API server's defaults for the fields kube-proxy reads (pkg/apis/core/v1/defaults.go).
fn apply_defaults(spec: &mut ServiceSpec) {
    let service_type = spec
        .type_
        .get_or_insert_with(|| "ClusterIP".to_owned())
        .clone();
    let affinity = spec
        .session_affinity
        .get_or_insert_with(|| "None".to_owned());
    if affinity == "ClientIP" {
        let config = spec
            .session_affinity_config
            .get_or_insert_with(SessionAffinityConfig::default);
        let client_ip = config.client_ip.get_or_insert_with(ClientIPConfig::default);
        client_ip
            .timeout_seconds
            .get_or_insert(crate::cluster::DEFAULT_AFFINITY_TIMEOUT_SECONDS.cast_signed());
    }
    for port in spec.ports.iter_mut().flatten() {
        port.protocol.get_or_insert_with(|| "TCP".to_owned());
        let unset = match &port.target_port {
            None | Some(IntOrString::Int(0)) => true,
            Some(IntOrString::String(name)) => name.is_empty(),
            Some(IntOrString::Int(_)) => false,
        };
        if unset {
            port.target_port = Some(IntOrString::Int(port.port));
        }
    }
    if service_type != "ExternalName" {
        spec.internal_traffic_policy
            .get_or_insert_with(|| "Cluster".to_owned());
    }
    if service_type == "NodePort" || service_type == "LoadBalancer" {
        spec.external_traffic_policy
            .get_or_insert_with(|| "Cluster".to_owned());
    }
    if service_type == "LoadBalancer" {
        spec.allocate_load_balancer_node_ports.get_or_insert(true);
    }
}

fn check_port(what: &str, value: i32) -> Result<(), String> {
    if (1..=65535).contains(&value) {
        Ok(())
    } else {
        Err(format!("{what} {value} is out of range 1-65535"))
    }
}

fn check_ip(what: &str, value: &str) -> Result<(), String> {
    value
        .parse::<IpAddr>()
        .map(|_| ())
        .map_err(|_| format!("{what} {value:?} is not a valid IP address"))
}

/// A DNS-1123 label (lowercase alphanumerics and '-', alphanumeric at both ends, at most 63).
fn is_dns1123_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A DNS-1035 label: a DNS-1123 label that starts with a letter (Service names).
fn is_dns1035_label(name: &str) -> bool {
    is_dns1123_label(name) && name.as_bytes()[0].is_ascii_lowercase()
}

/// Rejects what the API server's validation would reject: the object's name and namespace, and
/// the spec fields the proxy uses.
fn validate(service: &Service) -> Result<(), String> {
    let name = service.metadata.name.as_deref().unwrap_or_default();
    if !is_dns1035_label(name) {
        return Err(format!(
            "metadata.name {name:?} is not a valid Service name (a DNS-1035 label: at most 63 \
             lowercase letters, digits or '-', starting with a letter, ending alphanumeric)"
        ));
    }
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    if !is_dns1123_label(namespace) {
        return Err(format!(
            "metadata.namespace {namespace:?} is not a valid namespace name (a DNS-1123 label)"
        ));
    }
    validate_spec(service.spec.as_ref().expect("defaulted"))
}

fn validate_spec(spec: &ServiceSpec) -> Result<(), String> {
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !matches!(
        service_type,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        return Err(format!("spec.type {service_type:?} is not a Service type"));
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut names = Vec::new();
    for (index, port) in ports.iter().enumerate() {
        let label = port.name.clone().unwrap_or_else(|| index.to_string());
        check_port(&format!("spec.ports[{label}].port"), port.port)?;
        match &port.target_port {
            Some(IntOrString::Int(target)) => {
                check_port(&format!("spec.ports[{label}].targetPort"), *target)?;
            }
            Some(IntOrString::String(_)) | None => {}
        }
        if let Some(node_port) = port.node_port.filter(|p| *p != 0) {
            if !matches!(service_type, "NodePort" | "LoadBalancer") {
                return Err(format!(
                    "spec.ports[{label}].nodePort may not be used when type is {service_type}"
                ));
            }
            check_port(&format!("spec.ports[{label}].nodePort"), node_port)?;
        }
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
            return Err(format!(
                "spec.ports[{label}].protocol {protocol:?} is not TCP, UDP or SCTP"
            ));
        }
        if ports.len() > 1 && port.name.as_deref().unwrap_or_default().is_empty() {
            return Err(format!(
                "spec.ports[{index}].name is required when a Service has several ports"
            ));
        }
        let name = port.name.clone().unwrap_or_default();
        if !name.is_empty() && !is_dns1123_label(&name) {
            return Err(format!(
                "spec.ports[{index}].name {name:?} is not a DNS-1123 label (lowercase letters, \
                 digits and '-', at most 63)"
            ));
        }
        if names.contains(&name) {
            return Err(format!("spec.ports[{label}].name is used by two ports"));
        }
        names.push(name);
    }
    if let Some(health) = spec.health_check_node_port.filter(|p| *p != 0) {
        if service_type != "LoadBalancer"
            || spec.external_traffic_policy.as_deref() != Some("Local")
        {
            return Err(
                "spec.healthCheckNodePort may only be set when type is LoadBalancer and \
                 externalTrafficPolicy is Local"
                    .to_owned(),
            );
        }
        check_port("spec.healthCheckNodePort", health)?;
    }
    let cluster_ips = explicit_cluster_ips(spec);
    match (service_type, cluster_ips.first().map(String::as_str)) {
        ("ExternalName", Some(_)) => {
            return Err("spec.clusterIP may not be set when type is ExternalName".to_owned());
        }
        ("NodePort" | "LoadBalancer", Some("None")) => {
            return Err(format!(
                "spec.clusterIP may not be None when type is {service_type}"
            ));
        }
        _ => {}
    }
    if cluster_ips.len() > 1 && cluster_ips.iter().any(|ip| ip == "None") {
        return Err("spec.clusterIPs may hold None only as its single entry".to_owned());
    }
    for ip in cluster_ips {
        if ip != "None" {
            check_ip("spec.clusterIPs", &ip)?;
        }
    }
    for ip in spec.external_ips.iter().flatten() {
        check_ip("spec.externalIPs", ip)?;
    }
    if let Some(ip) = spec.load_balancer_ip.as_deref().filter(|ip| !ip.is_empty()) {
        check_ip("spec.loadBalancerIP", ip)?;
    }
    for range in spec.load_balancer_source_ranges.iter().flatten() {
        range
            .trim()
            .parse::<IpNet>()
            .map_err(|_| format!("spec.loadBalancerSourceRanges {range:?} is not a valid CIDR"))?;
    }
    let families = spec.ip_families.as_deref().unwrap_or_default();
    for (index, family) in families.iter().enumerate() {
        IpFamily::parse(family)
            .ok_or_else(|| format!("spec.ipFamilies[{index}] {family:?} is not IPv4 or IPv6"))?;
        if families[..index].contains(family) {
            return Err(format!(
                "spec.ipFamilies[{index}] {family:?} is listed twice"
            ));
        }
    }
    if families.len() > 2 {
        return Err("spec.ipFamilies may hold at most two families".to_owned());
    }
    let cluster_ips = explicit_cluster_ips(spec);
    if cluster_ips.len() > 2 {
        return Err("spec.clusterIPs may hold at most two addresses".to_owned());
    }
    if let [first, second] = cluster_ips.as_slice()
        && let (Ok(a), Ok(b)) = (first.parse::<IpAddr>(), second.parse::<IpAddr>())
        && IpFamily::of(a) == IpFamily::of(b)
    {
        return Err(format!(
            "spec.clusterIPs {a} and {b} are of one family: two must be of different families"
        ));
    }
    for (field, value, allowed) in [
        (
            "spec.ipFamilyPolicy",
            spec.ip_family_policy.as_deref(),
            &["SingleStack", "PreferDualStack", "RequireDualStack"][..],
        ),
        (
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
            &["Cluster", "Local"][..],
        ),
        (
            "spec.internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
            &["Cluster", "Local"][..],
        ),
        (
            "spec.sessionAffinity",
            spec.session_affinity.as_deref(),
            &["None", "ClientIP"][..],
        ),
    ] {
        if let Some(value) = value
            && !allowed.contains(&value)
        {
            return Err(format!(
                "{field} {value:?} is not one of {}",
                allowed.join(", ")
            ));
        }
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    if let Some(timeout) = timeout
        && !(1..=86_400).contains(&timeout)
    {
        return Err(format!(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds {timeout} is out of range 1-86400"
        ));
    }
    Ok(())
}

fn validate_status_ips(service: &Service) -> Result<(), String> {
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for entry in ingress.into_iter().flatten() {
        if let Some(ip) = entry.ip.as_deref() {
            check_ip("status.loadBalancer.ingress[].ip", ip)?;
        }
    }
    Ok(())
}

/// `spec.clusterIPs`, or the legacy single `spec.clusterIP`.
fn explicit_cluster_ips(spec: &ServiceSpec) -> Vec<String> {
    match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.clone(),
        _ => spec
            .cluster_ip
            .iter()
            .filter(|ip| !ip.is_empty())
            .cloned()
            .collect(),
    }
}

/// FNV-1a: stable across Rust versions and runs, unlike `DefaultHasher`.
fn stable_hash(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// kube-apiserver's split of a range into a static (lower) band for explicitly chosen values and
/// a dynamic (upper) band it allocates from first: 1/16 of the range, between 16 and 256.
fn lower_band(size: u128) -> u128 {
    if size < 16 {
        0
    } else {
        (size / 16).clamp(16, 256)
    }
}

/// Picks a free offset in `0..size`: from the hash in the upper band, then in the lower band.
/// At most `used + 1` probes per band are needed to find a free slot if one exists.
fn pick_offset(size: u128, seed: u64, used: usize, is_free: impl Fn(u128) -> bool) -> Option<u128> {
    let lower = lower_band(size);
    let bands = [(lower, size - lower), (0, lower)];
    for (start, len) in bands {
        if len == 0 {
            continue;
        }
        let first = u128::from(seed) % len;
        let probes = len.min(used as u128 + 1);
        for step in 0..probes {
            let offset = start + (first + step) % len;
            if is_free(offset) {
                return Some(offset);
            }
        }
    }
    None
}

fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn u128_to_ip(family: IpFamily, value: u128) -> IpAddr {
    match family {
        IpFamily::IPv4 => IpAddr::V4(std::net::Ipv4Addr::from(value as u32)),
        IpFamily::IPv6 => IpAddr::V6(std::net::Ipv6Addr::from(value)),
    }
}

/// Allocatable addresses of a service CIDR: without the network address (and the broadcast
/// address for IPv4), as kube-apiserver's IP allocator.
struct IpRange {
    family: IpFamily,
    net: IpNet,
    first: u128,
    size: u128,
}

impl IpRange {
    fn new(net: IpNet) -> IpRange {
        let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
        let total = if host_bits >= 128 {
            u128::MAX
        } else {
            1u128 << host_bits
        };
        let family = IpFamily::of(net.network());
        let reserved = match family {
            IpFamily::IPv4 if total > 2 => 2,
            IpFamily::IPv6 if total > 1 => 1,
            _ => 0,
        };
        IpRange {
            family,
            net,
            first: ip_to_u128(net.network()) + u128::from(reserved > 0),
            size: total - reserved,
        }
    }
}

/// An address, port and protocol a Service serves on besides its ClusterIPs and NodePorts
/// (externalIPs, LoadBalancer IPs).
type Frontend = (IpAddr, i32, String);

struct Pools {
    ranges: Vec<IpRange>,
    node_ports: (u16, u16),
    ips: HashMap<IpAddr, ObjectKey>,
    ports: HashMap<u16, ObjectKey>,
    frontends: HashMap<Frontend, ObjectKey>,
}

/// A Service's externalIP and LoadBalancer IP frontends.
fn frontends(service: &Service) -> Vec<(&'static str, Frontend)> {
    let Some(spec) = service.spec.as_ref() else {
        return Vec::new();
    };
    let external = spec
        .external_ips
        .iter()
        .flatten()
        .map(|ip| ("spec.externalIPs", ip.as_str()));
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ip.as_deref())
        .map(|ip| ("status.loadBalancer.ingress[].ip", ip));
    let mut out = Vec::new();
    for (field, text) in external.chain(ingress) {
        let Ok(ip) = text.parse::<IpAddr>() else {
            continue;
        };
        for port in spec.ports.iter().flatten() {
            let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
            out.push((field, (ip, port.port, protocol)));
        }
    }
    out
}

impl Pools {
    fn new(settings: &ManifestSettings) -> Pools {
        Pools {
            ranges: settings
                .service_cidrs
                .iter()
                .copied()
                .map(IpRange::new)
                .collect(),
            node_ports: (
                settings.node_port_range.first,
                settings.node_port_range.last,
            ),
            ips: HashMap::new(),
            ports: HashMap::new(),
            frontends: HashMap::new(),
        }
    }

    /// Records what an admitted Service holds.
    fn hold(&mut self, key: &ObjectKey, service: &Service) {
        let Some(spec) = service.spec.as_ref() else {
            return;
        };
        for ip in explicit_cluster_ips(spec) {
            if let Ok(ip) = ip.parse::<IpAddr>() {
                self.ips.insert(ip, key.clone());
            }
        }
        let node_ports = spec.ports.iter().flatten().filter_map(|p| p.node_port);
        for port in node_ports.chain(spec.health_check_node_port) {
            if let Ok(port) = u16::try_from(port)
                && port != 0
            {
                self.ports.insert(port, key.clone());
            }
        }
        for (_, frontend) in frontends(service) {
            self.frontends.insert(frontend, key.clone());
        }
    }

    fn range(&self, family: IpFamily) -> Option<&IpRange> {
        self.ranges.iter().find(|r| r.family == family)
    }

    /// Reserves the ClusterIPs and NodePorts the manifest sets. A value another Service already
    /// holds rejects this Service, as the API server would; values outside the configured ranges
    /// are honoured with a warning.
    fn reserve_explicit(
        &mut self,
        candidate: &Candidate,
        settings: &ManifestSettings,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Result<(), String> {
        let key = &candidate.key;
        let warn = |diagnostics: &mut Vec<Diagnostic>, reason: String| {
            diagnostics.push(diagnostic(object_name(key), &candidate.origin, reason));
        };
        validate_status_ips(&candidate.service)?;
        let spec = candidate.service.spec.as_ref().expect("defaulted");
        let mut ips = Vec::new();
        for text in explicit_cluster_ips(spec).iter().filter(|ip| *ip != "None") {
            let ip: IpAddr = text.parse().expect("validated");
            if let Some(owner) = self.ips.get(&ip).filter(|owner| *owner != key) {
                return Err(format!(
                    "spec.clusterIPs {ip} is already allocated to Service {}/{}",
                    owner.namespace, owner.name
                ));
            }
            if !self.ranges.iter().any(|r| r.net.contains(&ip)) {
                warn(
                    diagnostics,
                    format!(
                        "warning: spec.clusterIPs {ip} is outside --service-cluster-ip-range {} (used as given)",
                        join(&settings.service_cidrs)
                    ),
                );
            }
            ips.push(ip);
        }
        let mut ports: Vec<(u16, &str)> = Vec::new();
        let port_values = spec.ports.iter().flatten().filter_map(|p| {
            p.node_port
                .filter(|n| *n != 0)
                .map(|n| (n, p.protocol.as_deref().unwrap_or("TCP")))
        });
        let health = spec
            .health_check_node_port
            .filter(|n| *n != 0)
            .map(|n| (n, "healthCheckNodePort"));
        for (value, protocol) in port_values.chain(health) {
            let port = u16::try_from(value).expect("validated");
            if let Some(owner) = self.ports.get(&port).filter(|owner| *owner != key) {
                return Err(format!(
                    "NodePort {port} is already allocated to Service {}/{}",
                    owner.namespace, owner.name
                ));
            }
            // One Service may use the same NodePort for different protocols.
            if ports.contains(&(port, protocol)) {
                return Err(format!("NodePort {port}/{protocol} is used twice"));
            }
            if port < self.node_ports.0 || port > self.node_ports.1 {
                warn(
                    diagnostics,
                    format!(
                        "warning: NodePort {port} is outside --service-node-port-range {}-{} (used as given)",
                        self.node_ports.0, self.node_ports.1
                    ),
                );
            }
            ports.push((port, protocol));
        }
        let claimed = frontends(&candidate.service);
        for (field, frontend) in &claimed {
            if let Some(owner) = self.frontends.get(frontend).filter(|owner| *owner != key) {
                let (ip, port, protocol) = frontend;
                return Err(format!(
                    "{field} {ip} port {port}/{protocol} is already served by Service {}/{}",
                    owner.namespace, owner.name
                ));
            }
        }
        for ip in ips {
            self.ips.insert(ip, key.clone());
        }
        for (port, _) in ports {
            self.ports.insert(port, key.clone());
        }
        for (_, frontend) in claimed {
            self.frontends.insert(frontend, key.clone());
        }
        Ok(())
    }

    fn allocate_ip(&mut self, key: &ObjectKey, family: IpFamily) -> Result<IpAddr, String> {
        let used = self.ips.len();
        let range = self.range(family).ok_or_else(|| {
            format!(
                "{} is not configured in --service-cluster-ip-range",
                family.name()
            )
        })?;
        let seed = stable_hash(&format!("{}/{}", key.namespace, key.name));
        let first = range.first;
        let ips = &self.ips;
        let offset = pick_offset(range.size, seed, used, |offset| {
            !ips.contains_key(&u128_to_ip(family, first + offset))
        })
        .ok_or_else(|| format!("--service-cluster-ip-range {} is full", range.net))?;
        let ip = u128_to_ip(family, first + offset);
        self.ips.insert(ip, key.clone());
        Ok(ip)
    }

    fn allocate_port(&mut self, key: &ObjectKey, seed_text: &str) -> Result<u16, String> {
        let (low, high) = self.node_ports;
        let size = u128::from(high - low) + 1;
        let ports = &self.ports;
        let offset = pick_offset(size, stable_hash(seed_text), ports.len(), |offset| {
            !ports.contains_key(&(low + offset as u16))
        })
        .ok_or_else(|| format!("--service-node-port-range {low}-{high} is full"))?;
        let port = low + offset as u16;
        self.ports.insert(port, key.clone());
        Ok(port)
    }

    /// Fills in what the Service leaves out: ClusterIPs per family, NodePorts,
    /// healthCheckNodePort.
    fn allocate_missing(
        &mut self,
        key: &ObjectKey,
        service: &mut Service,
        allocations: &mut Vec<Allocation>,
    ) -> Result<(), String> {
        let object = object_name(key);
        let spec = service.spec.as_mut().expect("defaulted");
        let service_type = spec.type_.clone().unwrap_or_default();
        let mut record = |field: String, value: String| {
            allocations.push(Allocation {
                object: object.clone(),
                field,
                value,
            });
        };
        if service_type != "ExternalName" {
            self.assign_cluster_ips(key, spec, &mut record)?;
        }
        let wants_node_ports = service_type == "NodePort"
            || (service_type == "LoadBalancer"
                && spec.allocate_load_balancer_node_ports != Some(false));
        if wants_node_ports {
            // One port number gets one NodePort whatever the protocols (the API server's
            // `initNodePorts`): TCP and UDP on port 53 share theirs.
            let mut by_port: HashMap<i32, i32> = spec
                .ports
                .iter()
                .flatten()
                .filter_map(|p| p.node_port.filter(|n| *n != 0).map(|n| (p.port, n)))
                .collect();
            for (index, port) in spec.ports.iter_mut().flatten().enumerate() {
                if port.node_port.is_some_and(|p| p != 0) {
                    continue;
                }
                if let Some(shared) = by_port.get(&port.port) {
                    port.node_port = Some(*shared);
                    let label = port
                        .name
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| index.to_string());
                    record(format!("spec.ports[{label}].nodePort"), shared.to_string());
                    continue;
                }
                let label = port
                    .name
                    .clone()
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| index.to_string());
                let protocol = port.protocol.clone().unwrap_or_default();
                let value = self.allocate_port(
                    key,
                    &format!("{}/{}/{label}/{protocol}", key.namespace, key.name),
                )?;
                port.node_port = Some(i32::from(value));
                by_port.insert(port.port, i32::from(value));
                record(format!("spec.ports[{label}].nodePort"), value.to_string());
            }
        }
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        if service_type == "LoadBalancer"
            && local
            && spec.health_check_node_port.is_none_or(|p| p == 0)
        {
            let value = self.allocate_port(
                key,
                &format!("{}/{}/healthCheckNodePort", key.namespace, key.name),
            )?;
            spec.health_check_node_port = Some(i32::from(value));
            record("spec.healthCheckNodePort".to_owned(), value.to_string());
        }
        Ok(())
    }

    /// The registry's ipFamilies / ipFamilyPolicy / clusterIPs logic, for the configured ranges.
    fn assign_cluster_ips(
        &mut self,
        key: &ObjectKey,
        spec: &mut ServiceSpec,
        record: &mut impl FnMut(String, String),
    ) -> Result<(), String> {
        let explicit = explicit_cluster_ips(spec);
        let headless = explicit.first().is_some_and(|ip| ip == "None");
        let configured: Vec<IpFamily> = self.ranges.iter().map(|r| r.family).collect();
        let policy = spec
            .ip_family_policy
            .clone()
            .unwrap_or_else(|| "SingleStack".to_owned());
        let mut families: Vec<IpFamily> = match &spec.ip_families {
            Some(families) if !families.is_empty() => {
                families.iter().filter_map(|f| IpFamily::parse(f)).collect()
            }
            _ if !headless && !explicit.is_empty() => explicit
                .iter()
                .map(|ip| IpFamily::of(ip.parse().expect("validated")))
                .collect(),
            _ => configured.iter().take(1).copied().collect(),
        };
        if families.len() > 1 && policy == "SingleStack" {
            return Err(
                "two IP families need spec.ipFamilyPolicy PreferDualStack or RequireDualStack"
                    .to_owned(),
            );
        }
        if policy == "RequireDualStack" && configured.len() < 2 {
            return Err(
                "spec.ipFamilyPolicy RequireDualStack needs two --service-cluster-ip-range families".to_owned(),
            );
        }
        if policy != "SingleStack"
            && families.len() == 1
            && let Some(other) = configured.iter().find(|f| !families.contains(f))
        {
            families.push(*other);
        }
        spec.ip_families = Some(families.iter().map(|f| f.name().to_owned()).collect());
        spec.ip_family_policy = Some(policy);
        if headless {
            spec.cluster_ip = Some("None".to_owned());
            spec.cluster_ips = Some(vec!["None".to_owned()]);
            return Ok(());
        }
        let mut ips = Vec::new();
        for (index, family) in families.iter().enumerate() {
            if let Some(text) = explicit.get(index) {
                let ip: IpAddr = text.parse().expect("validated");
                if IpFamily::of(ip) != *family {
                    return Err(format!(
                        "spec.clusterIPs[{index}] {ip} is not of spec.ipFamilies[{index}] {}",
                        family.name()
                    ));
                }
                ips.push(ip.to_string());
            } else {
                let ip = self.allocate_ip(key, *family)?;
                record(format!("spec.clusterIPs[{index}]"), ip.to_string());
                ips.push(ip.to_string());
            }
        }
        spec.cluster_ip = ips.first().cloned();
        spec.cluster_ips = Some(ips);
        Ok(())
    }
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::port_range::PortRange;

    fn settings(cidrs: &[&str]) -> ManifestSettings {
        ManifestSettings {
            service_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            node_port_range: PortRange {
                first: 30000,
                last: 32767,
            },
            hostname: "node-a".to_owned(),
        }
    }

    fn candidate(name: &str, spec: &serde_json::Value) -> Candidate {
        let service: Service = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }))
        .unwrap();
        Candidate {
            key: ObjectKey {
                namespace: "default".to_owned(),
                name: name.to_owned(),
            },
            origin: Origin {
                file: PathBuf::from(format!("{name}.yaml")),
                document: 1,
            },
            created: SystemTime::UNIX_EPOCH,
            service,
        }
    }

    fn run(
        candidates: Vec<Candidate>,
        settings: &ManifestSettings,
    ) -> (
        BTreeMap<ObjectKey, Service>,
        Vec<Diagnostic>,
        Vec<Allocation>,
    ) {
        let mut diagnostics = Vec::new();
        let mut allocations = Vec::new();
        let admitted = admit(
            candidates,
            settings,
            &mut History::default(),
            &mut diagnostics,
            &mut allocations,
        );
        (admitted, diagnostics, allocations)
    }

    fn spec_of<'a>(admitted: &'a BTreeMap<ObjectKey, Service>, name: &str) -> &'a ServiceSpec {
        admitted
            .iter()
            .find(|(k, _)| k.name == name)
            .and_then(|(_, s)| s.spec.as_ref())
            .unwrap_or_else(|| panic!("{name} not admitted"))
    }

    #[test]
    fn allocation_is_deterministic_and_stable_across_unrelated_edits() {
        let settings = settings(&["10.96.0.0/12"]);
        let web = || {
            candidate(
                "web",
                &serde_json::json!({"type": "NodePort", "ports": [{"port": 80}]}),
            )
        };
        let (first, diagnostics, allocations) = run(vec![web()], &settings);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        assert_eq!(allocations.len(), 2, "{allocations:?}");
        let (second, _, _) = run(
            vec![
                web(),
                candidate(
                    "other",
                    &serde_json::json!({"type": "NodePort", "ports": [{"port": 81}]}),
                ),
            ],
            &settings,
        );
        let a = spec_of(&first, "web");
        let b = spec_of(&second, "web");
        assert_eq!(a.cluster_ip, b.cluster_ip);
        assert_eq!(
            a.ports.as_ref().unwrap()[0].node_port,
            b.ports.as_ref().unwrap()[0].node_port
        );
        let ip: IpAddr = a.cluster_ip.as_deref().unwrap().parse().unwrap();
        let net: IpNet = "10.96.0.0/12".parse().unwrap();
        assert!(net.contains(&ip), "{ip}");
        // Dynamic band: above the 256 addresses kept for explicit choices.
        assert!(ip_to_u128(ip) > ip_to_u128(net.network()) + 256, "{ip}");
        let node_port = a.ports.as_ref().unwrap()[0].node_port.unwrap();
        assert!((30000..=32767).contains(&node_port), "{node_port}");
        assert_eq!(a.ip_families, Some(vec!["IPv4".to_owned()]));
        assert_eq!(a.ip_family_policy.as_deref(), Some("SingleStack"));
        assert_eq!(a.external_traffic_policy.as_deref(), Some("Cluster"));
        assert_eq!(
            a.ports.as_ref().unwrap()[0].target_port,
            Some(IntOrString::Int(80))
        );
        assert_eq!(
            a.ports.as_ref().unwrap()[0].protocol.as_deref(),
            Some("TCP")
        );
    }

    #[test]
    fn explicit_values_duplicates_and_ranges() {
        struct Case {
            name: &'static str,
            services: Vec<Candidate>,
            admitted: &'static [&'static str],
            diagnostics: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "explicit ClusterIP and NodePort are honoured",
                services: vec![candidate(
                    "a",
                    &serde_json::json!({"type": "NodePort", "clusterIP": "10.96.0.10",
                        "ports": [{"port": 80, "nodePort": 30080}]}),
                )],
                admitted: &["a"],
                diagnostics: &[],
            },
            Case {
                name: "NodePort outside the range is a warning naming the Service",
                services: vec![candidate(
                    "low",
                    &serde_json::json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 8080}]}),
                )],
                admitted: &["low"],
                diagnostics: &["Service default/low|low.yaml: warning: NodePort 8080 is outside"],
            },
            Case {
                name: "duplicate NodePort rejects the second Service",
                services: vec![
                    candidate(
                        "a",
                        &serde_json::json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}),
                    ),
                    candidate(
                        "b",
                        &serde_json::json!({"type": "NodePort", "ports": [{"port": 81, "nodePort": 30080}]}),
                    ),
                ],
                admitted: &["a"],
                diagnostics: &[
                    "Service default/b|b.yaml: NodePort 30080 is already allocated to Service default/a",
                ],
            },
            Case {
                name: "same NodePort for TCP and UDP of one Service is allowed",
                services: vec![candidate(
                    "dns",
                    &serde_json::json!({"type": "NodePort", "ports": [
                        {"name": "tcp", "port": 53, "nodePort": 30053, "protocol": "TCP"},
                        {"name": "udp", "port": 53, "nodePort": 30053, "protocol": "UDP"}]}),
                )],
                admitted: &["dns"],
                diagnostics: &[],
            },
            Case {
                name: "duplicate ClusterIP rejects the second Service",
                services: vec![
                    candidate(
                        "a",
                        &serde_json::json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
                    ),
                    candidate(
                        "b",
                        &serde_json::json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
                    ),
                ],
                admitted: &["a"],
                diagnostics: &[
                    "Service default/b|b.yaml: spec.clusterIPs 10.96.0.10 is already allocated",
                ],
            },
            Case {
                name: "invalid ClusterIP",
                services: vec![candidate(
                    "a",
                    &serde_json::json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}),
                )],
                admitted: &[],
                diagnostics: &[
                    "Service default/a|a.yaml: spec.clusterIPs \"10.96.0.300\" is not a valid IP address",
                ],
            },
            Case {
                name: "port out of range",
                services: vec![candidate(
                    "a",
                    &serde_json::json!({"ports": [{"port": 70000}]}),
                )],
                admitted: &[],
                diagnostics: &[
                    "Service default/a|a.yaml: spec.ports[0].port 70000 is out of range 1-65535",
                ],
            },
            Case {
                name: "invalid externalIP",
                services: vec![candidate(
                    "a",
                    &serde_json::json!({"externalIPs": ["192.0.2.x"], "ports": [{"port": 80}]}),
                )],
                admitted: &[],
                diagnostics: &[
                    "Service default/a|a.yaml: spec.externalIPs \"192.0.2.x\" is not a valid IP address",
                ],
            },
            Case {
                name: "ClusterIP outside the range is honoured with a warning",
                services: vec![candidate(
                    "a",
                    &serde_json::json!({"clusterIP": "172.16.0.1", "ports": [{"port": 80}]}),
                )],
                admitted: &["a"],
                diagnostics: &[
                    "Service default/a|a.yaml: warning: spec.clusterIPs 172.16.0.1 is outside",
                ],
            },
            Case {
                name: "nodePort on a ClusterIP Service is rejected",
                services: vec![candidate(
                    "a",
                    &serde_json::json!({"ports": [{"port": 80, "nodePort": 30080}]}),
                )],
                admitted: &[],
                diagnostics: &[
                    "Service default/a|a.yaml: spec.ports[0].nodePort may not be used when type is ClusterIP",
                ],
            },
            Case {
                name: "healthCheckNodePort without Local policy is rejected",
                services: vec![candidate(
                    "a",
                    &serde_json::json!({"type": "LoadBalancer", "healthCheckNodePort": 30999, "ports": [{"port": 80}]}),
                )],
                admitted: &[],
                diagnostics: &[
                    "Service default/a|a.yaml: spec.healthCheckNodePort may only be set when",
                ],
            },
            Case {
                name: "None among several clusterIPs is rejected",
                services: vec![candidate(
                    "a",
                    &serde_json::json!({"clusterIPs": ["10.96.0.1", "None"], "ports": [{"port": 80}]}),
                )],
                admitted: &[],
                diagnostics: &["Service default/a|a.yaml: spec.clusterIPs may hold None only"],
            },
            Case {
                name: "headless NodePort is rejected",
                services: vec![candidate(
                    "a",
                    &serde_json::json!({"type": "NodePort", "clusterIP": "None", "ports": [{"port": 80}]}),
                )],
                admitted: &[],
                diagnostics: &[
                    "Service default/a|a.yaml: spec.clusterIP may not be None when type is NodePort",
                ],
            },
            Case {
                name: "RequireDualStack with one range is rejected",
                services: vec![candidate(
                    "a",
                    &serde_json::json!({"ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 80}]}),
                )],
                admitted: &[],
                diagnostics: &[
                    "Service default/a|a.yaml: spec.ipFamilyPolicy RequireDualStack needs two",
                ],
            },
        ];
        let settings = settings(&["10.96.0.0/12"]);
        for case in cases {
            let (admitted, diagnostics, _) = run(case.services, &settings);
            let names: Vec<&str> = admitted.keys().map(|k| k.name.as_str()).collect();
            assert_eq!(names, case.admitted, "{}: {diagnostics:?}", case.name);
            assert_eq!(
                diagnostics.len(),
                case.diagnostics.len(),
                "{}: {diagnostics:?}",
                case.name
            );
            for (diagnostic, expected) in diagnostics.iter().zip(case.diagnostics) {
                let (object, message) = expected.split_once('|').unwrap();
                assert_eq!(diagnostic.object, object, "{}", case.name);
                assert!(
                    diagnostic.message.starts_with(message),
                    "{}: {:?}",
                    case.name,
                    diagnostic.message
                );
            }
        }
    }

    #[test]
    fn creation_order_decides_between_an_allocation_and_an_explicit_claim() {
        let settings = settings(&["10.96.0.0/12"]);
        let (alone, _, _) = run(
            vec![candidate(
                "a",
                &serde_json::json!({"ports": [{"port": 80}]}),
            )],
            &settings,
        );
        let taken = spec_of(&alone, "a").cluster_ip.clone().unwrap();
        let claim = || {
            candidate(
                "b",
                &serde_json::json!({"clusterIP": taken, "ports": [{"port": 80}]}),
            )
        };
        let dynamic = || candidate("a", &serde_json::json!({"ports": [{"port": 80}]}));
        // b created first: its explicit claim is honoured and a gets another address.
        let (both, diagnostics, allocations) = run(
            vec![created_at(dynamic(), 200), created_at(claim(), 100)],
            &settings,
        );
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        assert_eq!(
            spec_of(&both, "b").cluster_ip.as_deref(),
            Some(taken.as_str())
        );
        assert_ne!(
            spec_of(&both, "a").cluster_ip.as_deref(),
            Some(taken.as_str())
        );
        assert_eq!(allocations.len(), 1);
        assert_eq!(allocations[0].object, "Service default/a");
        assert_eq!(allocations[0].field, "spec.clusterIPs[0]");
        // a created first: it keeps what it was allocated and b is refused, as the API server
        // refuses a Service asking for an allocated address.
        let (both, diagnostics, _) = run(
            vec![created_at(dynamic(), 100), created_at(claim(), 200)],
            &settings,
        );
        assert_eq!(
            spec_of(&both, "a").cluster_ip.as_deref(),
            Some(taken.as_str())
        );
        assert!(!both.keys().any(|k| k.name == "b"));
        assert_eq!(
            diagnostics[0].message,
            format!("b.yaml: spec.clusterIPs {taken} is already allocated to Service default/a")
        );
    }

    #[test]
    fn dual_stack_and_load_balancer_health_check() {
        let settings = settings(&["10.96.0.0/12", "fd00:10:96::/112"]);
        let (admitted, diagnostics, allocations) = run(
            vec![
                candidate(
                    "dual",
                    &serde_json::json!({"ipFamilyPolicy": "PreferDualStack", "ports": [{"port": 80}]}),
                ),
                candidate(
                    "lb",
                    &serde_json::json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                        "ports": [{"port": 80}]}),
                ),
                candidate(
                    "v6",
                    &serde_json::json!({"ipFamilies": ["IPv6"], "ports": [{"port": 80}]}),
                ),
                candidate(
                    "headless",
                    &serde_json::json!({"clusterIP": "None", "ports": [{"port": 80}]}),
                ),
                candidate(
                    "ext",
                    &serde_json::json!({"type": "ExternalName", "externalName": "example.org"}),
                ),
            ],
            &settings,
        );
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        let dual = spec_of(&admitted, "dual");
        assert_eq!(
            dual.ip_families,
            Some(vec!["IPv4".to_owned(), "IPv6".to_owned()])
        );
        let ips = dual.cluster_ips.as_ref().unwrap();
        assert!(
            ips[0].parse::<IpAddr>().unwrap().is_ipv4()
                && ips[1].parse::<IpAddr>().unwrap().is_ipv6()
        );
        let lb = spec_of(&admitted, "lb");
        assert!(
            lb.health_check_node_port
                .is_some_and(|p| (30000..=32767).contains(&p))
        );
        assert_ne!(
            lb.health_check_node_port,
            lb.ports.as_ref().unwrap()[0].node_port
        );
        let v6 = spec_of(&admitted, "v6");
        assert!(
            v6.cluster_ip
                .as_deref()
                .unwrap()
                .parse::<IpAddr>()
                .unwrap()
                .is_ipv6()
        );
        assert_eq!(
            spec_of(&admitted, "headless").cluster_ips,
            Some(vec!["None".to_owned()])
        );
        assert_eq!(spec_of(&admitted, "ext").cluster_ip, None);
        let fields: Vec<(&str, &str)> = allocations
            .iter()
            .map(|a| (a.object.as_str(), a.field.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("Service default/dual", "spec.clusterIPs[0]"),
                ("Service default/dual", "spec.clusterIPs[1]"),
                ("Service default/lb", "spec.clusterIPs[0]"),
                ("Service default/lb", "spec.ports[0].nodePort"),
                ("Service default/lb", "spec.healthCheckNodePort"),
                ("Service default/v6", "spec.clusterIPs[0]"),
            ]
        );
    }

    /// Admits `candidates` after `history`, returning the admitted Services and diagnostics.
    fn read(
        history: &mut History,
        candidates: Vec<Candidate>,
    ) -> (BTreeMap<ObjectKey, Service>, Vec<String>) {
        let mut diagnostics = Vec::new();
        let admitted = admit(
            candidates,
            &settings(&["10.96.0.0/12"]),
            history,
            &mut diagnostics,
            &mut Vec::new(),
        );
        let messages = diagnostics
            .iter()
            .map(|d| format!("{}: {}", d.object, d.message))
            .collect();
        (admitted, messages)
    }

    fn created_at(mut candidate: Candidate, seconds: u64) -> Candidate {
        candidate.created = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
        candidate
    }

    fn with_status_ip(mut candidate: Candidate, ip: &str) -> Candidate {
        candidate.service.status = serde_json::from_value(serde_json::json!(
            {"loadBalancer": {"ingress": [{"ip": ip}]}}
        ))
        .unwrap();
        candidate
    }

    #[test]
    fn what_an_admitted_service_holds_no_later_object_takes() {
        let web = || {
            with_status_ip(
                candidate(
                    "web",
                    &serde_json::json!({"type": "LoadBalancer", "externalIPs": ["198.51.100.5"],
                        "ports": [{"port": 80}]}),
                ),
                "198.51.100.6",
            )
        };
        let mut history = History::default();
        let (first, messages) = read(&mut history, vec![web()]);
        assert!(messages.is_empty(), "{messages:?}");
        let held = spec_of(&first, "web").clone();
        let cluster_ip = held.cluster_ip.clone().unwrap();
        let node_port = held.ports.as_ref().unwrap()[0].node_port.unwrap();
        // Impostors whose names sort first, each claiming one thing web holds, in files older
        // than web's: none takes it.
        let impostors = vec![
            candidate(
                "aa-ip",
                &serde_json::json!({"clusterIP": cluster_ip, "ports": [{"port": 80}]}),
            ),
            candidate(
                "ab-np",
                &serde_json::json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": node_port}]}),
            ),
            candidate(
                "ac-ext",
                &serde_json::json!({"externalIPs": ["198.51.100.5"], "ports": [{"port": 80}]}),
            ),
            with_status_ip(
                candidate(
                    "ad-lb",
                    &serde_json::json!({"type": "LoadBalancer", "ports": [{"port": 80}]}),
                ),
                "198.51.100.6",
            ),
        ];
        let mut candidates: Vec<Candidate> =
            impostors.into_iter().map(|c| created_at(c, 0)).collect();
        candidates.push(created_at(web(), 100));
        let (second, messages) = read(&mut history, candidates);
        assert_eq!(
            spec_of(&second, "web"),
            &held,
            "web keeps everything it holds"
        );
        assert_eq!(second.len(), 1, "every impostor is refused: {messages:?}");
        for (name, field) in [
            ("aa-ip", format!("spec.clusterIPs {cluster_ip} is already allocated to Service default/web")),
            ("ab-np", format!("NodePort {node_port} is already allocated to Service default/web")),
            ("ac-ext", "spec.externalIPs 198.51.100.5 port 80/TCP is already served by Service default/web".to_owned()),
            ("ad-lb", "status.loadBalancer.ingress[].ip 198.51.100.6 port 80/TCP is already served by Service default/web".to_owned()),
        ] {
            let want = format!("Service default/{name}: {name}.yaml: {field}");
            assert!(messages.contains(&want), "{want:?} in {messages:?}");
        }
        // A broken edit of web is refused and web stays as admitted.
        let broken = candidate(
            "web",
            &serde_json::json!({"type": "LoadBalancer", "ports": [{"port": 0}]}),
        );
        let (third, messages) = read(&mut history, vec![broken]);
        assert_eq!(spec_of(&third, "web"), &held);
        assert!(
            messages.iter().any(|m| m
                .contains("this change is refused; the Service stays as admitted from web.yaml")),
            "{messages:?}"
        );
        // Deleted, web releases what it held.
        let (_, _) = read(&mut history, Vec::new());
        let (fourth, messages) = read(
            &mut history,
            vec![candidate(
                "aa-ip",
                &serde_json::json!({"clusterIP": cluster_ip, "ports": [{"port": 80}]}),
            )],
        );
        assert!(messages.is_empty(), "{messages:?}");
        assert_eq!(
            spec_of(&fourth, "aa-ip").cluster_ip.as_deref(),
            Some(cluster_ip.as_str())
        );
    }

    #[test]
    fn a_folder_read_from_scratch_admits_the_oldest_file_first() {
        let claim = |name: &str| {
            candidate(
                name,
                &serde_json::json!({"clusterIP": "10.96.0.40", "ports": [{"port": 80}]}),
            )
        };
        let (admitted, messages) = read(
            &mut History::default(),
            vec![
                created_at(claim("a-new"), 200),
                created_at(claim("z-old"), 100),
            ],
        );
        assert!(admitted.keys().all(|k| k.name == "z-old"), "{admitted:?}");
        assert_eq!(
            messages,
            [
                "Service default/a-new: a-new.yaml: spec.clusterIPs 10.96.0.40 is already allocated to Service default/z-old"
            ]
        );
    }

    #[test]
    fn tcp_and_udp_on_one_port_share_a_node_port() {
        let (admitted, messages) = read(
            &mut History::default(),
            vec![candidate(
                "dns",
                &serde_json::json!({"type": "NodePort", "ports": [
                    {"name": "dns-udp", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                    {"name": "other", "port": 54, "protocol": "TCP"}]}),
            )],
        );
        assert!(messages.is_empty(), "{messages:?}");
        let ports = spec_of(&admitted, "dns").ports.clone().unwrap();
        assert_eq!(ports[0].node_port, ports[1].node_port);
        assert_ne!(ports[0].node_port, ports[2].node_port);
    }

    #[test]
    fn names_are_validated_like_the_api_server() {
        let port = serde_json::json!({"ports": [{"port": 80}]});
        let (admitted, messages) = read(
            &mut History::default(),
            vec![
                candidate("UPPER", &port),
                candidate("bad_name", &port),
                candidate("1starts-with-digit", &port),
                candidate(
                    "bad-port-name",
                    &serde_json::json!({"ports": [{"name": "Http", "port": 80}]}),
                ),
                candidate(
                    "policy",
                    &serde_json::json!({"ports": [{"port": 80}], "externalTrafficPolicy": "Nearest"}),
                ),
                candidate(
                    "families",
                    &serde_json::json!({"ports": [{"port": 80}], "ipFamilies": ["IPv4", "IPv4"]}),
                ),
                candidate("fine-name-1", &port),
            ],
        );
        assert_eq!(
            admitted.keys().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            ["fine-name-1"]
        );
        for (name, needle) in [
            (
                "UPPER",
                "metadata.name \"UPPER\" is not a valid Service name",
            ),
            (
                "bad_name",
                "metadata.name \"bad_name\" is not a valid Service name",
            ),
            ("1starts-with-digit", "is not a valid Service name"),
            (
                "bad-port-name",
                "spec.ports[0].name \"Http\" is not a DNS-1123 label",
            ),
            (
                "policy",
                "spec.externalTrafficPolicy \"Nearest\" is not one of Cluster, Local",
            ),
            ("families", "spec.ipFamilies[1] \"IPv4\" is listed twice"),
        ] {
            assert!(
                messages.iter().any(|m| m
                    .starts_with(&format!("Service default/{name}: {name}.yaml: "))
                    && m.contains(needle)),
                "{name}: {needle:?} in {messages:?}"
            );
        }
    }
}
