//! Stable ids: a backend keeps its id while it exists (so it is never rewritten), a service port
//! keeps its id while it exists (its affinity and source-range entries are keyed by it). After a
//! restart, ids are recovered from the programmed maps rather than handed out afresh.

use std::collections::{BTreeSet, HashMap, HashSet};

use proxy_common::{Addr, Backend, ServiceKey};

use super::entries::MapEntries;
use crate::model::{IpFamily, ServicePortName};

/// What makes two backends the same backend.
type BackendIdentity = (Addr, u16, u8, u8);

fn identity(b: &Backend) -> BackendIdentity {
    (b.addr, b.port, b.proto, b.family)
}

/// Ids from 1 up, handed out lowest free first (0 is never an id, so a zeroed slot points
/// nowhere). Every operation is O(log n): a large first sync must not be quadratic.
#[derive(Debug)]
struct Pool {
    /// Every id at or above `next` is free, except those in `claimed_ahead`.
    next: u32,
    /// Released ids below `next`.
    free: BTreeSet<u32>,
    /// Ids at or above `next` taken by `claim` (recovered after a restart).
    claimed_ahead: BTreeSet<u32>,
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            next: 1,
            free: BTreeSet::new(),
            claimed_ahead: BTreeSet::new(),
        }
    }
}

impl Pool {
    fn allocate(&mut self) -> u32 {
        if let Some(id) = self.free.pop_first() {
            return id;
        }
        while self.claimed_ahead.remove(&self.next) {
            self.next += 1;
        }
        let id = self.next;
        self.next += 1;
        id
    }

    /// Takes `id` if it is free; false if it was already used (or is 0).
    fn claim(&mut self, id: u32) -> bool {
        match id {
            0 => false,
            id if id >= self.next => self.claimed_ahead.insert(id),
            id => self.free.remove(&id),
        }
    }

    fn release(&mut self, id: u32) {
        if id >= self.next {
            self.claimed_ahead.remove(&id);
        } else if id != 0 {
            self.free.insert(id);
        }
    }
}

#[derive(Debug, Default)]
pub struct Ids {
    backends: HashMap<BackendIdentity, u32>,
    services: HashMap<(ServicePortName, IpFamily), u32>,
    backend_pool: Pool,
    service_pool: Pool,
    seen_backends: HashSet<BackendIdentity>,
    seen_services: HashSet<(ServicePortName, IpFamily)>,
    /// Service ids read back from the maps after a restart that no service port took yet.
    recovered_services: HashSet<u32>,
}

impl Ids {
    /// Recovers backend ids from programmed entries (service ids are recovered lazily from the
    /// frontends' entries in [`Ids::service`]).
    pub fn recover(programmed: &MapEntries) -> Self {
        let mut ids = Ids::default();
        for (&id, backend) in &programmed.backends {
            if ids.backend_pool.claim(id) {
                ids.backends.insert(identity(backend), id);
            }
        }
        for value in programmed.services.iter().filter(|(k, _)| k.slot == 0) {
            if ids.service_pool.claim(value.1.id) {
                ids.recovered_services.insert(value.1.id);
            }
        }
        ids
    }

    pub(super) fn begin_generation(&mut self) {
        self.seen_backends.clear();
        self.seen_services.clear();
    }

    /// Releases the ids of everything not seen since `begin_generation`.
    pub(super) fn end_generation(&mut self) {
        let (seen_b, seen_s) = (&self.seen_backends, &self.seen_services);
        let pool = &mut self.backend_pool;
        self.backends.retain(|k, id| {
            let keep = seen_b.contains(k);
            if !keep {
                pool.release(*id);
            }
            keep
        });
        let pool = &mut self.service_pool;
        self.services.retain(|k, id| {
            let keep = seen_s.contains(k);
            if !keep {
                pool.release(*id);
            }
            keep
        });
        // Service ids recovered from the maps but claimed by nobody this generation are free.
        for id in self.recovered_services.drain() {
            self.service_pool.release(id);
        }
    }

    pub(super) fn backend(&mut self, backend: &Backend) -> u32 {
        let key = identity(backend);
        self.seen_backends.insert(key);
        if let Some(&id) = self.backends.get(&key) {
            return id;
        }
        let id = self.backend_pool.allocate();
        self.backends.insert(key, id);
        id
    }

    /// The id of a service port; after a restart, the id its frontends already carry.
    pub(super) fn service(
        &mut self,
        name: &ServicePortName,
        family: IpFamily,
        frontend_keys: &[ServiceKey],
        previous: &MapEntries,
    ) -> u32 {
        let key = (name.clone(), family);
        self.seen_services.insert(key.clone());
        if let Some(&id) = self.services.get(&key) {
            return id;
        }
        // The id its frontends already carry, unless another service port has it: one recovered
        // after a restart and not taken yet, or one that is free.
        let mut recovered = None;
        for id in frontend_keys
            .iter()
            .filter_map(|k| previous.services.get(k))
            .map(|v| v.id)
        {
            if self.recovered_services.remove(&id) || self.service_pool.claim(id) {
                recovered = Some(id);
                break;
            }
        }
        let id = recovered.unwrap_or_else(|| self.service_pool.allocate());
        self.services.insert(key, id);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::Pool;

    #[test]
    fn the_pool_hands_out_the_lowest_free_id() {
        let mut pool = Pool::default();
        assert_eq!(
            (pool.allocate(), pool.allocate(), pool.allocate()),
            (1, 2, 3)
        );
        pool.release(2);
        assert_eq!(pool.allocate(), 2, "a released id is reused first");
        // Ids read back after a restart, ahead of what was handed out.
        assert!(pool.claim(5));
        assert!(!pool.claim(5), "an id is claimed once");
        assert!(!pool.claim(0), "0 is never an id");
        assert_eq!(
            (pool.allocate(), pool.allocate()),
            (4, 6),
            "claimed ids are skipped"
        );
        pool.release(5);
        pool.release(1);
        assert_eq!(
            (pool.allocate(), pool.allocate(), pool.allocate()),
            (1, 5, 7)
        );
        assert!(pool.claim(9));
        pool.release(9);
        assert_eq!(
            (pool.allocate(), pool.allocate(), pool.allocate()),
            (8, 9, 10)
        );
    }
}
