//! `kube-ebpf-proxy inspect`: after real traffic through a running proxy (the namespace cluster of
//! `proxy_lab::cluster`), the pinned maps read back in Kubernetes terms — Service names, not
//! ids; flows with their state and time left; affinity with its backend — and the filters.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use proxy_lab::cluster::Cluster;
use proxy_lab::{tcp_request, udp_request};
use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_kube-ebpf-proxy");
const WEB: &str = "10.96.0.20";
const STICKY: &str = "10.96.0.30";

fn service(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}  selector:\n    app: web\n"
    )
}

fn inspect(cluster: &Cluster, args: &[&str]) -> String {
    let mut all = vec![
        "inspect".to_owned(),
        format!("--bpf-pin-path={}", cluster.pin_dir.path().display()),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    cluster
        .proxy_command(&all)
        .expect("kube-ebpf-proxy inspect")
}

fn inspect_json(cluster: &Cluster, args: &[&str]) -> Vec<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = inspect(cluster, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out:?}: {e}"))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v.as_str().expect("a string"))
        .collect()
}

#[test]
fn inspect_shows_services_backends_flows_and_affinity_by_name() {
    let (cluster, [a, b], toolbox) =
        proxy_lab::cluster::start_with_web_pods(Path::new(BINARY)).expect("start the cluster");
    cluster
        .manifests
        .write(
            "web.yaml",
            &service(
                "web",
                &format!(
                    "  clusterIP: {WEB}\n  ports:\n  - name: tcp\n    port: 80\n    targetPort: 8080\n  - name: udp\n    port: 80\n    targetPort: 8080\n    protocol: UDP\n"
                ),
            ),
        )
        .unwrap();
    cluster
        .manifests
        .write(
            "sticky.yaml",
            &service(
                "sticky",
                &format!(
                    "  clusterIP: {STICKY}\n  sessionAffinity: ClientIP\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n"
                ),
            ),
        )
        .unwrap();
    // inspect itself shows when the proxy has programmed both Services with both endpoints.
    let deadline = Instant::now() + Duration::from_secs(10);
    let pods: Vec<String> = [a, b].iter().map(|ip| format!("{ip}:8080")).collect();
    let services = loop {
        let rows = inspect_json(&cluster, &["services"]);
        let complete = rows
            .iter()
            .filter(|r| r["backends"].as_array().is_some_and(|b| b.len() == 2))
            .count();
        if complete == 3 {
            break rows;
        }
        assert!(Instant::now() < deadline, "not programmed: {rows:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let web_tcp = services
        .iter()
        .find(|r| r["service"] == "default/web" && r["port"] == "tcp")
        .expect("default/web:tcp by name");
    assert_eq!(web_tcp["frontend"], format!("{WEB}:80"));
    assert_eq!(web_tcp["protocol"], "TCP");
    assert_eq!(web_tcp["scope"], "policy");
    let mut backends = strings(&web_tcp["backends"]);
    backends.sort_unstable();
    assert_eq!(backends, pods);
    assert_eq!(web_tcp["actions"]["pod"], "forward");
    let sticky = inspect_json(&cluster, &["services", "--address", STICKY]);
    assert_eq!(
        sticky.len(),
        1,
        "only the frontend with that address: {sticky:?}"
    );
    assert_eq!(sticky[0]["service"], "default/sticky");
    assert_eq!(sticky[0]["affinityTimeoutSeconds"], 10800);
    let text = inspect(&cluster, &["services", "--service", "web"]);
    assert!(
        text.starts_with("SERVICE") && text.contains("default/web:udp") && !text.contains("sticky"),
        "{text}"
    );

    // A backend is an (address, port, protocol): pod a is one TCP and one UDP backend.
    let backend_rows = inspect_json(&cluster, &["backends", "--address", &a.to_string()]);
    assert_eq!(backend_rows.len(), 2, "{backend_rows:?}");
    for row in &backend_rows {
        assert_eq!(row["address"], format!("{a}:8080"));
        assert_eq!(row["local"], true, "pod a is on node1");
    }
    let tcp_backend = backend_rows
        .iter()
        .find(|r| r["protocol"] == "TCP")
        .unwrap();
    assert_eq!(
        strings(&tcp_backend["servicePorts"]),
        ["default/sticky:http", "default/web:tcp"],
        "the TCP backend of both Services"
    );
    let remote = inspect_json(&cluster, &["backends", "--service", "sticky"]);
    assert_eq!(remote.len(), 2, "{remote:?}");
    assert!(
        remote
            .iter()
            .any(|r| r["address"] == format!("{b}:8080") && r["local"] == false)
    );

    // Real traffic from the toolbox pod: a TCP exchange and a UDP one to web, one to sticky.
    let client = &cluster.pod("toolbox").netns;
    let web: SocketAddr = format!("{WEB}:80").parse().unwrap();
    let sticky_vip: SocketAddr = format!("{STICKY}:80").parse().unwrap();
    let timeout = Duration::from_secs(2);
    tcp_request(client, web, timeout)
        .unwrap()
        .expect("TCP to web");
    udp_request(client, web, timeout)
        .unwrap()
        .expect("UDP to web");
    tcp_request(client, sticky_vip, timeout)
        .unwrap()
        .expect("TCP to sticky");

    let flows = inspect_json(&cluster, &["conntrack", "--service", "default/web"]);
    assert_eq!(flows.len(), 2, "one TCP and one UDP flow: {flows:?}");
    for flow in &flows {
        assert_eq!(
            flow["client"].as_str().unwrap().split(':').next(),
            Some(toolbox.to_string().as_str())
        );
        assert_eq!(flow["frontend"], format!("{WEB}:80"));
        assert!(
            pods.contains(&flow["backend"].as_str().unwrap().to_owned()),
            "{flow}"
        );
        assert_eq!(
            flow["port"],
            if flow["protocol"] == "UDP" {
                "udp"
            } else {
                "tcp"
            }
        );
    }
    let udp = flows.iter().find(|f| f["protocol"] == "UDP").unwrap();
    assert_eq!(udp["replied"], true);
    // Replied, and assured once it has lived a while: 30 s idle until then, 120 s after (the
    // kernel's UDP timeouts, kube-proxy's defaults leave them).
    let left = udp["expiresInSeconds"].as_u64().unwrap();
    match udp["state"].as_str().unwrap() {
        "REPLIED" => assert!((20..=30).contains(&left), "{udp}"),
        "ASSURED" => assert!((100..=120).contains(&left), "{udp}"),
        other => panic!("a replied UDP flow in state {other}: {udp}"),
    }
    let tcp = flows.iter().find(|f| f["protocol"] == "TCP").unwrap();
    let left = tcp["expiresInSeconds"].as_u64().unwrap();
    assert!(left > 0 && left <= 24 * 3600, "{tcp}");
    let by_address = inspect_json(&cluster, &["conntrack", "--address", &toolbox.to_string()]);
    assert_eq!(
        by_address.len(),
        3,
        "every flow of the toolbox: {by_address:?}"
    );
    let text = inspect(&cluster, &["conntrack"]);
    assert!(
        text.contains("default/sticky:http") && text.contains("EXPIRES IN"),
        "{text}"
    );

    let affinity = inspect_json(&cluster, &["affinity"]);
    assert_eq!(affinity.len(), 1, "{affinity:?}");
    assert_eq!(affinity[0]["service"], "default/sticky");
    assert_eq!(affinity[0]["client"], toolbox.to_string());
    assert!(pods.contains(&affinity[0]["backend"].as_str().unwrap().to_owned()));
    let left = affinity[0]["expiresInSeconds"].as_u64().unwrap();
    assert!((10_700..=10_800).contains(&left), "{affinity:?}");
    assert!(inspect_json(&cluster, &["affinity", "--service", "web"]).is_empty());
}
