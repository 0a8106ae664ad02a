//! The `kube-ebpf-proxy` binary: flags and subcommands; the work is in the library.

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
    /// Print the dataplane's packet counters (summed over CPUs) from the pinned maps.
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

#[derive(clap::Args)]
struct RunArgs {
    /// Directory on bpffs where the maps are pinned; several proxies on one machine (tests, the
    /// lab) each need their own.
    #[arg(long, default_value = "/sys/fs/bpf/kube-ebpf-proxy")]
    bpf_pin_path: PathBuf,
    /// Which interfaces get the tc program: comma-separated name patterns with `*`, `!`
    /// excludes (e.g. `eth*,veth*,!veth-mgmt`). Default: every interface but loopback.
    #[arg(long, default_value = "")]
    interfaces: String,
    /// The cgroup v2 directory the socket hooks (host-originated traffic) attach to. Default:
    /// the cgroup2 mount root.
    #[arg(long)]
    cgroup_path: Option<PathBuf>,
    /// The node's addresses (one per family) used as the masquerade source and to recognise
    /// node-originated packets.
    #[arg(long = "node-ip")]
    node_ips: Vec<std::net::IpAddr>,
    /// SNAT source port range MIN-MAX. The default lies above Linux's default ephemeral range
    /// (32768-60999) and outside the NodePort range, so no local socket or NodePort shares a
    /// port with a masqueraded flow; a custom range should be reserved with
    /// net.ipv4.ip_local_reserved_ports.
    #[arg(long, default_value = "61000-65535")]
    snat_ports: String,
    /// Log every new flow's decision from the kernel (aya-log).
    #[arg(long)]
    bpf_debug: bool,
    /// Conntrack map size (entries); takes effect when the map is created.
    #[arg(long, default_value_t = proxy_common::CONNTRACK_MAX_ENTRIES)]
    conntrack_max: u32,
    /// Services map size (entries); takes effect when the map is created.
    #[arg(long, default_value_t = proxy_common::SERVICES_MAX_ENTRIES)]
    services_max: u32,
    /// Backends map size (entries); takes effect when the map is created.
    #[arg(long, default_value_t = proxy_common::BACKENDS_MAX_ENTRIES)]
    backends_max: u32,
    /// Seconds between conntrack garbage collections.
    #[arg(long, default_value_t = 10)]
    gc_interval: u64,
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
        Command::Stats(args) => {
            for (name, value) in dataplane::read_counters(&args.bpf_pin_path)? {
                println!("{name} {value}");
            }
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

/// Counters of conditions an operator must hear about (the kernel can only count them).
const FAILURE_COUNTERS: [proxy_common::Counter; 4] = [
    proxy_common::Counter::CtMapFull,
    proxy_common::Counter::SnatExhausted,
    proxy_common::Counter::NoSnatAddress,
    proxy_common::Counter::SctpPortRewrite,
];

/// Logs the failure counters that grew since the last call.
fn warn_on_failure_counters(
    pin_path: &std::path::Path,
    seen: &mut std::collections::HashMap<&'static str, u64>,
) {
    let Ok(counters) = dataplane::read_counters(pin_path) else {
        return;
    };
    for (name, value) in counters {
        if !FAILURE_COUNTERS.iter().any(|c| c.name() == name) {
            continue;
        }
        let before = seen.insert(name, value).unwrap_or(0);
        if value > before {
            tracing::warn!(
                counter = name,
                new = value - before,
                total = value,
                "dataplane failures"
            );
        }
    }
}

fn parse_port_range(range: &str) -> anyhow::Result<(u16, u16)> {
    let (min, max) = range
        .split_once('-')
        .with_context(|| format!("--snat-ports {range}: expected MIN-MAX"))?;
    let (min, max): (u16, u16) = (min.trim().parse()?, max.trim().parse()?);
    anyhow::ensure!(min > 0 && min <= max, "--snat-ports {range}: empty range");
    Ok((min, max))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let sizes = dataplane::MapSizes {
        conntrack: args.conntrack_max,
        services: args.services_max,
        backends: args.backends_max,
        ..dataplane::MapSizes::default()
    };
    let mut loaded =
        dataplane::load_with_sizes(&args.bpf_pin_path, &sizes).context("loading the dataplane")?;
    let mut maps = dataplane::Maps::open(&args.bpf_pin_path)?;
    let (snat_min, snat_max) = parse_port_range(&args.snat_ports)?;
    let cookie = dataplane::netns_cookie()?;
    maps.update_config(|config| {
        config.netns_cookie = cookie;
        config.snat_port_min = snat_min;
        config.snat_port_max = snat_max;
        for ip in &args.node_ips {
            let (addr, family) = dataplane::addr_from_ip(*ip);
            if family == proxy_common::FAMILY_IPV4 {
                config.node_ipv4 = addr;
            } else {
                config.node_ipv6 = addr;
            }
        }
        if args.bpf_debug {
            config.flags |= proxy_common::CONFIG_F_DEBUG;
        } else {
            config.flags &= !proxy_common::CONFIG_F_DEBUG;
        }
    })?;
    if args.bpf_debug {
        match aya_log::EbpfLogger::init(&mut loaded.ebpf) {
            Ok(logger) => {
                // SAFETY: the logger owns its ring-buffer descriptor for its whole life and
                // always reports that same descriptor; the AsyncFd owns the logger.
                let mut logger = unsafe { tokio::io::unix::AsyncFd::register(logger) }
                    .map_err(|e| anyhow::anyhow!("registering the kernel log buffer: {e}"))?;
                tokio::spawn(async move {
                    loop {
                        let Ok(mut guard) = logger.readable_mut().await else {
                            break;
                        };
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "kernel debug logging unavailable"),
        }
    }
    dataplane::accept_local_sources().context("enabling accept_local")?;
    let filter = dataplane::InterfaceFilter::parse(&args.interfaces);
    let mut attachments = dataplane::Attachments::default();
    attachments
        .sync(&mut loaded, &filter)
        .context("attaching the tc programs")?;
    let cgroup = match &args.cgroup_path {
        Some(path) => path.clone(),
        None => dataplane::cgroup2_root()?,
    };
    dataplane::attach_socket_hooks(&mut loaded, &cgroup).context("attaching the socket hooks")?;
    tracing::info!(interfaces = ?attachments.interfaces, cgroup = %cgroup.display(), pin_path = %args.bpf_pin_path.display(), "programs attached");

    // Link events arrive on a blocking netlink socket: a thread turns them into wakeups.
    let (link_tx, mut link_rx) = tokio::sync::mpsc::channel::<()>(1);
    let watcher = dataplane::LinkWatcher::new()?;
    std::thread::spawn(move || {
        loop {
            match watcher.wait(std::time::Duration::from_secs(1)) {
                Ok(true) => {
                    if link_tx.blocking_send(()).is_err() {
                        break;
                    }
                }
                Ok(false) => {
                    if link_tx.is_closed() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "link watcher stopped");
                    break;
                }
            }
        }
    });
    let timeouts = dataplane::CtTimeouts::default();
    let mut failures_seen = std::collections::HashMap::new();
    let mut gc = tokio::time::interval(std::time::Duration::from_secs(args.gc_interval.max(1)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            Some(()) = link_rx.recv() => {
                match attachments.sync(&mut loaded, &filter) {
                    Ok((added, removed)) if !added.is_empty() || !removed.is_empty() => {
                        tracing::info!(?added, ?removed, "interfaces changed");
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "syncing tc attachments"),
                }
            }
            _ = gc.tick() => {
                match dataplane::collect_garbage(&mut maps, &timeouts) {
                    Ok(stats) => tracing::debug!(?stats, "conntrack gc"),
                    Err(error) => tracing::warn!(%error, "conntrack gc"),
                }
                warn_on_failure_counters(&args.bpf_pin_path, &mut failures_seen);
            }
        }
    }
    tracing::info!("stopping; pinned maps stay for the next start");
    Ok(())
}
