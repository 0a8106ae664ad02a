//! SCTP port rewrites. SCTP's CRC32c covers the common header's ports but no pseudo header: an
//! address rewrite leaves it valid, a port rewrite updates it by the exact difference
//! (`proxy_common::crc32c`), in both directions of a flow.
//!
//! The CRC32c is updated once at the end of the program (`finish`), from one call site, by
//! comparing the ports the packet leaves with to those it was parsed with, rather than inside
//! each of the three rewrite paths (each copy would cost the verifier's budget again).

use aya_ebpf::{
    bindings::{BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use proxy_common::{
    Counter, IPPROTO_SCTP,
    crc32c::{self, SCTP_CHECKSUM_OFF},
};

use crate::{fastpath::TRANSLATED, maps::count, parse::scratch};

/// `verdict`, with the CRC32c of the packet updated if its SCTP ports were rewritten; a drop if
/// the update failed (the packet's receiver would discard it).
///
/// A zero checksum is left alone: a host's SCTP stack leaves it zero when the CRC is offloaded
/// (`CHECKSUM_PARTIAL`), and it is then computed over the packet as it leaves, rewritten ports
/// included (the kernel's SCTP NAT does the same for such packets).
#[inline(never)]
pub fn finish(ctx: &TcContext, verdict: i32) -> i32 {
    let Some(scratch) = scratch() else {
        return verdict;
    };
    let flow = &scratch.flow;
    // Only a packet on its way (translated, or passed to the stack) is fixed up.
    if flow.proto != IPPROTO_SCTP || (verdict != TRANSLATED && verdict != TC_ACT_OK as i32) {
        return verdict;
    }
    // The ports the packet leaves with, against those it was parsed with.
    let Ok(new) = ctx.load::<[u8; 4]>(flow.l4_off) else {
        count(Counter::RewriteFailures);
        return TC_ACT_SHOT as i32;
    };
    let old = ports(flow.sport, flow.dport);
    if new == old {
        return verdict;
    }
    let off = flow.l4_off + SCTP_CHECKSUM_OFF;
    let Ok(stored) = ctx.load::<[u8; 4]>(off) else {
        count(Counter::RewriteFailures);
        return TC_ACT_SHOT as i32;
    };
    if stored == [0; 4] {
        return verdict;
    }
    let crc = u32::from_le_bytes(stored) ^ crc32c::port_rewrite_delta(old, new, flow.l4_len);
    // RECOMPUTE_CSUM keeps `skb->csum` right for CHECKSUM_COMPLETE packets: nothing else
    // compensates a change of these bytes.
    if ctx
        .store(off, &crc.to_le_bytes(), u64::from(BPF_F_RECOMPUTE_CSUM))
        .is_err()
    {
        count(Counter::RewriteFailures);
        return TC_ACT_SHOT as i32;
    }
    verdict
}

/// The first four bytes of the header, as in the packet.
#[inline(always)]
fn ports(sport: u16, dport: u16) -> [u8; 4] {
    let (s, d) = (sport.to_ne_bytes(), dport.to_ne_bytes());
    [s[0], s[1], d[0], d[1]]
}
