//! Topology hints, as the EndpointSlice controller writes them (k8s.io/endpointslice
//! `trafficdist` and `topologycache`): with the `service.kubernetes.io/topology-mode: Auto`
//! annotation (or the deprecated `topology-aware-hints`), endpoints are spread over zones in
//! proportion to the zones' allocatable CPU; otherwise `spec.trafficDistribution`
//! PreferClose / PreferSameZone gives every ready endpoint a hint for its own zone, and
//! PreferSameNode also one for its own node. The controller iterates Go maps where this module
//! takes zones in name order.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "the controller's float64 arithmetic over endpoint counts and millicores, far below 2^52"
)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointHints, ForNode, ForZone};

const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
const ANNOTATION_TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// The most an endpoint may be overloaded by the proportional spread (20 %).
const OVERLOAD_THRESHOLD: f64 = 0.2;

/// The controller's `hintsEnabled`: the annotation (or, when absent, the deprecated one) is
/// `Auto` or `auto`.
fn topology_mode_auto(service: &Service) -> bool {
    let annotations = service.metadata.annotations.as_ref();
    let value = annotations.and_then(|a| {
        a.get(ANNOTATION_TOPOLOGY_MODE)
            .or_else(|| a.get(ANNOTATION_TOPOLOGY_AWARE_HINTS))
    });
    value.is_some_and(|v| v == "Auto" || v == "auto")
}

fn ready(endpoint: &Endpoint) -> bool {
    endpoint
        .conditions
        .as_ref()
        .and_then(|c| c.ready)
        .unwrap_or(false)
}

/// Sets the hints of one address family's endpoints of `service` (in slice order).
pub fn add_hints(
    service: &Service,
    nodes: &BTreeMap<String, Node>,
    endpoints: &mut [&mut Endpoint],
) {
    if topology_mode_auto(service) {
        if !proportional_hints(nodes, endpoints) {
            for endpoint in endpoints.iter_mut() {
                endpoint.hints = None;
            }
        }
        return;
    }
    let distribution = service
        .spec
        .as_ref()
        .and_then(|s| s.traffic_distribution.as_deref());
    let same_node = distribution == Some("PreferSameNode");
    if !matches!(
        distribution,
        Some("PreferClose" | "PreferSameZone" | "PreferSameNode")
    ) {
        return;
    }
    for endpoint in endpoints.iter_mut().filter(|e| ready(e)) {
        let for_zones = endpoint.zone.clone().map(|name| vec![ForZone { name }]);
        let for_nodes = endpoint
            .node_name
            .clone()
            .filter(|_| same_node)
            .map(|name| vec![ForNode { name }]);
        endpoint.hints = (for_zones.is_some() || for_nodes.is_some()).then_some(EndpointHints {
            for_zones,
            for_nodes,
        });
    }
}

/// Millicores of a CPU quantity ("4", "3500m", "2.5"); `None` when unreadable.
fn cpu_millis(quantity: &str) -> Option<u64> {
    if let Some(millis) = quantity.strip_suffix('m') {
        return millis.parse().ok();
    }
    let cores: f64 = quantity.parse().ok()?;
    (cores.is_finite() && cores >= 0.0).then(|| (cores * 1000.0).round() as u64)
}

/// The share of allocatable CPU per zone of the ready, non-control-plane nodes; `None` when a
/// node lacks a zone or CPU, or fewer than two zones remain (`TopologyCache.SetNodes`).
fn cpu_ratios(nodes: &BTreeMap<String, Node>) -> Option<BTreeMap<String, f64>> {
    let mut by_zone: BTreeMap<String, u64> = BTreeMap::new();
    for node in nodes.values() {
        let labels = node.metadata.labels.clone().unwrap_or_default();
        if labels.contains_key("node-role.kubernetes.io/control-plane")
            || labels.contains_key("node-role.kubernetes.io/master")
        {
            continue;
        }
        let status = node.status.as_ref();
        let is_ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        if !is_ready {
            continue;
        }
        let cpu = status
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get("cpu"))
            .and_then(|q| cpu_millis(&q.0))
            .unwrap_or(0);
        let zone = labels.get(LABEL_ZONE).filter(|z| !z.is_empty())?;
        if cpu == 0 {
            return None;
        }
        *by_zone.entry(zone.clone()).or_default() += cpu;
    }
    let total: u64 = by_zone.values().sum();
    if total == 0 || by_zone.len() < 2 {
        return None;
    }
    Some(
        by_zone
            .into_iter()
            .map(|(zone, cpu)| (zone, cpu as f64 / total as f64))
            .collect(),
    )
}

struct Allocation {
    desired: f64,
}

/// `TopologyCache.AddHints` for slices written from scratch. Returns false when hints must be
/// removed (insufficient node information, too few endpoints, an endpoint without a zone).
fn proportional_hints(nodes: &BTreeMap<String, Node>, endpoints: &mut [&mut Endpoint]) -> bool {
    let Some(ratios) = cpu_ratios(nodes) else {
        return false;
    };
    let total = endpoints.iter().filter(|e| ready(e)).count();
    if ratios.len() > total {
        return false;
    }
    let mut allocations = BTreeMap::new();
    let mut remaining = total as i64;
    for (zone, ratio) in &ratios {
        let desired = ratio * total as f64;
        let minimum = (desired * (1.0 / (1.0 + OVERLOAD_THRESHOLD))).ceil();
        remaining -= minimum as i64;
        if remaining < 0 {
            return false;
        }
        allocations.insert(
            zone.clone(),
            Allocation {
                desired: desired.max(minimum),
            },
        );
    }
    // Step 1: every ready endpoint for its own zone.
    let mut hinted: BTreeMap<String, i64> = BTreeMap::new();
    for endpoint in endpoints.iter_mut() {
        if !ready(endpoint) {
            endpoint.hints = None;
            continue;
        }
        let Some(zone) = endpoint.zone.clone().filter(|z| !z.is_empty()) else {
            return false;
        };
        *hinted.entry(zone.clone()).or_default() += 1;
        endpoint.hints = Some(EndpointHints {
            for_zones: Some(vec![ForZone { name: zone }]),
            for_nodes: None,
        });
    }
    // Step 2: which zones give endpoints and which receive them.
    let mut giving_desired = BTreeMap::new();
    let mut receiving_desired = BTreeMap::new();
    for (zone, allocation) in &allocations {
        let has = *hinted.get(zone).unwrap_or(&0) as f64;
        if has > allocation.desired {
            giving_desired.insert(zone.clone(), has - allocation.desired);
        } else if has < allocation.desired {
            receiving_desired.insert(zone.clone(), allocation.desired - has);
        }
    }
    let most = |zones: &BTreeMap<String, f64>| -> (Option<String>, f64) {
        let mut best = (None, 0.0);
        for (zone, n) in zones {
            if *n > best.1 {
                best = (Some(zone.clone()), *n);
            }
        }
        best
    };
    let mut giving: BTreeMap<String, u32> = BTreeMap::new();
    let mut receiving: BTreeMap<String, u32> = BTreeMap::new();
    while let ((Some(give), to_give), (Some(receive), to_receive)) =
        (most(&giving_desired), most(&receiving_desired))
    {
        if (to_give < 1.0 && to_receive < 1.0) || to_give < 0.5 || to_receive < 0.5 {
            break;
        }
        *giving.entry(give.clone()).or_default() += 1;
        *giving_desired.get_mut(&give).expect("present") -= 1.0;
        *receiving.entry(receive.clone()).or_default() += 1;
        *receiving_desired.get_mut(&receive).expect("present") -= 1.0;
    }
    // Step 3: redistribute, endpoint by endpoint.
    for endpoint in endpoints.iter_mut().filter(|e| ready(e)) {
        if giving.is_empty() || receiving.is_empty() {
            break;
        }
        let zone = endpoint.zone.clone().unwrap_or_default();
        if giving.get(&zone).is_none_or(|n| *n == 0) {
            continue;
        }
        let Some(target) = receiving
            .iter()
            .find(|(_, n)| **n > 0)
            .map(|(z, _)| z.clone())
        else {
            continue;
        };
        endpoint.hints = Some(EndpointHints {
            for_zones: Some(vec![ForZone {
                name: target.clone(),
            }]),
            for_nodes: None,
        });
        for (map, key) in [(&mut giving, zone), (&mut receiving, target)] {
            let n = map.get_mut(&key).expect("present");
            *n -= 1;
            if *n == 0 {
                map.remove(&key);
            }
        }
    }
    !hinted.is_empty()
}
