//! The vocabulary shared by the kernel programs and the controller: map names, sizes, keys and
//! values. Everything here is `#[repr(C)]` with explicit padding so both sides agree byte for byte.
#![no_std]

/// Per-CPU packet counters, indexed by [`Counter`]; pinned as this name.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Indexes into the per-CPU counters array. The names are what `kube-ebpf-proxy stats` prints.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets seen by the tc ingress program.
    TcIngressPackets = 0,
}

impl Counter {
    pub const ALL: [Counter; 1] = [Counter::TcIngressPackets];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::TcIngressPackets => "tc_ingress_packets",
        }
    }
}

/// Size of the counters array: room to add counters without resizing the pinned map.
pub const COUNTER_SLOTS: u32 = 64;
