//! The tc egress program: ICMP / ICMPv6 errors the node's own stack generates about a
//! translated packet (TTL expired in forwarding, no route to the backend, a local backend's port
//! unreachable…) quote the packet after translation, which the client never sent: its socket
//! would not match them (a connect would hang instead of failing at once). On the way out to
//! the client, such an error gets the flow's translation back, as netfilter does for kube-proxy
//! (`nf_nat_icmp_reply_translation`): the same translation as an error arriving at ingress
//! (`icmp::translate_error`). The stack has routed the error already (to the client, the
//! embedded packet's source), so it leaves by the stack's path.
//!
//! Every packet the node sends passes here, so everything but ICMP leaves after reading one
//! header byte (direct packet access, no helper call, no map lookup).

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::{Counter, IPPROTO_ICMP, IPPROTO_ICMPV6};

use crate::{
    fastpath::TRANSLATED,
    icmp,
    maps::count,
    parse::{self, ETH_P_IP, ETH_P_IPV6, IPV4_PROTO, IPV6_NEXT_HEADER, Parsed},
};

const OK: i32 = TC_ACT_OK as i32;

/// Translates an ICMP error about a translated flow leaving by this device, whose IP header
/// starts at `l3_off`; every packet passes (`TC_ACT_OK`).
#[inline(always)]
pub fn egress(ctx: &TcContext, l3_off: usize) -> i32 {
    if !carries_icmp(ctx, l3_off) {
        return OK;
    }
    let translated = matches!(parse::parse(ctx, l3_off), Parsed::IcmpError)
        && icmp::translate_error(ctx) == TRANSLATED;
    count(if translated {
        Counter::EgressIcmpErrorsTranslated
    } else {
        Counter::EgressIcmpPassed
    });
    OK
}

/// Whether the packet is ICMP (IPv4) or ICMPv6 without extension headers (the only errors
/// translated), from `skb->protocol` (set for Ethernet and layer-3 devices alike on egress) and
/// one byte of the IP header. A header outside the linear data reads as "no": the stack builds
/// its ICMP errors linear.
#[inline(always)]
fn carries_icmp(ctx: &TcContext, l3_off: usize) -> bool {
    // `skb->protocol` holds a big-endian 16-bit value.
    let (proto_off, icmp) = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => (IPV4_PROTO, IPPROTO_ICMP),
        ETH_P_IPV6 => (IPV6_NEXT_HEADER, IPPROTO_ICMPV6),
        _ => return false,
    };
    let at = ctx.data() + l3_off + proto_off;
    if at + 1 > ctx.data_end() {
        return false;
    }
    // SAFETY: `at` is inside the packet's linear data (checked just above, and by the verifier).
    unsafe { *(at as *const u8) == icmp }
}
