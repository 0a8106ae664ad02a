//! Source A: a real API server, through kube-rs reflectors, the way kube-proxy's informers see it.
//!
//! Services and EndpointSlices are watched with kube-proxy's label selector
//! (`!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`), this node's
//! Node with the field selector `metadata.name=<hostname>`, and every ServiceCIDR (networking.k8s.io/v1,
//! as kube-proxy's ServiceCIDR informer: the ranges where unallocated addresses are dropped). A
//! failed watch backs off (800 ms doubling up to 5 s, [`RetryDelay`]) and re-lists; the reflector
//! store only swaps in a re-list at its `InitDone`, so objects deleted while the watch was down
//! disappear exactly then. Nothing is published before both the Services and the EndpointSlices
//! have completed their first list: consumers treat the first change of the channel as the first
//! complete snapshot. As with kube-proxy, the ServiceCIDRs are not waited for: their drop rule
//! follows when they are listed (an API server without the resource only logs the failed watch).
//!
//! The API server refusing a list or watch (403, an RBAC gap) before that first snapshot ends
//! the source with an error naming what was refused, rather than backing off forever with
//! nothing programmed; afterwards it is retried like any failure, keeping what is programmed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ::kube::runtime::WatchStreamExt;
use ::kube::runtime::reflector::{self, Store};
use ::kube::runtime::watcher::{self, Event};
use ::kube::{Api, Client, Resource};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::manifests::SKIP_LABELS;
use crate::cluster::{ClusterSnapshot, ObjectKey};

/// kube-proxy's informer label selector for Services and EndpointSlices.
pub fn service_label_selector() -> String {
    SKIP_LABELS
        .iter()
        .map(|label| format!("!{label}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// How long a failed list or watch waits before it is tried again: 800 ms, doubling up to 5 s,
/// back to 800 ms after any success. client-go's reflector starts the same way but waits up
/// to 30 s; after the API server has been away for minutes, the proxy must see the changes
/// made meanwhile within seconds of its return, not half a minute later.
#[derive(Clone, Debug)]
struct RetryDelay {
    next: Duration,
}

impl RetryDelay {
    const FIRST: Duration = Duration::from_millis(800);
    const MAX: Duration = Duration::from_secs(5);
}

impl Default for RetryDelay {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for RetryDelay {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (delay * 2).min(Self::MAX);
        Some(delay)
    }
}

impl ::kube::runtime::utils::Backoff for RetryDelay {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Which reflector an event came from, and whether it changed the store.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Update {
    Services {
        synced: bool,
    },
    EndpointSlices {
        synced: bool,
    },
    Node,
    ServiceCidrs,
    /// The API server refused to list or watch `kind`: what it said.
    Forbidden {
        kind: String,
        message: String,
    },
}

/// Watches one kind into `writer`, yielding an [`Update`] per event that changed the store
/// (`synced` when it was a completed list). Errors are logged; the watcher backs off and re-lists.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    update: fn(bool) -> Update,
) -> impl Stream<Item = Update> + Send
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let kind = <K as Resource>::kind(&()).into_owned();
    watcher::watcher(api, config)
        .backoff(RetryDelay::default())
        // Server-side-apply bookkeeping is never read and is often the bulk of an object; every
        // snapshot clones the stores.
        .modify(|object: &mut K| object.meta_mut().managed_fields = None)
        .reflect(writer)
        .filter_map(move |event| {
            let update = match event {
                Ok(Event::Apply(_) | Event::Delete(_)) => Some(update(false)),
                Ok(Event::InitDone) => Some(update(true)),
                // The store does not change until InitDone.
                Ok(Event::Init | Event::InitApply(_)) => None,
                Err(
                    watcher::Error::InitialListFailed(::kube::Error::Api(status))
                    | watcher::Error::WatchStartFailed(::kube::Error::Api(status)),
                ) if status.code == 403 => {
                    tracing::warn!(%kind, %status, "watch forbidden; backing off and re-listing");
                    Some(Update::Forbidden {
                        kind: kind.clone(),
                        message: status.message,
                    })
                }
                Err(error) => {
                    tracing::warn!(%kind, %error, "watch failed; backing off and re-listing");
                    None
                }
            };
            std::future::ready(update)
        })
}

/// The store's objects by key, shared with the store (no object is copied).
fn by_key<K>(store: &Store<K>) -> BTreeMap<ObjectKey, Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .state()
        .into_iter()
        .map(|object| {
            let key = ObjectKey {
                namespace: object.meta().namespace.clone().unwrap_or_default(),
                name: object.meta().name.clone().unwrap_or_default(),
            };
            (key, object)
        })
        .collect()
}

/// Reflects the cluster into snapshots on `tx` until the task is cancelled. The first snapshot
/// is sent once Services and EndpointSlices have both been listed; after that, one per change.
/// Returns (dropping `tx`) when the API server forbids a list or watch before the first snapshot,
/// after logging what it refused.
pub async fn run(client: Client, hostname: String, tx: watch::Sender<Arc<ClusterSnapshot>>) {
    let selector = service_label_selector();
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (nodes, nodes_writer) = reflector::store::<Node>();
    let (service_cidrs, service_cidrs_writer) = reflector::store::<ServiceCIDR>();
    let updates = futures::stream::select_all([
        reflect(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(&selector),
            services_writer,
            |synced| Update::Services { synced },
        )
        .boxed(),
        reflect(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&selector),
            slices_writer,
            |synced| Update::EndpointSlices { synced },
        )
        .boxed(),
        reflect(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={hostname}")),
            nodes_writer,
            |_| Update::Node,
        )
        .boxed(),
        reflect(
            Api::<ServiceCIDR>::all(client),
            watcher::Config::default(),
            service_cidrs_writer,
            |_| Update::ServiceCidrs,
        )
        .boxed(),
    ]);
    futures::pin_mut!(updates);
    let (mut services_synced, mut slices_synced) = (false, false);
    while let Some(update) = updates.next().await {
        match update {
            Update::Services { synced } => services_synced |= synced,
            Update::EndpointSlices { synced } => slices_synced |= synced,
            Update::Node | Update::ServiceCidrs => {}
            // ServiceCIDRs are not waited for (kube-proxy's informer only logs): an identity
            // without them still programs every Service.
            Update::Forbidden { kind, .. } if kind == "ServiceCIDR" => continue,
            Update::Forbidden { kind, message } => {
                let refused = format!("{kind}: {message}");
                if !(services_synced && slices_synced) {
                    tracing::error!(
                        "the API server forbids what the proxy must watch ({refused}); its identity needs list and watch on services, nodes and discovery.k8s.io endpointslices (the ClusterRole of manifests/kube-ebpf-proxy.yaml)"
                    );
                    return;
                }
                continue;
            }
        }
        if !(services_synced && slices_synced) {
            continue;
        }
        let snapshot = ClusterSnapshot {
            services: by_key(&services),
            endpoint_slices: by_key(&slices),
            node: nodes
                .state()
                .into_iter()
                .find(|node| node.metadata.name.as_deref() == Some(hostname.as_str()))
                .map(|node| (*node).clone()),
            // A handful of objects: the model takes them by value.
            service_cidrs: by_key(&service_cidrs)
                .into_iter()
                .map(|(key, object)| (key, Arc::unwrap_or_clone(object)))
                .collect(),
            diagnostics: Vec::new(),
            allocations: Vec::new(),
        };
        tracing::debug!(
            services = snapshot.services.len(),
            endpoint_slices = snapshot.endpoint_slices.len(),
            "cluster snapshot"
        );
        tx.send_replace(Arc::new(snapshot));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use ::kube::client::Body;
    use http::{Request, Response};
    use serde_json::{Value, json};
    use tokio::sync::mpsc;
    use tower_test::mock::{Handle, SendResponse};

    use super::*;

    type Exchange = (Request<Body>, SendResponse<Response<Body>>);
    /// The Service names of a published snapshot, and whether the re-list had been answered.
    type Observation = (Vec<String>, bool);

    /// Requests of the fake API server, by resource and by list/watch.
    struct Routes {
        services_list: mpsc::UnboundedReceiver<Exchange>,
        services_watch: mpsc::UnboundedReceiver<Exchange>,
        slices_list: mpsc::UnboundedReceiver<Exchange>,
        slices_watch: mpsc::UnboundedReceiver<Exchange>,
        nodes_list: mpsc::UnboundedReceiver<Exchange>,
        nodes_watch: mpsc::UnboundedReceiver<Exchange>,
        service_cidrs_list: mpsc::UnboundedReceiver<Exchange>,
        service_cidrs_watch: mpsc::UnboundedReceiver<Exchange>,
    }

    fn route(mut handle: Handle<Request<Body>, Response<Body>>) -> Routes {
        let (services_list_tx, services_list) = mpsc::unbounded_channel();
        let (services_watch_tx, services_watch) = mpsc::unbounded_channel();
        let (slices_list_tx, slices_list) = mpsc::unbounded_channel();
        let (slices_watch_tx, slices_watch) = mpsc::unbounded_channel();
        let (nodes_list_tx, nodes_list) = mpsc::unbounded_channel();
        let (nodes_watch_tx, nodes_watch) = mpsc::unbounded_channel();
        let (service_cidrs_list_tx, service_cidrs_list) = mpsc::unbounded_channel();
        let (service_cidrs_watch_tx, service_cidrs_watch) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let watch = query(&request).contains("watch=true");
                let target = match (request.uri().path(), watch) {
                    ("/api/v1/services", false) => &services_list_tx,
                    ("/api/v1/services", true) => &services_watch_tx,
                    ("/apis/discovery.k8s.io/v1/endpointslices", false) => &slices_list_tx,
                    ("/apis/discovery.k8s.io/v1/endpointslices", true) => &slices_watch_tx,
                    ("/api/v1/nodes", false) => &nodes_list_tx,
                    ("/api/v1/nodes", true) => &nodes_watch_tx,
                    ("/apis/networking.k8s.io/v1/servicecidrs", false) => &service_cidrs_list_tx,
                    ("/apis/networking.k8s.io/v1/servicecidrs", true) => &service_cidrs_watch_tx,
                    (path, _) => panic!("unexpected request {path}"),
                };
                target
                    .send((request, respond))
                    .expect("test holds the receiver");
            }
        });
        Routes {
            services_list,
            services_watch,
            slices_list,
            slices_watch,
            nodes_list,
            nodes_watch,
            service_cidrs_list,
            service_cidrs_watch,
        }
    }

    /// The request's query string, percent-decoded.
    fn query(request: &Request<Body>) -> String {
        let raw = request.uri().query().unwrap_or_default().as_bytes();
        let mut decoded = Vec::new();
        let mut index = 0;
        while index < raw.len() {
            if raw[index] == b'%' && index + 2 < raw.len() {
                let hex = std::str::from_utf8(&raw[index + 1..index + 3]).unwrap();
                decoded.push(u8::from_str_radix(hex, 16).unwrap());
                index += 3;
            } else {
                decoded.push(raw[index]);
                index += 1;
            }
        }
        String::from_utf8(decoded).unwrap()
    }

    async fn next(receiver: &mut mpsc::UnboundedReceiver<Exchange>, what: &str) -> Exchange {
        tokio::time::timeout(Duration::from_secs(10), receiver.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what} request within 10 s"))
            .expect("router running")
    }

    fn json_response(body: &Value) -> Response<Body> {
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    /// A watch response: newline-delimited events, then the end of the stream.
    fn watch_response(events: &[Value]) -> Response<Body> {
        let mut body = Vec::new();
        for event in events {
            body.extend(serde_json::to_vec(event).unwrap());
            body.push(b'\n');
        }
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    }

    fn list(kind: &str, resource_version: &str, items: &[Value]) -> Value {
        json!({
            "apiVersion": match kind {
                "EndpointSliceList" => "discovery.k8s.io/v1",
                "ServiceCIDRList" => "networking.k8s.io/v1",
                _ => "v1",
            },
            "kind": kind,
            "metadata": {"resourceVersion": resource_version},
            "items": items,
        })
    }

    fn service(name: &str, resource_version: &str, ip: &str) -> Value {
        json!({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": resource_version,
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1"}]},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]}
        })
    }

    fn slice(service: &str, ip: &str) -> Value {
        json!({
            "metadata": {"name": format!("{service}-abcde"), "namespace": "default", "resourceVersion": "7",
                "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}]
        })
    }

    fn names<K>(map: &BTreeMap<ObjectKey, K>) -> Vec<String> {
        map.keys().map(|k| k.name.clone()).collect()
    }

    async fn wait_for(
        rx: &mut watch::Receiver<Arc<ClusterSnapshot>>,
        what: &str,
        done: impl Fn(&ClusterSnapshot) -> bool,
    ) -> Arc<ClusterSnapshot> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let current = rx.borrow_and_update().clone();
            if done(&current) {
                return current;
            }
            tokio::time::timeout_at(deadline, rx.changed())
                .await
                .unwrap_or_else(|_| {
                    panic!("no snapshot with {what} within 10 s; last: {current:?}")
                })
                .unwrap();
        }
    }

    #[tokio::test]
    async fn publishes_after_both_lists_and_applies_deletions_at_the_relist() {
        let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let mut routes = route(handle);
        let client = Client::new(mock, "default");
        let (tx, mut rx) = watch::channel(Arc::new(ClusterSnapshot::default()));
        let source = tokio::spawn(run(client, "node-a".to_owned(), tx));

        // Every snapshot ever published, with whether the re-list had been answered by then.
        let relisted = Arc::new(AtomicBool::new(false));
        let published: Arc<Mutex<Vec<Observation>>> = Arc::default();
        let mut observer = rx.clone();
        let recorder = {
            let (relisted, published) = (relisted.clone(), published.clone());
            tokio::spawn(async move {
                while observer.changed().await.is_ok() {
                    let services = names(&observer.borrow_and_update().services);
                    published
                        .lock()
                        .unwrap()
                        .push((services, relisted.load(Ordering::SeqCst)));
                }
            })
        };

        let (request, respond) = next(&mut routes.services_list, "Service list").await;
        assert!(
            query(&request).contains("labelSelector=!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"),
            "{}",
            query(&request)
        );
        respond.send_response(json_response(&list(
            "ServiceList",
            "10",
            &[
                service("a", "8", "10.96.0.10"),
                service("b", "9", "10.96.0.11"),
            ],
        )));
        let (request, respond) = next(&mut routes.nodes_list, "Node list").await;
        assert!(
            query(&request).contains("fieldSelector=metadata.name=node-a"),
            "{}",
            query(&request)
        );
        respond.send_response(json_response(&list(
            "NodeList",
            "3",
            &[json!({"metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}}})],
        )));
        let (_, services_watch) = next(&mut routes.services_watch, "Service watch").await;
        let (_node_watch_request, _node_watch) = next(&mut routes.nodes_watch, "Node watch").await;

        // Services are listed but EndpointSlices are not: nothing may be published yet.
        let (request, slices_list) = next(&mut routes.slices_list, "EndpointSlice list").await;
        assert!(
            query(&request).contains("labelSelector=!service.kubernetes.io/service-proxy-name")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !rx.has_changed().unwrap(),
            "published before the EndpointSlices were listed"
        );

        slices_list.send_response(json_response(&list(
            "EndpointSliceList",
            "10",
            &[slice("a", "10.0.0.1"), slice("b", "10.0.0.2")],
        )));
        let first = wait_for(&mut rx, "both lists", |s| !s.endpoint_slices.is_empty()).await;
        assert_eq!(names(&first.services), ["a", "b"]);
        assert!(
            first
                .services
                .values()
                .all(|s| s.metadata.managed_fields.is_none()),
            "managedFields are dropped"
        );
        assert_eq!(names(&first.endpoint_slices), ["a-abcde", "b-abcde"]);
        let (_slices_watch_request, _slices_watch) =
            next(&mut routes.slices_watch, "EndpointSlice watch").await;
        wait_for(&mut rx, "the Node", |s| {
            s.node.as_ref().and_then(|n| n.metadata.name.as_deref()) == Some("node-a")
        })
        .await;

        // The ServiceCIDRs were not waited for; once listed, they are in the next snapshots.
        let (_, service_cidrs_list) =
            next(&mut routes.service_cidrs_list, "ServiceCIDR list").await;
        service_cidrs_list.send_response(json_response(&list(
            "ServiceCIDRList",
            "4",
            &[
                json!({"metadata": {"name": "kubernetes", "resourceVersion": "2"},
                     "spec": {"cidrs": ["10.43.0.0/16"]}}),
            ],
        )));
        let (_service_cidrs_watch_request, _service_cidrs_watch) =
            next(&mut routes.service_cidrs_watch, "ServiceCIDR watch").await;
        let listed = wait_for(&mut rx, "the ServiceCIDR", |s| !s.service_cidrs.is_empty()).await;
        assert_eq!(
            names(&listed.service_cidrs),
            ["kubernetes"],
            "cluster-scoped: no namespace"
        );

        // The watch delivers a change, then expires (410 Gone). Service b is deleted meanwhile:
        // the watch never says so; only the re-list shows it missing.
        let mut modified = service("a", "11", "10.96.0.10");
        modified["apiVersion"] = json!("v1");
        modified["kind"] = json!("Service");
        modified["metadata"]["labels"] = json!({"changed": "yes"});
        services_watch.send_response(watch_response(&[
            json!({"type": "MODIFIED", "object": modified}),
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "too old resource version: 10 (15)",
                "reason": "Expired", "code": 410}}),
        ]));
        let changed = wait_for(&mut rx, "the watched change", |s| {
            s.services.values().any(|svc| svc.metadata.labels.is_some())
        })
        .await;
        assert_eq!(
            names(&changed.services),
            ["a", "b"],
            "b is only gone after the re-list"
        );

        let (_, relist) = next(&mut routes.services_list, "Service re-list after 410").await;
        assert_eq!(
            names(&rx.borrow().services),
            ["a", "b"],
            "nothing removed before the re-list"
        );
        relisted.store(true, Ordering::SeqCst);
        relist.send_response(json_response(&list(
            "ServiceList",
            "20",
            &[service("a", "12", "10.96.0.10")],
        )));
        let after = wait_for(&mut rx, "b deleted", |s| s.services.len() == 1).await;
        assert_eq!(names(&after.services), ["a"]);
        assert_eq!(
            names(&after.endpoint_slices),
            ["a-abcde", "b-abcde"],
            "slices are unaffected"
        );
        let (request, _watch_again) = next(
            &mut routes.services_watch,
            "Service watch after the re-list",
        )
        .await;
        assert!(
            query(&request).contains("resourceVersion=20"),
            "{}",
            query(&request)
        );

        source.abort();
        recorder.abort();
        let published = published.lock().unwrap();
        assert!(!published.is_empty());
        for (services, relisted) in published.iter() {
            assert!(
                services.contains(&"b".to_owned()) || *relisted,
                "b disappeared before the re-list: {published:?}"
            );
        }
    }

    #[test]
    fn retries_double_from_800_ms_up_to_5_s_and_start_over_after_a_success() {
        use ::kube::runtime::utils::Backoff as _;
        let mut delays = RetryDelay::default();
        let first: Vec<u128> = delays.by_ref().take(6).map(|d| d.as_millis()).collect();
        assert_eq!(first, [800, 1600, 3200, 5000, 5000, 5000]);
        delays.reset();
        assert_eq!(delays.next(), Some(Duration::from_millis(800)));
    }

    #[tokio::test]
    async fn a_forbidden_list_before_the_first_snapshot_ends_the_source() {
        let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let mut routes = route(handle);
        let client = Client::new(mock, "default");
        let (tx, mut rx) = watch::channel(Arc::new(ClusterSnapshot::default()));
        let source = tokio::spawn(run(client, "node-a".to_owned(), tx));
        let (_, respond) = next(&mut routes.slices_list, "EndpointSlice list").await;
        respond.send_response(forbidden("endpointslices", "discovery.k8s.io"));
        tokio::time::timeout(Duration::from_secs(10), source)
            .await
            .expect("the source ends instead of retrying forever")
            .unwrap();
        assert!(rx.changed().await.is_err(), "nothing was published");
    }

    /// The API server's 403 for a list of `resource` in `group` by the proxy's identity.
    fn forbidden(resource: &str, group: &str) -> Response<Body> {
        Response::builder()
            .status(403)
            .header("content-type", "application/json")
            .body(Body::from(
                serde_json::to_vec(&json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("{resource}.{group} is forbidden: User \"system:serviceaccount:kube-system:kube-ebpf-proxy\" cannot list resource \"{resource}\" in API group \"{group}\" at the cluster scope"),
                    "reason": "Forbidden", "code": 403,
                }))
                .unwrap(),
            ))
            .unwrap()
    }

    #[tokio::test]
    async fn a_forbidden_service_cidr_list_is_not_waited_for() {
        let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let mut routes = route(handle);
        let client = Client::new(mock, "default");
        let (tx, mut rx) = watch::channel(Arc::new(ClusterSnapshot::default()));
        let source = tokio::spawn(run(client, "node-a".to_owned(), tx));
        // An identity with an older ClusterRole: no servicecidrs.
        let (_, respond) = next(&mut routes.service_cidrs_list, "ServiceCIDR list").await;
        respond.send_response(forbidden("servicecidrs", "networking.k8s.io"));
        let (_, respond) = next(&mut routes.services_list, "Service list").await;
        respond.send_response(json_response(&list(
            "ServiceList",
            "10",
            &[service("a", "8", "10.96.0.10")],
        )));
        let (_, respond) = next(&mut routes.slices_list, "EndpointSlice list").await;
        respond.send_response(json_response(&list(
            "EndpointSliceList",
            "10",
            &[slice("a", "10.0.0.1")],
        )));
        let first = wait_for(&mut rx, "both lists", |s| !s.endpoint_slices.is_empty()).await;
        assert_eq!(names(&first.services), ["a"]);
        assert!(!source.is_finished(), "the source keeps running");
        source.abort();
    }
}
