//! How the lab's nodes reach each other's pods (and the single-node lab's client reaches its
//! node), chosen by the environment variable [`NODE_LINK_VAR`]:
//! - unset, empty or `direct`: plain routes over the shared Ethernet link;
//! - `ipip`: through the kernel's IP-in-IP tunnel devices inside the namespaces, as Calico's
//!   IPIP mode connects nodes: an `ipip` device for IPv4 and a `sit` device for IPv6 (both
//!   encapsulate in IPv4). Needs a kernel with `CONFIG_NET_IPIP` and `CONFIG_IPV6_SIT`;
//! - `tun`: through a tun device in each namespace and a relay copying packets between them
//!   ([`TunRelay`]), as userspace VPNs (wireguard-go, OpenVPN) connect hosts. Any kernel with
//!   `CONFIG_TUN` has it.
//!
//! With a tunnel, what crosses it arrives on a layer-3 device (its packets carry no link-layer
//! header), the pods get the tunnel's MTU (as the CNI gives them), and in the single-node lab the
//! client's link becomes such a tunnel too. `cargo xtask test` runs the Service suites once more
//! through a tunnel.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use nix::libc;

use crate::{LabError, Netns, Result, veth};

/// The environment variable choosing the link between the test nodes.
pub const NODE_LINK_VAR: &str = "PROXY_LAB_NODE_LINK";

/// The tunnel devices made in each namespace (names are per namespace): `ipip` (IPv4), `sit`
/// (IPv6), or one tun device for both.
pub const IPIP_DEVICE: &str = "kipip0";
pub const SIT_DEVICE: &str = "ksit0";
pub const TUN_DEVICE: &str = "ktun0";
/// The tunnels' MTU: an Ethernet MTU less an outer IPv4 header.
pub const TUNNEL_MTU: u32 = 1480;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NodeLink {
    #[default]
    Direct,
    Ipip,
    Tun,
}

impl NodeLink {
    /// The link [`NODE_LINK_VAR`] asks for.
    pub fn from_env() -> Result<NodeLink> {
        Self::parse(&std::env::var(NODE_LINK_VAR).unwrap_or_default())
    }

    pub fn parse(text: &str) -> Result<NodeLink> {
        match text.trim() {
            "" | "direct" => Ok(NodeLink::Direct),
            "ipip" => Ok(NodeLink::Ipip),
            "tun" => Ok(NodeLink::Tun),
            other => Err(LabError::Config(format!(
                "{NODE_LINK_VAR}: unknown node link {other:?} (direct, ipip, tun)"
            ))),
        }
    }

    /// The tunnel this kernel can make: `Ipip` when it has IP-in-IP and SIT devices (tried in a
    /// namespace of its own), else `Tun`.
    pub fn kernel_tunnel() -> Result<NodeLink> {
        let probe = Netns::new("probe")?;
        let made = [(IPIP_DEVICE, "ipip"), (SIT_DEVICE, "sit")]
            .iter()
            .all(|(device, kind)| probe.ip(&["link", "add", device, "type", kind]).is_ok());
        Ok(if made { NodeLink::Ipip } else { NodeLink::Tun })
    }

    /// The name [`NodeLink::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            NodeLink::Direct => "direct",
            NodeLink::Ipip => "ipip",
            NodeLink::Tun => "tun",
        }
    }

    /// The MTU a pod's interface gets (`None`: the default).
    pub fn pod_mtu(self) -> Option<u32> {
        (self != NodeLink::Direct).then_some(TUNNEL_MTU)
    }

    /// Makes the tunnel between `a` and `b`, whose IPv4 addresses on a link they share are
    /// `underlay` (nothing for `Direct`). The tunnel lasts as long as the returned guard (and
    /// the namespaces).
    pub fn tunnel(self, a: &Netns, b: &Netns, underlay: [Ipv4Addr; 2]) -> Result<Tunnel> {
        let relay = match self {
            NodeLink::Direct => None,
            NodeLink::Ipip => {
                for (i, ns) in [a, b].into_iter().enumerate() {
                    let (local, remote) = (underlay[i].to_string(), underlay[1 - i].to_string());
                    for (device, kind) in [(IPIP_DEVICE, "ipip"), (SIT_DEVICE, "sit")] {
                        ns.ip(&[
                            "link", "add", device, "type", kind, "local", &local, "remote", &remote,
                        ])?;
                        set_up(ns, device)?;
                    }
                }
                None
            }
            NodeLink::Tun => {
                let relay = TunRelay::start([a, b])?;
                for ns in [a, b] {
                    set_up(ns, TUN_DEVICE)?;
                }
                Some(relay)
            }
        };
        Ok(Tunnel { _relay: relay })
    }

    /// The tunnel device carrying `family_v6`'s packets (`None` for `Direct`).
    pub fn device(self, family_v6: bool) -> Option<&'static str> {
        match self {
            NodeLink::Direct => None,
            NodeLink::Ipip if family_v6 => Some(SIT_DEVICE),
            NodeLink::Ipip => Some(IPIP_DEVICE),
            NodeLink::Tun => Some(TUN_DEVICE),
        }
    }

    /// Makes `ns` route `dst` (a CIDR) to its peer: via the peer's address `peer` on their
    /// shared link, or into the tunnel.
    pub fn route(self, ns: &Netns, dst: &str, peer: IpAddr) -> Result<()> {
        let family = if peer.is_ipv6() { "-6" } else { "-4" };
        match self.device(peer.is_ipv6()) {
            None => ns.ip(&[family, "route", "add", dst, "via", &peer.to_string()])?,
            Some(device) => ns.ip(&[family, "route", "add", dst, "dev", device])?,
        };
        Ok(())
    }

    /// Connects `a` and `b` with the addresses `a_addrs` and `b_addrs` (`"10.0.0.1/24"` form,
    /// as [`veth`] takes them): a veth pair holding them, or a veth pair holding only underlay
    /// addresses and a tunnel over it holding them, so that all traffic between those
    /// addresses crosses a layer-3 device.
    pub fn connect(
        self,
        a: &Netns,
        a_if: &str,
        a_addrs: &[&str],
        b: &Netns,
        b_if: &str,
        b_addrs: &[&str],
    ) -> Result<Tunnel> {
        if self == NodeLink::Direct {
            veth(a, a_if, a_addrs, b, b_if, b_addrs)?;
            return Ok(Tunnel { _relay: None });
        }
        let underlay = |i: usize| format!("{}/30", UNDERLAY[i]);
        veth(a, a_if, &[&underlay(0)], b, b_if, &[&underlay(1)])?;
        let tunnel = self.tunnel(a, b, UNDERLAY)?;
        for (ns, addrs) in [(a, a_addrs), (b, b_addrs)] {
            for addr in addrs {
                let device = self.device(addr.contains(':')).expect("a tunnel");
                ns.ip(&["addr", "add", addr, "dev", device, "nodad"])?;
            }
        }
        Ok(tunnel)
    }
}

/// The underlay addresses of [`NodeLink::connect`]'s tunnels: a /30 on the veth pair.
const UNDERLAY: [Ipv4Addr; 2] = [Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2)];

fn set_up(ns: &Netns, device: &str) -> Result<()> {
    ns.ip(&["link", "set", device, "mtu", &TUNNEL_MTU.to_string(), "up"])
        .map(drop)
}

/// Keeps a tunnel's relay running (kernel tunnels go with their namespaces).
pub struct Tunnel {
    _relay: Option<TunRelay>,
}

/// A tun device ([`TUN_DEVICE`]) in each of two namespaces and two threads copying each one's
/// outgoing packets into the other: a point-to-point layer-3 link. Stopped and joined on drop;
/// the devices go with their descriptors.
pub struct TunRelay {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// How long a relay thread waits for a packet before looking at its stop flag.
const RELAY_POLL_MS: i32 = 100;

impl TunRelay {
    pub fn start(namespaces: [&Netns; 2]) -> Result<Self> {
        let ends = [
            Arc::new(open_tun(namespaces[0])?),
            Arc::new(open_tun(namespaces[1])?),
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let threads = [(0, 1), (1, 0)]
            .into_iter()
            .map(|(from, to)| {
                let (from, to, stop) = (ends[from].clone(), ends[to].clone(), stop.clone());
                std::thread::spawn(move || relay(&from, &to, &stop))
            })
            .collect();
        Ok(Self { stop, threads })
    }
}

impl Drop for TunRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Creates [`TUN_DEVICE`] in `ns` (`IFF_TUN | IFF_NO_PI`: bare IP packets, no header) and
/// returns its queue's descriptor.
fn open_tun(ns: &Netns) -> Result<OwnedFd> {
    let name = ns.name().to_owned();
    ns.enter(move || {
        let path = c"/dev/net/tun";
        // SAFETY: plain open(2); the result is checked and owned right away.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero ifreq is valid; the name is shorter than IFNAMSIZ and stays
        // NUL-terminated; TUNSETIFF reads the ifreq only.
        let set = unsafe {
            let mut request: libc::ifreq = std::mem::zeroed();
            for (dst, src) in request.ifr_name.iter_mut().zip(TUN_DEVICE.bytes()) {
                *dst = libc::c_char::from_ne_bytes([src]);
            }
            request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
            libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw const request)
        };
        if set < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    })?
    .map_err(|source| LabError::Io {
        path: format!("/dev/net/tun ({TUN_DEVICE} in {name})").into(),
        source,
    })
}

/// Copies the packets `from`'s device sends into `to`'s device until `stop` is set or a
/// descriptor fails (its device is gone with its namespace).
fn relay(from: &OwnedFd, to: &OwnedFd, stop: &AtomicBool) {
    let mut packet = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let mut poll = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&raw mut poll, 1, RELAY_POLL_MS) };
        if ready == 0 || (ready < 0 && last_errno() == libc::EINTR) {
            continue;
        }
        if ready < 0 || poll.revents & libc::POLLIN == 0 {
            return;
        }
        // SAFETY: reads at most the buffer's length into it.
        let read =
            unsafe { libc::read(from.as_raw_fd(), packet.as_mut_ptr().cast(), packet.len()) };
        let Ok(len) = usize::try_from(read) else {
            return;
        };
        // A write the peer device refuses (it is down) loses the packet, as a link would.
        // SAFETY: writes `len` bytes the read filled.
        unsafe { libc::write(to.as_raw_fd(), packet.as_ptr().cast(), len) };
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_variable() {
        assert_eq!(NodeLink::parse("").unwrap(), NodeLink::Direct);
        assert_eq!(NodeLink::parse("direct").unwrap(), NodeLink::Direct);
        assert_eq!(NodeLink::parse(" ipip ").unwrap(), NodeLink::Ipip);
        assert_eq!(NodeLink::parse("tun").unwrap(), NodeLink::Tun);
        assert!(NodeLink::parse("vxlan").is_err());
        for link in [NodeLink::Direct, NodeLink::Ipip, NodeLink::Tun] {
            assert_eq!(NodeLink::parse(link.name()).unwrap(), link);
        }
    }
}
