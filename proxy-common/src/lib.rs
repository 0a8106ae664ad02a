//! The vocabulary shared by the kernel programs and the controller: map names, sizes, keys and
//! values. Everything here is `#[repr(C)]` with explicit padding so both sides agree byte for byte.
//!
//! Layout (learned from Cilium's `lb.h`, written for kube-proxy's semantics):
//! - `SERVICES`: hash `ServiceKey` → `ServiceValue`. For each frontend (address, port, protocol)
//!   and scope, slot 0 is the service entry (flags, per-source-class actions, backend count) and
//!   slots `1..=count` hold backend ids. Selecting a backend is two hash lookups, whatever the
//!   number of services or backends.
//! - `BACKENDS`: hash backend id → `Backend`. Ids are stable across updates, so an unchanged
//!   backend is never rewritten.
//! - `CONNTRACK`: LRU hash `CtKey` → `CtValue`, one entry per direction of a NATed flow.
//! - `AFFINITY`: LRU hash `AffinityKey` → `AffinityValue` (sessionAffinity ClientIP).
//! - `SOURCE_RANGES`: LPM trie (service id, client address) → allowed (loadBalancerSourceRanges).
//! - `LOCAL_CIDRS` / `LOCAL_IFINDEXES`: the local-traffic detector (pod source class).
//! - `VIPS`: hash address → `VipValue` for allocated ClusterIPs (REJECT of traffic to a port no
//!   frontend matched).
//! - `SERVICE_CIDRS`: LPM trie (`LocalCidrData` layout) of the service CIDRs (DROP of traffic to
//!   an unallocated address in them).
//! - `CONFIG`: one `ConfigValue` (node addresses, SNAT port range, detector mode, debug).
//! - `COUNTERS`: per-CPU `u64`s indexed by [`Counter`].
//! - `AFFINITY_BACKENDS`: hash `AffinityBackendKey` → `PRESENT` (affinity re-validation).
//! - `LAYOUT`: one `u32`, the `MAP_LAYOUT_VERSION` of the pins.
//! - `SOCK_REVNAT`: LRU hash `SockRevNatKey` → `SockRevNatValue`, written by the socket hooks
//!   (host socket + backend → the service address the application used).
//!
//! `SERVICES`, `BACKENDS` and `VIPS` allocate entries on demand (`BPF_F_NO_PREALLOC`); the LRU
//! maps are preallocated. The programs also use two per-CPU scratch arrays (`PACKET_SCRATCH`,
//! `REJECT_SCRATCH`) that hold nothing between runs and are deliberately not pinned: each
//! loaded object (the proxy, a `trace` run) must have its own. Neither is the LRU `FRAGMENTS`
//! map (a datagram's identity → its first fragment's ports), whose entries live only while one
//! datagram's fragments are in flight.
#![no_std]

pub mod crc32c;

/// An IPv4 or IPv6 address as four 32-bit words in network byte order. IPv4 uses word 0 and
/// leaves the rest zero; the family is carried next to it.
pub type Addr = [u32; 4];

pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// The map form of an IP address: its bytes in network order in word 0 (IPv4) or all four
/// words (IPv6), and the family.
pub fn addr_from_ip(ip: core::net::IpAddr) -> (Addr, u8) {
    match ip {
        core::net::IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_IPV4),
        core::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], FAMILY_IPV6)
        }
    }
}

/// The inverse of [`addr_from_ip`].
pub fn ip_from_addr(addr: &Addr, family: u8) -> core::net::IpAddr {
    if family == FAMILY_IPV4 {
        core::net::IpAddr::from(addr[0].to_ne_bytes())
    } else {
        let mut octets = [0u8; 16];
        for (i, word) in addr.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        core::net::IpAddr::from(octets)
    }
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

// ---- map names (pinned under the pin path by these names) ----
pub const SERVICES_MAP: &str = "SERVICES";
pub const BACKENDS_MAP: &str = "BACKENDS";
pub const CONNTRACK_MAP: &str = "CONNTRACK";
pub const AFFINITY_MAP: &str = "AFFINITY";
pub const SOURCE_RANGES_MAP: &str = "SOURCE_RANGES";
pub const LOCAL_CIDRS_MAP: &str = "LOCAL_CIDRS";
pub const LOCAL_IFINDEXES_MAP: &str = "LOCAL_IFINDEXES";
pub const VIPS_MAP: &str = "VIPS";
pub const SERVICE_CIDRS_MAP: &str = "SERVICE_CIDRS";
pub const CONFIG_MAP: &str = "CONFIG";
pub const COUNTERS_MAP: &str = "COUNTERS";
pub const SOCK_REVNAT_MAP: &str = "SOCK_REVNAT";
pub const AFFINITY_BACKENDS_MAP: &str = "AFFINITY_BACKENDS";
/// One `u32`: the `MAP_LAYOUT_VERSION` the pins were written with (0 until the controller set it).
pub const LAYOUT_MAP: &str = "LAYOUT";

// ---- default sizes (the controller may override with map_max_entries) ----
/// 100k service ports × (a few frontends) × 2 scopes, plus 10 backend slots each, fits.
pub const SERVICES_MAX_ENTRIES: u32 = 4_194_304;
pub const BACKENDS_MAX_ENTRIES: u32 = 1_048_576;
pub const CONNTRACK_MAX_ENTRIES: u32 = 524_288;
pub const AFFINITY_MAX_ENTRIES: u32 = 131_072;
pub const SOURCE_RANGES_MAX_ENTRIES: u32 = 65_536;
pub const LOCAL_CIDRS_MAX_ENTRIES: u32 = 1_024;
pub const LOCAL_IFINDEXES_MAX_ENTRIES: u32 = 4_096;
pub const VIPS_MAX_ENTRIES: u32 = 262_144;
pub const SERVICE_CIDRS_MAX_ENTRIES: u32 = 64;
/// One entry per (host socket, backend) a socket hook translated, for the reverse translation
/// of UDP replies and peer names.
pub const SOCK_REVNAT_MAX_ENTRIES: u32 = 65_536;
/// One entry per (service port with ClientIP affinity, eligible backend, endpoint set).
pub const AFFINITY_BACKENDS_MAX_ENTRIES: u32 = 1_048_576;

/// Value stored in `SOURCE_RANGES`, `LOCAL_CIDRS` and `LOCAL_IFINDEXES` (key `u32` ifindex):
/// presence is what matters, the value is always [`PRESENT`].
pub const PRESENT: u32 = 1;

// ---- source classes (bit positions in `ServiceValue::*_classes`) ----
/// Matched by the local-traffic detector.
pub const SOURCE_POD: u8 = 0;
/// Originated on the node itself.
pub const SOURCE_NODE: u8 = 1;
/// Everything else.
pub const SOURCE_OTHER: u8 = 2;

/// Which endpoint set a `ServiceKey` addresses.
pub const SCOPE_POLICY: u8 = 0;
/// The Cluster-policy set used by the short circuit for pod/node traffic under
/// externalTrafficPolicy Local.
pub const SCOPE_CLUSTER: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Destination port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// `SCOPE_POLICY` or `SCOPE_CLUSTER`.
    pub scope: u8,
    /// 0 for the service entry, `1..=count` for backend slots.
    pub slot: u16,
    pub family: u8,
    pub _pad: u8,
}

/// Service entry flags (slot 0).
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 0;
/// A `SCOPE_CLUSTER` entry exists for this frontend.
pub const SVC_F_HAS_CLUSTER_SCOPE: u16 = 1 << 1;
/// The frontend is external (NodePort, externalIP, LoadBalancer).
pub const SVC_F_EXTERNAL: u16 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Slot 0: the service id (shared by all frontends of one service port in one family; keys
    /// affinity and source ranges). Slots ≥ 1: the backend id.
    pub id: u32,
    /// Slot 0: number of backend slots of this scope.
    pub count: u16,
    /// Slot 0: `SVC_F_*`.
    pub flags: u16,
    /// Slot 0: sessionAffinity timeout in seconds, 0 without affinity.
    pub affinity_timeout: u32,
    /// Slot 0, bit per source class: forward to the `SCOPE_CLUSTER` set instead of this one.
    pub cluster_classes: u8,
    /// Slot 0, bit per source class: SNAT to the node address.
    pub masquerade_classes: u8,
    /// Slot 0, bit per source class: REJECT (ICMP port unreachable).
    pub reject_classes: u8,
    /// Slot 0, bit per source class: DROP. A class in none of reject/drop is forwarded.
    pub drop_classes: u8,
}

/// Backend flags.
pub const BACKEND_F_LOCAL: u8 = 1 << 0;
pub const BACKEND_F_TERMINATING: u8 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: Addr,
    /// Target port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// The version of the pinned map layout (names, key and value layouts, meanings of states and
/// flags). A proxy that finds pins of another version migrates them (see the loader). Version 1
/// is the unversioned layout of the first release (no `LAYOUT` map, 56-byte `CtValue`, states
/// NEW/ESTABLISHED/CLOSING).
pub const MAP_LAYOUT_VERSION: u32 = 2;

/// Conntrack flow states, kept in the forward entry (the flow's authoritative record; the reply
/// entry only carries what reverse NAT needs). A simplified netfilter TCP state machine
/// (`nf_conntrack_proto_tcp.c`): the controller's GC expires a flow by its state with the
/// timeouts table of `dataplane::gc`. UDP and SCTP use `SYN_SENT` (unreplied), `SYN_RECV`
/// (replied) and `ESTABLISHED` (assured: still active 2 s after its first packet, with a reply).
pub const CT_STATE_SYN_SENT: u8 = 0;
pub const CT_STATE_ESTABLISHED: u8 = 1;
/// One side sent a FIN that the other has not acknowledged yet.
pub const CT_STATE_FIN_WAIT: u8 = 2;
/// The SYN was answered (SYN/ACK), the handshake's last ACK not seen yet.
pub const CT_STATE_SYN_RECV: u8 = 3;
/// Half-closed: one side's FIN was acknowledged, the other side still sends.
pub const CT_STATE_CLOSE_WAIT: u8 = 4;
/// Both sides sent a FIN; the ACK of the second is awaited.
pub const CT_STATE_LAST_ACK: u8 = 5;
/// Closed by FINs both ways: held briefly for retransmissions, and a SYN reopens it.
pub const CT_STATE_TIME_WAIT: u8 = 6;
/// Closed by a RST.
pub const CT_STATE_CLOSE: u8 = 7;

/// `true` for a flow that is over: a SYN reopens it and its SNAT port may be taken by a new flow.
#[inline(always)]
pub fn ct_state_closed(state: u8) -> bool {
    state == CT_STATE_TIME_WAIT || state == CT_STATE_CLOSE
}

/// `true` once either side started closing (FIN or RST seen).
#[inline(always)]
pub fn ct_state_closing(state: u8) -> bool {
    matches!(
        state,
        CT_STATE_FIN_WAIT
            | CT_STATE_CLOSE_WAIT
            | CT_STATE_LAST_ACK
            | CT_STATE_TIME_WAIT
            | CT_STATE_CLOSE
    )
}

/// TCP header flags the state machine reads.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// UDP and SCTP flows with a reply become "assured" (`CT_STATE_ESTABLISHED`, the long
/// stream timeout) once still active this long after their first packet, as netfilter's UDP
/// tracker does.
pub const CT_ASSURED_AFTER_NS: u64 = 2_000_000_000;

/// The state and flags of a flow's forward entry after one more packet: the one conntrack state
/// machine, run by the kernel per packet and table-tested in userspace. `is_reply` says the
/// packet came from the backend; `tcp_flags` is the TCP header's flags byte (0 for other
/// protocols); `age_ns` is the time since the flow's first packet. A SYN on a closed flow is not
/// handled here: the program reopens such a flow as a new one before it gets here.
#[inline(always)]
pub fn ct_advance(
    proto: u8,
    state: u8,
    flags: u8,
    is_reply: bool,
    tcp_flags: u8,
    age_ns: u64,
) -> (u8, u8) {
    let mut flags = flags;
    if is_reply {
        flags |= CT_F_SEEN_REPLY;
    }
    if proto != IPPROTO_TCP {
        let state = if flags & CT_F_SEEN_REPLY == 0 {
            CT_STATE_SYN_SENT
        } else if state == CT_STATE_ESTABLISHED || age_ns >= CT_ASSURED_AFTER_NS {
            CT_STATE_ESTABLISHED
        } else {
            CT_STATE_SYN_RECV
        };
        return (state, flags);
    }
    if tcp_flags & TCP_RST != 0 {
        return (CT_STATE_CLOSE, flags);
    }
    if ct_state_closed(state) {
        // Retransmissions of the close: the flow stays closed (no RST-then-data resurrection).
        return (state, flags);
    }
    let syn = tcp_flags & TCP_SYN != 0;
    let fin = tcp_flags & TCP_FIN != 0;
    let mut state = match state {
        CT_STATE_SYN_SENT if is_reply && syn => CT_STATE_SYN_RECV,
        // A reply without SYN (simultaneous open, or the handshake's SYN/ACK lost from view):
        // the flow is up.
        CT_STATE_SYN_SENT if is_reply => CT_STATE_ESTABLISHED,
        CT_STATE_SYN_RECV if !is_reply && !syn => CT_STATE_ESTABLISHED,
        other => other,
    };
    let (own_fin, other_fin) = if is_reply {
        (CT_F_FIN_REPLY, CT_F_FIN_ORIGINAL)
    } else {
        (CT_F_FIN_ORIGINAL, CT_F_FIN_REPLY)
    };
    if fin {
        if flags & (CT_F_FIN_ORIGINAL | CT_F_FIN_REPLY) == 0 {
            flags |= own_fin;
            if is_reply {
                flags |= CT_F_REPLY_CLOSED_FIRST;
            }
            state = CT_STATE_FIN_WAIT;
        } else if flags & own_fin == 0 {
            flags |= own_fin;
            state = CT_STATE_LAST_ACK;
        }
        return (state, flags);
    }
    // From here on a packet without FIN: does it acknowledge the last FIN?
    let from_first_closer = (flags & CT_F_REPLY_CLOSED_FIRST != 0) == is_reply;
    state = match state {
        // The side that has not closed acknowledges the FIN and goes on sending: half-closed.
        CT_STATE_FIN_WAIT if flags & own_fin == 0 && flags & other_fin != 0 => CT_STATE_CLOSE_WAIT,
        // The first closer acknowledges the second FIN.
        CT_STATE_LAST_ACK if from_first_closer => CT_STATE_TIME_WAIT,
        other => other,
    };
    (state, flags)
}

/// Conntrack entry flags.
/// This entry is for the reply direction (backend → client).
pub const CT_F_REPLY: u8 = 1 << 0;
/// The flow is masqueraded (source rewritten to the node address).
pub const CT_F_SNAT: u8 = 1 << 1;
/// A reply has been seen (forward entry).
pub const CT_F_SEEN_REPLY: u8 = 1 << 2;
/// A FIN was seen from the client (forward entry).
pub const CT_F_FIN_ORIGINAL: u8 = 1 << 3;
/// A FIN was seen from the backend (forward entry).
pub const CT_F_FIN_REPLY: u8 = 1 << 4;
/// The backend sent the first FIN (forward entry): the final ACK comes from it.
pub const CT_F_REPLY_CLOSED_FIRST: u8 = 1 << 5;
/// A masqueraded flow's reply entry kept after the client reopened the flow's tuple (reply
/// entry, state `TIME_WAIT`): the backend, which closed first, may still hold the SNAT tuple in
/// TIME_WAIT, so the port is reused only as a last resort until that is over. It translates no
/// packet, and its forward key may belong to the reopened flow.
pub const CT_F_HELD: u8 = 1 << 6;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src: Addr,
    pub dst: Addr,
    /// Ports in network byte order (for ICMP echo: the identifier in `sport`, 0 in `dport`).
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

impl CtKey {
    /// For a forward entry's key (`self`) and value, the key of the flow's reply entry: the
    /// tuple the backend's replies carry.
    #[inline(always)]
    pub fn reply_of_forward(&self, forward: &CtValue) -> CtKey {
        let snat = forward.flags & CT_F_SNAT != 0;
        CtKey {
            src: forward.nat_dst,
            dst: if snat { forward.nat_src } else { self.src },
            sport: forward.nat_dport,
            dport: if snat { forward.nat_sport } else { self.sport },
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }

    /// For a reply entry's key (`self`) and value, the key of the flow's forward entry: the
    /// kernel marks the forward entry when replies flow, and the GC expires a flow by it.
    #[inline(always)]
    pub fn forward_of_reply(&self, reply: &CtValue) -> CtKey {
        let snat = reply.flags & CT_F_SNAT != 0;
        CtKey {
            src: if snat { reply.nat_src } else { self.dst },
            dst: reply.nat_dst,
            sport: if snat { reply.nat_sport } else { self.dport },
            dport: reply.nat_dport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// Forward entry: the new destination (backend). Reply entry: the new source (frontend).
    pub nat_dst: Addr,
    /// Forward entry: the new source (node address) when `CT_F_SNAT`. Reply entry: the new
    /// destination (the original client) when `CT_F_SNAT`.
    pub nat_src: Addr,
    /// Ports matching `nat_dst` / `nat_src`, network byte order.
    pub nat_dport: u16,
    pub nat_sport: u16,
    pub backend_id: u32,
    pub service_id: u32,
    /// `CT_STATE_*` (forward entry; a reply entry keeps the state it was created with).
    pub state: u8,
    /// `CT_F_*`.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// `bpf_ktime_get_ns` of the last packet in either direction (the reply path stamps the
    /// forward entry too); the controller's GC expires by state.
    pub last_seen_ns: u64,
    /// `bpf_ktime_get_ns` of the flow's first packet (UDP "assured" after 2 s).
    pub created_ns: u64,
}

impl CtValue {
    /// `true` for a reply entry kept only to hold its SNAT tuple (`CT_F_HELD`): it translates
    /// nothing, and its forward entry is not its partner.
    #[inline(always)]
    pub fn is_held(&self) -> bool {
        self.flags & CT_F_HELD != 0
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: Addr,
    pub service_id: u32,
    pub scope: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// `AFFINITY_BACKENDS` key: `backend_id` is an eligible endpoint of the service port
/// `service_id` in the endpoint set an affinity entry of `scope` was made in; an affinity entry
/// is honoured only while its key is present. Written only for services with ClientIP affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityBackendKey {
    pub service_id: u32,
    pub backend_id: u32,
    /// `SCOPE_POLICY` or `SCOPE_CLUSTER`.
    pub scope: u8,
    /// 1 for the external frontends' policy set (externalTrafficPolicy), 0 for the ClusterIP's
    /// (internalTrafficPolicy) and for `SCOPE_CLUSTER`.
    pub external: u8,
    pub _pad: [u8; 2],
}

/// LPM data for `SOURCE_RANGES`: prefix length counts from the start of this struct, so a rule
/// for a /24 has prefix length 32 (service id) + 24.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRangeData {
    /// Big-endian service id so that it is a prefix.
    pub service_id_be: u32,
    pub addr: Addr,
}

/// LPM data for `LOCAL_CIDRS`: prefix length counts from the start: 8 (family) + 24 (padding,
/// always matched as zero) + mask bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalCidrData {
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: Addr,
}
pub const LOCAL_CIDR_PREFIX_BASE: u32 = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: Addr,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `VipValue::flags`: this address is an allocated ClusterIP (REJECT unknown ports).
pub const VIP_F_CLUSTER_IP: u8 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipValue {
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// `SOCK_REVNAT` key: the socket (its cookie) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// `SOCK_REVNAT` value: the frontend the application addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatValue {
    pub addr: Addr,
    /// Frontend port, network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
    pub service_id: u32,
}

/// Local-traffic detector modes (`ConfigValue::detect_local_mode`).
pub const DETECT_LOCAL_NONE: u8 = 0;
/// Source address in `LOCAL_CIDRS` (ClusterCIDR and NodeCIDR modes).
pub const DETECT_LOCAL_CIDR: u8 = 1;
/// Ingress interface in `LOCAL_IFINDEXES` (InterfaceNamePrefix and BridgeInterface modes).
pub const DETECT_LOCAL_IFINDEX: u8 = 2;

/// `ConfigValue::flags`: log each new flow's decision through aya-log (off the hot path
/// unless set).
pub const CONFIG_F_DEBUG: u32 = 1 << 0;
/// `ConfigValue::flags`: some allocated ClusterIP lies outside every `SERVICE_CIDRS` entry, so
/// a destination outside them may still be one (`VIPS` must be asked). When clear, traffic
/// that matches no frontend and no service CIDR pays one LPM lookup and passes.
pub const CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS: u32 = 1 << 1;
/// `ConfigValue::flags`: deliver translated packets straight to the next hop's device (FIB
/// lookup, then redirect), so the node's netfilter and rp_filter never see them.
pub const CONFIG_F_FAST_PATH: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConfigValue {
    /// The node's IPv4 address used as the masquerade source (word 0), 0 if none.
    pub node_ipv4: Addr,
    /// The node's IPv6 address used as the masquerade source, zero if none.
    pub node_ipv6: Addr,
    /// SNAT source ports are taken from `[snat_port_min, snat_port_max]` (host byte order);
    /// the controller reserves this range from the node's local ports.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub detect_local_mode: u8,
    pub _pad: [u8; 3],
    /// `CONFIG_F_*`.
    pub flags: u32,
    pub _pad2: u32,
    /// The network namespace cookie the socket hooks act in (host-originated traffic).
    pub netns_cookie: u64,
}

/// Per-CPU packet counters, indexed by [`Counter`]. The names are what `kube-ebpf-proxy stats`
/// and the metrics endpoint print. New counters are appended (the index is the pinned ABI).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets seen by the tc ingress program.
    TcIngressPackets = 0,
    /// First packets of flows DNATed to a backend (conntrack entries created).
    NewFlows = 1,
    /// Packets of known flows translated in the client → backend direction.
    CtForwardHits = 2,
    /// Reply packets reverse-translated (backend → client).
    CtReplyHits = 3,
    /// Known flows whose backend was gone: re-balanced as new flows.
    StaleBackendFlows = 4,
    /// Service traffic answered with ICMP port unreachable (reject rules, no endpoints).
    Rejects = 5,
    /// Service traffic dropped by a drop rule.
    Drops = 6,
    /// Traffic dropped by loadBalancerSourceRanges.
    SourceRangeDrops = 7,
    /// Traffic to a known ClusterIP on a port no Service has: rejected.
    VipRejects = 8,
    /// Traffic to an unallocated address of a service CIDR: dropped.
    VipDrops = 9,
    /// Conntrack inserts that failed (map full): the packet is dropped.
    CtMapFull = 10,
    /// New masqueraded flows with no free SNAT port after bounded probing.
    SnatExhausted = 11,
    /// Masquerade needed but CONFIG has no node address of that family.
    NoSnatAddress = 12,
    /// A backend slot pointed at an id missing from BACKENDS (mid-update).
    BackendMissing = 13,
    /// Truncated or inconsistent headers: passed untouched.
    ParseFailures = 14,
    /// IP fragments seen (first and later ones; TCP and UDP fragments follow their first
    /// fragment's translation, others pass untouched).
    Fragments = 15,
    /// IPv4 packets with options: passed untouched.
    Ipv4Options = 16,
    /// IPv6 packets with extension headers: passed untouched.
    Ipv6ExtensionHeaders = 17,
    /// Unused since SCTP ports are rewritten with a CRC32c update (kept: the index is the
    /// pinned ABI). Was: SCTP to a backend whose port differs from the frontend's, dropped.
    SctpPortRewrite = 18,
    /// A packet rewrite or checksum helper failed.
    RewriteFailures = 19,
    /// ICMP errors about a NATed flow translated (PMTU discovery, TTL expiry, unreachable
    /// destinations): those arriving at tc ingress and those the node generates, at egress.
    IcmpErrorsTranslated = 20,
    /// New flows sent to the backend remembered by session affinity.
    AffinityHits = 21,
    /// Host sockets whose connect/sendmsg destination was translated to a backend.
    SockConnectTranslated = 22,
    /// Host socket connects refused (reject rule or no endpoints).
    SockConnectRejected = 23,
    /// Host socket recvmsg/getpeername addresses translated back to the frontend.
    SockReplyTranslated = 24,
    /// A SYN on a closing or closed flow, or on one whose backend is gone: selected anew.
    CtReopened = 25,
    /// SNAT ports taken over from a closed flow (TIME_WAIT or RST).
    SnatPortsReused = 26,
    /// SNAT ports lost to a concurrent new flow while being reserved: another port was tried.
    SnatCollisions = 27,
    /// Affinity entries whose backend is no longer an eligible endpoint: a new choice was made.
    AffinityStale = 28,
    /// Reply packets whose flow's forward entry was gone (evicted from the full LRU map).
    CtForwardMissing = 29,
    /// TCP packets without SYN and without a flow to an unallocated service-CIDR address:
    /// passed, as the drop applies to new connections only (one opened before the range was
    /// known keeps working).
    ServiceCidrNotNew = 30,
    /// Translated packets delivered by the fast path (FIB lookup, then redirect to the next
    /// hop's device), bypassing the node's netfilter and rp_filter.
    FastPathRedirects = 31,
    /// Translated packets the FIB lookup sent to the stack (local destination, no route,
    /// fragmentation allowed and needed; TTL expiring or a refusing route, unless masqueraded
    /// or a reply): delivered as without the fast path.
    FastPathFallbacks = 32,
    /// Later fragments of a datagram translated like its first fragment (its flow's entry).
    FragmentsFollowed = 33,
    /// Later fragments whose first fragment was not seen (reordered, or its entry evicted):
    /// passed untouched.
    FragmentsWithoutFirst = 34,
    /// First fragments whose ports could not be remembered: their later fragments pass
    /// untouched.
    FragmentRecordFailures = 35,
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" the program sent to a client whose
    /// translated packet did not fit the egress MTU (PMTU discovery through a Service).
    IcmpTooBigSent = 36,
    /// ICMP / ICMPv6 errors the node's own stack generated about a translated packet (TTL
    /// expired, no route, port unreachable from a local backend…), translated back at tc egress
    /// so that the client's socket matches them.
    EgressIcmpErrorsTranslated = 37,
    /// ICMP / ICMPv6 packets seen at tc egress that are not an error about a translated flow
    /// (other ICMP types, errors about untranslated or unknown flows): passed untouched.
    /// Other protocols leave the egress program uncounted (one header byte read).
    EgressIcmpPassed = 38,
    /// ICMP / ICMPv6 "time exceeded" the program sent for a translated packet whose TTL / hop
    /// limit expired at the node and whose source it rewrote (masqueraded, or a reply): the
    /// stack would drop it as a martian, or send its error to the service address.
    IcmpTimeExceededSent = 39,
    /// ICMP host unreachable / administratively prohibited (ICMPv6 no route / prohibited) the
    /// program sent for such a packet whose destination has an `unreachable` or `prohibit`
    /// route.
    IcmpUnreachableSent = 40,
}

impl Counter {
    pub const ALL: [Counter; 41] = [
        Counter::TcIngressPackets,
        Counter::NewFlows,
        Counter::CtForwardHits,
        Counter::CtReplyHits,
        Counter::StaleBackendFlows,
        Counter::Rejects,
        Counter::Drops,
        Counter::SourceRangeDrops,
        Counter::VipRejects,
        Counter::VipDrops,
        Counter::CtMapFull,
        Counter::SnatExhausted,
        Counter::NoSnatAddress,
        Counter::BackendMissing,
        Counter::ParseFailures,
        Counter::Fragments,
        Counter::Ipv4Options,
        Counter::Ipv6ExtensionHeaders,
        Counter::SctpPortRewrite,
        Counter::RewriteFailures,
        Counter::IcmpErrorsTranslated,
        Counter::AffinityHits,
        Counter::SockConnectTranslated,
        Counter::SockConnectRejected,
        Counter::SockReplyTranslated,
        Counter::CtReopened,
        Counter::SnatPortsReused,
        Counter::SnatCollisions,
        Counter::AffinityStale,
        Counter::CtForwardMissing,
        Counter::ServiceCidrNotNew,
        Counter::FastPathRedirects,
        Counter::FastPathFallbacks,
        Counter::FragmentsFollowed,
        Counter::FragmentsWithoutFirst,
        Counter::FragmentRecordFailures,
        Counter::IcmpTooBigSent,
        Counter::EgressIcmpErrorsTranslated,
        Counter::EgressIcmpPassed,
        Counter::IcmpTimeExceededSent,
        Counter::IcmpUnreachableSent,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::TcIngressPackets => "tc_ingress_packets",
            Counter::NewFlows => "new_flows",
            Counter::CtForwardHits => "ct_forward_hits",
            Counter::CtReplyHits => "ct_reply_hits",
            Counter::StaleBackendFlows => "stale_backend_flows",
            Counter::Rejects => "rejects",
            Counter::Drops => "drops",
            Counter::SourceRangeDrops => "source_range_drops",
            Counter::VipRejects => "vip_rejects",
            Counter::VipDrops => "vip_drops",
            Counter::CtMapFull => "ct_map_full",
            Counter::SnatExhausted => "snat_exhausted",
            Counter::NoSnatAddress => "no_snat_address",
            Counter::BackendMissing => "backend_missing",
            Counter::ParseFailures => "parse_failures",
            Counter::Fragments => "fragments",
            Counter::Ipv4Options => "ipv4_options",
            Counter::Ipv6ExtensionHeaders => "ipv6_extension_headers",
            Counter::SctpPortRewrite => "sctp_port_rewrite",
            Counter::RewriteFailures => "rewrite_failures",
            Counter::IcmpErrorsTranslated => "icmp_errors_translated",
            Counter::AffinityHits => "affinity_hits",
            Counter::SockConnectTranslated => "sock_connect_translated",
            Counter::SockConnectRejected => "sock_connect_rejected",
            Counter::SockReplyTranslated => "sock_reply_translated",
            Counter::CtReopened => "ct_reopened",
            Counter::SnatPortsReused => "snat_ports_reused",
            Counter::SnatCollisions => "snat_collisions",
            Counter::AffinityStale => "affinity_stale",
            Counter::CtForwardMissing => "ct_forward_missing",
            Counter::ServiceCidrNotNew => "service_cidr_not_new",
            Counter::FastPathRedirects => "fast_path_redirects",
            Counter::FastPathFallbacks => "fast_path_fallbacks",
            Counter::FragmentsFollowed => "fragments_followed",
            Counter::FragmentsWithoutFirst => "fragments_without_first",
            Counter::FragmentRecordFailures => "fragment_record_failures",
            Counter::IcmpTooBigSent => "icmp_too_big_sent",
            Counter::EgressIcmpErrorsTranslated => "egress_icmp_errors_translated",
            Counter::EgressIcmpPassed => "egress_icmp_passed",
            Counter::IcmpTimeExceededSent => "icmp_time_exceeded_sent",
            Counter::IcmpUnreachableSent => "icmp_unreachable_sent",
        }
    }
}

/// Size of the counters array: room to add counters without resizing the pinned map.
pub const COUNTER_SLOTS: u32 = 64;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and arrays of integers,
    // with every padding byte spelled out as a field, so every bit pattern is valid.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::SourceRangeData {}
    unsafe impl aya::Pod for super::LocalCidrData {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipValue {}
    unsafe impl aya::Pod for super::ConfigValue {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::SockRevNatValue {}
    unsafe impl aya::Pod for super::AffinityBackendKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    /// Sizes are part of the pinned-map ABI: a change needs a map migration.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 24);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<CtValue>(), 64);
        assert_eq!(size_of::<AffinityKey>(), 24);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<SourceRangeData>(), 20);
        assert_eq!(size_of::<LocalCidrData>(), 20);
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<VipValue>(), 4);
        assert_eq!(size_of::<ConfigValue>(), 56);
        assert_eq!(size_of::<SockRevNatKey>(), 32);
        assert_eq!(size_of::<SockRevNatValue>(), 24);
        assert_eq!(size_of::<AffinityBackendKey>(), 12);
    }

    /// Runs a packet sequence through [`ct_advance`] from a new flow; each step is
    /// (from the backend, TCP flags, expected state after it).
    fn walk(proto: u8, steps: &[(bool, u8, u8)]) {
        let (mut state, mut flags) = (CT_STATE_SYN_SENT, 0);
        for (i, &(is_reply, tcp_flags, expected)) in steps.iter().enumerate() {
            (state, flags) = ct_advance(proto, state, flags, is_reply, tcp_flags, 0);
            assert_eq!(state, expected, "step {i} of {steps:?}");
        }
    }

    #[test]
    fn tcp_state_machine_follows_netfilter() {
        const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
        const FIN_ACK: u8 = TCP_FIN | TCP_ACK;
        const RST_ACK: u8 = TCP_RST | TCP_ACK;
        let (orig, reply) = (false, true);
        // Handshake, client closes first (separate ACK then FIN from the backend).
        walk(
            IPPROTO_TCP,
            &[
                (orig, TCP_SYN, CT_STATE_SYN_SENT),
                (orig, TCP_SYN, CT_STATE_SYN_SENT),
                (reply, SYN_ACK, CT_STATE_SYN_RECV),
                (orig, TCP_ACK, CT_STATE_ESTABLISHED),
                (reply, TCP_ACK, CT_STATE_ESTABLISHED),
                (orig, FIN_ACK, CT_STATE_FIN_WAIT),
                (reply, TCP_ACK, CT_STATE_CLOSE_WAIT),
                (reply, TCP_ACK, CT_STATE_CLOSE_WAIT),
                (reply, FIN_ACK, CT_STATE_LAST_ACK),
                (reply, FIN_ACK, CT_STATE_LAST_ACK),
                (orig, TCP_ACK, CT_STATE_TIME_WAIT),
                (orig, TCP_ACK, CT_STATE_TIME_WAIT),
            ],
        );
        // The backend closes first with FIN/ACK answered by FIN/ACK.
        walk(
            IPPROTO_TCP,
            &[
                (orig, TCP_SYN, CT_STATE_SYN_SENT),
                (reply, SYN_ACK, CT_STATE_SYN_RECV),
                (orig, TCP_ACK, CT_STATE_ESTABLISHED),
                (reply, FIN_ACK, CT_STATE_FIN_WAIT),
                (orig, FIN_ACK, CT_STATE_LAST_ACK),
                // The client's packets do not acknowledge its own FIN…
                (orig, TCP_ACK, CT_STATE_LAST_ACK),
                // …the backend's final ACK does.
                (reply, TCP_ACK, CT_STATE_TIME_WAIT),
            ],
        );
        // A FIN is retransmitted: nothing changes.
        walk(
            IPPROTO_TCP,
            &[
                (orig, TCP_SYN, CT_STATE_SYN_SENT),
                (reply, SYN_ACK, CT_STATE_SYN_RECV),
                (orig, TCP_ACK, CT_STATE_ESTABLISHED),
                (orig, FIN_ACK, CT_STATE_FIN_WAIT),
                (orig, FIN_ACK, CT_STATE_FIN_WAIT),
            ],
        );
        // RST, then data still in flight either way: the flow stays closed.
        walk(
            IPPROTO_TCP,
            &[
                (orig, TCP_SYN, CT_STATE_SYN_SENT),
                (reply, SYN_ACK, CT_STATE_SYN_RECV),
                (orig, TCP_ACK, CT_STATE_ESTABLISHED),
                (reply, RST_ACK, CT_STATE_CLOSE),
                (orig, TCP_ACK, CT_STATE_CLOSE),
                (reply, TCP_ACK, CT_STATE_CLOSE),
                (orig, FIN_ACK, CT_STATE_CLOSE),
            ],
        );
        // A SYN answered with RST (port closed on the backend).
        walk(
            IPPROTO_TCP,
            &[
                (orig, TCP_SYN, CT_STATE_SYN_SENT),
                (reply, RST_ACK, CT_STATE_CLOSE),
            ],
        );
        // A RST during the close.
        walk(
            IPPROTO_TCP,
            &[
                (orig, TCP_SYN, CT_STATE_SYN_SENT),
                (reply, SYN_ACK, CT_STATE_SYN_RECV),
                (orig, TCP_ACK, CT_STATE_ESTABLISHED),
                (orig, FIN_ACK, CT_STATE_FIN_WAIT),
                (reply, TCP_RST, CT_STATE_CLOSE),
            ],
        );
        for state in [CT_STATE_TIME_WAIT, CT_STATE_CLOSE] {
            assert!(ct_state_closed(state) && ct_state_closing(state));
        }
        for state in [CT_STATE_SYN_SENT, CT_STATE_SYN_RECV, CT_STATE_ESTABLISHED] {
            assert!(!ct_state_closing(state));
        }
    }

    #[test]
    fn udp_is_unreplied_replied_then_assured() {
        let (state, flags) = ct_advance(IPPROTO_UDP, CT_STATE_SYN_SENT, 0, false, 0, 0);
        assert_eq!((state, flags & CT_F_SEEN_REPLY), (CT_STATE_SYN_SENT, 0));
        // Requests alone never make a flow replied, however long it lasts.
        let (state, _) = ct_advance(
            IPPROTO_UDP,
            state,
            flags,
            false,
            0,
            10 * CT_ASSURED_AFTER_NS,
        );
        assert_eq!(state, CT_STATE_SYN_SENT);
        let (state, flags) = ct_advance(IPPROTO_UDP, state, flags, true, 0, 1_000);
        assert_eq!(
            (state, flags & CT_F_SEEN_REPLY),
            (CT_STATE_SYN_RECV, CT_F_SEEN_REPLY)
        );
        let (state, flags) =
            ct_advance(IPPROTO_UDP, state, flags, false, 0, CT_ASSURED_AFTER_NS - 1);
        assert_eq!(state, CT_STATE_SYN_RECV);
        let (state, flags) = ct_advance(IPPROTO_UDP, state, flags, false, 0, CT_ASSURED_AFTER_NS);
        assert_eq!(state, CT_STATE_ESTABLISHED, "assured");
        let (state, _) = ct_advance(IPPROTO_UDP, state, flags, true, 0, 0);
        assert_eq!(state, CT_STATE_ESTABLISHED, "assured stays assured");
    }

    #[test]
    fn counters_fit_the_pinned_array_and_have_unique_names() {
        assert!(Counter::ALL.len() <= COUNTER_SLOTS as usize);
        for (i, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, i, "{} is out of order", counter.name());
            for other in &Counter::ALL[..i] {
                assert_ne!(counter.name(), other.name());
            }
        }
    }
}
