//! `kube-ebpf-proxy plan`: what the proxy will program for the cluster (or manifests) it sees.

use proxy_userspace::config::ProxyFlags;
use proxy_userspace::controller;
use proxy_userspace::model::{self, OutputFormat};

#[derive(clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub proxy: ProxyFlags,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

pub async fn plan(args: PlanArgs) -> anyhow::Result<()> {
    let (config, snapshot) = super::snapshot_once(&args.proxy).await?;
    let (_, state) = controller::compute(&config, &snapshot, &super::local_addresses()?);
    if args.output == OutputFormat::Text {
        for a in &snapshot.allocations {
            println!("allocated {} {} = {}", a.object, a.field, a.value);
        }
    }
    print!("{}", model::render(&state, args.output));
    Ok(())
}
