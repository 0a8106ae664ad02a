//! ICMP errors about NATed flows (destination unreachable, fragmentation needed, packet too
//! big): the embedded packet carries post-NAT addresses the receiver does not know, so both the
//! embedded header and the outer addresses get the flow's translation. Without this, PMTU
//! discovery through a service breaks.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::{CT_F_REPLY, CT_F_SNAT, Counter, CtKey, FAMILY_IPV4};

use crate::{
    maps::{CONNTRACK, count},
    nat::{Csums, Endpoint, Target, replace_addr, replace_port},
    parse::{IPV4_CSUM, IcmpError, L4Csum, addr_offsets, scratch},
};

#[inline(never)]
pub fn translate_error(ctx: &TcContext) -> i32 {
    let Some(scratch) = scratch() else {
        return TC_ACT_OK as i32;
    };
    let err = &scratch.icmp;
    // The flow's entry for the direction opposite to the embedded packet.
    let key = CtKey {
        src: err.inner_dst,
        dst: err.inner_src,
        sport: err.inner_dport,
        dport: err.inner_sport,
        proto: err.inner_proto,
        family: err.family,
        _pad: [0; 2],
    };
    // SAFETY: copied out immediately.
    let Some(entry) = (unsafe { CONNTRACK.get(&key) }).copied() else {
        return TC_ACT_OK as i32;
    };
    if entry.is_held() {
        return TC_ACT_OK as i32;
    }
    let snat = entry.flags & CT_F_SNAT != 0;
    let restored_frontend = Endpoint {
        addr: entry.nat_dst,
        port: entry.nat_dport,
    };
    let snat_side = Target::when(
        snat,
        Endpoint {
            addr: entry.nat_src,
            port: entry.nat_sport,
        },
    );
    // Embedded packet sent towards the backend (error from the backend side): its destination
    // goes back to the frontend and, with SNAT, its source back to the client. Embedded packet
    // sent towards the client (error from the client side, reaching the frontend): its source
    // becomes the backend again and, with SNAT, its destination the node's address.
    let (new_inner_src, new_inner_dst) = if entry.flags & CT_F_REPLY != 0 {
        (snat_side, Target::to(restored_frontend))
    } else {
        (Target::to(restored_frontend), snat_side)
    };
    if translate(ctx, err, new_inner_src, new_inner_dst).is_err() {
        return TC_ACT_OK as i32;
    }
    count(Counter::IcmpErrorsTranslated);
    crate::fastpath::TRANSLATED
}

#[inline(always)]
fn translate(
    ctx: &TcContext,
    err: &IcmpError,
    new_inner_src: Target,
    new_inner_dst: Target,
) -> Result<(), ()> {
    let v4 = err.family == FAMILY_IPV4;
    let icmp_csum = L4Csum::Inet(err.icmp_off + 2);
    let (inner_src_off, inner_dst_off) = if v4 {
        (err.inner_l3_off + 12, err.inner_l3_off + 16)
    } else {
        (err.inner_l3_off + 8, err.inner_l3_off + 24)
    };
    // Embedded addresses: IPv4 fixes the embedded header checksum, which leaves the ICMP
    // checksum unchanged (the embedded header still sums to the same value); ICMPv6 has no
    // embedded header checksum, so its own checksum takes the change.
    let inner_addr = Csums {
        l3: v4.then_some(err.inner_l3_off + 10),
        l4: if v4 { L4Csum::None } else { icmp_csum },
        pseudo: false,
    };
    // Outer addresses: the IPv4 header checksum, or the ICMPv6 pseudo header.
    let outer_addr = Csums {
        l3: v4.then_some(usize::from(err.l3_off) + IPV4_CSUM),
        l4: if v4 { L4Csum::None } else { icmp_csum },
        pseudo: true,
    };
    let (outer_src_off, outer_dst_off) = addr_offsets(err.family);
    let l3_off = usize::from(err.l3_off);
    let (outer_src_off, outer_dst_off) = (l3_off + outer_src_off, l3_off + outer_dst_off);
    if new_inner_src.set {
        let src = new_inner_src.endpoint;
        replace_addr(
            ctx,
            err.family,
            inner_src_off,
            &err.inner_src,
            &src.addr,
            inner_addr,
        )?;
        replace_port(ctx, err.inner_l4_off, err.inner_sport, src.port, icmp_csum)?;
        // The error goes to the embedded packet's sender.
        if err.outer_dst == err.inner_src {
            replace_addr(
                ctx,
                err.family,
                outer_dst_off,
                &err.outer_dst,
                &src.addr,
                outer_addr,
            )?;
        }
    }
    if new_inner_dst.set {
        let dst = new_inner_dst.endpoint;
        replace_addr(
            ctx,
            err.family,
            inner_dst_off,
            &err.inner_dst,
            &dst.addr,
            inner_addr,
        )?;
        replace_port(
            ctx,
            err.inner_l4_off + 2,
            err.inner_dport,
            dst.port,
            icmp_csum,
        )?;
        // Sent by the embedded packet's destination itself (not a router on the way).
        if err.outer_src == err.inner_dst {
            replace_addr(
                ctx,
                err.family,
                outer_src_off,
                &err.outer_src,
                &dst.addr,
                outer_addr,
            )?;
        }
    }
    Ok(())
}
