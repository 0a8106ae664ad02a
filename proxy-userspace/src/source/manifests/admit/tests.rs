use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;

use super::allocation::ip_to_u128;
use super::*;
use crate::port_range::PortRange;

fn settings(cidrs: &[&str]) -> ManifestSettings {
    ManifestSettings {
        service_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        node_port_range: PortRange {
            first: 30000,
            last: 32767,
        },
        hostname: "node-a".to_owned(),
    }
}

fn candidate(name: &str, spec: &serde_json::Value) -> Candidate {
    let service: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
    .unwrap();
    Candidate {
        key: ObjectKey {
            namespace: "default".to_owned(),
            name: name.to_owned(),
        },
        origin: Origin {
            file: PathBuf::from(format!("{name}.yaml")),
            document: 1,
        },
        created: SystemTime::UNIX_EPOCH,
        service,
    }
}

fn run(
    candidates: Vec<Candidate>,
    settings: &ManifestSettings,
) -> (
    BTreeMap<ObjectKey, Service>,
    Vec<Diagnostic>,
    Vec<Allocation>,
) {
    let mut diagnostics = Vec::new();
    let mut allocations = Vec::new();
    let admitted = admit(
        candidates,
        settings,
        &mut History::default(),
        &mut diagnostics,
        &mut allocations,
    );
    (admitted, diagnostics, allocations)
}

fn spec_of<'a>(admitted: &'a BTreeMap<ObjectKey, Service>, name: &str) -> &'a ServiceSpec {
    admitted
        .iter()
        .find(|(k, _)| k.name == name)
        .and_then(|(_, s)| s.spec.as_ref())
        .unwrap_or_else(|| panic!("{name} not admitted"))
}

#[test]
fn allocation_is_deterministic_and_stable_across_unrelated_edits() {
    let settings = settings(&["10.96.0.0/12"]);
    let web = || {
        candidate(
            "web",
            &serde_json::json!({"type": "NodePort", "ports": [{"port": 80}]}),
        )
    };
    let (first, diagnostics, allocations) = run(vec![web()], &settings);
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    assert_eq!(allocations.len(), 2, "{allocations:?}");
    let (second, _, _) = run(
        vec![
            web(),
            candidate(
                "other",
                &serde_json::json!({"type": "NodePort", "ports": [{"port": 81}]}),
            ),
        ],
        &settings,
    );
    let a = spec_of(&first, "web");
    let b = spec_of(&second, "web");
    assert_eq!(a.cluster_ip, b.cluster_ip);
    assert_eq!(
        a.ports.as_ref().unwrap()[0].node_port,
        b.ports.as_ref().unwrap()[0].node_port
    );
    let ip: IpAddr = a.cluster_ip.as_deref().unwrap().parse().unwrap();
    let net: IpNet = "10.96.0.0/12".parse().unwrap();
    assert!(net.contains(&ip), "{ip}");
    // Dynamic band: above the 256 addresses kept for explicit choices.
    assert!(ip_to_u128(ip) > ip_to_u128(net.network()) + 256, "{ip}");
    let node_port = a.ports.as_ref().unwrap()[0].node_port.unwrap();
    assert!((30000..=32767).contains(&node_port), "{node_port}");
    assert_eq!(a.ip_families, Some(vec!["IPv4".to_owned()]));
    assert_eq!(a.ip_family_policy.as_deref(), Some("SingleStack"));
    assert_eq!(a.external_traffic_policy.as_deref(), Some("Cluster"));
    assert_eq!(
        a.ports.as_ref().unwrap()[0].target_port,
        Some(IntOrString::Int(80))
    );
    assert_eq!(
        a.ports.as_ref().unwrap()[0].protocol.as_deref(),
        Some("TCP")
    );
}

#[test]
fn explicit_values_duplicates_and_ranges() {
    struct Case {
        name: &'static str,
        services: Vec<Candidate>,
        admitted: &'static [&'static str],
        diagnostics: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "explicit ClusterIP and NodePort are honoured",
            services: vec![candidate(
                "a",
                &serde_json::json!({"type": "NodePort", "clusterIP": "10.96.0.10",
                    "ports": [{"port": 80, "nodePort": 30080}]}),
            )],
            admitted: &["a"],
            diagnostics: &[],
        },
        Case {
            name: "NodePort outside the range is a warning naming the Service",
            services: vec![candidate(
                "low",
                &serde_json::json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 8080}]}),
            )],
            admitted: &["low"],
            diagnostics: &["Service default/low|low.yaml: warning: NodePort 8080 is outside"],
        },
        Case {
            name: "duplicate NodePort rejects the second Service",
            services: vec![
                candidate(
                    "a",
                    &serde_json::json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}),
                ),
                candidate(
                    "b",
                    &serde_json::json!({"type": "NodePort", "ports": [{"port": 81, "nodePort": 30080}]}),
                ),
            ],
            admitted: &["a"],
            diagnostics: &[
                "Service default/b|b.yaml: NodePort 30080 is already allocated to Service default/a",
            ],
        },
        Case {
            name: "same NodePort for TCP and UDP of one Service is allowed",
            services: vec![candidate(
                "dns",
                &serde_json::json!({"type": "NodePort", "ports": [
                    {"name": "tcp", "port": 53, "nodePort": 30053, "protocol": "TCP"},
                    {"name": "udp", "port": 53, "nodePort": 30053, "protocol": "UDP"}]}),
            )],
            admitted: &["dns"],
            diagnostics: &[],
        },
        Case {
            name: "duplicate ClusterIP rejects the second Service",
            services: vec![
                candidate(
                    "a",
                    &serde_json::json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
                ),
                candidate(
                    "b",
                    &serde_json::json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
                ),
            ],
            admitted: &["a"],
            diagnostics: &[
                "Service default/b|b.yaml: spec.clusterIPs 10.96.0.10 is already allocated",
            ],
        },
        Case {
            name: "invalid ClusterIP",
            services: vec![candidate(
                "a",
                &serde_json::json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}),
            )],
            admitted: &[],
            diagnostics: &[
                "Service default/a|a.yaml: spec.clusterIPs \"10.96.0.300\" is not a valid IP address",
            ],
        },
        Case {
            name: "port out of range",
            services: vec![candidate(
                "a",
                &serde_json::json!({"ports": [{"port": 70000}]}),
            )],
            admitted: &[],
            diagnostics: &[
                "Service default/a|a.yaml: spec.ports[0].port 70000 is out of range 1-65535",
            ],
        },
        Case {
            name: "invalid externalIP",
            services: vec![candidate(
                "a",
                &serde_json::json!({"externalIPs": ["192.0.2.x"], "ports": [{"port": 80}]}),
            )],
            admitted: &[],
            diagnostics: &[
                "Service default/a|a.yaml: spec.externalIPs \"192.0.2.x\" is not a valid IP address",
            ],
        },
        Case {
            name: "ClusterIP outside the range is honoured with a warning",
            services: vec![candidate(
                "a",
                &serde_json::json!({"clusterIP": "172.16.0.1", "ports": [{"port": 80}]}),
            )],
            admitted: &["a"],
            diagnostics: &[
                "Service default/a|a.yaml: warning: spec.clusterIPs 172.16.0.1 is outside",
            ],
        },
        Case {
            name: "nodePort on a ClusterIP Service is rejected",
            services: vec![candidate(
                "a",
                &serde_json::json!({"ports": [{"port": 80, "nodePort": 30080}]}),
            )],
            admitted: &[],
            diagnostics: &[
                "Service default/a|a.yaml: spec.ports[0].nodePort may not be used when type is ClusterIP",
            ],
        },
        Case {
            name: "healthCheckNodePort without Local policy is rejected",
            services: vec![candidate(
                "a",
                &serde_json::json!({"type": "LoadBalancer", "healthCheckNodePort": 30999, "ports": [{"port": 80}]}),
            )],
            admitted: &[],
            diagnostics: &[
                "Service default/a|a.yaml: spec.healthCheckNodePort may only be set when",
            ],
        },
        Case {
            name: "None among several clusterIPs is rejected",
            services: vec![candidate(
                "a",
                &serde_json::json!({"clusterIPs": ["10.96.0.1", "None"], "ports": [{"port": 80}]}),
            )],
            admitted: &[],
            diagnostics: &["Service default/a|a.yaml: spec.clusterIPs may hold None only"],
        },
        Case {
            name: "headless NodePort is rejected",
            services: vec![candidate(
                "a",
                &serde_json::json!({"type": "NodePort", "clusterIP": "None", "ports": [{"port": 80}]}),
            )],
            admitted: &[],
            diagnostics: &[
                "Service default/a|a.yaml: spec.clusterIP may not be None when type is NodePort",
            ],
        },
        Case {
            name: "RequireDualStack with one range is rejected",
            services: vec![candidate(
                "a",
                &serde_json::json!({"ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 80}]}),
            )],
            admitted: &[],
            diagnostics: &[
                "Service default/a|a.yaml: spec.ipFamilyPolicy RequireDualStack needs two",
            ],
        },
    ];
    let settings = settings(&["10.96.0.0/12"]);
    for case in cases {
        let (admitted, diagnostics, _) = run(case.services, &settings);
        let names: Vec<&str> = admitted.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, case.admitted, "{}: {diagnostics:?}", case.name);
        assert_eq!(
            diagnostics.len(),
            case.diagnostics.len(),
            "{}: {diagnostics:?}",
            case.name
        );
        for (diagnostic, expected) in diagnostics.iter().zip(case.diagnostics) {
            let (object, message) = expected.split_once('|').unwrap();
            assert_eq!(diagnostic.object, object, "{}", case.name);
            assert!(
                diagnostic.message.starts_with(message),
                "{}: {:?}",
                case.name,
                diagnostic.message
            );
        }
    }
}

#[test]
fn creation_order_decides_between_an_allocation_and_an_explicit_claim() {
    let settings = settings(&["10.96.0.0/12"]);
    let (alone, _, _) = run(
        vec![candidate(
            "a",
            &serde_json::json!({"ports": [{"port": 80}]}),
        )],
        &settings,
    );
    let taken = spec_of(&alone, "a").cluster_ip.clone().unwrap();
    let claim = || {
        candidate(
            "b",
            &serde_json::json!({"clusterIP": taken, "ports": [{"port": 80}]}),
        )
    };
    let dynamic = || candidate("a", &serde_json::json!({"ports": [{"port": 80}]}));
    // b created first: its explicit claim is honoured and a gets another address.
    let (both, diagnostics, allocations) = run(
        vec![created_at(dynamic(), 200), created_at(claim(), 100)],
        &settings,
    );
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    assert_eq!(
        spec_of(&both, "b").cluster_ip.as_deref(),
        Some(taken.as_str())
    );
    assert_ne!(
        spec_of(&both, "a").cluster_ip.as_deref(),
        Some(taken.as_str())
    );
    assert_eq!(allocations.len(), 1);
    assert_eq!(allocations[0].object, "Service default/a");
    assert_eq!(allocations[0].field, "spec.clusterIPs[0]");
    // a created first: it keeps what it was allocated and b is refused, as the API server
    // refuses a Service asking for an allocated address.
    let (both, diagnostics, _) = run(
        vec![created_at(dynamic(), 100), created_at(claim(), 200)],
        &settings,
    );
    assert_eq!(
        spec_of(&both, "a").cluster_ip.as_deref(),
        Some(taken.as_str())
    );
    assert!(!both.keys().any(|k| k.name == "b"));
    assert_eq!(
        diagnostics[0].message,
        format!("b.yaml: spec.clusterIPs {taken} is already allocated to Service default/a")
    );
}

#[test]
fn dual_stack_and_load_balancer_health_check() {
    let settings = settings(&["10.96.0.0/12", "fd00:10:96::/112"]);
    let (admitted, diagnostics, allocations) = run(
        vec![
            candidate(
                "dual",
                &serde_json::json!({"ipFamilyPolicy": "PreferDualStack", "ports": [{"port": 80}]}),
            ),
            candidate(
                "lb",
                &serde_json::json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                    "ports": [{"port": 80}]}),
            ),
            candidate(
                "v6",
                &serde_json::json!({"ipFamilies": ["IPv6"], "ports": [{"port": 80}]}),
            ),
            candidate(
                "headless",
                &serde_json::json!({"clusterIP": "None", "ports": [{"port": 80}]}),
            ),
            candidate(
                "ext",
                &serde_json::json!({"type": "ExternalName", "externalName": "example.org"}),
            ),
        ],
        &settings,
    );
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    let dual = spec_of(&admitted, "dual");
    assert_eq!(
        dual.ip_families,
        Some(vec!["IPv4".to_owned(), "IPv6".to_owned()])
    );
    let ips = dual.cluster_ips.as_ref().unwrap();
    assert!(
        ips[0].parse::<IpAddr>().unwrap().is_ipv4() && ips[1].parse::<IpAddr>().unwrap().is_ipv6()
    );
    let lb = spec_of(&admitted, "lb");
    assert!(
        lb.health_check_node_port
            .is_some_and(|p| (30000..=32767).contains(&p))
    );
    assert_ne!(
        lb.health_check_node_port,
        lb.ports.as_ref().unwrap()[0].node_port
    );
    let v6 = spec_of(&admitted, "v6");
    assert!(
        v6.cluster_ip
            .as_deref()
            .unwrap()
            .parse::<IpAddr>()
            .unwrap()
            .is_ipv6()
    );
    assert_eq!(
        spec_of(&admitted, "headless").cluster_ips,
        Some(vec!["None".to_owned()])
    );
    assert_eq!(spec_of(&admitted, "ext").cluster_ip, None);
    let fields: Vec<(&str, &str)> = allocations
        .iter()
        .map(|a| (a.object.as_str(), a.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("Service default/dual", "spec.clusterIPs[0]"),
            ("Service default/dual", "spec.clusterIPs[1]"),
            ("Service default/lb", "spec.clusterIPs[0]"),
            ("Service default/lb", "spec.ports[0].nodePort"),
            ("Service default/lb", "spec.healthCheckNodePort"),
            ("Service default/v6", "spec.clusterIPs[0]"),
        ]
    );
}

/// Admits `candidates` after `history`, returning the admitted Services and diagnostics.
fn read(
    history: &mut History,
    candidates: Vec<Candidate>,
) -> (BTreeMap<ObjectKey, Service>, Vec<String>) {
    let mut diagnostics = Vec::new();
    let admitted = admit(
        candidates,
        &settings(&["10.96.0.0/12"]),
        history,
        &mut diagnostics,
        &mut Vec::new(),
    );
    let messages = diagnostics
        .iter()
        .map(|d| format!("{}: {}", d.object, d.message))
        .collect();
    (admitted, messages)
}

fn created_at(mut candidate: Candidate, seconds: u64) -> Candidate {
    candidate.created = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
    candidate
}

fn with_status_ip(mut candidate: Candidate, ip: &str) -> Candidate {
    candidate.service.status = serde_json::from_value(serde_json::json!(
        {"loadBalancer": {"ingress": [{"ip": ip}]}}
    ))
    .unwrap();
    candidate
}

#[test]
fn what_an_admitted_service_holds_no_later_object_takes() {
    let web = || {
        with_status_ip(
            candidate(
                "web",
                &serde_json::json!({"type": "LoadBalancer", "externalIPs": ["198.51.100.5"],
                    "ports": [{"port": 80}]}),
            ),
            "198.51.100.6",
        )
    };
    let mut history = History::default();
    let (first, messages) = read(&mut history, vec![web()]);
    assert!(messages.is_empty(), "{messages:?}");
    let held = spec_of(&first, "web").clone();
    let cluster_ip = held.cluster_ip.clone().unwrap();
    let node_port = held.ports.as_ref().unwrap()[0].node_port.unwrap();
    // Impostors whose names sort first, each claiming one thing web holds, in files older
    // than web's: none takes it.
    let impostors = vec![
        candidate(
            "aa-ip",
            &serde_json::json!({"clusterIP": cluster_ip, "ports": [{"port": 80}]}),
        ),
        candidate(
            "ab-np",
            &serde_json::json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": node_port}]}),
        ),
        candidate(
            "ac-ext",
            &serde_json::json!({"externalIPs": ["198.51.100.5"], "ports": [{"port": 80}]}),
        ),
        with_status_ip(
            candidate(
                "ad-lb",
                &serde_json::json!({"type": "LoadBalancer", "ports": [{"port": 80}]}),
            ),
            "198.51.100.6",
        ),
    ];
    let mut candidates: Vec<Candidate> = impostors.into_iter().map(|c| created_at(c, 0)).collect();
    candidates.push(created_at(web(), 100));
    let (second, messages) = read(&mut history, candidates);
    assert_eq!(
        spec_of(&second, "web"),
        &held,
        "web keeps everything it holds"
    );
    assert_eq!(second.len(), 1, "every impostor is refused: {messages:?}");
    for (name, field) in [
        ("aa-ip", format!("spec.clusterIPs {cluster_ip} is already allocated to Service default/web")),
        ("ab-np", format!("NodePort {node_port} is already allocated to Service default/web")),
        ("ac-ext", "spec.externalIPs 198.51.100.5 port 80/TCP is already served by Service default/web".to_owned()),
        ("ad-lb", "status.loadBalancer.ingress[].ip 198.51.100.6 port 80/TCP is already served by Service default/web".to_owned()),
    ] {
        let want = format!("Service default/{name}: {name}.yaml: {field}");
        assert!(messages.contains(&want), "{want:?} in {messages:?}");
    }
    // A broken edit of web is refused and web stays as admitted.
    let broken = candidate(
        "web",
        &serde_json::json!({"type": "LoadBalancer", "ports": [{"port": 0}]}),
    );
    let (third, messages) = read(&mut history, vec![broken]);
    assert_eq!(spec_of(&third, "web"), &held);
    assert!(
        messages
            .iter()
            .any(|m| m
                .contains("this change is refused; the Service stays as admitted from web.yaml")),
        "{messages:?}"
    );
    // Deleted, web releases what it held.
    let (_, _) = read(&mut history, Vec::new());
    let (fourth, messages) = read(
        &mut history,
        vec![candidate(
            "aa-ip",
            &serde_json::json!({"clusterIP": cluster_ip, "ports": [{"port": 80}]}),
        )],
    );
    assert!(messages.is_empty(), "{messages:?}");
    assert_eq!(
        spec_of(&fourth, "aa-ip").cluster_ip.as_deref(),
        Some(cluster_ip.as_str())
    );
}

#[test]
fn a_folder_read_from_scratch_admits_the_oldest_file_first() {
    let claim = |name: &str| {
        candidate(
            name,
            &serde_json::json!({"clusterIP": "10.96.0.40", "ports": [{"port": 80}]}),
        )
    };
    let (admitted, messages) = read(
        &mut History::default(),
        vec![
            created_at(claim("a-new"), 200),
            created_at(claim("z-old"), 100),
        ],
    );
    assert!(admitted.keys().all(|k| k.name == "z-old"), "{admitted:?}");
    assert_eq!(
        messages,
        [
            "Service default/a-new: a-new.yaml: spec.clusterIPs 10.96.0.40 is already allocated to Service default/z-old"
        ]
    );
}

#[test]
fn tcp_and_udp_on_one_port_share_a_node_port() {
    let (admitted, messages) = read(
        &mut History::default(),
        vec![candidate(
            "dns",
            &serde_json::json!({"type": "NodePort", "ports": [
                {"name": "dns-udp", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                {"name": "other", "port": 54, "protocol": "TCP"}]}),
        )],
    );
    assert!(messages.is_empty(), "{messages:?}");
    let ports = spec_of(&admitted, "dns").ports.clone().unwrap();
    assert_eq!(ports[0].node_port, ports[1].node_port);
    assert_ne!(ports[0].node_port, ports[2].node_port);
}

#[test]
fn names_are_validated_like_the_api_server() {
    let port = serde_json::json!({"ports": [{"port": 80}]});
    let (admitted, messages) = read(
        &mut History::default(),
        vec![
            candidate("UPPER", &port),
            candidate("bad_name", &port),
            candidate("1starts-with-digit", &port),
            candidate(
                "bad-port-name",
                &serde_json::json!({"ports": [{"name": "Http", "port": 80}]}),
            ),
            candidate(
                "policy",
                &serde_json::json!({"ports": [{"port": 80}], "externalTrafficPolicy": "Nearest"}),
            ),
            candidate(
                "families",
                &serde_json::json!({"ports": [{"port": 80}], "ipFamilies": ["IPv4", "IPv4"]}),
            ),
            candidate("fine-name-1", &port),
        ],
    );
    assert_eq!(
        admitted.keys().map(|k| k.name.as_str()).collect::<Vec<_>>(),
        ["fine-name-1"]
    );
    for (name, needle) in [
        (
            "UPPER",
            "metadata.name \"UPPER\" is not a valid Service name",
        ),
        (
            "bad_name",
            "metadata.name \"bad_name\" is not a valid Service name",
        ),
        ("1starts-with-digit", "is not a valid Service name"),
        (
            "bad-port-name",
            "spec.ports[0].name \"Http\" is not a DNS-1123 label",
        ),
        (
            "policy",
            "spec.externalTrafficPolicy \"Nearest\" is not one of Cluster, Local",
        ),
        ("families", "spec.ipFamilies[1] \"IPv4\" is listed twice"),
    ] {
        assert!(
            messages.iter().any(|m| m
                .starts_with(&format!("Service default/{name}: {name}.yaml: "))
                && m.contains(needle)),
            "{name}: {needle:?} in {messages:?}"
        );
    }
}
