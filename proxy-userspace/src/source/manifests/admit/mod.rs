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
//!
//! This module admits (defaulting, carrying over what an edit leaves out, the order of
//! admission); `validation` checks a Service's fields as the API server's validation does;
//! `allocation` holds the ClusterIP, NodePort and frontend pools, like the API server's
//! registry allocators.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{ClientIPConfig, Service, ServiceSpec, SessionAffinityConfig};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ManifestSettings;
use super::parse::{Origin, diagnostic};
use super::parsed::ParsedFiles;
use crate::cluster::Diagnostic;
use crate::cluster::{Allocation, ObjectKey};

mod allocation;
mod validation;

use allocation::Pools;
use validation::{explicit_cluster_ips, validate};

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
    candidates: Vec<Candidate>,
    settings: &ManifestSettings,
    history: &mut History,
    diagnostics: &mut Vec<Diagnostic>,
    allocations: &mut Vec<Allocation>,
) -> BTreeMap<ObjectKey, Service> {
    // Each rank looked up once, not once per comparison (10,000 Services: a fifth of a read).
    let mut ranked: Vec<(u64, Candidate)> = candidates
        .into_iter()
        .map(|c| (history.rank.get(&c.key).copied().unwrap_or(u64::MAX), c))
        .collect();
    ranked.sort_by(|(rank_a, a), (rank_b, b)| {
        (rank_a, a.created, &a.origin.file, a.origin.document, &a.key).cmp(&(
            rank_b,
            b.created,
            &b.origin.file,
            b.origin.document,
            &b.key,
        ))
    });
    let candidates: Vec<Candidate> = ranked.into_iter().map(|(_, c)| c).collect();
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

#[cfg(test)]
mod tests;
