//! What the daemon does around each sync: health, metrics, logs, Kubernetes Events, the
//! service names `inspect` shows, the health check servers; and the dataplane's failure
//! counters, logged as they grow.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::cluster::{ClusterSnapshot, Diagnostic};
use crate::controller::{Controller, SyncPacer, Synced};
use crate::dataplane::{self, Maps};
use crate::events::EventSender;
use crate::health::{ProxyHealth, ServiceHealthServer};
use crate::metrics::ProxyMetrics;
use crate::reconcile::Reconciler;

/// Counters of conditions an operator must hear about (the kernel can only count them).
const FAILURE_COUNTERS: [proxy_common::Counter; 4] = [
    proxy_common::Counter::CtMapFull,
    proxy_common::Counter::SnatExhausted,
    proxy_common::Counter::NoSnatAddress,
    // Live flows evicted from the full conntrack map: raise --conntrack-max.
    proxy_common::Counter::CtForwardMissing,
];

/// Logs the failure counters that grew since the last call.
pub(super) fn warn_on_failure_counters(pin_path: &Path, seen: &mut HashMap<&'static str, u64>) {
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

/// What the daemon does around each sync: health, metrics, logs, Kubernetes Events, the
/// service names `inspect` shows, the health check servers.
pub(super) struct Observers {
    /// What `inspect` names the programmed service ids with.
    pub(super) service_names: dataplane::ServiceNames,
    /// Kubernetes Events about objects that cannot be programmed (API-server source only).
    pub(super) events: Option<EventSender>,
    pub(super) health: Arc<ProxyHealth>,
    pub(super) metrics: Arc<ProxyMetrics>,
    pub(super) service_health: ServiceHealthServer,
    pub(super) reported: HashSet<String>,
    pub(super) allocations: HashSet<String>,
    pub(super) synced_once: bool,
    pub(super) node_seen: bool,
}

impl Observers {
    /// A new snapshot arrived: a sync is queued; the node's health follows its Node at once.
    pub(super) fn queued(&mut self, snapshot: &ClusterSnapshot) {
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
    fn synced(&mut self, synced: &Synced, snapshot: &ClusterSnapshot, reconciler: &Reconciler) {
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
pub(super) fn sync_if_due(
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
