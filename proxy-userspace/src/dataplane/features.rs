//! What the running kernel offers the dataplane, probed by asking the kernel — loading tiny
//! programs, creating a map, calling the command — never read off the version string, which
//! says nothing about distribution backports or configuration. Probed once per process.

use std::os::fd::{FromRawFd as _, OwnedFd};
use std::sync::OnceLock;

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{BpfHelper, is_helper_supported, is_map_supported};

use super::batch::{BPF_MAP_LOOKUP_BATCH, BatchAttr, KERNEL_ENOTSUPP};

/// The features the proxy looks for, each probed on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    /// TCX links for tc programs (Linux 6.6); without, a clsact filter (netlink).
    pub tcx: bool,
    /// `bpf_set_retval` in cgroup connect programs (Linux 6.1); without, a REJECTed connect
    /// fails with EPERM instead of ECONNREFUSED.
    pub sock_addr_set_retval: bool,
    /// The `bpf_loop` helper for tc programs.
    pub bpf_loop: bool,
    /// `bpf_redirect_peer` for tc programs.
    pub redirect_peer: bool,
    /// `bpf_redirect_neigh` for tc programs.
    pub redirect_neigh: bool,
    /// `BPF_MAP_LOOKUP_BATCH` on hash maps; without, the conntrack walks iterate per entry.
    pub map_batch_ops: bool,
    /// `BPF_MAP_TYPE_RINGBUF`.
    pub ring_buffer: bool,
}

impl KernelFeatures {
    /// The running kernel's features, probed on the first call.
    pub fn get() -> &'static KernelFeatures {
        static FEATURES: OnceLock<KernelFeatures> = OnceLock::new();
        FEATURES.get_or_init(KernelFeatures::probe)
    }

    fn probe() -> KernelFeatures {
        let helper = |helper: BpfHelper, name: &str| {
            logged(
                name,
                is_helper_supported(ProgramType::SchedClassifier, helper),
            )
        };
        KernelFeatures {
            tcx: logged("tcx", probe_tcx()),
            sock_addr_set_retval: logged(
                "sock_addr_set_retval",
                is_helper_supported(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval),
            ),
            bpf_loop: helper(BpfHelper::BPF_FUNC_loop, "bpf_loop"),
            redirect_peer: helper(BpfHelper::BPF_FUNC_redirect_peer, "redirect_peer"),
            redirect_neigh: helper(BpfHelper::BPF_FUNC_redirect_neigh, "redirect_neigh"),
            map_batch_ops: logged("map_batch_ops", probe_map_batch_ops()),
            ring_buffer: logged("ring_buffer", is_map_supported(MapType::RingBuf)),
        }
    }

    /// (name, offered) for every feature, in a fixed order: for logs and `/metrics`.
    pub fn list(&self) -> [(&'static str, bool); 7] {
        [
            ("tcx", self.tcx),
            ("sock_addr_set_retval", self.sock_addr_set_retval),
            ("bpf_loop", self.bpf_loop),
            ("redirect_peer", self.redirect_peer),
            ("redirect_neigh", self.redirect_neigh),
            ("map_batch_ops", self.map_batch_ops),
            ("ring_buffer", self.ring_buffer),
        ]
    }
}

/// A probe that could not tell (no privilege, say) counts the feature as absent, and says so.
fn logged<E: std::fmt::Display>(feature: &str, probed: Result<bool, E>) -> bool {
    probed.unwrap_or_else(|e| {
        tracing::warn!(feature, error = %e, "probing a kernel feature failed; taking it as absent");
        false
    })
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// `BPF_TCX_INGRESS` in `enum bpf_attach_type`.
const BPF_TCX_INGRESS: u32 = 46;

/// `bpf(cmd, attr)`: the new file descriptor or 0, or the errno.
fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> Result<i64, i32> {
    // SAFETY: `attr` is a live, initialised `repr(C)` prefix of `union bpf_attr` of the given
    // size; the kernel zero-extends shorter attributes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(ret)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: `fd` was just returned by the bpf syscall and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("file descriptors fit in i32")) }
}

#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// A TCX link asked for on interface index 0: a kernel with TCX gets as far as looking the
/// interface up (ENODEV); one without refuses the attach type (EINVAL). Nothing is attached.
fn probe_tcx() -> Result<bool, std::io::Error> {
    // r0 = 0; exit
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let mut load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
    };
    let prog = owned(sys_bpf(BPF_PROG_LOAD, &mut load).map_err(std::io::Error::from_raw_os_error)?);
    let mut link = LinkCreateAttr {
        prog_fd: u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&prog)).unwrap_or(u32::MAX),
        target_ifindex: 0,
        attach_type: BPF_TCX_INGRESS,
        flags: 0,
    };
    match sys_bpf(BPF_LINK_CREATE, &mut link) {
        Err(libc::ENODEV) => Ok(true),
        Err(libc::EINVAL) => Ok(false),
        Ok(fd) => {
            drop(owned(fd));
            Ok(true)
        }
        Err(errno) => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

/// `BPF_MAP_LOOKUP_BATCH` on an empty one-entry hash map: ENOENT (nothing more) when the kernel
/// has the command, EINVAL or ENOTSUPP when not.
fn probe_map_batch_ops() -> Result<bool, std::io::Error> {
    let mut create = MapCreateAttr {
        map_type: BPF_MAP_TYPE_HASH,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
    };
    let map =
        owned(sys_bpf(BPF_MAP_CREATE, &mut create).map_err(std::io::Error::from_raw_os_error)?);
    let mut out_token = 0u64;
    let mut key = 0u32;
    let mut value = 0u32;
    let mut batch = BatchAttr {
        out_batch: (&raw mut out_token) as u64,
        keys: (&raw mut key) as u64,
        values: (&raw mut value) as u64,
        count: 1,
        map_fd: u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&map)).unwrap_or(u32::MAX),
        ..BatchAttr::default()
    };
    match sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut batch) {
        Ok(_) | Err(libc::ENOENT) => Ok(true),
        Err(libc::EINVAL | libc::EOPNOTSUPP | KERNEL_ENOTSUPP) => Ok(false),
        Err(errno) => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the kernel running the tests (as root, like every kernel test): the probes answer
    /// without error, and what every supported kernel (≥ 6.1) has is found.
    #[test]
    fn the_probes_answer_and_find_what_every_supported_kernel_has() {
        let tcx = probe_tcx().expect("probe TCX");
        let batch = probe_map_batch_ops().expect("probe batch ops");
        assert!(batch, "batch map operations exist since 5.6");
        let features = KernelFeatures::get();
        assert_eq!(features.tcx, tcx);
        assert!(
            features.sock_addr_set_retval,
            "bpf_set_retval for connect since 6.1"
        );
        assert!(features.bpf_loop && features.redirect_peer && features.redirect_neigh);
        assert!(features.ring_buffer);
    }
}
