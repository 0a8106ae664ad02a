//! Packets larger than a link's MTU through Services, on the two-node namespace cluster
//! (`proxy_lab::cluster`) with the real `kube-ebpf-proxy run` on node1: a UDP datagram the
//! client's stack fragments reaches a backend on the other node whole (and its fragmented
//! answer comes back whole), and a TCP transfer through a path with a 1,280-byte MTU completes
//! because the program answers the oversized packets with "fragmentation needed" / "packet too
//! big" about what the client sent.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use proxy_lab::cluster::{CLIENT_IP, Cluster, NODE_IP6S, NODE_IPS, node_ip};
use proxy_lab::{Netns, unique_name, veth};

const BINARY: &str = env!("CARGO_BIN_EXE_kube-ebpf-proxy");
/// Where [`BigServer`] listens in the backend pod (TCP and UDP).
const BIG_PORT: u16 = 9000;
/// Larger than every link's MTU: the client's stack sends it in three fragments.
const DATAGRAM_LEN: usize = 4_000;
/// Much more than one window of 1,500-byte segments: the transfer cannot finish without them
/// being sent smaller.
const TRANSFER_LEN: usize = 512 * 1024;
/// How long a programmed Service may take to answer, and one exchange may take.
const ANSWER_BOUND: Duration = Duration::from_secs(10);
const SMALL_MTU: &str = "1280";

/// Serves [`BIG_PORT`] in a pod: every UDP datagram is echoed back whole; a TCP connection is
/// read to its end and answered with the number of bytes read.
struct BigServer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BigServer {
    fn start(ns: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        // Bound inside the pod's namespace: the sockets belong to it from then on.
        let (udp, tcp) = ns
            .enter(move || {
                let udp = UdpSocket::bind(("::", BIG_PORT))?;
                let tcp = TcpListener::bind(("::", BIG_PORT))?;
                udp.set_read_timeout(Some(Duration::from_millis(50)))?;
                tcp.set_nonblocking(true)?;
                Ok::<_, std::io::Error>((udp, tcp))
            })
            .expect("enter the pod")
            .expect("bind the big server");
        let udp_stop = stop.clone();
        let udp_thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !udp_stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], peer);
                }
            }
        });
        let tcp_stop = stop.clone();
        let tcp_thread = std::thread::spawn(move || {
            while !tcp_stop.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = tcp.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(ANSWER_BOUND));
                let mut total = 0usize;
                let mut buf = vec![0u8; 65_536];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    total += n;
                }
                let _ = stream.write_all(format!("{total}\n").as_bytes());
            }
        });
        Self {
            stop,
            threads: vec![udp_thread, tcp_thread],
        }
    }
}

impl Drop for BigServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A datagram of `len` bytes no two tests' datagrams share by accident.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// One UDP exchange of `datagram` from inside `ns`: the answer, or the error.
fn udp_exchange(
    ns: &Netns,
    target: SocketAddr,
    datagram: Vec<u8>,
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    ns.enter(move || {
        let bind: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(target)?;
        socket.send(&datagram)?;
        let mut buf = vec![0u8; 65_536];
        let n = socket.recv(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    })
    .expect("enter the client namespace")
}

/// Sends `len` bytes over one TCP connection from inside `ns` and returns the byte count the
/// server read, every step bounded by `timeout`.
fn tcp_transfer(
    ns: &Netns,
    target: SocketAddr,
    len: usize,
    timeout: Duration,
) -> std::io::Result<usize> {
    ns.enter(move || {
        let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(&pattern(len, 7))?;
        stream.shutdown(Shutdown::Write)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        answer
            .trim()
            .parse()
            .map_err(|e| std::io::Error::other(format!("answer {answer:?}: {e}")))
    })
    .expect("enter the client namespace")
}

/// Retries `exchange` until it succeeds (the Service may still be being programmed) or
/// [`ANSWER_BOUND`] passes; panics with the last error and the counters.
fn eventually<T>(
    cluster: &Cluster,
    what: &str,
    mut exchange: impl FnMut() -> std::io::Result<T>,
) -> T {
    let deadline = Instant::now() + ANSWER_BOUND;
    loop {
        match exchange() {
            Ok(answer) => return answer,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("{what}: {e}; counters:\n{}", cluster.stats()),
        }
    }
}

/// A cluster with a `big` pod on node2 serving [`BigServer`] and a `toolbox` client pod on
/// node1, and a dual-stack Service `big` (ClusterIPs 10.96.0.90 and fd00:96::90, port 90 TCP
/// and UDP, NodePort 30090 for TCP) in front of the big pod.
fn big_cluster() -> (Cluster, BigServer) {
    let mut cluster = Cluster::start(Path::new(BINARY)).expect("start the cluster");
    cluster.add_pod("big", 1, 20, "big").expect("big pod");
    cluster
        .add_pod("toolbox", 0, 250, "toolbox")
        .expect("toolbox pod");
    let server = BigServer::start(&cluster.pod("big").netns);
    cluster
        .manifests
        .write(
            "big.yaml",
            &format!(
                "apiVersion: v1
kind: Service
metadata:
  name: big
  namespace: default
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.90
  clusterIPs: [10.96.0.90, \"fd00:96::90\"]
  selector:
    app: big
  ports:
  - name: tcp
    port: 90
    targetPort: {BIG_PORT}
    nodePort: 30090
    protocol: TCP
  - name: udp
    port: 90
    targetPort: {BIG_PORT}
    protocol: UDP
"
            ),
        )
        .expect("write the Service");
    cluster.wait_ipv6_ready().expect("IPv6 addresses ready");
    (cluster, server)
}

#[test]
fn a_4000_byte_udp_datagram_through_a_cluster_ip_arrives_whole_and_so_does_its_answer() {
    let (cluster, _server) = big_cluster();
    let toolbox = &cluster.pod("toolbox").netns;
    for (seed, vip) in [
        (1u8, "10.96.0.90:90".parse::<SocketAddr>().unwrap()),
        (2, "[fd00:96::90]:90".parse().unwrap()),
    ] {
        // Small datagrams first: the Service is programmed once they are answered.
        eventually(&cluster, &format!("a small datagram to {vip}"), || {
            udp_exchange(toolbox, vip, b"ping".to_vec(), Duration::from_millis(500))
        });
        for round in 0..5 {
            let datagram = pattern(DATAGRAM_LEN, seed + round);
            let answer = udp_exchange(toolbox, vip, datagram.clone(), Duration::from_secs(2))
                .unwrap_or_else(|e| {
                    panic!(
                        "{DATAGRAM_LEN}-byte datagram to {vip}, round {round}: {e}; counters:\n{}",
                        cluster.stats()
                    )
                });
            assert_eq!(answer.len(), DATAGRAM_LEN, "{vip}: the echo's length");
            assert!(answer == datagram, "{vip}: the echo is the datagram sent");
        }
    }
    // Each datagram and each echo is 3 fragments: 2 later ones each way per exchange, all of
    // them translated on node1 (4 exchanges × 2 directions × 2 families at least).
    assert!(
        cluster.counter("fragments_followed") >= 2 * 2 * 5 * 2,
        "later fragments followed their first:\n{}",
        cluster.stats()
    );
}

/// Connects node1 and node2 by a second link of MTU 1,280 and routes the pods of each node to
/// the other's through it (both ways, so strict reverse-path filtering accepts them), as with
/// an overlay or a tunnel between nodes.
fn narrow_link_between_nodes(cluster: &mut Cluster) {
    let (if1, if2) = (unique_name("m"), unique_name("m"));
    veth(
        &cluster.nodes[0],
        &if1,
        &["198.18.1.1/24", "fd00:18:1::1/64"],
        &cluster.nodes[1],
        &if2,
        &["198.18.1.2/24", "fd00:18:1::2/64"],
    )
    .expect("the narrow link");
    for (node, ifname) in [(0, &if1), (1, &if2)] {
        let ns = &cluster.nodes[node];
        ns.ip(&["link", "set", ifname, "mtu", SMALL_MTU])
            .expect("set the MTU");
        let other = 1 - node;
        let (via4, via6) = if node == 0 {
            ("198.18.1.2", "fd00:18:1::2")
        } else {
            ("198.18.1.1", "fd00:18:1::1")
        };
        ns.ip(&[
            "route",
            "replace",
            &format!("198.19.{}.0/24", other + 1),
            "via",
            via4,
        ])
        .expect("pod route over the narrow link");
        ns.ip(&[
            "-6",
            "route",
            "replace",
            &format!("fd00:19:{}::/64", other + 1),
            "via",
            via6,
        ])
        .expect("IPv6 pod route over the narrow link");
    }
    // node2 answers the masqueraded flows (from node1's address) over the same link.
    cluster.nodes[1]
        .ip(&[
            "route",
            "add",
            &format!("{}/32", NODE_IPS[0]),
            "via",
            "198.18.1.1",
        ])
        .expect("route to node1's address");
    cluster.nodes[1]
        .ip(&[
            "-6",
            "route",
            "add",
            &format!("{}/128", NODE_IP6S[0]),
            "via",
            "fd00:18:1::1",
        ])
        .expect("IPv6 route to node1's address");
    // Replies arrive on the new link: the proxy attaches to it before traffic starts.
    cluster
        .proxy()
        .wait_for_log(&format!("\"{if1}\""), Duration::from_secs(5))
        .expect("the proxy attached to the narrow link");
}

#[test]
fn tcp_through_a_node_port_and_a_cluster_ip_completes_over_a_path_with_a_1280_byte_mtu() {
    let (mut cluster, _server) = big_cluster();
    narrow_link_between_nodes(&mut cluster);
    cluster.wait_ipv6_ready().expect("IPv6 addresses ready");
    // An external client through the NodePort (masqueraded: externalTrafficPolicy Cluster):
    // its 1,500-byte segments do not fit the 1,280-byte path to the backend.
    let node_port = SocketAddr::new(node_ip(0, false), 30090);
    let read = eventually(&cluster, "TCP through the NodePort", || {
        tcp_transfer(&cluster.client, node_port, TRANSFER_LEN, ANSWER_BOUND)
    });
    assert_eq!(
        read, TRANSFER_LEN,
        "{node_port} from {CLIENT_IP}: bytes the backend read"
    );
    // A pod through the IPv6 ClusterIP (not masqueraded): "packet too big" the same way.
    let vip6: SocketAddr = "[fd00:96::90]:90".parse().unwrap();
    let toolbox = &cluster.pod("toolbox").netns;
    let read = eventually(&cluster, "TCP through the IPv6 ClusterIP", || {
        tcp_transfer(toolbox, vip6, TRANSFER_LEN, ANSWER_BOUND)
    });
    assert_eq!(read, TRANSFER_LEN, "{vip6}: bytes the backend read");
    assert!(
        cluster.counter("icmp_too_big_sent") >= 2,
        "both clients were told the path's MTU by the program:\n{}",
        cluster.stats()
    );
}
