//! The node's own protections the Service suites also run under, chosen by the environment
//! variable [`PROTECTIONS_VAR`] (comma-separated; unset or empty: a permissive node):
//! - `firewall`: an nftables table dropping `ct state invalid` in the input and forward hooks
//!   (firewalld's default; kube-proxy's iptables mode leaves such a rule behind);
//! - `rp_filter`: strict reverse-path filtering (`rp_filter=1`) on every interface, present and
//!   future (the default of RHEL-family nodes).
//!
//! `cargo xtask test` runs the Service suites once more with both.

use crate::{LabError, Netns, Result, command_in, run};

/// The environment variable naming the protections to apply to every test node.
pub const PROTECTIONS_VAR: &str = "PROXY_LAB_NODE_PROTECTIONS";

/// Protections of a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protections {
    pub firewall: bool,
    pub rp_filter: bool,
}

impl Protections {
    /// The protections [`PROTECTIONS_VAR`] asks for.
    pub fn from_env() -> Result<Protections> {
        Self::parse(&std::env::var(PROTECTIONS_VAR).unwrap_or_default())
    }

    pub fn parse(text: &str) -> Result<Protections> {
        let mut protections = Protections::default();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "firewall" => protections.firewall = true,
                "rp_filter" => protections.rp_filter = true,
                other => {
                    return Err(LabError::Config(format!(
                        "{PROTECTIONS_VAR}: unknown protection {other:?} (firewall, rp_filter)"
                    )));
                }
            }
        }
        Ok(protections)
    }

    /// Applies these protections to `node` (a namespace the test created).
    pub fn apply(self, node: &Netns) -> Result<()> {
        self.apply_in(node.name())
    }

    /// Applies these protections to the named namespace (one the caller created).
    pub fn apply_in(self, netns: &str) -> Result<()> {
        let nft = |args: &[&str]| run(command_in(netns, "nft").args(args)).map(drop);
        if self.firewall {
            nft(&["add", "table", "inet", "host_firewall"])?;
            for hook in ["input", "forward"] {
                let spec = format!("{{ type filter hook {hook} priority filter; policy accept; }}");
                nft(&["add", "chain", "inet", "host_firewall", hook, &spec])?;
                nft(&[
                    "add",
                    "rule",
                    "inet",
                    "host_firewall",
                    hook,
                    "ct",
                    "state",
                    "invalid",
                    "drop",
                ])?;
            }
        }
        if self.rp_filter {
            // `all` and `default` first (new interfaces inherit `default`), then every existing
            // interface: the effective value is the larger of `all` and the interface's.
            run(command_in(netns, "sh").args([
                "-c",
                "set -e; for f in /proc/sys/net/ipv4/conf/all/rp_filter \
                 /proc/sys/net/ipv4/conf/default/rp_filter /proc/sys/net/ipv4/conf/*/rp_filter; \
                 do echo 1 > \"$f\"; done",
            ]))?;
        }
        Ok(())
    }

    /// Applies the protections of [`Protections::from_env`] to `node`.
    pub fn apply_from_env(node: &Netns) -> Result<()> {
        Self::from_env()?.apply(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_variable() {
        assert_eq!(Protections::parse("").unwrap(), Protections::default());
        assert_eq!(
            Protections::parse("firewall, rp_filter").unwrap(),
            Protections {
                firewall: true,
                rp_filter: true
            }
        );
        assert!(Protections::parse("selinux").is_err());
    }
}
