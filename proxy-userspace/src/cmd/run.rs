//! `kube-ebpf-proxy run`: load and attach the dataplane, then keep the kernel maps equal to
//! what the model computes from the source, until SIGTERM.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use proxy_userspace::cluster::{ClusterSnapshot, Diagnostic};
use proxy_userspace::config::ProxyFlags;
use proxy_userspace::controller::{Controller, DataplaneSettings, Event, SyncPacer, Synced};
use proxy_userspace::dataplane::{self, Maps};
use proxy_userspace::events::{EventPublisher, EventSender};
use proxy_userspace::health::{self, ProxyHealth, ServiceHealthServer};
use proxy_userspace::metrics::{self, ProxyMetrics};
use proxy_userspace::port_range::PortRange;
use std::str::FromStr as _;

/// `run`'s default SNAT source ports: above Linux's ephemeral range (32768-60999) and outside
/// the NodePort range, so masqueraded flows never take a port a local socket was given.
pub const DEFAULT_SNAT_PORTS: PortRange = PortRange {
    first: 61000,
    last: 65535,
};

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub proxy: ProxyFlags,
    #[command(flatten)]
    pub dataplane: DataplaneFlags,
}

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

/// Loads the programs and the maps (adopting the pinned ones, migrating an older layout) and
/// returns the typed maps; nothing is attached yet.
fn load_dataplane(flags: &DataplaneFlags) -> anyhow::Result<(dataplane::Loaded, Maps)> {
    let sizes = dataplane::MapSizes {
        conntrack: flags.conntrack_max,
        services: flags.services_max,
        backends: flags.backends_max,
        ..dataplane::MapSizes::default()
    };
    log_kernel_features(flags.tc_attach)?;
    let mut loaded =
        dataplane::load_migrating(&flags.bpf_pin_path, &sizes).context("loading the dataplane")?;
    let maps = Maps::open(&flags.bpf_pin_path)?;
    if flags.bpf_debug {
        spawn_kernel_logger(&mut loaded)?;
    }
    Ok((loaded, maps))
}

/// Logs what the kernel offers and the path taken for each choice; refuses `--tc-attach tcx`
/// on a kernel without TCX rather than failing at the first interface.
fn log_kernel_features(tc_attach: dataplane::TcAttachMode) -> anyhow::Result<()> {
    let features = dataplane::KernelFeatures::get();
    let found: Vec<String> = features
        .list()
        .iter()
        .map(|(name, offered)| format!("{name}={offered}"))
        .collect();
    if tc_attach == dataplane::TcAttachMode::Tcx && !features.tcx {
        anyhow::bail!(
            "--tc-attach tcx: this kernel has no TCX links (probed); use auto or netlink"
        );
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
) -> anyhow::Result<dataplane::Attachments> {
    let mut attachments = dataplane::Attachments::new(&flags.bpf_pin_path, flags.tc_attach);
    attachments
        .sync(loaded, filter)
        .context("attaching the tc programs")?;
    let cgroup = match &flags.cgroup_path {
        Some(path) => path.clone(),
        None => dataplane::cgroup2_root()?,
    };
    dataplane::attach_socket_hooks(loaded, &cgroup).context("attaching the socket hooks")?;
    tracing::info!(interfaces = ?attachments.interfaces, cgroup = %cgroup.display(), pin_path = %flags.bpf_pin_path.display(), "programs attached");
    loaded
        .finish_migration()
        .context("finishing the map layout migration")?;
    // Only `trace` uses the pin: without it, it verifies a program of its own.
    if let Err(error) = loaded.pin_tc_ingress() {
        tracing::warn!(%error, "`trace --bpf-pin-path` will load its own program");
    }
    Ok(attachments)
}

fn spawn_kernel_logger(loaded: &mut dataplane::Loaded) -> anyhow::Result<()> {
    match aya_log::EbpfLogger::init(&mut loaded.ebpf) {
        Ok(logger) => {
            // SAFETY: the logger owns its ring-buffer descriptor for its whole life and always
            // reports that same descriptor; the AsyncFd owns the logger.
            let mut logger = unsafe { tokio::io::unix::AsyncFd::register(logger) }
                .map_err(|e| anyhow::anyhow!("registering the kernel log buffer: {e}"))?;
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

/// Counters of conditions an operator must hear about (the kernel can only count them).
const FAILURE_COUNTERS: [proxy_common::Counter; 4] = [
    proxy_common::Counter::CtMapFull,
    proxy_common::Counter::SnatExhausted,
    proxy_common::Counter::NoSnatAddress,
    // Live flows evicted from the full conntrack map: raise --conntrack-max.
    proxy_common::Counter::CtForwardMissing,
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

/// What the binary does around each sync: health, metrics, logs, Kubernetes Events, the
/// service names `inspect` shows, the health check servers.
struct Observers {
    /// What `inspect` names the programmed service ids with.
    service_names: dataplane::ServiceNames,
    /// Kubernetes Events about objects that cannot be programmed (API-server source only).
    events: Option<EventSender>,
    health: Arc<ProxyHealth>,
    metrics: Arc<ProxyMetrics>,
    service_health: ServiceHealthServer,
    reported: HashSet<String>,
    allocations: HashSet<String>,
    synced_once: bool,
    node_seen: bool,
}

impl Observers {
    /// A new snapshot arrived: a sync is queued; the node's health follows its Node at once.
    fn queued(&mut self, snapshot: &ClusterSnapshot) {
        self.health.queued_update();
        self.metrics.queued();
        match &snapshot.node {
            Some(node) => {
                self.health.sync_node(node);
                self.node_seen = true;
            }
            // Only a Node that existed can be deleted; a source with no Node object at all (a
            // manifests folder without one) keeps the node eligible.
            None if self.node_seen => self.health.node_deleted(),
            None => {}
        }
    }

    /// Reports what one sync of `snapshot` programmed.
    fn synced(
        &mut self,
        synced: &Synced,
        snapshot: &ClusterSnapshot,
        reconciler: &proxy_userspace::reconcile::Reconciler,
    ) {
        let state = &synced.state;
        let report = &synced.report;
        // Diagnostics are reported once each, naming the object, while they last.
        let current: HashSet<String> = state
            .diagnostics
            .iter()
            .map(|d| format!("{}: {}", d.object, d.message))
            .collect();
        for line in current.difference(&self.reported) {
            tracing::warn!("{line}");
        }
        self.reported = current;
        // Values the manifests source allocated as the API server would, reported once each.
        for a in &snapshot.allocations {
            let line = format!("allocated {} {} = {}", a.object, a.field, a.value);
            if self.allocations.insert(line.clone()) {
                tracing::info!("{line}");
            }
        }
        for error in &report.errors {
            tracing::error!("{error}");
        }
        if let Some(error) = &report.flow_cleanup_error {
            tracing::warn!(%error, "conntrack cleanup of flows to deleted backends");
        }
        if report.flows_removed > 0 {
            tracing::info!(
                flows = report.flows_removed,
                "removed flows to deleted backends"
            );
        }
        if let Some(events) = &self.events {
            let mut problems = state.diagnostics.clone();
            problems.extend(report.errors.iter().map(|error| Diagnostic {
                object: error.object.clone(),
                message: format!("not written to the kernel maps: {}", error.source),
            }));
            events.report(&problems, snapshot);
        }
        // For `inspect`: which Service port each programmed service id is.
        if let Err(error) = self.service_names.sync(&reconciler.service_names(state)) {
            tracing::warn!("{error}");
        }
        for error in self.service_health.sync(state) {
            tracing::warn!("{error}");
        }
        if report.errors.is_empty() {
            self.health.updated();
        }
        self.metrics
            .synced(state, synced.took, report.errors.is_empty());
        self.metrics
            .programmed(&synced.programmed_triggers, SystemTime::now());
        if self.synced_once {
            tracing::info!(
                kind = ?synced.kind,
                writes = report.applied,
                took = ?synced.took,
                "synced"
            );
        }
        self.synced_once = true;
    }
}

/// Runs the sync `pacer` says is due, if any, and reports it.
fn sync_if_due(
    controller: &mut Controller<Maps>,
    pacer: &mut SyncPacer,
    observers: &mut Observers,
) -> Option<Synced> {
    let kind = pacer.take(Instant::now())?;
    match controller.sync(kind) {
        Ok(synced) => {
            observers.synced(&synced, controller.snapshot(), controller.reconciler());
            Some(synced)
        }
        Err(error) => {
            tracing::error!("{kind:?} sync failed reading back the maps: {error}");
            None
        }
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = super::resolve(&args.proxy)?;
    for line in dataplane::reserve_local_ports(&[
        ("SNAT port range (--snat-ports)", args.dataplane.snat_ports),
        ("NodePort range", config.service_node_port_range),
    ])? {
        tracing::info!("{line}");
    }
    // Ordering for a restart without a gap: the maps first (the pinned ones adopted, an older
    // layout migrated), then a complete sync from the source, and only then the programs
    // switched, so a new program never runs over maps that are not programmed yet. Until then
    // the programs an earlier proxy left attached keep serving.
    let (mut loaded, maps) = load_dataplane(&args.dataplane)?;
    let health = ProxyHealth::new(config.health_timeout());
    if let Some(addr) = config.healthz_bind_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the healthz address {addr}"))?;
        tokio::spawn(health::serve_proxy_health(listener, health.clone()));
    }
    let metrics = ProxyMetrics::new(
        Some(args.dataplane.bpf_pin_path.clone()),
        Some(health.clone()),
    );
    metrics.set_configz(config.configz());
    if let Some(addr) = config.metrics_bind_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        tokio::spawn(metrics::serve_metrics(listener, metrics.clone()));
    }
    // Watching before reading: an address or interface that comes while the proxy starts is
    // either read now or announced by a watcher.
    let mut links = dataplane::LinkWatcher::new()?.spawn();
    let mut addresses = dataplane::LinkWatcher::addresses()?.spawn();
    let local = super::local_addresses()?;
    let mut observers = Observers {
        service_health: ServiceHealthServer::new(
            config.model_config(None, &local).health_check_listen_ips(),
            health.clone(),
        ),
        health: health.clone(),
        metrics: metrics.clone(),
        service_names: dataplane::ServiceNames::open(&args.dataplane.bpf_pin_path)?,
        events: match config.manifests {
            Some(_) => None,
            None => Some(EventSender::spawn(EventPublisher::new(
                super::kube_client(&config).await?,
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
        snat_ports: args.dataplane.snat_ports,
        debug: args.dataplane.bpf_debug,
        fast_path: args.dataplane.fast_path,
    };
    let (mut snapshots, source) = super::start_source(&config).await?;
    let conntrack = config.conntrack;
    let mut pacer = SyncPacer::new(config.min_sync_period, config.sync_period, Instant::now());
    let mut controller = Controller::new(config, settings, maps, SystemTime::now())
        .context("reading back the programmed maps")?;
    controller.handle(Event::LocalAddresses(local));
    controller.handle(Event::Interfaces(super::local_interfaces()?));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let started = Instant::now();
    let first = tokio::select! {
        _ = term.recv() => None,
        _ = tokio::signal::ctrl_c() => None,
        first = super::first_snapshot(&mut snapshots) => Some(first?),
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
    let filter = dataplane::InterfaceFilter::parse(&args.dataplane.interfaces)?;
    let mut attachments = attach_dataplane(&args.dataplane, &mut loaded, &filter)?;
    if let Some(synced) = synced {
        tracing::info!(
            service_ports = synced.state.service_ports.len(),
            writes = synced.report.applied,
            took = ?started.elapsed(),
            "initial sync programmed"
        );
    }
    let timeouts = dataplane::CtTimeouts::with_kube_proxy(&conntrack);
    let mut gc = tokio::time::interval(Duration::from_secs(args.dataplane.gc_interval.max(1)));
    let mut failures_seen = std::collections::HashMap::new();
    loop {
        let due = tokio::time::Instant::from_std(pacer.next_due(Instant::now()));
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the source stopped");
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
                match super::local_interfaces() {
                    Ok(interfaces) => {
                        controller.handle(Event::Interfaces(interfaces));
                        pacer.queue();
                    }
                    Err(error) => tracing::warn!("local-traffic detector interfaces: {error:#}"),
                }
            }
            // A local address came or went (a keepalived VIP): NodePorts follow it.
            Some(()) = addresses.recv() => {
                match super::local_addresses() {
                    Ok(local) => {
                        controller.handle(Event::LocalAddresses(local));
                        pacer.queue();
                    }
                    Err(error) => tracing::warn!("local addresses: {error:#}"),
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
                warn_on_failure_counters(&args.dataplane.bpf_pin_path, &mut failures_seen);
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
