//! End to end against a real control plane (etcd, kube-apiserver, kube-controller-manager built
//! from source by `cargo xtask setup`): objects go in with kubectl, the controllers make the
//! Pods and EndpointSlices, the lab's kubelet runs the Pods, and every node's proxy watches the
//! API server with the identity of `manifests/kube-ebpf-proxy.yaml`. Every check is real
//! traffic through the programmed dataplane.
//!
//! The tests take turns (one control plane at a time: each is a few hundred MB and most of a
//! core while it starts).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use proxy_lab::kube_cluster::{ClusterOptions, KubeCluster, node_ip};

const BINARY: &str = env!("CARGO_BIN_EXE_kube-ebpf-proxy");

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn examples(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(dir)
}

fn start(nodes: usize) -> (std::sync::MutexGuard<'static, ()>, KubeCluster) {
    let turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cluster = KubeCluster::start(Path::new(BINARY), ClusterOptions::nodes(nodes))
        .expect("the cluster starts");
    (turn, cluster)
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

const SETTLE: Duration = Duration::from_mins(1);

#[test]
fn hostname_tutorial_applied_with_kubectl_and_scaled() {
    let (_turn, cluster) = start(2);
    cluster
        .kubectl(&["apply", "-f", &examples("hostname").to_string_lossy()])
        .expect("kubectl apply -f examples/hostname");
    let cluster_ip = cluster.cluster_ip("hostname-svc-clusterip").unwrap();
    let three = cluster
        .wait_for_answers(&cluster.toolbox, at(cluster_ip, 8080), 30, SETTLE, |pods| {
            pods.len() == 3
        })
        .unwrap();
    assert_eq!(
        three,
        cluster.pods_of("webserver").unwrap(),
        "the Deployment's pods answer"
    );

    // NodePort on every node, from outside.
    let node_port = cluster
        .service("hostname-svc-nodeport")
        .unwrap()
        .spec
        .and_then(|s| s.ports)
        .and_then(|p| p[0].node_port)
        .expect("a NodePort was allocated");
    let node_port = u16::try_from(node_port).unwrap();
    for node in 0..2 {
        cluster
            .wait_for_answers(
                &cluster.client,
                at(node_ip(node), node_port),
                30,
                SETTLE,
                |pods| pods == three.as_slice(),
            )
            .unwrap();
    }

    cluster
        .kubectl(&["scale", "deployment", "hostname-deployment", "--replicas=5"])
        .unwrap();
    let five = cluster
        .wait_for_answers(&cluster.toolbox, at(cluster_ip, 8080), 60, SETTLE, |pods| {
            pods.len() == 5
        })
        .unwrap();
    assert_eq!(five, cluster.pods_of("webserver").unwrap());

    cluster
        .kubectl(&["scale", "deployment", "hostname-deployment", "--replicas=1"])
        .unwrap();
    let one = cluster
        .wait_for_answers(&cluster.toolbox, at(cluster_ip, 8080), 20, SETTLE, |pods| {
            pods.len() == 1
        })
        .unwrap();
    assert!(
        five.contains(&one[0]),
        "a pod that was there answers: {one:?}"
    );

    cluster
        .kubectl(&["scale", "deployment", "hostname-deployment", "--replicas=0"])
        .unwrap();
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let answer = proxy_lab::tcp_request(
            &cluster.toolbox,
            at(cluster_ip, 8080),
            Duration::from_secs(2),
        )
        .unwrap();
        match answer {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "no endpoints: the ClusterIP rejects; got {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Two bare Pods (`backend-a`, `backend-b`, label `app: backends`) serving on port 9000; their
/// addresses once the kubelet runs them.
fn backends(cluster: &KubeCluster) -> (Ipv4Addr, Ipv4Addr) {
    let pod = |name: &str| {
        format!(
            "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels:
    app: backends
spec:
  containers:
  - name: server
    image: echo
    ports:
    - containerPort: 9000
"
        )
    };
    cluster
        .apply(&format!("{}---\n{}", pod("backend-a"), pod("backend-b")))
        .unwrap();
    (
        cluster.wait_for_pod("backend-a").unwrap(),
        cluster.wait_for_pod("backend-b").unwrap(),
    )
}

/// The `backends` Service (port 80 → the bare pods' 9000); its ClusterIP once both pods answer
/// on it.
fn backends_service(cluster: &KubeCluster) -> Ipv4Addr {
    cluster
        .apply(
            "apiVersion: v1
kind: Service
metadata:
  name: backends
spec:
  selector:
    app: backends
  ports:
  - port: 80
    targetPort: 9000
",
        )
        .unwrap();
    let ip = cluster.cluster_ip("backends").unwrap();
    cluster
        .wait_for_answers(&cluster.toolbox, at(ip, 80), 30, SETTLE, |pods| {
            pods == ["backend-a", "backend-b"]
        })
        .unwrap();
    ip
}

#[test]
fn a_pod_failing_readiness_leaves_and_comes_back() {
    let (_turn, cluster) = start(2);
    backends(&cluster);
    let ip = backends_service(&cluster);
    let both = |pods: &[String]| pods == ["backend-a", "backend-b"];
    cluster.set_pod_ready("backend-a", false).unwrap();
    cluster
        .wait_for_answers(&cluster.toolbox, at(ip, 80), 30, SETTLE, |pods| {
            pods == ["backend-b"]
        })
        .unwrap();
    cluster.set_pod_ready("backend-a", true).unwrap();
    cluster
        .wait_for_answers(&cluster.toolbox, at(ip, 80), 30, SETTLE, both)
        .unwrap();
}

#[test]
fn service_type_changes_selectorless_slices_mirrored_endpoints_and_a_second_service_cidr() {
    let (_turn, cluster) = start(2);
    let (a, b) = backends(&cluster);

    // ClusterIP → NodePort → ClusterIP: the NodePort opens, then closes.
    cluster
        .apply(
            "apiVersion: v1
kind: Service
metadata:
  name: changing
spec:
  selector:
    app: backends
  ports:
  - port: 80
    targetPort: 9000
",
        )
        .unwrap();
    let both = |pods: &[String]| pods == ["backend-a", "backend-b"];
    let ip = cluster.cluster_ip("changing").unwrap();
    cluster
        .wait_for_answers(&cluster.toolbox, at(ip, 80), 30, SETTLE, both)
        .unwrap();
    cluster
        .kubectl(&[
            "patch",
            "service",
            "changing",
            "--type=merge",
            "-p",
            r#"{"spec":{"type":"NodePort","ports":[{"port":80,"targetPort":9000,"nodePort":30090}]}}"#,
        ])
        .unwrap();
    cluster
        .wait_for_answers(&cluster.client, at(node_ip(1), 30090), 30, SETTLE, both)
        .unwrap();
    cluster
        .kubectl(&[
            "patch",
            "service",
            "changing",
            "--type=merge",
            "-p",
            r#"{"spec":{"type":"ClusterIP"}}"#,
        ])
        .unwrap();
    let deadline = std::time::Instant::now() + SETTLE;
    while proxy_lab::tcp_request(
        &cluster.client,
        at(node_ip(1), 30090),
        Duration::from_secs(1),
    )
    .unwrap()
    .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the NodePort still answers after the type change to ClusterIP"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    cluster
        .wait_for_answers(&cluster.toolbox, at(ip, 80), 10, SETTLE, both)
        .unwrap();

    // A Service without a selector and a hand-made EndpointSlice.
    cluster
        .apply(&format!(
            "apiVersion: v1
kind: Service
metadata:
  name: by-slice
spec:
  ports:
  - port: 80
    targetPort: 9000
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: by-slice-hand-made
  labels:
    kubernetes.io/service-name: by-slice
addressType: IPv4
endpoints:
- addresses: [\"{a}\"]
  conditions:
    ready: true
ports:
- name: \"\"
  port: 9000
  protocol: TCP
"
        ))
        .unwrap();
    let ip = cluster.cluster_ip("by-slice").unwrap();
    cluster
        .wait_for_answers(&cluster.toolbox, at(ip, 80), 20, SETTLE, |pods| {
            pods == ["backend-a"]
        })
        .unwrap();

    // A Service without a selector and hand-made Endpoints, mirrored into an EndpointSlice.
    cluster
        .apply(&format!(
            "apiVersion: v1
kind: Service
metadata:
  name: by-endpoints
spec:
  ports:
  - name: http
    port: 80
    targetPort: 9000
---
apiVersion: v1
kind: Endpoints
metadata:
  name: by-endpoints
subsets:
- addresses:
  - ip: {b}
  ports:
  - name: http
    port: 9000
"
        ))
        .unwrap();
    let ip = cluster.cluster_ip("by-endpoints").unwrap();
    cluster
        .wait_for_answers(&cluster.toolbox, at(ip, 80), 20, SETTLE, |pods| {
            pods == ["backend-b"]
        })
        .unwrap();
    let mirrored = cluster
        .kubectl(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=by-endpoints",
            "-o",
            "jsonpath={.items[*].metadata.labels.endpointslice\\.kubernetes\\.io/managed-by}",
        ])
        .unwrap();
    assert_eq!(mirrored, "endpointslicemirroring-controller.k8s.io");

    // A second ServiceCIDR: a ClusterIP from it is served like one from the first.
    cluster
        .apply(
            "apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata:
  name: second
spec:
  cidrs:
  - 10.97.0.0/24
",
        )
        .unwrap();
    cluster
        .apply_until_accepted(
            "apiVersion: v1
kind: Service
metadata:
  name: in-second-cidr
spec:
  clusterIP: 10.97.0.10
  selector:
    app: backends
  ports:
  - port: 80
    targetPort: 9000
",
            SETTLE,
        )
        .unwrap();
    cluster
        .wait_for_answers(
            &cluster.toolbox,
            at(Ipv4Addr::new(10, 97, 0, 10), 80),
            30,
            SETTLE,
            both,
        )
        .unwrap();
}

#[test]
fn an_rbac_gap_is_a_clear_error_the_manifests_pass_a_server_dry_run_and_events_name_what_is_not_programmed()
 {
    let (_turn, cluster) = start(1);
    let manifest = proxy_lab::kube_cluster::proxy_manifest();
    cluster
        .kubectl(&[
            "apply",
            "--dry-run=server",
            "-f",
            &manifest.to_string_lossy(),
        ])
        .expect("kubectl apply --dry-run=server -f manifests/kube-ebpf-proxy.yaml");
    // kubeadm's own kube-proxy DaemonSet, turned into ours by the documented patch.
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    cluster
        .kubectl(&[
            "apply",
            "-f",
            &here
                .join("testdata/kubeadm-daemonset.yaml")
                .to_string_lossy(),
        ])
        .expect("kubeadm's kube-proxy DaemonSet");
    cluster
        .kubectl(&[
            "-n",
            "kube-system",
            "patch",
            "daemonset",
            "kube-proxy",
            "--dry-run=server",
            "--patch-file",
            &here
                .join("../manifests/kubeadm/kube-proxy-patch.yaml")
                .to_string_lossy(),
        ])
        .expect("kubectl patch --dry-run=server with manifests/kubeadm/kube-proxy-patch.yaml");

    // An object the proxy cannot use: node1's proxy, with the manifest's identity, says so in
    // an Event on it.
    cluster
        .apply(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: orphan-slice
  namespace: default
addressType: IPv4
endpoints:
- addresses: [\"10.1.0.9\"]
ports:
- name: \"\"
  port: 80
",
        )
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = cluster
            .kubectl(&[
                "get",
                "events.events.k8s.io",
                "-n",
                "default",
                "-o",
                "jsonpath={range .items[*]}{.regarding.kind}/{.regarding.name} {.reason} {.note}{\"\\n\"}{end}",
            ])
            .unwrap();
        if let Some(event) = events
            .lines()
            .find(|l| l.starts_with("EndpointSlice/orphan-slice "))
        {
            assert!(
                event.contains("NotProgrammed") && event.contains("kubernetes.io/service-name"),
                "{event}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no Event on the EndpointSlice within 30 s: {events}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    cluster
        .apply(
            "apiVersion: v1
kind: ServiceAccount
metadata:
  name: no-slices
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: no-slices
rules:
- apiGroups: [\"\"]
  resources: [\"services\", \"nodes\"]
  verbs: [\"list\", \"watch\"]
- apiGroups: [\"discovery.k8s.io\"]
  resources: [\"endpointslices\"]
  verbs: [\"watch\"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: no-slices
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: no-slices
subjects:
- kind: ServiceAccount
  name: no-slices
  namespace: kube-system
",
        )
        .unwrap();
    let kubeconfig = cluster
        .control_plane
        .service_account_kubeconfig("kube-system", "no-slices")
        .unwrap();
    let pin_dir = proxy_lab::PinDir::new();
    let mut args = cluster.proxy_args(0, &kubeconfig);
    // Beside node1's own proxy: other health and metrics ports.
    args.extend(
        [
            "--bpf-pin-path",
            &pin_dir.path().to_string_lossy(),
            "--healthz-bind-address",
            "127.0.0.1:10266",
            "--metrics-bind-address",
            "",
        ]
        .map(str::to_owned),
    );
    let started = std::time::Instant::now();
    let out = cluster.nodes[0]
        .command("timeout")
        .arg("60")
        .arg(BINARY)
        .arg("run")
        .args(&args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "the proxy exits with an error instead of waiting: {:?} after {:?}\n{stderr}",
        out.status,
        started.elapsed()
    );
    assert!(
        stderr.contains("forbid") && stderr.contains("endpointslices"),
        "the error names the refused list: {stderr}"
    );
    assert!(
        stderr.contains("manifests/kube-ebpf-proxy.yaml"),
        "the error says which role is needed: {stderr}"
    );
}

#[test]
fn api_server_restarted_and_stopped_for_two_minutes() {
    let (_turn, mut cluster) = start(2);
    let (a, _) = backends(&cluster);
    let ip = backends_service(&cluster);
    let both = |pods: &[String]| pods == ["backend-a", "backend-b"];

    // A restart: the proxies re-watch, and a change after it is applied.
    cluster.control_plane.stop_apiserver();
    cluster.control_plane.start_apiserver().unwrap();
    cluster.set_pod_ready("backend-b", false).unwrap();
    cluster
        .wait_for_answers(&cluster.toolbox, at(ip, 80), 20, SETTLE, |pods| {
            pods == ["backend-a"]
        })
        .unwrap();
    cluster.set_pod_ready("backend-b", true).unwrap();
    cluster
        .wait_for_answers(&cluster.toolbox, at(ip, 80), 30, SETTLE, both)
        .unwrap();

    // Two minutes without the API server the nodes use: traffic keeps flowing through what is
    // programmed, on both nodes.
    cluster.control_plane.stop_apiserver();
    let outage = std::time::Instant::now();
    let (second, kubeconfig) = cluster.control_plane.start_second_apiserver().unwrap();
    // A change made meanwhile (through another API server on the same etcd).
    let change = format!(
        "apiVersion: v1
kind: Service
metadata:
  name: made-meanwhile
spec:
  ports:
  - port: 80
    targetPort: 9000
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: made-meanwhile-1
  labels:
    kubernetes.io/service-name: made-meanwhile
addressType: IPv4
endpoints:
- addresses: [\"{a}\"]
  conditions:
    ready: true
ports:
- name: \"\"
  port: 9000
  protocol: TCP
"
    );
    let change_file = cluster
        .control_plane
        .state_dir()
        .join("made-meanwhile.yaml");
    std::fs::write(&change_file, change).unwrap();
    cluster
        .control_plane
        .kubectl_via(
            &kubeconfig,
            &["apply", "-f", &change_file.to_string_lossy()],
        )
        .unwrap();
    let new_ip: Ipv4Addr = cluster
        .control_plane
        .kubectl_via(
            &kubeconfig,
            &[
                "get",
                "service",
                "made-meanwhile",
                "-o",
                "jsonpath={.spec.clusterIP}",
            ],
        )
        .unwrap()
        .parse()
        .unwrap();
    drop(second);
    while outage.elapsed() < Duration::from_mins(2) {
        let (pods, errors) = KubeCluster::answering_pods(&cluster.toolbox, at(ip, 80), 20).unwrap();
        assert!(
            errors.is_empty() && both(&pods),
            "{:?} into the outage: answered by {pods:?}, errors {errors:?}",
            outage.elapsed()
        );
        std::thread::sleep(Duration::from_secs(5));
    }
    assert!(
        KubeCluster::answering_pods(&cluster.toolbox, at(new_ip, 80), 3)
            .unwrap()
            .0
            .is_empty(),
        "the change made meanwhile is not programmed before the API server returns"
    );
    cluster.control_plane.start_apiserver().unwrap();
    let back = std::time::Instant::now();
    cluster
        .wait_for_answers(
            &cluster.toolbox,
            at(new_ip, 80),
            5,
            // Seconds, not the half minute of a 30 s retry cap.
            Duration::from_secs(12),
            |pods| pods == ["backend-a"],
        )
        .unwrap();
    eprintln!(
        "the change made meanwhile was programmed {:?} after the API server returned",
        back.elapsed()
    );
}

/// A node's proxy started as kubeadm starts kube-proxy: the binary as `kube-proxy`, kubeadm's
/// KubeProxyConfiguration (its ConfigMap's `config.conf`, verbatim but for where the kubeconfig
/// is) and its command line, plus the lab's own pin directory and cgroup. It adopts the node's
/// pins, programs what changes in the API server and serves kube-proxy's /healthz.
#[test]
fn a_node_proxy_runs_as_kubeadm_runs_kube_proxy() {
    let (_turn, mut cluster) = start(1);
    cluster
        .kubectl(&["apply", "-f", &examples("hostname").to_string_lossy()])
        .expect("kubectl apply -f examples/hostname");
    let cluster_ip = cluster.cluster_ip("hostname-svc-clusterip").unwrap();
    cluster
        .wait_for_answers(&cluster.toolbox, at(cluster_ip, 8080), 30, SETTLE, |pods| {
            pods.len() == 3
        })
        .unwrap();

    cluster.stop_proxy(0, nix::sys::signal::Signal::SIGTERM);
    let dir = tempfile::tempdir().unwrap();
    let kube_proxy = dir.path().join("kube-proxy");
    std::os::unix::fs::symlink(BINARY, &kube_proxy).unwrap();
    let config = dir.path().join("config.conf");
    let kubeadm = include_str!("../testdata/kubeadm-config.conf");
    assert!(kubeadm.contains("kubeconfig: /var/lib/kube-proxy/kubeconfig.conf"));
    std::fs::write(
        &config,
        kubeadm.replace(
            "/var/lib/kube-proxy/kubeconfig.conf",
            &cluster.proxy_kubeconfig.to_string_lossy(),
        ),
    )
    .unwrap();
    let args: Vec<std::ffi::OsString> = vec![
        format!("--config={}", config.display()).into(),
        "--hostname-override=node1".into(),
        // The lab's: this node's pins and the cgroup its socket hooks act in.
        "--bpf-pin-path".into(),
        cluster.pin_path(0).into(),
        "--cgroup-path".into(),
        cluster.proxy_cgroup(0).into(),
    ];
    let mut proxy = proxy_lab::Proxy::start_command(&kube_proxy, &cluster.nodes[0], &args)
        .expect("kube-proxy --config=… --hostname-override=node1 starts");
    let healthz = cluster.nodes[0]
        .command("curl")
        .args(["--silent", "--fail", "--max-time", "5"])
        .arg("http://127.0.0.1:10256/healthz")
        .output()
        .unwrap();
    assert!(
        healthz.status.success(),
        "kube-proxy's /healthz (kubeadm's config leaves healthzBindAddress empty: 0.0.0.0:10256)"
    );

    // What the API server changes now, this proxy programs.
    cluster
        .kubectl(&["scale", "deployment", "hostname-deployment", "--replicas=5"])
        .unwrap();
    cluster
        .wait_for_answers(&cluster.toolbox, at(cluster_ip, 8080), 60, SETTLE, |pods| {
            pods.len() == 5
        })
        .unwrap();
    proxy
        .wait_for_log(
            "mode \"\": kube-ebpf-proxy programs its eBPF dataplane instead",
            Duration::from_secs(1),
        )
        .expect("kubeadm's mode is noted");
}
