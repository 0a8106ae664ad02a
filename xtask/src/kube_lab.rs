//! `cargo xtask lab up --control-plane`: the lab on a real control plane. A detached
//! `xtask lab serve-control-plane` process holds a `proxy_lab::kube_cluster::KubeCluster`
//! (etcd, kube-apiserver, kube-controller-manager, the lab's kubelet, a proxy per node) until
//! `lab down` stops it with SIGTERM, when every namespace, process and pinned map goes with
//! it. Its `cluster.json` tells `lab kubectl` and `lab exec` where things are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use proxy_lab::command_in;
use proxy_lab::kube_cluster::{ClusterOptions, KubeCluster};
use proxy_lab::kubelet::PodServer;
use serde::{Deserialize, Serialize};

/// Where the serving process says what it runs.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub pid: u32,
    pub kubectl: PathBuf,
    pub kubeconfig: PathBuf,
    pub control_plane_netns: String,
    /// `node1…`, `toolbox`, `client` → namespace.
    pub netns: BTreeMap<String, String>,
    /// Node name → the cgroup its proxy's socket hooks are attached to.
    pub cgroups: BTreeMap<String, PathBuf>,
}

fn info_path(state_dir: &Path) -> PathBuf {
    state_dir.join("cluster.json")
}

/// The running control-plane lab's description, if there is one.
pub fn load(state_dir: &Path) -> Option<ClusterInfo> {
    let text = std::fs::read_to_string(info_path(state_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Starts the serving process and waits until the cluster is up.
pub fn up(
    name: &str,
    state_dir: &Path,
    nodes: usize,
    binaries: &(PathBuf, PathBuf),
) -> anyhow::Result<ClusterInfo> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let log = state_dir.join("control-plane-lab.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(std::env::current_exe().context("finding xtask's own binary")?);
    cmd.args(["lab", "--name", name, "serve-control-plane", "--nodes"])
        .arg(nodes.to_string())
        .arg("--proxy")
        .arg(&binaries.0)
        .arg("--pod-server")
        .arg(&binaries.1)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("starting the control-plane lab")?;
    let deadline = Instant::now() + Duration::from_mins(5);
    loop {
        if let Some(info) = load(state_dir) {
            return Ok(info);
        }
        let exited = child.try_wait()?;
        if exited.is_some() || Instant::now() > deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!(
                "the control-plane lab did not come up (exit: {exited:?}); {}:\n{text}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The serving process: builds the cluster, describes it, and holds it until SIGTERM/SIGINT.
pub fn serve(
    state_dir: &Path,
    nodes: usize,
    proxy: &Path,
    pod_server: &Path,
) -> anyhow::Result<()> {
    // Handlers (not a blocked mask, which the servers and proxies would inherit), installed
    // first so a `lab down` during start-up is not lost.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a runtime to wait for signals")?;
    let (mut sigterm, mut sigint) = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        anyhow::Ok((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    let cluster = KubeCluster::start(
        proxy,
        ClusterOptions {
            nodes,
            control_plane_node: true,
            pod_server: PodServer::LabServer(pod_server.to_owned()),
        },
    )?;
    let mut netns = BTreeMap::new();
    let mut cgroups = BTreeMap::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        netns.insert(format!("node{}", i + 1), node.name().to_owned());
        cgroups.insert(format!("node{}", i + 1), cluster.proxy_cgroup(i).to_owned());
    }
    netns.insert("toolbox".to_owned(), cluster.toolbox.name().to_owned());
    netns.insert("client".to_owned(), cluster.client.name().to_owned());
    let info = ClusterInfo {
        pid: std::process::id(),
        kubectl: cluster.control_plane.kubectl_path(),
        kubeconfig: cluster.control_plane.admin_kubeconfig(),
        control_plane_netns: cluster.control_plane.netns().to_owned(),
        netns,
        cgroups,
    };
    let path = info_path(state_dir);
    std::fs::write(&path, serde_json::to_string_pretty(&info)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("control-plane lab up");
    runtime.block_on(async {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    });
    println!("control-plane lab: stopping");
    let _ = std::fs::remove_file(&path);
    drop(cluster);
    Ok(())
}

/// Stops the serving process (it removes everything it made) and waits for it.
pub fn down(state_dir: &Path) {
    let Some(info) = load(state_dir) else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(info.pid.cast_signed());
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_mins(1);
    while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `kubectl ARGS…` against the lab's API server, with the admin identity.
pub fn kubectl(info: &ClusterInfo, args: &[String]) -> anyhow::Result<i32> {
    let status = command_in(&info.control_plane_netns, &info.kubectl)
        .arg("--kubeconfig")
        .arg(&info.kubeconfig)
        .args(args)
        .status()
        .context("running kubectl")?;
    Ok(status.code().unwrap_or(1))
}

/// What `lab status` and `lab up` show of a control-plane lab.
pub fn status_args() -> Vec<String> {
    [
        "get",
        "nodes,pods,services,endpointslices",
        "--all-namespaces",
        "-o",
        "wide",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// `kubectl ARGS…` against the lab's API server: its stdout, or an error with its stderr.
pub fn kubectl_output(info: &ClusterInfo, args: &[&str]) -> anyhow::Result<String> {
    Ok(proxy_lab::run(
        command_in(&info.control_plane_netns, &info.kubectl)
            .arg("--kubeconfig")
            .arg(&info.kubeconfig)
            .args(args),
    )?)
}
