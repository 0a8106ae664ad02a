use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;

use super::*;

#[test]
fn ldd_output_table() {
    let glibc = "\tlinux-vdso.so.1 (0x00007ffd6b5f4000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f83d0576000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f83cde1e000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f83d05a9000)
";
    assert_eq!(
        parse_ldd(glibc).unwrap(),
        [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/x86_64-linux-gnu/libgcc_s.so.1",
            "/lib64/ld-linux-x86-64.so.2",
        ]
        .map(PathBuf::from)
    );
    assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    let missing = parse_ldd("\tlibbpf.so.1 => not found\n").unwrap_err();
    assert!(missing.to_string().contains("libbpf.so.1"), "{missing}");
}

/// The outer archive's files by path.
fn archive_files(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut files = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type().is_file() {
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            files.insert(name, bytes);
        }
    }
    files
}

/// The blob a descriptor names, checked against its digest and size.
fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, descriptor: &serde_json::Value) -> &'a [u8] {
    let digest = descriptor["digest"].as_str().expect("a digest");
    let hex = digest.strip_prefix("sha256:").expect("sha256");
    let bytes = files
        .get(&format!("blobs/sha256/{hex}"))
        .unwrap_or_else(|| panic!("no blob {digest}"));
    assert_eq!(sha256_hex(bytes), hex, "the blob's content has its digest");
    assert_eq!(descriptor["size"], bytes.len(), "{digest} size");
    bytes
}

fn chroot(root: &Path, user: Option<&str>, program: &str) -> String {
    let mut cmd = Command::new("chroot");
    if let Some(user) = user {
        cmd.arg(format!("--userspec={user}"));
    }
    let out = cmd.arg(root).args([program, "--version"]).output().unwrap();
    assert!(out.status.success(), "{program} in the image: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Builds the image of the debug binary (the release binary is built the same way) and checks
/// the archive's layout, that the root filesystem holds the binary and its libraries and
/// nothing else, that the binary runs in it (as root and as nobody), and that skopeo reads it.
#[test]
fn image_archive_layout_and_the_binary_runs_inside() {
    let (binary, _) = crate::lab::build_binaries().unwrap();
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("image.oci.tar");
    let meta = image_meta(&binary, "kube-ebpf-proxy").unwrap();
    let libraries = shared_libraries(&binary).unwrap();
    assert!(
        libraries
            .iter()
            .any(|l| l.to_string_lossy().contains("ld-linux")),
        "the loader is packaged: {libraries:?}"
    );
    write_archive(&binary, &libraries, &meta, &output).unwrap();

    let files = archive_files(&output);
    let layout: serde_json::Value = serde_json::from_slice(&files["oci-layout"]).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    let descriptor = &index["manifests"][0];
    assert_eq!(descriptor["mediaType"], MEDIA_MANIFEST);
    assert_eq!(
        descriptor["annotations"]["io.containerd.image.name"],
        format!("docker.io/library/kube-ebpf-proxy:{}", meta.version)
    );
    let manifest: serde_json::Value = serde_json::from_slice(blob(&files, descriptor)).unwrap();
    assert_eq!(manifest["config"]["mediaType"], MEDIA_CONFIG);
    let config: serde_json::Value =
        serde_json::from_slice(blob(&files, &manifest["config"])).unwrap();
    assert_eq!(config["os"], "linux");
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], meta.version);
    assert_eq!(labels["org.opencontainers.image.source"], SOURCE);
    assert_eq!(labels["org.opencontainers.image.revision"], meta.revision);
    assert!(config["config"].get("User").is_none(), "no user is assumed");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "FROM scratch: one layer");
    assert_eq!(layers[0]["mediaType"], MEDIA_LAYER);
    let mut rootfs = Vec::new();
    flate2::read::GzDecoder::new(blob(&files, &layers[0]))
        .read_to_end(&mut rootfs)
        .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        format!("sha256:{}", sha256_hex(&rootfs)),
        "the diff id is the uncompressed layer's digest"
    );
    let docker: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    assert_eq!(
        docker[0]["Layers"][0],
        format!(
            "blobs/sha256/{}",
            layers[0]["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
        )
    );

    let root = work.path().join("rootfs");
    let mut layer = tar::Archive::new(rootfs.as_slice());
    layer.set_preserve_permissions(true);
    layer.unpack(&root).unwrap();
    let mut found = BTreeSet::new();
    let mut pending = vec![root.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                pending.push(path);
            } else {
                found.insert(path.strip_prefix(&root).unwrap().to_path_buf());
            }
        }
    }
    let expected: BTreeSet<PathBuf> = [BINARY_PATH, KUBE_PROXY_PATH]
        .into_iter()
        .map(PathBuf::from)
        .chain(
            libraries
                .iter()
                .map(|l| l.strip_prefix("/").unwrap().to_path_buf()),
        )
        .collect();
    assert_eq!(found, expected, "the binary, its libraries, nothing else");
    let version = format!("kube-ebpf-proxy v{}", meta.version);
    assert_eq!(
        chroot(&root, None, "/usr/local/bin/kube-ebpf-proxy"),
        version
    );
    assert_eq!(
        chroot(&root, Some("65534:65534"), "/usr/local/bin/kube-proxy"),
        version,
        "runs as a non-root user, under kube-proxy's name"
    );

    let inspected = proxy_lab::run(
        Command::new("skopeo").args(["inspect", &format!("oci-archive:{}", output.display())]),
    )
    .unwrap();
    let inspected: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(
        inspected["Labels"]["org.opencontainers.image.version"],
        meta.version
    );
    assert_eq!(inspected["Layers"][0], layers[0]["digest"]);
    // A copy verifies every blob against its digest: as OCI archive (podman, ctr, docker ≥ 25)
    // and as Docker archive (older docker load, through manifest.json).
    for (transport, copy) in [
        ("oci-archive", "oci-copy"),
        ("docker-archive", "docker-copy"),
    ] {
        proxy_lab::run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            &format!("{transport}:{}", output.display()),
            &format!("dir:{}", work.path().join(copy).display()),
        ]))
        .unwrap_or_else(|e| panic!("{transport}: {e}"));
    }
}
