//! Ethernet frames for `BPF_PROG_TEST_RUN`: building a flow's first packet and reading back
//! what the program made of it, checksums included. Used by `trace` and by the kernel tests.

use std::net::{IpAddr, SocketAddr};

use etherparse::TcpHeader;
use etherparse::checksum::Sum16BitWords;
use etherparse::{
    IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, Ipv6Extensions, Ipv6Header, PacketBuilder,
    PacketBuilderStep,
};
use proxy_common::crc32c::{SCTP_CHECKSUM_OFF, sctp_checksum, set_sctp_checksum};
use proxy_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
/// Locally administered MACs: the frame's source (the client) and destination (the node).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// The internet checksum of `data` (RFC 1071, etherparse's one's-complement sum): zero over a
/// header whose checksum is valid.
pub fn internet_checksum(data: &[u8]) -> u16 {
    // etherparse sums in native byte order: `to_be` gives the value as the header holds it.
    Sum16BitWords::new()
        .add_slice(data)
        .ones_complement()
        .to_be()
}

/// `ip` as the 16 bytes of an IPv6 address (an IPv4 address mapped).
fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The sum of the pseudo header for `len` bytes of protocol `proto` (RFC 9293 3.1, RFC 8200
/// 8.1).
fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Sum16BitWords {
    if let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) {
        Sum16BitWords::new()
            .add_4bytes(s.octets())
            .add_4bytes(d.octets())
            .add_2bytes([0, proto])
            .add_2bytes((len as u16).to_be_bytes())
    } else {
        Sum16BitWords::new()
            .add_16bytes(v6_octets(src))
            .add_16bytes(v6_octets(dst))
            .add_4bytes((len as u32).to_be_bytes())
            .add_4bytes([0, 0, 0, proto])
    }
}

/// Offset of the L4 checksum inside an L4 header, for protocols with a pseudo header.
fn l4_csum_offset(proto: u8) -> Option<usize> {
    match proto {
        IPPROTO_TCP => Some(16),
        IPPROTO_UDP => Some(6),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => Some(2),
        _ => None,
    }
}

/// TCP's SYN flag, what [`build`] sends.
pub const TCP_SYN: u8 = 0x02;

/// An Ethernet frame from [`CLIENT_MAC`] to [`NODE_MAC`] with an IPv4 header (no options,
/// don't-fragment, TTL 64) or an IPv6 header (hop limit 64), built by etherparse: add the L4
/// header (`.tcp_header()`, `.udp()`, `.icmpv4()`, …) or `.write()` a raw L4 payload.
pub fn frame_builder(src: IpAddr, dst: IpAddr) -> PacketBuilderStep<IpHeaders> {
    let ip = if let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) {
        IpHeaders::Ipv4(
            Ipv4Header {
                identification: 0x1234,
                time_to_live: 64,
                source: s.octets(),
                destination: d.octets(),
                ..Ipv4Header::default()
            },
            Ipv4Extensions::default(),
        )
    } else {
        IpHeaders::Ipv6(
            Ipv6Header {
                hop_limit: 64,
                source: v6_octets(src),
                destination: v6_octets(dst),
                ..Ipv6Header::default()
            },
            Ipv6Extensions::default(),
        )
    };
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ip(ip)
}

/// A first packet from `src` to `dst`: a TCP SYN, a UDP datagram carrying `payload`, or an SCTP
/// packet with one chunk carrying `payload` (padded). Checksums are valid.
pub fn build(src: SocketAddr, dst: SocketAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    build_with_tcp_flags(src, dst, proto, TCP_SYN, payload)
}

/// [`build`] with the TCP header's flags byte set to `tcp_flags` (ignored for UDP and SCTP).
pub fn build_with_tcp_flags(
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
    tcp_flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let builder = frame_builder(src.ip(), dst.ip());
    let flag = |bit: u8| tcp_flags & bit != 0;
    let mut out = Vec::new();
    let written = match proto {
        IPPROTO_TCP => builder
            .tcp_header(TcpHeader {
                source_port: src.port(),
                destination_port: dst.port(),
                sequence_number: 1,
                window_size: 64240,
                fin: flag(0x01),
                syn: flag(0x02),
                rst: flag(0x04),
                psh: flag(0x08),
                ack: flag(0x10),
                urg: flag(0x20),
                ece: flag(0x40),
                cwr: flag(0x80),
                ..TcpHeader::default()
            })
            .write(&mut out, payload),
        IPPROTO_UDP => builder.udp(src.port(), dst.port()).write(&mut out, payload),
        // Kept by hand: etherparse has no SCTP; its CRC32c comes from the crc crate.
        _ => {
            let mut sctp = Vec::new();
            sctp.extend_from_slice(&src.port().to_be_bytes());
            sctp.extend_from_slice(&dst.port().to_be_bytes());
            sctp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // verification tag, CRC32c
            // A chunk of an unassigned type whose high bits say "skip it" (RFC 9260 3.2).
            sctp.extend_from_slice(&[0xbf, 0]);
            sctp.extend_from_slice(&((4 + payload.len()) as u16).to_be_bytes());
            sctp.extend_from_slice(payload);
            sctp.resize(sctp.len().next_multiple_of(4), 0);
            set_sctp_checksum(&mut sctp);
            builder.write(&mut out, IpNumber(proto), &sctp)
        }
    };
    written.expect("a test packet fits in a frame");
    out
}

/// What a frame says, with every checksum checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    /// ICMP / ICMPv6 type and code (ports are zero then).
    pub icmp: Option<(u8, u8)>,
    /// For ICMP errors: the quoted packet's source and destination.
    pub quoted: Option<(SocketAddr, SocketAddr)>,
    /// IPv4 header and L4 checksums are valid (a zero UDP checksum on IPv4 counts as valid; so
    /// does a zero SCTP CRC32c, which stands for one its sender offloaded).
    pub checksums_ok: bool,
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
}

fn read_ip(bytes: &[u8], v4: bool) -> Option<IpAddr> {
    if v4 {
        let o: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
        Some(IpAddr::from(o))
    } else {
        let o: [u8; 16] = bytes.get(..16)?.try_into().ok()?;
        Some(IpAddr::from(o))
    }
}

/// (src, dst, proto, header length) of an IP header at the start of `ip`.
fn ip_header(ip: &[u8]) -> Option<(IpAddr, IpAddr, u8, usize)> {
    match ip.first()? >> 4 {
        4 => Some((
            read_ip(ip.get(12..)?, true)?,
            read_ip(ip.get(16..)?, true)?,
            ip[9],
            20,
        )),
        6 => Some((
            read_ip(ip.get(8..)?, false)?,
            read_ip(ip.get(24..)?, false)?,
            ip[6],
            40,
        )),
        _ => None,
    }
}

fn ports(l4: &[u8]) -> Option<(u16, u16)> {
    Some((
        u16::from_be_bytes(l4.get(..2)?.try_into().ok()?),
        u16::from_be_bytes(l4.get(2..4)?.try_into().ok()?),
    ))
}

/// Reads back an Ethernet + IPv4/IPv6 frame (no options or extension headers).
pub fn summarize(frame: &[u8]) -> Option<Summary> {
    let ip = frame.get(ETH_HLEN..)?;
    let (src, dst, proto, hlen) = ip_header(ip)?;
    let v4 = src.is_ipv4();
    let l4_len = if v4 {
        usize::from(u16::from_be_bytes([ip[2], ip[3]])).checked_sub(hlen)?
    } else {
        usize::from(u16::from_be_bytes([ip[4], ip[5]]))
    };
    let l4 = ip.get(hlen..hlen + l4_len)?;
    let mut checksums_ok = !v4 || internet_checksum(&ip[..hlen]) == 0;
    match proto {
        IPPROTO_ICMP => checksums_ok &= internet_checksum(l4) == 0,
        IPPROTO_UDP if v4 && l4.get(6..8)? == [0, 0] => {}
        p if l4_csum_offset(p).is_some() => {
            let sum = pseudo_header_sum(src, dst, proto, l4.len()).add_slice(l4);
            checksums_ok &= sum.ones_complement() == 0;
        }
        IPPROTO_SCTP => {
            let stored = l4.get(SCTP_CHECKSUM_OFF..SCTP_CHECKSUM_OFF + 4)?;
            checksums_ok &= stored == [0; 4] || stored == sctp_checksum(l4);
        }
        _ => {}
    }
    let (icmp, quoted, (sport, dport)) = if proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6 {
        let quoted = l4.get(8..).and_then(|q| {
            let (qs, qd, _, qh) = ip_header(q)?;
            let (qsp, qdp) = ports(q.get(qh..)?)?;
            Some((SocketAddr::new(qs, qsp), SocketAddr::new(qd, qdp)))
        });
        (Some((l4[0], l4[1])), quoted, (0, 0))
    } else if proto == IPPROTO_SCTP || l4_csum_offset(proto).is_some() {
        (None, None, ports(l4)?)
    } else {
        (None, None, (0, 0))
    };
    Some(Summary {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
        proto,
        icmp,
        quoted,
        checksums_ok,
        eth_dst: frame[..6].try_into().ok()?,
        eth_src: frame[6..12].try_into().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_read_back_with_valid_checksums() {
        let cases = [
            ("10.0.0.1:1234", "10.96.0.10:80", IPPROTO_TCP),
            ("10.0.0.1:1234", "10.96.0.10:53", IPPROTO_UDP),
            ("[fd00::1]:1234", "[fd00:96::10]:80", IPPROTO_TCP),
            ("[fd00::1]:1234", "[fd00:96::10]:53", IPPROTO_UDP),
            ("10.0.0.1:1234", "10.96.0.10:3868", IPPROTO_SCTP),
            ("[fd00::1]:1234", "[fd00:96::10]:3868", IPPROTO_SCTP),
        ];
        for (src, dst, proto) in cases {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let mut frame = build(src, dst, proto, b"hi!!");
            let summary = summarize(&frame).unwrap();
            assert_eq!((summary.src, summary.dst, summary.proto), (src, dst, proto));
            assert!(summary.checksums_ok, "{src} -> {dst} proto {proto}");
            // A flipped payload byte breaks the L4 checksum: the check can fail.
            let last = frame.len() - 1;
            frame[last] ^= 0xff;
            assert!(!summarize(&frame).unwrap().checksums_ok);
        }
    }
}
