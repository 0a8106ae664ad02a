//! `kube-ebpf-proxy plan`'s human-readable form of a [`DesiredState`] (the JSON form is its
//! serde serialization).

use std::fmt::Write as _;

use super::types::{
    Action, DesiredState, Endpoint, EndpointSet, Frontend, LocalTrafficDetector, ServicePortState,
};

/// One block per service port and family, then the address rules, then the diagnostics.
pub fn render_text(state: &DesiredState) -> String {
    let mut out = String::new();
    if state.service_ports.is_empty() {
        out.push_str("no service ports\n");
    }
    for port in &state.service_ports {
        render_service_port(&mut out, port);
    }
    let rules = &state.address_rules;
    out.push_str("address rules:\n");
    let _ = writeln!(
        out,
        "  service CIDRs (unallocated addresses dropped): {}",
        join(rules.service_cidrs.iter())
    );
    let _ = writeln!(
        out,
        "  ClusterIPs (unknown ports rejected): {}",
        join(rules.cluster_ips.iter())
    );
    let _ = writeln!(
        out,
        "  pod traffic detected by: {}",
        detector(&state.local_traffic_detector)
    );
    if !state.diagnostics.is_empty() {
        out.push_str("diagnostics:\n");
        for diagnostic in &state.diagnostics {
            let _ = writeln!(out, "  {}: {}", diagnostic.object, diagnostic.message);
        }
    }
    out
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    let joined: Vec<String> = items.map(|item| item.to_string()).collect();
    if joined.is_empty() {
        "(none)".to_owned()
    } else {
        joined.join(", ")
    }
}

fn detector(detector: &LocalTrafficDetector) -> String {
    match detector {
        LocalTrafficDetector::None => "nothing (no local traffic detector)".to_owned(),
        LocalTrafficDetector::SourceCidrs { cidrs } => format!("source in {}", join(cidrs.iter())),
        LocalTrafficDetector::InterfaceNamePrefix { prefix } => {
            format!("input interface name starting with {prefix:?}")
        }
        LocalTrafficDetector::BridgeInterface { name } => format!("input interface {name:?}"),
    }
}

fn policy(local: bool) -> &'static str {
    if local { "Local" } else { "Cluster" }
}

fn render_service_port(out: &mut String, port: &ServicePortState) {
    let name = &port.name;
    let port_name = if name.port.is_empty() {
        String::new()
    } else {
        format!(":{}", name.port)
    };
    let family = port.family.name();
    let _ = writeln!(
        out,
        "{}/{}{port_name} {} {family}",
        name.namespace, name.name, name.protocol
    );
    let mut traits = vec![
        format!(
            "internalTrafficPolicy {}",
            policy(port.internal_policy_local)
        ),
        format!(
            "externalTrafficPolicy {}",
            policy(port.external_policy_local)
        ),
    ];
    if let Some(seconds) = port.affinity_timeout_seconds {
        traits.push(format!("sessionAffinity ClientIP {seconds}s"));
    }
    if let Some(health) = port.health_check_node_port {
        traits.push(format!("healthCheckNodePort {health}"));
    }
    let _ = writeln!(out, "  {}", traits.join(", "));
    out.push_str("  frontends:\n");
    for frontend in &port.frontends {
        render_frontend(out, frontend);
    }
    if port.internal_endpoints == port.external_endpoints
        && port.external_endpoints == port.cluster_endpoints
    {
        render_endpoints(
            out,
            "internal, external and cluster",
            &port.cluster_endpoints,
        );
    } else {
        render_endpoints(
            out,
            &format!("internal ({})", policy(port.internal_policy_local)),
            &port.internal_endpoints,
        );
        render_endpoints(
            out,
            &format!("external ({})", policy(port.external_policy_local)),
            &port.external_endpoints,
        );
        render_endpoints(out, "cluster", &port.cluster_endpoints);
    }
    if !port.draining_endpoints.is_empty() {
        render_endpoints(
            out,
            "established connections only (draining)",
            &port.draining_endpoints,
        );
    }
}

fn render_frontend(out: &mut String, frontend: &Frontend) {
    let kind = frontend.kind;
    let addr = std::net::SocketAddr::new(frontend.addr, frontend.port);
    let _ = writeln!(out, "    {kind} {addr}");
    let actions = &frontend.actions;
    let external = frontend.kind.is_external();
    if actions.pod == actions.node && actions.node == actions.other {
        let _ = writeln!(
            out,
            "      from anywhere: {}",
            action(actions.other, external)
        );
    } else {
        let _ = writeln!(
            out,
            "      from pods: {}; from the node: {}; from elsewhere: {}",
            action(actions.pod, external),
            action(actions.node, external),
            action(actions.other, external)
        );
    }
    if !frontend.source_ranges.is_empty() {
        let _ = writeln!(
            out,
            "      only from: {}",
            join(frontend.source_ranges.iter())
        );
    }
}

/// `external`: the frontend's policy set is the external one (else the internal one).
fn action(action: Action, external: bool) -> String {
    match action {
        Action::Forward { set, masquerade } => {
            let set = match set {
                EndpointSet::Policy if external => "external endpoints",
                EndpointSet::Policy => "internal endpoints",
                EndpointSet::Cluster => "cluster endpoints",
            };
            let masquerade = if masquerade { ", masquerade" } else { "" };
            format!("forward to {set}{masquerade}")
        }
        Action::Reject => "REJECT".to_owned(),
        Action::Drop => "DROP".to_owned(),
    }
}

fn render_endpoints(out: &mut String, label: &str, endpoints: &[Endpoint]) {
    if endpoints.is_empty() {
        let _ = writeln!(out, "  {label} endpoints: (none)");
        return;
    }
    let _ = writeln!(out, "  {label} endpoints:");
    for endpoint in endpoints {
        let addr = std::net::SocketAddr::new(endpoint.addr, endpoint.port);
        let mut traits = Vec::new();
        traits.push(if endpoint.ready { "ready" } else { "not ready" });
        if endpoint.serving && !endpoint.ready {
            traits.push("serving");
        }
        if endpoint.terminating {
            traits.push("terminating");
        }
        if endpoint.local {
            traits.push("local");
        }
        let mut where_ = Vec::new();
        if let Some(node) = &endpoint.node_name {
            where_.push(format!("node {node}"));
        }
        if let Some(zone) = &endpoint.zone {
            where_.push(format!("zone {zone}"));
        }
        let where_ = if where_.is_empty() {
            String::new()
        } else {
            format!(" on {}", where_.join(", "))
        };
        let _ = writeln!(out, "    {addr} ({}){where_}", traits.join(", "));
    }
}
