//! `kube-ebpf-proxy cleanup` (kube-proxy's `--cleanup`): removes everything the proxy leaves in
//! the kernel on purpose so the next proxy can take over without a gap.

use std::path::{Path, PathBuf};

use super::attach::{AttachError, links_dir, remove_netlink_filter, tc_interfaces};

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("removing the pins under {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Interfaces(Box<AttachError>),
}

/// What [`cleanup`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// Pinned links removed (each detaching its tc or cgroup program).
    pub links: usize,
    /// Interfaces of this network namespace whose clsact filter was removed.
    pub filters: Vec<String>,
    /// Whether the pin directory (maps, old-layout pins) existed and was removed.
    pub pins: bool,
}

/// Removes every program, link, map and pin the proxy owns under `pin_path`, and its clsact
/// filters on this network namespace's interfaces: pinned links first (their programs detach),
/// then the filters, then the pin directory with the maps. The programs and maps are freed by
/// the kernel once nothing holds them. Run it with no proxy running on that pin path.
pub fn cleanup(pin_path: &Path) -> Result<Cleaned, CleanupError> {
    let remove_error = |path: &Path| {
        let path = path.to_owned();
        move |source| CleanupError::Remove { path, source }
    };
    let mut cleaned = Cleaned::default();
    let links = links_dir(pin_path);
    match std::fs::read_dir(&links) {
        Ok(entries) => {
            for entry in entries {
                let path = entry.map_err(remove_error(&links))?.path();
                std::fs::remove_file(&path).map_err(remove_error(&path))?;
                cleaned.links += 1;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(remove_error(&links)(e)),
    }
    for interface in tc_interfaces().map_err(|e| CleanupError::Interfaces(Box::new(e)))? {
        if remove_netlink_filter(&interface) {
            cleaned.filters.push(interface);
        }
    }
    match std::fs::remove_dir_all(pin_path) {
        Ok(()) => cleaned.pins = true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(remove_error(pin_path)(e)),
    }
    Ok(cleaned)
}
