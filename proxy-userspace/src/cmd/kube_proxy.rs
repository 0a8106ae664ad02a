//! The binary as kube-proxy: what `kube-ebpf-proxy` with no subcommand, `kube-ebpf-proxy run`
//! and the binary invoked as `kube-proxy` share — `run`'s flags plus kube-proxy's `--version`
//! and `--cleanup`, which do their job and exit instead of running the proxy.

use proxy_userspace::dataplane;

use super::run::{RunArgs, run};

/// The Kubernetes API version the Service, EndpointSlice and KubeProxyConfiguration semantics
/// follow (k8s-openapi's `v1_35` feature in Cargo.toml).
const KUBERNETES_API: &str = "v1.35";

#[derive(clap::Args)]
pub struct KubeProxyArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Remove every program attachment, pinned link and pinned map the proxy owns (in this
    /// network namespace, under --bpf-pin-path), then exit.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub cleanup: Option<bool>,
    /// Print the version and exit; `--version=raw` prints the version details.
    #[arg(long, value_name = "true|false|raw", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub version: Option<VersionFlag>,
}

/// kube-proxy's `--version` values (component-base's verflag).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VersionFlag {
    #[value(name = "true")]
    True,
    #[value(name = "false")]
    False,
    #[value(name = "raw")]
    Raw,
}

/// The one-line version, as kube-proxy prints `--version` ("PROGRAM VERSION").
pub fn version_line() -> String {
    format!("kube-ebpf-proxy v{}", env!("CARGO_PKG_VERSION"))
}

/// `--version=raw`: the details, in the form of kube-proxy's `version.Info` dump.
fn version_raw() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!(
        "version.Info{{Major:\"{}\", Minor:\"{}\", GitVersion:\"v{}\", KubernetesAPI:\"{KUBERNETES_API}\", Platform:\"{}/{arch}\"}}",
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
    )
}

/// `--cleanup` and `cleanup`: removes what the proxy owns under `pin_path` and in this network
/// namespace (`dataplane::cleanup`), and says what.
pub fn cleanup(pin_path: &std::path::Path) -> anyhow::Result<()> {
    let cleaned = dataplane::cleanup(pin_path)?;
    tracing::info!(
        links = cleaned.links,
        filters = ?cleaned.filters,
        pins = cleaned.pins,
        pin_path = %pin_path.display(),
        "cleaned up"
    );
    Ok(())
}

/// `--version`, `--cleanup`, or the proxy.
pub async fn kube_proxy(args: KubeProxyArgs) -> anyhow::Result<()> {
    match args.version {
        Some(VersionFlag::True) => {
            println!("{}", version_line());
            return Ok(());
        }
        Some(VersionFlag::Raw) => {
            println!("{}", version_raw());
            return Ok(());
        }
        Some(VersionFlag::False) | None => {}
    }
    if args.cleanup == Some(true) {
        return cleanup(&args.run.dataplane.bpf_pin_path);
    }
    run(args.run).await
}
