//! REJECT: turns the packet into an ICMP / ICMPv6 port unreachable addressed to its sender and
//! sends it back out of the interface it came in on (an Ethernet frame with the addresses
//! swapped, or on a layer-3 device a bare IP packet). The same builder answers a translated
//! packet the fast path refuses (`refused`: too big for its egress device, TTL expiring, a
//! refusing route). Like kube-proxy's nftables `reject`, this
//! is ICMP for every protocol (TCP included): a TCP client gets ECONNREFUSED from it.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use proxy_common::{Addr, Counter, FAMILY_IPV4, IPPROTO_ICMP, IPPROTO_ICMPV6};

use crate::{
    fastpath::{REFUSED_PROHIBITED, REFUSED_TIME_EXCEEDED, REFUSED_UNREACHABLE, fallback},
    maps::count,
    parse::{self, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, L3_OFF_BARE_IP},
};

/// Bytes of the offending packet's L4 header quoted after its IP header (the minimum both
/// RFC 792 and the ports need; kept fixed so the reply's size is fixed).
const QUOTED_L4: usize = 8;

#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    csum: u16,
    unused: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Icmp4Reply {
    ip: Ipv4Hdr,
    icmp: IcmpHdr,
    quoted_ip: Ipv4Hdr,
    quoted_l4: [u8; QUOTED_L4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Icmp6Reply {
    ip: Ipv6Hdr,
    icmp: IcmpHdr,
    quoted_ip: Ipv6Hdr,
    quoted_l4: [u8; QUOTED_L4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6PseudoHdr {
    src: Addr,
    dst: Addr,
    len: u32,
    zero: [u8; 3],
    next_header: u8,
}

/// Keeps `skb->csum` right for CHECKSUM_COMPLETE packets (NIC-validated receives) whose
/// content is replaced wholesale; without it the receiver of the reply would see a checksum
/// fault. A no-op for the other checksum states.
const RECOMPUTE_CSUM: u64 = BPF_F_RECOMPUTE_CSUM as u64;

/// Where replies are built: the BPF stack (512 bytes for the whole call chain) has no room for
/// them. Holds no state between runs, so it is not pinned.
#[repr(C)]
struct Scratch {
    v4: Icmp4Reply,
    v6: Icmp6Reply,
    pseudo: Ipv6PseudoHdr,
}

#[map(name = "REJECT_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// One's-complement sum of `len` bytes at `data` (a multiple of 4), added to `seed`.
#[inline(always)]
fn csum_add(data: *const u8, len: u32, seed: u32) -> u32 {
    // SAFETY: the helper only reads `len` bytes of the stack buffer `data` points to.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, data as *mut u32, len, seed) };
    sum as u32
}

#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Swaps the Ethernet addresses of a frame (a layer-3 device's packet, whose IP header starts
/// at `l3_off` 0, has none).
#[inline(always)]
fn swap_macs(ctx: &TcContext, l3_off: usize) -> Result<(), ()> {
    if l3_off == L3_OFF_BARE_IP {
        return Ok(());
    }
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(|_| ())
}

#[inline(always)]
fn resize(ctx: &TcContext, len: usize) -> Result<(), ()> {
    // SAFETY: the helper takes the program's own skb.
    let ret =
        unsafe { bpf_skb_change_tail(ctx.skb.skb as *mut __sk_buff as *mut _, len as u32, 0) };
    if ret == 0 { Ok(()) } else { Err(()) }
}

#[inline(always)]
fn send_back(ctx: &TcContext) -> i32 {
    // SAFETY: reading the ingress interface of the program's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // Egress of the interface the packet came in on: towards the client.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// The ICMP error to build: the port unreachable of a REJECT, or the "fragmentation needed" /
/// "packet too big" of a translated packet over the egress MTU (with that MTU).
#[derive(Clone, Copy)]
struct ErrorKind {
    /// ICMP type and code for IPv4, ICMPv6 type and code for IPv6.
    v4: (u8, u8),
    v6: (u8, u8),
    /// The header's last four bytes (network order): the next-hop MTU for a too-big error
    /// (RFC 1191 puts it in the low 16 bits, RFC 8201 uses all 32; the same bytes for both).
    info: u32,
    /// The packet was translated: quote it as its sender sent it (from the parsed flow).
    quote_original: bool,
}

/// Replaces the packet, whose IP header starts at `l3_off`, with a port unreachable for its
/// sender. The caller has checked that the packet has a plain IP header (no options) and at
/// least 8 bytes of L4 header.
#[inline(never)]
pub fn reject(ctx: &TcContext, family: u8, l3_off: usize) -> i32 {
    let kind = ErrorKind {
        v4: (3, 3),
        v6: (1, 4),
        info: 0,
        quote_original: false,
    };
    answer(ctx, family, kind, l3_off)
}

/// Replaces the translated packet of the parsed flow, which the fast path refused
/// (`fastpath::refusal`), with the ICMP error for its sender, about the packet as the sender
/// sent it and from the address it sent to, so that the sender matches it to its socket:
/// "fragmentation needed" / "packet too big" carrying the egress MTU, "time exceeded", or
/// "destination unreachable" (host unreachable / no route; administratively prohibited). An
/// expired TTL or a refusing route of a packet whose source the translation kept (a forward
/// packet not masqueraded) goes to the stack instead, which answers as it does for kube-proxy
/// (its own address, its rate limits) and whose error the egress program translates; with its
/// source rewritten (masqueraded, or a reply), the stack would drop it as a martian or send its
/// error to the service address. A fragment, or a packet whose headers the error could not
/// quote as sent, goes to the stack too (counted as a fast-path fallback).
#[inline(never)]
pub fn refused(ctx: &TcContext, refusal: u32) -> i32 {
    let Some(parsed) = parse::scratch() else {
        return TC_ACT_OK as i32;
    };
    let flow = &parsed.flow;
    let plain_hlen = if flow.family == FAMILY_IPV4 {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    };
    let l3_off = usize::from(flow.l3_off);
    if flow.later_fragment || flow.l4_off != l3_off + plain_hlen {
        return fallback();
    }
    let (v4, v6, info, counter) = match refusal {
        REFUSED_TIME_EXCEEDED => ((11, 0), (3, 0), 0, Counter::IcmpTimeExceededSent),
        REFUSED_UNREACHABLE => ((3, 1), (1, 0), 0, Counter::IcmpUnreachableSent),
        REFUSED_PROHIBITED => ((3, 13), (1, 1), 0, Counter::IcmpUnreachableSent),
        mtu => ((3, 4), (2, 0), mtu.to_be(), Counter::IcmpTooBigSent),
    };
    if refusal > 0xffff && !source_rewritten(ctx, flow) {
        return fallback();
    }
    let kind = ErrorKind {
        v4,
        v6,
        info,
        quote_original: true,
    };
    let verdict = answer(ctx, flow.family, kind, l3_off);
    if verdict != TC_ACT_SHOT as i32 {
        count(counter);
    }
    verdict
}

/// Whether the translated packet's source differs from the one its sender gave it.
#[inline(always)]
fn source_rewritten(ctx: &TcContext, flow: &parse::Flow) -> bool {
    if flow.family == FAMILY_IPV4 {
        ctx.load::<u32>(flow.src_off())
            .is_ok_and(|src| src != flow.src[0])
    } else {
        ctx.load::<Addr>(flow.src_off())
            .is_ok_and(|src| src != flow.src)
    }
}

#[inline(always)]
fn answer(ctx: &TcContext, family: u8, kind: ErrorKind, l3_off: usize) -> i32 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_SHOT as i32;
    };
    // SAFETY: this CPU's scratch slot, used by this program run only.
    let scratch = unsafe { &mut *scratch };
    let built = if family == FAMILY_IPV4 {
        reject_ipv4(ctx, scratch, kind, l3_off)
    } else {
        reject_ipv6(ctx, scratch, kind, l3_off)
    };
    if built.is_err() {
        count(Counter::RewriteFailures);
        return TC_ACT_SHOT as i32;
    }
    send_back(ctx)
}

/// Puts the parsed flow's original addresses and ports back into a quote of its translated
/// packet. The quoted L4 checksum is left as it is: receivers read only the ports (and TCP's
/// sequence number) of a quote.
#[inline(always)]
fn restore_ports(quoted_l4: &mut [u8; QUOTED_L4], flow: &parse::Flow) {
    quoted_l4[..2].copy_from_slice(&flow.sport.to_ne_bytes());
    quoted_l4[2..4].copy_from_slice(&flow.dport.to_ne_bytes());
}

#[inline(always)]
fn reject_ipv4(
    ctx: &TcContext,
    scratch: &mut Scratch,
    kind: ErrorKind,
    l3_off: usize,
) -> Result<(), ()> {
    let reply = &mut scratch.v4;
    reply.quoted_ip = ctx.load(l3_off).map_err(|_| ())?;
    reply.quoted_l4 = ctx.load(l3_off + IPV4_HLEN).map_err(|_| ())?;
    if kind.quote_original {
        let flow = &parse::scratch().ok_or(())?.flow;
        reply.quoted_ip.saddr = flow.src[0];
        reply.quoted_ip.daddr = flow.dst[0];
        reply.quoted_ip.check = 0;
        reply.quoted_ip.check = fold(csum_add(
            core::ptr::from_ref(&reply.quoted_ip).cast(),
            IPV4_HLEN as u32,
            0,
        ));
        restore_ports(&mut reply.quoted_l4, flow);
    }
    let body_len = size_of::<Icmp4Reply>();
    reply.ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: (body_len as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: 64,
        proto: IPPROTO_ICMP,
        check: 0,
        saddr: reply.quoted_ip.daddr,
        daddr: reply.quoted_ip.saddr,
    };
    reply.icmp = IcmpHdr {
        kind: kind.v4.0,
        code: kind.v4.1,
        csum: 0,
        unused: kind.info,
    };
    reply.ip.check = fold(csum_add(
        core::ptr::from_ref(&reply.ip).cast(),
        IPV4_HLEN as u32,
        0,
    ));
    reply.icmp.csum = fold(csum_add(
        core::ptr::from_ref(&reply.icmp).cast(),
        (body_len - IPV4_HLEN) as u32,
        0,
    ));
    swap_macs(ctx, l3_off)?;
    resize(ctx, l3_off + body_len)?;
    ctx.store(l3_off, reply, RECOMPUTE_CSUM).map_err(|_| ())
}

#[inline(always)]
fn reject_ipv6(
    ctx: &TcContext,
    scratch: &mut Scratch,
    kind: ErrorKind,
    l3_off: usize,
) -> Result<(), ()> {
    let reply = &mut scratch.v6;
    reply.quoted_ip = ctx.load(l3_off).map_err(|_| ())?;
    reply.quoted_l4 = ctx.load(l3_off + IPV6_HLEN).map_err(|_| ())?;
    if kind.quote_original {
        let flow = &parse::scratch().ok_or(())?.flow;
        reply.quoted_ip.saddr = flow.src;
        reply.quoted_ip.daddr = flow.dst;
        restore_ports(&mut reply.quoted_l4, flow);
    }
    let body_len = size_of::<Icmp6Reply>();
    let icmp_len = body_len - IPV6_HLEN;
    reply.ip = Ipv6Hdr {
        version_class_flow: (6u32 << 28).to_be(),
        payload_len: (icmp_len as u16).to_be(),
        next_header: IPPROTO_ICMPV6,
        hop_limit: 64,
        saddr: reply.quoted_ip.daddr,
        daddr: reply.quoted_ip.saddr,
    };
    reply.icmp = IcmpHdr {
        kind: kind.v6.0,
        code: kind.v6.1,
        csum: 0,
        unused: kind.info,
    };
    let pseudo = &mut scratch.pseudo;
    *pseudo = Ipv6PseudoHdr {
        src: reply.ip.saddr,
        dst: reply.ip.daddr,
        len: (icmp_len as u32).to_be(),
        zero: [0; 3],
        next_header: IPPROTO_ICMPV6,
    };
    let sum = csum_add(
        core::ptr::from_ref(pseudo).cast(),
        size_of::<Ipv6PseudoHdr>() as u32,
        0,
    );
    reply.icmp.csum = fold(csum_add(
        core::ptr::from_ref(&reply.icmp).cast(),
        icmp_len as u32,
        sum,
    ));
    swap_macs(ctx, l3_off)?;
    resize(ctx, l3_off + body_len)?;
    ctx.store(l3_off, reply, RECOMPUTE_CSUM).map_err(|_| ())
}
