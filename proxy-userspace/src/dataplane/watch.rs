//! Interface and address watching: a NETLINK_ROUTE socket subscribed to link (or address)
//! notifications. A message means "interfaces (addresses) changed": the caller then re-lists
//! them and resyncs, which keeps the netlink side free of message parsing and can never miss a
//! state (a resync is always complete).

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("opening a NETLINK_ROUTE socket for link or address events: {0}")]
    Socket(std::io::Error),
    #[error("reading the cookie of this network namespace (SO_NETNS_COOKIE): {0}")]
    NetnsCookie(std::io::Error),
}

/// Subscribed to RTMGRP_LINK (or the address groups) in the network namespace it was created
/// in.
pub struct LinkWatcher {
    fd: OwnedFd,
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
        // SAFETY: plain socket(2); the result is checked and owned right away.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(WatchError::Socket(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a zeroed sockaddr_nl is valid; we fill in family and groups.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = groups;
        // SAFETY: `addr` is a valid sockaddr_nl of the length passed.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if bound < 0 {
            return Err(WatchError::Socket(std::io::Error::last_os_error()));
        }
        Ok(Self { fd })
    }

    /// Waits up to `timeout` for link events; returns whether any arrived (all pending ones
    /// are consumed, so a burst of changes costs one resync).
    pub fn wait(&self, timeout: Duration) -> Result<bool, WatchError> {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&raw mut poll, 1, millis) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(WatchError::Socket(error));
        }
        if ready == 0 {
            return Ok(false);
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                // EAGAIN: drained. ENOBUFS (overrun): events were lost, a resync covers them.
                return Ok(true);
            }
        }
    }
}

/// The cookie of the current network namespace, as `bpf_get_netns_cookie` reports it to the
/// socket hooks (`SO_NETNS_COOKIE`, Linux ≥ 5.14).
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
