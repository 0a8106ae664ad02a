//! `--cleanup` (kube-proxy's flag): take away everything the proxy put into the kernel, so the
//! node is as it was before the proxy ran, then exit.
//!
//! What can outlive the proxy process, and how each goes:
//! - tc filters attached through netlink (clsact, kernels before 6.6) stay on their interface
//!   after the process exits: they are detached by name on every interface of this network
//!   namespace;
//! - everything pinned under the pin path (maps with their conntrack entries, and pinned
//!   programs and links): the directory tree is removed; an unpinned link that no process holds
//!   any more is detached by the kernel;
//! - TCX and cgroup links that are not pinned live only as long as the process that made them,
//!   so there is nothing left of them to clean.

use std::path::{Path, PathBuf};

use aya::programs::tc::{self, TcAttachType, TcError};

use super::attach::{AttachError, tc_interfaces};
use super::loader::TC_INGRESS;

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(transparent)]
    Interfaces(Box<AttachError>),
    #[error("detaching {program} from interface {interface}: {source}")]
    Detach {
        program: &'static str,
        interface: String,
        source: TcError,
    },
    #[error("removing the pinned objects under {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What [`cleanup`] took away.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Interfaces a netlink-attached tc program was detached from.
    pub detached: Vec<String>,
    /// The pinned objects removed (paths under the pin path, sorted).
    pub unpinned: Vec<PathBuf>,
}

/// Removes every program attachment, pinned link and pinned map the proxy owns in this network
/// namespace under `pin_path`. Safe to run twice: the second run finds nothing.
pub fn cleanup(pin_path: &Path) -> Result<CleanupReport, CleanupError> {
    let mut report = CleanupReport::default();
    let interfaces = tc_interfaces().map_err(|error| CleanupError::Interfaces(Box::new(error)))?;
    for interface in interfaces {
        match tc::qdisc_detach_program(&interface, TcAttachType::Ingress, TC_INGRESS) {
            Ok(()) => report.detached.push(interface),
            // No filter of ours on it (or no clsact qdisc at all, or it just went away).
            Err(TcError::IoError(error)) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(TcError::NetlinkError(error)) if is_absent(&error) => {}
            Err(source) => {
                return Err(CleanupError::Detach {
                    program: TC_INGRESS,
                    interface,
                    source,
                });
            }
        }
    }
    report.unpinned = pinned_objects(pin_path).map_err(|source| CleanupError::Remove {
        path: pin_path.to_owned(),
        source,
    })?;
    match std::fs::remove_dir_all(pin_path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        other => other.map_err(|source| CleanupError::Remove {
            path: pin_path.to_owned(),
            source,
        })?,
    }
    Ok(report)
}

/// A netlink error meaning "nothing there": no clsact qdisc (EINVAL/ENOENT) or the interface
/// is gone (ENODEV).
fn is_absent(error: &aya::sys::NetlinkError) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)
    )
}

/// The files under `dir`, recursively, sorted (none when it does not exist).
fn pinned_objects(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        other => other?,
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        // Not followed: the service-name links point at names, not files.
        if entry.file_type()?.is_dir() {
            found.extend(pinned_objects(&path)?);
        } else {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}
