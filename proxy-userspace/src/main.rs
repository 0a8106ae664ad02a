//! The `kube-ebpf-proxy` binary: flags and subcommands; the work is in the library.

mod cmd;

use std::path::PathBuf;

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
    Run(cmd::run::RunArgs),
    /// Print what the proxy will program: every Service port's frontends, per-source actions
    /// (forward/masquerade/reject/drop) and endpoint sets, from the same source flags as `run`.
    Plan(cmd::plan::PlanArgs),
    /// Print the dataplane's packet counters (summed over CPUs) and how many frontends,
    /// backends and flows the pinned maps hold.
    Stats(StatsArgs),
    /// Run synthetic first packets through the tc program (BPF_PROG_TEST_RUN) against the
    /// Services of the source flags (programmed into private maps, as `run` would) or a running
    /// proxy's pinned maps (`--bpf-pin-path`), and print what the kernel would do.
    Trace(cmd::trace::TraceArgs),
    /// Remove every program, link, map and pin the proxy owns (kube-proxy's `--cleanup`):
    /// stopping the proxy leaves them in place so the next start takes over without a gap.
    Cleanup(CleanupArgs),
    /// Probe the kernel features the dataplane looks for (TCX, bpf_set_retval for socket hooks,
    /// batch map operations, …) and print one `name offered` line each, as `run` logs them.
    Features,
}

#[derive(clap::Args)]
struct CleanupArgs {
    /// Directory on bpffs where the proxy pinned its maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/kube-ebpf-proxy")]
    bpf_pin_path: PathBuf,
}

#[derive(clap::Args)]
struct StatsArgs {
    /// Directory on bpffs where the running proxy pinned its maps.
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
        Command::Run(args) => cmd::run::run(args).await,
        Command::Plan(args) => cmd::plan::plan(args).await,
        Command::Stats(args) => {
            for (name, value) in dataplane::read_counters(&args.bpf_pin_path)? {
                println!("{name} {value}");
            }
            // What is programmed: frontends (slot-0 entries), backends, live flows.
            let maps = dataplane::Maps::open(&args.bpf_pin_path)?;
            let services = maps.service_entries()?;
            let frontends = services.iter().filter(|(k, _)| k.slot == 0).count();
            println!("programmed_frontends {frontends}");
            println!("programmed_backend_slots {}", services.len() - frontends);
            println!("programmed_backends {}", maps.backend_entries()?.len());
            let conntrack = maps.conntrack_entries()?;
            println!("conntrack_entries {}", conntrack.len());
            println!("conntrack_max_entries {}", maps.conntrack_max_entries()?);
            println!(
                "conntrack_orphan_entries {}",
                dataplane::orphan_entries(&conntrack)
            );
            Ok(())
        }
        Command::Trace(args) => cmd::trace::trace(args).await,
        Command::Features => {
            for (name, offered) in dataplane::KernelFeatures::get().list() {
                println!("{name} {}", if offered { "yes" } else { "no" });
            }
            Ok(())
        }
        Command::Cleanup(args) => {
            let cleaned = dataplane::cleanup(&args.bpf_pin_path)?;
            tracing::info!(
                links = cleaned.links,
                filters = ?cleaned.filters,
                pins = cleaned.pins,
                pin_path = %args.bpf_pin_path.display(),
                "cleaned up"
            );
            Ok(())
        }
    }
}
