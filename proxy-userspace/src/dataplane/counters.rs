use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, PerCpuArray};
use proxy_common::{COUNTERS_MAP, Counter};

#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    #[error("opening the pinned counters map {path}: {source}")]
    Open {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error("reading counter {name}: {source}")]
    Read {
        name: &'static str,
        source: aya::maps::MapError,
    },
}

fn open_counters(pin_path: &Path) -> Result<PerCpuArray<MapData, u64>, CountersError> {
    let path = pin_path.join(COUNTERS_MAP);
    let data = MapData::from_pin(&path).map_err(|source| CountersError::Open {
        path: path.clone(),
        source,
    })?;
    PerCpuArray::try_from(Map::PerCpuArray(data))
        .map_err(|source| CountersError::Open { path, source })
}

fn sum(array: &PerCpuArray<MapData, u64>, counter: Counter) -> Result<u64, CountersError> {
    let per_cpu = array
        .get(&(counter as u32), 0)
        .map_err(|source| CountersError::Read {
            name: counter.name(),
            source,
        })?;
    Ok(per_cpu.iter().sum())
}

/// Sums the per-CPU counters pinned under `pin_path`, in [`Counter::ALL`] order.
pub fn read_counters(pin_path: &Path) -> Result<Vec<(&'static str, u64)>, CountersError> {
    let array = open_counters(pin_path)?;
    Counter::ALL
        .iter()
        .map(|&counter| Ok((counter.name(), sum(&array, counter)?)))
        .collect()
}

/// One counter pinned under `pin_path`, summed over the CPUs.
pub fn read_counter(pin_path: &Path, counter: Counter) -> Result<u64, CountersError> {
    sum(&open_counters(pin_path)?, counter)
}
