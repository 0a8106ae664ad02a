//! Builds the eBPF object with the same code `cargo xtask build-ebpf` uses and copies it into
//! `OUT_DIR`, so the `kube-ebpf-proxy` binary embeds its programs and is self-contained.

#[path = "../xtask/src/ebpf_build.rs"]
mod ebpf_build;

use std::path::PathBuf;

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest_dir
        .parent()
        .expect("the crate lives in the workspace")
        .to_owned();
    for watched in [
        "proxy-ebpf/src",
        "proxy-ebpf/Cargo.toml",
        "proxy-ebpf/Cargo.lock",
        "proxy-common/src",
        "proxy-common/Cargo.toml",
        "xtask/src/ebpf_build.rs",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let object = match ebpf_build::build_ebpf(&root) {
        Ok(object) => object,
        Err(e) => panic!("cannot build the eBPF programs: {e}"),
    };
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it")).join("proxy-ebpf.o");
    std::fs::copy(&object, &out).unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
}
