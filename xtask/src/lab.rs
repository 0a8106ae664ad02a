//! `cargo xtask lab`: a mini-cluster of network namespaces running the real proxy.
//!
//! Topology (all inside namespaces this lab creates; nothing touches the root namespace):
//! - `<lab>-net`: a bridge `br0`, the "physical" node network 198.18.0.0/24.
//! - `<lab>-node<i>`: node i at 198.18.0.1i on `eth0`, pod CIDR 198.19.i.0/24, running
//!   `kube-ebpf-proxy run --manifests <state>/manifests --hostname-override node<i>`. Node 1 is
//!   the control plane (tainted, no pods), as in kind; pods go to the workers.
//! - `<lab>-pod-<name>`: one per Deployment replica, `eth0` routed through its node (veth with
//!   the pod CIDR's gateway on the node side, ptp-CNI style), running `lab-server` (HTTP + UDP: pod name and client address).
//! - `<lab>-client` and `<lab>-outsider`: external clients at 203.0.113.10 and .200 on the same
//!   link (on-link routes both ways), with routes to the Services' externalIPs and LoadBalancer
//!   IPs through node 1, as a router would have.
//! - `<lab>-pod-toolbox`: a pod no Service selects, on the first worker, to call Services from.
//!
//! The lab writes Node and Pod objects into the proxies' manifests folder, so `lab apply` of a
//! scaled Deployment adds or removes pods live. `lab down` removes everything by name, so it
//! also cleans up after a crashed `lab up`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use proxy_lab::{
    cgroup2_mount, command_in, create_netns, delete_netns, ip_in, netns_with_prefix, run,
};
use serde::{Deserialize, Serialize};

use crate::{cargo, kube_lab, setup, workspace_root};

pub const DEFAULT_LAB: &str = "keplab";
pub const CLUSTER_CIDR: &str = "198.19.0.0/16";
/// External clients live in 203.0.113.0/24, on the node network's link: the tutorial's
/// LoadBalancer admits 203.0.113.0/25, so the client is inside and the outsider outside.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// A second external client, for sources outside loadBalancerSourceRanges.
pub const OUTSIDER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
const CLIENT_NET: &str = "203.0.113.0/24";
const NODE_NET: &str = "198.18.0.0/24";
/// Where the lab keeps its state (manifests folder, logs, lab.json).
const STATE_ROOT: &str = "/run/kube-ebpf-proxy-lab";
const PIN_ROOT: &str = "/sys/fs/bpf";

#[derive(clap::Args)]
pub struct LabArgs {
    /// Which lab (several can exist side by side; the demo's is `kepdemo`).
    #[arg(long, default_value = DEFAULT_LAB)]
    name: String,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(clap::Subcommand)]
pub enum LabCommand {
    /// Build the mini-cluster from a folder of manifests and start a proxy on every node.
    Up {
        /// Folder of manifests (default: examples/hostname).
        dir: Option<PathBuf>,
        /// Number of nodes (node 1 is the control plane and runs no pods).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Protect every node as hardened hosts are: an nftables table dropping conntrack
        /// INVALID packets in input and forward, and strict rp_filter on every interface.
        #[arg(long)]
        host_firewall: bool,
        /// Run a real control plane (etcd, kube-apiserver, kube-controller-manager, built by
        /// `cargo xtask setup`) instead of a manifests folder: objects go in with `lab kubectl`,
        /// and DIR is applied only when given.
        #[arg(long)]
        control_plane: bool,
    },
    /// Run kubectl against the lab's API server (`--control-plane` labs), e.g.
    /// `lab kubectl -- apply -f examples/hostname/`.
    Kubectl {
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// The process that holds a `--control-plane` lab (started by `lab up`).
    #[command(hide = true)]
    ServeControlPlane {
        #[arg(long)]
        nodes: usize,
        #[arg(long)]
        proxy: PathBuf,
        #[arg(long)]
        pod_server: PathBuf,
    },
    /// Remove every namespace, process, pinned map and state file of the lab.
    Down,
    /// Show nodes, pods, Services and what each proxy has programmed.
    Status,
    /// Add or replace a manifest file (e.g. a Deployment with another replica count).
    Apply { file: PathBuf },
    /// Stop a node's proxy (SIGTERM, or SIGKILL with --kill) and start it again at once, with
    /// the same pins: the programs stay attached meanwhile, so no connection notices.
    RestartProxy {
        /// node1, node2…
        node: String,
        #[arg(long)]
        kill: bool,
    },
    /// Run a command in a node (node1…), a pod (by name, or `toolbox`), `client` or `outsider`.
    Exec {
        target: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

pub fn lab(args: LabArgs) -> anyhow::Result<()> {
    let name = args.name.as_str();
    match args.command {
        LabCommand::Up {
            dir,
            nodes,
            host_firewall,
            control_plane: true,
        } => {
            if host_firewall {
                bail!("--host-firewall is not available with --control-plane yet");
            }
            setup::require_root("the lab (it creates network namespaces and loads eBPF programs)")?;
            if !(1..=9).contains(&nodes) {
                bail!("--nodes must be between 1 and 9");
            }
            crate::control_plane::ensure()?;
            down(name);
            let binaries = build_binaries()?;
            let info = kube_lab::up(name, &state_dir(name), nodes, &binaries)?;
            if let Some(dir) = dir {
                let code = kube_lab::kubectl(
                    &info,
                    &[
                        "apply".to_owned(),
                        "-f".to_owned(),
                        dir.to_string_lossy().into_owned(),
                    ],
                )?;
                if code != 0 {
                    bail!("kubectl apply -f {} failed", dir.display());
                }
            }
            kube_lab::kubectl(&info, &kube_lab::status_args())?;
            println!(
                "\nlab is up on a real control plane; try:\n  cargo xtask lab kubectl -- apply -f examples/hostname/\n  cargo xtask lab kubectl -- get service hostname-svc-clusterip\n  cargo xtask lab exec toolbox -- curl -s http://CLUSTER-IP:8080/"
            );
            Ok(())
        }
        LabCommand::Kubectl { args } => {
            let Some(info) = kube_lab::load(&state_dir(name)) else {
                bail!(
                    "lab {name} is not up with --control-plane; run `cargo xtask lab up --control-plane`"
                );
            };
            std::process::exit(kube_lab::kubectl(&info, &args)?);
        }
        LabCommand::ServeControlPlane {
            nodes,
            proxy,
            pod_server,
        } => kube_lab::serve(&state_dir(name), nodes, &proxy, &pod_server),
        LabCommand::Up {
            dir,
            nodes,
            host_firewall,
            control_plane: false,
        } => {
            let dir = dir.unwrap_or_else(|| workspace_root().join("examples/hostname"));
            let lab = Lab::up(name, &dir, nodes, host_firewall)?;
            lab.print_status();
            println!(
                "\nlab is up; try: cargo xtask lab exec client -- curl -s http://{}:<a NodePort above>/",
                lab.nodes[0].ip
            );
            Ok(())
        }
        LabCommand::Down => {
            down(name);
            println!("lab {name} is down");
            Ok(())
        }
        LabCommand::Status => {
            if let Some(info) = kube_lab::load(&state_dir(name)) {
                kube_lab::kubectl(&info, &kube_lab::status_args())?;
                return Ok(());
            }
            Lab::load(name)?.print_status();
            Ok(())
        }
        LabCommand::Apply { file } => Lab::load(name)?.apply(&file),
        LabCommand::RestartProxy { node, kill } => Lab::load(name)?.restart_proxy(&node, kill),
        LabCommand::Exec { target, command } => {
            let (ns, cgroup) = if let Some(info) = kube_lab::load(&state_dir(name)) {
                let Some(ns) = info.netns.get(&target) else {
                    bail!(
                        "no {target} in lab {name}: one of {:?}",
                        info.netns.keys().collect::<Vec<_>>()
                    );
                };
                let cgroup = info
                    .cgroups
                    .get(&target)
                    .cloned()
                    .unwrap_or(cgroup2_mount()?);
                (ns.clone(), cgroup)
            } else {
                let lab = Lab::load(name)?;
                // Joins the lab's cgroup first, so a node's own connections to Services go
                // through the proxy's socket hooks like any host process's.
                (lab.netns_of(&target)?, lab_cgroup(name)?)
            };
            let status = command_in(&ns, "sh")
                .args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#])
                .arg(&cgroup)
                .args(&command)
                .status()
                .with_context(|| format!("running {command:?} in {target}"))?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Third octet of the pod CIDR 198.19.N.0/24.
    pub pod_subnet: u8,
    pub schedulable: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub deployment: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub node: String,
    /// Interface on the node side of the pod's veth.
    pub host_if: String,
    pub labels: BTreeMap<String, String>,
    /// Container ports: (name, port, protocol).
    pub ports: Vec<(Option<String>, u16, String)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Lab {
    pub name: String,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
    pub client_netns: String,
    pub outsider_netns: String,
    pub toolbox_netns: String,
    pub proxy_bin: PathBuf,
    pub server_bin: PathBuf,
    next_pod_if: u32,
}

/// Removes everything the lab named `name` made, whatever state it is in.
pub fn down(name: &str) {
    kube_lab::down(&state_dir(name));
    for ns in netns_with_prefix(&format!("{name}-")).unwrap_or_default() {
        delete_netns(&ns);
    }
    if let Ok(entries) = std::fs::read_dir(PIN_ROOT) {
        let prefix = format!("kube-ebpf-proxy-{name}-");
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(state_dir(name));
    // Its processes died with the namespaces; an empty cgroup is removed with rmdir.
    if let Ok(cgroup) = lab_cgroup(name) {
        let _ = std::fs::remove_dir(cgroup);
    }
}

/// The lab's own cgroup: the proxies attach their socket hooks (host-originated traffic) there,
/// never to the machine's root cgroup, and `lab exec` runs commands inside it.
fn lab_cgroup(name: &str) -> anyhow::Result<PathBuf> {
    Ok(cgroup2_mount()?.join(format!("kube-ebpf-proxy-lab-{name}")))
}

pub fn state_dir(name: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(name)
}

/// Builds the proxy, the lab's pod server and its SCTP client; returns the first two's paths.
pub fn build_binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    setup::run(cargo().args([
        "build",
        "--quiet",
        "-p",
        "proxy-userspace",
        "--bin",
        "kube-ebpf-proxy",
    ]))?;
    setup::run(cargo().args([
        "build",
        "--quiet",
        "-p",
        "proxy-lab",
        "--bin",
        "lab-server",
        "--bin",
        "lab-sctp",
    ]))?;
    let target = workspace_root().join("target/debug");
    Ok((target.join("kube-ebpf-proxy"), target.join("lab-server")))
}

/// Every object in the YAML/JSON files of `dir` (multi-document YAML, `kind: List`).
pub fn read_objects(dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut objects = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    // A file that does not parse is one an API server would have refused: the lab, acting as
    // the cluster's controllers, never sees it (the proxy reports each one).
    let mut unparsed = 0;
    for file in files {
        match read_file_objects(&file) {
            Ok(read) => objects.extend(read),
            Err(_) => unparsed += 1,
        }
    }
    if unparsed > 0 {
        println!(
            "lab: {unparsed} files in {} do not parse; skipped",
            dir.display()
        );
    }
    Ok(objects)
}

fn read_file_objects(file: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut objects = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let value = serde_json::Value::deserialize(document)
            .with_context(|| format!("parsing {}", file.display()))?;
        if value.is_null() {
            continue;
        }
        if value["kind"] == "List" {
            objects.extend(value["items"].as_array().cloned().unwrap_or_default());
        } else {
            objects.push(value);
        }
    }
    Ok(objects)
}

fn of_kind<T: serde::de::DeserializeOwned>(objects: &[serde_json::Value], kind: &str) -> Vec<T> {
    objects
        .iter()
        .filter(|o| o["kind"] == kind)
        .filter_map(|o| serde_json::from_value(o.clone()).ok())
        .collect()
}

/// Sets a sysctl inside a namespace (/proc/sys/net is per network namespace).
fn sysctl(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    run(command_in(netns, "sysctl").args(["-q", "-w", &format!("{key}={value}")]))?;
    Ok(())
}

/// Starts `program` detached inside `netns`, output to `log`.
fn spawn_in(netns: &str, program: &Path, args: &[String], log: &Path) -> anyhow::Result<()> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = command_in(netns, program);
    cmd.args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.spawn()
        .with_context(|| format!("starting {} in {netns}", program.display()))?;
    Ok(())
}

/// Waits until `log` contains `needle` (the process says it is ready).
fn wait_for_log(log: &Path, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not say {needle:?} within {timeout:?}:\n{text}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Lab {
    pub fn state_dir(&self) -> PathBuf {
        state_dir(&self.name)
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.state_dir().join("manifests")
    }

    pub fn load(name: &str) -> anyhow::Result<Self> {
        let path = state_dir(name).join("lab.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "lab {name} is not up (no {}); run `cargo xtask lab up`",
                path.display()
            )
        })?;
        Ok(serde_json::from_str(&text)?)
    }

    fn save(&self) -> anyhow::Result<()> {
        let path = self.state_dir().join("lab.json");
        std::fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Builds the lab named `name` from the manifests in `dir` with `nodes` nodes, protected
    /// by a host firewall and strict rp_filter with `host_firewall`.
    pub fn up(name: &str, dir: &Path, nodes: usize, host_firewall: bool) -> anyhow::Result<Self> {
        setup::require_root("the lab (it creates network namespaces and loads eBPF programs)")?;
        if nodes == 0 || nodes > 9 {
            bail!("--nodes must be between 1 and 9");
        }
        down(name);
        let (proxy_bin, server_bin) = build_binaries()?;
        let mut lab = Lab {
            name: name.to_owned(),
            nodes: Vec::new(),
            pods: Vec::new(),
            client_netns: format!("{name}-client"),
            outsider_netns: format!("{name}-outsider"),
            toolbox_netns: format!("{name}-pod-toolbox"),
            proxy_bin,
            server_bin,
            next_pod_if: 0,
        };
        std::fs::create_dir_all(lab.manifests_dir())
            .with_context(|| format!("creating {}", lab.manifests_dir().display()))?;
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_file() {
                let target = lab.manifests_dir().join(path.file_name().expect("a file"));
                std::fs::copy(&path, &target).with_context(|| {
                    format!("copying {} to {}", path.display(), target.display())
                })?;
            }
        }
        let cgroup = lab_cgroup(name)?;
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating the lab's cgroup {}", cgroup.display()))?;
        lab.build_network(nodes)?;
        if host_firewall {
            let protections = proxy_lab::host::Protections {
                firewall: true,
                rp_filter: true,
            };
            for node in &lab.nodes {
                protections
                    .apply_in(&node.netns)
                    .with_context(|| format!("protecting {}", node.name))?;
            }
        }
        lab.write_nodes()?;
        lab.sync_pods()?;
        lab.save()?;
        for node in lab.nodes.clone() {
            lab.start_proxy(&node)?;
        }
        Ok(lab)
    }

    fn build_network(&mut self, nodes: usize) -> anyhow::Result<()> {
        let net = format!("{}-net", self.name);
        create_netns(&net)?;
        ip_in(&net, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&net, &["link", "set", "br0", "up"])?;
        let attach = |ns: &str, port: &str, addr: &str| -> anyhow::Result<()> {
            create_netns(ns)?;
            ip_in(
                &net,
                &[
                    "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ],
            )?;
            ip_in(&net, &["link", "set", port, "master", "br0", "up"])?;
            ip_in(ns, &["addr", "add", addr, "dev", "eth0"])?;
            ip_in(ns, &["link", "set", "eth0", "up"])?;
            Ok(())
        };
        for i in 1..=nodes {
            let node = NodeInfo {
                name: format!("node{i}"),
                netns: format!("{}-node{i}", self.name),
                ip: Ipv4Addr::new(198, 18, 0, 10 + i as u8),
                pod_subnet: i as u8,
                schedulable: nodes == 1 || i > 1,
            };
            attach(&node.netns, &format!("n{i}"), &format!("{}/24", node.ip))?;
            ip_in(&node.netns, &["route", "add", CLIENT_NET, "dev", "eth0"])?;
            sysctl(&node.netns, "net.ipv4.ip_forward", "1")?;
            self.nodes.push(node);
        }
        for node in &self.nodes {
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                ip_in(
                    &node.netns,
                    &[
                        "route",
                        "add",
                        &format!("198.19.{}.0/24", other.pod_subnet),
                        "via",
                        &other.ip.to_string(),
                    ],
                )?;
            }
        }
        for (ns, port, ip) in [
            (&self.client_netns, "cl", CLIENT_IP),
            (&self.outsider_netns, "out", OUTSIDER_IP),
        ] {
            attach(ns, port, &format!("{ip}/24"))?;
            ip_in(ns, &["route", "add", NODE_NET, "dev", "eth0"])?;
        }
        self.route_external_ips()?;
        let first_worker = self
            .nodes
            .iter()
            .find(|n| n.schedulable)
            .expect("a worker")
            .clone();
        let toolbox_ip = Ipv4Addr::new(198, 19, first_worker.pod_subnet, 250);
        self.connect_pod(
            &self.toolbox_netns.clone(),
            "toolbox",
            toolbox_ip,
            &first_worker,
        )?;
        Ok(())
    }

    /// The client reaches externalIPs and LoadBalancer IPs through node 1, as a router would.
    fn route_external_ips(&self) -> anyhow::Result<()> {
        let services: Vec<Service> = of_kind(&read_objects(&self.manifests_dir())?, "Service");
        for svc in services {
            let spec = svc.spec.unwrap_or_default();
            let mut ips: Vec<String> = spec.external_ips.unwrap_or_default();
            let ingress = svc
                .status
                .and_then(|s| s.load_balancer)
                .and_then(|l| l.ingress);
            ips.extend(ingress.unwrap_or_default().into_iter().filter_map(|i| i.ip));
            for ip in ips.iter().filter(|ip| ip.parse::<Ipv4Addr>().is_ok()) {
                for client in [&self.client_netns, &self.outsider_netns] {
                    let gateway = self.nodes[0].ip.to_string();
                    ip_in(client, &["route", "replace", ip, "via", &gateway])?;
                }
            }
        }
        Ok(())
    }

    fn write_nodes(&self) -> anyhow::Result<()> {
        let items: Vec<serde_json::Value> = self
            .nodes
            .iter()
            .map(|n| {
                let mut node = serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": n.name, "labels": {
                        "kubernetes.io/hostname": n.name,
                        "topology.kubernetes.io/zone": "lab-zone",
                    }},
                    "spec": {"podCIDR": format!("198.19.{}.0/24", n.pod_subnet),
                             "podCIDRs": [format!("198.19.{}.0/24", n.pod_subnet)]},
                    "status": {"addresses": [
                        {"type": "InternalIP", "address": n.ip.to_string()},
                        {"type": "Hostname", "address": n.name},
                    ]},
                });
                if !n.schedulable {
                    node["spec"]["taints"] = serde_json::json!([
                        {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
                    ]);
                }
                node
            })
            .collect();
        write_list(&self.manifests_dir().join("lab-nodes.json"), &items)
    }

    fn write_pods(&self) -> anyhow::Result<()> {
        let items: Vec<serde_json::Value> = self
            .pods
            .iter()
            .map(|p| {
                let ports: Vec<serde_json::Value> = p
                    .ports
                    .iter()
                    .map(|(name, port, protocol)| {
                        let mut v = serde_json::json!({"containerPort": port, "protocol": protocol});
                        if let Some(name) = name {
                            v["name"] = serde_json::json!(name);
                        }
                        v
                    })
                    .collect();
                serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
                    "spec": {"nodeName": p.node, "containers": [{"name": "server", "image": "lab-server", "ports": ports}]},
                    "status": {"phase": "Running", "podIP": p.ip.to_string(), "podIPs": [{"ip": p.ip.to_string()}],
                               "conditions": [{"type": "Ready", "status": "True"}]},
                })
            })
            .collect();
        write_list(&self.manifests_dir().join("lab-pods.json"), &items)
    }

    /// Makes the pod namespaces match the Deployments' replica counts.
    fn sync_pods(&mut self) -> anyhow::Result<()> {
        let deployments: Vec<Deployment> =
            of_kind(&read_objects(&self.manifests_dir())?, "Deployment");
        let mut wanted: Vec<PodInfo> = Vec::new();
        for deployment in &deployments {
            let namespace = deployment
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let deploy_name = deployment.metadata.name.clone().unwrap_or_default();
            let spec = deployment.spec.clone().unwrap_or_default();
            let template = spec.template;
            let labels = template.metadata.and_then(|m| m.labels).unwrap_or_default();
            let ports: Vec<(Option<String>, u16, String)> = template
                .spec
                .map(|s| s.containers)
                .unwrap_or_default()
                .into_iter()
                .flat_map(|c| c.ports.unwrap_or_default())
                .filter_map(|p| {
                    let port = u16::try_from(p.container_port).ok()?;
                    Some((p.name, port, p.protocol.unwrap_or_else(|| "TCP".into())))
                })
                .collect();
            for index in 0..spec.replicas.unwrap_or(1).max(0) {
                wanted.push(PodInfo {
                    name: format!("{deploy_name}-{index}"),
                    namespace: namespace.clone(),
                    deployment: deploy_name.clone(),
                    netns: String::new(),
                    ip: Ipv4Addr::UNSPECIFIED,
                    node: String::new(),
                    host_if: String::new(),
                    labels: labels.clone(),
                    ports: ports.clone(),
                });
            }
        }
        let keep = |p: &PodInfo| {
            wanted
                .iter()
                .any(|w| w.name == p.name && w.namespace == p.namespace)
        };
        let (kept, gone): (Vec<PodInfo>, Vec<PodInfo>) = self.pods.drain(..).partition(keep);
        self.pods = kept;
        for pod in gone {
            println!("lab: deleting pod {}/{}", pod.namespace, pod.name);
            delete_netns(&pod.netns);
        }
        // Write the shrunk pod list before adding pods, so a scale-down is seen promptly.
        self.write_pods()?;
        for want in wanted {
            if self
                .pods
                .iter()
                .any(|p| p.name == want.name && p.namespace == want.namespace)
            {
                continue;
            }
            let pod = self.create_pod(want)?;
            self.pods.push(pod);
        }
        self.write_pods()
    }

    fn create_pod(&mut self, mut pod: PodInfo) -> anyhow::Result<PodInfo> {
        let workers: Vec<NodeInfo> = self
            .nodes
            .iter()
            .filter(|n| n.schedulable)
            .cloned()
            .collect();
        // Spread like the scheduler: the worker with the fewest pods.
        let node = workers
            .iter()
            .min_by_key(|n| self.pods.iter().filter(|p| p.node == n.name).count())
            .expect("at least one schedulable node")
            .clone();
        let used: Vec<Ipv4Addr> = self.pods.iter().map(|p| p.ip).collect();
        let ip = (2..=254)
            .map(|h| Ipv4Addr::new(198, 19, node.pod_subnet, h))
            .find(|ip| !used.contains(ip))
            .context("the node's pod CIDR is full")?;
        pod.netns = format!("{}-pod-{}", self.name, pod.name);
        pod.ip = ip;
        pod.node.clone_from(&node.name);
        pod.host_if = self.connect_pod(&pod.netns, &pod.name, ip, &node)?;
        let mut args = vec!["--name".to_owned(), pod.name.clone()];
        for (_, port, _) in &pod.ports {
            args.extend(["--port".to_owned(), port.to_string()]);
        }
        let log = self.state_dir().join(format!("pod-{}.log", pod.name));
        spawn_in(&pod.netns, &self.server_bin, &args, &log)?;
        wait_for_log(&log, "ready", Duration::from_secs(10))?;
        println!(
            "lab: pod {}/{} on {} at {ip}",
            pod.namespace, pod.name, node.name
        );
        Ok(pod)
    }

    /// Creates a pod namespace at `ip` wired to `node`; returns the node-side interface.
    fn connect_pod(
        &mut self,
        netns: &str,
        pod: &str,
        ip: Ipv4Addr,
        node: &NodeInfo,
    ) -> anyhow::Result<String> {
        self.next_pod_if += 1;
        let host_if = format!("pod{}", self.next_pod_if);
        create_netns(netns).with_context(|| format!("creating pod {pod}"))?;
        ip_in(
            &node.netns,
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", netns,
            ],
        )?;
        // ptp-CNI style: the node side of every pod veth holds the pod CIDR's gateway address.
        let gateway = Ipv4Addr::new(198, 19, node.pod_subnet, 1).to_string();
        ip_in(
            &node.netns,
            &["addr", "add", &format!("{gateway}/32"), "dev", &host_if],
        )?;
        ip_in(&node.netns, &["link", "set", &host_if, "up"])?;
        ip_in(
            &node.netns,
            &["route", "add", &format!("{ip}/32"), "dev", &host_if],
        )?;
        ip_in(netns, &["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ip_in(netns, &["link", "set", "eth0", "up"])?;
        ip_in(
            netns,
            &["route", "add", &gateway, "dev", "eth0", "scope", "link"],
        )?;
        ip_in(
            netns,
            &["route", "add", "default", "via", &gateway, "dev", "eth0"],
        )?;
        Ok(host_if)
    }

    /// Sets a Deployment's replicas in the lab's copy of its manifest and brings pods in line
    /// (what `lab apply` of an edited file does).
    pub fn scale(&mut self, deployment: &str, replicas: i32) -> anyhow::Result<()> {
        let dir = self.manifests_dir();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) == Some("json")
                && path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("lab-"))
            {
                continue;
            }
            let Ok(mut docs) = read_file_objects(&path) else {
                continue;
            };
            let mut changed = false;
            for doc in &mut docs {
                if doc["kind"] == "Deployment" && doc["metadata"]["name"] == deployment {
                    doc["spec"]["replicas"] = serde_json::json!(replicas);
                    changed = true;
                }
            }
            if changed {
                let text: Vec<String> = docs
                    .iter()
                    .map(serde_norway::to_string)
                    .collect::<Result<_, _>>()?;
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, text.join("---\n"))
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .with_context(|| format!("rewriting {}", path.display()))?;
                println!("lab: scaled {deployment} to {replicas}");
                self.sync_pods()?;
                return self.save();
            }
        }
        bail!("no Deployment {deployment} in the lab's manifests")
    }

    fn start_proxy(&self, node: &NodeInfo) -> anyhow::Result<()> {
        let manifests = self.manifests_dir().to_string_lossy().into_owned();
        let cgroup = lab_cgroup(&self.name)?.to_string_lossy().into_owned();
        let args: Vec<String> = [
            "run",
            "--bpf-pin-path",
            &format!("{PIN_ROOT}/kube-ebpf-proxy-{}-{}", self.name, node.name),
            "--manifests",
            &manifests,
            "--hostname-override",
            &node.name,
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--cgroup-path",
            &cgroup,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let log = self.state_dir().join(format!("proxy-{}.log", node.name));
        spawn_in(&node.netns, &self.proxy_bin, &args, &log)?;
        wait_for_log(&log, "initial sync programmed", Duration::from_secs(30))?;
        println!(
            "lab: kube-ebpf-proxy running on {} ({})",
            node.name, node.ip
        );
        Ok(())
    }

    /// Signals the proxy process of `node` and starts a new one once it is gone.
    fn restart_proxy(&self, node: &str, kill: bool) -> anyhow::Result<()> {
        let info = self
            .nodes
            .iter()
            .find(|n| n.name == node)
            .with_context(|| format!("no node {node} in lab {}", self.name))?;
        let pids = run(Command::new("ip").args(["netns", "pids", &info.netns]))?;
        let proxies: Vec<&str> = pids
            .split_whitespace()
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe"))
                    .is_ok_and(|exe| exe == self.proxy_bin)
            })
            .collect();
        if proxies.is_empty() {
            bail!("no kube-ebpf-proxy runs on {node}");
        }
        let signal = if kill { "-KILL" } else { "-TERM" };
        for pid in &proxies {
            run(Command::new("kill").args([signal, pid]))?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while proxies
            .iter()
            .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
        {
            if Instant::now() > deadline {
                bail!("the proxy on {node} (pid {proxies:?}) did not exit within 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        println!("lab: stopped the proxy on {node} ({signal})");
        self.start_proxy(info)
    }

    /// Copies `file` into the manifests folder and brings pods in line with it.
    pub fn apply(&mut self, file: &Path) -> anyhow::Result<()> {
        let name = file.file_name().context("apply takes a file")?;
        std::fs::copy(file, self.manifests_dir().join(name))
            .with_context(|| format!("copying {}", file.display()))?;
        self.sync_pods()?;
        self.route_external_ips()?;
        self.save()?;
        println!("lab: applied {}", file.display());
        Ok(())
    }

    /// The namespace of `node1…`, a pod name, or `client`.
    pub fn netns_of(&self, target: &str) -> anyhow::Result<String> {
        match target {
            "client" => return Ok(self.client_netns.clone()),
            "outsider" => return Ok(self.outsider_netns.clone()),
            "toolbox" => return Ok(self.toolbox_netns.clone()),
            _ => {}
        }
        if let Some(n) = self.nodes.iter().find(|n| n.name == target) {
            return Ok(n.netns.clone());
        }
        if let Some(p) = self.pods.iter().find(|p| p.name == target) {
            return Ok(p.netns.clone());
        }
        bail!("no node, pod or client named {target} in lab {}", self.name)
    }

    /// Services with their allocated addresses, as the proxies plan them (node 1's view).
    fn print_services(&self) {
        let plan = run(Command::new(&self.proxy_bin)
            .args([
                "plan",
                "-o",
                "json",
                "--hostname-override",
                &self.nodes[0].name,
                "--manifests",
            ])
            .arg(self.manifests_dir()));
        let plan: serde_json::Value = match plan.map(|out| serde_json::from_str(&out)) {
            Ok(Ok(plan)) => plan,
            Ok(Err(e)) => return println!("services: (plan output unreadable: {e})"),
            Err(e) => return println!("services: (plan failed: {e})"),
        };
        println!("services (as programmed on {}):", self.nodes[0].name);
        for sp in plan["servicePorts"].as_array().into_iter().flatten() {
            let frontends: Vec<String> = sp["frontends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    format!(
                        "{} {}:{}",
                        f["kind"].as_str().unwrap_or("?"),
                        f["addr"].as_str().unwrap_or("?"),
                        f["port"]
                    )
                })
                .collect();
            println!(
                "  {}/{} {}  endpoints {}  {}",
                sp["name"]["namespace"].as_str().unwrap_or_default(),
                sp["name"]["name"].as_str().unwrap_or_default(),
                sp["name"]["protocol"].as_str().unwrap_or_default(),
                sp["clusterEndpoints"].as_array().map_or(0, Vec::len),
                frontends.join(", ")
            );
        }
        for d in plan["diagnostics"].as_array().into_iter().flatten() {
            println!(
                "  ! {}: {}",
                d["object"].as_str().unwrap_or_default(),
                d["message"].as_str().unwrap_or_default()
            );
        }
    }

    pub fn print_status(&self) {
        println!(
            "lab {} (state in {})",
            self.name,
            self.state_dir().display()
        );
        println!("nodes:");
        for n in &self.nodes {
            let role = if n.schedulable {
                "worker"
            } else {
                "control-plane (no pods)"
            };
            println!(
                "  {:<8} {:<14} pods 198.19.{}.0/24  {role}",
                n.name, n.ip, n.pod_subnet
            );
        }
        println!("pods:");
        for p in &self.pods {
            println!(
                "  {:<28} {:<14} on {}",
                format!("{}/{}", p.namespace, p.name),
                p.ip,
                p.node
            );
        }
        println!("toolbox pod (selected by no Service): lab exec toolbox -- …");
        println!("external clients: client {CLIENT_IP}, outsider {OUTSIDER_IP}");
        self.print_services();
        for n in &self.nodes {
            let stats = run(Command::new(&self.proxy_bin)
                .args(["stats", "--bpf-pin-path"])
                .arg(format!(
                    "{PIN_ROOT}/kube-ebpf-proxy-{}-{}",
                    self.name, n.name
                )))
            .unwrap_or_else(|e| format!("(unavailable: {e})\n"));
            println!(
                "proxy on {}:\n{}",
                n.name,
                indent(&interesting_stats(&stats))
            );
        }
    }
}

/// The `stats` lines worth showing: what is programmed, and counters that moved.
fn interesting_stats(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("programmed_") || l.starts_with("conntrack_") || !l.ends_with(" 0")
        })
        .collect();
    lines.join("\n")
}

fn indent(text: &str) -> String {
    text.lines().flat_map(|l| ["  ", l, "\n"]).collect()
}

fn write_list(path: &Path, items: &[serde_json::Value]) -> anyhow::Result<()> {
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    // Write then rename so the proxies' folder watchers never read half a file.
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&list)?)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
