//! kube-proxy's network programming latency: EndpointSlices carry the time of the change that
//! triggered them (`endpoints.kubernetes.io/last-change-trigger-time`, set by the
//! EndpointSlice controller); once a sync has programmed a slice whose trigger time is new, the
//! time since then is observed (`pkg/proxy/endpointslicecache.go` `updatePending`, the
//! proxiers' `NetworkProgrammingLatency.Observe`). Trigger times from before the proxy started
//! are not observed: the proxy was not there to program them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::cluster::{ClusterSnapshot, ObjectKey};

/// The annotation (`v1.EndpointsLastChangeTriggerTime`).
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The trigger time of each EndpointSlice as last programmed.
#[derive(Debug)]
pub struct TriggerTimes {
    started: SystemTime,
    /// Each slice's trigger time, with the slice it was read from: the same `Arc` again (an
    /// unchanged slice in a new snapshot) is not read again.
    seen: HashMap<ObjectKey, Seen>,
    generation: u64,
}

#[derive(Debug)]
struct Seen {
    slice: Arc<EndpointSlice>,
    time: Option<SystemTime>,
    generation: u64,
}

/// A slice's trigger time; an absent or unparsable annotation has none (kube-proxy ignores it).
fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let text = slice
        .metadata
        .annotations
        .as_ref()?
        .get(LAST_CHANGE_TRIGGER_TIME)?;
    let timestamp: jiff::Timestamp = text.parse().ok()?;
    Some(SystemTime::from(timestamp))
}

impl TriggerTimes {
    /// Trigger times after `started` count.
    pub fn new(started: SystemTime) -> TriggerTimes {
        TriggerTimes {
            started,
            seen: HashMap::new(),
            generation: 0,
        }
    }

    /// The trigger times `snapshot` brings that the last call had not seen (new slices, or
    /// slices whose trigger time moved), to be observed once they are programmed.
    pub fn changed(&mut self, snapshot: &ClusterSnapshot) -> Vec<SystemTime> {
        self.generation += 1;
        let generation = self.generation;
        let mut new = Vec::new();
        for (key, slice) in &snapshot.endpoint_slices {
            if let Some(seen) = self.seen.get_mut(key) {
                seen.generation = generation;
                if Arc::ptr_eq(&seen.slice, slice) {
                    continue;
                }
                seen.slice = Arc::clone(slice);
                let time = trigger_time(slice);
                if seen.time == time {
                    continue;
                }
                seen.time = time;
            } else {
                self.seen.insert(
                    key.clone(),
                    Seen {
                        slice: Arc::clone(slice),
                        time: trigger_time(slice),
                        generation,
                    },
                );
            }
            if let Some(time) = self.seen[key].time
                && time > self.started
            {
                new.push(time);
            }
        }
        self.seen.retain(|_, seen| seen.generation == generation);
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, trigger: Option<&str>) -> (ObjectKey, std::sync::Arc<EndpointSlice>) {
        let mut slice = EndpointSlice::default();
        if let Some(trigger) = trigger {
            slice.metadata.annotations = Some(
                [(LAST_CHANGE_TRIGGER_TIME.to_owned(), trigger.to_owned())]
                    .into_iter()
                    .collect(),
            );
        }
        let key = ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        };
        (key, std::sync::Arc::new(slice))
    }

    fn snapshot(slices: &[(&str, Option<&str>)]) -> ClusterSnapshot {
        ClusterSnapshot {
            endpoint_slices: slices.iter().map(|(n, t)| slice(n, *t)).collect(),
            ..ClusterSnapshot::default()
        }
    }

    fn at(text: &str) -> SystemTime {
        SystemTime::from(text.parse::<jiff::Timestamp>().unwrap())
    }

    #[test]
    fn each_new_trigger_time_after_the_start_is_reported_once() {
        let mut times = TriggerTimes::new(at("2026-01-01T10:00:00Z"));
        let first = snapshot(&[
            ("before-start", Some("2026-01-01T09:59:59Z")),
            ("web", Some("2026-01-01T10:00:01.5Z")),
            ("no-annotation", None),
            ("garbage", Some("yesterday")),
        ]);
        assert_eq!(times.changed(&first), vec![at("2026-01-01T10:00:01.5Z")]);
        assert_eq!(times.changed(&first), vec![], "already programmed");
        let moved = snapshot(&[
            ("before-start", Some("2026-01-01T09:59:59Z")),
            ("web", Some("2026-01-01T10:00:03+00:00")),
        ]);
        assert_eq!(times.changed(&moved), vec![at("2026-01-01T10:00:03Z")]);
        // A slice deleted and created again with the same trigger time is a new change.
        assert_eq!(times.changed(&snapshot(&[])), vec![]);
        assert_eq!(times.changed(&moved), vec![at("2026-01-01T10:00:03Z")]);
    }
}
