//! The first kernel test: the real binary loads the programs, attaches them inside a namespace
//! this test creates, and packets sent through the veth are counted by the program.

use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;

use proxy_lab::{Cgroup, ManifestsDir, Netns, PinDir, Proxy, run, unique_name, veth};

const BINARY: &str = env!("CARGO_BIN_EXE_kube-ebpf-proxy");

fn tc_ingress_packets(pin_dir: &PinDir) -> u64 {
    let out = run(Command::new(BINARY)
        .args(["stats", "--bpf-pin-path"])
        .arg(pin_dir.path()))
    .expect("kube-ebpf-proxy stats");
    out.lines()
        .find_map(|l| l.strip_prefix("tc_ingress_packets "))
        .expect("stats prints tc_ingress_packets")
        .trim()
        .parse()
        .expect("a number")
}

/// Datagrams the client sends.
const SENT: u64 = 20;

#[test]
fn tc_program_counts_packets_sent_through_a_veth() {
    let node = Netns::new("n").unwrap();
    let client = Netns::new("c").unwrap();
    let (node_if, client_if) = (unique_name("a"), unique_name("b"));
    veth(
        &node,
        &node_if,
        &["192.0.2.1/24"],
        &client,
        &client_if,
        &["192.0.2.2/24"],
    )
    .unwrap();
    let pins = PinDir::new();
    let cgroup = Cgroup::new().unwrap();
    let manifests = ManifestsDir::new().unwrap();
    let _proxy = Proxy::start(
        Path::new(BINARY),
        &node,
        &pins,
        &[
            "--cgroup-path",
            cgroup.path().to_str().unwrap(),
            "--manifests",
            manifests.path().to_str().unwrap(),
            "--hostname-override",
            "node",
        ],
    )
    .unwrap();

    let before = tc_ingress_packets(&pins);
    client
        .enter(|| {
            let socket = UdpSocket::bind("192.0.2.2:0").unwrap();
            for _ in 0..SENT {
                socket.send_to(b"hello", "192.0.2.1:9").unwrap();
            }
        })
        .unwrap();
    // The sends are synchronous through the veth into the node's ingress hook, so the counter
    // is up to date once they return; allow a moment for ARP resolution queuing.
    let mut seen = 0;
    for _ in 0..50 {
        seen = tc_ingress_packets(&pins) - before;
        if seen >= SENT {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        seen >= SENT,
        "the tc program saw {seen} packets, {SENT} were sent"
    );
}
