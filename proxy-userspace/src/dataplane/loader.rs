use std::path::{Path, PathBuf};

use aya::programs::{CgroupSockAddr, Program, ProgramError, SchedClassifier};
use aya::{Ebpf, EbpfLoader};

use super::migrate::{self, PinnedLayout};

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
    #[error("the eBPF object has no program {0}")]
    NoProgram(&'static str),
    #[error("loading (verifying) program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("loading the eBPF object (maps pinned under {path}): {source}")]
    Load {
        path: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error(
        "the maps pinned under {path} have the older layout version {version}: \
         `kube-ebpf-proxy run` migrates them"
    )]
    OldLayout { path: PathBuf, version: u32 },
    #[error("pinning program {program} at {path}: {source}")]
    PinProgram {
        program: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("migrating the maps pinned under {path}: {source}")]
    Migrate {
        path: PathBuf,
        source: Box<super::migrate::MigrateError>,
    },
}

/// The loaded programs and maps; maps are pinned under `pin_path` so a restarted proxy finds
/// the same maps (and the connections in them) again.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub pin_path: PathBuf,
    /// Pins of an older layout still being migrated from (see [`Loaded::finish_migration`]).
    migrating_from: Option<(PathBuf, u32)>,
}

impl Loaded {
    /// Finishes a migration once this object's programs have replaced the old ones (the old
    /// programs no longer write the old maps): copies the conntrack entries they created or
    /// advanced since the load, then removes the old pins. Returns the entries copied.
    pub fn finish_migration(&mut self) -> Result<usize, LoadError> {
        let Some((old, version)) = self.migrating_from.take() else {
            return Ok(0);
        };
        let migrate_error = |source| LoadError::Migrate {
            path: self.pin_path.clone(),
            source: Box::new(source),
        };
        let copied = migrate::migrate_conntrack(&old, &self.pin_path).map_err(migrate_error)?;
        migrate::remove_old(&old).map_err(migrate_error)?;
        tracing::info!(
            from = version,
            to = proxy_common::MAP_LAYOUT_VERSION,
            flows = copied,
            old = %old.display(),
            "map layout migration finished; the old pins are removed"
        );
        Ok(copied)
    }
}

/// Where the running proxy pins the tc ingress program it attached, so `trace --bpf-pin-path`
/// runs that very program instead of loading (verifying) its own each time.
pub fn tc_ingress_pin(pin_path: &Path) -> PathBuf {
    pin_path.join("programs").join(TC_INGRESS)
}

impl Loaded {
    /// Pins this object's tc ingress program at [`tc_ingress_pin`], replacing (atomically: a
    /// rename on bpffs) the one an earlier proxy pinned there.
    pub fn pin_tc_ingress(&mut self) -> Result<(), LoadError> {
        let path = tc_ingress_pin(&self.pin_path);
        // bpffs refuses names with dots.
        let staged = path.with_file_name(format!("{TC_INGRESS}_staged"));
        let failed = |path: &Path, source| LoadError::PinProgram {
            program: TC_INGRESS,
            path: path.to_owned(),
            source,
        };
        let dir = path.parent().expect("the pin has a directory");
        std::fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
        // Left by a proxy that stopped between pinning and renaming.
        match std::fs::remove_file(&staged) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(failed(&staged, e)),
            _ => {}
        }
        let program = self
            .ebpf
            .program_mut(TC_INGRESS)
            .ok_or(LoadError::NoProgram(TC_INGRESS))?;
        program
            .pin(&staged)
            .map_err(|e| failed(&staged, std::io::Error::other(e)))?;
        std::fs::rename(&staged, &path).map_err(|e| failed(&path, e))
    }
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

/// `max_entries` of the maps whose size is a deployment choice. A map already pinned keeps the
/// size it was created with (it holds live connections); a new size applies after its pin is
/// removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
    pub affinity: u32,
    pub source_ranges: u32,
    pub vips: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: proxy_common::SERVICES_MAX_ENTRIES,
            backends: proxy_common::BACKENDS_MAX_ENTRIES,
            conntrack: proxy_common::CONNTRACK_MAX_ENTRIES,
            affinity: proxy_common::AFFINITY_MAX_ENTRIES,
            source_ranges: proxy_common::SOURCE_RANGES_MAX_ENTRIES,
            vips: proxy_common::VIPS_MAX_ENTRIES,
        }
    }
}

/// Loads the embedded programs with the default map sizes, reusing maps already pinned under
/// `pin_path`.
pub fn load(pin_path: &Path) -> Result<Loaded, LoadError> {
    load_with_sizes(pin_path, &MapSizes::default())
}

/// Loads the embedded object (maps created or reused from `pin_path`, programs verified and
/// loaded into the kernel, nothing attached yet). Pins of an older map layout are an error
/// ([`load_migrating`] migrates them).
pub fn load_with_sizes(pin_path: &Path, sizes: &MapSizes) -> Result<Loaded, LoadError> {
    load_pins(pin_path, sizes, false)
}

/// [`load_with_sizes`] that migrates pins of an older map layout (see `dataplane::migrate`):
/// they are moved aside, fresh maps are created and the flows copied into them. The migration
/// ends with [`Loaded::finish_migration`], after the new programs are attached.
pub fn load_migrating(pin_path: &Path, sizes: &MapSizes) -> Result<Loaded, LoadError> {
    load_pins(pin_path, sizes, true)
}

fn load_pins(pin_path: &Path, sizes: &MapSizes, migrate: bool) -> Result<Loaded, LoadError> {
    ensure_bpffs(pin_path)?;
    std::fs::create_dir_all(pin_path).map_err(|source| LoadError::PinDir {
        path: pin_path.to_owned(),
        source,
    })?;
    let migrate_error = |source| LoadError::Migrate {
        path: pin_path.to_owned(),
        source: Box::new(source),
    };
    let migrating_from = match migrate::pinned_layout(pin_path).map_err(migrate_error)? {
        PinnedLayout::Old(version) if migrate => Some((
            migrate::move_aside(pin_path, version).map_err(migrate_error)?,
            version,
        )),
        PinnedLayout::Old(version) => {
            return Err(LoadError::OldLayout {
                path: pin_path.to_owned(),
                version,
            });
        }
        // A migration interrupted after its pins were moved: it resumes from them.
        PinnedLayout::Current if migrate => migrate::interrupted(pin_path),
        PinnedLayout::Current => None,
    };
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_path)
        .map_max_entries(proxy_common::SERVICES_MAP, sizes.services)
        .map_max_entries(proxy_common::BACKENDS_MAP, sizes.backends)
        .map_max_entries(proxy_common::CONNTRACK_MAP, sizes.conntrack)
        .map_max_entries(proxy_common::AFFINITY_MAP, sizes.affinity)
        .map_max_entries(proxy_common::SOURCE_RANGES_MAP, sizes.source_ranges)
        .map_max_entries(proxy_common::VIPS_MAP, sizes.vips)
        .override_global(SOCK_SET_RETVAL, &u8::from(sock_addr_has_set_retval()), true)
        .load(EBPF_OBJECT)
        .map_err(|source| LoadError::Load {
            path: pin_path.to_owned(),
            source: Box::new(source),
        })?;
    load_programs(&mut ebpf)?;
    if let Some((old, version)) = &migrating_from {
        let copied = migrate::migrate_from(old, *version, pin_path).map_err(migrate_error)?;
        tracing::info!(
            from = version,
            to = proxy_common::MAP_LAYOUT_VERSION,
            ?copied,
            "migrating the pinned maps to the current layout"
        );
    }
    migrate::write_layout(pin_path).map_err(migrate_error)?;
    Ok(Loaded {
        ebpf,
        pin_path: pin_path.to_owned(),
        migrating_from,
    })
}

/// The eBPF global telling the socket hooks whether they may call `bpf_set_retval`.
const SOCK_SET_RETVAL: &str = "SOCK_SET_RETVAL";

/// `bpf_set_retval` for cgroup sock_addr programs (Linux 6.1, "expose bpf_{g,s}et_retval to
/// more cgroup hooks"), probed; without it a refused connect fails with EPERM.
fn sock_addr_has_set_retval() -> bool {
    super::KernelFeatures::get().sock_addr_set_retval
}

/// The tc program attached to the ingress of every selected Ethernet interface.
pub const TC_INGRESS: &str = "tc_ingress";
/// Its variant for layer-3 interfaces (tun, WireGuard, IP tunnels: packets without a
/// link-layer header), attached by the same interface rules.
pub const TC_INGRESS_L3: &str = "tc_ingress_l3";
/// The tc programs on the egress of the same interfaces (Ethernet, layer-3): the node's own ICMP
/// errors about translated flows get the flow's translation back.
pub const TC_EGRESS: &str = "tc_egress";
pub const TC_EGRESS_L3: &str = "tc_egress_l3";

/// The cgroup sock_addr programs for host-originated traffic (see `proxy-ebpf/src/sock.rs`).
pub const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    "sock_connect4",
    "sock_connect6",
    "sock_sendmsg4",
    "sock_sendmsg6",
    "sock_recvmsg4",
    "sock_recvmsg6",
    "sock_getpeername4",
    "sock_getpeername6",
];

/// Loads every program into the kernel, so the verifier has accepted all of them before
/// anything is attached.
fn load_programs(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    for name in [TC_INGRESS, TC_INGRESS_L3, TC_EGRESS, TC_EGRESS_L3] {
        load_program(ebpf, name, SchedClassifier::load)?;
    }
    for name in SOCK_ADDR_PROGRAMS {
        load_program(ebpf, name, CgroupSockAddr::load)?;
    }
    Ok(())
}

/// Loads program `name` of type `P` with `load`.
fn load_program<P>(
    ebpf: &mut Ebpf,
    name: &'static str,
    load: fn(&mut P) -> Result<(), ProgramError>,
) -> Result<(), LoadError>
where
    for<'a> &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let failed = |source| LoadError::Program {
        program: name,
        source,
    };
    let program: &mut P = ebpf
        .program_mut(name)
        .ok_or(LoadError::NoProgram(name))?
        .try_into()
        .map_err(failed)?;
    load(program).map_err(failed)
}
