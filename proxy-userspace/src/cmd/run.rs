//! `kube-ebpf-proxy run`: the flags; the daemon is the library's.

use proxy_userspace::config::ProxyFlags;
use proxy_userspace::daemon::{self, DataplaneFlags};

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub proxy: ProxyFlags,
    #[command(flatten)]
    pub dataplane: DataplaneFlags,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = super::resolve(&args.proxy)?;
    Ok(daemon::run(config, &args.dataplane).await?)
}
