//! The reconciler: diffs the desired state against what is programmed and writes the minimal set
//! of map changes, in an order under which every packet sees a consistent service: backends
//! before the slots that name them, slots before the service entry that counts them, and on the
//! way out the service entry first, then its slots, then the backends.

mod entries;
mod ids;
mod memory;

use std::collections::{HashMap, HashSet};

pub use entries::{
    Layout, MapEntries, NodeEntries, SourceRange, Touched, frontend_key, proto_number, vip_entry,
};
pub use ids::Ids;
use ipnet::IpNet;
pub use memory::MemoryMaps;
use proxy_common::{
    AffinityBackendKey, Backend, CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS, ConfigValue,
    SCOPE_CLUSTER, ServiceKey, ServiceValue, VipKey, VipValue, ip_from_addr,
};

use crate::model::DesiredState;

/// One write to the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapChange {
    UpsertBackend(u32, Backend),
    DeleteBackend(u32),
    UpsertService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    UpsertVip(VipKey, VipValue),
    DeleteVip(VipKey),
    InsertSourceRange(SourceRange),
    DeleteSourceRange(SourceRange),
    InsertServiceCidr(IpNet),
    DeleteServiceCidr(IpNet),
    InsertLocalCidr(IpNet),
    DeleteLocalCidr(IpNet),
    InsertAffinityBackend(AffinityBackendKey),
    DeleteAffinityBackend(AffinityBackendKey),
    SetConfig(ConfigValue),
    InsertLocalIfindex(u32),
    DeleteLocalIfindex(u32),
}

/// The maps as the reconciler sees them: the kernel's pinned maps, or memory in tests.
pub trait DataplaneMaps {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Everything currently programmed (for a resync after restart).
    fn read_entries(&self) -> Result<MapEntries, Self::Error>;
    fn apply(&mut self, change: &MapChange) -> Result<(), Self::Error>;
    /// Deletes the UDP flows whose backend is one of `backends` (kube-proxy's stale-endpoint
    /// conntrack cleanup), returning how many; called once per sync, after the backends went.
    fn delete_flows_to_backends(&mut self, backends: &HashSet<u32>) -> Result<usize, Self::Error>;
}

/// A change that could not be written; the rest of the sync went ahead.
#[derive(Debug, thiserror::Error)]
#[error("{object}: {change:?}: {source}")]
pub struct ChangeError {
    /// The service port (or "node") the change belongs to.
    pub object: String,
    pub change: MapChange,
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

#[derive(Debug, Default)]
pub struct SyncReport {
    pub applied: usize,
    /// Service ports laid out again (added or changed); the others kept their entries.
    pub service_ports_laid_out: usize,
    pub errors: Vec<ChangeError>,
    /// Flows removed because their backend was deleted.
    pub flows_removed: usize,
    /// Why the flows to deleted backends could not be removed (the next deletion retries
    /// nothing: those flows then end by their conntrack timeout).
    pub flow_cleanup_error: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// Holds what is programmed, the layout and the ids, across syncs.
pub struct Reconciler {
    programmed: MapEntries,
    ids: Ids,
    layout: Layout,
    /// The next sync diffs everything, not just the touched keys: after a restart (the maps
    /// may hold entries of Services deleted meanwhile) and after a change failed (retried).
    diff_all: bool,
}

/// Entries of `desired` that `actual` lacks or holds with another value.
fn upserts<K, V>(actual: &fnv::FnvHashMap<K, V>, desired: &fnv::FnvHashMap<K, V>) -> Vec<(K, V)>
where
    K: Copy + Eq + std::hash::Hash,
    V: Copy + PartialEq,
{
    desired
        .iter()
        .filter(|(k, v)| actual.get(*k) != Some(*v))
        .map(|(k, v)| (*k, *v))
        .collect()
}

/// The changes turning `actual` into `desired`, in safe order.
pub fn diff(actual: &MapEntries, desired: &MapEntries) -> Vec<MapChange> {
    let mut changes = Vec::new();
    // A ClusterIP outside the service CIDRs needs the VIPS lookup for every destination: the
    // flag goes on before such a ClusterIP is written, off only once the CIDRs covering them
    // are (the last write).
    let mut first_config = desired.config;
    first_config.flags |= actual.config.flags & CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS;
    if first_config != actual.config {
        changes.push(MapChange::SetConfig(first_config));
    }
    let mut backends: Vec<(u32, Backend)> = upserts(&actual.backends, &desired.backends);
    backends.sort_by_key(|(id, _)| *id);
    changes.extend(
        backends
            .into_iter()
            .map(|(id, b)| MapChange::UpsertBackend(id, b)),
    );

    changes.extend(
        desired
            .affinity_backends
            .difference(&actual.affinity_backends)
            .map(|k| MapChange::InsertAffinityBackend(*k)),
    );
    changes.extend(
        desired
            .source_ranges
            .difference(&actual.source_ranges)
            .map(|r| MapChange::InsertSourceRange(*r)),
    );
    let mut services: Vec<(ServiceKey, ServiceValue)> =
        upserts(&actual.services, &desired.services);
    // Slots first, then cluster-scope service entries, then the policy-scope entries that refer
    // to them.
    services.sort_by_key(|(k, _)| (k.slot == 0, k.scope != SCOPE_CLUSTER));
    changes.extend(
        services
            .into_iter()
            .map(|(k, v)| MapChange::UpsertService(k, v)),
    );
    changes.extend(
        upserts(&actual.vips, &desired.vips)
            .into_iter()
            .map(|(k, v)| MapChange::UpsertVip(k, v)),
    );
    changes.extend(
        desired
            .service_cidrs
            .difference(&actual.service_cidrs)
            .map(|c| MapChange::InsertServiceCidr(*c)),
    );
    changes.extend(
        desired
            .local_cidrs
            .difference(&actual.local_cidrs)
            .map(|c| MapChange::InsertLocalCidr(*c)),
    );
    changes.extend(
        actual
            .local_cidrs
            .difference(&desired.local_cidrs)
            .map(|c| MapChange::DeleteLocalCidr(*c)),
    );
    changes.extend(
        desired
            .local_ifindexes
            .difference(&actual.local_ifindexes)
            .map(|i| MapChange::InsertLocalIfindex(*i)),
    );
    changes.extend(
        actual
            .local_ifindexes
            .difference(&desired.local_ifindexes)
            .map(|i| MapChange::DeleteLocalIfindex(*i)),
    );

    let mut removed: Vec<ServiceKey> = actual
        .services
        .keys()
        .filter(|k| !desired.services.contains_key(*k))
        .copied()
        .collect();
    // Policy-scope entries first, then cluster-scope ones, then slots.
    removed.sort_by_key(|k| (k.slot != 0, k.scope == SCOPE_CLUSTER));
    changes.extend(removed.into_iter().map(MapChange::DeleteService));
    changes.extend(
        actual
            .vips
            .keys()
            .filter(|k| !desired.vips.contains_key(*k))
            .map(|k| MapChange::DeleteVip(*k)),
    );
    changes.extend(
        actual
            .service_cidrs
            .difference(&desired.service_cidrs)
            .map(|c| MapChange::DeleteServiceCidr(*c)),
    );
    changes.extend(
        actual
            .source_ranges
            .difference(&desired.source_ranges)
            .map(|r| MapChange::DeleteSourceRange(*r)),
    );
    changes.extend(
        actual
            .affinity_backends
            .difference(&desired.affinity_backends)
            .map(|k| MapChange::DeleteAffinityBackend(*k)),
    );
    let mut gone: Vec<u32> = actual
        .backends
        .keys()
        .filter(|id| !desired.backends.contains_key(*id))
        .copied()
        .collect();
    gone.sort_unstable();
    changes.extend(gone.into_iter().map(MapChange::DeleteBackend));
    if first_config != desired.config {
        changes.push(MapChange::SetConfig(desired.config));
    }
    changes
}

impl Reconciler {
    /// Starts from what `maps` already hold (after a restart), so unchanged entries are not
    /// rewritten and established flows keep their backends.
    pub fn resume<M: DataplaneMaps>(maps: &M) -> Result<Self, M::Error> {
        let programmed = maps.read_entries()?;
        let ids = Ids::recover(&programmed);
        Ok(Self {
            programmed,
            ids,
            layout: Layout::default(),
            diff_all: true,
        })
    }

    pub fn programmed(&self) -> &MapEntries {
        &self.programmed
    }

    /// The programmed service ids of `desired`'s service ports, as `namespace/name:port`
    /// (the port's name; empty for an unnamed port): what `kube-ebpf-proxy inspect` shows
    /// instead of ids. The protocol and family are in the map keys.
    pub fn service_names(&self, desired: &DesiredState) -> std::collections::BTreeMap<u32, String> {
        service_ids(desired, &self.programmed.services)
            .map(|(id, sp)| {
                (
                    id,
                    format!("{}/{}:{}", sp.name.namespace, sp.name.name, sp.name.port),
                )
            })
            .collect()
    }

    /// Programs `desired` and the node's entries: the service ports whose state changed (and
    /// the node-wide sets) are diffed against what is programmed. A change that fails is
    /// reported (naming its service port) and left out of what is recorded as programmed, so
    /// the next sync (a whole diff then) retries it; everything else is applied.
    pub fn sync<M: DataplaneMaps>(
        &mut self,
        desired: &DesiredState,
        node: &NodeEntries,
        maps: &mut M,
    ) -> SyncReport {
        let touched = self
            .layout
            .update(desired, node, &mut self.ids, &self.programmed);
        let changes = if self.diff_all {
            diff(&self.programmed, self.layout.entries())
        } else {
            diff(
                &touched.restrict(&self.programmed),
                &touched.restrict(self.layout.entries()),
            )
        };
        self.apply(desired, changes, touched.service_ports, maps)
    }

    /// A full resync (kube-proxy's periodic `syncPeriod` sync): reads back what the maps
    /// really hold, so entries deleted, added or changed behind the proxy's back are repaired,
    /// then programs `desired` as [`Reconciler::sync`] does. Ids stay those already handed out.
    pub fn resync<M: DataplaneMaps>(
        &mut self,
        desired: &DesiredState,
        node: &NodeEntries,
        maps: &mut M,
    ) -> Result<SyncReport, M::Error> {
        let touched = self
            .layout
            .update(desired, node, &mut self.ids, &self.programmed);
        self.programmed = maps.read_entries()?;
        let changes = diff(&self.programmed, self.layout.entries());
        Ok(self.apply(desired, changes, touched.service_ports, maps))
    }

    fn apply<M: DataplaneMaps>(
        &mut self,
        desired: &DesiredState,
        changes: Vec<MapChange>,
        laid_out: usize,
        maps: &mut M,
    ) -> SyncReport {
        let target = self.layout.entries();
        // Names for error messages only: formatting every service port's on each sync would
        // cost more than the sync itself at 10,000 Services.
        let owners = std::cell::LazyCell::new(|| owners(desired, target));
        let mut report = SyncReport {
            service_ports_laid_out: laid_out,
            ..SyncReport::default()
        };
        // Frontends (slot 0 keys) with a slot that could not be written: their service entry
        // is left as it was, so no packet is balanced over a slot that does not exist.
        let mut incomplete: HashSet<ServiceKey> = HashSet::new();
        let mut deleted_backends: HashSet<u32> = HashSet::new();
        for change in changes {
            if let MapChange::UpsertService(k, _) = change
                && k.slot == 0
                && incomplete.contains(&k)
            {
                report.errors.push(ChangeError {
                    object: owner_of(&change, &owners),
                    change,
                    source: "not written: a backend slot of this frontend failed".into(),
                });
                continue;
            }
            match maps.apply(&change) {
                Ok(()) => {
                    record(&mut self.programmed, &change);
                    report.applied += 1;
                    if let MapChange::DeleteBackend(id) = change {
                        deleted_backends.insert(id);
                    }
                }
                Err(e) => {
                    if let MapChange::UpsertService(k, _) = change {
                        incomplete.insert(ServiceKey { slot: 0, ..k });
                    }
                    report.errors.push(ChangeError {
                        object: owner_of(&change, &owners),
                        change,
                        source: Box::new(e),
                    });
                }
            }
        }
        self.diff_all = !report.errors.is_empty();
        // kube-proxy's conntrack cleanup: flows to a backend that is gone are deleted, so UDP
        // clients are not blackholed into a dead endpoint. Last, once no slot names them.
        if !deleted_backends.is_empty() {
            match maps.delete_flows_to_backends(&deleted_backends) {
                Ok(n) => report.flows_removed = n,
                Err(e) => report.flow_cleanup_error = Some(Box::new(e)),
            }
        }
        report
    }
}

/// Each service port of `desired` with the service id its frontends carry in `services`.
fn service_ids<'a>(
    desired: &'a DesiredState,
    services: &'a fnv::FnvHashMap<ServiceKey, ServiceValue>,
) -> impl Iterator<Item = (u32, &'a crate::model::ServicePortState)> {
    desired.service_ports.iter().filter_map(|sp| {
        let front = sp.frontends.first()?;
        let proto = proto_number(sp.name.protocol);
        let key = frontend_key(front.addr, front.port, proto, proxy_common::SCOPE_POLICY);
        services.get(&key).map(|v| (v.id, &**sp))
    })
}

/// Service id → "namespace/name:port (family)" for error messages.
fn owners(desired: &DesiredState, target: &MapEntries) -> HashMap<u32, String> {
    service_ids(desired, &target.services)
        .map(|(id, sp)| {
            (
                id,
                format!(
                    "Service {}/{}:{} ({:?})",
                    sp.name.namespace, sp.name.name, sp.name.port, sp.family
                ),
            )
        })
        .collect()
}

fn owner_of(change: &MapChange, owners: &HashMap<u32, String>) -> String {
    let frontend = |k: &ServiceKey| {
        format!(
            "frontend {}:{}",
            ip_from_addr(&k.addr, k.family),
            u16::from_be(k.port)
        )
    };
    match change {
        MapChange::UpsertService(k, v) if k.slot == 0 => {
            owners.get(&v.id).cloned().unwrap_or_else(|| frontend(k))
        }
        MapChange::UpsertService(k, _) | MapChange::DeleteService(k) => frontend(k),
        MapChange::InsertSourceRange(r) | MapChange::DeleteSourceRange(r) => owners
            .get(&r.service_id)
            .cloned()
            .unwrap_or_else(|| format!("service id {}", r.service_id)),
        MapChange::UpsertBackend(id, b) => format!(
            "backend {id} {}:{}",
            ip_from_addr(&b.addr, b.family),
            u16::from_be(b.port)
        ),
        MapChange::DeleteBackend(id) => format!("backend {id}"),
        MapChange::UpsertVip(k, _) | MapChange::DeleteVip(k) => {
            format!("ClusterIP {}", ip_from_addr(&k.addr, k.family))
        }
        MapChange::InsertServiceCidr(c) | MapChange::DeleteServiceCidr(c) => {
            format!("service CIDR {c}")
        }
        MapChange::InsertLocalCidr(c) | MapChange::DeleteLocalCidr(c) => {
            format!("local CIDR {c}")
        }
        MapChange::InsertAffinityBackend(k) | MapChange::DeleteAffinityBackend(k) => owners
            .get(&k.service_id)
            .cloned()
            .unwrap_or_else(|| format!("service id {}", k.service_id)),
        MapChange::SetConfig(_) => "node config".to_owned(),
        MapChange::InsertLocalIfindex(i) | MapChange::DeleteLocalIfindex(i) => {
            format!("local interface {i}")
        }
    }
}

/// Applies a change to an in-memory picture of the maps (also what `MemoryMaps` is).
pub fn record(entries: &mut MapEntries, change: &MapChange) {
    match *change {
        MapChange::UpsertBackend(id, b) => {
            entries.backends.insert(id, b);
        }
        MapChange::DeleteBackend(id) => {
            entries.backends.remove(&id);
        }
        MapChange::UpsertService(k, v) => {
            entries.services.insert(k, v);
        }
        MapChange::DeleteService(k) => {
            entries.services.remove(&k);
        }
        MapChange::UpsertVip(k, v) => {
            entries.vips.insert(k, v);
        }
        MapChange::DeleteVip(k) => {
            entries.vips.remove(&k);
        }
        MapChange::InsertSourceRange(r) => {
            entries.source_ranges.insert(r);
        }
        MapChange::DeleteSourceRange(r) => {
            entries.source_ranges.remove(&r);
        }
        MapChange::InsertServiceCidr(c) => {
            entries.service_cidrs.insert(c);
        }
        MapChange::DeleteServiceCidr(c) => {
            entries.service_cidrs.remove(&c);
        }
        MapChange::InsertLocalCidr(c) => {
            entries.local_cidrs.insert(c);
        }
        MapChange::DeleteLocalCidr(c) => {
            entries.local_cidrs.remove(&c);
        }
        MapChange::InsertAffinityBackend(k) => {
            entries.affinity_backends.insert(k);
        }
        MapChange::DeleteAffinityBackend(k) => {
            entries.affinity_backends.remove(&k);
        }
        MapChange::SetConfig(config) => entries.config = config,
        MapChange::InsertLocalIfindex(ifindex) => {
            entries.local_ifindexes.insert(ifindex);
        }
        MapChange::DeleteLocalIfindex(ifindex) => {
            entries.local_ifindexes.remove(&ifindex);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
