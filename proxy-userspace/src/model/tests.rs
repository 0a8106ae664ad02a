//! Table-driven tests of `compute`: each case builds real Kubernetes JSON, computes the node's
//! desired state and states, line by line, what must (and must not) be in its summary.
//!
//! Summary lines (one fact per line, so an expectation reads literally):
//! - `<ns>/<svc>[:<port>] <PROTO> <v4|v6> <Kind> <addr:port> pod=<a> node=<a> other=<a>[ ranges=<cidrs>]`
//!   where an action is `fwd(policy)`, `fwd(policy,masq)`, `fwd(cluster)`, `fwd(cluster,masq)`,
//!   `reject` or `drop`;
//! - `<ns>/<svc>[:<port>] <PROTO> <v4|v6> internal=<eps> external=<eps> cluster=<eps>` with
//!   `-` for an empty set;
//! - `<ns>/<svc>[:<port>] <PROTO> <v4|v6> affinity=<s>s` and `... healthCheckNodePort=<n>`;
//! - `clusterIPs=<ips>` and `diag <object>: <message>`.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

use super::*;
use crate::cluster::{ClusterSnapshot, ObjectKey};

const NODE: &str = "node-a";

fn base_config() -> ModelConfig {
    ModelConfig {
        hostname: NODE.to_owned(),
        node_ips: vec!["192.168.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
        local_addresses: vec![
            "127.0.0.1".parse().unwrap(),
            "192.168.0.10".parse().unwrap(),
            "172.17.0.1".parse().unwrap(),
            "::1".parse().unwrap(),
            "fd00::10".parse().unwrap(),
        ],
        nodeport_addresses: NodePortAddresses::primary(),
        zone: Some("zone-a".to_owned()),
        local_traffic_detector: LocalTrafficDetector::SourceCidrs {
            cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd10::/64".parse().unwrap(),
            ],
        },
        masquerade_all: false,
        service_cidrs: vec![
            "10.96.0.0/12".parse().unwrap(),
            "fd96::/108".parse().unwrap(),
        ],
    }
}

/// A Service named `name` in `default` with this `spec` (and optional `status`).
fn svc(name: &str, spec: Value) -> Value {
    let mut service = json!({"apiVersion": "v1", "kind": "Service",
                             "metadata": {"name": name, "namespace": "default"}});
    service["spec"] = spec;
    service
}

fn with_status(mut service: Value, status: Value) -> Value {
    service["status"] = status;
    service
}

/// An EndpointSlice `name` of Service `service`.
fn slice(name: &str, service: &str, address_type: &str, ports: Value, endpoints: Value) -> Value {
    let mut slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                           "metadata": {"name": name, "namespace": "default",
                                        "labels": {"kubernetes.io/service-name": service}},
                           "addressType": address_type});
    slice["ports"] = ports;
    slice["endpoints"] = endpoints;
    slice
}

/// A ready endpoint on `node`.
fn ready(addr: &str, node: &str) -> Value {
    json!({"addresses": [addr], "nodeName": node, "conditions": {"ready": true}})
}

/// A terminating endpoint on `node` that still serves (or not).
fn terminating(addr: &str, node: &str, serving: bool) -> Value {
    json!({"addresses": [addr], "nodeName": node,
           "conditions": {"ready": false, "serving": serving, "terminating": true}})
}

fn http_port() -> Value {
    json!([{"name": "", "port": 8080, "protocol": "TCP"}])
}

fn key_of(object: &Value) -> ObjectKey {
    ObjectKey {
        namespace: object["metadata"]["namespace"].as_str().unwrap().to_owned(),
        name: object["metadata"]["name"].as_str().unwrap().to_owned(),
    }
}

fn snapshot(objects: &[Value]) -> ClusterSnapshot {
    let mut snapshot = ClusterSnapshot::default();
    for object in objects {
        match object["kind"].as_str().unwrap() {
            "Service" => {
                let service: Service = serde_json::from_value(object.clone()).unwrap();
                snapshot
                    .services
                    .insert(key_of(object), std::sync::Arc::new(service));
            }
            "EndpointSlice" => {
                let slice: EndpointSlice = serde_json::from_value(object.clone()).unwrap();
                snapshot
                    .endpoint_slices
                    .insert(key_of(object), std::sync::Arc::new(slice));
            }
            other => panic!("unexpected kind {other}"),
        }
    }
    snapshot
}

fn action_text(action: Action) -> String {
    match action {
        Action::Forward { set, masquerade } => {
            let set = match set {
                EndpointSet::Policy => "policy",
                EndpointSet::Cluster => "cluster",
            };
            if masquerade {
                format!("fwd({set},masq)")
            } else {
                format!("fwd({set})")
            }
        }
        Action::Reject => "reject".to_owned(),
        Action::Drop => "drop".to_owned(),
    }
}

fn endpoints_text(endpoints: &[Endpoint]) -> String {
    if endpoints.is_empty() {
        return "-".to_owned();
    }
    let list: Vec<String> = endpoints
        .iter()
        .map(|ep| SocketAddr::new(ep.addr, ep.port).to_string())
        .collect();
    list.join(",")
}

fn summary(state: &DesiredState) -> Vec<String> {
    let mut lines = Vec::new();
    for sp in &state.service_ports {
        let port = if sp.name.port.is_empty() {
            String::new()
        } else {
            format!(":{}", sp.name.port)
        };
        let protocol = match sp.name.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        };
        let family = match sp.family {
            IpFamily::IPv4 => "v4",
            IpFamily::IPv6 => "v6",
        };
        let prefix = format!(
            "{}/{}{port} {protocol} {family}",
            sp.name.namespace, sp.name.name
        );
        for fe in &sp.frontends {
            let kind = match fe.kind {
                FrontendKind::ClusterIp => "ClusterIP",
                FrontendKind::NodePort => "NodePort",
                FrontendKind::ExternalIp => "ExternalIP",
                FrontendKind::LoadBalancer => "LoadBalancer",
            };
            let mut line = format!(
                "{prefix} {kind} {} pod={} node={} other={}",
                SocketAddr::new(fe.addr, fe.port),
                action_text(fe.actions.pod),
                action_text(fe.actions.node),
                action_text(fe.actions.other)
            );
            if !fe.source_ranges.is_empty() {
                let ranges: Vec<String> =
                    fe.source_ranges.iter().map(ToString::to_string).collect();
                line = format!("{line} ranges={}", ranges.join(","));
            }
            lines.push(line);
        }
        lines.push(format!(
            "{prefix} internal={} external={} cluster={}",
            endpoints_text(&sp.internal_endpoints),
            endpoints_text(&sp.external_endpoints),
            endpoints_text(&sp.cluster_endpoints)
        ));
        if !sp.draining_endpoints.is_empty() {
            lines.push(format!(
                "{prefix} draining={}",
                endpoints_text(&sp.draining_endpoints)
            ));
        }
        if let Some(seconds) = sp.affinity_timeout_seconds {
            lines.push(format!("{prefix} affinity={seconds}s"));
        }
        if let Some(port) = sp.health_check_node_port {
            lines.push(format!("{prefix} healthCheckNodePort={port}"));
        }
    }
    let ips: Vec<String> = state
        .address_rules
        .cluster_ips
        .iter()
        .map(IpAddr::to_string)
        .collect();
    lines.push(format!("clusterIPs={}", ips.join(",")));
    for diagnostic in &state.diagnostics {
        lines.push(format!(
            "diag {}: {}",
            diagnostic.object, diagnostic.message
        ));
    }
    lines
}

struct Case {
    name: &'static str,
    config: fn(&mut ModelConfig),
    objects: Vec<Value>,
    /// Lines that must be in the summary.
    expect: Vec<&'static str>,
    /// Prefixes no summary line may start with.
    absent: Vec<&'static str>,
}

fn unchanged(_: &mut ModelConfig) {}

fn run(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in cases {
        let mut config = base_config();
        (case.config)(&mut config);
        let snapshot = snapshot(&case.objects);
        let state = compute(&snapshot, &config);
        // The incremental model gives the same answer, computed or remembered.
        let mut cache = ModelCache::default();
        if cache.compute(&snapshot, &config) != state || cache.compute(&snapshot, &config) != state
        {
            failures.push(format!("[{}] ModelCache differs from compute", case.name));
        }
        let lines = summary(&state);
        for expected in &case.expect {
            if !lines.iter().any(|line| line == expected) {
                failures.push(format!(
                    "[{}] missing line:\n  {expected}\nsummary:\n  {}",
                    case.name,
                    lines.join("\n  ")
                ));
            }
        }
        for prefix in &case.absent {
            if let Some(line) = lines.iter().find(|line| line.starts_with(prefix)) {
                failures.push(format!("[{}] unexpected line: {line}", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn service_types_and_skip_rules() {
    run(vec![
        Case {
            name: "ClusterIP: pods forward unmasqueraded, node and others masqueraded (ClusterCIDR detector)",
            config: unchanged,
            objects: vec![
                svc(
                    "web",
                    json!({"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                                  "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}),
                ),
                slice(
                    "web-1",
                    "web",
                    "IPv4",
                    http_port(),
                    json!([ready("10.244.1.5", NODE), ready("10.244.2.5", "node-b")]),
                ),
            ],
            expect: vec![
                "default/web TCP v4 ClusterIP 10.96.0.10:80 pod=fwd(policy) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/web TCP v4 internal=10.244.1.5:8080,10.244.2.5:8080 external=10.244.1.5:8080,10.244.2.5:8080 cluster=10.244.1.5:8080,10.244.2.5:8080",
                "clusterIPs=10.96.0.10",
            ],
            absent: vec!["default/web TCP v4 NodePort", "default/web TCP v6", "diag"],
        },
        Case {
            name: "NodePort: on the primary node IP only (nftables default), always masqueraded under Cluster policy",
            config: unchanged,
            objects: vec![
                svc(
                    "np",
                    json!({"type": "NodePort", "clusterIP": "10.96.0.11",
                                 "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}]}),
                ),
                slice(
                    "np-1",
                    "np",
                    "IPv4",
                    http_port(),
                    json!([ready("10.244.2.5", "node-b")]),
                ),
            ],
            expect: vec![
                "default/np TCP v4 ClusterIP 10.96.0.11:80 pod=fwd(policy) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/np TCP v4 NodePort 192.168.0.10:30080 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
            ],
            absent: vec![
                "default/np TCP v4 NodePort 172.17.0.1",
                "default/np TCP v4 NodePort 127.0.0.1",
            ],
        },
        Case {
            name: "NodePort with --nodeport-addresses 0.0.0.0/0: every non-loopback node address",
            config: |config| {
                config.nodeport_addresses = NodePortAddresses {
                    primary: false,
                    cidrs: vec!["0.0.0.0/0".parse().unwrap()],
                };
            },
            objects: vec![
                svc(
                    "np",
                    json!({"type": "NodePort", "clusterIP": "10.96.0.11",
                                 "ports": [{"port": 80, "nodePort": 30080}]}),
                ),
                slice(
                    "np-1",
                    "np",
                    "IPv4",
                    http_port(),
                    json!([ready("10.244.2.5", "node-b")]),
                ),
            ],
            expect: vec![
                "default/np TCP v4 NodePort 172.17.0.1:30080 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/np TCP v4 NodePort 192.168.0.10:30080 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
            ],
            absent: vec!["default/np TCP v4 NodePort 127.0.0.1"],
        },
        Case {
            name: "LoadBalancer: VIP ingress IPs are frontends, ipMode Proxy and hostname-only ingress are not",
            config: unchanged,
            objects: vec![
                with_status(
                    svc(
                        "lb",
                        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.12",
                                     "ports": [{"port": 443, "nodePort": 31443}]}),
                    ),
                    json!({"loadBalancer": {"ingress": [
                        {"ip": "203.0.113.7", "ipMode": "VIP"},
                        {"ip": "203.0.113.8", "ipMode": "Proxy"},
                        {"ip": "203.0.113.9"},
                        {"hostname": "lb.example.com"}]}}),
                ),
                slice(
                    "lb-1",
                    "lb",
                    "IPv4",
                    http_port(),
                    json!([ready("10.244.2.5", "node-b")]),
                ),
            ],
            expect: vec![
                "default/lb TCP v4 LoadBalancer 203.0.113.7:443 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/lb TCP v4 LoadBalancer 203.0.113.9:443 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/lb TCP v4 NodePort 192.168.0.10:31443 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
            ],
            absent: vec!["default/lb TCP v4 LoadBalancer 203.0.113.8", "diag"],
        },
        Case {
            name: "externalIPs: external frontends on the service port; other-family externalIPs ignored",
            config: unchanged,
            objects: vec![
                svc(
                    "ext",
                    json!({"type": "ClusterIP", "clusterIP": "10.96.0.13",
                                  "externalIPs": ["198.51.100.1", "2001:db8::1"],
                                  "ports": [{"port": 80}]}),
                ),
                slice(
                    "ext-1",
                    "ext",
                    "IPv4",
                    http_port(),
                    json!([ready("10.244.2.5", "node-b")]),
                ),
            ],
            expect: vec![
                "default/ext TCP v4 ExternalIP 198.51.100.1:80 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
            ],
            absent: vec![
                "default/ext TCP v4 ExternalIP [2001:db8::1]",
                "default/ext TCP v6",
            ],
        },
        Case {
            name: "skip rules: ExternalName, headless (clusterIP None) and empty clusterIP produce nothing",
            config: unchanged,
            objects: vec![
                svc(
                    "name",
                    json!({"type": "ExternalName", "externalName": "example.com",
                                   "ports": [{"port": 80}]}),
                ),
                svc(
                    "headless",
                    json!({"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 80}]}),
                ),
                svc("empty", json!({"clusterIP": "", "ports": [{"port": 80}]})),
                slice(
                    "headless-1",
                    "headless",
                    "IPv4",
                    http_port(),
                    json!([ready("10.244.2.5", "node-b")]),
                ),
            ],
            expect: vec!["clusterIPs="],
            absent: vec!["default/", "diag"],
        },
        Case {
            name: "SCTP and UDP ports are service ports of their own protocol",
            config: unchanged,
            objects: vec![
                svc(
                    "multi",
                    json!({"clusterIP": "10.96.0.14", "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "sig", "port": 3868, "protocol": "SCTP"}]}),
                ),
                slice(
                    "multi-1",
                    "multi",
                    "IPv4",
                    json!([{"name": "dns", "port": 5353, "protocol": "UDP"},
                             {"name": "sig", "port": 3868, "protocol": "SCTP"}]),
                    json!([ready("10.244.2.5", "node-b")]),
                ),
            ],
            expect: vec![
                "default/multi:dns UDP v4 ClusterIP 10.96.0.14:53 pod=fwd(policy) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/multi:dns UDP v4 internal=10.244.2.5:5353 external=10.244.2.5:5353 cluster=10.244.2.5:5353",
                "default/multi:sig SCTP v4 ClusterIP 10.96.0.14:3868 pod=fwd(policy) node=fwd(policy,masq) other=fwd(policy,masq)",
            ],
            absent: vec!["diag"],
        },
        Case {
            name: "SCTP is translated like TCP whatever the ports: ClusterIP and NodePort to another targetPort",
            config: unchanged,
            objects: vec![
                svc(
                    "sig",
                    json!({"type": "NodePort", "clusterIP": "10.96.0.15", "ports": [
                    {"name": "sig", "port": 3868, "targetPort": 3869, "nodePort": 30868, "protocol": "SCTP"}]}),
                ),
                slice(
                    "sig-1",
                    "sig",
                    "IPv4",
                    json!([{"name": "sig", "port": 3869, "protocol": "SCTP"}]),
                    json!([ready("10.244.2.5", "node-b")]),
                ),
            ],
            expect: vec![
                "default/sig:sig SCTP v4 ClusterIP 10.96.0.15:3868 pod=fwd(policy) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/sig:sig SCTP v4 NodePort 192.168.0.10:30868 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/sig:sig SCTP v4 internal=10.244.2.5:3869 external=10.244.2.5:3869 cluster=10.244.2.5:3869",
            ],
            absent: vec!["diag", "reject"],
        },
        Case {
            name: "invalid values are diagnostics naming the object; the rest is still planned",
            config: unchanged,
            objects: vec![
                svc(
                    "bad",
                    json!({"clusterIP": "10.96.0.15", "externalIPs": ["not-an-ip"],
                                  "ports": [{"port": 80}, {"name": "weird", "port": 81, "protocol": "ICMP"}]}),
                ),
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": "orphan", "namespace": "default"},
                       "addressType": "IPv4", "endpoints": []}),
                slice(
                    "bad-1",
                    "bad",
                    "IPv4",
                    http_port(),
                    json!([{"addresses": ["10.244.2.500"]}, ready("10.244.2.5", "node-b")]),
                ),
            ],
            expect: vec![
                "default/bad TCP v4 internal=10.244.2.5:8080 external=10.244.2.5:8080 cluster=10.244.2.5:8080",
                "diag Service default/bad: invalid externalIP \"not-an-ip\" ignored",
                "diag Service default/bad: port \"weird\": unsupported protocol \"ICMP\"; port skipped",
                "diag EndpointSlice default/orphan: has no kubernetes.io/service-name label; ignored",
                "diag EndpointSlice default/bad-1: invalid endpoint address \"10.244.2.500\" ignored",
            ],
            absent: vec!["default/bad:weird", "default/bad TCP v4 ExternalIP"],
        },
    ]);
}

#[test]
fn endpoints_ports_and_conditions() {
    run(vec![
        Case {
            name: "multi-port: each service port takes the slice port of its name (named targetPorts already resolved)",
            config: unchanged,
            objects: vec![
                svc(
                    "app",
                    json!({"clusterIP": "10.96.0.20", "ports": [
                    {"name": "http", "port": 80, "targetPort": "web"},
                    {"name": "metrics", "port": 9090, "targetPort": "prom"}]}),
                ),
                slice(
                    "app-1",
                    "app",
                    "IPv4",
                    json!([{"name": "http", "port": 8080, "protocol": "TCP"},
                             {"name": "metrics", "port": 9100, "protocol": "TCP"},
                             {"name": "http", "port": 8081, "protocol": "UDP"}]),
                    json!([ready("10.244.1.5", NODE)]),
                ),
                slice(
                    "app-2",
                    "app",
                    "IPv4",
                    json!([{"name": "http", "port": 8088, "protocol": "TCP"}]),
                    json!([ready("10.244.2.6", "node-b")]),
                ),
            ],
            expect: vec![
                "default/app:http TCP v4 internal=10.244.1.5:8080,10.244.2.6:8088 external=10.244.1.5:8080,10.244.2.6:8088 cluster=10.244.1.5:8080,10.244.2.6:8088",
                "default/app:metrics TCP v4 internal=10.244.1.5:9100 external=10.244.1.5:9100 cluster=10.244.1.5:9100",
            ],
            absent: vec!["default/app:http UDP"],
        },
        Case {
            name: "the same address in two slices is one endpoint; a non-terminating copy wins in either order",
            config: unchanged,
            objects: vec![
                svc(
                    "dup",
                    json!({"clusterIP": "10.96.0.21", "internalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
                ),
                slice(
                    "dup-1",
                    "dup",
                    "IPv4",
                    http_port(),
                    json!([terminating("10.244.1.5", "node-b", true)]),
                ),
                slice(
                    "dup-2",
                    "dup",
                    "IPv4",
                    http_port(),
                    json!([ready("10.244.1.5", NODE)]),
                ),
                svc(
                    "dup-rev",
                    json!({"clusterIP": "10.96.0.22", "internalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
                ),
                slice(
                    "dup-rev-1",
                    "dup-rev",
                    "IPv4",
                    http_port(),
                    json!([ready("10.244.1.5", NODE)]),
                ),
                slice(
                    "dup-rev-2",
                    "dup-rev",
                    "IPv4",
                    http_port(),
                    json!([terminating("10.244.1.5", "node-b", true)]),
                ),
            ],
            expect: vec![
                "default/dup TCP v4 internal=10.244.1.5:8080 external=- cluster=-",
                "default/dup-rev TCP v4 internal=10.244.1.5:8080 external=- cluster=-",
            ],
            absent: vec![],
        },
        Case {
            name: "only addresses of the slice's addressType are used",
            config: unchanged,
            objects: vec![
                svc(
                    "mixed",
                    json!({"clusterIP": "10.96.0.23", "ports": [{"port": 80}, {"name": "b", "port": 81}]}),
                ),
                slice(
                    "mixed-1",
                    "mixed",
                    "IPv4",
                    json!([{"name": "", "port": 8080}, {"name": "b", "port": 8081}]),
                    json!([ready("10.244.1.5", NODE), ready("fd10::5", NODE)]),
                ),
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": "mixed-fqdn", "namespace": "default",
                                    "labels": {"kubernetes.io/service-name": "mixed"}},
                       "addressType": "FQDN", "ports": [{"name": "", "port": 8080}],
                       "endpoints": [{"addresses": ["example.com"]}]}),
            ],
            expect: vec![
                "default/mixed TCP v4 internal=10.244.1.5:8080 external=10.244.1.5:8080 cluster=10.244.1.5:8080",
                "diag EndpointSlice default/mixed-1: endpoint address \"fd10::5\" is not of addressType IPv4; ignored",
            ],
            absent: vec![
                "default/mixed TCP v6",
                "diag EndpointSlice default/mixed-fqdn",
            ],
        },
        Case {
            name: "unset conditions mean ready; not-ready non-terminating endpoints are never used",
            config: unchanged,
            objects: vec![
                svc(
                    "cond",
                    json!({"clusterIP": "10.96.0.22", "ports": [{"port": 80}]}),
                ),
                slice(
                    "cond-1",
                    "cond",
                    "IPv4",
                    http_port(),
                    json!([
                    {"addresses": ["10.244.2.1"], "nodeName": "node-b"},
                    {"addresses": ["10.244.2.2"], "nodeName": "node-b", "conditions": {"ready": false}},
                    terminating("10.244.2.3", "node-b", true)]),
                ),
            ],
            expect: vec![
                "default/cond TCP v4 internal=10.244.2.1:8080 external=10.244.2.1:8080 cluster=10.244.2.1:8080",
            ],
            absent: vec![],
        },
        Case {
            name: "Cluster policy falls back to serving+terminating endpoints when none is ready",
            config: unchanged,
            objects: vec![
                svc(
                    "term",
                    json!({"clusterIP": "10.96.0.23", "ports": [{"port": 80}]}),
                ),
                slice(
                    "term-1",
                    "term",
                    "IPv4",
                    http_port(),
                    json!([
                    terminating("10.244.2.1", "node-b", true),
                    terminating("10.244.2.2", "node-b", false),
                    {"addresses": ["10.244.2.3"], "nodeName": "node-b", "conditions": {"ready": false}}]),
                ),
            ],
            expect: vec![
                "default/term TCP v4 ClusterIP 10.96.0.23:80 pod=fwd(policy) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/term TCP v4 internal=10.244.2.1:8080 external=10.244.2.1:8080 cluster=10.244.2.1:8080",
            ],
            absent: vec![],
        },
        Case {
            name: "endpoints out of every set whose flows kube-proxy keeps are draining: no new flows, backends kept",
            config: unchanged,
            objects: vec![
                svc(
                    "drain",
                    json!({"clusterIP": "10.96.0.24", "ports": [{"port": 80}]}),
                ),
                slice(
                    "drain-1",
                    "drain",
                    "IPv4",
                    http_port(),
                    json!([
                        ready("10.244.2.1", "node-b"),
                        terminating("10.244.2.2", "node-b", true),
                        terminating("10.244.2.3", "node-b", false)
                    ]),
                ),
                svc(
                    "drain-udp",
                    json!({"clusterIP": "10.96.0.25", "ports": [{"port": 80, "protocol": "UDP"}]}),
                ),
                slice(
                    "drain-udp-1",
                    "drain-udp",
                    "IPv4",
                    json!([{"name": "", "port": 8080, "protocol": "UDP"}]),
                    json!([
                        ready("10.244.2.1", "node-b"),
                        terminating("10.244.2.2", "node-b", true),
                        terminating("10.244.2.3", "node-b", false)
                    ]),
                ),
            ],
            expect: vec![
                "default/drain TCP v4 internal=10.244.2.1:8080 external=10.244.2.1:8080 cluster=10.244.2.1:8080",
                // TCP flows outlive serving too; UDP flows to a non-serving endpoint are cleaned.
                "default/drain TCP v4 draining=10.244.2.2:8080,10.244.2.3:8080",
                "default/drain-udp UDP v4 draining=10.244.2.2:8080",
            ],
            absent: vec![],
        },
        Case {
            name: "internalTrafficPolicy Local uses local ready endpoints, else local serving+terminating ones",
            config: unchanged,
            objects: vec![
                svc(
                    "itp",
                    json!({"clusterIP": "10.96.0.24", "internalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
                ),
                slice(
                    "itp-1",
                    "itp",
                    "IPv4",
                    http_port(),
                    json!([
                        terminating("10.244.1.1", NODE, true),
                        ready("10.244.2.2", "node-b")
                    ]),
                ),
                svc(
                    "itp-ready",
                    json!({"clusterIP": "10.96.0.25", "internalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
                ),
                slice(
                    "itp-ready-1",
                    "itp-ready",
                    "IPv4",
                    http_port(),
                    json!([
                        terminating("10.244.1.1", NODE, true),
                        ready("10.244.1.2", NODE),
                        ready("10.244.2.2", "node-b")
                    ]),
                ),
            ],
            expect: vec![
                "default/itp TCP v4 ClusterIP 10.96.0.24:80 pod=fwd(policy) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/itp TCP v4 internal=10.244.1.1:8080 external=- cluster=-",
                "default/itp-ready TCP v4 internal=10.244.1.2:8080 external=- cluster=-",
            ],
            absent: vec![],
        },
        Case {
            name: "externalTrafficPolicy Local: local terminating fallback for outsiders, cluster set (ready, remote) for pods and the node",
            config: unchanged,
            objects: vec![
                svc(
                    "etp",
                    json!({"type": "NodePort", "clusterIP": "10.96.0.26", "externalTrafficPolicy": "Local",
                                  "ports": [{"port": 80, "nodePort": 30026}]}),
                ),
                slice(
                    "etp-1",
                    "etp",
                    "IPv4",
                    http_port(),
                    json!([
                        terminating("10.244.1.1", NODE, true),
                        ready("10.244.2.2", "node-b")
                    ]),
                ),
            ],
            expect: vec![
                "default/etp TCP v4 NodePort 192.168.0.10:30026 pod=fwd(cluster) node=fwd(cluster,masq) other=fwd(policy)",
                "default/etp TCP v4 ClusterIP 10.96.0.26:80 pod=fwd(policy) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/etp TCP v4 internal=10.244.2.2:8080 external=10.244.1.1:8080 cluster=10.244.2.2:8080",
            ],
            absent: vec![],
        },
    ]);
}

#[test]
fn topology_hints() {
    let hinted = |zone_a: &str, zone_b: &str| {
        json!([
            {"addresses": ["10.244.1.1"], "nodeName": "node-x", "conditions": {"ready": true},
             "hints": {"forZones": [{"name": zone_a}]}},
            {"addresses": ["10.244.2.2"], "nodeName": "node-y", "conditions": {"ready": true},
             "hints": {"forZones": [{"name": zone_b}]}}])
    };
    run(vec![
        Case {
            name: "zone hints: only endpoints hinted for the node's zone (zone-a)",
            config: unchanged,
            objects: vec![
                svc(
                    "topo",
                    json!({"clusterIP": "10.96.0.30", "trafficDistribution": "PreferSameZone", "ports": [{"port": 80}]}),
                ),
                slice(
                    "topo-1",
                    "topo",
                    "IPv4",
                    http_port(),
                    hinted("zone-a", "zone-b"),
                ),
            ],
            expect: vec![
                "default/topo TCP v4 internal=10.244.1.1:8080 external=10.244.1.1:8080 cluster=10.244.1.1:8080",
            ],
            absent: vec![],
        },
        Case {
            name: "zone hints naming no endpoint for this zone are ignored: every endpoint",
            config: |config| config.zone = Some("zone-c".to_owned()),
            objects: vec![
                svc(
                    "topo",
                    json!({"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}),
                ),
                slice(
                    "topo-1",
                    "topo",
                    "IPv4",
                    http_port(),
                    hinted("zone-a", "zone-b"),
                ),
            ],
            expect: vec![
                "default/topo TCP v4 internal=10.244.1.1:8080,10.244.2.2:8080 external=10.244.1.1:8080,10.244.2.2:8080 cluster=10.244.1.1:8080,10.244.2.2:8080",
            ],
            absent: vec![],
        },
        Case {
            name: "a node without a zone label ignores zone hints",
            config: |config| config.zone = None,
            objects: vec![
                svc(
                    "topo",
                    json!({"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}),
                ),
                slice(
                    "topo-1",
                    "topo",
                    "IPv4",
                    http_port(),
                    hinted("zone-a", "zone-b"),
                ),
            ],
            expect: vec![
                "default/topo TCP v4 internal=10.244.1.1:8080,10.244.2.2:8080 external=10.244.1.1:8080,10.244.2.2:8080 cluster=10.244.1.1:8080,10.244.2.2:8080",
            ],
            absent: vec![],
        },
        Case {
            name: "one ready endpoint without a zone hint disables zone hints",
            config: unchanged,
            objects: vec![
                svc(
                    "topo",
                    json!({"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}),
                ),
                slice(
                    "topo-1",
                    "topo",
                    "IPv4",
                    http_port(),
                    json!([
                    {"addresses": ["10.244.1.1"], "nodeName": "node-x", "hints": {"forZones": [{"name": "zone-a"}]}},
                    {"addresses": ["10.244.2.2"], "nodeName": "node-y"}]),
                ),
            ],
            expect: vec![
                "default/topo TCP v4 internal=10.244.1.1:8080,10.244.2.2:8080 external=10.244.1.1:8080,10.244.2.2:8080 cluster=10.244.1.1:8080,10.244.2.2:8080",
            ],
            absent: vec![],
        },
        Case {
            name: "node hints (PreferSameNode) win over zone hints when one names this node",
            config: unchanged,
            objects: vec![
                svc(
                    "near",
                    json!({"clusterIP": "10.96.0.31", "trafficDistribution": "PreferSameNode", "ports": [{"port": 80}]}),
                ),
                slice(
                    "near-1",
                    "near",
                    "IPv4",
                    http_port(),
                    json!([
                    {"addresses": ["10.244.1.1"], "nodeName": NODE,
                     "hints": {"forNodes": [{"name": NODE}], "forZones": [{"name": "zone-a"}]}},
                    {"addresses": ["10.244.1.2"], "nodeName": "node-x",
                     "hints": {"forNodes": [{"name": "node-x"}], "forZones": [{"name": "zone-a"}]}}]),
                ),
            ],
            expect: vec![
                "default/near TCP v4 internal=10.244.1.1:8080 external=10.244.1.1:8080 cluster=10.244.1.1:8080",
            ],
            absent: vec![],
        },
        Case {
            name: "node hints for other nodes only fall back to zone hints",
            config: unchanged,
            objects: vec![
                svc(
                    "near",
                    json!({"clusterIP": "10.96.0.31", "ports": [{"port": 80}]}),
                ),
                slice(
                    "near-1",
                    "near",
                    "IPv4",
                    http_port(),
                    json!([
                    {"addresses": ["10.244.1.1"], "nodeName": "node-x",
                     "hints": {"forNodes": [{"name": "node-x"}], "forZones": [{"name": "zone-a"}]}},
                    {"addresses": ["10.244.2.2"], "nodeName": "node-y",
                     "hints": {"forNodes": [{"name": "node-y"}], "forZones": [{"name": "zone-b"}]}}]),
                ),
            ],
            expect: vec![
                "default/near TCP v4 internal=10.244.1.1:8080 external=10.244.1.1:8080 cluster=10.244.1.1:8080",
            ],
            absent: vec![],
        },
        Case {
            name: "hints never apply to the terminating fallback",
            config: unchanged,
            objects: vec![
                svc(
                    "topo",
                    json!({"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}),
                ),
                slice(
                    "topo-1",
                    "topo",
                    "IPv4",
                    http_port(),
                    json!([
                    {"addresses": ["10.244.1.1"], "nodeName": "node-x", "hints": {"forZones": [{"name": "zone-b"}]},
                     "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": ["10.244.2.2"], "nodeName": "node-y", "hints": {"forZones": [{"name": "zone-a"}]},
                     "conditions": {"ready": false, "serving": true, "terminating": true}}]),
                ),
            ],
            expect: vec![
                "default/topo TCP v4 internal=10.244.1.1:8080,10.244.2.2:8080 external=10.244.1.1:8080,10.244.2.2:8080 cluster=10.244.1.1:8080,10.244.2.2:8080",
            ],
            absent: vec![],
        },
    ]);
}

#[test]
fn affinity_source_ranges_and_health_check() {
    let lb = |ranges: Value| {
        with_status(
            svc(
                "lb",
                json!({"type": "LoadBalancer", "clusterIP": "10.96.0.40",
                             "loadBalancerSourceRanges": ranges,
                             "ports": [{"port": 443, "nodePort": 31040}]}),
            ),
            json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.40"}]}}),
        )
    };
    let lb_slice = || {
        slice(
            "lb-1",
            "lb",
            "IPv4",
            http_port(),
            json!([ready("10.244.2.5", "node-b")]),
        )
    };
    run(vec![
        Case {
            name: "ClientIP affinity with an explicit timeout, and with the API default of 10800s",
            config: unchanged,
            objects: vec![
                svc(
                    "sticky",
                    json!({"clusterIP": "10.96.0.41", "sessionAffinity": "ClientIP",
                                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
                                     "ports": [{"port": 80}]}),
                ),
                svc(
                    "sticky-default",
                    json!({"clusterIP": "10.96.0.42", "sessionAffinity": "ClientIP",
                                             "ports": [{"port": 80}]}),
                ),
                svc(
                    "loose",
                    json!({"clusterIP": "10.96.0.43", "sessionAffinity": "None", "ports": [{"port": 80}]}),
                ),
            ],
            expect: vec![
                "default/sticky TCP v4 affinity=600s",
                "default/sticky-default TCP v4 affinity=10800s",
            ],
            absent: vec!["default/loose TCP v4 affinity"],
        },
        Case {
            name: "source ranges apply to LoadBalancer IPs only (not NodePort, not ClusterIP); other-family ranges ignored",
            config: unchanged,
            objects: vec![
                lb(json!([
                    "198.51.100.0/24",
                    " 203.0.113.128/25 ",
                    "2001:db8::/64"
                ])),
                lb_slice(),
            ],
            expect: vec![
                "default/lb TCP v4 LoadBalancer 203.0.113.40:443 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq) ranges=198.51.100.0/24,203.0.113.128/25",
                "default/lb TCP v4 NodePort 192.168.0.10:31040 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/lb TCP v4 ClusterIP 10.96.0.40:443 pod=fwd(policy) node=fwd(policy,masq) other=fwd(policy,masq)",
            ],
            absent: vec![],
        },
        Case {
            name: "a range holding the node IP also admits the LB IPs themselves (allowFromNode)",
            config: unchanged,
            objects: vec![lb(json!(["192.168.0.0/16"])), lb_slice()],
            expect: vec![
                "default/lb TCP v4 LoadBalancer 203.0.113.40:443 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq) ranges=192.168.0.0/16,203.0.113.40/32",
            ],
            absent: vec![],
        },
        Case {
            name: "healthCheckNodePort only for LoadBalancer with externalTrafficPolicy Local",
            config: unchanged,
            objects: vec![
                with_status(
                    svc(
                        "hc",
                        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.44",
                                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 32044,
                                     "ports": [{"port": 80, "nodePort": 30044}]}),
                    ),
                    json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.44"}]}}),
                ),
                svc(
                    "np-local",
                    json!({"type": "NodePort", "clusterIP": "10.96.0.45",
                                       "externalTrafficPolicy": "Local", "healthCheckNodePort": 32045,
                                       "ports": [{"port": 80, "nodePort": 30045}]}),
                ),
            ],
            expect: vec!["default/hc TCP v4 healthCheckNodePort=32044"],
            absent: vec!["default/np-local TCP v4 healthCheckNodePort"],
        },
    ]);
}

#[test]
fn masquerade_reject_and_drop() {
    let etp_local = || {
        with_status(
            svc(
                "loc",
                json!({"type": "LoadBalancer", "clusterIP": "10.96.0.50",
                              "externalTrafficPolicy": "Local", "healthCheckNodePort": 32050,
                              "externalIPs": ["198.51.100.50"],
                              "ports": [{"port": 80, "nodePort": 30050}]}),
            ),
            json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.50"}]}}),
        )
    };
    let local_and_remote = || {
        slice(
            "loc-1",
            "loc",
            "IPv4",
            http_port(),
            json!([ready("10.244.1.1", NODE), ready("10.244.2.2", "node-b")]),
        )
    };
    let remote_only = || {
        slice(
            "loc-1",
            "loc",
            "IPv4",
            http_port(),
            json!([ready("10.244.2.2", "node-b")]),
        )
    };
    let plain = || {
        svc(
            "plain",
            json!({"type": "NodePort", "clusterIP": "10.96.0.51",
                                       "ports": [{"port": 80, "nodePort": 30051}]}),
        )
    };
    let plain_slice = || {
        slice(
            "plain-1",
            "plain",
            "IPv4",
            http_port(),
            json!([ready("10.244.2.2", "node-b")]),
        )
    };
    run(vec![
        Case {
            name: "eTP Local: pods short-circuit to the cluster set unmasqueraded, the node to the cluster set masqueraded, others to local endpoints unmasqueraded",
            config: unchanged,
            objects: vec![etp_local(), local_and_remote()],
            expect: vec![
                "default/loc TCP v4 NodePort 192.168.0.10:30050 pod=fwd(cluster) node=fwd(cluster,masq) other=fwd(policy)",
                "default/loc TCP v4 ExternalIP 198.51.100.50:80 pod=fwd(cluster) node=fwd(cluster,masq) other=fwd(policy)",
                "default/loc TCP v4 LoadBalancer 203.0.113.50:80 pod=fwd(cluster) node=fwd(cluster,masq) other=fwd(policy)",
                "default/loc TCP v4 internal=10.244.1.1:8080,10.244.2.2:8080 external=10.244.1.1:8080 cluster=10.244.1.1:8080,10.244.2.2:8080",
                "default/loc TCP v4 healthCheckNodePort=32050",
            ],
            absent: vec![],
        },
        Case {
            name: "externalTrafficPolicy Local also applies to a ClusterIP Service's externalIPs",
            config: unchanged,
            objects: vec![
                svc(
                    "ext-local",
                    json!({"type": "ClusterIP", "clusterIP": "10.96.0.53",
                                        "externalTrafficPolicy": "Local", "externalIPs": ["198.51.100.53"],
                                        "ports": [{"port": 80}]}),
                ),
                slice(
                    "ext-local-1",
                    "ext-local",
                    "IPv4",
                    http_port(),
                    json!([ready("10.244.1.1", NODE), ready("10.244.2.2", "node-b")]),
                ),
            ],
            expect: vec![
                "default/ext-local TCP v4 ExternalIP 198.51.100.53:80 pod=fwd(cluster) node=fwd(cluster,masq) other=fwd(policy)",
                "default/ext-local TCP v4 internal=10.244.1.1:8080,10.244.2.2:8080 external=10.244.1.1:8080 cluster=10.244.1.1:8080,10.244.2.2:8080",
            ],
            absent: vec!["default/ext-local TCP v4 healthCheckNodePort"],
        },
        Case {
            name: "masqueradeAll: every ClusterIP flow is masqueraded; eTP Local outsiders still keep their source",
            config: |config| config.masquerade_all = true,
            objects: vec![etp_local(), local_and_remote(), plain(), plain_slice()],
            expect: vec![
                "default/loc TCP v4 ClusterIP 10.96.0.50:80 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/loc TCP v4 NodePort 192.168.0.10:30050 pod=fwd(cluster) node=fwd(cluster,masq) other=fwd(policy)",
                "default/plain TCP v4 NodePort 192.168.0.10:30051 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
            ],
            absent: vec![],
        },
        Case {
            name: "no local detector: nothing masqueraded at ClusterIPs, pods are outsiders for eTP Local",
            config: |config| config.local_traffic_detector = LocalTrafficDetector::None,
            objects: vec![etp_local(), local_and_remote(), plain(), plain_slice()],
            expect: vec![
                "default/loc TCP v4 ClusterIP 10.96.0.50:80 pod=fwd(policy) node=fwd(policy) other=fwd(policy)",
                "default/loc TCP v4 LoadBalancer 203.0.113.50:80 pod=fwd(policy) node=fwd(cluster,masq) other=fwd(policy)",
                "default/plain TCP v4 NodePort 192.168.0.10:30051 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
            ],
            absent: vec![],
        },
        Case {
            name: "a ClusterCIDR detector without a CIDR of the family is no detector for that family",
            config: |config| {
                config.local_traffic_detector = LocalTrafficDetector::SourceCidrs {
                    cidrs: vec!["fd10::/64".parse().unwrap()],
                };
            },
            objects: vec![plain(), plain_slice()],
            expect: vec![
                "default/plain TCP v4 ClusterIP 10.96.0.51:80 pod=fwd(policy) node=fwd(policy) other=fwd(policy)",
            ],
            absent: vec![],
        },
        Case {
            name: "no endpoints at all: every frontend rejects",
            config: unchanged,
            objects: vec![
                etp_local(),
                slice(
                    "loc-1",
                    "loc",
                    "IPv4",
                    http_port(),
                    json!([{"addresses": ["10.244.2.2"], "nodeName": "node-b", "conditions": {"ready": false}}]),
                ),
                plain(),
            ],
            expect: vec![
                "default/loc TCP v4 ClusterIP 10.96.0.50:80 pod=reject node=reject other=reject",
                "default/loc TCP v4 NodePort 192.168.0.10:30050 pod=reject node=reject other=reject",
                "default/loc TCP v4 ExternalIP 198.51.100.50:80 pod=reject node=reject other=reject",
                "default/loc TCP v4 LoadBalancer 203.0.113.50:80 pod=reject node=reject other=reject",
                "default/loc TCP v4 internal=- external=- cluster=-",
                "default/plain TCP v4 ClusterIP 10.96.0.51:80 pod=reject node=reject other=reject",
                "default/plain TCP v4 NodePort 192.168.0.10:30051 pod=reject node=reject other=reject",
            ],
            absent: vec![],
        },
        Case {
            name: "eTP Local without local endpoints: outsiders dropped, pods and the node still reach the cluster set",
            config: unchanged,
            objects: vec![etp_local(), remote_only()],
            expect: vec![
                "default/loc TCP v4 NodePort 192.168.0.10:30050 pod=fwd(cluster) node=fwd(cluster,masq) other=drop",
                "default/loc TCP v4 LoadBalancer 203.0.113.50:80 pod=fwd(cluster) node=fwd(cluster,masq) other=drop",
                "default/loc TCP v4 ClusterIP 10.96.0.50:80 pod=fwd(policy) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/loc TCP v4 internal=10.244.2.2:8080 external=- cluster=10.244.2.2:8080",
            ],
            absent: vec![],
        },
        Case {
            name: "iTP Local without local endpoints: the ClusterIP drops; NodePort (eTP Cluster) still forwards",
            config: unchanged,
            objects: vec![
                svc(
                    "itp",
                    json!({"type": "NodePort", "clusterIP": "10.96.0.52", "internalTrafficPolicy": "Local",
                                  "ports": [{"port": 80, "nodePort": 30052}]}),
                ),
                slice(
                    "itp-1",
                    "itp",
                    "IPv4",
                    http_port(),
                    json!([ready("10.244.2.2", "node-b")]),
                ),
            ],
            expect: vec![
                "default/itp TCP v4 ClusterIP 10.96.0.52:80 pod=drop node=drop other=drop",
                "default/itp TCP v4 NodePort 192.168.0.10:30052 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/itp TCP v4 internal=- external=10.244.2.2:8080 cluster=10.244.2.2:8080",
            ],
            absent: vec![],
        },
    ]);
}

#[test]
fn conflicting_frontends() {
    run(vec![
        Case {
            name: "an externalIP:port that is another Service's ClusterIP:port stays with the first Service by name, and a ClusterIP always wins",
            config: unchanged,
            objects: vec![
                svc(
                    "z-dns",
                    json!({"clusterIP": "10.96.0.70", "ports": [{"port": 53, "protocol": "UDP"}]}),
                ),
                svc(
                    "a-thief",
                    json!({"clusterIP": "10.96.0.71", "externalIPs": ["10.96.0.70"],
                                   "ports": [{"port": 53, "protocol": "UDP"}, {"name": "tcp", "port": 53}]}),
                ),
            ],
            expect: vec![
                "default/z-dns UDP v4 ClusterIP 10.96.0.70:53 pod=reject node=reject other=reject",
                "default/a-thief:tcp TCP v4 ExternalIP 10.96.0.70:53 pod=reject node=reject other=reject",
                "diag Service default/a-thief: externalIP frontend 10.96.0.70:53/UDP is already Service default/z-dns port \"\"; skipped",
            ],
            absent: vec!["default/a-thief UDP v4 ExternalIP"],
        },
        Case {
            name: "an externalIP on a node address and port wins over a NodePort there (kube-proxy's service-ips map comes before its nodeports chain)",
            config: unchanged,
            objects: vec![
                svc(
                    "a-np",
                    json!({"type": "NodePort", "clusterIP": "10.96.0.72",
                       "ports": [{"port": 80, "nodePort": 30080}]}),
                ),
                svc(
                    "z-ext",
                    json!({"clusterIP": "10.96.0.73", "externalIPs": ["192.168.0.10"],
                       "ports": [{"port": 30080}]}),
                ),
            ],
            expect: vec![
                "default/z-ext TCP v4 ExternalIP 192.168.0.10:30080 pod=reject node=reject other=reject",
                "diag Service default/a-np: NodePort frontend 192.168.0.10:30080/TCP is already Service default/z-ext port \"\"; skipped",
            ],
            absent: vec!["default/a-np TCP v4 NodePort 192.168.0.10:30080"],
        },
    ]);
}

#[test]
fn ipv6_and_dual_stack() {
    run(vec![
        Case {
            name: "dual-stack: one state per family, each with its own endpoints, NodePort address, ranges and LB IPs",
            config: unchanged,
            objects: vec![
                with_status(
                    svc(
                        "dual",
                        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.60",
                                       "clusterIPs": ["10.96.0.60", "fd96::60"],
                                       "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                                       "loadBalancerSourceRanges": ["198.51.100.0/24", "2001:db8:1::/48"],
                                       "ports": [{"port": 80, "nodePort": 30060}]}),
                    ),
                    json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.60"}, {"ip": "2001:db8:2::60"}]}}),
                ),
                slice(
                    "dual-v4",
                    "dual",
                    "IPv4",
                    http_port(),
                    json!([ready("10.244.1.1", NODE)]),
                ),
                slice(
                    "dual-v6",
                    "dual",
                    "IPv6",
                    http_port(),
                    json!([ready("fd10::1", NODE), ready("fd10::2", "node-b")]),
                ),
            ],
            expect: vec![
                "default/dual TCP v4 ClusterIP 10.96.0.60:80 pod=fwd(policy) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/dual TCP v4 internal=10.244.1.1:8080 external=10.244.1.1:8080 cluster=10.244.1.1:8080",
                "default/dual TCP v6 ClusterIP [fd96::60]:80 pod=fwd(policy) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/dual TCP v6 NodePort [fd00::10]:30060 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/dual TCP v6 LoadBalancer [2001:db8:2::60]:80 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq) ranges=2001:db8:1::/48",
                "default/dual TCP v4 LoadBalancer 203.0.113.60:80 pod=fwd(policy,masq) node=fwd(policy,masq) other=fwd(policy,masq) ranges=198.51.100.0/24",
                "default/dual TCP v6 internal=[fd10::1]:8080,[fd10::2]:8080 external=[fd10::1]:8080,[fd10::2]:8080 cluster=[fd10::1]:8080,[fd10::2]:8080",
                "clusterIPs=10.96.0.60,fd96::60",
            ],
            absent: vec![],
        },
        Case {
            name: "IPv6 single-stack: only a v6 state; IPv4 endpoints are not used",
            config: unchanged,
            objects: vec![
                svc(
                    "six",
                    json!({"clusterIP": "fd96::61", "clusterIPs": ["fd96::61"], "ports": [{"port": 80}]}),
                ),
                slice(
                    "six-1",
                    "six",
                    "IPv6",
                    http_port(),
                    json!([ready("fd10::1", "node-b")]),
                ),
                slice(
                    "six-2",
                    "six",
                    "IPv4",
                    http_port(),
                    json!([ready("10.244.1.1", "node-b")]),
                ),
            ],
            expect: vec![
                "default/six TCP v6 ClusterIP [fd96::61]:80 pod=fwd(policy) node=fwd(policy,masq) other=fwd(policy,masq)",
                "default/six TCP v6 internal=[fd10::1]:8080 external=[fd10::1]:8080 cluster=[fd10::1]:8080",
            ],
            absent: vec!["default/six TCP v4"],
        },
        Case {
            name: "a Service without ports has no service ports and no cluster-IP rule",
            config: unchanged,
            objects: vec![svc("portless", json!({"clusterIP": "10.96.0.62"}))],
            expect: vec!["clusterIPs="],
            absent: vec!["default/portless"],
        },
    ]);
}

#[test]
fn plan_renders_text_and_json() {
    let snapshot = snapshot(&[
        svc(
            "web",
            json!({"type": "NodePort", "clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
                          "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
        ),
        slice(
            "web-1",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            json!([
                ready("10.244.1.5", NODE),
                terminating("10.244.2.5", "node-b", true)
            ]),
        ),
        svc(
            "bad",
            json!({"clusterIP": "10.96.0.11", "externalIPs": ["nope"], "ports": [{"port": 80}]}),
        ),
        svc(
            "local",
            json!({"type": "NodePort", "clusterIP": "10.96.0.12", "externalTrafficPolicy": "Local",
                   "ports": [{"port": 80, "nodePort": 30012}]}),
        ),
        slice(
            "local-1",
            "local",
            "IPv4",
            http_port(),
            json!([ready("10.244.1.7", NODE), ready("10.244.2.7", "node-b")]),
        ),
    ]);
    let state = compute(&snapshot, &base_config());
    let text = render_text(&state);
    for expected in [
        "default/web:http TCP IPv4\n",
        "  internalTrafficPolicy Cluster, externalTrafficPolicy Cluster, sessionAffinity ClientIP 10800s\n",
        "    ClusterIP 10.96.0.10:80\n      from pods: forward to internal endpoints; from the node: forward to internal endpoints, masquerade; from elsewhere: forward to internal endpoints, masquerade\n",
        "    NodePort 192.168.0.10:30080\n      from anywhere: forward to external endpoints, masquerade\n",
        "  internal, external and cluster endpoints:\n    10.244.1.5:8080 (ready, local) on node node-a\n",
        "    ClusterIP 10.96.0.11:80\n      from anywhere: REJECT\n",
        "default/bad TCP IPv4\n",
        "    NodePort 192.168.0.10:30012\n      from pods: forward to cluster endpoints; from the node: forward to cluster endpoints, masquerade; from elsewhere: forward to external endpoints\n",
        "  internal (Cluster) endpoints:\n    10.244.1.7:8080 (ready, local) on node node-a\n    10.244.2.7:8080 (ready) on node node-b\n  external (Local) endpoints:\n    10.244.1.7:8080 (ready, local) on node node-a\n  cluster endpoints:\n",
        "  ClusterIPs (unknown ports rejected): 10.96.0.10, 10.96.0.11, 10.96.0.12\n",
        "diagnostics:\n  Service default/bad: invalid externalIP \"nope\" ignored\n",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert!(
        text.contains("  established connections only (draining) endpoints:\n    10.244.2.5:8080"),
        "a terminating endpoint beside a ready one is listed as draining:\n{text}"
    );
    assert_eq!(
        text.matches("10.244.2.5").count(),
        1,
        "a terminating endpoint must get no new connections while a ready one exists:\n{text}"
    );
    let json: Value = serde_json::to_value(&state).unwrap();
    assert_eq!(json["servicePorts"][2]["name"]["name"], "web");
    assert_eq!(json["servicePorts"][2]["frontends"][0]["kind"], "clusterIp");
    assert_eq!(
        json["servicePorts"][2]["frontends"][0]["actions"]["node"],
        json!({"action": "forward", "set": "policy", "masquerade": true})
    );
    assert_eq!(json["servicePorts"][2]["affinityTimeoutSeconds"], 10800);
    assert_eq!(json["diagnostics"][0]["object"], "Service default/bad");
}

/// The service ports of `state` that are the very ones of `earlier` (shared, not recomputed).
fn shared_ports(earlier: &DesiredState, state: &DesiredState) -> Vec<String> {
    state
        .service_ports
        .iter()
        .filter(|port| {
            earlier
                .service_ports
                .iter()
                .any(|old| std::sync::Arc::ptr_eq(old, port))
        })
        .map(|port| port.name.name.clone())
        .collect()
}

#[test]
fn the_model_cache_recomputes_only_the_services_whose_objects_changed() {
    let config = base_config();
    let dns = svc(
        "z-dns",
        json!({"clusterIP": "10.96.0.70", "ports": [{"port": 53, "protocol": "UDP"}]}),
    );
    let thief = svc(
        "a-thief",
        json!({"clusterIP": "10.96.0.71", "externalIPs": ["10.96.0.70"],
               "ports": [{"port": 53, "protocol": "UDP"}]}),
    );
    let web = svc(
        "web",
        json!({"clusterIP": "10.96.0.80", "ports": [{"port": 80}]}),
    );
    let web_slice = slice(
        "web-1",
        "web",
        "IPv4",
        json!([{"name": "", "port": 8080, "protocol": "TCP"}]),
        json!([ready("10.244.0.5", NODE)]),
    );
    let mut cache = ModelCache::default();
    let mut current = snapshot(&[dns.clone(), thief.clone(), web.clone(), web_slice.clone()]);
    let first = cache.compute(&current, &config);
    assert_eq!(first, compute(&current, &config));

    // A new EndpointSlice for web: only web is computed again.
    let web_slice_2 = slice(
        "web-2",
        "web",
        "IPv4",
        json!([{"name": "", "port": 8080, "protocol": "TCP"}]),
        json!([ready("10.244.0.6", NODE)]),
    );
    let added = snapshot(&[web_slice_2]);
    current.endpoint_slices.extend(added.endpoint_slices);
    let second = cache.compute(&current, &config);
    assert_eq!(second, compute(&current, &config));
    assert_eq!(shared_ports(&first, &second), ["z-dns"]);
    let port_of = |state: &DesiredState, service: &str| {
        state
            .service_ports
            .iter()
            .find(|port| port.name.name == service)
            .cloned()
    };
    assert_eq!(
        port_of(&second, "web").map(|port| port.cluster_endpoints.len()),
        Some(2)
    );

    // a-thief lost its externalIP to z-dns: the copy without that frontend is the state's,
    // the remembered one still has it, so when z-dns goes the frontend comes back.
    let thief_frontends =
        |state: &DesiredState| port_of(state, "a-thief").map(|port| port.frontends.len());
    assert_eq!(thief_frontends(&second), Some(1));
    current.services.remove(&key_of(&dns));
    let third = cache.compute(&current, &config);
    assert_eq!(third, compute(&current, &config));
    assert_eq!(thief_frontends(&third), Some(2));
    assert_eq!(shared_ports(&second, &third), ["web"]);

    // Another configuration computes everything again.
    let mut other = config.clone();
    other.masquerade_all = true;
    let fourth = cache.compute(&current, &other);
    assert_eq!(fourth, compute(&current, &other));
    assert!(shared_ports(&third, &fourth).is_empty());
}

#[test]
fn endpoint_slices_pair_with_their_service_whatever_their_names_and_orphans_are_named_in_order() {
    let bad = || json!([{"addresses": ["10.244.9.500"]}]);
    let objects = vec![
        svc(
            "b",
            json!({"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}),
        ),
        svc(
            "d",
            json!({"clusterIP": "10.96.0.12", "ports": [{"port": 80}]}),
        ),
        // Slice names sort apart from their Services' (a slice of b named after a, one of d
        // before b's), and orphans sort before, between and after the Services.
        slice(
            "a-of-b",
            "b",
            "IPv4",
            http_port(),
            json!([ready("10.244.1.1", "node-b")]),
        ),
        slice(
            "zz-b",
            "b",
            "IPv4",
            http_port(),
            json!([ready("10.244.1.2", "node-b")]),
        ),
        slice(
            "aa-of-d",
            "d",
            "IPv4",
            http_port(),
            json!([ready("10.244.1.3", "node-b")]),
        ),
        slice("e-1", "e", "IPv4", http_port(), bad()),
        slice("c-1", "c", "IPv4", http_port(), bad()),
        slice("a-1", "a", "IPv4", http_port(), bad()),
    ];
    let snapshot = snapshot(&objects);
    let state = compute(&snapshot, &base_config());
    let lines = summary(&state);
    for expected in [
        "default/b TCP v4 internal=10.244.1.1:8080,10.244.1.2:8080 external=10.244.1.1:8080,10.244.1.2:8080 cluster=10.244.1.1:8080,10.244.1.2:8080",
        "default/d TCP v4 internal=10.244.1.3:8080 external=10.244.1.3:8080 cluster=10.244.1.3:8080",
    ] {
        assert!(
            lines.iter().any(|l| l == expected),
            "{expected}\n{lines:#?}"
        );
    }
    let orphans: Vec<&str> = state
        .diagnostics
        .iter()
        .filter(|d| d.message.contains("10.244.9.500"))
        .map(|d| d.object.as_str())
        .collect();
    assert_eq!(
        orphans,
        [
            "EndpointSlice default/a-1",
            "EndpointSlice default/c-1",
            "EndpointSlice default/e-1"
        ]
    );
}
