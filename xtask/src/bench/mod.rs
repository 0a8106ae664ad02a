//! `cargo xtask bench`: pod → ClusterIP traffic on the namespace cluster of `proxy_lab::cluster`
//! (a client pod and a backend pod on node1, another backend pod on node2) with N Services
//! programmed, in interleaved rounds of five modes: direct (pod addresses, no proxy),
//! kube-proxy's iptables-mode rules (iptables-nft), kube-proxy's nftables-mode table, ours
//! (`kube-ebpf-proxy run --manifests`), and ours with `--fast-path off`. Only the binary's
//! command line and its `/metrics` are used, never the library's internals.

mod load;
mod report;
mod rules;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use proxy_lab::cluster::Cluster;

use load::{BENCH_PORT, BenchServer, Kind};
use report::{Metric, Mode, Results};
use rules::BenchService;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Numbers of Services to measure at, comma-separated (each with 2 endpoints).
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 10000])]
    pub services: Vec<usize>,
    /// Interleaved rounds (every mode once per round); each figure is the median over rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Service changes timed per Service count and mode, spread over the rounds.
    #[arg(long, default_value_t = 50)]
    pub changes: usize,
    /// A cheap run that only shows the bench works (`cargo xtask test` runs it): the debug
    /// binary, short loads.
    #[arg(long)]
    pub quick: bool,
}

/// The proxy's service range: a /12, room for 100,000 Services and the changes.
const SERVICE_CIDRS: &str = "10.96.0.0/12,fd00:96::/112";
/// The IPv4 pod CIDR the local-traffic detector (and kube-proxy's masquerade rule) uses.
const CLUSTER_CIDR_V4: &str = "198.19.0.0/16";
/// Services per manifest file.
const SERVICES_PER_FILE: usize = 500;
/// A change not connectable within this counts as not applied.
const CHANGE_BOUND: Duration = Duration::from_secs(15);
/// How long changes are timed per mode and round at most (an iptables partial sync of 10,000
/// Services takes seconds): fewer changes are timed then, and the table says how many.
const CHANGES_BUDGET: Duration = Duration::from_secs(30);
/// The bound on loading a whole ruleset or starting the proxy until the first connection.
const COLD_BOUND: Duration = Duration::from_mins(5);
/// The nftables tables of each netfilter mode: iptables-nft's, and kube-proxy's own.
const IPTABLES_TABLES: [&str; 2] = ["filter", "nat"];
const NFTABLES_TABLES: [&str; 1] = ["kube-proxy"];

/// Transactions per load and the time bound of each.
struct LoadSize {
    crr: usize,
    rr: usize,
    udp: usize,
    bound: Duration,
}

impl LoadSize {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                crr: 50,
                rr: 50,
                udp: 50,
                bound: Duration::from_secs(2),
            }
        } else {
            Self {
                crr: 2000,
                rr: 5000,
                udp: 3000,
                bound: Duration::from_secs(4),
            }
        }
    }
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    crate::setup::require_root("the bench (it creates network namespaces and loads eBPF)")?;
    if args.rounds == 0 || args.services.is_empty() {
        bail!("--rounds and --services need at least one value");
    }
    let started = Instant::now();
    let binary = build_binary(args.quick)?;
    let out_dir = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let size = LoadSize::new(args.quick);
    let mut lab = Lab::new(&binary)?;
    let mut results = Results::default();
    let per_round = args.changes.div_ceil(args.rounds);
    for &count in &args.services {
        lab.write_services(count)?;
        for round in 0..args.rounds {
            for mode in Mode::ALL {
                println!(
                    "bench: {count} Services, round {}, {}",
                    round + 1,
                    mode.label()
                );
                let changes = if mode.times_changes() {
                    per_round.min(args.changes - round * per_round)
                } else {
                    0
                };
                lab.measure(mode, &size, changes, &mut results.round(count, round, mode))
                    .with_context(|| format!("{} with {count} Services", mode.label()))?;
            }
        }
    }
    drop(lab);
    let command = format!("cargo xtask bench {}", command_line(args));
    let table = report::markdown(&results, &command, started.elapsed());
    let table_path = out_dir.join("bench.md");
    std::fs::write(&table_path, &table)
        .with_context(|| format!("writing {}", table_path.display()))?;
    let chart_path = out_dir.join("bench.png");
    report::chart(&results, &chart_path)?;
    println!("{table}");
    println!(
        "bench: wrote {} and {}",
        table_path.display(),
        chart_path.display()
    );
    Ok(())
}

fn command_line(args: &BenchArgs) -> String {
    let services: Vec<String> = args.services.iter().map(ToString::to_string).collect();
    let mut line = format!("--services {} --rounds {}", services.join(","), args.rounds);
    if args.changes != 50 {
        let _ = write!(line, " --changes {}", args.changes);
    }
    if args.quick {
        line.push_str(" --quick");
    }
    line
}

/// Builds `kube-ebpf-proxy` (release, or debug for `--quick`) and returns its path.
fn build_binary(quick: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = crate::cargo();
    cmd.args(["build", "-p", "proxy-userspace", "--bin", "kube-ebpf-proxy"]);
    if !quick {
        cmd.arg("--release");
    }
    crate::setup::run(&mut cmd)?;
    let profile = if quick { "debug" } else { "release" };
    Ok(crate::workspace_root()
        .join("target")
        .join(profile)
        .join("kube-ebpf-proxy"))
}

/// The cluster, its bench servers and the Services of the current count. Fields drop in order:
/// the servers before the cluster's namespaces.
struct Lab {
    _servers: Vec<BenchServer>,
    cluster: Cluster,
    local: SocketAddr,
    remote: SocketAddr,
    services: Vec<BenchService>,
    files: Vec<String>,
    next_change: u32,
    /// The netfilter modes whose rules are loaded for the current Service count: loaded once
    /// (their cold start), then made dormant while other modes run (a dormant table is off
    /// the hooks) and woken for their own rounds.
    loaded: std::collections::BTreeSet<Mode>,
}

impl Lab {
    fn new(binary: &Path) -> anyhow::Result<Self> {
        let mut cluster = Cluster::start(binary)?;
        cluster.set_service_cluster_ip_range(Some(SERVICE_CIDRS));
        let local = cluster.add_pod("bench-local", 0, 10, "bench")?.ip;
        let remote = cluster.add_pod("bench-remote", 1, 10, "bench")?.ip;
        let client = cluster.add_pod("client", 0, 250, "client")?;
        // Thousands of short connections a minute, closed by the client: TIME_WAIT ports are
        // reused (this namespace's own sysctl) instead of running out (EAGAIN on connect).
        client.netns.sysctl("net.ipv4.tcp_tw_reuse=1")?;
        client
            .netns
            .sysctl("net.ipv4.ip_local_port_range=10000 60999")?;
        let servers = vec![
            BenchServer::start(&cluster.pod("bench-local").netns)?,
            BenchServer::start(&cluster.pod("bench-remote").netns)?,
        ];
        let mut lab = Self {
            _servers: servers,
            cluster,
            local: SocketAddrV4::new(local, BENCH_PORT).into(),
            remote: SocketAddrV4::new(remote, BENCH_PORT).into(),
            services: Vec::new(),
            files: Vec::new(),
            next_change: 0,
            loaded: std::collections::BTreeSet::new(),
        };
        // The proxy started with the cluster only to see the pods' interfaces appear; each mode
        // starts from a node without it.
        lab.stop_proxy()?;
        Ok(lab)
    }

    fn client(&self) -> &proxy_lab::Netns {
        &self.cluster.pod("client").netns
    }

    fn node(&self) -> &proxy_lab::Netns {
        &self.cluster.nodes[0]
    }

    /// Replaces the Services in the folder by `count` fillers (2 endpoints each, on node2,
    /// never contacted) and the two measured Services, placed in the middle (kube-proxy's
    /// iptables dispatch is a linear list in map order: the middle is its average case).
    fn write_services(&mut self, count: usize) -> anyhow::Result<()> {
        if !self.loaded.is_empty() {
            proxy_lab::run(self.node().command("nft").args(["flush", "ruleset"]))?;
            self.loaded.clear();
        }
        for file in self.files.drain(..) {
            self.cluster.manifests.remove(&file)?;
        }
        let mut services: Vec<BenchService> = (0..count).map(filler).collect();
        let middle = count / 2;
        services.insert(middle, target("bench-remote", 3, self.remote));
        services.insert(middle, target("bench-local", 2, self.local));
        for (i, chunk) in services.chunks(SERVICES_PER_FILE).enumerate() {
            let name = format!("services-{i:04}.yaml");
            let yaml: Vec<String> = chunk.iter().map(service_yaml).collect();
            self.cluster.manifests.write(&name, &yaml.join("---\n"))?;
            self.files.push(name);
        }
        self.services = services;
        Ok(())
    }

    fn target(&self, name: &str) -> SocketAddr {
        let service = self
            .services
            .iter()
            .find(|s| s.name == name)
            .expect("the measured Services are written");
        SocketAddrV4::new(service.cluster_ip, service.port).into()
    }

    fn next_change(&mut self) -> BenchService {
        let n = self.next_change;
        self.next_change += 1;
        BenchService {
            name: format!("change-{n}"),
            cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 104, 0, 0)) + n),
            port: 80,
            endpoints: vec![*ipv4(self.local).ip()],
            target_port: BENCH_PORT,
        }
    }

    fn measure(
        &mut self,
        mode: Mode,
        size: &LoadSize,
        changes: usize,
        out: &mut report::Round<'_>,
    ) -> anyhow::Result<()> {
        let (local, remote) = if mode == Mode::Direct {
            (self.local, self.remote)
        } else {
            (self.target("bench-local"), self.target("bench-remote"))
        };
        let since = Instant::now();
        let mut cold = true;
        match mode {
            Mode::Direct => cold = false,
            Mode::Iptables | Mode::Nftables if self.loaded.contains(&mode) => {
                self.set_active(mode, true)?;
                cold = false;
            }
            Mode::Iptables => {
                let rules = rules::iptables_restore(&self.services, CLUSTER_CIDR_V4);
                self.node_stdin("iptables-nft-restore", &[], &rules)?;
                self.loaded.insert(mode);
            }
            Mode::Nftables => {
                let table = rules::nft_table(&self.services, CLUSTER_CIDR_V4);
                self.node_stdin("nft", &["-f", "-"], &table)?;
                self.loaded.insert(mode);
            }
            Mode::Ours | Mode::OursWithoutFastPath => {
                let fast_path = if mode == Mode::Ours { "on" } else { "off" };
                // No sync pacing: the kube-proxy modes here apply rules directly, without
                // kube-proxy's minSyncPeriod, so both measure programming alone.
                self.cluster.set_proxy_flags(&[
                    "--fast-path",
                    fast_path,
                    "--iptables-min-sync-period",
                    "0s",
                ]);
                self.cluster.start_proxy()?;
            }
        }
        let cold_start = cold.then_some(since);
        let result = self.measure_programmed(mode, size, changes, cold_start, (local, remote), out);
        let teardown = self.teardown(mode);
        result.and(teardown)
    }

    fn measure_programmed(
        &mut self,
        mode: Mode,
        size: &LoadSize,
        changes: usize,
        cold_start: Option<Instant>,
        (local, remote): (SocketAddr, SocketAddr),
        out: &mut report::Round<'_>,
    ) -> anyhow::Result<()> {
        if let Some(since) = cold_start {
            let cold = load::time_to_first_connection(self.client(), local, since, COLD_BOUND)?
                .with_context(|| format!("no connection to {local} within {COLD_BOUND:?}"))?;
            out.put(Metric::ColdStart, millis(cold));
        }
        if matches!(mode, Mode::Ours | Mode::OursWithoutFastPath) {
            self.check_programmed()?;
        }
        let stats = if mode == Mode::Ours {
            Some((BpfStats::enable()?, self.program_stats()?))
        } else {
            None
        };
        for (kind, placement, target, count) in [
            (Kind::TcpCrr, 0, local, size.crr),
            (Kind::TcpRr, 0, local, size.rr),
            (Kind::TcpCrr, 1, remote, size.crr),
            (Kind::TcpRr, 1, remote, size.rr),
            (Kind::UdpRr, 0, local, size.udp),
        ] {
            let outcome = load::run(self.client(), kind, target, count, size.bound)?;
            if outcome.failures > 0 {
                // Reported in the table's failed-transactions row, not the end of the bench.
                println!(
                    "bench: {kind:?} to {target}: {} of {} transactions failed (first: {})",
                    outcome.failures,
                    outcome.failures + outcome.latencies.len(),
                    outcome.first_failure.as_deref().unwrap_or("-")
                );
            }
            out.put_load(kind, placement, &outcome);
        }
        if let Some((enabled, before)) = stats {
            let after = self.program_stats()?;
            drop(enabled);
            let (time, runs) = (after.0 - before.0, after.1 - before.1);
            if runs > 0 {
                // Nanosecond totals stay far below 2^52.
                #[allow(clippy::cast_precision_loss)]
                out.put(Metric::ProgramNs, time as f64 / runs as f64);
            }
        }
        if matches!(mode, Mode::Ours | Mode::OursWithoutFastPath) {
            let pid = self.cluster.proxy().pid();
            let (rss, maps) = process_memory(pid)?;
            out.put(Metric::RssMib, rss);
            out.put(Metric::MapMib, maps);
        }
        let changes_started = Instant::now();
        for _ in 0..changes {
            if changes_started.elapsed() > CHANGES_BUDGET {
                break;
            }
            let change = self.next_change();
            let target = SocketAddrV4::new(change.cluster_ip, change.port).into();
            let since = Instant::now();
            match mode {
                Mode::Iptables => {
                    let mut all = self.services.clone();
                    all.push(change.clone());
                    let rules = rules::iptables_partial_restore(&all, &change, CLUSTER_CIDR_V4);
                    self.node_stdin("iptables-nft-restore", &["--noflush"], &rules)?;
                    // Later partial syncs keep this Service in KUBE-SERVICES.
                    self.services.push(change);
                }
                Mode::Nftables => {
                    let rules = rules::nft_service(&change, CLUSTER_CIDR_V4);
                    self.node_stdin("nft", &["-f", "-"], &rules)?;
                }
                _ => {
                    self.cluster
                        .manifests
                        .write(&format!("{}.yaml", change.name), &service_yaml(&change))?;
                }
            }
            let took = load::time_to_first_connection(self.client(), target, since, CHANGE_BOUND)?;
            out.put_change(took);
        }
        Ok(())
    }

    /// Removes what `mode` programmed (and the changes' Services and files).
    fn teardown(&mut self, mode: Mode) -> anyhow::Result<()> {
        self.services.retain(|s| !s.name.starts_with("change-"));
        for entry in std::fs::read_dir(self.cluster.manifests.path())? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with("change-") {
                self.cluster.manifests.remove(&name)?;
            }
        }
        match mode {
            Mode::Direct => Ok(()),
            Mode::Iptables | Mode::Nftables => self.set_active(mode, false),
            Mode::Ours | Mode::OursWithoutFastPath => self.stop_proxy(),
        }
    }

    /// Stops the proxy and removes its pins and attachments (a stopped proxy leaves its
    /// programs attached on purpose, for restarts).
    fn stop_proxy(&mut self) -> anyhow::Result<()> {
        self.cluster.stop_proxy(nix::sys::signal::Signal::SIGTERM);
        let pins = self.cluster.pin_dir.path().to_string_lossy().into_owned();
        self.cluster
            .proxy_command(&["cleanup".to_owned(), "--bpf-pin-path".to_owned(), pins])?;
        Ok(())
    }

    /// Wakes `mode`'s netfilter tables, or makes them dormant.
    fn set_active(&self, mode: Mode, active: bool) -> anyhow::Result<()> {
        let tables: &[&str] = if mode == Mode::Iptables {
            &IPTABLES_TABLES
        } else {
            &NFTABLES_TABLES
        };
        let flags = if active { "" } else { " { flags dormant ; }" };
        let commands = tables.iter().fold(String::new(), |mut text, table| {
            let _ = writeln!(text, "add table ip {table}{flags}");
            text
        });
        self.node_stdin("nft", &["-f", "-"], &commands)
    }

    /// Runs `program ARGS` in node1 with `input` on its standard input.
    fn node_stdin(&self, program: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut cmd = self.node().command(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("running {program}"))?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let written = stdin.write_all(input.as_bytes());
        drop(stdin);
        let output = child.wait_with_output()?;
        written.with_context(|| format!("writing the rules to {program}"))?;
        if !output.status.success() {
            bail!(
                "{program} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Checks on the proxy's `/metrics` that every Service port is programmed (two frontends
    /// per Service: TCP and UDP).
    fn check_programmed(&self) -> anyhow::Result<()> {
        let body = self
            .node()
            .enter(|| metrics_body(SocketAddr::from(([127, 0, 0, 1], 10249))))?
            .context("reading the proxy's /metrics")?;
        let frontends: f64 = body
            .lines()
            .filter(|l| l.starts_with("kube_ebpf_proxy_frontends"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        // Counts stay far below 2^52.
        #[allow(clippy::cast_precision_loss)]
        let expected = (2 * self.services.len()) as f64;
        if frontends < expected {
            bail!("the proxy's /metrics shows {frontends} frontends, expected at least {expected}");
        }
        Ok(())
    }

    /// The proxy's tc programs' (run time in ns, runs), from its file descriptors' fdinfo.
    fn program_stats(&mut self) -> anyhow::Result<(u64, u64)> {
        let pid = self.cluster.proxy().pid();
        let mut seen = std::collections::BTreeSet::new();
        let (mut time, mut runs) = (0, 0);
        for info in fdinfos(pid)? {
            // 3: BPF_PROG_TYPE_SCHED_CLS; each program counted once, however many fds.
            if field(&info, "prog_type") == Some(3) && seen.insert(field(&info, "prog_id")) {
                time += field(&info, "run_time_ns").unwrap_or(0);
                runs += field(&info, "run_cnt").unwrap_or(0);
            }
        }
        Ok((time, runs))
    }
}

/// Filler Service `i`: ClusterIP 10.96.0.16 + i, endpoints in 100.64.0.0/10, on node2.
fn filler(i: usize) -> BenchService {
    let i = u32::try_from(i).expect("at most millions of Services");
    let endpoint = |k: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + 2 * i + k);
    BenchService {
        name: format!("svc-{i}"),
        cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 16)) + i),
        port: 80,
        endpoints: vec![endpoint(0), endpoint(1)],
        target_port: BENCH_PORT,
    }
}

fn target(name: &str, host: u8, backend: SocketAddr) -> BenchService {
    BenchService {
        name: name.to_owned(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, host),
        port: 80,
        endpoints: vec![*ipv4(backend).ip()],
        target_port: BENCH_PORT,
    }
}

fn ipv4(address: SocketAddr) -> SocketAddrV4 {
    match address {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(_) => unreachable!("the bench's pods are reached over IPv4"),
    }
}

/// A Service with its EndpointSlice (nodeName node2 unless the endpoint is node1's pod).
fn service_yaml(service: &BenchService) -> String {
    let endpoints = service
        .endpoints
        .iter()
        .fold(String::new(), |mut text, ip| {
            let node = if ip.octets()[..3] == [198, 19, 1] {
                "node1"
            } else {
                "node2"
            };
            let _ = write!(
                text,
                "- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions:\n    ready: true\n"
            );
            text
        });
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  clusterIP: {ip}
  ports:
  - name: tcp
    port: {port}
    protocol: TCP
    targetPort: {target}
  - name: udp
    port: {port}
    protocol: UDP
    targetPort: {target}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
- name: tcp
  port: {target}
  protocol: TCP
- name: udp
  port: {target}
  protocol: UDP
endpoints:
{endpoints}",
        name = service.name,
        ip = service.cluster_ip,
        port = service.port,
        target = service.target_port,
    )
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `GET /metrics` (bounded to 5 s), the body.
fn metrics_body(address: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = proxy_lab::http_get_here(address, "/metrics", Duration::from_secs(5))
        .with_context(|| format!("GET http://{address}/metrics"))?;
    if status != 200 {
        bail!("{address}/metrics answered {status}");
    }
    Ok(body)
}

/// The text of every `/proc/PID/fdinfo/*`.
fn fdinfos(pid: u32) -> anyhow::Result<Vec<String>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let mut infos = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        // A descriptor closed since the listing is simply gone.
        if let Ok(text) = std::fs::read_to_string(entry?.path()) {
            infos.push(text);
        }
    }
    Ok(infos)
}

/// The number in an fdinfo line `NAME:\tVALUE`.
fn field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// The proxy's resident memory and the memory of the BPF maps it holds, in MiB (each map
/// counted once, however many descriptors it has open).
fn process_memory(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status_path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&status_path).with_context(|| status_path.clone())?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("no VmRSS in {status_path}"))?;
    let mut seen = std::collections::BTreeSet::new();
    let mut map_bytes = 0;
    for info in fdinfos(pid)? {
        if field(&info, "map_type").is_some() && seen.insert(field(&info, "map_id")) {
            map_bytes += field(&info, "memlock").unwrap_or(0);
        }
    }
    // Sizes stay far below 2^52.
    #[allow(clippy::cast_precision_loss)]
    Ok((rss_kib as f64 / 1024.0, map_bytes as f64 / 1024.0 / 1024.0))
}

/// Run-time statistics of BPF programs on (`BPF_ENABLE_STATS`, `BPF_STATS_RUN_TIME`) while
/// this lives: the kernel keeps them on while any such descriptor is open, so closing it
/// restores the global setting (`kernel.bpf_stats_enabled`) even if the bench dies.
struct BpfStats {
    _fd: OwnedFd,
}

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        // union bpf_attr's enable_stats: { __u32 type } with BPF_STATS_RUN_TIME = 0.
        let attr = [0u32; 2];
        // SAFETY: a valid bpf_attr prefix of the size passed; the kernel only reads it.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("bpf(BPF_ENABLE_STATS)");
        }
        let fd = i32::try_from(fd).expect("a file descriptor");
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        Ok(Self {
            _fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }
}

impl Mode {
    fn times_changes(self) -> bool {
        matches!(self, Mode::Iptables | Mode::Nftables | Mode::Ours)
    }
}
