//! Starting the configured source: `--manifests DIR`, else the API server.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use crate::cluster::ClusterSnapshot;
use crate::config::ProxyConfig;
use crate::source;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("watching manifests in {dir}: {source}")]
    Manifests {
        dir: PathBuf,
        source: source::manifests::ManifestError,
    },
    #[error("reading kubeconfig {path}: {source}")]
    ReadKubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("loading kubeconfig {path}: {source}")]
    LoadKubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("no --manifests and no Kubernetes configuration (in-cluster or ~/.kube/config): {0}")]
    NoConfiguration(#[source] kube::config::InferConfigError),
    #[error("--master {0:?} is not a URL")]
    Master(String),
    #[error("creating the API server client: {0}")]
    Client(#[source] kube::Error),
    #[error("the source stopped before its first snapshot")]
    Stopped,
}

/// A source publishing snapshots: its channel (whose first change is the first complete
/// snapshot) and its task.
pub type Started = (
    watch::Receiver<Arc<ClusterSnapshot>>,
    tokio::task::JoinHandle<()>,
);

/// Starts the configured source publishing snapshots on the returned channel.
pub async fn start(config: &ProxyConfig) -> Result<Started, SourceError> {
    let (tx, rx) = watch::channel(Arc::new(ClusterSnapshot::default()));
    let task = if let Some(dir) = &config.manifests {
        source::manifests::watch(dir.clone(), config.manifest_settings(), tx).map_err(|source| {
            SourceError::Manifests {
                dir: dir.clone(),
                source,
            }
        })?
    } else {
        let client = kube_client(config).await?;
        tokio::spawn(source::kube::run(client, config.hostname.clone(), tx))
    };
    Ok((rx, task))
}

/// A client of the API server: `--kubeconfig` (with `--master` overriding its server), else the
/// in-cluster configuration.
pub async fn kube_client(config: &ProxyConfig) -> Result<kube::Client, SourceError> {
    let mut kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                SourceError::ReadKubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|source| SourceError::LoadKubeconfig {
                path: path.clone(),
                source,
            })?
        }
        None => kube::Config::infer()
            .await
            .map_err(SourceError::NoConfiguration)?,
    };
    if let Some(master) = &config.master {
        kube_config.cluster_url = master
            .parse()
            .map_err(|_| SourceError::Master(master.clone()))?;
    }
    kube::Client::try_from(kube_config).map_err(SourceError::Client)
}

/// Waits for the first complete snapshot.
pub async fn first_snapshot(
    rx: &mut watch::Receiver<Arc<ClusterSnapshot>>,
) -> Result<Arc<ClusterSnapshot>, SourceError> {
    rx.changed().await.map_err(|_| SourceError::Stopped)?;
    Ok(rx.borrow_and_update().clone())
}

/// The source's first complete snapshot, the source stopped after it (`plan`, `trace`).
pub async fn snapshot_once(config: &ProxyConfig) -> Result<Arc<ClusterSnapshot>, SourceError> {
    let (mut rx, source) = start(config).await?;
    let snapshot = first_snapshot(&mut rx).await;
    source.abort();
    snapshot
}
