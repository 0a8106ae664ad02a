//! `kube-ebpf-proxy inspect services|backends|conntrack|affinity`: what a running proxy's pinned
//! maps hold, in Kubernetes terms (Service names from the names the proxy records next to its
//! maps, see `dataplane::ServiceNames`), filterable by Service and address.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use proxy_common::{
    BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Backend, CT_F_REPLY, CT_F_SEEN_REPLY, CT_F_SNAT,
    CT_STATE_CLOSE, CT_STATE_CLOSE_WAIT, CT_STATE_ESTABLISHED, CT_STATE_FIN_WAIT,
    CT_STATE_LAST_ACK, CT_STATE_SYN_RECV, CT_STATE_SYN_SENT, CT_STATE_TIME_WAIT, CtKey, CtValue,
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, SCOPE_POLICY, SOURCE_NODE, SOURCE_OTHER, SOURCE_POD,
    SVC_F_EXTERNAL, SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue,
};
use proxy_userspace::dataplane::{self, Maps, ip_from_addr};
use serde::Serialize;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// What to show.
    #[arg(value_enum)]
    what: What,
    /// Directory on bpffs where the running proxy pinned its maps.
    #[arg(long, default_value = "/sys/fs/bpf/kube-ebpf-proxy")]
    bpf_pin_path: PathBuf,
    /// Only what belongs to this Service: NAMESPACE/NAME, or NAME in any namespace.
    #[arg(long, value_name = "SERVICE")]
    service: Option<String>,
    /// Only entries with this address (frontend, backend, client or masquerade address).
    #[arg(long, value_name = "IP")]
    address: Option<IpAddr>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum What {
    /// Frontends (one per address, port, protocol and scope) with their actions and backends.
    Services,
    /// Backends and the Service ports whose frontends use them.
    Backends,
    /// Tracked flows: client, frontend, backend, state and the time left before expiry.
    Conntrack,
    /// ClientIP session affinity: client, backend and the time left.
    Affinity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

/// A Service port as recorded by the proxy: `namespace/name` and the port's name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
struct ServicePort {
    /// `namespace/name`, or `id N` when the proxy recorded no name for the id.
    service: String,
    /// The port's name ("" for an unnamed port).
    port: String,
}

impl ServicePort {
    fn of(id: u32, names: &BTreeMap<u32, String>) -> Self {
        match names.get(&id).and_then(|name| name.rsplit_once(':')) {
            Some((service, port)) => Self {
                service: service.to_owned(),
                port: port.to_owned(),
            },
            None => Self {
                service: format!("id {id}"),
                port: String::new(),
            },
        }
    }

    fn matches(&self, filter: &str) -> bool {
        match filter.split_once('/') {
            Some(_) => self.service == filter,
            None => self
                .service
                .split_once('/')
                .is_some_and(|(_, name)| name == filter),
        }
    }
}

impl std::fmt::Display for ServicePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.port.is_empty() {
            f.write_str(&self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceRow {
    #[serde(flatten)]
    name: ServicePort,
    id: u32,
    frontend: String,
    protocol: &'static str,
    /// `policy` (the frontend's traffic policy) or `cluster` (the Cluster endpoints used for
    /// pod and node traffic under externalTrafficPolicy Local).
    scope: &'static str,
    external: bool,
    source_ranges: bool,
    affinity_timeout_seconds: u32,
    /// Per source class (pod, node, other): forward, forward to cluster endpoints, masquerade,
    /// reject or drop.
    actions: BTreeMap<&'static str, String>,
    backends: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct BackendRow {
    id: u32,
    address: String,
    protocol: &'static str,
    local: bool,
    terminating: bool,
    service_ports: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FlowRow {
    #[serde(flatten)]
    name: ServicePort,
    protocol: &'static str,
    client: String,
    frontend: String,
    backend: String,
    /// The client address and port the backend sees when the flow is masqueraded.
    masquerade: Option<String>,
    state: &'static str,
    replied: bool,
    idle_seconds: u64,
    expires_in_seconds: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AffinityRow {
    #[serde(flatten)]
    name: ServicePort,
    client: String,
    backend: String,
    scope: &'static str,
    idle_seconds: u64,
    expires_in_seconds: u64,
}

fn protocol(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        IPPROTO_SCTP => "SCTP",
        _ => "other",
    }
}

fn scope(scope: u8) -> &'static str {
    if scope == SCOPE_POLICY {
        "policy"
    } else {
        "cluster"
    }
}

fn endpoint(addr: &proxy_common::Addr, family: u8, port_be: u16) -> String {
    std::net::SocketAddr::new(ip_from_addr(addr, family), u16::from_be(port_be)).to_string()
}

fn backend_address(backend: &Backend) -> String {
    endpoint(&backend.addr, backend.family, backend.port)
}

/// What a service entry does for each source class.
fn actions(value: &ServiceValue) -> BTreeMap<&'static str, String> {
    [
        ("pod", SOURCE_POD),
        ("node", SOURCE_NODE),
        ("other", SOURCE_OTHER),
    ]
    .into_iter()
    .map(|(class, bit)| {
        let has = |mask: u8| mask & (1 << bit) != 0;
        let action = if has(value.reject_classes) {
            "reject".to_owned()
        } else if has(value.drop_classes) {
            "drop".to_owned()
        } else {
            let mut action = "forward".to_owned();
            if has(value.cluster_classes) {
                action.push_str(" to cluster endpoints");
            }
            if has(value.masquerade_classes) {
                action.push_str(", masquerade");
            }
            action
        };
        (class, action)
    })
    .collect()
}

/// A flow's idle timeout: the one place `inspect` asks the conntrack timeouts table, the same
/// table the garbage collector of a proxy with kube-proxy's default `conntrack` settings
/// expires flows by.
fn flow_timeout(proto: u8, forward: &CtValue) -> Duration {
    dataplane::CtTimeouts::with_kube_proxy(&proxy_userspace::config::ConntrackTimeouts::default())
        .for_flow(proto, forward)
}

/// The conntrack state as netfilter names it (`conntrack -L`): TCP states, and for UDP and
/// SCTP whether the flow is unreplied, replied, or assured.
fn conntrack_state(proto: u8, forward: &CtValue) -> &'static str {
    if proto != IPPROTO_TCP {
        return match forward.state {
            CT_STATE_ESTABLISHED => "ASSURED",
            _ if forward.flags & CT_F_SEEN_REPLY != 0 => "REPLIED",
            _ => "UNREPLIED",
        };
    }
    match forward.state {
        CT_STATE_SYN_SENT => "SYN_SENT",
        CT_STATE_SYN_RECV => "SYN_RECV",
        CT_STATE_ESTABLISHED => "ESTABLISHED",
        CT_STATE_FIN_WAIT => "FIN_WAIT",
        CT_STATE_CLOSE_WAIT => "CLOSE_WAIT",
        CT_STATE_LAST_ACK => "LAST_ACK",
        CT_STATE_TIME_WAIT => "TIME_WAIT",
        CT_STATE_CLOSE => "CLOSE",
        _ => "UNKNOWN",
    }
}

/// The pinned maps and names, read once.
struct Snapshot {
    names: BTreeMap<u32, String>,
    services: Vec<(ServiceKey, ServiceValue)>,
    backends: HashMap<u32, Backend>,
    now_ns: u64,
}

impl Snapshot {
    fn name(&self, id: u32) -> ServicePort {
        ServicePort::of(id, &self.names)
    }

    /// Service id → slot-0 entry, for the affinity timeout.
    fn service_entry(&self, id: u32) -> Option<&ServiceValue> {
        self.services
            .iter()
            .find(|(k, v)| k.slot == 0 && v.id == id)
            .map(|(_, v)| v)
    }

    fn backend(&self, id: u32) -> String {
        self.backends
            .get(&id)
            .map_or_else(|| format!("backend {id} (gone)"), backend_address)
    }
}

struct Filter {
    service: Option<String>,
    address: Option<IpAddr>,
}

impl Filter {
    fn keeps(&self, name: &ServicePort, addresses: &[IpAddr]) -> bool {
        self.service.as_deref().is_none_or(|s| name.matches(s))
            && self.address.is_none_or(|a| addresses.contains(&a))
    }
}

fn services(snapshot: &Snapshot, filter: &Filter) -> Vec<ServiceRow> {
    let slots: HashMap<ServiceKey, u32> = snapshot
        .services
        .iter()
        .filter(|(k, _)| k.slot != 0)
        .map(|(k, v)| (*k, v.id))
        .collect();
    let mut rows: Vec<ServiceRow> = snapshot
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .filter_map(|(key, value)| {
            let backend_ids: Vec<u32> = (1..=value.count)
                .filter_map(|slot| slots.get(&ServiceKey { slot, ..*key }).copied())
                .collect();
            let mut addresses = vec![ip_from_addr(&key.addr, key.family)];
            addresses.extend(
                backend_ids
                    .iter()
                    .filter_map(|id| snapshot.backends.get(id))
                    .map(|b| ip_from_addr(&b.addr, b.family)),
            );
            let name = snapshot.name(value.id);
            filter.keeps(&name, &addresses).then(|| ServiceRow {
                name,
                id: value.id,
                frontend: endpoint(&key.addr, key.family, key.port),
                protocol: protocol(key.proto),
                scope: scope(key.scope),
                external: value.flags & SVC_F_EXTERNAL != 0,
                source_ranges: value.flags & SVC_F_SOURCE_RANGES != 0,
                affinity_timeout_seconds: value.affinity_timeout,
                actions: actions(value),
                backends: backend_ids.iter().map(|id| snapshot.backend(*id)).collect(),
            })
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.name.service, &a.name.port, &a.frontend, a.scope).cmp(&(
            &b.name.service,
            &b.name.port,
            &b.frontend,
            b.scope,
        ))
    });
    rows
}

fn backends(snapshot: &Snapshot, filter: &Filter) -> Vec<BackendRow> {
    // Backend id → the service ids whose slots name it.
    let mut users: HashMap<u32, Vec<u32>> = HashMap::new();
    let entries: HashMap<ServiceKey, u32> = snapshot
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| (*k, v.id))
        .collect();
    for (key, value) in snapshot.services.iter().filter(|(k, _)| k.slot != 0) {
        if let Some(service) = entries.get(&ServiceKey { slot: 0, ..*key }) {
            let list = users.entry(value.id).or_default();
            if !list.contains(service) {
                list.push(*service);
            }
        }
    }
    let mut rows: Vec<BackendRow> = snapshot
        .backends
        .iter()
        .filter_map(|(id, backend)| {
            let names: Vec<ServicePort> = users
                .get(id)
                .into_iter()
                .flatten()
                .map(|service| snapshot.name(*service))
                .collect();
            let address = ip_from_addr(&backend.addr, backend.family);
            let service_match = filter
                .service
                .as_deref()
                .is_none_or(|s| names.iter().any(|n| n.matches(s)));
            let address_match = filter.address.is_none_or(|a| a == address);
            let mut service_ports: Vec<String> = names.iter().map(ToString::to_string).collect();
            service_ports.sort();
            (service_match && address_match).then(|| BackendRow {
                id: *id,
                address: backend_address(backend),
                protocol: protocol(backend.proto),
                local: backend.flags & BACKEND_F_LOCAL != 0,
                terminating: backend.flags & BACKEND_F_TERMINATING != 0,
                service_ports,
            })
        })
        .collect();
    rows.sort_by_key(|row| row.id);
    rows
}

fn conntrack(snapshot: &Snapshot, entries: &[(CtKey, CtValue)], filter: &Filter) -> Vec<FlowRow> {
    let by_key: HashMap<CtKey, CtValue> = entries.iter().copied().collect();
    let mut rows: Vec<FlowRow> = entries
        .iter()
        .filter(|(_, v)| v.flags & CT_F_REPLY == 0)
        .filter_map(|(key, forward)| {
            let reply = by_key.get(&key.reply_of_forward(forward));
            let last_seen = reply.map_or(forward.last_seen_ns, |r| {
                r.last_seen_ns.max(forward.last_seen_ns)
            });
            let idle = Duration::from_nanos(snapshot.now_ns.saturating_sub(last_seen));
            let timeout = flow_timeout(key.proto, forward);
            let snat = forward.flags & CT_F_SNAT != 0;
            let name = snapshot.name(forward.service_id);
            let mut addresses = vec![
                ip_from_addr(&key.src, key.family),
                ip_from_addr(&key.dst, key.family),
                ip_from_addr(&forward.nat_dst, key.family),
            ];
            if snat {
                addresses.push(ip_from_addr(&forward.nat_src, key.family));
            }
            filter.keeps(&name, &addresses).then(|| FlowRow {
                name,
                protocol: protocol(key.proto),
                client: endpoint(&key.src, key.family, key.sport),
                frontend: endpoint(&key.dst, key.family, key.dport),
                backend: endpoint(&forward.nat_dst, key.family, forward.nat_dport),
                masquerade: snat.then(|| endpoint(&forward.nat_src, key.family, forward.nat_sport)),
                state: conntrack_state(key.proto, forward),
                replied: forward.flags & CT_F_SEEN_REPLY != 0,
                idle_seconds: idle.as_secs(),
                expires_in_seconds: timeout.saturating_sub(idle).as_secs(),
            })
        })
        .collect();
    rows.sort_by(|a, b| (&a.name.service, &a.client).cmp(&(&b.name.service, &b.client)));
    rows
}

fn affinity(
    snapshot: &Snapshot,
    entries: &[(proxy_common::AffinityKey, proxy_common::AffinityValue)],
    filter: &Filter,
) -> Vec<AffinityRow> {
    let mut rows: Vec<AffinityRow> = entries
        .iter()
        .filter_map(|(key, value)| {
            let name = snapshot.name(key.service_id);
            let client = ip_from_addr(&key.client, key.family);
            let backend = snapshot.backends.get(&value.backend_id);
            let mut addresses = vec![client];
            addresses.extend(backend.map(|b| ip_from_addr(&b.addr, b.family)));
            let idle = Duration::from_nanos(snapshot.now_ns.saturating_sub(value.last_used_ns));
            let timeout = Duration::from_secs(u64::from(
                snapshot
                    .service_entry(key.service_id)
                    .map_or(0, |s| s.affinity_timeout),
            ));
            filter.keeps(&name, &addresses).then(|| AffinityRow {
                name,
                client: client.to_string(),
                backend: snapshot.backend(value.backend_id),
                scope: scope(key.scope),
                idle_seconds: idle.as_secs(),
                expires_in_seconds: timeout.saturating_sub(idle).as_secs(),
            })
        })
        .collect();
    rows.sort_by(|a, b| (&a.name.service, &a.client).cmp(&(&b.name.service, &b.client)));
    rows
}

/// Prints `rows` as JSON, or as aligned text columns.
fn print<T: Serialize>(
    rows: &[T],
    format: Format,
    text: impl Fn(&T) -> Vec<String>,
    header: &[&str],
) -> anyhow::Result<()> {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    let lines: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| (*h).to_owned()).collect())
        .chain(rows.iter().map(text))
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    for line in lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    Ok(())
}

pub fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let maps = Maps::open(&args.bpf_pin_path)?;
    let snapshot = Snapshot {
        names: dataplane::read_service_names(&args.bpf_pin_path)?,
        services: maps.service_entries()?,
        backends: maps.backend_entries()?.into_iter().collect(),
        now_ns: dataplane::monotonic_now_ns(),
    };
    let filter = Filter {
        service: args.service.clone(),
        address: args.address,
    };
    let format = args.output;
    match args.what {
        What::Services => print(
            &services(&snapshot, &filter),
            format,
            |r| {
                vec![
                    r.name.to_string(),
                    r.frontend.clone(),
                    r.protocol.to_owned(),
                    r.scope.to_owned(),
                    format!(
                        "pod: {}; node: {}; other: {}",
                        r.actions["pod"], r.actions["node"], r.actions["other"]
                    ),
                    r.backends.join(","),
                ]
            },
            &[
                "SERVICE", "FRONTEND", "PROTO", "SCOPE", "ACTIONS", "BACKENDS",
            ],
        ),
        What::Backends => print(
            &backends(&snapshot, &filter),
            format,
            |r| {
                let mut flags = Vec::new();
                if r.local {
                    flags.push("local");
                }
                if r.terminating {
                    flags.push("terminating");
                }
                vec![
                    r.id.to_string(),
                    r.address.clone(),
                    r.protocol.to_owned(),
                    flags.join(","),
                    r.service_ports.join(","),
                ]
            },
            &["ID", "BACKEND", "PROTO", "FLAGS", "SERVICES"],
        ),
        What::Conntrack => print(
            &conntrack(&snapshot, &maps.conntrack_entries()?, &filter),
            format,
            |r| {
                vec![
                    r.name.to_string(),
                    r.protocol.to_owned(),
                    r.client.clone(),
                    r.frontend.clone(),
                    r.backend.clone(),
                    r.masquerade.clone().unwrap_or_default(),
                    r.state.to_owned(),
                    format!("{}s", r.expires_in_seconds),
                ]
            },
            &[
                "SERVICE",
                "PROTO",
                "CLIENT",
                "FRONTEND",
                "BACKEND",
                "MASQUERADE",
                "STATE",
                "EXPIRES IN",
            ],
        ),
        What::Affinity => print(
            &affinity(&snapshot, &maps.affinity_entries()?, &filter),
            format,
            |r| {
                vec![
                    r.name.to_string(),
                    r.client.clone(),
                    r.backend.clone(),
                    r.scope.to_owned(),
                    format!("{}s", r.expires_in_seconds),
                ]
            },
            &["SERVICE", "CLIENT", "BACKEND", "SCOPE", "EXPIRES IN"],
        ),
    }
}
