//! Health endpoints with kube-proxy's semantics (`pkg/proxy/healthcheck`):
//! - `/healthz` and `/livez` on the healthz bind address ([`ProxyHealth`], [`serve_proxy_health`]);
//! - one HTTP server per `healthCheckNodePort` of LoadBalancer Services with
//!   externalTrafficPolicy Local, answering 200 while the node has ready local endpoints for
//!   the Service ([`ServiceHealthServer`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::core::v1::Node;
use tokio::task::JoinHandle;

use crate::model::DesiredState;

/// The Cluster Autoscaler's taint on nodes it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("health check for Service {namespace}/{name}: listening on {addr}: {source}")]
    ServiceListen {
        namespace: String,
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct HealthState {
    /// Wall-clock time of the last successful sync (for the JSON body), `None` before the first.
    last_updated: Option<SystemTime>,
    /// When the oldest change not yet programmed arrived.
    oldest_pending: Option<Instant>,
    node_eligible: bool,
    /// Responses per HTTP status code, for kube-proxy's `kubeproxy_proxy_healthz_total` and
    /// `kubeproxy_proxy_livez_total`.
    healthz_responses: BTreeMap<u16, u64>,
    livez_responses: BTreeMap<u16, u64>,
}

/// The proxy's own health, shared by the sync loop (which reports) and the HTTP handlers.
#[derive(Debug)]
pub struct ProxyHealth {
    state: Mutex<HealthState>,
    health_timeout: Duration,
}

impl ProxyHealth {
    /// `health_timeout` is how long a queued change may stay unprogrammed before the proxy is
    /// unhealthy; kube-proxy uses twice its sync period.
    pub fn new(health_timeout: Duration) -> Arc<ProxyHealth> {
        Arc::new(ProxyHealth {
            state: Mutex::new(HealthState {
                last_updated: None,
                oldest_pending: None,
                // Eligible until a Node event says otherwise, like kube-proxy.
                node_eligible: true,
                healthz_responses: BTreeMap::new(),
                livez_responses: BTreeMap::new(),
            }),
            health_timeout,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A Service/EndpointSlice change arrived that is not programmed yet (kube-proxy's
    /// `QueuedUpdate`): only the oldest pending change counts.
    pub fn queued_update(&self) {
        let mut state = self.lock();
        if state.oldest_pending.is_none() {
            state.oldest_pending = Some(Instant::now());
        }
    }

    /// Everything queued so far is programmed (kube-proxy's `Updated`).
    pub fn updated(&self) {
        let mut state = self.lock();
        state.oldest_pending = None;
        state.last_updated = Some(SystemTime::now());
    }

    /// Follows this node's Node object: a node being deleted, or tainted for deletion by the
    /// Cluster Autoscaler, is not eligible (only /healthz reports it).
    pub fn sync_node(&self, node: &Node) {
        let deleting = node.metadata.deletion_timestamp.is_some();
        let tainted = node
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        self.lock().node_eligible = !deleting && !tainted;
    }

    /// This node's Node object was deleted: not eligible (kube-proxy's `OnNodeDelete`).
    pub fn node_deleted(&self) {
        self.lock().node_eligible = false;
    }

    /// Healthy once the first sync is programmed, and while no change has waited longer than
    /// the health timeout. (kube-proxy also answers 200 before its first sync; we wait for it,
    /// so a readiness probe passes only once Services are actually programmed.)
    pub fn is_healthy(&self) -> bool {
        Self::healthy(&self.lock(), self.health_timeout)
    }

    fn healthy(state: &HealthState, timeout: Duration) -> bool {
        state.last_updated.is_some()
            && state
                .oldest_pending
                .is_none_or(|queued| queued.elapsed() < timeout)
    }

    fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    /// How many `/healthz` responses were sent, per HTTP status code.
    pub fn healthz_responses(&self) -> BTreeMap<u16, u64> {
        self.lock().healthz_responses.clone()
    }

    /// How many `/livez` responses were sent, per HTTP status code.
    pub fn livez_responses(&self) -> BTreeMap<u16, u64> {
        self.lock().livez_responses.clone()
    }
}

/// Go's `time.Time.String()` for a UTC time ("2006-01-02 15:04:05.999999999 +0000 UTC"), the
/// format kube-proxy's JSON bodies carry (jiff's `%.f` is Go's trimmed fraction, none when
/// zero); `None` is Go's zero time.
fn go_time(time: Option<SystemTime>) -> String {
    time.and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map_or_else(
            || "0001-01-01 00:00:00 +0000 UTC".to_owned(),
            |t| t.strftime("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string(),
        )
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// The status and the `lastUpdated` to report: when healthy kube-proxy reports the current time
/// (older releases' semantics), otherwise the last successful sync.
fn proxy_status(health: &ProxyHealth, extra_healthy: bool) -> (StatusCode, String, String) {
    let state = health.lock();
    let now = SystemTime::now();
    let healthy = ProxyHealth::healthy(&state, health.health_timeout) && extra_healthy;
    let (status, last_updated) = if healthy {
        (StatusCode::OK, Some(now))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, state.last_updated)
    };
    (status, go_time(last_updated), go_time(Some(now)))
}

async fn healthz(State(health): State<Arc<ProxyHealth>>) -> Response {
    let eligible = health.node_eligible();
    let (status, last_updated, now) = proxy_status(&health, eligible);
    *health
        .lock()
        .healthz_responses
        .entry(status.as_u16())
        .or_default() += 1;
    // Kept as format!: kube-proxy's exact bytes (its Fprintf's irregular spacing, which no JSON
    // serializer writes); the values are fixed-format timestamps and a boolean.
    json_response(
        status,
        format!(
            r#"{{"lastUpdated": "{last_updated}","currentTime": "{now}", "nodeEligible": {eligible}}}"#
        ),
    )
}

async fn livez(State(health): State<Arc<ProxyHealth>>) -> Response {
    let (status, last_updated, now) = proxy_status(&health, true);
    *health
        .lock()
        .livez_responses
        .entry(status.as_u16())
        .or_default() += 1;
    // Kept as format!, as /healthz: kube-proxy's exact bytes.
    json_response(
        status,
        format!(r#"{{"lastUpdated": "{last_updated}","currentTime": "{now}"}}"#),
    )
}

/// Serves `/healthz` and `/livez` on `listener` until the task is dropped or aborted.
pub async fn serve_proxy_health(
    listener: tokio::net::TcpListener,
    health: Arc<ProxyHealth>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(health);
    axum::serve(listener, app).await
}

/// `namespace/name` of a Service with a health check.
type ServiceName = (String, String);

/// Per Service: its health check port and how many ready endpoints it has on this node.
fn health_checks(state: &DesiredState) -> BTreeMap<ServiceName, (u16, usize)> {
    // Ready local endpoint IPs per (service, family): kube-proxy counts IPs, not IP:port, so a
    // pod serving two ports counts once; each family's proxier reports its own count.
    let mut ips: BTreeMap<ServiceName, (u16, BTreeMap<_, BTreeSet<IpAddr>>)> = BTreeMap::new();
    for port in &state.service_ports {
        let Some(check_port) = port.health_check_node_port else {
            continue;
        };
        let (_, by_family) = ips
            .entry((port.name.namespace.clone(), port.name.name.clone()))
            .or_insert_with(|| (check_port, BTreeMap::new()));
        let family_ips = by_family.entry(port.family).or_default();
        // With externalTrafficPolicy Local the external set is the Local set: all local ready
        // endpoints, or local terminating ones (which must not count) when none is ready.
        family_ips.extend(
            port.external_endpoints
                .iter()
                .filter(|ep| ep.local && ep.ready)
                .map(|ep| ep.addr),
        );
    }
    ips.into_iter()
        .map(|(name, (port, by_family))| {
            let count = by_family.values().map(BTreeSet::len).max().unwrap_or(0);
            (name, (port, count))
        })
        .collect()
}

struct ServiceListener {
    port: u16,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ServiceListener {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

type EndpointCounts = Arc<RwLock<BTreeMap<ServiceName, usize>>>;

/// kube-proxy's `ServiceHealthServer`: opens, keeps and closes one HTTP server per
/// healthCheckNodePort as the desired state changes.
pub struct ServiceHealthServer {
    /// Addresses each health check port listens on (kube-proxy: the NodePort addresses, or
    /// every address of both families when they match everything).
    listen_ips: Vec<IpAddr>,
    proxy: Arc<ProxyHealth>,
    counts: EndpointCounts,
    listeners: BTreeMap<ServiceName, ServiceListener>,
}

/// kube-proxy's service health body (its dedented template is this JSON, one tab per level,
/// fields in this order).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceHealthBody<'a> {
    service: ServiceRef<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(serde::Serialize)]
struct ServiceRef<'a> {
    namespace: &'a str,
    name: &'a str,
}

fn tab_indented_json(value: &impl serde::Serialize) -> String {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    value
        .serialize(&mut serde_json::Serializer::with_formatter(
            &mut out, formatter,
        ))
        .expect("a struct of strings, numbers and booleans serializes");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

async fn service_health(
    State((name, counts, proxy)): State<(ServiceName, EndpointCounts, Arc<ProxyHealth>)>,
) -> Response {
    let count = counts
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&name)
        .copied()
        .unwrap_or(0);
    let proxy_healthy = proxy.is_healthy();
    let status = if count != 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let (namespace, name) = &name;
    let body = ServiceHealthBody {
        service: ServiceRef { namespace, name },
        local_endpoints: count,
        service_proxy_healthy: proxy_healthy,
    };
    let mut response = json_response(status, tab_indented_json(&body));
    // Weighted load balancers (kube-proxy sets it on every answer, 503 included).
    response
        .headers_mut()
        .insert("x-load-balancing-endpoint-weight", HeaderValue::from(count));
    response
}

/// Binds a health check listener. The IPv6 wildcard is dual-stack (IPv4 too), as Go's listener
/// on "0.0.0.0" that kube-proxy opens is; where the kernel has no IPv6, the IPv4 wildcard.
fn bind_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    if addr.ip() != IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        return std::net::TcpListener::bind(addr);
    }
    let socket = match Socket::new(Domain::IPV6, Type::STREAM, None) {
        Ok(socket) => socket,
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            return std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, addr.port()));
        }
        Err(e) => return Err(e),
    };
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

impl ServiceHealthServer {
    pub fn new(listen_ips: Vec<IpAddr>, proxy: Arc<ProxyHealth>) -> ServiceHealthServer {
        ServiceHealthServer {
            listen_ips,
            proxy,
            counts: Arc::default(),
            listeners: BTreeMap::new(),
        }
    }

    /// Makes the health check servers match `state`: closes those of Services that are gone or
    /// changed port, opens new ones, updates every local endpoint count. A port that cannot be
    /// opened is reported (and retried on the next sync); the others keep working. Must run
    /// inside a tokio runtime.
    pub fn sync(&mut self, state: &DesiredState) -> Vec<HealthError> {
        let wanted = health_checks(state);
        *self.counts.write().unwrap_or_else(PoisonError::into_inner) = wanted
            .iter()
            .map(|(name, (_, count))| (name.clone(), *count))
            .collect();
        self.listeners.retain(|name, listener| {
            wanted
                .get(name)
                .is_some_and(|(port, _)| *port == listener.port)
        });
        let mut errors = Vec::new();
        for (name, (port, _)) in wanted {
            if self.listeners.contains_key(&name) {
                continue;
            }
            match self.listen(&name, port) {
                Ok(listener) => {
                    self.listeners.insert(name, listener);
                }
                Err(error) => errors.push(error),
            }
        }
        errors
    }

    /// The Services with an open health check, and their ports.
    pub fn open_ports(&self) -> BTreeMap<String, u16> {
        self.listeners
            .iter()
            .map(|((namespace, name), listener)| (format!("{namespace}/{name}"), listener.port))
            .collect()
    }

    fn listen(&self, name: &ServiceName, port: u16) -> Result<ServiceListener, HealthError> {
        let mut listener = ServiceListener {
            port,
            tasks: Vec::new(),
        };
        for ip in &self.listen_ips {
            let addr = SocketAddr::new(*ip, port);
            let error = |source| HealthError::ServiceListen {
                namespace: name.0.clone(),
                name: name.1.clone(),
                addr,
                source,
            };
            // Bind synchronously so the error is reported here, not inside the task; dropping
            // `listener` on error closes whatever was already opened.
            let socket = bind_listener(addr).map_err(error)?;
            socket.set_nonblocking(true).map_err(error)?;
            let socket = tokio::net::TcpListener::from_std(socket).map_err(error)?;
            let app = Router::new().fallback(service_health).with_state((
                name.clone(),
                self.counts.clone(),
                self.proxy.clone(),
            ));
            let service = format!("{}/{}", name.0, name.1);
            listener.tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(socket, app).await {
                    tracing::error!(service, %addr, "health check server stopped: {e}");
                }
            }));
        }
        Ok(listener)
    }
}

#[cfg(test)]
mod tests {
    use proxy_lab::http_get as get;
    use serde_json::json;

    use super::*;
    use crate::model::{Endpoint, IpFamily, Protocol, ServicePortName, ServicePortState};

    async fn proxy_server(timeout: Duration) -> (Arc<ProxyHealth>, SocketAddr, JoinHandle<()>) {
        let health = ProxyHealth::new(timeout);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = health.clone();
        let task = tokio::spawn(async move {
            serve_proxy_health(listener, served).await.unwrap();
        });
        (health, addr, task)
    }

    #[tokio::test]
    async fn healthz_and_livez_follow_kube_proxy() {
        let (health, addr, task) = proxy_server(Duration::from_millis(300)).await;

        // (step, /healthz status, /livez status)
        let (status, headers, body) = get(addr, "/healthz").await;
        assert_eq!(status, 503, "before the first sync: {body}");
        assert!(
            headers.contains("content-type: application/json"),
            "{headers}"
        );
        assert!(
            headers.contains("x-content-type-options: nosniff"),
            "{headers}"
        );
        assert!(
            body.starts_with(r#"{"lastUpdated": "0001-01-01 00:00:00 +0000 UTC","currentTime": ""#)
                && body.ends_with(r#"", "nodeEligible": true}"#),
            "{body}"
        );
        assert_eq!(get(addr, "/livez").await.0, 503);

        health.updated();
        let (status, _, body) = get(addr, "/healthz").await;
        assert_eq!(status, 200, "after the first sync: {body}");
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["nodeEligible"], json!(true));
        assert_eq!(get(addr, "/livez").await.0, 200);

        health.queued_update();
        assert_eq!(
            get(addr, "/healthz").await.0,
            200,
            "a fresh pending change is fine"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (status, _, body) = get(addr, "/healthz").await;
        assert_eq!(
            status, 503,
            "a change pending longer than the timeout: {body}"
        );
        assert_ne!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["lastUpdated"],
            json!("0001-01-01 00:00:00 +0000 UTC"),
            "reports the last successful sync"
        );
        assert_eq!(get(addr, "/livez").await.0, 503);
        health.queued_update();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            get(addr, "/livez").await.0,
            503,
            "a newer change does not reset the oldest"
        );

        health.updated();
        assert_eq!(get(addr, "/healthz").await.0, 200, "synced again");

        let tainted: Node = serde_json::from_value(json!({
            "metadata": {"name": "node-a"},
            "spec": {"taints": [{"key": TO_BE_DELETED_TAINT, "effect": "NoSchedule"}]}
        }))
        .unwrap();
        health.sync_node(&tainted);
        let (status, _, body) = get(addr, "/healthz").await;
        assert_eq!(status, 503, "tainted for deletion: {body}");
        assert!(body.ends_with(r#""nodeEligible": false}"#), "{body}");
        assert_eq!(get(addr, "/livez").await.0, 200, "/livez ignores the node");

        let deleting: Node = serde_json::from_value(json!({
            "metadata": {"name": "node-a", "deletionTimestamp": "2026-01-01T00:00:00Z"}
        }))
        .unwrap();
        health.sync_node(&deleting);
        assert_eq!(get(addr, "/healthz").await.0, 503, "being deleted");
        health.sync_node(&serde_json::from_value(json!({"metadata": {"name": "node-a"}})).unwrap());
        assert_eq!(get(addr, "/healthz").await.0, 200, "eligible again");
        health.node_deleted();
        assert_eq!(get(addr, "/healthz").await.0, 503, "Node object deleted");
        assert_eq!(get(addr, "/livez").await.0, 200);
        assert_eq!(get(addr, "/metrics").await.0, 404);
        task.abort();
    }

    fn endpoint(addr: &str, port: u16, local: bool, ready: bool) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            port,
            ready,
            serving: true,
            terminating: !ready,
            local,
            node_name: None,
            zone: None,
        }
    }

    fn lb_port(
        port_name: &str,
        health_port: u16,
        external: Vec<Endpoint>,
    ) -> Arc<ServicePortState> {
        Arc::new(ServicePortState {
            name: ServicePortName {
                namespace: "default".to_owned(),
                name: "lb".to_owned(),
                port: port_name.to_owned(),
                protocol: Protocol::Tcp,
            },
            family: IpFamily::IPv4,
            frontends: Vec::new(),
            internal_endpoints: Vec::new(),
            external_endpoints: external,
            cluster_endpoints: Vec::new(),
            draining_endpoints: Vec::new(),
            affinity_timeout_seconds: None,
            internal_policy_local: false,
            external_policy_local: true,
            health_check_node_port: Some(health_port),
        })
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn service_health_check_ports_follow_the_desired_state() {
        let proxy = ProxyHealth::new(Duration::from_mins(1));
        proxy.updated();
        let mut server =
            ServiceHealthServer::new(vec!["127.0.0.1".parse().unwrap()], proxy.clone());
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));

        // Two ports of one pod count once; a terminating local endpoint and a remote one not.
        let state = DesiredState {
            service_ports: vec![
                lb_port("http", port, vec![endpoint("10.244.1.5", 80, true, true)]),
                lb_port(
                    "https",
                    port,
                    vec![
                        endpoint("10.244.1.5", 443, true, true),
                        endpoint("10.244.1.6", 443, true, false),
                        endpoint("10.244.2.7", 443, false, true),
                    ],
                ),
            ],
            ..DesiredState::default()
        };
        assert!(server.sync(&state).is_empty());
        assert_eq!(server.open_ports().get("default/lb"), Some(&port));
        let (status, headers, body) = get(addr, "/").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            headers.contains("content-type: application/json"),
            "{headers}"
        );
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"lb\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}"
        );

        // Only terminating local endpoints: 503 with a count of 0.
        let terminating_only = DesiredState {
            service_ports: vec![lb_port(
                "http",
                port,
                vec![endpoint("10.244.1.6", 80, true, false)],
            )],
            ..DesiredState::default()
        };
        assert!(server.sync(&terminating_only).is_empty());
        let (status, _, body) = get(addr, "/any/path").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("\"localEndpoints\": 0"), "{body}");

        // Local endpoints but an unhealthy proxy: 503, serviceProxyHealthy false.
        assert!(server.sync(&state).is_empty());
        let stale = ProxyHealth::new(Duration::ZERO);
        stale.updated();
        stale.queued_update();
        let mut stale_server = ServiceHealthServer::new(vec!["127.0.0.1".parse().unwrap()], stale);
        let stale_port = free_port();
        let stale_state = DesiredState {
            service_ports: vec![lb_port(
                "http",
                stale_port,
                vec![endpoint("10.244.1.5", 80, true, true)],
            )],
            ..DesiredState::default()
        };
        assert!(stale_server.sync(&stale_state).is_empty());
        let (status, _, body) = get(SocketAddr::from(([127, 0, 0, 1], stale_port)), "/").await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body.contains("\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": false"),
            "{body}"
        );

        // A port already taken is an error naming the Service; others still open.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let mut other = lb_port("http", taken_port, Vec::new());
        Arc::make_mut(&mut other).name.name = "other".to_owned();
        let both = DesiredState {
            service_ports: vec![state.service_ports[0].clone(), other],
            ..DesiredState::default()
        };
        let errors = server.sync(&both);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .starts_with("health check for Service default/other"),
            "{}",
            errors[0]
        );
        assert_eq!(get(addr, "/").await.0, 200, "default/lb unaffected");

        // The Service is gone: its port closes.
        assert!(server.sync(&DesiredState::default()).is_empty());
        assert!(server.open_ports().is_empty());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the health check port must be closed"
        );
    }

    /// `--nodeport-addresses` matching every address: one dual-stack listener answers on IPv6
    /// and on IPv4 (in a namespace of the test's own), with kube-proxy's weight header on 200
    /// and on 503 answers.
    #[test]
    fn a_match_all_health_check_answers_on_ipv6_and_ipv4_with_the_weight_header() {
        let ns = proxy_lab::Netns::new("hc").expect("namespace");
        ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
        let listen = crate::model::ModelConfig {
            nodeport_addresses: crate::model::NodePortAddresses {
                primary: false,
                cidrs: vec!["0.0.0.0/0".parse().unwrap()],
            },
            ..crate::model::ModelConfig::default()
        }
        .health_check_listen_ips();
        ns.enter(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let proxy = ProxyHealth::new(Duration::from_mins(1));
                proxy.updated();
                let mut server = ServiceHealthServer::new(listen, proxy);
                let port = 32_100;
                let two_pods = DesiredState {
                    service_ports: vec![lb_port(
                        "http",
                        port,
                        vec![
                            endpoint("10.244.1.5", 80, true, true),
                            endpoint("10.244.1.6", 80, true, true),
                        ],
                    )],
                    ..DesiredState::default()
                };
                assert!(server.sync(&two_pods).is_empty());
                for ip in ["::1", "127.0.0.1"] {
                    let addr = SocketAddr::new(ip.parse().unwrap(), port);
                    let (status, headers, body) = get(addr, "/").await;
                    assert_eq!(status, 200, "{addr}: {body}");
                    assert!(
                        headers.contains("x-load-balancing-endpoint-weight: 2\r\n"),
                        "{addr}: {headers}"
                    );
                    assert!(body.contains("\"localEndpoints\": 2"), "{addr}: {body}");
                }
                let none = DesiredState {
                    service_ports: vec![lb_port("http", port, Vec::new())],
                    ..DesiredState::default()
                };
                assert!(server.sync(&none).is_empty());
                let (status, headers, _) =
                    get(SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], port)), "/").await;
                assert_eq!(status, 503);
                assert!(
                    headers.contains("x-load-balancing-endpoint-weight: 0\r\n"),
                    "{headers}"
                );
            });
        })
        .expect("enter the namespace");
    }

    #[test]
    fn go_time_format() {
        assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
        let at = |secs, nanos| Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos));
        assert_eq!(go_time(at(0, 0)), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(
            go_time(at(1_795_397_038, 120_000_000)),
            "2026-11-23 01:23:58.12 +0000 UTC"
        );
        assert_eq!(
            go_time(at(951_782_400, 1)),
            "2000-02-29 00:00:00.000000001 +0000 UTC"
        );
    }
}
