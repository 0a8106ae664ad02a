//! The kernel side as the controller sees it: loading the embedded programs, pinning their maps,
//! attaching them to interfaces and cgroups (attachments that outlive the process), migrating
//! pins of an older map layout, removing it all (`cleanup`), the typed map API, conntrack GC and
//! the packet tracer.

mod attach;
mod batch;
mod cleanup;
mod counters;
mod features;
mod gc;
mod loader;
mod local_ports;
mod maps;
pub mod migrate;
mod names;
pub mod packet;
mod programmed;
mod trace;
mod watch;

pub use attach::{
    AttachError, Attachments, InterfaceFilter, TcAttachMode, attach_socket_hooks, cgroup2_root,
    links_dir, tc_interfaces,
};
pub use cleanup::{Cleaned, CleanupError, cleanup};
pub use counters::{CountersError, read_counters};
pub use features::KernelFeatures;
pub use gc::{CtTimeouts, GcStats, collect_garbage, monotonic_now_ns, orphan_entries};
pub use loader::{
    LoadError, Loaded, MapSizes, TC_EGRESS, TC_EGRESS_L3, TC_INGRESS, TC_INGRESS_L3, ensure_bpffs,
    load, load_migrating, load_with_sizes,
};
pub use local_ports::{LocalPortsError, reserve_local_ports};
pub use maps::{MapFill, Maps, MapsError, addr_from_ip, count_frontends, ip_from_addr};
pub use names::{NamesError, ServiceNames, read_service_names};
pub use trace::{
    ProgramOrigin, TraceError, TraceFrom, TraceRequest, TraceResult, TraceTarget, Verdict,
    pinned_tc_ingress, run_tc, run_tc_program, trace,
};
pub use watch::{LinkWatcher, WatchError, netns_cookie};
