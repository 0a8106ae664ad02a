//! `manifests/kube-ebpf-proxy.yaml` stays deployable: its RBAC grants what the API-server source
//! watches and the Events it records, the DaemonSet's command is one the binary accepts, its pod
//! is capabilities-not-privileged with kube-proxy's probes; and `manifests/kubeadm/`'s patch
//! turns kubeadm's own kube-proxy DaemonSet into the same pod.

use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::rbac::v1::ClusterRole;
use serde::Deserialize as _;

const BINARY: &str = env!("CARGO_BIN_EXE_kube-ebpf-proxy");
const MANIFEST: &str = include_str!("../../manifests/kube-ebpf-proxy.yaml");
const KUBEADM_PATCH: &str = include_str!("../../manifests/kubeadm/kube-proxy-patch.yaml");
/// kubeadm's kube-proxy DaemonSet as kubeadm renders it.
const KUBEADM_DAEMONSET: &str = include_str!("../testdata/kubeadm-daemonset.yaml");

fn documents(yaml: &str) -> Vec<serde_json::Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| serde_json::Value::deserialize(doc).expect("valid YAML"))
        .collect()
}

fn object<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let doc = documents(MANIFEST)
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("the manifest has a {kind}"));
    serde_json::from_value(doc).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// Whether a rule of `rules` grants `verb` on `group`/`resource`.
fn grants(
    rules: &[k8s_openapi::api::rbac::v1::PolicyRule],
    group: &str,
    resource: &str,
    verb: &str,
) -> bool {
    rules.iter().any(|r| {
        r.api_groups
            .as_ref()
            .is_some_and(|g| g.iter().any(|g| g == group))
            && r.resources
                .as_ref()
                .is_some_and(|rs| rs.iter().any(|r| r == resource))
            && r.verbs.iter().any(|v| v == verb)
    })
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
        assert!(
            grants(&rules, group, resource, "list") && grants(&rules, group, resource, "watch"),
            "list and watch of {group}/{resource}"
        );
    }
    // Events about objects the proxy cannot program, in both Event APIs.
    for group in ["", "events.k8s.io"] {
        for verb in ["create", "patch"] {
            assert!(
                grants(&rules, group, "events", verb),
                "{verb} of {group}/events"
            );
        }
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
    let probes = [
        (&container.liveness_probe, "/livez"),
        (&container.readiness_probe, "/healthz"),
    ];
    for (probe, path) in probes {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256),
            "probes use kube-proxy's healthz port"
        );
        assert_eq!(get.path.as_deref(), Some(path));
    }
}

#[test]
fn the_daemonset_is_capabilities_not_privileged_and_rolls_one_node_at_a_time() {
    let daemonset: DaemonSet = object("DaemonSet");
    let spec = daemonset.spec.expect("spec");
    let rolling = spec
        .update_strategy
        .and_then(|s| s.rolling_update)
        .expect("a rolling update");
    assert_eq!(
        rolling.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let pod = spec.template.spec.expect("pod spec");
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some(format!("kube-ebpf-proxy:{}", env!("CARGO_PKG_VERSION")).as_str()),
        "the image `cargo xtask image` names"
    );
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_ne!(security.privileged, Some(true));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    // Each one proven necessary and the three sufficient by kube_proxy_cli.rs.
    assert_eq!(
        capabilities.add.as_deref(),
        Some(
            &[
                "BPF".to_owned(),
                "NET_ADMIN".to_owned(),
                "PERFMON".to_owned()
            ][..]
        )
    );
    let volumes = pod.volumes.unwrap_or_default();
    for (mount, host) in [
        ("/sys/fs/bpf", "/sys/fs/bpf"),
        ("/sys/fs/cgroup", "/sys/fs/cgroup"),
    ] {
        let mounted = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == mount)
            .unwrap_or_else(|| panic!("{mount} is mounted"));
        let volume = volumes
            .iter()
            .find(|v| v.name == mounted.name)
            .expect("its volume");
        assert_eq!(
            volume.host_path.as_ref().map(|h| h.path.as_str()),
            Some(host),
            "{mount}"
        );
    }
}

#[test]
fn the_kubeadm_patch_makes_kubeadms_daemonset_ours() {
    let kubeadm: DaemonSet = serde_json::from_value(documents(KUBEADM_DAEMONSET).remove(0))
        .expect("kubeadm's DaemonSet");
    let kubeadm_pod = kubeadm.spec.expect("spec").template.spec.expect("pod");
    let patch = documents(KUBEADM_PATCH).remove(0);
    let patch_pod = &patch["spec"]["template"]["spec"];
    let patched = &patch_pod["containers"][0];
    // A strategic merge patch merges containers by name, volumes by name and mounts by path.
    assert_eq!(patched["name"], kubeadm_pod.containers[0].name.as_str());
    for volume in patch_pod["volumes"].as_array().expect("volumes") {
        assert!(
            kubeadm_pod
                .volumes
                .iter()
                .flatten()
                .all(|v| v.name != volume["name"].as_str().unwrap()),
            "{volume} would replace one of kubeadm's"
        );
    }
    // The patch gives kubeadm's pod exactly our DaemonSet's image, security and probes.
    let ours = documents(MANIFEST)
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("our DaemonSet");
    let our_pod = &ours["spec"]["template"]["spec"];
    let our_container = &our_pod["containers"][0];
    for field in ["image", "securityContext"] {
        assert_eq!(patched[field], our_container[field], "{field}");
    }
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            patched[probe]["httpGet"], our_container[probe]["httpGet"],
            "{probe}"
        );
    }
    assert_eq!(patch_pod["volumes"], our_pod["volumes"]);
    assert_eq!(patched["volumeMounts"], our_container["volumeMounts"]);
    assert_eq!(
        patch["spec"]["updateStrategy"],
        ours["spec"]["updateStrategy"]
    );
    // kubeadm's command runs the image's /usr/local/bin/kube-proxy: our binary under that name.
    let dir = tempfile::tempdir().unwrap();
    let kube_proxy = dir.path().join("kube-proxy");
    std::os::unix::fs::symlink(BINARY, &kube_proxy).unwrap();
    let command = kubeadm_pod.containers[0]
        .command
        .as_ref()
        .expect("a command");
    assert_eq!(command[0], "/usr/local/bin/kube-proxy");
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| a.replace("$(NODE_NAME)", "node-1"))
        .collect();
    let out = Command::new(&kube_proxy)
        .args(&args)
        .arg("--help")
        .output()
        .expect("runs");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("kube-proxy"),
        "kube-proxy {args:?}: {out:?}"
    );
}
