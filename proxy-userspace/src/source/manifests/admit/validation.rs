//! The API server's validation of the Service fields the proxy relies on.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::cluster::IpFamily;

pub(super) fn check_port(what: &str, value: i32) -> Result<(), String> {
    if (1..=65535).contains(&value) {
        Ok(())
    } else {
        Err(format!("{what} {value} is out of range 1-65535"))
    }
}

pub(super) fn check_ip(what: &str, value: &str) -> Result<(), String> {
    value
        .parse::<IpAddr>()
        .map(|_| ())
        .map_err(|_| format!("{what} {value:?} is not a valid IP address"))
}

/// A DNS-1123 label (lowercase alphanumerics and '-', alphanumeric at both ends, at most 63).
pub(super) fn is_dns1123_label(name: &str) -> bool {
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
pub(super) fn is_dns1035_label(name: &str) -> bool {
    is_dns1123_label(name) && name.as_bytes()[0].is_ascii_lowercase()
}

/// Rejects what the API server's validation would reject: the object's name and namespace, and
/// the spec fields the proxy uses.
pub(super) fn validate(service: &Service) -> Result<(), String> {
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

pub(super) fn validate_spec(spec: &ServiceSpec) -> Result<(), String> {
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

pub(super) fn validate_status_ips(service: &Service) -> Result<(), String> {
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
pub(super) fn explicit_cluster_ips(spec: &ServiceSpec) -> Vec<String> {
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
