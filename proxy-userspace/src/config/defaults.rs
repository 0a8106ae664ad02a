//! kube-proxy's defaults (`SetDefaults_KubeProxyConfiguration`) where nothing is configured.

use std::time::Duration;

pub(super) const DEFAULT_HEALTHZ_BIND_ADDRESS: &str = "0.0.0.0:10256";
pub(super) const DEFAULT_METRICS_BIND_ADDRESS: &str = "127.0.0.1:10249";
pub(super) const DEFAULT_CONFIG_SYNC_PERIOD: Duration = Duration::from_mins(15);
pub(super) const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
pub(super) const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);

pub(super) fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}
