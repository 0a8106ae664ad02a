//! EndpointSlices the cluster's controllers would write: the EndpointSlice controller's for
//! Services with a selector (from the Pods it selects) and the mirroring controller's for
//! selector-less Services with an Endpoints object.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Container, Endpoints, Node, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::cluster::IpFamily;

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
const LABEL_SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
pub const CONTROLLER: &str = "endpointslice-controller.k8s.io";
pub const MIRRORING_CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";
/// The controllers' default `--max-endpoints-per-slice`.
const MAX_ENDPOINTS_PER_SLICE: usize = 100;
/// The mirroring controller's `--mirroring-max-endpoints-per-subset`: at most this many
/// addresses of one Endpoints subset are mirrored, all into one slice per (family, ports).
const MAX_MIRRORED_ENDPOINTS_PER_SUBSET: usize = 1000;

/// The API server's defaults for an EndpointSlice's ports (discovery/v1
/// `SetDefaults_EndpointPort`): a missing `name` is "" and a missing `protocol` TCP, so an
/// unnamed slice port serves a Service's unnamed port as it does from the API server.
pub fn apply_defaults(slice: &mut EndpointSlice) {
    for port in slice.ports.iter_mut().flatten() {
        port.name.get_or_insert_with(String::new);
        port.protocol.get_or_insert_with(|| "TCP".to_owned());
    }
}

/// The Service's selector, when the EndpointSlice controller manages its slices. An empty
/// selector is the same as none: the API server drops empty maps.
pub fn selector(service: &Service) -> Option<&BTreeMap<String, String>> {
    service
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .filter(|s| !s.is_empty())
}

fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.and_then(|l| l.get(key)) == Some(value))
}

/// Where a Pod's containers are declared: its own spec, or — for the minimal Pod objects a lab
/// writes (no containers) — the pod template of the Deployment/ReplicaSet that selects it.
pub struct PodTemplates {
    /// (namespace, selector, containers) of each Deployment/ReplicaSet.
    pub templates: Vec<(String, BTreeMap<String, String>, Vec<Container>)>,
}

impl PodTemplates {
    fn containers_for<'a>(&'a self, pod: &'a Pod) -> &'a [Container] {
        if let Some(spec) = pod.spec.as_ref().filter(|s| !s.containers.is_empty()) {
            return &spec.containers;
        }
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        self.templates
            .iter()
            .find(|(template_namespace, selector, _)| {
                template_namespace == namespace
                    && !selector.is_empty()
                    && labels_match(selector, pod.metadata.labels.as_ref())
            })
            .map_or(&[], |(_, _, containers)| containers.as_slice())
    }
}

fn is_pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// The controller's `ShouldPodBeInEndpoints` with terminating Pods included: not terminal and
/// with an IP.
fn should_pod_be_in_endpoints(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return false;
    }
    !pod_ips(pod).is_empty()
}

/// `status.podIPs`, or `status.podIP` alone when a hand-written Pod leaves podIPs out (the API
/// server fills podIPs[0] from podIP).
pub fn pod_ips(pod: &Pod) -> Vec<String> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    match &status.pod_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(|ip| ip.ip.clone()).collect(),
        _ => status
            .pod_ip
            .iter()
            .filter(|ip| !ip.is_empty())
            .cloned()
            .collect(),
    }
}

/// `FindPort`: a numeric targetPort as is; a named one from the Pod's (or its template's)
/// container ports with the same protocol, sidecar init containers included.
fn find_port(pod: &Pod, templates: &PodTemplates, service_port: &ServicePort) -> Option<i32> {
    let protocol = service_port.protocol.as_deref().unwrap_or("TCP");
    match service_port.target_port.as_ref() {
        Some(IntOrString::Int(port)) => Some(*port),
        None => Some(service_port.port),
        Some(IntOrString::String(name)) => {
            let sidecars = pod
                .spec
                .iter()
                .flat_map(|s| s.init_containers.iter().flatten())
                .filter(|c| c.restart_policy.as_deref() == Some("Always"));
            templates
                .containers_for(pod)
                .iter()
                .chain(sidecars)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .map(|p| p.container_port)
        }
    }
}

fn address_type(family: IpFamily) -> String {
    family.name().to_owned()
}

fn service_families(service: &Service) -> Vec<IpFamily> {
    let spec = service.spec.as_ref();
    let families: Vec<IpFamily> = spec
        .and_then(|s| s.ip_families.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|f| IpFamily::parse(f))
        .collect();
    if families.is_empty() {
        vec![IpFamily::IPv4, IpFamily::IPv6]
    } else {
        families
    }
}

fn slice_labels(service: &Service, controller: &str) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = service
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| {
            ![LABEL_SERVICE_NAME, LABEL_MANAGED_BY, LABEL_HEADLESS].contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let cluster_ip = service
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .unwrap_or("");
    if cluster_ip.is_empty() || cluster_ip == "None" {
        labels.insert(LABEL_HEADLESS.to_owned(), String::new());
    }
    labels.insert(
        LABEL_SERVICE_NAME.to_owned(),
        service.metadata.name.clone().unwrap_or_default(),
    );
    labels.insert(LABEL_MANAGED_BY.to_owned(), controller.to_owned());
    labels
}

type PortKey = Vec<(String, i32, String)>;

fn port_key(ports: &[EndpointPort]) -> PortKey {
    ports
        .iter()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port.unwrap_or_default(),
                p.protocol.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// The controller reference a controller puts on the slices it writes for `owner`.
fn controller_reference(kind: &str, owner: &ObjectMeta) -> OwnerReference {
    OwnerReference {
        api_version: "v1".to_owned(),
        kind: kind.to_owned(),
        name: owner.name.clone().unwrap_or_default(),
        uid: owner.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Builds the slices of one Service from endpoints grouped by (family, ports): at most
/// `max_per_slice` endpoints per slice, deterministic names `<service>-<family>-<n>` (the
/// controllers use generated names; ours must be stable across re-reads).
fn build_slices(
    service: &Service,
    owner: &OwnerReference,
    max_per_slice: usize,
    groups: BTreeMap<(String, PortKey), (Vec<EndpointPort>, Vec<Endpoint>)>,
    labels: &BTreeMap<String, String>,
) -> Vec<EndpointSlice> {
    let name = service.metadata.name.clone().unwrap_or_default();
    let namespace = service.metadata.namespace.clone();
    let mut slices = Vec::new();
    let mut counters: BTreeMap<String, usize> = BTreeMap::new();
    for ((family, _), (ports, endpoints)) in groups {
        let chunks: Vec<Vec<Endpoint>> = if endpoints.is_empty() {
            vec![Vec::new()]
        } else {
            endpoints
                .chunks(max_per_slice)
                .map(<[Endpoint]>::to_vec)
                .collect()
        };
        for chunk in chunks {
            let counter = counters.entry(family.clone()).or_default();
            let slice_name = format!("{name}-{}-{counter}", family.to_lowercase());
            *counter += 1;
            slices.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(slice_name),
                    namespace: namespace.clone(),
                    labels: Some(labels.clone()),
                    owner_references: Some(vec![owner.clone()]),
                    ..ObjectMeta::default()
                },
                address_type: family.clone(),
                endpoints: chunk,
                ports: Some(ports.clone()),
            });
        }
    }
    slices
}

/// The EndpointSlice controller's slices for a Service with a selector. Pods are matched by
/// namespace and labels; `nodes` gives each endpoint its zone.
pub fn synthesize(
    service: &Service,
    pods: &[&Pod],
    nodes: &BTreeMap<String, Node>,
    templates: &PodTemplates,
) -> Vec<EndpointSlice> {
    let Some(selector) = selector(service) else {
        return Vec::new();
    };
    let spec = service
        .spec
        .as_ref()
        .expect("admitted Services have a spec");
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    let headless_without_ports =
        spec.cluster_ip.as_deref() == Some("None") && spec.ports.as_ref().is_none_or(Vec::is_empty);
    let families = service_families(service);
    let mut groups: BTreeMap<(String, PortKey), (Vec<EndpointPort>, Vec<Endpoint>)> =
        BTreeMap::new();

    let mut selected: Vec<&Pod> = pods
        .iter()
        .copied()
        .filter(|pod| pod.metadata.namespace.as_deref().unwrap_or("default") == namespace)
        .filter(|pod| labels_match(selector, pod.metadata.labels.as_ref()))
        .filter(|pod| should_pod_be_in_endpoints(pod))
        .collect();
    selected.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    for pod in selected {
        let ports: Vec<EndpointPort> = if headless_without_ports {
            Vec::new()
        } else {
            spec.ports
                .iter()
                .flatten()
                .filter_map(|service_port| {
                    find_port(pod, templates, service_port).map(|port| EndpointPort {
                        name: Some(service_port.name.clone().unwrap_or_default()),
                        port: Some(port),
                        protocol: service_port.protocol.clone(),
                        app_protocol: service_port.app_protocol.clone(),
                    })
                })
                .collect()
        };
        let serving = is_pod_ready(pod);
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let ready = publish_not_ready || (serving && !terminating);
        let pod_spec = pod.spec.as_ref();
        let node_name = pod_spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty());
        let zone = node_name
            .as_ref()
            .and_then(|n| nodes.get(n))
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get(LABEL_ZONE))
            .filter(|z| !z.is_empty())
            .cloned();
        let hostname = pod_spec.and_then(|s| s.hostname.clone()).filter(|h| {
            !h.is_empty()
                && pod_spec.and_then(|s| s.subdomain.as_ref()) == service.metadata.name.as_ref()
        });
        for family in &families {
            let addresses: Vec<String> = pod_ips(pod)
                .iter()
                .filter_map(|ip| ip.parse::<IpAddr>().ok())
                .filter(|ip| IpFamily::of(*ip) == *family)
                .map(|ip| ip.to_string())
                .collect();
            if addresses.is_empty() {
                continue;
            }
            let endpoint = Endpoint {
                addresses,
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(serving),
                    terminating: Some(terminating),
                }),
                target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                    kind: Some("Pod".to_owned()),
                    namespace: pod
                        .metadata
                        .namespace
                        .clone()
                        .or_else(|| Some("default".to_owned())),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                    ..Default::default()
                }),
                node_name: node_name.clone(),
                zone: zone.clone(),
                hostname: hostname.clone(),
                ..Endpoint::default()
            };
            groups
                .entry((address_type(*family), port_key(&ports)))
                .or_insert_with(|| (ports.clone(), Vec::new()))
                .1
                .push(endpoint);
        }
    }
    for family in &families {
        // The controller reconciles each family separately and keeps an empty placeholder
        // slice for a family without endpoints.
        let family = address_type(*family);
        if !groups
            .keys()
            .any(|(group_family, _)| *group_family == family)
        {
            groups.insert((family, Vec::new()), (Vec::new(), Vec::new()));
        }
    }
    for family in &families {
        let family = address_type(*family);
        let mut endpoints: Vec<&mut Endpoint> = groups
            .iter_mut()
            .filter(|((group_family, _), _)| *group_family == family)
            .flat_map(|(_, (_, endpoints))| endpoints.iter_mut())
            .collect();
        super::hints::add_hints(service, nodes, &mut endpoints);
    }
    let labels = slice_labels(service, CONTROLLER);
    let owner = controller_reference("Service", &service.metadata);
    build_slices(service, &owner, MAX_ENDPOINTS_PER_SLICE, groups, &labels)
}

/// The mirroring controller's slices for a selector-less Service's Endpoints. Invalid addresses
/// are skipped (and returned so the caller can report them).
pub fn mirror(service: &Service, endpoints: &Endpoints) -> (Vec<EndpointSlice>, Vec<String>) {
    let mut invalid = Vec::new();
    if selector(service).is_some()
        || endpoints
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SKIP_MIRROR))
            .is_some_and(|v| v == "true")
    {
        return (Vec::new(), invalid);
    }
    let mut groups: BTreeMap<(String, PortKey), (Vec<EndpointPort>, Vec<Endpoint>)> =
        BTreeMap::new();
    for subset in endpoints.subsets.iter().flatten() {
        let mut mirrored = 0;
        let ports: Vec<EndpointPort> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| EndpointPort {
                name: Some(p.name.clone().unwrap_or_default()),
                port: Some(p.port),
                protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".to_owned())),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        let addresses = subset.addresses.iter().flatten().map(|a| (a, true)).chain(
            subset
                .not_ready_addresses
                .iter()
                .flatten()
                .map(|a| (a, false)),
        );
        for (address, ready) in addresses {
            let Ok(ip) = address.ip.parse::<IpAddr>() else {
                invalid.push(address.ip.clone());
                continue;
            };
            if mirrored == MAX_MIRRORED_ENDPOINTS_PER_SUBSET {
                break;
            }
            mirrored += 1;
            let endpoint = Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    ..EndpointConditions::default()
                }),
                hostname: address.hostname.clone().filter(|h| !h.is_empty()),
                node_name: address.node_name.clone(),
                target_ref: address.target_ref.clone(),
                ..Endpoint::default()
            };
            let group = &mut groups
                .entry((address_type(IpFamily::of(ip)), port_key(&ports)))
                .or_insert_with(|| (ports.clone(), Vec::new()))
                .1;
            // Subsets with the same ports share one slice, which holds a set of endpoints.
            if !group.contains(&endpoint) {
                group.push(endpoint);
            }
        }
    }
    // The mirroring controller copies the Endpoints' labels, not the Service's.
    let mut labels: BTreeMap<String, String> = endpoints
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| ![LABEL_SERVICE_NAME, LABEL_MANAGED_BY].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(
        LABEL_SERVICE_NAME.to_owned(),
        service.metadata.name.clone().unwrap_or_default(),
    );
    labels.insert(LABEL_MANAGED_BY.to_owned(), MIRRORING_CONTROLLER.to_owned());
    for (_, endpoints) in groups.values_mut() {
        endpoints.truncate(MAX_MIRRORED_ENDPOINTS_PER_SUBSET);
    }
    let owner = controller_reference("Endpoints", &endpoints.metadata);
    let slices = build_slices(
        service,
        &owner,
        MAX_MIRRORED_ENDPOINTS_PER_SUBSET,
        groups,
        &labels,
    );
    (slices, invalid)
}
