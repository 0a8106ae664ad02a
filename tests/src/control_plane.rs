//! The test control plane's binaries: etcd, kube-apiserver, kube-controller-manager and kubectl,
//! built from the Go module in `tests/control-plane/` (by `cargo xtask setup`) into a cache
//! keyed by the versions its go.mod requires, shared by every checkout on the machine.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{LabError, Result};

/// Where built control planes are kept, one directory per version pair.
pub const CACHE_ROOT: &str = "/var/cache/kube-ebpf-proxy/control-plane";

/// The binaries a built control plane holds.
pub const BINARIES: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
];

/// The Go module that builds them.
pub fn go_module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("control-plane")
}

/// The released versions the Go module builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versions {
    /// `k8s.io/kubernetes`, e.g. `v1.37.2`.
    pub kubernetes: String,
    /// `go.etcd.io/etcd/server/v3`, e.g. `v3.7.3`.
    pub etcd: String,
}

impl Versions {
    /// Reads the versions from the module's go.mod.
    pub fn of_module() -> Result<Self> {
        let path = go_module_dir().join("go.mod");
        let text = std::fs::read_to_string(&path).map_err(|source| LabError::Io {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text).ok_or_else(|| LabError::Io {
            path,
            source: std::io::Error::other(
                "no `k8s.io/kubernetes` or `go.etcd.io/etcd/server/v3` requirement",
            ),
        })
    }

    fn parse(go_mod: &str) -> Option<Self> {
        let required = |module: &str| {
            go_mod.lines().find_map(|line| {
                let mut words = line.split_whitespace();
                let first = words.next()?;
                let (name, version) = if first == "require" {
                    (words.next()?, words.next()?)
                } else {
                    (first, words.next()?)
                };
                (name == module && version.starts_with('v')).then(|| version.to_owned())
            })
        };
        Some(Self {
            kubernetes: required("k8s.io/kubernetes")?,
            etcd: required("go.etcd.io/etcd/server/v3")?,
        })
    }

    /// The cache directory of this version pair.
    pub fn cache_dir(&self) -> PathBuf {
        Path::new(CACHE_ROOT).join(format!("kubernetes-{}-etcd-{}", self.kubernetes, self.etcd))
    }
}

/// The built binaries of the module's versions.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub dir: PathBuf,
}

impl Binaries {
    /// The cached build of the module's versions, or an error saying how to build it.
    pub fn cached() -> Result<Self> {
        let dir = Versions::of_module()?.cache_dir();
        if let Some(missing) = BINARIES.iter().find(|b| !dir.join(b).is_file()) {
            return Err(LabError::Io {
                path: dir.join(missing),
                source: std::io::Error::other(
                    "the test control plane is not built: run `cargo xtask setup`",
                ),
            });
        }
        Ok(Self { dir })
    }

    pub fn path(&self, binary: &str) -> PathBuf {
        self.dir.join(binary)
    }
}

/// A server of the control plane running inside a namespace, its output in a log file; stopped
/// (SIGTERM, then SIGKILL after 10 s) on drop.
pub struct Daemon {
    name: &'static str,
    child: std::process::Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(
        netns: &str,
        name: &'static str,
        binary: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| LabError::Io {
                path: log.clone(),
                source,
            })?;
        let stderr = file.try_clone().map_err(|source| LabError::Io {
            path: log.clone(),
            source,
        })?;
        let mut cmd = crate::command_in(netns, binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr);
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: format!("{cmd:?}"),
            source,
        })?;
        Ok(Self { name, child, log })
    }

    /// The last lines of the daemon's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until the daemon's log contains `needle`; an error with its log if it exits or
    /// the time runs out.
    fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if std::fs::read_to_string(&self.log).is_ok_and(|t| t.contains(needle)) {
                return Ok(());
            }
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                return Err(LabError::Proxy(format!(
                    "{} did not log {needle:?} within {timeout:?} (exit: {exited:?}); {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id().cast_signed());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service IP range the API server allocates ClusterIPs from (its default ServiceCIDR).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The API server's NodePort range.
pub const NODE_PORT_RANGE: &str = "30000-32767";
const API_PORT: u16 = 6443;

/// etcd, kube-apiserver and kube-controller-manager running in a namespace the test created,
/// with generated certificates, service-account keys and an admin token; everything (processes,
/// etcd data, keys) goes on drop.
pub struct ControlPlane {
    // Stopped in this order, before the state directory goes.
    controller_manager: Option<Daemon>,
    apiserver: Option<Daemon>,
    etcd: Daemon,
    runtime: tokio::runtime::Runtime,
    client: kube::Client,
    binaries: Binaries,
    netns: String,
    address: Ipv4Addr,
    apiserver_args: Vec<String>,
    state: StateDir,
}

/// A directory removed (with its contents) on drop.
struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Io {
        path: path.to_owned(),
        source,
    }
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    crate::run(Command::new("openssl").current_dir(dir).args(args)).map(drop)
}

/// A random hex token (bearer tokens of the lab's identities).
fn random_token() -> Result<String> {
    let path = Path::new("/dev/urandom");
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open(path).map_err(io_error(path))?,
        &mut bytes,
    )
    .map_err(io_error(path))?;
    Ok(bytes.iter().fold(String::new(), |mut hex, b| {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
        hex
    }))
}

/// A kubeconfig for `server` trusting `ca`, authenticating with a bearer token.
fn kubeconfig(server: &str, ca: &Path, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: lab
  context:
    cluster: lab
    user: {user}
current-context: lab
",
        ca = ca.display()
    )
}

impl ControlPlane {
    /// Starts the control plane in `netns`, the API server on `address:6443` (and etcd and the
    /// controller manager on the namespace's loopback), and waits until the API server is ready.
    pub fn start(binaries: &Binaries, netns: &str, address: Ipv4Addr) -> Result<Self> {
        let state = StateDir(
            std::env::temp_dir().join(format!("kube-ebpf-proxy-test-{}", crate::unique_name("cp"))),
        );
        let dir = state.0.clone();
        std::fs::create_dir_all(dir.join("etcd")).map_err(io_error(&dir))?;
        Self::write_credentials(&dir, address)?;
        let etcd_url = "http://127.0.0.1:2379";
        let peer_url = "http://127.0.0.1:2380";
        let mut etcd = Daemon::spawn(
            netns,
            "etcd",
            &binaries.path("etcd"),
            &[
                "--name=lab".to_owned(),
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=lab={peer_url}"),
                // Test data: durability across a machine crash is not needed, speed is.
                "--unsafe-no-fsync".to_owned(),
            ],
            dir.join("etcd.log"),
        )?;
        etcd.wait_for_log("ready to serve client requests", Duration::from_secs(30))?;
        let file = |name: &str| dir.join(name).display().to_string();
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={address}"),
            format!("--advertise-address={address}"),
            format!("--secure-port={API_PORT}"),
            format!("--tls-cert-file={}", file("apiserver.crt")),
            format!("--tls-private-key-file={}", file("apiserver.key")),
            format!("--client-ca-file={}", file("ca.crt")),
            format!("--token-auth-file={}", file("tokens.csv")),
            "--authorization-mode=RBAC".to_owned(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--service-node-port-range={NODE_PORT_RANGE}"),
            "--service-account-issuer=https://kubernetes.default.svc".to_owned(),
            format!("--service-account-key-file={}", file("sa.pub")),
            format!("--service-account-signing-key-file={}", file("sa.key")),
            format!("--cert-dir={}", file("apiserver-certs")),
            // The proxy's DaemonSet is privileged, as kube-proxy's is.
            "--allow-privileged=true".to_owned(),
            "--profiling=false".to_owned(),
        ];
        let runtime = crate::enter(netns, || {
            // Worker threads inherit this thread's network namespace: every connection the
            // client opens (from tasks spawned on this runtime) starts in `netns`.
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
        })?
        .map_err(io_error(Path::new("tokio runtime")))?;
        let admin = dir.join("admin.kubeconfig");
        let client = {
            let path = admin.clone();
            runtime
                .block_on(runtime.spawn(async move {
                    let kubeconfig =
                        kube::config::Kubeconfig::read_from(&path).map_err(|e| e.to_string())?;
                    let config = kube::Config::from_custom_kubeconfig(
                        kubeconfig,
                        &kube::config::KubeConfigOptions::default(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    kube::Client::try_from(config).map_err(|e| e.to_string())
                }))
                .expect("the client task does not panic")
                .map_err(|e| {
                    LabError::Proxy(format!("admin client from {}: {e}", admin.display()))
                })?
        };
        let mut control_plane = Self {
            controller_manager: None,
            apiserver: None,
            etcd,
            runtime,
            client,
            binaries: binaries.clone(),
            netns: netns.to_owned(),
            address,
            apiserver_args,
            state,
        };
        control_plane.start_apiserver()?;
        let controllers = [
            "deployment-controller",
            "replicaset-controller",
            "endpointslice-controller",
            "endpointslice-mirroring-controller",
            "serviceaccount-controller",
            "garbage-collector-controller",
            "service-cidr-controller",
        ]
        .join(",");
        control_plane.controller_manager = Some(Daemon::spawn(
            netns,
            "kube-controller-manager",
            &binaries.path("kube-controller-manager"),
            &[
                format!("--kubeconfig={}", admin.display()),
                format!("--controllers={controllers}"),
                "--leader-elect=false".to_owned(),
                "--secure-port=0".to_owned(),
                "--use-service-account-credentials=false".to_owned(),
            ],
            dir.join("kube-controller-manager.log"),
        )?);
        Ok(control_plane)
    }

    /// The CA, the API server's serving certificate (for `address`, the default Service's
    /// ClusterIP and loopback), the service-account signing key and the admin token.
    fn write_credentials(dir: &Path, address: Ipv4Addr) -> Result<()> {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=kube-ebpf-proxy-lab-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        )?;
        let names = format!(
            "subjectAltName=IP:{address},IP:10.96.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:localhost"
        );
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=kube-apiserver",
                "-addext",
                &names,
                "-keyout",
                "apiserver.key",
                "-out",
                "apiserver.csr",
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "apiserver.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-copy_extensions",
                "copyall",
                "-out",
                "apiserver.crt",
            ],
        )?;
        openssl(dir, &["genpkey", "-algorithm", "RSA", "-out", "sa.key"])?;
        openssl(dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        let token = random_token()?;
        let tokens = dir.join("tokens.csv");
        std::fs::write(
            &tokens,
            format!("{token},lab-admin,lab-admin,system:masters\n"),
        )
        .map_err(io_error(&tokens))?;
        let admin = dir.join("admin.kubeconfig");
        std::fs::write(
            &admin,
            kubeconfig(
                &format!("https://{address}:{API_PORT}"),
                &dir.join("ca.crt"),
                "lab-admin",
                &token,
            ),
        )
        .map_err(io_error(&admin))
    }

    /// Starts the API server (again) and waits until `/readyz` answers ok.
    pub fn start_apiserver(&mut self) -> Result<()> {
        let dir = self.state.0.clone();
        let mut apiserver = Daemon::spawn(
            &self.netns,
            "kube-apiserver",
            &self.binaries.path("kube-apiserver"),
            &self.apiserver_args,
            dir.join("kube-apiserver.log"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let client = self.client.clone();
            let ready = self.block_on(async move {
                let request = http::Request::get("/readyz")
                    .body(Vec::new())
                    .expect("a request");
                client.request_text(request).await
            });
            if ready.is_ok_and(|body| body.trim() == "ok") {
                break;
            }
            if apiserver.child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                return Err(LabError::Proxy(format!(
                    "kube-apiserver did not become ready within 90 s:\n{}",
                    apiserver.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        self.apiserver = Some(apiserver);
        Ok(())
    }

    /// A second API server on the same etcd, on the namespace's loopback (`127.0.0.1:6444`),
    /// e.g. to change objects while the one the nodes use is down; `kubectl` through it is
    /// [`ControlPlane::kubectl_via`] with the returned kubeconfig. Stopped when the daemon drops.
    pub fn start_second_apiserver(&self) -> Result<(Daemon, PathBuf)> {
        let dir = &self.state.0;
        let mut args: Vec<String> = self
            .apiserver_args
            .iter()
            .filter(|a| !a.starts_with("--bind-address=") && !a.starts_with("--secure-port="))
            .cloned()
            .collect();
        args.extend([
            "--bind-address=127.0.0.1".to_owned(),
            "--secure-port=6444".to_owned(),
            // The default Service's endpoints stay the first API server's.
            "--endpoint-reconciler-type=none".to_owned(),
            format!("--cert-dir={}", dir.join("apiserver2-certs").display()),
        ]);
        let mut daemon = Daemon::spawn(
            &self.netns,
            "second kube-apiserver",
            &self.binaries.path("kube-apiserver"),
            &args,
            dir.join("kube-apiserver-2.log"),
        )?;
        let admin = std::fs::read_to_string(self.admin_kubeconfig())
            .map_err(io_error(&self.admin_kubeconfig()))?;
        let kubeconfig = dir.join("admin-second.kubeconfig");
        std::fs::write(
            &kubeconfig,
            admin.replace(&self.server_url(), "https://127.0.0.1:6444"),
        )
        .map_err(io_error(&kubeconfig))?;
        let deadline = Instant::now() + Duration::from_secs(90);
        while self
            .kubectl_via(&kubeconfig, &["get", "--raw", "/readyz"])
            .is_err()
        {
            if daemon.child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                return Err(LabError::Proxy(format!(
                    "the second kube-apiserver did not become ready within 90 s:\n{}",
                    daemon.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok((daemon, kubeconfig))
    }

    /// `kubectl ARGS…` with `kubeconfig`, in the control plane's namespace.
    pub fn kubectl_via(&self, kubeconfig: &Path, args: &[&str]) -> Result<String> {
        crate::run(
            crate::command_in(&self.netns, self.binaries.path("kubectl"))
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(args),
        )
    }

    /// Stops the API server (SIGTERM, waited for); etcd and the controller manager keep running.
    pub fn stop_apiserver(&mut self) {
        drop(self.apiserver.take());
    }

    /// Runs `future` on the control plane's runtime, whose connections start in its namespace.
    pub fn block_on<F>(&self, future: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime
            .block_on(self.runtime.spawn(future))
            .expect("a control-plane task panicked")
    }

    /// The runtime [`ControlPlane::block_on`] runs on (for tasks that keep running).
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// A client with the admin identity (group system:masters).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The API server's URL.
    pub fn server_url(&self) -> String {
        format!("https://{}:{API_PORT}", self.address)
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.state.0.join("admin.kubeconfig")
    }

    /// Where the control plane keeps its state (certificates, kubeconfigs, logs).
    pub fn state_dir(&self) -> &Path {
        &self.state.0
    }

    /// `kubectl ARGS…` with the admin identity, in the control plane's namespace: its stdout, or
    /// an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        crate::run(self.kubectl_command().args(args))
    }

    /// The kubectl binary.
    pub fn kubectl_path(&self) -> PathBuf {
        self.binaries.path("kubectl")
    }

    /// The namespace the control plane runs in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// A `kubectl` command with the admin kubeconfig, run in the control plane's namespace.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = crate::command_in(&self.netns, self.binaries.path("kubectl"));
        cmd.arg("--kubeconfig").arg(self.admin_kubeconfig());
        cmd
    }

    /// Writes a kubeconfig for the service account `namespace/name`, with a token from the
    /// TokenRequest API (`kubectl create token`), and returns its path.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let token = self.kubectl(&[
            "create",
            "token",
            name,
            "--namespace",
            namespace,
            "--duration",
            "24h",
        ])?;
        let path = self.state.0.join(format!("{namespace}-{name}.kubeconfig"));
        std::fs::write(
            &path,
            kubeconfig(
                &self.server_url(),
                &self.state.0.join("ca.crt"),
                &format!("system:serviceaccount:{namespace}:{name}"),
                token.trim(),
            ),
        )
        .map_err(io_error(&path))?;
        Ok(path)
    }

    /// The API server's log tail (for failure messages).
    pub fn apiserver_log(&self) -> String {
        self.apiserver
            .as_ref()
            .map_or_else(|| "(stopped)".to_owned(), Daemon::log_tail)
    }

    /// The controller manager's log tail (for failure messages).
    pub fn controller_manager_log(&self) -> String {
        self.controller_manager
            .as_ref()
            .map_or_else(String::new, Daemon::log_tail)
    }

    /// etcd's log tail (for failure messages).
    pub fn etcd_log(&self) -> String {
        self.etcd.log_tail()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_the_require_block_and_single_lines() {
        let block = "module m\n\nrequire (\n\tgo.etcd.io/etcd/server/v3 v3.7.3\n\tk8s.io/kubernetes v1.37.2\n)\n\nreplace (\n\tk8s.io/api => k8s.io/api v0.37.2\n)\n";
        assert_eq!(
            Versions::parse(block),
            Some(Versions {
                kubernetes: "v1.37.2".into(),
                etcd: "v3.7.3".into()
            })
        );
        let single = "require k8s.io/kubernetes v1.36.3\nrequire go.etcd.io/etcd/server/v3 v3.6.0 // indirect\n";
        assert_eq!(
            Versions::parse(single).map(|v| v.cache_dir()),
            Some(PathBuf::from(
                "/var/cache/kube-ebpf-proxy/control-plane/kubernetes-v1.36.3-etcd-v3.6.0"
            ))
        );
        assert_eq!(Versions::parse("module m\n"), None);
    }

    #[test]
    fn the_module_in_the_repository_parses() {
        let versions = Versions::of_module().expect("tests/control-plane/go.mod");
        assert!(versions.kubernetes.starts_with("v1."), "{versions:?}");
    }
}
