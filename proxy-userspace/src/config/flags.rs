//! kube-proxy's flags (and our `--manifests`), and their merge over the `--config` file.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::str::FromStr;

use super::configz::go_duration;
use super::defaults::{
    DEFAULT_CONFIG_SYNC_PERIOD, DEFAULT_HEALTHZ_BIND_ADDRESS, DEFAULT_METRICS_BIND_ADDRESS,
    DEFAULT_MIN_SYNC_PERIOD, DEFAULT_SYNC_PERIOD, system_hostname,
};
use super::file::{FileConfig, read_file};
use super::values::{
    check_mode, duration_setting, file_duration, parse_bind_address, parse_cidr_pair,
    parse_duration, parse_nodeport_addresses,
};
use super::{ConfigError, ConntrackTimeouts, DetectLocalMode, IgnoredFlags, ProxyConfig, ignored};
use crate::model::NodePortAddresses;
use crate::port_range::PortRange;

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
    /// kube-proxy's informer resync period (Go duration, e.g. 15m0s): accepted and shown in
    /// /configz, but ignored (kube-rs watchers have no resync). [default: 15m]
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
        if let Some(period) = self.config_sync_period {
            warnings.push(ignored::warning(
                "config-sync-period",
                &go_duration(period),
                ignored::CONFIG_SYNC_PERIOD,
            ));
        }
        let config = self.merge(file, system_hostname)?;
        Ok((config, warnings))
    }

    pub(super) fn merge(
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
