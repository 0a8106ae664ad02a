//! `BPF_MAP_LOOKUP_BATCH` (Linux ≥ 5.6 for hash and LRU maps) for the conntrack walks: aya 0.14
//! has no wrapper, and its iterator costs two syscalls per entry — a million syscalls for a
//! full 512k-entry conntrack map, every GC pass. A batch walk reads thousands of entries per
//! syscall.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::MapData;

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd`.
pub(super) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `ENOTSUPP` of include/linux/errno.h, which some kernels return from the bpf syscall.
pub(super) const KERNEL_ENOTSUPP: i32 = 524;
/// Entries asked for per call; grown when a hash bucket holds more (ENOSPC).
const FIRST_BATCH: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
pub(super) struct BatchAttr {
    pub(super) in_batch: u64,
    pub(super) out_batch: u64,
    pub(super) keys: u64,
    pub(super) values: u64,
    pub(super) count: u32,
    pub(super) map_fd: u32,
    pub(super) elem_flags: u64,
    pub(super) flags: u64,
}

/// Every (key, value) of the hash map `map`, or `None` when the kernel has no batch lookup
/// for it (the caller then iterates).
pub(super) fn lookup_all<K, V>(map: &MapData) -> std::io::Result<Option<Vec<(K, V)>>>
where
    K: aya::Pod + Default,
    V: aya::Pod + Default,
{
    let fd = map.fd().as_fd().as_raw_fd();
    let mut batch_len = FIRST_BATCH;
    let mut keys: Vec<K> = (0..batch_len).map(|_| K::default()).collect();
    let mut values: Vec<V> = (0..batch_len).map(|_| V::default()).collect();
    let mut entries = Vec::new();
    // Opaque resume tokens (a bucket index for hash maps); 8 bytes cover every map type's.
    let mut in_token: u64 = 0;
    let mut out_token: u64 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                (&raw const in_token) as u64
            },
            out_batch: (&raw mut out_token) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(batch_len).unwrap_or(u32::MAX),
            map_fd: u32::try_from(fd).unwrap_or(u32::MAX),
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` of the size passed; the kernel writes at
        // most `count` keys and values into the two buffers, which hold `batch_len` each, and
        // 4 or 8 bytes of resume token into `out_token`; it writes the filled count back into
        // `attr`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let error = (ret < 0).then(std::io::Error::last_os_error);
        let filled = (attr.count as usize).min(batch_len);
        entries.extend(
            keys[..filled]
                .iter()
                .copied()
                .zip(values[..filled].iter().copied()),
        );
        let Some(error) = error else {
            in_token = out_token;
            first = false;
            continue;
        };
        match error.raw_os_error() {
            // The walk is complete.
            Some(libc::ENOENT) => return Ok(Some(entries)),
            // One bucket holds more entries than a batch: retry it with room for them.
            Some(libc::ENOSPC) if filled == 0 && batch_len < 1 << 20 => {
                batch_len *= 2;
                keys.resize_with(batch_len, K::default);
                values.resize_with(batch_len, V::default);
            }
            // No such command (before 5.6) or not for this map type (EOPNOTSUPP, or the
            // kernel-internal ENOTSUPP older kernels leak).
            Some(libc::EINVAL | libc::EOPNOTSUPP | KERNEL_ENOTSUPP) if first => return Ok(None),
            _ => return Err(error),
        }
    }
}
