//! SNAT under load: many more short masqueraded connections through one NodePort to one
//! backend than the SNAT range has ports, through the real `kube-ebpf-proxy run` on a real
//! manifests folder. Ports of closed flows must be free again at once.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use proxy_lab::load::{Load, run_load};
use proxy_lab::{
    ManifestsDir, Netns, PinDir, Proxy, run, scaled, timeout_scale, unique_name, veth,
};

const BINARY: &str = env!("CARGO_BIN_EXE_kube-ebpf-proxy");
/// Eleven times the default SNAT range (61000-65535: 4,536 ports).
const CONNECTIONS: usize = 50_000;
/// On a slower machine ([`proxy_lab::timeout_scale`] above 1: qemu's emulation does about a
/// hundred connections a second): three times the SNAT range, still past the ~11k connections
/// after which NodePorts once stopped answering, so ports of closed flows must be reused.
const SLOW_MACHINE_CONNECTIONS: usize = 13_608;
const CLIENT_THREADS: usize = 4;
/// The whole run's bound (scaled); a healthy run takes a fraction of it.
const BOUND: Duration = Duration::from_secs(150);
const NODE_PORT: u16 = 30080;

const MANIFESTS: &str = "apiVersion: v1
kind: Node
metadata:
  name: node
status:
  addresses:
  - type: InternalIP
    address: 10.0.0.1
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: 8080
    nodePort: 30080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: [10.1.0.2]
  conditions:
    ready: true
";

/// The backend: answers each connection with the client address it saw, then waits for the
/// client to close first (the backend keeps no TIME_WAIT, as with most request/response
/// protocols whose clients hang up). Four threads; stopped and joined on drop.
struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Netns, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let listener_thread = {
            let stop = stop.clone();
            ns.spawn(move || {
                let listener = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
                listener.set_nonblocking(true).unwrap();
                let workers: Vec<_> = (0..4)
                    .map(|_| {
                        let (listener, stop) = (listener.try_clone().unwrap(), stop.clone());
                        std::thread::spawn(move || serve(&listener, &stop))
                    })
                    .collect();
                ready_tx.send(()).unwrap();
                for worker in workers {
                    let _ = worker.join();
                }
            })
            .unwrap()
        };
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Self {
            stop,
            threads: vec![listener_thread],
        }
    }
}

fn serve(listener: &std::net::TcpListener, stop: &AtomicBool) {
    use std::io::{Read as _, Write as _};
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
                let _ = stream.write_all(format!("pod0 {}\n", peer.ip()).as_bytes());
                // Until the client's FIN.
                let _ = stream.read(&mut [0u8; 64]);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Fields drop in order: proxy, server, namespaces, pins, manifests.
struct Lab {
    _proxy: Proxy,
    _server: Server,
    client: Netns,
    _pod: Netns,
    node: Netns,
    pins: PinDir,
    _manifests: ManifestsDir,
}

impl Lab {
    fn new() -> Self {
        let node = Netns::new("sn").unwrap();
        let client = Netns::new("sc").unwrap();
        let pod = Netns::new("sp").unwrap();
        veth(
            &node,
            &unique_name("a"),
            &["10.0.0.1/24"],
            &client,
            &unique_name("b"),
            &["10.0.0.2/24"],
        )
        .unwrap();
        veth(
            &node,
            &unique_name("a"),
            &["10.1.0.1/24"],
            &pod,
            &unique_name("b"),
            &["10.1.0.2/24"],
        )
        .unwrap();
        client
            .ip(&["route", "add", "default", "via", "10.0.0.1"])
            .unwrap();
        pod.ip(&["route", "add", "default", "via", "10.1.0.1"])
            .unwrap();
        for setting in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            // Ephemeral ports over both the NodePort and the SNAT range: the proxy must keep
            // the node's own sockets off them.
            "net.ipv4.ip_local_port_range=20000 65535",
        ] {
            node.sysctl(setting).unwrap();
        }
        // The client's own ports are not what this test measures: give it all of them.
        client
            .sysctl("net.ipv4.ip_local_port_range=1024 65535")
            .unwrap();
        let server = Server::start(&pod, 8080);
        let manifests = ManifestsDir::new().unwrap();
        manifests.write("web.yaml", MANIFESTS).unwrap();
        let pins = PinDir::new();
        let mut proxy = Proxy::start(
            Path::new(BINARY),
            &node,
            &pins,
            &[
                "--manifests",
                manifests.path().to_str().unwrap(),
                "--hostname-override",
                "node",
                "--conntrack-max",
                "65536",
            ],
        )
        .unwrap();
        proxy
            .wait_for_log("initial sync programmed", Duration::from_secs(20))
            .unwrap();
        Self {
            _proxy: proxy,
            _server: server,
            client,
            _pod: pod,
            node,
            pins,
            _manifests: manifests,
        }
    }

    fn stats(&self) -> String {
        run(Command::new(BINARY)
            .args(["stats", "--bpf-pin-path"])
            .arg(self.pins.path()))
        .unwrap_or_else(|e| e.to_string())
    }
}

/// 50,000 connections (13,608 on a slow machine) through 4,536 SNAT ports.
#[test]
fn masqueraded_connections_many_times_the_snat_ports_through_one_node_port_all_succeed() {
    let lab = Lab::new();
    let reserved = run(lab
        .node
        .command("sysctl")
        .args(["-n", "net.ipv4.ip_local_reserved_ports"]))
    .unwrap();
    assert_eq!(
        reserved.trim(),
        "30000-32767,61000-65535",
        "the NodePort and SNAT ranges are reserved from the node's ephemeral ports"
    );
    let connections = if timeout_scale() > 1 {
        SLOW_MACHINE_CONNECTIONS
    } else {
        CONNECTIONS
    };
    let bound = scaled(BOUND);
    // Each connection reads the server's line and closes first (a normal FIN close).
    let load = Load {
        target: ([10, 0, 0, 1], NODE_PORT).into(),
        count: connections,
        parallel: CLIENT_THREADS,
        bound,
        timeout: Duration::from_secs(3),
        request: Vec::new(),
    };
    let report = run_load(&load, |work| lab.client.spawn(work)).unwrap();
    let stats = lab.stats();
    eprintln!(
        "{} connections in {:?} ({:.0}/s), {} failed\n{stats}",
        report.done,
        report.elapsed,
        report.rate(),
        report.failures.len()
    );
    assert!(
        report.failures.is_empty(),
        "{} of {} connections failed, first: {:?}\n{stats}",
        report.failures.len(),
        report.done,
        &report.failures[..report.failures.len().min(5)]
    );
    assert_eq!(
        report.done, connections,
        "not all connections ran within {bound:?}"
    );
    assert_eq!(
        report.answers,
        vec![("pod0 10.0.0.1".to_owned(), connections)],
        "every answer from the backend, masqueraded to the node address"
    );
    let counter = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(name))
                    .then(|| words.next().and_then(|v| v.parse().ok()))
                    .flatten()
            })
            .unwrap_or_else(|| panic!("no {name} in stats:\n{stats}"))
    };
    assert_eq!(counter("snat_exhausted"), 0);
    assert!(
        counter("snat_ports_reused") > 0,
        "more connections than ports: closed flows' ports must have been reused"
    );
}
