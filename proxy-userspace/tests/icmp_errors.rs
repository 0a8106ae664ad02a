//! ICMP errors the node itself generates about translated packets, on the two-node namespace
//! cluster (`proxy_lab::cluster`) with the real `kube-ebpf-proxy run` on node1: a pod's TCP
//! connect to a ClusterIP whose SYN cannot be forwarded (its TTL / hop limit expires at the
//! node, or the backend's address has an `unreachable` route there) fails at once with the
//! error's errno, as with kube-proxy, instead of hanging until its timeout: the error quotes the
//! packet after DNAT, and only its translation back (the tc egress program's) lets the client's
//! socket match it. With and without the fast path, and on hardened nodes when
//! `PROXY_LAB_NODE_PROTECTIONS` says so. An external client's connect to a NodePort
//! (masqueraded, which the stack would drop as a martian without answering) fails the same way:
//! the program answers it itself.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use proxy_lab::Netns;
use proxy_lab::cluster::{Cluster, SERVER_PORT, node_ip};
use socket2::{Domain, Protocol, Socket, Type};

const BINARY: &str = env!("CARGO_BIN_EXE_kube-ebpf-proxy");
/// How long the Service may take to be programmed.
const PROGRAMMED_BOUND: Duration = Duration::from_secs(10);
/// A connect the node answers with an error fails well within this; one it does not answer
/// retransmits its SYN (after 1 s, then 3 s…) and runs into it.
const CONNECT_BOUND: Duration = Duration::from_secs(5);

/// One TCP connect from inside `ns` to `target`, its packets sent with a TTL / hop limit of
/// `hops` (the system's default when `None`), bounded by [`CONNECT_BOUND`]. A connection made
/// is reset as it closes: no packet of it is still on its way once this returns (after a route
/// changes, the stack's errors about such stragglers would take from the node's per-address ICMP
/// rate limit, about one a second, what the connect a test then checks needs).
fn connect(ns: &Netns, target: SocketAddr, hops: Option<u32>) -> std::io::Result<()> {
    ns.enter(move || {
        let socket = Socket::new(
            Domain::for_address(target),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_linger(Some(Duration::ZERO))?;
        match hops {
            Some(hops) if target.is_ipv4() => socket.set_ttl_v4(hops)?,
            Some(hops) => socket.set_unicast_hops_v6(hops)?,
            None => {}
        }
        socket.connect_timeout(&target.into(), CONNECT_BOUND)
    })
    .expect("enter the pod")
}

/// Where a connect comes from: the `toolbox` pod on node1, or the external client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum From {
    Pod,
    External,
}

fn netns(cluster: &Cluster, from: From) -> &Netns {
    match from {
        From::Pod => &cluster.pod("toolbox").netns,
        From::External => &cluster.client,
    }
}

/// A cluster with a `toolbox` client pod on node1, a `far` pod on node2 and the dual-stack
/// NodePort Service `far` (ClusterIPs 10.96.0.95 and fd00:96::95, TCP port 80, NodePort 30095)
/// in front of it, which the toolbox pod (ClusterIPs) and the external client (node1's NodePort,
/// masqueraded) reach: checked, the fast path delivers them whatever the node's protections.
/// Returns the cluster and the frontends with their clients.
fn far_cluster() -> (Cluster, [(From, SocketAddr); 3]) {
    let mut cluster = Cluster::start(Path::new(BINARY)).expect("start the cluster");
    cluster.add_pod("far", 1, 30, "far").expect("far pod");
    cluster
        .add_pod("toolbox", 0, 250, "toolbox")
        .expect("toolbox pod");
    cluster
        .manifests
        .write(
            "far.yaml",
            &format!(
                "apiVersion: v1
kind: Service
metadata:
  name: far
  namespace: default
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.95
  clusterIPs: [10.96.0.95, \"fd00:96::95\"]
  selector:
    app: far
  ports:
  - port: 80
    targetPort: {SERVER_PORT}
    nodePort: 30095
    protocol: TCP
"
            ),
        )
        .expect("write the Service");
    cluster.wait_ipv6_ready().expect("IPv6 addresses ready");
    let frontends = [
        (From::Pod, "10.96.0.95:80".parse().unwrap()),
        (From::Pod, "[fd00:96::95]:80".parse().unwrap()),
        (From::External, SocketAddr::new(node_ip(0, false), 30095)),
    ];
    for (from, frontend) in frontends {
        let deadline = Instant::now() + PROGRAMMED_BOUND;
        while let Err(error) = connect(netns(&cluster, from), frontend, None) {
            assert!(
                Instant::now() < deadline,
                "{frontend} answers: {error}; counters:\n{}",
                cluster.stats()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    (cluster, frontends)
}

/// Connects to each of `frontends` from its client with `hops`, with the fast path on and then
/// off (the proxy restarted on the same pins), and checks that each connect fails at once with
/// the errno `expected` gives for the frontend: for the pod, the node's error translated back
/// at egress; for the external client (masqueraded), the program's own answer, counted as
/// `answered` (without the fast path the stack drops masqueraded packets: not tried).
fn each_connect_fails_at_once(
    cluster: &mut Cluster,
    frontends: [(From, SocketAddr); 3],
    hops: Option<u32>,
    answered: &str,
    expected: impl Fn(SocketAddr) -> i32,
) {
    for fast_path in ["on", "off"] {
        if fast_path == "off" {
            cluster.set_proxy_flags(&["--fast-path", "off"]);
            cluster.restart_proxy().expect("restart the proxy");
        }
        for (from, frontend) in frontends {
            if from == From::External && fast_path == "off" {
                continue;
            }
            let case =
                format!("{frontend} from {from:?} with hops {hops:?}, fast path {fast_path}");
            let counted = if from == From::Pod {
                "egress_icmp_errors_translated"
            } else {
                answered
            };
            let counted_before = cluster.counter(counted);
            let started = Instant::now();
            let result = connect(netns(cluster, from), frontend, hops);
            let took = started.elapsed();
            let error = result.expect_err(&case);
            assert_eq!(
                error.raw_os_error(),
                Some(expected(frontend)),
                "{case}: {error} after {took:?}; counters:\n{}",
                cluster.stats()
            );
            assert!(
                cluster.counter(counted) > counted_before,
                "{case}: {counted} counted it; counters:\n{}",
                cluster.stats()
            );
        }
    }
}

#[test]
fn a_connect_whose_ttl_expires_at_the_node_fails_at_once_with_ehostunreach() {
    let (mut cluster, frontends) = far_cluster();
    // The pod's SYN leaves it with TTL / hop limit 1: node1 may not forward it and answers
    // "time exceeded", which the client's TCP takes as EHOSTUNREACH.
    each_connect_fails_at_once(
        &mut cluster,
        frontends,
        Some(1),
        "icmp_time_exceeded_sent",
        |_| libc::EHOSTUNREACH,
    );
}

#[test]
fn a_connect_to_a_backend_with_an_unreachable_route_fails_at_once() {
    let (mut cluster, frontends) = far_cluster();
    let far = cluster.pod("far");
    let (far4, far6) = (far.ip.to_string(), far.ip6.to_string());
    // node1 says the backend cannot be reached: ICMP host unreachable (EHOSTUNREACH), ICMPv6
    // no route (ENETUNREACH).
    cluster.nodes[0]
        .ip(&["route", "add", "unreachable", &format!("{far4}/32")])
        .expect("unreachable route to the backend");
    cluster.nodes[0]
        .ip(&["-6", "route", "add", "unreachable", &format!("{far6}/128")])
        .expect("IPv6 unreachable route to the backend");
    each_connect_fails_at_once(
        &mut cluster,
        frontends,
        None,
        "icmp_unreachable_sent",
        |frontend| {
            if frontend.is_ipv4() {
                libc::EHOSTUNREACH
            } else {
                libc::ENETUNREACH
            }
        },
    );
}
