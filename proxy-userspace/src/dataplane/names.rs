//! Which Service port each service id stands for, kept next to the maps so that `inspect` (and
//! anyone reading the pins) can speak Kubernetes names instead of ids.
//!
//! Stored as one symlink per id under `PIN_PATH/names/`, `ID -> namespace/name:port`: bpffs
//! holds only pinned objects, directories and symlinks, and a symlink's target is free text. So
//! the names live where the ids do, survive a restart as the maps do (and the restarted proxy
//! keeps the ids), go away with them (`--cleanup`), cost no kernel map and no writable file
//! system in the image, and a sync rewrites only the ids that changed. A pinned map of fixed-size
//! names would need a slot size for the longest name and a kernel-side declaration nothing in
//! the kernel reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The directory under the pin path.
const NAMES_DIR: &str = "names";

#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    #[error("{operation} {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> NamesError {
    let path = path.to_owned();
    move |source| NamesError::Io {
        operation,
        path,
        source,
    }
}

/// The service names recorded under `pin_path` (none when nothing was recorded).
pub fn read_service_names(pin_path: &Path) -> Result<BTreeMap<u32, String>, NamesError> {
    let dir = pin_path.join(NAMES_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        other => other.map_err(io("listing", &dir))?,
    };
    let mut names = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(io("listing", &dir))?.path();
        let Some(id) = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let target = std::fs::read_link(&path).map_err(io("reading", &path))?;
        names.insert(id, target.to_string_lossy().into_owned());
    }
    Ok(names)
}

/// The names under a pin path as the running proxy keeps them: read once when it starts, then
/// only the ids whose name changed are written or removed (a sync costs no directory walk).
pub struct ServiceNames {
    dir: PathBuf,
    written: BTreeMap<u32, String>,
}

impl ServiceNames {
    /// Reads what a previous run recorded under `pin_path` (creating the directory).
    pub fn open(pin_path: &Path) -> Result<Self, NamesError> {
        let dir = pin_path.join(NAMES_DIR);
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        Ok(Self {
            written: read_service_names(pin_path)?,
            dir,
        })
    }

    /// Makes the recorded names exactly `names`: stale and changed ids removed, new ones
    /// written. Returns how many links were written or removed.
    pub fn sync(&mut self, names: &BTreeMap<u32, String>) -> Result<usize, NamesError> {
        let mut changes = 0;
        let stale: Vec<u32> = self
            .written
            .iter()
            .filter(|(id, name)| names.get(id) != Some(name))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            let path = self.dir.join(id.to_string());
            std::fs::remove_file(&path).map_err(io("removing", &path))?;
            self.written.remove(&id);
            changes += 1;
        }
        for (id, name) in names {
            if !self.written.contains_key(id) {
                let path = self.dir.join(id.to_string());
                std::os::unix::fs::symlink(name, &path).map_err(io("writing", &path))?;
                self.written.insert(*id, name.clone());
                changes += 1;
            }
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_follow_changes() {
        let pins = tempfile::tempdir().unwrap();
        assert!(read_service_names(pins.path()).unwrap().is_empty());
        let first = BTreeMap::from([
            (1, "default/web:http".to_owned()),
            (2, "kube-system/kube-dns:dns".to_owned()),
        ]);
        let mut names = ServiceNames::open(pins.path()).unwrap();
        assert_eq!(names.sync(&first).unwrap(), 2);
        assert_eq!(read_service_names(pins.path()).unwrap(), first);
        assert_eq!(names.sync(&first).unwrap(), 0, "unchanged");
        let second = BTreeMap::from([
            (2, "kube-system/kube-dns:dns-tcp".to_owned()),
            (3, "default/db:".to_owned()),
        ]);
        // A restarted proxy starts from what is recorded: 1 removed, 2 replaced (remove and
        // write), 3 written.
        let mut restarted = ServiceNames::open(pins.path()).unwrap();
        assert_eq!(restarted.sync(&second).unwrap(), 4);
        assert_eq!(read_service_names(pins.path()).unwrap(), second);
    }
}
