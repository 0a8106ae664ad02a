//! Source B: a folder of ordinary Kubernetes manifests instead of an API server
//! (`--manifests DIR`).
//!
//! The folder is read the way a cluster would see it after `kubectl apply -f DIR`: the API
//! server's defaulting, validation and ClusterIP/NodePort allocation (`admit`), then the
//! EndpointSlice controller (Pods selected by a Service's selector) and the EndpointSlice
//! mirroring controller (selector-less Services with an Endpoints object) (`slices`).
//! Allocated values are written into the Services and listed in
//! [`ClusterSnapshot::allocations`]. Every problem is a [`Diagnostic`] naming the file and the
//! object; the rest of the folder is still used.
//!
//! ServiceCIDR objects (networking.k8s.io/v1) are validated as the API server does and published:
//! the dataplane drops unallocated addresses in them. When the folder has any, missing
//! ClusterIPs are allocated from them (first of each family, the flag's primary family first),
//! as an API server with ServiceCIDRs does (its `--service-cluster-ip-range` is then only its
//! default ServiceCIDR); otherwise from `--service-cluster-ip-range`.
//!
//! Deployments and ReplicaSets create no Pods here (Pods come from files, e.g. written by the
//! lab); their pod templates give the container ports for named targetPorts of Pods whose own
//! spec lists no containers.

mod admit;
mod hints;
mod parse;
mod parsed;
mod slices;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use notify::event::ModifyKind;
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch as tokio_watch};
use tokio::task::JoinHandle;

use self::admit::Candidate;
pub use self::admit::History;
use self::parse::{Object, Origin, diagnostic};
pub use self::parsed::ChangedFiles;
use self::slices::PodTemplates;
use crate::cluster::Diagnostic;
use crate::cluster::{ClusterSnapshot, IpFamily, ObjectKey};
use crate::port_range::PortRange;

/// kube-apiserver's default `--service-cluster-ip-range`.
pub const DEFAULT_SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/12";
/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_SERVICE_NODE_PORT_RANGE: PortRange = PortRange {
    first: 30000,
    last: 32767,
};

/// Labels that make kube-proxy ignore a Service and its EndpointSlices (its informers' label
/// selector `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`).
pub const SKIP_LABELS: [&str; 2] = [
    "service.kubernetes.io/service-proxy-name",
    "service.kubernetes.io/headless",
];

#[derive(Debug, thiserror::Error)]
pub enum ServiceCidrError {
    #[error("--service-cluster-ip-range {0:?}: {1:?} is not a CIDR")]
    Syntax(String, String),
    #[error("--service-cluster-ip-range {0:?}: one CIDR, or two of different IP families")]
    Families(String),
}

/// Parses kube-apiserver's `--service-cluster-ip-range`: one CIDR, or two comma-separated
/// CIDRs of different families (dual-stack; the first is the primary family).
pub fn parse_service_cluster_ip_range(text: &str) -> Result<Vec<IpNet>, ServiceCidrError> {
    let cidrs = text
        .split(',')
        .map(|part| {
            part.trim()
                .parse::<IpNet>()
                .map_err(|_| ServiceCidrError::Syntax(text.to_owned(), part.trim().to_owned()))
        })
        .collect::<Result<Vec<IpNet>, ServiceCidrError>>()?;
    match cidrs.as_slice() {
        [_] => Ok(cidrs),
        [first, second] if first.network().is_ipv4() != second.network().is_ipv4() => Ok(cidrs),
        _ => Err(ServiceCidrError::Families(text.to_owned())),
    }
}

/// What the API server and node would know that the manifests do not say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestSettings {
    /// `--service-cluster-ip-range`: one CIDR, or two (one per family) for dual-stack; the first
    /// is the primary family.
    pub service_cidrs: Vec<IpNet>,
    /// `--service-node-port-range`.
    pub node_port_range: PortRange,
    /// This node's name: selects its Node object.
    pub hostname: String,
}

impl ManifestSettings {
    /// The API server's defaults for the given node.
    pub fn new(hostname: impl Into<String>) -> ManifestSettings {
        ManifestSettings {
            service_cidrs: vec![
                DEFAULT_SERVICE_CLUSTER_IP_RANGE
                    .parse()
                    .expect("valid default"),
            ],
            node_port_range: DEFAULT_SERVICE_NODE_PORT_RANGE,
            hostname: hostname.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot watch manifests folder {dir}: {source}")]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Files the folder holds, recursively, with their modification times, oldest first (paths
/// break ties): the order objects new to the proxy are admitted in. Hidden entries (editor swap
/// files, `..data` symlinks of mounted ConfigMaps' tooling) are skipped.
fn manifest_files(dir: &Path, diagnostics: &mut Vec<Diagnostic>) -> Vec<(SystemTime, PathBuf)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        let entries = match std::fs::read_dir(&current) {
            Ok(entries) => entries,
            Err(error) => {
                diagnostics.push(Diagnostic {
                    object: format!("folder {}", current.display()),
                    message: format!("cannot read folder: {error}"),
                });
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
            {
                // A file whose time cannot be read counts as the newest.
                let modified = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .unwrap_or_else(|_| SystemTime::now());
                files.push((modified, path));
            }
        }
    }
    files.sort();
    files
}

fn key_of(metadata: &mut ObjectMeta, namespaced: bool) -> Option<ObjectKey> {
    let name = metadata.name.clone().filter(|n| !n.is_empty())?;
    let namespace = if namespaced {
        metadata
            .namespace
            .get_or_insert_with(|| "default".to_owned())
            .clone()
    } else {
        String::new()
    };
    Some(ObjectKey { namespace, name })
}

/// Objects of one kind by key; a second definition of the same object is reported and ignored.
struct Registry<T> {
    kind: &'static str,
    objects: BTreeMap<ObjectKey, (Origin, T)>,
}

impl<T> Registry<T> {
    fn new(kind: &'static str) -> Registry<T> {
        Registry {
            kind,
            objects: BTreeMap::new(),
        }
    }

    fn insert(
        &mut self,
        key: ObjectKey,
        origin: Origin,
        object: T,
        diagnostics: &mut Vec<Diagnostic>,
    ) {
        self.insert_preferring(key, origin, object, None, diagnostics);
    }

    /// [`Registry::insert`], except that a definition from `holder` (the file the admitted
    /// version came from) replaces one read before it.
    fn insert_preferring(
        &mut self,
        key: ObjectKey,
        origin: Origin,
        object: T,
        holder: Option<&Path>,
        diagnostics: &mut Vec<Diagnostic>,
    ) {
        let name = object_name(self.kind, &key);
        if holder == Some(origin.file.as_path())
            && let Some((first, _)) = self.objects.get(&key)
            && first.file != origin.file
        {
            diagnostics.push(diagnostic(
                name,
                first,
                format!("also defined in {origin}, which holds it; this copy is ignored"),
            ));
            self.objects.insert(key, (origin, object));
        } else if let Some((first, _)) = self.objects.get(&key) {
            diagnostics.push(diagnostic(
                name,
                &origin,
                format!("also defined in {first}; this copy is ignored"),
            ));
        } else {
            self.objects.insert(key, (origin, object));
        }
    }
}

fn object_name(kind: &str, key: &ObjectKey) -> String {
    if key.namespace.is_empty() {
        format!("{kind} {}", key.name)
    } else {
        format!("{kind} {}/{}", key.namespace, key.name)
    }
}

fn check_pod(pod: &Pod) -> Result<(), String> {
    for ip in slices::pod_ips(pod) {
        ip.parse::<IpAddr>()
            .map_err(|_| format!("status.podIPs {ip:?} is not a valid IP address"))?;
    }
    Ok(())
}

fn check_slice(slice: &EndpointSlice) -> Result<(), String> {
    let family = match (
        slice.address_type.as_str(),
        IpFamily::parse(&slice.address_type),
    ) {
        (_, Some(family)) => Some(family),
        ("FQDN", None) => None,
        (other, None) => return Err(format!("addressType {other:?} is not IPv4, IPv6 or FQDN")),
    };
    if let Some(family) = family {
        for address in slice.endpoints.iter().flat_map(|e| &e.addresses) {
            let ip: IpAddr = address
                .parse()
                .map_err(|_| format!("endpoints address {address:?} is not a valid IP address"))?;
            if IpFamily::of(ip) != family {
                return Err(format!("endpoints address {ip} is not {}", family.name()));
            }
        }
    }
    for port in slice.ports.iter().flatten() {
        if let Some(value) = port.port
            && !(1..=65535).contains(&value)
        {
            return Err(format!("ports port {value} is out of range 1-65535"));
        }
    }
    Ok(())
}

/// The API server's validation of a ServiceCIDR: one CIDR, or two of different families, each
/// in canonical form (no host bits).
fn check_service_cidr(object: &ServiceCIDR) -> Result<Vec<IpNet>, String> {
    let texts = object
        .spec
        .as_ref()
        .and_then(|spec| spec.cidrs.clone())
        .unwrap_or_default();
    let mut cidrs: Vec<IpNet> = Vec::new();
    for (index, text) in texts.iter().enumerate() {
        let cidr: IpNet = text
            .parse()
            .map_err(|_| format!("spec.cidrs[{index}] {text:?} is not a CIDR"))?;
        if cidr.trunc() != cidr {
            return Err(format!(
                "spec.cidrs[{index}] {text:?} has host bits set (network address {})",
                cidr.trunc()
            ));
        }
        cidrs.push(cidr);
    }
    match cidrs.as_slice() {
        [_] => Ok(cidrs),
        [first, second] if first.addr().is_ipv4() != second.addr().is_ipv4() => Ok(cidrs),
        _ => Err("spec.cidrs must hold one CIDR, or two of different IP families".to_owned()),
    }
}

/// The settings the Services are admitted with: the ServiceCIDR objects' ranges replace the
/// flag's when there are any (primary family, as the flag says, first).
fn allocation_settings(
    settings: &ManifestSettings,
    service_cidrs: &BTreeMap<ObjectKey, (Vec<IpNet>, ServiceCIDR)>,
) -> ManifestSettings {
    let mut ranges: Vec<IpNet> = service_cidrs
        .values()
        .flat_map(|(cidrs, _)| cidrs.iter().copied())
        .collect();
    if ranges.is_empty() {
        return settings.clone();
    }
    let primary_v4 = settings
        .service_cidrs
        .first()
        .is_none_or(|cidr| cidr.addr().is_ipv4());
    ranges.sort_by_key(|cidr| cidr.addr().is_ipv4() != primary_v4);
    ManifestSettings {
        service_cidrs: ranges,
        ..settings.clone()
    }
}

fn skipped_by_kube_proxy(metadata: &ObjectMeta) -> bool {
    metadata
        .labels
        .as_ref()
        .is_some_and(|labels| SKIP_LABELS.iter().any(|l| labels.contains_key(*l)))
}

/// Reads the folder from scratch into a snapshot. Pure apart from reading the files: the same
/// folder (contents and modification times) and settings always give the same snapshot.
pub fn load_dir(dir: &Path, settings: &ManifestSettings) -> ClusterSnapshot {
    load_dir_after(dir, settings, &mut History::default())
}

/// Reads the folder into a snapshot as the API server would see it after what `history`
/// admitted (the Services there keep what they hold), and updates `history`.
pub fn load_dir_after(
    dir: &Path,
    settings: &ManifestSettings,
    history: &mut History,
) -> ClusterSnapshot {
    load_dir_changed(dir, settings, history, &ChangedFiles::All)
}

/// [`load_dir_after`], reading again only the files `changed` names or whose modification
/// time moved; the others are taken as `history` last parsed them.
pub fn load_dir_changed(
    dir: &Path,
    settings: &ManifestSettings,
    history: &mut History,
    changed: &ChangedFiles,
) -> ClusterSnapshot {
    let mut diagnostics = Vec::new();
    let mut parsed = Vec::new();
    let mut created = BTreeMap::new();
    let mut present = HashSet::new();
    for (modified, file) in manifest_files(dir, &mut diagnostics) {
        created.insert(file.clone(), modified);
        present.insert(file.clone());
        if let Some(objects) =
            history
                .parsed_files()
                .unchanged(&file, modified, changed, &mut diagnostics)
        {
            parsed.extend(objects);
            continue;
        }
        match std::fs::read_to_string(&file) {
            Ok(text) => parsed.extend(history.parsed_files().parse(
                &file,
                modified,
                &text,
                &mut diagnostics,
            )),
            Err(error) => {
                history.parsed_files().read_failed(&file);
                diagnostics.push(Diagnostic {
                    object: format!("file {}", file.display()),
                    message: format!("cannot read: {error}"),
                });
            }
        }
    }

    history.parsed_files().keep_only(&present);
    let mut services = Registry::new("Service");
    let mut endpoints: Registry<Endpoints> = Registry::new("Endpoints");
    let mut explicit_slices: Registry<EndpointSlice> = Registry::new("EndpointSlice");
    let mut nodes: Registry<Node> = Registry::new("Node");
    let mut pods: Registry<Pod> = Registry::new("Pod");
    let mut service_cidrs: Registry<(Vec<IpNet>, ServiceCIDR)> = Registry::new("ServiceCIDR");
    let mut templates = PodTemplates {
        templates: Vec::new(),
    };
    for item in parsed {
        let origin = item.origin;
        let missing_name = |diagnostics: &mut Vec<Diagnostic>, kind: &str| {
            diagnostics.push(diagnostic(
                format!("{kind} <unnamed>"),
                &origin,
                "metadata.name is required",
            ));
        };
        match item.object {
            Object::Service(mut service) => match key_of(&mut service.metadata, true) {
                // A copy of an admitted Service in another file never replaces it.
                Some(key) => {
                    let holder = history.origin(&key).map(|o| o.file.clone());
                    services.insert_preferring(
                        key,
                        origin.clone(),
                        service,
                        holder.as_deref(),
                        &mut diagnostics,
                    );
                }
                None => missing_name(&mut diagnostics, "Service"),
            },
            Object::Endpoints(mut object) => match key_of(&mut object.metadata, true) {
                Some(key) => endpoints.insert(key, origin.clone(), object, &mut diagnostics),
                None => missing_name(&mut diagnostics, "Endpoints"),
            },
            Object::EndpointSlice(mut slice) => match key_of(&mut slice.metadata, true) {
                Some(key) => match check_slice(&slice) {
                    Ok(()) => {
                        slices::apply_defaults(&mut slice);
                        explicit_slices.insert(key, origin.clone(), slice, &mut diagnostics);
                    }
                    Err(reason) => diagnostics.push(diagnostic(
                        object_name("EndpointSlice", &key),
                        &origin,
                        reason,
                    )),
                },
                None => missing_name(&mut diagnostics, "EndpointSlice"),
            },
            Object::Node(mut node) => match key_of(&mut node.metadata, false) {
                Some(key) => nodes.insert(key, origin.clone(), node, &mut diagnostics),
                None => missing_name(&mut diagnostics, "Node"),
            },
            Object::Pod(mut pod) => match key_of(&mut pod.metadata, true) {
                Some(key) => match check_pod(&pod) {
                    Ok(()) => pods.insert(key, origin.clone(), pod, &mut diagnostics),
                    Err(reason) => {
                        diagnostics.push(diagnostic(object_name("Pod", &key), &origin, reason));
                    }
                },
                None => missing_name(&mut diagnostics, "Pod"),
            },
            Object::ServiceCidr(mut object) => match key_of(&mut object.metadata, false) {
                Some(key) => match check_service_cidr(&object) {
                    Ok(cidrs) => {
                        service_cidrs.insert(
                            key,
                            origin.clone(),
                            (cidrs, object),
                            &mut diagnostics,
                        );
                    }
                    Err(reason) => diagnostics.push(diagnostic(
                        object_name("ServiceCIDR", &key),
                        &origin,
                        reason,
                    )),
                },
                None => missing_name(&mut diagnostics, "ServiceCIDR"),
            },
            Object::Deployment(mut deployment) => {
                let namespace = deployment
                    .metadata
                    .namespace
                    .get_or_insert_with(|| "default".to_owned());
                if let Some(spec) = deployment.spec {
                    templates.templates.push((
                        namespace.clone(),
                        spec.selector.match_labels.unwrap_or_default(),
                        spec.template.spec.map(|s| s.containers).unwrap_or_default(),
                    ));
                }
            }
            Object::ReplicaSet(mut replica_set) => {
                let namespace = replica_set
                    .metadata
                    .namespace
                    .get_or_insert_with(|| "default".to_owned());
                if let Some(spec) = replica_set.spec {
                    templates.templates.push((
                        namespace.clone(),
                        spec.selector.match_labels.unwrap_or_default(),
                        spec.template
                            .and_then(|t| t.spec)
                            .map(|s| s.containers)
                            .unwrap_or_default(),
                    ));
                }
            }
        }
    }

    let candidates = services
        .objects
        .into_iter()
        .map(|(key, (origin, service))| Candidate {
            created: created
                .get(&origin.file)
                .copied()
                .unwrap_or_else(SystemTime::now),
            key,
            origin,
            service,
        })
        .collect();
    let mut allocations = Vec::new();
    let service_cidrs: BTreeMap<ObjectKey, (Vec<IpNet>, ServiceCIDR)> = service_cidrs
        .objects
        .into_iter()
        .map(|(key, (_, object))| (key, object))
        .collect();
    let admitted = admit::admit(
        candidates,
        &allocation_settings(settings, &service_cidrs),
        history,
        &mut diagnostics,
        &mut allocations,
    );

    let node_objects: BTreeMap<String, Node> = nodes
        .objects
        .into_iter()
        .map(|(key, (_, node))| (key.name, node))
        .collect();
    let pod_objects: Vec<&Pod> = pods.objects.values().map(|(_, pod)| pod).collect();

    let mut endpoint_slices = BTreeMap::new();
    for (key, (_, slice)) in explicit_slices.objects {
        endpoint_slices.insert(key, Arc::new(slice));
    }
    for (key, service) in &admitted {
        let generated = if slices::selector(service).is_some() {
            slices::synthesize(service, &pod_objects, &node_objects, &templates)
        } else if let Some((origin, object)) = endpoints.objects.get(key) {
            let (generated, invalid) = slices::mirror(service, object);
            for address in invalid {
                diagnostics.push(diagnostic(
                    object_name("Endpoints", key),
                    origin,
                    format!("address {address:?} is not a valid IP address; not mirrored"),
                ));
            }
            generated
        } else {
            Vec::new()
        };
        for slice in generated {
            let slice_key = ObjectKey {
                namespace: key.namespace.clone(),
                name: slice.metadata.name.clone().unwrap_or_default(),
            };
            endpoint_slices
                .entry(slice_key)
                .or_insert_with(|| Arc::new(slice));
        }
    }
    endpoint_slices.retain(|_, slice| !skipped_by_kube_proxy(&slice.metadata));

    let services = admitted
        .into_iter()
        .filter(|(_, service)| !skipped_by_kube_proxy(&service.metadata))
        .map(|(key, service)| (key, Arc::new(service)))
        .collect();
    ClusterSnapshot {
        services,
        endpoint_slices,
        node: node_objects.get(&settings.hostname).cloned(),
        service_cidrs: service_cidrs
            .into_iter()
            .map(|(key, (_, object))| (key, object))
            .collect(),
        diagnostics,
        allocations,
    }
}

/// Publishes `load_dir(dir)` on `tx` now and again after every change in the folder: a lone
/// change is read at once; the events of a burst (an editor's writes) that arrive while a read
/// runs are one next read, of the files they name only. A file caught half-written is a
/// diagnostic (the rest of the folder is still used) until its next write is read. The task
/// runs until it is aborted; dropping the returned handle does not stop it.
pub fn watch(
    dir: PathBuf,
    settings: ManifestSettings,
    tx: tokio_watch::Sender<Arc<ClusterSnapshot>>,
) -> Result<JoinHandle<()>, ManifestError> {
    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the files ourselves produces access events (and, depending on the mount's
        // atime policy, attribute changes): re-reading on those would loop. Only content,
        // creation, removal and renames matter.
        let relevant = match &event {
            Ok(event) => !matches!(
                event.kind,
                EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_))
            ),
            Err(_) => true,
        };
        if relevant {
            // The receiver is gone only when the task ended; nothing left to notify then.
            let _ = changes_tx.send(event);
        }
    })
    .map_err(|source| ManifestError::Watch {
        dir: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::Recursive)
        .map_err(|source| ManifestError::Watch {
            dir: dir.clone(),
            source,
        })?;
    let mut history = History::default();
    let mut published = Arc::new(load_dir_after(&dir, &settings, &mut history));
    tx.send_replace(Arc::clone(&published));
    history.parsed_files().take_content_changed();
    Ok(tokio::spawn(async move {
        // The watcher stops watching when dropped: the task owns it.
        let _watcher = watcher;
        while let Some(event) = changes.recv().await {
            // Everything already queued is read together: no waiting for the folder to go
            // quiet, the read itself is the batching window.
            let mut changed = ChangedFiles::none();
            let mut next = Some(event);
            while let Some(event) = next {
                match event {
                    Ok(event) => changed.add(&event.paths),
                    Err(error) => {
                        tracing::warn!(dir = %dir.display(), %error, "manifests folder watch error; re-reading it all");
                        changed = ChangedFiles::All;
                    }
                }
                next = changes.try_recv().ok();
            }
            let (read_dir, read_settings) = (dir.clone(), settings.clone());
            let mut read_history = std::mem::take(&mut history);
            let previous = Arc::clone(&published);
            let read = tokio::task::spawn_blocking(move || {
                let mut snapshot =
                    load_dir_changed(&read_dir, &read_settings, &mut read_history, &changed);
                snapshot.share_unchanged(&previous);
                (snapshot, read_history)
            });
            match read.await {
                Ok((snapshot, read_history)) => {
                    history = read_history;
                    // Not a change for the proxy: the same snapshot again would only spend a
                    // sync (and, under minSyncPeriod, hold back the next real change).
                    if !history.parsed_files().take_content_changed() {
                        tracing::debug!(dir = %dir.display(), "manifests folder event without a change");
                        continue;
                    }
                    tracing::info!(
                        dir = %dir.display(),
                        files_parsed = history.parsed_files().take_parsed_count(),
                        services = snapshot.services.len(),
                        endpoint_slices = snapshot.endpoint_slices.len(),
                        diagnostics = snapshot.diagnostics.len(),
                        "manifests folder changed"
                    );
                    published = Arc::new(snapshot);
                    tx.send_replace(Arc::clone(&published));
                }
                Err(error) => {
                    tracing::error!(dir = %dir.display(), %error, "reading the manifests folder failed");
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests;
