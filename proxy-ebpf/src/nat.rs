//! Address and port rewriting with incremental checksum updates (RFC 1624 through the kernel's
//! `bpf_l3_csum_replace` / `bpf_l4_csum_replace`, which also keep `skb->csum` right for
//! CHECKSUM_COMPLETE and only touch the pseudo-header part for CHECKSUM_PARTIAL).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::TcContext,
};
use proxy_common::{Addr, Counter, FAMILY_IPV4};

use crate::{
    maps::count,
    parse::{Flow, IPV4_CSUM, L4Csum},
};

/// An address and port a packet's source or destination becomes.
#[derive(Clone, Copy)]
pub struct Endpoint {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
}

/// An optional rewrite, always fully initialised. `Option<Endpoint>`'s `None` leaves the
/// payload undefined, and LLVM may lower an undefined value to a read of an uninitialised
/// register, which the verifier rejects.
#[derive(Clone, Copy)]
pub struct Target {
    pub set: bool,
    pub endpoint: Endpoint,
}

impl Target {
    #[inline(always)]
    pub fn to(endpoint: Endpoint) -> Self {
        Self {
            set: true,
            endpoint,
        }
    }

    /// `to(endpoint)` when `condition` holds, else `none()`.
    #[inline(always)]
    pub fn when(condition: bool, endpoint: Endpoint) -> Self {
        Self {
            set: condition,
            endpoint,
        }
    }
}

/// Where the checksums covering a rewritten field are.
#[derive(Clone, Copy)]
pub struct Csums {
    /// The IPv4 header checksum covering the field (none for IPv6 or for L4 fields).
    pub l3: Option<usize>,
    pub l4: L4Csum,
    /// The field is in the pseudo header of `l4` (addresses) rather than in its data (ports).
    pub pseudo: bool,
}

#[inline(always)]
fn l4_flags(csum: L4Csum, pseudo: bool, size: u64) -> Option<(usize, u64)> {
    let pseudo = if pseudo {
        u64::from(BPF_F_PSEUDO_HDR)
    } else {
        0
    };
    match csum {
        L4Csum::None => None,
        L4Csum::Inet(off) => Some((off, pseudo | size)),
        // MARK_MANGLED_0: a zero (absent, IPv4) checksum stays zero, and a computed zero is
        // written as 0xffff.
        L4Csum::Udp(off) => Some((off, pseudo | u64::from(BPF_F_MARK_MANGLED_0) | size)),
    }
}

/// Replaces the address at `off` (4 bytes for IPv4, 16 for IPv6) and fixes the checksums.
#[inline(always)]
pub fn replace_addr(
    ctx: &TcContext,
    family: u8,
    off: usize,
    old: &Addr,
    new: &Addr,
    csums: Csums,
) -> Result<(), ()> {
    let fail = |_| count(Counter::RewriteFailures);
    if family == FAMILY_IPV4 {
        ctx.store(off, &new[0], 0).map_err(fail)?;
        if let Some(l3) = csums.l3 {
            ctx.l3_csum_replace(l3, u64::from(old[0]), u64::from(new[0]), 4)
                .map_err(fail)?;
        }
        if let Some((l4, flags)) = l4_flags(csums.l4, csums.pseudo, 4) {
            ctx.l4_csum_replace(l4, u64::from(old[0]), u64::from(new[0]), flags)
                .map_err(fail)?;
        }
    } else {
        ctx.store(off, new, 0).map_err(fail)?;
        if let Some((l4, flags)) = l4_flags(csums.l4, csums.pseudo, 4) {
            for i in 0..4 {
                if old[i] != new[i] {
                    ctx.l4_csum_replace(l4, u64::from(old[i]), u64::from(new[i]), flags)
                        .map_err(fail)?;
                }
            }
        }
    }
    Ok(())
}

/// Replaces the port at `off` and fixes the L4 checksum.
#[inline(always)]
pub fn replace_port(
    ctx: &TcContext,
    off: usize,
    old: u16,
    new: u16,
    csum: L4Csum,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    let fail = |_| count(Counter::RewriteFailures);
    // Without an inet checksum to compensate the change (SCTP), `skb->csum` is updated.
    let store_flags = if matches!(csum, L4Csum::None) {
        u64::from(BPF_F_RECOMPUTE_CSUM)
    } else {
        0
    };
    ctx.store(off, &new, store_flags).map_err(fail)?;
    if let Some((l4, flags)) = l4_flags(csum, false, 2) {
        ctx.l4_csum_replace(l4, u64::from(old), u64::from(new), flags)
            .map_err(fail)?;
    }
    Ok(())
}

/// Rewrites a flow's packet: destination and/or source, addresses and ports (a later fragment
/// has no ports: its addresses only).
#[inline(always)]
pub fn rewrite(ctx: &TcContext, flow: &Flow, new_src: Target, new_dst: Target) -> Result<(), ()> {
    let l3 = (flow.family == FAMILY_IPV4).then_some(usize::from(flow.l3_off) + IPV4_CSUM);
    let addr_csums = Csums {
        l3,
        l4: flow.l4_csum(),
        pseudo: true,
    };
    if new_dst.set {
        let dst = new_dst.endpoint;
        if dst.addr != flow.dst {
            replace_addr(
                ctx,
                flow.family,
                flow.dst_off(),
                &flow.dst,
                &dst.addr,
                addr_csums,
            )?;
        }
        if !flow.later_fragment {
            replace_port(ctx, flow.l4_off + 2, flow.dport, dst.port, flow.l4_csum())?;
        }
    }
    if new_src.set {
        let src = new_src.endpoint;
        if src.addr != flow.src {
            replace_addr(
                ctx,
                flow.family,
                flow.src_off(),
                &flow.src,
                &src.addr,
                addr_csums,
            )?;
        }
        if !flow.later_fragment {
            replace_port(ctx, flow.l4_off, flow.sport, src.port, flow.l4_csum())?;
        }
    }
    Ok(())
}
