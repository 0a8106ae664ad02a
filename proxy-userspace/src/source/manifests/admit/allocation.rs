//! ClusterIP, NodePort and externalIP / LoadBalancer frontend pools, like the API server's
//! registry allocators: explicit values reserved first, the rest allocated deterministically.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::super::ManifestSettings;
use super::super::parse::diagnostic;
use super::validation::{explicit_cluster_ips, validate_status_ips};
use super::{Candidate, object_name};
use crate::cluster::Diagnostic;
use crate::cluster::{Allocation, IpFamily, ObjectKey};

/// FNV-1a (the fnv crate, fed the bytes alone): stable across Rust versions and runs, unlike
/// `DefaultHasher`, so allocations stay where they were.
pub(super) fn stable_hash(text: &str) -> u64 {
    use std::hash::Hasher as _;
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(text.as_bytes());
    hasher.finish()
}

/// kube-apiserver's split of a range into a static (lower) band for explicitly chosen values and
/// a dynamic (upper) band it allocates from first: 1/16 of the range, between 16 and 256.
pub(super) fn lower_band(size: u128) -> u128 {
    if size < 16 {
        0
    } else {
        (size / 16).clamp(16, 256)
    }
}

/// Picks a free offset in `0..size`: from the hash in the upper band, then in the lower band.
/// At most `used + 1` probes per band are needed to find a free slot if one exists.
pub(super) fn pick_offset(
    size: u128,
    seed: u64,
    used: usize,
    is_free: impl Fn(u128) -> bool,
) -> Option<u128> {
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

pub(super) fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub(super) fn u128_to_ip(family: IpFamily, value: u128) -> IpAddr {
    match family {
        IpFamily::IPv4 => IpAddr::V4(std::net::Ipv4Addr::from(value as u32)),
        IpFamily::IPv6 => IpAddr::V6(std::net::Ipv6Addr::from(value)),
    }
}

/// Allocatable addresses of a service CIDR: without the network address (and the broadcast
/// address for IPv4), as kube-apiserver's IP allocator.
pub(super) struct IpRange {
    family: IpFamily,
    net: IpNet,
    first: u128,
    size: u128,
}

impl IpRange {
    pub(super) fn new(net: IpNet) -> IpRange {
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
pub(super) type Frontend = (IpAddr, i32, String);

pub(super) struct Pools {
    ranges: Vec<IpRange>,
    node_ports: (u16, u16),
    ips: HashMap<IpAddr, ObjectKey>,
    ports: HashMap<u16, ObjectKey>,
    frontends: HashMap<Frontend, ObjectKey>,
}

/// A Service's externalIP and LoadBalancer IP frontends.
pub(super) fn frontends(service: &Service) -> Vec<(&'static str, Frontend)> {
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
    pub(super) fn new(settings: &ManifestSettings) -> Pools {
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
    pub(super) fn hold(&mut self, key: &ObjectKey, service: &Service) {
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

    pub(super) fn range(&self, family: IpFamily) -> Option<&IpRange> {
        self.ranges.iter().find(|r| r.family == family)
    }

    /// Reserves the ClusterIPs and NodePorts the manifest sets. A value another Service already
    /// holds rejects this Service, as the API server would; values outside the configured ranges
    /// are honoured with a warning.
    pub(super) fn reserve_explicit(
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

    pub(super) fn allocate_ip(
        &mut self,
        key: &ObjectKey,
        family: IpFamily,
    ) -> Result<IpAddr, String> {
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

    pub(super) fn allocate_port(
        &mut self,
        key: &ObjectKey,
        seed_text: &str,
    ) -> Result<u16, String> {
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
    pub(super) fn allocate_missing(
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
    pub(super) fn assign_cluster_ips(
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

pub(super) fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    /// The published FNV-1a 64-bit values: the allocations made before depend on them.
    #[test]
    fn stable_hash_is_fnv_1a() {
        assert_eq!(super::stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::stable_hash("foobar"), 0x8594_4171_f739_67e8);
    }
}
