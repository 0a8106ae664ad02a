//! The bench's own load: netperf-style TCP_CRR (connect, 1-byte request, 1-byte answer, close),
//! TCP_RR (1-byte request/answer pairs on one connection) and UDP request/response, one stream
//! at a time, each bounded in count and in time; and the backend's server for them.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use proxy_lab::Netns;

/// The port the bench servers listen on (TCP and UDP) in the backend pods.
pub const BENCH_PORT: u16 = 9000;
/// How long a blocked server thread waits before it checks whether to stop.
const SERVER_POLL: Duration = Duration::from_millis(100);
/// Connect and answer timeout of one transaction.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(1);

/// TCP (a thread per connection) and UDP servers answering every byte or datagram, in a pod's
/// namespace; stopped and joined on drop.
pub struct BenchServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    netns: String,
}

impl BenchServer {
    pub fn start(ns: &Netns) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tcp, udp) = ns
            .enter(|| {
                Ok::<_, std::io::Error>((
                    TcpListener::bind(("0.0.0.0", BENCH_PORT))?,
                    UdpSocket::bind(("0.0.0.0", BENCH_PORT))?,
                ))
            })?
            .with_context(|| format!("binding port {BENCH_PORT} in {}", ns.name()))?;
        udp.set_read_timeout(Some(SERVER_POLL))?;
        let mut threads = Vec::new();
        let tcp_stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut connections = Vec::new();
            for stream in tcp.incoming() {
                if tcp_stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let stop = tcp_stop.clone();
                connections.push(std::thread::spawn(move || answer_bytes(stream, &stop)));
                connections.retain(|c: &JoinHandle<()>| !c.is_finished());
            }
            for connection in connections {
                let _ = connection.join();
            }
        }));
        let udp_stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !udp_stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], peer);
                }
            }
        }));
        Ok(Self {
            stop,
            threads,
            netns: ns.name().to_owned(),
        })
    }
}

fn answer_bytes(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(SERVER_POLL));
    let mut byte = [0u8; 1];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut byte) {
            Ok(0) => return,
            Ok(_) => {
                if stream.write_all(&byte).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accepting thread with one last connection.
        let _ = proxy_lab::enter(&self.netns, || {
            TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], BENCH_PORT)), SERVER_POLL)
        });
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Which exchange a load repeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    TcpCrr,
    TcpRr,
    UdpRr,
}

/// What a load did: each transaction's latency, and the failed ones.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub latencies: Vec<Duration>,
    pub failures: usize,
    pub first_failure: Option<String>,
    pub elapsed: Duration,
}

impl Outcome {
    /// Transactions per second.
    pub fn rate(&self) -> f64 {
        // Counts stay far below 2^52: exact as f64.
        #[allow(clippy::cast_precision_loss)]
        let done = self.latencies.len() as f64;
        done / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `count` transactions of `kind` against `target` from inside `ns` (one at a time),
/// stopping after `bound` whatever is left.
pub fn run(
    ns: &Netns,
    kind: Kind,
    target: SocketAddr,
    count: usize,
    bound: Duration,
) -> anyhow::Result<Outcome> {
    Ok(ns.enter(move || {
        let mut outcome = Outcome::default();
        let started = Instant::now();
        let fail = |outcome: &mut Outcome, e: std::io::Error| {
            outcome.failures += 1;
            outcome.first_failure.get_or_insert_with(|| e.to_string());
        };
        match kind {
            Kind::TcpCrr => {
                while outcome.latencies.len() + outcome.failures < count
                    && started.elapsed() < bound
                {
                    let t = Instant::now();
                    match crr(target) {
                        Ok(()) => outcome.latencies.push(t.elapsed()),
                        Err(e) => fail(&mut outcome, e),
                    }
                }
            }
            Kind::TcpRr => {
                // One connection for all, connected again only if it fails (counted).
                let mut stream: Option<TcpStream> = None;
                while outcome.latencies.len() < count && started.elapsed() < bound {
                    let connection = match stream.take() {
                        Some(connection) => Ok(connection),
                        None => rr_connection(target),
                    };
                    match connection {
                        Ok(mut connection) => {
                            let t = Instant::now();
                            match exchange(&mut connection) {
                                Ok(()) => {
                                    outcome.latencies.push(t.elapsed());
                                    stream = Some(connection);
                                }
                                Err(e) => fail(&mut outcome, e),
                            }
                        }
                        Err(e) => fail(&mut outcome, e),
                    }
                }
            }
            Kind::UdpRr => match udp_socket(target) {
                Ok(socket) => {
                    let mut buf = [0u8; 64];
                    while outcome.latencies.len() + outcome.failures < count
                        && started.elapsed() < bound
                    {
                        let t = Instant::now();
                        match socket.send(&[1]).and_then(|_| socket.recv(&mut buf)) {
                            Ok(_) => outcome.latencies.push(t.elapsed()),
                            Err(e) => fail(&mut outcome, e),
                        }
                    }
                }
                Err(e) => fail(&mut outcome, e),
            },
        }
        outcome.elapsed = started.elapsed();
        outcome
    })?)
}

fn rr_connection(target: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target, TRANSACTION_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TRANSACTION_TIMEOUT))?;
    Ok(stream)
}

fn crr(target: SocketAddr) -> std::io::Result<()> {
    let mut stream = rr_connection(target)?;
    exchange(&mut stream)?;
    close_with_reset(&stream)
}

/// Makes dropping `stream` send a RST instead of a FIN, as netperf-style CRR loads do: a
/// client closing with FIN keeps every port in TIME_WAIT for a minute, and thousands of
/// connections per second then run the client out of ports (EAGAIN, or connects waiting on a
/// port's old flow), which made the rates noise.
fn close_with_reset(stream: &TcpStream) -> std::io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(stream, nix::sys::socket::sockopt::Linger, &linger)
        .map_err(std::io::Error::from)
}

fn exchange(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(&[1])?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)
}

fn udp_socket(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(("0.0.0.0", 0))?;
    socket.set_read_timeout(Some(TRANSACTION_TIMEOUT))?;
    socket.connect(target)?;
    Ok(socket)
}

/// How long until a new connection to `target` from `ns` succeeds, polling with a short connect
/// timeout (a dropped SYN would otherwise wait a whole retransmit); `None` if not within `bound`.
pub fn time_to_first_connection(
    ns: &Netns,
    target: SocketAddr,
    since: Instant,
    bound: Duration,
) -> anyhow::Result<Option<Duration>> {
    const POLL_CONNECT_TIMEOUT: Duration = Duration::from_millis(20);
    Ok(ns.enter(move || {
        while since.elapsed() < bound {
            match TcpStream::connect_timeout(&target, POLL_CONNECT_TIMEOUT) {
                Ok(mut stream) => {
                    let _ = stream.set_read_timeout(Some(TRANSACTION_TIMEOUT));
                    if exchange(&mut stream).is_ok() {
                        return Some(since.elapsed());
                    }
                }
                // Refused or unreachable at once: do not spin.
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        None
    })?)
}
