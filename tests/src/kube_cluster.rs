//! A mini-cluster on a real control plane: etcd, kube-apiserver and kube-controller-manager in
//! their own namespace, nodes running the real proxy against the API server with the identity
//! of `manifests/kube-ebpf-proxy.yaml` (its ServiceAccount and ClusterRole, a TokenRequest
//! token), and the lab's [`Kubelet`] running the Pods the controllers create.
//!
//! Topology (every namespace created here, removed on drop):
//! - `net`: the bridge `br0` of the node network 198.18.0.0/24.
//! - `cp` at [`CONTROL_PLANE_IP`]: the API server on :6443, etcd and the controller manager on
//!   the namespace's loopback.
//! - node i at 198.18.0.1i, pod CIDR 198.19.i.0/24, routes to the other nodes' pod CIDRs,
//!   running `kube-ebpf-proxy run --kubeconfig …` (socket hooks on its own cgroup).
//! - `toolbox`: a pod namespace on the first node that takes pods, at 198.19.N.250, that no
//!   Service selects, to call Services from; `client`: an external client at 203.0.113.10 on
//!   the node link.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::control_plane::{Binaries, ControlPlane, SERVICE_CIDR};
use crate::kubelet::{Kubelet, KubeletNode, PodServer, connect_pod};
use crate::{Cgroup, LabError, Netns, PinDir, Proxy, Result, veth};

pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const CLUSTER_CIDR: &str = "198.19.0.0/16";

/// The manifest whose ServiceAccount and ClusterRole the proxies run with.
pub fn proxy_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/kube-ebpf-proxy.yaml")
}

/// Node `index` (0-based): its name and address.
pub fn node_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 11 + u8::try_from(index).expect("a few nodes"))
}

/// How a [`KubeCluster`] is built.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// Node 1 is the control-plane node: tainted, the kubelet binds no pods to it (as in kind).
    pub control_plane_node: bool,
    pub pod_server: PodServer,
}

impl ClusterOptions {
    /// `nodes` nodes that all take pods, which run in-process echo servers.
    pub fn nodes(nodes: usize) -> Self {
        Self {
            nodes,
            control_plane_node: false,
            pod_server: PodServer::Echo,
        }
    }
}

/// Fields drop in order: proxies first, then the kubelet's pods, the clients, the control
/// plane, the nodes and the network.
pub struct KubeCluster {
    proxies: Vec<Option<Proxy>>,
    pub kubelet: Kubelet,
    pub toolbox: Netns,
    pub client: Netns,
    pub control_plane: ControlPlane,
    pub nodes: Vec<Netns>,
    _control_plane_netns: Netns,
    _net: Netns,
    cgroups: Vec<Cgroup>,
    pin_dirs: Vec<PinDir>,
    proxy_binary: PathBuf,
    /// The proxies' kubeconfig (the manifest's ServiceAccount).
    pub proxy_kubeconfig: PathBuf,
}

impl KubeCluster {
    /// Builds the network and the control plane, registers `nodes` Node objects, applies the
    /// proxy's manifest, and starts the kubelet and a proxy on every node.
    pub fn start(proxy_binary: &Path, options: ClusterOptions) -> Result<Self> {
        let nodes = options.nodes;
        let binaries = Binaries::cached()?;
        let net = Netns::new("net")?;
        net.ip(&["link", "add", "br0", "type", "bridge"])?;
        net.ip(&["link", "set", "br0", "up"])?;
        let control_plane_netns = Netns::new("cp")?;
        attach_to_bridge(
            &net,
            "cp",
            &control_plane_netns,
            &format!("{CONTROL_PLANE_IP}/24"),
        )?;
        let node_netns = (0..nodes)
            .map(|i| Netns::new(&format!("n{}", i + 1)))
            .collect::<Result<Vec<_>>>()?;
        for (i, node) in node_netns.iter().enumerate() {
            attach_to_bridge(
                &net,
                &format!("n{}", i + 1),
                node,
                &format!("{}/24", node_ip(i)),
            )?;
            node.sysctl("net.ipv4.ip_forward=1")?;
            node.ip(&["route", "add", "203.0.113.0/24", "dev", "eth0"])?;
            for other in (0..nodes).filter(|&o| o != i) {
                node.ip(&[
                    "route",
                    "add",
                    &format!("198.19.{}.0/24", other + 1),
                    "via",
                    &node_ip(other).to_string(),
                ])?;
            }
        }
        let client = Netns::new("cl")?;
        attach_to_bridge(&net, "cl", &client, &format!("{CLIENT_IP}/24"))?;
        client.ip(&["route", "add", "198.18.0.0/24", "dev", "eth0"])?;
        let toolbox = Netns::new("tb")?;
        let toolbox_node = usize::from(options.control_plane_node && nodes > 1);
        let subnet = u8::try_from(toolbox_node + 1).expect("a few nodes");
        connect_pod(
            node_netns[toolbox_node].name(),
            subnet,
            "ktoolbox",
            &toolbox,
            Ipv4Addr::new(198, 19, subnet, 250),
        )?;

        let control_plane =
            ControlPlane::start(&binaries, control_plane_netns.name(), CONTROL_PLANE_IP)?;
        let kubelet_nodes: Vec<KubeletNode> = node_netns
            .iter()
            .enumerate()
            .map(|(i, ns)| KubeletNode {
                name: format!("node{}", i + 1),
                netns: ns.name().to_owned(),
                ip: node_ip(i),
                subnet: u8::try_from(i + 1).expect("a few nodes"),
                schedulable: i > 0 || !options.control_plane_node,
            })
            .collect();
        register_nodes(&control_plane, &kubelet_nodes)?;
        let manifest = proxy_manifest();
        control_plane.kubectl(&["apply", "-f", &manifest.to_string_lossy()])?;
        let proxy_kubeconfig =
            control_plane.service_account_kubeconfig("kube-system", "kube-ebpf-proxy")?;
        let kubelet = Kubelet::start(
            control_plane.runtime(),
            control_plane.client(),
            kubelet_nodes,
            options.pod_server,
        );
        let mut cluster = Self {
            proxies: Vec::new(),
            kubelet,
            toolbox,
            client,
            control_plane,
            nodes: node_netns,
            _control_plane_netns: control_plane_netns,
            _net: net,
            cgroups: Vec::new(),
            pin_dirs: Vec::new(),
            proxy_binary: proxy_binary.to_owned(),
            proxy_kubeconfig,
        };
        for i in 0..nodes {
            cluster.cgroups.push(Cgroup::new()?);
            cluster.pin_dirs.push(PinDir::new());
            let proxy = cluster.launch_proxy(i)?;
            cluster.proxies.push(Some(proxy));
        }
        Ok(cluster)
    }

    fn launch_proxy(&self, node: usize) -> Result<Proxy> {
        let args = self.proxy_args(node, &self.proxy_kubeconfig);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proxy::start(
            &self.proxy_binary,
            &self.nodes[node],
            &self.pin_dirs[node],
            &args,
        )
    }

    /// The flags node `node`'s proxy runs with (besides `--bpf-pin-path`), with `kubeconfig`.
    pub fn proxy_args(&self, node: usize, kubeconfig: &Path) -> Vec<String> {
        vec![
            "--kubeconfig".to_owned(),
            kubeconfig.to_string_lossy().into_owned(),
            "--hostname-override".to_owned(),
            format!("node{}", node + 1),
            "--cluster-cidr".to_owned(),
            CLUSTER_CIDR.to_owned(),
            "--service-cluster-ip-range".to_owned(),
            SERVICE_CIDR.to_owned(),
            "--cgroup-path".to_owned(),
            self.cgroups[node].path().to_string_lossy().into_owned(),
        ]
    }

    /// The cgroup node `node`'s proxy attaches its socket hooks to.
    pub fn proxy_cgroup(&self, node: usize) -> &Path {
        self.cgroups[node].path()
    }

    /// Stops node `node`'s proxy with `signal`; its programs stay attached and pinned.
    pub fn stop_proxy(&mut self, node: usize, signal: nix::sys::signal::Signal) {
        if let Some(proxy) = self.proxies[node].take() {
            proxy.stop(signal);
        }
    }

    /// Where node `node`'s proxy pins its maps and links.
    pub fn pin_path(&self, node: usize) -> &Path {
        self.pin_dirs[node].path()
    }

    pub fn proxy(&mut self, node: usize) -> &mut Proxy {
        self.proxies[node].as_mut().expect("the proxy runs")
    }

    /// `kubectl ARGS…` with the admin identity.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.control_plane.kubectl(args)
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        use std::io::Write as _;
        let mut cmd = self.control_plane.kubectl_command();
        cmd.args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: format!("{cmd:?}"),
            source,
        })?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(yaml.as_bytes())
            .map_err(|source| LabError::Spawn {
                command: format!("{cmd:?}"),
                source,
            })?;
        let out = child.wait_with_output().map_err(|source| LabError::Spawn {
            command: format!("{cmd:?}"),
            source,
        })?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: format!("kubectl apply of:\n{yaml}"),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Service `default/name` as the API server has it.
    pub fn service(&self, name: &str) -> Result<Service> {
        let api = Api::<Service>::namespaced(self.control_plane.client(), "default");
        let owned = name.to_owned();
        self.control_plane
            .block_on(async move { api.get(&owned).await })
            .map_err(|e| LabError::Proxy(format!("getting Service default/{name}: {e}")))
    }

    /// The first ClusterIP of Service `default/name`.
    pub fn cluster_ip(&self, name: &str) -> Result<Ipv4Addr> {
        let service = self.service(name)?;
        service
            .spec
            .and_then(|s| s.cluster_ip)
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| LabError::Proxy(format!("Service default/{name} has no IPv4 ClusterIP")))
    }

    /// Calls `target` from `from` `tries` times (TCP, a fresh connection each) and returns the
    /// answering pods' names, sorted and deduplicated, and the failures' errors.
    pub fn answering_pods(
        from: &Netns,
        target: std::net::SocketAddr,
        tries: usize,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let mut pods = Vec::new();
        let mut errors = Vec::new();
        for _ in 0..tries {
            match crate::tcp_request(from, target, Duration::from_secs(2))? {
                Ok(answer) => pods.push(
                    answer
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                ),
                Err(error) => errors.push(error.to_string()),
            }
        }
        pods.sort();
        pods.dedup();
        Ok((pods, errors))
    }

    /// Waits (bounded by `timeout`) until `tries` calls from `from` to `target` all succeed and
    /// are answered by exactly the pods `expect` says (a predicate over the sorted names).
    pub fn wait_for_answers(
        &self,
        from: &Netns,
        target: std::net::SocketAddr,
        tries: usize,
        timeout: Duration,
        expect: impl Fn(&[String]) -> bool,
    ) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let (pods, errors) = Self::answering_pods(from, target, tries)?;
            if errors.is_empty() && expect(&pods) {
                return Ok(pods);
            }
            if Instant::now() > deadline {
                return Err(LabError::Proxy(format!(
                    "calls to {target} from {} within {timeout:?}: answered by {pods:?}, errors {errors:?}; pods running: {:?}",
                    from.name(),
                    self.kubelet.running()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits (bounded) until the kubelet runs pod `default/name`; its address.
    pub fn wait_for_pod(&self, name: &str) -> Result<Ipv4Addr> {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            if let Some((_, ip)) = self.kubelet.pod("default", name) {
                return Ok(ip);
            }
            if Instant::now() > deadline {
                return Err(LabError::Proxy(format!(
                    "pod default/{name} is not running after 60 s; running: {:?}",
                    self.kubelet.running()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `kubectl apply -f -` of `yaml`, retried (bounded by `timeout`) while the API server
    /// refuses it (e.g. a ClusterIP in a ServiceCIDR that is not ready yet).
    pub fn apply_until_accepted(&self, yaml: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.apply(yaml) {
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                result => return result,
            }
        }
    }

    /// Reports pod `default/name` ready or not, as its readiness probe would.
    pub fn set_pod_ready(&self, name: &str, ready: bool) -> Result<()> {
        self.control_plane
            .block_on(self.kubelet.set_ready("default", name, ready))
            .map_err(|e| {
                LabError::Proxy(format!("reporting pod default/{name} ready={ready}: {e}"))
            })
    }

    /// Names of the pods running with label `app=APP`.
    pub fn pods_of(&self, app: &str) -> Result<Vec<String>> {
        let out = self.kubectl(&[
            "get",
            "pods",
            "-l",
            &format!("app={app}"),
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?;
        let mut names: Vec<String> = out.split_whitespace().map(str::to_owned).collect();
        names.sort();
        Ok(names)
    }
}

fn attach_to_bridge(net: &Netns, port: &str, ns: &Netns, addr: &str) -> Result<()> {
    veth(net, port, &[], ns, "eth0", &[addr])?;
    net.ip(&["link", "set", port, "master", "br0"])?;
    Ok(())
}

/// Creates the Node objects (pod CIDRs, the hostname label) and reports their status
/// (InternalIP, Ready), as a kubelet registering would; unschedulable nodes get the
/// control-plane taint.
pub fn register_nodes(control_plane: &ControlPlane, nodes: &[KubeletNode]) -> Result<()> {
    let api = Api::<Node>::all(control_plane.client());
    for node in nodes {
        let taints = if node.schedulable {
            json!([])
        } else {
            json!([{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}])
        };
        let object: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
            "spec": {
                "podCIDR": format!("198.19.{}.0/24", node.subnet),
                "podCIDRs": [format!("198.19.{}.0/24", node.subnet)],
                "taints": taints,
            },
        }))
        .expect("a Node");
        let status = json!({"status": {
            "addresses": [
                {"type": "InternalIP", "address": node.ip.to_string()},
                {"type": "Hostname", "address": node.name},
            ],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        }});
        let (api, name) = (api.clone(), node.name.clone());
        control_plane
            .block_on(async move {
                api.create(&PostParams::default(), &object).await?;
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                    .await
            })
            .map_err(|e| LabError::Proxy(format!("registering Node {}: {e}", node.name)))?;
    }
    Ok(())
}
