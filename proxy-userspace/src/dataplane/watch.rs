//! Interfaces and addresses over rtnetlink (netlink-sys sockets, netlink-packet-route messages):
//! listing the links of this network namespace with their link layer, and watching link (or
//! address) notifications. A notification means "interfaces (addresses) changed": the caller
//! then re-lists them and resyncs, which keeps the watching side free of message parsing and
//! can never miss a state (a resync is always complete). Not rtnetlink's async handle: the
//! attach path that lists links is synchronous, and the watchers need no parsed messages.

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{AsyncSocket as _, AsyncSocketExt as _, Socket, SocketAddr, TokioSocket};
use std::os::fd::AsRawFd as _;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("opening a NETLINK_ROUTE socket for link or address events: {0}")]
    Socket(std::io::Error),
    #[error("listing the links of this network namespace (RTM_GETLINK dump): {0}")]
    ListLinks(std::io::Error),
    #[error("reading the cookie of this network namespace (SO_NETNS_COOKIE): {0}")]
    NetnsCookie(std::io::Error),
}

/// An interface of the current network namespace, as rtnetlink lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    /// Its hardware type (`ARPHRD_*`): what its packets start with.
    pub hardware_type: LinkLayerType,
}

/// Every link of the current network namespace (one RTM_GETLINK dump), in the kernel's order.
/// Asked over netlink, not sysfs, because a process moved into a namespace with `nsenter --net`
/// still sees the sysfs of the namespace it came from.
pub fn list_links() -> Result<Vec<Link>, WatchError> {
    let failed = WatchError::ListLinks;
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(failed)?;
    socket.bind_auto().map_err(failed)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(failed)?;
    let mut request = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    request.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0).map_err(failed)?;
    let mut links = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full().map_err(failed)?;
        let mut rest = datagram.as_slice();
        while !rest.is_empty() {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                .map_err(|e| failed(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(links),
                NetlinkPayload::Error(error) => return Err(failed(error.to_io())),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    let name = link
                        .attributes
                        .iter()
                        .find_map(|attribute| match attribute {
                            LinkAttribute::IfName(name) => Some(name.clone()),
                            _ => None,
                        });
                    if let Some(name) = name {
                        links.push(Link {
                            name,
                            index: link.header.index,
                            hardware_type: link.header.link_layer_type,
                        });
                    }
                }
                _ => {}
            }
            // Messages in a datagram are 4-byte aligned (NLMSG_ALIGN).
            let length = (message.header.length as usize).next_multiple_of(4);
            if length == 0 {
                break;
            }
            rest = rest.get(length..).unwrap_or_default();
        }
    }
}

/// Subscribed to RTMGRP_LINK (or the address groups) in the network namespace it was created
/// in.
pub struct LinkWatcher {
    socket: TokioSocket,
}

impl LinkWatcher {
    /// Link events: interfaces added, removed, renamed, up or down.
    pub fn new() -> Result<Self, WatchError> {
        Self::subscribe(libc::RTMGRP_LINK as u32)
    }

    /// IPv4 and IPv6 address events: an address added to or removed from an interface.
    pub fn addresses() -> Result<Self, WatchError> {
        Self::subscribe((libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32)
    }

    fn subscribe(groups: u32) -> Result<Self, WatchError> {
        let mut socket = TokioSocket::new(NETLINK_ROUTE).map_err(WatchError::Socket)?;
        socket
            .socket_mut()
            .bind(&SocketAddr::new(0, groups))
            .map_err(WatchError::Socket)?;
        Ok(Self { socket })
    }

    /// Turns the events into wakeups on the returned channel, from a task of the current tokio
    /// runtime that ends when the receiver is dropped. The channel holds one wakeup: a burst of
    /// changes costs one resync.
    pub fn spawn(self) -> tokio::sync::mpsc::Receiver<()> {
        let (wakeups, receiver) = tokio::sync::mpsc::channel::<()>(1);
        tokio::spawn(async move {
            // Only that a message came matters: a longer one is cut, unread.
            let mut buf = Vec::with_capacity(16 * 1024);
            loop {
                buf.clear();
                let received = tokio::select! {
                    () = wakeups.closed() => break,
                    received = self.socket.recv(&mut buf) => received,
                };
                match received {
                    Ok(()) => {}
                    // Overrun: events were lost, a resync covers them.
                    Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {}
                    Err(error) => {
                        tracing::error!(%error, "netlink watcher stopped");
                        break;
                    }
                }
                // A full channel already holds a wakeup: the sync will see this change too.
                if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) =
                    wakeups.try_send(())
                {
                    break;
                }
            }
        });
        receiver
    }
}

/// The cookie of the current network namespace, as `bpf_get_netns_cookie` reports it to the
/// socket hooks (`SO_NETNS_COOKIE`, Linux ≥ 5.14).
/// Kept as a raw getsockopt: neither nix nor socket2 has `SO_NETNS_COOKIE`.
pub fn netns_cookie() -> Result<u64, WatchError> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .map_err(WatchError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is writable for `len` bytes.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if ret < 0 {
        return Err(WatchError::NetnsCookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}
