//! kube-proxy's metrics server (`cmd/kube-proxy/app/server.go` `serveMetrics`) on the
//! metrics bind address: `/metrics`, `/proxyMode`, `/healthz` (and `/healthz/ping`).
//!
//! `/metrics` carries kube-proxy's own families (`pkg/proxy/metrics`, subsystem `kubeproxy`)
//! with its names, help texts, buckets and labels, as far as they have a meaning here (the
//! `/healthz` and `/livez` response counts of the healthz server included), plus ours under
//! `kube_ebpf_proxy_`, read from the pinned maps at scrape time:
//! - `kube_ebpf_proxy_dataplane_events_total{counter}`: the dataplane's per-CPU counters summed
//!   over CPUs, one series per counter (one family, so `sum by (counter)`/`rate` work across
//!   them and a new kernel counter needs no new metric name);
//! - `kube_ebpf_proxy_frontends`, `kube_ebpf_proxy_backends`, `kube_ebpf_proxy_conntrack_entries`:
//!   what is programmed in the kernel right now; `kube_ebpf_proxy_conntrack_max_entries` (the
//!   fill is entries over this) and `kube_ebpf_proxy_conntrack_orphan_entries` (half flows: an
//!   estimate of LRU evictions, with the `ct_forward_missing` counter).
//!
//! kube-proxy runs one proxier per IP family and labels most families with `ip_family`; one
//! sync here programs both families' maps at once, so a sync is recorded under both labels, as
//! a dual-stack kube-proxy's two proxiers would each record theirs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::dataplane::{self, Maps};
use crate::health::ProxyHealth;
use crate::model::{DesiredState, IpFamily, ServicePortName, ServicePortState};

/// The mode string `/proxyMode` answers (kube-proxy answers `iptables`, `ipvs`, `nftables`).
pub const PROXY_MODE: &str = "ebpf";

/// The content type of the OpenMetrics text exposition `prometheus-client` writes.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = [(&'static str, &'static str); 1];
type PolicyLabels = [(&'static str, &'static str); 2];
type FloatGauge = Gauge<f64, AtomicU64>;

const FAMILIES: [IpFamily; 2] = [IpFamily::IPv4, IpFamily::IPv6];

fn family_labels(family: IpFamily) -> Labels {
    [("ip_family", family.name())]
}

fn sync_duration_histogram() -> Histogram {
    // kube-proxy's buckets: 1ms doubling 15 times (up to ~16s).
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// kube-proxy's network programming latency buckets: 0.25 s and 0.5 s, every second to 59 s,
/// every 5 s to 115 s, every 30 s from 2 to 5 minutes.
fn network_programming_histogram() -> Histogram {
    let buckets = [0.25, 0.5]
        .into_iter()
        .chain((1..=59).map(f64::from))
        .chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)))
        .chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    Histogram::new(buckets)
}

/// How many service ports changed between two successive desired states, the way kube-proxy's
/// `sync_proxy_rules_{service,endpoint}_changes_total` count changes it is told about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Service ports that appeared, disappeared, or whose frontends, affinity, traffic
    /// policies or health check port changed.
    pub services: u64,
    /// Service ports whose endpoint sets changed (including appearing or disappearing with
    /// endpoints).
    pub endpoints: u64,
}

/// The service ports of one desired state, by name and family.
pub type PortStates = BTreeMap<(ServicePortName, IpFamily), Arc<ServicePortState>>;

fn service_fields_equal(a: &ServicePortState, b: &ServicePortState) -> bool {
    a.frontends == b.frontends
        && a.affinity_timeout_seconds == b.affinity_timeout_seconds
        && a.internal_policy_local == b.internal_policy_local
        && a.external_policy_local == b.external_policy_local
        && a.health_check_node_port == b.health_check_node_port
}

fn endpoints_equal(a: &ServicePortState, b: &ServicePortState) -> bool {
    a.internal_endpoints == b.internal_endpoints
        && a.external_endpoints == b.external_endpoints
        && a.cluster_endpoints == b.cluster_endpoints
        && a.draining_endpoints == b.draining_endpoints
}

fn has_endpoints(port: &ServicePortState) -> bool {
    !(port.internal_endpoints.is_empty()
        && port.external_endpoints.is_empty()
        && port.cluster_endpoints.is_empty()
        && port.draining_endpoints.is_empty())
}

/// Compares the service ports of two successive desired states.
pub fn count_changes(previous: &PortStates, next: &PortStates) -> Changes {
    let mut changes = Changes::default();
    for (key, port) in next {
        if let Some(old) = previous.get(key) {
            // The model shares an unchanged service port between syncs.
            if Arc::ptr_eq(old, port) {
                continue;
            }
            changes.services += u64::from(!service_fields_equal(old, port));
            changes.endpoints += u64::from(!endpoints_equal(old, port));
        } else {
            changes.services += 1;
            changes.endpoints += u64::from(has_endpoints(port));
        }
    }
    for (key, old) in previous {
        if !next.contains_key(key) {
            changes.services += 1;
            changes.endpoints += u64::from(has_endpoints(old));
        }
    }
    changes
}

/// Service ports with a Local traffic policy and no endpoints for it, per family, as
/// kube-proxy's proxiers count them each sync: `(internal, external)`.
pub fn no_local_endpoints(state: &DesiredState, family: IpFamily) -> (i64, i64) {
    let ports = state.service_ports.iter().filter(|p| p.family == family);
    let (mut internal, mut external) = (0, 0);
    for port in ports {
        if port.internal_policy_local && port.internal_endpoints.is_empty() {
            internal += 1;
        }
        if port.external_policy_local && port.external_endpoints.is_empty() {
            external += 1;
        }
    }
    (internal, external)
}

fn seconds_since_epoch(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// kube-proxy's families. They are encoded by hand (a [`Collector`]) because the registry
/// would end every help text with a period, and kube-proxy's help texts are exposed verbatim
/// after the `[ALPHA] ` stability prefix Kubernetes' metrics library puts on them.
#[derive(Clone, Debug)]
struct KubeProxyFamilies {
    sync_duration: Family<Labels, Histogram, fn() -> Histogram>,
    last_synced: Family<Labels, FloatGauge>,
    last_queued: Family<Labels, FloatGauge>,
    service_changes: Counter,
    endpoint_changes: Counter,
    no_local_endpoints: Family<PolicyLabels, Gauge>,
    network_programming: Histogram,
}

impl Collector for KubeProxyFamilies {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        fn family(
            encoder: &mut DescriptorEncoder,
            name: &str,
            help: &str,
            metric: &impl EncodeMetric,
        ) -> Result<(), std::fmt::Error> {
            let help = format!("[ALPHA] {help}");
            metric.encode(encoder.encode_descriptor(name, &help, None, metric.metric_type())?)
        }
        family(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            &self.sync_duration,
        )?;
        family(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            &self.last_synced,
        )?;
        family(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            &self.last_queued,
        )?;
        // Counter samples get their `_total` suffix from the encoder.
        family(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            &self.service_changes,
        )?;
        family(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            &self.endpoint_changes,
        )?;
        family(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            &self.no_local_endpoints,
        )?;
        family(
            &mut encoder,
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            &self.network_programming,
        )
    }
}

/// The metrics the sync loop records, and the registry `/metrics` encodes.
#[derive(Debug)]
pub struct ProxyMetrics {
    registry: Registry,
    kube_proxy: KubeProxyFamilies,
    /// The service ports of the last recorded sync, to count changes against.
    previous: Mutex<PortStates>,
    /// What `/configz` serves (kube-proxy's configz registry: `{}` until set).
    configz: Mutex<serde_json::Value>,
}

impl ProxyMetrics {
    /// The registry with kube-proxy's families; with `pin_path`, also the dataplane's
    /// counters and map sizes, read from the maps pinned there at each scrape; with `health`,
    /// the healthz server's response counts.
    pub fn new(pin_path: Option<PathBuf>, health: Option<Arc<ProxyHealth>>) -> Arc<ProxyMetrics> {
        let kube_proxy = KubeProxyFamilies {
            sync_duration: Family::new_with_constructor(sync_duration_histogram),
            last_synced: Family::default(),
            last_queued: Family::default(),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            network_programming: network_programming_histogram(),
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(kube_proxy.clone()));
        if let Some(health) = health {
            registry.register_collector(Box::new(HealthResponses { health }));
        }
        if let Some(pin_path) = pin_path {
            registry.register_collector(Box::new(DataplaneCollector { pin_path }));
            let features = Family::<Labels, Gauge>::default();
            for (feature, offered) in crate::dataplane::KernelFeatures::get().list() {
                features
                    .get_or_create(&[("feature", feature)])
                    .set(i64::from(offered));
            }
            registry.register(
                "kube_ebpf_proxy_kernel_feature",
                "Whether the kernel offers the feature (1) or not (0), probed at start",
                features,
            );
        }
        Arc::new(ProxyMetrics {
            registry,
            kube_proxy,
            previous: Mutex::new(PortStates::new()),
            configz: Mutex::new(serde_json::json!({})),
        })
    }

    /// Sets what `/configz` serves (see `ProxyConfig::configz`).
    pub fn set_configz(&self, configz: serde_json::Value) {
        *self.configz.lock().expect("configz lock") = configz;
    }

    /// A change arrived and a sync is queued (kube-proxy's `Sync()`).
    pub fn queued(&self) {
        let now = seconds_since_epoch(SystemTime::now());
        for family in FAMILIES {
            self.kube_proxy
                .last_queued
                .get_or_create(&family_labels(family))
                .set(now);
        }
    }

    /// One sync computed `state` and took `took`; `succeeded` when every write was programmed
    /// (only then is the last-synced timestamp moved, like kube-proxy).
    pub fn synced(&self, state: &DesiredState, took: Duration, succeeded: bool) {
        let now = seconds_since_epoch(SystemTime::now());
        for family in FAMILIES {
            let labels = family_labels(family);
            self.kube_proxy
                .sync_duration
                .get_or_create(&labels)
                .observe(took.as_secs_f64());
            if succeeded {
                self.kube_proxy.last_synced.get_or_create(&labels).set(now);
            }
            let (internal, external) = no_local_endpoints(state, family);
            let family = family.name();
            self.kube_proxy
                .no_local_endpoints
                .get_or_create(&[("ip_family", family), ("traffic_policy", "internal")])
                .set(internal);
            self.kube_proxy
                .no_local_endpoints
                .get_or_create(&[("ip_family", family), ("traffic_policy", "external")])
                .set(external);
        }
        let next: PortStates = state
            .service_ports
            .iter()
            .map(|port| ((port.name.clone(), port.family), port.clone()))
            .collect();
        let mut previous = self.previous.lock().unwrap_or_else(PoisonError::into_inner);
        let changes = count_changes(&previous, &next);
        self.kube_proxy.service_changes.inc_by(changes.services);
        self.kube_proxy.endpoint_changes.inc_by(changes.endpoints);
        *previous = next;
    }

    /// A sync finished at `now` programmed EndpointSlice changes triggered at `triggers`
    /// (kube-proxy observes the time since each; a trigger time ahead of this node's clock
    /// counts as zero).
    pub fn programmed(&self, triggers: &[SystemTime], now: SystemTime) {
        for trigger in triggers {
            let latency = now.duration_since(*trigger).unwrap_or_default();
            self.kube_proxy
                .network_programming
                .observe(latency.as_secs_f64());
        }
    }

    /// The OpenMetrics text exposition of every family.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail, and a collector that cannot read a map leaves its
        // family out (and logs) instead of failing the scrape.
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "encoding metrics");
        }
        text
    }
}

/// kube-proxy's `kubeproxy_proxy_{healthz,livez}_total{code}`, read from the healthz server
/// at scrape time. Like a Go counter vector, a family appears with its first response.
#[derive(Debug)]
struct HealthResponses {
    health: Arc<ProxyHealth>,
}

impl Collector for HealthResponses {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, responses) in [
            (
                "kubeproxy_proxy_healthz",
                "[ALPHA] Cumulative proxy healthz HTTP status",
                self.health.healthz_responses(),
            ),
            (
                "kubeproxy_proxy_livez",
                "[ALPHA] Cumulative proxy livez HTTP status",
                self.health.livez_responses(),
            ),
        ] {
            if responses.is_empty() {
                continue;
            }
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (code, count) in responses {
                let code = code.to_string();
                ConstCounter::new(count)
                    .encode(family.encode_family(&[("code", code.as_str())])?)?;
            }
        }
        Ok(())
    }
}

/// Reads the dataplane's pinned maps at scrape time.
#[derive(Debug)]
struct DataplaneCollector {
    pin_path: PathBuf,
}

impl DataplaneCollector {
    fn encode_counters(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = match dataplane::read_counters(&self.pin_path) {
            Ok(counters) => counters,
            Err(error) => {
                tracing::warn!(%error, "metrics: dataplane counters");
                return Ok(());
            }
        };
        let mut family = encoder.encode_descriptor(
            "kube_ebpf_proxy_dataplane_events",
            "Dataplane events counted by the eBPF programs (per-CPU counters summed), by counter",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (name, value) in counters {
            ConstCounter::new(value).encode(family.encode_family(&[("counter", name)])?)?;
        }
        Ok(())
    }

    fn encode_programmed(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let maps = match Maps::open(&self.pin_path) {
            Ok(maps) => maps,
            Err(error) => {
                tracing::warn!(%error, "metrics: opening the pinned maps");
                return Ok(());
            }
        };
        let fill = match maps.fill() {
            Ok(fill) => fill,
            Err(error) => {
                tracing::warn!(%error, "metrics: reading the pinned maps");
                return Ok(());
            }
        };
        for (name, help, count) in [
            (
                "kube_ebpf_proxy_frontends",
                "Service frontends (address, port, protocol) programmed in the kernel",
                fill.frontends,
            ),
            (
                "kube_ebpf_proxy_backends",
                "Backends (endpoint address and port) programmed in the kernel",
                fill.backends,
            ),
            (
                "kube_ebpf_proxy_conntrack_entries",
                "Entries in the dataplane's conntrack map",
                fill.conntrack_entries,
            ),
            (
                "kube_ebpf_proxy_conntrack_max_entries",
                "Size of the dataplane's conntrack map (an LRU map: when full, the least recently used flows are evicted)",
                fill.conntrack_max_entries as usize,
            ),
            (
                "kube_ebpf_proxy_conntrack_orphan_entries",
                "Conntrack entries whose other direction is missing: an estimate of the flows the full map evicted",
                fill.conntrack_orphan_entries,
            ),
        ] {
            let gauge = ConstGauge::new(i64::try_from(count).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_counters(&mut encoder)?;
        self.encode_programmed(&mut encoder)
    }
}

fn text_response(content_type: &'static str, body: String) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn metrics(State(metrics): State<Arc<ProxyMetrics>>) -> Response {
    // Reading the maps is blocking syscalls; keep them off the async workers.
    match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(body) => text_response(OPENMETRICS_CONTENT_TYPE, body),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// kube-proxy's `/configz`: the registered configurations as JSON.
async fn configz(State(metrics): State<Arc<ProxyMetrics>>) -> Response {
    let body = metrics.configz.lock().expect("configz lock").to_string();
    text_response("application/json", body)
}

async fn proxy_mode() -> Response {
    text_response("text/plain; charset=utf-8", PROXY_MODE.to_owned())
}

/// The generic apiserver-style `/healthz` kube-proxy installs on its metrics mux: a ping that
/// answers `ok` while the process serves HTTP (the proxy's own health is on the healthz
/// address).
async fn ping() -> Response {
    text_response("text/plain; charset=utf-8", "ok".to_owned())
}

/// The metrics server's routes; anything else is 404.
pub fn router(metrics: Arc<ProxyMetrics>) -> Router {
    Router::new()
        .route("/metrics", get(self::metrics))
        .route("/proxyMode", get(proxy_mode))
        .route("/configz", get(configz))
        .route("/healthz", get(ping))
        .route("/healthz/ping", get(ping))
        .with_state(metrics)
}

/// Serves [`router`] on `listener` until the task is dropped or aborted.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<ProxyMetrics>,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics)).await
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use proxy_lab::http_get as get;

    use super::*;
    use crate::model::{Action, Actions, Endpoint, EndpointSet, Frontend, FrontendKind, Protocol};

    fn endpoint(last_octet: u8, ready: bool) -> Endpoint {
        Endpoint {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, last_octet)),
            port: 8080,
            ready,
            serving: ready,
            terminating: false,
            local: true,
            node_name: Some("node-a".to_owned()),
            zone: None,
        }
    }

    /// A ClusterIP service port `name` in `family` with `endpoints` in every set.
    fn port(name: &str, family: IpFamily, endpoints: &[Endpoint]) -> ServicePortState {
        let forward = Action::Forward {
            set: EndpointSet::Policy,
            masquerade: false,
        };
        ServicePortState {
            name: ServicePortName {
                namespace: "default".to_owned(),
                name: name.to_owned(),
                port: "http".to_owned(),
                protocol: Protocol::Tcp,
            },
            family,
            frontends: vec![Frontend {
                kind: FrontendKind::ClusterIp,
                addr: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
                port: 80,
                actions: Actions {
                    pod: forward,
                    node: forward,
                    other: forward,
                },
                source_ranges: Vec::new(),
            }],
            internal_endpoints: endpoints.to_vec(),
            external_endpoints: endpoints.to_vec(),
            cluster_endpoints: endpoints.to_vec(),
            draining_endpoints: Vec::new(),
            affinity_timeout_seconds: None,
            internal_policy_local: false,
            external_policy_local: false,
            health_check_node_port: None,
        }
    }

    fn states(ports: &[ServicePortState]) -> PortStates {
        ports
            .iter()
            .map(|p| ((p.name.clone(), p.family), Arc::new(p.clone())))
            .collect()
    }

    #[test]
    fn changes_are_counted_per_service_port() {
        let web = port("web", IpFamily::IPv4, &[endpoint(1, true)]);
        let empty = port("empty", IpFamily::IPv4, &[]);
        let mut moved = web.clone();
        moved.frontends[0].port = 81;
        let mut sticky = web.clone();
        sticky.affinity_timeout_seconds = Some(10_800);
        let mut unready = web.clone();
        unready.internal_endpoints[0].ready = false;
        let mut draining = web.clone();
        draining.draining_endpoints.push(endpoint(2, false));
        let mut moved_and_scaled = moved.clone();
        moved_and_scaled.cluster_endpoints.push(endpoint(3, true));
        let web6 = port("web", IpFamily::IPv6, &[endpoint(1, true)]);
        let cases: [(&str, Vec<ServicePortState>, Vec<ServicePortState>, Changes); 10] = [
            (
                "nothing changed",
                vec![web.clone()],
                vec![web.clone()],
                Changes::default(),
            ),
            (
                "new port with endpoints",
                vec![],
                vec![web.clone()],
                Changes {
                    services: 1,
                    endpoints: 1,
                },
            ),
            (
                "new port without endpoints",
                vec![],
                vec![empty.clone()],
                Changes {
                    services: 1,
                    endpoints: 0,
                },
            ),
            (
                "port with endpoints removed",
                vec![web.clone()],
                vec![],
                Changes {
                    services: 1,
                    endpoints: 1,
                },
            ),
            (
                "port without endpoints removed",
                vec![empty.clone()],
                vec![],
                Changes {
                    services: 1,
                    endpoints: 0,
                },
            ),
            (
                "frontend changed",
                vec![web.clone()],
                vec![moved.clone()],
                Changes {
                    services: 1,
                    endpoints: 0,
                },
            ),
            (
                "affinity changed",
                vec![web.clone()],
                vec![sticky],
                Changes {
                    services: 1,
                    endpoints: 0,
                },
            ),
            (
                "endpoint became unready",
                vec![web.clone()],
                vec![unready],
                Changes {
                    services: 0,
                    endpoints: 1,
                },
            ),
            (
                "frontend and endpoints changed",
                vec![draining],
                vec![moved_and_scaled],
                Changes {
                    services: 1,
                    endpoints: 1,
                },
            ),
            (
                "other family is another port",
                vec![web.clone()],
                vec![web.clone(), web6],
                Changes {
                    services: 1,
                    endpoints: 1,
                },
            ),
        ];
        for (name, previous, next, expected) in cases {
            assert_eq!(
                count_changes(&states(&previous), &states(&next)),
                expected,
                "{name}"
            );
        }
    }

    type NoLocalCase = (&'static str, Vec<ServicePortState>, (i64, i64), (i64, i64));

    #[test]
    fn no_local_endpoints_counts_local_policies_without_endpoints() {
        let local = |family, internal: bool, external: bool, endpoints: &[Endpoint]| {
            let mut p = port("svc", family, endpoints);
            p.internal_policy_local = internal;
            p.external_policy_local = external;
            p
        };
        let ready = [endpoint(1, true)];
        // (case, service ports, IPv4 (internal, external), IPv6 (internal, external))
        let cases: [NoLocalCase; 5] = [
            (
                "cluster policies never count",
                vec![local(IpFamily::IPv4, false, false, &[])],
                (0, 0),
                (0, 0),
            ),
            (
                "internal Local without endpoints",
                vec![local(IpFamily::IPv4, true, false, &[])],
                (1, 0),
                (0, 0),
            ),
            (
                "external Local without endpoints",
                vec![local(IpFamily::IPv6, false, true, &[])],
                (0, 0),
                (0, 1),
            ),
            (
                "both Local without endpoints",
                vec![local(IpFamily::IPv4, true, true, &[])],
                (1, 1),
                (0, 0),
            ),
            (
                "Local with endpoints",
                vec![local(IpFamily::IPv4, true, true, &ready)],
                (0, 0),
                (0, 0),
            ),
        ];
        for (name, ports, ipv4, ipv6) in cases {
            let state = DesiredState {
                service_ports: ports.into_iter().map(Arc::new).collect(),
                ..DesiredState::default()
            };
            assert_eq!(
                no_local_endpoints(&state, IpFamily::IPv4),
                ipv4,
                "{name}: IPv4"
            );
            assert_eq!(
                no_local_endpoints(&state, IpFamily::IPv6),
                ipv6,
                "{name}: IPv6"
            );
        }
    }

    /// Serves `metrics` on an ephemeral loopback port.
    async fn serve(
        metrics: Arc<ProxyMetrics>,
    ) -> (Arc<ProxyMetrics>, SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = metrics.clone();
        let task = tokio::spawn(async move {
            serve_metrics(listener, served).await.unwrap();
        });
        (metrics, addr, task)
    }

    /// The value of the sample line `series` (name and labels exactly as exposed), as written.
    fn sample<'a>(body: &'a str, series: &str) -> &'a str {
        let prefix = format!("{series} ");
        body.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no sample {series} in:\n{body}"))
    }

    fn timestamp(body: &str, series: &str) -> f64 {
        sample(body, series).parse().expect("a number")
    }

    #[tokio::test]
    async fn metrics_endpoint_serves_kube_proxy_families_after_syncs() {
        let (metrics, addr, task) = serve(ProxyMetrics::new(None, None)).await;
        let before = seconds_since_epoch(SystemTime::now());
        metrics.queued();
        let mut web = port("web", IpFamily::IPv4, &[endpoint(1, true)]);
        web.internal_policy_local = true;
        let mut local_only = port("local-only", IpFamily::IPv6, &[]);
        local_only.external_policy_local = true;
        let first = DesiredState {
            service_ports: vec![Arc::new(web.clone()), Arc::new(local_only)],
            ..DesiredState::default()
        };
        metrics.synced(&first, Duration::from_millis(5), true);
        let after_first = seconds_since_epoch(SystemTime::now());
        // The endpoint goes away: an endpoint change; the failed sync keeps the last timestamp.
        web.internal_endpoints.clear();
        let second = DesiredState {
            service_ports: vec![Arc::new(web)],
            ..DesiredState::default()
        };
        metrics.queued();
        metrics.synced(&second, Duration::from_millis(20), false);
        // Two programmed EndpointSlice changes, triggered 0.3 s and 61 s before the sync ended.
        let now = SystemTime::now();
        metrics.programmed(
            &[
                now - Duration::from_millis(300),
                now - Duration::from_secs(61),
            ],
            now,
        );

        let (status, head, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            head.contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
            ),
            "{head}"
        );
        for line in [
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] SyncProxyRules latency in seconds",
            "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram",
            "# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds [ALPHA] The last time proxy rules were successfully synced",
            "# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
            "# HELP kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds [ALPHA] The last time a sync of proxy rules was queued",
            "# TYPE kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge",
            "# HELP kubeproxy_sync_proxy_rules_service_changes [ALPHA] Cumulative proxy rules Service changes",
            "# TYPE kubeproxy_sync_proxy_rules_service_changes counter",
            "# HELP kubeproxy_sync_proxy_rules_endpoint_changes [ALPHA] Cumulative proxy rules Endpoint changes",
            "# TYPE kubeproxy_sync_proxy_rules_endpoint_changes counter",
            "# HELP kubeproxy_sync_proxy_rules_no_local_endpoints_total [ALPHA] Number of services with a Local traffic policy and no endpoints",
            "# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge",
            "# HELP kubeproxy_network_programming_duration_seconds [ALPHA] In Cluster Network Programming Latency in seconds",
            "# TYPE kubeproxy_network_programming_duration_seconds histogram",
            "# EOF",
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "missing {line:?} in:\n{body}"
            );
        }
        // Without pinned maps there are no dataplane families.
        assert!(!body.contains("kube_ebpf_proxy_"), "{body}");
        for family in ["IPv4", "IPv6"] {
            let histogram = "kubeproxy_sync_proxy_rules_duration_seconds";
            let labels = format!("ip_family=\"{family}\"");
            let bucket = |le: &str| format!("{histogram}_bucket{{le=\"{le}\",{labels}}}");
            assert_eq!(
                sample(&body, &format!("{histogram}_count{{{labels}}}")),
                "2"
            );
            assert_eq!(
                sample(&body, &format!("{histogram}_sum{{{labels}}}")),
                "0.025"
            );
            // kube-proxy's buckets: 1ms doubling, 15 of them, then +Inf.
            for (le, count) in [
                ("0.001", "0"),
                ("0.004", "0"),
                ("0.008", "1"),
                ("0.016", "1"),
                ("0.032", "2"),
                ("16.384", "2"),
                ("+Inf", "2"),
            ] {
                assert_eq!(sample(&body, &bucket(le)), count, "{family} le={le}");
            }
            assert!(
                !body.contains(&bucket("32.768")),
                "15 buckets and +Inf: {body}"
            );
            let synced = timestamp(
                &body,
                &format!("kubeproxy_sync_proxy_rules_last_timestamp_seconds{{{labels}}}"),
            );
            assert!(
                (before..=after_first).contains(&synced),
                "{synced} not in {before}..={after_first}"
            );
            let queued = timestamp(
                &body,
                &format!("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{{{labels}}}"),
            );
            assert!(
                queued >= after_first,
                "the second queued time {queued} is after the first sync"
            );
        }
        // kube-proxy's network programming buckets: 0.25, 0.5, 1..59, 60..115 by 5, 120..300
        // by 30.
        let programming = "kubeproxy_network_programming_duration_seconds";
        for (le, count) in [
            ("0.25", "0"),
            ("0.5", "1"),
            ("59.0", "1"),
            ("60.0", "1"),
            ("65.0", "2"),
            ("300.0", "2"),
            ("+Inf", "2"),
        ] {
            assert_eq!(
                sample(&body, &format!("{programming}_bucket{{le=\"{le}\"}}")),
                count,
                "le={le}"
            );
        }
        assert!(!body.contains(&format!("{programming}_bucket{{le=\"330.0\"}}")));
        assert_eq!(sample(&body, &format!("{programming}_count")), "2");
        // First sync: two new ports (one with endpoints); second: one removed (no endpoints),
        // and web's internal endpoints changed.
        assert_eq!(
            sample(&body, "kubeproxy_sync_proxy_rules_service_changes_total"),
            "3"
        );
        assert_eq!(
            sample(&body, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
            "2"
        );
        // The gauge follows the last sync: web (iTP Local) has no internal endpoints left, and
        // the IPv6 port with eTP Local is gone.
        for (labels, value) in [
            ("ip_family=\"IPv4\",traffic_policy=\"internal\"", "1"),
            ("ip_family=\"IPv4\",traffic_policy=\"external\"", "0"),
            ("ip_family=\"IPv6\",traffic_policy=\"internal\"", "0"),
            ("ip_family=\"IPv6\",traffic_policy=\"external\"", "0"),
        ] {
            assert_eq!(
                sample(
                    &body,
                    &format!("kubeproxy_sync_proxy_rules_no_local_endpoints_total{{{labels}}}")
                ),
                value,
                "{labels}"
            );
        }
        task.abort();
    }

    #[tokio::test]
    async fn proxy_mode_healthz_and_unknown_paths() {
        let (_metrics, addr, task) = serve(ProxyMetrics::new(None, None)).await;
        let (status, head, body) = get(addr, "/proxyMode").await;
        assert_eq!((status, body.as_str()), (200, "ebpf"));
        assert!(
            head.contains("content-type: text/plain; charset=utf-8"),
            "{head}"
        );
        for path in ["/healthz", "/healthz/ping"] {
            let (status, _, body) = get(addr, path).await;
            assert_eq!((status, body.as_str()), (200, "ok"), "{path}");
        }
        for path in ["/", "/livez", "/metrics/extra", "/nope"] {
            let (status, _, _) = get(addr, path).await;
            assert_eq!(status, 404, "{path}");
        }
        task.abort();
    }

    #[tokio::test]
    async fn configz_serves_what_was_set() {
        let (metrics, addr, task) = serve(ProxyMetrics::new(None, None)).await;
        let (status, head, body) = get(addr, "/configz").await;
        assert_eq!(
            (status, body.as_str()),
            (200, "{}"),
            "nothing registered yet"
        );
        assert!(head.contains("content-type: application/json"), "{head}");
        metrics.set_configz(serde_json::json!({"kubeproxy.config.k8s.io": {"Mode": "ipvs"}}));
        let (_, _, body) = get(addr, "/configz").await;
        assert_eq!(body, r#"{"kubeproxy.config.k8s.io":{"Mode":"ipvs"}}"#);
        task.abort();
    }

    #[tokio::test]
    async fn healthz_server_responses_are_counted_by_code() {
        let health = ProxyHealth::new(Duration::from_mins(1));
        let (_metrics, addr, task) = serve(ProxyMetrics::new(None, Some(health.clone()))).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let healthz_addr = listener.local_addr().unwrap();
        let healthz_task =
            tokio::spawn(crate::health::serve_proxy_health(listener, health.clone()));

        let (_, _, body) = get(addr, "/metrics").await;
        assert!(
            !body.contains("kubeproxy_proxy_"),
            "no response yet: {body}"
        );

        assert_eq!(get(healthz_addr, "/healthz").await.0, 503);
        health.updated();
        for path in ["/healthz", "/healthz", "/livez"] {
            assert_eq!(get(healthz_addr, path).await.0, 200, "{path}");
        }
        let (_, _, body) = get(addr, "/metrics").await;
        for line in [
            "# HELP kubeproxy_proxy_healthz [ALPHA] Cumulative proxy healthz HTTP status",
            "# TYPE kubeproxy_proxy_healthz counter",
            "# HELP kubeproxy_proxy_livez [ALPHA] Cumulative proxy livez HTTP status",
            "# TYPE kubeproxy_proxy_livez counter",
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "missing {line:?} in:\n{body}"
            );
        }
        assert_eq!(
            sample(&body, "kubeproxy_proxy_healthz_total{code=\"200\"}"),
            "2"
        );
        assert_eq!(
            sample(&body, "kubeproxy_proxy_healthz_total{code=\"503\"}"),
            "1"
        );
        assert_eq!(
            sample(&body, "kubeproxy_proxy_livez_total{code=\"200\"}"),
            "1"
        );
        assert!(
            !body.contains("kubeproxy_proxy_livez_total{code=\"503\"}"),
            "{body}"
        );
        task.abort();
        healthz_task.abort();
    }
}
