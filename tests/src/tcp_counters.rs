//! The kernel's TCP counters of one network namespace (`/proc/net/snmp` and `/proc/net/netstat`
//! as seen from inside it): a test that must prove no TCP segment was dropped counts the
//! kernel's retransmissions instead of timing exchanges, so the check does not depend on how
//! fast the machine is (under qemu's emulation an exchange can take a second without any loss).

use std::path::PathBuf;

use crate::{LabError, Netns, Result};

/// A namespace's TCP counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// `Tcp: RetransSegs`: segments sent again (RTO, fast retransmit, tail loss probe, SYN and
    /// SYN-ACK retransmissions).
    pub retransmitted: u64,
    /// `TcpExt: TCPLossProbes`: tail loss probes, the last segment sent again when its
    /// acknowledgement is later than about two round trips — any stall of an emulated machine.
    /// Counted in `retransmitted` whether or not anything was lost.
    pub loss_probes: u64,
    /// `TcpExt: TCPLossProbeRecovery`: probes that repaired a loss (the kernel's own verdict).
    pub loss_probe_recoveries: u64,
    /// For the failure message: `TcpExt: TCPDSACKRecv` (retransmissions the peer reported as
    /// duplicates; a connection closed before the copy came reports none), `TCPSynRetrans` (SYN
    /// and SYN-ACK), `TCPTimeouts` (RTOs).
    pub duplicates_reported: u64,
    pub syn_retransmitted: u64,
    pub timeouts: u64,
}

impl TcpCounters {
    /// The counters of `ns` now.
    ///
    /// # Errors
    /// When the namespace cannot be entered or its counters read or parsed.
    pub fn read(ns: &Netns) -> Result<TcpCounters> {
        // /proc/net follows the process's first thread; /proc/thread-self/net this thread's
        // namespace, the one `enter` switched to.
        ns.enter(|| -> Result<TcpCounters> {
            let snmp = proc_net("snmp")?;
            let netstat = proc_net("netstat")?;
            let extended = |name| counter(&netstat, "netstat", "TcpExt", name);
            Ok(TcpCounters {
                retransmitted: counter(&snmp, "snmp", "Tcp", "RetransSegs")?,
                loss_probes: extended("TCPLossProbes")?,
                loss_probe_recoveries: extended("TCPLossProbeRecovery")?,
                duplicates_reported: extended("TCPDSACKRecv")?,
                syn_retransmitted: extended("TCPSynRetrans")?,
                timeouts: extended("TCPTimeouts")?,
            })
        })?
    }

    /// Losses since `before`: every retransmission but the tail loss probes (RTOs, fast
    /// retransmits, SYN and SYN-ACK retransmissions), and the probes that repaired a loss.
    pub fn lost_since(&self, before: &TcpCounters) -> u64 {
        let since = |now: u64, then: u64| now.saturating_sub(then);
        let retransmitted = since(self.retransmitted, before.retransmitted);
        let probes = since(self.loss_probes, before.loss_probes);
        let recoveries = since(self.loss_probe_recoveries, before.loss_probe_recoveries);
        retransmitted.saturating_sub(probes) + recoveries
    }
}

fn proc_net(file: &'static str) -> Result<String> {
    let path = PathBuf::from("/proc/thread-self/net").join(file);
    std::fs::read_to_string(&path).map_err(|source| LabError::Io { path, source })
}

/// The value of `name` in a `/proc/net/snmp`-style table: pairs of lines `Group: names…` and
/// `Group: values…`.
fn counter(text: &str, file: &'static str, group: &'static str, name: &'static str) -> Result<u64> {
    let prefix = format!("{group}:");
    let mut rows = text.lines().filter(|line| line.starts_with(&prefix));
    while let (Some(names), Some(values)) = (rows.next(), rows.next()) {
        if let Some(at) = names.split_whitespace().position(|n| n == name) {
            if let Some(value) = values
                .split_whitespace()
                .nth(at)
                .and_then(|v| v.parse().ok())
            {
                return Ok(value);
            }
            break;
        }
    }
    Err(LabError::Counter { file, group, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_by_name_from_their_group() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm RtoMin RetransSegs InErrs\nTcp: 1 200 17 0\nUdp: InDatagrams\nUdp: 5\n";
        assert_eq!(counter(snmp, "snmp", "Tcp", "RetransSegs").unwrap(), 17);
        assert_eq!(counter(snmp, "snmp", "Udp", "InDatagrams").unwrap(), 5);
        assert!(counter(snmp, "snmp", "Tcp", "Nope").is_err());
        let netstat =
            "TcpExt: SyncookiesSent TCPDSACKRecv\nTcpExt: 0 3\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(
            counter(netstat, "netstat", "TcpExt", "TCPDSACKRecv").unwrap(),
            3
        );
    }

    #[test]
    fn tail_loss_probes_are_losses_only_when_they_repaired_one() {
        let before = TcpCounters {
            retransmitted: 10,
            loss_probes: 4,
            loss_probe_recoveries: 1,
            ..TcpCounters::default()
        };
        let after = |retransmitted, loss_probes, loss_probe_recoveries| TcpCounters {
            retransmitted,
            loss_probes,
            loss_probe_recoveries,
            ..TcpCounters::default()
        };
        assert_eq!(after(10, 4, 1).lost_since(&before), 0);
        assert_eq!(
            after(13, 7, 1).lost_since(&before),
            0,
            "three probes, no loss"
        );
        assert_eq!(
            after(13, 7, 2).lost_since(&before),
            1,
            "one probe repaired a loss"
        );
        assert_eq!(
            after(12, 5, 1).lost_since(&before),
            1,
            "one RTO or fast retransmit"
        );
    }
}
