//! `cargo xtask demo`: until the Service tutorial lab lands, the smallest honest demonstration:
//! the real proxy in a namespace counting real packets sent to it through a veth.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use proxy_lab::{Netns, PinDir, Proxy, unique_name, veth};

use crate::{cargo, setup, workspace_root};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Assert what the demo shows instead of only printing it (what `cargo xtask test` runs).
    #[arg(long)]
    pub check: bool,
}

fn proxy_binary() -> anyhow::Result<PathBuf> {
    setup::run(cargo().args([
        "build",
        "--quiet",
        "-p",
        "proxy-userspace",
        "--bin",
        "kube-ebpf-proxy",
    ]))?;
    Ok(workspace_root().join("target/debug/kube-ebpf-proxy"))
}

fn tc_ingress_packets(binary: &Path, pins: &PinDir) -> anyhow::Result<u64> {
    let out = Command::new(binary)
        .args(["stats", "--bpf-pin-path"])
        .arg(pins.path())
        .output()
        .context("running kube-ebpf-proxy stats")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("tc_ingress_packets "))
        .context("stats printed no tc_ingress_packets")?
        .trim()
        .parse()
        .context("tc_ingress_packets is not a number")
}

/// Datagrams the client sends.
const SENT: u64 = 10;

pub fn demo(args: &DemoArgs) -> anyhow::Result<()> {
    setup::require_root("the demo (it loads eBPF programs and creates network namespaces)")?;
    let binary = proxy_binary()?;
    println!("demo: a 'node' and a 'client' network namespace joined by a veth pair");
    let node = Netns::new("n")?;
    let client = Netns::new("c")?;
    let (node_if, client_if) = (unique_name("a"), unique_name("b"));
    veth(
        &node,
        &node_if,
        &["192.0.2.1/24"],
        &client,
        &client_if,
        &["192.0.2.2/24"],
    )?;
    let pins = PinDir::new();
    println!(
        "demo: starting kube-ebpf-proxy in {} (maps pinned at {})",
        node.name(),
        pins.path().display()
    );
    let _proxy = Proxy::start(&binary, &node, &pins, &[])?;
    let before = tc_ingress_packets(&binary, &pins)?;
    println!("demo: the client sends {SENT} UDP datagrams to the node at 192.0.2.1");
    client.enter(|| -> std::io::Result<()> {
        let socket = UdpSocket::bind("192.0.2.2:0")?;
        for _ in 0..SENT {
            socket.send_to(b"hello", "192.0.2.1:9")?;
        }
        Ok(())
    })??;
    std::thread::sleep(std::time::Duration::from_millis(100));
    let seen = tc_ingress_packets(&binary, &pins)? - before;
    println!(
        "demo: the proxy's tc program counted {seen} packets on {node_if} (kube-ebpf-proxy stats)"
    );
    if args.check && seen < SENT {
        bail!("demo check failed: {SENT} datagrams sent, {seen} counted");
    }
    println!("demo: done; namespaces and pinned maps are removed");
    Ok(())
}
