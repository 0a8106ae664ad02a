//! Programming a loaded dataplane from a desired state: the one path `run` and `trace` share,
//! so the maps `trace` exercises are exactly the maps `run` would hold.

use std::collections::HashSet;

use anyhow::Context as _;
use proxy_common::{
    CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS, CONFIG_F_DEBUG, CONFIG_F_FAST_PATH,
    DETECT_LOCAL_CIDR, DETECT_LOCAL_IFINDEX, DETECT_LOCAL_NONE, FAMILY_IPV4, addr_from_ip,
};
use proxy_userspace::dataplane::{self, Maps};
use proxy_userspace::model::{DesiredState, LocalTrafficDetector, ModelConfig};
use proxy_userspace::reconcile::{Reconciler, SyncReport};
use proxy_userspace::source::manifests::PortRange;

/// `run`'s default SNAT source ports: above Linux's ephemeral range (32768-60999) and outside
/// the NodePort range, so masqueraded flows never take a port a local socket was given.
pub const DEFAULT_SNAT_PORTS: PortRange = PortRange {
    first: 61000,
    last: 65535,
};

/// The dataplane part of the CONFIG map (this network namespace, SNAT ports, kernel debug
/// logging, fast-path delivery of translated packets), written once after loading.
pub fn program_dataplane_config(
    maps: &mut Maps,
    snat_ports: PortRange,
    debug: bool,
    fast_path: bool,
) -> anyhow::Result<()> {
    let cookie = dataplane::netns_cookie()?;
    maps.update_config(|config| {
        config.netns_cookie = cookie;
        (config.snat_port_min, config.snat_port_max) = (snat_ports.first, snat_ports.last);
    })?;
    set_config_flag(maps, CONFIG_F_DEBUG, debug)?;
    set_config_flag(maps, CONFIG_F_FAST_PATH, fast_path)
}

/// Programs `state`: the node part of CONFIG, then every Service entry through the reconciler
/// (which writes only what differs from what it programmed before).
pub fn program_state(
    maps: &mut Maps,
    reconciler: &mut Reconciler,
    model_config: &ModelConfig,
    state: &DesiredState,
) -> anyhow::Result<SyncReport> {
    program_node_config(maps, model_config, state)?;
    // A ClusterIP outside the service CIDRs needs the VIPS lookup for every destination: turn it
    // on before such a ClusterIP is written, off only once the CIDRs covering them are.
    let outside = state.address_rules.cluster_ips_outside_service_cidrs();
    if outside {
        set_config_flag(maps, CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS, true)?;
    }
    let report = reconciler.sync(state, maps);
    if !outside {
        set_config_flag(maps, CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS, false)?;
    }
    Ok(report)
}

fn set_config_flag(maps: &mut Maps, flag: u32, on: bool) -> anyhow::Result<()> {
    maps.update_config(|config| {
        if on {
            config.flags |= flag;
        } else {
            config.flags &= !flag;
        }
    })?;
    Ok(())
}

/// The node part of the CONFIG map: masquerade addresses and the local-traffic detector mode.
fn program_node_config(
    maps: &mut Maps,
    model_config: &ModelConfig,
    state: &DesiredState,
) -> anyhow::Result<()> {
    let mode = match state.local_traffic_detector {
        LocalTrafficDetector::None => DETECT_LOCAL_NONE,
        LocalTrafficDetector::SourceCidrs { .. } => DETECT_LOCAL_CIDR,
        LocalTrafficDetector::InterfaceNamePrefix { .. }
        | LocalTrafficDetector::BridgeInterface { .. } => DETECT_LOCAL_IFINDEX,
    };
    maps.update_config(|config| {
        config.node_ipv4 = [0; 4];
        config.node_ipv6 = [0; 4];
        for ip in &model_config.node_ips {
            let (addr, family) = addr_from_ip(*ip);
            if family == FAMILY_IPV4 {
                config.node_ipv4 = addr;
            } else {
                config.node_ipv6 = addr;
            }
        }
        config.detect_local_mode = mode;
    })?;
    Ok(())
}

/// The interface-based local-traffic detectors: the ifindexes of matching interfaces.
pub fn program_local_ifindexes(
    maps: &mut Maps,
    detector: &LocalTrafficDetector,
) -> anyhow::Result<()> {
    let wanted: HashSet<u32> = nix::net::if_::if_nameindex()
        .context("listing interfaces")?
        .iter()
        .filter(|i| {
            let name = i.name().to_string_lossy();
            match detector {
                LocalTrafficDetector::InterfaceNamePrefix { prefix } => {
                    name.starts_with(prefix.as_str())
                }
                LocalTrafficDetector::BridgeInterface { name: bridge } => name == bridge.as_str(),
                LocalTrafficDetector::None | LocalTrafficDetector::SourceCidrs { .. } => false,
            }
        })
        .map(nix::net::if_::Interface::index)
        .collect();
    let programmed: HashSet<u32> = maps.local_ifindex_entries()?.into_iter().collect();
    for ifindex in wanted.difference(&programmed) {
        maps.add_local_ifindex(*ifindex)?;
    }
    for ifindex in programmed.difference(&wanted) {
        maps.delete_local_ifindex(*ifindex)?;
    }
    Ok(())
}
