//! Ethernet frames for `BPF_PROG_TEST_RUN`: building a flow's first packet and reading back
//! what the program made of it, checksums included. Used by `trace` and by the kernel tests.

use std::net::{IpAddr, SocketAddr};

use proxy_common::crc32c::{SCTP_CHECKSUM_OFF, sctp_checksum, set_sctp_checksum};
use proxy_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
/// Locally administered MACs: the frame's source (the client) and destination (the node).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// One's-complement sum of `data` added to `initial`, folded and complemented (RFC 1071).
pub fn internet_checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial);
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u64::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The unfolded sum of the pseudo header for `len` bytes of protocol `proto`.
pub fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut bytes = Vec::new();
    if let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) {
        bytes.extend_from_slice(&s.octets());
        bytes.extend_from_slice(&d.octets());
        bytes.extend_from_slice(&[0, proto]);
        bytes.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        bytes.extend_from_slice(&ip_octets(src));
        bytes.extend_from_slice(&ip_octets(dst));
        bytes.extend_from_slice(&(len as u32).to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, proto]);
    }
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum()
}

fn ip_octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
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
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    match proto {
        IPPROTO_TCP => {
            l4.extend_from_slice(&1u32.to_be_bytes()); // sequence
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.extend_from_slice(&[0x50, tcp_flags]); // data offset 5
            l4.extend_from_slice(&64240u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            l4.extend_from_slice(payload);
        }
        IPPROTO_UDP => {
            l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            l4.extend_from_slice(payload);
        }
        _ => {
            l4.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // verification tag, CRC32c
            // A chunk of an unassigned type whose high bits say "skip it" (RFC 9260 3.2).
            l4.extend_from_slice(&[0xbf, 0]);
            l4.extend_from_slice(&((4 + payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(payload);
            l4.resize(l4.len().next_multiple_of(4), 0);
            set_sctp_checksum(&mut l4);
        }
    }
    if let Some(off) = l4_csum_offset(proto) {
        let sum = internet_checksum(&l4, pseudo_sum(src.ip(), dst.ip(), proto, l4.len()));
        l4[off..off + 2].copy_from_slice(&sum.to_be_bytes());
    }
    frame(src.ip(), dst.ip(), proto, &l4)
}

/// An Ethernet frame around `l4` with a valid IPv4 header (no options) or IPv6 header.
pub fn frame(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&NODE_MAC);
    out.extend_from_slice(&CLIENT_MAC);
    if let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) {
        out.extend_from_slice(&ETH_P_IP);
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
        ip.extend_from_slice(&s.octets());
        ip.extend_from_slice(&d.octets());
        let sum = internet_checksum(&ip, 0);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&ip);
    } else {
        out.extend_from_slice(&ETH_P_IPV6);
        out.extend_from_slice(&[0x60, 0, 0, 0]);
        out.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        out.extend_from_slice(&[proto, 64]);
        out.extend_from_slice(&ip_octets(src));
        out.extend_from_slice(&ip_octets(dst));
    }
    out.extend_from_slice(l4);
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
    let mut checksums_ok = !v4 || internet_checksum(&ip[..hlen], 0) == 0;
    match proto {
        IPPROTO_ICMP => checksums_ok &= internet_checksum(l4, 0) == 0,
        IPPROTO_UDP if v4 && l4.get(6..8)? == [0, 0] => {}
        p if l4_csum_offset(p).is_some() => {
            checksums_ok &= internet_checksum(l4, pseudo_sum(src, dst, proto, l4.len())) == 0;
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
