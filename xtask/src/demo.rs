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
use crate::{setup, workspace_root};
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
    let deadline = Instant::now() + PROPAGATION;
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
