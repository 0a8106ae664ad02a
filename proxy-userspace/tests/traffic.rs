//! Real traffic between network namespaces through the real `kube-ebpf-proxy run`: a node
//! namespace holding the proxy, two pod namespaces behind veths running echo servers that
//! answer with their name and the client address they saw, and a client namespace.

mod common;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use proxy_common::{IPPROTO_TCP, IPPROTO_UDP, SOURCE_OTHER};
use proxy_lab::node_link::{NodeLink, Tunnel};
use proxy_lab::{
    Cgroup, EchoServer, ManifestsDir, Netns, PinDir, Proxy, run, tcp_request, udp_request,
    unique_name, veth,
};
use proxy_userspace::dataplane::Maps;

const BINARY: &str = env!("CARGO_BIN_EXE_kube-ebpf-proxy");
const BACKEND_PORT: u16 = 8080;
const PODS: usize = 2;
/// Requests sent before concluding a backend is never chosen (2 backends: 2^-40 odds).
const MAX_REQUESTS: usize = 40;
const TIMEOUT: Duration = Duration::from_secs(2);
/// This node as the proxy's manifests source sees it.
const NODE_YAML: &str = "apiVersion: v1
kind: Node
metadata:
  name: node
status:
  addresses:
  - type: InternalIP
    address: 10.0.0.1
  - type: InternalIP
    address: fd00:c::1
";

/// Fields drop in order: maps, proxy (detaches), servers, cgroup, namespaces, pins.
struct Lab {
    maps: Maps,
    proxy: Proxy,
    _servers: Vec<EchoServer>,
    cgroup: Cgroup,
    _tunnel: Tunnel,
    client: Netns,
    pods: Vec<Netns>,
    node: Netns,
    nft_before: String,
    pins: PinDir,
    _manifests: ManifestsDir,
}

fn node_addresses() -> [IpAddr; 2] {
    ["10.0.0.1".parse().unwrap(), "fd00:c::1".parse().unwrap()]
}

fn pod_address(i: usize, v6: bool) -> IpAddr {
    if v6 {
        format!("fd00:1:{i}::2").parse().unwrap()
    } else {
        format!("10.1.{i}.2").parse().unwrap()
    }
}

fn client_address(v6: bool) -> IpAddr {
    if v6 {
        "fd00:c::2".parse().unwrap()
    } else {
        "10.0.0.2".parse().unwrap()
    }
}

fn cluster_ip(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::new("fd00:96::10".parse().unwrap(), port)
    } else {
        SocketAddr::new("10.96.0.10".parse().unwrap(), port)
    }
}

fn nft_ruleset(ns: &Netns) -> String {
    run(ns.command("nft").args(["list", "ruleset"])).expect("nft list ruleset")
}

impl Lab {
    /// The client's link as PROXY_LAB_NODE_LINK says: Ethernet, or a tunnel.
    fn new() -> Self {
        Self::with_client_link(NodeLink::from_env().unwrap())
    }

    fn with_client_link(link: NodeLink) -> Self {
        let node = Netns::new("n").unwrap();
        let client = Netns::new("c").unwrap();
        let tunnel = link
            .connect(
                &node,
                &unique_name("a"),
                &["10.0.0.1/24", "fd00:c::1/64"],
                &client,
                &unique_name("b"),
                &["10.0.0.2/24", "fd00:c::2/64"],
            )
            .unwrap();
        client
            .ip(&["route", "add", "default", "via", "10.0.0.1"])
            .unwrap();
        client
            .ip(&["-6", "route", "add", "default", "via", "fd00:c::1"])
            .unwrap();
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        for i in 0..PODS {
            let pod = Netns::new("p").unwrap();
            veth(
                &node,
                &unique_name("a"),
                &[&format!("10.1.{i}.1/24"), &format!("fd00:1:{i}::1/64")],
                &pod,
                &unique_name("b"),
                &[&format!("10.1.{i}.2/24"), &format!("fd00:1:{i}::2/64")],
            )
            .unwrap();
            pod.ip(&["route", "add", "default", "via", &format!("10.1.{i}.1")])
                .unwrap();
            pod.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:1:{i}::1"),
            ])
            .unwrap();
            servers.push(EchoServer::start(&pod, &format!("pod{i}"), BACKEND_PORT).unwrap());
            pods.push(pod);
        }
        for setting in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            node.sysctl(setting).unwrap();
        }
        for ns in pods.iter().chain([&node, &client]) {
            ns.wait_ipv6_ready(Duration::from_secs(10)).unwrap();
        }
        proxy_lab::host::Protections::apply_from_env(&node).unwrap();
        let nft_before = nft_ruleset(&node);
        let pins = PinDir::new();
        // The proxy's source: a cluster of just this node. Its addresses are the masquerade
        // source; the services themselves are written straight into the maps by each test.
        let manifests = ManifestsDir::new().unwrap();
        manifests.write("node.yaml", NODE_YAML).unwrap();
        let cgroup = Cgroup::new().unwrap();
        let cgroup_path = cgroup.path().to_str().unwrap().to_owned();
        let proxy = Proxy::start(
            Path::new(BINARY),
            &node,
            &pins,
            &[
                "--cgroup-path",
                &cgroup_path,
                "--manifests",
                manifests.path().to_str().unwrap(),
                "--hostname-override",
                "node",
                "--services-max",
                "65536",
                "--backends-max",
                "65536",
                "--conntrack-max",
                "65536",
            ],
        )
        .unwrap();
        let maps = Maps::open(pins.path()).unwrap();
        Self {
            maps,
            proxy,
            _servers: servers,
            cgroup,
            _tunnel: tunnel,
            client,
            pods,
            node,
            nft_before,
            pins,
            _manifests: manifests,
        }
    }

    fn backends(&self, v6: bool) -> Vec<SocketAddr> {
        (0..self.pods.len())
            .map(|i| SocketAddr::new(pod_address(i, v6), BACKEND_PORT))
            .collect()
    }

    /// Requests and replies both went by the fast path, never by the node's stack.
    fn assert_every_translated_packet_took_the_fast_path(&self) {
        let counters = proxy_userspace::dataplane::read_counters(self.pins.path()).unwrap();
        let counter = |name: &str| {
            counters
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, value)| *value)
        };
        assert!(
            counter("fast_path_redirects") >= counter("ct_forward_hits") + counter("ct_reply_hits"),
            "every translated packet was redirected:\n{}",
            self.stats()
        );
        assert_eq!(counter("fast_path_fallbacks"), 0, "{}", self.stats());
    }

    fn stats(&self) -> String {
        run(Command::new(BINARY)
            .args(["stats", "--bpf-pin-path"])
            .arg(self.pins.path()))
        .unwrap_or_else(|e| e.to_string())
    }

    /// Sends requests until every pod answered (or the bound); returns (names, seen clients).
    fn spread(&self, target: SocketAddr, proto: u8) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut names = BTreeSet::new();
        let mut clients = BTreeSet::new();
        for _ in 0..MAX_REQUESTS {
            let answer = if proto == IPPROTO_TCP {
                tcp_request(&self.client, target, TIMEOUT)
            } else {
                udp_request(&self.client, target, TIMEOUT)
            }
            .unwrap()
            .unwrap_or_else(|e| {
                panic!(
                    "request to {target} (proto {proto}): {e}; counters:\n{}",
                    self.stats()
                )
            });
            let (name, seen) = answer.split_once(' ').expect("NAME CLIENT");
            names.insert(name.to_owned());
            clients.insert(seen.to_owned());
            if names.len() == self.pods.len() {
                break;
            }
        }
        (names, clients)
    }
}

fn all_pods() -> BTreeSet<String> {
    (0..PODS).map(|i| format!("pod{i}")).collect()
}

#[test]
fn cluster_ip_tcp_and_udp_reach_every_backend_with_the_client_address_preserved() {
    let mut lab = Lab::new();
    let mut id = 0;
    for v6 in [false, true] {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            id += 1;
            let backends = lab.backends(v6);
            common::program_service(
                &mut lab.maps,
                id,
                cluster_ip(v6, 80),
                proto,
                &backends,
                |_| {},
            );
            let (names, clients) = lab.spread(cluster_ip(v6, 80), proto);
            let case = format!("v6 {v6} proto {proto}");
            assert_eq!(names, all_pods(), "{case}: every backend answered");
            assert_eq!(
                clients,
                BTreeSet::from([client_address(v6).to_string()]),
                "{case}: backends saw the real client"
            );
        }
    }
    assert_eq!(
        nft_ruleset(&lab.node),
        lab.nft_before,
        "no nftables rule was created"
    );
    assert!(
        lab.nft_before.trim().is_empty()
            || proxy_lab::host::Protections::from_env().unwrap().firewall,
        "the node namespace has no ruleset but the host firewall's"
    );
    lab.assert_every_translated_packet_took_the_fast_path();
}

#[test]
fn masqueraded_services_show_the_node_address_to_backends() {
    let mut lab = Lab::new();
    for (id, v6, proto) in [(1, false, IPPROTO_TCP), (2, true, IPPROTO_UDP)] {
        let backends = lab.backends(v6);
        common::program_service(
            &mut lab.maps,
            id,
            cluster_ip(v6, 80),
            proto,
            &backends,
            |v| {
                v.masquerade_classes = 1 << SOURCE_OTHER;
            },
        );
        let (names, clients) = lab.spread(cluster_ip(v6, 80), proto);
        assert_eq!(names, all_pods());
        let node = node_addresses()[usize::from(v6)];
        assert_eq!(
            clients,
            BTreeSet::from([node.to_string()]),
            "v6 {v6}: masqueraded"
        );
    }
}

#[test]
fn reject_refuses_at_once_and_drop_times_out() {
    let mut lab = Lab::new();
    for (id, v6) in [(1, false), (2, true)] {
        // No endpoints: REJECT (TCP and UDP).
        common::program_service(
            &mut lab.maps,
            id,
            cluster_ip(v6, 80),
            IPPROTO_TCP,
            &[],
            |_| {},
        );
        common::program_service(
            &mut lab.maps,
            id + 10,
            cluster_ip(v6, 80),
            IPPROTO_UDP,
            &[],
            |_| {},
        );
        let started = Instant::now();
        let error = tcp_request(&lab.client, cluster_ip(v6, 80), TIMEOUT)
            .unwrap()
            .unwrap_err();
        assert_eq!(
            error.kind(),
            ErrorKind::ConnectionRefused,
            "v6 {v6}: TCP refused"
        );
        // The ICMP error can reach the client while its connect() still holds the socket lock
        // (the veth delivers it in the same softirq); the kernel then records it as a soft
        // error and the refusal lands with the first SYN retransmission, 1 s later.
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1500),
            "v6 {v6}: refused at once, took {took:?}"
        );
        let error = udp_request(&lab.client, cluster_ip(v6, 80), TIMEOUT)
            .unwrap()
            .unwrap_err();
        assert_eq!(
            error.kind(),
            ErrorKind::ConnectionRefused,
            "v6 {v6}: UDP refused"
        );

        // DROP: no answer at all.
        let backends = lab.backends(v6);
        common::program_service(
            &mut lab.maps,
            id + 20,
            cluster_ip(v6, 81),
            IPPROTO_TCP,
            &backends,
            |v| {
                v.drop_classes = 1 << SOURCE_OTHER;
            },
        );
        let bound = Duration::from_millis(700);
        let started = Instant::now();
        let error = tcp_request(&lab.client, cluster_ip(v6, 81), bound)
            .unwrap()
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::TimedOut, "v6 {v6}: dropped");
        assert!(started.elapsed() < bound + Duration::from_secs(1));
    }
}

/// Runs `script` with bash in the node namespace, inside `cgroup` when given (the socket hooks
/// are attached to the test's cgroup), bounded by `timeout(1)`: 5 s, scaled where process
/// start-up is slow (a Python client under qemu's emulation).
fn node_shell(lab: &Lab, script: &str, in_cgroup: bool) -> std::process::Output {
    let script = if in_cgroup {
        format!(
            "echo $$ > {}/cgroup.procs && {script}",
            lab.cgroup.path().display()
        )
    } else {
        script.to_owned()
    };
    lab.node
        .command("timeout")
        .arg(
            proxy_lab::scaled(Duration::from_secs(5))
                .as_secs()
                .to_string(),
        )
        .args(["bash", "-c", &script])
        .output()
        .expect("run bash in the node namespace")
}

#[test]
fn host_originated_connections_to_a_cluster_ip_reach_a_backend() {
    let mut lab = Lab::new();
    let mut id = 0;
    // (v6, proto, the bash redirection that opens a connected socket to the service)
    for (v6, proto, script) in [
        (
            false,
            IPPROTO_TCP,
            "exec 3<>/dev/tcp/10.96.0.10/80 && cat <&3",
        ),
        (
            true,
            IPPROTO_TCP,
            "exec 3<>/dev/tcp/fd00:96::10/80 && cat <&3",
        ),
        (
            false,
            IPPROTO_UDP,
            "exec 3<>/dev/udp/10.96.0.10/80 && echo ping >&3 && head -n1 <&3",
        ),
    ] {
        id += 1;
        let backends = lab.backends(v6);
        common::program_service(
            &mut lab.maps,
            id,
            cluster_ip(v6, 80),
            proto,
            &backends,
            |_| {},
        );
        let mut names = BTreeSet::new();
        for _ in 0..MAX_REQUESTS {
            let out = node_shell(&lab, script, true);
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            assert!(
                out.status.success(),
                "v6 {v6} proto {proto}: host connect failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (name, seen) = answer.split_once(' ').expect("NAME CLIENT");
            let expected_prefix = if v6 { "fd00:1:" } else { "10.1." };
            assert!(
                seen.starts_with(expected_prefix),
                "the node's own address on the pod link, got {seen}"
            );
            names.insert(name.to_owned());
            if names.len() == PODS {
                break;
            }
        }
        assert_eq!(names, all_pods(), "v6 {v6} proto {proto}");
    }
    common::program_service(
        &mut lab.maps,
        9,
        cluster_ip(false, 82),
        IPPROTO_TCP,
        &[],
        |_| {},
    );
    let refused = node_shell(&lab, "exec 3<>/dev/tcp/10.96.0.10/82", true);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Connection refused"),
        "REJECT from a socket hook is ECONNREFUSED: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // Outside the cgroup nothing is translated: the connect goes to the VIP, which nobody has.
    let outside = node_shell(&lab, "exec 3<>/dev/tcp/10.96.0.10/80", false);
    assert!(
        !outside.status.success(),
        "untranslated outside the test's cgroup"
    );
}

#[test]
fn the_proxy_follows_interfaces_that_appear_and_go_away() {
    let mut lab = Lab::new();
    let backends = lab.backends(false);
    common::program_service(
        &mut lab.maps,
        1,
        cluster_ip(false, 80),
        IPPROTO_TCP,
        &backends,
        |_| {},
    );
    let late = Netns::new("l").unwrap();
    let node_side = unique_name("a");
    veth(
        &lab.node,
        &node_side,
        &["10.2.0.1/24"],
        &late,
        &unique_name("b"),
        &["10.2.0.2/24"],
    )
    .unwrap();
    late.ip(&["route", "add", "default", "via", "10.2.0.1"])
        .unwrap();
    lab.proxy
        .wait_for_log(&format!("added=[\"{node_side}\"]"), Duration::from_secs(5))
        .unwrap();
    // Only a translated connection can be answered: nothing listens on the ClusterIP.
    let answer = tcp_request(&late, cluster_ip(false, 80), TIMEOUT)
        .unwrap()
        .expect("a client behind the new interface reaches the service");
    assert!(answer.starts_with("pod"), "{answer}");
    drop(late);
    lab.proxy
        .wait_for_log(
            &format!("removed=[\"{node_side}\"]"),
            Duration::from_secs(5),
        )
        .unwrap();
}

#[test]
fn host_sockets_see_the_service_address_as_their_peer() {
    let mut lab = Lab::new();
    let backends = lab.backends(false);
    common::program_service(
        &mut lab.maps,
        1,
        cluster_ip(false, 80),
        IPPROTO_UDP,
        &backends,
        |_| {},
    );
    common::program_service(
        &mut lab.maps,
        2,
        cluster_ip(false, 80),
        IPPROTO_TCP,
        &backends,
        |_| {},
    );
    // Unconnected UDP (sendmsg + recvmsg hooks) and TCP getpeername (getpeername hook).
    let script = "exec /usr/bin/python3 -c '
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
u.sendto(b\"ping\", (\"10.96.0.10\", 80))
data, peer = u.recvfrom(100)
t = socket.create_connection((\"10.96.0.10\", 80), timeout=2)
print(data.decode().split()[0], peer[0], peer[1], *t.getpeername())
'";
    let out = node_shell(&lab, script, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let fields: Vec<&str> = answer.split(' ').collect();
    assert!(fields[0].starts_with("pod"), "{answer}");
    assert_eq!(
        fields[1..],
        ["10.96.0.10", "80", "10.96.0.10", "80"],
        "recvfrom and getpeername report the service, not the backend"
    );
}

#[test]
fn layer3_interfaces_get_the_program_for_bare_ip_packets() {
    let mut lab = Lab::new();
    // A tun device hands the tc hook bare IP packets: it gets the layer-3 variant.
    let tun = unique_name("t");
    lab.node
        .ip(&["tuntap", "add", "mode", "tun", "name", &tun])
        .unwrap();
    lab.node.ip(&["link", "set", &tun, "up"]).unwrap();
    lab.proxy
        .wait_for_log(&tun, Duration::from_secs(5))
        .unwrap();
    assert!(
        lab.proxy
            .log_lines()
            .iter()
            .any(|l| l.contains(&tun) && l.contains("tc_ingress_l3")),
        "the proxy attaches tc_ingress_l3 to {tun}"
    );
}

/// The client reaches the node through a tun-device tunnel, whatever PROXY_LAB_NODE_LINK says:
/// its packets arrive on a layer-3 device, where new flows are translated, REJECT answers and
/// the fast path delivers to the pods' Ethernet devices (and replies back into the tunnel).
#[test]
fn clients_behind_a_layer3_tunnel_reach_cluster_ips_and_are_rejected() {
    let mut lab = Lab::with_client_link(NodeLink::Tun);
    for (id, v6) in [(1, false), (2, true)] {
        let backends = lab.backends(v6);
        common::program_service(
            &mut lab.maps,
            id,
            cluster_ip(v6, 80),
            IPPROTO_TCP,
            &backends,
            |_| {},
        );
        let (names, clients) = lab.spread(cluster_ip(v6, 80), IPPROTO_TCP);
        assert_eq!(names, all_pods(), "v6 {v6}: every backend answered");
        assert_eq!(
            clients,
            BTreeSet::from([client_address(v6).to_string()]),
            "v6 {v6}: backends saw the real client"
        );
        common::program_service(
            &mut lab.maps,
            id + 10,
            cluster_ip(v6, 81),
            IPPROTO_UDP,
            &[],
            |_| {},
        );
        let error = udp_request(&lab.client, cluster_ip(v6, 81), TIMEOUT)
            .unwrap()
            .unwrap_err();
        assert_eq!(
            error.kind(),
            ErrorKind::ConnectionRefused,
            "v6 {v6}: REJECT through the tunnel"
        );
    }
    lab.assert_every_translated_packet_took_the_fast_path();
}
