//! SCTP associations over raw sockets, for kernels without SCTP (`CONFIG_IP_SCTP` unset, as on
//! the machines the tests run on): the peers speak the protocol themselves, the four-way
//! handshake (INIT, INIT ACK, COOKIE ECHO, COOKIE ACK) and one DATA exchange acknowledged by
//! SACK, and check every CRC32c they receive the way a receiving stack does. Packets pass
//! through the namespaces' real routing and the proxy's real programs.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use proxy_common::crc32c::{SCTP_CHECKSUM_OFF, sctp_checksum, set_sctp_checksum};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{LabError, Netns, Result};

const IPPROTO_SCTP: i32 = 132;
const DATA: u8 = 0;
const INIT: u8 = 1;
const INIT_ACK: u8 = 2;
const SACK: u8 = 3;
const COOKIE_ECHO: u8 = 10;
const COOKIE_ACK: u8 = 11;
/// The server's verification tag (any nonzero value) and state cookie.
const SERVER_TAG: u32 = 0x5e7c_0001;
const COOKIE: &[u8] = b"kep-cookie";
/// The State Cookie parameter of INIT ACK.
const STATE_COOKIE: u16 = 7;

/// One received SCTP packet, its CRC32c already checked.
struct Packet {
    peer: IpAddr,
    sport: u16,
    dport: u16,
    tag: u32,
    chunk: u8,
    /// The first chunk's value (after its 4-byte header, without padding).
    value: Vec<u8>,
}

/// A raw SCTP socket of `family`'s address.
fn raw_socket(ip: IpAddr) -> std::io::Result<Socket> {
    let domain = if ip.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    Socket::new(domain, Type::RAW, Some(Protocol::from(IPPROTO_SCTP)))
}

/// Builds an SCTP packet with one chunk and a valid CRC32c.
fn build(sport: u16, dport: u16, tag: u32, chunk: u8, flags: u8, value: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(16 + value.len() + 3);
    packet.extend_from_slice(&sport.to_be_bytes());
    packet.extend_from_slice(&dport.to_be_bytes());
    packet.extend_from_slice(&tag.to_be_bytes());
    packet.extend_from_slice(&[0; 4]);
    packet.extend_from_slice(&[chunk, flags]);
    packet.extend_from_slice(
        &u16::try_from(4 + value.len())
            .expect("small chunk")
            .to_be_bytes(),
    );
    packet.extend_from_slice(value);
    packet.resize(packet.len().next_multiple_of(4), 0);
    set_sctp_checksum(&mut packet);
    packet
}

/// INIT and INIT ACK fields: initiate tag, a_rwnd, streams out and in, initial TSN.
fn init_value(tag: u32) -> Vec<u8> {
    let mut value = tag.to_be_bytes().to_vec();
    value.extend_from_slice(&65_535u32.to_be_bytes());
    value.extend_from_slice(&1u16.to_be_bytes());
    value.extend_from_slice(&1u16.to_be_bytes());
    value.extend_from_slice(&1u32.to_be_bytes());
    value
}

/// A DATA chunk's value: TSN, stream 0, sequence 0, PPID 0, `payload`.
fn data_value(tsn: u32, payload: &[u8]) -> Vec<u8> {
    let mut value = tsn.to_be_bytes().to_vec();
    value.extend_from_slice(&[0; 8]);
    value.extend_from_slice(payload);
    value
}

/// Receives the next SCTP packet (until `deadline`). A packet whose CRC32c is wrong is an
/// `InvalidData` error: a real stack would discard it, so the exchange would fail.
fn receive(socket: &Socket, deadline: Instant) -> std::io::Result<Packet> {
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    let timeout = deadline.saturating_duration_since(Instant::now());
    if timeout.is_zero() {
        return Err(std::io::ErrorKind::TimedOut.into());
    }
    socket.set_read_timeout(Some(timeout))?;
    let (len, from) = socket.recv_from(&mut buf)?;
    // SAFETY: recv_from initialised the first `len` bytes.
    let bytes: Vec<u8> = buf[..len]
        .iter()
        .map(|b| unsafe { b.assume_init() })
        .collect();
    let peer = from
        .as_socket()
        .map(|a| a.ip())
        .ok_or_else(|| std::io::Error::other("raw socket peer is not an IP address"))?;
    // IPv4 raw sockets receive the IP header, IPv6 ones do not.
    let sctp = if peer.is_ipv4() {
        let ihl = usize::from(bytes.first().copied().unwrap_or(0) & 0x0f) * 4;
        bytes.get(ihl..).unwrap_or_default()
    } else {
        &bytes[..]
    };
    if sctp.len() < 16 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("short SCTP packet from {peer}"),
        ));
    }
    let stored = &sctp[SCTP_CHECKSUM_OFF..SCTP_CHECKSUM_OFF + 4];
    if stored != sctp_checksum(sctp) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("SCTP packet from {peer} with a wrong CRC32c"),
        ));
    }
    let be16 = |at: usize| u16::from_be_bytes([sctp[at], sctp[at + 1]]);
    let chunk_len = usize::from(be16(14)).clamp(4, sctp.len() - 12);
    Ok(Packet {
        peer,
        sport: be16(0),
        dport: be16(2),
        tag: u32::from_be_bytes([sctp[4], sctp[5], sctp[6], sctp[7]]),
        chunk: sctp[12],
        value: sctp[16..12 + chunk_len].to_vec(),
    })
}

fn send(socket: &Socket, to: IpAddr, packet: &[u8]) -> std::io::Result<()> {
    // Raw sockets take no port: the SCTP header carries them.
    socket
        .send_to(packet, &SocketAddr::new(to, 0).into())
        .map(drop)
}

/// An SCTP server in a namespace, on `port` of every IPv4 and IPv6 address. It answers an
/// association's first DATA chunk with a DATA chunk `"NAME PEER_IP"`, like the echo servers.
/// Stopped and joined on drop.
pub struct SctpServer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

const SERVER_POLL: Duration = Duration::from_millis(50);

impl SctpServer {
    /// Serves inside `ns` (the threads enter it).
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<Self> {
        Self::start_with(
            name,
            port,
            &format!("SCTP port {port} in {}", ns.name()),
            |serve| ns.spawn(serve),
        )
    }

    /// Serves in the calling thread's namespace (the lab's pod server runs inside its pod).
    pub fn start_here(name: &str, port: u16) -> Result<Self> {
        Self::start_with(name, port, &format!("SCTP port {port}"), |serve| {
            Ok(std::thread::spawn(serve))
        })
    }

    fn start_with(
        name: &str,
        port: u16,
        place: &str,
        spawn: impl Fn(Box<dyn FnOnce() + Send>) -> Result<std::thread::JoinHandle<()>>,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<std::io::Result<()>>();
        let mut threads = Vec::new();
        for family in [IpAddr::from([0u8; 4]), IpAddr::from([0u16; 8])] {
            let (stop, name, ready) = (stop.clone(), name.to_owned(), ready_tx.clone());
            threads.push(spawn(Box::new(move || {
                serve(family, &name, port, &stop, &ready);
            }))?);
        }
        let server = Self { stop, threads };
        for _ in 0..2 {
            let started = ready_rx
                .recv_timeout(Duration::from_secs(5))
                .map_err(|_| LabError::Proxy(format!("SCTP server {name} did not start")))?;
            started.map_err(|source| LabError::Io {
                path: place.into(),
                source,
            })?;
        }
        Ok(server)
    }
}

/// One family's server loop, until `stop`.
fn serve(
    family: IpAddr,
    name: &str,
    port: u16,
    stop: &AtomicBool,
    ready: &mpsc::Sender<std::io::Result<()>>,
) {
    let socket = match raw_socket(family) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut associations = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok(packet) = receive(&socket, Instant::now() + SERVER_POLL) else {
            continue;
        };
        if packet.dport == port {
            let _ = answer(&socket, name, port, &packet, &mut associations);
        }
    }
}

impl Drop for SctpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The server's side of an association, one packet at a time. The State Cookie carries the
/// client's tag, as a real stack's carries its whole state; established associations are
/// remembered by (peer, port) with that tag.
fn answer(
    socket: &Socket,
    name: &str,
    port: u16,
    packet: &Packet,
    associations: &mut HashMap<(IpAddr, u16), u32>,
) -> std::io::Result<()> {
    let reply = |tag: u32, chunk: u8, flags: u8, value: &[u8]| {
        send(
            socket,
            packet.peer,
            &build(port, packet.sport, tag, chunk, flags, value),
        )
    };
    let word = |bytes: &[u8]| -> Option<u32> {
        Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
    };
    match packet.chunk {
        INIT if packet.tag == 0 => {
            let Some(client_tag) = word(&packet.value) else {
                return Ok(());
            };
            let mut cookie = COOKIE.to_vec();
            cookie.extend_from_slice(&client_tag.to_be_bytes());
            let mut value = init_value(SERVER_TAG);
            value.extend_from_slice(&STATE_COOKIE.to_be_bytes());
            value.extend_from_slice(
                &u16::try_from(4 + cookie.len())
                    .expect("small")
                    .to_be_bytes(),
            );
            value.extend_from_slice(&cookie);
            reply(client_tag, INIT_ACK, 0, &value)
        }
        COOKIE_ECHO if packet.tag == SERVER_TAG => {
            let Some(client_tag) = packet.value.strip_prefix(COOKIE).and_then(word) else {
                return Ok(());
            };
            associations.insert((packet.peer, packet.sport), client_tag);
            reply(client_tag, COOKIE_ACK, 0, &[])
        }
        DATA if packet.tag == SERVER_TAG => {
            let Some(&client_tag) = associations.get(&(packet.peer, packet.sport)) else {
                return Ok(());
            };
            let Some(tsn) = word(&packet.value) else {
                return Ok(());
            };
            let mut sack = tsn.to_be_bytes().to_vec();
            sack.extend_from_slice(&65_535u32.to_be_bytes());
            sack.extend_from_slice(&[0; 4]);
            reply(client_tag, SACK, 0, &sack)?;
            let line = format!("{name} {}", packet.peer.to_canonical());
            reply(client_tag, DATA, 0x03, &data_value(1, line.as_bytes()))
        }
        _ => Ok(()),
    }
}

/// The State Cookie parameter's value in an INIT ACK's value.
fn state_cookie(init_ack: &[u8]) -> Option<&[u8]> {
    let mut params = init_ack.get(16..)?;
    while params.len() >= 4 {
        let kind = u16::from_be_bytes([params[0], params[1]]);
        let len = usize::from(u16::from_be_bytes([params[2], params[3]]));
        let value = params.get(4..len)?;
        if kind == STATE_COOKIE {
            return Some(value);
        }
        params = params.get(len.next_multiple_of(4)..)?;
    }
    None
}

/// Source ports for client associations: distinct across the associations of one process,
/// and (from its process id) likely distinct from another process's.
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

fn next_port() -> u16 {
    const FIRST: u16 = 41_000;
    const SPAN: u16 = 20_000;
    let start = FIRST + (std::process::id() % u32::from(SPAN)) as u16;
    let _ = NEXT_PORT.compare_exchange(0, start, Ordering::Relaxed, Ordering::Relaxed);
    let port = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    FIRST + (port - FIRST) % SPAN
}

/// One SCTP association with an [`SctpServer`] from inside `ns` through `target` (see
/// [`sctp_exchange`]).
pub fn sctp_request(
    ns: &Netns,
    target: SocketAddr,
    timeout: Duration,
) -> Result<std::io::Result<String>> {
    ns.enter(move || sctp_exchange(target, timeout))
}

/// One SCTP association with an [`SctpServer`] through `target`, from the calling thread's
/// namespace and a fresh source port: the server's answer, or why it failed (`TimedOut`: no
/// answer; `InvalidData`: a reply with a wrong CRC32c or from the wrong address or port).
pub fn sctp_exchange(target: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let port = next_port();
    let socket = raw_socket(target.ip())?;
    let deadline = Instant::now() + timeout;
    let tag = 0xc11e_0000 | u32::from(port);
    let expect = |want: u8| -> std::io::Result<Packet> {
        loop {
            let packet = receive(&socket, deadline)?;
            if packet.dport != port {
                continue; // another association's packet
            }
            if (packet.peer, packet.sport) != (target.ip(), target.port()) || packet.tag != tag {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "chunk {} from {}:{} tag {:#x}, expected from {target} tag {tag:#x}",
                        packet.chunk, packet.peer, packet.sport, packet.tag
                    ),
                ));
            }
            if packet.chunk == want {
                return Ok(packet);
            }
        }
    };
    send(
        &socket,
        target.ip(),
        &build(port, target.port(), 0, INIT, 0, &init_value(tag)),
    )?;
    let init_ack = expect(INIT_ACK)?;
    let malformed = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed INIT ACK");
    let server_tag = u32::from_be_bytes(
        init_ack
            .value
            .get(..4)
            .ok_or_else(malformed)?
            .try_into()
            .map_err(|_| malformed())?,
    );
    let cookie = state_cookie(&init_ack.value).ok_or_else(malformed)?;
    send(
        &socket,
        target.ip(),
        &build(port, target.port(), server_tag, COOKIE_ECHO, 0, cookie),
    )?;
    expect(COOKIE_ACK)?;
    let data = data_value(1, b"hello");
    send(
        &socket,
        target.ip(),
        &build(port, target.port(), server_tag, DATA, 0x03, &data),
    )?;
    expect(SACK)?;
    let answer = expect(DATA)?;
    Ok(String::from_utf8_lossy(answer.value.get(12..).unwrap_or_default()).into_owned())
}
