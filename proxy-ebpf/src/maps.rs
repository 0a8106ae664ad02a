//! Every map of the dataplane, pinned by name under the loader's pin directory (so a restarted
//! proxy finds the same services and, above all, the same connections), each with an explicit
//! `max_entries` the loader may override (`EbpfLoader::map_max_entries`).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use proxy_common::{
    AFFINITY_BACKENDS_MAX_ENTRIES, AFFINITY_MAX_ENTRIES, AffinityBackendKey, AffinityKey,
    AffinityValue, BACKENDS_MAX_ENTRIES, Backend, CONNTRACK_MAX_ENTRIES, COUNTER_SLOTS,
    ConfigValue, Counter, CtKey, CtValue, LOCAL_CIDRS_MAX_ENTRIES, LOCAL_IFINDEXES_MAX_ENTRIES,
    LocalCidrData, SERVICE_CIDRS_MAX_ENTRIES, SERVICES_MAX_ENTRIES, SOCK_REVNAT_MAX_ENTRIES,
    SOURCE_RANGES_MAX_ENTRIES, ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue,
    SourceRangeData, VIPS_MAX_ENTRIES, VipKey, VipValue,
};

/// The controller-written hash maps allocate entries as they are written: preallocating the
/// default sizes (4M service slots, 1M backends, 256k VIPs) would pin hundreds of megabytes of
/// kernel memory on every node whatever its cluster's size. Lookups cost the same; only the
/// programs' own writes (conntrack, affinity: LRU maps, always preallocated) need preallocation
/// to be safe in any context, and these maps are written from userspace only.
const ON_DEMAND: u32 = BPF_F_NO_PREALLOC;

#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(SERVICES_MAX_ENTRIES, ON_DEMAND);

#[map(name = "BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(BACKENDS_MAX_ENTRIES, ON_DEMAND);

#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(CONNTRACK_MAX_ENTRIES, 0);

#[map(name = "AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(AFFINITY_MAX_ENTRIES, 0);

#[map(name = "AFFINITY_BACKENDS")]
pub static AFFINITY_BACKENDS: HashMap<AffinityBackendKey, u32> =
    HashMap::pinned(AFFINITY_BACKENDS_MAX_ENTRIES, ON_DEMAND);

/// Written by the controller only; the programs never read it.
#[map(name = "LAYOUT")]
pub static LAYOUT: Array<u32> = Array::pinned(1, 0);

#[map(name = "SOURCE_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeData, u32> =
    LpmTrie::pinned(SOURCE_RANGES_MAX_ENTRIES, 0);

#[map(name = "LOCAL_CIDRS")]
pub static LOCAL_CIDRS: LpmTrie<LocalCidrData, u32> = LpmTrie::pinned(LOCAL_CIDRS_MAX_ENTRIES, 0);

#[map(name = "LOCAL_IFINDEXES")]
pub static LOCAL_IFINDEXES: HashMap<u32, u32> = HashMap::pinned(LOCAL_IFINDEXES_MAX_ENTRIES, 0);

#[map(name = "SERVICE_CIDRS")]
pub static SERVICE_CIDRS: LpmTrie<LocalCidrData, u32> =
    LpmTrie::pinned(SERVICE_CIDRS_MAX_ENTRIES, 0);

#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipValue> = HashMap::pinned(VIPS_MAX_ENTRIES, ON_DEMAND);

#[map(name = "CONFIG")]
pub static CONFIG: Array<ConfigValue> = Array::pinned(1, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[map(name = "SOCK_REVNAT")]
pub static SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::pinned(SOCK_REVNAT_MAX_ENTRIES, 0);

/// Adds one to a per-CPU counter (no atomics needed: each CPU has its own slot).
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer is to this CPU's slot of a per-CPU array, valid for the program run.
        unsafe { *slot += 1 };
    }
}

/// The node configuration the controller wrote; `None` until it has.
#[inline(always)]
pub fn config() -> Option<&'static ConfigValue> {
    CONFIG.get(0)
}
