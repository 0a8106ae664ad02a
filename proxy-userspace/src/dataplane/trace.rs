//! `kube-ebpf-proxy trace`: runs synthetic first packets through the loaded tc program with
//! `BPF_PROG_TEST_RUN` against the maps as programmed, and reports what the kernel did. It
//! exercises the real program and the real maps, not a model of them.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use aya::programs::SchedClassifier;
use aya::{TestRun as _, TestRunOptions};
use proxy_common::{
    Counter, CtKey, DETECT_LOCAL_CIDR, DETECT_LOCAL_IFINDEX, FAMILY_IPV4, IPPROTO_ICMP,
    IPPROTO_ICMPV6,
};

use super::counters::{CountersError, read_counter};
use super::loader::{Loaded, TC_INGRESS};
use super::maps::{Maps, MapsError, addr_from_ip, ip_from_addr};
use super::packet;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("the eBPF object has no loaded program {0}")]
    NoProgram(&'static str),
    #[error("opening the program pinned at {path}: {source}")]
    PinnedProgram {
        path: std::path::PathBuf,
        source: aya::programs::ProgramError,
    },
    #[error("BPF_PROG_TEST_RUN of {program}: {source}")]
    TestRun {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("source {src} and destination {dst} are not of the same family")]
    MixedFamilies { src: IpAddr, dst: IpAddr },
    #[error("no free source port to trace from {src} (every probed tuple is a live flow)")]
    NoFreePort { src: IpAddr },
    #[error("--from node: CONFIG has no node address of the destination's family")]
    NoNodeAddress,
    #[error("--from pod: the ifindex local-traffic detector has no local interface programmed")]
    NoLocalInterface,
    #[error("--from pod: {src} is in none of the local-traffic detector's CIDRs")]
    NotAPodAddress { src: IpAddr },
    #[error("--from external: {src} is classified as {class} by the proxy")]
    NotExternal { src: IpAddr, class: &'static str },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Counters(#[from] CountersError),
}

/// The source class a trace asks for (`--from`); the packet is then made to carry what the
/// program classifies by: the node's address, or a pod's (address or ingress interface).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceFrom {
    Pod,
    Node,
    External,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Dnat,
    Reject,
    Drop,
    Pass,
}

#[derive(Clone, Debug)]
pub struct TraceRequest {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: u8,
    /// The interface the packet "arrives" on (the ifindex local-traffic detector reads it).
    pub ingress_ifindex: u32,
    /// How many first packets to run (each from its own source port); enough to see every
    /// backend of a random choice.
    pub runs: u32,
    /// The source class to trace from; `None` takes `src` and `ingress_ifindex` as given.
    pub from: Option<TraceFrom>,
}

/// What `--from pod` traces without a local-traffic detector (kube-proxy's `NoOpLocalDetector`
/// classifies no source as a pod).
fn no_detector_note(src: IpAddr) -> String {
    format!(
        "the proxy runs without a local-traffic detector (--detect-local-mode ClusterCIDR without \
         --cluster-cidr), so no source is classified as a pod: {src} is traced as the kernel \
         classifies it, as external traffic"
    )
}

/// The source address and ingress interface that make the program see `request.from`, and a
/// note when the program classifies the source otherwise than asked.
fn resolve_source(
    maps: &Maps,
    request: &TraceRequest,
) -> Result<(IpAddr, u32, Option<String>), TraceError> {
    let Some(from) = request.from else {
        return Ok((request.src, request.ingress_ifindex, None));
    };
    let config = maps.config()?;
    let (_, family) = addr_from_ip(request.dst);
    let node_addr = if family == FAMILY_IPV4 {
        config.node_ipv4
    } else {
        config.node_ipv6
    };
    let node = (node_addr != [0; 4]).then(|| ip_from_addr(&node_addr, family));
    let in_local_cidrs = |ip: IpAddr| -> Result<bool, TraceError> {
        Ok(maps
            .local_cidr_entries()?
            .iter()
            .any(|cidr| cidr.contains(&ip)))
    };
    match from {
        TraceFrom::Node => node
            .map(|ip| (ip, request.ingress_ifindex, None))
            .ok_or(TraceError::NoNodeAddress),
        TraceFrom::Pod => match config.detect_local_mode {
            DETECT_LOCAL_IFINDEX if request.ingress_ifindex != 0 => {
                Ok((request.src, request.ingress_ifindex, None))
            }
            DETECT_LOCAL_IFINDEX => maps
                .local_ifindex_entries()?
                .into_iter()
                .min()
                .map(|ifindex| (request.src, ifindex, None))
                .ok_or(TraceError::NoLocalInterface),
            DETECT_LOCAL_CIDR if in_local_cidrs(request.src)? => {
                Ok((request.src, request.ingress_ifindex, None))
            }
            DETECT_LOCAL_CIDR => Err(TraceError::NotAPodAddress { src: request.src }),
            _ => Ok((
                request.src,
                request.ingress_ifindex,
                Some(no_detector_note(request.src)),
            )),
        },
        TraceFrom::External => {
            let class = if node == Some(request.src) {
                Some("node")
            } else if config.detect_local_mode == DETECT_LOCAL_CIDR && in_local_cidrs(request.src)?
            {
                Some("pod")
            } else {
                None
            };
            match class {
                Some(class) => Err(TraceError::NotExternal {
                    src: request.src,
                    class,
                }),
                None => Ok((request.src, request.ingress_ifindex, None)),
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TraceResult {
    pub verdict: Verdict,
    /// Backends chosen over the runs (one when session affinity holds).
    pub endpoints: BTreeSet<SocketAddr>,
    pub masquerade: bool,
    /// How the source was classified, when not as `--from` asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Which program ran the packets.
    pub program: ProgramOrigin,
}

/// Where the tc program a trace runs comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgramOrigin {
    /// The one the running proxy attached and pinned (no verifier pass).
    Pinned,
    /// Loaded by the trace itself (private maps, or no proxy ever attached to these maps).
    Loaded,
}

/// The tc ingress program a trace runs its packets through, and the pin path of its maps.
pub struct TraceTarget<'a> {
    pub program: &'a SchedClassifier,
    pub origin: ProgramOrigin,
    pub pin_path: &'a Path,
}

impl Loaded {
    /// The loaded tc program `name` (`TC_INGRESS`, `TC_EGRESS` or their `_L3` variants).
    pub fn tc_program(&self, name: &'static str) -> Result<&SchedClassifier, TraceError> {
        self.ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(TraceError::NoProgram(name))
    }

    /// This object's tc ingress program as a trace's target.
    pub fn trace_target(&self) -> Result<TraceTarget<'_>, TraceError> {
        Ok(TraceTarget {
            program: self.tc_program(TC_INGRESS)?,
            origin: ProgramOrigin::Loaded,
            pin_path: &self.pin_path,
        })
    }
}

/// The tc ingress program the proxy running on the maps pinned under `pin_path` attached
/// ([`Loaded::pin_tc_ingress`]); `None` when none is pinned there.
pub fn pinned_tc_ingress(pin_path: &Path) -> Result<Option<SchedClassifier>, TraceError> {
    let path = super::loader::tc_ingress_pin(pin_path);
    match SchedClassifier::from_pin(&path) {
        Ok(program) => Ok(Some(program)),
        Err(aya::programs::ProgramError::SyscallError(error))
            if error.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(source) => Err(TraceError::PinnedProgram { path, source }),
    }
}

/// TC return codes (linux/pkt_cls.h).
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// Offset of `ingress_ifindex` in `struct __sk_buff` (the fields before it are 9 u32s), and a
/// context long enough to end after `ifindex`, which the kernel requires zero-or-valid.
const SKB_INGRESS_IFINDEX_OFF: usize = 36;
const SKB_CTX_LEN: usize = 44;
/// Source ports the synthetic packets use.
const FIRST_TRACE_PORT: u16 = 61_000;

/// Runs one frame through the loaded tc program for Ethernet devices (`BPF_PROG_TEST_RUN`) as
/// if it arrived on `ifindex`; returns the program's TC verdict and the frame as it left the
/// program.
pub fn run_tc_program(
    loaded: &Loaded,
    frame: &[u8],
    ifindex: u32,
) -> Result<(u32, Vec<u8>), TraceError> {
    run_tc(loaded, TC_INGRESS, frame, ifindex)
}

/// [`run_tc_program`] with the loaded tc program `name` (`TC_INGRESS`, `TC_EGRESS` or their
/// `_L3` variants). The kernel's test run reads `skb->protocol` from bytes 12-13 of `data`
/// whichever the program.
pub fn run_tc(
    loaded: &Loaded,
    name: &'static str,
    data: &[u8],
    ifindex: u32,
) -> Result<(u32, Vec<u8>), TraceError> {
    run_classifier(loaded.tc_program(name)?, name, data, ifindex)
}

/// Runs `data` through `program` (called `name` in errors) as if it arrived on `ifindex`.
fn run_classifier(
    program: &SchedClassifier,
    name: &'static str,
    data: &[u8],
    ifindex: u32,
) -> Result<(u32, Vec<u8>), TraceError> {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_INGRESS_IFINDEX_OFF..SKB_INGRESS_IFINDEX_OFF + 4]
        .copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; data.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })
        .map_err(|source| TraceError::TestRun {
            program: name,
            source,
        })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// Runs `request.runs` first packets through the program; deletes the conntrack (and affinity)
/// entries the runs created, so tracing leaves the kernel state as it found it.
pub fn trace(
    target: &TraceTarget<'_>,
    maps: &mut Maps,
    request: &TraceRequest,
) -> Result<TraceResult, TraceError> {
    if request.src.is_ipv4() != request.dst.is_ipv4() {
        return Err(TraceError::MixedFamilies {
            src: request.src,
            dst: request.dst,
        });
    }
    let (source, ingress_ifindex, mut note) = resolve_source(maps, request)?;
    let (src_addr, family) = addr_from_ip(source);
    let (dst_addr, _) = addr_from_ip(request.dst);
    let affinity_before: BTreeSet<_> = maps
        .affinity_entries()?
        .into_iter()
        .filter(|(k, _)| k.client == src_addr && k.family == family)
        .map(|(k, _)| (k.service_id, k.scope))
        .collect();
    let live: std::collections::HashSet<CtKey> = maps
        .conntrack_entries()?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let dst = SocketAddr::new(request.dst, request.dport);
    // The node's own connections go through the socket hooks, which refuse what the tc program
    // drops for loadBalancerSourceRanges (a connect cannot be dropped silently); the program's
    // own count of those drops tells them from the others. On a live proxy a concurrent
    // source-range drop could be taken for this run's: rare, and only for such a frontend.
    let from_node = request.from == Some(TraceFrom::Node);
    let mut range_drops = if from_node {
        read_counter(target.pin_path, Counter::SourceRangeDrops)?
    } else {
        0
    };
    let mut verdicts = BTreeSet::new();
    let mut endpoints = BTreeSet::new();
    let mut masquerade = false;
    let mut port = FIRST_TRACE_PORT;
    for _ in 0..request.runs.max(1) {
        let forward_key = loop {
            let key = CtKey {
                src: src_addr,
                dst: dst_addr,
                sport: port.to_be(),
                dport: request.dport.to_be(),
                proto: request.proto,
                family,
                _pad: [0; 2],
            };
            port = port
                .checked_add(1)
                .ok_or(TraceError::NoFreePort { src: request.src })?;
            if !live.contains(&key) {
                break key;
            }
        };
        let src = SocketAddr::new(source, u16::from_be(forward_key.sport));
        let frame = packet::build(src, dst, request.proto, b"trace");
        let (code, out) = run_classifier(target.program, TC_INGRESS, &frame, ingress_ifindex)?;
        let summary = packet::summarize(&out);
        let verdict = match (code, &summary) {
            (TC_ACT_SHOT, _) if from_node => {
                let now = read_counter(target.pin_path, Counter::SourceRangeDrops)?;
                let refused = now > range_drops;
                range_drops = now;
                if refused {
                    note.get_or_insert_with(|| {
                        "the node's address is outside loadBalancerSourceRanges: the socket \
                         hooks refuse the node's own connect"
                            .to_owned()
                    });
                    Verdict::Reject
                } else {
                    Verdict::Drop
                }
            }
            (TC_ACT_SHOT, _) => Verdict::Drop,
            (TC_ACT_REDIRECT, Some(s)) if matches!(s.proto, IPPROTO_ICMP | IPPROTO_ICMPV6) => {
                Verdict::Reject
            }
            // Translated: left to the stack, or redirected by the fast path.
            (TC_ACT_OK | TC_ACT_REDIRECT, Some(s)) if s.dst != dst => {
                endpoints.insert(s.dst);
                masquerade |= s.src != src;
                let (reply_src, _) = addr_from_ip(s.dst.ip());
                let (reply_dst, _) = addr_from_ip(s.src.ip());
                maps.delete_conntrack(&CtKey {
                    src: reply_src,
                    dst: reply_dst,
                    sport: s.dst.port().to_be(),
                    dport: s.src.port().to_be(),
                    proto: request.proto,
                    family,
                    _pad: [0; 2],
                })?;
                maps.delete_conntrack(&forward_key)?;
                Verdict::Dnat
            }
            _ => Verdict::Pass,
        };
        verdicts.insert(verdict);
    }
    for (key, _) in maps.affinity_entries()? {
        if key.client == src_addr
            && key.family == family
            && !affinity_before.contains(&(key.service_id, key.scope))
        {
            maps.delete_affinity(&key)?;
        }
    }
    // Mixed outcomes (a service changing under the trace) report the most forwarding one.
    let verdict = verdicts.into_iter().next().unwrap_or(Verdict::Pass);
    Ok(TraceResult {
        verdict,
        endpoints,
        masquerade,
        note,
        program: target.origin,
    })
}
