//! An in-memory `DataplaneMaps` for tests, with optional capacity limits to exercise full maps.

use super::{DataplaneMaps, MapChange, MapEntries, record};

#[derive(Debug, thiserror::Error)]
#[error("map {0} is full")]
pub struct MapFull(pub &'static str);

#[derive(Debug, Default)]
pub struct MemoryMaps {
    pub entries: MapEntries,
    /// Every change applied, in order.
    pub log: Vec<MapChange>,
    /// Capacity of the services map (`None`: unlimited).
    pub services_capacity: Option<usize>,
    /// The backend sets whose flows the reconciler asked to delete, in order (no conntrack
    /// here: only the requests are recorded).
    pub flow_cleanups: Vec<std::collections::BTreeSet<u32>>,
}

impl DataplaneMaps for MemoryMaps {
    type Error = MapFull;

    fn read_entries(&self) -> Result<MapEntries, MapFull> {
        Ok(self.entries.clone())
    }

    fn apply(&mut self, change: &MapChange) -> Result<(), MapFull> {
        if let (MapChange::UpsertService(k, _), Some(cap)) = (change, self.services_capacity)
            && !self.entries.services.contains_key(k)
            && self.entries.services.len() >= cap
        {
            return Err(MapFull("SERVICES"));
        }
        record(&mut self.entries, change);
        self.log.push(*change);
        Ok(())
    }

    fn delete_flows_to_backends(
        &mut self,
        backends: &std::collections::HashSet<u32>,
    ) -> Result<usize, MapFull> {
        self.flow_cleanups.push(backends.iter().copied().collect());
        Ok(0)
    }
}
