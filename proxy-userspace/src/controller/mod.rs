//! The controller: one component owning sources' snapshots → model → reconciler → maps,
//! driven by typed events. `run`, `plan` and `trace` are its callers; it does no I/O of its
//! own beyond the maps it is given, so it runs in-process against `MemoryMaps` in tests.
//!
//! Every write to the maps (Service entries, CONFIG, the detector's interfaces, the flow
//! cleanup for deleted backends) goes through the reconciler, in its safe order. When to sync
//! is the [`SyncPacer`]'s business (kube-proxy's `minSyncPeriod` and `syncPeriod`).

mod node;
mod pacing;
mod triggers;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub use node::{DataplaneSettings, Interface, node_entries};
pub use pacing::{SyncKind, SyncPacer};
pub use triggers::{LAST_CHANGE_TRIGGER_TIME, TriggerTimes};

use crate::cluster::ClusterSnapshot;
use crate::config::ProxyConfig;
use crate::model::{DesiredState, ModelCache, ModelConfig};
use crate::reconcile::{DataplaneMaps, Reconciler, SyncReport};

/// What the controller is told.
#[derive(Clone, Debug)]
pub enum Event {
    /// The source's latest complete snapshot.
    Snapshot(Arc<ClusterSnapshot>),
    /// The addresses on this network namespace's interfaces (NodePort addresses, node IPs).
    LocalAddresses(Vec<IpAddr>),
    /// This network namespace's interfaces (interface-based local-traffic detectors).
    Interfaces(Vec<Interface>),
}

/// What one sync computed and programmed.
#[derive(Debug)]
pub struct Synced {
    pub kind: SyncKind,
    pub model_config: ModelConfig,
    pub state: DesiredState,
    pub report: SyncReport,
    /// How long computing and programming took.
    pub took: Duration,
    /// The EndpointSlice change trigger times this sync programmed (network programming
    /// latency is the time from each to the end of the sync).
    pub programmed_triggers: Vec<SystemTime>,
}

/// The desired state the model computes from `snapshot` for this node.
pub fn compute(
    config: &ProxyConfig,
    snapshot: &ClusterSnapshot,
    local_addresses: &[IpAddr],
) -> (ModelConfig, DesiredState) {
    compute_with(
        &mut ModelCache::default(),
        config,
        snapshot,
        local_addresses,
    )
}

/// [`compute`], reusing what `model` remembers of earlier calls.
fn compute_with(
    model: &mut ModelCache,
    config: &ProxyConfig,
    snapshot: &ClusterSnapshot,
    local_addresses: &[IpAddr],
) -> (ModelConfig, DesiredState) {
    let model_config = config.model_config(snapshot.node.as_ref(), local_addresses);
    let state = model.compute(snapshot, &model_config);
    (model_config, state)
}

/// The pipeline's state between syncs.
pub struct Controller<M: DataplaneMaps> {
    config: ProxyConfig,
    settings: DataplaneSettings,
    maps: M,
    reconciler: Reconciler,
    snapshot: Arc<ClusterSnapshot>,
    local_addresses: Vec<IpAddr>,
    interfaces: Vec<Interface>,
    triggers: TriggerTimes,
    /// The model's per-Service results, so a sync recomputes only the Services that changed.
    model: ModelCache,
}

impl<M: DataplaneMaps> Controller<M> {
    /// A controller over `maps`, resuming from what they hold (after a restart, unchanged
    /// entries are not rewritten and established flows keep their backends). Changes
    /// triggered before `started` are not counted as network programming latency.
    pub fn new(
        config: ProxyConfig,
        settings: DataplaneSettings,
        maps: M,
        started: SystemTime,
    ) -> Result<Self, M::Error> {
        Ok(Self {
            reconciler: Reconciler::resume(&maps)?,
            config,
            settings,
            maps,
            snapshot: Arc::default(),
            local_addresses: Vec::new(),
            interfaces: Vec::new(),
            triggers: TriggerTimes::new(started),
            model: ModelCache::default(),
        })
    }

    /// Takes in an event; the next [`Controller::sync`] programs it.
    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Snapshot(snapshot) => self.snapshot = snapshot,
            Event::LocalAddresses(addresses) => self.local_addresses = addresses,
            Event::Interfaces(interfaces) => self.interfaces = interfaces,
        }
    }

    /// Computes the desired state from the latest events and programs it: what changed since
    /// the last sync, or (a full resync) every difference from what the maps really hold. A
    /// full resync fails only when the maps cannot be read back.
    pub fn sync(&mut self, kind: SyncKind) -> Result<Synced, M::Error> {
        let started = Instant::now();
        let (model_config, state) = compute_with(
            &mut self.model,
            &self.config,
            &self.snapshot,
            &self.local_addresses,
        );
        let node = node_entries(&self.settings, &model_config, &state, &self.interfaces);
        let report = match kind {
            SyncKind::Changes => self.reconciler.sync(&state, &node, &mut self.maps),
            SyncKind::Full => self.reconciler.resync(&state, &node, &mut self.maps)?,
        };
        let programmed_triggers = self.triggers.changed(&self.snapshot);
        Ok(Synced {
            kind,
            model_config,
            state,
            report,
            took: started.elapsed(),
            programmed_triggers,
        })
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    pub fn snapshot(&self) -> &Arc<ClusterSnapshot> {
        &self.snapshot
    }

    pub fn reconciler(&self) -> &Reconciler {
        &self.reconciler
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The maps, for what is not the controller's to write (conntrack GC, traces).
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }
}

#[cfg(test)]
mod tests;
