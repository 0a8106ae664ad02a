//! The tc program run on synthetic packets with BPF_PROG_TEST_RUN against maps programmed
//! through the typed API: every rewrite is read back and its checksums recomputed here.

mod common;

use std::net::{IpAddr, SocketAddr};

use etherparse::{Icmpv4Type, Icmpv6Type};
use proxy_common::{
    AffinityBackendKey, CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS, CT_F_HELD, CT_F_REPLY,
    CT_F_SEEN_REPLY, CT_STATE_CLOSE, CT_STATE_CLOSE_WAIT, CT_STATE_ESTABLISHED, CT_STATE_FIN_WAIT,
    CT_STATE_LAST_ACK, CT_STATE_SYN_RECV, CT_STATE_SYN_SENT, CT_STATE_TIME_WAIT, ConfigValue,
    CtValue, DETECT_LOCAL_CIDR, DETECT_LOCAL_NONE, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP,
    IPPROTO_TCP, IPPROTO_UDP, SCOPE_CLUSTER, SCOPE_POLICY, SOURCE_NODE, SOURCE_OTHER, SOURCE_POD,
    SVC_F_HAS_CLUSTER_SCOPE, SVC_F_SOURCE_RANGES, ServiceValue, VIP_F_CLUSTER_IP,
};
use proxy_lab::PinDir;
use proxy_userspace::dataplane::{
    self, Loaded, MapSizes, Maps, TraceFrom, TraceRequest, Verdict, addr_from_ip, packet,
    run_tc_program,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const ALL_CLASSES: u8 = (1 << SOURCE_POD) | (1 << SOURCE_NODE) | (1 << SOURCE_OTHER);

/// A loaded dataplane with small maps pinned in a directory of its own.
/// Which side of a flow sends the first FIN.
#[derive(Clone, Copy)]
enum Closer {
    Client,
    Backend,
}

struct Fixture {
    loaded: Loaded,
    maps: Maps,
    pins: PinDir,
}

impl Fixture {
    fn new() -> Self {
        Self::with_conntrack(4096)
    }

    fn with_conntrack(conntrack: u32) -> Self {
        let pins = PinDir::new();
        let sizes = MapSizes {
            services: 4096,
            backends: 1024,
            conntrack,
            affinity: 1024,
            source_ranges: 1024,
            vips: 1024,
        };
        let loaded = dataplane::load_with_sizes(pins.path(), &sizes).expect("load the dataplane");
        let mut maps = Maps::open(pins.path()).expect("open the pinned maps");
        maps.set_config(&ConfigValue {
            node_ipv4: addr_from_ip("192.0.2.1".parse().unwrap()).0,
            node_ipv6: addr_from_ip("fd00:2::1".parse().unwrap()).0,
            snat_port_min: 30000,
            snat_port_max: 30099,
            ..ConfigValue::default()
        })
        .unwrap();
        Self { loaded, maps, pins }
    }

    fn service(
        &mut self,
        id: u32,
        frontend: SocketAddr,
        proto: u8,
        backends: &[SocketAddr],
        edit: impl FnOnce(&mut ServiceValue),
    ) {
        common::program_service(&mut self.maps, id, frontend, proto, backends, edit);
    }

    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        run_tc_program(&self.loaded, frame, 0).expect("BPF_PROG_TEST_RUN")
    }

    /// Runs a bare IP packet (see [`l3_addresses`]) through the layer-3 devices' program.
    fn run_l3(&self, packet: &[u8]) -> (u32, Vec<u8>) {
        dataplane::run_tc(&self.loaded, dataplane::TC_INGRESS_L3, packet, 0)
            .expect("BPF_PROG_TEST_RUN")
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// (client, frontend, backend) per family.
fn addresses(v6: bool) -> (SocketAddr, SocketAddr, SocketAddr) {
    if v6 {
        (
            sa("[fd00:1::2]:40000"),
            sa("[fd00:96::10]:80"),
            sa("[fd00:10::5]:8080"),
        )
    } else {
        (
            sa("10.0.0.2:40000"),
            sa("10.96.0.10:80"),
            sa("10.1.0.5:8080"),
        )
    }
}

#[test]
fn first_packet_is_dnated_and_the_reply_reverse_translated_with_valid_checksums() {
    for v6 in [false, true] {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let mut fx = Fixture::new();
            let (client, frontend, backend) = addresses(v6);
            fx.service(1, frontend, proto, &[backend], |_| {});
            let (code, out) = fx.run(&packet::build(client, frontend, proto, b"hello"));
            let s = packet::summarize(&out).unwrap();
            let case = format!("v6 {v6} proto {proto}");
            assert_eq!(code, TC_ACT_OK, "{case}");
            assert_eq!((s.src, s.dst), (client, backend), "{case}");
            assert!(s.checksums_ok, "{case}: checksums after DNAT");

            let (code, out) = fx.run(&packet::build(backend, client, proto, b"world"));
            let s = packet::summarize(&out).unwrap();
            assert_eq!(code, TC_ACT_OK, "{case}");
            assert_eq!((s.src, s.dst), (frontend, client), "{case}: reverse NAT");
            assert!(s.checksums_ok, "{case}: checksums after reverse NAT");

            // A second packet of the same flow hits conntrack and goes to the same backend.
            let (_, out) = fx.run(&packet::build(client, frontend, proto, b"again"));
            assert_eq!(packet::summarize(&out).unwrap().dst, backend, "{case}");
        }
    }
}

/// (client, frontend, backend) for `tc_ingress_l3`, whose packets start at the IP header.
/// BPF_PROG_TEST_RUN takes every packet as an Ethernet frame and sets `skb->protocol` (which
/// the program reads on layer-3 devices) from its bytes 12-13: the first two bytes of an IPv4
/// source address, bytes 4-5 of an IPv6 one. Sources in 8.0.0.0/16 and fd00:1:86dd::/48 make
/// those bytes their own ethertype (0x0800, 0x86dd), so the kernel sees what a tun device's
/// driver would have set.
fn l3_addresses(v6: bool) -> (SocketAddr, SocketAddr, SocketAddr) {
    if v6 {
        (
            sa("[fd00:1:86dd::2]:40000"),
            sa("[fd00:96::10]:80"),
            sa("[fd00:1:86dd::5]:8080"),
        )
    } else {
        (sa("8.0.0.2:40000"), sa("10.96.0.10:80"), sa("8.0.1.5:8080"))
    }
}

/// A first packet as a layer-3 device carries it: no Ethernet header. Its payload makes it long
/// enough for the test run, which wants an IP header after the 14 bytes it takes for Ethernet.
fn bare_ip(src: SocketAddr, dst: SocketAddr, proto: u8) -> Vec<u8> {
    let payload = [b'x'; 32];
    packet::build(src, dst, proto, &payload)[packet::ETH_HLEN..].to_vec()
}

/// What the program made of a bare IP packet, read back (behind a blank Ethernet header).
fn summarize_bare_ip(packet: &[u8]) -> packet::Summary {
    let frame = [&[0u8; packet::ETH_HLEN][..], packet].concat();
    packet::summarize(&frame).expect("an IP packet")
}

#[test]
fn the_layer3_program_translates_bare_ip_packets_both_ways_and_rejects() {
    for v6 in [false, true] {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let mut fx = Fixture::new();
            let (client, frontend, backend) = l3_addresses(v6);
            let case = format!("v6 {v6} proto {proto}");
            fx.service(1, frontend, proto, &[backend], |_| {});
            let (code, out) = fx.run_l3(&bare_ip(client, frontend, proto));
            assert_eq!(code, TC_ACT_OK, "{case}");
            let s = summarize_bare_ip(&out);
            assert_eq!((s.src, s.dst), (client, backend), "{case}: DNAT");
            assert!(s.checksums_ok, "{case}: checksums after DNAT");

            let (code, out) = fx.run_l3(&bare_ip(backend, client, proto));
            assert_eq!(code, TC_ACT_OK, "{case}");
            let s = summarize_bare_ip(&out);
            assert_eq!((s.src, s.dst), (frontend, client), "{case}: reverse NAT");
            assert!(s.checksums_ok, "{case}: checksums after reverse NAT");

            // No endpoints: REJECT, a bare ICMP packet sent back out of the device.
            let closed = SocketAddr::new(frontend.ip(), 81);
            fx.service(2, closed, proto, &[], |_| {});
            let (code, out) = fx.run_l3(&bare_ip(client, closed, proto));
            assert_eq!(code, TC_ACT_REDIRECT, "{case}: sent back out");
            let ip_header = if v6 { 40 } else { 20 };
            assert_eq!(
                out.len(),
                2 * ip_header + 16,
                "{case}: no link-layer header"
            );
            let s = summarize_bare_ip(&out);
            assert_eq!(s.icmp, Some(if v6 { (1, 4) } else { (3, 3) }), "{case}");
            assert_eq!((s.src.ip(), s.dst.ip()), (frontend.ip(), client.ip()));
            assert_eq!(s.quoted, Some((client, closed)), "{case}");
            assert!(s.checksums_ok, "{case}: ICMP checksums");
        }
    }
}

#[test]
fn ipv4_udp_without_checksum_keeps_a_zero_checksum() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_UDP, &[backend], |_| {});
    let mut frame = packet::build(client, frontend, IPPROTO_UDP, b"no checksum");
    let udp_csum = packet::ETH_HLEN + 20 + 6;
    frame[udp_csum..udp_csum + 2].copy_from_slice(&[0, 0]);
    let (code, out) = fx.run(&frame);
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(packet::summarize(&out).unwrap().dst, backend);
    assert_eq!(out[udp_csum..udp_csum + 2], [0, 0]);
    assert!(packet::summarize(&out).unwrap().checksums_ok);
}

#[test]
fn masqueraded_flows_get_the_node_address_and_a_port_from_the_snat_range() {
    for v6 in [false, true] {
        let mut fx = Fixture::new();
        let (client, frontend, backend) = addresses(v6);
        let node: IpAddr = if v6 {
            "fd00:2::1".parse().unwrap()
        } else {
            "192.0.2.1".parse().unwrap()
        };
        fx.service(1, frontend, IPPROTO_TCP, &[backend], |v| {
            v.masquerade_classes = ALL_CLASSES;
        });
        let (code, out) = fx.run(&packet::build(client, frontend, IPPROTO_TCP, b""));
        let s = packet::summarize(&out).unwrap();
        assert_eq!(code, TC_ACT_OK);
        assert_eq!(s.dst, backend);
        assert_eq!(s.src.ip(), node, "masqueraded source");
        assert!(
            (30000..=30099).contains(&s.src.port()),
            "SNAT port {}",
            s.src.port()
        );
        assert!(s.checksums_ok);

        let (_, out) = fx.run(&packet::build(backend, s.src, IPPROTO_TCP, b""));
        let r = packet::summarize(&out).unwrap();
        assert_eq!(
            (r.src, r.dst),
            (frontend, client),
            "reply back to the real client"
        );
        assert!(r.checksums_ok);
    }
}

#[test]
fn hairpin_traffic_is_masqueraded() {
    let mut fx = Fixture::new();
    let (_, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_TCP, &[backend], |_| {});
    // The backend itself connects to its own service.
    let client = SocketAddr::new(backend.ip(), 41000);
    let (_, out) = fx.run(&packet::build(client, frontend, IPPROTO_TCP, b""));
    let s = packet::summarize(&out).unwrap();
    assert_eq!(s.dst, backend);
    assert_eq!(s.src.ip(), "192.0.2.1".parse::<IpAddr>().unwrap());
}

#[test]
fn reject_answers_with_an_icmp_port_unreachable_to_the_client() {
    for (v6, proto) in [
        (false, IPPROTO_TCP),
        (false, IPPROTO_UDP),
        (true, IPPROTO_TCP),
    ] {
        let mut fx = Fixture::new();
        let (client, frontend, _) = addresses(v6);
        // No endpoints: REJECT.
        fx.service(1, frontend, proto, &[], |_| {});
        let frame = packet::build(client, frontend, proto, b"knock");
        let (code, out) = fx.run(&frame);
        assert_eq!(
            code, TC_ACT_REDIRECT,
            "v6 {v6} proto {proto}: sent back out"
        );
        let s = packet::summarize(&out).unwrap();
        let expected_icmp = if v6 { (1, 4) } else { (3, 3) };
        assert_eq!(s.icmp, Some(expected_icmp), "v6 {v6} proto {proto}");
        assert_eq!((s.src.ip(), s.dst.ip()), (frontend.ip(), client.ip()));
        assert_eq!(
            s.quoted,
            Some((client, frontend)),
            "the offending packet is quoted"
        );
        assert!(s.checksums_ok, "v6 {v6} proto {proto}: ICMP checksums");
        assert_eq!(
            (s.eth_src, s.eth_dst),
            (packet::NODE_MAC, packet::CLIENT_MAC)
        );
    }
}

#[test]
fn per_class_reject_and_drop_bits_apply() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_TCP, &[backend], |v| {
        v.drop_classes = 1 << SOURCE_OTHER;
    });
    let (code, _) = fx.run(&packet::build(client, frontend, IPPROTO_TCP, b""));
    assert_eq!(code, TC_ACT_SHOT, "drop bit of the client's class");
    fx.service(1, frontend, IPPROTO_TCP, &[backend], |v| {
        v.reject_classes = 1 << SOURCE_OTHER;
    });
    let (code, _) = fx.run(&packet::build(client, frontend, IPPROTO_TCP, b""));
    assert_eq!(code, TC_ACT_REDIRECT, "reject bit of the client's class");
    // Node-originated traffic (source = the node address) is another class: forwarded.
    let node_client = sa("192.0.2.1:45000");
    let (code, out) = fx.run(&packet::build(node_client, frontend, IPPROTO_TCP, b""));
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(packet::summarize(&out).unwrap().dst, backend);
}

#[test]
fn load_balancer_source_ranges_drop_other_sources() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(7, frontend, IPPROTO_TCP, &[backend], |v| {
        v.flags |= SVC_F_SOURCE_RANGES;
    });
    fx.maps
        .allow_source_range(7, "10.0.0.0/24".parse().unwrap())
        .unwrap();
    let (code, out) = fx.run(&packet::build(client, frontend, IPPROTO_TCP, b""));
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(packet::summarize(&out).unwrap().dst, backend);
    let outsider = sa("10.9.0.2:40000");
    let (code, _) = fx.run(&packet::build(outsider, frontend, IPPROTO_TCP, b""));
    assert_eq!(code, TC_ACT_SHOT);
}

#[test]
fn vips_reject_unknown_ports_and_drop_unallocated_addresses() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_TCP, &[backend], |_| {});
    fx.maps.upsert_vip(frontend.ip(), VIP_F_CLUSTER_IP).unwrap();
    // The whole service CIDR: every address in it that is no ClusterIP is unallocated.
    fx.maps
        .add_service_cidr("10.96.0.0/12".parse().unwrap())
        .unwrap();
    let unallocated: IpAddr = "10.96.0.99".parse().unwrap();

    let other_port = SocketAddr::new(frontend.ip(), 81);
    let (code, out) = fx.run(&packet::build(client, other_port, IPPROTO_TCP, b""));
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_eq!(packet::summarize(&out).unwrap().icmp, Some((3, 3)));

    let (code, _) = fx.run(&packet::build(
        client,
        SocketAddr::new(unallocated, 80),
        IPPROTO_TCP,
        b"",
    ));
    assert_eq!(code, TC_ACT_SHOT);

    let elsewhere = sa("10.200.0.1:80");
    let frame = packet::build(client, elsewhere, IPPROTO_TCP, b"");
    let (code, out) = fx.run(&frame);
    assert_eq!(
        (code, out),
        (TC_ACT_OK, frame),
        "unrelated traffic passes untouched"
    );
}

#[test]
fn malformed_packets_pass_untouched() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_TCP, &[backend], |_| {});
    fx.service(2, frontend, IPPROTO_UDP, &[backend], |_| {});
    let good = packet::build(client, frontend, IPPROTO_TCP, b"payload");
    let ip = packet::ETH_HLEN;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // (A frame shorter than its IP header never reaches the program: the kernel refuses to
    // build such an skb, in BPF_PROG_TEST_RUN as on the wire.)
    let mut no_l4 = good[..ip + 20].to_vec();
    no_l4[ip + 2..ip + 4].copy_from_slice(&20u16.to_be_bytes());
    cases.push(("IPv4 header without L4 header", no_l4));
    // A TCP header cut short, with the IP total length agreeing with the bytes present.
    let mut short_tcp = good[..ip + 20 + 10].to_vec();
    short_tcp[ip + 2..ip + 4].copy_from_slice(&30u16.to_be_bytes());
    cases.push(("truncated TCP header", short_tcp));
    let mut long_total = good.clone();
    long_total[ip + 2..ip + 4].copy_from_slice(&1400u16.to_be_bytes());
    cases.push(("total length beyond the packet", long_total));
    let mut short_total = good.clone();
    short_total[ip + 2..ip + 4].copy_from_slice(&10u16.to_be_bytes());
    cases.push(("total length below the header", short_total));
    let mut options = good.clone();
    options[ip] = 0x46;
    cases.push(("IPv4 options", options));
    // (A first fragment is translated: `fragments_follow_their_first_fragment`.)
    let mut later_fragment = good.clone();
    later_fragment[ip + 6..ip + 8].copy_from_slice(&100u16.to_be_bytes());
    cases.push(("non-first fragment without its first", later_fragment));
    let mut bad_offset = good.clone();
    bad_offset[ip + 20 + 12] = 0xf0; // TCP data offset 60 > segment
    cases.push(("TCP data offset beyond the segment", bad_offset));
    let udp = packet::build(client, frontend, IPPROTO_UDP, b"x");
    let mut udp_len = udp.clone();
    udp_len[ip + 20 + 4..ip + 20 + 6].copy_from_slice(&200u16.to_be_bytes());
    cases.push(("UDP length beyond the datagram", udp_len));
    let v6 = packet::build(
        sa("[fd00:1::2]:1"),
        sa("[fd00:96::10]:80"),
        IPPROTO_TCP,
        b"",
    );
    let mut v6_no_l4 = v6[..ip + 40].to_vec();
    v6_no_l4[ip + 4..ip + 6].copy_from_slice(&0u16.to_be_bytes());
    cases.push(("IPv6 header without L4 header", v6_no_l4));
    let mut v6_len = v6.clone();
    v6_len[ip + 4..ip + 6].copy_from_slice(&4000u16.to_be_bytes());
    cases.push(("IPv6 payload length beyond the packet", v6_len));
    for (what, frame) in cases {
        let (code, out) = run_tc_program(&fx.loaded, &frame, 0)
            .unwrap_or_else(|e| panic!("{what}: BPF_PROG_TEST_RUN: {e}"));
        assert_eq!(code, TC_ACT_OK, "{what}: passed");
        assert_eq!(out, frame, "{what}: not rewritten");
    }
    // Nothing was tracked for any of them.
    assert!(fx.maps.conntrack_entries().unwrap().is_empty());
}

/// `frame` (an IPv4 or IPv6 packet from [`packet::build`]) made a fragment of datagram `id`:
/// at `offset` 8-byte units, with the more-fragments flag when `more`. IPv6 gets a fragment
/// header; IPv4 its header checksum again.
fn fragment(frame: &[u8], v6: bool, id: u32, offset: u16, more: bool) -> Vec<u8> {
    let ip = packet::ETH_HLEN;
    let offset_flags = if v6 {
        (offset << 3) | u16::from(more)
    } else {
        offset | (u16::from(more) << 13)
    };
    let mut out = frame.to_vec();
    if v6 {
        let next_header = out[ip + 6];
        out[ip + 6] = 44;
        let payload_len = u16::from_be_bytes([out[ip + 4], out[ip + 5]]) + 8;
        out[ip + 4..ip + 6].copy_from_slice(&payload_len.to_be_bytes());
        let mut header = vec![next_header, 0];
        header.extend_from_slice(&offset_flags.to_be_bytes());
        header.extend_from_slice(&id.to_be_bytes());
        out.splice(ip + 40..ip + 40, header);
    } else {
        out[ip + 4..ip + 6].copy_from_slice(&u16::try_from(id).unwrap().to_be_bytes());
        out[ip + 6..ip + 8].copy_from_slice(&offset_flags.to_be_bytes());
        out[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
        let check = packet::internet_checksum(&out[ip..ip + 20]);
        out[ip + 10..ip + 12].copy_from_slice(&check.to_be_bytes());
    }
    out
}

/// The destination address of an IPv4 or IPv6 frame.
fn frame_dst(frame: &[u8], v6: bool) -> IpAddr {
    let ip = packet::ETH_HLEN;
    if v6 {
        IpAddr::from(<[u8; 16]>::try_from(&frame[ip + 24..ip + 40]).unwrap())
    } else {
        IpAddr::from(<[u8; 4]>::try_from(&frame[ip + 16..ip + 20]).unwrap())
    }
}

#[test]
fn fragments_follow_their_first_fragment() {
    for v6 in [false, true] {
        let mut fx = Fixture::new();
        let (client, frontend, backend) = addresses(v6);
        fx.service(1, frontend, IPPROTO_UDP, &[backend], |_| {});
        let datagram = packet::build(client, frontend, IPPROTO_UDP, &[7u8; 64]);
        let l4 = packet::ETH_HLEN + if v6 { 48 } else { 20 };
        let case = format!("v6 {v6}");
        // The first fragment opens the flow: DNAT, its UDP header's port rewritten.
        let (code, out) = fx.run(&fragment(&datagram, v6, 0x4242, 0, true));
        assert_eq!(code, TC_ACT_OK, "{case}");
        assert_eq!(frame_dst(&out, v6), backend.ip(), "{case}: first fragment");
        assert_eq!(
            u16::from_be_bytes([out[l4 + 2], out[l4 + 3]]),
            backend.port(),
            "{case}: first fragment's port"
        );
        // A later fragment: the same translation of its addresses, its bytes left as they are.
        let later = fragment(&datagram, v6, 0x4242, 3, false);
        let (code, out) = fx.run(&later);
        assert_eq!(code, TC_ACT_OK, "{case}");
        assert_eq!(frame_dst(&out, v6), backend.ip(), "{case}: later fragment");
        assert_eq!(
            out[l4..],
            later[l4..],
            "{case}: a later fragment's data is not rewritten"
        );
        if !v6 {
            let ip = packet::ETH_HLEN;
            assert_eq!(
                packet::internet_checksum(&out[ip..ip + 20]),
                0,
                "{case}: IPv4 header checksum"
            );
        }
        // A later fragment of a datagram whose first fragment never came passes untouched.
        let orphan = fragment(&datagram, v6, 0x4343, 3, false);
        let (code, out) = fx.run(&orphan);
        assert_eq!(
            (code, &out),
            (TC_ACT_OK, &orphan),
            "{case}: orphan fragment"
        );
        assert_eq!(fx.counter("fragments_followed"), 1, "{case}");
        assert_eq!(fx.counter("fragments_without_first"), 1, "{case}");
        assert_eq!(fx.counter("fragments"), 3, "{case}");
    }
}

/// An ICMP (`proto` 1) or ICMPv6 (58) error frame from `from` to `to` of `kind` and `code`,
/// with `info` in the header's last four bytes, quoting `quoted`; valid checksums.
fn icmp_error(
    from: IpAddr,
    to: IpAddr,
    (proto, kind, code): (u8, u8, u8),
    info: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    let builder = packet::frame_builder(from, to);
    let mut error = Vec::new();
    if proto == IPPROTO_ICMPV6 {
        builder
            .icmpv6(Icmpv6Type::Unknown {
                type_u8: kind,
                code_u8: code,
                bytes5to8: info,
            })
            .write(&mut error, quoted)
    } else {
        builder
            .icmpv4(Icmpv4Type::Unknown {
                type_u8: kind,
                code_u8: code,
                bytes5to8: info,
            })
            .write(&mut error, quoted)
    }
    .expect("build the ICMP error");
    error
}

/// The node's own ICMP errors about a translated packet (its stack forwarding the client's
/// packet after DNAT: TTL expired, no route, parameter problem) quote the packet as translated.
/// The egress program gives them the flow's translation back on their way to the client, so
/// that the client's socket matches them; the ingress program does the same for such errors
/// arriving from a router. An error about no flow, and any other packet, pass untouched.
#[test]
fn node_generated_icmp_errors_about_translated_flows_are_translated_at_egress() {
    for v6 in [false, true] {
        // (ICMP type, code) of time exceeded, host / no-route unreachable, parameter problem.
        let (proto, ip_len, router, kinds) = if v6 {
            (IPPROTO_ICMPV6, 40, "fd00:1::1", [(3, 0), (1, 0), (4, 0)])
        } else {
            (IPPROTO_ICMP, 20, "10.0.0.1", [(11, 0), (3, 1), (12, 0)])
        };
        let router: IpAddr = router.parse().unwrap();
        for (kind, code) in kinds {
            for program in [dataplane::TC_EGRESS, dataplane::TC_INGRESS] {
                let case = format!("v6 {v6} type {kind} code {code} {program}");
                let mut fx = Fixture::new();
                let (client, frontend, backend) = addresses(v6);
                fx.service(1, frontend, IPPROTO_TCP, &[backend], |_| {});
                let (_, translated) = fx.run(&packet::build(client, frontend, IPPROTO_TCP, b""));
                let quoted = &translated[packet::ETH_HLEN..packet::ETH_HLEN + ip_len + 8];
                let error = icmp_error(router, client.ip(), (proto, kind, code), [0; 4], quoted);
                let (verdict, out) =
                    dataplane::run_tc(&fx.loaded, program, &error, 0).expect("BPF_PROG_TEST_RUN");
                assert_eq!(verdict, TC_ACT_OK, "{case}");
                let s = packet::summarize(&out).unwrap();
                assert_eq!(
                    (s.src.ip(), s.dst.ip()),
                    (router, client.ip()),
                    "{case}: outer addresses unchanged (a router's error, to the client)"
                );
                assert_eq!(
                    s.quoted,
                    Some((client, frontend)),
                    "{case}: quoted packet as the client sent it"
                );
                assert!(
                    s.checksums_ok,
                    "{case}: outer, quoted-header and ICMP checksums"
                );
                let egress = usize::from(program == dataplane::TC_EGRESS);
                assert_eq!(
                    fx.counter("egress_icmp_errors_translated"),
                    egress as u64,
                    "{case}"
                );
                assert_eq!(fx.counter("icmp_errors_translated"), 1, "{case}");

                // An error quoting a packet of no flow (the client's own, untranslated) passes.
                let untranslated = packet::build(client, frontend, IPPROTO_TCP, b"");
                let quoted = &untranslated[packet::ETH_HLEN..packet::ETH_HLEN + ip_len + 8];
                let error = icmp_error(router, client.ip(), (proto, kind, code), [0; 4], quoted);
                let (verdict, out) =
                    dataplane::run_tc(&fx.loaded, program, &error, 0).expect("BPF_PROG_TEST_RUN");
                assert_eq!((verdict, &out), (TC_ACT_OK, &error), "{case}: no flow");
                assert_eq!(
                    fx.counter("egress_icmp_passed"),
                    egress as u64,
                    "{case}: no flow"
                );
            }
        }
    }
}

#[test]
fn the_egress_programs_pass_every_other_packet_untouched_and_uncounted() {
    for v6 in [false, true] {
        let mut fx = Fixture::new();
        let (client, frontend, backend) = addresses(v6);
        fx.service(1, frontend, IPPROTO_TCP, &[backend], |_| {});
        let (_, translated) = fx.run(&packet::build(client, frontend, IPPROTO_TCP, b""));
        let reply = packet::build(backend, client, IPPROTO_TCP, b"hello");
        for frame in [translated, reply, echo_request(client.ip(), frontend.ip())] {
            let (verdict, out) = dataplane::run_tc(&fx.loaded, dataplane::TC_EGRESS, &frame, 0)
                .expect("BPF_PROG_TEST_RUN");
            assert_eq!((verdict, &out), (TC_ACT_OK, &frame), "v6 {v6}");
        }
        assert_eq!(fx.counter("egress_icmp_errors_translated"), 0, "v6 {v6}");
        // The echo request is ICMP: counted as passed; TCP leaves after one byte, uncounted.
        assert_eq!(fx.counter("egress_icmp_passed"), 1, "v6 {v6}");
        assert_eq!(
            fx.counter("ct_reply_hits"),
            0,
            "v6 {v6}: egress never reverse-translates"
        );
    }
    // The layer-3 devices' variant: an error about a translated flow, as a bare IP packet.
    for v6 in [false, true] {
        let mut fx = Fixture::new();
        let (client, frontend, backend) = l3_addresses(v6);
        fx.service(1, frontend, IPPROTO_UDP, &[backend], |_| {});
        let (_, translated) = fx.run_l3(&bare_ip(client, frontend, IPPROTO_UDP));
        let (proto, ip_len, kind) = if v6 {
            (IPPROTO_ICMPV6, 40, 3)
        } else {
            (IPPROTO_ICMP, 20, 11)
        };
        // A source that gives the test run's `skb->protocol` the family (see `l3_addresses`).
        let router: IpAddr = if v6 { "fd00:1:86dd::1" } else { "8.0.0.1" }
            .parse()
            .unwrap();
        let error = icmp_error(
            router,
            client.ip(),
            (proto, kind, 0),
            [0; 4],
            &translated[..ip_len + 8],
        );
        let (verdict, out) = dataplane::run_tc(
            &fx.loaded,
            dataplane::TC_EGRESS_L3,
            &error[packet::ETH_HLEN..],
            0,
        )
        .expect("BPF_PROG_TEST_RUN");
        assert_eq!(verdict, TC_ACT_OK, "v6 {v6}");
        assert_eq!(
            summarize_bare_ip(&out).quoted,
            Some((client, frontend)),
            "v6 {v6}: layer-3 egress"
        );
    }
}

#[test]
fn icmp_fragmentation_needed_from_the_backend_reaches_the_client_translated() {
    for v6 in [false, true] {
        let mut fx = Fixture::new();
        let (client, frontend, backend) = addresses(v6);
        fx.service(1, frontend, IPPROTO_TCP, &[backend], |_| {});
        let syn = packet::build(client, frontend, IPPROTO_TCP, b"");
        let (_, translated) = fx.run(&syn);
        // The backend answers a too-big packet of the flow with "fragmentation needed" /
        // "packet too big", quoting the packet as it received it (client → backend).
        let (ip_len, proto, kind, code) = if v6 {
            (40, IPPROTO_ICMPV6, 2, 0)
        } else {
            (20, IPPROTO_ICMP, 3, 4)
        };
        let quoted = &translated[packet::ETH_HLEN..packet::ETH_HLEN + ip_len + 8];
        let error = icmp_error(
            backend.ip(),
            client.ip(),
            (proto, kind, code),
            [0, 0, 0x05, 0xdc],
            quoted,
        );
        let (code, out) = fx.run(&error);
        assert_eq!(code, TC_ACT_OK);
        let s = packet::summarize(&out).unwrap();
        assert_eq!(
            s.src.ip(),
            frontend.ip(),
            "v6 {v6}: outer source back to the service"
        );
        assert_eq!(
            s.quoted,
            Some((client, frontend)),
            "v6 {v6}: quoted packet as the client sent it"
        );
        assert!(
            s.checksums_ok,
            "v6 {v6}: outer, quoted-header and ICMP checksums"
        );
    }
}

#[test]
fn session_affinity_sticks_within_the_timeout_and_expires_after_it() {
    let mut fx = Fixture::new();
    let (client, frontend, _) = addresses(false);
    let backends = [
        sa("10.1.0.5:8080"),
        sa("10.1.0.6:8080"),
        sa("10.1.0.7:8080"),
    ];
    fx.service(1, frontend, IPPROTO_TCP, &backends, |v| {
        v.affinity_timeout = 1;
    });
    let backend_of = |fx: &Fixture, port: u16| {
        let from = SocketAddr::new(client.ip(), port);
        let (_, out) = fx.run(&packet::build(from, frontend, IPPROTO_TCP, b""));
        packet::summarize(&out).unwrap().dst
    };
    let first = backend_of(&fx, 40000);
    for port in 40001..40010 {
        assert_eq!(
            backend_of(&fx, port),
            first,
            "new flows stick to the first backend"
        );
    }
    // Once the timeout passes, the next flow is balanced again (and then sticks to its pick):
    // with three backends, ten expiries all picking the same one has odds 3^-10.
    let mut previous = first;
    let mut changed = false;
    for round in 0..10u16 {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let picked = backend_of(&fx, 41000 + round);
        if picked != previous {
            changed = true;
            break;
        }
        previous = picked;
    }
    assert!(changed, "affinity never expired");
}

#[test]
fn trace_reports_every_backend_and_leaves_no_conntrack_entries() {
    let mut fx = Fixture::new();
    let (client, frontend, _) = addresses(false);
    let backends = [
        sa("10.1.0.5:8080"),
        sa("10.1.0.6:8080"),
        sa("10.1.0.7:8080"),
    ];
    fx.service(1, frontend, IPPROTO_TCP, &backends, |_| {});
    let request = TraceRequest {
        src: client.ip(),
        dst: frontend.ip(),
        dport: frontend.port(),
        proto: IPPROTO_TCP,
        ingress_ifindex: 0,
        runs: 64,
        from: None,
    };
    let result =
        dataplane::trace(&fx.loaded.trace_target().unwrap(), &mut fx.maps, &request).unwrap();
    assert_eq!(result.verdict, Verdict::Dnat);
    assert_eq!(result.endpoints, backends.into_iter().collect());
    assert!(!result.masquerade);
    assert!(fx.maps.conntrack_entries().unwrap().is_empty());

    fx.service(1, frontend, IPPROTO_TCP, &backends, |v| {
        v.affinity_timeout = 60;
    });
    let result =
        dataplane::trace(&fx.loaded.trace_target().unwrap(), &mut fx.maps, &request).unwrap();
    assert_eq!(result.endpoints.len(), 1, "affinity: one backend");
    assert!(
        fx.maps.affinity_entries().unwrap().is_empty(),
        "trace removed its affinity"
    );

    fx.service(1, frontend, IPPROTO_TCP, &[], |_| {});
    let result =
        dataplane::trace(&fx.loaded.trace_target().unwrap(), &mut fx.maps, &request).unwrap();
    assert_eq!(result.verdict, Verdict::Reject);
}

/// SCTP's CRC32c covers its ports: every port rewrite (DNAT to another port, SNAT from the
/// range, and their reversal) leaves a valid CRC32c, on packets of every length; a zero
/// (offloaded) CRC stays zero.
#[test]
fn sctp_port_rewrites_keep_a_valid_crc32c_both_ways() {
    for v6 in [false, true] {
        for masquerade in [false, true] {
            for payload_len in [0, 1, 13, 1000] {
                let mut fx = Fixture::new();
                let (client, frontend, backend) = addresses(v6);
                fx.service(1, frontend, IPPROTO_SCTP, &[backend], |v| {
                    if masquerade {
                        v.masquerade_classes = ALL_CLASSES;
                    }
                });
                let case = format!("v6 {v6} masquerade {masquerade} payload {payload_len}");
                let payload = vec![0xa5; payload_len];
                let (code, out) = fx.run(&packet::build(client, frontend, IPPROTO_SCTP, &payload));
                let s = packet::summarize(&out).unwrap();
                assert_eq!(code, TC_ACT_OK, "{case}");
                assert_eq!(s.dst, backend, "{case}: DNAT to another port");
                if masquerade {
                    assert!((30000..=30099).contains(&s.src.port()), "{case}: {}", s.src);
                } else {
                    assert_eq!(s.src, client, "{case}");
                }
                assert!(s.checksums_ok, "{case}: CRC32c after DNAT");

                let (code, out) = fx.run(&packet::build(backend, s.src, IPPROTO_SCTP, &payload));
                let r = packet::summarize(&out).unwrap();
                assert_eq!(code, TC_ACT_OK, "{case}");
                assert_eq!((r.src, r.dst), (frontend, client), "{case}: reverse NAT");
                assert!(r.checksums_ok, "{case}: CRC32c after reverse NAT");
            }
        }
    }
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_SCTP, &[backend], |_| {});
    let mut frame = packet::build(client, frontend, IPPROTO_SCTP, b"offloaded");
    let crc = packet::ETH_HLEN + 20 + 8;
    frame[crc..crc + 4].copy_from_slice(&[0; 4]);
    let (_, out) = fx.run(&frame);
    assert_eq!(packet::summarize(&out).unwrap().dst, backend);
    assert_eq!(
        out[crc..crc + 4],
        [0; 4],
        "an offloaded CRC32c is computed later"
    );
    // The check can fail: a CRC32c not updated for the port is caught.
    let mut stale = out.clone();
    stale[crc..crc + 4].copy_from_slice(&frame[crc..crc + 4]);
    stale[crc] ^= 1;
    assert!(!packet::summarize(&stale).unwrap().checksums_ok);
}

#[test]
fn a_flow_whose_backend_is_gone_is_balanced_again_and_cleanup_removes_its_entries() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_UDP, &[backend], |_| {});
    let frame = packet::build(client, frontend, IPPROTO_UDP, b"x");
    let (_, out) = fx.run(&frame);
    assert_eq!(packet::summarize(&out).unwrap().dst, backend);
    assert_eq!(
        fx.maps.conntrack_entries().unwrap().len(),
        2,
        "forward and reply entries"
    );

    // The endpoint goes away and another one takes its place (new backend id).
    assert_eq!(fx.maps.cleanup_flows_to_backend(999).unwrap(), 0);
    fx.maps.delete_backend(101).unwrap();
    let replacement = sa("10.1.0.9:8080");
    fx.service(2, frontend, IPPROTO_UDP, &[replacement], |_| {});
    let (_, out) = fx.run(&frame);
    assert_eq!(
        packet::summarize(&out).unwrap().dst,
        replacement,
        "the same 5-tuple now goes to the live backend"
    );
    assert_eq!(fx.maps.cleanup_flows_to_backend(201).unwrap(), 2);
    assert!(fx.maps.conntrack_entries().unwrap().is_empty());
}

#[test]
fn an_established_tcp_flow_keeps_its_backend_when_the_backend_is_gone() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_TCP, &[backend], |_| {});
    let frame = packet::build(client, frontend, IPPROTO_TCP, b"x");
    let (_, out) = fx.run(&frame);
    assert_eq!(packet::summarize(&out).unwrap().dst, backend);

    // The endpoint (or the whole Service) goes away: kube-proxy leaves TCP conntrack alone.
    fx.maps.delete_backend(101).unwrap();
    let replacement = sa("10.1.0.9:8080");
    fx.service(2, frontend, IPPROTO_TCP, &[replacement], |_| {});
    let data = packet::build_with_tcp_flags(client, frontend, IPPROTO_TCP, TCP_ACK, b"x");
    let (_, out) = fx.run(&data);
    assert_eq!(
        packet::summarize(&out).unwrap().dst,
        backend,
        "the established connection stays with its endpoint"
    );
    assert_eq!(
        fx.maps.cleanup_flows_to_backend(101).unwrap(),
        0,
        "the stale-endpoint cleanup is for UDP only"
    );
    assert_eq!(fx.maps.conntrack_entries().unwrap().len(), 2);
}

#[test]
fn pod_sources_found_by_the_local_cidr_detector_get_their_own_class() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.maps
        .update_config(|c| c.detect_local_mode = DETECT_LOCAL_CIDR)
        .unwrap();
    fx.maps
        .add_local_cidr("10.0.0.0/24".parse().unwrap())
        .unwrap();
    assert_eq!(
        fx.maps.local_cidr_entries().unwrap(),
        vec!["10.0.0.0/24".parse::<ipnet::IpNet>().unwrap()]
    );
    // Masquerade everything but pod traffic (kube-proxy's masquerade of off-cluster traffic).
    fx.service(1, frontend, IPPROTO_TCP, &[backend], |v| {
        v.masquerade_classes = ALL_CLASSES & !(1 << SOURCE_POD);
    });
    let (_, out) = fx.run(&packet::build(client, frontend, IPPROTO_TCP, b""));
    assert_eq!(
        packet::summarize(&out).unwrap().src,
        client,
        "pod source kept"
    );
    let outsider = sa("172.16.0.2:40000");
    let (_, out) = fx.run(&packet::build(outsider, frontend, IPPROTO_TCP, b""));
    assert_eq!(
        packet::summarize(&out).unwrap().src.ip(),
        "192.0.2.1".parse::<IpAddr>().unwrap(),
        "external source masqueraded"
    );
}

#[test]
fn flows_survive_a_reload_of_the_programs_on_the_same_pins() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_TCP, &[backend], |_| {});
    let (_, out) = fx.run(&packet::build(client, frontend, IPPROTO_TCP, b""));
    assert_eq!(packet::summarize(&out).unwrap().dst, backend);
    // A new proxy process loads the programs again; the pinned maps (and flows) are reused.
    let reloaded = dataplane::load(fx.pins.path()).unwrap();
    fx.loaded = reloaded;
    let (code, out) = fx.run(&packet::build(backend, client, IPPROTO_TCP, b""));
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(
        packet::summarize(&out).unwrap().src,
        frontend,
        "reply of the old flow"
    );
}

#[test]
fn trace_command_prints_json() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_TCP, &[backend], |v| {
        v.masquerade_classes = ALL_CLASSES;
    });
    let trace = |fx: &Fixture| {
        let out = proxy_lab::run(
            std::process::Command::new(env!("CARGO_BIN_EXE_kube-ebpf-proxy"))
                .arg("trace")
                .arg("--bpf-pin-path")
                .arg(fx.pins.path())
                .args(["--src", &client.ip().to_string()])
                .args(["--dst", &frontend.ip().to_string()])
                .args(["--dport", "80", "--proto", "tcp", "-o", "json"]),
        )
        .unwrap();
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let expected = |program: &str| {
        serde_json::json!({
            "verdict": "DNAT",
            "endpoints": [backend.to_string()],
            "masquerade": true,
            "program": program,
        })
    };
    // No proxy pinned its program here yet: trace loads its own.
    assert_eq!(trace(&fx), expected("loaded"));
    // What `run` does once attached: trace then runs that very program.
    fx.loaded.pin_tc_ingress().unwrap();
    assert_eq!(trace(&fx), expected("pinned"));
    // A later proxy's pin replaces it.
    fx.loaded.pin_tc_ingress().unwrap();
    assert_eq!(trace(&fx), expected("pinned"));
}

#[test]
fn classes_with_the_cluster_bit_use_the_cluster_scope_endpoints() {
    let mut fx = Fixture::new();
    let (_, frontend, _) = addresses(false);
    let local = sa("10.1.0.5:8080");
    let remote = sa("10.1.9.5:8080");
    // externalTrafficPolicy Local: the policy set has only the local endpoint; pod and node
    // traffic short-circuits to the Cluster set (kube-proxy's behaviour for internal sources).
    common::program_scope(
        &mut fx.maps,
        1,
        frontend,
        IPPROTO_TCP,
        SCOPE_CLUSTER,
        &[remote],
        |_| {},
    );
    fx.service(1, frontend, IPPROTO_TCP, &[local], |v| {
        v.flags |= SVC_F_HAS_CLUSTER_SCOPE;
        v.cluster_classes = 1 << SOURCE_NODE;
    });
    let (_, out) = fx.run(&packet::build(
        sa("172.16.0.2:40000"),
        frontend,
        IPPROTO_TCP,
        b"",
    ));
    assert_eq!(
        packet::summarize(&out).unwrap().dst,
        local,
        "external: policy set"
    );
    let (_, out) = fx.run(&packet::build(
        sa("192.0.2.1:40000"),
        frontend,
        IPPROTO_TCP,
        b"",
    ));
    assert_eq!(
        packet::summarize(&out).unwrap().dst,
        remote,
        "node: cluster set"
    );
}

#[test]
fn garbage_collection_expires_idle_flows_in_the_kernel_map() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_UDP, &[backend], |_| {});
    fx.service(2, frontend, IPPROTO_TCP, &[backend], |_| {});
    fx.run(&packet::build(client, frontend, IPPROTO_UDP, b""));
    fx.run(&packet::build(client, frontend, IPPROTO_TCP, b""));
    assert_eq!(fx.maps.conntrack_entries().unwrap().len(), 4);
    let defaults = dataplane::CtTimeouts::default();
    let stats = dataplane::collect_garbage(&mut fx.maps, &defaults).unwrap();
    assert_eq!((stats.scanned, stats.expired), (4, 0), "fresh flows stay");
    // An unreplied UDP flow expires after udpTimeout; TCP (SYN_SENT) keeps its 2 minutes.
    let short_udp = dataplane::CtTimeouts {
        udp: std::time::Duration::ZERO,
        ..defaults
    };
    let stats = dataplane::collect_garbage(&mut fx.maps, &short_udp).unwrap();
    assert_eq!(stats.expired, 2);
    let left = fx.maps.conntrack_entries().unwrap();
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|(k, _)| k.proto == IPPROTO_TCP));
}

#[test]
fn established_flows_keep_a_terminating_backend_while_new_flows_avoid_it() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_TCP, &[backend], |_| {});
    let (_, out) = fx.run(&packet::build(client, frontend, IPPROTO_TCP, b""));
    assert_eq!(packet::summarize(&out).unwrap().dst, backend);
    // The endpoint starts terminating: it leaves the service's slots (new flows) but stays in
    // BACKENDS (its established flows), as the reconciler programs it.
    let successor = sa("10.1.0.9:8080");
    fx.service(2, frontend, IPPROTO_TCP, &[successor], |_| {});
    assert!(
        fx.maps
            .backend_entries()
            .unwrap()
            .iter()
            .any(|(id, _)| *id == 101)
    );
    let (_, out) = fx.run(&packet::build(client, frontend, IPPROTO_TCP, b"more"));
    assert_eq!(
        packet::summarize(&out).unwrap().dst,
        backend,
        "established flow stays"
    );
    let other_client = SocketAddr::new(client.ip(), client.port() + 1);
    let (_, out) = fx.run(&packet::build(other_client, frontend, IPPROTO_TCP, b""));
    assert_eq!(
        packet::summarize(&out).unwrap().dst,
        successor,
        "new flow avoids it"
    );
    // The stale-endpoint cleanup is kube-proxy's, for UDP only: both TCP flows stay.
    let removed = fx
        .maps
        .cleanup_flows_to_backends(&std::collections::HashSet::from([101, 201]))
        .unwrap();
    assert_eq!(removed, 0);
    assert_eq!(fx.maps.conntrack_entries().unwrap().len(), 4);
}

/// An ICMP / ICMPv6 echo request from `src` to `dst`.
fn echo_request(src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let builder = packet::frame_builder(src, dst);
    let mut frame = Vec::new();
    if dst.is_ipv6() {
        builder
            .icmpv6_echo_request(0x1234, 1)
            .write(&mut frame, b"ping")
    } else {
        builder
            .icmpv4_echo_request(0x1234, 1)
            .write(&mut frame, b"ping")
    }
    .expect("build the echo request");
    frame
}

#[test]
fn service_cidr_drop_is_for_new_connections_and_cluster_ips_outside_need_the_config_flag() {
    let mut fx = Fixture::new();
    let client = sa("10.0.0.2:40000");
    // A k3s-like cluster: the service range is 10.43.0.0/16; one ClusterIP (as a cluster
    // without ServiceCIDR objects would allocate) lies outside it.
    fx.maps
        .add_service_cidr("10.43.0.0/16".parse().unwrap())
        .unwrap();
    fx.maps
        .upsert_vip("10.43.0.10".parse().unwrap(), VIP_F_CLUSTER_IP)
        .unwrap();
    fx.maps
        .upsert_vip("10.96.0.10".parse().unwrap(), VIP_F_CLUSTER_IP)
        .unwrap();
    // (destination, TCP flags or UDP, config flag, expected verdict, what)
    let udp = 0;
    let cases: [(&str, u8, bool, u32, &str); 9] = [
        (
            "10.43.0.77:80",
            TCP_SYN,
            false,
            TC_ACT_SHOT,
            "SYN to an unallocated address",
        ),
        (
            "10.43.0.77:53",
            udp,
            false,
            TC_ACT_SHOT,
            "UDP to an unallocated address",
        ),
        (
            "10.43.0.77:80",
            TCP_ACK,
            false,
            TC_ACT_OK,
            "a connection that predates the rule",
        ),
        (
            "10.43.0.77:80",
            TCP_SYN | TCP_ACK,
            false,
            TC_ACT_OK,
            "SYN-ACK opens nothing",
        ),
        (
            "10.43.0.10:81",
            TCP_SYN,
            false,
            TC_ACT_REDIRECT,
            "ClusterIP inside: REJECT",
        ),
        (
            "10.43.0.10:81",
            TCP_ACK,
            false,
            TC_ACT_REDIRECT,
            "ClusterIP inside, any packet",
        ),
        (
            "10.96.5.5:80",
            TCP_SYN,
            false,
            TC_ACT_OK,
            "a host outside the service range",
        ),
        (
            "10.96.0.10:81",
            TCP_SYN,
            true,
            TC_ACT_REDIRECT,
            "ClusterIP outside, flag on",
        ),
        (
            "10.96.5.5:80",
            TCP_SYN,
            true,
            TC_ACT_OK,
            "flag on: other hosts still pass",
        ),
    ];
    for (dst, flags, outside, verdict, what) in cases {
        fx.maps
            .update_config(|c| {
                c.flags = if outside {
                    CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS
                } else {
                    0
                };
            })
            .unwrap();
        let proto = if flags == udp {
            IPPROTO_UDP
        } else {
            IPPROTO_TCP
        };
        let frame = packet::build_with_tcp_flags(client, sa(dst), proto, flags, b"");
        let (code, out) = fx.run(&frame);
        assert_eq!(code, verdict, "{what}: {dst}");
        if verdict == TC_ACT_OK {
            assert_eq!(out, frame, "{what}: untouched");
        }
    }
    assert_eq!(fx.counter("service_cidr_not_new"), 2);
    assert_eq!(fx.counter("vip_drops"), 2);
    assert_eq!(fx.counter("vip_rejects"), 3);
}

#[test]
fn pings_to_cluster_ips_are_rejected_and_to_unallocated_service_addresses_dropped() {
    for v6 in [false, true] {
        let mut fx = Fixture::new();
        let (client, frontend, _) = addresses(v6);
        fx.maps.upsert_vip(frontend.ip(), VIP_F_CLUSTER_IP).unwrap();
        let (cidr, unallocated, elsewhere) = if v6 {
            ("fd00:96::/108", "fd00:96::99", "fd00:200::1")
        } else {
            ("10.96.0.0/12", "10.96.0.99", "10.200.0.1")
        };
        fx.maps.add_service_cidr(cidr.parse().unwrap()).unwrap();

        let (code, out) = fx.run(&echo_request(client.ip(), frontend.ip()));
        assert_eq!(code, TC_ACT_REDIRECT, "v6 {v6}: ping to a ClusterIP");
        let s = packet::summarize(&out).unwrap();
        let expected = if v6 { (1, 4) } else { (3, 3) };
        assert_eq!(s.icmp, Some(expected), "v6 {v6}");
        assert!(s.checksums_ok, "v6 {v6}");

        let (code, _) = fx.run(&echo_request(client.ip(), unallocated.parse().unwrap()));
        assert_eq!(
            code, TC_ACT_SHOT,
            "v6 {v6}: ping to an unallocated service address"
        );

        let frame = echo_request(client.ip(), elsewhere.parse().unwrap());
        let (code, out) = fx.run(&frame);
        assert_eq!(
            (code, out),
            (TC_ACT_OK, frame),
            "v6 {v6}: other pings pass untouched"
        );
    }
}

#[test]
fn conntrack_read_back_sees_every_entry_across_batches() {
    let mut fx = Fixture::with_conntrack(65536);
    let (_, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_UDP, &[backend], |_| {});
    // 6000 flows, 12000 entries: several 4096-entry batches.
    for i in 0..6000u32 {
        let client = SocketAddr::new(
            IpAddr::from([10, 0, (i / 250) as u8, (i % 250) as u8 + 1]),
            40000,
        );
        let (code, _) = fx.run(&packet::build(client, frontend, IPPROTO_UDP, b""));
        assert_eq!(code, TC_ACT_OK);
    }
    let entries = fx.maps.conntrack_entries().unwrap();
    assert_eq!(entries.len(), 12000);
    let distinct: std::collections::HashSet<_> = entries.iter().map(|(k, _)| *k).collect();
    assert_eq!(distinct.len(), 12000, "no entry read twice");
    assert_eq!(fx.maps.cleanup_flows_to_backend(101).unwrap(), 12000);
    assert!(fx.maps.conntrack_entries().unwrap().is_empty());
}

#[test]
fn trace_from_a_source_class_sends_what_the_program_classifies_by() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.maps
        .update_config(|c| c.detect_local_mode = DETECT_LOCAL_CIDR)
        .unwrap();
    fx.maps
        .add_local_cidr("10.0.0.0/24".parse().unwrap())
        .unwrap();
    // externalTrafficPolicy Local without local endpoints: external traffic is dropped, pod and
    // node traffic forwarded (node traffic masqueraded).
    fx.service(1, frontend, IPPROTO_TCP, &[backend], |v| {
        v.drop_classes = 1 << SOURCE_OTHER;
        v.masquerade_classes = 1 << SOURCE_NODE;
    });
    let request = |src: IpAddr, from| TraceRequest {
        src,
        dst: frontend.ip(),
        dport: frontend.port(),
        proto: IPPROTO_TCP,
        ingress_ifindex: 0,
        runs: 4,
        from: Some(from),
    };
    let outsider: IpAddr = "172.16.0.2".parse().unwrap();
    let external = dataplane::trace(
        &fx.loaded.trace_target().unwrap(),
        &mut fx.maps,
        &request(outsider, TraceFrom::External),
    );
    assert_eq!(external.unwrap().verdict, Verdict::Drop);
    let pod = dataplane::trace(
        &fx.loaded.trace_target().unwrap(),
        &mut fx.maps,
        &request(client.ip(), TraceFrom::Pod),
    )
    .unwrap();
    assert_eq!((pod.verdict, pod.masquerade), (Verdict::Dnat, false));
    // --from node ignores --src: the packet comes from the node's address.
    let node = dataplane::trace(
        &fx.loaded.trace_target().unwrap(),
        &mut fx.maps,
        &request(outsider, TraceFrom::Node),
    )
    .unwrap();
    assert_eq!((node.verdict, node.masquerade), (Verdict::Dnat, true));
    // A pod address is not external, and an outsider is no pod.
    assert!(
        dataplane::trace(
            &fx.loaded.trace_target().unwrap(),
            &mut fx.maps,
            &request(client.ip(), TraceFrom::External)
        )
        .is_err()
    );
    assert!(
        dataplane::trace(
            &fx.loaded.trace_target().unwrap(),
            &mut fx.maps,
            &request(outsider, TraceFrom::Pod)
        )
        .is_err()
    );
    // Without a detector no source is a pod: --from pod traces the source as the program
    // classifies it (external: dropped here) and says so.
    fx.maps
        .update_config(|c| c.detect_local_mode = DETECT_LOCAL_NONE)
        .unwrap();
    let undetected = dataplane::trace(
        &fx.loaded.trace_target().unwrap(),
        &mut fx.maps,
        &request(client.ip(), TraceFrom::Pod),
    )
    .unwrap();
    assert_eq!(undetected.verdict, Verdict::Drop, "classified as external");
    assert!(
        undetected
            .note
            .as_deref()
            .is_some_and(|n| n.contains("without a local-traffic detector")),
        "{:?}",
        undetected.note
    );
}

// ---- conntrack lifetimes: one case per transition of the state machine ----

impl Fixture {
    /// One counter of the dataplane, summed over CPUs.
    fn counter(&self, name: &str) -> u64 {
        dataplane::read_counters(self.pins.path())
            .unwrap()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }

    /// The forward entry (the flow's state) of the flow from `client`.
    fn forward_entry(&self, client: SocketAddr) -> Option<CtValue> {
        let (addr, _) = addr_from_ip(client.ip());
        self.maps
            .conntrack_entries()
            .unwrap()
            .into_iter()
            .find(|(k, v)| {
                v.flags & CT_F_REPLY == 0 && k.src == addr && k.sport == client.port().to_be()
            })
            .map(|(_, v)| v)
    }

    /// A TCP service (id 1, one backend) masqueraded for every source class, with the SNAT
    /// ports 30000..=`snat_port_max`; returns (client, frontend, backend).
    fn masqueraded_service(&mut self, snat_port_max: u16) -> (SocketAddr, SocketAddr, SocketAddr) {
        self.maps
            .update_config(|c| {
                c.snat_port_min = 30000;
                c.snat_port_max = snat_port_max;
            })
            .unwrap();
        let (client, frontend, backend) = addresses(false);
        self.service(1, frontend, IPPROTO_TCP, &[backend], |v| {
            v.masquerade_classes = ALL_CLASSES;
        });
        (client, frontend, backend)
    }

    /// A masqueraded connection from `client` through `frontend` to `backend`, opened and then
    /// closed by `closer` first, through the other side's last ACK (a backend that closed first
    /// keeps the tuple in TIME_WAIT for a minute); returns the node address and SNAT port the
    /// backend saw.
    fn closed_flow(
        &self,
        closer: Closer,
        client: SocketAddr,
        frontend: SocketAddr,
        backend: SocketAddr,
    ) -> SocketAddr {
        let (_, node, _) = self.tcp(client, frontend, TCP_SYN);
        self.tcp(backend, node, TCP_SYN | TCP_ACK);
        self.tcp(client, frontend, TCP_ACK);
        let from_client = |flags| self.tcp(client, frontend, flags);
        let from_backend = |flags| self.tcp(backend, node, flags);
        let (first, second): (&dyn Fn(u8) -> _, &dyn Fn(u8) -> _) = match closer {
            Closer::Client => (&from_client, &from_backend),
            Closer::Backend => (&from_backend, &from_client),
        };
        first(TCP_FIN | TCP_ACK);
        second(TCP_FIN | TCP_ACK);
        first(TCP_ACK);
        node
    }

    /// Sends a TCP segment with `flags` and returns (verdict, source, destination) after NAT.
    fn tcp(&self, from: SocketAddr, to: SocketAddr, flags: u8) -> (u32, SocketAddr, SocketAddr) {
        let (code, out) = self.run(&packet::build_with_tcp_flags(
            from,
            to,
            IPPROTO_TCP,
            flags,
            b"",
        ));
        let s = packet::summarize(&out).unwrap();
        (code, s.src, s.dst)
    }
}

#[test]
fn a_syn_reopens_a_closing_flow_but_not_an_established_one() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_TCP, &[backend], |_| {});
    assert_eq!(fx.tcp(client, frontend, TCP_SYN).2, backend);
    fx.tcp(backend, client, TCP_SYN | TCP_ACK);
    fx.tcp(client, frontend, TCP_ACK);
    assert_eq!(
        fx.forward_entry(client).unwrap().state,
        CT_STATE_ESTABLISHED
    );
    // The Service moves to another endpoint; the old one still exists (terminating).
    let successor = sa("10.1.0.9:8080");
    fx.service(2, frontend, IPPROTO_TCP, &[successor], |_| {});
    // A retransmitted SYN of an established flow keeps its endpoint.
    assert_eq!(fx.tcp(client, frontend, TCP_SYN).2, backend);
    assert_eq!(fx.counter("ct_reopened"), 0);
    // The client closes; a SYN on the tuple is a new connection, balanced anew.
    fx.tcp(client, frontend, TCP_FIN | TCP_ACK);
    assert_eq!(fx.forward_entry(client).unwrap().state, CT_STATE_FIN_WAIT);
    assert_eq!(fx.tcp(client, frontend, TCP_SYN).2, successor);
    assert_eq!(fx.counter("ct_reopened"), 1);
    let reopened = fx.forward_entry(client).unwrap();
    assert_eq!(
        (reopened.state, reopened.backend_id),
        (CT_STATE_SYN_SENT, 201)
    );
    // Only the new flow's two entries are left.
    assert_eq!(fx.maps.conntrack_entries().unwrap().len(), 2);
    // A SYN on a flow whose backend is gone reopens it too.
    fx.maps.delete_backend(201).unwrap();
    fx.service(3, frontend, IPPROTO_TCP, &[backend], |_| {});
    assert_eq!(fx.tcp(client, frontend, TCP_SYN).2, backend);
    assert_eq!(fx.counter("ct_reopened"), 2);
}

#[test]
fn rst_then_in_flight_data_leaves_the_flow_closed_with_the_short_timeout() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_TCP, &[backend], |_| {});
    fx.tcp(client, frontend, TCP_SYN);
    fx.tcp(backend, client, TCP_SYN | TCP_ACK);
    fx.tcp(client, frontend, TCP_ACK);
    let (_, src, dst) = fx.tcp(backend, client, TCP_RST | TCP_ACK);
    assert_eq!(
        (src, dst),
        (frontend, client),
        "the RST is reverse-translated"
    );
    // Data still in flight both ways is translated, and the flow stays closed.
    assert_eq!(fx.tcp(client, frontend, TCP_ACK).2, backend);
    assert_eq!(fx.tcp(backend, client, TCP_ACK).1, frontend);
    assert_eq!(fx.forward_entry(client).unwrap().state, CT_STATE_CLOSE);
    // Closed flows go after `tcp_close` (10 s), not after the 24 h of an established one.
    let defaults = dataplane::CtTimeouts::default();
    let stats = dataplane::collect_garbage(&mut fx.maps, &defaults).unwrap();
    assert_eq!(stats.expired, 0);
    let closed_now = dataplane::CtTimeouts {
        tcp_close: std::time::Duration::ZERO,
        ..defaults
    };
    let stats = dataplane::collect_garbage(&mut fx.maps, &closed_now).unwrap();
    assert_eq!(stats.expired, 2);
    assert!(fx.maps.conntrack_entries().unwrap().is_empty());
}

#[test]
fn fin_both_ways_then_the_last_ack_frees_the_snat_port_for_the_next_flow() {
    let mut fx = Fixture::new();
    // One SNAT port: the second masqueraded flow can only have it once the first is over.
    let (client, frontend, backend) = fx.masqueraded_service(30000);
    let node = sa("192.0.2.1:30000");
    assert_eq!(
        fx.tcp(client, frontend, TCP_SYN),
        (TC_ACT_OK, node, backend)
    );
    fx.tcp(backend, node, TCP_SYN | TCP_ACK);
    fx.tcp(client, frontend, TCP_ACK);
    let second = sa("10.0.0.3:40001");
    let (code, _, _) = fx.tcp(second, frontend, TCP_SYN);
    assert_eq!(code, TC_ACT_SHOT, "the only port is held by a live flow");
    assert_eq!(
        (fx.counter("snat_exhausted"), fx.counter("ct_map_full")),
        (1, 0)
    );
    // The client closes first; the backend acknowledges, then closes; the client's last ACK.
    let steps = [
        (true, TCP_FIN | TCP_ACK, CT_STATE_FIN_WAIT),
        (false, TCP_ACK, CT_STATE_CLOSE_WAIT),
        (false, TCP_FIN | TCP_ACK, CT_STATE_LAST_ACK),
        (true, TCP_ACK, CT_STATE_TIME_WAIT),
    ];
    for (from_client, flags, state) in steps {
        let (code, src, dst) = if from_client {
            fx.tcp(client, frontend, flags)
        } else {
            fx.tcp(backend, node, flags)
        };
        assert_eq!(code, TC_ACT_OK);
        if from_client {
            assert_eq!((src, dst), (node, backend));
        } else {
            assert_eq!((src, dst), (frontend, client));
        }
        assert_eq!(fx.forward_entry(client).unwrap().state, state, "{flags:#x}");
    }
    // The closed flow's port goes to the next flow at once, and the old flow is forgotten.
    assert_eq!(
        fx.tcp(second, frontend, TCP_SYN),
        (TC_ACT_OK, node, backend)
    );
    assert_eq!(fx.counter("snat_ports_reused"), 1);
    assert!(fx.forward_entry(client).is_none());
    let (_, src, dst) = fx.tcp(backend, node, TCP_SYN | TCP_ACK);
    assert_eq!(
        (src, dst),
        (frontend, second),
        "replies reach the new client"
    );
}

#[test]
fn snat_ports_held_by_live_flows_are_skipped_and_never_counted_as_map_full() {
    let mut fx = Fixture::new();
    let (_, frontend, _) = fx.masqueraded_service(30001);
    let mut ports = Vec::new();
    for i in 0..2u16 {
        let (code, src, _) = fx.tcp(sa(&format!("10.0.0.2:{}", 40000 + i)), frontend, TCP_SYN);
        assert_eq!(code, TC_ACT_OK);
        ports.push(src.port());
    }
    ports.sort_unstable();
    assert_eq!(ports, [30000, 30001], "two flows, two distinct ports");
    let (code, _, _) = fx.tcp(sa("10.0.0.2:40002"), frontend, TCP_SYN);
    assert_eq!(code, TC_ACT_SHOT);
    assert_eq!(fx.counter("ct_map_full"), 0);
    assert_eq!(fx.counter("snat_exhausted"), 1);
}

#[test]
fn udp_is_assured_only_after_a_reply_and_two_seconds() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = addresses(false);
    fx.service(1, frontend, IPPROTO_UDP, &[backend], |_| {});
    let request = packet::build(client, frontend, IPPROTO_UDP, b"q");
    fx.run(&request);
    fx.run(&request);
    let entry = fx.forward_entry(client).unwrap();
    assert_eq!(
        (entry.state, entry.flags & CT_F_SEEN_REPLY),
        (CT_STATE_SYN_SENT, 0)
    );
    fx.run(&packet::build(backend, client, IPPROTO_UDP, b"a"));
    assert_eq!(fx.forward_entry(client).unwrap().state, CT_STATE_SYN_RECV);
    // Replied, and still active 2 s after its first packet: assured (udpStreamTimeout).
    std::thread::sleep(std::time::Duration::from_millis(2100));
    fx.run(&request);
    assert_eq!(
        fx.forward_entry(client).unwrap().state,
        CT_STATE_ESTABLISHED
    );
    let short = dataplane::CtTimeouts {
        udp: std::time::Duration::ZERO,
        ..dataplane::CtTimeouts::default()
    };
    let stats = dataplane::collect_garbage(&mut fx.maps, &short).unwrap();
    assert_eq!(stats.expired, 0, "assured flows keep the stream timeout");
}

#[test]
fn affinity_to_an_endpoint_that_left_the_service_is_not_honoured() {
    let mut fx = Fixture::new();
    let (client, frontend, _) = addresses(false);
    let backends = [sa("10.1.0.5:8080"), sa("10.1.0.6:8080")];
    fx.service(1, frontend, IPPROTO_TCP, &backends, |v| {
        v.affinity_timeout = 10_800;
    });
    let from = |port: u16| SocketAddr::new(client.ip(), port);
    let first = fx.tcp(from(40000), frontend, TCP_SYN).2;
    assert_eq!(fx.tcp(from(40001), frontend, TCP_SYN).2, first);
    // The remembered endpoint starts terminating: it leaves the slots and is no longer
    // eligible, but still exists as a backend (its established flows keep it).
    let (left, stays) = if first == backends[0] {
        (101, backends[1])
    } else {
        (102, backends[0])
    };
    fx.maps
        .delete_affinity_backend(&AffinityBackendKey {
            service_id: 1,
            backend_id: left,
            scope: SCOPE_POLICY,
            external: 0,
            _pad: [0; 2],
        })
        .unwrap();
    let stays_id = if left == 101 { 102 } else { 101 };
    fx.maps
        .upsert_service_entry(
            &common_key(frontend, IPPROTO_TCP, 1),
            &ServiceValue {
                id: stays_id,
                ..ServiceValue::default()
            },
        )
        .unwrap();
    fx.maps
        .upsert_service_entry(
            &common_key(frontend, IPPROTO_TCP, 0),
            &ServiceValue {
                id: 1,
                count: 1,
                affinity_timeout: 10_800,
                ..ServiceValue::default()
            },
        )
        .unwrap();
    assert_eq!(fx.tcp(from(40002), frontend, TCP_SYN).2, stays);
    assert_eq!(fx.counter("affinity_stale"), 1);
    // The new choice is remembered.
    assert_eq!(fx.tcp(from(40003), frontend, TCP_SYN).2, stays);
    assert_eq!(fx.counter("affinity_stale"), 1);
    // The established flow to the endpoint that left keeps it.
    assert_eq!(fx.tcp(from(40000), frontend, TCP_ACK).2, first);
}

/// The policy-scope `SERVICES` key of `frontend` at `slot`.
fn common_key(frontend: SocketAddr, proto: u8, slot: u16) -> proxy_common::ServiceKey {
    let (addr, family) = addr_from_ip(frontend.ip());
    proxy_common::ServiceKey {
        addr,
        port: frontend.port().to_be(),
        proto,
        scope: SCOPE_POLICY,
        slot,
        family,
        _pad: 0,
    }
}

#[test]
fn a_port_whose_backend_closed_first_is_taken_only_when_no_other_is_free() {
    let mut fx = Fixture::new();
    let (_, frontend, backend) = fx.masqueraded_service(30001);
    let first = sa("10.0.0.2:40000");
    let node = fx.closed_flow(Closer::Backend, first, frontend, backend);
    assert_eq!(fx.forward_entry(first).unwrap().state, CT_STATE_TIME_WAIT);
    // The other port is free: taken, whatever the probe's random start.
    let (code, second_node, _) = fx.tcp(sa("10.0.0.2:40001"), frontend, TCP_SYN);
    assert_eq!(code, TC_ACT_OK);
    assert_ne!(second_node.port(), node.port());
    assert_eq!(fx.counter("snat_ports_reused"), 0);
    // Nothing else left: the backend-TIME_WAIT port rather than no port at all.
    let (code, third_node, _) = fx.tcp(sa("10.0.0.2:40002"), frontend, TCP_SYN);
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(third_node.port(), node.port());
    assert_eq!(fx.counter("snat_ports_reused"), 1);
}

#[test]
fn a_port_whose_last_ack_just_passed_is_taken_only_when_no_other_is_free() {
    let mut fx = Fixture::new();
    // Eight ports: seven whose client closed first a moment ago, one whose flow was reset.
    let (_, frontend, backend) = fx.masqueraded_service(30007);
    let client = |port: u16| sa(&format!("10.0.0.2:{port}"));
    let mut just_closed = std::collections::BTreeSet::new();
    for i in 0..7 {
        let node = fx.closed_flow(Closer::Client, client(40000 + i), frontend, backend);
        assert_eq!(
            fx.forward_entry(client(40000 + i)).unwrap().state,
            CT_STATE_TIME_WAIT
        );
        just_closed.insert(node.port());
    }
    let (_, reset, _) = fx.tcp(client(40007), frontend, TCP_SYN);
    assert!(!just_closed.contains(&reset.port()));
    fx.tcp(backend, reset, TCP_RST | TCP_ACK);
    // The reset flow's port, whatever the probe's random start: the backend may not have had
    // the others' last ACK yet.
    let (code, node, _) = fx.tcp(client(40008), frontend, TCP_SYN);
    assert_eq!((code, node.port()), (TC_ACT_OK, reset.port()));
    // Nothing else left: one of them rather than no port at all.
    let (code, node, _) = fx.tcp(client(40009), frontend, TCP_SYN);
    assert_eq!(code, TC_ACT_OK);
    assert!(just_closed.contains(&node.port()));
    assert_eq!(fx.counter("snat_ports_reused"), 2);
}

#[test]
fn a_client_reopening_its_tuple_leaves_the_backend_time_wait_port_held() {
    let mut fx = Fixture::new();
    let (client, frontend, backend) = fx.masqueraded_service(30001);
    let old = fx.closed_flow(Closer::Backend, client, frontend, backend);
    // The client reuses its tuple at once: a new flow, on the other (free) port, whatever the
    // probe's random start; the old port stays held rather than forgotten.
    let (code, reopened, _) = fx.tcp(client, frontend, TCP_SYN);
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(fx.counter("ct_reopened"), 1);
    assert_ne!(reopened.port(), old.port());
    let held: Vec<CtValue> = fx
        .maps
        .conntrack_entries()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.dport == old.port().to_be())
        .map(|(_, v)| v)
        .collect();
    assert!(
        matches!(held.as_slice(), [v] if v.flags & CT_F_HELD != 0 && v.state == CT_STATE_TIME_WAIT),
        "the old port's reply entry is held: {held:?}"
    );
    // It translates nothing: the backend's stray segment to the old port reaches the node as
    // it is (the reopened flow's replies go through the new port).
    assert_eq!(fx.tcp(backend, old, TCP_ACK), (TC_ACT_OK, backend, old));
    assert_eq!(
        fx.tcp(backend, reopened, TCP_SYN | TCP_ACK),
        (TC_ACT_OK, frontend, client)
    );
    // Garbage collection keeps it, and counts no orphan.
    let stats =
        dataplane::collect_garbage(&mut fx.maps, &dataplane::CtTimeouts::default()).unwrap();
    assert_eq!((stats.expired, stats.orphans), (0, 0));
    // Another client gets the held port only as the last one left, and the reopened flow
    // keeps its entries.
    let (code, third, _) = fx.tcp(sa("10.0.0.2:40002"), frontend, TCP_SYN);
    assert_eq!((code, third.port()), (TC_ACT_OK, old.port()));
    assert_eq!(fx.counter("snat_ports_reused"), 1);
    assert_eq!(
        fx.forward_entry(client).unwrap().nat_sport,
        reopened.port().to_be()
    );
    assert_eq!(
        fx.tcp(client, frontend, TCP_ACK),
        (TC_ACT_OK, reopened, backend)
    );
}

#[test]
fn concurrent_new_flows_on_two_cpus_never_share_a_snat_port() {
    use std::collections::HashMap;
    use std::sync::Mutex;
    let mut fx = Fixture::new();
    // Eight ports for two CPUs opening and resetting flows as fast as they can: the same ports
    // are raced for all the time, through the free and the reuse paths.
    let (_, frontend, _) = fx.masqueraded_service(30007);
    let owners: Mutex<HashMap<u16, u16>> = Mutex::new(HashMap::new());
    let fx = &fx;
    std::thread::scope(|scope| {
        for thread in 0..2u8 {
            let owners = &owners;
            scope.spawn(move || {
                for i in 0..3000u16 {
                    let client = SocketAddr::new(IpAddr::from([10, 0, thread, 2]), 10_000 + i);
                    let (code, node, _) = fx.tcp(client, frontend, TCP_SYN);
                    assert_eq!(code, TC_ACT_OK, "thread {thread} flow {i}: a free port");
                    let previous = owners
                        .lock()
                        .unwrap()
                        .insert(node.port(), u16::from(thread) * 10_000 + i);
                    assert_eq!(
                        previous,
                        None,
                        "port {} given to a second live flow",
                        node.port()
                    );
                    // Released before the RST makes the port reusable by the other CPU.
                    owners.lock().unwrap().remove(&node.port());
                    fx.tcp(client, frontend, TCP_RST | TCP_ACK);
                }
            });
        }
    });
    assert_eq!(fx.counter("ct_map_full"), 0);
    assert_eq!(fx.counter("snat_exhausted"), 0);
    eprintln!(
        "collisions {} reused {}",
        fx.counter("snat_collisions"),
        fx.counter("snat_ports_reused")
    );
}
