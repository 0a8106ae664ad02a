//! Conntrack garbage collection: the kernel side only stamps `last_seen_ns`; expiring flows by
//! protocol and state is done here, with kube-proxy's conntrack settings as the defaults.

use std::collections::HashMap;
use std::time::Duration;

use proxy_common::{
    CT_F_REPLY, CT_F_SEEN_REPLY, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CtKey, CtValue,
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
};

use super::maps::{Maps, MapsError};

/// Per-protocol idle timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// kube-proxy `conntrack.tcpEstablishedTimeout`: 24 h.
    pub tcp_established: Duration,
    /// kube-proxy `conntrack.tcpCloseWaitTimeout`: 1 h.
    pub tcp_closing: Duration,
    /// A TCP flow that never got a reply (the kernel's SYN_SENT timeout, 2 min).
    pub tcp_new: Duration,
    /// kube-proxy `conntrack.udpTimeout`: 30 s for a flow that saw no reply…
    pub udp_unreplied: Duration,
    /// …and `conntrack.udpStreamTimeout`: 120 s once it did.
    pub udp_replied: Duration,
    /// SCTP and anything else (the kernel's SCTP established timeout is 5 days; flows that
    /// idle this long are gone in practice).
    pub other: Duration,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_hours(24),
            tcp_closing: Duration::from_hours(1),
            tcp_new: Duration::from_mins(2),
            udp_unreplied: Duration::from_secs(30),
            udp_replied: Duration::from_mins(2),
            other: Duration::from_hours(24),
        }
    }
}

impl CtTimeouts {
    /// The idle timeout of a flow whose forward entry is `forward` (the reply entry's state
    /// and flags are mirrored into it by the kernel program).
    pub fn for_flow(&self, proto: u8, forward: &CtValue) -> Duration {
        let replied = forward.flags & CT_F_SEEN_REPLY != 0;
        match proto {
            IPPROTO_TCP => match forward.state {
                CT_STATE_CLOSING => self.tcp_closing,
                CT_STATE_ESTABLISHED => self.tcp_established,
                _ => self.tcp_new,
            },
            IPPROTO_UDP if replied => self.udp_replied,
            IPPROTO_UDP => self.udp_unreplied,
            _ => self.other,
        }
    }
}

/// What one collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub scanned: usize,
    pub expired: usize,
    /// UDP/SCTP entries deleted because their backend no longer exists.
    pub stale_backend: usize,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` stamps entries with.
pub fn monotonic_now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0)
}

/// Decides which entries of a conntrack snapshot are to be deleted at `now_ns`. Pure, so the
/// policy is tested without a kernel.
pub fn expired_keys(
    entries: &[(CtKey, CtValue)],
    backend_exists: impl Fn(u32) -> bool,
    now_ns: u64,
    timeouts: &CtTimeouts,
) -> (Vec<CtKey>, GcStats) {
    let by_key: HashMap<CtKey, CtValue> = entries.iter().copied().collect();
    let mut doomed = Vec::new();
    let mut stats = GcStats {
        scanned: entries.len(),
        ..GcStats::default()
    };
    for (key, value) in entries {
        let is_reply = value.flags & CT_F_REPLY != 0;
        let partner_key = if is_reply {
            key.forward_of_reply(value)
        } else {
            key.reply_of_forward(value)
        };
        let partner = by_key.get(&partner_key);
        let (forward, last_seen) = match (is_reply, partner) {
            (false, partner) => (
                *value,
                partner.map_or(value.last_seen_ns, |p| {
                    p.last_seen_ns.max(value.last_seen_ns)
                }),
            ),
            (true, Some(forward)) => (*forward, forward.last_seen_ns.max(value.last_seen_ns)),
            // An orphaned reply entry (its forward entry was evicted): its own state decides.
            (true, None) => (*value, value.last_seen_ns),
        };
        let connectionless = matches!(key.proto, IPPROTO_UDP | IPPROTO_SCTP);
        if connectionless && !backend_exists(value.backend_id) {
            doomed.push(*key);
            stats.stale_backend += 1;
            continue;
        }
        let idle = Duration::from_nanos(now_ns.saturating_sub(last_seen));
        if idle > timeouts.for_flow(key.proto, &forward) {
            doomed.push(*key);
            stats.expired += 1;
        }
    }
    (doomed, stats)
}

/// One garbage-collection pass over `CONNTRACK`.
pub fn collect_garbage(maps: &mut Maps, timeouts: &CtTimeouts) -> Result<GcStats, MapsError> {
    let entries = maps.conntrack_entries()?;
    let backends: std::collections::HashSet<u32> = maps
        .backend_entries()?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let (doomed, stats) = expired_keys(
        &entries,
        |id| backends.contains(&id),
        monotonic_now_ns(),
        timeouts,
    );
    for key in &doomed {
        maps.delete_conntrack(key)?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{CT_STATE_NEW, FAMILY_IPV4};

    const SEC: u64 = 1_000_000_000;

    fn flow(
        proto: u8,
        state: u8,
        flags: u8,
        last_seen_s: u64,
        backend_id: u32,
    ) -> [(CtKey, CtValue); 2] {
        let original = CtKey {
            src: [1, 0, 0, 0],
            dst: [2, 0, 0, 0],
            sport: 1000,
            dport: 80,
            proto,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        };
        let forward = CtValue {
            nat_dst: [3, 0, 0, 0],
            nat_dport: 8080,
            backend_id,
            state,
            flags,
            last_seen_ns: last_seen_s * SEC,
            ..CtValue::default()
        };
        let reply_key = original.reply_of_forward(&forward);
        let reply = CtValue {
            nat_dst: original.dst,
            nat_dport: original.dport,
            backend_id,
            state,
            flags: flags | CT_F_REPLY,
            last_seen_ns: last_seen_s * SEC,
            ..CtValue::default()
        };
        assert_eq!(reply_key.forward_of_reply(&reply), original);
        [(original, forward), (reply_key, reply)]
    }

    #[test]
    fn expiry_follows_kube_proxy_timeouts() {
        let t = CtTimeouts::default();
        // (proto, state, flags, idle seconds, backend exists, expired)
        let cases: &[(u8, u8, u8, u64, bool, bool)] = &[
            (IPPROTO_UDP, CT_STATE_NEW, 0, 29, true, false),
            (IPPROTO_UDP, CT_STATE_NEW, 0, 31, true, true),
            (
                IPPROTO_UDP,
                CT_STATE_ESTABLISHED,
                CT_F_SEEN_REPLY,
                31,
                true,
                false,
            ),
            (
                IPPROTO_UDP,
                CT_STATE_ESTABLISHED,
                CT_F_SEEN_REPLY,
                121,
                true,
                true,
            ),
            (
                IPPROTO_UDP,
                CT_STATE_ESTABLISHED,
                CT_F_SEEN_REPLY,
                1,
                false,
                true,
            ),
            (IPPROTO_TCP, CT_STATE_NEW, 0, 119, true, false),
            (IPPROTO_TCP, CT_STATE_NEW, 0, 121, true, true),
            (
                IPPROTO_TCP,
                CT_STATE_ESTABLISHED,
                CT_F_SEEN_REPLY,
                23 * 3600,
                true,
                false,
            ),
            (
                IPPROTO_TCP,
                CT_STATE_ESTABLISHED,
                CT_F_SEEN_REPLY,
                25 * 3600,
                true,
                true,
            ),
            // TCP flows to a deleted backend are left to re-balance, not deleted here.
            (
                IPPROTO_TCP,
                CT_STATE_ESTABLISHED,
                CT_F_SEEN_REPLY,
                1,
                false,
                false,
            ),
            (
                IPPROTO_TCP,
                CT_STATE_CLOSING,
                CT_F_SEEN_REPLY,
                3599,
                true,
                false,
            ),
            (
                IPPROTO_TCP,
                CT_STATE_CLOSING,
                CT_F_SEEN_REPLY,
                3601,
                true,
                true,
            ),
        ];
        let now = 200_000 * SEC;
        for &(proto, state, flags, idle, exists, expired) in cases {
            let entries = flow(proto, state, flags, 200_000 - idle, 7);
            let (doomed, _) = expired_keys(&entries, |_| exists, now, &t);
            let expected = if expired { 2 } else { 0 };
            assert_eq!(
                doomed.len(),
                expected,
                "proto {proto} state {state} flags {flags} idle {idle}s backend exists {exists}"
            );
        }
    }
}
