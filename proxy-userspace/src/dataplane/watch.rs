//! Interface watching: a NETLINK_ROUTE socket subscribed to link notifications. A message means
//! "interfaces changed": the caller then re-lists interfaces and syncs its attachments, which
//! keeps the netlink side free of message parsing and can never miss a state (a resync is
//! always complete).

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("opening a NETLINK_ROUTE socket for link events: {0}")]
    Socket(std::io::Error),
    #[error("setting net.ipv4.conf.all.accept_local: {0}")]
    Sysctl(std::io::Error),
    #[error("reading the cookie of this network namespace (SO_NETNS_COOKIE): {0}")]
    NetnsCookie(std::io::Error),
}

/// Subscribed to RTMGRP_LINK in the network namespace it was created in.
pub struct LinkWatcher {
    fd: OwnedFd,
}

impl LinkWatcher {
    pub fn new() -> Result<Self, WatchError> {
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
        addr.nl_groups = libc::RTMGRP_LINK as u32;
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

/// Lets the IPv4 stack of this network namespace accept packets whose source is one of its own
/// addresses. A masqueraded packet leaves tc ingress with the node address as its source and
/// must then be forwarded to the backend; without `accept_local` the kernel drops it as a
/// martian. (IPv6 has no such check.) Like kube-proxy's own sysctls (route_localnet), this is
/// set by the proxy for the namespace it runs in, and like kube-proxy's `ensureSysctl` it is
/// written only when it differs. An unprivileged container sees /proc/sys read-only: the
/// DaemonSet then mounts the host's /proc/sys/net at /host/proc/sys/net (Cilium's layout), which
/// is written instead. Net sysctls act on the network namespace of the writer, here the host's.
pub fn accept_local_sources() -> Result<(), WatchError> {
    ensure_sysctl(
        &[
            Path::new("/proc/sys/net/ipv4/conf/all/accept_local"),
            Path::new("/host/proc/sys/net/ipv4/conf/all/accept_local"),
        ],
        "1",
    )
}

/// Sets the sysctl file to `value` unless it already holds it, through the first of `paths`
/// that can be written (the others are mounts of the same setting). The error is the first
/// path's.
fn ensure_sysctl(paths: &[&Path], value: &str) -> Result<(), WatchError> {
    let mut first_error = None;
    for path in paths {
        if std::fs::read_to_string(path).is_ok_and(|current| current.trim() == value) {
            return Ok(());
        }
        match std::fs::write(path, value) {
            Ok(()) => return Ok(()),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    Err(WatchError::Sysctl(first_error.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no sysctl path")
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_sysctl_reads_first_then_writes_the_first_writable_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/accept_local");
        let mounted = dir.path().join("accept_local");
        std::fs::write(&mounted, "0\n").unwrap();
        ensure_sysctl(&[&missing, &mounted], "1").unwrap();
        assert_eq!(std::fs::read_to_string(&mounted).unwrap(), "1");
        // Already set: read, not written (a directory cannot be written, but can be skipped).
        std::fs::write(&mounted, "1\n").unwrap();
        ensure_sysctl(&[&mounted, dir.path()], "1").unwrap();
        assert_eq!(
            std::fs::read_to_string(&mounted).unwrap(),
            "1\n",
            "left as it was"
        );
        let error = ensure_sysctl(&[&missing], "1").unwrap_err();
        assert!(error.to_string().contains("accept_local"), "{error}");
    }
}
