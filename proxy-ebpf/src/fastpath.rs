//! Fast-path delivery of translated packets (Cilium's BPF host routing): a FIB lookup for the
//! translated destination, then a redirect to the next hop's device. The packet leaves the
//! node without passing netfilter (which would see only one direction of a flow, or a flow it
//! never saw begin, and a host firewall's `ct state invalid drop` would drop it) or the
//! reverse-path filter (which would reject a reply whose translated source routes elsewhere,
//! or a masqueraded packet carrying a node address). Everything the FIB cannot forward (a local
//! destination, no route, a packet needing fragmentation, an expiring TTL) goes to the stack
//! as before. `bpf_redirect_neigh` needs Linux 5.10; every supported kernel has it.
//!
//! On a layer-3 device (no link-layer header: tun, WireGuard, IP tunnels) the packet starts at
//! its IP header, and both redirect helpers need a MAC header to take off again
//! (`bpf_redirect_neigh` drops a packet without one): the program first pushes an Ethernet
//! header (`bpf_skb_change_head`, the helper's documented use: layer-3 to layer-2 redirects).
//! Sent to an Ethernet device, that header carries the neighbour's addresses (or the kernel
//! fills them, `bpf_redirect_neigh`); sent to another layer-3 device, the kernel takes it off
//! before transmitting, and no neighbour is involved.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head},
    programs::TcContext,
};
use proxy_common::{CONFIG_F_FAST_PATH, Counter};

use crate::{
    maps::{config, count},
    parse::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_CSUM, L3_OFF_BARE_IP, ethertype},
};

const OK: i32 = TC_ACT_OK as i32;
/// What a step returns for a packet it translated: the entry point then delivers it
/// ([`delivered`]), outside the step's stack frame.
pub const TRANSLATED: i32 = i32::MIN + 1;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Offsets in the IPv4 and IPv6 headers.
const IPV4_TTL: usize = 8;
const IPV6_HOP_LIMIT: usize = 7;
/// The traffic class and flow label of an IPv6 header's first word (network order).
const IPV6_FLOWINFO_MASK: u32 = 0x0FFF_FFFF_u32.to_be();

/// The final verdict for a step's `verdict`: a translated packet (whose IP header starts at
/// `l3_off`) goes through the fast path when the controller turned it on, else to the stack.
#[inline(always)]
pub fn delivered(ctx: &TcContext, verdict: i32, l3_off: usize) -> i32 {
    if verdict != TRANSLATED {
        return verdict;
    }
    match config() {
        Some(cfg) if cfg.flags & CONFIG_F_FAST_PATH != 0 => deliver(ctx, l3_off),
        _ => OK,
    }
}

/// Delivers a packet the program has just translated: `TC_ACT_REDIRECT` once it is on its way
/// to the next hop, `TC_ACT_OK` to leave it to the stack. Its own subprogram taking only the
/// context, called after the translation's frame is gone (the FIB parameters are 64 bytes).
#[inline(never)]
fn deliver(ctx: &TcContext, l3_off: usize) -> i32 {
    // SAFETY: an all-zero `bpf_fib_lookup` is the helper's documented "no extra input".
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    let Some(ethertype) = ethertype(ctx, l3_off) else {
        return fallback();
    };
    let hop_limit = match ethertype {
        ETH_P_IP => {
            let (Ok(ttl), Ok(tos), Ok(proto), Ok(tot_len), Ok(src), Ok(dst)) = (
                ctx.load::<u8>(l3_off + IPV4_TTL),
                ctx.load::<u8>(l3_off + 1),
                ctx.load::<u8>(l3_off + 9),
                ctx.load::<u16>(l3_off + 2),
                ctx.load::<u32>(l3_off + 12),
                ctx.load::<u32>(l3_off + 16),
            ) else {
                return fallback();
            };
            params.family = AF_INET;
            params.l4_protocol = proto;
            params.__bindgen_anon_1.tot_len = u16::from_be(tot_len);
            params.__bindgen_anon_2.tos = tos;
            params.__bindgen_anon_3.ipv4_src = src;
            params.__bindgen_anon_4.ipv4_dst = dst;
            ttl
        }
        ETH_P_IPV6 => {
            let (Ok(first), Ok(payload_len), Ok(next), Ok(hops), Ok(src), Ok(dst)) = (
                ctx.load::<u32>(l3_off),
                ctx.load::<u16>(l3_off + 4),
                ctx.load::<u8>(l3_off + 6),
                ctx.load::<u8>(l3_off + IPV6_HOP_LIMIT),
                ctx.load::<[u32; 4]>(l3_off + 8),
                ctx.load::<[u32; 4]>(l3_off + 24),
            ) else {
                return fallback();
            };
            params.family = AF_INET6;
            params.l4_protocol = next;
            params.__bindgen_anon_1.tot_len = u16::from_be(payload_len).saturating_add(40);
            params.__bindgen_anon_2.flowinfo = first & IPV6_FLOWINFO_MASK;
            params.__bindgen_anon_3.ipv6_src = src;
            params.__bindgen_anon_4.ipv6_dst = dst;
            hops
        }
        _ => return fallback(),
    };
    // SAFETY: the program's own skb; at tc ingress `ifindex` is the receiving device.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // A router must not forward a packet whose TTL runs out: the stack answers it.
    if hop_limit <= 1 {
        return fallback();
    }
    // SAFETY: `params` is a valid `bpf_fib_lookup` of the size given.
    let found = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &raw mut params,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    let found = u32::try_from(found).unwrap_or(u32::MAX);
    if found != BPF_FIB_LKUP_RET_SUCCESS && found != BPF_FIB_LKUP_RET_NO_NEIGH {
        return fallback();
    }
    if decrement_hop_limit(ctx, l3_off, params.family, hop_limit).is_err() {
        return fallback();
    }
    if l3_off == L3_OFF_BARE_IP && push_ethernet_header(ctx, ethertype).is_err() {
        return fallback();
    }
    count(Counter::FastPathRedirects);
    if found == BPF_FIB_LKUP_RET_SUCCESS {
        // The neighbour is known: write the link-layer header and send it out.
        let (Ok(()), Ok(())) = (ctx.store(0, &params.dmac, 0), ctx.store(6, &params.smac, 0))
        else {
            return fallback();
        };
        // SAFETY: plain helper call.
        return unsafe { bpf_redirect(params.ifindex, 0) } as i32;
    }
    // SAFETY: no neighbour parameters: the kernel resolves the next hop itself.
    unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

#[inline(always)]
fn fallback() -> i32 {
    count(Counter::FastPathFallbacks);
    OK
}

/// What forwarding does to the header (at `l3_off`): TTL (with the IPv4 checksum) or hop limit
/// minus one.
#[inline(always)]
fn decrement_hop_limit(
    ctx: &TcContext,
    l3_off: usize,
    family: u8,
    hop_limit: u8,
) -> Result<(), i64> {
    let lowered = hop_limit - 1;
    if family == AF_INET {
        let proto: u8 = ctx.load(l3_off + IPV4_TTL + 1)?;
        let old = u16::from_ne_bytes([hop_limit, proto]);
        let new = u16::from_ne_bytes([lowered, proto]);
        ctx.l3_csum_replace(l3_off + IPV4_CSUM, u64::from(old), u64::from(new), 2)?;
        ctx.store(l3_off + IPV4_TTL, &lowered, 0)
    } else {
        ctx.store(l3_off + IPV6_HOP_LIMIT, &lowered, 0)
    }
}

/// Gives a packet of a layer-3 device an Ethernet header (addresses zero until the caller or
/// the kernel's neighbour output writes them) so that it can be redirected (see the module
/// doc). Once pushed, the header is the MAC header of the skb: should the packet still go to
/// the stack, tc takes it off again before the stack sees the packet.
#[inline(always)]
fn push_ethernet_header(ctx: &TcContext, ethertype: u16) -> Result<(), i64> {
    // SAFETY: the helper takes the program's own skb.
    let pushed = unsafe { bpf_skb_change_head(ctx.skb.skb.cast(), ETH_HLEN as u32, 0) };
    if pushed != 0 {
        return Err(pushed);
    }
    ctx.store(12, &ethertype.to_be(), 0)
}
