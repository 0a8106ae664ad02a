//! `kube-ebpf-proxy plan`: what the proxy will program for the cluster (or manifests) it sees.

use proxy_userspace::config::ProxyFlags;
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
    let config = super::resolve(&args.proxy)?;
    let (mut rx, source) = super::start_source(&config).await?;
    let snapshot = super::first_snapshot(&mut rx).await?;
    source.abort();
    let model_config = config.model_config(snapshot.node.as_ref(), &super::local_addresses()?);
    let state = model::compute(&snapshot, &model_config);
    if args.output == OutputFormat::Text {
        for a in &snapshot.allocations {
            println!("allocated {} {} = {}", a.object, a.field, a.value);
        }
    }
    print!("{}", model::render(&state, args.output));
    Ok(())
}
