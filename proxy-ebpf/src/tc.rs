//! The tc ingress program: conntrack first, then services for new flows, then the VIP rules.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use aya_log_ebpf::info;
use proxy_common::{
    CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS, CONFIG_F_DEBUG, CT_F_SNAT, ConfigValue, Counter,
    FAMILY_IPV4, FAMILY_IPV6, IPPROTO_TCP, IPPROTO_UDP, SVC_F_SOURCE_RANGES, VIP_F_CLUSTER_IP,
    VipKey,
};

use crate::{
    conntrack,
    fastpath::{TRANSLATED, delivered, or_stack, refusal},
    icmp,
    maps::{CONNTRACK, VIPS, config, count},
    nat::{self, Endpoint, Target},
    parse::{self, Parsed, scratch},
    reject::{self, reject},
    sctp,
    service::{self, Action},
};

const OK: i32 = TC_ACT_OK as i32;
const SHOT: i32 = TC_ACT_SHOT as i32;

/// `Ok(verdict)` for packets the dataplane handled; `Err(TC_ACT_OK)` for packets that are not
/// ours (other protocols, malformed headers), which pass untouched. `l3_off` is where the IP
/// header starts on the program's device (`parse::L3_OFF_ETHERNET` or `L3_OFF_BARE_IP`).
#[inline(always)]
pub fn try_ingress(ctx: &TcContext, l3_off: usize) -> Result<i32, i32> {
    count(Counter::TcIngressPackets);
    match parse::parse(ctx, l3_off) {
        Parsed::Flow => {}
        Parsed::LaterFragment => return Ok(later_fragment(ctx, l3_off)),
        Parsed::IcmpError => {
            return Ok(or_stack(delivered(ctx, icmp::translate_error(ctx), l3_off)));
        }
        Parsed::Echo => return Ok(echo().apply(ctx, l3_off)),
        Parsed::Pass => return Err(OK),
    }
    let mut verdict = tracked_flow(ctx);
    if verdict == NOT_KNOWN {
        let decided = new_flow(ctx);
        if !decided.is_chosen() {
            return Ok(decided.apply(ctx, l3_off));
        }
        verdict = open_flow();
        if verdict == NOT_KNOWN {
            verdict = nat_flow(ctx);
        }
    }
    // The SCTP checksum covers the rewritten ports: fixed before the packet is delivered.
    let answer = delivered(ctx, sctp::finish(ctx, verdict), l3_off);
    match refusal(answer) {
        0 => Ok(answer),
        refused => Ok(reject::refused(ctx, refused)),
    }
}

/// A fragment after the first, with its first fragment's ports: translated only by its flow's
/// conntrack entry (the first fragment made every decision and opened the flow).
#[inline(always)]
fn later_fragment(ctx: &TcContext, l3_off: usize) -> i32 {
    let verdict = tracked_flow(ctx);
    if verdict == NOT_KNOWN {
        return OK;
    }
    if verdict == TRANSLATED {
        count(Counter::FragmentsFollowed);
    }
    or_stack(delivered(ctx, verdict, l3_off))
}

/// The packet's tracked flow translated: `known_flow`, then `reply` for a reply, both called
/// from the entry point's frame (see [`REPLY`]). `NOT_KNOWN` when no flow tracks it.
#[inline(always)]
fn tracked_flow(ctx: &TcContext) -> i32 {
    let verdict = known_flow(ctx);
    if verdict == REPLY {
        return reply(ctx);
    }
    verdict
}

/// `known_flow`'s answer for a packet that starts (or restarts) a flow.
const NOT_KNOWN: i32 = i32::MIN;
/// `known_flow`'s answer for a reply of a tracked flow: `reply` translates it, called from
/// `ingress` rather than from `known_flow` so that their frames are never stacked (together
/// over the 512 bytes Linux 6.1's verifier allows the chain, 32-byte rounding included). Apart
/// from `NOT_KNOWN`, the fast path's `TRANSLATED` and `REJECT_BASE`'s range.
const REPLY: i32 = i32::MIN + 2;

/// Each step below is its own BPF subprogram taking only the context (the packet is in the
/// per-CPU scratch), called one after the other from `ingress`: their stack frames are never
/// stacked on each other, which keeps the chain under the 512-byte BPF stack.
#[inline(never)]
fn known_flow(ctx: &TcContext) -> i32 {
    let Some(scratch) = scratch() else { return OK };
    let flow = &scratch.flow;
    let key = conntrack::key(flow);
    let Some(entry) = CONNTRACK.get_ptr_mut(&key) else {
        return NOT_KNOWN;
    };
    // SAFETY: LRU entries are freed after an RCU grace period: valid for this run.
    let entry = unsafe { &mut *entry };
    if entry.is_held() {
        // No flow's reply: what the stack makes of it (a stray segment to the node's port).
        return NOT_KNOWN;
    }
    if conntrack::is_reply_entry(entry) {
        return REPLY;
    }
    let backend_exists = service::backend_exists(entry.backend_id);
    if conntrack::is_opening_syn(flow) && conntrack::reopens(entry, backend_exists) {
        // The client reuses the tuple for a new connection: select again.
        conntrack::end_for_reopen(&key, entry);
        count(Counter::CtReopened);
        return NOT_KNOWN;
    }
    // kube-proxy never touches TCP or SCTP conntrack: an established connection keeps its
    // endpoint when the endpoint or the Service goes away (the pod, if gone, resets it). Only
    // a UDP flow whose backend is gone is balanced again, so its client is not blackholed.
    if flow.proto == IPPROTO_UDP && !backend_exists {
        conntrack::remove_flow(&key, entry);
        count(Counter::StaleBackendFlows);
        return NOT_KNOWN;
    }
    conntrack::touch(entry, flow, false);
    let new_src = Target::when(
        entry.flags & CT_F_SNAT != 0,
        Endpoint {
            addr: entry.nat_src,
            port: entry.nat_sport,
        },
    );
    let new_dst = Endpoint {
        addr: entry.nat_dst,
        port: entry.nat_dport,
    };
    count(Counter::CtForwardHits);
    rewritten(nat::rewrite(ctx, flow, new_src, Target::to(new_dst)))
}

/// What `new_flow` decided: a tc verdict, a REJECT of the family's packet (built by the caller
/// so that the reply builder's frame is not stacked on top of `new_flow`'s), or a chosen backend
/// (in the scratch, for `open_flow`), in one `i32`. Not an enum: its `Verdict` leaves `Reject`'s
/// byte undefined, and LLVM then returns a register it never set on the paths where a map lookup
/// failed, which verifiers before Linux 6.14 reject ("R9 !read_ok": Debian's 6.1 and 6.12
/// refused `tc_ingress`).
#[derive(Clone, Copy)]
struct NewFlow(i32);

/// `NewFlow` of a REJECT: this plus the family. Below every tc verdict, and apart from
/// `NOT_KNOWN` (a chosen backend) and the fast path's `TRANSLATED`.
const REJECT_BASE: i32 = i32::MIN + 16;

impl NewFlow {
    #[inline(always)]
    fn verdict(verdict: i32) -> Self {
        NewFlow(verdict)
    }

    /// A backend was chosen (in the scratch's `chosen`): `open_flow` goes on.
    #[inline(always)]
    fn chosen() -> Self {
        NewFlow(NOT_KNOWN)
    }

    #[inline(always)]
    fn is_chosen(self) -> bool {
        self.0 == NOT_KNOWN
    }

    #[inline(always)]
    fn reject(family: u8) -> Self {
        NewFlow(REJECT_BASE + i32::from(family))
    }

    /// The verdict, building the REJECT reply (to the packet whose IP header starts at
    /// `l3_off`) when that was the decision.
    #[inline(always)]
    fn apply(self, ctx: &TcContext, l3_off: usize) -> i32 {
        match u8::try_from(self.0.wrapping_sub(REJECT_BASE)) {
            Ok(family) if family == FAMILY_IPV4 || family == FAMILY_IPV6 => {
                reject(ctx, family, l3_off)
            }
            _ => self.0,
        }
    }
}

#[inline(always)]
fn rewritten(result: Result<(), ()>) -> i32 {
    // A failed helper may have left the packet half-written: never deliver it.
    if result.is_ok() { TRANSLATED } else { SHOT }
}

#[inline(never)]
fn reply(ctx: &TcContext) -> i32 {
    let Some(scratch) = scratch() else { return OK };
    let flow = &scratch.flow;
    let key = conntrack::key(flow);
    let Some(entry) = CONNTRACK.get_ptr_mut(&key) else {
        return OK;
    };
    // SAFETY: as above.
    let entry = unsafe { &mut *entry };
    conntrack::stamp(entry);
    // The forward entry holds the flow's state: replies advance it too.
    match CONNTRACK.get_ptr_mut(&key.forward_of_reply(entry)) {
        // SAFETY: as above.
        Some(forward) => conntrack::touch(unsafe { &mut *forward }, flow, true),
        // Evicted by the full LRU map: replies still flow, the client's next packet is new.
        None => count(Counter::CtForwardMissing),
    }
    let new_src = Endpoint {
        addr: entry.nat_dst,
        port: entry.nat_dport,
    };
    let new_dst = Target::when(
        entry.flags & CT_F_SNAT != 0,
        Endpoint {
            addr: entry.nat_src,
            port: entry.nat_sport,
        },
    );
    count(Counter::CtReplyHits);
    rewritten(nat::rewrite(ctx, flow, Target::to(new_src), new_dst))
}

#[inline(never)]
fn new_flow(ctx: &TcContext) -> NewFlow {
    let Some(scratch) = scratch() else {
        return NewFlow::verdict(OK);
    };
    let flow = &scratch.flow;
    let Some(cfg) = config() else {
        return NewFlow::verdict(OK);
    };
    let Some(svc) = service::lookup(
        &flow.dst,
        flow.dport,
        flow.proto,
        flow.family,
        proxy_common::SCOPE_POLICY,
    ) else {
        return vip(cfg, flow.family, &flow.dst, opens_connection(flow));
    };
    // SAFETY: reading the ingress interface of the program's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let class = service::classify(cfg, flow.family, &flow.src, ifindex);
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !service::source_allowed(svc.id, &flow.src) {
        count(Counter::SourceRangeDrops);
        return NewFlow::verdict(SHOT);
    }
    let decision = service::decide(
        &svc,
        &flow.dst,
        flow.dport,
        flow.proto,
        flow.family,
        class,
        &flow.src,
    );
    match decision.action {
        Action::Forward => {}
        Action::Reject => {
            count(Counter::Rejects);
            return NewFlow::reject(flow.family);
        }
        Action::Drop => {
            count(Counter::Drops);
            return NewFlow::verdict(SHOT);
        }
    }
    let (backend_id, backend) = (decision.backend_id, decision.backend);
    // Hairpin: a pod reaching itself through the service must see the node as the peer, or
    // it would answer itself directly and the client would never match the reply.
    let masquerade = svc.masquerade_classes & (1 << class) != 0 || backend.addr == flow.src;
    scratch.chosen = Chosen {
        target: Endpoint {
            addr: backend.addr,
            port: backend.port,
        },
        backend_id,
        service_id: svc.id,
        masquerade: u8::from(masquerade),
        class,
        snat_port: 0,
    };
    NewFlow::chosen()
}

/// The backend `new_flow` chose for the packet in the scratch, handed to `open_flow`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Chosen {
    target: Endpoint,
    backend_id: u32,
    service_id: u32,
    masquerade: u8,
    class: u8,
    /// The SNAT source port `open_flow` took (when masquerading).
    snat_port: u16,
}

/// Opens the flow `new_flow` chose a backend for: its conntrack entries; `NOT_KNOWN` when
/// `nat_flow` is to go on. Choosing, opening and NATing are subprograms called one after the
/// other from `ingress`: as one, their frame was over what Linux 6.1's verifier allows (it
/// rounds every frame up to 32 bytes, and the chain ingress → open_flow → a conntrack
/// subprogram must stay within 512 bytes).
#[inline(never)]
fn open_flow() -> i32 {
    let Some(scratch) = scratch() else {
        return OK;
    };
    let flow = &scratch.flow;
    let Some(cfg) = config() else {
        return OK;
    };
    // By reference, not copied out: each byte of this frame counts (see above).
    let chosen = &scratch.chosen;
    let masquerade = chosen.masquerade != 0;
    let node = service::node_addr(cfg, flow.family);
    if masquerade && node == [0; 4] {
        count(Counter::NoSnatAddress);
        return SHOT;
    }
    let Ok(snat_port) = conntrack::create(
        flow,
        &chosen.target,
        masquerade,
        &node,
        (cfg.snat_port_min, cfg.snat_port_max),
        chosen.backend_id,
        chosen.service_id,
    ) else {
        return SHOT;
    };
    scratch.chosen.snat_port = snat_port;
    NOT_KNOWN
}

/// Rewrites the packet of the flow `open_flow` opened.
#[inline(never)]
fn nat_flow(ctx: &TcContext) -> i32 {
    let Some(scratch) = scratch() else {
        return OK;
    };
    let flow = &scratch.flow;
    let Some(cfg) = config() else {
        return OK;
    };
    let Chosen {
        target,
        backend_id,
        masquerade,
        class,
        snat_port,
        ..
    } = scratch.chosen;
    let masquerade = masquerade != 0;
    let snat = Target::when(
        masquerade,
        Endpoint {
            addr: service::node_addr(cfg, flow.family),
            port: snat_port,
        },
    );
    if cfg.flags & CONFIG_F_DEBUG != 0 {
        info!(
            ctx,
            "new flow proto {} class {} -> backend {} masquerade {}",
            flow.proto,
            class,
            backend_id,
            u8::from(masquerade)
        );
    }
    count(Counter::NewFlows);
    rewritten(nat::rewrite(ctx, flow, snat, Target::to(target)))
}

/// An echo request: no service answers pings, so only the address rules apply (an echo
/// request always starts a new exchange).
#[inline(never)]
fn echo() -> NewFlow {
    let Some(scratch) = scratch() else {
        return NewFlow::verdict(OK);
    };
    let Some(cfg) = config() else {
        return NewFlow::verdict(OK);
    };
    vip(cfg, scratch.icmp.family, &scratch.icmp.outer_dst, true)
}

/// No frontend matched: REJECT unknown ports of a ClusterIP, DROP new connections to the
/// unallocated rest of the service CIDRs, pass everything else. The service CIDRs are asked
/// first: unless some ClusterIP lies outside them, a destination outside them is no VIP either,
/// so traffic that matches nothing costs this one lookup.
#[inline(always)]
fn vip(cfg: &ConfigValue, family: u8, dst: &proxy_common::Addr, opening: bool) -> NewFlow {
    let in_cidr = service::in_service_cidr(family, dst);
    if !in_cidr && cfg.flags & CONFIG_F_CLUSTER_IPS_OUTSIDE_SERVICE_CIDRS == 0 {
        return NewFlow::verdict(OK);
    }
    let key = VipKey {
        addr: *dst,
        family,
        _pad: [0; 3],
    };
    // SAFETY: copied out immediately.
    let flags = unsafe { VIPS.get(&key) }.map_or(0, |v| v.flags);
    if flags & VIP_F_CLUSTER_IP != 0 {
        count(Counter::VipRejects);
        return NewFlow::reject(family);
    }
    if !in_cidr {
        return NewFlow::verdict(OK);
    }
    if !opening {
        count(Counter::ServiceCidrNotNew);
        return NewFlow::verdict(OK);
    }
    count(Counter::VipDrops);
    NewFlow::verdict(SHOT)
}

/// Does this packet, which matched no flow, open a connection? Every packet but a TCP segment
/// other than an opening SYN (a connection the dataplane never translated: it predates the rule).
#[inline(always)]
fn opens_connection(flow: &parse::Flow) -> bool {
    flow.proto != IPPROTO_TCP || conntrack::is_opening_syn(flow)
}
