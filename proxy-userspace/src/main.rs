//! The `kube-ebpf-proxy` binary: flags and subcommands; the work is in the library.

mod cmd;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use proxy_userspace::dataplane;

#[derive(Parser)]
#[command(
    name = "kube-ebpf-proxy",
    version,
    about = "A kube-proxy replacement that NATs Service traffic in eBPF"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the eBPF programs, pin their maps and attach them to this network namespace's
    /// interfaces, then run until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Print what the proxy will program: every Service port's frontends, per-source actions
    /// (forward/masquerade/reject/drop) and endpoint sets, from the same source flags as `run`.
    Plan(cmd::plan::PlanArgs),
    /// Print the dataplane's packet counters (summed over CPUs) from the pinned maps.
    Stats(StatsArgs),
}

#[derive(clap::Args)]
struct StatsArgs {
    /// Directory on bpffs where the running proxy pinned its maps.
    #[arg(long, default_value = "/sys/fs/bpf/kube-ebpf-proxy")]
    bpf_pin_path: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Directory on bpffs where the maps are pinned; several proxies on one machine (tests, the
    /// lab) each need their own.
    #[arg(long, default_value = "/sys/fs/bpf/kube-ebpf-proxy")]
    bpf_pin_path: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run(args).await,
        Command::Plan(args) => cmd::plan::plan(args).await,
        Command::Stats(args) => {
            for (name, value) in dataplane::read_counters(&args.bpf_pin_path)? {
                println!("{name} {value}");
            }
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut loaded = dataplane::load(&args.bpf_pin_path).context("loading the dataplane")?;
    let interfaces = dataplane::tc_interfaces()?;
    let attachments = dataplane::Attachments::attach_all(&mut loaded, &interfaces)
        .context("attaching the tc programs")?;
    tracing::info!(interfaces = ?attachments.interfaces, pin_path = %args.bpf_pin_path.display(), "programs attached");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping; pinned maps stay for the next start");
    Ok(())
}
