use std::path::{Path, PathBuf};

use aya::{Ebpf, EbpfLoader};

/// The eBPF object built by `proxy-userspace/build.rs` (see `xtask/src/ebpf_build.rs`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("creating the pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mounting bpffs at {path}: {source}")]
    MountBpffs { path: PathBuf, source: nix::Error },
    #[error("loading the eBPF object (maps pinned under {path}): {source}")]
    Load {
        path: PathBuf,
        source: Box<aya::EbpfError>,
    },
}

/// The loaded programs and maps; maps are pinned under `pin_path` so a restarted proxy finds
/// the same maps (and the connections in them) again.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub pin_path: PathBuf,
}

/// Makes sure `pin_path`'s parent is on a bpffs, mounting one at `/sys/fs/bpf` when the machine
/// has none there (hosts without systemd's mount of it, and fresh test machines).
pub fn ensure_bpffs(pin_path: &Path) -> Result<(), LoadError> {
    let parent = pin_path.parent().unwrap_or(Path::new("/"));
    let on_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
    };
    if on_bpffs(parent) {
        return Ok(());
    }
    let mount_point = Path::new("/sys/fs/bpf");
    if parent.starts_with(mount_point) && !on_bpffs(mount_point) {
        std::fs::create_dir_all(mount_point).map_err(|source| LoadError::PinDir {
            path: mount_point.to_owned(),
            source,
        })?;
        nix::mount::mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| LoadError::MountBpffs {
            path: mount_point.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// Loads the embedded programs, reusing maps already pinned under `pin_path`.
pub fn load(pin_path: &Path) -> Result<Loaded, LoadError> {
    ensure_bpffs(pin_path)?;
    std::fs::create_dir_all(pin_path).map_err(|source| LoadError::PinDir {
        path: pin_path.to_owned(),
        source,
    })?;
    let ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_path)
        .load(EBPF_OBJECT)
        .map_err(|source| LoadError::Load {
            path: pin_path.to_owned(),
            source: Box::new(source),
        })?;
    Ok(Loaded {
        ebpf,
        pin_path: pin_path.to_owned(),
    })
}
