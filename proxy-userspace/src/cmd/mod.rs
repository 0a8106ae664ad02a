//! The binary's subcommands. Each goes through the same source, model and maps as the others, so
//! `plan`, `trace` and `run` can never disagree.

pub mod inspect;
pub mod kube_proxy;
pub mod plan;
pub mod run;
pub mod trace;

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::Context as _;
use proxy_userspace::cluster::ClusterSnapshot;
use proxy_userspace::config::{ProxyConfig, ProxyFlags};
use proxy_userspace::controller::Interface;
use proxy_userspace::source;
use tokio::sync::watch;

/// Resolves the flags and config file, logging the warnings.
pub fn resolve(flags: &ProxyFlags) -> anyhow::Result<ProxyConfig> {
    let (config, warnings) = flags.resolve()?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    Ok(config)
}

/// The addresses on this network namespace's interfaces (NodePort addresses, masquerade source).
pub fn local_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let mut addrs: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .context("listing interface addresses")?
        .filter_map(|ifa| ifa.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// Starts the configured source (`--manifests DIR`, else the API server) publishing snapshots
/// on the returned channel; its first change is the first complete snapshot.
pub async fn start_source(
    config: &ProxyConfig,
) -> anyhow::Result<(
    watch::Receiver<Arc<ClusterSnapshot>>,
    tokio::task::JoinHandle<()>,
)> {
    let (tx, rx) = watch::channel(Arc::new(ClusterSnapshot::default()));
    let task = if let Some(dir) = &config.manifests {
        source::manifests::watch(dir.clone(), config.manifest_settings(), tx)
            .with_context(|| format!("watching manifests in {}", dir.display()))?
    } else {
        let client = kube_client(config).await?;
        tokio::spawn(source::kube::run(client, config.hostname.clone(), tx))
    };
    Ok((rx, task))
}

/// A client of the API server: `--kubeconfig` (with `--master` overriding its server), else the
/// in-cluster configuration.
pub async fn kube_client(config: &ProxyConfig) -> anyhow::Result<kube::Client> {
    let mut kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no --manifests and no Kubernetes configuration (in-cluster or ~/.kube/config)",
        )?,
    };
    if let Some(master) = &config.master {
        kube_config.cluster_url = master
            .parse()
            .with_context(|| format!("--master {master:?} is not a URL"))?;
    }
    kube::Client::try_from(kube_config).context("creating the API server client")
}

/// This network namespace's interfaces (for the interface-based local-traffic detectors).
pub fn local_interfaces() -> anyhow::Result<Vec<Interface>> {
    Ok(nix::net::if_::if_nameindex()
        .context("listing interfaces")?
        .iter()
        .map(|i| Interface {
            name: i.name().to_string_lossy().into_owned(),
            index: i.index(),
        })
        .collect())
}

/// Resolves the flags and takes the source's first complete snapshot (`plan`, `trace`).
pub async fn snapshot_once(
    flags: &ProxyFlags,
) -> anyhow::Result<(ProxyConfig, Arc<ClusterSnapshot>)> {
    let config = resolve(flags)?;
    let (mut rx, source) = start_source(&config).await?;
    let snapshot = first_snapshot(&mut rx).await;
    source.abort();
    Ok((config, snapshot?))
}

/// Waits for the first complete snapshot.
pub async fn first_snapshot(
    rx: &mut watch::Receiver<Arc<ClusterSnapshot>>,
) -> anyhow::Result<Arc<ClusterSnapshot>> {
    rx.changed()
        .await
        .context("the source stopped before its first snapshot")?;
    Ok(rx.borrow_and_update().clone())
}
