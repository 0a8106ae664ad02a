//! The metrics server reading a real dataplane: the kernel's counters and what is programmed
//! in the pinned maps, scraped over HTTP.

mod common;

use std::net::SocketAddr;

use proxy_common::{ConfigValue, IPPROTO_TCP, IPPROTO_UDP};
use proxy_lab::PinDir;
use proxy_lab::http_get as get;
use proxy_userspace::dataplane::{self, MapSizes, Maps, addr_from_ip, packet, run_tc_program};
use proxy_userspace::metrics::{ProxyMetrics, serve_metrics};

const TC_ACT_OK: u32 = 0;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The value of the sample line `series` (name and labels exactly as exposed), as written.
fn sample<'a>(body: &'a str, series: &str) -> &'a str {
    let prefix = format!("{series} ");
    body.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{body}"))
}

#[tokio::test]
async fn metrics_expose_the_kernel_counters_and_programmed_entries() {
    let pins = PinDir::new();
    let sizes = MapSizes {
        services: 1024,
        backends: 1024,
        conntrack: 1024,
        affinity: 1024,
        source_ranges: 1024,
        vips: 1024,
    };
    let loaded = dataplane::load_with_sizes(pins.path(), &sizes).expect("load the dataplane");
    let mut maps = Maps::open(pins.path()).expect("open the pinned maps");
    maps.set_config(&ConfigValue {
        node_ipv4: addr_from_ip("192.0.2.1".parse().unwrap()).0,
        snat_port_min: 30000,
        snat_port_max: 30099,
        ..ConfigValue::default()
    })
    .unwrap();
    let frontend = sa("10.96.0.10:80");
    common::program_service(
        &mut maps,
        1,
        frontend,
        IPPROTO_TCP,
        &[sa("10.1.0.5:8080"), sa("10.1.0.6:8080")],
        |_| {},
    );
    common::program_service(
        &mut maps,
        2,
        sa("10.96.0.11:53"),
        IPPROTO_UDP,
        &[sa("10.1.0.7:53")],
        |_| {},
    );
    // One new flow through the real program.
    let (code, _) = run_tc_program(
        &loaded,
        &packet::build(sa("10.0.0.2:40000"), frontend, IPPROTO_TCP, b"hello"),
        0,
    )
    .expect("BPF_PROG_TEST_RUN");
    assert_eq!(code, TC_ACT_OK);
    let entries = maps.conntrack_entries().unwrap();
    assert_eq!(entries.len(), 2, "the flow is tracked, both directions");
    // The LRU map evicts one direction of it.
    let (evicted, _) = entries
        .iter()
        .find(|(_, v)| v.flags & proxy_common::CT_F_REPLY != 0)
        .unwrap();
    maps.delete_conntrack(evicted).unwrap();
    let conntrack = 1;
    let kernel_counters = dataplane::read_counters(pins.path()).unwrap();

    let metrics = ProxyMetrics::new(Some(pins.path().to_path_buf()), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_metrics(listener, metrics));
    let (status, _, body) = get(addr, "/metrics").await;
    server.abort();
    assert_eq!(status, 200, "{body}");

    for line in [
        "# TYPE kube_ebpf_proxy_dataplane_events counter",
        "# TYPE kube_ebpf_proxy_frontends gauge",
        "# TYPE kube_ebpf_proxy_backends gauge",
        "# TYPE kube_ebpf_proxy_conntrack_entries gauge",
        "# TYPE kube_ebpf_proxy_conntrack_max_entries gauge",
        "# TYPE kube_ebpf_proxy_conntrack_orphan_entries gauge",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in:\n{body}"
        );
    }
    assert_eq!(sample(&body, "kube_ebpf_proxy_frontends"), "2");
    assert_eq!(sample(&body, "kube_ebpf_proxy_backends"), "3");
    assert_eq!(
        sample(&body, "kube_ebpf_proxy_conntrack_entries"),
        conntrack.to_string()
    );
    assert_eq!(
        sample(&body, "kube_ebpf_proxy_conntrack_max_entries"),
        "1024"
    );
    assert_eq!(
        sample(&body, "kube_ebpf_proxy_conntrack_orphan_entries"),
        "1"
    );
    assert_eq!(
        sample(
            &body,
            "kube_ebpf_proxy_dataplane_events_total{counter=\"new_flows\"}"
        ),
        "1"
    );
    // Every kernel counter is exposed, with the value the map holds.
    for (name, value) in kernel_counters {
        assert_eq!(
            sample(
                &body,
                &format!("kube_ebpf_proxy_dataplane_events_total{{counter=\"{name}\"}}")
            ),
            value.to_string(),
            "{name}"
        );
    }
}
