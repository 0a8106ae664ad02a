//! The rules kube-proxy would write for the bench's Services, so its two netfilter modes can be
//! measured on the same namespaces without running kube-proxy: the iptables proxier's
//! `iptables-restore` input (`KUBE-SERVICES` → `KUBE-SVC-*` → `KUBE-SEP-*` with `statistic
//! random`) and the nftables proxier's table (`service-ips` verdict map → `service-*` chains
//! with `numgen random` → `endpoint-*` chains), both after kubernetes' `pkg/proxy/iptables` and
//! `pkg/proxy/nftables` `proxier.go` for ClusterIP Services with a local-traffic detector
//! (`--cluster-cidr`).

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use sha2::{Digest as _, Sha256};

/// A ClusterIP Service of namespace `default` with two ports of one number, named `tcp` and
/// `udp` after their protocols (its service port names are `default/NAME:tcp` and `…:udp`).
#[derive(Clone, Debug)]
pub struct BenchService {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<Ipv4Addr>,
    pub target_port: u16,
}

/// kube-proxy's masquerade mark (`--masquerade-bit` 14).
const MASQ_MARK: &str = "0x4000";
/// The protocols each Service port is written for (the bench measures TCP and UDP).
const PROTOCOLS: [&str; 2] = ["tcp", "udp"];

impl BenchService {
    /// `ServicePortName.String()` of the port for `protocol`: `namespace/name:portname`.
    fn port_name(&self, protocol: &str) -> String {
        format!("default/{}:{protocol}", self.name)
    }
}

/// base32(sha256(text)), kube-proxy's chain-name hash (`portProtoHash` and friends).
fn hash(text: &str) -> String {
    data_encoding::BASE32.encode(&Sha256::digest(text.as_bytes()))
}

/// `KUBE-SVC-` + the first 16 characters of the hash of the service port name and protocol.
fn iptables_service_chain(service: &BenchService, protocol: &str) -> String {
    format!(
        "KUBE-SVC-{}",
        &hash(&format!("{}{protocol}", service.port_name(protocol)))[..16]
    )
}

/// `KUBE-SEP-` + the hash of the service port name, protocol and endpoint.
fn iptables_endpoint_chain(service: &BenchService, protocol: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        &hash(&format!(
            "{}{protocol}{endpoint}",
            service.port_name(protocol)
        ))[..16]
    )
}

/// The complete `iptables-restore` input kube-proxy's iptables proxier converges to for
/// `services` (filter and nat tables, the base-chain jumps included, as its setup adds them).
pub fn iptables_restore(services: &[BenchService], cluster_cidr: &str) -> String {
    let mut filter = String::from(
        "*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
",
    );
    let _ = write!(
        filter,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"
    );
    let mut nat_chains = String::from(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
",
    );
    let mut nat_rules = format!(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}
"
    );
    let mut services_chain = String::new();
    for service in services {
        for protocol in PROTOCOLS {
            iptables_service(
                service,
                protocol,
                cluster_cidr,
                &mut nat_chains,
                &mut services_chain,
                &mut nat_rules,
            );
        }
    }
    services_chain.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    format!("{filter}{nat_chains}{services_chain}{nat_rules}COMMIT\n")
}

/// One service port's `KUBE-SERVICES` rule, its `KUBE-SVC-*` chain and `KUBE-SEP-*` chains.
fn iptables_service(
    service: &BenchService,
    protocol: &str,
    cluster_cidr: &str,
    chains: &mut String,
    services_chain: &mut String,
    rules: &mut String,
) {
    let name = service.port_name(protocol);
    let svc_chain = iptables_service_chain(service, protocol);
    let (ip, port) = (service.cluster_ip, service.port);
    let _ = writeln!(chains, ":{svc_chain} - [0:0]");
    let _ = writeln!(
        services_chain,
        "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {protocol} -p {protocol} -d {ip}/32 --dport {port} -j {svc_chain}"
    );
    let _ = writeln!(
        rules,
        "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m {protocol} -p {protocol} -d {ip}/32 --dport {port} ! -s {cluster_cidr} -j KUBE-MARK-MASQ"
    );
    let count = service.endpoints.len();
    for (i, endpoint) in service.endpoints.iter().enumerate() {
        let address = format!("{endpoint}:{}", service.target_port);
        let sep_chain = iptables_endpoint_chain(service, protocol, &address);
        let _ = writeln!(chains, ":{sep_chain} - [0:0]");
        let left = count - i;
        if left > 1 {
            // Each endpoint is taken with probability 1/(endpoints left), as kube-proxy writes it.
            #[allow(clippy::cast_precision_loss)]
            let probability = 1.0 / left as f64;
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{name} -> {address}\" -m statistic --mode random --probability {probability:.10} -j {sep_chain}"
            );
        } else {
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{name} -> {address}\" -j {sep_chain}"
            );
        }
        let _ = writeln!(
            rules,
            "-A {sep_chain} -m comment --comment {name} -s {endpoint}/32 -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            rules,
            "-A {sep_chain} -m comment --comment {name} -m {protocol} -p {protocol} -j DNAT --to-destination {address}"
        );
    }
}

/// The `iptables-restore --noflush` input of kube-proxy's partial sync after `added` appeared:
/// `KUBE-SERVICES` rewritten whole (as every sync does) and the new Services' chains.
pub fn iptables_partial_restore(
    all: &[BenchService],
    added: &BenchService,
    cluster_cidr: &str,
) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let (mut services_chain, mut rules) = (String::new(), String::new());
    let mut ignored_chains = String::new();
    for service in all {
        for protocol in PROTOCOLS {
            let mut ignored_rules = String::new();
            let is_added = service.name == added.name;
            iptables_service(
                service,
                protocol,
                cluster_cidr,
                if is_added {
                    &mut chains
                } else {
                    &mut ignored_chains
                },
                &mut services_chain,
                if is_added {
                    &mut rules
                } else {
                    &mut ignored_rules
                },
            );
        }
    }
    services_chain.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    format!("{chains}{services_chain}{rules}COMMIT\n")
}

/// The nftables proxier's chain name base: 8 hash characters, then the readable
/// `NAMESPACE/NAME/PROTOCOL/PORTNAME` (and `__IP/PORT` for an endpoint's chain).
fn nft_chain_base(service: &BenchService, protocol: &str, endpoint: Option<&str>) -> String {
    let mut hashed = format!("{}{protocol}", service.port_name(protocol));
    let mut readable = format!("default/{}/{protocol}/{protocol}", service.name);
    if let Some(endpoint) = endpoint {
        hashed.push_str(endpoint);
        let _ = write!(readable, "__{}", endpoint.replace(':', "/"));
    }
    format!("{}-{readable}", &hash(&hashed)[..8])
}

/// The `nft -f` input creating kube-proxy's `ip kube-proxy` table (priorities as numbers: nft
/// accepts the names `dstnat`/`srcnat` only on some hooks; dstnat is -100, srcnat 100) for `services` (the parts a
/// ClusterIP Service uses: base chains, `services` dispatch by verdict map, masquerading,
/// the endpoints and firewall checks with their empty maps).
pub fn nft_table(services: &[BenchService], cluster_cidr: &str) -> String {
    let mut text = format!(
        "add table ip kube-proxy {{ comment \"rules for kube-proxy\" ; }}
add chain ip kube-proxy filter-prerouting {{ type filter hook prerouting priority -110 ; }}
add chain ip kube-proxy filter-input {{ type filter hook input priority -110 ; }}
add chain ip kube-proxy filter-forward {{ type filter hook forward priority -110 ; }}
add chain ip kube-proxy filter-output {{ type filter hook output priority -110 ; }}
add chain ip kube-proxy nat-prerouting {{ type nat hook prerouting priority -100 ; }}
add chain ip kube-proxy nat-output {{ type nat hook output priority -100 ; }}
add chain ip kube-proxy nat-postrouting {{ type nat hook postrouting priority 100 ; }}
add chain ip kube-proxy endpoints-check
add chain ip kube-proxy firewall-check
add chain ip kube-proxy services
add chain ip kube-proxy masquerading
add chain ip kube-proxy mark-for-masquerade
add rule ip kube-proxy filter-input ct state new jump endpoints-check
add rule ip kube-proxy filter-forward ct state new jump endpoints-check
add rule ip kube-proxy filter-output ct state new jump endpoints-check
add rule ip kube-proxy filter-prerouting ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump firewall-check
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy mark-for-masquerade mark set mark or {MASQ_MARK}
add rule ip kube-proxy masquerading mark and {MASQ_MARK} == 0 return
add rule ip kube-proxy masquerading mark set mark xor {MASQ_MARK}
add rule ip kube-proxy masquerading masquerade fully-random
add map ip kube-proxy no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}
add map ip kube-proxy firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}
add map ip kube-proxy service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}
add map ip kube-proxy service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}
add rule ip kube-proxy endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
"
    );
    for service in services {
        text.push_str(&nft_service(service, cluster_cidr));
    }
    text
}

/// One Service's chains and `service-ips` elements (also what a change adds, as kube-proxy's
/// incremental transaction does).
pub fn nft_service(service: &BenchService, cluster_cidr: &str) -> String {
    let mut text = String::new();
    let (ip, port) = (service.cluster_ip, service.port);
    for protocol in PROTOCOLS {
        let svc_chain = format!("service-{}", nft_chain_base(service, protocol, None));
        let mut vmap = Vec::new();
        let mut endpoint_chains = String::new();
        for (i, endpoint) in service.endpoints.iter().enumerate() {
            let address = format!("{endpoint}:{}", service.target_port);
            let chain = format!(
                "endpoint-{}",
                nft_chain_base(service, protocol, Some(&address))
            );
            let _ = write!(
                endpoint_chains,
                "add chain ip kube-proxy {chain}
add rule ip kube-proxy {chain} ip saddr {endpoint} jump mark-for-masquerade
add rule ip kube-proxy {chain} meta l4proto {protocol} dnat to {address}
"
            );
            vmap.push(format!("{i} : goto {chain}"));
        }
        let _ = write!(
            text,
            "{endpoint_chains}add chain ip kube-proxy {svc_chain}
add rule ip kube-proxy {svc_chain} ip daddr {ip} {protocol} dport {port} ip saddr != {cluster_cidr} jump mark-for-masquerade
add rule ip kube-proxy {svc_chain} numgen random mod {} vmap {{ {} }}
add element ip kube-proxy service-ips {{ {ip} . {protocol} . {port} : goto {svc_chain} }}
",
            service.endpoints.len(),
            vmap.join(" , ")
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> BenchService {
        BenchService {
            name: "web".to_owned(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            endpoints: vec![Ipv4Addr::new(10, 1, 0, 5), Ipv4Addr::new(10, 1, 0, 6)],
            target_port: 8080,
        }
    }

    #[test]
    fn iptables_rules_have_kube_proxys_shape() {
        let text = iptables_restore(&[service()], "10.1.0.0/16");
        let svc = iptables_service_chain(&service(), "tcp");
        assert!(svc.starts_with("KUBE-SVC-") && svc.len() == 25, "{svc}");
        for line in [
            format!(
                "-A KUBE-SERVICES -m comment --comment \"default/web:tcp cluster IP\" -m tcp -p tcp -d 10.96.0.10/32 --dport 80 -j {svc}"
            ),
            format!(
                "-A {svc} -m comment --comment \"default/web:tcp cluster IP\" -m tcp -p tcp -d 10.96.0.10/32 --dport 80 ! -s 10.1.0.0/16 -j KUBE-MARK-MASQ"
            ),
            "-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-".to_owned(),
            "-j DNAT --to-destination 10.1.0.6:8080".to_owned(),
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
                .to_owned(),
        ] {
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
        // Per protocol: one KUBE-SERVICES rule, a masquerade rule, 2 SEP jumps, 2×2 SEP rules.
        assert_eq!(text.matches("-A KUBE-SVC-").count(), 2 * 3);
        assert_eq!(text.matches("-A KUBE-SEP-").count(), 2 * 4);
        // The nodeports jump stays the last rule of KUBE-SERVICES.
        let services: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert!(services.last().unwrap().contains("KUBE-NODEPORTS"));
    }

    #[test]
    fn a_partial_iptables_sync_rewrites_the_dispatch_and_adds_only_the_new_chains() {
        let mut added = service();
        added.name = "new".to_owned();
        added.cluster_ip = Ipv4Addr::new(10, 96, 0, 11);
        let text = iptables_partial_restore(&[service(), added.clone()], &added, "10.1.0.0/16");
        assert_eq!(text.matches("-A KUBE-SERVICES ").count(), 2 * 2 + 1);
        // The Service already there appears only as a KUBE-SERVICES jump target.
        let old = iptables_service_chain(&service(), "tcp");
        assert!(
            text.lines()
                .filter(|l| l.contains(&old))
                .all(|l| l.starts_with("-A KUBE-SERVICES ")),
            "{text}"
        );
        assert!(text.contains(&format!(
            ":{} - [0:0]",
            iptables_service_chain(&added, "udp")
        )));
    }

    #[test]
    fn nft_rules_have_kube_proxys_shape() {
        let text = nft_table(&[service()], "10.1.0.0/16");
        assert!(text.contains(
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips"
        ));
        let chain = format!("service-{}", nft_chain_base(&service(), "tcp", None));
        assert!(chain.ends_with("-default/web/tcp/tcp"), "{chain}");
        assert!(text.contains(&format!(
            "add element ip kube-proxy service-ips {{ 10.96.0.10 . tcp . 80 : goto {chain} }}"
        )));
        assert!(text.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(text.contains("meta l4proto udp dnat to 10.1.0.6:8080"));
    }
}
