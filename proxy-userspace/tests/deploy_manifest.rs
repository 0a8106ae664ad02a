//! `manifests/kube-ebpf-proxy.yaml` stays deployable: its RBAC grants what the API-server source
//! watches, and the DaemonSet's command is one the binary accepts.

use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::rbac::v1::ClusterRole;
use serde::Deserialize as _;

const BINARY: &str = env!("CARGO_BIN_EXE_kube-ebpf-proxy");
const MANIFEST: &str = include_str!("../../manifests/kube-ebpf-proxy.yaml");

fn documents() -> Vec<serde_json::Value> {
    serde_norway::Deserializer::from_str(MANIFEST)
        .map(|doc| serde_json::Value::deserialize(doc).expect("valid YAML"))
        .collect()
}

fn object<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let doc = documents()
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("the manifest has a {kind}"));
    serde_json::from_value(doc).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

#[test]
fn rbac_grants_list_and_watch_of_what_the_source_watches() {
    let role: ClusterRole = object("ClusterRole");
    let rules = role.rules.unwrap_or_default();
    // (API group, resource) pairs of source::kube's reflectors.
    for (group, resource) in [
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "nodes"),
        ("networking.k8s.io", "servicecidrs"),
    ] {
        let granted = |verb: &str| {
            rules.iter().any(|r| {
                r.api_groups
                    .as_ref()
                    .is_some_and(|g| g.iter().any(|g| g == group))
                    && r.resources
                        .as_ref()
                        .is_some_and(|rs| rs.iter().any(|r| r == resource))
                    && r.verbs.iter().any(|v| v == verb)
            })
        };
        assert!(
            granted("list") && granted("watch"),
            "list and watch of {group}/{resource}"
        );
    }
}

#[test]
fn the_daemonset_command_is_accepted_by_the_binary() {
    let daemonset: DaemonSet = object("DaemonSet");
    let pod = daemonset
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    assert_eq!(
        pod.host_network,
        Some(true),
        "the proxy programs the node's own namespace"
    );
    let container = &pod.containers[0];
    let command = container.command.as_ref().expect("a command");
    assert!(command[0].ends_with("kube-ebpf-proxy"));
    // clap rejects an unknown flag before it reaches --help, so this fails on any flag the
    // binary does not know. $(NODE_NAME) is expanded by the kubelet; any value parses.
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| a.replace("$(NODE_NAME)", "node-1"))
        .collect();
    let out = Command::new(BINARY)
        .args(&args)
        .arg("--help")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "kube-ebpf-proxy {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let probes = [&container.liveness_probe, &container.readiness_probe];
    for probe in probes.into_iter().flatten() {
        let port = &probe.http_get.as_ref().expect("an HTTP probe").port;
        assert_eq!(
            *port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256),
            "probes use kube-proxy's healthz port"
        );
    }
}
