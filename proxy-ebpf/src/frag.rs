//! Fragments of a datagram follow its first fragment (Cilium's `IPV4_FRAG_DATAGRAMS_MAP`):
//! only the first fragment carries the ports, so when it is parsed its ports are remembered
//! under the datagram's identity (addresses, IP identification, protocol), and each later
//! fragment takes them from there and is translated by the same conntrack entry (addresses
//! only: the L4 header and its checksum are in the first fragment). Reassembling instead would
//! need the whole datagram in the program, which tc cannot hold.
//!
//! A later fragment that arrives before its first one (reordered, or the entry was evicted)
//! finds nothing and passes untouched (counted `fragments_without_first`), as every fragment
//! did before; the sender's retransmission then usually arrives in order.

use aya_ebpf::{macros::map, maps::LruHashMap};
use proxy_common::{Addr, Counter};

use crate::{maps::count, parse::Scratch};

/// Datagrams whose fragments are in flight at once: an entry is needed only from a datagram's
/// first fragment to its last, so the least recently used ones go first (Cilium's default).
const FRAGMENTS_MAX_ENTRIES: u32 = 8_192;

/// A datagram's identity: what every one of its fragments carries.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FragKey {
    pub src: Addr,
    pub dst: Addr,
    /// The IPv4 identification (16 bits) or the IPv6 fragment header's (32 bits), as in the packet.
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// The ports of the datagram's first fragment (network byte order).
#[repr(C)]
#[derive(Clone, Copy)]
struct FragPorts {
    sport: u16,
    dport: u16,
}

/// Not pinned: an entry lives for one datagram's fragments, so a restarted proxy's new object
/// loses at most the datagrams split across the switch.
#[map(name = "FRAGMENTS")]
static FRAGMENTS: LruHashMap<FragKey, FragPorts> =
    LruHashMap::with_max_entries(FRAGMENTS_MAX_ENTRIES, 0);

/// Remembers the ports of the first fragment parsed into `scratch.flow`, under
/// `scratch.frag_key`.
#[inline(always)]
pub fn remember_first(scratch: &Scratch) {
    let ports = FragPorts {
        sport: scratch.flow.sport,
        dport: scratch.flow.dport,
    };
    if FRAGMENTS.insert(&scratch.frag_key, &ports, 0).is_err() {
        count(Counter::FragmentRecordFailures);
    }
}

/// The ports of the datagram `scratch.frag_key` names, from its first fragment:
/// `(sport, dport)`, or `None` (counted) when that was not seen.
#[inline(always)]
pub fn ports_of_later(scratch: &Scratch) -> Option<(u16, u16)> {
    // SAFETY: copied out immediately.
    match unsafe { FRAGMENTS.get(&scratch.frag_key) } {
        Some(ports) => Some((ports.sport, ports.dport)),
        None => {
            count(Counter::FragmentsWithoutFirst);
            None
        }
    }
}
