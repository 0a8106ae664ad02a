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

#[derive(Debug, Default)]
struct Pool {
    used: BTreeSet<u32>,
}

impl Pool {
    /// Lowest free id ≥ 1 (0 is never an id, so a zeroed slot points nowhere).
    fn allocate(&mut self) -> u32 {
        let mut candidate = 1;
        for &id in &self.used {
            if id != candidate {
                break;
            }
            candidate += 1;
        }
        self.used.insert(candidate);
        candidate
    }

    fn claim(&mut self, id: u32) -> bool {
        id != 0 && self.used.insert(id)
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
            ids.service_pool.claim(value.1.id);
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
                pool.used.remove(id);
            }
            keep
        });
        let pool = &mut self.service_pool;
        self.services.retain(|k, id| {
            let keep = seen_s.contains(k);
            if !keep {
                pool.used.remove(id);
            }
            keep
        });
        // Service ids recovered from the maps but claimed by nobody this generation are free.
        let claimed: HashSet<u32> = self.services.values().copied().collect();
        self.service_pool.used.retain(|id| claimed.contains(id));
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
        let taken: HashSet<u32> = self.services.values().copied().collect();
        let recovered = frontend_keys
            .iter()
            .filter_map(|k| previous.services.get(k))
            .map(|v| v.id)
            .find(|id| *id != 0 && !taken.contains(id));
        let id = match recovered {
            Some(id) => {
                self.service_pool.used.insert(id);
                id
            }
            None => self.service_pool.allocate(),
        };
        self.services.insert(key, id);
        id
    }
}
