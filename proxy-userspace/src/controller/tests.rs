//! The controller in-process against `MemoryMaps`: golden files from manifests to a dump of the
//! map entries (`testdata/controller/*.txtar`), the drift repair of a full resync, and a
//! property test that every prefix of a sync's writes leaves the maps consistent.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use proptest::prelude::*;
use proxy_common::{
    CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS, SCOPE_CLUSTER, SCOPE_POLICY,
    SVC_F_HAS_CLUSTER_SCOPE, ServiceKey, ip_from_addr,
};

use super::*;
use crate::config::ProxyFlags;
use crate::model::{
    Action, Actions, Endpoint, EndpointSet, Frontend, FrontendKind, IpFamily, Protocol,
    ServicePortName, ServicePortState,
};
use crate::port_range::PortRange;
use crate::reconcile::{MapChange, MapEntries, MemoryMaps, NodeEntries, record};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    flags: ProxyFlags,
}

fn proxy_config(args: &[&str]) -> ProxyConfig {
    Cli::try_parse_from(std::iter::once("kube-ebpf-proxy").chain(args.iter().copied()))
        .expect("flags parse")
        .flags
        .resolve()
        .expect("flags resolve")
        .0
}

fn settings() -> DataplaneSettings {
    DataplaneSettings {
        netns_cookie: 4096,
        snat_ports: PortRange {
            first: 61000,
            last: 65535,
        },
        debug: false,
        fast_path: true,
    }
}

// ---- golden files ----

/// A txtar archive: a comment, then `-- name --` sections.
struct Archive {
    comment: String,
    files: Vec<(String, String)>,
}

impl Archive {
    fn parse(text: &str) -> Archive {
        let mut comment = String::new();
        let mut files: Vec<(String, String)> = Vec::new();
        for line in text.split_inclusive('\n') {
            let header = line
                .trim_end()
                .strip_prefix("-- ")
                .and_then(|rest| rest.strip_suffix(" --"));
            match (header, files.last_mut()) {
                (Some(name), _) => files.push((name.to_owned(), String::new())),
                (None, Some((_, body))) => body.push_str(line),
                (None, None) => comment.push_str(line),
            }
        }
        Archive { comment, files }
    }

    fn file(&self, name: &str) -> Option<&str> {
        self.files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, body)| body.as_str())
    }

    fn format(&self) -> String {
        let mut text = self.comment.clone();
        for (name, body) in &self.files {
            let _ = write!(text, "-- {name} --\n{body}");
        }
        text
    }
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        proxy_common::IPPROTO_TCP => "tcp",
        proxy_common::IPPROTO_UDP => "udp",
        proxy_common::IPPROTO_SCTP => "sctp",
        _ => "?",
    }
}

/// Every entry, one sorted line each: what the kernel programs would see.
fn dump(entries: &MapEntries) -> String {
    let mut lines: Vec<String> = Vec::new();
    let c = entries.config;
    lines.push(format!(
        "config node_ipv4={} node_ipv6={} snat={}-{} detect_local={} flags={:#x} netns_cookie={}",
        ip_from_addr(&c.node_ipv4, proxy_common::FAMILY_IPV4),
        ip_from_addr(&c.node_ipv6, proxy_common::FAMILY_IPV6),
        c.snat_port_min,
        c.snat_port_max,
        c.detect_local_mode,
        c.flags,
        c.netns_cookie
    ));
    for (id, b) in &entries.backends {
        lines.push(format!(
            "backend {id:>3} {} {}:{} flags={:#x}",
            proto_name(b.proto),
            ip_from_addr(&b.addr, b.family),
            u16::from_be(b.port),
            b.flags
        ));
    }
    for (k, v) in &entries.services {
        let frontend = format!(
            "service {} {}:{} {} slot={}",
            proto_name(k.proto),
            ip_from_addr(&k.addr, k.family),
            u16::from_be(k.port),
            if k.scope == SCOPE_CLUSTER {
                "cluster"
            } else {
                "policy"
            },
            k.slot
        );
        lines.push(if k.slot == 0 {
            format!(
                "{frontend} id={} count={} flags={:#x} affinity={} classes cluster={:#x} masquerade={:#x} reject={:#x} drop={:#x}",
                v.id,
                v.count,
                v.flags,
                v.affinity_timeout,
                v.cluster_classes,
                v.masquerade_classes,
                v.reject_classes,
                v.drop_classes
            )
        } else {
            format!("{frontend} backend={}", v.id)
        });
    }
    for k in entries.vips.keys() {
        lines.push(format!("vip {}", ip_from_addr(&k.addr, k.family)));
    }
    for r in &entries.source_ranges {
        lines.push(format!("source-range service={} {}", r.service_id, r.range));
    }
    for cidr in &entries.service_cidrs {
        lines.push(format!("service-cidr {cidr}"));
    }
    for cidr in &entries.local_cidrs {
        lines.push(format!("local-cidr {cidr}"));
    }
    for ifindex in &entries.local_ifindexes {
        lines.push(format!("local-ifindex {ifindex}"));
    }
    for k in &entries.affinity_backends {
        lines.push(format!(
            "affinity service={} backend={} scope={} external={}",
            k.service_id, k.backend_id, k.scope, k.external
        ));
    }
    lines.sort();
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/controller")
}

/// Runs one golden file: its `args` (the proxy's flags), `addresses`, `interfaces` (`name
/// index` lines) and every `*.yaml` section as a manifests folder; the maps after one sync must
/// equal its `maps` section. `UPDATE_GOLDEN=1` rewrites that section instead.
fn run_golden(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut archive = Archive::parse(&text);
    let args: Vec<&str> = archive
        .file("args")
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let config = proxy_config(&args);
    let manifests = tempfile::tempdir().map_err(|e| e.to_string())?;
    for (name, body) in &archive.files {
        if Path::new(name).extension().is_some_and(|e| e == "yaml") {
            std::fs::write(manifests.path().join(name), body).map_err(|e| e.to_string())?;
        }
    }
    let snapshot =
        crate::source::manifests::load_dir(manifests.path(), &config.manifest_settings());
    let addresses: Vec<IpAddr> = archive
        .file("addresses")
        .unwrap_or("")
        .split_whitespace()
        .map(|a| a.parse().expect("an address"))
        .collect();
    let interfaces: Vec<Interface> = archive
        .file("interfaces")
        .unwrap_or("")
        .lines()
        .filter_map(|line| {
            let (name, index) = line.split_once(' ')?;
            Some(Interface {
                name: name.to_owned(),
                index: index.trim().parse().ok()?,
            })
        })
        .collect();
    let mut controller = Controller::new(
        config,
        settings(),
        MemoryMaps::default(),
        SystemTime::UNIX_EPOCH,
    )
    .map_err(|e| e.to_string())?;
    controller.handle(Event::Snapshot(Arc::new(snapshot)));
    controller.handle(Event::LocalAddresses(addresses));
    controller.handle(Event::Interfaces(interfaces));
    let synced = controller
        .sync(SyncKind::Changes)
        .map_err(|e| e.to_string())?;
    if !synced.report.errors.is_empty() {
        return Err(format!("{}: {:?}", path.display(), synced.report.errors));
    }
    let mut got = dump(&controller.maps().entries);
    // Diagnostics name the file: the folder is a fresh temporary one.
    let folder = manifests.path().display().to_string();
    for d in &synced.state.diagnostics {
        let message = d.message.replace(&folder, "$MANIFESTS");
        let _ = writeln!(got, "diagnostic {}: {}", d.object, message);
    }
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        match archive.files.iter_mut().find(|(name, _)| name == "maps") {
            Some((_, body)) => *body = got,
            None => archive.files.push(("maps".into(), got)),
        }
        std::fs::write(path, archive.format()).map_err(|e| e.to_string())?;
        return Ok(());
    }
    let want = archive.file("maps").unwrap_or("");
    if got != want {
        return Err(format!(
            "{}: the maps differ from the golden `maps` section (UPDATE_GOLDEN=1 rewrites it)\n--- want\n{want}--- got\n{got}",
            path.display()
        ));
    }
    // The same state again writes nothing.
    let again = controller
        .sync(SyncKind::Changes)
        .map_err(|e| e.to_string())?;
    if again.report.applied != 0 {
        return Err(format!(
            "{}: a second sync wrote {}",
            path.display(),
            again.report.applied
        ));
    }
    Ok(())
}

#[test]
fn golden_manifests_to_maps() {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("testdata/controller")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "txtar"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no golden files");
    let failures: Vec<String> = paths
        .iter()
        .filter_map(|path| run_golden(path).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---- drift repair ----

const WEB: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.244.1.2]
- addresses: [10.244.2.2]
ports: [{name: \"\", port: 8080}]
";

fn controller_with(manifest: &str) -> Controller<MemoryMaps> {
    let config = proxy_config(&["--hostname-override=node-a"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), manifest).unwrap();
    let snapshot = crate::source::manifests::load_dir(dir.path(), &config.manifest_settings());
    let mut controller = Controller::new(
        config,
        settings(),
        MemoryMaps::default(),
        SystemTime::UNIX_EPOCH,
    )
    .unwrap();
    controller.handle(Event::Snapshot(Arc::new(snapshot)));
    controller.handle(Event::LocalAddresses(vec!["192.168.1.5".parse().unwrap()]));
    controller
}

#[test]
fn a_full_resync_repairs_entries_deleted_or_corrupted_behind_the_proxys_back() {
    let mut controller = controller_with(WEB);
    let first = controller.sync(SyncKind::Changes).unwrap();
    assert!(first.report.errors.is_empty());
    assert_eq!(first.state.diagnostics, vec![]);
    let programmed = controller.maps().entries.clone();
    // Behind the proxy's back: a slot deleted, a backend's port changed, the CONFIG zeroed,
    // a stray VIP added.
    let maps = &mut controller.maps_mut().entries;
    let slot = *maps.services.keys().find(|k| k.slot == 1).unwrap();
    maps.services.remove(&slot);
    let backend = maps.backends.values_mut().next().unwrap();
    backend.port = 9999u16.to_be();
    maps.config = proxy_common::ConfigValue::default();
    let stray = proxy_common::VipKey {
        addr: proxy_common::addr_from_ip("10.96.0.99".parse().unwrap()).0,
        family: proxy_common::FAMILY_IPV4,
        _pad: [0; 3],
    };
    maps.vips.insert(stray, proxy_common::VipValue::default());
    // A sync of changes trusts what it programmed: nothing to do.
    assert_eq!(
        controller.sync(SyncKind::Changes).unwrap().report.applied,
        0
    );
    assert_ne!(controller.maps().entries, programmed);
    let full = controller.sync(SyncKind::Full).unwrap();
    assert!(full.report.errors.is_empty());
    assert_eq!(full.report.applied, 4, "{:?}", controller.maps().log);
    assert_eq!(controller.maps().entries, programmed);
    assert_eq!(controller.sync(SyncKind::Full).unwrap().report.applied, 0);
}

#[test]
fn a_deleted_backend_has_its_flows_removed_after_its_slots() {
    let mut controller = controller_with(WEB);
    controller.sync(SyncKind::Changes).unwrap();
    let one_endpoint = WEB.replace("- addresses: [10.244.2.2]\n", "");
    let smaller = controller_with(&one_endpoint).snapshot().clone();
    controller.handle(Event::Snapshot(smaller));
    let before = controller.maps().log.len();
    let synced = controller.sync(SyncKind::Changes).unwrap();
    assert!(synced.report.errors.is_empty());
    let gone: Vec<u32> = controller.maps().log[before..]
        .iter()
        .filter_map(|c| match c {
            MapChange::DeleteBackend(id) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(gone.len(), 1);
    assert_eq!(
        controller.maps().flow_cleanups,
        vec![gone.iter().copied().collect::<BTreeSet<u32>>()]
    );
}

#[test]
fn programmed_trigger_times_are_reported_once() {
    let annotated = WEB.replace(
        "  name: web-1\n",
        "  name: web-1\n  annotations: {endpoints.kubernetes.io/last-change-trigger-time: \"2026-01-01T10:00:00Z\"}\n",
    );
    let mut controller = controller_with(&annotated);
    let first = controller.sync(SyncKind::Changes).unwrap();
    assert_eq!(
        first.programmed_triggers,
        vec![SystemTime::from(
            "2026-01-01T10:00:00Z".parse::<jiff::Timestamp>().unwrap()
        )]
    );
    assert!(
        controller
            .sync(SyncKind::Changes)
            .unwrap()
            .programmed_triggers
            .is_empty()
    );
}

// ---- every prefix of a sync is consistent ----

/// What a packet may rely on at any moment: a frontend's slots exist, every slot and affinity
/// entry names a backend that exists, a frontend with cluster-scope classes has its cluster
/// entry, and a ClusterIP outside the service CIDRs has the VIPS lookup turned on.
fn inconsistency(entries: &MapEntries) -> Option<String> {
    for (k, v) in &entries.services {
        if k.slot == 0 {
            for slot in 1..=v.count {
                if !entries.services.contains_key(&ServiceKey { slot, ..*k }) {
                    return Some(format!(
                        "{k:?} counts {} but slot {slot} is missing",
                        v.count
                    ));
                }
            }
            if k.scope == SCOPE_POLICY
                && v.flags & SVC_F_HAS_CLUSTER_SCOPE != 0
                && !entries.services.contains_key(&ServiceKey {
                    scope: SCOPE_CLUSTER,
                    ..*k
                })
            {
                return Some(format!("{k:?} has cluster classes but no cluster entry"));
            }
        } else if !entries.backends.contains_key(&v.id) {
            return Some(format!("{k:?} names missing backend {}", v.id));
        }
    }
    for k in &entries.affinity_backends {
        if !entries.backends.contains_key(&k.backend_id) {
            return Some(format!("{k:?} names a missing backend"));
        }
    }
    let outside = entries.vips.keys().any(|k| {
        let ip = ip_from_addr(&k.addr, k.family);
        !entries.service_cidrs.iter().any(|c| c.contains(&ip))
    });
    if outside && entries.config.flags & CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS == 0 {
        return Some("a ClusterIP outside the service CIDRs without the VIPS lookup".into());
    }
    None
}

/// One generated service port: which of a few ClusterIPs (some outside the service CIDR),
/// which endpoints of a small pool, its traffic policies and affinity.
#[derive(Clone, Debug)]
struct PortSpec {
    vip: u8,
    outside: bool,
    endpoints: BTreeSet<u8>,
    local: BTreeSet<u8>,
    node_port: bool,
    cluster_scope: bool,
    affinity: bool,
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    (
        0u8..6,
        any::<bool>(),
        proptest::collection::btree_set(0u8..8, 0..5),
        proptest::collection::btree_set(0u8..8, 0..3),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(vip, outside, endpoints, local, node_port, cluster_scope, affinity)| PortSpec {
                vip,
                outside,
                endpoints,
                local,
                node_port,
                cluster_scope,
                affinity,
            },
        )
}

fn endpoint(i: u8, local: bool) -> Endpoint {
    Endpoint {
        addr: IpAddr::from([10, 244, i, 2]),
        port: 8080,
        ready: true,
        serving: true,
        terminating: false,
        local,
        node_name: None,
        zone: None,
    }
}

fn desired(specs: &[PortSpec]) -> DesiredState {
    let mut seen = BTreeSet::new();
    let mut service_ports = Vec::new();
    for spec in specs {
        // One service port per ClusterIP: the model drops conflicting frontends.
        if !seen.insert(spec.vip) {
            continue;
        }
        let all: Vec<Endpoint> = spec.endpoints.iter().map(|&i| endpoint(i, false)).collect();
        let local: Vec<Endpoint> = spec
            .endpoints
            .intersection(&spec.local)
            .map(|&i| endpoint(i, true))
            .collect();
        let forward = |set| Action::Forward {
            set,
            masquerade: false,
        };
        let set = if spec.cluster_scope {
            EndpointSet::Cluster
        } else {
            EndpointSet::Policy
        };
        let vip = if spec.outside {
            IpAddr::from([192, 168, 50, spec.vip + 1])
        } else {
            IpAddr::from([10, 96, 0, spec.vip + 1])
        };
        let mut frontends = vec![Frontend {
            kind: FrontendKind::ClusterIp,
            addr: vip,
            port: 80,
            actions: Actions {
                pod: forward(EndpointSet::Policy),
                node: forward(EndpointSet::Policy),
                other: forward(EndpointSet::Policy),
            },
            source_ranges: vec![],
        }];
        if spec.node_port {
            frontends.push(Frontend {
                kind: FrontendKind::NodePort,
                addr: IpAddr::from([192, 168, 1, 5]),
                port: 30000 + u16::from(spec.vip),
                actions: Actions {
                    pod: forward(set),
                    node: forward(set),
                    other: forward(EndpointSet::Policy),
                },
                source_ranges: vec![],
            });
        }
        service_ports.push(ServicePortState {
            name: ServicePortName {
                namespace: "default".into(),
                name: format!("svc-{}", spec.vip),
                port: String::new(),
                protocol: Protocol::Tcp,
            },
            family: IpFamily::IPv4,
            frontends,
            internal_endpoints: all.clone(),
            external_endpoints: if spec.local.is_empty() {
                all.clone()
            } else {
                local
            },
            cluster_endpoints: all,
            draining_endpoints: Vec::new(),
            affinity_timeout_seconds: spec.affinity.then_some(10_800),
            internal_policy_local: false,
            external_policy_local: !spec.local.is_empty(),
            health_check_node_port: None,
        });
    }
    service_ports.sort_by(|a, b| a.name.cmp(&b.name));
    crate::reconcile::tests::state(service_ports)
}

fn node_of(state: &DesiredState) -> NodeEntries {
    node_entries(&settings(), &ModelConfig::default(), state, &[])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_prefix_of_a_sync_leaves_the_maps_consistent(
        before in proptest::collection::vec(port_spec(), 0..6),
        after in proptest::collection::vec(port_spec(), 0..6),
    ) {
        let (before, after) = (desired(&before), desired(&after));
        let mut maps = MemoryMaps::default();
        let mut reconciler = Reconciler::resume(&maps).unwrap();
        prop_assert!(reconciler.sync(&before, &node_of(&before), &mut maps).errors.is_empty());
        prop_assert_eq!(inconsistency(&maps.entries), None);
        let mut entries = maps.entries.clone();
        let written = maps.log.len();
        prop_assert!(reconciler.sync(&after, &node_of(&after), &mut maps).errors.is_empty());
        for (i, change) in maps.log[written..].iter().enumerate() {
            record(&mut entries, change);
            prop_assert_eq!(inconsistency(&entries), None, "after write {} {:?}", i, change);
        }
        prop_assert_eq!(&entries, &maps.entries);
    }
}
