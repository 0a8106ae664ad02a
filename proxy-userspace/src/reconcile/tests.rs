use std::net::IpAddr;
use std::sync::Arc;

use proxy_common::{SCOPE_CLUSTER, SCOPE_POLICY};

use super::*;
use crate::model::{
    Action, Actions, AddressRules, Endpoint, EndpointSet, Frontend, FrontendKind, IpFamily,
    Protocol, ServicePortName, ServicePortState,
};

const FORWARD: Action = Action::Forward {
    set: EndpointSet::Policy,
    masquerade: false,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn endpoint(addr: &str, port: u16) -> Endpoint {
    Endpoint {
        addr: ip(addr),
        port,
        ready: true,
        serving: true,
        terminating: false,
        local: false,
        node_name: None,
        zone: None,
    }
}

fn cluster_ip_service(name: &str, vip: &str, endpoints: &[(&str, u16)]) -> ServicePortState {
    let endpoints: Vec<Endpoint> = endpoints.iter().map(|(a, p)| endpoint(a, *p)).collect();
    ServicePortState {
        name: ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port: String::new(),
            protocol: Protocol::Tcp,
        },
        family: IpFamily::IPv4,
        frontends: vec![Frontend {
            kind: FrontendKind::ClusterIp,
            addr: ip(vip),
            port: 80,
            actions: Actions {
                pod: FORWARD,
                node: FORWARD,
                other: FORWARD,
            },
            source_ranges: vec![],
        }],
        internal_endpoints: endpoints.clone(),
        external_endpoints: endpoints.clone(),
        cluster_endpoints: endpoints,
        draining_endpoints: Vec::new(),
        affinity_timeout_seconds: None,
        internal_policy_local: false,
        external_policy_local: false,
        health_check_node_port: None,
    }
}

/// `service_ports` with their ClusterIPs, inside the service CIDR 10.96.0.0/12.
pub(crate) fn state(service_ports: Vec<ServicePortState>) -> DesiredState {
    let cluster_ips = service_ports
        .iter()
        .flat_map(|sp| sp.frontends.iter())
        .filter(|f| f.kind == FrontendKind::ClusterIp)
        .map(|f| f.addr)
        .collect();
    DesiredState {
        service_ports: service_ports.into_iter().map(Arc::new).collect(),
        address_rules: AddressRules {
            service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
            cluster_ips,
        },
        ..DesiredState::default()
    }
}

fn key(vip: &str, port: u16, scope: u8, slot: u16) -> ServiceKey {
    ServiceKey {
        slot,
        ..frontend_key(ip(vip), port, proxy_common::IPPROTO_TCP, scope)
    }
}

/// Position of the first change matching `pred` in the log.
fn position(log: &[MapChange], pred: impl Fn(&MapChange) -> bool) -> usize {
    log.iter()
        .position(pred)
        .unwrap_or_else(|| panic!("no such change in {log:#?}"))
}

#[test]
fn new_service_writes_backends_then_slots_then_service_entry() {
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::resume(&maps).unwrap();
    let desired = state(vec![cluster_ip_service(
        "web",
        "10.96.0.10",
        &[("10.244.1.2", 8080), ("10.244.2.2", 8080)],
    )]);
    let report = reconciler.sync(&desired, &NodeEntries::default(), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    let slot0 = key("10.96.0.10", 80, SCOPE_POLICY, 0);
    let entry = maps.entries.services[&slot0];
    assert_eq!(entry.count, 2);
    let backends: Vec<u32> = (1..=2)
        .map(|slot| maps.entries.services[&key("10.96.0.10", 80, SCOPE_POLICY, slot)].id)
        .collect();
    for id in &backends {
        assert!(maps.entries.backends.contains_key(id));
    }
    let last_backend = position(
        &maps.log,
        |c| matches!(c, MapChange::UpsertBackend(id, _) if *id == backends[1]),
    );
    let first_slot = position(
        &maps.log,
        |c| matches!(c, MapChange::UpsertService(k, _) if k.slot == 1),
    );
    let service_entry = position(
        &maps.log,
        |c| matches!(c, MapChange::UpsertService(k, _) if *k == slot0),
    );
    assert!(last_backend < first_slot, "backends before slots");
    assert!(first_slot < service_entry, "slots before the service entry");
    assert!(
        maps.entries
            .service_cidrs
            .contains(&"10.96.0.0/12".parse().unwrap())
    );
    assert_eq!(maps.entries.vips.len(), 1);
}

#[test]
fn unchanged_state_writes_nothing() {
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::resume(&maps).unwrap();
    let desired = state(vec![cluster_ip_service(
        "web",
        "10.96.0.10",
        &[("10.244.1.2", 8080)],
    )]);
    reconciler.sync(&desired, &NodeEntries::default(), &mut maps);
    let report = reconciler.sync(&desired, &NodeEntries::default(), &mut maps);
    assert_eq!(report.applied, 0);
}

#[test]
fn removing_an_endpoint_shrinks_the_count_before_deleting_the_slot_and_touches_no_other_service() {
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::resume(&maps).unwrap();
    let other = cluster_ip_service("other", "10.96.0.20", &[("10.244.3.3", 9000)]);
    let before = state(vec![
        cluster_ip_service(
            "web",
            "10.96.0.10",
            &[("10.244.1.2", 8080), ("10.244.2.2", 8080)],
        ),
        other.clone(),
    ]);
    reconciler.sync(&before, &NodeEntries::default(), &mut maps);
    maps.log.clear();

    let after = state(vec![
        cluster_ip_service("web", "10.96.0.10", &[("10.244.1.2", 8080)]),
        other,
    ]);
    let report = reconciler.sync(&after, &NodeEntries::default(), &mut maps);
    assert!(report.errors.is_empty());
    let shrink = position(
        &maps.log,
        |c| matches!(c, MapChange::UpsertService(k, v) if k.slot == 0 && v.count == 1),
    );
    let slot_gone = position(
        &maps.log,
        |c| matches!(c, MapChange::DeleteService(k) if k.slot == 2),
    );
    let backend_gone = position(&maps.log, |c| matches!(c, MapChange::DeleteBackend(_)));
    assert!(
        shrink < slot_gone && slot_gone < backend_gone,
        "{:#?}",
        maps.log
    );
    assert_eq!(
        maps.log.len(),
        3,
        "exactly: count update, slot delete, backend delete: {:#?}",
        maps.log
    );
    for change in &maps.log {
        if let MapChange::UpsertService(k, _) | MapChange::DeleteService(k) = change {
            assert_eq!(
                ip_from_addr(&k.addr, k.family),
                ip("10.96.0.10"),
                "only web's entries change"
            );
        }
    }
}

#[test]
fn deleting_a_service_removes_its_entry_before_slots_and_backends() {
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::resume(&maps).unwrap();
    reconciler.sync(
        &state(vec![cluster_ip_service(
            "web",
            "10.96.0.10",
            &[("10.244.1.2", 8080), ("10.244.2.2", 8080)],
        )]),
        &NodeEntries::default(),
        &mut maps,
    );
    maps.log.clear();
    reconciler.sync(&state(vec![]), &NodeEntries::default(), &mut maps);
    let entry_gone = position(
        &maps.log,
        |c| matches!(c, MapChange::DeleteService(k) if k.slot == 0),
    );
    let slot_gone = position(
        &maps.log,
        |c| matches!(c, MapChange::DeleteService(k) if k.slot != 0),
    );
    let backend_gone = position(&maps.log, |c| matches!(c, MapChange::DeleteBackend(_)));
    assert!(
        entry_gone < slot_gone && slot_gone < backend_gone,
        "{:#?}",
        maps.log
    );
    assert!(maps.entries.services.is_empty());
    assert!(maps.entries.backends.is_empty());
    assert!(maps.entries.vips.is_empty());
}

#[test]
fn adding_an_endpoint_keeps_existing_backend_ids() {
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::resume(&maps).unwrap();
    reconciler.sync(
        &state(vec![cluster_ip_service(
            "web",
            "10.96.0.10",
            &[("10.244.1.2", 8080)],
        )]),
        &NodeEntries::default(),
        &mut maps,
    );
    let first = maps.entries.backends.clone();
    maps.log.clear();
    reconciler.sync(
        &state(vec![cluster_ip_service(
            "web",
            "10.96.0.10",
            &[("10.244.1.2", 8080), ("10.244.2.2", 8080)],
        )]),
        &NodeEntries::default(),
        &mut maps,
    );
    for (id, backend) in &first {
        assert_eq!(
            maps.entries.backends.get(id),
            Some(backend),
            "backend {id} kept its id"
        );
        assert!(
            !maps.log.contains(&MapChange::UpsertBackend(*id, *backend)),
            "never rewritten"
        );
    }
}

#[test]
fn a_draining_endpoint_keeps_its_backend_but_loses_its_slot() {
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::resume(&maps).unwrap();
    let both = [("10.244.1.2", 8080), ("10.244.2.2", 8080)];
    reconciler.sync(
        &state(vec![cluster_ip_service("web", "10.96.0.10", &both)]),
        &NodeEntries::default(),
        &mut maps,
    );
    let ids: HashMap<IpAddr, u32> = maps
        .entries
        .backends
        .iter()
        .map(|(id, b)| (proxy_common::ip_from_addr(&b.addr, b.family), *id))
        .collect();
    let mut draining = cluster_ip_service("web", "10.96.0.10", &both[..1]);
    draining.draining_endpoints = vec![Endpoint {
        terminating: true,
        ready: false,
        ..endpoint(both[1].0, both[1].1)
    }];
    reconciler.sync(&state(vec![draining]), &NodeEntries::default(), &mut maps);
    let draining_id = ids[&ip("10.244.2.2")];
    assert!(
        maps.entries.backends.contains_key(&draining_id),
        "established flows keep reaching the draining backend (same id)"
    );
    let slots: Vec<u32> = maps
        .entries
        .services
        .iter()
        .filter(|(k, _)| k.slot != 0)
        .map(|(_, v)| v.id)
        .collect();
    assert_eq!(
        slots,
        vec![ids[&ip("10.244.1.2")]],
        "new flows only to the ready one"
    );
}

#[test]
fn a_restarted_reconciler_reads_back_and_rewrites_nothing() {
    let mut maps = MemoryMaps::default();
    let desired = state(vec![
        cluster_ip_service(
            "web",
            "10.96.0.10",
            &[("10.244.1.2", 8080), ("10.244.2.2", 8080)],
        ),
        cluster_ip_service("db", "10.96.0.11", &[("10.244.1.5", 5432)]),
    ]);
    Reconciler::resume(&maps)
        .unwrap()
        .sync(&desired, &NodeEntries::default(), &mut maps);
    let programmed = maps.entries.clone();
    maps.log.clear();

    let mut restarted = Reconciler::resume(&maps).unwrap();
    let report = restarted.sync(&desired, &NodeEntries::default(), &mut maps);
    assert_eq!(report.applied, 0, "{:#?}", maps.log);
    assert_eq!(maps.entries, programmed);

    // And a later change after the restart still allocates without colliding.
    let more = state(vec![
        cluster_ip_service(
            "web",
            "10.96.0.10",
            &[("10.244.1.2", 8080), ("10.244.2.2", 8080)],
        ),
        cluster_ip_service("db", "10.96.0.11", &[("10.244.1.5", 5432)]),
        cluster_ip_service("cache", "10.96.0.12", &[("10.244.1.9", 6379)]),
    ]);
    restarted.sync(&more, &NodeEntries::default(), &mut maps);
    let ids: std::collections::HashSet<u32> = maps
        .entries
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(_, v)| v.id)
        .collect();
    assert_eq!(ids.len(), 3, "three service ports, three distinct ids");
    assert_eq!(maps.entries.backends.len(), 4);
}

#[test]
fn a_full_map_fails_one_service_names_it_and_keeps_everything_programmed() {
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::resume(&maps).unwrap();
    let web = cluster_ip_service("web", "10.96.0.10", &[("10.244.1.2", 8080)]);
    reconciler.sync(
        &state(vec![web.clone()]),
        &NodeEntries::default(),
        &mut maps,
    );
    let programmed = maps.entries.services.clone();
    maps.services_capacity = Some(programmed.len() + 1);

    let big = cluster_ip_service(
        "big",
        "10.96.0.30",
        &[("10.244.5.1", 80), ("10.244.5.2", 80)],
    );
    let report = reconciler.sync(
        &state(vec![web.clone(), big.clone()]),
        &NodeEntries::default(),
        &mut maps,
    );
    assert!(!report.errors.is_empty());
    for (k, v) in &programmed {
        assert_eq!(
            maps.entries.services.get(k),
            Some(v),
            "existing entries intact"
        );
    }
    let named = report
        .errors
        .iter()
        .any(|e| e.to_string().contains("10.96.0.30"));
    assert!(
        named,
        "the error names the failing frontend: {:?}",
        report.errors
    );
    assert!(
        !maps
            .entries
            .services
            .contains_key(&key("10.96.0.30", 80, SCOPE_POLICY, 0)),
        "no service entry without all its slots"
    );

    maps.services_capacity = None;
    let retry = reconciler.sync(&state(vec![web, big]), &NodeEntries::default(), &mut maps);
    assert!(retry.errors.is_empty());
    assert_eq!(
        maps.entries.services[&key("10.96.0.30", 80, SCOPE_POLICY, 0)].count,
        2
    );
}

#[test]
fn short_circuit_writes_the_cluster_scope_before_the_policy_entry() {
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::resume(&maps).unwrap();
    let mut sp = cluster_ip_service(
        "lb",
        "10.96.0.40",
        &[("10.244.1.2", 80), ("10.244.2.2", 80)],
    );
    let mut local = endpoint("10.244.1.2", 80);
    local.local = true;
    sp.external_endpoints = vec![local];
    sp.external_policy_local = true;
    sp.frontends.push(Frontend {
        kind: FrontendKind::NodePort,
        addr: ip("192.0.2.11"),
        port: 30080,
        actions: Actions {
            pod: Action::Forward {
                set: EndpointSet::Cluster,
                masquerade: false,
            },
            node: Action::Forward {
                set: EndpointSet::Cluster,
                masquerade: true,
            },
            other: FORWARD,
        },
        source_ranges: vec![],
    });
    reconciler.sync(&state(vec![sp]), &NodeEntries::default(), &mut maps);
    let policy = maps.entries.services[&key("192.0.2.11", 30080, SCOPE_POLICY, 0)];
    let cluster = maps.entries.services[&key("192.0.2.11", 30080, SCOPE_CLUSTER, 0)];
    assert_eq!((policy.count, cluster.count), (1, 2));
    assert_eq!(
        policy.cluster_classes, 0b011,
        "pod and node classes use the cluster set"
    );
    assert_eq!(
        policy.masquerade_classes, 0b010,
        "node-originated is masqueraded"
    );
    let cluster_entry = position(
        &maps.log,
        |c| matches!(c, MapChange::UpsertService(k, _) if k.slot == 0 && k.scope == SCOPE_CLUSTER && k.port == 30080u16.to_be()),
    );
    let policy_entry = position(
        &maps.log,
        |c| matches!(c, MapChange::UpsertService(k, _) if k.slot == 0 && k.scope == SCOPE_POLICY && k.port == 30080u16.to_be()),
    );
    assert!(cluster_entry < policy_entry);
}

#[test]
fn a_failed_slot_leaves_the_growing_service_entry_at_its_old_count() {
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::resume(&maps).unwrap();
    reconciler.sync(
        &state(vec![cluster_ip_service(
            "web",
            "10.96.0.10",
            &[("10.244.1.2", 8080)],
        )]),
        &NodeEntries::default(),
        &mut maps,
    );
    maps.services_capacity = Some(maps.entries.services.len() + 1);
    let grown = state(vec![cluster_ip_service(
        "web",
        "10.96.0.10",
        &[
            ("10.244.1.2", 8080),
            ("10.244.2.2", 8080),
            ("10.244.3.2", 8080),
        ],
    )]);
    let report = reconciler.sync(&grown, &NodeEntries::default(), &mut maps);
    assert!(!report.errors.is_empty());
    assert_eq!(
        maps.entries.services[&key("10.96.0.10", 80, SCOPE_POLICY, 0)].count,
        1
    );
    maps.services_capacity = None;
    assert!(
        reconciler
            .sync(&grown, &NodeEntries::default(), &mut maps)
            .errors
            .is_empty()
    );
    assert_eq!(
        maps.entries.services[&key("10.96.0.10", 80, SCOPE_POLICY, 0)].count,
        3
    );
}

#[test]
fn affinity_backends_follow_the_eligible_endpoints_of_affinity_services_only() {
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::resume(&maps).unwrap();
    let mut sticky = cluster_ip_service(
        "sticky",
        "10.96.0.10",
        &[("10.244.1.2", 8080), ("10.244.2.2", 8080)],
    );
    sticky.affinity_timeout_seconds = Some(10_800);
    let plain = cluster_ip_service("plain", "10.96.0.11", &[("10.244.1.3", 8080)]);
    let report = reconciler.sync(
        &state(vec![sticky.clone(), plain.clone()]),
        &NodeEntries::default(),
        &mut maps,
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let sticky_id = maps.entries.services[&key("10.96.0.10", 80, SCOPE_POLICY, 0)].id;
    let eligible = |maps: &MemoryMaps| -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = maps
            .entries
            .affinity_backends
            .iter()
            .map(|k| {
                assert_eq!(
                    (k.service_id, k.scope, k.external),
                    (sticky_id, SCOPE_POLICY, 0)
                );
                let b = maps.entries.backends[&k.backend_id];
                ip_from_addr(&b.addr, b.family)
            })
            .collect();
        ips.sort();
        ips
    };
    assert_eq!(eligible(&maps), vec![ip("10.244.1.2"), ip("10.244.2.2")]);

    // One endpoint leaves (terminating, or the selector moved on): it is no longer eligible,
    // and its eligibility goes before the backend itself.
    sticky.internal_endpoints.remove(0);
    maps.log.clear();
    let report = reconciler.sync(
        &state(vec![sticky, plain]),
        &NodeEntries::default(),
        &mut maps,
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(eligible(&maps), vec![ip("10.244.2.2")]);
    let ineligible = position(&maps.log, |c| {
        matches!(c, MapChange::DeleteAffinityBackend(_))
    });
    if let Some(backend_gone) = maps
        .log
        .iter()
        .position(|c| matches!(c, MapChange::DeleteBackend(_)))
    {
        assert!(ineligible < backend_gone);
    }
}

/// A changed service port is laid out again; the others keep their entries and are not
/// looked at (the same `Arc`s).
#[test]
fn a_change_lays_out_only_the_service_ports_that_changed() {
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::resume(&maps).unwrap();
    let mut desired = state(
        (0..50)
            .map(|i| {
                cluster_ip_service(
                    &format!("svc{i}"),
                    &format!("10.96.1.{i}"),
                    &[("10.244.1.2", 8080)],
                )
            })
            .collect(),
    );
    let first = reconciler.sync(&desired, &NodeEntries::default(), &mut maps);
    assert_eq!(first.service_ports_laid_out, 50);
    desired.service_ports[7] = Arc::new(cluster_ip_service(
        "svc7",
        "10.96.1.7",
        &[("10.244.1.2", 8080), ("10.244.9.9", 8080)],
    ));
    let report = reconciler.sync(&desired, &NodeEntries::default(), &mut maps);
    assert_eq!(report.service_ports_laid_out, 1);
    // The new backend, its slot, the grown service entry.
    assert_eq!(report.applied, 3, "{:?}", &maps.log[maps.log.len() - 3..]);
    assert!(
        maps.entries
            .services
            .contains_key(&key("10.96.1.7", 80, SCOPE_POLICY, 2))
    );
}

/// A tiny deterministic generator (xorshift), so the sequence below is the same on every run.
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Service port `i` in its variant `v`: backends shared with other service ports, affinity,
/// source ranges, a NodePort and a draining endpoint depending on both.
fn varied_service(i: usize, v: usize) -> ServicePortState {
    let addrs = [
        "10.244.1.1",
        "10.244.1.2",
        "10.244.2.1",
        "10.244.2.2",
        "10.244.3.1",
    ];
    let endpoints: Vec<(&str, u16)> = (0..=(i + v) % 4)
        .map(|k| (addrs[(i + v * 3 + k) % addrs.len()], 8080 + (v % 2) as u16))
        .collect();
    let mut sp = cluster_ip_service(&format!("svc{i}"), &format!("10.96.2.{i}"), &endpoints);
    if v % 3 == 1 {
        sp.affinity_timeout_seconds = Some(10_800);
    }
    if v % 4 == 2 {
        sp.frontends.push(Frontend {
            kind: FrontendKind::LoadBalancer,
            addr: ip(&format!("192.0.2.{i}")),
            port: 80,
            actions: sp.frontends[0].actions,
            source_ranges: vec![format!("198.51.100.{v}/32").parse().unwrap()],
        });
    }
    if v % 5 == 3 {
        sp.draining_endpoints = vec![endpoint("10.244.9.1", 8080)];
    }
    sp
}

/// Differential: over a long sequence of additions, changes and removals, a reconciler given
/// the same `Arc`s for unchanged service ports (laying out only what changed, diffing only
/// the keys that moved) leaves the maps holding exactly what laying the whole state out anew
/// (with the same ids) gives.
#[test]
fn incremental_syncs_program_what_laying_out_everything_programs() {
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::resume(&maps).unwrap();
    // Service port i → its current variant and Arc (absent: not in the state).
    let mut current: Vec<Option<(usize, Arc<ServicePortState>)>> = vec![None; 16];
    for step in 0..300 {
        let mut changed = 0;
        for _ in 0..=rng.below(4) {
            let i = rng.below(current.len());
            current[i] = match (&current[i], rng.below(3)) {
                (Some(_), 0) => None,
                (slot, _) => {
                    let v = slot.as_ref().map_or(0, |(v, _)| v + 1 + rng.below(3));
                    Some((v, Arc::new(varied_service(i, v))))
                }
            };
            changed += 1;
        }
        let mut desired = state(vec![]);
        desired.service_ports = current.iter().flatten().map(|(_, sp)| sp.clone()).collect();
        desired.address_rules.cluster_ips = desired
            .service_ports
            .iter()
            .map(|sp| sp.frontends[0].addr)
            .collect();
        let report = reconciler.sync(&desired, &NodeEntries::default(), &mut maps);
        assert!(report.errors.is_empty(), "step {step}: {:?}", report.errors);
        assert!(report.service_ports_laid_out <= changed, "step {step}");
        let mut anew = Layout::default();
        anew.update(
            &desired,
            &NodeEntries::default(),
            &mut reconciler.ids.clone(),
            &MapEntries::default(),
        );
        assert_eq!(
            reconciler.layout.entries(),
            anew.entries(),
            "step {step}: the incremental layout differs from laying everything out"
        );
        assert_eq!(
            maps.entries,
            *anew.entries(),
            "step {step}: the maps differ"
        );
        assert_eq!(reconciler.programmed(), &maps.entries, "step {step}");
    }
    reconciler.sync(&state(vec![]), &NodeEntries::default(), &mut maps);
    assert_eq!(maps.entries.services.len(), 0);
    assert_eq!(maps.entries.backends.len(), 0);
    assert_eq!(maps.entries.affinity_backends.len(), 0);
    assert_eq!(maps.entries.source_ranges.len(), 0);
}
