//! What the node's network namespace holds: its addresses and interfaces.

use std::net::IpAddr;

use crate::controller::Interface;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("listing interface addresses: {0}")]
    Addresses(#[source] nix::Error),
    #[error("listing interfaces: {0}")]
    Interfaces(#[source] nix::Error),
}

/// The addresses on this network namespace's interfaces (NodePort addresses, masquerade source).
pub fn local_addresses() -> Result<Vec<IpAddr>, HostError> {
    let mut addrs: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map_err(HostError::Addresses)?
        .filter_map(|ifa| ifa.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// This network namespace's interfaces (for the interface-based local-traffic detectors).
pub fn local_interfaces() -> Result<Vec<Interface>, HostError> {
    Ok(nix::net::if_::if_nameindex()
        .map_err(HostError::Interfaces)?
        .iter()
        .map(|i| Interface {
            name: i.name().to_string_lossy().into_owned(),
            index: i.index(),
        })
        .collect())
}
