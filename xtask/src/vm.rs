//! `cargo xtask vm-test`: the kernel test suites on the kernels users run — Debian's 6.1 and
//! 6.12 packages — under qemu. The guest boots a tiny busybox initramfs that mounts the host's
//! root read-only over 9p and switches to it, so the very test binaries and `kube-ebpf-proxy`
//! built on the host run inside, as root of the VM, against the VM's kernel. The VM has no
//! network device (`-nic none`): the tests make their own namespaces and veth pairs in it.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};

use crate::{cargo, setup, workspace_root};

/// Where the downloaded and unpacked kernels live, one directory per kernel release.
const KERNEL_CACHE: &str = "/var/cache/kube-ebpf-proxy/kernels";
/// The apt source this command adds when bookworm-backports is not configured.
const BACKPORTS_SOURCE: &str = "/etc/apt/sources.list.d/kube-ebpf-proxy-backports.sources";
/// The host packages the VM needs: the emulator, a static busybox for the initramfs, and kmod
/// (depmod on the host, modprobe in the guest).
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod"];
/// The modules the initramfs loads to mount the host root; the rest load on demand.
const BOOT_MODULES: &[&str] = &["9p", "9pnet_virtio", "virtio_pci"];
/// The cargo test targets that need a kernel (eBPF programs, namespaces, traffic).
pub const KERNEL_SUITES: &[&str] = &[
    "tc_test_run",
    "kernel_smoke",
    "metrics_run",
    "traffic",
    "services",
    "restarts",
    "snat_load",
    "fragments",
];
/// The suites `cargo xtask test` runs in the VM: under TCG a dataplane load (the verifier over
/// the tc program) takes tens of seconds, so the whole set would not fit CI's time; these are
/// the BPF_PROG_TEST_RUN suite, which covers every NAT decision of the tc program, and the
/// smoke test of the binary attaching to a namespace's interfaces and cgroup.
pub const CI_SUITES: &[&str] = &["tc_test_run", "kernel_smoke"];
/// The line the guest prints last: the number of failed suites.
const EXIT_MARKER: &str = "vm-test: failed suites: ";
/// Without output from a KVM guest for this long, KVM is taken as not working (nested
/// virtualisation that opens /dev/kvm but never runs the guest) and TCG is used.
const KVM_FIRST_OUTPUT: Duration = Duration::from_secs(30);
/// Bound on one kernel's whole run.
const VM_DEADLINE: Duration = Duration::from_mins(150);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm opens and the guest shows signs of life, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

#[derive(clap::Args)]
pub struct VmTestArgs {
    /// Which Debian kernel to boot.
    #[arg(long, value_enum, default_value = "6.1")]
    pub kernel: KernelChoice,
    /// The cargo test targets to run (repeatable); default: every kernel suite.
    #[arg(long = "suite")]
    pub suites: Vec<String>,
    /// Only tests whose name contains this (passed to every test binary).
    #[arg(long)]
    pub filter: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: Accel,
}

/// A Debian kernel series: the package name pattern that finds its newest release.
struct Series {
    name: &'static str,
    /// `apt-cache search --names-only` regex for its generic amd64 image packages.
    package_regex: &'static str,
}

const SERIES_6_1: Series = Series {
    name: "6.1",
    package_regex: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
};
const SERIES_6_12: Series = Series {
    name: "6.12",
    package_regex: r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64$",
};

pub fn vm_test(args: &VmTestArgs) -> anyhow::Result<()> {
    setup::require_root("vm-test (apt downloads, the kernel cache, qemu serving / over 9p)")?;
    setup::install_missing(VM_PACKAGES)?;
    let series: Vec<&Series> = match args.kernel {
        KernelChoice::V6_1 => vec![&SERIES_6_1],
        KernelChoice::V6_12 => vec![&SERIES_6_12],
        KernelChoice::All => vec![&SERIES_6_1, &SERIES_6_12],
    };
    let suites: Vec<String> = if args.suites.is_empty() {
        KERNEL_SUITES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.suites.clone()
    };
    let (proxy, binaries) = build_test_binaries(&suites)?;
    let mut failed = Vec::new();
    for series in series {
        let kernel = cached_kernel(series)?;
        let started = Instant::now();
        println!(
            "vm-test: {} ({}): suites {}",
            series.name,
            kernel.release,
            suites.join(" ")
        );
        let outcome = run_in_vm(
            &kernel,
            &proxy,
            &binaries,
            args.filter.as_deref(),
            args.accel,
        );
        let took = started.elapsed().as_secs();
        match outcome {
            Ok(0) => println!("vm-test: {}: all suites passed in {took} s", kernel.release),
            Ok(n) => {
                println!(
                    "vm-test: {}: {n} suite(s) failed ({took} s)",
                    kernel.release
                );
                failed.push(kernel.release.clone());
            }
            Err(e) => {
                println!("vm-test: {}: {e:#} ({took} s)", kernel.release);
                failed.push(kernel.release.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(())
}

/// A test binary and the package directory cargo runs it in.
struct TestBinary {
    suite: String,
    executable: PathBuf,
    package_dir: PathBuf,
}

/// `cargo test --no-run` for the suites, read back from cargo's JSON messages; also the
/// `kube-ebpf-proxy` binary the tests run.
fn build_test_binaries(suites: &[String]) -> anyhow::Result<(PathBuf, Vec<TestBinary>)> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json",
        "-p",
        "proxy-userspace",
    ]);
    for suite in suites {
        cmd.args(["--test", suite]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed ({})", out.status);
    }
    let mut binaries = Vec::new();
    let mut proxy = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(executable), Some(name), Some(manifest)) = (
            message["executable"].as_str(),
            message["target"]["name"].as_str(),
            message["manifest_path"].as_str(),
        ) else {
            continue;
        };
        if name == "kube-ebpf-proxy" && message["profile"]["test"] == false {
            proxy = Some(PathBuf::from(executable));
        } else if message["profile"]["test"] == true && suites.iter().any(|s| s == name) {
            binaries.push(TestBinary {
                suite: name.to_owned(),
                executable: executable.into(),
                package_dir: Path::new(manifest)
                    .parent()
                    .context("a manifest path has a parent")?
                    .to_owned(),
            });
        }
    }
    let found: HashSet<&str> = binaries.iter().map(|b| b.suite.as_str()).collect();
    if let Some(missing) = suites.iter().find(|s| !found.contains(s.as_str())) {
        bail!("no test target {missing} in proxy-userspace");
    }
    binaries.sort_by_key(|b| suites.iter().position(|s| *s == b.suite));
    let proxy = proxy.context("cargo built no kube-ebpf-proxy binary")?;
    Ok((proxy, binaries))
}

/// An unpacked kernel package in the cache.
struct CachedKernel {
    release: String,
    /// Holds boot/vmlinuz-RELEASE and lib/modules/RELEASE (with modules.dep).
    root: PathBuf,
}

impl CachedKernel {
    fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.release))
    }
}

/// The newest kernel of the series, downloaded and unpacked once per machine.
fn cached_kernel(series: &Series) -> anyhow::Result<CachedKernel> {
    let mut package = newest_package(series)?;
    if package.is_none() && series.name != "6.1" {
        add_backports_source()?;
        package = newest_package(series)?;
    }
    let package = package.with_context(|| {
        format!(
            "apt knows no package matching {} (Debian {} kernel)",
            series.package_regex, series.name
        )
    })?;
    let release = package
        .strip_prefix("linux-image-")
        .context("a kernel image package name")?
        .to_owned();
    let root = Path::new(KERNEL_CACHE).join(&release);
    let complete = root.join(".complete");
    if complete.exists() {
        return Ok(CachedKernel { release, root });
    }
    println!("vm-test: downloading {package}");
    std::fs::create_dir_all(KERNEL_CACHE).with_context(|| format!("creating {KERNEL_CACHE}"))?;
    let work = Path::new(KERNEL_CACHE).join(format!(".{release}.{}", unique_suffix()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = unpack_kernel(&package, &release, &work, &root);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    std::fs::write(&complete, package)
        .with_context(|| format!("writing {}", complete.display()))?;
    Ok(CachedKernel { release, root })
}

fn unpack_kernel(package: &str, release: &str, work: &Path, root: &Path) -> anyhow::Result<()> {
    setup::run(
        Command::new("apt-get")
            .current_dir(work)
            .args(["download", package]),
    )?;
    let deb = std::fs::read_dir(work)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let unpacked = work.join("root");
    setup::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    // The package's postinst would run depmod; modprobe in the guest needs modules.dep.
    setup::run(Command::new("depmod").arg("-b").arg(&unpacked).arg(release))?;
    if root.exists() {
        std::fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    }
    std::fs::rename(&unpacked, root)
        .with_context(|| format!("moving the kernel to {}", root.display()))
}

/// The newest generic amd64 image package of the series apt knows, if any.
fn newest_package(series: &Series) -> anyhow::Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", series.package_regex])
        .output()
        .context("running apt-cache search")?;
    if !out.status.success() {
        bail!(
            "apt-cache search {} failed ({})",
            series.package_regex,
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .max_by_key(|name| version_key(name)))
}

/// The numbers in a package name, in order: enough to order Debian's kernel image names.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn add_backports_source() -> anyhow::Result<()> {
    println!("vm-test: adding bookworm-backports as {BACKPORTS_SOURCE}");
    std::fs::write(
        BACKPORTS_SOURCE,
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
         Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    )
    .with_context(|| format!("writing {BACKPORTS_SOURCE}"))?;
    setup::run(Command::new("apt-get").args(["update", "-q"]))
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// The run directory: under the workspace's target/ (the guest mounts a fresh tmpfs on /tmp,
/// so the files it reads from the host must live elsewhere), removed when dropped.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The qemu process; killed and reaped when dropped, whatever the exit path.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the kernel, runs the suites, returns how many failed.
fn run_in_vm(
    kernel: &CachedKernel,
    proxy: &Path,
    binaries: &[TestBinary],
    filter: Option<&str>,
    accel: Accel,
) -> anyhow::Result<u32> {
    let dir = RunDir(workspace_root().join("target/vm-test").join(format!(
        "{}-{}",
        kernel.release,
        unique_suffix()
    )));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let initramfs = build_initramfs(kernel, &dir.0)?;
    let script = dir.0.join("guest.sh");
    std::fs::write(&script, guest_script(kernel, proxy, binaries, filter))
        .with_context(|| format!("writing {}", script.display()))?;
    let kvm = match accel {
        Accel::Tcg => false,
        Accel::Kvm => true,
        Accel::Auto => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
    };
    if kvm {
        match boot(kernel, &initramfs, &script, true, accel == Accel::Auto)? {
            Boot::Finished(failed) => return Ok(failed),
            Boot::NoSignOfLife => println!(
                "vm-test: no output from the KVM guest in {} s: KVM does not work here, using TCG",
                KVM_FIRST_OUTPUT.as_secs()
            ),
        }
    }
    match boot(kernel, &initramfs, &script, false, false)? {
        Boot::Finished(failed) => Ok(failed),
        Boot::NoSignOfLife => unreachable!("only a KVM boot is given up for silence"),
    }
}

enum Boot {
    /// The guest ran the suites; this many failed.
    Finished(u32),
    /// A KVM guest printed nothing in time (auto mode only).
    NoSignOfLife,
}

/// One qemu run, its serial console streamed to the terminal.
fn boot(
    kernel: &CachedKernel,
    initramfs: &Path,
    script: &Path,
    kvm: bool,
    give_up_when_silent: bool,
) -> anyhow::Result<Boot> {
    let mut cmd = Command::new("qemu-system-x86_64");
    if kvm {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]);
    }
    cmd.args([
        "-m", "2048", "-smp", "2", "-nic", "none", "-display", "none",
    ])
    .args([
        "-no-reboot",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-kernel",
    ])
    .arg(kernel.vmlinuz())
    .arg("-initrd")
    .arg(initramfs)
    .arg("-append")
    .arg(format!(
        "console=ttyS0 panic=-1 loglevel=4 vmtest.script={}",
        script.display()
    ))
    .args([
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    // SAFETY: prctl is async-signal-safe; it makes the kernel kill qemu when xtask dies, even
    // by SIGKILL, so no VM outlives the command.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut vm = Vm(cmd.spawn().context("starting qemu-system-x86_64")?);
    let stdout = vm.0.stdout.take().context("qemu's stdout")?;
    let (lines, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut seen_output = false;
    let mut failed = None;
    loop {
        let wait = if give_up_when_silent && !seen_output {
            KVM_FIRST_OUTPUT.saturating_sub(started.elapsed())
        } else {
            VM_DEADLINE.saturating_sub(started.elapsed())
        };
        match receive.recv_timeout(wait) {
            Ok(Ok(line)) => {
                seen_output = true;
                println!("{line}");
                if let Some(count) = line.trim_end().strip_prefix(EXIT_MARKER) {
                    failed = count.parse().ok();
                }
            }
            Ok(Err(e)) => bail!("reading the VM's console: {e}"),
            // qemu exited and closed its stdout.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if !seen_output => return Ok(Boot::NoSignOfLife),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("the VM ran past {} minutes", VM_DEADLINE.as_secs() / 60)
            }
        }
    }
    let status = vm.0.wait().context("waiting for qemu")?;
    match failed {
        Some(count) => Ok(Boot::Finished(count)),
        None => bail!("the VM stopped ({status}) before reporting its results"),
    }
}

/// A gzipped newc cpio with busybox, the modules that mount the host root (decompressed:
/// busybox's insmod reads plain ELF), and /init.
fn build_initramfs(kernel: &CachedKernel, run_dir: &Path) -> anyhow::Result<PathBuf> {
    let tree = run_dir.join("initramfs");
    for sub in ["bin", "modules", "proc", "sys", "dev", "newroot"] {
        std::fs::create_dir_all(tree.join(sub))?;
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).context("copying /bin/busybox")?;
    setup::run(
        Command::new("mknod")
            .arg(tree.join("dev/console"))
            .args(["c", "5", "1"]),
    )?;
    let out = Command::new("modprobe")
        .arg("-d")
        .arg(&kernel.root)
        .args(["-S", &kernel.release, "--show-depends", "-a"])
        .args(BOOT_MODULES)
        .output()
        .context("running modprobe --show-depends")?;
    if !out.status.success() {
        bail!(
            "modprobe --show-depends {BOOT_MODULES:?} failed for {}",
            kernel.release
        );
    }
    let mut loaded = HashSet::new();
    let mut order = 10;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(module) = line.strip_prefix("insmod ").map(str::trim) else {
            continue; // "builtin NAME"
        };
        if !loaded.insert(module.to_owned()) {
            continue;
        }
        let path = Path::new(module);
        let compressed = path.extension().is_some_and(|e| e == "xz");
        let name = if compressed {
            path.file_stem()
        } else {
            path.file_name()
        }
        .context("a module file name")?
        .to_string_lossy()
        .into_owned();
        let target = tree.join(format!("modules/{order}-{name}"));
        order += 1;
        if compressed {
            let plain = Command::new("xz")
                .args(["-dc", module])
                .output()
                .context("running xz")?;
            if !plain.status.success() {
                bail!("xz -d {module} failed");
            }
            std::fs::write(&target, plain.stdout)?;
        } else {
            std::fs::copy(module, &target).with_context(|| format!("copying {module}"))?;
        }
    }
    let init = tree.join("init");
    std::fs::write(&init, INIT)?;
    setup::run(Command::new("chmod").arg("+x").arg(&init))?;
    let archive = run_dir.join("initramfs.cpio.gz");
    setup::run(Command::new("sh").current_dir(&tree).arg("-c").arg(format!(
        "find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > {}",
        archive.display()
    )))?;
    Ok(archive)
}

/// Stage one, in the initramfs: the host's / read-only at /newroot with fresh tmpfs on /tmp and
/// /run, then the guest script from the kernel command line.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "vm-init: $(uname -r) up"
for m in /modules/*.ko; do insmod "$m" || echo "vm-init: insmod $m failed"; done
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /newroot; then
  echo "vm-init: mounting the host root failed"; echo o > /proc/sysrq-trigger
fi
for d in tmp run; do mount -t tmpfs tmpfs "/newroot/$d"; done
mount -t proc proc /newroot/proc; mount -t sysfs sys /newroot/sys; mount -t devtmpfs dev /newroot/dev
script=$(sed -n 's/.*vmtest.script=\([^ ]*\).*/\1/p' /proc/cmdline)
exec switch_root /newroot /bin/sh "$script"
"#;

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Stage two, on the host's root: kernel file systems, module autoloading from the cached
/// kernel's tree, then every suite; the last line counts the failed suites.
fn guest_script(
    kernel: &CachedKernel,
    proxy: &Path,
    binaries: &[TestBinary],
    filter: Option<&str>,
) -> String {
    let mut script = String::from(
        "set -u\nexport PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1\n\
         export PROXY_LAB_TIMEOUT_SCALE=4\n\
         mount -t bpf bpf /sys/fs/bpf; mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm\n\
         ip link set lo up\n",
    );
    // The kernel runs kernel.modprobe for `ip link add type veth`, nft's expressions, etc.
    let _ = writeln!(
        script,
        "printf '#!/bin/sh\\nexec /usr/sbin/modprobe -d %s \"$@\"\\n' {} > /run/vm-modprobe\n\
         chmod +x /run/vm-modprobe; echo /run/vm-modprobe > /proc/sys/kernel/modprobe\n\
         # /dev/net/tun appears when tun is loaded; opening the missing node loads nothing.\n\
         /run/vm-modprobe tun || echo 'vm-test: modprobe tun failed'",
        shell_quote(&kernel.root.to_string_lossy())
    );
    let _ = writeln!(
        script,
        "echo 'vm-test: kernel features (kube-ebpf-proxy features):'\n{} features | sed 's/^/vm-test: feature /'",
        shell_quote(&proxy.to_string_lossy())
    );
    script.push_str("failed=0\n");
    for binary in binaries {
        let filter = filter.map(shell_quote).unwrap_or_default();
        let _ = writeln!(
            script,
            "echo 'vm-test: suite {suite}'; start=$(date +%s)\n\
             if (cd {dir} && {exe} --test-threads=2 {filter}); then r=passed; else r=FAILED; failed=$((failed+1)); fi\n\
             echo \"vm-test: suite {suite} $r in $(( $(date +%s) - start )) s\"",
            suite = binary.suite,
            dir = shell_quote(&binary.package_dir.to_string_lossy()),
            exe = shell_quote(&binary.executable.to_string_lossy()),
        );
    }
    // sysrq powers off asynchronously: init must not exit first (that panics the kernel).
    let _ = writeln!(
        script,
        "echo \"{EXIT_MARKER}$failed\"\necho o > /proc/sysrq-trigger\nsleep 60"
    );
    script
}
