//! The typed map API the reconciler programs the kernel through. It opens the maps pinned
//! under the pin path, so the running proxy, tests and `kube-ebpf-proxy trace` all see the same
//! kernel state. Every write touches one entry: programming one service is O(its endpoints)
//! writes, and nothing here ever walks a map except the explicit read-backs (`*_entries`) used
//! for a resync and the conntrack walks of the garbage collector.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError};
use ipnet::IpNet;
use proxy_common::{
    AFFINITY_BACKENDS_MAP, AFFINITY_MAP, Addr, AffinityBackendKey, AffinityKey, AffinityValue,
    BACKENDS_MAP, Backend, CONFIG_MAP, CONNTRACK_MAP, ConfigValue, CtKey, CtValue, IPPROTO_UDP,
    LOCAL_CIDR_PREFIX_BASE, LOCAL_CIDRS_MAP, LOCAL_IFINDEXES_MAP, LocalCidrData, PRESENT,
    SERVICE_CIDRS_MAP, SERVICES_MAP, SOURCE_RANGES_MAP, ServiceKey, ServiceValue, SourceRangeData,
    VIPS_MAP, VipKey, VipValue,
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("opening the pinned map {path}: {source}")]
    Open { path: PathBuf, source: MapError },
    #[error("{operation} in map {map}: {source}")]
    Access {
        operation: &'static str,
        map: &'static str,
        source: MapError,
    },
}

pub use proxy_common::{addr_from_ip, ip_from_addr};

/// The maps pinned by a loaded dataplane, typed.
pub struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    affinity_backends: HashMap<MapData, AffinityBackendKey, u32>,
    source_ranges: LpmTrie<MapData, SourceRangeData, u32>,
    local_cidrs: LpmTrie<MapData, LocalCidrData, u32>,
    local_ifindexes: HashMap<MapData, u32, u32>,
    vips: HashMap<MapData, VipKey, VipValue>,
    service_cidrs: LpmTrie<MapData, LocalCidrData, u32>,
    config: Array<MapData, ConfigValue>,
}

pub(super) fn open<T>(
    pin_path: &Path,
    name: &'static str,
    wrap: fn(MapData) -> Map,
) -> Result<T, MapsError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = pin_path.join(name);
    let data = MapData::from_pin(&path).map_err(|source| MapsError::Open {
        path: path.clone(),
        source,
    })?;
    T::try_from(wrap(data)).map_err(|source| MapsError::Open { path, source })
}

pub(super) fn access(
    operation: &'static str,
    map: &'static str,
) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Access {
        operation,
        map,
        source,
    }
}

/// A delete of an absent key is not an error: deletes are idempotent for the reconciler.
fn deleted(result: Result<(), MapError>, map: &'static str) -> Result<(), MapsError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other.map_err(access("delete", map)),
    }
}

pub(super) fn collect<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, MapsError> {
    map.iter()
        .filter_map(|r| match r {
            // An entry deleted between the key walk and its read.
            Err(MapError::KeyNotFound) => None,
            other => Some(other),
        })
        .collect::<Result<_, _>>()
        .map_err(access("iterate", name))
}

fn local_cidr_key(net: IpNet) -> LpmKey<LocalCidrData> {
    let (addr, family) = addr_from_ip(net.network());
    LpmKey::new(
        LOCAL_CIDR_PREFIX_BASE + u32::from(net.prefix_len()),
        LocalCidrData {
            family,
            _pad: [0; 3],
            addr,
        },
    )
}

fn source_range_key(service_id: u32, net: IpNet) -> LpmKey<SourceRangeData> {
    let (addr, _) = addr_from_ip(net.network());
    LpmKey::new(
        32 + u32::from(net.prefix_len()),
        SourceRangeData {
            service_id_be: service_id.to_be(),
            addr,
        },
    )
}

/// The CIDRs held by an LPM map of `LocalCidrData` keys.
fn cidr_entries(
    map: &LpmTrie<MapData, LocalCidrData, u32>,
    name: &'static str,
) -> Result<Vec<IpNet>, MapsError> {
    map.keys()
        .map(|k| {
            k.map(|k| {
                let data = k.data();
                let ip = ip_from_addr(&data.addr, data.family);
                let prefix = (k.prefix_len() - LOCAL_CIDR_PREFIX_BASE) as u8;
                IpNet::new(ip, prefix).expect("the prefix came from a valid IpNet")
            })
        })
        .collect::<Result<_, _>>()
        .map_err(access("iterate", name))
}

/// How many frontends (address, port, protocol) `services` program: their policy-scope
/// service entries, so a frontend that also has a cluster-scope entry counts once.
pub fn count_frontends(services: &[(ServiceKey, ServiceValue)]) -> usize {
    services
        .iter()
        .filter(|(key, _)| key.slot == 0 && key.scope == proxy_common::SCOPE_POLICY)
        .count()
}

/// How full the pinned maps are: what `stats` prints and `/metrics` exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFill {
    /// See [`count_frontends`].
    pub frontends: usize,
    /// Service entries naming a backend (slots 1..), every scope.
    pub backend_slots: usize,
    pub backends: usize,
    pub conntrack_entries: usize,
    pub conntrack_max_entries: u32,
    /// See [`super::orphan_entries`].
    pub conntrack_orphan_entries: usize,
}

impl Maps {
    /// Reads how full the maps are (one pass over each).
    pub fn fill(&self) -> Result<MapFill, MapsError> {
        let services = self.service_entries()?;
        let conntrack = self.conntrack_entries()?;
        Ok(MapFill {
            frontends: count_frontends(&services),
            backend_slots: services.iter().filter(|(k, _)| k.slot != 0).count(),
            backends: self.backend_entries()?.len(),
            conntrack_entries: conntrack.len(),
            conntrack_max_entries: self.conntrack_max_entries()?,
            conntrack_orphan_entries: super::orphan_entries(&conntrack),
        })
    }

    /// Opens the maps pinned under `pin_path` by a loaded dataplane.
    pub fn open(pin_path: &Path) -> Result<Self, MapsError> {
        Ok(Self {
            services: open(pin_path, SERVICES_MAP, Map::HashMap)?,
            backends: open(pin_path, BACKENDS_MAP, Map::HashMap)?,
            conntrack: open(pin_path, CONNTRACK_MAP, Map::LruHashMap)?,
            affinity: open(pin_path, AFFINITY_MAP, Map::LruHashMap)?,
            affinity_backends: open(pin_path, AFFINITY_BACKENDS_MAP, Map::HashMap)?,
            source_ranges: open(pin_path, SOURCE_RANGES_MAP, Map::LpmTrie)?,
            local_cidrs: open(pin_path, LOCAL_CIDRS_MAP, Map::LpmTrie)?,
            local_ifindexes: open(pin_path, LOCAL_IFINDEXES_MAP, Map::HashMap)?,
            vips: open(pin_path, VIPS_MAP, Map::HashMap)?,
            service_cidrs: open(pin_path, SERVICE_CIDRS_MAP, Map::LpmTrie)?,
            config: open(pin_path, CONFIG_MAP, Map::Array)?,
        })
    }

    // ---- services: slot 0 entries and backend slots (see proxy-common's module doc) ----

    /// Writes one `SERVICES` entry: a service entry (slot 0) or a backend slot (value `id` =
    /// backend id). Write the slots before the slot-0 entry whose `count` covers them, and
    /// lower `count` before deleting slots, so the program never picks a missing slot.
    pub fn upsert_service_entry(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), MapsError> {
        self.services
            .insert(key, value, 0)
            .map_err(access("upsert", SERVICES_MAP))
    }

    pub fn delete_service_entry(&mut self, key: &ServiceKey) -> Result<(), MapsError> {
        deleted(self.services.remove(key), SERVICES_MAP)
    }

    /// Every `SERVICES` entry, for a resync.
    pub fn service_entries(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapsError> {
        collect(&self.services, SERVICES_MAP)
    }

    // ---- backends ----

    pub fn upsert_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapsError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(access("upsert", BACKENDS_MAP))
    }

    /// Deletes a backend. Established flows to it re-balance on their next packet; call
    /// [`Maps::cleanup_flows_to_backend`] too so their conntrack entries go at once.
    pub fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        deleted(self.backends.remove(&id), BACKENDS_MAP)
    }

    pub fn backend_entries(&self) -> Result<Vec<(u32, Backend)>, MapsError> {
        collect(&self.backends, BACKENDS_MAP)
    }

    // ---- VIPs ----

    pub fn upsert_vip(&mut self, ip: IpAddr, flags: u8) -> Result<(), MapsError> {
        let (addr, family) = addr_from_ip(ip);
        let key = VipKey {
            addr,
            family,
            _pad: [0; 3],
        };
        let value = VipValue {
            flags,
            _pad: [0; 3],
        };
        self.vips
            .insert(key, value, 0)
            .map_err(access("upsert", VIPS_MAP))
    }

    pub fn delete_vip(&mut self, ip: IpAddr) -> Result<(), MapsError> {
        let (addr, family) = addr_from_ip(ip);
        let key = VipKey {
            addr,
            family,
            _pad: [0; 3],
        };
        deleted(self.vips.remove(&key), VIPS_MAP)
    }

    pub fn vip_entries(&self) -> Result<Vec<(IpAddr, u8)>, MapsError> {
        Ok(collect(&self.vips, VIPS_MAP)?
            .into_iter()
            .map(|(k, v)| (ip_from_addr(&k.addr, k.family), v.flags))
            .collect())
    }

    // ---- loadBalancerSourceRanges ----

    /// Allows `range` for the service `service_id` (entries with `SVC_F_SOURCE_RANGES` drop
    /// every source no allowed range contains). Only ranges of the service id's own family:
    /// the trie key has no family, so an IPv4 `0.0.0.0/0` under an IPv6 service id would
    /// match every IPv6 source.
    pub fn allow_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), MapsError> {
        self.source_ranges
            .insert(&source_range_key(service_id, range), PRESENT, 0)
            .map_err(access("upsert", SOURCE_RANGES_MAP))
    }

    pub fn delete_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), MapsError> {
        deleted(
            self.source_ranges
                .remove(&source_range_key(service_id, range)),
            SOURCE_RANGES_MAP,
        )
    }

    /// (service id, range) pairs; the family of a range is recovered from its prefix length
    /// and address only when they are unambiguous, so this returns raw keys.
    pub fn source_range_entries(&self) -> Result<Vec<(u32, u32, Addr)>, MapsError> {
        self.source_ranges
            .keys()
            .map(|k| {
                k.map(|k| {
                    let data = k.data();
                    (
                        u32::from_be(data.service_id_be),
                        k.prefix_len() - 32,
                        data.addr,
                    )
                })
            })
            .collect::<Result<_, _>>()
            .map_err(access("iterate", SOURCE_RANGES_MAP))
    }

    // ---- local-traffic detector ----

    pub fn add_local_cidr(&mut self, cidr: IpNet) -> Result<(), MapsError> {
        self.local_cidrs
            .insert(&local_cidr_key(cidr), PRESENT, 0)
            .map_err(access("upsert", LOCAL_CIDRS_MAP))
    }

    pub fn delete_local_cidr(&mut self, cidr: IpNet) -> Result<(), MapsError> {
        deleted(
            self.local_cidrs.remove(&local_cidr_key(cidr)),
            LOCAL_CIDRS_MAP,
        )
    }

    pub fn local_cidr_entries(&self) -> Result<Vec<IpNet>, MapsError> {
        cidr_entries(&self.local_cidrs, LOCAL_CIDRS_MAP)
    }

    // ---- service CIDRs (unallocated addresses in them are dropped) ----

    pub fn add_service_cidr(&mut self, cidr: IpNet) -> Result<(), MapsError> {
        self.service_cidrs
            .insert(&local_cidr_key(cidr), PRESENT, 0)
            .map_err(access("upsert", SERVICE_CIDRS_MAP))
    }

    pub fn delete_service_cidr(&mut self, cidr: IpNet) -> Result<(), MapsError> {
        deleted(
            self.service_cidrs.remove(&local_cidr_key(cidr)),
            SERVICE_CIDRS_MAP,
        )
    }

    pub fn service_cidr_entries(&self) -> Result<Vec<IpNet>, MapsError> {
        cidr_entries(&self.service_cidrs, SERVICE_CIDRS_MAP)
    }

    pub fn add_local_ifindex(&mut self, ifindex: u32) -> Result<(), MapsError> {
        self.local_ifindexes
            .insert(ifindex, PRESENT, 0)
            .map_err(access("upsert", LOCAL_IFINDEXES_MAP))
    }

    pub fn delete_local_ifindex(&mut self, ifindex: u32) -> Result<(), MapsError> {
        deleted(self.local_ifindexes.remove(&ifindex), LOCAL_IFINDEXES_MAP)
    }

    pub fn local_ifindex_entries(&self) -> Result<Vec<u32>, MapsError> {
        Ok(collect(&self.local_ifindexes, LOCAL_IFINDEXES_MAP)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    // ---- config ----

    pub fn config(&self) -> Result<ConfigValue, MapsError> {
        self.config.get(&0, 0).map_err(access("read", CONFIG_MAP))
    }

    pub fn set_config(&mut self, config: &ConfigValue) -> Result<(), MapsError> {
        self.config
            .set(0, config, 0)
            .map_err(access("write", CONFIG_MAP))
    }

    /// Read-modify-write of the config (the proxy owns `netns_cookie`; the reconciler the rest).
    pub fn update_config(&mut self, f: impl FnOnce(&mut ConfigValue)) -> Result<(), MapsError> {
        let mut config = self.config()?;
        f(&mut config);
        self.set_config(&config)
    }

    // ---- conntrack ----

    /// Every conntrack entry, read in batches where the kernel supports it.
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtValue)>, MapsError> {
        let batched = super::batch::lookup_all(aya::maps::IterableMap::map(&self.conntrack))
            .map_err(|io_error| MapsError::Access {
                operation: "batch lookup",
                map: CONNTRACK_MAP,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error,
                }),
            })?;
        match batched {
            Some(entries) => Ok(entries),
            None => collect(&self.conntrack, CONNTRACK_MAP),
        }
    }

    /// The conntrack map's size (its fill is `conntrack_entries().len()` of this).
    pub fn conntrack_max_entries(&self) -> Result<u32, MapsError> {
        aya::maps::IterableMap::map(&self.conntrack)
            .info()
            .map(|info| info.max_entries())
            .map_err(access("read the info of", CONNTRACK_MAP))
    }

    pub fn delete_conntrack(&mut self, key: &CtKey) -> Result<(), MapsError> {
        deleted(self.conntrack.remove(key), CONNTRACK_MAP)
    }

    /// Deletes the conntrack entries (both directions) of UDP flows to backend `id`: kube-proxy's
    /// cleanup of stale UDP flows when an endpoint goes away, so UDP clients that keep their
    /// socket are not blackholed. TCP and SCTP flows are left to end on their own, as kube-proxy
    /// leaves them. Returns the number of entries deleted.
    pub fn cleanup_flows_to_backend(&mut self, id: u32) -> Result<usize, MapsError> {
        self.cleanup_flows_to_backends(&std::collections::HashSet::from([id]))
    }

    /// [`Maps::cleanup_flows_to_backend`] for many backends in one walk of the conntrack map
    /// (a walk costs two syscalls per entry: do it once per sync, not once per backend).
    pub fn cleanup_flows_to_backends(
        &mut self,
        ids: &std::collections::HashSet<u32>,
    ) -> Result<usize, MapsError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let stale: Vec<CtKey> = self
            .conntrack_entries()?
            .into_iter()
            // kube-proxy's stale-endpoint cleanup is for UDP only: TCP and SCTP connections keep
            // their endpoint until they end.
            .filter(|(k, v)| k.proto == IPPROTO_UDP && ids.contains(&v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for key in &stale {
            self.delete_conntrack(key)?;
        }
        Ok(stale.len())
    }

    // ---- affinity ----

    pub fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, MapsError> {
        collect(&self.affinity, AFFINITY_MAP)
    }

    pub fn delete_affinity(&mut self, key: &AffinityKey) -> Result<(), MapsError> {
        deleted(self.affinity.remove(key), AFFINITY_MAP)
    }

    /// Marks a backend eligible for the affinity entries of a service port's endpoint set.
    pub fn insert_affinity_backend(&mut self, key: &AffinityBackendKey) -> Result<(), MapsError> {
        self.affinity_backends
            .insert(key, PRESENT, 0)
            .map_err(access("upsert", AFFINITY_BACKENDS_MAP))
    }

    pub fn delete_affinity_backend(&mut self, key: &AffinityBackendKey) -> Result<(), MapsError> {
        deleted(self.affinity_backends.remove(key), AFFINITY_BACKENDS_MAP)
    }

    pub fn affinity_backend_entries(&self) -> Result<Vec<AffinityBackendKey>, MapsError> {
        Ok(collect(&self.affinity_backends, AFFINITY_BACKENDS_MAP)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::{SCOPE_CLUSTER, SCOPE_POLICY};

    use super::*;

    #[test]
    fn addresses_round_trip_in_network_order() {
        for ip in ["10.96.0.1", "192.0.2.255", "fd00::1", "2001:db8::abcd:1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (addr, family) = addr_from_ip(ip);
            assert_eq!(ip_from_addr(&addr, family), ip);
        }
        // The first byte on the wire is the first byte in memory.
        let (addr, _) = addr_from_ip("10.96.0.1".parse().unwrap());
        assert_eq!(addr[0].to_ne_bytes(), [10, 96, 0, 1]);
    }

    #[test]
    fn a_frontend_counts_once_whatever_its_scopes_and_slots() {
        let key = |port: u16, scope: u8, slot: u16| ServiceKey {
            port: port.to_be(),
            scope,
            slot,
            ..ServiceKey::default()
        };
        let entries: Vec<(ServiceKey, ServiceValue)> = [
            key(80, SCOPE_POLICY, 0),
            key(80, SCOPE_POLICY, 1),
            key(80, SCOPE_CLUSTER, 0),
            key(80, SCOPE_CLUSTER, 1),
            key(80, SCOPE_CLUSTER, 2),
            key(443, SCOPE_POLICY, 0),
        ]
        .into_iter()
        .map(|k| (k, ServiceValue::default()))
        .collect();
        assert_eq!(count_frontends(&entries), 2);
    }
}
