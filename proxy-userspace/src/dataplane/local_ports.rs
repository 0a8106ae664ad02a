//! Keeping the node's own sockets off the ports the dataplane translates to: a local socket
//! given an ephemeral port inside the SNAT range could share a tuple with a masqueraded flow, and
//! one inside the NodePort range would be shadowed by a NodePort. Where a range overlaps the
//! ephemeral range (`net.ipv4.ip_local_port_range`, which IPv6 shares), it is added to
//! `net.ipv4.ip_local_reserved_ports`, as Cilium's auto-protection of the NodePort range does.

use std::path::{Path, PathBuf};

use crate::port_range::PortRange;

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

#[derive(Debug, thiserror::Error)]
pub enum LocalPortsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds {text:?}, not what the kernel writes there")]
    Parse { path: PathBuf, text: String },
    #[error(
        "the {what} {range} overlaps the node's ephemeral ports {ephemeral} \
         (net.ipv4.ip_local_port_range) and reserving it in net.ipv4.ip_local_reserved_ports \
         failed: {source}; move the range outside {ephemeral} or reserve it on the node"
    )]
    Reserve {
        what: &'static str,
        range: PortRange,
        ephemeral: PortRange,
        source: std::io::Error,
    },
}

/// The part of `range` inside `ephemeral`, if any.
fn overlap(range: PortRange, ephemeral: PortRange) -> Option<PortRange> {
    let first = range.first.max(ephemeral.first);
    let last = range.last.min(ephemeral.last);
    (first <= last).then_some(PortRange { first, last })
}

/// `ip_local_port_range` ("32768\t60999").
fn parse_port_range(text: &str) -> Option<PortRange> {
    let mut words = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(first)), Some(Ok(last)), None) = (words.next(), words.next(), words.next()) else {
        return None;
    };
    (first <= last).then_some(PortRange { first, last })
}

/// `ip_local_reserved_ports` ("", "8080", "30000-32767,61000-65535").
fn parse_reserved(text: &str) -> Option<Vec<PortRange>> {
    text.trim()
        .split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| {
            let (first, last) = part.split_once('-').unwrap_or((part, part));
            let (first, last) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
            (first <= last).then_some(PortRange { first, last })
        })
        .collect()
}

/// `reserved` with `range` added, merged and sorted, in the sysctl's syntax; `None` when
/// `range` is reserved already.
fn with_reserved(reserved: &[PortRange], range: PortRange) -> Option<String> {
    let covered = reserved
        .iter()
        .any(|r| r.first <= range.first && range.last <= r.last);
    if covered {
        return None;
    }
    let mut all: Vec<PortRange> = reserved.to_vec();
    all.push(range);
    all.sort_by_key(|r| r.first);
    let mut merged: Vec<PortRange> = Vec::new();
    for r in all {
        match merged.last_mut() {
            Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(r.last);
            }
            _ => merged.push(r),
        }
    }
    let parts: Vec<String> = merged
        .iter()
        .map(|r| {
            if r.first == r.last {
                r.first.to_string()
            } else {
                r.to_string()
            }
        })
        .collect();
    Some(parts.join(","))
}

fn read(path: &Path) -> Result<String, LocalPortsError> {
    std::fs::read_to_string(path).map_err(|source| LocalPortsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reserves, in this network namespace, the part of each named range that overlaps the
/// ephemeral ports. Returns one line per reservation made, for the log.
pub fn reserve_local_ports(
    ranges: &[(&'static str, PortRange)],
) -> Result<Vec<String>, LocalPortsError> {
    let text = read(Path::new(PORT_RANGE))?;
    let ephemeral = parse_port_range(&text).ok_or_else(|| LocalPortsError::Parse {
        path: PORT_RANGE.into(),
        text: text.clone(),
    })?;
    let mut made = Vec::new();
    for &(what, range) in ranges {
        let Some(part) = overlap(range, ephemeral) else {
            continue;
        };
        let text = read(Path::new(RESERVED_PORTS))?;
        let reserved = parse_reserved(&text).ok_or_else(|| LocalPortsError::Parse {
            path: RESERVED_PORTS.into(),
            text: text.clone(),
        })?;
        let Some(updated) = with_reserved(&reserved, part) else {
            continue;
        };
        std::fs::write(RESERVED_PORTS, &updated).map_err(|source| LocalPortsError::Reserve {
            what,
            range,
            ephemeral,
            source,
        })?;
        made.push(format!(
            "reserved {part} of the {what} {range} in net.ipv4.ip_local_reserved_ports \
             (the node's ephemeral ports are {ephemeral}): now {updated}"
        ));
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn overlaps_and_sysctl_syntax() {
        let ephemeral = parse_port_range("32768\t60999\n").unwrap();
        assert_eq!(ephemeral, range(32768, 60999));
        assert_eq!(overlap(range(61000, 65535), ephemeral), None);
        assert_eq!(overlap(range(30000, 32767), ephemeral), None);
        assert_eq!(
            overlap(range(30000, 40000), ephemeral),
            Some(range(32768, 40000))
        );
        assert_eq!(parse_port_range("1 2 3"), None);
        assert_eq!(parse_reserved("\n"), Some(vec![]));
        assert_eq!(
            parse_reserved("8080,30000-32767\n"),
            Some(vec![range(8080, 8080), range(30000, 32767)])
        );
        assert_eq!(parse_reserved("9-3"), None);
    }

    #[test]
    fn reservations_merge_with_what_is_there() {
        let cases: &[(&[PortRange], PortRange, Option<&str>)] = &[
            (&[], range(61000, 65535), Some("61000-65535")),
            (&[range(61000, 65535)], range(62000, 63000), None),
            (
                &[range(8080, 8080), range(30000, 32767)],
                range(32768, 40000),
                Some("8080,30000-40000"),
            ),
            (
                &[range(100, 200), range(300, 400)],
                range(150, 350),
                Some("100-400"),
            ),
        ];
        for (reserved, added, expected) in cases {
            assert_eq!(
                with_reserved(reserved, *added).as_deref(),
                *expected,
                "{reserved:?} + {added}"
            );
        }
    }
}
