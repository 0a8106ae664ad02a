//! The kernel side as the controller sees it: loading the embedded programs, pinning their maps,
//! and attaching them to interfaces.

mod attach;
mod counters;
mod loader;

pub use attach::{AttachError, Attachments, tc_interfaces};
pub use counters::{CountersError, read_counters};
pub use loader::{LoadError, Loaded, ensure_bpffs, load};
