//! Service lookup, source classification and backend selection: a fixed number of hash/LPM
//! lookups per new flow, whatever the number of services or backends.

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use aya_ebpf::maps::{LpmTrie, lpm_trie::Key as LpmKey};
use proxy_common::{
    Addr, AffinityBackendKey, AffinityKey, AffinityValue, Backend, ConfigValue, Counter,
    DETECT_LOCAL_CIDR, DETECT_LOCAL_IFINDEX, FAMILY_IPV4, LOCAL_CIDR_PREFIX_BASE, LocalCidrData,
    SCOPE_CLUSTER, SCOPE_POLICY, SOURCE_NODE, SOURCE_OTHER, SOURCE_POD, SVC_F_EXTERNAL, ServiceKey,
    ServiceValue, SourceRangeData,
};

use crate::maps::{
    AFFINITY, AFFINITY_BACKENDS, BACKENDS, LOCAL_CIDRS, LOCAL_IFINDEXES, SERVICE_CIDRS, SERVICES,
    SOURCE_RANGES, count,
};

/// The slot-0 entry of a frontend in `scope`.
#[inline(always)]
pub fn lookup(addr: &Addr, port: u16, proto: u8, family: u8, scope: u8) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr: *addr,
        port,
        proto,
        scope,
        slot: 0,
        family,
        _pad: 0,
    };
    // SAFETY: the value is copied out before anything else touches the map.
    unsafe { SERVICES.get(&key) }.copied()
}

/// The node's address of `family` from CONFIG (all zero when the controller set none).
#[inline(always)]
pub fn node_addr(cfg: &ConfigValue, family: u8) -> Addr {
    if family == FAMILY_IPV4 {
        cfg.node_ipv4
    } else {
        cfg.node_ipv6
    }
}

/// SOURCE_NODE, SOURCE_POD or SOURCE_OTHER for a packet that arrived on `ifindex`.
#[inline(always)]
pub fn classify(cfg: &ConfigValue, family: u8, src: &Addr, ifindex: u32) -> u8 {
    let node = node_addr(cfg, family);
    if node != [0; 4] && node == *src {
        return SOURCE_NODE;
    }
    let local = match cfg.detect_local_mode {
        DETECT_LOCAL_CIDR => cidr_match(&LOCAL_CIDRS, family, src),
        DETECT_LOCAL_IFINDEX => {
            // SAFETY: read-only lookup of a plain integer value.
            unsafe { LOCAL_IFINDEXES.get(&ifindex) }.is_some()
        }
        _ => false,
    };
    if local { SOURCE_POD } else { SOURCE_OTHER }
}

/// Is `addr` inside one of the CIDRs of `map` (`LocalCidrData` layout)?
#[inline(always)]
fn cidr_match(map: &LpmTrie<LocalCidrData, u32>, family: u8, addr: &Addr) -> bool {
    let bits = if family == FAMILY_IPV4 { 32 } else { 128 };
    let key = LpmKey::new(
        LOCAL_CIDR_PREFIX_BASE + bits,
        LocalCidrData {
            family,
            _pad: [0; 3],
            addr: *addr,
        },
    );
    map.get(&key).is_some()
}

/// Is `dst` inside a service CIDR (where unallocated addresses are dropped)?
#[inline(always)]
pub fn in_service_cidr(family: u8, dst: &Addr) -> bool {
    cidr_match(&SERVICE_CIDRS, family, dst)
}

/// loadBalancerSourceRanges: is `src` inside one of the service's allowed prefixes?
#[inline(always)]
pub fn source_allowed(service_id: u32, src: &Addr) -> bool {
    let key = LpmKey::new(
        32 + 128,
        SourceRangeData {
            service_id_be: service_id.to_be(),
            addr: *src,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Forward,
    Reject,
    Drop,
}

/// What a new flow to a service gets. A struct with every field always set rather than an enum
/// with payloads: a payload left undefined can become an uninitialised register read.
pub struct Decision {
    pub action: Action,
    /// Valid for `Action::Forward`.
    pub backend_id: u32,
    pub backend: Backend,
}

impl Decision {
    #[inline(always)]
    fn without_backend(action: Action) -> Self {
        Self {
            action,
            backend_id: 0,
            backend: Backend::default(),
        }
    }
}

/// Applies the service entry's per-class actions and picks a backend for `client`.
#[inline(always)]
pub fn decide(
    svc: &ServiceValue,
    key_addr: &Addr,
    port: u16,
    proto: u8,
    family: u8,
    class: u8,
    client: &Addr,
) -> Decision {
    let bit = 1u8 << class;
    if svc.reject_classes & bit != 0 {
        return Decision::without_backend(Action::Reject);
    }
    if svc.drop_classes & bit != 0 {
        return Decision::without_backend(Action::Drop);
    }
    let (scope, backends) = if svc.cluster_classes & bit != 0 {
        let cluster = lookup(key_addr, port, proto, family, SCOPE_CLUSTER);
        (SCOPE_CLUSTER, cluster.map_or(0, |c| c.count))
    } else {
        (SCOPE_POLICY, svc.count)
    };
    if backends == 0 {
        return Decision::without_backend(Action::Reject);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let affinity_key = AffinityKey {
        client: *client,
        service_id: svc.id,
        scope,
        family,
        _pad: [0; 2],
    };
    if svc.affinity_timeout != 0
        && let Some(remembered) = AFFINITY.get_ptr_mut(&affinity_key)
    {
        // SAFETY: the entry stays valid for this program run (LRU maps free with RCU).
        let remembered = unsafe { &mut *remembered };
        let timeout_ns = u64::from(svc.affinity_timeout) * 1_000_000_000;
        let id = remembered.backend_id;
        if now.saturating_sub(remembered.last_used_ns) <= timeout_ns {
            // Honoured only while the backend is still an eligible endpoint of this set: a
            // terminating pod or a switched selector sends the client to a new choice.
            // SAFETY: copied out immediately.
            match unsafe { BACKENDS.get(&id) }.copied() {
                Some(backend) if eligible(svc, scope, id) => {
                    remembered.last_used_ns = now;
                    count(Counter::AffinityHits);
                    return Decision {
                        action: Action::Forward,
                        backend_id: id,
                        backend,
                    };
                }
                _ => count(Counter::AffinityStale),
            }
        }
    }
    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(backends)) as u16 + 1;
    let slot_key = ServiceKey {
        addr: *key_addr,
        port,
        proto,
        scope,
        slot,
        family,
        _pad: 0,
    };
    // SAFETY: copied out immediately.
    let Some(backend_id) = (unsafe { SERVICES.get(&slot_key) }).map(|v| v.id) else {
        count(Counter::BackendMissing);
        return Decision::without_backend(Action::Drop);
    };
    // SAFETY: copied out immediately.
    let Some(backend) = (unsafe { BACKENDS.get(&backend_id) }).copied() else {
        count(Counter::BackendMissing);
        return Decision::without_backend(Action::Drop);
    };
    if svc.affinity_timeout != 0 {
        let value = AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        // A full LRU evicts the oldest client: affinity is best effort by design.
        let _ = AFFINITY.insert(&affinity_key, &value, 0);
    }
    Decision {
        action: Action::Forward,
        backend_id,
        backend,
    }
}

/// Is `backend_id` in the endpoint set `scope` of the service entry `svc` selects from?
#[inline(always)]
fn eligible(svc: &ServiceValue, scope: u8, backend_id: u32) -> bool {
    let key = AffinityBackendKey {
        service_id: svc.id,
        backend_id,
        scope,
        external: u8::from(scope == SCOPE_POLICY && svc.flags & SVC_F_EXTERNAL != 0),
        _pad: [0; 2],
    };
    // SAFETY: presence check only.
    unsafe { AFFINITY_BACKENDS.get(&key) }.is_some()
}

/// `true` when a backend id still names a backend (flows to a deleted backend re-balance).
#[inline(always)]
pub fn backend_exists(id: u32) -> bool {
    // SAFETY: presence check only.
    unsafe { BACKENDS.get(&id) }.is_some()
}
