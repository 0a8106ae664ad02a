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

use proxy_lab::kube_cluster::{KubeCluster, node_ip};

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
    let cluster = KubeCluster::start(Path::new(BINARY), nodes).expect("the cluster starts");
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
