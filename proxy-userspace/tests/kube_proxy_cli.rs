//! The binary as kube-proxy: kubeadm's and kops' DaemonSet command lines start it unchanged (no
//! subcommand, or invoked as `kube-proxy`), `--version` and `--cleanup` behave as kube-proxy's.
//! Each proxy runs in a namespace this test creates, with its own pin path and cgroup.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proxy_lab::{Cgroup, ManifestsDir, Netns, PinDir, Proxy, run, unique_name, veth};

const BINARY: &str = env!("CARGO_BIN_EXE_kube-ebpf-proxy");
/// kubeadm's kube-proxy ConfigMap `config.conf`, every field as kubeadm writes it.
const KUBEADM_CONFIG: &str = include_str!("../testdata/kubeadm-config.conf");

/// A `kube-proxy` symlink to the binary, as an image or an operator would install it.
struct KubeProxyLink {
    dir: tempfile::TempDir,
}

impl KubeProxyLink {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::os::unix::fs::symlink(BINARY, dir.path().join("kube-proxy")).expect("symlink");
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("kube-proxy")
    }
}

/// A proxy started with an exact command line inside a namespace; its stderr goes to a file.
/// Stopped with SIGTERM on drop.
struct Started {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Started {
    fn spawn(ns: &Netns, program: &Path, args: &[String]) -> Self {
        let log = tempfile::NamedTempFile::new().expect("a log file");
        let child = ns
            .command(program)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("the log file"))
            .spawn()
            .expect("the proxy starts");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).expect("the log")
    }

    /// Waits (30 s at most) until the proxy has programmed its first sync and kube-proxy's
    /// /healthz port in `ns` answers 200.
    fn wait_healthy(&mut self, ns: &Netns) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the proxy exited ({status}):\n{}", self.log());
            }
            let healthy = self.log().contains("initial sync programmed")
                && ns
                    .command("curl")
                    .args(["--silent", "--fail", "--max-time", "2"])
                    .arg("http://127.0.0.1:10256/healthz")
                    .output()
                    .is_ok_and(|out| out.status.success());
            if healthy {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("/healthz never answered 200:\n{}", self.log());
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id().cast_signed()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// A node namespace with one veth to a peer, and what a proxy there needs of its own.
struct Node {
    ns: Netns,
    _peer: Netns,
    interface: String,
    pins: PinDir,
    cgroup: Cgroup,
    manifests: ManifestsDir,
}

impl Node {
    fn new() -> Self {
        let ns = Netns::new("n").unwrap();
        let peer = Netns::new("p").unwrap();
        let (interface, peer_if) = (unique_name("a"), unique_name("b"));
        veth(
            &ns,
            &interface,
            &["192.0.2.1/24"],
            &peer,
            &peer_if,
            &["192.0.2.2/24"],
        )
        .unwrap();
        Self {
            ns,
            _peer: peer,
            interface,
            pins: PinDir::new(),
            cgroup: Cgroup::new().unwrap(),
            manifests: ManifestsDir::new().unwrap(),
        }
    }

    /// The flags that keep a test proxy to its own pins, cgroup and manifests folder.
    fn lab_flags(&self) -> Vec<String> {
        vec![
            format!("--bpf-pin-path={}", self.pins.path().display()),
            format!("--cgroup-path={}", self.cgroup.path().display()),
            format!("--manifests={}", self.manifests.path().display()),
        ]
    }
}

#[test]
fn version_as_kube_proxy_has_it() {
    let link = KubeProxyLink::new();
    for program in [Path::new(BINARY), &link.path()] {
        let line = run(Command::new(program).arg("--version")).unwrap();
        assert_eq!(
            line,
            format!("kube-ebpf-proxy v{}\n", env!("CARGO_PKG_VERSION"))
        );
        let raw = run(Command::new(program).arg("--version=raw")).unwrap();
        assert!(raw.starts_with("version.Info{Major:\"0\""), "{raw}");
    }
    // `--version=false` is the proxy itself: here it fails on the missing config file.
    let out = Command::new(BINARY)
        .args(["--version=false", "--config=/nonexistent/config.conf"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/config.conf"),
        "{out:?}"
    );
}

#[test]
fn kubeadm_daemonset_command_runs_as_kube_proxy() {
    let node = Node::new();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), KUBEADM_CONFIG).unwrap();
    let link = KubeProxyLink::new();
    // kubeadm's DaemonSet: `/usr/local/bin/kube-proxy --config=… --hostname-override=$(NODE_NAME)`.
    let mut args = vec![
        format!("--config={}", config.path().display()),
        "--hostname-override=node-1".to_owned(),
    ];
    args.extend(node.lab_flags());
    let mut proxy = Started::spawn(&node.ns, &link.path(), &args);
    proxy.wait_healthy(&node.ns);
    let log = proxy.log();
    assert!(
        log.contains("mode \"\": kube-ebpf-proxy programs its eBPF dataplane instead"),
        "{log}"
    );
    assert!(log.contains(&node.interface), "attached: {log}");
}

#[test]
fn kops_flags_run_without_a_subcommand_and_warn_once_each() {
    let node = Node::new();
    // kops' nodeup flags (sorted, as it writes them) plus the klog flags it adds.
    let mut args: Vec<String> = [
        "--cluster-cidr=100.96.0.0/11",
        "--conntrack-max-per-core=131072",
        "--hostname-override=ip-172-20-1-1.ec2.internal",
        "--oom-score-adj=-998",
        "--proxy-mode=iptables",
        "--v=2",
        "--logtostderr=false",
        "--alsologtostderr",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(node.lab_flags());
    let mut proxy = Started::spawn(&node.ns, Path::new(BINARY), &args);
    proxy.wait_healthy(&node.ns);
    let log = proxy.log();
    for flag in [
        "--conntrack-max-per-core=131072 is accepted",
        "--oom-score-adj=-998 is accepted",
        "--v=2 is accepted",
        "--logtostderr=false is accepted",
        "--alsologtostderr=true is accepted",
        "--proxy-mode \"iptables\": kube-ebpf-proxy programs its eBPF dataplane instead",
    ] {
        assert_eq!(log.matches(flag).count(), 1, "{flag}:\n{log}");
    }
}

fn ingress_filters(ns: &Netns, interface: &str) -> String {
    run(ns
        .command("tc")
        .args(["filter", "show", "dev", interface, "ingress"]))
    .unwrap_or_default()
}

#[test]
fn cleanup_removes_pins_and_attachments_then_exits_0() {
    let node = Node::new();
    // A clsact filter (what the proxy uses before Linux 6.6) outlives the proxy, as do the
    // pinned cgroup links and the maps.
    let proxy = Proxy::start(
        Path::new(BINARY),
        &node.ns,
        &node.pins,
        &[
            "--tc-attach",
            "netlink",
            "--cgroup-path",
            node.cgroup.path().to_str().unwrap(),
            "--manifests",
            node.manifests.path().to_str().unwrap(),
            "--hostname-override",
            "node",
        ],
    )
    .unwrap();
    drop(proxy);
    assert!(
        node.pins.path().join("CONNTRACK").exists(),
        "pins outlive the proxy"
    );
    assert!(
        ingress_filters(&node.ns, &node.interface).contains("tc_ingress"),
        "the clsact filter outlives the proxy"
    );
    let pin_flag = format!("--bpf-pin-path={}", node.pins.path().display());
    let out = node
        .ns
        .command(BINARY)
        .args(["--cleanup", &pin_flag])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("cleaned up"), "{log}");
    assert!(!node.pins.path().exists(), "the pin directory is gone");
    let filters = ingress_filters(&node.ns, &node.interface);
    assert!(!filters.contains("tc_ingress"), "{filters}");
    // Nothing left: a second cleanup (kube-proxy's `--cleanup=true` too) still exits 0.
    let again = node
        .ns
        .command(BINARY)
        .args(["run", "--cleanup=true", &pin_flag])
        .output()
        .unwrap();
    assert!(again.status.success(), "{again:?}");
}

/// The capabilities `manifests/kube-ebpf-proxy.yaml` adds (Kubernetes names, e.g. `BPF`).
fn daemonset_capabilities() -> Vec<String> {
    use serde::Deserialize as _;
    let manifest = include_str!("../../manifests/kube-ebpf-proxy.yaml");
    let daemonset = serde_norway::Deserializer::from_str(manifest)
        .map(|doc| serde_json::Value::deserialize(doc).expect("valid YAML"))
        .find(|doc| doc["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let security = &daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    security["capabilities"]["add"]
        .as_array()
        .expect("added capabilities")
        .iter()
        .map(|cap| cap.as_str().expect("a name").to_owned())
        .collect()
}

/// Starts the proxy in `node` as root limited to `caps` (the bounding set, as a container
/// runtime sets it from `capabilities`); returns whether it programmed its first sync.
fn starts_with_only(node: &Node, caps: &[String]) -> Result<(), String> {
    let bounding = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|cap| format!("+{}", cap.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec![
        format!("--bounding-set={bounding}"),
        "--".to_owned(),
        BINARY.to_owned(),
        "--hostname-override=node".to_owned(),
    ];
    args.extend(node.lab_flags());
    let mut proxy = Started::spawn(&node.ns, Path::new("setpriv"), &args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if proxy.log().contains("initial sync programmed") {
            return Ok(());
        }
        if let Ok(Some(_)) = proxy.child.try_wait() {
            return Err(proxy.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "neither synced nor failed in 30 s:\n{}",
        proxy.log()
    ))
}

#[test]
fn daemonset_capabilities_suffice_and_each_is_needed() {
    let caps = daemonset_capabilities();
    assert_eq!(caps, ["BPF", "NET_ADMIN", "PERFMON"]);
    let node = Node::new();
    starts_with_only(&node, &caps).unwrap_or_else(|log| panic!("with {caps:?}:\n{log}"));
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let log = starts_with_only(&node, &fewer)
            .expect_err(&format!("the proxy must fail without CAP_{missing}"));
        assert!(
            log.contains("Error: loading the dataplane"),
            "{missing}: {log}"
        );
    }
}
