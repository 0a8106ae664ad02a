//! Fast-path delivery of translated packets (Cilium's BPF host routing): a FIB lookup for the
//! translated destination, then a redirect to the next hop's device. The packet leaves the
//! node without passing netfilter (which would see only one direction of a flow, or a flow it
//! never saw begin, and a host firewall's `ct state invalid drop` would drop it) or the
//! reverse-path filter (which would reject a reply whose translated source routes elsewhere,
//! or a masqueraded packet carrying a node address). Everything the FIB cannot forward (a local
//! destination, no route, a packet needing fragmentation, an expiring TTL) goes to the stack
//! as before. `bpf_redirect_neigh` needs Linux 5.10; every supported kernel has it.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::{CONFIG_F_FAST_PATH, Counter};

use crate::{
    maps::{config, count},
    parse::{ETH_HLEN, IPV4_CSUM_OFF},
};

const OK: i32 = TC_ACT_OK as i32;
/// What a step returns for a packet it translated: the entry point then delivers it
/// ([`delivered`]), outside the step's stack frame.
pub const TRANSLATED: i32 = i32::MIN + 1;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Offsets in the IPv4 and IPv6 headers.
const IPV4_TTL: usize = ETH_HLEN + 8;
const IPV6_HOP_LIMIT: usize = ETH_HLEN + 7;
/// The traffic class and flow label of an IPv6 header's first word (network order).
const IPV6_FLOWINFO_MASK: u32 = 0x0FFF_FFFF_u32.to_be();

/// The final verdict for a step's `verdict`: a translated packet goes through the fast path
/// when the controller turned it on, else to the stack.
#[inline(always)]
pub fn delivered(ctx: &TcContext, verdict: i32) -> i32 {
    if verdict != TRANSLATED {
        return verdict;
    }
    match config() {
        Some(cfg) if cfg.flags & CONFIG_F_FAST_PATH != 0 => deliver(ctx),
        _ => OK,
    }
}

/// Delivers a packet the program has just translated: `TC_ACT_REDIRECT` once it is on its way
/// to the next hop, `TC_ACT_OK` to leave it to the stack. Its own subprogram taking only the
/// context, called after the translation's frame is gone (the FIB parameters are 64 bytes).
#[inline(never)]
fn deliver(ctx: &TcContext) -> i32 {
    // SAFETY: an all-zero `bpf_fib_lookup` is the helper's documented "no extra input".
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return fallback();
    };
    let hop_limit = match u16::from_be(ethertype) {
        ETH_P_IP => {
            let (Ok(ttl), Ok(tos), Ok(proto), Ok(tot_len), Ok(src), Ok(dst)) = (
                ctx.load::<u8>(IPV4_TTL),
                ctx.load::<u8>(ETH_HLEN + 1),
                ctx.load::<u8>(ETH_HLEN + 9),
                ctx.load::<u16>(ETH_HLEN + 2),
                ctx.load::<u32>(ETH_HLEN + 12),
                ctx.load::<u32>(ETH_HLEN + 16),
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
                ctx.load::<u32>(ETH_HLEN),
                ctx.load::<u16>(ETH_HLEN + 4),
                ctx.load::<u8>(ETH_HLEN + 6),
                ctx.load::<u8>(IPV6_HOP_LIMIT),
                ctx.load::<[u32; 4]>(ETH_HLEN + 8),
                ctx.load::<[u32; 4]>(ETH_HLEN + 24),
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
    if decrement_hop_limit(ctx, params.family, hop_limit).is_err() {
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

/// What forwarding does to the header: TTL (with the IPv4 checksum) or hop limit minus one.
#[inline(always)]
fn decrement_hop_limit(ctx: &TcContext, family: u8, hop_limit: u8) -> Result<(), i64> {
    let lowered = hop_limit - 1;
    if family == AF_INET {
        let proto: u8 = ctx.load(IPV4_TTL + 1)?;
        let old = u16::from_ne_bytes([hop_limit, proto]);
        let new = u16::from_ne_bytes([lowered, proto]);
        ctx.l3_csum_replace(IPV4_CSUM_OFF, u64::from(old), u64::from(new), 2)?;
        ctx.store(IPV4_TTL, &lowered, 0)
    } else {
        ctx.store(IPV6_HOP_LIMIT, &lowered, 0)
    }
}
