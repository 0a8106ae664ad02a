//! `kube-ebpf-proxy plan`: what the proxy will program for the cluster (or manifests) it sees.

use proxy_userspace::config::ProxyFlags;
use proxy_userspace::model;
use proxy_userspace::{controller, daemon};

/// `kube-ebpf-proxy plan -o <format>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Human-readable: per service port, its frontends and per-source actions, endpoint sets.
    Text,
    /// The `DesiredState` as JSON, for tools.
    Json,
}

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
    let snapshot = daemon::snapshot_once(&config).await?;
    let (_, state) = controller::compute(&config, &snapshot, &daemon::local_addresses()?);
    match args.output {
        OutputFormat::Text => {
            for a in &snapshot.allocations {
                println!("allocated {} {} = {}", a.object, a.field, a.value);
            }
            print!("{}", model::render_text(&state));
        }
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&state)?),
    }
    Ok(())
}
