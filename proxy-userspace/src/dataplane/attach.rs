use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, tc, tc::SchedClassifierLinkId,
};

use super::Loaded;
use super::loader::{SOCK_ADDR_PROGRAMS, TC_INGRESS};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the eBPF object has no program {0}")]
    NoProgram(&'static str),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to interface {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to cgroup {path}: {source}")]
    AttachCgroup {
        program: &'static str,
        path: PathBuf,
        source: aya::programs::ProgramError,
    },
    #[error("opening cgroup {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup2 mount in /proc/self/mountinfo")]
    NoCgroup2Mount,
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(std::io::Error),
    #[error("listing interfaces: {0}")]
    ListInterfaces(nix::Error),
}

/// Interfaces of the current network namespace the tc programs go on: all but loopback. Listed
/// through netlink (`if_nameindex`), not sysfs, because a process moved into a namespace with
/// `nsenter --net` still sees the sysfs of the namespace it came from.
pub fn tc_interfaces() -> Result<Vec<String>, AttachError> {
    let mut names: Vec<String> = nix::net::if_::if_nameindex()
        .map_err(AttachError::ListInterfaces)?
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    Ok(names)
}

/// Whether `name` carries Ethernet frames (`ARPHRD_ETHER`): the tc program reads the
/// ethertype at offset 12 and the IP header at 14. Layer-3 devices (tun, WireGuard, IP tunnels)
/// hand it bare IP packets, which it would misparse. Asked with `SIOCGIFHWADDR` on a socket of
/// this network namespace (sysfs may show another namespace, see [`tc_interfaces`]).
fn is_ethernet(name: &str) -> bool {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: plain socket(2); the result is checked and owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        // No socket to ask through: keep the previous behaviour (attach).
        return true;
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero ifreq is valid; the name is copied in bounded by IFNAMSIZ - 1 so it
    // stays NUL-terminated; the ioctl writes only into the ifreq.
    unsafe {
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = libc::c_char::from_ne_bytes([src]);
        }
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut request) < 0 {
            // Gone already: nothing to attach to.
            return false;
        }
        request.ifr_ifru.ifru_hwaddr.sa_family == libc::ARPHRD_ETHER
    }
}

/// `--interfaces`: which interface names get the tc program. Patterns are names with `*`
/// wildcards; a leading `!` excludes. With no include pattern every interface is included;
/// loopback never is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceFilter {
    include: Vec<String>,
    exclude: Vec<String>,
}

impl InterfaceFilter {
    /// Parses a comma-separated pattern list, e.g. `"eth*,veth*,!veth-mgmt"`.
    pub fn parse(patterns: &str) -> Self {
        let mut filter = Self::default();
        for pattern in patterns.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match pattern.strip_prefix('!') {
                Some(excluded) => filter.exclude.push(excluded.to_owned()),
                None => filter.include.push(pattern.to_owned()),
            }
        }
        filter
    }

    pub fn matches(&self, name: &str) -> bool {
        name != "lo"
            && (self.include.is_empty() || self.include.iter().any(|p| glob_match(p, name)))
            && !self.exclude.iter().any(|p| glob_match(p, name))
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_match(pattern: &str, name: &str) -> bool {
    let Some((head, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(mut remaining) = name.strip_prefix(head) else {
        return false;
    };
    let mut parts = rest.split('*').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            return remaining.len() >= part.len() && remaining.ends_with(part);
        }
        match remaining.find(part) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// The interfaces the tc ingress program is attached to. aya attaches with TCX links on kernels
/// ≥ 6.6 and through a clsact qdisc below that.
#[derive(Default)]
pub struct Attachments {
    /// Attached interface names (sorted).
    pub interfaces: Vec<String>,
    links: BTreeMap<String, SchedClassifierLinkId>,
    /// Non-Ethernet interfaces already reported (warned about once).
    skipped: Vec<String>,
}

fn tc_program(loaded: &mut Loaded) -> Result<&mut SchedClassifier, AttachError> {
    loaded
        .ebpf
        .program_mut(TC_INGRESS)
        .ok_or(AttachError::NoProgram(TC_INGRESS))?
        .try_into()
        .map_err(|source| AttachError::Program {
            program: TC_INGRESS,
            source,
        })
}

impl Attachments {
    pub fn attach_all(loaded: &mut Loaded, interfaces: &[String]) -> Result<Self, AttachError> {
        let mut attached = Self::default();
        for interface in interfaces {
            attached.attach(loaded, interface)?;
        }
        Ok(attached)
    }

    /// Attaches the tc ingress program to `interface` (no-op when it already is).
    pub fn attach(&mut self, loaded: &mut Loaded, interface: &str) -> Result<(), AttachError> {
        if self.links.contains_key(interface) {
            return Ok(());
        }
        let program = tc_program(loaded)?;
        // aya picks TCX on kernels >= 6.6 and netlink below; only the latter needs the qdisc.
        let needs_clsact = aya::util::KernelVersion::current()
            .is_ok_and(|v| v < aya::util::KernelVersion::new(6, 6, 0));
        if needs_clsact {
            // An existing clsact qdisc is fine: ours or another tool's.
            let _ = tc::qdisc_add_clsact(interface);
        }
        let link = program
            .attach(interface, TcAttachType::Ingress)
            .map_err(|source| AttachError::Attach {
                program: TC_INGRESS,
                interface: interface.to_owned(),
                source,
            })?;
        self.links.insert(interface.to_owned(), link);
        self.interfaces = self.links.keys().cloned().collect();
        Ok(())
    }

    /// Forgets (and detaches, if it still exists) the program on `interface`.
    pub fn detach(&mut self, loaded: &mut Loaded, interface: &str) -> Result<(), AttachError> {
        let Some(link) = self.links.remove(interface) else {
            return Ok(());
        };
        self.interfaces = self.links.keys().cloned().collect();
        let program = tc_program(loaded)?;
        // An interface that went away took its attachment with it: detaching may fail then.
        if let Err(error) = program.detach(link) {
            tracing::debug!(interface, %error, "detach after the interface went away");
        }
        Ok(())
    }

    /// Attaches to every current interface `filter` selects and detaches from those that are
    /// gone or no longer selected. Returns the interfaces attached and detached.
    pub fn sync(
        &mut self,
        loaded: &mut Loaded,
        filter: &InterfaceFilter,
    ) -> Result<(Vec<String>, Vec<String>), AttachError> {
        let wanted: Vec<String> = tc_interfaces()?
            .into_iter()
            .filter(|n| filter.matches(n))
            .filter(|n| {
                let ethernet = is_ethernet(n);
                if !ethernet && !self.skipped.contains(n) {
                    tracing::warn!(
                        interface = n.as_str(),
                        "not an Ethernet interface: the tc program (which parses Ethernet \
                         frames) is not attached"
                    );
                    self.skipped.push(n.clone());
                }
                ethernet
            })
            .collect();
        let gone: Vec<String> = self
            .links
            .keys()
            .filter(|n| !wanted.contains(n))
            .cloned()
            .collect();
        for interface in &gone {
            self.detach(loaded, interface)?;
        }
        let mut added = Vec::new();
        for interface in wanted {
            if !self.links.contains_key(&interface) {
                self.attach(loaded, &interface)?;
                added.push(interface);
            }
        }
        Ok((added, gone))
    }
}

/// The cgroup2 mount point of this process's mount namespace (from /proc/self/mountinfo).
pub fn cgroup2_root() -> Result<PathBuf, AttachError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(AttachError::MountInfo)?;
    info.lines()
        .find_map(|line| {
            // "id parent maj:min root mount-point options ... - fstype source super-options"
            let (fields, rest) = line.split_once(" - ")?;
            let fstype = rest.split_whitespace().next()?;
            let mount_point = fields.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or(AttachError::NoCgroup2Mount)
}

/// Attaches the sock_addr programs to the cgroup at `path` with BPF links (Linux ≥ 5.7), which
/// always coexist with other programs on the same cgroup (the kernel rejects attach flags on
/// cgroup links, hence `Single`, i.e. no flags). They stay attached as long as `loaded` lives.
pub fn attach_socket_hooks(loaded: &mut Loaded, path: &Path) -> Result<(), AttachError> {
    let cgroup = std::fs::File::open(path).map_err(|source| AttachError::OpenCgroup {
        path: path.to_owned(),
        source,
    })?;
    for name in SOCK_ADDR_PROGRAMS {
        let program: &mut CgroupSockAddr = loaded
            .ebpf
            .program_mut(name)
            .ok_or(AttachError::NoProgram(name))?
            .try_into()
            .map_err(|source| AttachError::Program {
                program: name,
                source,
            })?;
        program
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|source| AttachError::AttachCgroup {
                program: name,
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_filter_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("", "eth0", true),
            ("", "lo", false),
            ("eth*", "eth0", true),
            ("eth*", "veth0", false),
            ("*eth*", "veth0", true),
            ("veth*,!veth-mgmt", "veth-mgmt", false),
            ("veth*,!veth-mgmt", "veth12", true),
            ("!docker*", "docker0", false),
            ("!docker*", "eth1", true),
            ("e*0", "eth0", true),
            ("e*0", "eth01", false),
            ("eth0", "eth0", true),
            ("eth0", "eth00", false),
        ];
        for (patterns, name, expected) in cases {
            assert_eq!(
                InterfaceFilter::parse(patterns).matches(name),
                *expected,
                "{patterns:?} on {name}"
            );
        }
    }
}
