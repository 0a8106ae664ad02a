//! kube-proxy compatible configuration: the `KubeProxyConfiguration` file
//! (`kubeproxy.config.k8s.io/v1alpha1`), kube-proxy's flag names (which override the file, as in
//! kube-proxy), and the step from the resolved configuration (+ this node's Node object) to the
//! model's [`ModelConfig`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use serde::Deserialize;

use crate::model::{IpFamily, LocalTrafficDetector, ModelConfig, NodePortAddresses};
use crate::port_range::PortRange;

mod configz;
mod ignored;
pub use configz::CONFIGZ_GROUP;
pub use ignored::IgnoredFlags;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";
const DEFAULT_HEALTHZ_BIND_ADDRESS: &str = "0.0.0.0:10256";
const DEFAULT_METRICS_BIND_ADDRESS: &str = "127.0.0.1:10249";
const DEFAULT_CONFIG_SYNC_PERIOD: Duration = Duration::from_mins(15);
const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: apiVersion {found:?} is not {API_VERSION}")]
    ApiVersion { path: PathBuf, found: String },
    #[error("config file {path}: kind {found:?} is not {KIND}")]
    Kind { path: PathBuf, found: String },
    #[error("{setting}: {value:?} is not {expected}")]
    Invalid {
        setting: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{setting}: at most one CIDR per IP family, got {value:?}")]
    TooManyCidrs {
        setting: &'static str,
        value: String,
    },
    #[error("detectLocalMode {mode}: {setting} must be set")]
    MissingDetectLocalSetting {
        mode: DetectLocalMode,
        setting: &'static str,
    },
}

/// `--detect-local-mode` / `detectLocalMode`: how traffic from local pods is recognised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
pub enum DetectLocalMode {
    /// Source address inside `--cluster-cidr`.
    #[default]
    #[value(name = "ClusterCIDR")]
    ClusterCIDR,
    /// Source address inside this Node's `spec.podCIDRs`.
    #[value(name = "NodeCIDR")]
    NodeCIDR,
    /// Arrived on an interface named with `--pod-interface-name-prefix`.
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
    /// Arrived on the bridge `--pod-bridge-interface`.
    #[value(name = "BridgeInterface")]
    BridgeInterface,
}

impl std::fmt::Display for DetectLocalMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DetectLocalMode::ClusterCIDR => "ClusterCIDR",
            DetectLocalMode::NodeCIDR => "NodeCIDR",
            DetectLocalMode::InterfaceNamePrefix => "InterfaceNamePrefix",
            DetectLocalMode::BridgeInterface => "BridgeInterface",
        })
    }
}

/// kube-proxy's flags (and our `--manifests`), to be flattened into `run` and `plan`. Flags given
/// on the command line override the `--config` file.
#[derive(Clone, Debug, clap::Args)]
pub struct ProxyFlags {
    /// A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1, YAML or JSON). Unknown
    /// fields are an error; fields kube-ebpf-proxy does not support yet are warnings.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The name of this node, instead of the host name: endpoints with this nodeName are local.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// The pods' CIDR range(s), comma-separated (one per IP family); with
    /// --detect-local-mode=ClusterCIDR, traffic from these is pod traffic.
    #[arg(long, value_name = "CIDRS")]
    pub cluster_cidr: Option<String>,
    /// Node addresses NodePorts are served on: CIDRs and the keywords `primary` (the node's
    /// primary IPs), `localhost` and `all`, comma-separated. [default: primary]
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub nodeport_addresses: Option<Vec<String>>,
    /// SNAT all traffic sent to ClusterIPs. [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub masquerade_all: Option<bool>,
    /// How traffic from local pods is recognised. [default: ClusterCIDR]
    #[arg(long, value_name = "MODE")]
    pub detect_local_mode: Option<DetectLocalMode>,
    /// With --detect-local-mode=InterfaceNamePrefix: the pods' interface name prefix.
    #[arg(long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,
    /// With --detect-local-mode=BridgeInterface: the pods' bridge.
    #[arg(long, value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,
    /// IP:port of /healthz and /livez; empty disables them. [default: 0.0.0.0:10256]
    #[arg(long, value_name = "ADDR")]
    pub healthz_bind_address: Option<String>,
    /// IP:port of /metrics; empty disables it. [default: 127.0.0.1:10249]
    #[arg(long, value_name = "ADDR")]
    pub metrics_bind_address: Option<String>,
    /// kubeconfig file for the API server (in-cluster configuration when unset).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// How often the API server objects are re-listed (Go duration, e.g. 15m0s). [default: 15m]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub config_sync_period: Option<Duration>,
    /// The API server's ClusterIP range(s), comma-separated: the manifests source allocates
    /// missing ClusterIPs from it when the folder has no ServiceCIDR objects. When given, the
    /// dataplane also drops unallocated addresses in it (besides the ServiceCIDR objects'
    /// ranges, which are always dropped). [default: 10.96.0.0/12]
    #[arg(long, value_name = "CIDRS")]
    pub service_cluster_ip_range: Option<String>,
    /// The API server's NodePort range, FIRST-LAST: the manifests source allocates missing
    /// NodePorts from it.
    #[arg(long, value_name = "RANGE", default_value = "30000-32767", value_parser = PortRange::from_str)]
    pub service_node_port_range: PortRange,
    /// Read Services, EndpointSlices, Endpoints, Pods, Deployments... from the manifests in this
    /// folder (watched) instead of an API server.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// Idle timeout of established TCP flows; 0 keeps the kernel's (5 days). [default: 24h0m0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_established: Option<Duration>,
    /// Idle timeout of half-closed TCP flows (CLOSE_WAIT); 0 keeps the kernel's (60 s).
    /// [default: 1h0m0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close_wait: Option<Duration>,
    /// Idle timeout of UDP flows that are not assured; 0 keeps the kernel's (30 s). [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub conntrack_udp_timeout: Option<Duration>,
    /// Idle timeout of assured UDP flows; 0 keeps the kernel's (120 s). [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub conntrack_udp_timeout_stream: Option<Duration>,
    /// Overrides this node's primary IP (for its family; the masquerade source and `primary`
    /// NodePort address). 0.0.0.0 and :: leave it to the Node object.
    #[arg(long, value_name = "IP")]
    pub bind_address: Option<String>,
    /// kube-proxy's proxy mode: "", iptables, ipvs or nftables are accepted, and the eBPF
    /// dataplane is used instead.
    #[arg(long, value_name = "MODE")]
    pub proxy_mode: Option<String>,
    /// The API server's address, overriding the kubeconfig's (or the in-cluster) server URL.
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,
    /// The resync period (kube-proxy's iptables name for it). [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub iptables_sync_period: Option<Duration>,
    /// The minimum period between syncs (kube-proxy's iptables name for it). [default: 1s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub iptables_min_sync_period: Option<Duration>,
    #[command(flatten)]
    pub ignored: IgnoredFlags,
}

/// The configuration after the file and the flags are merged and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// This node's name (`--hostname-override`, else the host name), lowercased like kube-proxy.
    pub hostname: String,
    /// `bindAddress`: overrides the primary node IP of its family.
    pub bind_address: Option<IpAddr>,
    pub cluster_cidrs: Vec<IpNet>,
    pub nodeport_addresses: NodePortAddresses,
    pub masquerade_all: bool,
    pub detect_local_mode: DetectLocalMode,
    pub pod_interface_name_prefix: String,
    pub pod_bridge_interface: String,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub kubeconfig: Option<PathBuf>,
    pub config_sync_period: Duration,
    /// The dataplane's resync period; /healthz fails after twice this without a sync.
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    /// `--service-cluster-ip-range` when given explicitly; `None` means the API server's
    /// default, which only the manifests source's allocation uses.
    pub service_cluster_ip_range: Option<Vec<IpNet>>,
    pub service_node_port_range: PortRange,
    pub manifests: Option<PathBuf>,
    /// kube-proxy's `mode` as configured ("" when unset); the eBPF dataplane is used whatever
    /// it says.
    pub mode: String,
    /// `--master`: the API server URL overriding the kubeconfig's.
    pub master: Option<String>,
    pub conntrack: ConntrackTimeouts,
}

/// The proxy modes kube-proxy accepts on Linux (`""` picks its default). kube-ebpf-proxy
/// accepts each, so a kube-proxy configuration works unchanged, and says that it programs its
/// eBPF dataplane instead.
const KUBE_PROXY_MODES: [&str; 4] = ["", "iptables", "ipvs", "nftables"];

/// Checks a kube-proxy mode (`mode` or `--proxy-mode`) and returns the one-line note about it.
fn check_mode(setting: &'static str, mode: &str) -> Result<String, ConfigError> {
    if !KUBE_PROXY_MODES.contains(&mode) {
        return Err(ConfigError::Invalid {
            setting,
            value: mode.to_owned(),
            expected: "one of \"\", iptables, ipvs or nftables",
        });
    }
    Ok(format!(
        "{setting} {mode:?}: kube-ebpf-proxy programs its eBPF dataplane instead (no iptables, \
         ipvs or nftables rules)"
    ))
}

/// kube-proxy's `conntrack` timeouts; zero means "the kernel's default", as kube-proxy leaves
/// the sysctl alone then. The dataplane's conntrack applies them (`dataplane::CtTimeouts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    pub tcp_established: Duration,
    pub tcp_close_wait: Duration,
    pub udp: Duration,
    pub udp_stream: Duration,
}

impl Default for ConntrackTimeouts {
    /// kube-proxy's defaults (`SetDefaults_KubeProxyConfiguration`).
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_hours(24),
            tcp_close_wait: Duration::from_hours(1),
            udp: Duration::ZERO,
            udp_stream: Duration::ZERO,
        }
    }
}

/// The parts of `KubeProxyConfiguration` as the file spells them. Every known field is listed
/// so that a typo is an error naming the field; unsupported ones become warnings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileConfig {
    api_version: Option<String>,
    kind: Option<String>,
    feature_gates: Option<BTreeMap<String, bool>>,
    client_connection: Option<ClientConnection>,
    /// Logging is configured with RUST_LOG; the block is accepted and reported.
    logging: Option<serde_json::Value>,
    hostname_override: Option<String>,
    bind_address: Option<String>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    bind_address_hard_fail: Option<bool>,
    enable_profiling: Option<bool>,
    show_hidden_metrics_for_version: Option<String>,
    mode: Option<String>,
    iptables: Option<IptablesConfig>,
    ipvs: Option<serde_json::Map<String, serde_json::Value>>,
    nftables: Option<NftablesConfig>,
    winkernel: Option<serde_json::Map<String, serde_json::Value>>,
    detect_local_mode: Option<String>,
    detect_local: Option<DetectLocal>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    node_port_addresses: Option<Vec<String>>,
    oom_score_adj: Option<i32>,
    conntrack: Option<ConntrackConfig>,
    config_sync_period: Option<String>,
    port_range: Option<String>,
    windows_run_as_service: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClientConnection {
    kubeconfig: Option<String>,
    accept_content_types: Option<String>,
    content_type: Option<String>,
    qps: Option<f64>,
    burst: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IptablesConfig {
    masquerade_bit: Option<i32>,
    masquerade_all: Option<bool>,
    localhost_node_ports: Option<bool>,
    #[serde(rename = "snatNodeInternalIP")]
    snat_node_internal_ip: Option<bool>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NftablesConfig {
    masquerade_bit: Option<i32>,
    masquerade_all: Option<bool>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConntrackConfig {
    max_per_core: Option<i64>,
    min: Option<i64>,
    tcp_established_timeout: Option<String>,
    tcp_close_wait_timeout: Option<String>,
    tcp_be_liberal: Option<bool>,
    udp_timeout: Option<String>,
    udp_stream_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DetectLocal {
    bridge_interface: Option<String>,
    interface_name_prefix: Option<String>,
}

/// Parses a Go `time.Duration` string ("15m0s", "1h30m", "500ms", "0"). Kept hand-written:
/// Go's grammar exactly (a bare "0", "µs"), where jiff's friendly format also takes spaces
/// and unit words Go refuses.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("{text:?} is not a duration like 30s, 15m0s or 1h2m3.5s");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| invalid())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(invalid()),
        };
        total += number * seconds_per_unit;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

/// Comma-separated CIDRs, at most one per family (kube-proxy's dual-stack pair syntax).
fn parse_cidr_pair(setting: &'static str, text: &str) -> Result<Vec<IpNet>, ConfigError> {
    let mut cidrs: Vec<IpNet> = Vec::new();
    for part in text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        let cidr: IpNet = part.parse().map_err(|_| ConfigError::Invalid {
            setting,
            value: part.to_owned(),
            expected: "a CIDR",
        })?;
        if cidrs
            .iter()
            .any(|known| IpFamily::of(known.addr()) == IpFamily::of(cidr.addr()))
        {
            return Err(ConfigError::TooManyCidrs {
                setting,
                value: text.to_owned(),
            });
        }
        cidrs.push(cidr.trunc());
    }
    Ok(cidrs)
}

/// `nodePortAddresses` entries: CIDRs and the keywords primary, localhost and all.
fn parse_nodeport_addresses(entries: &[String]) -> Result<NodePortAddresses, ConfigError> {
    if entries.iter().all(|entry| entry.trim().is_empty()) {
        return Ok(NodePortAddresses::primary());
    }
    let mut addresses = NodePortAddresses::default();
    let used = entries
        .iter()
        .filter(|entry| !entry.trim().is_empty())
        .count();
    for entry in entries.iter().map(|entry| entry.trim()) {
        match entry {
            "" => {}
            // kube-proxy's validation: `primary` stands alone.
            "primary" if used > 1 => {
                return Err(ConfigError::Invalid {
                    setting: "nodePortAddresses",
                    value: entries.join(","),
                    expected: "either primary alone or CIDRs (can't use both 'primary' and CIDRs)",
                });
            }
            "primary" => addresses.primary = true,
            "all" => addresses
                .cidrs
                .extend(["0.0.0.0/0", "::/0"].map(|cidr| cidr.parse::<IpNet>().expect("valid"))),
            "localhost" => addresses.cidrs.extend(
                ["127.0.0.0/8", "::1/128"].map(|cidr| cidr.parse::<IpNet>().expect("valid")),
            ),
            cidr => addresses
                .cidrs
                .push(cidr.parse().map_err(|_| ConfigError::Invalid {
                    setting: "nodePortAddresses",
                    value: cidr.to_owned(),
                    expected: "a CIDR or one of primary, localhost, all",
                })?),
        }
    }
    Ok(addresses)
}

fn parse_bind_address(
    setting: &'static str,
    text: &str,
) -> Result<Option<SocketAddr>, ConfigError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| ConfigError::Invalid {
        setting,
        value: text.to_owned(),
        expected: "IP:port",
    })
}

fn duration_setting(setting: &'static str, text: &str) -> Result<Duration, ConfigError> {
    parse_duration(text).map_err(|_| ConfigError::Invalid {
        setting,
        value: text.to_owned(),
        expected: "a duration like 30s or 15m0s",
    })
}

/// A duration from the file, where 0 (kubeadm writes `0s`) means unset: kube-proxy's v1alpha1
/// defaulting replaces a zero period by its default.
fn file_duration(
    setting: &'static str,
    text: &str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let period = duration_setting(setting, text)?;
    Ok(if period.is_zero() { default } else { period })
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

/// Reads and checks a KubeProxyConfiguration file; returns it with the warnings for the fields
/// kube-ebpf-proxy does not support yet.
fn read_file(path: &Path) -> Result<(FileConfig, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_file(path, &text)
}

fn parse_file(path: &Path, text: &str) -> Result<(FileConfig, Vec<String>), ConfigError> {
    if text.trim().is_empty() {
        return Ok((FileConfig::default(), Vec::new()));
    }
    let file: FileConfig = serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if let Some(found) = file.api_version.as_ref().filter(|v| *v != API_VERSION) {
        return Err(ConfigError::ApiVersion {
            path: path.to_owned(),
            found: found.clone(),
        });
    }
    if let Some(found) = file.kind.as_ref().filter(|k| *k != KIND) {
        return Err(ConfigError::Kind {
            path: path.to_owned(),
            found: found.clone(),
        });
    }
    let mut warnings = Vec::new();
    if let Some(mode) = &file.mode {
        warnings.push(format!("{}: {}", path.display(), check_mode("mode", mode)?));
    }
    let mut unsupported = |field: &str, why: &str| {
        warnings.push(format!(
            "{}: {field} is not supported yet ({why}); ignored",
            path.display()
        ));
    };
    if file
        .feature_gates
        .as_ref()
        .is_some_and(|gates| !gates.is_empty())
    {
        unsupported(
            "featureGates",
            "the behaviour of Kubernetes 1.35's defaults is built in",
        );
    }
    if let Some(connection) = &file.client_connection
        && (connection.accept_content_types.is_some()
            || connection.content_type.is_some()
            || connection.qps.is_some()
            || connection.burst.is_some())
    {
        unsupported(
            "clientConnection other than kubeconfig",
            "kube-rs defaults are used",
        );
    }
    if file.logging.is_some() {
        unsupported("logging", "set RUST_LOG instead");
    }
    if file.bind_address_hard_fail == Some(true) {
        unsupported("bindAddressHardFail", "binding failures are always fatal");
    }
    if file.enable_profiling == Some(true) {
        unsupported("enableProfiling", "no pprof handlers");
    }
    if file
        .show_hidden_metrics_for_version
        .as_ref()
        .is_some_and(|v| !v.is_empty())
    {
        unsupported("showHiddenMetricsForVersion", "no hidden metrics");
    }
    if let Some(iptables) = &file.iptables {
        if iptables.masquerade_bit.is_some() {
            unsupported("iptables.masqueradeBit", "no packet marks are used");
        }
        if iptables.localhost_node_ports == Some(true) {
            unsupported(
                "iptables.localhostNodePorts",
                "list localhost in nodePortAddresses",
            );
        }
        if iptables.snat_node_internal_ip == Some(true) {
            unsupported(
                "iptables.snatNodeInternalIP",
                "SNAT uses the egress address",
            );
        }
    }
    if file
        .nftables
        .as_ref()
        .is_some_and(|n| n.masquerade_bit.is_some())
    {
        unsupported("nftables.masqueradeBit", "no packet marks are used");
    }
    if let Some(conntrack) = &file.conntrack {
        if conntrack.max_per_core.is_some() || conntrack.min.is_some() {
            unsupported(
                "conntrack.maxPerCore/conntrack.min",
                "size the dataplane's conntrack map with --conntrack-max",
            );
        }
        if conntrack.tcp_be_liberal == Some(true) {
            unsupported(
                "conntrack.tcpBeLiberal",
                "the dataplane's conntrack never marks out-of-window packets invalid",
            );
        }
    }
    for (field, block) in [("ipvs", &file.ipvs), ("winkernel", &file.winkernel)] {
        if block.as_ref().is_some_and(|block| !block.is_empty()) {
            unsupported(field, "kube-ebpf-proxy keeps its own connection tracking");
        }
    }
    if file.oom_score_adj.is_some() {
        unsupported("oomScoreAdj", "set it in the DaemonSet");
    }
    if file
        .port_range
        .as_ref()
        .is_some_and(|range| !range.is_empty())
    {
        unsupported("portRange", "unused since the userspace proxy was removed");
    }
    if file.windows_run_as_service == Some(true) {
        unsupported("windowsRunAsService", "Linux only");
    }
    Ok((file, warnings))
}

impl ProxyFlags {
    /// Merges the `--config` file (if any) with the flags, flags winning, and validates the
    /// result. Returns the warnings for unsupported file fields (the caller logs them).
    pub fn resolve(&self) -> Result<(ProxyConfig, Vec<String>), ConfigError> {
        let (file, mut warnings) = match &self.config {
            Some(path) => read_file(path)?,
            None => (FileConfig::default(), Vec::new()),
        };
        if let Some(mode) = &self.proxy_mode {
            warnings.push(check_mode("--proxy-mode", mode)?);
        }
        warnings.extend(self.ignored.warnings());
        let config = self.merge(file, system_hostname)?;
        Ok((config, warnings))
    }

    fn merge(
        &self,
        file: FileConfig,
        system_hostname: impl FnOnce() -> String,
    ) -> Result<ProxyConfig, ConfigError> {
        let iptables = file.iptables.unwrap_or_default();
        let nftables = file.nftables.unwrap_or_default();
        let detect_local = file.detect_local.unwrap_or_default();

        let hostname = self
            .hostname_override
            .clone()
            .or(file.hostname_override)
            .filter(|name| !name.trim().is_empty())
            .unwrap_or_else(system_hostname)
            .trim()
            .to_lowercase();
        let bind_address = match self
            .bind_address
            .as_deref()
            .or(file.bind_address.as_deref())
            .map(str::trim)
        {
            None | Some("") => None,
            Some(text) => Some(text.parse::<IpAddr>().map_err(|_| ConfigError::Invalid {
                setting: "bindAddress",
                value: text.to_owned(),
                expected: "an IP address",
            })?),
        }
        .filter(|ip| !ip.is_unspecified());
        let cluster_cidrs = match self.cluster_cidr.as_ref().or(file.cluster_cidr.as_ref()) {
            Some(text) => parse_cidr_pair("clusterCIDR", text)?,
            None => Vec::new(),
        };
        let nodeport_addresses = match self
            .nodeport_addresses
            .as_ref()
            .or(file.node_port_addresses.as_ref())
        {
            Some(entries) => parse_nodeport_addresses(entries)?,
            None => NodePortAddresses::primary(),
        };
        let masquerade_all = self.masquerade_all.unwrap_or(
            nftables.masquerade_all.unwrap_or(false) || iptables.masquerade_all.unwrap_or(false),
        );
        let detect_local_mode = match self.detect_local_mode {
            Some(mode) => mode,
            None => match file.detect_local_mode.as_deref() {
                None | Some("") => DetectLocalMode::default(),
                Some(text) => <DetectLocalMode as clap::ValueEnum>::from_str(text, false).map_err(
                    |_| ConfigError::Invalid {
                        setting: "detectLocalMode",
                        value: text.to_owned(),
                        expected: "ClusterCIDR, NodeCIDR, InterfaceNamePrefix or BridgeInterface",
                    },
                )?,
            },
        };
        let pod_interface_name_prefix = self
            .pod_interface_name_prefix
            .clone()
            .or(detect_local.interface_name_prefix)
            .unwrap_or_default();
        let pod_bridge_interface = self
            .pod_bridge_interface
            .clone()
            .or(detect_local.bridge_interface)
            .unwrap_or_default();
        match detect_local_mode {
            DetectLocalMode::InterfaceNamePrefix if pod_interface_name_prefix.is_empty() => {
                return Err(ConfigError::MissingDetectLocalSetting {
                    mode: detect_local_mode,
                    setting: "--pod-interface-name-prefix (detectLocal.interfaceNamePrefix)",
                });
            }
            DetectLocalMode::BridgeInterface if pod_bridge_interface.is_empty() => {
                return Err(ConfigError::MissingDetectLocalSetting {
                    mode: detect_local_mode,
                    setting: "--pod-bridge-interface (detectLocal.bridgeInterface)",
                });
            }
            _ => {}
        }
        let healthz_bind_address = parse_bind_address(
            "healthzBindAddress",
            self.healthz_bind_address
                .as_deref()
                // The file's "" is unset (kube-proxy defaults it), as kubeadm writes it.
                .or(file
                    .healthz_bind_address
                    .as_deref()
                    .filter(|a| !a.is_empty()))
                .unwrap_or(DEFAULT_HEALTHZ_BIND_ADDRESS),
        )?;
        let metrics_bind_address = parse_bind_address(
            "metricsBindAddress",
            self.metrics_bind_address
                .as_deref()
                .or(file
                    .metrics_bind_address
                    .as_deref()
                    .filter(|a| !a.is_empty()))
                .unwrap_or(DEFAULT_METRICS_BIND_ADDRESS),
        )?;
        let kubeconfig = self.kubeconfig.clone().or_else(|| {
            file.client_connection
                .and_then(|connection| connection.kubeconfig)
                .filter(|path| !path.is_empty())
                .map(PathBuf::from)
        });
        let config_sync_period = match (self.config_sync_period, &file.config_sync_period) {
            (Some(period), _) => period,
            (None, Some(text)) => {
                file_duration("configSyncPeriod", text, DEFAULT_CONFIG_SYNC_PERIOD)?
            }
            (None, None) => DEFAULT_CONFIG_SYNC_PERIOD,
        };
        let sync_period = match (
            self.iptables_sync_period,
            nftables.sync_period.or(iptables.sync_period),
        ) {
            (Some(period), _) => period,
            (None, Some(text)) => file_duration("nftables.syncPeriod", &text, DEFAULT_SYNC_PERIOD)?,
            (None, None) => DEFAULT_SYNC_PERIOD,
        };
        let min_sync_period = match (
            self.iptables_min_sync_period,
            nftables.min_sync_period.or(iptables.min_sync_period),
        ) {
            (Some(period), _) => period,
            (None, Some(text)) => {
                file_duration("nftables.minSyncPeriod", &text, DEFAULT_MIN_SYNC_PERIOD)?
            }
            (None, None) => DEFAULT_MIN_SYNC_PERIOD,
        };
        let mode = self.proxy_mode.clone().or(file.mode).unwrap_or_default();
        check_mode("mode", &mode)?;
        let master = self.master.clone().filter(|url| !url.is_empty());
        let service_cluster_ip_range = self
            .service_cluster_ip_range
            .as_deref()
            .map(|text| parse_cidr_pair("--service-cluster-ip-range", text))
            .transpose()?;
        let conntrack_file = file.conntrack.unwrap_or_default();
        let timeout = |flag: Option<Duration>,
                       setting: &'static str,
                       text: Option<&String>,
                       default: Duration| {
            match (flag, text) {
                (Some(value), _) => Ok(value),
                (None, Some(text)) => duration_setting(setting, text),
                (None, None) => Ok(default),
            }
        };
        let defaults = ConntrackTimeouts::default();
        let conntrack = ConntrackTimeouts {
            tcp_established: timeout(
                self.conntrack_tcp_timeout_established,
                "conntrack.tcpEstablishedTimeout",
                conntrack_file.tcp_established_timeout.as_ref(),
                defaults.tcp_established,
            )?,
            tcp_close_wait: timeout(
                self.conntrack_tcp_timeout_close_wait,
                "conntrack.tcpCloseWaitTimeout",
                conntrack_file.tcp_close_wait_timeout.as_ref(),
                defaults.tcp_close_wait,
            )?,
            udp: timeout(
                self.conntrack_udp_timeout,
                "conntrack.udpTimeout",
                conntrack_file.udp_timeout.as_ref(),
                defaults.udp,
            )?,
            udp_stream: timeout(
                self.conntrack_udp_timeout_stream,
                "conntrack.udpStreamTimeout",
                conntrack_file.udp_stream_timeout.as_ref(),
                defaults.udp_stream,
            )?,
        };
        Ok(ProxyConfig {
            hostname,
            bind_address,
            cluster_cidrs,
            nodeport_addresses,
            masquerade_all,
            detect_local_mode,
            pod_interface_name_prefix,
            pod_bridge_interface,
            healthz_bind_address,
            metrics_bind_address,
            kubeconfig,
            config_sync_period,
            sync_period,
            min_sync_period,
            service_cluster_ip_range,
            service_node_port_range: self.service_node_port_range,
            manifests: self.manifests.clone(),
            mode,
            master,
            conntrack,
        })
    }
}

impl FromStr for DetectLocalMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        <DetectLocalMode as clap::ValueEnum>::from_str(text, false)
    }
}

/// The node's primary IP of each family as kube-proxy picks it from the Node: the first
/// InternalIP of the family, else the first ExternalIP.
fn node_primary_ips(node: &Node) -> Vec<IpAddr> {
    let addresses = node
        .status
        .as_ref()
        .and_then(|status| status.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut primary: Vec<IpAddr> = Vec::new();
    for wanted in ["InternalIP", "ExternalIP"] {
        for address in addresses.iter().filter(|a| a.type_ == wanted) {
            if let Ok(ip) = address.address.parse::<IpAddr>()
                && !primary
                    .iter()
                    .any(|known| IpFamily::of(*known) == IpFamily::of(ip))
            {
                primary.push(ip);
            }
        }
    }
    primary
}

/// The Node's pod CIDRs (`spec.podCIDRs`, else `spec.podCIDR`), first of each family.
fn node_pod_cidrs(node: &Node) -> Vec<IpNet> {
    let Some(spec) = &node.spec else {
        return Vec::new();
    };
    let listed: Vec<&String> = match &spec.pod_cidrs {
        Some(cidrs) if !cidrs.is_empty() => cidrs.iter().collect(),
        _ => spec.pod_cidr.iter().collect(),
    };
    let mut cidrs: Vec<IpNet> = Vec::new();
    for cidr in listed
        .into_iter()
        .filter_map(|text| text.parse::<IpNet>().ok())
    {
        if !cidrs
            .iter()
            .any(|known| IpFamily::of(known.addr()) == IpFamily::of(cidr.addr()))
        {
            cidrs.push(cidr.trunc());
        }
    }
    cidrs
}

impl ProxyConfig {
    /// What the manifests source needs to allocate like the API server would.
    pub fn manifest_settings(&self) -> crate::source::manifests::ManifestSettings {
        let defaults = crate::source::manifests::ManifestSettings::new(self.hostname.clone());
        crate::source::manifests::ManifestSettings {
            service_cidrs: self
                .service_cluster_ip_range
                .clone()
                .unwrap_or(defaults.service_cidrs),
            node_port_range: self.service_node_port_range,
            hostname: self.hostname.clone(),
        }
    }

    /// How long a queued change may wait before /healthz fails: twice the sync period, as
    /// kube-proxy constructs its `ProxyHealthServer`.
    pub fn health_timeout(&self) -> Duration {
        self.sync_period * 2
    }

    /// The model's view of this configuration on this node. `node` is this node's Node object
    /// (when known) and `local_addresses` the addresses on the node's interfaces. Call it again
    /// whenever either changes.
    ///
    /// Primary node IPs: `bindAddress` for its family, else the Node's (first InternalIP, else
    /// ExternalIP, per family); with neither (no cluster), the first non-loopback local address
    /// of each family so that standalone plans still show NodePorts.
    pub fn model_config(&self, node: Option<&Node>, local_addresses: &[IpAddr]) -> ModelConfig {
        let mut node_ips: Vec<IpAddr> = self.bind_address.into_iter().collect();
        let fallback: Vec<IpAddr> = local_addresses
            .iter()
            .copied()
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
            .collect();
        let from_node = node.map(node_primary_ips).unwrap_or_default();
        for ip in from_node.into_iter().chain(fallback) {
            if !node_ips
                .iter()
                .any(|known| IpFamily::of(*known) == IpFamily::of(ip))
            {
                node_ips.push(ip);
            }
        }
        let zone = node
            .and_then(|node| node.metadata.labels.as_ref())
            .and_then(|labels| labels.get(ZONE_LABEL))
            .cloned();
        let local_traffic_detector = match self.detect_local_mode {
            DetectLocalMode::ClusterCIDR if !self.cluster_cidrs.is_empty() => {
                LocalTrafficDetector::SourceCidrs {
                    cidrs: self.cluster_cidrs.clone(),
                }
            }
            DetectLocalMode::NodeCIDR => {
                let cidrs = node.map(node_pod_cidrs).unwrap_or_default();
                if cidrs.is_empty() {
                    LocalTrafficDetector::None
                } else {
                    LocalTrafficDetector::SourceCidrs { cidrs }
                }
            }
            DetectLocalMode::InterfaceNamePrefix => LocalTrafficDetector::InterfaceNamePrefix {
                prefix: self.pod_interface_name_prefix.clone(),
            },
            DetectLocalMode::BridgeInterface => LocalTrafficDetector::BridgeInterface {
                name: self.pod_bridge_interface.clone(),
            },
            DetectLocalMode::ClusterCIDR => LocalTrafficDetector::None,
        };
        ModelConfig {
            hostname: self.hostname.clone(),
            node_ips,
            local_addresses: local_addresses.to_vec(),
            nodeport_addresses: self.nodeport_addresses.clone(),
            zone,
            local_traffic_detector,
            masquerade_all: self.masquerade_all,
            service_cidrs: self.service_cluster_ip_range.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::json;

    use super::*;

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
        let (_, none) = file(FILE).unwrap();
        assert!(none.is_empty(), "{none:?}");
    }

    /// kubeadm's `config.conf` (its kube-proxy ConfigMap): every field, zero values included.
    const KUBEADM_CONFIG: &str = include_str!("../testdata/kubeadm-config.conf");

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
        let without_node =
            resolve(&["--cluster-cidr=10.244.0.0/16"], "").model_config(None, &local);
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
}
