//! The `KubeProxyConfiguration` file (`kubeproxy.config.k8s.io/v1alpha1`) as it is spelled:
//! read, checked, and its unsupported fields turned into warnings.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::ConfigError;
use super::values::check_mode;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// The parts of `KubeProxyConfiguration` as the file spells them. Every known field is listed
/// so that a typo is an error naming the field; unsupported ones become warnings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileConfig {
    pub(super) api_version: Option<String>,
    pub(super) kind: Option<String>,
    pub(super) feature_gates: Option<BTreeMap<String, bool>>,
    pub(super) client_connection: Option<ClientConnection>,
    /// Logging is configured with RUST_LOG; the block is accepted and reported.
    pub(super) logging: Option<serde_json::Value>,
    pub(super) hostname_override: Option<String>,
    pub(super) bind_address: Option<String>,
    pub(super) healthz_bind_address: Option<String>,
    pub(super) metrics_bind_address: Option<String>,
    pub(super) bind_address_hard_fail: Option<bool>,
    pub(super) enable_profiling: Option<bool>,
    pub(super) show_hidden_metrics_for_version: Option<String>,
    pub(super) mode: Option<String>,
    pub(super) iptables: Option<IptablesConfig>,
    pub(super) ipvs: Option<serde_json::Map<String, serde_json::Value>>,
    pub(super) nftables: Option<NftablesConfig>,
    pub(super) winkernel: Option<serde_json::Map<String, serde_json::Value>>,
    pub(super) detect_local_mode: Option<String>,
    pub(super) detect_local: Option<DetectLocal>,
    #[serde(rename = "clusterCIDR")]
    pub(super) cluster_cidr: Option<String>,
    pub(super) node_port_addresses: Option<Vec<String>>,
    pub(super) oom_score_adj: Option<i32>,
    pub(super) conntrack: Option<ConntrackConfig>,
    pub(super) config_sync_period: Option<String>,
    pub(super) port_range: Option<String>,
    pub(super) windows_run_as_service: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ClientConnection {
    pub(super) kubeconfig: Option<String>,
    pub(super) accept_content_types: Option<String>,
    pub(super) content_type: Option<String>,
    pub(super) qps: Option<f64>,
    pub(super) burst: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct IptablesConfig {
    pub(super) masquerade_bit: Option<i32>,
    pub(super) masquerade_all: Option<bool>,
    pub(super) localhost_node_ports: Option<bool>,
    #[serde(rename = "snatNodeInternalIP")]
    pub(super) snat_node_internal_ip: Option<bool>,
    pub(super) sync_period: Option<String>,
    pub(super) min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct NftablesConfig {
    pub(super) masquerade_bit: Option<i32>,
    pub(super) masquerade_all: Option<bool>,
    pub(super) sync_period: Option<String>,
    pub(super) min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ConntrackConfig {
    pub(super) max_per_core: Option<i64>,
    pub(super) min: Option<i64>,
    pub(super) tcp_established_timeout: Option<String>,
    pub(super) tcp_close_wait_timeout: Option<String>,
    pub(super) tcp_be_liberal: Option<bool>,
    pub(super) udp_timeout: Option<String>,
    pub(super) udp_stream_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct DetectLocal {
    pub(super) bridge_interface: Option<String>,
    pub(super) interface_name_prefix: Option<String>,
}

/// Reads and checks a KubeProxyConfiguration file; returns it with the warnings for the fields
/// kube-ebpf-proxy does not support yet.
pub(super) fn read_file(path: &Path) -> Result<(FileConfig, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_file(path, &text)
}

pub(super) fn parse_file(
    path: &Path,
    text: &str,
) -> Result<(FileConfig, Vec<String>), ConfigError> {
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
    // kubeadm writes `0s`, kube-proxy's "default".
    if file
        .config_sync_period
        .as_ref()
        .is_some_and(|period| !matches!(period.as_str(), "" | "0" | "0s"))
    {
        warnings.push(format!(
            "{}: configSyncPeriod is accepted but ignored: {}",
            path.display(),
            super::ignored::CONFIG_SYNC_PERIOD
        ));
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
