//! `cargo xtask image`: an OCI image archive of the release binary, built here with no registry
//! and no container tool. FROM scratch: the binary (also reachable as
//! `/usr/local/bin/kube-proxy`, so `kubectl set image` on kubeadm's DaemonSet keeps its command),
//! the shared libraries `ldd` says it needs and the dynamic loader, nothing else.
//!
//! The archive is an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`) that also
//! carries Docker's `manifest.json`, so `podman load`, `skopeo … oci-archive:`, `ctr images
//! import` and `docker load` (old and new) all accept it. Every file is owned by root and
//! readable and executable by any user, and nothing in the image needs writing: the binary runs
//! as any user (it needs capabilities, not uid 0, for the kernel work; see `manifests/`).
//! Timestamps are the last commit's, so the same commit gives the same archive.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::workspace_root;

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Where the binary lives in the image (kube-proxy's own image path, next to its name).
pub const BINARY_PATH: &str = "usr/local/bin/kube-ebpf-proxy";
pub const KUBE_PROXY_PATH: &str = "usr/local/bin/kube-proxy";
const SOURCE: &str = "https://github.com/kube-ebpf-proxy/kube-ebpf-proxy";

#[derive(clap::Args)]
pub struct ImageArgs {
    /// Where to write the archive. [default: target/image/kube-ebpf-proxy-VERSION.oci.tar]
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Package this binary instead of building the release binary.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// The image name (the tag is the version).
    #[arg(long, default_value = "kube-ebpf-proxy")]
    pub name: String,
}

/// What the image is labelled with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageMeta {
    /// `kube-ebpf-proxy --version`'s version, without the `v`.
    pub version: String,
    /// The commit built (empty outside a git checkout).
    pub revision: String,
    /// Seconds since the epoch of that commit: every timestamp in the image.
    pub created: u64,
    /// `NAME:VERSION`.
    pub reference: String,
}

pub fn image(args: &ImageArgs) -> anyhow::Result<()> {
    let binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => build_release()?,
    };
    let meta = image_meta(&binary, &args.name)?;
    let output = args.output.clone().unwrap_or_else(|| {
        workspace_root()
            .join("target/image")
            .join(format!("kube-ebpf-proxy-{}.oci.tar", meta.version))
    });
    let libraries = shared_libraries(&binary)?;
    write_archive(&binary, &libraries, &meta, &output)?;
    println!("image: {} ({})", output.display(), meta.reference);
    println!(
        "load it with: podman load -i {0} | docker load -i {0} | ctr images import {0}",
        output.display()
    );
    Ok(())
}

fn build_release() -> anyhow::Result<PathBuf> {
    println!("image: cargo build --release --bin kube-ebpf-proxy");
    crate::setup::run(crate::cargo().args([
        "build",
        "--release",
        "-p",
        "proxy-userspace",
        "--bin",
        "kube-ebpf-proxy",
    ]))?;
    Ok(workspace_root().join("target/release/kube-ebpf-proxy"))
}

/// The version from the binary itself (so the label is what `--version` says), and the commit.
pub fn image_meta(binary: &Path, name: &str) -> anyhow::Result<ImageMeta> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", binary.display()))?;
    let line = String::from_utf8_lossy(&out.stdout);
    let Some(version) = line
        .trim()
        .strip_prefix("kube-ebpf-proxy v")
        .filter(|_| out.status.success())
    else {
        bail!("{} --version printed {line:?}", binary.display());
    };
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(workspace_root())
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    Ok(ImageMeta {
        version: version.to_owned(),
        revision: git(&["rev-parse", "HEAD"]),
        created: git(&["log", "-1", "--format=%ct"]).parse().unwrap_or(0),
        reference: format!("{name}:{version}"),
    })
}

/// The files `ldd` lists for `binary` (libraries and the loader), or an error naming a library
/// it cannot find.
pub fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    parse_ldd(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("ldd {}", binary.display()))
}

/// Parses `ldd` output: `name => /path (addr)`, `/loader (addr)`, `linux-vdso.so.1 (addr)`.
fn parse_ldd(output: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") || line.contains("not a dynamic executable") {
            continue;
        }
        let target = line
            .split_once("=>")
            .map_or(line, |(_, target)| target.trim());
        if target.starts_with("not found") {
            bail!("a shared library is not found: {line}");
        }
        if let Some(path) = target
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            paths.push(PathBuf::from(path));
        }
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A content-addressed blob of the layout.
struct Blob {
    digest: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        Self {
            digest: format!("sha256:{}", sha256_hex(&bytes)),
            bytes,
        }
    }

    fn path(&self) -> String {
        format!("blobs/sha256/{}", &self.digest["sha256:".len()..])
    }

    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// The root filesystem as one uncompressed tar: directories, the binary, its `kube-proxy`
/// name, the libraries and the loader at the paths the binary looks for them.
fn root_filesystem(binary: &Path, libraries: &[PathBuf], mtime: u64) -> anyhow::Result<Vec<u8>> {
    let mut files: Vec<(String, Vec<u8>)> = vec![(
        BINARY_PATH.to_owned(),
        std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?,
    )];
    for library in libraries {
        let relative = library
            .strip_prefix("/")
            .with_context(|| format!("{} is not absolute", library.display()))?;
        // Read through symlinks: the image holds the file itself under the name ldd printed.
        let bytes =
            std::fs::read(library).with_context(|| format!("reading {}", library.display()))?;
        files.push((relative.to_string_lossy().into_owned(), bytes));
    }
    let mut directories: Vec<String> = files
        .iter()
        .flat_map(|(path, _)| {
            Path::new(path)
                .ancestors()
                .skip(1)
                .filter(|dir| !dir.as_os_str().is_empty())
                .map(|dir| format!("{}/", dir.display()))
                .collect::<Vec<_>>()
        })
        .collect();
    directories.push("tmp/".to_owned());
    directories.sort();
    directories.dedup();
    files.sort();

    let mut builder = tar::Builder::new(Vec::new());
    for dir in &directories {
        let mode = if dir == "tmp/" { 0o1777 } else { 0o755 };
        let mut h = header(tar::EntryType::Directory, mode, 0, mtime);
        builder.append_data(&mut h, dir, std::io::empty())?;
    }
    for (path, bytes) in &files {
        let mut h = header(tar::EntryType::Regular, 0o755, bytes.len() as u64, mtime);
        builder.append_data(&mut h, path, bytes.as_slice())?;
    }
    let mut link = header(tar::EntryType::Symlink, 0o777, 0, mtime);
    builder.append_link(&mut link, KUBE_PROXY_PATH, "kube-ebpf-proxy")?;
    Ok(builder.into_inner()?)
}

fn rfc3339(seconds: u64) -> anyhow::Result<String> {
    let seconds = i64::try_from(seconds).context("a commit time after 2262")?;
    Ok(jiff::Timestamp::from_second(seconds)?.to_string())
}

/// Writes the OCI archive of `binary` and `libraries` to `output`.
pub fn write_archive(
    binary: &Path,
    libraries: &[PathBuf],
    meta: &ImageMeta,
    output: &Path,
) -> anyhow::Result<()> {
    let rootfs = root_filesystem(binary, libraries, meta.created)?;
    let diff_id = format!("sha256:{}", sha256_hex(&rootfs));
    // Fast compression: a release binary compresses nearly as well, in a fraction of the time.
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gzip.write_all(&rootfs)?;
    let layer = Blob::new(gzip.finish()?);
    let created = rfc3339(meta.created)?;
    let labels = json!({
        "org.opencontainers.image.title": "kube-ebpf-proxy",
        "org.opencontainers.image.description":
            "A drop-in kube-proxy replacement that NATs Service traffic in eBPF",
        "org.opencontainers.image.version": meta.version,
        "org.opencontainers.image.revision": meta.revision,
        "org.opencontainers.image.source": SOURCE,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.created": created,
    });
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = Blob::new(serde_json::to_vec(&json!({
        "created": created,
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": [format!("/{BINARY_PATH}")],
            "Env": ["PATH=/usr/local/bin"],
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "cargo xtask image"}],
    }))?);
    let manifest = Blob::new(serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.descriptor(MEDIA_CONFIG),
        "layers": [layer.descriptor(MEDIA_LAYER)],
        "annotations": labels,
    }))?);
    let mut manifest_descriptor = manifest.descriptor(MEDIA_MANIFEST);
    manifest_descriptor["annotations"] = json!({
        // ctr and podman name the image from these.
        "io.containerd.image.name": format!("docker.io/library/{}", meta.reference),
        "org.opencontainers.image.ref.name": meta.version,
    });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [manifest_descriptor],
    }))?;
    // docker load before Docker 25 reads only this file.
    let docker_manifest = serde_json::to_vec(&json!([{
        "Config": config.path(),
        "RepoTags": [meta.reference],
        "Layers": [layer.path()],
    }]))?;

    let mut archive = tar::Builder::new(Vec::new());
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0, meta.created);
        archive.append_data(&mut h, dir, std::io::empty())?;
    }
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec();
    let entries: Vec<(String, &[u8])> = vec![
        ("oci-layout".to_owned(), &layout),
        ("index.json".to_owned(), &index),
        ("manifest.json".to_owned(), &docker_manifest),
        (layer.path(), &layer.bytes),
        (config.path(), &config.bytes),
        (manifest.path(), &manifest.bytes),
    ];
    for (path, bytes) in entries {
        let mut h = header(
            tar::EntryType::Regular,
            0o644,
            bytes.len() as u64,
            meta.created,
        );
        archive.append_data(&mut h, path, bytes)?;
    }
    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(output, archive.into_inner()?)
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests;
