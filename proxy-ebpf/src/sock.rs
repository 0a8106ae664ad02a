//! Host-originated traffic: cgroup sock_addr hooks translate a service address to a backend
//! before the socket connects (TCP, connected UDP) or sends (unconnected UDP), and translate the
//! backend back to the service address for recvmsg and getpeername.
//!
//! Why socket hooks rather than tc egress + redirect: a local socket's packets to a ClusterIP
//! never cross a tc ingress hook of this namespace, and on paths without a loopback detour
//! there is no ingress at all. Translating at connect time needs no conntrack entry and no
//! SNAT (the kernel picks the source address for the backend's route itself, as kube-proxy's
//! output-chain DNAT of local-origin traffic does), costs nothing per packet, and the
//! application still sees the service address as its peer.
//!
//! The hooks act only when the socket lives in the node's network namespace
//! (`bpf_get_netns_cookie(ctx) == CONFIG.netns_cookie`): the cgroup may also hold processes in
//! pod namespaces, whose traffic the tc hooks already translate (twice would be wrong).

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    Addr, Counter, FAMILY_IPV4, SCOPE_POLICY, SOURCE_NODE, SVC_F_SOURCE_RANGES, SockRevNatKey,
    SockRevNatValue, VIP_F_CLUSTER_IP, VipKey,
};

use crate::{
    maps::{SOCK_REVNAT, VIPS, config, count},
    service::{self, Action},
};

/// Let the operation proceed.
const ALLOW: i32 = 1;
/// Refuse it: with `bpf_set_retval` the caller sees ECONNREFUSED like a client of a REJECTing
/// kube-proxy; without it, EPERM.
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// Set by the loader (`override_global`) when the kernel offers `bpf_set_retval` to sock_addr
/// programs (Linux ≥ 6.1). It lives in the frozen read-only data map, so the verifier knows its
/// value and never visits the helper call on older kernels, which would reject it.
#[unsafe(no_mangle)]
static SOCK_SET_RETVAL: u8 = 0;

#[inline(always)]
fn in_node_netns(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = config() else { return false };
    // SAFETY: the helper reads the context's own socket.
    cfg.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.netns_cookie
}

// The context is read and written one 32-bit field at a time with volatile accesses at
// constant offsets: the verifier refuses context accesses through a computed pointer, which is
// what a plain array copy of `user_ip6` compiles to.

#[inline(always)]
fn user_addr(sa: *const bpf_sock_addr, family: u8) -> Addr {
    // SAFETY: `sa` is the kernel's context for this call; each access is a u32 field.
    unsafe {
        if family == FAMILY_IPV4 {
            [read_volatile(&raw const (*sa).user_ip4), 0, 0, 0]
        } else {
            [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ]
        }
    }
}

#[inline(always)]
fn user_port(sa: *const bpf_sock_addr) -> u16 {
    // SAFETY: as above. The port is in network byte order in the low 16 bits.
    unsafe { read_volatile(&raw const (*sa).user_port) as u16 }
}

#[inline(always)]
fn set_user_addr(sa: *mut bpf_sock_addr, family: u8, addr: &Addr, port: u16) {
    // SAFETY: as above; these fields are writable for the hooks these programs attach to.
    unsafe {
        if family == FAMILY_IPV4 {
            write_volatile(&raw mut (*sa).user_ip4, addr[0]);
        } else {
            write_volatile(&raw mut (*sa).user_ip6[0], addr[0]);
            write_volatile(&raw mut (*sa).user_ip6[1], addr[1]);
            write_volatile(&raw mut (*sa).user_ip6[2], addr[2]);
            write_volatile(&raw mut (*sa).user_ip6[3], addr[3]);
        }
        write_volatile(&raw mut (*sa).user_port, u32::from(port));
    }
}

/// connect4/6 and sendmsg4/6: service address → backend.
#[inline(always)]
/// `Err(ALLOW)` when the socket is not the node's (left alone), `Ok(verdict)` otherwise.
pub fn try_translate_to_backend(ctx: &SockAddrContext, family: u8) -> Result<i32, i32> {
    if !in_node_netns(ctx) {
        return Err(ALLOW);
    }
    let Some(cfg) = config() else {
        return Err(ALLOW);
    };
    let sa = ctx.sock_addr;
    // SAFETY: the kernel's context for this call; a u32 field.
    let proto = unsafe { read_volatile(&raw const (*sa).protocol) } as u8;
    let frontend = user_addr(sa, family);
    let port = user_port(sa);
    let Some(svc) = service::lookup(&frontend, port, proto, family, SCOPE_POLICY) else {
        let key = VipKey {
            addr: frontend,
            family,
            _pad: [0; 3],
        };
        // SAFETY: copied out immediately.
        let is_cluster_ip =
            unsafe { VIPS.get(&key) }.is_some_and(|v| v.flags & VIP_F_CLUSTER_IP != 0);
        return Ok(if is_cluster_ip { refuse() } else { ALLOW });
    };
    let client = service::node_addr(cfg, family);
    // loadBalancerSourceRanges hold for the node's own connections too (kube-proxy's firewall
    // check runs on output), its address as the source, as the tc program checks it. A connect
    // cannot be dropped silently: it is refused rather than let through to the load balancer.
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !service::source_allowed(svc.id, &client) {
        count(Counter::SourceRangeDrops);
        return Ok(refuse());
    }
    let decision = service::decide(&svc, &frontend, port, proto, family, SOURCE_NODE, &client);
    Ok(match decision.action {
        Action::Forward => {
            let backend = decision.backend;
            set_user_addr(sa, family, &backend.addr, backend.port);
            let key = SockRevNatKey {
                // SAFETY: the helper reads the context's own socket.
                cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
                addr: backend.addr,
                port: backend.port,
                family,
                _pad: [0; 5],
            };
            let value = SockRevNatValue {
                addr: frontend,
                port,
                _pad: [0; 2],
                service_id: svc.id,
            };
            // LRU: a full map forgets the oldest sockets' reverse entries, never this one's.
            let _ = SOCK_REVNAT.insert(&key, &value, 0);
            count(Counter::SockConnectTranslated);
            ALLOW
        }
        Action::Reject => refuse(),
        // A dropped destination: leave it untranslated, it goes nowhere (no answer, as DROP).
        Action::Drop => ALLOW,
    })
}

#[inline(always)]
fn refuse() -> i32 {
    count(Counter::SockConnectRejected);
    // SAFETY: a read of a plain global the loader set (volatile: its value comes at load time).
    if unsafe { read_volatile(&raw const SOCK_SET_RETVAL) } != 0 {
        // SAFETY: plain helper call setting this cgroup program run's return value.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    REFUSE
}

/// recvmsg4/6 and getpeername4/6: backend → the service address the application used.
#[inline(always)]
/// `Err(ALLOW)` when the socket is not the node's, `Ok(ALLOW)` otherwise (these hooks only
/// rewrite the address the application sees; they never refuse).
pub fn try_translate_to_frontend(ctx: &SockAddrContext, family: u8) -> Result<i32, i32> {
    if !in_node_netns(ctx) {
        return Err(ALLOW);
    }
    let sa = ctx.sock_addr;
    let key = SockRevNatKey {
        // SAFETY: the helper reads the context's own socket.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: user_addr(sa, family),
        port: user_port(sa),
        family,
        _pad: [0; 5],
    };
    // SAFETY: copied out immediately.
    if let Some(frontend) = unsafe { SOCK_REVNAT.get(&key) }.copied() {
        set_user_addr(sa, family, &frontend.addr, frontend.port);
        count(Counter::SockReplyTranslated);
    }
    Ok(ALLOW)
}
