//! Kubernetes Events (kube mode) about objects the proxy cannot program, so that `kubectl
//! describe service X` says why X does not work, as kube-proxy records events about Services
//! it cannot handle. Rate-limited like client-go's event spam filter: the same problem of the
//! same object at most once per interval, and at most a burst of events per object per interval.
//! Published through kube-runtime's `Recorder` (events.k8s.io/v1; a repeat within its cache
//! window becomes a series patch), from a task of its own so a slow API server never delays a
//! sync.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::cluster::Diagnostic;
use crate::cluster::{ClusterSnapshot, ObjectKey};

/// The same problem of the same object is published at most once per this.
pub const REPEAT_INTERVAL: Duration = Duration::from_mins(10);
/// At most this many events per object per [`REPEAT_INTERVAL`] (client-go's spam filter burst).
pub const OBJECT_BURST: usize = 25;
/// The controller name events carry (`reportingController`).
pub const REPORTING_CONTROLLER: &str = "kube-ebpf-proxy";
/// Problems waiting for the publishing task; beyond this a sync's problems are dropped (and
/// come back with the next sync).
const QUEUE: usize = 16;

/// One object the proxy could not program, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub regarding: ObjectReference,
    /// `NotProgrammed` (the object was skipped) or `ProgrammedWithWarning` (used, with a
    /// caveat).
    pub reason: &'static str,
    pub message: String,
}

/// A diagnostic's object (`Kind namespace/name`) as a reference to the object in `snapshot`
/// (with its uid when the snapshot has it); `None` for what is not an API object.
pub fn problem(diagnostic: &Diagnostic, snapshot: &ClusterSnapshot) -> Option<Problem> {
    let (kind, path) = diagnostic.object.split_once(' ')?;
    let (namespace, name) = path.split_once('/')?;
    // Service ports are named `namespace/name:port`: the object is the Service.
    let name = name.split(':').next()?.split_whitespace().next()?;
    let key = ObjectKey {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    let (api_version, uid) = match kind {
        "Service" => (
            "v1",
            snapshot
                .services
                .get(&key)
                .and_then(|s| s.metadata.uid.clone()),
        ),
        "EndpointSlice" => (
            "discovery.k8s.io/v1",
            snapshot
                .endpoint_slices
                .get(&key)
                .and_then(|s| s.metadata.uid.clone()),
        ),
        _ => return None,
    };
    let reason = if diagnostic.message.contains("warning:") {
        "ProgrammedWithWarning"
    } else {
        "NotProgrammed"
    };
    Some(Problem {
        regarding: ObjectReference {
            api_version: Some(api_version.to_owned()),
            kind: Some(kind.to_owned()),
            namespace: Some(key.namespace),
            name: Some(key.name),
            uid,
            ..ObjectReference::default()
        },
        reason,
        message: format!("{}: {}", diagnostic.object, diagnostic.message),
    })
}

/// Which problems may be published now (pure, so the policy is table-tested with any clock).
#[derive(Debug, Default)]
pub struct EventLimiter {
    /// (object, reason, message) → when it was last admitted.
    last: HashMap<(String, &'static str, String), Instant>,
    /// object → when its admitted events in the current interval were admitted.
    per_object: HashMap<String, Vec<Instant>>,
}

fn object_key(reference: &ObjectReference) -> String {
    format!(
        "{}/{}/{}",
        reference.kind.as_deref().unwrap_or_default(),
        reference.namespace.as_deref().unwrap_or_default(),
        reference.name.as_deref().unwrap_or_default()
    )
}

impl EventLimiter {
    pub fn admit(&mut self, problem: &Problem, now: Instant) -> bool {
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < REPEAT_INTERVAL;
        self.last.retain(|_, at| fresh(at));
        self.per_object.retain(|_, times| {
            times.retain(fresh);
            !times.is_empty()
        });
        let object = object_key(&problem.regarding);
        let key = (object.clone(), problem.reason, problem.message.clone());
        if self.last.contains_key(&key) {
            return false;
        }
        let times = self.per_object.entry(object).or_default();
        if times.len() >= OBJECT_BURST {
            return false;
        }
        times.push(now);
        self.last.insert(key, now);
        true
    }
}

/// Publishes admitted problems through a kube-runtime recorder.
pub struct EventPublisher {
    recorder: Recorder,
    limiter: EventLimiter,
}

impl EventPublisher {
    /// `instance` is this node's name (`reportingInstance`: which proxy saw it).
    pub fn new(client: kube::Client, instance: String) -> Self {
        Self {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: REPORTING_CONTROLLER.to_owned(),
                    instance: Some(instance),
                },
            ),
            limiter: EventLimiter::default(),
        }
    }

    /// Publishes what the limiter admits at `now`; returns how many were published. A failed
    /// publish is logged, naming the object, and does not stop the others.
    pub async fn publish(&mut self, problems: &[Problem], now: Instant) -> usize {
        let mut published = 0;
        for problem in problems {
            if !self.limiter.admit(problem, now) {
                continue;
            }
            let event = Event {
                type_: EventType::Warning,
                reason: problem.reason.to_owned(),
                note: Some(problem.message.clone()),
                action: "Program".to_owned(),
                secondary: None,
            };
            match self.recorder.publish(&event, &problem.regarding).await {
                Ok(()) => published += 1,
                Err(error) => tracing::warn!(
                    object = object_key(&problem.regarding),
                    %error,
                    "publishing an event"
                ),
            }
        }
        published
    }
}

/// The sync loop's side of the publishing task.
pub struct EventSender {
    tx: mpsc::Sender<Vec<Problem>>,
}

impl EventSender {
    /// Starts the publishing task.
    pub fn spawn(mut publisher: EventPublisher) -> Self {
        let (tx, mut rx) = mpsc::channel::<Vec<Problem>>(QUEUE);
        tokio::spawn(async move {
            while let Some(problems) = rx.recv().await {
                publisher.publish(&problems, Instant::now()).await;
            }
        });
        Self { tx }
    }

    /// Hands this sync's problems to the task (never waits: when it is behind, they come back
    /// with a later sync).
    pub fn report(&self, diagnostics: &[Diagnostic], snapshot: &ClusterSnapshot) {
        let problems: Vec<Problem> = diagnostics
            .iter()
            .filter_map(|d| problem(d, snapshot))
            .collect();
        if !problems.is_empty() {
            let _ = self.tx.try_send(problems);
        }
    }
}

#[cfg(test)]
mod tests {
    use ::kube::client::Body;
    use http::{Request, Response};
    use k8s_openapi::api::core::v1::Service;
    use serde_json::{Value, json};

    use super::*;

    fn diagnostic(object: &str, message: &str) -> Diagnostic {
        Diagnostic {
            object: object.to_owned(),
            message: message.to_owned(),
        }
    }

    fn snapshot() -> ClusterSnapshot {
        let mut snapshot = ClusterSnapshot::default();
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "1234-5678"}
        }))
        .unwrap();
        snapshot.services.insert(
            ObjectKey {
                namespace: "shop".into(),
                name: "web".into(),
            },
            std::sync::Arc::new(service),
        );
        snapshot
    }

    #[test]
    fn diagnostics_become_references_to_their_objects() {
        let snapshot = snapshot();
        let skipped = problem(
            &diagnostic(
                "Service shop/web",
                "spec.ports[0].protocol: \"ICMP\" is not supported",
            ),
            &snapshot,
        )
        .unwrap();
        assert_eq!(skipped.regarding.kind.as_deref(), Some("Service"));
        assert_eq!(skipped.regarding.api_version.as_deref(), Some("v1"));
        assert_eq!(skipped.regarding.uid.as_deref(), Some("1234-5678"));
        assert_eq!(skipped.reason, "NotProgrammed");
        assert!(
            skipped
                .message
                .starts_with("Service shop/web: spec.ports[0]")
        );
        let warned = problem(
            &diagnostic(
                "EndpointSlice shop/web-1",
                "warning: endpoint 10.0.0.1 has no port",
            ),
            &snapshot,
        )
        .unwrap();
        assert_eq!(
            warned.regarding.api_version.as_deref(),
            Some("discovery.k8s.io/v1")
        );
        assert_eq!(warned.regarding.uid, None, "not in the snapshot");
        assert_eq!(warned.reason, "ProgrammedWithWarning");
        let port = problem(&diagnostic("Service shop/web:http (IPv4)", "x"), &snapshot).unwrap();
        assert_eq!(port.regarding.name.as_deref(), Some("web"));
        assert!(problem(&diagnostic("file broken.yaml", "not YAML"), &snapshot).is_none());
    }

    #[test]
    fn limiter_table() {
        let snapshot = snapshot();
        let a = problem(&diagnostic("Service shop/web", "bad port"), &snapshot).unwrap();
        let b = problem(&diagnostic("Service shop/web", "bad protocol"), &snapshot).unwrap();
        let other = problem(&diagnostic("Service shop/db", "bad port"), &snapshot).unwrap();
        let start = Instant::now();
        let mut limiter = EventLimiter::default();
        // (problem, seconds after start, admitted)
        let cases = [
            (&a, 0, true),
            (&a, 1, false),
            (&b, 2, true),
            (&other, 3, true),
            (&a, 599, false),
            (&a, 601, true),
        ];
        for (problem, at, admitted) in cases {
            assert_eq!(
                limiter.admit(problem, start + Duration::from_secs(at)),
                admitted,
                "{} at {at}s",
                problem.message
            );
        }
        // The burst: distinct problems of one object, beyond OBJECT_BURST in one interval.
        let mut limiter = EventLimiter::default();
        let admitted = (0..OBJECT_BURST + 5)
            .filter(|i| {
                let p = problem(
                    &diagnostic("Service shop/web", &format!("problem {i}")),
                    &snapshot,
                )
                .unwrap();
                limiter.admit(&p, start)
            })
            .count();
        assert_eq!(admitted, OBJECT_BURST);
    }

    /// The recorder against a scripted API server: one create per admitted problem, in the
    /// object's namespace, naming the object and the reason; a repeat is not sent.
    #[tokio::test]
    async fn publisher_creates_events_through_the_api() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(mock, "default");
        let mut publisher = EventPublisher::new(client, "node-a".to_owned());
        let snapshot = snapshot();
        let problems =
            [problem(&diagnostic("Service shop/web", "bad protocol"), &snapshot).unwrap()];
        let server = tokio::spawn(async move {
            let (request, respond) = handle.next_request().await.expect("a request");
            assert_eq!(request.method(), http::Method::POST);
            assert_eq!(
                request.uri().path(),
                "/apis/events.k8s.io/v1/namespaces/shop/events"
            );
            let body = http_body_util::BodyExt::collect(request.into_body())
                .await
                .unwrap()
                .to_bytes();
            let event: Value = serde_json::from_slice(&body).unwrap();
            respond.send_response(
                Response::builder()
                    .status(201)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&event).unwrap()))
                    .unwrap(),
            );
            (event, handle)
        });
        let now = Instant::now();
        assert_eq!(publisher.publish(&problems, now).await, 1);
        let (event, mut handle) = server.await.unwrap();
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "NotProgrammed");
        assert_eq!(event["note"], "Service shop/web: bad protocol");
        assert_eq!(event["regarding"]["kind"], "Service");
        assert_eq!(event["regarding"]["uid"], "1234-5678");
        assert_eq!(event["reportingController"], REPORTING_CONTROLLER);
        assert_eq!(event["reportingInstance"], "node-a");
        // The same problem a minute later: rate-limited, no request at all.
        assert_eq!(
            publisher
                .publish(&problems, now + Duration::from_mins(1))
                .await,
            0
        );
        let nothing = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
        assert!(nothing.is_err(), "no request for a rate-limited event");
    }
}
