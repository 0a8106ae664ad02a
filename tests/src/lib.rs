//! The network-namespace lab: namespaces, veth pairs, pinned-map directories and proxy processes,
//! each behind a guard that removes it on drop, so a failing test leaves nothing behind.
//!
//! Safety rules this crate keeps: it only ever changes namespaces it created (names start with
//! [`NAME_PREFIX`]); interfaces are created inside them; the root namespace is never touched.

pub mod bad_files;
pub mod cluster;
pub mod control_plane;
pub mod host;
pub mod kube_cluster;
pub mod kubelet;
pub mod load;
pub mod node_link;
pub mod sctp;
pub mod tcp_counters;

use std::io::{BufRead as _, BufReader};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Every namespace, interface and pin directory the lab makes starts with this.
pub const NAME_PREFIX: &str = "kep";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("running `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("entering network namespace {name}: {source}")]
    Setns { name: String, source: nix::Error },
    #[error("{0}")]
    Proxy(String),
    /// A test setting (environment variable) that makes no sense.
    #[error("{0}")]
    Config(String),
    #[error("/proc/net/{file}: no number for {group} {name}")]
    Counter {
        file: &'static str,
        group: &'static str,
        name: &'static str,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, LabError>;

/// A short name unique on this machine among concurrently running tests: prefix, process id and
/// a per-process counter. Kept short because interface names have 15 bytes at most.
pub fn unique_name(role: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}{}{role}{n}", std::process::id() % 100_000)
}

/// Runs a command, returning its stdout, or an error carrying its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| LabError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS…` in the root namespace; only used for commands that name a lab namespace.
fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// A network namespace created by the lab and deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named [`unique_name`]`(role)` with loopback up.
    pub fn new(role: &str) -> Result<Self> {
        let name = unique_name(role);
        create_netns(&name)?;
        Ok(Self { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        ip_in(&self.name, args)
    }

    /// A command that runs `program` inside this namespace (see [`command_in`]).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(&self.name, program)
    }

    /// Runs `f` on a thread that has entered this namespace (see [`enter`]).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        enter(&self.name, f)
    }
}

/// A command that runs `program` inside the named namespace. `nsenter --net` changes only the
/// network namespace (unlike `ip netns exec`, which also remounts /sys and so hides bpffs).
pub fn command_in(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{netns}"))
        .arg("--")
        .arg(program);
    cmd
}

/// Runs `f` on a thread that has entered the named namespace (sockets it opens live there).
pub fn enter<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = Path::new("/run/netns").join(netns);
    let file = std::fs::File::open(&path).map_err(|source| LabError::Io { path, source })?;
    let name = netns.to_owned();
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|source| LabError::Setns { name, source })?;
        Ok(f())
    })
    .join()
    .expect("a lab thread panicked")
}

/// `ip -n NETNS ARGS…`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.arg("-n").arg(netns).args(args);
    run(&mut cmd)
}

/// Creates the named namespace (loopback up); the caller owns its removal ([`delete_netns`]).
pub fn create_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Namespaces whose names start with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect())
}

/// Kills every process in the namespace (TERM, then KILL after a grace period) and deletes it.
pub fn delete_netns(name: &str) {
    let pids = |sig| {
        ip(&["netns", "pids", name])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .filter(|&pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).is_ok())
            .count()
    };
    if pids(nix::sys::signal::Signal::SIGTERM) > 0 {
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(20));
            if ip(&["netns", "pids", name])
                .unwrap_or_default()
                .trim()
                .is_empty()
            {
                break;
            }
        }
        pids(nix::sys::signal::Signal::SIGKILL);
    }
    let _ = ip(&["netns", "del", name]);
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the interfaces in it, and so their veth peers.
        delete_netns(&self.name);
    }
}

/// Creates a veth pair with one end in each namespace, both up, with the given addresses
/// (`"10.0.0.1/24"` form, or none).
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addr: &[&str],
    b: &Netns,
    b_if: &str,
    b_addr: &[&str],
) -> Result<()> {
    // Created inside `a` so no interface ever exists in the root namespace.
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    for (ns, ifname, addrs) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        for addr in addrs {
            ns.ip(&["addr", "add", addr, "dev", ifname, "nodad"])?;
        }
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// A directory for pinned maps, removed (with what is pinned in it) on drop.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// A fresh directory path under `/sys/fs/bpf`; the proxy creates it (and mounts bpffs).
    pub fn new() -> Self {
        Self {
            path: Path::new("/sys/fs/bpf")
                .join(format!("kube-ebpf-proxy-test-{}", unique_name("p"))),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// An HTTP/1.1 client for tests (ureq: blocking, plain HTTP, no redirects): every status is an
/// answer, not an error; connecting and the whole exchange are each bounded by `timeout`.
fn http_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_connect(Some(timeout))
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// A ureq error as the `io::Error` a raw client would have seen (refused, timed out).
fn http_io_error(error: ureq::Error) -> std::io::Error {
    match error {
        ureq::Error::Timeout(what) => {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("timed out: {what}"))
        }
        other => other.into_io(),
    }
}

/// `GET path` to `target` on the calling thread (so in its network namespace): the status code
/// and the body, or the connection's error (refused, timed out — what a client there would
/// see). Connecting and the exchange are each bounded by `timeout`.
pub fn http_get_here(
    target: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    // ureq connects on the calling thread.
    let mut response = http_agent(timeout)
        .get(format!("http://{target}{path}"))
        .call()
        .map_err(http_io_error)?;
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(http_io_error)?;
    Ok((response.status().as_u16(), body))
}

/// `GET /` to `target` from inside the named namespace ([`http_get_here`] on a thread there).
pub fn http_get_in(
    netns: &str,
    target: std::net::SocketAddr,
    timeout: Duration,
) -> Result<std::io::Result<(u16, String)>> {
    enter(netns, move || http_get_here(target, "/", timeout))
}

/// A GET to a server under test (health, metrics): (status, the headers as `name: value\r\n`
/// lines lowercased, body). Bounded to 5 s; the blocking client runs on tokio's blocking pool
/// so a server on the test's own runtime keeps answering.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let url = format!("http://{addr}{path}");
    tokio::task::spawn_blocking(move || {
        use std::fmt::Write as _;
        let mut response = http_agent(Duration::from_secs(5))
            .get(&url)
            .call()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let mut head = String::new();
        for (name, value) in response.headers() {
            let value = String::from_utf8_lossy(value.as_bytes());
            write!(head, "{name}: {value}\r\n").expect("a String takes any text");
        }
        let body = response
            .body_mut()
            .read_to_string()
            .unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"));
        (response.status().as_u16(), head.to_lowercase(), body)
    })
    .await
    .expect("the HTTP client thread")
}

/// A manifests folder for a proxy under test (`--manifests`), removed on drop.
pub struct ManifestsDir {
    path: PathBuf,
}

impl ManifestsDir {
    /// A fresh, empty folder.
    pub fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("kube-ebpf-proxy-test-{}", unique_name("m")));
        std::fs::create_dir_all(&path).map_err(|source| LabError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes (or replaces) `name` in the folder, atomically so a watching proxy never reads
    /// half a file.
    pub fn write(&self, name: &str, content: &str) -> Result<()> {
        let target = self.path.join(name);
        let tmp = self.path.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content)
            .and_then(|()| std::fs::rename(&tmp, &target))
            .map_err(|source| LabError::Io {
                path: target,
                source,
            })
    }

    /// Removes `name` from the folder.
    pub fn remove(&self, name: &str) -> Result<()> {
        let target = self.path.join(name);
        std::fs::remove_file(&target).map_err(|source| LabError::Io {
            path: target,
            source,
        })
    }
}

impl Drop for ManifestsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running `kube-ebpf-proxy run` inside a namespace; killed on drop.
pub struct Proxy {
    child: Child,
    log: mpsc::Receiver<String>,
    lines: Vec<String>,
}

impl Proxy {
    /// Starts `binary run --bpf-pin-path PIN EXTRA…` inside `ns` and waits until it has
    /// programmed its first snapshot of the source given in `extra` (e.g. `--manifests DIR`).
    pub fn start(binary: &Path, ns: &Netns, pin_dir: &PinDir, extra: &[&str]) -> Result<Self> {
        let mut args: Vec<std::ffi::OsString> =
            vec!["run".into(), "--bpf-pin-path".into(), pin_dir.path().into()];
        args.extend(extra.iter().map(Into::into));
        Self::start_command(binary, ns, &args)
    }

    /// Starts `program ARGS…`, an exact command line (kubeadm's, say), inside `ns` and waits
    /// until it has programmed its first snapshot.
    pub fn start_command(program: &Path, ns: &Netns, args: &[std::ffi::OsString]) -> Result<Self> {
        let mut cmd = ns.command(program);
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: format!("{cmd:?}"),
            source,
        })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proxy = Self {
            child,
            log,
            lines: Vec::new(),
        };
        // wait_for_log scales the bound.
        proxy.wait_for_log("initial sync programmed", Duration::from_secs(30))?;
        Ok(proxy)
    }

    /// The log lines read so far (by [`Proxy::wait_for_log`]).
    pub fn log_lines(&self) -> &[String] {
        &self.lines
    }

    /// Waits until the proxy logs a line containing `needle`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + scaled(timeout);
        if self.lines.iter().any(|l| l.contains(needle)) {
            return Ok(());
        }
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = self.log.recv_timeout(left) else {
                let status = self.child.try_wait().ok().flatten();
                return Err(LabError::Proxy(format!(
                    "the proxy did not log {needle:?} within {timeout:?} (exit: {status:?}); its log:\n{}",
                    self.lines.join("\n")
                )));
            };
            let found = line.contains(needle);
            self.lines.push(line);
            if found {
                return Ok(());
            }
        }
    }
}

impl Proxy {
    /// The proxy's process id (for its memory and file descriptors under /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the proxy with `signal` (SIGTERM: a clean stop; SIGKILL: a crash) and waits for it.
    pub fn stop(mut self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id().cast_signed()),
            signal,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id().cast_signed()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// A cgroup v2 directory created by the lab under the cgroup2 mount, removed on drop (after
/// moving any process still in it back to the root). Socket hooks attached to it act only on
/// processes the test places in it.
pub struct Cgroup {
    path: PathBuf,
    root: PathBuf,
}

impl Cgroup {
    pub fn new() -> Result<Self> {
        let root = cgroup2_mount()?;
        let path = root.join(unique_name("cg"));
        std::fs::create_dir(&path).map_err(|source| LabError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self { path, root })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` into this cgroup.
    pub fn add(&self, pid: u32) -> Result<()> {
        let procs = self.path.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(|source| LabError::Io {
            path: procs,
            source,
        })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(pids) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in pids.lines() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo (as procfs-core parses it). The lab does
/// not link the product it tests, so this is its own copy of `dataplane::cgroup2_root`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    use procfs_core::FromRead as _;
    let path = PathBuf::from("/proc/self/mountinfo");
    let mounts =
        procfs_core::process::MountInfos::from_file(&path).map_err(|error| LabError::Io {
            path: path.clone(),
            source: std::io::Error::other(error),
        })?;
    mounts
        .into_iter()
        .find(|mount| mount.fs_type == "cgroup2")
        .map(|mount| mount.mount_point)
        .ok_or_else(|| LabError::Io {
            path,
            source: std::io::Error::other("no cgroup2 mount"),
        })
}

impl Netns {
    /// Runs `f` on a background thread that has entered this namespace, without waiting.
    pub fn spawn<F>(&self, f: F) -> Result<std::thread::JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        let file = std::fs::File::open(self.path()).map_err(|source| LabError::Io {
            path: self.path(),
            source,
        })?;
        Ok(std::thread::spawn(move || {
            if nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
                f();
            }
        }))
    }

    /// `sysctl -w KEY=VALUE` inside this namespace (`/proc/sys/net` is per namespace).
    pub fn sysctl(&self, setting: &str) -> Result<()> {
        run(self.command("sysctl").args(["-q", "-w", setting])).map(drop)
    }
}

/// TCP and UDP echo servers on `[::]:port` (IPv4 too, dual stack) inside a namespace. Each
/// answer is `"NAME PEER_IP\n"`: who answered and which client address it saw. Stopped and
/// joined on drop.
pub struct EchoServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// How long a server blocks before checking whether it should stop.
const SERVER_POLL: Duration = Duration::from_millis(50);

impl EchoServer {
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<Self> {
        use std::sync::atomic::AtomicBool;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<std::io::Result<()>>();
        let mut threads = Vec::new();
        {
            let (stop, name, ready) = (stop.clone(), name.to_owned(), ready_tx.clone());
            threads.push(ns.spawn(move || {
                let listener = match std::net::TcpListener::bind(("::", port)) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = listener.set_nonblocking(true);
                let _ = ready.send(Ok(()));
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, peer)) => {
                            use std::io::Write as _;
                            let line = format!("{name} {}\n", peer.ip().to_canonical());
                            let _ = stream.write_all(line.as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })?);
        }
        {
            let (stop, name, ready) = (stop.clone(), name.to_owned(), ready_tx);
            threads.push(ns.spawn(move || {
                let socket = match std::net::UdpSocket::bind(("::", port)) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = socket.set_read_timeout(Some(SERVER_POLL));
                let _ = ready.send(Ok(()));
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                        let line = format!("{name} {}\n", peer.ip().to_canonical());
                        let _ = socket.send_to(line.as_bytes(), peer);
                    }
                }
            })?);
        }
        let server = Self { stop, threads };
        for _ in 0..2 {
            let started = ready_rx
                .recv_timeout(Duration::from_secs(5))
                .map_err(|_| LabError::Proxy(format!("echo server {name} did not start")))?;
            started.map_err(|source| LabError::Io {
                path: PathBuf::from(format!("[::]:{port} in {}", ns.name())),
                source,
            })?;
        }
        Ok(server)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// One TCP exchange with an [`EchoServer`] from inside `ns`: the answer line, or the error the
/// connect or read failed with (refused, timed out).
pub fn tcp_request(
    ns: &Netns,
    target: std::net::SocketAddr,
    timeout: Duration,
) -> Result<std::io::Result<String>> {
    ns.enter(move || {
        use std::io::Read as _;
        let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer.trim().to_owned())
    })
}

/// One UDP exchange with an [`EchoServer`] from inside `ns`, from a fresh source port.
pub fn udp_request(
    ns: &Netns,
    target: std::net::SocketAddr,
    timeout: Duration,
) -> Result<std::io::Result<String>> {
    ns.enter(move || {
        let bind: std::net::SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let socket = std::net::UdpSocket::bind(bind)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(target)?;
        socket.send(b"ping")?;
        let mut buf = [0u8; 1500];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
    })
}

impl Netns {
    /// Waits (bounded by `timeout`) until no IPv6 address of this namespace is still tentative
    /// (duplicate address detection of link-local addresses delays the first packets).
    pub fn wait_ipv6_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let tentative = self.ip(&["-6", "addr", "show", "tentative"])?;
            if tentative.trim().is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(LabError::Proxy(format!(
                    "IPv6 addresses of {} still tentative after {timeout:?}: {tentative}",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A TCP server that keeps connections open and answers each line with its name.
pub struct LineServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LineServer {
    /// Starts the server on `[::]:port` in `ns` (panics if it cannot: a test fixture).
    pub fn start(ns: &Netns, name: &str, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_flag, name) = (stop.clone(), name.to_owned());
        let thread = ns
            .spawn(move || {
                let listener = std::net::TcpListener::bind(("::", port)).expect("bind");
                listener.set_nonblocking(true).expect("nonblocking");
                ready_tx.send(()).expect("ready");
                let mut connections = Vec::new();
                while !stop_flag.load(Ordering::Relaxed) {
                    if let Ok((stream, _)) = listener.accept() {
                        let (stop_flag, name) = (stop_flag.clone(), name.clone());
                        connections.push(std::thread::spawn(move || {
                            serve_lines(stream, &name, &stop_flag);
                        }));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                for connection in connections {
                    let _ = connection.join();
                }
            })
            .expect("spawn in the pod");
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("line server started");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

fn serve_lines(stream: std::net::TcpStream, name: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut writer = stream.try_clone().expect("clone the stream");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if std::io::Write::write_all(&mut writer, format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(_) => {}
        }
    }
}

/// Sends a line on an established connection to a [`LineServer`] and reads the answering pod's
/// name: data both ways (panics if the connection broke: a test fixture).
pub fn ask(stream: &mut BufReader<std::net::TcpStream>) -> String {
    std::io::Write::write_all(stream.get_mut(), b"who\n")
        .expect("send on the established connection");
    let mut line = String::new();
    stream
        .read_line(&mut line)
        .expect("answer on the established connection");
    assert!(!line.is_empty(), "the connection was closed");
    line.trim().to_owned()
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `PROXY_LAB_TIMEOUT_SCALE` (default 1): how many times slower than the host this machine
/// is. `cargo xtask vm-test` sets it, as a dataplane load under qemu's emulation (TCG) takes
/// several times as long as on the host.
pub fn timeout_scale() -> u32 {
    std::env::var("PROXY_LAB_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// `timeout` times [`timeout_scale`].
pub fn scaled(timeout: Duration) -> Duration {
    timeout * timeout_scale()
}
