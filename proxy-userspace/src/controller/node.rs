//! The node's part of the maps: the CONFIG value and the local-traffic detector's interfaces,
//! from the dataplane settings, the model's configuration and this namespace's interfaces.

use proxy_common::{
    CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS, CONFIG_F_DEBUG, CONFIG_F_FAST_PATH, ConfigValue,
    DETECT_LOCAL_CIDR, DETECT_LOCAL_IFINDEX, DETECT_LOCAL_NONE, FAMILY_IPV4, addr_from_ip,
};

use crate::model::{DesiredState, LocalTrafficDetector, ModelConfig};
use crate::port_range::PortRange;
use crate::reconcile::NodeEntries;

/// How the loaded dataplane behaves, fixed for the process's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataplaneSettings {
    /// The network namespace the socket hooks act in.
    pub netns_cookie: u64,
    /// Where SNAT source ports are taken from.
    pub snat_ports: PortRange,
    /// Log every new flow's decision from the kernel.
    pub debug: bool,
    /// Deliver translated packets straight to their interface (`run`; a trace's test runs
    /// have no interface to deliver to).
    pub fast_path: bool,
}

/// One interface of this network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
}

/// Whether the interface-based detector `detector` calls traffic from `interface` pod traffic.
fn is_pod_interface(detector: &LocalTrafficDetector, interface: &Interface) -> bool {
    match detector {
        LocalTrafficDetector::InterfaceNamePrefix { prefix } => {
            interface.name.starts_with(prefix.as_str())
        }
        LocalTrafficDetector::BridgeInterface { name } => interface.name == *name,
        LocalTrafficDetector::None | LocalTrafficDetector::SourceCidrs { .. } => false,
    }
}

/// The CONFIG value and the detector's interfaces for `state`.
pub fn node_entries(
    settings: &DataplaneSettings,
    model_config: &ModelConfig,
    state: &DesiredState,
    interfaces: &[Interface],
) -> NodeEntries {
    let detector = &state.local_traffic_detector;
    let mut config = ConfigValue {
        netns_cookie: settings.netns_cookie,
        snat_port_min: settings.snat_ports.first,
        snat_port_max: settings.snat_ports.last,
        detect_local_mode: match detector {
            LocalTrafficDetector::None => DETECT_LOCAL_NONE,
            LocalTrafficDetector::SourceCidrs { .. } => DETECT_LOCAL_CIDR,
            LocalTrafficDetector::InterfaceNamePrefix { .. }
            | LocalTrafficDetector::BridgeInterface { .. } => DETECT_LOCAL_IFINDEX,
        },
        ..ConfigValue::default()
    };
    for (flag, on) in [
        (CONFIG_F_DEBUG, settings.debug),
        (CONFIG_F_FAST_PATH, settings.fast_path),
        (
            CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS,
            state.address_rules.cluster_ips_outside_service_cidrs(),
        ),
    ] {
        if on {
            config.flags |= flag;
        }
    }
    for ip in &model_config.node_ips {
        let (addr, family) = addr_from_ip(*ip);
        if family == FAMILY_IPV4 {
            config.node_ipv4 = addr;
        } else {
            config.node_ipv6 = addr;
        }
    }
    NodeEntries {
        config,
        local_ifindexes: interfaces
            .iter()
            .filter(|interface| is_pod_interface(detector, interface))
            .map(|interface| interface.index)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn settings() -> DataplaneSettings {
        DataplaneSettings {
            netns_cookie: 7,
            snat_ports: PortRange {
                first: 61000,
                last: 65535,
            },
            debug: false,
            fast_path: true,
        }
    }

    fn interfaces() -> Vec<Interface> {
        [
            ("lo", 1),
            ("eth0", 2),
            ("veth1a", 3),
            ("veth2b", 4),
            ("cni0", 5),
        ]
        .into_iter()
        .map(|(name, index)| Interface {
            name: name.into(),
            index,
        })
        .collect()
    }

    #[test]
    fn detectors_pick_their_interfaces_and_mode() {
        let cases: [(LocalTrafficDetector, u8, &[u32]); 4] = [
            (LocalTrafficDetector::None, DETECT_LOCAL_NONE, &[]),
            (
                LocalTrafficDetector::SourceCidrs {
                    cidrs: vec!["10.244.0.0/16".parse().unwrap()],
                },
                DETECT_LOCAL_CIDR,
                &[],
            ),
            (
                LocalTrafficDetector::InterfaceNamePrefix {
                    prefix: "veth".into(),
                },
                DETECT_LOCAL_IFINDEX,
                &[3, 4],
            ),
            (
                LocalTrafficDetector::BridgeInterface {
                    name: "cni0".into(),
                },
                DETECT_LOCAL_IFINDEX,
                &[5],
            ),
        ];
        for (detector, mode, ifindexes) in cases {
            let state = DesiredState {
                local_traffic_detector: detector.clone(),
                ..DesiredState::default()
            };
            let entries = node_entries(&settings(), &ModelConfig::default(), &state, &interfaces());
            assert_eq!(entries.config.detect_local_mode, mode, "{detector:?}");
            let mut got: Vec<u32> = entries.local_ifindexes.into_iter().collect();
            got.sort_unstable();
            assert_eq!(got, ifindexes, "{detector:?}");
        }
    }

    #[test]
    fn config_carries_settings_node_ips_and_flags() {
        let model_config = ModelConfig {
            node_ips: vec![
                "192.168.1.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap(),
            ],
            ..ModelConfig::default()
        };
        let mut state = DesiredState::default();
        state.address_rules.cluster_ips = vec!["10.0.0.1".parse().unwrap()];
        let config = node_entries(&settings(), &model_config, &state, &[]).config;
        assert_eq!(config.netns_cookie, 7);
        assert_eq!((config.snat_port_min, config.snat_port_max), (61000, 65535));
        assert_eq!(config.node_ipv4, addr_from_ip(model_config.node_ips[0]).0);
        assert_eq!(config.node_ipv6, addr_from_ip(model_config.node_ips[1]).0);
        assert_eq!(
            config.flags,
            CONFIG_F_FAST_PATH | CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS
        );
    }
}
