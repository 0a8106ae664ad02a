//! Project tasks: `cargo xtask setup | build-ebpf | test | demo | lab | image | vm-test | bench`.

mod bench;
mod control_plane;
mod demo;
mod ebpf_build;
mod image;
mod kube_lab;
mod lab;
mod setup;
mod vm;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "kube-ebpf-proxy's build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (Debian packages, bpf-linker) and build the test control plane
    /// (etcd, kube-apiserver, kube-controller-manager, kubectl) once per machine; fast when all
    /// is there.
    Setup,
    /// Build the eBPF object and print its path.
    BuildEbpf,
    /// Run every check: formatting, clippy, the eBPF build, all tests (kernel tests need root),
    /// then the VM suites on Debian's 6.1 kernel.
    Test(TestArgs),
    /// Show the proxy at work in a network-namespace lab.
    Demo(demo::DemoArgs),
    /// A mini-cluster of network namespaces running the real proxy.
    Lab(lab::LabArgs),
    /// Build the release binary and write an OCI image archive of it (FROM scratch), for
    /// `podman load`, `docker load` or `ctr images import`.
    Image(image::ImageArgs),
    /// The kernel test suites on Debian's 6.1 and 6.12 kernels under qemu.
    VmTest(vm::VmTestArgs),
    /// Measure pod → ClusterIP traffic, cold start, changes and memory with N Services:
    /// direct, kube-proxy's iptables and nftables rules, ours with and without the fast path.
    /// Writes target/bench/bench.md and bench.png.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct TestArgs {
    /// Which Debian kernel the VM suites boot after the host suites (`all`: 6.1 and 6.12).
    #[arg(long, value_enum, default_value = "6.1")]
    vm_kernel: vm::KernelChoice,
    /// Skip the VM suites.
    #[arg(long)]
    no_vm: bool,
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => {
            setup::setup()?;
            control_plane::ensure().map(drop)
        }
        Task::BuildEbpf => {
            setup::setup()?;
            let object = build_ebpf()?;
            println!("{}", object.display());
            Ok(())
        }
        Task::Test(args) => test(&args),
        Task::Lab(args) => {
            setup::setup()?;
            lab::lab(args)
        }
        Task::Image(args) => {
            setup::setup()?;
            image::image(&args)
        }
        Task::VmTest(args) => {
            setup::setup()?;
            vm::vm_test(&args)
        }
        Task::Demo(args) => {
            setup::setup()?;
            demo::demo(&args)
        }
        Task::Bench(args) => {
            setup::setup()?;
            bench::bench(&args)
        }
    }
}

/// Builds the eBPF object and checks it is an eBPF ELF.
fn build_ebpf() -> anyhow::Result<PathBuf> {
    let object = ebpf_build::build_ebpf(&workspace_root()).map_err(anyhow::Error::msg)?;
    let out = Command::new("file")
        .arg(&object)
        .output()
        .context("running file")?;
    let description = String::from_utf8_lossy(&out.stdout);
    if !description.contains("eBPF") {
        bail!("{} is not an eBPF object: {description}", object.display());
    }
    Ok(object)
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// `cargo test` of the namespace Service suites, which `test` runs again through tunnels.
fn service_suites() -> Command {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-p",
        "proxy-userspace",
        "--test",
        "services",
        "--test",
        "traffic",
    ]);
    cmd
}

fn test(args: &TestArgs) -> anyhow::Result<()> {
    setup::setup()?;
    // The end-to-end tests run against it (tests/control-plane/).
    control_plane::ensure()?;
    setup::require_root(
        "the kernel tests (they load eBPF programs and create network namespaces)",
    )?;
    println!("test: cargo fmt --check");
    setup::run(cargo().args(["fmt", "--all", "--check"]))?;
    setup::run(cargo().args(["fmt", "--check", "--manifest-path", "proxy-ebpf/Cargo.toml"]))?;
    println!("test: cargo clippy -D warnings");
    setup::run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    println!("test: cargo xtask build-ebpf");
    let object = build_ebpf()?;
    println!("test: eBPF object {}", object.display());
    println!("test: cargo test --workspace");
    setup::run(cargo().args(["test", "--workspace"]))?;
    // The namespace Service suites once more on nodes with a host firewall dropping conntrack
    // INVALID packets and strict reverse-path filtering (proxy_lab::host).
    println!("test: Service suites on hardened nodes (firewall, rp_filter)");
    setup::run(
        cargo()
            .args(["test", "-p", "proxy-userspace"])
            .args(vm::HARDENED_TARGETS.iter().flat_map(|t| ["--test", t]))
            .env(proxy_lab::host::PROTECTIONS_VAR, vm::HARDENED_PROTECTIONS),
    )?;
    // Once more with the nodes' cross-node pod routes (and the single-node lab's client link)
    // through tunnels, so that traffic arrives on layer-3 devices (proxy_lab::node_link): the
    // kernel's ipip/sit devices where it has them, else tun devices.
    let tunnel = proxy_lab::node_link::NodeLink::kernel_tunnel()?;
    println!("test: Service suites through {} tunnels", tunnel.name());
    setup::run(service_suites().env(proxy_lab::node_link::NODE_LINK_VAR, tunnel.name()))?;
    println!("test: cargo xtask demo --check --bad-files");
    demo::demo(&demo::DemoArgs {
        check: true,
        keep: false,
        host_firewall: false,
        control_plane: false,
        bad_files: true,
    })?;
    println!("test: cargo xtask demo --check --host-firewall");
    demo::demo(&demo::DemoArgs {
        check: true,
        keep: false,
        host_firewall: true,
        control_plane: false,
        bad_files: false,
    })?;
    println!("test: cargo xtask demo --control-plane --check");
    demo::demo(&demo::DemoArgs {
        check: true,
        keep: false,
        host_firewall: false,
        control_plane: true,
        bad_files: false,
    })?;
    // Catches the bench breaking (rule generation, the five modes, the report), cheaply.
    println!("test: cargo xtask bench --services 10 --rounds 1 --changes 2 --quick");
    bench::bench(&bench::BenchArgs {
        services: vec![10],
        rounds: 1,
        changes: 2,
        quick: true,
    })?;
    if !args.no_vm {
        let suites = vm::ci_suites();
        println!(
            "test: cargo xtask vm-test (suites {}; left out for CI's time: {})",
            suites.join(" "),
            vm::LEFT_OUT_OF_CI.join(" ")
        );
        vm::vm_test(&vm::VmTestArgs {
            kernel: args.vm_kernel,
            suites,
            filter: None,
            accel: vm::Accel::Auto,
        })?;
    }
    println!("test: all checks passed");
    Ok(())
}
