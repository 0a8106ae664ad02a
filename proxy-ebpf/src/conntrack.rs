//! Our own conntrack: one LRU entry per direction of a NATed flow. The forward entry (keyed by
//! the client's original tuple) holds the backend, the SNAT choice and the flow's state; the
//! reply entry (keyed by the tuple the backend's replies carry) holds what to restore. The state
//! machine itself is `proxy_common::ct_advance`, shared with the controller's tests.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use proxy_common::{
    Addr, CT_F_HELD, CT_F_REPLY, CT_F_REPLY_CLOSED_FIRST, CT_F_SNAT, CT_STATE_ESTABLISHED,
    CT_STATE_SYN_SENT, CT_STATE_TIME_WAIT, Counter, CtKey, CtValue, IPPROTO_TCP, TCP_ACK, TCP_SYN,
    ct_advance, ct_state_closed, ct_state_closing,
};

use crate::{
    maps::{CONNTRACK, count},
    nat::Endpoint,
    parse::Flow,
};

/// SNAT source ports probed before giving up on a new masqueraded flow.
const SNAT_PROBES: u32 = 32;

/// `bpf_map_update_elem`'s answer when `BPF_NOEXIST` finds the key taken.
const EEXIST: i32 = -17;

#[inline(always)]
pub fn key(flow: &Flow) -> CtKey {
    CtKey {
        src: flow.src,
        dst: flow.dst,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn reply_key(flow: &Flow, backend: &Endpoint, client: &Endpoint) -> CtKey {
    CtKey {
        src: backend.addr,
        dst: client.addr,
        sport: backend.port,
        dport: client.port,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    }
}

/// `true` for a TCP SYN that opens a connection (not the SYN/ACK).
#[inline(always)]
pub fn is_opening_syn(flow: &Flow) -> bool {
    flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// `true` when a forward entry hit by an opening SYN is to be dropped and the flow selected
/// anew: the old connection is closing or over, or its backend is gone (the client reuses the
/// tuple for a new connection).
#[inline(always)]
pub fn reopens(entry: &CtValue, backend_exists: bool) -> bool {
    ct_state_closing(entry.state) || !backend_exists
}

/// Removes a flow's two entries, given its forward entry.
#[inline(always)]
pub fn remove_flow(forward_key: &CtKey, forward: &CtValue) {
    // Either may be gone already (evicted, or another CPU got there first): nothing to do then.
    let _ = CONNTRACK.remove(&forward_key.reply_of_forward(forward));
    let _ = CONNTRACK.remove(forward_key);
}

/// Ends a flow whose client reuses its tuple for a new connection, given its forward entry.
/// A masqueraded flow the backend closed first keeps its reply entry, held (`CT_F_HELD`): the
/// backend may keep the SNAT tuple in TIME_WAIT for a minute, and a new flow from another
/// client taking that port has its SYN refused whenever its timestamp looks older than the
/// last one seen there (timestamp offsets are per connection). Netfilter forgets that tuple
/// at once here; holding it costs one entry until it expires.
#[inline(always)]
pub fn end_for_reopen(forward_key: &CtKey, forward: &CtValue) {
    let backend_time_wait =
        forward.flags & CT_F_SNAT != 0 && forward.flags & CT_F_REPLY_CLOSED_FIRST != 0;
    let reply = if backend_time_wait {
        CONNTRACK.get_ptr_mut(&forward_key.reply_of_forward(forward))
    } else {
        None
    };
    match reply {
        Some(reply) => {
            // SAFETY: LRU entries are freed after an RCU grace period: valid for this run.
            let reply = unsafe { &mut *reply };
            reply.flags |= CT_F_HELD;
            reply.state = CT_STATE_TIME_WAIT;
            reply.last_seen_ns = unsafe { bpf_ktime_get_ns() };
            let _ = CONNTRACK.remove(forward_key);
        }
        None => remove_flow(forward_key, forward),
    }
}

/// Linux's `TCP_TIMEWAIT_LEN`: how long a backend that closed first keeps the tuple.
const BACKEND_TIME_WAIT_NS: u64 = 60_000_000_000;

/// How long after the last ACK of a flow the client closed first its SNAT port stays a last
/// resort: a new flow's SYN overtaking that ACK (another CPU) would meet the backend still in
/// LAST_ACK, which answers with a challenge ACK and costs the new client a 1 s retransmit; a
/// lost last ACK has the backend retransmit its FIN within its first RTOs.
const LAST_ACK_GRACE_NS: u64 = 2_000_000_000;

/// How an existing reply entry's SNAT port may be taken by a new flow.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reuse {
    /// The flow is live.
    Never,
    /// The flow is over and nobody holds the tuple: the client closed first (the backend's
    /// socket is gone after the last ACK; a grace period after it), a RST ended it, or its
    /// forward entry was evicted.
    Safe,
    /// The flow is over but the backend closed first and may still hold the tuple in TIME_WAIT:
    /// a SYN from another client on it is refused when its timestamp looks old (per-connection
    /// timestamp offsets make that one time in four), so such ports are the last resort, as
    /// netfilter's NAT takes over TIME_WAIT tuples only when nothing else is free. Likewise
    /// for [`LAST_ACK_GRACE_NS`] after the last ACK of a flow the client closed first.
    LastResort,
}

/// How long a reply entry may lack its forward entry while another CPU creates the flow.
const CREATING_NS: u64 = 1_000_000_000;

#[inline(always)]
fn reuse_of(reply_key: &CtKey, reply: &CtValue, now: u64) -> Reuse {
    if reply.is_held() {
        return if now.saturating_sub(reply.last_seen_ns) < BACKEND_TIME_WAIT_NS {
            Reuse::LastResort
        } else {
            Reuse::Safe
        };
    }
    let forward_key = reply_key.forward_of_reply(reply);
    // SAFETY: copied out immediately.
    let Some(forward) = (unsafe { CONNTRACK.get(&forward_key) }).copied() else {
        // Evicted, unless the flow is being created right now.
        return if now.saturating_sub(reply.created_ns) < CREATING_NS {
            Reuse::Never
        } else {
            Reuse::Safe
        };
    };
    if !ct_state_closed(forward.state) {
        return Reuse::Never;
    }
    let closed_for = now.saturating_sub(forward.last_seen_ns);
    let held_by_backend = if forward.flags & CT_F_REPLY_CLOSED_FIRST != 0 {
        closed_for < BACKEND_TIME_WAIT_NS
    } else {
        // The client closed first: the backend's socket goes when the last ACK reaches it,
        // which may still be on its way (or lost, and the backend's FIN retransmitted).
        closed_for < LAST_ACK_GRACE_NS
    };
    if forward.state == CT_STATE_TIME_WAIT && held_by_backend {
        Reuse::LastResort
    } else {
        Reuse::Safe
    }
}

/// What reserving a SNAT port found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reserve {
    Taken,
    /// Another flow holds the tuple.
    Busy,
    /// The map refused the insert for another reason (full).
    Failed,
}

#[inline(always)]
fn reserve(key: &CtKey, value: &CtValue) -> Reserve {
    match CONNTRACK.insert(key, value, u64::from(BPF_NOEXIST)) {
        Ok(()) => Reserve::Taken,
        Err(EEXIST) => {
            count(Counter::SnatCollisions);
            Reserve::Busy
        }
        Err(_) => Reserve::Failed,
    }
}

/// Takes a source port in `[min, max]` (host order) for a masqueraded flow by inserting its reply
/// entry `value` with `BPF_NOEXIST`, so no two flows ever share a reply tuple. Free ports are
/// preferred; failing those, a port whose flow is over is taken over (see [`Reuse`]). A port another CPU takes meanwhile is a collision, and the next
/// candidate is tried. Returns the port
/// in network byte order, 0 for none (never a valid port; an `Option` would leave an undefined
/// payload the verifier rejects).
#[inline(always)]
fn reserve_snat_port(
    flow: &Flow,
    backend: &Endpoint,
    node: &Addr,
    min: u16,
    max: u16,
    value: &CtValue,
) -> u16 {
    let fixed = min == 0 || max < min;
    let (range, start, probes) = if fixed {
        (1, 0, 1)
    } else {
        let range = u32::from(max - min) + 1;
        (range, unsafe { bpf_get_prandom_u32() } % range, SNAT_PROBES)
    };
    let port_at = |i: u32| -> u16 {
        if fixed {
            flow.sport
        } else {
            ((u32::from(min) + (start + i) % range) as u16).to_be()
        }
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // Network-order port of the first flow seen whose backend may hold the tuple, 0 for none.
    let mut last_resort = 0u16;
    for i in 0..probes {
        let port = port_at(i);
        let candidate = reply_key(flow, backend, &Endpoint { addr: *node, port });
        // SAFETY: copied out immediately.
        let reused = match unsafe { CONNTRACK.get(&candidate) }.copied() {
            None => false,
            Some(existing) => match reuse_of(&candidate, &existing, now) {
                Reuse::Safe => {
                    take_over(&candidate, &existing);
                    true
                }
                Reuse::LastResort => {
                    if last_resort == 0 {
                        last_resort = port;
                    }
                    continue;
                }
                Reuse::Never => continue,
            },
        };
        match reserve(&candidate, value) {
            Reserve::Taken => {
                if reused {
                    count(Counter::SnatPortsReused);
                }
                return port;
            }
            // Another CPU was faster: try the next candidate.
            Reserve::Busy => {}
            Reserve::Failed => {
                count(Counter::CtMapFull);
                return 0;
            }
        }
    }
    if last_resort != 0 {
        let candidate = reply_key(
            flow,
            backend,
            &Endpoint {
                addr: *node,
                port: last_resort,
            },
        );
        // SAFETY: copied out immediately.
        if let Some(existing) = unsafe { CONNTRACK.get(&candidate) }.copied()
            && reuse_of(&candidate, &existing, now) != Reuse::Never
        {
            take_over(&candidate, &existing);
        }
        match reserve(&candidate, value) {
            Reserve::Taken => {
                count(Counter::SnatPortsReused);
                return last_resort;
            }
            Reserve::Busy => {}
            Reserve::Failed => {
                count(Counter::CtMapFull);
                return 0;
            }
        }
    }
    count(Counter::SnatExhausted);
    0
}

/// Forgets the closed flow holding a SNAT port, given its reply entry.
#[inline(always)]
fn take_over(reply_key: &CtKey, reply: &CtValue) {
    // A held entry's forward key is the reopened flow's, if any: not ours to remove.
    if !reply.is_held() {
        let _ = CONNTRACK.remove(&reply_key.forward_of_reply(reply));
    }
    let _ = CONNTRACK.remove(reply_key);
}

/// Creates the reply entry, then the forward entry, for a new flow; a masqueraded flow
/// (`masquerade`, source `node`) gets a SNAT port from `[min, max]` on the way. Returns the SNAT
/// port (network order; 0 when not masqueraded), or `Err` when the flow could not be tracked
/// (counted), leaving every other flow's entries as they were.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn create(
    flow: &Flow,
    backend: &Endpoint,
    masquerade: bool,
    node: &Addr,
    snat_ports: (u16, u16),
    backend_id: u32,
    service_id: u32,
) -> Result<u16, ()> {
    let now = unsafe { bpf_ktime_get_ns() };
    let snat_flag = if masquerade { CT_F_SNAT } else { 0 };
    let reply_value = CtValue {
        nat_dst: flow.dst,
        nat_src: if masquerade { flow.src } else { [0; 4] },
        nat_dport: flow.dport,
        nat_sport: if masquerade { flow.sport } else { 0 },
        backend_id,
        service_id,
        state: CT_STATE_SYN_SENT,
        flags: CT_F_REPLY | snat_flag,
        _pad: [0; 2],
        last_seen_ns: now,
        created_ns: now,
    };
    let snat_port = if masquerade {
        let port = reserve_snat_port(
            flow,
            backend,
            node,
            snat_ports.0,
            snat_ports.1,
            &reply_value,
        );
        if port == 0 {
            return Err(());
        }
        port
    } else {
        // The reply tuple is the client's own: a stale entry of an earlier flow is replaced.
        let client = Endpoint {
            addr: flow.src,
            port: flow.sport,
        };
        if CONNTRACK
            .insert(
                &reply_key(flow, backend, &client),
                &reply_value,
                u64::from(BPF_ANY),
            )
            .is_err()
        {
            count(Counter::CtMapFull);
            return Err(());
        }
        0
    };
    let seen_by_backend = Endpoint {
        addr: if masquerade { *node } else { flow.src },
        port: if masquerade { snat_port } else { flow.sport },
    };
    // A TCP flow first seen mid-stream (its SYN went by before we tracked it) is taken as
    // established, as netfilter's `nf_conntrack_tcp_loose` does.
    let mid_stream = flow.proto == IPPROTO_TCP && flow.tcp_flags & TCP_SYN == 0;
    let (state, flags) = ct_advance(
        flow.proto,
        if mid_stream {
            CT_STATE_ESTABLISHED
        } else {
            CT_STATE_SYN_SENT
        },
        snat_flag,
        false,
        flow.tcp_flags,
        0,
    );
    let forward_value = CtValue {
        nat_dst: backend.addr,
        nat_src: if masquerade { *node } else { [0; 4] },
        nat_dport: backend.port,
        nat_sport: snat_port,
        backend_id,
        service_id,
        state,
        flags,
        _pad: [0; 2],
        last_seen_ns: now,
        created_ns: now,
    };
    if CONNTRACK
        .insert(&key(flow), &forward_value, u64::from(BPF_ANY))
        .is_err()
    {
        let _ = CONNTRACK.remove(&reply_key(flow, backend, &seen_by_backend));
        count(Counter::CtMapFull);
        return Err(());
    }
    Ok(snat_port)
}

/// Advances a flow's forward entry for one of its packets (either direction) and stamps it.
#[inline(always)]
pub fn touch(forward: &mut CtValue, flow: &Flow, is_reply: bool) {
    let now = unsafe { bpf_ktime_get_ns() };
    let (state, flags) = ct_advance(
        flow.proto,
        forward.state,
        forward.flags,
        is_reply,
        flow.tcp_flags,
        now.saturating_sub(forward.created_ns),
    );
    forward.state = state;
    forward.flags = flags;
    forward.last_seen_ns = now;
}

/// Stamps a reply entry (its partner holds the state).
#[inline(always)]
pub fn stamp(reply: &mut CtValue) {
    reply.last_seen_ns = unsafe { bpf_ktime_get_ns() };
}

/// `true` for an entry the reply path may serve.
#[inline(always)]
pub fn is_reply_entry(entry: &CtValue) -> bool {
    entry.flags & CT_F_REPLY != 0
}
