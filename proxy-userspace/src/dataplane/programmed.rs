//! The reconciler's view of the pinned maps: read everything back (after a restart) and apply
//! one `MapChange` at a time.

use std::collections::HashMap;

use ipnet::IpNet;
use proxy_common::{VIP_F_CLUSTER_IP, ip_from_addr};

use super::maps::{Maps, MapsError};
use crate::reconcile::{DataplaneMaps, MapChange, MapEntries, SourceRange, vip_entry};

impl DataplaneMaps for Maps {
    type Error = MapsError;

    fn read_entries(&self) -> Result<MapEntries, MapsError> {
        let services: fnv::FnvHashMap<_, _> = self.service_entries()?.into_iter().collect();
        // A range's key does not say its family (a v4 /24 and a v6 /24 look alike); the
        // service entry with the same id does.
        let family_of: HashMap<u32, u8> = services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, v)| (v.id, k.family))
            .collect();
        let source_ranges = self
            .source_range_entries()?
            .into_iter()
            .filter_map(|(service_id, prefix, addr)| {
                let family = *family_of.get(&service_id)?;
                let range = IpNet::new(ip_from_addr(&addr, family), prefix as u8).ok()?;
                Some(SourceRange { service_id, range })
            })
            .collect();
        let vips = self
            .vip_entries()?
            .into_iter()
            .map(|(ip, flags)| vip_entry(ip, flags))
            .collect();
        Ok(MapEntries {
            backends: self.backend_entries()?.into_iter().collect(),
            services,
            vips,
            source_ranges,
            service_cidrs: self.service_cidr_entries()?.into_iter().collect(),
            local_cidrs: self.local_cidr_entries()?.into_iter().collect(),
            affinity_backends: self.affinity_backend_entries()?.into_iter().collect(),
            config: self.config()?,
            local_ifindexes: self.local_ifindex_entries()?.into_iter().collect(),
        })
    }

    fn apply(&mut self, change: &MapChange) -> Result<(), MapsError> {
        match *change {
            MapChange::UpsertBackend(id, ref backend) => self.upsert_backend(id, backend),
            MapChange::DeleteBackend(id) => self.delete_backend(id),
            MapChange::UpsertService(ref key, ref value) => self.upsert_service_entry(key, value),
            MapChange::DeleteService(ref key) => self.delete_service_entry(key),
            MapChange::UpsertVip(key, value) => {
                debug_assert_eq!(value.flags, VIP_F_CLUSTER_IP);
                self.upsert_vip(ip_from_addr(&key.addr, key.family), value.flags)
            }
            MapChange::DeleteVip(key) => self.delete_vip(ip_from_addr(&key.addr, key.family)),
            MapChange::InsertSourceRange(r) => self.allow_source_range(r.service_id, r.range),
            MapChange::DeleteSourceRange(r) => self.delete_source_range(r.service_id, r.range),
            MapChange::InsertServiceCidr(cidr) => self.add_service_cidr(cidr),
            MapChange::DeleteServiceCidr(cidr) => self.delete_service_cidr(cidr),
            MapChange::InsertLocalCidr(cidr) => self.add_local_cidr(cidr),
            MapChange::DeleteLocalCidr(cidr) => self.delete_local_cidr(cidr),
            MapChange::InsertAffinityBackend(ref key) => self.insert_affinity_backend(key),
            MapChange::DeleteAffinityBackend(ref key) => self.delete_affinity_backend(key),
            MapChange::SetConfig(ref config) => self.set_config(config),
            MapChange::InsertLocalIfindex(ifindex) => self.add_local_ifindex(ifindex),
            MapChange::DeleteLocalIfindex(ifindex) => self.delete_local_ifindex(ifindex),
        }
    }

    fn delete_flows_to_backends(
        &mut self,
        backends: &std::collections::HashSet<u32>,
    ) -> Result<usize, MapsError> {
        self.cleanup_flows_to_backends(backends)
    }
}
