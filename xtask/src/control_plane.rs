//! Builds the test control plane (etcd, kube-apiserver, kube-controller-manager, kubectl) from
//! the Go module in `tests/control-plane/`, once per machine: the binaries go into a cache
//! directory keyed by the versions (`proxy_lab::control_plane::Versions::cache_dir`), which
//! later runs, other checkouts and CI on the same machine reuse.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use proxy_lab::control_plane::{BINARIES, Binaries, Versions, go_module_dir};

use crate::setup;

/// The cached control plane, built first if it is missing.
pub fn ensure() -> anyhow::Result<Binaries> {
    let versions = Versions::of_module()?;
    if let Ok(binaries) = Binaries::cached() {
        println!(
            "setup: control plane (kubernetes {}, etcd {}) cached in {}",
            versions.kubernetes,
            versions.etcd,
            binaries.dir.display()
        );
        return Ok(binaries);
    }
    let go = Command::new("go").arg("version").output();
    if !go.is_ok_and(|out| out.status.success()) {
        bail!(
            "building the test control plane needs Go (the version tests/control-plane/go.mod names): install it from https://go.dev/dl"
        );
    }
    let dir = versions.cache_dir();
    let partial = dir.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    println!(
        "setup: building the test control plane (kubernetes {}, etcd {}) with Go into {}; a cold build (empty Go caches) takes about 20 minutes on a busy 2-core machine",
        versions.kubernetes,
        versions.etcd,
        dir.display()
    );
    let started = Instant::now();
    // kubectl and the servers report this version (the linker stamps it, as Kubernetes' own
    // build does); the staging modules would otherwise say v0.0.0.
    let minor = versions
        .kubernetes
        .split('.')
        .nth(1)
        .context("kubernetes version vMAJOR.MINOR.PATCH")?;
    let ldflags = format!(
        "-s -w -X k8s.io/component-base/version.gitVersion={kube} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor={minor} -X k8s.io/client-go/pkg/version.gitVersion={kube}",
        kube = versions.kubernetes
    );
    let mut out_dir = partial.clone().into_os_string();
    out_dir.push("/");
    setup::run(
        Command::new("nice")
            .args([
                "-n",
                "5",
                "go",
                "build",
                "-trimpath",
                "-ldflags",
                &ldflags,
                "-o",
            ])
            .arg(&out_dir)
            // Every `tool` directive of the module: the upstream main packages.
            .arg("tool")
            .current_dir(go_module_dir()),
    )?;
    // etcd's main package is the module go.etcd.io/etcd/server/v3, which Go names `server`.
    let etcd = partial.join("server");
    std::fs::rename(&etcd, partial.join("etcd"))
        .with_context(|| format!("renaming {}", etcd.display()))?;
    for binary in BINARIES {
        if !partial.join(binary).is_file() {
            bail!(
                "the Go build did not produce {binary} in {}",
                partial.display()
            );
        }
    }
    std::fs::rename(&partial, &dir)
        .with_context(|| format!("moving {} to {}", partial.display(), dir.display()))?;
    println!(
        "setup: control plane built in {:.1} minutes (later runs reuse {})",
        started.elapsed().as_secs_f64() / 60.0,
        dir.display()
    );
    Binaries::cached().map_err(Into::into)
}
