//! Our own conntrack: one LRU entry per direction of a NATed flow. The forward entry (keyed by
//! the client's original tuple) holds the backend and SNAT choice; the reply entry (keyed by the
//! tuple the backend's replies carry) holds what to restore.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use proxy_common::{
    Addr, CT_F_REPLY, CT_F_SEEN_REPLY, CT_F_SNAT, CT_STATE_CLOSING, CT_STATE_ESTABLISHED,
    CT_STATE_NEW, Counter, CtKey, CtValue, IPPROTO_TCP,
};

use crate::{
    maps::{CONNTRACK, count},
    nat::Endpoint,
    parse::{Flow, TCP_FLAG_FIN, TCP_FLAG_RST},
};

/// SNAT source ports probed before giving up on a new masqueraded flow.
const SNAT_PROBES: u32 = 32;

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

/// A source port in `[min, max]` (host order) for which no reply entry exists yet, so the
/// masqueraded flow's replies cannot be confused with another flow's. Returns the port in network byte order, 0 for none
/// (never a valid port; an `Option` would leave an undefined payload the verifier rejects).
#[inline(always)]
pub fn pick_snat_port(flow: &Flow, backend: &Endpoint, node: &Addr, min: u16, max: u16) -> u16 {
    if min == 0 || max < min {
        let candidate = Endpoint {
            addr: *node,
            port: flow.sport,
        };
        let key = reply_key(flow, backend, &candidate);
        // SAFETY: presence check only.
        return if unsafe { CONNTRACK.get(&key) }.is_none() {
            flow.sport
        } else {
            0
        };
    }
    let range = u32::from(max - min) + 1;
    let start = unsafe { bpf_get_prandom_u32() } % range;
    for i in 0..SNAT_PROBES {
        let port = (min as u32 + (start + i) % range) as u16;
        let candidate = Endpoint {
            addr: *node,
            port: port.to_be(),
        };
        let key = reply_key(flow, backend, &candidate);
        // SAFETY: presence check only.
        if unsafe { CONNTRACK.get(&key) }.is_none() {
            return port.to_be();
        }
    }
    count(Counter::SnatExhausted);
    0
}

/// Creates the reply entry, then the forward entry, for a new flow. A failed insert is counted
/// and leaves every existing entry as it was.
#[inline(always)]
pub fn create(
    flow: &Flow,
    backend: &Endpoint,
    snat: Option<&Endpoint>,
    backend_id: u32,
    service_id: u32,
) -> Result<(), ()> {
    let now = unsafe { bpf_ktime_get_ns() };
    let client = Endpoint {
        addr: flow.src,
        port: flow.sport,
    };
    let (seen_by_backend, snat_flag) = match snat {
        Some(s) => (*s, CT_F_SNAT),
        None => (client, 0),
    };
    let reply = reply_key(flow, backend, &seen_by_backend);
    let reply_value = CtValue {
        nat_dst: flow.dst,
        nat_src: if snat.is_some() { flow.src } else { [0; 4] },
        nat_dport: flow.dport,
        nat_sport: if snat.is_some() { flow.sport } else { 0 },
        backend_id,
        service_id,
        state: CT_STATE_NEW,
        flags: CT_F_REPLY | snat_flag,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    // With SNAT the port was probed free: NOEXIST keeps a concurrent flow that took it first.
    // Without SNAT the reply tuple is the client's own, so a stale entry is replaced.
    let reply_flags = if snat.is_some() { BPF_NOEXIST } else { BPF_ANY };
    if CONNTRACK
        .insert(&reply, &reply_value, u64::from(reply_flags))
        .is_err()
    {
        count(Counter::CtMapFull);
        return Err(());
    }
    let forward_value = CtValue {
        nat_dst: backend.addr,
        nat_src: snat.map_or([0; 4], |s| s.addr),
        nat_dport: backend.port,
        nat_sport: snat.map_or(0, |s| s.port),
        backend_id,
        service_id,
        state: CT_STATE_NEW,
        flags: snat_flag,
        _pad: [0; 2],
        last_seen_ns: now,
    };
    if CONNTRACK
        .insert(&key(flow), &forward_value, u64::from(BPF_ANY))
        .is_err()
    {
        let _ = CONNTRACK.remove(&reply);
        count(Counter::CtMapFull);
        return Err(());
    }
    Ok(())
}

/// Refreshes an entry for a packet of its direction: timestamp, TCP state, reply seen.
#[inline(always)]
pub fn touch(entry: &mut CtValue, flow: &Flow, is_reply: bool) {
    entry.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    if is_reply {
        entry.flags |= CT_F_SEEN_REPLY;
    }
    if flow.proto == IPPROTO_TCP {
        if flow.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
            entry.state = CT_STATE_CLOSING;
        } else if is_reply && entry.state == CT_STATE_NEW {
            entry.state = CT_STATE_ESTABLISHED;
        }
    } else if is_reply {
        entry.state = CT_STATE_ESTABLISHED;
    }
}
