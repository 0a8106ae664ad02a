//! The model's inputs besides the cluster objects: what kube-proxy's proxier is constructed
//! with. Pure data; `crate::config` builds it from flags, the config file and the Node.

use std::net::IpAddr;

use ipnet::IpNet;

use super::types::{IpFamily, LocalTrafficDetector};

/// kube-proxy's `--nodeport-addresses`, already split into its keyword and its CIDRs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePortAddresses {
    /// The `primary` keyword: the node's primary IP of each family.
    pub primary: bool,
    /// Explicit CIDRs (the `all` and `localhost` keywords arrive here expanded).
    pub cidrs: Vec<IpNet>,
}

impl NodePortAddresses {
    /// The nftables proxier's default when the flag is unset.
    pub fn primary() -> NodePortAddresses {
        NodePortAddresses {
            primary: true,
            cidrs: Vec::new(),
        }
    }

    /// The addresses of `family` that NodePorts are served on, following kube-proxy: `primary`
    /// stands for the family's primary node IP (`server.go` turns it into `IP/32` / `IP/128`),
    /// and a family without one gets no CIDR; then `NewNodePortAddresses` + `GetNodeIPs`: CIDRs
    /// of other families are ignored, a family with no CIDR or a zero CIDR matches every
    /// address. Loopback addresses are never served (the nftables proxier refuses localhost
    /// NodePorts, even through an explicit CIDR).
    pub fn resolve(
        &self,
        family: IpFamily,
        node_ips: &[IpAddr],
        local_addresses: &[IpAddr],
    ) -> Vec<IpAddr> {
        let of_family = |addr: &&IpAddr| IpFamily::of(**addr) == family;
        let primary = self.primary_ip(family, node_ips);
        let mut addresses: Vec<IpAddr> = if self.matches_all(family, node_ips) {
            local_addresses
                .iter()
                .chain(node_ips.iter())
                .filter(of_family)
                .copied()
                .collect()
        } else if let Some(primary) = primary {
            vec![primary]
        } else {
            let cidrs: Vec<&IpNet> = self.family_cidrs(family).collect();
            local_addresses
                .iter()
                .chain(node_ips.iter())
                .filter(of_family)
                .filter(|addr| cidrs.iter().any(|cidr| cidr.contains(*addr)))
                .copied()
                .collect()
        };
        addresses.retain(|addr| !addr.is_loopback());
        addresses.sort_unstable();
        addresses.dedup();
        addresses
    }

    /// The family's primary node IP when `primary` applies to it (never loopback).
    fn primary_ip(&self, family: IpFamily, node_ips: &[IpAddr]) -> Option<IpAddr> {
        node_ips
            .iter()
            .copied()
            .find(|ip| IpFamily::of(*ip) == family)
            .filter(|ip| self.primary && !ip.is_loopback())
    }

    fn family_cidrs(&self, family: IpFamily) -> impl Iterator<Item = &IpNet> {
        self.cidrs
            .iter()
            .filter(move |cidr| IpFamily::of(cidr.addr()) == family)
    }

    /// kube-proxy's `MatchAll` for `family`: a zero CIDR, or no CIDR of the family at all (a
    /// `primary` whose family has no primary IP included).
    pub fn matches_all(&self, family: IpFamily, node_ips: &[IpAddr]) -> bool {
        let mut cidrs = self.family_cidrs(family).peekable();
        if self.primary_ip(family, node_ips).is_some() {
            return false;
        }
        cidrs.peek().is_none() || self.family_cidrs(family).any(|cidr| cidr.prefix_len() == 0)
    }
}

/// Everything kube-proxy's decisions need besides Services and EndpointSlices. Rebuild it when
/// the Node changes (zone label, addresses, pod CIDRs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelConfig {
    /// This node's name: an endpoint whose `nodeName` equals it is local.
    pub hostname: String,
    /// The node's primary IP of each family (`--bind-address`, else the Node's first
    /// InternalIP, else ExternalIP, of each family).
    pub node_ips: Vec<IpAddr>,
    /// Every address on the node's interfaces (for `--nodeport-addresses` CIDR matching).
    pub local_addresses: Vec<IpAddr>,
    pub nodeport_addresses: NodePortAddresses,
    /// The node's `topology.kubernetes.io/zone` label (for zone hints).
    pub zone: Option<String>,
    pub local_traffic_detector: LocalTrafficDetector,
    /// `--masquerade-all`: SNAT all traffic sent to ClusterIPs.
    pub masquerade_all: bool,
    /// `--service-cluster-ip-range` when given explicitly (empty otherwise): dropped in
    /// addition to the snapshot's ServiceCIDR objects, as kube-proxy does.
    pub service_cidrs: Vec<IpNet>,
}

impl ModelConfig {
    /// Where health check NodePorts listen (kube-proxy's `ServiceHealthServer`): the NodePort
    /// addresses, or `::` (dual-stack: every address of both families, as Go's "0.0.0.0"
    /// listener kube-proxy opens) when `--nodeport-addresses` matches every address of a
    /// family.
    pub fn health_check_listen_ips(&self) -> Vec<IpAddr> {
        let matches_all = |family| self.nodeport_addresses.matches_all(family, &self.node_ips);
        if matches_all(IpFamily::IPv4) || matches_all(IpFamily::IPv6) {
            return vec![IpAddr::from([0u16; 8])];
        }
        [IpFamily::IPv4, IpFamily::IPv6]
            .into_iter()
            .flat_map(|family| {
                self.nodeport_addresses
                    .resolve(family, &self.node_ips, &self.local_addresses)
            })
            .collect()
    }

    pub fn primary_node_ip(&self, family: IpFamily) -> Option<IpAddr> {
        self.node_ips
            .iter()
            .copied()
            .find(|ip| IpFamily::of(*ip) == family)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|net| net.parse().unwrap()).collect()
    }

    #[test]
    fn nodeport_addresses_follow_kube_proxy() {
        let node_ips = ips(&["192.168.1.10", "fd00::10"]);
        let local = ips(&[
            "127.0.0.1",
            "192.168.1.10",
            "10.0.0.5",
            "::1",
            "fd00::10",
            "fd01::7",
        ]);
        // (case, setting, family, expected addresses)
        let cases: Vec<(&str, NodePortAddresses, IpFamily, Vec<IpAddr>)> = vec![
            (
                "primary: only the primary IPv4",
                NodePortAddresses::primary(),
                IpFamily::IPv4,
                ips(&["192.168.1.10"]),
            ),
            (
                "primary: only the primary IPv6",
                NodePortAddresses::primary(),
                IpFamily::IPv6,
                ips(&["fd00::10"]),
            ),
            (
                "no CIDR of the family and no primary: every non-loopback address",
                NodePortAddresses {
                    primary: false,
                    cidrs: nets(&["fd00::/64"]),
                },
                IpFamily::IPv4,
                ips(&["10.0.0.5", "192.168.1.10"]),
            ),
            (
                "all (0.0.0.0/0): every non-loopback address",
                NodePortAddresses {
                    primary: false,
                    cidrs: nets(&["0.0.0.0/0", "10.0.0.0/8"]),
                },
                IpFamily::IPv4,
                ips(&["10.0.0.5", "192.168.1.10"]),
            ),
            (
                "a CIDR: the addresses inside it",
                NodePortAddresses {
                    primary: false,
                    cidrs: nets(&["10.0.0.0/8"]),
                },
                IpFamily::IPv4,
                ips(&["10.0.0.5"]),
            ),
            (
                "an explicit localhost CIDR: no NodePort on loopback (nftables refuses them)",
                NodePortAddresses {
                    primary: false,
                    cidrs: nets(&["127.0.0.0/8", "10.0.0.0/8"]),
                },
                IpFamily::IPv4,
                ips(&["10.0.0.5"]),
            ),
            (
                "::1/128 alone: nothing",
                NodePortAddresses {
                    primary: false,
                    cidrs: nets(&["::1/128"]),
                },
                IpFamily::IPv6,
                ips(&[]),
            ),
        ];
        for (case, setting, family, expected) in cases {
            assert_eq!(
                setting.resolve(family, &node_ips, &local),
                expected,
                "{case}"
            );
        }
        // primary on a node without an IPv6 node IP: that family gets no CIDR, so every
        // IPv6 address (not one picked from the local ones).
        let v4_only = ips(&["192.168.1.10"]);
        assert_eq!(
            NodePortAddresses::primary().resolve(IpFamily::IPv6, &v4_only, &local),
            ips(&["fd00::10", "fd01::7"])
        );
        assert_eq!(
            NodePortAddresses::primary().resolve(IpFamily::IPv4, &v4_only, &local),
            ips(&["192.168.1.10"])
        );
    }

    #[test]
    fn health_checks_listen_on_nodeport_addresses() {
        let config = |nodeport_addresses| ModelConfig {
            node_ips: ips(&["192.168.1.10", "fd00::10"]),
            local_addresses: ips(&["192.168.1.10", "10.0.0.5", "fd00::10"]),
            nodeport_addresses,
            ..ModelConfig::default()
        };
        // (case, setting, expected listen addresses)
        for (case, setting, expected) in [
            (
                "primary: the primary IP of each family",
                NodePortAddresses::primary(),
                ips(&["192.168.1.10", "fd00::10"]),
            ),
            (
                "a CIDR of one family only: the other family matches everything (dual-stack)",
                NodePortAddresses {
                    primary: false,
                    cidrs: nets(&["10.0.0.0/8"]),
                },
                ips(&["::"]),
            ),
            (
                "CIDRs of both families: the matching addresses",
                NodePortAddresses {
                    primary: false,
                    cidrs: nets(&["10.0.0.0/8", "fd00::/64"]),
                },
                ips(&["10.0.0.5", "fd00::10"]),
            ),
        ] {
            assert_eq!(
                config(setting).health_check_listen_ips(),
                expected,
                "{case}"
            );
        }
    }
}
