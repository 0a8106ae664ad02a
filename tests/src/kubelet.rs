//! The lab's stand-in for the kubelet (and the scheduler): there is no container runtime, so
//! for every Pod the controllers create it binds the Pod to a lab node, makes the pod's network
//! namespace (a veth to its node, an address from the node's pod CIDR, echo servers on the
//! containers' ports) and reports it through the API (podIP, hostIP, Running, Ready). A Pod
//! being deleted loses its namespace and is then removed, as a kubelet would after its
//! containers stop.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use serde_json::json;

use crate::{EchoServer, Netns, Result};

/// A lab node the kubelet runs pods on.
#[derive(Clone, Debug)]
pub struct KubeletNode {
    pub name: String,
    /// The node's network namespace.
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Pods get 198.19.SUBNET.x; the node side of their veth holds 198.19.SUBNET.1.
    pub subnet: u8,
    /// Whether unbound Pods may be bound here (the tainted control-plane node takes none).
    pub schedulable: bool,
}

/// What a pod runs on its containers' ports.
#[derive(Clone, Debug)]
pub enum PodServer {
    /// In-process [`EchoServer`]s (TCP and UDP: `NAME PEER_IP` on connect), for tests.
    Echo,
    /// The `lab-server` binary at this path (HTTP and UDP: `pod=NAME client=IP:PORT`), so
    /// `curl` works against the pods.
    LabServer(std::path::PathBuf),
}

/// A running pod's servers (stopped on drop).
enum Servers {
    Echo(#[allow(dead_code, reason = "held until the pod goes")] Vec<EchoServer>),
    Process(std::process::Child),
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Self::Process(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A pod the kubelet runs: its servers stop before its namespace goes.
struct LocalPod {
    _servers: Servers,
    _netns: Netns,
    node: usize,
    ip: Ipv4Addr,
    ready: bool,
}

#[derive(Default)]
struct State {
    /// By `namespace/name`.
    pods: BTreeMap<String, LocalPod>,
    /// The node of every pod bound (by the kubelet or anyone), by `namespace/name`: what
    /// scheduling spreads over.
    bound: BTreeMap<String, usize>,
    next_host: BTreeMap<usize, u8>,
    next_interface: u32,
}

/// Handle to the kubelet task; the task stops (and its pods go) on drop.
pub struct Kubelet {
    task: tokio::task::JoinHandle<()>,
    state: Arc<Mutex<State>>,
    client: kube::Client,
    nodes: Arc<Vec<KubeletNode>>,
}

/// What the kubelet task needs for every pod.
struct Config {
    nodes: Arc<Vec<KubeletNode>>,
    server: PodServer,
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

impl Kubelet {
    /// Starts the kubelet for `nodes` on `runtime` (whose connections reach the API server).
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        client: kube::Client,
        nodes: Vec<KubeletNode>,
        server: PodServer,
    ) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let nodes = Arc::new(nodes);
        let task = {
            let config = Config {
                nodes: nodes.clone(),
                server,
            };
            let (state, client) = (state.clone(), client.clone());
            runtime.spawn(async move {
                let pods =
                    watcher::watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
                        .default_backoff();
                futures::pin_mut!(pods);
                while let Some(event) = pods.next().await {
                    match event {
                        Ok(Event::Apply(pod) | Event::InitApply(pod)) => {
                            if let Err(error) = sync_pod(&client, &state, &config, &pod).await {
                                eprintln!("kubelet: pod {}: {error}", key(&pod));
                            }
                        }
                        Ok(Event::Delete(pod)) => {
                            let mut state = state.lock().expect("kubelet state");
                            state.pods.remove(&key(&pod));
                            state.bound.remove(&key(&pod));
                        }
                        Ok(Event::Init | Event::InitDone) => {}
                        Err(error) => eprintln!("kubelet: watching pods: {error}"),
                    }
                }
            })
        };
        Self {
            task,
            state,
            client,
            nodes,
        }
    }

    /// The node a running pod is on and its address.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<(String, Ipv4Addr)> {
        let state = self.state.lock().expect("kubelet state");
        state
            .pods
            .get(&format!("{namespace}/{name}"))
            .map(|pod| (self.nodes[pod.node].name.clone(), pod.ip))
    }

    /// Names (`namespace/name`) of the pods running, sorted.
    pub fn running(&self) -> Vec<String> {
        self.state
            .lock()
            .expect("kubelet state")
            .pods
            .keys()
            .cloned()
            .collect()
    }

    /// Reports pod `namespace/name` ready or not (as its readiness probe would) through the
    /// API, when the returned future runs; the servers keep running either way.
    pub fn set_ready(
        &self,
        namespace: &str,
        name: &str,
        ready: bool,
    ) -> impl std::future::Future<Output = kube::Result<()>> + Send + 'static {
        if let Some(pod) = self
            .state
            .lock()
            .expect("kubelet state")
            .pods
            .get_mut(&format!("{namespace}/{name}"))
        {
            pod.ready = ready;
        }
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let name = name.to_owned();
        async move {
            let pod = api.get(&name).await?;
            let mut patch = ready_patch(ready);
            patch["status"]["containerStatuses"] = container_statuses(&pod, ready);
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map(drop)
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
        // The pods' namespaces and servers go with the state.
        self.state.lock().expect("kubelet state").pods.clear();
    }
}

fn ready_patch(ready: bool) -> serde_json::Value {
    let status = if ready { "True" } else { "False" };
    json!({"status": {"conditions": [
        {"type": "PodReadyToStartContainers", "status": "True"},
        {"type": "Initialized", "status": "True"},
        {"type": "PodScheduled", "status": "True"},
        {"type": "ContainersReady", "status": status},
        {"type": "Ready", "status": status},
    ]}})
}

/// Every container running (and ready or not), as `kubectl get pods` counts them.
fn container_statuses(pod: &Pod, ready: bool) -> serde_json::Value {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| {
            json!({
                "name": c.name,
                "image": c.image.clone().unwrap_or_default(),
                "imageID": "",
                "ready": ready,
                "started": true,
                "restartCount": 0,
                "state": {"running": {}},
            })
        })
        .collect()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Brings one Pod towards what a kubelet would make of it.
async fn sync_pod(
    client: &kube::Client,
    state: &Arc<Mutex<State>>,
    config: &Config,
    pod: &Pod,
) -> std::result::Result<(), String> {
    let nodes = config.nodes.as_slice();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api = Api::<Pod>::namespaced(client.clone(), &namespace);
    let key = key(pod);
    if pod.metadata.deletion_timestamp.is_some() {
        state.lock().expect("kubelet state").pods.remove(&key);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        return match api.delete(&name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
            Err(error) => Err(format!("deleting: {error}")),
        };
    }
    let Some(node_name) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        let node = schedule(state, nodes).ok_or("no schedulable lab node")?;
        state
            .lock()
            .expect("kubelet state")
            .bound
            .insert(key.clone(), node);
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": namespace},
            "target": {"apiVersion": "v1", "kind": "Node", "name": nodes[node].name},
        });
        api.create_subresource::<_, serde_json::Value>(
            "binding",
            &name,
            &PostParams::default(),
            &binding,
        )
        .await
        .map_err(|e| format!("binding to {}: {e}", nodes[node].name))?;
        return Ok(());
    };
    let Some(node) = nodes.iter().position(|n| n.name == node_name) else {
        return Ok(());
    };
    state
        .lock()
        .expect("kubelet state")
        .bound
        .insert(key.clone(), node);
    let (ip, ready) = {
        let existing = state
            .lock()
            .expect("kubelet state")
            .pods
            .get(&key)
            .map(|p| (p.ip, p.ready));
        if let Some(found) = existing {
            found
        } else {
            let local = run_pod(state, &nodes[node], node, pod, &config.server)
                .map_err(|e| e.to_string())?;
            let ip = local.ip;
            state
                .lock()
                .expect("kubelet state")
                .pods
                .insert(key.clone(), local);
            (ip, true)
        }
    };
    let reported = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some(&ip.to_string());
    if reported && is_ready(pod) == ready {
        return Ok(());
    }
    let mut patch = ready_patch(ready);
    let node_ip = nodes[node].ip.to_string();
    let status = patch["status"].as_object_mut().expect("an object");
    status.insert("phase".into(), json!("Running"));
    status.insert("hostIP".into(), json!(node_ip));
    status.insert("hostIPs".into(), json!([{"ip": node_ip}]));
    status.insert("podIP".into(), json!(ip.to_string()));
    status.insert("podIPs".into(), json!([{"ip": ip.to_string()}]));
    status.insert("containerStatuses".into(), container_statuses(pod, ready));
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(|e| format!("reporting status: {e}"))?;
    Ok(())
}

/// The schedulable node with the fewest pods (the first of them on a tie).
fn schedule(state: &Arc<Mutex<State>>, nodes: &[KubeletNode]) -> Option<usize> {
    let state = state.lock().expect("kubelet state");
    nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.schedulable)
        .min_by_key(|(i, _)| state.bound.values().filter(|n| *n == i).count())
        .map(|(i, _)| i)
}

/// Creates the pod's namespace on `node` with an address and servers on its ports.
fn run_pod(
    state: &Arc<Mutex<State>>,
    node: &KubeletNode,
    index: usize,
    pod: &Pod,
    server: &PodServer,
) -> Result<LocalPod> {
    let (host, interface) = {
        let mut state = state.lock().expect("kubelet state");
        let next = state.next_host.entry(index).or_insert(2);
        let host = *next;
        // .250 and up are the lab's own (the toolbox).
        *next = if *next >= 249 { 2 } else { *next + 1 };
        state.next_interface += 1;
        (host, format!("kp{}", state.next_interface))
    };
    let ip = Ipv4Addr::new(198, 19, node.subnet, host);
    let netns = Netns::new("pod")?;
    connect_pod(&node.netns, node.subnet, &interface, &netns, ip)?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut ports: Vec<u16> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    let servers = match server {
        PodServer::Echo => Servers::Echo(
            ports
                .into_iter()
                .map(|port| EchoServer::start(&netns, &name, port))
                .collect::<Result<_>>()?,
        ),
        PodServer::LabServer(binary) => {
            let mut cmd = netns.command(binary);
            cmd.arg("--name").arg(&name);
            for port in ports {
                cmd.arg("--port").arg(port.to_string());
            }
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null());
            Servers::Process(cmd.spawn().map_err(|source| crate::LabError::Spawn {
                command: format!("{cmd:?}"),
                source,
            })?)
        }
    };
    Ok(LocalPod {
        _servers: servers,
        _netns: netns,
        node: index,
        ip,
        ready: true,
    })
}

/// Connects a pod namespace to its node the ptp-CNI way: a veth whose node side holds the pod
/// CIDR's gateway (198.19.SUBNET.1/32) and a host route to the pod.
pub fn connect_pod(
    node_netns: &str,
    subnet: u8,
    interface: &str,
    pod: &Netns,
    ip: Ipv4Addr,
) -> Result<()> {
    let gateway = Ipv4Addr::new(198, 19, subnet, 1);
    let node = |args: &[&str]| crate::ip_in(node_netns, args).map(drop);
    node(&[
        "link",
        "add",
        interface,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.name(),
    ])?;
    node(&["addr", "add", &format!("{gateway}/32"), "dev", interface])?;
    node(&["link", "set", interface, "up"])?;
    node(&["route", "add", &format!("{ip}/32"), "dev", interface])?;
    let gw = gateway.to_string();
    pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
    pod.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;
    Ok(())
}
