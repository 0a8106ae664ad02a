//! `cargo xtask demo`: the Kubernetes Service tutorial, end to end, on the namespace lab: a
//! Deployment of 3 pods behind ClusterIP, NodePort, externalIPs and LoadBalancer Services,
//! sessionAffinity and externalTrafficPolicy Local, all NATed by the real proxy in the kernel.
//! `--check` asserts every expectation (what `cargo xtask test` runs).

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Service;

use crate::lab::{self, CLIENT_IP, Lab, OUTSIDER_IP};
use crate::{kube_lab, setup, workspace_root};
use proxy_lab::bad_files::{self, Claim};
use proxy_lab::http_get_in;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Assert what the demo shows instead of only printing it (what `cargo xtask test` runs).
    #[arg(long)]
    pub check: bool,
    /// Leave the lab up afterwards and print how to try more.
    #[arg(long)]
    pub keep: bool,
    /// Run on nodes with a host firewall (conntrack INVALID dropped) and strict rp_filter.
    #[arg(long)]
    pub host_firewall: bool,
    /// Run the tutorial on a real control plane (etcd, kube-apiserver,
    /// kube-controller-manager, built by `cargo xtask setup`), applied with kubectl.
    #[arg(long)]
    pub control_plane: bool,
    /// Before the tutorial, drop proxy_lab's 1,000 generated bad files (impostors claiming the
    /// hostname Services' addresses and ports, bit flips, truncations, invalid fields) beside
    /// examples/hostname in the running lab: every step must pass as without them.
    #[arg(long, conflicts_with = "control_plane")]
    pub bad_files: bool,
}

/// The demo's labs are named `kepdemo-<pid>`: two demos (two checkouts' test runs) on one
/// machine never share a namespace, a pin directory or a state folder.
fn demo_lab_name() -> String {
    format!("kepdemo-{}", std::process::id())
}
const REQUESTS: usize = 30;
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a change in the manifests folder may take to reach the kernel in the demo.
const PROPAGATION: Duration = Duration::from_secs(5);

/// Tears the demo lab down when the demo ends, however it ends, unless `--keep`.
struct LabGuard {
    name: String,
    keep: bool,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if !self.keep {
            lab::down(&self.name);
        }
    }
}

/// One answer from a pod, or the failure.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Answer { pod: String, client: String },
    Refused,
    NoAnswer,
    Error(String),
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Answer { pod, client } => write!(f, "{pod} (saw client {client})"),
            Reply::Refused => write!(f, "connection refused"),
            Reply::NoAnswer => write!(f, "no answer within {TIMEOUT:?}"),
            Reply::Error(e) => write!(f, "error: {e}"),
        }
    }
}

fn request(netns: &str, addr: IpAddr, port: u16) -> anyhow::Result<Reply> {
    Ok(match http_get_in(netns, (addr, port).into(), TIMEOUT)? {
        Ok((_, body)) => {
            let field = |k: &str| {
                body.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .unwrap_or_default()
                    .to_owned()
            };
            Reply::Answer {
                pod: field("pod="),
                client: field("client="),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Reply::Refused,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) =>
        {
            Reply::NoAnswer
        }
        Err(e) => Reply::Error(e.to_string()),
    })
}

/// Client address without the port.
fn client_ip(client: &str) -> &str {
    client.rsplit_once(':').map_or(client, |(ip, _)| ip)
}

struct Walkthrough {
    check: bool,
    color: bool,
    failures: Vec<String>,
}

impl Walkthrough {
    fn step(&self, title: &str) {
        if self.color {
            println!("\n\x1b[1m== {title}\x1b[0m");
        } else {
            println!("\n== {title}");
        }
    }

    fn expect(&mut self, ok: bool, what: &str) {
        let mark = match (ok, self.color) {
            (true, true) => "\x1b[32mok\x1b[0m",
            (true, false) => "ok",
            (false, true) => "\x1b[31mFAILED\x1b[0m",
            (false, false) => "FAILED",
        };
        println!("   [{mark}] {what}");
        if !ok {
            self.failures.push(what.to_owned());
        }
    }
}

/// `n` requests; prints a tally of who answered and what client address each saw.
fn spread(
    netns: &str,
    from: &str,
    addr: IpAddr,
    port: u16,
    n: usize,
) -> anyhow::Result<Vec<Reply>> {
    println!("   {n} requests from {from} to http://{addr}:{port}/");
    let replies: Vec<Reply> = (0..n)
        .map(|_| request(netns, addr, port))
        .collect::<anyhow::Result<_>>()?;
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for r in &replies {
        // Grouped by pod and client address: the client port differs on every request.
        let key = match r {
            Reply::Answer { pod, client } => {
                format!("{pod} (saw client {})", client_ip(client))
            }
            other => other.to_string(),
        };
        *tally.entry(key).or_default() += 1;
    }
    for (reply, count) in tally {
        println!("     {count:>3} × {reply}");
    }
    Ok(replies)
}

fn pods_answering(replies: &[Reply]) -> std::collections::BTreeSet<String> {
    replies
        .iter()
        .filter_map(|r| match r {
            Reply::Answer { pod, .. } => Some(pod.clone()),
            _ => None,
        })
        .collect()
}

fn clients_seen(replies: &[Reply]) -> std::collections::BTreeSet<String> {
    replies
        .iter()
        .filter_map(|r| match r {
            Reply::Answer { client, .. } => Some(client_ip(client).to_owned()),
            _ => None,
        })
        .collect()
}

/// Retries `request` until `done` holds or `PROPAGATION` passes; returns the last reply.
fn wait_for(
    netns: &str,
    addr: IpAddr,
    port: u16,
    done: impl Fn(&Reply) -> bool,
) -> anyhow::Result<Reply> {
    wait_for_within(netns, addr, port, PROPAGATION, done)
}

/// Retries `request` until `done` holds or `timeout` passes; returns the last reply.
fn wait_for_within(
    netns: &str,
    addr: IpAddr,
    port: u16,
    timeout: Duration,
    done: impl Fn(&Reply) -> bool,
) -> anyhow::Result<Reply> {
    let deadline = Instant::now() + timeout;
    loop {
        let reply = request(netns, addr, port)?;
        if done(&reply) || Instant::now() > deadline {
            return Ok(reply);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The frontends the proxy plans for each Service (from `kube-ebpf-proxy plan -o json`), by
/// Service name and frontend kind.
struct Plan {
    frontends: BTreeMap<(String, String), (IpAddr, u16)>,
}

impl Plan {
    fn load(lab: &Lab, hostname: &str) -> anyhow::Result<Self> {
        let out = proxy_lab::run(
            std::process::Command::new(&lab.proxy_bin)
                .args([
                    "plan",
                    "-o",
                    "json",
                    "--hostname-override",
                    hostname,
                    "--manifests",
                ])
                .arg(lab.manifests_dir()),
        )?;
        let raw: serde_json::Value = serde_json::from_str(&out).context("parsing plan -o json")?;
        let mut frontends = BTreeMap::new();
        for sp in raw["servicePorts"].as_array().cloned().unwrap_or_default() {
            let name = sp["name"]["name"].as_str().unwrap_or_default().to_owned();
            for f in sp["frontends"].as_array().cloned().unwrap_or_default() {
                let kind = f["kind"].as_str().unwrap_or_default().to_owned();
                let addr: IpAddr = f["addr"]
                    .as_str()
                    .unwrap_or_default()
                    .parse()
                    .context("frontend addr")?;
                let port = f["port"].as_u64().unwrap_or_default() as u16;
                frontends
                    .entry((name.clone(), kind))
                    .or_insert((addr, port));
            }
        }
        Ok(Self { frontends })
    }

    fn frontend(&self, service: &str, kind: &str) -> anyhow::Result<(IpAddr, u16)> {
        self.frontends
            .get(&(service.to_owned(), kind.to_owned()))
            .copied()
            .with_context(|| format!("the plan has no {kind} frontend for Service {service}"))
    }
}

fn services(dir: &Path) -> anyhow::Result<Vec<Service>> {
    Ok(lab::read_objects(dir)?
        .into_iter()
        .filter(|o| o["kind"] == "Service")
        .filter_map(|o| serde_json::from_value(o).ok())
        .collect())
}

/// The first Service matching `pred`, by name.
fn find(
    services: &[Service],
    what: &str,
    pred: impl Fn(&k8s_openapi::api::core::v1::ServiceSpec) -> bool,
) -> anyhow::Result<String> {
    services
        .iter()
        .find(|s| s.spec.as_ref().is_some_and(&pred))
        .and_then(|s| s.metadata.name.clone())
        .with_context(|| format!("examples/hostname has no {what} Service"))
}

pub fn demo(args: &DemoArgs) -> anyhow::Result<()> {
    setup::require_root("the demo (it loads eBPF programs and creates network namespaces)")?;
    if args.control_plane {
        return demo_control_plane(args);
    }
    let started = Instant::now();
    let dir = workspace_root().join("examples/hostname");
    let svcs = services(&dir)?;
    let nodeport = find(&svcs, "NodePort (Cluster policy)", |s| {
        s.type_.as_deref() == Some("NodePort")
            && s.external_traffic_policy.as_deref() != Some("Local")
    })?;
    let external_ips = find(&svcs, "externalIPs", |s| {
        s.external_ips.as_ref().is_some_and(|v| !v.is_empty())
    })?;
    let load_balancer = find(&svcs, "LoadBalancer", |s| {
        s.type_.as_deref() == Some("LoadBalancer")
    })?;
    let affinity = find(&svcs, "sessionAffinity ClientIP", |s| {
        s.session_affinity.as_deref() == Some("ClientIP")
    })?;
    let local = find(&svcs, "externalTrafficPolicy Local", |s| {
        s.external_traffic_policy.as_deref() == Some("Local")
    })?;
    let external_name = find(&svcs, "ExternalName", |s| {
        s.type_.as_deref() == Some("ExternalName")
    })?;

    let mut w = Walkthrough {
        check: args.check,
        color: std::io::stdout().is_terminal(),
        failures: Vec::new(),
    };
    w.step("Bringing up the lab: 3 nodes (node1 is the control plane), the hostname Deployment, an external client");
    let name = demo_lab_name();
    let _guard = LabGuard {
        name: name.clone(),
        keep: args.keep,
    };
    let mut lab = Lab::up(&name, &dir, 3, args.host_firewall)?;
    let worker = lab
        .nodes
        .iter()
        .find(|n| n.schedulable)
        .context("a worker node")?
        .clone();
    let control_plane = lab.nodes[0].clone();
    let plan = Plan::load(&lab, &worker.name)?;
    let toolbox = lab.toolbox_netns.clone();
    let client = lab.client_netns.clone();
    if args.bad_files {
        let held = |claim, (ip, port): (IpAddr, u16)| bad_files::Held {
            claim,
            value: ip.to_string(),
            port,
        };
        let node_port = |service: &str| -> anyhow::Result<bad_files::Held> {
            let (_, port) = plan.frontend(service, "nodePort")?;
            Ok(bad_files::Held {
                claim: Claim::NodePort,
                value: port.to_string(),
                port,
            })
        };
        let held = [
            held(
                Claim::ClusterIp,
                plan.frontend("hostname-svc-clusterip", "clusterIp")?,
            ),
            held(Claim::ClusterIp, plan.frontend(&affinity, "clusterIp")?),
            node_port(&nodeport)?,
            node_port(&local)?,
            held(
                Claim::ExternalIp,
                plan.frontend(&external_ips, "externalIp")?,
            ),
            held(
                Claim::LoadBalancerIp,
                plan.frontend(&load_balancer, "loadBalancer")?,
            ),
        ];
        add_bad_files(&lab, &plan, &dir, &held, &worker.name, &toolbox, &mut w)?;
    }

    w.step("ClusterIP: hostname-svc-clusterip from a pod spreads over the 3 pods");
    let (vip, port) = plan.frontend("hostname-svc-clusterip", "clusterIp")?;
    wait_for(&toolbox, vip, port, |r| matches!(r, Reply::Answer { .. }))?;
    let replies = spread(&toolbox, "the toolbox pod", vip, port, REQUESTS)?;
    let pods = pods_answering(&replies);
    w.expect(
        pods.len() == 3 && replies.iter().all(|r| matches!(r, Reply::Answer { .. })),
        &format!("3 distinct pods answered: {pods:?}"),
    );

    w.step(&format!("NodePort: {nodeport} answers on every node's address, masqueraded (externalTrafficPolicy Cluster)"));
    let (_, node_port) = plan.frontend(&nodeport, "nodePort")?;
    for node in lab.nodes.clone() {
        let reply = request(&client, IpAddr::V4(node.ip), node_port)?;
        println!(
            "   client -> {}:{node_port} ({}): {reply}",
            node.ip, node.name
        );
        w.expect(
            matches!(&reply, Reply::Answer { client, .. } if client_ip(client) != CLIENT_IP.to_string()),
            &format!("{} answers by NodePort, the pod sees a node address", node.name),
        );
    }

    w.step(&format!(
        "externalIPs: {external_ips} from the external client"
    ));
    let (eip, eport) = plan.frontend(&external_ips, "externalIp")?;
    let reply = request(&client, eip, eport)?;
    println!("   client -> {eip}:{eport}: {reply}");
    w.expect(
        matches!(reply, Reply::Answer { .. }),
        "the externalIP answers",
    );

    w.step(&format!(
        "LoadBalancer: {load_balancer} admits sources in loadBalancerSourceRanges only"
    ));
    let (lb_ip, lb_port) = plan.frontend(&load_balancer, "loadBalancer")?;
    let reply = request(&client, lb_ip, lb_port)?;
    println!("   client {CLIENT_IP} -> {lb_ip}:{lb_port}: {reply}");
    w.expect(
        matches!(reply, Reply::Answer { .. }),
        "an allowed source is answered",
    );
    let reply = request(&lab.outsider_netns, lb_ip, lb_port)?;
    println!("   outsider {OUTSIDER_IP} -> {lb_ip}:{lb_port}: {reply}");
    w.expect(
        matches!(reply, Reply::NoAnswer),
        "a source outside the ranges gets no answer",
    );

    w.step(&format!(
        "sessionAffinity ClientIP: {affinity} sticks to one pod"
    ));
    let (aff_ip, aff_port) = plan.frontend(&affinity, "clusterIp")?;
    let replies = spread(&toolbox, "the toolbox pod", aff_ip, aff_port, 10)?;
    let pods = pods_answering(&replies);
    w.expect(
        pods.len() == 1
            && replies.len() == 10
            && replies.iter().all(|r| matches!(r, Reply::Answer { .. })),
        &format!("every request went to the same pod: {pods:?}"),
    );

    w.step(&format!("externalTrafficPolicy Local: {local} keeps the client address, and a node without pods does not answer"));
    let (_, local_port) = plan.frontend(&local, "nodePort")?;
    let replies = spread(
        &client,
        "the external client",
        IpAddr::V4(worker.ip),
        local_port,
        5,
    )?;
    let seen = clients_seen(&replies);
    w.expect(
        replies.iter().all(|r| matches!(r, Reply::Answer { .. }))
            && seen.len() == 1
            && seen.contains(&CLIENT_IP.to_string()),
        &format!(
            "{} answers and the pod saw the real client address {CLIENT_IP}: {seen:?}",
            worker.name
        ),
    );
    let reply = request(&client, IpAddr::V4(control_plane.ip), local_port)?;
    println!(
        "   client -> {}:{local_port} ({}, no pods): {reply}",
        control_plane.ip, control_plane.name
    );
    w.expect(
        matches!(reply, Reply::NoAnswer),
        &format!("{} (no local pods) drops the traffic", control_plane.name),
    );

    w.step(&format!(
        "ExternalName: {external_name} is skipped, as kube-proxy skips it"
    ));
    let planned = plan
        .frontends
        .keys()
        .any(|(name, _)| name == &external_name);
    println!(
        "   plan for {external_name}: {}",
        if planned {
            "programmed (unexpected)"
        } else {
            "nothing programmed"
        }
    );
    w.expect(
        !planned,
        "no frontend is programmed for the ExternalName Service",
    );

    sctp_node_port(&lab, &worker.name, &client, worker.ip, &mut w)?;

    w.step("Scaling hostname-deployment to 0: the ClusterIP refuses connections");
    lab.scale("hostname-deployment", 0)?;
    let reply = wait_for(&toolbox, vip, port, |r| *r == Reply::Refused)?;
    println!("   toolbox -> {vip}:{port}: {reply}");
    w.expect(
        reply == Reply::Refused,
        "0 replicas: connection refused (REJECT)",
    );

    w.step("Scaling back to 3: answers again");
    lab.scale("hostname-deployment", 3)?;
    wait_for(&toolbox, vip, port, |r| matches!(r, Reply::Answer { .. }))?;
    let replies = spread(&toolbox, "the toolbox pod", vip, port, REQUESTS)?;
    w.expect(pods_answering(&replies).len() == 3, "3 pods answer again");

    println!("\ndemo finished in {:.1?}", started.elapsed());
    if args.keep {
        println!(
            "the lab is still up: try `cargo xtask lab --name {name} status`, \
             `cargo xtask lab --name {name} exec client -- curl -s http://{}:{node_port}/`, \
             and `cargo xtask lab --name {name} down` when done",
            worker.ip
        );
    }
    if w.check && !w.failures.is_empty() {
        bail!("demo check failed:\n- {}", w.failures.join("\n- "));
    }
    Ok(())
}

/// Applies an SCTP NodePort Service to the running lab and opens an SCTP association to it
/// from the external client: the port rewrite (NodePort → 80) must keep the CRC32c valid.
fn sctp_node_port(
    lab: &Lab,
    hostname: &str,
    client: &str,
    node: std::net::Ipv4Addr,
    w: &mut Walkthrough,
) -> anyhow::Result<()> {
    w.step("SCTP: an SCTP NodePort Service is applied; an SCTP client reaches the pods through it");
    let path = lab.manifests_dir().join("hostname-svc-sctp.yaml");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: hostname-svc-sctp\nspec:\n  \
         type: NodePort\n  selector:\n    app: webserver\n  ports:\n  - protocol: SCTP\n    \
         port: 8080\n    targetPort: 80\n",
    )
    .with_context(|| format!("writing {}", path.display()))?;
    let (_, port) = Plan::load(lab, hostname)?.frontend("hostname-svc-sctp", "nodePort")?;
    let target = std::net::SocketAddr::from((node, port));
    let deadline = Instant::now() + PROPAGATION;
    let answer = loop {
        let answer = proxy_lab::enter(client, move || {
            proxy_lab::sctp::sctp_exchange(target, TIMEOUT)
        })?;
        if answer.is_ok() || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("   client -> {target} (SCTP): {answer:?}");
    w.expect(
        answer.is_ok_and(|a| a.starts_with("hostname-deployment")),
        "a pod answered the SCTP association through the NodePort",
    );
    Ok(())
}

/// Writes proxy_lab's bad files beside examples/hostname in the running lab, then a good
/// Service: once it answers, the proxies have read the folder with every bad file. `plan` must
/// still give every hostname Service exactly the frontends it had.
fn add_bad_files(
    lab: &Lab,
    plan: &Plan,
    examples: &Path,
    held: &[bad_files::Held],
    hostname: &str,
    toolbox: &str,
    w: &mut Walkthrough,
) -> anyhow::Result<()> {
    w.step(&format!(
        "{} bad files appear beside examples/hostname in the running lab: copies claiming its \
         ClusterIPs, NodePorts, externalIP and LoadBalancer IP, bit flips, truncations, invalid \
         ports, addresses and names",
        bad_files::COUNT
    ));
    let mut originals = Vec::new();
    for entry in
        std::fs::read_dir(examples).with_context(|| format!("reading {}", examples.display()))?
    {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        if text.contains("\nkind: Service\n") {
            originals.push(text);
        }
    }
    let files = bad_files::generate(&bad_files::Target {
        originals: &originals,
        held,
        taken_name: "hostname-svc-clusterip",
        impostor_app: "impostor",
        app: "webserver",
        target_port: 80,
    });
    let dir = lab.manifests_dir();
    for (name, content) in files {
        let path = dir.join(name);
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    let sentinel = dir.join("zz-sentinel.yaml");
    std::fs::write(
        &sentinel,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: zz-sentinel\nspec:\n  selector:\n    \
         app: webserver\n  ports:\n  - port: 8080\n    targetPort: 80\n",
    )
    .with_context(|| format!("writing {}", sentinel.display()))?;
    let after = Plan::load(lab, hostname)?;
    let changed: Vec<String> = plan
        .frontends
        .iter()
        .filter(|(key, frontend)| after.frontends.get(key) != Some(frontend))
        .map(|((service, kind), (ip, port))| format!("{service} {kind} {ip}:{port}"))
        .collect();
    w.expect(
        changed.is_empty(),
        &format!("plan keeps every hostname Service's frontends; changed: {changed:?}"),
    );
    let (vip, port) = after.frontend("zz-sentinel", "clusterIp")?;
    let reply = wait_for(toolbox, vip, port, |r| matches!(r, Reply::Answer { .. }))?;
    println!("   toolbox -> zz-sentinel {vip}:{port}: {reply}");
    w.expect(
        matches!(reply, Reply::Answer { .. }),
        "a Service written after the bad files answers: the proxies have read them all",
    );
    Ok(())
}

/// How long the controllers and the lab's kubelet may take to make a change's pods answer.
const CONTROLLERS: Duration = Duration::from_mins(1);

/// The tutorial on a real control plane: `kubectl apply -f examples/hostname/`, the controllers
/// make the pods, every node's proxy follows the API server.
fn demo_control_plane(args: &DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut w = Walkthrough {
        check: args.check,
        color: std::io::stdout().is_terminal(),
        failures: Vec::new(),
    };
    w.step("Bringing up a control plane (etcd, kube-apiserver, kube-controller-manager) and 3 nodes (node1 is the control plane), each running the proxy against the API server");
    crate::control_plane::ensure()?;
    let name = demo_lab_name();
    let _guard = LabGuard {
        name: name.clone(),
        keep: args.keep,
    };
    lab::down(&name);
    let binaries = lab::build_binaries()?;
    let info = kube_lab::up(&name, &lab::state_dir(&name), 3, &binaries)?;
    let toolbox = info.netns["toolbox"].clone();
    let client = info.netns["client"].clone();

    w.step("kubectl apply -f examples/hostname/");
    let dir = workspace_root().join("examples/hostname");
    print!(
        "{}",
        kube_lab::kubectl_output(&info, &["apply", "-f", &dir.to_string_lossy()])?
    );
    let jsonpath = |service: &str, path: &str| {
        kube_lab::kubectl_output(
            &info,
            &[
                "get",
                "service",
                service,
                "-o",
                &format!("jsonpath={{{path}}}"),
            ],
        )
    };
    let vip: IpAddr = jsonpath("hostname-svc-clusterip", ".spec.clusterIP")?
        .parse()
        .context("the ClusterIP kubectl shows")?;
    let port = 8080;

    w.step("ClusterIP: hostname-svc-clusterip from the toolbox pod spreads over the 3 pods");
    wait_for_within(&toolbox, vip, port, CONTROLLERS, |r| {
        matches!(r, Reply::Answer { .. })
    })?;
    let deadline = Instant::now() + CONTROLLERS;
    let mut replies = spread(&toolbox, "the toolbox pod", vip, port, REQUESTS)?;
    while pods_answering(&replies).len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        replies = spread(&toolbox, "the toolbox pod", vip, port, REQUESTS)?;
    }
    let pods = pods_answering(&replies);
    w.expect(
        pods.len() == 3 && replies.iter().all(|r| matches!(r, Reply::Answer { .. })),
        &format!("3 distinct pods answered: {pods:?}"),
    );

    let node_port: u16 = jsonpath("hostname-svc-nodeport", ".spec.ports[0].nodePort")?
        .parse()
        .context("the NodePort kubectl shows")?;
    w.step(&format!(
        "NodePort: hostname-svc-nodeport ({node_port}, allocated by the API server) answers on every node's address"
    ));
    for node in ["node1", "node2", "node3"] {
        let ip: IpAddr = kube_lab::kubectl_output(
            &info,
            &[
                "get",
                "node",
                node,
                "-o",
                "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}",
            ],
        )?
        .parse()
        .context("the node address kubectl shows")?;
        let reply = request(&client, ip, node_port)?;
        println!("   client -> {node} {ip}:{node_port}: {reply}");
        w.expect(
            matches!(reply, Reply::Answer { .. }),
            &format!("{node} answers on its NodePort"),
        );
    }

    for (replicas, what) in [
        (5, "5 pods answer"),
        (0, "the ClusterIP refuses connections"),
        (3, "3 pods answer again"),
    ] {
        w.step(&format!(
            "kubectl scale deployment hostname-deployment --replicas={replicas}: {what}"
        ));
        kube_lab::kubectl_output(
            &info,
            &[
                "scale",
                "deployment",
                "hostname-deployment",
                &format!("--replicas={replicas}"),
            ],
        )?;
        if replicas == 0 {
            let reply =
                wait_for_within(&toolbox, vip, port, CONTROLLERS, |r| *r == Reply::Refused)?;
            println!("   toolbox -> {vip}:{port}: {reply}");
            w.expect(reply == Reply::Refused, "connection refused");
            continue;
        }
        let deadline = Instant::now() + CONTROLLERS;
        let mut pods = pods_answering(&spread(&toolbox, "the toolbox pod", vip, port, REQUESTS)?);
        while pods.len() != replicas && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            pods = pods_answering(&spread(&toolbox, "the toolbox pod", vip, port, REQUESTS)?);
        }
        w.expect(
            pods.len() == replicas,
            &format!("{replicas} distinct pods answered: {pods:?}"),
        );
    }

    println!("\ndemo finished in {:.1?}", started.elapsed());
    if args.keep {
        println!(
            "the lab is still up: cargo xtask lab --name {name} kubectl -- get pods -o wide; cargo xtask lab --name {name} down"
        );
    }
    if w.check && !w.failures.is_empty() {
        bail!("demo check failed:\n- {}", w.failures.join("\n- "));
    }
    Ok(())
}
