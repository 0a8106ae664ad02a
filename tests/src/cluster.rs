//! A two-node mini-cluster for tests that drive the real proxy through a manifests folder.
//!
//! Topology (every namespace created here, removed on drop):
//! - `net`: the bridge `br0`, the node network 198.18.0.0/24 and fd00:18::/64.
//! - `node1` at 198.18.0.11 / fd00:18::11, pod CIDRs 198.19.1.0/24 and fd00:19:1::/64, running
//!   `kube-ebpf-proxy run --manifests DIR --hostname-override node1` (socket hooks on the test's
//!   own cgroup); `node2` at .12, pod CIDRs 198.19.2.0/24 and fd00:19:2::/64, runs no proxy:
//!   its pods are the remote endpoints, reached through routes as on a real node network:
//!   over the node link, or through tunnels ([`crate::node_link`]).
//! - pods: each its own namespace behind a veth to its node (ptp-CNI style: the node side holds
//!   the pod CIDR's gateway), serving [`EchoServer`] (TCP, UDP) and [`SctpServer`] on [`SERVER_PORT`].
//! - `client` (203.0.113.10) and `outsider` (203.0.113.200): external clients on the node
//!   link, routing [`EXTERNAL_NET`] (externalIPs, LoadBalancer IPs) through node1.
//!
//! The manifests folder holds the two Node objects from the start; tests write Services, Pods
//! and EndpointSlices as YAML.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::node_link::{NodeLink, Tunnel};
use crate::sctp::SctpServer;
use crate::{Cgroup, EchoServer, LabError, ManifestsDir, Netns, PinDir, Proxy, Result, veth};

pub const NODE_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 11), Ipv4Addr::new(198, 18, 0, 12)];
pub const NODE_IP6S: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x12),
];
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const OUTSIDER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
/// Where tests put externalIPs and LoadBalancer ingress IPs; the clients route it via node1.
pub const EXTERNAL_NET: &str = "198.51.100.0/24";
/// The proxy's `--cluster-cidr` (so pod traffic is told apart by source address).
pub const CLUSTER_CIDRS: &str = "198.19.0.0/16,fd00:19::/32";
/// The proxy's `--service-cluster-ip-range`: ClusterIPs tests write come from here.
pub const SERVICE_CIDRS: &str = "10.96.0.0/16,fd00:96::/112";
/// The port every pod's echo server listens on (TCP and UDP).
pub const SERVER_PORT: u16 = 8080;

/// A pod: its namespace, addresses and echo server (which answers with the pod's name).
pub struct Pod {
    // Stopped before the namespace goes.
    _server: EchoServer,
    _sctp: SctpServer,
    pub netns: Netns,
    pub name: String,
    pub node: usize,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

/// How a pod is published in its manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodState {
    Ready,
    /// `deletionTimestamp` set, still passing its readiness probe: a serving, terminating
    /// endpoint.
    Terminating,
    /// Running but failing its readiness probe: a not-ready, not-serving endpoint.
    NotReady,
}

/// Fields drop in order: the proxy first, then pods, clients and nodes, the pin directory last
/// (removing its pinned links detaches the programs the proxy leaves attached).
pub struct Cluster {
    proxy: Option<Proxy>,
    pods: Vec<Pod>,
    pub client: Netns,
    pub outsider: Netns,
    _tunnel: Tunnel,
    pub nodes: [Netns; 2],
    _net: Netns,
    pub cgroup: Cgroup,
    pub manifests: ManifestsDir,
    pub pin_dir: PinDir,
    binary: PathBuf,
    next_interface: u32,
    /// node1's `nft list ruleset` before the proxy started.
    pub nft_before: String,
    /// Flags the proxy runs with besides the source's and `--cgroup-path`.
    proxy_flags: Vec<String>,
    /// How the nodes reach each other's pods.
    node_link: NodeLink,
    /// The source's `--service-cluster-ip-range` (none: the ServiceCIDR objects alone).
    service_cluster_ip_range: Option<String>,
}

impl Cluster {
    /// Builds the network, writes the Node objects and starts the proxy on node1.
    pub fn start(binary: &Path) -> Result<Self> {
        Self::start_with(binary, &[])
    }

    /// [`Cluster::start`] with the proxy run with `proxy_flags` too (on every start).
    pub fn start_with(binary: &Path, proxy_flags: &[&str]) -> Result<Self> {
        let net = Netns::new("net")?;
        // No multicast snooping: IPv6 neighbour discovery must not depend on MLD timing.
        net.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        net.ip(&["link", "set", "br0", "up"])?;
        let node_link = NodeLink::from_env()?;
        let nodes = [Netns::new("n1")?, Netns::new("n2")?];
        let client = Netns::new("cl")?;
        let outsider = Netns::new("out")?;
        for (i, node) in nodes.iter().enumerate() {
            attach_to_bridge(
                &net,
                &format!("n{}", i + 1),
                node,
                &[
                    &format!("{}/24", NODE_IPS[i]),
                    &format!("{}/64", NODE_IP6S[i]),
                ],
            )?;
            node.ip(&["link", "set", "lo", "up"])?;
            node.sysctl("net.ipv4.ip_forward=1")?;
            node.sysctl("net.ipv6.conf.all.forwarding=1")?;
            node.ip(&["route", "add", "203.0.113.0/24", "dev", "eth0"])?;
        }
        let tunnel = node_link.tunnel(&nodes[0], &nodes[1], NODE_IPS)?;
        for (i, node) in nodes.iter().enumerate() {
            let other = 1 - i;
            let pods = format!("198.19.{}.0/24", other + 1);
            node_link.route(node, &pods, NODE_IPS[other].into())?;
            let pods6 = format!("fd00:19:{}::/64", other + 1);
            node_link.route(node, &pods6, NODE_IP6S[other].into())?;
        }
        for (ns, port, ip) in [(&client, "cl", CLIENT_IP), (&outsider, "out", OUTSIDER_IP)] {
            attach_to_bridge(&net, port, ns, &[&format!("{ip}/24")])?;
            ns.ip(&["route", "add", "198.18.0.0/24", "dev", "eth0"])?;
            ns.ip(&[
                "route",
                "add",
                EXTERNAL_NET,
                "via",
                &NODE_IPS[0].to_string(),
            ])?;
        }
        for node in &nodes {
            crate::host::Protections::apply_from_env(node)?;
        }
        let nft_before = nft_ruleset(&nodes[0])?;
        let manifests = ManifestsDir::new()?;
        manifests.write("nodes.yaml", &nodes_yaml())?;
        let pin_dir = PinDir::new();
        let cgroup = Cgroup::new()?;
        let mut cluster = Self {
            proxy: None,
            pods: Vec::new(),
            client,
            outsider,
            _tunnel: tunnel,
            nodes,
            _net: net,
            cgroup,
            manifests,
            pin_dir,
            binary: binary.to_owned(),
            next_interface: 0,
            nft_before,
            proxy_flags: proxy_flags.iter().map(|f| (*f).to_owned()).collect(),
            node_link,
            service_cluster_ip_range: Some(SERVICE_CIDRS.to_owned()),
        };
        cluster.proxy = Some(cluster.launch_proxy()?);
        Ok(cluster)
    }

    fn launch_proxy(&self) -> Result<Proxy> {
        let mut args = self.source_flags();
        args.push("--cgroup-path".to_owned());
        args.push(self.cgroup.path().to_string_lossy().into_owned());
        args.extend(self.proxy_flags.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proxy::start(&self.binary, &self.nodes[0], &self.pin_dir, &args)
    }

    /// Stops the proxy (SIGTERM) and starts it again on the same pinned maps, as an upgrade or
    /// a crash-restart would; returns the new proxy once it has programmed its first snapshot.
    pub fn restart_proxy(&mut self) -> Result<&mut Proxy> {
        drop(self.proxy.take());
        Ok(self.proxy.insert(self.launch_proxy()?))
    }

    /// Stops the proxy with `signal` (SIGTERM or SIGKILL) and leaves node1 without one.
    pub fn stop_proxy(&mut self, signal: nix::sys::signal::Signal) {
        if let Some(proxy) = self.proxy.take() {
            proxy.stop(signal);
        }
    }

    /// Replaces the flags given to [`Cluster::start_with`] for the next starts.
    pub fn set_proxy_flags(&mut self, proxy_flags: &[&str]) {
        self.proxy_flags = proxy_flags.iter().map(|f| (*f).to_owned()).collect();
    }

    /// The flags given to [`Cluster::start_with`] (or [`Cluster::set_proxy_flags`]).
    pub fn proxy_flags(&self) -> &[String] {
        &self.proxy_flags
    }

    /// Starts the proxy on node1 (after [`Cluster::stop_proxy`]) on the same pins.
    pub fn start_proxy(&mut self) -> Result<&mut Proxy> {
        let proxy = self.launch_proxy()?;
        Ok(self.proxy.insert(proxy))
    }

    /// Replaces the source's `--service-cluster-ip-range` ([`SERVICE_CIDRS`] unless changed;
    /// `None` leaves the flag out) for the next starts.
    pub fn set_service_cluster_ip_range(&mut self, range: Option<&str>) {
        self.service_cluster_ip_range = range.map(str::to_owned);
    }

    /// The source flags the proxy runs with (for `trace` and `plan` against the same folder).
    pub fn source_flags(&self) -> Vec<String> {
        let mut flags: Vec<String> = [
            "--manifests",
            &self.manifests.path().to_string_lossy(),
            "--hostname-override",
            "node1",
            "--cluster-cidr",
            CLUSTER_CIDRS,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(range) = &self.service_cluster_ip_range {
            flags.extend(["--service-cluster-ip-range".to_owned(), range.clone()]);
        }
        flags
    }

    pub fn proxy(&mut self) -> &mut Proxy {
        self.proxy
            .as_mut()
            .expect("the proxy runs but while restarting")
    }

    /// Creates pod `name` (addresses 198.19.NODE.HOST and fd00:19:NODE::HOST) on node
    /// `node` (0 or 1) with its echo and SCTP servers, and writes its Pod object (label `app: APP`). On
    /// node1 it waits until the proxy has attached to the pod's interface.
    pub fn add_pod(&mut self, name: &str, node: usize, host: u8, app: &str) -> Result<&Pod> {
        self.next_interface += 1;
        let host_if = format!("kpod{}", self.next_interface);
        let netns = Netns::new("pod")?;
        let subnet = u8::try_from(node + 1).expect("two nodes");
        let ip = Ipv4Addr::new(198, 19, subnet, host);
        let ip6 = Ipv6Addr::new(0xfd00, 0x19, u16::from(subnet), 0, 0, 0, 0, u16::from(host));
        let gateway = Ipv4Addr::new(198, 19, subnet, 1);
        let gateway6 = Ipv6Addr::new(0xfd00, 0x19, u16::from(subnet), 0, 0, 0, 0, 1);
        let node_ns = &self.nodes[node];
        veth(
            node_ns,
            &host_if,
            &[&format!("{gateway}/32"), &format!("{gateway6}/128")],
            &netns,
            "eth0",
            &[&format!("{ip}/32"), &format!("{ip6}/128")],
        )?;
        if let Some(mtu) = self.node_link.pod_mtu() {
            let mtu = mtu.to_string();
            node_ns.ip(&["link", "set", &host_if, "mtu", &mtu])?;
            netns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
        }
        node_ns.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if])?;
        node_ns.ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", &host_if])?;
        netns.ip(&["link", "set", "lo", "up"])?;
        let gw = gateway.to_string();
        let gw6 = gateway6.to_string();
        netns.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
        netns.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;
        netns.ip(&["-6", "route", "add", &gw6, "dev", "eth0"])?;
        netns.ip(&["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"])?;
        let server = EchoServer::start(&netns, name, SERVER_PORT)?;
        let sctp = SctpServer::start(&netns, name, SERVER_PORT)?;
        if node == 0 {
            self.proxy()
                .wait_for_log(&format!("\"{host_if}\""), Duration::from_secs(5))?;
        }
        self.pods.push(Pod {
            _server: server,
            _sctp: sctp,
            netns,
            name: name.to_owned(),
            node,
            ip,
            ip6,
        });
        self.write_pod(name, app, PodState::Ready)?;
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Waits (bounded) until no IPv6 address of a node or pod is still tentative.
    pub fn wait_ipv6_ready(&self) -> Result<()> {
        for ns in self.nodes.iter().chain(self.pods.iter().map(|p| &p.netns)) {
            ns.wait_ipv6_ready(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// Every pod added so far.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// (Re)writes pod `name`'s manifest (`pod-NAME.yaml`).
    pub fn write_pod(&self, name: &str, app: &str, state: PodState) -> Result<()> {
        let pod = self.pod(name);
        let deletion = match state {
            PodState::Ready | PodState::NotReady => String::new(),
            PodState::Terminating => "\n  deletionTimestamp: \"2026-01-01T00:00:00Z\"".to_owned(),
        };
        let ready = if state == PodState::NotReady {
            "False"
        } else {
            "True"
        };
        let yaml = format!(
            "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels:
    app: {app}{deletion}
spec:
  nodeName: node{node}
  containers:
  - name: server
    image: echo
    ports:
    - containerPort: {SERVER_PORT}
status:
  phase: Running
  podIP: {ip}
  podIPs:
  - ip: {ip}
  - ip: {ip6}
  conditions:
  - type: Ready
    status: \"{ready}\"
",
            node = pod.node + 1,
            ip = pod.ip,
            ip6 = pod.ip6,
        );
        self.manifests.write(&format!("pod-{name}.yaml"), &yaml)
    }

    /// Removes pod `name`'s manifest (the pod's namespace and server keep running, as a pod
    /// that is gone from the API but not yet killed).
    pub fn delete_pod_manifest(&self, name: &str) -> Result<()> {
        self.manifests.remove(&format!("pod-{name}.yaml"))
    }

    /// Runs `kube-ebpf-proxy ARGS…` inside node1 and returns its stdout.
    pub fn proxy_command(&self, args: &[String]) -> Result<String> {
        crate::run(
            self.nodes[0]
                .command(&self.binary)
                .args(args)
                .env("RUST_LOG", "warn")
                .env("RUST_BACKTRACE", "0"),
        )
    }

    /// `kube-ebpf-proxy stats` of the cluster's pins (for a failing test's message), or the
    /// error that kept it from running.
    pub fn stats(&self) -> String {
        let args = [
            "stats",
            "--bpf-pin-path",
            &self.pin_dir.path().to_string_lossy(),
        ];
        self.proxy_command(&args.map(str::to_owned))
            .unwrap_or_else(|e| e.to_string())
    }

    /// The value of the dataplane counter `name` (summed over CPUs, as `stats` prints it); 0
    /// when `stats` does not print it.
    pub fn counter(&self, name: &str) -> u64 {
        self.stats()
            .lines()
            .find_map(|line| match line.split_once(' ') {
                Some((n, value)) if n == name => value.parse().ok(),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// Runs `script` with bash in node1 inside the test's cgroup (where the socket hooks act),
    /// bounded by `timeout 5`.
    pub fn node_shell(&self, script: &str) -> Result<std::process::Output> {
        let script = format!(
            "echo $$ > {}/cgroup.procs && {script}",
            self.cgroup.path().display()
        );
        let mut cmd = self.nodes[0].command("timeout");
        cmd.args(["5", "bash", "-c", &script]);
        cmd.output().map_err(|source| LabError::Spawn {
            command: format!("{cmd:?}"),
            source,
        })
    }
}

/// A cluster with two `web` pods (`a` on node1, `b` on node2) and a `toolbox` client pod on
/// node1 (label `app: toolbox`): where most Service tests start. Returns the pods' addresses.
pub fn start_with_web_pods(binary: &Path) -> Result<(Cluster, [IpAddr; 2], IpAddr)> {
    let mut cluster = Cluster::start(binary)?;
    let a = cluster.add_pod("a", 0, 10, "web")?.ip;
    let b = cluster.add_pod("b", 1, 10, "web")?.ip;
    let toolbox = cluster.add_pod("toolbox", 0, 250, "toolbox")?.ip;
    Ok((cluster, [a.into(), b.into()], toolbox.into()))
}

/// `nft list ruleset` in `ns`.
pub fn nft_ruleset(ns: &Netns) -> Result<String> {
    crate::run(ns.command("nft").args(["list", "ruleset"]))
}

/// The node address of `node` (0 or 1) of `ip`'s family.
pub fn node_ip(node: usize, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(NODE_IP6S[node])
    } else {
        IpAddr::V4(NODE_IPS[node])
    }
}

/// Puts `ns`'s `eth0` on the bridge of `net` (as port `port`) with `addrs`.
fn attach_to_bridge(net: &Netns, port: &str, ns: &Netns, addrs: &[&str]) -> Result<()> {
    veth(net, port, &[], ns, "eth0", addrs)?;
    net.ip(&["link", "set", port, "master", "br0"])?;
    Ok(())
}

fn nodes_yaml() -> String {
    let node = |i: usize| {
        format!(
            "apiVersion: v1
kind: Node
metadata:
  name: node{n}
  labels:
    kubernetes.io/hostname: node{n}
spec:
  podCIDRs:
  - 198.19.{n}.0/24
  - fd00:19:{n}::/64
status:
  addresses:
  - type: InternalIP
    address: {ip}
  - type: InternalIP
    address: {ip6}
  - type: Hostname
    address: node{n}
",
            n = i + 1,
            ip = NODE_IPS[i],
            ip6 = NODE_IP6S[i],
        )
    };
    format!("{}---\n{}", node(0), node(1))
}
