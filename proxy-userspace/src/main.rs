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
    Run(cmd::run::RunArgs),
    /// Print what the proxy will program: every Service port's frontends, per-source actions
    /// (forward/masquerade/reject/drop) and endpoint sets, from the same source flags as `run`.
    Plan(cmd::plan::PlanArgs),
    /// Print the dataplane's packet counters (summed over CPUs) and how many frontends,
    /// backends and flows the pinned maps hold.
    Stats(StatsArgs),
    /// Run synthetic first packets through the tc program (BPF_PROG_TEST_RUN) against the
    /// pinned maps and print what the kernel would do.
    Trace(TraceArgs),
}

#[derive(clap::Args)]
struct TraceArgs {
    #[arg(long, default_value = "/sys/fs/bpf/kube-ebpf-proxy")]
    bpf_pin_path: PathBuf,
    #[arg(long)]
    src: std::net::IpAddr,
    #[arg(long)]
    dst: std::net::IpAddr,
    #[arg(long)]
    dport: u16,
    #[arg(long, value_parser = ["tcp", "udp", "sctp"], default_value = "tcp")]
    proto: String,
    /// The interface index the packet arrives on (the ifindex local-traffic detector).
    #[arg(long, default_value_t = 0)]
    ingress_ifindex: u32,
    /// The source class: `node` sends from the node's address, `pod` from a local interface
    /// (ifindex detector) or checks that --src is a pod address (CIDR detector), `external`
    /// checks that --src is neither.
    #[arg(long, value_parser = ["pod", "node", "external"])]
    from: Option<String>,
    /// First packets to run; enough to see every backend of a random choice.
    #[arg(long, default_value_t = 64)]
    runs: u32,
    /// Output format.
    #[arg(short = 'o', long, value_parser = ["json", "text"], default_value = "text")]
    output: String,
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
            println!("conntrack_entries {}", maps.conntrack_entries()?.len());
            Ok(())
        }
        Command::Trace(args) => trace(&args),
    }
}

fn trace(args: &TraceArgs) -> anyhow::Result<()> {
    let loaded = dataplane::load(&args.bpf_pin_path).context("loading the dataplane")?;
    let mut maps = dataplane::Maps::open(&args.bpf_pin_path)?;
    let proto = match args.proto.as_str() {
        "udp" => proxy_common::IPPROTO_UDP,
        "sctp" => proxy_common::IPPROTO_SCTP,
        _ => proxy_common::IPPROTO_TCP,
    };
    let result = dataplane::trace(
        &loaded,
        &mut maps,
        &dataplane::TraceRequest {
            src: args.src,
            dst: args.dst,
            dport: args.dport,
            proto,
            ingress_ifindex: args.ingress_ifindex,
            runs: args.runs,
            from: args.from.as_deref().map(|from| match from {
                "pod" => dataplane::TraceFrom::Pod,
                "node" => dataplane::TraceFrom::Node,
                _ => dataplane::TraceFrom::External,
            }),
        },
    )?;
    if args.output == "json" {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!("verdict {:?}", result.verdict);
        for endpoint in &result.endpoints {
            println!("endpoint {endpoint}");
        }
        println!("masquerade {}", result.masquerade);
    }
    Ok(())
}
