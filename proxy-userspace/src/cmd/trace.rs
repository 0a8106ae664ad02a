//! `kube-ebpf-proxy trace`: what the kernel does with a connection's first packet.
//!
//! From the source flags (`--manifests DIR`, or the API server), the Services are computed and
//! programmed exactly as `run` programs them, but into a private set of maps pinned in a fresh
//! directory that is removed afterwards; the real tc program then runs synthetic first packets
//! against them (`BPF_PROG_TEST_RUN`). With `--bpf-pin-path` it traces against the maps a
//! running proxy pinned there instead, through the very tc program that proxy attached (pinned
//! under `programs/`; no verifier pass), or the one it would load when none is pinned.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use proxy_userspace::config::ProxyFlags;
use proxy_userspace::controller::{Controller, DataplaneSettings, Event, SyncKind};
use proxy_userspace::dataplane::{
    self, Maps, ProgramOrigin, TraceFrom, TraceRequest, TraceResult, TraceTarget,
};

use proxy_userspace::daemon::{self, DEFAULT_SNAT_PORTS};

#[derive(clap::Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub proxy: ProxyFlags,
    /// Trace against the maps a running proxy pinned in this directory, instead of programming
    /// the source's Services into private maps.
    #[arg(long, conflicts_with = "manifests")]
    pub bpf_pin_path: Option<PathBuf>,
    #[arg(long)]
    pub src: IpAddr,
    #[arg(long)]
    pub dst: IpAddr,
    #[arg(long)]
    pub dport: u16,
    #[arg(long, value_parser = ["tcp", "udp", "sctp"], default_value = "tcp")]
    pub proto: String,
    /// Where the packet comes from, as the kernel classifies it: `node` (sent from the node's
    /// address), `pod` (the local-traffic detector must match --src, or it arrives on a pod
    /// interface; without a detector no source is a pod, and the trace says so and traces
    /// --src as external), `external` (--src must be neither). A contradictory --src is an
    /// error. Default: --src as given.
    #[arg(long, value_enum)]
    pub from: Option<Origin>,
    /// First packets to run; enough to see every backend of a random choice.
    #[arg(long, default_value_t = 64)]
    pub runs: u32,
    /// Output format.
    #[arg(short = 'o', long, value_parser = ["json", "text"], default_value = "text")]
    pub output: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Origin {
    Pod,
    Node,
    External,
}

/// No programmed detector interface has index 0: a packet "arriving" there is not pod traffic.
const NOT_A_POD_INTERFACE: u32 = 0;

/// Conntrack entries of the private maps: a trace creates at most two per run.
const TRACE_CONNTRACK_ENTRIES: u32 = 4096;

/// A fresh pin directory under `/sys/fs/bpf`, removed (with the maps pinned in it) on drop, so
/// an error half-way leaves nothing behind.
struct PrivatePinDir(PathBuf);

impl PrivatePinDir {
    fn new() -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("reading the clock")?
            .as_nanos();
        Ok(Self(PathBuf::from(format!(
            "/sys/fs/bpf/kube-ebpf-proxy-trace-{}-{nanos}",
            std::process::id()
        ))))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivatePinDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.0)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, path = %self.0.display(), "removing the trace's pinned maps");
        }
    }
}

pub async fn trace(args: TraceArgs) -> anyhow::Result<()> {
    let proto = match args.proto.as_str() {
        "udp" => proxy_common::IPPROTO_UDP,
        "sctp" => proxy_common::IPPROTO_SCTP,
        _ => proxy_common::IPPROTO_TCP,
    };
    let result = if let Some(pin_path) = &args.bpf_pin_path {
        let mut maps = Maps::open(pin_path)?;
        if let Some(program) = dataplane::pinned_tc_ingress(pin_path)? {
            let target = TraceTarget {
                program: &program,
                origin: ProgramOrigin::Pinned,
                pin_path,
            };
            run_trace(&args, proto, &target, &mut maps)?
        } else {
            // No proxy attached to these maps yet: the program it would load.
            let loaded = dataplane::load(pin_path).with_context(|| {
                format!("loading the dataplane pinned in {}", pin_path.display())
            })?;
            run_trace(&args, proto, &loaded.trace_target()?, &mut maps)?
        }
    } else {
        let config = super::resolve(&args.proxy)?;
        let snapshot = daemon::snapshot_once(&config).await?;
        // Declared before the loaded object, so it is dropped (and the pins removed) after it.
        let pin_dir = PrivatePinDir::new()?;
        let sizes = dataplane::MapSizes {
            conntrack: TRACE_CONNTRACK_ENTRIES,
            ..dataplane::MapSizes::default()
        };
        let loaded = dataplane::load_with_sizes(pin_dir.path(), &sizes)
            .context("loading the dataplane into private maps")?;
        let settings = DataplaneSettings {
            netns_cookie: dataplane::netns_cookie()?,
            snat_ports: DEFAULT_SNAT_PORTS,
            debug: false,
            // Test runs have no interface to deliver a translated packet to.
            fast_path: false,
        };
        let maps = Maps::open(pin_dir.path())?;
        let mut controller = Controller::new(config, settings, maps, SystemTime::now())
            .context("reading the fresh maps")?;
        controller.handle(Event::Snapshot(snapshot));
        controller.handle(Event::LocalAddresses(daemon::local_addresses()?));
        controller.handle(Event::Interfaces(daemon::local_interfaces()?));
        let synced = controller
            .sync(SyncKind::Changes)
            .context("programming the private maps")?;
        for diagnostic in &synced.state.diagnostics {
            tracing::warn!("{}: {}", diagnostic.object, diagnostic.message);
        }
        if !synced.report.errors.is_empty() {
            let errors: Vec<String> = synced
                .report
                .errors
                .iter()
                .map(ToString::to_string)
                .collect();
            anyhow::bail!("programming the private maps: {}", errors.join("; "));
        }
        run_trace(&args, proto, &loaded.trace_target()?, controller.maps_mut())?
    };
    if args.output == "json" {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!("verdict {:?}", result.verdict);
        for endpoint in &result.endpoints {
            println!("endpoint {endpoint}");
        }
        println!("masquerade {}", result.masquerade);
        if let Some(note) = &result.note {
            println!("note: {note}");
        }
    }
    Ok(())
}

fn run_trace(
    args: &TraceArgs,
    proto: u8,
    target: &TraceTarget<'_>,
    maps: &mut Maps,
) -> anyhow::Result<TraceResult> {
    Ok(dataplane::trace(
        target,
        maps,
        &TraceRequest {
            src: args.src,
            dst: args.dst,
            dport: args.dport,
            proto,
            ingress_ifindex: NOT_A_POD_INTERFACE,
            runs: args.runs,
            from: args.from.map(|from| match from {
                Origin::Pod => TraceFrom::Pod,
                Origin::Node => TraceFrom::Node,
                Origin::External => TraceFrom::External,
            }),
        },
    )?)
}
