//! Conntrack garbage collection: the kernel side only stamps `last_seen_ns`; expiring flows by
//! protocol and state is done here, with kube-proxy's conntrack settings as the defaults.

use std::collections::HashMap;
use std::time::Duration;

use proxy_common::{
    CT_F_REPLY, CT_F_SEEN_REPLY, CT_STATE_CLOSE, CT_STATE_CLOSE_WAIT, CT_STATE_ESTABLISHED,
    CT_STATE_FIN_WAIT, CT_STATE_LAST_ACK, CT_STATE_SYN_RECV, CT_STATE_SYN_SENT, CT_STATE_TIME_WAIT,
    CtKey, CtValue, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
};

use super::maps::{Maps, MapsError};

/// Idle timeouts by protocol and state: the one table of conntrack lifetimes. The values are
/// netfilter's defaults (`nf_conntrack_proto_{tcp,udp,sctp}.c`) except where kube-proxy sets
/// them (its `conntrack` configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// `nf_conntrack_tcp_timeout_syn_sent`: 120 s (a SYN never answered).
    pub tcp_syn_sent: Duration,
    /// `nf_conntrack_tcp_timeout_syn_recv`: 60 s (SYN/ACK seen, handshake unfinished).
    pub tcp_syn_recv: Duration,
    /// kube-proxy `conntrack.tcpEstablishedTimeout`: 24 h.
    pub tcp_established: Duration,
    /// `nf_conntrack_tcp_timeout_unacknowledged`: 300 s (established but never answered: a
    /// flow picked up mid-stream whose backend stays silent).
    pub tcp_unacknowledged: Duration,
    /// `nf_conntrack_tcp_timeout_fin_wait`: 120 s.
    pub tcp_fin_wait: Duration,
    /// kube-proxy `conntrack.tcpCloseWaitTimeout`: 1 h (half-closed connections).
    pub tcp_close_wait: Duration,
    /// `nf_conntrack_tcp_timeout_last_ack`: 30 s.
    pub tcp_last_ack: Duration,
    /// `nf_conntrack_tcp_timeout_time_wait`: 120 s. A SYN reopens the tuple earlier, and its
    /// SNAT port may be taken over at once.
    pub tcp_time_wait: Duration,
    /// `nf_conntrack_tcp_timeout_close`: 10 s (closed by a RST).
    pub tcp_close: Duration,
    /// kube-proxy `conntrack.udpTimeout` (`nf_conntrack_udp_timeout`): 30 s for a flow that is
    /// not assured (no reply, or replied within its first 2 s only)…
    pub udp: Duration,
    /// …and `conntrack.udpStreamTimeout` (`nf_conntrack_udp_timeout_stream`): 120 s once assured.
    pub udp_stream: Duration,
    /// `nf_conntrack_sctp_timeout_cookie_wait`-like: 3 s for an association never answered is
    /// netfilter's; 30 s here, as the SCTP handshake is not parsed (INIT retransmissions).
    pub sctp_unreplied: Duration,
    /// `nf_conntrack_sctp_timeout_established`: 210 s (heartbeats every 30 s keep it alive).
    pub sctp_established: Duration,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self {
            tcp_syn_sent: Duration::from_mins(2),
            tcp_syn_recv: Duration::from_mins(1),
            tcp_established: Duration::from_hours(24),
            tcp_unacknowledged: Duration::from_mins(5),
            tcp_fin_wait: Duration::from_mins(2),
            tcp_close_wait: Duration::from_hours(1),
            tcp_last_ack: Duration::from_secs(30),
            tcp_time_wait: Duration::from_mins(2),
            tcp_close: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_mins(2),
            sctp_unreplied: Duration::from_secs(30),
            sctp_established: Duration::from_secs(210),
        }
    }
}

impl CtTimeouts {
    /// The table with kube-proxy's `conntrack` settings applied: a zero keeps the kernel's
    /// default, as kube-proxy then leaves the sysctl alone (`nf_conntrack_tcp_timeout_established`
    /// is 5 days, `…_close_wait` 60 s).
    pub fn with_kube_proxy(settings: &crate::config::ConntrackTimeouts) -> Self {
        let defaults = Self::default();
        let or = |value: Duration, kernel: Duration| if value.is_zero() { kernel } else { value };
        Self {
            tcp_established: or(settings.tcp_established, Duration::from_hours(24 * 5)),
            tcp_close_wait: or(settings.tcp_close_wait, Duration::from_mins(1)),
            udp: or(settings.udp, defaults.udp),
            udp_stream: or(settings.udp_stream, defaults.udp_stream),
            ..defaults
        }
    }

    /// The idle timeout of a flow whose forward entry is `forward` (it holds the flow's state).
    pub fn for_flow(&self, proto: u8, forward: &CtValue) -> Duration {
        let replied = forward.flags & CT_F_SEEN_REPLY != 0;
        match proto {
            IPPROTO_TCP => match forward.state {
                CT_STATE_SYN_SENT => self.tcp_syn_sent,
                CT_STATE_SYN_RECV => self.tcp_syn_recv,
                CT_STATE_ESTABLISHED if !replied => self.tcp_unacknowledged,
                CT_STATE_FIN_WAIT => self.tcp_fin_wait,
                CT_STATE_CLOSE_WAIT => self.tcp_close_wait,
                CT_STATE_LAST_ACK => self.tcp_last_ack,
                CT_STATE_TIME_WAIT => self.tcp_time_wait,
                CT_STATE_CLOSE => self.tcp_close,
                // ESTABLISHED, and a state this version does not know (pins of a newer
                // layout): kept long.
                _ => self.tcp_established,
            },
            IPPROTO_UDP if forward.state == CT_STATE_ESTABLISHED => self.udp_stream,
            IPPROTO_UDP => self.udp,
            IPPROTO_SCTP if replied => self.sctp_established,
            _ => self.sctp_unreplied,
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
    /// Entries whose partner (the other direction's entry) is missing: what the full LRU map
    /// evicted (an estimate: a flow being created has one entry for an instant too).
    pub orphans: usize,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` stamps entries with.
pub fn monotonic_now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0)
}

/// The key of the entry for the other direction of the flow `key`/`value` belongs to.
fn partner_key(key: &CtKey, value: &CtValue) -> CtKey {
    if value.flags & CT_F_REPLY != 0 {
        key.forward_of_reply(value)
    } else {
        key.reply_of_forward(value)
    }
}

/// Entries of a conntrack snapshot whose other direction is missing: what the full LRU map
/// evicted (an estimate: a flow being created has one entry for an instant too).
pub fn orphan_entries(entries: &[(CtKey, CtValue)]) -> usize {
    let keys: std::collections::HashSet<CtKey> = entries.iter().map(|(k, _)| *k).collect();
    entries
        .iter()
        .filter(|(k, v)| !v.is_held() && !keys.contains(&partner_key(k, v)))
        .count()
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
        // A held entry's forward key may be the reopened flow's: its own state decides.
        let partner = if value.is_held() {
            None
        } else {
            by_key.get(&partner_key(key, value))
        };
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
        if partner.is_none() && !value.is_held() {
            stats.orphans += 1;
        }
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
    use proxy_common::{CT_F_HELD, FAMILY_IPV4};

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
    fn expiry_follows_the_timeouts_table() {
        const R: u8 = CT_F_SEEN_REPLY;
        const H: u64 = 3600;
        let t = CtTimeouts::default();
        // (proto, state, flags, idle seconds, backend exists, expired)
        #[rustfmt::skip]
        let cases: &[(u8, u8, u8, u64, bool, bool)] = &[
            (IPPROTO_UDP, CT_STATE_SYN_SENT, 0, 29, true, false),
            (IPPROTO_UDP, CT_STATE_SYN_SENT, 0, 31, true, true),
            // Replied but not assured: still the short timeout.
            (IPPROTO_UDP, CT_STATE_SYN_RECV, R, 31, true, true),
            (IPPROTO_UDP, CT_STATE_ESTABLISHED, R, 31, true, false),
            (IPPROTO_UDP, CT_STATE_ESTABLISHED, R, 121, true, true),
            (IPPROTO_UDP, CT_STATE_ESTABLISHED, R, 1, false, true),
            (IPPROTO_TCP, CT_STATE_SYN_SENT, 0, 119, true, false),
            (IPPROTO_TCP, CT_STATE_SYN_SENT, 0, 121, true, true),
            (IPPROTO_TCP, CT_STATE_SYN_RECV, R, 59, true, false),
            (IPPROTO_TCP, CT_STATE_SYN_RECV, R, 61, true, true),
            (IPPROTO_TCP, CT_STATE_ESTABLISHED, R, 23 * H, true, false),
            (IPPROTO_TCP, CT_STATE_ESTABLISHED, R, 25 * H, true, true),
            (IPPROTO_TCP, CT_STATE_ESTABLISHED, 0, 299, true, false),
            (IPPROTO_TCP, CT_STATE_ESTABLISHED, 0, 301, true, true),
            // TCP flows to a deleted backend are left to re-balance, not deleted here.
            (IPPROTO_TCP, CT_STATE_ESTABLISHED, R, 1, false, false),
            (IPPROTO_TCP, CT_STATE_FIN_WAIT, R, 119, true, false),
            (IPPROTO_TCP, CT_STATE_FIN_WAIT, R, 121, true, true),
            (IPPROTO_TCP, CT_STATE_CLOSE_WAIT, R, H - 1, true, false),
            (IPPROTO_TCP, CT_STATE_CLOSE_WAIT, R, H + 1, true, true),
            (IPPROTO_TCP, CT_STATE_LAST_ACK, R, 29, true, false),
            (IPPROTO_TCP, CT_STATE_LAST_ACK, R, 31, true, true),
            (IPPROTO_TCP, CT_STATE_TIME_WAIT, R, 119, true, false),
            (IPPROTO_TCP, CT_STATE_TIME_WAIT, R, 121, true, true),
            (IPPROTO_TCP, CT_STATE_CLOSE, R, 9, true, false),
            (IPPROTO_TCP, CT_STATE_CLOSE, R, 11, true, true),
            (IPPROTO_SCTP, CT_STATE_SYN_SENT, 0, 29, true, false),
            (IPPROTO_SCTP, CT_STATE_SYN_SENT, 0, 31, true, true),
            (IPPROTO_SCTP, CT_STATE_ESTABLISHED, R, 209, true, false),
            (IPPROTO_SCTP, CT_STATE_ESTABLISHED, R, 211, true, true),
        ];
        let now = 200_000 * SEC;
        for &(proto, state, flags, idle, exists, expired) in cases {
            let entries = flow(proto, state, flags, 200_000 - idle, 7);
            let (doomed, stats) = expired_keys(&entries, |_| exists, now, &t);
            let expected = if expired { 2 } else { 0 };
            assert_eq!(
                doomed.len(),
                expected,
                "proto {proto} state {state} flags {flags} idle {idle}s backend exists {exists}"
            );
            assert_eq!(stats.orphans, 0);
        }
    }

    #[test]
    fn kube_proxy_settings_replace_their_rows_and_zero_keeps_the_kernel_default() {
        let settings = crate::config::ConntrackTimeouts::default();
        assert_eq!(
            CtTimeouts::with_kube_proxy(&settings),
            CtTimeouts::default()
        );
        let zero = crate::config::ConntrackTimeouts {
            tcp_established: Duration::ZERO,
            tcp_close_wait: Duration::ZERO,
            udp: Duration::from_secs(7),
            udp_stream: Duration::ZERO,
        };
        let t = CtTimeouts::with_kube_proxy(&zero);
        assert_eq!(t.tcp_established, Duration::from_hours(120));
        assert_eq!(t.tcp_close_wait, Duration::from_mins(1));
        assert_eq!(t.udp, Duration::from_secs(7));
        assert_eq!(t.udp_stream, Duration::from_mins(2));
        assert_eq!(t.tcp_time_wait, CtTimeouts::default().tcp_time_wait);
    }

    #[test]
    fn a_reply_refreshes_its_flow_and_an_orphan_is_counted() {
        let t = CtTimeouts::default();
        let now = 200_000 * SEC;
        let [(fk, mut forward), (rk, reply)] =
            flow(IPPROTO_TCP, CT_STATE_SYN_SENT, 0, 200_000 - 10, 7);
        // The forward entry is old, its reply entry fresh: the flow lives.
        forward.last_seen_ns = (200_000 - 500) * SEC;
        let (doomed, _) = expired_keys(&[(fk, forward), (rk, reply)], |_| true, now, &t);
        assert!(doomed.is_empty());
        let (doomed, stats) = expired_keys(&[(rk, reply)], |_| true, now, &t);
        assert!(doomed.is_empty());
        assert_eq!(stats.orphans, 1);
        assert_eq!(orphan_entries(&[(rk, reply)]), 1);
        assert_eq!(orphan_entries(&[(fk, forward), (rk, reply)]), 0);
    }

    #[test]
    fn a_held_reply_entry_lives_by_its_own_time_wait_beside_the_reopened_flow() {
        let t = CtTimeouts::default();
        let now = 200_000 * SEC;
        // The reopened flow is fresh and established; the entry held for its old SNAT tuple
        // (the same forward key) expires after `tcp_time_wait` of its own, and is no orphan.
        let [(fk, forward), _] = flow(
            IPPROTO_TCP,
            CT_STATE_ESTABLISHED,
            CT_F_SEEN_REPLY,
            200_000,
            7,
        );
        let [_, (mut held_key, mut held)] =
            flow(IPPROTO_TCP, CT_STATE_TIME_WAIT, 0, 200_000 - 119, 7);
        held.flags |= CT_F_HELD;
        // Another SNAT port than the reopened flow's.
        held_key.dport = 9999;
        let entries = |held: CtValue| [(fk, forward), (held_key, held)];
        let (doomed, stats) = expired_keys(&entries(held), |_| true, now, &t);
        assert!(doomed.is_empty());
        assert_eq!(
            (stats.orphans, orphan_entries(&entries(held))),
            (1, 1),
            "the reopened flow's reply entry is not in the snapshot"
        );
        held.last_seen_ns = (200_000 - 121) * SEC;
        let (doomed, _) = expired_keys(&entries(held), |_| true, now, &t);
        assert_eq!(doomed, [held_key]);
    }
}
