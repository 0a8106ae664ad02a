//! `kube-ebpf-proxy run --metrics-bind-address`: the real binary serves kube-proxy's metrics
//! port inside a namespace this test creates, and its sync metrics follow manifest changes.

use std::path::Path;
use std::time::Duration;

use proxy_common::{Backend, ServiceKey, ServiceValue};
use proxy_lab::{Cgroup, ManifestsDir, Netns, PinDir, Proxy, run, unique_name, veth};
use proxy_userspace::dataplane::Maps;

const BINARY: &str = env!("CARGO_BIN_EXE_kube-ebpf-proxy");
const METRICS: &str = "127.0.0.1:10249";

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

fn endpoint_slice(addresses: &[&str]) -> String {
    annotated_endpoint_slice(addresses, "")
}

/// The EndpointSlice with `metadata` lines added (e.g. annotations).
fn annotated_endpoint_slice(addresses: &[&str], metadata: &str) -> String {
    let endpoints = addresses
        .iter()
        .map(|a| format!("- addresses: [\"{a}\"]\n  conditions: {{ready: true}}\n"))
        .collect::<Vec<_>>()
        .concat();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels:
    kubernetes.io/service-name: web
{metadata}addressType: IPv4
endpoints:
{endpoints}ports:
- name: http
  port: 8080
  protocol: TCP
"
    )
}

/// GET `path` from the metrics address inside `ns` (curl there: loopback is per namespace).
fn get(ns: &Netns, path: &str) -> String {
    run(ns
        .command("curl")
        .args(["--silent", "--fail", "--max-time", "5"])
        .arg(format!("http://{METRICS}{path}")))
    .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn sample<'a>(body: &'a str, series: &str) -> &'a str {
    let prefix = format!("{series} ");
    body.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{body}"))
}

/// Scrapes until `series` reads `want` (the proxy syncs a moment after the file changes). A
/// sync records its metrics after programming the maps, so wait on a sync metric before
/// reading the map gauges.
fn wait_for_sample(ns: &Netns, series: &str, want: &str) -> String {
    let mut body = String::new();
    for _ in 0..100 {
        body = get(ns, "/metrics");
        if body
            .lines()
            .any(|l| l.strip_prefix(series) == Some(&format!(" {want}")))
        {
            return body;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{series} never read {want}:\n{body}");
}

/// A node namespace with one veth to a peer (the proxy needs an interface to attach to).
fn node_namespace() -> (Netns, Netns) {
    let node = Netns::new("n").unwrap();
    let peer = Netns::new("p").unwrap();
    let (node_if, peer_if) = (unique_name("a"), unique_name("b"));
    veth(
        &node,
        &node_if,
        &["192.0.2.1/24"],
        &peer,
        &peer_if,
        &["192.0.2.2/24"],
    )
    .unwrap();
    (node, peer)
}

/// The proxy in `node` on the `manifests` folder, serving metrics, with `extra` flags; the
/// cgroup lives as long as the proxy.
fn start_proxy(
    node: &Netns,
    pins: &PinDir,
    manifests: &ManifestsDir,
    extra: &[&str],
) -> (Proxy, Cgroup) {
    let cgroup = Cgroup::new().unwrap();
    let mut args = vec![
        "--cgroup-path",
        cgroup.path().to_str().unwrap(),
        "--manifests",
        manifests.path().to_str().unwrap(),
        "--hostname-override",
        "node",
        "--metrics-bind-address",
        METRICS,
    ];
    args.extend_from_slice(extra);
    let proxy = Proxy::start(Path::new(BINARY), node, pins, &args).unwrap();
    (proxy, cgroup)
}

#[test]
fn run_serves_kube_proxy_metrics_that_follow_syncs() {
    let (node, _peer) = node_namespace();
    let pins = PinDir::new();
    let manifests = ManifestsDir::new().unwrap();
    manifests.write("web.yaml", SERVICE).unwrap();
    manifests
        .write("web-slice.yaml", &endpoint_slice(&["10.1.0.5"]))
        .unwrap();
    let _proxy = start_proxy(&node, &pins, &manifests, &[]);

    assert_eq!(get(&node, "/proxyMode"), "ebpf");
    // kube-proxy's /configz: the resolved configuration under the config API group.
    let configz: serde_json::Value = serde_json::from_str(&get(&node, "/configz")).unwrap();
    let config = &configz["kubeproxy.config.k8s.io"];
    assert_eq!(config["HostnameOverride"], "node");
    assert_eq!(config["MetricsBindAddress"], METRICS);
    assert_eq!(config["HealthzBindAddress"], "0.0.0.0:10256");
    assert_eq!(config["SyncPeriod"], "30s");
    assert_eq!(config["Mode"], "");
    assert_eq!(get(&node, "/healthz"), "ok");
    let body = wait_for_sample(
        &node,
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "1",
    );
    assert_eq!(sample(&body, "kube_ebpf_proxy_frontends"), "1");
    assert_eq!(sample(&body, "kube_ebpf_proxy_backends"), "1");
    // The probed kernel features: every one reported, 0 or 1; what every supported kernel
    // (≥ 6.1) has is 1.
    for feature in [
        "tcx",
        "sock_addr_set_retval",
        "bpf_loop",
        "redirect_peer",
        "redirect_neigh",
        "map_batch_ops",
        "ring_buffer",
    ] {
        let value = sample(
            &body,
            &format!("kube_ebpf_proxy_kernel_feature{{feature=\"{feature}\"}}"),
        );
        let expected: &[&str] = if feature == "tcx" {
            &["0", "1"]
        } else {
            &["1"]
        };
        assert!(expected.contains(&value), "{feature}: {value}");
    }
    assert_eq!(
        sample(&body, "kubeproxy_sync_proxy_rules_service_changes_total"),
        "1"
    );
    let syncs: u64 = sample(
        &body,
        "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
    )
    .parse()
    .unwrap();
    assert!(syncs >= 1, "{body}");
    let synced: f64 = sample(
        &body,
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
    )
    .parse()
    .unwrap();
    assert!(synced > 0.0, "{body}");

    // A second endpoint: one more endpoint change, no service change.
    manifests
        .write("web-slice.yaml", &endpoint_slice(&["10.1.0.5", "10.1.0.6"]))
        .unwrap();
    let body = wait_for_sample(
        &node,
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "2",
    );
    assert_eq!(sample(&body, "kube_ebpf_proxy_backends"), "2");
    assert_eq!(
        sample(&body, "kubeproxy_sync_proxy_rules_service_changes_total"),
        "1"
    );
}

/// The service and backend entries of the pinned maps.
type Held = (Vec<(ServiceKey, ServiceValue)>, Vec<(u32, Backend)>);

/// Polls the pinned maps until `done` holds (bounded), returning what they hold.
fn wait_for_maps(
    pins: &PinDir,
    what: &str,
    done: impl Fn(&[(ServiceKey, ServiceValue)], &[(u32, Backend)]) -> bool,
) -> Held {
    let mut held = (Vec::new(), Vec::new());
    for _ in 0..100 {
        let maps = Maps::open(pins.path()).unwrap();
        held = (
            maps.service_entries().unwrap(),
            maps.backend_entries().unwrap(),
        );
        if done(&held.0, &held.1) {
            return held;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: the maps hold {held:?}");
}

#[test]
fn sync_period_repairs_map_drift_and_trigger_times_give_network_programming_latency() {
    let (node, _peer) = node_namespace();
    let pins = PinDir::new();
    let manifests = ManifestsDir::new().unwrap();
    manifests.write("web.yaml", SERVICE).unwrap();
    let _proxy = start_proxy(&node, &pins, &manifests, &["--iptables-sync-period", "1s"]);
    // The EndpointSlice controller stamps the change that triggered the slice; this one
    // happened just now, after the proxy started.
    let trigger = format!(
        "  annotations:\n    endpoints.kubernetes.io/last-change-trigger-time: \"{}\"\n",
        jiff::Timestamp::now()
    );
    manifests
        .write(
            "web-slice.yaml",
            &annotated_endpoint_slice(&["10.1.0.5", "10.1.0.6"], &trigger),
        )
        .unwrap();
    let body = wait_for_sample(
        &node,
        "kubeproxy_network_programming_duration_seconds_count",
        "1",
    );
    // Programmed within seconds of the trigger (the +Inf bucket aside, 300 s is the last).
    assert_eq!(
        sample(
            &body,
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"5.0\"}"
        ),
        "1",
        "{body}"
    );
    let (services, backends) = wait_for_maps(&pins, "two slots programmed", |s, _| {
        s.iter().filter(|(k, _)| k.slot != 0).count() == 2
    });
    // Behind the proxy's back: a slot deleted, a backend's port changed.
    let mut maps = Maps::open(pins.path()).unwrap();
    let slot = services.iter().find(|(k, _)| k.slot == 2).unwrap().0;
    maps.delete_service_entry(&slot).unwrap();
    let (id, backend) = backends[0];
    maps.upsert_backend(
        id,
        &Backend {
            port: 9999u16.to_be(),
            ..backend
        },
    )
    .unwrap();
    // The next full resync (every second) restores both.
    let mut want_services = services.clone();
    want_services.sort_by_key(|(k, _)| (k.slot, k.scope));
    let mut want_backends = backends.clone();
    want_backends.sort_by_key(|(id, _)| *id);
    wait_for_maps(&pins, "the drift repaired", |s, b| {
        let mut s = s.to_vec();
        s.sort_by_key(|(k, _)| (k.slot, k.scope));
        let mut b = b.to_vec();
        b.sort_by_key(|(id, _)| *id);
        s == want_services && b == want_backends
    });
}
