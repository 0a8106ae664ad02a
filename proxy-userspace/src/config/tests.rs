use std::path::Path;

use clap::Parser;
use k8s_openapi::api::core::v1::Node;
use serde_json::json;

use super::file::{FileConfig, parse_file};
use super::*;
use crate::model::LocalTrafficDetector;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    flags: ProxyFlags,
}

fn flags(args: &[&str]) -> ProxyFlags {
    Cli::try_parse_from(std::iter::once("kube-ebpf-proxy").chain(args.iter().copied()))
        .unwrap()
        .flags
}

fn file(text: &str) -> Result<(FileConfig, Vec<String>), ConfigError> {
    parse_file(Path::new("/etc/kube-proxy/config.yaml"), text)
}

fn resolve(args: &[&str], text: &str) -> ProxyConfig {
    let (file, _) = file(text).unwrap();
    flags(args).merge(file, || "Host-1".to_owned()).unwrap()
}

const FILE: &str = "
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
hostnameOverride: node-from-file
clusterCIDR: 10.244.0.0/16,fd10::/64
nodePortAddresses: [\"192.168.0.0/16\"]
detectLocalMode: InterfaceNamePrefix
detectLocal:
  interfaceNamePrefix: veth
healthzBindAddress: 0.0.0.0:20256
metricsBindAddress: 127.0.0.1:20249
configSyncPeriod: 1h30m
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
nftables:
  masqueradeAll: true
  syncPeriod: 45s
  minSyncPeriod: 500ms
";

#[test]
fn file_settings_are_read() {
    let config = resolve(&[], FILE);
    assert_eq!(config.hostname, "node-from-file");
    assert_eq!(
        config.cluster_cidrs,
        vec![
            "10.244.0.0/16".parse::<IpNet>().unwrap(),
            "fd10::/64".parse().unwrap()
        ]
    );
    assert_eq!(
        config.nodeport_addresses,
        NodePortAddresses {
            primary: false,
            cidrs: vec!["192.168.0.0/16".parse().unwrap()]
        }
    );
    assert!(config.masquerade_all);
    assert_eq!(
        config.detect_local_mode,
        DetectLocalMode::InterfaceNamePrefix
    );
    assert_eq!(config.pod_interface_name_prefix, "veth");
    assert_eq!(
        config.healthz_bind_address,
        Some("0.0.0.0:20256".parse().unwrap())
    );
    assert_eq!(
        config.metrics_bind_address,
        Some("127.0.0.1:20249".parse().unwrap())
    );
    assert_eq!(config.config_sync_period, Duration::from_mins(90));
    assert_eq!(config.sync_period, Duration::from_secs(45));
    assert_eq!(config.min_sync_period, Duration::from_millis(500));
    assert_eq!(
        config.kubeconfig,
        Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
    );
}

#[test]
fn defaults_without_file_or_flags() {
    let config = flags(&[])
        .merge(FileConfig::default(), || "Host-1\n".to_owned())
        .unwrap();
    assert_eq!(
        config.hostname, "host-1",
        "system host name, trimmed and lowercased"
    );
    assert_eq!(config.nodeport_addresses, NodePortAddresses::primary());
    assert!(!config.masquerade_all);
    assert_eq!(config.detect_local_mode, DetectLocalMode::ClusterCIDR);
    assert_eq!(
        config.healthz_bind_address,
        Some("0.0.0.0:10256".parse().unwrap())
    );
    assert_eq!(
        config.metrics_bind_address,
        Some("127.0.0.1:10249".parse().unwrap())
    );
    assert_eq!(config.config_sync_period, Duration::from_mins(15));
    assert_eq!(config.sync_period, Duration::from_secs(30));
    assert_eq!(config.service_cluster_ip_range, None);
    assert_eq!(
        config.manifest_settings().service_cidrs,
        vec!["10.96.0.0/12".parse::<IpNet>().unwrap()],
        "the manifests source allocates from the API server's default"
    );
    assert!(
        config.model_config(None, &[]).service_cidrs.is_empty(),
        "the default range is not dropped"
    );
    assert_eq!(
        config.service_node_port_range,
        PortRange {
            first: 30000,
            last: 32767
        }
    );
}

#[test]
fn flags_override_the_file() {
    let config = resolve(
        &[
            "--hostname-override=node-from-flag",
            "--cluster-cidr=10.100.0.0/16",
            "--nodeport-addresses=all",
            "--masquerade-all=false",
            "--detect-local-mode=BridgeInterface",
            "--pod-bridge-interface=cbr0",
            "--healthz-bind-address=127.0.0.1:30256",
            "--metrics-bind-address=",
            "--kubeconfig=/root/.kube/config",
            "--config-sync-period=10m",
            "--service-cluster-ip-range=10.0.0.0/16,fd96::/108",
            "--service-node-port-range=20000-20999",
            "--manifests=/srv/manifests",
        ],
        FILE,
    );
    assert_eq!(config.hostname, "node-from-flag");
    assert_eq!(
        config.cluster_cidrs,
        vec!["10.100.0.0/16".parse::<IpNet>().unwrap()]
    );
    assert_eq!(
        config.nodeport_addresses.cidrs,
        vec![
            "0.0.0.0/0".parse::<IpNet>().unwrap(),
            "::/0".parse().unwrap()
        ]
    );
    assert!(!config.nodeport_addresses.primary);
    assert!(
        !config.masquerade_all,
        "--masquerade-all=false beats the file's true"
    );
    assert_eq!(config.detect_local_mode, DetectLocalMode::BridgeInterface);
    assert_eq!(config.pod_bridge_interface, "cbr0");
    assert_eq!(
        config.healthz_bind_address,
        Some("127.0.0.1:30256".parse().unwrap())
    );
    assert_eq!(config.metrics_bind_address, None, "empty disables metrics");
    assert_eq!(config.kubeconfig, Some(PathBuf::from("/root/.kube/config")));
    assert_eq!(config.config_sync_period, Duration::from_mins(10));
    assert_eq!(
        config.service_cluster_ip_range.as_ref().map(Vec::len),
        Some(2)
    );
    assert_eq!(
        config.model_config(None, &[]).service_cidrs.len(),
        2,
        "an explicit range is dropped"
    );
    assert_eq!(
        config.service_node_port_range,
        PortRange {
            first: 20000,
            last: 20999
        }
    );
    assert_eq!(config.manifests, Some(PathBuf::from("/srv/manifests")));
    assert!(flags(&["--masquerade-all"]).masquerade_all == Some(true));
}

#[test]
fn unknown_fields_are_errors_naming_the_field() {
    for (text, field) in [
        (
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nclusterCidr: 10.0.0.0/8\n",
            "clusterCidr",
        ),
        ("nftables:\n  masqueradeAl: true\n", "masqueradeAl"),
        ("detectLocal:\n  bridge: cbr0\n", "bridge"),
    ] {
        let error = file(text).unwrap_err().to_string();
        assert!(
            error.contains(&format!("unknown field `{field}`"))
                && error.contains("/etc/kube-proxy/config.yaml"),
            "{error}"
        );
    }
}

#[test]
fn wrong_api_version_or_kind_is_an_error() {
    let error = file("apiVersion: kubeproxy.config.k8s.io/v1alpha2\n").unwrap_err();
    assert!(error.to_string().contains("v1alpha2"), "{error}");
    let error = file("kind: KubeletConfiguration\n").unwrap_err();
    assert!(
        error.to_string().contains("KubeletConfiguration"),
        "{error}"
    );
}

#[test]
fn conntrack_timeouts_come_from_the_file_then_the_flags_with_kube_proxy_defaults() {
    let defaults = resolve(&[], "conntrack:\n  maxPerCore: null\n  min: null\n");
    assert_eq!(defaults.conntrack, ConntrackTimeouts::default());
    assert_eq!(defaults.conntrack.tcp_established, Duration::from_hours(24));
    let text = "conntrack:\n  tcpEstablishedTimeout: 2h0m0s\n  tcpCloseWaitTimeout: 0s\n  udpTimeout: 10s\n  udpStreamTimeout: 3m\n";
    let config = resolve(&[], text);
    assert_eq!(
        config.conntrack,
        ConntrackTimeouts {
            tcp_established: Duration::from_hours(2),
            tcp_close_wait: Duration::ZERO,
            udp: Duration::from_secs(10),
            udp_stream: Duration::from_mins(3),
        }
    );
    let config = resolve(
        &[
            "--conntrack-tcp-timeout-established=30m",
            "--conntrack-udp-timeout=5s",
        ],
        text,
    );
    assert_eq!(config.conntrack.tcp_established, Duration::from_mins(30));
    assert_eq!(config.conntrack.udp, Duration::from_secs(5));
    assert_eq!(config.conntrack.udp_stream, Duration::from_mins(3));
    let (bad, _) = file("conntrack:\n  udpTimeout: soon\n").unwrap();
    let error = flags(&[]).merge(bad, || "h".to_owned()).unwrap_err();
    assert!(
        error.to_string().contains("conntrack.udpTimeout"),
        "{error}"
    );
    assert!(
        file("conntrack:\n  udpTimeOut: 1s\n").is_err(),
        "typos name the field"
    );
}

#[test]
fn unsupported_fields_are_warnings() {
    let (_, warnings) = file(
        "mode: ipvs\nipvs:\n  scheduler: rr\nconntrack:\n  maxPerCore: 32768\nfeatureGates:\n  Foo: true\niptables:\n  masqueradeBit: 14\n",
    )
    .unwrap();
    let joined = warnings.join("\n");
    for field in [
        "ipvs",
        "conntrack.maxPerCore/conntrack.min",
        "featureGates",
        "iptables.masqueradeBit",
    ] {
        assert!(
            joined.contains(&format!(": {field} is not supported yet")),
            "{field}: {joined}"
        );
    }
    // FILE's only unsupported setting: its configSyncPeriod, accepted and named as ignored.
    let (_, resync) = file(FILE).unwrap();
    assert_eq!(resync.len(), 1, "{resync:?}");
    assert!(
        resync[0].contains(
            "configSyncPeriod is accepted but ignored: kube-rs watchers have no informer resync"
        ),
        "{resync:?}"
    );
    let (_, warnings) = flags(&["--config-sync-period=10m"]).resolve().unwrap();
    assert_eq!(
        warnings,
        [format!(
            "--config-sync-period=10m0s is accepted for kube-proxy compatibility but ignored: {}",
            ignored::CONFIG_SYNC_PERIOD
        )]
    );
}

/// kubeadm's `config.conf` (its kube-proxy ConfigMap): every field, zero values included.
const KUBEADM_CONFIG: &str = include_str!("../../testdata/kubeadm-config.conf");

#[test]
fn kubeadm_config_gets_kube_proxy_defaults() {
    let (file, warnings) = file(KUBEADM_CONFIG).unwrap();
    let config = flags(&["--hostname-override=Node-1"])
        .merge(file, String::new)
        .unwrap();
    assert_eq!(config.hostname, "node-1");
    assert_eq!(
        config.healthz_bind_address,
        Some("0.0.0.0:10256".parse().unwrap()),
        "\"\" is kube-proxy's default"
    );
    assert_eq!(
        config.metrics_bind_address,
        Some("127.0.0.1:10249".parse().unwrap())
    );
    assert_eq!(config.config_sync_period, Duration::from_mins(15), "0s");
    assert_eq!(config.sync_period, Duration::from_secs(30));
    assert_eq!(config.min_sync_period, Duration::from_secs(1));
    assert_eq!(config.bind_address, None, "0.0.0.0 leaves it to the Node");
    assert_eq!(config.nodeport_addresses, NodePortAddresses::primary());
    assert_eq!(config.mode, "");
    assert_eq!(
        config.kubeconfig,
        Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    assert!(
        warnings[0].ends_with("mode \"\": kube-ebpf-proxy programs its eBPF dataplane instead (no iptables, ipvs or nftables rules)"),
        "{warnings:?}"
    );
}

#[test]
fn configz_is_the_resolved_configuration_in_kube_proxys_form() {
    let config = resolve(&["--proxy-mode=nftables"], FILE);
    let configz = config.configz();
    let c = &configz[CONFIGZ_GROUP];
    assert_eq!(c["HostnameOverride"], "node-from-file");
    assert_eq!(c["Mode"], "nftables");
    assert_eq!(
        c["DetectLocal"]["ClusterCIDRs"],
        json!(["10.244.0.0/16", "fd10::/64"])
    );
    assert_eq!(c["DetectLocalMode"], "InterfaceNamePrefix");
    assert_eq!(c["DetectLocal"]["InterfaceNamePrefix"], "veth");
    let mut node_port_addresses: Vec<String> = Vec::new();
    if config.nodeport_addresses.primary {
        node_port_addresses.push("primary".to_owned());
    }
    node_port_addresses.push("192.168.0.0/16".to_owned());
    assert_eq!(c["NodePortAddresses"], json!(node_port_addresses));
    assert_eq!(c["HealthzBindAddress"], "0.0.0.0:20256");
    assert_eq!(c["MetricsBindAddress"], "127.0.0.1:20249");
    assert_eq!(c["Linux"]["MasqueradeAll"], true);
    assert_eq!(c["SyncPeriod"], "45s");
    assert_eq!(c["MinSyncPeriod"], "500ms");
    assert_eq!(c["ConfigSyncPeriod"], "1h30m0s");
    assert_eq!(
        c["ClientConnection"]["Kubeconfig"],
        "/var/lib/kube-proxy/kubeconfig.conf"
    );
    assert_eq!(c["BindAddress"], "0.0.0.0");
}

#[test]
fn kube_proxy_modes_are_accepted_with_a_note() {
    for mode in ["\"\"", "iptables", "ipvs", "nftables"] {
        let (file, warnings) = file(&format!("mode: {mode}\n")).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("kube-ebpf-proxy programs its eBPF dataplane instead"),
            "{warnings:?}"
        );
        let config = flags(&[]).merge(file, String::new).unwrap();
        assert_eq!(config.mode, mode.trim_matches('"'));
    }
    let error = file("mode: kernelspace\n").unwrap_err();
    assert!(
        error.to_string().starts_with("mode: \"kernelspace\""),
        "{error}"
    );
    let error = flags(&["--proxy-mode=userspace"])
        .merge(FileConfig::default(), String::new)
        .unwrap_err();
    assert!(error.to_string().contains("userspace"), "{error}");
    let config = resolve(&["--proxy-mode=ipvs"], "mode: iptables\n");
    assert_eq!(config.mode, "ipvs", "the flag wins");
}

#[test]
fn kube_proxy_flags_of_kubeadm_and_kops() {
    // kops' nodeup flags (sorted, as it writes them) and kube-proxy's klog flags.
    let config = resolve(
        &[
            "--bind-address=198.51.100.7",
            "--cluster-cidr=100.96.0.0/11",
            "--conntrack-max-per-core=131072",
            "--hostname-override=ip-172-20-1-1.ec2.internal",
            "--kubeconfig=/var/lib/kube-proxy/kubeconfig",
            "--master=https://api.internal.example.com",
            "--oom-score-adj=-998",
            "--proxy-mode=iptables",
            "--iptables-sync-period=45s",
            "--iptables-min-sync-period=2s",
            "--v=2",
            "--logtostderr=false",
            "--alsologtostderr",
            "--log-file=/var/log/kube-proxy.log",
        ],
        "",
    );
    assert_eq!(config.bind_address, Some("198.51.100.7".parse().unwrap()));
    assert_eq!(config.hostname, "ip-172-20-1-1.ec2.internal");
    assert_eq!(
        config.master.as_deref(),
        Some("https://api.internal.example.com")
    );
    assert_eq!(config.mode, "iptables");
    assert_eq!(config.sync_period, Duration::from_secs(45));
    assert_eq!(config.min_sync_period, Duration::from_secs(2));
    let parsed = flags(&["--oom-score-adj=-998", "--v=2", "--proxy-mode=ipvs"]);
    let warnings = parsed.resolve().unwrap().1;
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    for flag in ["--proxy-mode", "--oom-score-adj=-998", "--v=2"] {
        assert!(
            warnings.iter().any(|w| w.starts_with(flag)),
            "{flag}: {warnings:?}"
        );
    }
}

#[test]
fn invalid_values_name_the_setting() {
    let error = flags(&["--cluster-cidr=10.0.0.0/8,10.1.0.0/16"])
        .merge(FileConfig::default(), String::new)
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "clusterCIDR: at most one CIDR per IP family, got \"10.0.0.0/8,10.1.0.0/16\""
    );
    let error = flags(&["--detect-local-mode=InterfaceNamePrefix"])
        .merge(FileConfig::default(), String::new)
        .unwrap_err();
    assert!(
        error.to_string().contains("--pod-interface-name-prefix"),
        "{error}"
    );
    let error = flags(&["--nodeport-addresses=10.0.0.0/8,bogus"])
        .merge(FileConfig::default(), String::new)
        .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("nodePortAddresses: \"bogus\""),
        "{error}"
    );
    let error = flags(&["--nodeport-addresses=primary,10.0.0.0/8"])
        .merge(FileConfig::default(), String::new)
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("can't use both 'primary' and CIDRs"),
        "{error}"
    );
}

#[test]
fn help_documents_every_flag() {
    use clap::CommandFactory;
    let mut command = Cli::command();
    command.clone().debug_assert();
    let help = command.render_long_help().to_string();
    for flag in [
        "--config <FILE>",
        "--hostname-override <NAME>",
        "--cluster-cidr <CIDRS>",
        "--nodeport-addresses <LIST>",
        "--masquerade-all[=<BOOL>]",
        "--detect-local-mode <MODE>",
        "ClusterCIDR",
        "BridgeInterface",
        "--pod-interface-name-prefix <PREFIX>",
        "--pod-bridge-interface <NAME>",
        "--healthz-bind-address <ADDR>",
        "[default: 0.0.0.0:10256]",
        "--metrics-bind-address <ADDR>",
        "[default: 127.0.0.1:10249]",
        "--kubeconfig <FILE>",
        "--config-sync-period <DURATION>",
        "--service-cluster-ip-range <CIDRS>",
        "[default: 10.96.0.0/12]",
        "--service-node-port-range <RANGE>",
        "[default: 30000-32767]",
        "--manifests <DIR>",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn go_durations() {
    for (text, expected) in [
        ("0", Duration::ZERO),
        ("30s", Duration::from_secs(30)),
        ("15m0s", Duration::from_mins(15)),
        ("1h2m3.5s", Duration::from_millis(3_723_500)),
        ("250ms", Duration::from_millis(250)),
    ] {
        assert_eq!(parse_duration(text), Ok(expected), "{text}");
    }
    for bad in ["", "10", "5d", "m5"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} must be rejected");
    }
}

#[test]
fn model_config_from_config_and_node() {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "spec": {"podCIDRs": ["10.244.3.0/24", "fd10:0:0:3::/64"]},
        "status": {"addresses": [
            {"type": "Hostname", "address": "node-a"},
            {"type": "ExternalIP", "address": "203.0.113.5"},
            {"type": "InternalIP", "address": "192.168.0.10"},
            {"type": "ExternalIP", "address": "2001:db8::5"}]}
    }))
    .unwrap();
    let local: Vec<IpAddr> = vec![
        "127.0.0.1".parse().unwrap(),
        "192.168.0.10".parse().unwrap(),
    ];
    let config = resolve(
        &["--detect-local-mode=NodeCIDR", "--hostname-override=node-a"],
        "",
    );
    let model = config.model_config(Some(&node), &local);
    assert_eq!(model.hostname, "node-a");
    assert_eq!(
        model.node_ips,
        vec![
            "192.168.0.10".parse::<IpAddr>().unwrap(),
            "2001:db8::5".parse().unwrap()
        ],
        "InternalIP before ExternalIP, one per family"
    );
    assert_eq!(model.zone.as_deref(), Some("zone-a"));
    assert_eq!(
        model.local_traffic_detector,
        LocalTrafficDetector::SourceCidrs {
            cidrs: vec![
                "10.244.3.0/24".parse().unwrap(),
                "fd10:0:0:3::/64".parse().unwrap()
            ]
        }
    );
    let without_node = resolve(&["--cluster-cidr=10.244.0.0/16"], "").model_config(None, &local);
    assert_eq!(
        without_node.node_ips,
        vec!["192.168.0.10".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        without_node.local_traffic_detector,
        LocalTrafficDetector::SourceCidrs {
            cidrs: vec!["10.244.0.0/16".parse().unwrap()]
        }
    );
    let no_cidr = resolve(&[], "").model_config(None, &local);
    assert_eq!(no_cidr.local_traffic_detector, LocalTrafficDetector::None);
}
