use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::slices::{self, LABEL_MANAGED_BY, LABEL_SERVICE_NAME, PodTemplates};
use super::*;

fn examples(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/source/manifests/testdata")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// One line per endpoint: `family ports pod addresses conditions node zone`.
fn describe(slices: &[&EndpointSlice]) -> Vec<String> {
    let mut lines = Vec::new();
    for slice in slices {
        let ports: Vec<String> = slice
            .ports
            .iter()
            .flatten()
            .map(|p| {
                format!(
                    "{}:{}/{}",
                    p.name.as_deref().unwrap_or_default(),
                    p.port.unwrap_or_default(),
                    p.protocol.as_deref().unwrap_or_default()
                )
            })
            .collect();
        if slice.endpoints.is_empty() {
            lines.push(format!(
                "{} [{}] (no endpoints)",
                slice.address_type,
                ports.join(",")
            ));
        }
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            let flag = |value: Option<bool>| match value {
                Some(true) => "1",
                Some(false) => "0",
                None => "-",
            };
            lines.push(format!(
                "{} [{}] {} {} r{}s{}t{} {} {}",
                slice.address_type,
                ports.join(","),
                endpoint
                    .target_ref
                    .as_ref()
                    .and_then(|r| r.name.as_deref())
                    .unwrap_or("-"),
                endpoint.addresses.join(","),
                flag(conditions.ready),
                flag(conditions.serving),
                flag(conditions.terminating),
                endpoint.node_name.as_deref().unwrap_or("-"),
                endpoint.zone.as_deref().unwrap_or("-"),
            ));
        }
    }
    lines
}

fn pod(value: &serde_json::Value) -> Pod {
    let mut object = json!({"apiVersion": "v1", "kind": "Pod"});
    object
        .as_object_mut()
        .unwrap()
        .extend(value.as_object().unwrap().clone());
    serde_json::from_value(object).unwrap()
}

fn ready_pod(name: &str, ips: &[&str], node: &str, ready: bool) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
        "spec": {"nodeName": node, "containers": [
            {"name": "c", "ports": [{"name": "http", "containerPort": 8000}]}
        ]},
        "status": {
            "phase": "Running",
            "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
        }
    })
}

fn web_service(extra: &serde_json::Value) -> Service {
    let mut spec = json!({
        "selector": {"app": "web"},
        "clusterIP": "10.96.0.10",
        "ipFamilies": ["IPv4"],
        "ports": [{"name": "web", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    });
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "labels": {"team": "a"}},
        "spec": spec
    }))
    .unwrap()
}

#[test]
fn synthesis_follows_the_endpointslice_controller() {
    struct Case {
        name: &'static str,
        service: serde_json::Value,
        pods: Vec<serde_json::Value>,
        expected: &'static [&'static str],
    }
    let terminating = {
        let mut value = ready_pod("term", &["10.0.0.4"], "node-a", true);
        value["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
        value
    };
    let succeeded = {
        let mut value = ready_pod("done", &["10.0.0.5"], "node-a", false);
        value["status"]["phase"] = json!("Succeeded");
        value
    };
    let no_ip = json!({
        "metadata": {"name": "pending", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"containers": []},
        "status": {"phase": "Pending"}
    });
    let other_port = json!({
        "metadata": {"name": "other", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-b", "containers": [
            {"name": "c", "ports": [{"name": "http", "containerPort": 9000}]}
        ]},
        "status": {"phase": "Running", "podIP": "10.0.0.6",
            "conditions": [{"type": "Ready", "status": "True"}]}
    });
    let unnamed = json!({
        "metadata": {"name": "noport", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": "True"}]}
    });
    let other_namespace = {
        let mut value = ready_pod("elsewhere", &["10.0.0.8"], "node-a", true);
        value["metadata"]["namespace"] = json!("other");
        value
    };
    let cases = [
        Case {
            name: "ready and not-ready pods; zone from the node",
            service: json!({}),
            pods: vec![
                ready_pod("a", &["10.0.0.1"], "node-a", true),
                ready_pod("b", &["10.0.0.2"], "node-b", false),
            ],
            expected: &[
                "IPv4 [web:8000/TCP] a 10.0.0.1 r1s1t0 node-a zone-a",
                "IPv4 [web:8000/TCP] b 10.0.0.2 r0s0t0 node-b -",
            ],
        },
        Case {
            name: "terminating pod: serving but not ready",
            service: json!({}),
            pods: vec![terminating.clone()],
            expected: &["IPv4 [web:8000/TCP] term 10.0.0.4 r0s1t1 node-a zone-a"],
        },
        Case {
            name: "publishNotReadyAddresses makes every endpoint ready",
            service: json!({"publishNotReadyAddresses": true}),
            pods: vec![ready_pod("b", &["10.0.0.2"], "node-b", false), terminating],
            expected: &[
                "IPv4 [web:8000/TCP] b 10.0.0.2 r1s0t0 node-b -",
                "IPv4 [web:8000/TCP] term 10.0.0.4 r1s1t1 node-a zone-a",
            ],
        },
        Case {
            name: "terminal, IP-less and other-namespace pods are left out; empty placeholder slice",
            service: json!({}),
            pods: vec![succeeded, no_ip, other_namespace],
            expected: &["IPv4 [] (no endpoints)"],
        },
        Case {
            name: "named port resolved per pod: different ports give different slices",
            service: json!({}),
            pods: vec![ready_pod("a", &["10.0.0.1"], "node-a", true), other_port],
            expected: &[
                "IPv4 [web:8000/TCP] a 10.0.0.1 r1s1t0 node-a zone-a",
                "IPv4 [web:9000/TCP] other 10.0.0.6 r1s1t0 node-b -",
            ],
        },
        Case {
            name: "a pod without the named port is an endpoint without that port",
            service: json!({}),
            pods: vec![unnamed],
            expected: &["IPv4 [] noport 10.0.0.7 r1s1t0 - -"],
        },
        Case {
            name: "named port with another protocol does not match",
            service: json!({"ports": [{"name": "dns", "port": 53, "targetPort": "http", "protocol": "UDP"}]}),
            pods: vec![ready_pod("a", &["10.0.0.1"], "node-a", true)],
            expected: &["IPv4 [] a 10.0.0.1 r1s1t0 node-a zone-a"],
        },
        Case {
            name: "numeric targetPort is used as is",
            service: json!({"ports": [{"name": "web", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}),
            pods: vec![ready_pod("a", &["10.0.0.1"], "node-a", true)],
            expected: &["IPv4 [web:8080/TCP] a 10.0.0.1 r1s1t0 node-a zone-a"],
        },
        Case {
            name: "dual-stack without IPv6 pod addresses: a placeholder for IPv6",
            service: json!({"ipFamilies": ["IPv4", "IPv6"], "clusterIPs": ["10.96.0.10", "fd00::10"]}),
            pods: vec![ready_pod("a", &["10.0.0.1"], "node-a", true)],
            expected: &[
                "IPv4 [web:8000/TCP] a 10.0.0.1 r1s1t0 node-a zone-a",
                "IPv6 [] (no endpoints)",
            ],
        },
        Case {
            name: "dual-stack: one slice per family",
            service: json!({"ipFamilies": ["IPv4", "IPv6"], "clusterIPs": ["10.96.0.10", "fd00::10"]}),
            pods: vec![ready_pod("a", &["10.0.0.1", "fd00:1::1"], "node-a", true)],
            expected: &[
                "IPv4 [web:8000/TCP] a 10.0.0.1 r1s1t0 node-a zone-a",
                "IPv6 [web:8000/TCP] a fd00:1::1 r1s1t0 node-a zone-a",
            ],
        },
        Case {
            name: "IPv6 single-stack takes only the pod's IPv6 address",
            service: json!({"ipFamilies": ["IPv6"], "clusterIP": "fd00::10"}),
            pods: vec![ready_pod("a", &["10.0.0.1", "fd00:1::1"], "node-a", true)],
            expected: &["IPv6 [web:8000/TCP] a fd00:1::1 r1s1t0 node-a zone-a"],
        },
    ];
    let nodes: BTreeMap<String, Node> = [(
        "node-a".to_owned(),
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}}
        }))
        .unwrap(),
    )]
    .into();
    let templates = PodTemplates {
        templates: Vec::new(),
    };
    for case in cases {
        let service = web_service(&case.service);
        let pods: Vec<Pod> = case.pods.iter().map(pod).collect();
        let pod_refs: Vec<&Pod> = pods.iter().collect();
        let slices = slices::synthesize(&service, &pod_refs, &nodes, &templates);
        let slice_refs: Vec<&EndpointSlice> = slices.iter().collect();
        assert_eq!(describe(&slice_refs), case.expected, "{}", case.name);
        for slice in &slices {
            let labels = slice.metadata.labels.as_ref().unwrap();
            assert_eq!(labels[LABEL_SERVICE_NAME], "web", "{}", case.name);
            assert_eq!(
                labels[LABEL_MANAGED_BY], "endpointslice-controller.k8s.io",
                "{}",
                case.name
            );
            assert_eq!(
                labels["team"], "a",
                "{}: Service labels are copied",
                case.name
            );
            assert_eq!(slice.metadata.namespace.as_deref(), Some("default"));
            let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str()),
                ("Service", "web")
            );
        }
    }
}

#[test]
fn mirroring_follows_the_mirroring_controller() {
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "default"},
        "spec": {"ports": [{"port": 5432}]}
    }))
    .unwrap();
    let endpoints: Endpoints = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "db", "namespace": "default", "labels": {"tier": "db"}},
        "subsets": [{
            "addresses": [{"ip": "192.0.2.1", "nodeName": "node-a"}, {"ip": "2001:db8::1"}, {"ip": "bogus"}],
            "notReadyAddresses": [{"ip": "192.0.2.2"}],
            "ports": [{"port": 5432}]
        }, {
            "addresses": [{"ip": "192.0.2.1", "nodeName": "node-a"}],
            "ports": [{"port": 5432, "protocol": "TCP"}]
        }]
    }))
    .unwrap();
    let (slices, invalid) = slices::mirror(&service, &endpoints);
    assert_eq!(invalid, ["bogus"]);
    let refs: Vec<&EndpointSlice> = slices.iter().collect();
    assert_eq!(
        describe(&refs),
        [
            "IPv4 [:5432/TCP] - 192.0.2.1 r1s-t- node-a -",
            "IPv4 [:5432/TCP] - 192.0.2.2 r0s-t- - -",
            "IPv6 [:5432/TCP] - 2001:db8::1 r1s-t- - -",
        ]
    );
    let labels = slices[0].metadata.labels.as_ref().unwrap();
    assert_eq!(
        labels[LABEL_MANAGED_BY],
        "endpointslicemirroring-controller.k8s.io"
    );
    assert_eq!(labels["tier"], "db");
    let owner = &slices[0].metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Endpoints", "db")
    );

    let mut skipped = endpoints.clone();
    skipped.metadata.labels.as_mut().unwrap().insert(
        "endpointslice.kubernetes.io/skip-mirror".to_owned(),
        "true".to_owned(),
    );
    assert!(slices::mirror(&service, &skipped).0.is_empty());
}

fn service_names(snapshot: &ClusterSnapshot) -> Vec<String> {
    snapshot
        .services
        .keys()
        .map(|k| format!("{}/{}", k.namespace, k.name))
        .collect()
}

fn slices_of<'a>(snapshot: &'a ClusterSnapshot, service: &str) -> Vec<&'a EndpointSlice> {
    snapshot
        .endpoint_slices
        .values()
        .map(Arc::as_ref)
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE_NAME))
                .map(String::as_str)
                == Some(service)
        })
        .collect()
}

#[test]
fn hostname_example_loads_without_diagnostics() {
    let snapshot = load_dir(&examples("hostname"), &ManifestSettings::new("node-a"));
    assert!(
        snapshot.diagnostics.is_empty(),
        "{:?}",
        snapshot.diagnostics
    );
    assert_eq!(
        service_names(&snapshot),
        [
            "default/hostname-svc-affinity",
            "default/hostname-svc-clusterip",
            "default/hostname-svc-externalip",
            "default/hostname-svc-externalname",
            "default/hostname-svc-lb",
            "default/hostname-svc-local",
            "default/hostname-svc-nodeport",
        ]
    );
    let spec = |name: &str| {
        snapshot.services[&ObjectKey {
            namespace: "default".to_owned(),
            name: name.to_owned(),
        }]
            .spec
            .clone()
            .unwrap()
    };
    // Every non-ExternalName Service got a ClusterIP; the ExternalName one none.
    let allocated: Vec<(&str, &str)> = snapshot
        .allocations
        .iter()
        .map(|a| (a.object.as_str(), a.field.as_str()))
        .collect();
    assert_eq!(
        allocated,
        [
            (
                "Service default/hostname-svc-affinity",
                "spec.clusterIPs[0]"
            ),
            (
                "Service default/hostname-svc-clusterip",
                "spec.clusterIPs[0]"
            ),
            (
                "Service default/hostname-svc-externalip",
                "spec.clusterIPs[0]"
            ),
            ("Service default/hostname-svc-lb", "spec.clusterIPs[0]"),
            ("Service default/hostname-svc-lb", "spec.ports[0].nodePort"),
            ("Service default/hostname-svc-local", "spec.clusterIPs[0]"),
            (
                "Service default/hostname-svc-nodeport",
                "spec.clusterIPs[0]"
            ),
            (
                "Service default/hostname-svc-nodeport",
                "spec.ports[0].nodePort"
            ),
        ]
    );
    assert_eq!(spec("hostname-svc-externalname").cluster_ip, None);
    assert_eq!(
        spec("hostname-svc-local").ports.unwrap()[0].node_port,
        Some(30081)
    );
    assert_eq!(
        spec("hostname-svc-affinity")
            .session_affinity_config
            .and_then(|c| c.client_ip)
            .and_then(|c| c.timeout_seconds),
        Some(10_800)
    );
    // No Pods in the folder: each selector Service has only the controller's placeholder slice.
    let clusterip_slices = slices_of(&snapshot, "hostname-svc-clusterip");
    assert_eq!(describe(&clusterip_slices), ["IPv4 [] (no endpoints)"]);
    assert!(slices_of(&snapshot, "hostname-svc-externalname").is_empty());
    // A re-read allocates the same values.
    let again = load_dir(&examples("hostname"), &ManifestSettings::new("node-a"));
    assert_eq!(again.allocations, snapshot.allocations);
}

#[test]
fn hostname_example_with_pods_gets_endpoints_with_named_ports() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&examples("hostname"), dir.path());
    copy_dir(&testdata("hostname-pods"), dir.path());
    let snapshot = load_dir(dir.path(), &ManifestSettings::new("node-b"));
    assert!(
        snapshot.diagnostics.is_empty(),
        "{:?}",
        snapshot.diagnostics
    );
    assert_eq!(
        snapshot
            .node
            .as_ref()
            .and_then(|n| n.metadata.name.as_deref()),
        Some("node-b")
    );
    let expected_80 = [
        "IPv4 [:80/TCP] hostname-deployment-aaaaa 10.244.1.10 r1s1t0 node-a zone-a",
        "IPv4 [:80/TCP] hostname-deployment-bbbbb 10.244.2.10 r1s1t0 node-b zone-b",
        "IPv4 [:80/TCP] hostname-deployment-ccccc 10.244.1.11 r0s0t0 node-a zone-a",
    ];
    assert_eq!(
        describe(&slices_of(&snapshot, "hostname-svc-clusterip")),
        expected_80
    );
    // targetPort "http": from pod aaaaa's own container, from the Deployment template for the
    // Pods the lab writes without containers.
    assert_eq!(
        describe(&slices_of(&snapshot, "hostname-svc-externalip")),
        expected_80
    );
}

#[test]
fn selectorless_example_mirrors_endpoints() {
    let snapshot = load_dir(&examples("selectorless"), &ManifestSettings::new("node-a"));
    assert!(
        snapshot.diagnostics.is_empty(),
        "{:?}",
        snapshot.diagnostics
    );
    assert_eq!(service_names(&snapshot), ["default/external-db"]);
    assert_eq!(
        describe(&slices_of(&snapshot, "external-db")),
        [
            "IPv4 [postgres:5432/TCP] - 198.51.100.20 r1s-t- - -",
            "IPv4 [postgres:5432/TCP] - 198.51.100.21 r1s-t- - -",
            "IPv4 [postgres:5432/TCP] - 198.51.100.22 r0s-t- - -",
        ]
    );
}

#[test]
fn broken_example_names_the_file_and_keeps_the_rest() {
    let dir = examples("broken");
    let snapshot = load_dir(&dir, &ManifestSettings::new("node-a"));
    assert_eq!(service_names(&snapshot), ["default/good-svc"]);
    assert_eq!(snapshot.diagnostics.len(), 1, "{:?}", snapshot.diagnostics);
    let broken = dir.join("broken.yaml");
    assert_eq!(
        snapshot.diagnostics[0].object,
        format!("file {}", broken.display())
    );
    assert!(
        snapshot.diagnostics[0]
            .message
            .starts_with(&format!("{}: invalid YAML", broken.display())),
        "{:?}",
        snapshot.diagnostics[0]
    );
}

#[test]
fn folder_level_rules() {
    struct Case {
        name: &'static str,
        files: &'static [(&'static str, &'static str)],
        services: &'static [&'static str],
        diagnostics: &'static [&'static str],
    }
    const SVC_A: &str =
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n";
    let cases = [
        Case {
            name: "kube-proxy's label selector skips service-proxy-name and headless labels",
            files: &[
                ("a.yaml", SVC_A),
                (
                    "b.yaml",
                    "apiVersion: v1\nkind: Service\nmetadata: {name: b, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {ports: [{port: 80}]}\n",
                ),
                (
                    "c.yaml",
                    "apiVersion: v1\nkind: Service\nmetadata: {name: c, labels: {service.kubernetes.io/headless: ''}}\nspec: {ports: [{port: 80}]}\n",
                ),
            ],
            services: &["default/a"],
            diagnostics: &[],
        },
        Case {
            name: "the same object in two files: the first (by path) wins",
            files: &[("a.yaml", SVC_A), ("b.yml", SVC_A)],
            services: &["default/a"],
            diagnostics: &["Service default/a|b.yml: also defined in"],
        },
        Case {
            name: "files of other extensions and hidden files are ignored",
            files: &[
                ("a.yaml", SVC_A),
                ("notes.txt", "hello"),
                (".swap.yaml", "{{{"),
            ],
            services: &["default/a"],
            diagnostics: &[],
        },
        Case {
            name: "invalid pod IP names the Pod",
            files: &[(
                "p.yaml",
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.999}\n",
            )],
            services: &[],
            diagnostics: &[
                "Pod x/p|p.yaml: status.podIPs \"10.0.0.999\" is not a valid IP address",
            ],
        },
        Case {
            name: "invalid EndpointSlice address names the slice",
            files: &[(
                "s.yaml",
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: [{addresses: [fd00::1]}]\n",
            )],
            services: &[],
            diagnostics: &["EndpointSlice default/s|s.yaml: endpoints address fd00::1 is not IPv4"],
        },
    ];
    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in case.files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let snapshot = load_dir(dir.path(), &ManifestSettings::new("node-a"));
        assert_eq!(service_names(&snapshot), case.services, "{}", case.name);
        assert_eq!(
            snapshot.diagnostics.len(),
            case.diagnostics.len(),
            "{}: {:?}",
            case.name,
            snapshot.diagnostics
        );
        for (diagnostic, expected) in snapshot.diagnostics.iter().zip(case.diagnostics) {
            let (object, message) = expected.split_once('|').unwrap();
            assert_eq!(diagnostic.object, object, "{}", case.name);
            let message = format!("{}/{message}", dir.path().display());
            assert!(
                diagnostic.message.starts_with(&message),
                "{}: {:?}",
                case.name,
                diagnostic.message
            );
        }
    }
}

/// The folder's snapshot, which must have no diagnostics.
fn load_without_diagnostics(dir: &Path) -> ClusterSnapshot {
    let snapshot = load_dir(dir, &ManifestSettings::new("node-a"));
    assert!(
        snapshot.diagnostics.is_empty(),
        "{:?}",
        snapshot.diagnostics
    );
    snapshot
}

/// A hand-written EndpointSlice port without `name` or `protocol` gets the API server's
/// defaults ("" and TCP), so it serves the Service's unnamed port, as it would from the API
/// server (kube-proxy skips ports whose name is unset).
#[test]
fn endpoint_slice_ports_get_the_api_servers_defaults() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: 10.96.0.20, ports: [{port: 5432}]}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("slice.yaml"),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: db-1, labels: {kubernetes.io/service-name: db}}\naddressType: IPv4\nendpoints: [{addresses: [10.1.0.5]}]\nports: [{port: 5432}]\n",
    )
    .unwrap();
    let snapshot = load_without_diagnostics(dir.path());
    let slices = slices_of(&snapshot, "db");
    assert_eq!(
        describe(&slices),
        ["IPv4 [:5432/TCP] - 10.1.0.5 r-s-t- - -"]
    );
    let port = &slices[0].ports.as_ref().unwrap()[0];
    assert_eq!(port.name.as_deref(), Some(""));
    let state = crate::model::compute(&snapshot, &crate::model::ModelConfig::default());
    let endpoints: Vec<String> = state
        .service_ports
        .iter()
        .flat_map(|sp| &sp.cluster_endpoints)
        .map(|e| format!("{}:{}", e.addr, e.port))
        .collect();
    assert_eq!(endpoints, ["10.1.0.5:5432"]);
}

/// The API server's Service defaults for every field kube-proxy reads
/// (pkg/apis/core/v1/defaults.go and the allocators' family fields), one line per Service:
/// type, sessionAffinity (timeout), internal/external traffic policy, ipFamilyPolicy,
/// allocateLoadBalancerNodePorts, then each port as protocol:port->targetPort.
#[test]
fn services_get_the_api_servers_defaults() {
    let dir = tempfile::tempdir().unwrap();
    for (name, spec) in [
        (
            "cip",
            "{ports: [{name: a, port: 80}, {name: b, port: 81, targetPort: 0}]}",
        ),
        ("np", "{type: NodePort, ports: [{port: 80, protocol: UDP}]}"),
        (
            "lb",
            "{type: LoadBalancer, ports: [{port: 80, targetPort: http}]}",
        ),
        ("aff", "{sessionAffinity: ClientIP, ports: [{port: 80}]}"),
        ("ext", "{type: ExternalName, externalName: example.com}"),
    ] {
        std::fs::write(
            dir.path().join(format!("{name}.yaml")),
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n"),
        )
        .unwrap();
    }
    let snapshot = load_without_diagnostics(dir.path());
    let described: Vec<String> = snapshot
        .services
        .iter()
        .map(|(key, service)| {
            let spec = service.spec.as_ref().unwrap();
            let ports: Vec<String> = spec
                .ports
                .iter()
                .flatten()
                .map(|p| {
                    let target = match &p.target_port {
                        Some(IntOrString::Int(n)) => n.to_string(),
                        Some(IntOrString::String(s)) => s.clone(),
                        None => "-".to_owned(),
                    };
                    format!(
                        "{}:{}->{target}",
                        p.protocol.as_deref().unwrap_or("-"),
                        p.port
                    )
                })
                .collect();
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map_or(String::new(), |t| format!("({t})"));
            format!(
                "{} {} {}{timeout} {} {} {} {:?} {}",
                key.name,
                spec.type_.as_deref().unwrap_or("-"),
                spec.session_affinity.as_deref().unwrap_or("-"),
                spec.internal_traffic_policy.as_deref().unwrap_or("-"),
                spec.external_traffic_policy.as_deref().unwrap_or("-"),
                spec.ip_family_policy.as_deref().unwrap_or("-"),
                spec.allocate_load_balancer_node_ports,
                ports.join(",")
            )
        })
        .collect();
    assert_eq!(
        described,
        [
            "aff ClusterIP ClientIP(10800) Cluster - SingleStack None TCP:80->80",
            "cip ClusterIP None Cluster - SingleStack None TCP:80->80,TCP:81->81",
            "ext ExternalName None - - - None ",
            "lb LoadBalancer None Cluster Cluster SingleStack Some(true) TCP:80->http",
            "np NodePort None Cluster Cluster SingleStack None UDP:80->80",
        ]
    );
}

#[test]
fn port_range_syntax() {
    let cases: [(&str, Option<(u16, u16)>); 6] = [
        ("30000-32767", Some((30000, 32767))),
        ("30000+2767", Some((30000, 32767))),
        (" 8000 - 9000 ", Some((8000, 9000))),
        ("32767-30000", None),
        ("0-10", None),
        ("30000", None),
    ];
    for (text, expected) in cases {
        let parsed = text.parse::<PortRange>().ok().map(|r| (r.first, r.last));
        assert_eq!(parsed, expected, "{text}");
    }
    assert_eq!(DEFAULT_SERVICE_NODE_PORT_RANGE.to_string(), "30000-32767");
}

#[test]
fn service_cluster_ip_range_syntax() {
    let cases: [(&str, Option<&[&str]>); 6] = [
        ("10.96.0.0/12", Some(&["10.96.0.0/12"])),
        (
            "10.96.0.0/12, fd00:10:96::/112",
            Some(&["10.96.0.0/12", "fd00:10:96::/112"]),
        ),
        (
            "fd00:10:96::/112,10.96.0.0/12",
            Some(&["fd00:10:96::/112", "10.96.0.0/12"]),
        ),
        ("10.96.0.0/12,10.100.0.0/16", None),
        ("10.96.0.0/12,fd00::/112,10.1.0.0/16", None),
        ("10.96.0.0", None),
    ];
    for (text, expected) in cases {
        let parsed = parse_service_cluster_ip_range(text)
            .ok()
            .map(|cidrs| cidrs.iter().map(ToString::to_string).collect::<Vec<_>>());
        let expected = expected.map(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>());
        assert_eq!(parsed, expected, "{text}");
    }
}

/// Waits until `rx` holds a snapshot satisfying `done`, at most `limit`.
async fn wait_for(
    rx: &mut tokio_watch::Receiver<Arc<ClusterSnapshot>>,
    limit: Duration,
    done: impl Fn(&ClusterSnapshot) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if done(&rx.borrow_and_update()) {
            return true;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_edit_is_published_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("svc.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}\n",
    )
    .unwrap();
    let (tx, mut rx) = tokio_watch::channel(Arc::new(ClusterSnapshot::default()));
    let task = watch(dir.path().to_owned(), ManifestSettings::new("node-a"), tx).unwrap();
    assert_eq!(
        service_names(&rx.borrow_and_update()),
        ["default/web"],
        "initial snapshot"
    );
    // Reading the folder must not look like a change of it (no re-read loop).
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!rx.has_changed().unwrap(), "republished without a change");

    let port_is = |port: i32| {
        move |snapshot: &ClusterSnapshot| {
            snapshot.services.values().any(|s| {
                s.spec
                    .as_ref()
                    .and_then(|s| s.ports.as_ref())
                    .is_some_and(|p| p[0].port == port)
            })
        }
    };
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.20, ports: [{port: 8080}]}\n",
    )
    .unwrap();
    assert!(
        wait_for(&mut rx, Duration::from_secs(1), port_is(8080)).await,
        "edit not applied within 1 s"
    );

    let started = Instant::now();
    std::fs::write(
        dir.path().join("second.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: second}\nspec: {ports: [{port: 81}]}\n",
    )
    .unwrap();
    assert!(
        wait_for(&mut rx, Duration::from_secs(1), |s| s.services.len() == 2).await,
        "added file not applied within 1 s"
    );
    std::fs::remove_file(&file).unwrap();
    assert!(
        wait_for(&mut rx, Duration::from_secs(1), |s| service_names(s)
            == ["default/second"])
        .await,
        "removed file not applied within 1 s (after {:?})",
        started.elapsed()
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_file_is_an_error_until_its_next_write_and_the_rest_stays() {
    let dir = tempfile::tempdir().unwrap();
    let web = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}\n";
    std::fs::write(dir.path().join("web.yaml"), web).unwrap();
    let (tx, mut rx) = tokio_watch::channel(Arc::new(ClusterSnapshot::default()));
    let task = watch(dir.path().to_owned(), ManifestSettings::new("node-a"), tx).unwrap();
    assert_eq!(service_names(&rx.borrow_and_update()), ["default/web"]);
    // An editor's first write: half the file, read at once (no debounce waits for the rest).
    let api = dir.path().join("api.yaml");
    let api_text = "apiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec: {clusterIP: 10.96.0.21, ports: [{port: 80}]}\n";
    std::fs::write(&api, &api_text[..40]).unwrap();
    let names_api = |s: &ClusterSnapshot| {
        s.diagnostics
            .iter()
            .any(|d| d.object.contains("api.yaml") || d.message.contains("api.yaml"))
    };
    assert!(
        wait_for(&mut rx, Duration::from_secs(5), names_api).await,
        "the half-written file is not reported: {:?}",
        rx.borrow().diagnostics
    );
    assert_eq!(
        service_names(&rx.borrow()),
        ["default/web"],
        "the rest of the folder stays"
    );
    // Its next write completes it.
    std::fs::write(&api, api_text).unwrap();
    assert!(
        wait_for(&mut rx, Duration::from_secs(5), |s| {
            service_names(s) == ["default/api", "default/web"] && s.diagnostics.is_empty()
        })
        .await,
        "the completed file is not read: {:?}",
        rx.borrow().diagnostics
    );
    task.abort();
}

/// A file written while the folder is being re-read (here a re-read slowed by a large file,
/// as a thousand bad files slow it under emulation) is published by the next re-read: the
/// change is not lost to the read in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_during_a_slow_re_read_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = tokio_watch::channel(Arc::new(ClusterSnapshot::default()));
    let task = watch(dir.path().to_owned(), ManifestSettings::new("node-a"), tx).unwrap();
    let service = |name: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n{extra}spec:\n  ports: [{{port: 80}}]\n"
        )
    };
    let annotations = (0..ANNOTATIONS).fold(String::new(), |mut text, i| {
        let _ = writeln!(text, "    example.com/a{i}: \"{i}\"");
        text
    });
    let slow = service("slow", &format!("  annotations:\n{annotations}"));
    let started = Instant::now();
    std::fs::write(dir.path().join("slow.yaml"), &slow).unwrap();
    // A change is read at once: the re-read parsing the large file is under way.
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(dir.path().join("last.yaml"), service("last", "")).unwrap();
    let wrote_last = started.elapsed();
    assert!(
        wait_for(&mut rx, Duration::from_secs(20), |s| service_names(s)
            == ["default/last", "default/slow"])
        .await,
        "the file written during the re-read is not published: {:?}",
        service_names(&rx.borrow())
    );
    // The proof that it was written during the re-read: that read alone took longer.
    let parse = Instant::now();
    super::parse::parse_file(Path::new("slow.yaml"), &slow, &mut Vec::new());
    assert!(
        parse.elapsed() > wrote_last,
        "parsing the large file ({:?}) outlasts the write during its re-read ({wrote_last:?})",
        parse.elapsed()
    );
    task.abort();
}

#[test]
fn a_re_read_of_named_files_reads_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let service = |name: &str, port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: None\n  ports: [{{port: {port}}}]\n"
        )
    };
    let port_of = |snapshot: &ClusterSnapshot, name: &str| {
        snapshot.services.values().find_map(|s| {
            (s.metadata.name.as_deref() == Some(name))
                .then(|| s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port)
        })
    };
    let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
    std::fs::write(&a, service("a", 80)).unwrap();
    std::fs::write(&b, service("b", 80)).unwrap();
    let settings = ManifestSettings::new("node-a");
    let mut history = History::default();
    load_dir_after(dir.path(), &settings, &mut history);
    assert_eq!(history.parsed_files().take_parsed_count(), 2);
    // b changes behind the watcher's back, its modification time kept: a re-read of a alone
    // does not see it, a re-read of everything does.
    let b_modified = std::fs::metadata(&b).unwrap().modified().unwrap();
    std::fs::write(&b, service("b", 81)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&b)
        .unwrap()
        .set_modified(b_modified)
        .unwrap();
    std::fs::write(&a, service("a", 82)).unwrap();
    let only_a = ChangedFiles::Paths([a.clone()].into());
    let snapshot = load_dir_changed(dir.path(), &settings, &mut history, &only_a);
    assert_eq!(history.parsed_files().take_parsed_count(), 1);
    assert_eq!(
        (port_of(&snapshot, "a"), port_of(&snapshot, "b")),
        (Some(82), Some(80))
    );
    let snapshot = load_dir_changed(dir.path(), &settings, &mut history, &ChangedFiles::All);
    assert_eq!(port_of(&snapshot, "b"), Some(81));
}

/// Annotations of the large file of [`a_file_written_during_a_slow_re_read_is_published`].
const ANNOTATIONS: usize = 60_000;

#[test]
fn service_cidr_objects_are_validated_published_and_allocated_from() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cidrs.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: kubernetes\n\
         spec:\n  cidrs: [10.43.0.0/16]\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: sloppy\n\
         spec:\n  cidrs: [10.44.0.1/16]\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: two-v4\n\
         spec:\n  cidrs: [10.45.0.0/16, 10.46.0.0/16]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports: [{port: 80}]\n",
    )
    .unwrap();
    // The flag's range (the default 10.96.0.0/12 here) yields to the ServiceCIDRs.
    let snapshot = load_dir(dir.path(), &ManifestSettings::new("node-a"));
    let names: Vec<&str> = snapshot
        .service_cidrs
        .keys()
        .map(|k| k.name.as_str())
        .collect();
    assert_eq!(names, ["kubernetes"]);
    let messages: Vec<String> = snapshot
        .diagnostics
        .iter()
        .map(|d| format!("{}: {}", d.object, d.message))
        .collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(
        messages[0].starts_with("ServiceCIDR sloppy: ")
            && messages[0].ends_with(
                "spec.cidrs[0] \"10.44.0.1/16\" has host bits set (network address 10.44.0.0/16)"
            ),
        "{messages:?}"
    );
    assert!(
        messages[1].starts_with("ServiceCIDR two-v4: ")
            && messages[1].ends_with("two of different IP families"),
        "{messages:?}"
    );
    let allocated: Vec<&str> = snapshot
        .allocations
        .iter()
        .filter(|a| a.field == "spec.clusterIPs[0]")
        .map(|a| a.value.as_str())
        .collect();
    assert_eq!(allocated.len(), 1);
    let ip: std::net::IpAddr = allocated[0].parse().unwrap();
    assert!(
        "10.43.0.0/16".parse::<IpNet>().unwrap().contains(&ip),
        "allocated {ip} outside the ServiceCIDR"
    );
}

fn zoned_node(name: &str, zone: &str, cpu: &str) -> (String, Node) {
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"allocatable": {"cpu": cpu},
                   "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap();
    (name.to_owned(), node)
}

/// One line per endpoint: `pod zones nodes` of its hints (`-` without hints).
fn hints_of(slices: &[EndpointSlice]) -> Vec<String> {
    slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .map(|e| {
            let pod = e
                .target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .unwrap_or_default();
            match &e.hints {
                None => format!("{pod} -"),
                Some(h) => {
                    let names = |v: Option<Vec<String>>| v.map_or("-".to_owned(), |v| v.join(","));
                    format!(
                        "{pod} zones={} nodes={}",
                        names(
                            h.for_zones
                                .as_ref()
                                .map(|z| z.iter().map(|z| z.name.clone()).collect())
                        ),
                        names(
                            h.for_nodes
                                .as_ref()
                                .map(|n| n.iter().map(|n| n.name.clone()).collect())
                        )
                    )
                }
            }
        })
        .collect()
}

#[test]
fn topology_hints_follow_the_endpointslice_controller() {
    let nodes: BTreeMap<String, Node> = [
        zoned_node("node-a", "zone-a", "4"),
        zoned_node("node-a2", "zone-a", "4000m"),
        zoned_node("node-b", "zone-b", "8"),
    ]
    .into_iter()
    .collect();
    let pods: Vec<Pod> = [
        ready_pod("p1", &["10.0.0.1"], "node-a", true),
        ready_pod("p2", &["10.0.0.2"], "node-a", true),
        ready_pod("p3", &["10.0.0.3"], "node-a2", true),
        ready_pod("p4", &["10.0.0.4"], "node-b", true),
        ready_pod("p5", &["10.0.0.5"], "node-b", false),
    ]
    .iter()
    .map(pod)
    .collect();
    let pod_refs: Vec<&Pod> = pods.iter().collect();
    let templates = PodTemplates {
        templates: Vec::new(),
    };
    let hints =
        |service: Service| hints_of(&slices::synthesize(&service, &pod_refs, &nodes, &templates));
    let with_annotation = |key: &str, value: &str| {
        let mut service = web_service(&json!({}));
        service.metadata.annotations = Some([(key.to_owned(), value.to_owned())].into());
        service
    };
    // (case, service, one line per endpoint)
    let cases: Vec<(&str, Service, Vec<&str>)> = vec![
        (
            "no trafficDistribution: no hints",
            web_service(&json!({})),
            vec!["p1 -", "p2 -", "p3 -", "p4 -", "p5 -"],
        ),
        (
            "PreferClose: each ready endpoint for its own zone",
            web_service(&json!({"trafficDistribution": "PreferClose"})),
            vec![
                "p1 zones=zone-a nodes=-",
                "p2 zones=zone-a nodes=-",
                "p3 zones=zone-a nodes=-",
                "p4 zones=zone-b nodes=-",
                "p5 -",
            ],
        ),
        (
            "PreferSameZone: as PreferClose",
            web_service(&json!({"trafficDistribution": "PreferSameZone"})),
            vec![
                "p1 zones=zone-a nodes=-",
                "p2 zones=zone-a nodes=-",
                "p3 zones=zone-a nodes=-",
                "p4 zones=zone-b nodes=-",
                "p5 -",
            ],
        ),
        (
            "PreferSameNode: its zone and its node",
            web_service(&json!({"trafficDistribution": "PreferSameNode"})),
            vec![
                "p1 zones=zone-a nodes=node-a",
                "p2 zones=zone-a nodes=node-a",
                "p3 zones=zone-a nodes=node-a2",
                "p4 zones=zone-b nodes=node-b",
                "p5 -",
            ],
        ),
        (
            "topology-mode Auto: zones get endpoints in proportion to CPU (8:8), one of zone-a's moves to zone-b",
            with_annotation("service.kubernetes.io/topology-mode", "Auto"),
            vec![
                "p1 zones=zone-b nodes=-",
                "p2 zones=zone-a nodes=-",
                "p3 zones=zone-a nodes=-",
                "p4 zones=zone-b nodes=-",
                "p5 -",
            ],
        ),
        (
            "the deprecated topology-aware-hints annotation, and it wins over trafficDistribution",
            {
                let mut s = with_annotation("service.kubernetes.io/topology-aware-hints", "auto");
                s.spec.as_mut().unwrap().traffic_distribution = Some("PreferSameNode".to_owned());
                s
            },
            vec![
                "p1 zones=zone-b nodes=-",
                "p2 zones=zone-a nodes=-",
                "p3 zones=zone-a nodes=-",
                "p4 zones=zone-b nodes=-",
                "p5 -",
            ],
        ),
    ];
    for (case, service, expected) in cases {
        assert_eq!(hints(service), expected, "{case}");
    }
    // Topology-mode Auto without enough information: no hints at all.
    let one_zone: BTreeMap<String, Node> =
        [zoned_node("node-a", "zone-a", "4")].into_iter().collect();
    let service = with_annotation("service.kubernetes.io/topology-mode", "Auto");
    let slices = slices::synthesize(&service, &pod_refs, &one_zone, &templates);
    assert!(
        hints_of(&slices).iter().all(|l| l.ends_with(" -")),
        "{:?}",
        hints_of(&slices)
    );
}

#[test]
fn a_re_read_parses_only_the_files_that_changed() {
    let dir = tempfile::tempdir().unwrap();
    let service = |name: &str, port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: None\n  ports: [{{port: {port}}}]\n"
        )
    };
    for name in ["a", "b", "c"] {
        std::fs::write(dir.path().join(format!("{name}.yaml")), service(name, 80)).unwrap();
    }
    let settings = ManifestSettings::new("node-a");
    let mut history = History::default();
    let first = load_dir_after(dir.path(), &settings, &mut history);
    assert_eq!(first.services.len(), 3, "{:?}", first.diagnostics);
    assert_eq!(history.parsed_files().take_parsed_count(), 3);
    std::fs::write(dir.path().join("b.yaml"), service("b", 81)).unwrap();
    std::fs::remove_file(dir.path().join("c.yaml")).unwrap();
    let second = load_dir_after(dir.path(), &settings, &mut history);
    assert_eq!(history.parsed_files().take_parsed_count(), 1);
    assert_eq!(service_names(&second), ["default/a", "default/b"]);
    let b_port = second.services.values().find_map(|s| {
        (s.metadata.name.as_deref() == Some("b"))
            .then(|| s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port)
    });
    assert_eq!(b_port, Some(81));
    // The same folder read from scratch gives the same snapshot.
    assert_eq!(
        format!("{:?}", load_dir(dir.path(), &settings)),
        format!("{second:?}")
    );
}
