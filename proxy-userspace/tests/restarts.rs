//! Restarts and upgrades without a gap, with real traffic on the namespace cluster
//! (`proxy_lab::cluster`): the programs stay attached while no proxy runs, a new proxy replaces
//! them in place over the same pinned maps, pins of the older map layout are migrated with their
//! connections, and `cleanup` removes everything.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, Map, MapData};
use aya::programs::{SchedClassifier, TcAttachType};
use nix::sys::signal::Signal;
use proxy_common::{
    CT_STATE_ESTABLISHED, CT_STATE_SYN_RECV, CT_STATE_SYN_SENT, CtKey, CtValue, MAP_LAYOUT_VERSION,
};
use proxy_lab::cluster::{Cluster, NODE_IPS, SERVER_PORT};
use proxy_lab::tcp_counters::TcpCounters;
use proxy_lab::{LineServer, Netns, ask, scaled, timeout_scale};
use proxy_userspace::dataplane::KernelFeatures;
use proxy_userspace::dataplane::migrate::CtValueV1;

const BINARY: &str = env!("CARGO_BIN_EXE_kube-ebpf-proxy");
/// The port of the long-lived connections' servers.
const LINE_PORT: u16 = 9090;
/// `lines`: long-lived connections (ClusterIP from a pod, NodePort from outside).
const LINES_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 70)), 90);
const LINES_NODE_PORT: u16 = 30090;
/// `web`: new TCP connections and UDP requests (ClusterIP from a pod, NodePort from outside).
const WEB_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 71)), 80);
const WEB_NODE_PORT: u16 = 30081;
/// Bound of any one exchange (scaled: how long an exchange takes is the machine's speed; a
/// dropped TCP segment shows in the kernel's retransmission counters, [`TcpCounters`]): beyond
/// it the connection or request counts as failed.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);
/// A UDP request unanswered this long (scaled) is a lost reply: each is sent once, never
/// retransmitted, so a dropped one is never answered however long the wait.
const UDP_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// Restarts under load on a slower machine ([`proxy_lab::timeout_scale`] above 1), instead of
/// the tests' 10 and 4: one of each signal. Under qemu's emulation a proxy start (the verifier
/// over every program) under the load takes minutes.
const SLOW_MACHINE_RESTARTS: usize = 2;
/// Upper bound of each load loop's iterations (they normally stop on the test's signal first).
const MAX_ITERATIONS: u64 = 20_000;
/// How long a change from the manifests may take to reach the kernel.
const UPDATE_BOUND: Duration = Duration::from_secs(5);

fn node_port(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(NODE_IPS[0]), port)
}

fn manifests() -> [(&'static str, String); 2] {
    let service = |name: &str, spec: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: NodePort\n  selector:\n    app: web\n{spec}"
        )
    };
    [
        (
            "lines.yaml",
            service(
                "lines",
                &format!(
                    "  clusterIP: {}\n  ports:\n  - port: {}\n    targetPort: {LINE_PORT}\n    nodePort: {LINES_NODE_PORT}\n",
                    LINES_VIP.ip(),
                    LINES_VIP.port()
                ),
            ),
        ),
        (
            "web.yaml",
            service(
                "web",
                &format!(
                    "  clusterIP: {ip}\n  ports:\n  - name: tcp\n    port: {port}\n    targetPort: {SERVER_PORT}\n    nodePort: {WEB_NODE_PORT}\n  - name: udp\n    port: {port}\n    targetPort: {SERVER_PORT}\n    nodePort: {WEB_NODE_PORT}\n    protocol: UDP\n",
                    ip = WEB_VIP.ip(),
                    port = WEB_VIP.port()
                ),
            ),
        ),
    ]
}

/// Two `web` pods (a on node1, b on node2) serving both the echo server and a line server, a
/// `toolbox` pod on node1, and the two Services, answering.
fn restart_cluster(proxy_flags: &[&str]) -> (Cluster, Vec<LineServer>) {
    let mut cluster = Cluster::start_with(Path::new(BINARY), proxy_flags).expect("the cluster");
    cluster.add_pod("a", 0, 10, "web").expect("pod a");
    cluster.add_pod("b", 1, 10, "web").expect("pod b");
    cluster
        .add_pod("toolbox", 0, 250, "toolbox")
        .expect("toolbox");
    let servers = ["a", "b"]
        .iter()
        .map(|name| LineServer::start(&cluster.pod(name).netns, name, LINE_PORT))
        .collect();
    for (file, yaml) in manifests() {
        cluster
            .manifests
            .write(file, &yaml)
            .expect("write a Service");
    }
    let toolbox = &cluster.pod("toolbox").netns;
    for (ns, target) in [
        (toolbox, LINES_VIP),
        (toolbox, WEB_VIP),
        (&cluster.client, node_port(LINES_NODE_PORT)),
        (&cluster.client, node_port(WEB_NODE_PORT)),
    ] {
        wait_connects(ns, target);
    }
    (cluster, servers)
}

/// Waits (bounded) until a TCP connection from `ns` to `target` succeeds.
fn wait_connects(ns: &Netns, target: SocketAddr) {
    let bound = scaled(UPDATE_BOUND);
    let deadline = Instant::now() + bound;
    loop {
        let connected = ns
            .enter(move || TcpStream::connect_timeout(&target, Duration::from_millis(300)))
            .expect("enter the namespace");
        match connected {
            Ok(_) => return,
            Err(error) => assert!(
                Instant::now() < deadline,
                "{target} from {}: not answering within {bound:?}: {error}",
                ns.name()
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What one load loop saw.
#[derive(Debug, Default)]
struct Tally {
    what: String,
    ok: u64,
    /// Failures (errors, lost replies, broken connections), each described.
    failed: Vec<String>,
}

impl Tally {
    fn new(what: String) -> Self {
        Self {
            what,
            ..Self::default()
        }
    }

    fn exchange(&mut self, result: std::io::Result<()>) {
        match result {
            Ok(()) => self.ok += 1,
            Err(error) => self.failed.push(format!("after {}: {error}", self.ok)),
        }
    }
}

/// Traffic loops running on threads inside the client namespaces until [`Load::finish`].
struct Load {
    stop: Arc<AtomicBool>,
    tallies: mpsc::Receiver<Tally>,
    sender: mpsc::Sender<Tally>,
    loops: usize,
}

impl Load {
    fn new() -> Self {
        let (sender, tallies) = mpsc::channel();
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            tallies,
            sender,
            loops: 0,
        }
    }

    fn spawn(
        &mut self,
        ns: &Netns,
        what: String,
        work: impl FnOnce(&AtomicBool, &mut Tally) + Send + 'static,
    ) {
        let (stop, sender) = (self.stop.clone(), self.sender.clone());
        ns.spawn(move || {
            let mut tally = Tally::new(what);
            work(&stop, &mut tally);
            let _ = sender.send(tally);
        })
        .expect("spawn a load loop");
        self.loops += 1;
    }

    /// Long-lived connections to `target`, each exchanging a line every 20 ms (scaled: the load
    /// must leave a slower machine time to start a proxy).
    fn long_lived(&mut self, ns: &Netns, target: SocketAddr, count: usize) {
        for i in 0..count {
            let what = format!("long-lived {i} {} → {target}", ns.name());
            self.spawn(ns, what, move |stop, tally| long_lived(stop, tally, target));
        }
    }

    /// Stops every loop and returns their tallies.
    fn finish(self) -> Vec<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        (0..self.loops)
            .map(|_| {
                self.tallies
                    .recv_timeout(scaled(EXCHANGE_TIMEOUT) * 3)
                    .expect("a load loop stops within its bounds")
            })
            .collect()
    }
}

fn long_lived(stop: &AtomicBool, tally: &mut Tally, target: SocketAddr) {
    let connect = || -> std::io::Result<BufReader<TcpStream>> {
        let stream = TcpStream::connect_timeout(&target, scaled(EXCHANGE_TIMEOUT))?;
        stream.set_read_timeout(Some(scaled(EXCHANGE_TIMEOUT)))?;
        Ok(BufReader::new(stream))
    };
    let mut stream = match connect() {
        Ok(stream) => stream,
        Err(error) => {
            tally.failed.push(format!("connect: {error}"));
            return;
        }
    };
    let mut first: Option<String> = None;
    for _ in 0..MAX_ITERATIONS {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let result = (|| {
            stream.get_mut().write_all(b"who\n")?;
            let mut line = String::new();
            if stream.read_line(&mut line)? == 0 {
                return Err(std::io::Error::other("closed by the peer"));
            }
            let first = first.get_or_insert_with(|| line.clone());
            if *first != line {
                return Err(std::io::Error::other(format!(
                    "answered by {line:?}, not {first:?}"
                )));
            }
            Ok(())
        })();
        let broken = result.is_err();
        tally.exchange(result);
        if broken {
            return;
        }
        std::thread::sleep(scaled(Duration::from_millis(20)));
    }
}

/// New TCP connections to `target` one after the other, each reading the echo server's answer.
fn new_connections(stop: &AtomicBool, tally: &mut Tally, target: SocketAddr) {
    for _ in 0..MAX_ITERATIONS {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let result = (|| {
            let mut stream = TcpStream::connect_timeout(&target, scaled(EXCHANGE_TIMEOUT))?;
            stream.set_read_timeout(Some(scaled(EXCHANGE_TIMEOUT)))?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            if answer.is_empty() {
                return Err(std::io::Error::other("empty answer"));
            }
            Ok(())
        })();
        tally.exchange(result);
        std::thread::sleep(scaled(Duration::from_millis(10)));
    }
}

/// UDP requests to the `web` ClusterIP, each sent once: alternately on one long-lived socket (a
/// flow that lives across the restarts) and on a fresh socket (a new flow). A request without
/// a reply within [`UDP_REPLY_TIMEOUT`] is a lost reply.
fn udp_requests(stop: &AtomicBool, tally: &mut Tally) {
    let socket = |timeout: Duration| -> std::io::Result<UdpSocket> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(WEB_VIP)?;
        Ok(socket)
    };
    let persistent = match socket(scaled(UDP_REPLY_TIMEOUT)) {
        Ok(socket) => socket,
        Err(error) => {
            tally.failed.push(format!("socket: {error}"));
            return;
        }
    };
    let mut buf = [0u8; 1500];
    for i in 0..MAX_ITERATIONS {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let fresh;
        let socket = if i % 2 == 0 {
            &persistent
        } else {
            match socket(scaled(UDP_REPLY_TIMEOUT)) {
                Ok(socket) => {
                    fresh = socket;
                    &fresh
                }
                Err(error) => {
                    tally.failed.push(format!("socket: {error}"));
                    continue;
                }
            }
        };
        let result = socket.send(b"ping").and_then(|_| socket.recv(&mut buf));
        match result {
            Ok(_) => tally.ok += 1,
            Err(error) => tally.failed.push(format!(
                "request {i} ({}): {error}",
                if i % 2 == 0 { "same flow" } else { "new flow" }
            )),
        }
        std::thread::sleep(scaled(Duration::from_millis(10)));
    }
}

/// Starts the load of the restart tests: long-lived connections pod→ClusterIP (not
/// masqueraded) and external→NodePort (masqueraded), new TCP connections on both, UDP requests.
fn start_load(cluster: &Cluster) -> Load {
    let mut load = Load::new();
    let toolbox = &cluster.pod("toolbox").netns;
    load.long_lived(toolbox, LINES_VIP, 4);
    load.long_lived(&cluster.client, node_port(LINES_NODE_PORT), 4);
    for (ns, target) in [
        (toolbox, WEB_VIP),
        (&cluster.client, node_port(WEB_NODE_PORT)),
    ] {
        let what = format!("new connections {} → {target}", ns.name());
        load.spawn(ns, what, move |stop, tally| {
            new_connections(stop, tally, target);
        });
    }
    load.spawn(toolbox, format!("UDP → {WEB_VIP}"), udp_requests);
    load
}

/// Asserts no loop failed and every loop made progress; returns a summary line.
fn assert_no_failures(tallies: &[Tally]) -> String {
    let failures: Vec<String> = tallies
        .iter()
        .flat_map(|t| t.failed.iter().map(move |f| format!("{}: {f}", t.what)))
        .collect();
    let summary: Vec<String> = tallies
        .iter()
        .map(|t| format!("{}: {} ok", t.what, t.ok))
        .collect();
    assert!(
        failures.is_empty(),
        "failures across the restarts:\n{}\nall loops:\n{}",
        failures.join("\n"),
        summary.join("\n")
    );
    for tally in tallies {
        assert!(tally.ok > 10, "{} made no progress: {tally:?}", tally.what);
    }
    summary.join("\n")
}

/// `count` restarts, or [`SLOW_MACHINE_RESTARTS`] on a slow machine.
fn restarts(count: usize) -> usize {
    if timeout_scale() > 1 {
        SLOW_MACHINE_RESTARTS
    } else {
        count
    }
}

/// Restarts the proxy `count` times under load, alternately stopped with SIGTERM and SIGKILL,
/// each time with a moment where no proxy runs at all.
fn restart_under_load(cluster: &mut Cluster, count: usize) -> String {
    let before = tcp_counters(cluster);
    let load = start_load(cluster);
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..count {
        let signal = if i % 2 == 0 {
            Signal::SIGTERM
        } else {
            Signal::SIGKILL
        };
        cluster.stop_proxy(signal);
        std::thread::sleep(Duration::from_millis(200));
        cluster.start_proxy().expect("the proxy restarts");
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(500));
    let tallies = load.finish();
    let summary = assert_no_failures(&tallies);
    let counted: Vec<String> = tcp_counters(cluster)
        .iter()
        .zip(&before)
        .filter(|((_, after), (_, before))| after.lost_since(before) > 0)
        .map(|((ns, after), (_, before))| format!("{ns}: {before:?} → {after:?}"))
        .collect();
    assert!(
        counted.is_empty(),
        "TCP losses the kernel counted (retransmissions but tail loss probes, and probes that repaired a loss):\n{}\n{summary}\nthe dataplane's counters:\n{}",
        counted.join("\n"),
        cluster.stats()
    );
    summary
}

/// The TCP counters of every namespace with an end of the load's connections: the clients
/// (the toolbox pod, the external client) and the servers (the `web` pods).
fn tcp_counters(cluster: &Cluster) -> Vec<(String, TcpCounters)> {
    ["toolbox", "a", "b"]
        .iter()
        .map(|name| &cluster.pod(name).netns)
        .chain([&cluster.client])
        .map(|ns| {
            let counters = TcpCounters::read(ns).expect("read the namespace's TCP counters");
            (ns.name().to_owned(), counters)
        })
        .collect()
}

/// The proxy's programs on `interface`, ingress and egress together: (TCX programs, clsact
/// filters).
fn tc_programs(cluster: &Cluster, interface: &str) -> (usize, usize) {
    let mut counts = (0, 0);
    for (hook, direction) in [
        (TcAttachType::Ingress, "ingress"),
        (TcAttachType::Egress, "egress"),
    ] {
        let name = interface.to_owned();
        counts.0 += cluster.nodes[0]
            .enter(move || SchedClassifier::query_tcx(&name, hook))
            .expect("enter node1")
            .map_or(0, |(_, programs)| programs.len());
        let filters = proxy_lab::run(
            cluster.nodes[0]
                .command("tc")
                .args(["filter", "show", "dev", interface, direction]),
        )
        .unwrap_or_default();
        counts.1 += filters
            .lines()
            .filter(|l| l.contains("tc_ingress") || l.contains("tc_egress"))
            .count();
    }
    counts
}

fn node1_interfaces(cluster: &Cluster) -> Vec<String> {
    cluster.nodes[0]
        .enter(proxy_userspace::dataplane::tc_interfaces)
        .expect("enter node1")
        .expect("list node1's interfaces")
}

fn pinned_links(cluster: &Cluster) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cluster.pin_dir.path().join("links"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn restarts_under_load_break_no_connection_and_lose_no_reply() {
    let (mut cluster, _servers) = restart_cluster(&[]);
    let summary = restart_under_load(&mut cluster, restarts(10));
    eprintln!("{summary}");
    // Replaced in place: one program per hook and interface after ten starts, each held by its
    // pinned link (TCX), or one clsact filter per hook where the kernel has no TCX (`--tc-attach auto`'s fallback).
    let tcx = KernelFeatures::get().tcx;
    for interface in node1_interfaces(&cluster) {
        assert_eq!(
            tc_programs(&cluster, &interface),
            if tcx { (2, 0) } else { (0, 2) },
            "{interface}: one TCX program per hook (kernel has TCX: {tcx}), else one clsact filter per hook"
        );
        assert_eq!(
            pinned_links(&cluster).contains(&format!("tc-ingress-{interface}")),
            tcx,
            "{interface}'s link is pinned where TCX links exist: {:?}",
            pinned_links(&cluster)
        );
    }
}

#[test]
fn restarts_in_netlink_mode_break_no_connection_and_lose_no_reply() {
    let (mut cluster, _servers) = restart_cluster(&["--tc-attach", "netlink"]);
    let summary = restart_under_load(&mut cluster, restarts(4));
    eprintln!("{summary}");
    for interface in node1_interfaces(&cluster) {
        assert_eq!(
            tc_programs(&cluster, &interface),
            (0, 2),
            "{interface}: our clsact filters, replaced in place (not added again)"
        );
    }
    assert!(
        pinned_links(&cluster)
            .iter()
            .all(|l| l.starts_with("cgroup-")),
        "netlink mode pins only the cgroup links: {:?}",
        pinned_links(&cluster)
    );
}

/// Raw `bpf(2)` for what aya does not offer here: an LRU hash map of arbitrary value size (a
/// layout-1 conntrack map), pinned.
fn create_pinned_lru_map(path: &Path, key_size: u32, value_size: u32, max_entries: u32) {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        rest: [u8; 108],
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        rest: [u8; 112],
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    let create = MapCreate {
        map_type: BPF_MAP_TYPE_LRU_HASH,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
        rest: [0; 108],
    };
    // SAFETY: bpf(2) reads `size` bytes of a zero-padded, repr(C) bpf_attr prefix.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &raw const create,
            size_of::<MapCreate>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let fd = i32::try_from(fd).expect("a descriptor");
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("a path");
    let pin = ObjPin {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd.cast_unsigned(),
        file_flags: 0,
        rest: [0; 112],
    };
    // SAFETY: as above; `c_path` outlives the call.
    let pinned = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &raw const pin,
            size_of::<ObjPin>(),
        )
    };
    let error = std::io::Error::last_os_error();
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    assert!(pinned == 0, "BPF_OBJ_PIN {}: {error}", path.display());
}

/// Today's conntrack value in layout 1 (the reverse of the loader's migration).
fn to_layout1(value: &CtValue) -> CtValueV1 {
    CtValueV1 {
        nat_dst: value.nat_dst,
        nat_src: value.nat_src,
        nat_dport: value.nat_dport,
        nat_sport: value.nat_sport,
        backend_id: value.backend_id,
        service_id: value.service_id,
        state: match value.state {
            CT_STATE_SYN_SENT | CT_STATE_SYN_RECV => 0,
            CT_STATE_ESTABLISHED => 1,
            _ => 2,
        },
        flags: value.flags & 0b111,
        pad: [0; 2],
        last_seen_ns: value.last_seen_ns,
    }
}

/// Rewrites node1's pins into layout 1, as a proxy of the first release left them: the maps of
/// today's layout that layout 1 did not have, or had in another layout, are moved aside (the
/// programs still attached keep using them), a layout-1 conntrack map holds the flows, and the
/// others
/// (same layout in both) stay.
fn rewrite_pins_as_layout1(pins: &Path) -> usize {
    let aside = pins.join("test-layout2-aside");
    std::fs::create_dir(&aside).expect("create the aside directory");
    for name in [
        proxy_common::CONNTRACK_MAP,
        proxy_common::LAYOUT_MAP,
        proxy_common::AFFINITY_BACKENDS_MAP,
    ] {
        std::fs::rename(pins.join(name), aside.join(name)).expect("move a pin aside");
    }
    let current: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(
        MapData::from_pin(aside.join(proxy_common::CONNTRACK_MAP)).expect("open conntrack"),
    ))
    .expect("today's conntrack layout");
    let layout1_path = pins.join(proxy_common::CONNTRACK_MAP);
    create_pinned_lru_map(
        &layout1_path,
        u32::try_from(size_of::<CtKey>()).expect("small"),
        u32::try_from(size_of::<CtValueV1>()).expect("small"),
        65_536,
    );
    let mut layout1: HashMap<MapData, CtKey, CtValueV1> = HashMap::try_from(Map::LruHashMap(
        MapData::from_pin(&layout1_path).expect("open the layout-1 conntrack map"),
    ))
    .expect("layout-1 conntrack layout");
    let mut flows = 0;
    for entry in &current {
        let (key, value) = entry.expect("read a flow");
        layout1
            .insert(key, to_layout1(&value), 0)
            .expect("write a layout-1 flow");
        flows += 1;
    }
    flows
}

/// Opens a long-lived connection from `ns` to `target` and checks it answers.
fn open_lines(ns: &Netns, target: SocketAddr) -> BufReader<TcpStream> {
    let mut stream = ns
        .enter(move || -> std::io::Result<BufReader<TcpStream>> {
            let stream = TcpStream::connect_timeout(&target, EXCHANGE_TIMEOUT)?;
            stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
            Ok(BufReader::new(stream))
        })
        .expect("enter the namespace")
        .unwrap_or_else(|e| panic!("connect to {target} from {}: {e}", ns.name()));
    ask(&mut stream);
    stream
}

#[test]
fn a_proxy_started_over_layout_1_pins_migrates_them_and_keeps_established_flows() {
    let (mut cluster, _servers) = restart_cluster(&[]);
    let toolbox = &cluster.pod("toolbox").netns;
    let mut streams: Vec<(String, BufReader<TcpStream>)> = (0..3)
        .flat_map(|_| {
            [
                open_lines(toolbox, LINES_VIP),
                open_lines(&cluster.client, node_port(LINES_NODE_PORT)),
            ]
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|mut s| (ask(&mut s), s))
        .collect();
    // A crash; the pinned links keep the programs (and the connections) running.
    cluster.stop_proxy(Signal::SIGKILL);
    let flows = rewrite_pins_as_layout1(cluster.pin_dir.path());
    assert!(
        flows >= 12,
        "the connections' flows were converted: {flows}"
    );
    for (pod, stream) in &mut streams {
        assert_eq!(ask(stream), *pod, "served by the old programs meanwhile");
    }
    cluster
        .start_proxy()
        .expect("the proxy starts over layout-1 pins");
    cluster
        .proxy()
        .wait_for_log("map layout migration finished", Duration::from_secs(5))
        .expect("the migration finishes");
    let pins = cluster.pin_dir.path();
    assert!(
        !pins.join("old-v1").exists(),
        "the old pins are removed after the switch"
    );
    let layout: aya::maps::Array<MapData, u32> = aya::maps::Array::try_from(Map::Array(
        MapData::from_pin(pins.join(proxy_common::LAYOUT_MAP)).expect("the LAYOUT pin"),
    ))
    .expect("LAYOUT is an array of u32");
    assert_eq!(layout.get(&0, 0).expect("read LAYOUT"), MAP_LAYOUT_VERSION);
    // Data both ways on every connection, now through the new programs and the migrated flows
    // (replies of masqueraded flows need their migrated reply entries).
    for _ in 0..5 {
        for (pod, stream) in &mut streams {
            assert_eq!(ask(stream), *pod, "the connection outlives the migration");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_connects(&cluster.pod("toolbox").netns, WEB_VIP);
    wait_connects(&cluster.client, node_port(WEB_NODE_PORT));
}

/// A host-originated connection from node1 (inside the test's cgroup) to the `web` ClusterIP:
/// whether it was answered.
fn host_reaches_cluster_ip(cluster: &Cluster) -> bool {
    let output = cluster
        .node_shell(&format!(
            "exec 3<>/dev/tcp/{}/{} && timeout 1 head -1 <&3",
            WEB_VIP.ip(),
            WEB_VIP.port()
        ))
        .expect("run a shell in node1");
    output.status.success() && !output.stdout.is_empty()
}

#[test]
fn programs_stay_attached_without_a_proxy_pins_follow_interfaces_and_cleanup_removes_everything() {
    let (mut cluster, _servers) = restart_cluster(&["--tc-attach", "netlink"]);
    let interfaces = node1_interfaces(&cluster);
    cluster.stop_proxy(Signal::SIGTERM);
    // No proxy runs: its filters and cgroup links still serve.
    for interface in &interfaces {
        assert_eq!(tc_programs(&cluster, interface), (0, 2), "{interface}");
    }
    wait_connects(&cluster.pod("toolbox").netns, WEB_VIP);
    assert!(
        host_reaches_cluster_ip(&cluster),
        "the socket hooks stay attached"
    );
    // Switching to TCX on the same pins replaces each filter with a pinned TCX link; a kernel
    // without TCX links (before 6.6) makes the proxy refuse the mode, naming the feature.
    cluster.set_proxy_flags(&["--tc-attach", "tcx"]);
    if KernelFeatures::get().tcx {
        tcx_links_replace_filters_and_follow_interfaces(&mut cluster, &interfaces);
    } else {
        let refusal = cluster
            .start_proxy()
            .err()
            .expect("the proxy refuses --tc-attach tcx on a kernel without TCX");
        assert!(
            refusal
                .to_string()
                .contains("--tc-attach tcx: this kernel has no TCX links (probed)"),
            "{refusal}"
        );
    }
    cluster.stop_proxy(Signal::SIGKILL);
    assert!(!pinned_links(&cluster).is_empty());
    let out = cluster
        .proxy_command(&[
            "cleanup".to_owned(),
            "--bpf-pin-path".to_owned(),
            cluster.pin_dir.path().to_string_lossy().into_owned(),
        ])
        .expect("kube-ebpf-proxy cleanup");
    assert!(out.is_empty(), "cleanup prints nothing on stdout: {out}");
    assert!(
        !cluster.pin_dir.path().exists(),
        "no pin left under {}",
        cluster.pin_dir.path().display()
    );
    // A link goes with its last reference, released by the kernel a moment later.
    let deadline = Instant::now() + scaled(Duration::from_secs(2));
    for interface in &interfaces {
        while tc_programs(&cluster, interface) != (0, 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            tc_programs(&cluster, interface),
            (0, 0),
            "{interface}: no TCX program, no filter"
        );
    }
    while host_reaches_cluster_ip(&cluster) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !host_reaches_cluster_ip(&cluster),
        "the socket hooks are detached"
    );
    let refused = cluster
        .pod("toolbox")
        .netns
        .enter(|| TcpStream::connect_timeout(&WEB_VIP, Duration::from_millis(500)))
        .expect("enter the toolbox");
    assert!(refused.is_err(), "the ClusterIP is not translated any more");
}

/// The proxy started with `--tc-attach tcx` over netlink-mode pins replaces each clsact filter
/// with a pinned TCX link, pins the links of interfaces that appear, and the next start unpins
/// those of interfaces that went away while no proxy ran. Leaves no proxy running.
fn tcx_links_replace_filters_and_follow_interfaces(cluster: &mut Cluster, interfaces: &[String]) {
    cluster.start_proxy().expect("the proxy starts in TCX mode");
    for interface in interfaces {
        assert_eq!(tc_programs(cluster, interface), (2, 0), "{interface}");
    }
    // An interface that goes away while no proxy runs: the next proxy removes its pins.
    cluster.nodes[0]
        .ip(&["link", "add", "kx0", "type", "veth", "peer", "name", "kx1"])
        .expect("add a veth pair to node1");
    cluster.nodes[0]
        .ip(&["link", "set", "kx0", "up"])
        .expect("set kx0 up");
    let extra = [
        "tc-ingress-kx0",
        "tc-ingress-kx1",
        "tc-egress-kx0",
        "tc-egress-kx1",
    ]
    .map(str::to_owned);
    let deadline = Instant::now() + scaled(UPDATE_BOUND);
    while !extra.iter().all(|l| pinned_links(cluster).contains(l)) {
        assert!(
            Instant::now() < deadline,
            "the new interfaces' links are pinned: {:?}",
            pinned_links(cluster)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.stop_proxy(Signal::SIGKILL);
    cluster.nodes[0]
        .ip(&["link", "del", "kx0"])
        .expect("delete the veth pair");
    cluster.start_proxy().expect("the proxy starts again");
    assert!(
        !extra.iter().any(|l| pinned_links(cluster).contains(l)),
        "the links of interfaces that went away are unpinned: {:?}",
        pinned_links(cluster)
    );
    cluster.stop_proxy(Signal::SIGKILL);
}
