//! kube-ebpf-proxy's kernel programs. Entry points stay thin; the work is in the modules:
//! `parse` (headers), `egress` (the node's ICMP errors about translated flows), `frag` (fragments follow their first), `service` (lookup,
//! classification, backend choice), `conntrack`, `nat` (rewrites and checksums), `sctp` (its
//! CRC32c), `reject` (ICMP generation: REJECT, packet too big), `icmp` (error translation),
//! `sock` (host-originated traffic) and `maps`.
#![no_std]
#![no_main]

mod conntrack;
mod egress;
mod fastpath;
mod frag;
mod icmp;
mod maps;
mod nat;
mod parse;
mod reject;
mod sctp;
mod service;
mod sock;
mod tc;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};
use proxy_common::{FAMILY_IPV4, FAMILY_IPV6};

/// For Ethernet devices.
#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    match tc::try_ingress(&ctx, parse::L3_OFF_ETHERNET) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// For layer-3 devices (tun, WireGuard, IP tunnels), whose packets start at the IP header.
#[classifier]
pub fn tc_ingress_l3(ctx: TcContext) -> i32 {
    match tc::try_ingress(&ctx, parse::L3_OFF_BARE_IP) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// The egress of the same Ethernet devices: the node's ICMP errors about translated flows.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    egress::egress(&ctx, parse::L3_OFF_ETHERNET)
}

/// The egress of the same layer-3 devices.
#[classifier]
pub fn tc_egress_l3(ctx: TcContext) -> i32 {
    egress::egress(&ctx, parse::L3_OFF_BARE_IP)
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    match sock::try_translate_to_backend(&ctx, FAMILY_IPV4) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    match sock::try_translate_to_backend(&ctx, FAMILY_IPV6) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    match sock::try_translate_to_backend(&ctx, FAMILY_IPV4) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    match sock::try_translate_to_backend(&ctx, FAMILY_IPV6) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    match sock::try_translate_to_frontend(&ctx, FAMILY_IPV4) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    match sock::try_translate_to_frontend(&ctx, FAMILY_IPV6) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    match sock::try_translate_to_frontend(&ctx, FAMILY_IPV4) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    match sock::try_translate_to_frontend(&ctx, FAMILY_IPV6) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
