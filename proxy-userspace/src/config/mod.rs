//! kube-proxy compatible configuration: the `KubeProxyConfiguration` file
//! (`kubeproxy.config.k8s.io/v1alpha1`), kube-proxy's flag names (which override the file, as in
//! kube-proxy), and the step from the resolved configuration (+ this node's Node object) to the
//! model's [`crate::model::ModelConfig`].
//!
//! One file a subject: `flags` (kube-proxy's flag names and the merge over the file),
//! `file` (the file as it is spelled, read and checked), `values` (parsing and validating one
//! setting), `defaults` (kube-proxy's defaults), `derived` (what the model, the manifests source
//! and the health server get from the result), `configz` and `ignored`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::model::NodePortAddresses;
use crate::port_range::PortRange;

mod configz;
mod defaults;
mod derived;
mod file;
mod flags;
mod ignored;
mod values;
pub use configz::CONFIGZ_GROUP;
pub use file::{API_VERSION, KIND};
pub use flags::ProxyFlags;
pub use ignored::IgnoredFlags;
pub use values::parse_duration;

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

impl FromStr for DetectLocalMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        <DetectLocalMode as clap::ValueEnum>::from_str(text, false)
    }
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

#[cfg(test)]
mod tests;
