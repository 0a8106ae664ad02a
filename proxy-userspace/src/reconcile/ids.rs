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
#[derive(Clone, Debug)]
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

#[derive(Clone, Debug, Default)]
pub struct Ids {
    /// Each backend's id and how many laid-out service ports name it.
    backends: HashMap<BackendIdentity, (u32, u32)>,
    services: HashMap<(ServicePortName, IpFamily), u32>,
    backend_pool: Pool,
    service_pool: Pool,
    /// Backends whose count fell to 0 (or recovered ones not named yet): released by
    /// [`Ids::settle`] unless named again first.
    unreferenced: Vec<BackendIdentity>,
    /// Service ids read back from the maps after a restart that no service port took yet.
    recovered_services: HashSet<u32>,
    /// Ids of service ports gone since the last [`Ids::settle`].
    released_services: Vec<u32>,
}

impl Ids {
    /// Recovers backend ids from programmed entries (service ids are recovered lazily from the
    /// frontends' entries in [`Ids::service`]).
    pub fn recover(programmed: &MapEntries) -> Self {
        let mut ids = Ids::default();
        for (&id, backend) in &programmed.backends {
            if ids.backend_pool.claim(id) {
                ids.backends.insert(identity(backend), (id, 0));
                ids.unreferenced.push(identity(backend));
            }
        }
        for value in programmed.services.iter().filter(|(k, _)| k.slot == 0) {
            if ids.service_pool.claim(value.1.id) {
                ids.recovered_services.insert(value.1.id);
            }
        }
        ids
    }

    /// The id of `backend`, counted as named once more.
    pub(super) fn acquire_backend(&mut self, backend: &Backend) -> u32 {
        let pool = &mut self.backend_pool;
        let (id, count) = self
            .backends
            .entry(identity(backend))
            .or_insert_with(|| (pool.allocate(), 0));
        *count += 1;
        *id
    }

    /// `backend` is named once less; at 0 its id goes at the next [`Ids::settle`].
    pub(super) fn release_backend(&mut self, backend: &Backend) {
        let key = identity(backend);
        if let Some((_, count)) = self.backends.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.unreferenced.push(key);
            }
        }
    }

    /// Frees the ids of the backends no service port names any more (and of the service ids
    /// recovered after a restart that nobody took) and returns the backend ids freed. Called
    /// once a layout is complete, so an id is never handed to another backend within one sync.
    pub(super) fn settle(&mut self) -> Vec<u32> {
        let mut freed = Vec::new();
        for key in std::mem::take(&mut self.unreferenced) {
            if let Some(&(id, 0)) = self.backends.get(&key) {
                self.backends.remove(&key);
                self.backend_pool.release(id);
                freed.push(id);
            }
        }
        for id in self
            .recovered_services
            .drain()
            .chain(self.released_services.drain(..))
        {
            self.service_pool.release(id);
        }
        freed
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

    /// The service port is gone: its id goes at the next [`Ids::settle`].
    pub(super) fn release_service(&mut self, name: &ServicePortName, family: IpFamily) {
        if let Some(id) = self.services.remove(&(name.clone(), family)) {
            self.released_services.push(id);
        }
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
