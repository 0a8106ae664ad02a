//! Fast-path delivery of translated packets (Cilium's BPF host routing): a FIB lookup for the
//! translated destination, then a redirect to the next hop's device. The packet leaves the
//! node without passing netfilter (which would see only one direction of a flow, or a flow it
//! never saw begin, and a host firewall's `ct state invalid drop` would drop it) or the
//! reverse-path filter (which would reject a reply whose translated source routes elsewhere,
//! or a masqueraded packet carrying a node address). Everything the FIB cannot forward (a local
//! destination, no route, an IPv4 packet without DF needing fragmentation, an expiring TTL)
//! goes to the stack as before. A packet over the egress MTU that may not be fragmented is
//! answered by the program itself (`reject::refused`): the stack would quote the translated
//! packet, which the client cannot match, or drop a masqueraded one as a martian. So are a
//! masqueraded packet whose TTL expires here and one whose destination has an `unreachable` or
//! `prohibit` route (the stack would drop them as martians before answering); other flows'
//! get the stack's own error, which the egress program translates (`egress`).
//! `bpf_redirect_neigh` needs Linux 5.10; every supported kernel has it.
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
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE, TC_ACT_OK,
        bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head},
    programs::TcContext,
};
use proxy_common::{CONFIG_F_FAST_PATH, Counter, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    maps::{config, count},
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_CSUM, IPV4_PROTO, IPV4_TTL, IPV6_HOP_LIMIT,
        IPV6_NEXT_HEADER, L3_OFF_BARE_IP, ethertype,
    },
};

const OK: i32 = TC_ACT_OK as i32;
/// What a step returns for a packet it translated: the entry point then delivers it
/// ([`delivered`]), outside the step's stack frame.
pub const TRANSLATED: i32 = i32::MIN + 1;
/// What [`delivered`] returns for a translated packet it refuses to forward with an ICMP error
/// due: this plus the [`refusal`]. Apart from every tc verdict and from the other markers (all
/// below `i32::MIN + 32`).
const REFUSAL_BASE: i32 = i32::MIN + 0x1_0000;
/// [`refusal`]s other than an MTU (1 to 65535, the packet too big for the egress device and
/// not to be fragmented: IPv4 with DF, any IPv6): its TTL / hop limit expires here, or its
/// destination's route is `unreachable` / `prohibit`.
pub const REFUSED_TIME_EXCEEDED: u32 = 0x1_0000;
pub const REFUSED_UNREACHABLE: u32 = 0x1_0001;
pub const REFUSED_PROHIBITED: u32 = 0x1_0002;
/// IPv4's don't-fragment flag in the (host order) fragment field.
const IPV4_DF: u16 = 0x4000;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// The traffic class and flow label of an IPv6 header's first word (network order).
const IPV6_FLOWINFO_MASK: u32 = 0x0FFF_FFFF_u32.to_be();

/// The final verdict for a step's `verdict`: a translated packet (whose IP header starts at
/// `l3_off`) goes through the fast path when the controller turned it on, else to the stack. A
/// packet refused with an ICMP error due comes back as a [`refusal`] marker, never as a verdict.
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
    // IPv6 routers never fragment: only an IPv4 packet without DF may be left to the stack's
    // fragmentation.
    let mut may_fragment = false;
    let hop_limit = match ethertype {
        ETH_P_IP => {
            let (Ok(ttl), Ok(tos), Ok(proto), Ok(tot_len), Ok(src), Ok(dst), Ok(frag_off)) = (
                ctx.load::<u8>(l3_off + IPV4_TTL),
                ctx.load::<u8>(l3_off + 1),
                ctx.load::<u8>(l3_off + IPV4_PROTO),
                ctx.load::<u16>(l3_off + 2),
                ctx.load::<u32>(l3_off + 12),
                ctx.load::<u32>(l3_off + 16),
                ctx.load::<u16>(l3_off + 6),
            ) else {
                return fallback();
            };
            may_fragment = u16::from_be(frag_off) & IPV4_DF == 0;
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
                ctx.load::<u8>(l3_off + IPV6_NEXT_HEADER),
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
    // A GSO packet (a sender's segments merged, up to 64 KiB) leaves as segments: the MTU
    // applies to each. (Without a length the helper would compare the device's MTU with the
    // whole packet, and pass every GSO packet whatever its segments' size.)
    // SAFETY: as above.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size != 0 {
        let l3_len = if params.family == AF_INET { 20 } else { 40 };
        params.__bindgen_anon_1.tot_len =
            gso_segment_len(ctx, l3_off, l3_len, params.l4_protocol, gso_size);
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
    // In the stack's order: the route, then the TTL, then the MTU (a router must not forward a
    // packet whose TTL runs out).
    match found {
        BPF_FIB_LKUP_RET_UNREACHABLE => return REFUSAL_BASE + REFUSED_UNREACHABLE as i32,
        BPF_FIB_LKUP_RET_PROHIBIT => return REFUSAL_BASE + REFUSED_PROHIBITED as i32,
        _ if hop_limit <= 1 => return REFUSAL_BASE + REFUSED_TIME_EXCEEDED as i32,
        _ => {}
    }
    if found == BPF_FIB_LKUP_RET_FRAG_NEEDED && !may_fragment {
        // The stack would answer "fragmentation needed" about the translated packet (which the
        // client cannot match), or drop it as a martian when masqueraded: the caller answers.
        // SAFETY: the helper wrote `mtu_result` with this answer (Linux ≥ 5.12).
        let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
        // (0 is never an MTU, and would read as no answer: the stack decides then.)
        if mtu == 0 {
            return fallback();
        }
        return REFUSAL_BASE + i32::from(mtu);
    }
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

/// Why a [`delivered`] answer refuses the packet: the egress MTU it does not fit (1 to 65535)
/// or a `REFUSED_*`; 0 for a verdict.
#[inline(always)]
pub fn refusal(answer: i32) -> u32 {
    match answer.checked_sub(REFUSAL_BASE) {
        Some(refusal) if (1..=REFUSED_PROHIBITED as i32).contains(&refusal) => refusal as u32,
        _ => 0,
    }
}

/// [`delivered`]'s answer for a caller that has no error to send: a refused packet goes to the
/// stack.
#[inline(always)]
pub fn or_stack(answer: i32) -> i32 {
    if refusal(answer) == 0 {
        answer
    } else {
        fallback()
    }
}

/// Leaves a translated packet to the stack (counted).
#[inline(always)]
pub fn fallback() -> i32 {
    count(Counter::FastPathFallbacks);
    OK
}

/// The network length of each segment of a GSO packet: its IP and L4 headers (TCP's with
/// options) and `gso_size` bytes of payload. 0 when the headers cannot be read: the helper then
/// checks the packet against the device alone, which lets any GSO packet through (as before).
#[inline(always)]
fn gso_segment_len(ctx: &TcContext, l3_off: usize, l3_len: usize, proto: u8, gso_size: u32) -> u16 {
    let l4_len = match proto {
        IPPROTO_TCP => match ctx.load::<u8>(l3_off + l3_len + 12) {
            Ok(data_offset) => usize::from(data_offset >> 4) * 4,
            Err(_) => return 0,
        },
        IPPROTO_UDP => 8,
        _ => return 0,
    };
    u16::try_from(l3_len + l4_len + gso_size as usize).unwrap_or(u16::MAX)
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
        let proto: u8 = ctx.load(l3_off + IPV4_PROTO)?;
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
