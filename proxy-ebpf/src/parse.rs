//! Header parsing. Every read goes through `bpf_skb_load_bytes` (bounds checked by the kernel),
//! and every length the headers claim is checked against the packet before anything is
//! rewritten: a packet that does not parse cleanly is passed untouched, never half-translated.

use aya_ebpf::{macros::map, maps::PerCpuArray, programs::TcContext};
use proxy_common::{
    Addr, Counter, FAMILY_IPV4, FAMILY_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP,
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    frag::{self, FragKey},
    maps::count,
};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
const IPV6_FRAGMENT_HEADER: u8 = 44;
const IPV6_FRAG_HLEN: usize = 8;
/// Offset of the checksum inside an IPv4 header.
pub const IPV4_CSUM: usize = 10;
/// Offsets of fields inside the IPv4 and IPv6 headers: TTL / hop limit, protocol / next
/// header.
pub const IPV4_TTL: usize = 8;
pub const IPV4_PROTO: usize = 9;
pub const IPV6_NEXT_HEADER: usize = 6;
pub const IPV6_HOP_LIMIT: usize = 7;
/// ICMP error types (RFC 792) and ICMPv6 error types (RFC 4443: 1 to 4, destination
/// unreachable, packet too big, time exceeded, parameter problem).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;

/// Where the IP header starts in the packets of the device a tc program runs on: after the
/// Ethernet header, or at the start of the packet on layer-3 devices (tun, WireGuard, IP
/// tunnels), whose packets carry no link-layer header. Each entry point passes its own.
pub const L3_OFF_ETHERNET: usize = ETH_HLEN;
pub const L3_OFF_BARE_IP: usize = 0;

/// The packet's network protocol (an ethertype, host order): the Ethernet header's, or on a
/// layer-3 device, where there is none, `skb->protocol`, which its driver set.
#[inline(always)]
pub fn ethertype(ctx: &TcContext, l3_off: usize) -> Option<u16> {
    if l3_off == L3_OFF_BARE_IP {
        // `skb->protocol` holds a big-endian 16-bit value.
        return Some(u16::from_be(ctx.skb.protocol() as u16));
    }
    ctx.load::<u16>(12).ok().map(u16::from_be)
}

/// Offsets of a family's source and destination addresses inside its IP header.
#[inline(always)]
pub fn addr_offsets(family: u8) -> (usize, usize) {
    if family == FAMILY_IPV4 {
        (12, 16)
    } else {
        (8, 24)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub version_class_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: Addr,
    pub daddr: Addr,
}

/// The IPv6 fragment extension header (RFC 8200 4.5).
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6FragHdr {
    next_header: u8,
    _reserved: u8,
    /// Offset in 8-byte units (upper 13 bits) and the more-fragments flag (lowest bit).
    offset_flags: u16,
    id: u32,
}

/// A TCP/UDP/SCTP packet with clean headers: its tuple and where its fields are.
#[derive(Clone, Copy)]
pub struct Flow {
    /// Where the IP header starts (see [`L3_OFF_ETHERNET`]). A `u8`, which keeps the struct
    /// at its size: `open_flow`'s frame holds copies of it, and Linux 6.1's verifier limits
    /// the stack of the call chain it is in (see `tc::open_flow`).
    pub l3_off: u8,
    pub family: u8,
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
    /// Network byte order, as in the packet.
    pub sport: u16,
    pub dport: u16,
    pub l4_off: usize,
    /// The L4 header and payload length the IP header declares (checked against the packet).
    pub l4_len: u16,
    pub tcp_flags: u8,
    /// A fragment after the first: no L4 header, the ports are its first fragment's
    /// ([`crate::frag`]); only its addresses are rewritten.
    pub later_fragment: bool,
}

impl Flow {
    /// Where the source address starts.
    #[inline(always)]
    pub fn src_off(&self) -> usize {
        usize::from(self.l3_off) + addr_offsets(self.family).0
    }

    #[inline(always)]
    pub fn dst_off(&self) -> usize {
        usize::from(self.l3_off) + addr_offsets(self.family).1
    }

    /// The L4 checksum covering the pseudo header, if the protocol has one.
    #[inline(always)]
    pub fn l4_csum(&self) -> L4Csum {
        if self.later_fragment {
            return L4Csum::None;
        }
        match self.proto {
            IPPROTO_TCP => L4Csum::Inet(self.l4_off + 16),
            IPPROTO_UDP => L4Csum::Udp(self.l4_off + 6),
            // SCTP's CRC32c covers no pseudo header: address rewrites leave it valid.
            _ => L4Csum::None,
        }
    }
}

/// How the L4 checksum of a packet is updated when its addresses or ports change.
#[derive(Clone, Copy)]
pub enum L4Csum {
    None,
    /// Always present (TCP, ICMPv6).
    Inet(usize),
    /// UDP: zero means "no checksum" on IPv4 and must stay zero.
    Udp(usize),
}

/// An ICMP or ICMPv6 error whose embedded packet may belong to a NATed flow.
#[derive(Clone, Copy)]
pub struct IcmpError {
    /// Where the outer IP header starts (see [`L3_OFF_ETHERNET`]; a `u8` as in [`Flow`]).
    pub l3_off: u8,
    pub family: u8,
    pub outer_src: Addr,
    pub outer_dst: Addr,
    /// Offset of the ICMP header (its checksum is at +2).
    pub icmp_off: usize,
    /// The embedded packet: its L3 offset, protocol, addresses and ports.
    pub inner_l3_off: usize,
    pub inner_l4_off: usize,
    pub inner_proto: u8,
    pub inner_src: Addr,
    pub inner_dst: Addr,
    pub inner_sport: u16,
    pub inner_dport: u16,
}

/// What the parser found; the headers themselves are in [`Scratch`].
pub enum Parsed {
    Flow,
    /// A TCP/UDP fragment after the first whose first fragment was seen: `flow` holds the
    /// datagram's tuple; only a known flow translates it.
    LaterFragment,
    IcmpError,
    /// An ICMP / ICMPv6 echo request: `icmp.family` and `icmp.outer_dst` are set (kube-proxy
    /// rejects every protocol to a ClusterIP and drops it to an unallocated service address).
    Echo,
    /// Not ours to translate (other ethertypes and protocols, ICMP echo).
    Pass,
}

/// The parsed packet, kept in a per-CPU map rather than on the stack: the 512-byte BPF stack
/// is shared by the whole call chain, and subprograms that take only the context cannot have
/// their arguments rewritten by LLVM into more than the five registers BPF calls have.
#[repr(C)]
pub struct Scratch {
    pub flow: Flow,
    pub icmp: IcmpError,
    /// What `new_flow` chose, for `open_flow`.
    pub chosen: crate::tc::Chosen,
    /// The identity of the datagram a fragment belongs to (map keys are read from here, off
    /// the stack).
    pub frag_key: FragKey,
}

#[map(name = "PACKET_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's parsed packet (valid for the current program run).
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: a per-CPU slot, used by one program run at a time on this CPU.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn be16(v: u16) -> u16 {
    u16::from_be(v)
}

/// Parses the packet at `ctx`, whose IP header starts at `l3_off`, into [`scratch`].
/// Inconsistent headers are counted and passed.
#[inline(never)]
pub fn parse(ctx: &TcContext, l3_off: usize) -> Parsed {
    let Some(out) = scratch() else {
        return Parsed::Pass;
    };
    let Some(ethertype) = ethertype(ctx, l3_off) else {
        count(Counter::ParseFailures);
        return Parsed::Pass;
    };
    let parsed = match ethertype {
        ETH_P_IP => parse_ipv4(ctx, out, l3_off),
        ETH_P_IPV6 => parse_ipv6(ctx, out, l3_off),
        _ => Ok(Parsed::Pass),
    };
    parsed.unwrap_or(Parsed::Pass)
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, out: &mut Scratch, l3_off: usize) -> Result<Parsed, ()> {
    let fail = |_| count(Counter::ParseFailures);
    let ip: Ipv4Hdr = ctx.load(l3_off).map_err(fail)?;
    if ip.version_ihl >> 4 != 4 || ip.version_ihl & 0x0f < 5 {
        count(Counter::ParseFailures);
        return Err(());
    }
    if ip.version_ihl & 0x0f != 5 {
        count(Counter::Ipv4Options);
        return Ok(Parsed::Pass);
    }
    let total = u32::from(be16(ip.tot_len));
    let available = ctx.len().saturating_sub(l3_off as u32);
    if total < IPV4_HLEN as u32 || total > available {
        count(Counter::ParseFailures);
        return Err(());
    }
    let l4_off = l3_off + IPV4_HLEN;
    let l4_len = total - IPV4_HLEN as u32;
    let src = [ip.saddr, 0, 0, 0];
    let dst = [ip.daddr, 0, 0, 0];
    // More-fragments flag or a fragment offset.
    let frag_off = be16(ip.frag_off);
    if frag_off & 0x3fff != 0 {
        out.frag_key = FragKey {
            src,
            dst,
            id: u32::from(ip.id),
            proto: ip.proto,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        };
        return parse_fragment(ctx, out, frag_off & 0x1fff == 0, l3_off, l4_off, l4_len);
    }
    if ip.proto == IPPROTO_ICMP {
        return parse_icmp(ctx, &mut out.icmp, FAMILY_IPV4, src, dst, l4_off, l4_len);
    }
    parse_l4(
        ctx,
        &mut out.flow,
        l3_off,
        FAMILY_IPV4,
        ip.proto,
        src,
        dst,
        l4_off,
        l4_len,
        false,
    )
}

/// A fragment of a TCP or UDP datagram whose identity is in `out.frag_key`: the first one is
/// parsed as a flow and its ports remembered; a later one takes them from its first fragment.
/// Other protocols' fragments pass (an SCTP CRC32c or an ICMP error spans the whole datagram).
#[inline(always)]
fn parse_fragment(
    ctx: &TcContext,
    out: &mut Scratch,
    first: bool,
    l3_off: usize,
    l4_off: usize,
    l4_len: u32,
) -> Result<Parsed, ()> {
    count(Counter::Fragments);
    let key = out.frag_key;
    if key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP {
        return Ok(Parsed::Pass);
    }
    if first {
        let parsed = parse_l4(
            ctx,
            &mut out.flow,
            l3_off,
            key.family,
            key.proto,
            key.src,
            key.dst,
            l4_off,
            l4_len,
            true,
        )?;
        frag::remember_first(out);
        return Ok(parsed);
    }
    let Some((sport, dport)) = frag::ports_of_later(out) else {
        return Ok(Parsed::Pass);
    };
    out.flow = Flow {
        l3_off: l3_off as u8,
        family: key.family,
        proto: key.proto,
        src: key.src,
        dst: key.dst,
        sport,
        dport,
        l4_off,
        l4_len: 0,
        tcp_flags: 0,
        later_fragment: true,
    };
    Ok(Parsed::LaterFragment)
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, out: &mut Scratch, l3_off: usize) -> Result<Parsed, ()> {
    let fail = |_| count(Counter::ParseFailures);
    let ip: Ipv6Hdr = ctx.load(l3_off).map_err(fail)?;
    if u32::from_be(ip.version_class_flow) >> 28 != 6 {
        count(Counter::ParseFailures);
        return Err(());
    }
    let payload = u32::from(be16(ip.payload_len));
    let available = ctx.len().saturating_sub((l3_off + IPV6_HLEN) as u32);
    if payload > available {
        count(Counter::ParseFailures);
        return Err(());
    }
    let l4_off = l3_off + IPV6_HLEN;
    match ip.next_header {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => parse_l4(
            ctx,
            &mut out.flow,
            l3_off,
            FAMILY_IPV6,
            ip.next_header,
            ip.saddr,
            ip.daddr,
            l4_off,
            payload,
            false,
        ),
        IPPROTO_ICMPV6 => parse_icmp(
            ctx,
            &mut out.icmp,
            FAMILY_IPV6,
            ip.saddr,
            ip.daddr,
            l4_off,
            payload,
        ),
        IPV6_FRAGMENT_HEADER => {
            if payload < IPV6_FRAG_HLEN as u32 {
                count(Counter::ParseFailures);
                return Err(());
            }
            let frag: Ipv6FragHdr = ctx.load(l4_off).map_err(fail)?;
            out.frag_key = FragKey {
                src: ip.saddr,
                dst: ip.daddr,
                id: frag.id,
                proto: frag.next_header,
                family: FAMILY_IPV6,
                _pad: [0; 2],
            };
            // The offset is the upper 13 bits; the lowest is the more-fragments flag.
            let first = be16(frag.offset_flags) >> 3 == 0;
            parse_fragment(
                ctx,
                out,
                first,
                l3_off,
                l4_off + IPV6_FRAG_HLEN,
                payload - IPV6_FRAG_HLEN as u32,
            )
        }
        // Hop-by-hop, routing, destination options, AH, ESP: not walked (bounded parsing).
        0 | 43 | 60 | 51 | 50 => {
            count(Counter::Ipv6ExtensionHeaders);
            Ok(Parsed::Pass)
        }
        _ => Ok(Parsed::Pass),
    }
}

/// Reads the ports (and TCP flags) of a TCP/UDP/SCTP header of `l4_len` declared bytes.
#[inline(always)]
fn parse_l4(
    ctx: &TcContext,
    out: &mut Flow,
    l3_off: usize,
    family: u8,
    proto: u8,
    src: Addr,
    dst: Addr,
    l4_off: usize,
    l4_len: u32,
    first_fragment: bool,
) -> Result<Parsed, ()> {
    let min = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        IPPROTO_SCTP => 12,
        _ => return Err(()),
    };
    if l4_len < min {
        count(Counter::ParseFailures);
        return Err(());
    }
    let fail = |_| count(Counter::ParseFailures);
    let ports: [u16; 2] = ctx.load(l4_off).map_err(fail)?;
    let mut tcp_flags = 0;
    if proto == IPPROTO_TCP {
        let offset_flags: [u8; 2] = ctx.load(l4_off + 12).map_err(fail)?;
        let data_offset = u32::from(offset_flags[0] >> 4) * 4;
        if data_offset < 20 || data_offset > l4_len {
            count(Counter::ParseFailures);
            return Err(());
        }
        tcp_flags = offset_flags[1];
    } else if proto == IPPROTO_UDP {
        let udp_len: u16 = ctx.load(l4_off + 4).map_err(fail)?;
        let udp_len = u32::from(be16(udp_len));
        // A first fragment holds only the start of the datagram the UDP length covers.
        if udp_len < 8 || (udp_len > l4_len && !first_fragment) {
            count(Counter::ParseFailures);
            return Err(());
        }
    }
    *out = Flow {
        // At most ETH_HLEN.
        l3_off: l3_off as u8,
        family,
        proto,
        src,
        dst,
        sport: ports[0],
        dport: ports[1],
        l4_off,
        // Both IP length fields are 16 bits.
        l4_len: l4_len as u16,
        tcp_flags,
        later_fragment: false,
    };
    Ok(Parsed::Flow)
}

/// ICMP errors carry the packet that caused them: destination unreachable (fragmentation
/// needed included), time exceeded and parameter problem, and ICMPv6's destination unreachable,
/// packet too big, time exceeded and parameter problem (RFC 792, RFC 4443). Everything else
/// passes.
#[inline(always)]
fn parse_icmp(
    ctx: &TcContext,
    out: &mut IcmpError,
    family: u8,
    outer_src: Addr,
    outer_dst: Addr,
    icmp_off: usize,
    icmp_len: u32,
) -> Result<Parsed, ()> {
    let fail = |_| count(Counter::ParseFailures);
    if icmp_len < 8 {
        count(Counter::ParseFailures);
        return Err(());
    }
    let icmp_type: u8 = ctx.load(icmp_off).map_err(fail)?;
    let is_error = if family == FAMILY_IPV4 {
        matches!(
            icmp_type,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        )
    } else {
        (ICMPV6_DEST_UNREACH..=ICMPV6_PARAMETER_PROBLEM).contains(&icmp_type)
    };
    if !is_error {
        let echo_request = if family == FAMILY_IPV4 { 8 } else { 128 };
        if icmp_type == echo_request {
            out.family = family;
            out.outer_src = outer_src;
            out.outer_dst = outer_dst;
            return Ok(Parsed::Echo);
        }
        return Ok(Parsed::Pass);
    }
    let inner_l3_off = icmp_off + 8;
    let inner_len = icmp_len - 8;
    let (inner_proto, inner_src, inner_dst, inner_l4_off) = if family == FAMILY_IPV4 {
        if inner_len < (IPV4_HLEN + 8) as u32 {
            return Ok(Parsed::Pass);
        }
        let ip: Ipv4Hdr = ctx.load(inner_l3_off).map_err(fail)?;
        if ip.version_ihl != 0x45 {
            return Ok(Parsed::Pass);
        }
        (
            ip.proto,
            [ip.saddr, 0, 0, 0],
            [ip.daddr, 0, 0, 0],
            inner_l3_off + IPV4_HLEN,
        )
    } else {
        if inner_len < (IPV6_HLEN + 8) as u32 {
            return Ok(Parsed::Pass);
        }
        let ip: Ipv6Hdr = ctx.load(inner_l3_off).map_err(fail)?;
        (ip.next_header, ip.saddr, ip.daddr, inner_l3_off + IPV6_HLEN)
    };
    if !matches!(inner_proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return Ok(Parsed::Pass);
    }
    let ports: [u16; 2] = ctx.load(inner_l4_off).map_err(fail)?;
    // As in `parse_l4`: a plain IP header right before the ICMP header.
    *out = IcmpError {
        l3_off: (icmp_off
            - if family == FAMILY_IPV4 {
                IPV4_HLEN
            } else {
                IPV6_HLEN
            }) as u8,
        family,
        outer_src,
        outer_dst,
        icmp_off,
        inner_l3_off,
        inner_l4_off,
        inner_proto,
        inner_src,
        inner_dst,
        inner_sport: ports[0],
        inner_dport: ports[1],
    };
    Ok(Parsed::IcmpError)
}
