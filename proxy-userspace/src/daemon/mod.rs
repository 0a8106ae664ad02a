//! The proxy as a daemon (`kube-ebpf-proxy run`): load the dataplane and attach it, then keep
//! the kernel maps equal to what the model computes from the source, until SIGTERM. The
//! [`Controller`] does the computing and programming; this loop feeds it the source's
//! snapshots, the node's addresses and interfaces and the sync pacing, and runs conntrack GC.

mod host;
mod observers;
mod sources;

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::{Duration, Instant, SystemTime};

pub use host::{HostError, local_addresses, local_interfaces};
pub use sources::{SourceError, Started, first_snapshot, kube_client, snapshot_once, start};

use self::observers::{Observers, sync_if_due, warn_on_failure_counters};
use crate::config::ProxyConfig;
use crate::controller::{Controller, DataplaneSettings, Event, SyncPacer};
use crate::dataplane::{self, Maps};
use crate::events::{EventPublisher, EventSender};
use crate::health::{self, ProxyHealth, ServiceHealthServer};
use crate::metrics::{self, ProxyMetrics};
use crate::port_range::PortRange;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("reserving local ports: {0}")]
    LocalPorts(#[from] dataplane::LocalPortsError),
    #[error("--tc-attach tcx: this kernel has no TCX links (probed); use auto or netlink")]
    NoTcx,
    #[error("loading the dataplane: {0}")]
    Load(#[source] dataplane::LoadError),
    #[error("finishing the map layout migration: {0}")]
    Migration(#[source] dataplane::LoadError),
    #[error(transparent)]
    Maps(#[from] dataplane::MapsError),
    #[error("reading back the programmed maps: {0}")]
    Resume(#[source] dataplane::MapsError),
    #[error("registering the kernel log buffer: {0}")]
    KernelLog(#[source] std::io::Error),
    #[error("binding the {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Watch(#[from] dataplane::WatchError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Names(#[from] dataplane::NamesError),
    #[error(transparent)]
    Source(#[from] SourceError),
    /// `what` failed: "attaching the tc programs", "--interfaces", ….
    #[error("{what}: {source}")]
    Attach {
        what: &'static str,
        source: Box<dataplane::AttachError>,
    },
    #[error("installing the signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("the source stopped")]
    SourceStopped,
}

/// `run`'s default SNAT source ports: above Linux's ephemeral range (32768-60999) and outside
/// the NodePort range, so masqueraded flows never take a port a local socket was given.
pub const DEFAULT_SNAT_PORTS: PortRange = PortRange {
    first: 61000,
    last: 65535,
};

/// How the dataplane is loaded and attached (kube-ebpf-proxy's own flags).
#[derive(clap::Args)]
pub struct DataplaneFlags {
    /// Directory on bpffs where the maps are pinned; several proxies on one machine (tests, the
    /// lab) each need their own.
    #[arg(long, default_value = "/sys/fs/bpf/kube-ebpf-proxy")]
    pub bpf_pin_path: PathBuf,
    /// Which interfaces get the tc program: comma-separated shell globs (`*`, `?`, `[...]`), `!`
    /// excludes (e.g. `eth*,veth*,!veth-mgmt`). Default: every interface but loopback.
    #[arg(long, default_value = "")]
    pub interfaces: String,
    /// The cgroup v2 directory the socket hooks (host-originated traffic) attach to. Default:
    /// the cgroup2 mount root.
    #[arg(long)]
    pub cgroup_path: Option<PathBuf>,
    /// SNAT source port range MIN-MAX. The default lies above Linux's ephemeral range
    /// (32768-60999) and outside the NodePort range, so masqueraded flows never take a port a
    /// local socket was given; reserve it (net.ipv4.ip_local_reserved_ports) if you move it.
    #[arg(long, default_value_t = DEFAULT_SNAT_PORTS, value_parser = PortRange::from_str)]
    pub snat_ports: PortRange,
    /// Log every new flow's decision from the kernel (aya-log).
    #[arg(long)]
    pub bpf_debug: bool,
    /// Deliver translated packets straight to the next hop's device (`on`), or leave them to
    /// the node's stack (`off`: netfilter and rp_filter see them; for measuring the fast path).
    #[arg(long, default_value = "on", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub fast_path: bool,
    /// Conntrack map size (entries); takes effect when the map is created.
    #[arg(long, default_value_t = proxy_common::CONNTRACK_MAX_ENTRIES)]
    pub conntrack_max: u32,
    /// Services map size (entries); takes effect when the map is created.
    #[arg(long, default_value_t = proxy_common::SERVICES_MAX_ENTRIES)]
    pub services_max: u32,
    /// Backends map size (entries); takes effect when the map is created.
    #[arg(long, default_value_t = proxy_common::BACKENDS_MAX_ENTRIES)]
    pub backends_max: u32,
    /// Seconds between conntrack garbage collections.
    #[arg(long, default_value_t = 10)]
    pub gc_interval: u64,
    /// How the tc program is attached: `tcx` (pinned TCX links, Linux ≥ 6.6), `netlink` (a
    /// clsact filter at a fixed priority and handle), or `auto` (TCX where the kernel has it).
    #[arg(long, value_enum, default_value_t = dataplane::TcAttachMode::Auto)]
    pub tc_attach: dataplane::TcAttachMode,
}

/// A listener on `addr` for the `what` server (healthz, metrics).
async fn bind(
    what: &'static str,
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, DaemonError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Bind { what, addr, source })
}

fn attach_error(what: &'static str) -> impl Fn(dataplane::AttachError) -> DaemonError {
    move |source| DaemonError::Attach {
        what,
        source: Box::new(source),
    }
}

/// Loads the programs and the maps (adopting the pinned ones, migrating an older layout) and
/// returns the typed maps; nothing is attached yet.
fn load_dataplane(flags: &DataplaneFlags) -> Result<(dataplane::Loaded, Maps), DaemonError> {
    let sizes = dataplane::MapSizes {
        conntrack: flags.conntrack_max,
        services: flags.services_max,
        backends: flags.backends_max,
        ..dataplane::MapSizes::default()
    };
    log_kernel_features(flags.tc_attach)?;
    let mut loaded =
        dataplane::load_migrating(&flags.bpf_pin_path, &sizes).map_err(DaemonError::Load)?;
    let maps = Maps::open(&flags.bpf_pin_path)?;
    if flags.bpf_debug {
        spawn_kernel_logger(&mut loaded)?;
    }
    Ok((loaded, maps))
}

/// Logs what the kernel offers and the path taken for each choice; refuses `--tc-attach tcx`
/// on a kernel without TCX rather than failing at the first interface.
fn log_kernel_features(tc_attach: dataplane::TcAttachMode) -> Result<(), DaemonError> {
    let features = dataplane::KernelFeatures::get();
    let found: Vec<String> = features
        .list()
        .iter()
        .map(|(name, offered)| format!("{name}={offered}"))
        .collect();
    if tc_attach == dataplane::TcAttachMode::Tcx && !features.tcx {
        return Err(DaemonError::NoTcx);
    }
    let tc_path = match tc_attach.resolve() {
        dataplane::TcAttachMode::Tcx => "tcx links",
        _ => "clsact filters (netlink)",
    };
    let reject_path = if features.sock_addr_set_retval {
        "ECONNREFUSED (bpf_set_retval)"
    } else {
        "EPERM (no bpf_set_retval for sock_addr programs)"
    };
    let conntrack_walk = if features.map_batch_ops {
        "batch lookups"
    } else {
        "per-entry iteration"
    };
    tracing::info!(
        features = %found.join(" "),
        tc_attach = tc_path,
        socket_reject = reject_path,
        conntrack_walk,
        "kernel features probed"
    );
    Ok(())
}

/// Puts the programs on the selected interfaces and the cgroup, replacing in place (atomically)
/// those an earlier proxy left attached, then finishes a layout migration (the old programs no
/// longer run).
fn attach_dataplane(
    flags: &DataplaneFlags,
    loaded: &mut dataplane::Loaded,
    filter: &dataplane::InterfaceFilter,
) -> Result<dataplane::Attachments, DaemonError> {
    let mut attachments = dataplane::Attachments::new(&flags.bpf_pin_path, flags.tc_attach);
    attachments
        .sync(loaded, filter)
        .map_err(attach_error("attaching the tc programs"))?;
    let cgroup = match &flags.cgroup_path {
        Some(path) => path.clone(),
        None => dataplane::cgroup2_root().map_err(attach_error(
            "finding the cgroup2 mount for the socket hooks",
        ))?,
    };
    dataplane::attach_socket_hooks(loaded, &cgroup)
        .map_err(attach_error("attaching the socket hooks"))?;
    tracing::info!(interfaces = ?attachments.interfaces, cgroup = %cgroup.display(), pin_path = %flags.bpf_pin_path.display(), "programs attached");
    loaded.finish_migration().map_err(DaemonError::Migration)?;
    // Only `trace` uses the pin: without it, it verifies a program of its own.
    if let Err(error) = loaded.pin_tc_ingress() {
        tracing::warn!(%error, "`trace --bpf-pin-path` will load its own program");
    }
    Ok(attachments)
}

fn spawn_kernel_logger(loaded: &mut dataplane::Loaded) -> Result<(), DaemonError> {
    match aya_log::EbpfLogger::init(&mut loaded.ebpf) {
        Ok(logger) => {
            // SAFETY: the logger owns its ring-buffer descriptor for its whole life and always
            // reports that same descriptor; the AsyncFd owns the logger.
            let mut logger = unsafe { tokio::io::unix::AsyncFd::register(logger) }
                .map_err(|e| DaemonError::KernelLog(e.into_parts().1))?;
            tokio::spawn(async move {
                while let Ok(mut guard) = logger.readable_mut().await {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(error) => tracing::warn!(%error, "kernel debug logging unavailable"),
    }
    Ok(())
}

/// Runs the proxy with `config` and the dataplane `flags` until SIGTERM or SIGINT; what is
/// attached and pinned stays for the next start.
pub async fn run(config: ProxyConfig, flags: &DataplaneFlags) -> Result<(), DaemonError> {
    for line in dataplane::reserve_local_ports(&[
        ("SNAT port range (--snat-ports)", flags.snat_ports),
        ("NodePort range", config.service_node_port_range),
    ])? {
        tracing::info!("{line}");
    }
    // Ordering for a restart without a gap: the maps first (the pinned ones adopted, an older
    // layout migrated), then a complete sync from the source, and only then the programs
    // switched, so a new program never runs over maps that are not programmed yet. Until then
    // the programs an earlier proxy left attached keep serving.
    let (mut loaded, maps) = load_dataplane(flags)?;
    let health = ProxyHealth::new(config.health_timeout());
    if let Some(addr) = config.healthz_bind_address {
        let listener = bind("healthz", addr).await?;
        tokio::spawn(health::serve_proxy_health(listener, health.clone()));
    }
    let metrics = ProxyMetrics::new(Some(flags.bpf_pin_path.clone()), Some(health.clone()));
    metrics.set_configz(config.configz());
    if let Some(addr) = config.metrics_bind_address {
        let listener = bind("metrics", addr).await?;
        tokio::spawn(metrics::serve_metrics(listener, metrics.clone()));
    }
    // Watching before reading: an address or interface that comes while the proxy starts is
    // either read now or announced by a watcher.
    let mut links = dataplane::LinkWatcher::new()?.spawn();
    let mut addresses = dataplane::LinkWatcher::addresses()?.spawn();
    let local = local_addresses()?;
    let mut observers = Observers {
        service_health: ServiceHealthServer::new(
            config.model_config(None, &local).health_check_listen_ips(),
            health.clone(),
        ),
        health: health.clone(),
        metrics: metrics.clone(),
        service_names: dataplane::ServiceNames::open(&flags.bpf_pin_path)?,
        events: match config.manifests {
            Some(_) => None,
            None => Some(EventSender::spawn(EventPublisher::new(
                kube_client(&config).await?,
                config.hostname.clone(),
            ))),
        },
        reported: HashSet::new(),
        allocations: HashSet::new(),
        synced_once: false,
        node_seen: false,
    };
    let settings = DataplaneSettings {
        netns_cookie: dataplane::netns_cookie()?,
        snat_ports: flags.snat_ports,
        debug: flags.bpf_debug,
        fast_path: flags.fast_path,
    };
    let (mut snapshots, source) = start(&config).await?;
    let conntrack = config.conntrack;
    let mut pacer = SyncPacer::new(config.min_sync_period, config.sync_period, Instant::now());
    let mut controller =
        Controller::new(config, settings, maps, SystemTime::now()).map_err(DaemonError::Resume)?;
    controller.handle(Event::LocalAddresses(local));
    controller.handle(Event::Interfaces(local_interfaces()?));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::Signal)?;
    let started = Instant::now();
    let first = tokio::select! {
        _ = term.recv() => None,
        _ = tokio::signal::ctrl_c() => None,
        first = first_snapshot(&mut snapshots) => Some(first?),
    };
    let Some(first) = first else {
        source.abort();
        tracing::info!("stopping before the first sync; what is attached and pinned stays");
        return Ok(());
    };
    observers.queued(&first);
    controller.handle(Event::Snapshot(first));
    pacer.queue();
    let synced = sync_if_due(&mut controller, &mut pacer, &mut observers);
    let filter = dataplane::InterfaceFilter::parse(&flags.interfaces)
        .map_err(attach_error("--interfaces"))?;
    let mut attachments = attach_dataplane(flags, &mut loaded, &filter)?;
    if let Some(synced) = synced {
        tracing::info!(
            service_ports = synced.state.service_ports.len(),
            writes = synced.report.applied,
            took = ?started.elapsed(),
            "initial sync programmed"
        );
    }
    let timeouts = dataplane::CtTimeouts::with_kube_proxy(&conntrack);
    let mut gc = tokio::time::interval(Duration::from_secs(flags.gc_interval.max(1)));
    let mut failures_seen = std::collections::HashMap::new();
    loop {
        let due = tokio::time::Instant::from_std(pacer.next_due(Instant::now()));
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return Err(DaemonError::SourceStopped);
                }
                let snapshot = snapshots.borrow_and_update().clone();
                observers.queued(&snapshot);
                controller.handle(Event::Snapshot(snapshot));
                pacer.queue();
            }
            Some(()) = links.recv() => {
                match attachments.sync(&mut loaded, &filter) {
                    Ok((added, removed)) if !added.is_empty() || !removed.is_empty() => {
                        tracing::info!(?added, ?removed, "interfaces changed");
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "syncing tc attachments"),
                }
                match local_interfaces() {
                    Ok(interfaces) => {
                        controller.handle(Event::Interfaces(interfaces));
                        pacer.queue();
                    }
                    Err(error) => tracing::warn!("local-traffic detector interfaces: {error}"),
                }
            }
            // A local address came or went (a keepalived VIP): NodePorts follow it.
            Some(()) = addresses.recv() => {
                match local_addresses() {
                    Ok(local) => {
                        controller.handle(Event::LocalAddresses(local));
                        pacer.queue();
                    }
                    Err(error) => tracing::warn!("local addresses: {error}"),
                }
            }
            () = tokio::time::sleep_until(due) => {
                sync_if_due(&mut controller, &mut pacer, &mut observers);
            }
            _ = gc.tick() => {
                match dataplane::collect_garbage(controller.maps_mut(), &timeouts) {
                    Ok(stats) => tracing::debug!(?stats, "conntrack gc"),
                    Err(error) => tracing::warn!(%error, "conntrack gc"),
                }
                warn_on_failure_counters(&flags.bpf_pin_path, &mut failures_seen);
            }
        }
    }
    source.abort();
    tracing::info!(
        "stopping; the programs stay attached and the maps pinned for the next start \
         (`kube-ebpf-proxy cleanup` removes them)"
    );
    Ok(())
}
