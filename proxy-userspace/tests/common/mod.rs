//! Programming the maps the way the reconciler does, for the kernel tests.

use std::net::SocketAddr;

use proxy_common::{
    AffinityBackendKey, Backend, SCOPE_POLICY, SVC_F_EXTERNAL, ServiceKey, ServiceValue,
};
use proxy_userspace::dataplane::{Maps, addr_from_ip};

/// Programs `frontend`/`proto` (policy scope) with `backends` (backend ids `id * 100 + 1…`):
/// backends first, then the slots, then the service entry whose count covers them. `edit`
/// sets the per-class bits, flags and affinity of the service entry; with affinity, the
/// backends are also marked eligible for it, as the reconciler does.
pub fn program_service(
    maps: &mut Maps,
    id: u32,
    frontend: SocketAddr,
    proto: u8,
    backends: &[SocketAddr],
    edit: impl FnOnce(&mut ServiceValue),
) {
    program_scope(maps, id, frontend, proto, SCOPE_POLICY, backends, edit);
}

/// [`program_service`] for one scope; backend ids are `id * 100 + scope * 50 + 1…`.
pub fn program_scope(
    maps: &mut Maps,
    id: u32,
    frontend: SocketAddr,
    proto: u8,
    scope: u8,
    backends: &[SocketAddr],
    edit: impl FnOnce(&mut ServiceValue),
) {
    let (addr, family) = addr_from_ip(frontend.ip());
    let key = |slot: u16| ServiceKey {
        addr,
        port: frontend.port().to_be(),
        proto,
        scope,
        slot,
        family,
        _pad: 0,
    };
    for (i, backend) in backends.iter().enumerate() {
        let backend_id = id * 100 + u32::from(scope) * 50 + i as u32 + 1;
        let (backend_addr, backend_family) = addr_from_ip(backend.ip());
        maps.upsert_backend(
            backend_id,
            &Backend {
                addr: backend_addr,
                port: backend.port().to_be(),
                proto,
                family: backend_family,
                ..Backend::default()
            },
        )
        .expect("upsert backend");
        maps.upsert_service_entry(
            &key(i as u16 + 1),
            &ServiceValue {
                id: backend_id,
                ..ServiceValue::default()
            },
        )
        .expect("upsert backend slot");
    }
    let mut value = ServiceValue {
        id,
        count: backends.len() as u16,
        ..ServiceValue::default()
    };
    edit(&mut value);
    if value.affinity_timeout != 0 {
        for i in 0..backends.len() {
            maps.insert_affinity_backend(&AffinityBackendKey {
                service_id: id,
                backend_id: id * 100 + u32::from(scope) * 50 + i as u32 + 1,
                scope,
                external: u8::from(scope == SCOPE_POLICY && value.flags & SVC_F_EXTERNAL != 0),
                _pad: [0; 2],
            })
            .expect("mark the backend eligible for affinity");
        }
    }
    maps.upsert_service_entry(&key(0), &value)
        .expect("upsert service entry");
}
