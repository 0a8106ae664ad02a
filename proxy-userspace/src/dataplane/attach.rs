use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, Link as _, LinkError, LinkOrder, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, tc};
use globset::{Glob, GlobSet, GlobSetBuilder};
use procfs_core::FromRead as _;
use procfs_core::process::MountInfos;

use netlink_packet_route::link::LinkLayerType;

use super::Loaded;
use super::loader::{SOCK_ADDR_PROGRAMS, TC_EGRESS, TC_EGRESS_L3, TC_INGRESS, TC_INGRESS_L3};
use super::watch::{Link, WatchError, list_links};

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
    #[error("--interfaces pattern {pattern:?}: {source}")]
    InterfacePattern {
        pattern: String,
        source: globset::Error,
    },
    #[error("no cgroup2 mount in /proc/self/mountinfo")]
    NoCgroup2Mount,
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(procfs_core::ProcError),
    #[error(transparent)]
    ListInterfaces(#[from] WatchError),
    #[error("creating the links directory {path}: {source}")]
    LinksDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the link of {target}: {source}")]
    Link { target: String, source: LinkError },
    #[error("pinning the link {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("removing or replacing the pinned link {path}: {source}")]
    Unpin {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Interfaces of the current network namespace the tc programs may go on: all but loopback,
/// sorted by name.
pub fn tc_interfaces() -> Result<Vec<String>, AttachError> {
    Ok(tc_links()?.into_iter().map(|link| link.name).collect())
}

/// The links of the current network namespace but loopback, from rtnetlink, sorted by name.
fn tc_links() -> Result<Vec<Link>, AttachError> {
    let mut links: Vec<Link> = list_links()?
        .into_iter()
        .filter(|link| link.name != "lo")
        .collect();
    links.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(links)
}

/// What an interface's packets start with at the tc hook, from its hardware type (`ARPHRD_*`,
/// as netlink-packet-route names them): this picks the tc program it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkLayer {
    /// Ethernet frames (`ARPHRD_ETHER`: veth, bridges, bonds, VXLAN, gretap…): the IP header
    /// at offset 14.
    Ethernet,
    /// Bare IP packets, no link-layer header: tun and WireGuard (`ARPHRD_NONE`), IP-in-IP,
    /// ip6tnl, SIT and GRE tunnels, raw-IP modems, PPP.
    BareIp,
    /// Another link layer (InfiniBand, CAN, …), which neither program parses.
    Other(LinkLayerType),
}

impl LinkLayer {
    pub fn of_hardware_type(hardware_type: LinkLayerType) -> Self {
        match hardware_type {
            LinkLayerType::Ether => Self::Ethernet,
            LinkLayerType::None
            | LinkLayerType::Tunnel
            | LinkLayerType::Tunnel6
            | LinkLayerType::Sit
            | LinkLayerType::Ipgre
            | LinkLayerType::Ip6gre
            | LinkLayerType::Rawip
            | LinkLayerType::Ppp => Self::BareIp,
            other => Self::Other(other),
        }
    }

    /// The tc programs for this link layer, if there are any.
    pub fn tc_programs(self) -> Option<TcPrograms> {
        match self {
            Self::Ethernet => Some(TcPrograms {
                ingress: TC_INGRESS,
                egress: TC_EGRESS,
            }),
            Self::BareIp => Some(TcPrograms {
                ingress: TC_INGRESS_L3,
                egress: TC_EGRESS_L3,
            }),
            Self::Other(_) => None,
        }
    }
}

/// The programs an interface gets: translation at ingress, the node's ICMP errors about
/// translated flows at egress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcPrograms {
    pub ingress: &'static str,
    pub egress: &'static str,
}

/// The two tc hooks, each with its program of a [`TcPrograms`] and the prefix of its links'
/// pin names.
const HOOKS: [(TcAttachType, &str); 2] = [
    (TcAttachType::Ingress, "tc-ingress-"),
    (TcAttachType::Egress, "tc-egress-"),
];

impl TcPrograms {
    fn of_hook(self, hook: TcAttachType) -> &'static str {
        match hook {
            TcAttachType::Egress => self.egress,
            _ => self.ingress,
        }
    }
}

/// `--interfaces`: which interface names get the tc program. Patterns are shell globs (`*`,
/// `?`, `[...]`, matched by globset); a leading `!` excludes. With no include pattern every
/// interface is included; loopback never is.
#[derive(Clone, Debug, Default)]
pub struct InterfaceFilter {
    /// `None`: no include pattern, every interface.
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl InterfaceFilter {
    /// Parses a comma-separated pattern list, e.g. `"eth*,veth*,!veth-mgmt"`.
    pub fn parse(patterns: &str) -> Result<Self, AttachError> {
        let mut include = GlobSetBuilder::new();
        let mut exclude = GlobSetBuilder::new();
        let mut any_include = false;
        for pattern in patterns.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (set, glob) = if let Some(excluded) = pattern.strip_prefix('!') {
                (&mut exclude, excluded)
            } else {
                any_include = true;
                (&mut include, pattern)
            };
            set.add(
                Glob::new(glob).map_err(|source| AttachError::InterfacePattern {
                    pattern: pattern.to_owned(),
                    source,
                })?,
            );
        }
        let build = |builder: GlobSetBuilder| {
            builder
                .build()
                .map_err(|source| AttachError::InterfacePattern {
                    pattern: patterns.to_owned(),
                    source,
                })
        };
        Ok(Self {
            include: any_include.then(|| build(include)).transpose()?,
            exclude: build(exclude)?,
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        name != "lo"
            && self.include.as_ref().is_none_or(|set| set.is_match(name))
            && !self.exclude.is_match(name)
    }
}

/// `--tc-attach`: how the tc ingress program goes on an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttachMode {
    /// TCX links where the kernel has them (probed), a clsact filter otherwise.
    #[default]
    Auto,
    /// TCX links (Linux ≥ 6.6), pinned on bpffs.
    Tcx,
    /// A clsact filter (netlink) at a fixed priority and handle, replaced in place.
    Netlink,
}

impl TcAttachMode {
    /// `Auto` resolved for the running kernel's probed features.
    #[must_use]
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto if super::KernelFeatures::get().tcx => Self::Tcx,
            Self::Auto => Self::Netlink,
            mode => mode,
        }
    }
}

/// The clsact filter of netlink mode: a fixed priority and handle, so a restarted proxy (and
/// `cleanup`) finds its filter and replaces (removes) exactly that one.
const NETLINK_PRIORITY: u16 = 1;
const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 0xeb);

/// The directory under the pin path holding the pinned links (tc and cgroup).
pub fn links_dir(pin_path: &Path) -> PathBuf {
    pin_path.join("links")
}

/// The pin of a tc link: the hook's prefix ([`HOOKS`]), then the interface name, escaped (bpffs
/// refuses names with a dot, which interface names such as VLANs' `eth0.100` may have).
fn tc_link_pin(links: &Path, prefix: &str, interface: &str) -> PathBuf {
    let escaped = interface.replace('%', "%25").replace('.', "%2e");
    links.join(format!("{prefix}{escaped}"))
}

/// The interface a tc link pin name (of either hook) is for.
fn tc_link_interface(pin_name: &str) -> Option<String> {
    let escaped = HOOKS
        .iter()
        .find_map(|(_, prefix)| pin_name.strip_prefix(prefix))?;
    Some(escaped.replace("%2e", ".").replace("%25", "%"))
}

/// Removes this proxy's clsact filters (ingress and egress) from `interface`; `false` when
/// there was none.
pub(super) fn remove_netlink_filter(interface: &str) -> bool {
    let mut removed = false;
    for (hook, _) in HOOKS {
        removed |= remove_netlink_filter_of(interface, hook);
    }
    removed
}

/// Removes this proxy's clsact filter from `interface`'s `hook`; `false` when there was none.
fn remove_netlink_filter_of(interface: &str, hook: TcAttachType) -> bool {
    SchedClassifierLink::attached(interface, hook, NETLINK_PRIORITY, NETLINK_HANDLE, None)
        .is_ok_and(|link| link.detach().is_ok())
}

/// Removes a pinned link; an absent pin is not an error. The link (and the attachment) goes
/// with its last reference.
fn unpin(path: &Path) -> Result<(), AttachError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(AttachError::Unpin {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The interfaces the tc programs are attached to (ingress and egress). Attachments outlive the process: TCX
/// links are pinned under the pin path's `links/`, clsact filters stay in the kernel. A new
/// proxy replaces the program of each in place (no moment without one) and removes those of
/// interfaces no longer selected.
pub struct Attachments {
    /// Attached interface names (sorted).
    pub interfaces: Vec<String>,
    /// The programs attached to each of `interfaces` (same order).
    programs: Vec<TcPrograms>,
    mode: TcAttachMode,
    links: PathBuf,
    /// Interfaces no program is for, already reported (warned about once).
    skipped: Vec<String>,
    /// Whether attachments left by an earlier proxy were looked for.
    adopted: bool,
}

fn tc_program<'a>(
    loaded: &'a mut Loaded,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, AttachError> {
    loaded
        .ebpf
        .program_mut(name)
        .ok_or(AttachError::NoProgram(name))?
        .try_into()
        .map_err(|source| AttachError::Program {
            program: name,
            source,
        })
}

impl Attachments {
    /// No attachment made yet; the pinned links live under `pin_path`.
    pub fn new(pin_path: &Path, mode: TcAttachMode) -> Self {
        Self {
            interfaces: Vec::new(),
            programs: Vec::new(),
            mode: mode.resolve(),
            links: links_dir(pin_path),
            skipped: Vec::new(),
            adopted: false,
        }
    }

    /// Puts the tc programs ([`LinkLayer::tc_programs`]) on `interface`'s ingress and egress,
    /// replacing the programs of attachments an earlier proxy (or an earlier link layer of the
    /// same name) left there, atomically: packets see the old program or the new one.
    pub fn attach(
        &mut self,
        loaded: &mut Loaded,
        interface: &str,
        programs: TcPrograms,
    ) -> Result<(), AttachError> {
        std::fs::create_dir_all(&self.links).map_err(|source| AttachError::LinksDir {
            path: self.links.clone(),
            source,
        })?;
        for (hook, prefix) in HOOKS {
            let pin = tc_link_pin(&self.links, prefix, interface);
            self.attach_hook(loaded, interface, programs.of_hook(hook), hook, &pin)?;
        }
        match self
            .interfaces
            .binary_search_by(|n| n.as_str().cmp(interface))
        {
            Ok(at) => self.programs[at] = programs,
            Err(at) => {
                self.interfaces.insert(at, interface.to_owned());
                self.programs.insert(at, programs);
            }
        }
        Ok(())
    }

    /// Puts program `name` on `interface`'s `hook`, its TCX link pinned at `pin` (see
    /// [`Self::attach`]).
    fn attach_hook(
        &self,
        loaded: &mut Loaded,
        interface: &str,
        name: &'static str,
        hook: TcAttachType,
        pin: &Path,
    ) -> Result<(), AttachError> {
        let failed = |source| AttachError::Attach {
            program: name,
            interface: interface.to_owned(),
            source,
        };
        let program = tc_program(loaded, name)?;
        match self.mode {
            TcAttachMode::Tcx => {
                if !replace_pinned_tcx(program, name, pin, interface)? {
                    let id = program
                        .attach_with_options(
                            interface,
                            hook,
                            TcAttachOptions::TcxOrder(LinkOrder::default()),
                        )
                        .map_err(failed)?;
                    let link = FdLink::try_from(program.take_link(id).map_err(failed)?).map_err(
                        |source| AttachError::Link {
                            target: interface.to_owned(),
                            source,
                        },
                    )?;
                    link.pin(pin).map_err(|source| AttachError::Pin {
                        path: pin.to_owned(),
                        source,
                    })?;
                }
                // Switched from netlink mode: the TCX program runs first, the filter goes now.
                remove_netlink_filter_of(interface, hook);
            }
            TcAttachMode::Netlink | TcAttachMode::Auto => {
                // An existing clsact qdisc is fine: ours or another tool's.
                let _ = tc::qdisc_add_clsact(interface);
                let existing = SchedClassifierLink::attached(
                    interface,
                    hook,
                    NETLINK_PRIORITY,
                    NETLINK_HANDLE,
                    None,
                )
                .map_err(|e| failed(aya::programs::ProgramError::IOError(e)))?;
                // Replaces our filter in place when it exists (cls_bpf swaps the program)…
                let id = match program.attach_to_link(existing) {
                    Ok(id) => id,
                    // …and creates it (ENOENT without NLM_F_CREATE) when it does not.
                    Err(_) => program
                        .attach_with_options(
                            interface,
                            hook,
                            TcAttachOptions::Netlink(NlOptions {
                                priority: NETLINK_PRIORITY,
                                handle: NETLINK_HANDLE,
                                classid: None,
                            }),
                        )
                        .map_err(failed)?,
                };
                // The filter must outlive this process (the next proxy replaces it, `cleanup`
                // removes it): take it from the program, whose drop would detach it, and
                // forget it deliberately.
                std::mem::forget(program.take_link(id).map_err(failed)?);
                // Switched from TCX mode: its link goes after the filter is in place.
                unpin(pin)?;
            }
        }
        Ok(())
    }

    /// Removes the programs from `interface` (their pinned links or their filters).
    pub fn detach(&mut self, interface: &str) -> Result<(), AttachError> {
        if let Some(at) = self.interfaces.iter().position(|n| n == interface) {
            self.interfaces.remove(at);
            self.programs.remove(at);
        }
        for (_, prefix) in HOOKS {
            unpin(&tc_link_pin(&self.links, prefix, interface))?;
        }
        // An interface that went away took its filter with it.
        remove_netlink_filter(interface);
        Ok(())
    }

    /// The programs attached to `interface`, if any.
    fn programs_of(&self, interface: &str) -> Option<TcPrograms> {
        let at = self.interfaces.iter().position(|n| n == interface)?;
        Some(self.programs[at])
    }

    /// The links `filter` selects among `present`, each with the program its link layer needs.
    /// An interface no program is for is reported (once) and left out; the others are still
    /// attached.
    fn wanted(&mut self, present: &[Link], filter: &InterfaceFilter) -> Vec<(String, TcPrograms)> {
        let mut wanted = Vec::new();
        for link in present.iter().filter(|link| filter.matches(&link.name)) {
            let layer = LinkLayer::of_hardware_type(link.hardware_type);
            if let Some(program) = layer.tc_programs() {
                wanted.push((link.name.clone(), program));
            } else if !self.skipped.contains(&link.name) {
                tracing::warn!(
                    interface = link.name.as_str(),
                    "link layer {layer:?} is neither Ethernet nor bare IP: no tc program parses \
                     its packets, none is attached"
                );
                self.skipped.push(link.name.clone());
            }
        }
        wanted
    }

    /// Attaches to every current interface `filter` selects (the program of its link layer)
    /// and detaches from those that are gone or no longer selected, including, on the first
    /// call, those an earlier proxy left. Returns the interfaces attached and detached.
    pub fn sync(
        &mut self,
        loaded: &mut Loaded,
        filter: &InterfaceFilter,
    ) -> Result<(Vec<String>, Vec<String>), AttachError> {
        let present = tc_links()?;
        let wanted = self.wanted(&present, filter);
        let wanted_names: Vec<String> = wanted.iter().map(|(n, _)| n.clone()).collect();
        let mut gone: Vec<String> = self
            .interfaces
            .iter()
            .filter(|n| !wanted_names.contains(n))
            .cloned()
            .collect();
        if !self.adopted {
            self.adopted = true;
            let present: Vec<String> = present.into_iter().map(|link| link.name).collect();
            gone.extend(self.left_behind(&present, &wanted_names)?);
        }
        for interface in &gone {
            self.detach(interface)?;
        }
        let mut added = Vec::new();
        for (interface, programs) in wanted {
            // New, or a new link layer under a known name (the interface was replaced).
            if self.programs_of(&interface) != Some(programs) {
                tracing::info!(
                    interface = interface.as_str(),
                    ingress = programs.ingress,
                    egress = programs.egress,
                    "attaching"
                );
                self.attach(loaded, &interface, programs)?;
                added.push(interface);
            }
        }
        Ok((added, gone))
    }

    /// Interfaces an earlier proxy may have attached to that are not wanted now: pinned links of
    /// interfaces gone or deselected, and every present but deselected interface (for a filter).
    fn left_behind(
        &self,
        present: &[String],
        wanted: &[String],
    ) -> Result<Vec<String>, AttachError> {
        let pinned: Vec<String> = match std::fs::read_dir(&self.links) {
            Ok(entries) => entries
                .flatten()
                .filter_map(|e| tc_link_interface(&e.file_name().to_string_lossy()))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(AttachError::LinksDir {
                    path: self.links.clone(),
                    source,
                });
            }
        };
        let mut left: Vec<String> = pinned.into_iter().filter(|n| !wanted.contains(n)).collect();
        // Our filter may be on any present interface (netlink mode, or before a switch to TCX).
        let unpinned: Vec<String> = present
            .iter()
            .filter(|n| !wanted.contains(n) && !left.contains(n))
            .cloned()
            .collect();
        left.extend(unpinned);
        Ok(left)
    }
}

/// Replaces the program of the TCX link pinned at `pin` (`bpf_link_update`: atomic). `false`
/// when there is no usable link: none pinned, or one whose interface is gone (the kernel
/// answers ENOLINK), whose stale pin is then removed.
fn replace_pinned_tcx(
    program: &mut SchedClassifier,
    name: &'static str,
    pin: &Path,
    interface: &str,
) -> Result<bool, AttachError> {
    let pinned = match PinnedLink::from_pin(pin) {
        Ok(pinned) => pinned,
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(false);
        }
        Err(source) => {
            return Err(AttachError::Link {
                target: interface.to_owned(),
                source,
            });
        }
    };
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
        AttachError::Link {
            target: interface.to_owned(),
            source,
        }
    })?;
    match program.attach_to_link(link) {
        Ok(id) => {
            // The pin holds the link; the descriptor this process got can go.
            let taken = program
                .take_link(id)
                .map_err(|source| AttachError::Attach {
                    program: name,
                    interface: interface.to_owned(),
                    source,
                })?;
            drop(FdLink::try_from(taken));
            Ok(true)
        }
        Err(error) => {
            tracing::info!(interface, %error, "the pinned tc link is stale: attaching anew");
            unpin(pin)?;
            Ok(false)
        }
    }
}

/// The cgroup2 mount point of this process's mount namespace (from /proc/self/mountinfo, as
/// procfs-core parses it).
pub fn cgroup2_root() -> Result<PathBuf, AttachError> {
    let mounts = MountInfos::from_file("/proc/self/mountinfo").map_err(AttachError::MountInfo)?;
    mounts
        .into_iter()
        .find(|mount| mount.fs_type == "cgroup2")
        .map(|mount| mount.mount_point)
        .ok_or(AttachError::NoCgroup2Mount)
}

/// Attaches the sock_addr programs to the cgroup at `path` with BPF links (Linux ≥ 5.7), which
/// always coexist with other programs on the same cgroup (the kernel rejects attach flags on
/// cgroup links, hence `Single`, i.e. no flags). Each link is pinned under `links/` and outlives
/// the process.
///
/// aya cannot update a cgroup link's program in place, so a restart attaches the new link and
/// then renames its pin over the old one, whose link goes with it. For that moment both
/// programs run; that is harmless: the second hook sees the backend address the first one
/// wrote and leaves it alone.
pub fn attach_socket_hooks(loaded: &mut Loaded, path: &Path) -> Result<(), AttachError> {
    let cgroup = std::fs::File::open(path).map_err(|source| AttachError::OpenCgroup {
        path: path.to_owned(),
        source,
    })?;
    let links = links_dir(&loaded.pin_path);
    std::fs::create_dir_all(&links).map_err(|source| AttachError::LinksDir {
        path: links.clone(),
        source,
    })?;
    for name in SOCK_ADDR_PROGRAMS {
        let failed = |source| AttachError::AttachCgroup {
            program: name,
            path: path.to_owned(),
            source,
        };
        let program: &mut CgroupSockAddr = loaded
            .ebpf
            .program_mut(name)
            .ok_or(AttachError::NoProgram(name))?
            .try_into()
            .map_err(|source| AttachError::Program {
                program: name,
                source,
            })?;
        let id = program
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(failed)?;
        let link = FdLink::try_from(program.take_link(id).map_err(failed)?).map_err(|source| {
            AttachError::Link {
                target: path.display().to_string(),
                source,
            }
        })?;
        let pin = links.join(format!("cgroup-{name}"));
        let fresh = links.join(format!("new-cgroup-{name}"));
        unpin(&fresh)?;
        link.pin(&fresh).map_err(|source| AttachError::Pin {
            path: fresh.clone(),
            source,
        })?;
        std::fs::rename(&fresh, &pin).map_err(|source| AttachError::Unpin {
            path: pin.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_link_pins_name_their_interface() {
        for interface in ["eth0", "eth0.100", "a%2eb", "veth.%"] {
            for (_, prefix) in HOOKS {
                let pin = tc_link_pin(Path::new("/links"), prefix, interface);
                let name = pin.file_name().unwrap().to_str().unwrap();
                assert!(!name.contains('.'), "{name}: bpffs refuses dots");
                assert_eq!(tc_link_interface(name).as_deref(), Some(interface));
            }
        }
        assert_eq!(tc_link_interface("cgroup-sock_connect4"), None);
    }

    #[test]
    fn link_layers_pick_their_program() {
        let ethernet = Some(TcPrograms {
            ingress: TC_INGRESS,
            egress: TC_EGRESS,
        });
        let bare_ip = Some(TcPrograms {
            ingress: TC_INGRESS_L3,
            egress: TC_EGRESS_L3,
        });
        let cases: &[(u16, Option<TcPrograms>)] = &[
            (libc::ARPHRD_ETHER, ethernet),
            // tun, WireGuard
            (libc::ARPHRD_NONE, bare_ip),
            // ipip, ip6tnl, sit, gre, ip6gre (823), rmnet (raw IP, 519), ppp
            (libc::ARPHRD_TUNNEL, bare_ip),
            (libc::ARPHRD_TUNNEL6, bare_ip),
            (libc::ARPHRD_SIT, bare_ip),
            (libc::ARPHRD_IPGRE, bare_ip),
            (823, bare_ip),
            (519, bare_ip),
            (libc::ARPHRD_PPP, bare_ip),
            (libc::ARPHRD_INFINIBAND, None),
            (libc::ARPHRD_CAN, None),
            (libc::ARPHRD_LOOPBACK, None),
        ];
        for (hardware_type, program) in cases {
            assert_eq!(
                LinkLayer::of_hardware_type(LinkLayerType::from(*hardware_type)).tc_programs(),
                *program,
                "ARPHRD {hardware_type}"
            );
        }
    }

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
            ("veth?", "veth1", true),
            ("veth?", "veth12", false),
            ("eth[01]", "eth1", true),
        ];
        for (patterns, name, expected) in cases {
            assert_eq!(
                InterfaceFilter::parse(patterns).unwrap().matches(name),
                *expected,
                "{patterns:?} on {name}"
            );
        }
        let error = InterfaceFilter::parse("eth*,!veth[")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("--interfaces pattern \"!veth[\""),
            "{error}"
        );
    }
}
