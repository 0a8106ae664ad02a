//! `/configz` as kube-proxy serves it on its metrics address: `{"kubeproxy.config.k8s.io": C}`
//! where C is the resolved configuration in kube-proxy's internal `KubeProxyConfiguration`
//! form (`pkg/proxy/apis/config/types.go`), whose fields carry no JSON tags and so appear under
//! their Go names (`HostnameOverride`, `DetectLocal.ClusterCIDRs`, durations as Go prints them).
//! Settings kube-ebpf-proxy resolves come from [`ProxyConfig`]; the rest are kube-proxy's
//! defaults, which is what it runs with (see `ignored.rs` for the flags that cannot change them).

use std::time::Duration;

use serde_json::{Value, json};

use super::ProxyConfig;

/// kube-proxy's configz name: the config API group.
pub const CONFIGZ_GROUP: &str = "kubeproxy.config.k8s.io";

/// A duration as Go's `time.Duration.String()` prints it (`0s`, `500ms`, `1.5s`, `15m0s`,
/// `1h30m0s`), which is how `metav1.Duration` marshals. Kept hand-written: jiff prints spans
/// its own way ("15m", "1h 30m"), never Go's zero units ("15m0s").
pub fn go_duration(duration: Duration) -> String {
    if duration.is_zero() {
        return "0s".to_owned();
    }
    if duration < Duration::from_secs(1) {
        let nanos = duration.as_nanos();
        return match nanos {
            n if n % 1_000_000 == 0 => format!("{}ms", n / 1_000_000),
            n if n % 1_000 == 0 => format!("{}µs", n / 1_000),
            n => format!("{n}ns"),
        };
    }
    let total = duration.as_secs();
    let (hours, minutes, seconds) = (total / 3600, total % 3600 / 60, total % 60);
    let fraction = match duration.subsec_nanos() {
        0 => String::new(),
        nanos => format!(".{nanos:09}").trim_end_matches('0').to_owned(),
    };
    let seconds = format!("{seconds}{fraction}s");
    match (hours, minutes) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

impl ProxyConfig {
    /// The `/configz` document.
    pub fn configz(&self) -> Value {
        let address =
            |addr: Option<std::net::SocketAddr>| addr.map(|a| a.to_string()).unwrap_or_default();
        let mut node_port_addresses: Vec<String> = Vec::new();
        if self.nodeport_addresses.primary {
            node_port_addresses.push("primary".to_owned());
        }
        node_port_addresses.extend(
            self.nodeport_addresses
                .cidrs
                .iter()
                .map(ToString::to_string),
        );
        let config = json!({
            "Linux": {
                "Conntrack": {
                    "MaxPerCore": 32768,
                    "Min": 131_072,
                    "TCPEstablishedTimeout": go_duration(self.conntrack.tcp_established),
                    "TCPCloseWaitTimeout": go_duration(self.conntrack.tcp_close_wait),
                    "TCPBeLiberal": false,
                    "UDPTimeout": go_duration(self.conntrack.udp),
                    "UDPStreamTimeout": go_duration(self.conntrack.udp_stream),
                },
                "MasqueradeAll": self.masquerade_all,
                "OOMScoreAdj": -999,
            },
            "Windows": {"RunAsService": false},
            "FeatureGates": {},
            "ClientConnection": {
                "Kubeconfig": self.kubeconfig.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                "AcceptContentTypes": "",
                "ContentType": "application/vnd.kubernetes.protobuf",
                "QPS": 5,
                "Burst": 10,
            },
            "Logging": {
                "format": "text",
                "flushFrequency": "5s",
                "verbosity": 0,
                "options": {"text": {"infoBufferSize": "0"}, "json": {"infoBufferSize": "0"}},
            },
            "HostnameOverride": self.hostname,
            "BindAddress": self.bind_address.map_or_else(|| "0.0.0.0".to_owned(), |ip| ip.to_string()),
            "HealthzBindAddress": address(self.healthz_bind_address),
            "MetricsBindAddress": address(self.metrics_bind_address),
            "BindAddressHardFail": false,
            "EnableProfiling": false,
            "ShowHiddenMetricsForVersion": "",
            "Mode": self.mode,
            "IPTables": {"MasqueradeBit": 14, "LocalhostNodePorts": true},
            "IPVS": {
                "Scheduler": "",
                "ExcludeCIDRs": null,
                "StrictARP": false,
                "TCPTimeout": "0s",
                "TCPFinTimeout": "0s",
                "UDPTimeout": "0s",
            },
            "Winkernel": {
                "NetworkName": "",
                "SourceVip": "",
                "EnableDSR": false,
                "RootHnsEndpointName": "",
                "ForwardHealthCheckVip": false,
            },
            "NFTables": {"MasqueradeBit": 14},
            "DetectLocalMode": self.detect_local_mode.to_string(),
            "DetectLocal": {
                "BridgeInterface": self.pod_bridge_interface,
                "ClusterCIDRs": self.cluster_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "InterfaceNamePrefix": self.pod_interface_name_prefix,
            },
            "NodePortAddresses": node_port_addresses,
            "SyncPeriod": go_duration(self.sync_period),
            "MinSyncPeriod": go_duration(self.min_sync_period),
            "ConfigSyncPeriod": go_duration(self.config_sync_period),
        });
        json!({ CONFIGZ_GROUP: config })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_duration_strings() {
        for (duration, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_mins(15), "15m0s"),
            (Duration::from_mins(90), "1h30m0s"),
            (Duration::from_hours(24), "24h0m0s"),
            (Duration::from_micros(250), "250µs"),
        ] {
            assert_eq!(go_duration(duration), text, "{duration:?}");
        }
    }
}
