//! `cargo xtask setup`: installs what building and testing need, idempotently. Every check is a
//! local file or `dpkg-query` look-up, so a machine that has everything passes in well under a
//! second; only what is missing is installed.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

/// Debian packages: the eBPF compiler (rustc-web with the `core` sources for build-std), LLVM 22
/// for bpf-linker, and the tools the namespace lab and tests use. (Go, for the test control
/// plane, comes with the machine: see xtask/src/control_plane.rs.)
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "rust-web-src",
    "cargo-web",
    "llvm-22-dev",
    "iproute2",
    "util-linux",
    "nftables",
    "curl",
    "file",
    // Certificates and keys of the test control plane.
    "openssl",
    // Reads the image archive `cargo xtask image` writes (its test checks it loads).
    "skopeo",
    // `cargo xtask bench`: kube-proxy's iptables-mode rules (iptables-nft-restore), and the
    // chart's text (plotters finds a font through fontconfig, loaded at run time).
    "iptables",
    "libfontconfig1",
    "fonts-dejavu-core",
];

pub const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> anyhow::Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("kube-ebpf-proxy builds and runs on Linux only");
    }
    install_missing(APT_PACKAGES)?;
    if bpf_linker_version().as_deref() != Some(BPF_LINKER_VERSION) {
        println!("setup: installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22, about a minute)");
        run(Command::new("cargo")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
            ])
            .args(["--no-default-features", "--features", "llvm-22"]))?;
    }
    for component in ["rustfmt", "clippy-driver"] {
        if Command::new(component).arg("--version").output().is_err() {
            bail!("{component} is missing: install it with `rustup component add rustfmt clippy`");
        }
    }
    println!("setup: toolchain ready (rustc-web, bpf-linker {BPF_LINKER_VERSION}, LLVM 22)");
    Ok(())
}

/// Installs the Debian packages of `packages` that are not installed yet.
pub fn install_missing(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        require_root(&format!("installing {}", missing.join(" ")))?;
        println!("setup: installing Debian packages: {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))?;
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY-free: reading the effective uid through /proc keeps xtask free of libc.
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

pub fn require_root(why: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{why} needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN): run as root, e.g. `sudo -E cargo xtask …`"
        );
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn bpf_linker_path() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin").join("bpf-linker"))
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new(bpf_linker_path()?)
        .arg("--version")
        .output()
        .ok()?;
    // "bpf-linker 0.13.0"
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
