//! Parsing and validating one setting, whether from a flag or the file.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::ConfigError;
use crate::model::{IpFamily, NodePortAddresses};

/// The proxy modes kube-proxy accepts on Linux (`""` picks its default). kube-ebpf-proxy
/// accepts each, so a kube-proxy configuration works unchanged, and says that it programs its
/// eBPF dataplane instead.
const KUBE_PROXY_MODES: [&str; 4] = ["", "iptables", "ipvs", "nftables"];

/// Checks a kube-proxy mode (`mode` or `--proxy-mode`) and returns the one-line note about it.
pub(super) fn check_mode(setting: &'static str, mode: &str) -> Result<String, ConfigError> {
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
pub(super) fn parse_cidr_pair(
    setting: &'static str,
    text: &str,
) -> Result<Vec<IpNet>, ConfigError> {
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
pub(super) fn parse_nodeport_addresses(
    entries: &[String],
) -> Result<NodePortAddresses, ConfigError> {
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

pub(super) fn parse_bind_address(
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

pub(super) fn duration_setting(setting: &'static str, text: &str) -> Result<Duration, ConfigError> {
    parse_duration(text).map_err(|_| ConfigError::Invalid {
        setting,
        value: text.to_owned(),
        expected: "a duration like 30s or 15m0s",
    })
}

/// A duration from the file, where 0 (kubeadm writes `0s`) means unset: kube-proxy's v1alpha1
/// defaulting replaces a zero period by its default.
pub(super) fn file_duration(
    setting: &'static str,
    text: &str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let period = duration_setting(setting, text)?;
    Ok(if period.is_zero() { default } else { period })
}
