//! Builds the eBPF object. Shared, by `#[path]`, between `cargo xtask build-ebpf` and the
//! build script of `proxy-userspace` (which embeds the object), so there is one way to build it.
//! Only `std` is used here because build scripts have no other dependencies.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's `rustc-web` compiler: it ships the `bpfel-unknown-none` target's LLVM backend and,
/// with `rust-web-src`, the `core` sources that `-Z build-std` needs.
pub const BPF_RUSTC: &str = "/usr/bin/rustc";
pub const BPF_CARGO: &str = "/usr/bin/cargo";
pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// Where the eBPF crate's own target directory lives, below the workspace's `target/`.
pub fn ebpf_target_dir(workspace_root: &Path) -> PathBuf {
    workspace_root.join("target").join("bpf")
}

/// The object `cargo build` leaves for the eBPF crate.
pub fn ebpf_object_path(workspace_root: &Path) -> PathBuf {
    ebpf_target_dir(workspace_root)
        .join(BPF_TARGET)
        .join("release")
        .join("proxy-ebpf")
}

/// Directory holding `bpf-linker` (installed by `cargo xtask setup` with `cargo install`).
fn cargo_bin_dir() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin"))
}

/// Builds `proxy-ebpf` and returns the path of the ELF object.
pub fn build_ebpf(workspace_root: &Path) -> Result<PathBuf, String> {
    for tool in [BPF_RUSTC, BPF_CARGO] {
        if !Path::new(tool).exists() {
            return Err(format!(
                "{tool} is missing: the eBPF crate is built with Debian's rustc-web; run `cargo xtask setup`"
            ));
        }
    }
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(bin) = cargo_bin_dir() {
        if !bin.join("bpf-linker").exists() && !which("bpf-linker", &path) {
            return Err("bpf-linker is missing; run `cargo xtask setup`".to_owned());
        }
        let mut dirs = vec![bin];
        dirs.extend(std::env::split_paths(&path));
        path = std::env::join_paths(dirs).map_err(|e| e.to_string())?;
    }
    let mut cmd = Command::new(BPF_CARGO);
    // The outer cargo (a build script's, or rustup's) sets variables that would point the inner
    // build at the host toolchain or at clippy: start the inner one from a clean slate.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTUP")
            || key.starts_with("RUSTDOC")
            || key == "RUSTFLAGS"
            || key == "CLIPPY_ARGS"
        {
            cmd.env_remove(&key);
        }
    }
    cmd.current_dir(workspace_root.join("proxy-ebpf"))
        .env("PATH", path)
        .env("RUSTC", BPF_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["build", "--release", "--locked", "--target", BPF_TARGET])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(ebpf_target_dir(workspace_root));
    let status = cmd
        .status()
        .map_err(|e| format!("running {BPF_CARGO}: {e}"))?;
    if !status.success() {
        return Err(format!("building the eBPF crate failed ({status})"));
    }
    let object = ebpf_object_path(workspace_root);
    if !object.exists() {
        return Err(format!(
            "the eBPF build left no object at {}",
            object.display()
        ));
    }
    Ok(object)
}

fn which(tool: &str, path: &std::ffi::OsStr) -> bool {
    std::env::split_paths(path).any(|dir| dir.join(tool).exists())
}
